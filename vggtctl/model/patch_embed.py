"""DINOv2 ViT with register tokens: image -> final-norm patch tokens.

Token layout inside the ViT: [cls, registers, patches]. cls and patches get the learned
position embedding (the 37x37 grid resized bicubically with antialias to the actual grid);
registers are inserted after the position embedding and get none. Only the patch tokens of
the final LayerNorm leave this module.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vggtctl.model.config import ViTConfig
from vggtctl.model.layers import Block


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> embed dim, flattened row-major."""

    def __init__(self, patch_size: int, embed_dim: int, in_chans: int = 3) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class DinoViT(nn.Module):
    """The patch embedder of the aggregator (`aggregator.patch_embed.*` in checkpoints)."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.config = config
        dim = config.embed_dim
        self.patch_size = config.patch_size
        self.num_register_tokens = config.num_register_tokens
        self.patch_embed = PatchEmbed(config.patch_size, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + config.pos_grid**2, dim))
        self.register_tokens = nn.Parameter(torch.zeros(1, config.num_register_tokens, dim))
        self.mask_token = nn.Parameter(torch.zeros(1, dim))  # kept for checkpoint compatibility
        self.blocks = nn.ModuleList(
            Block(dim, config.num_heads, config.mlp_ratio, norm_eps=config.layer_norm_eps)
            for _ in range(config.depth)
        )
        self.norm = nn.LayerNorm(dim, eps=config.layer_norm_eps)

    def position_embedding(self, grid_h: int, grid_w: int, dtype: torch.dtype) -> Tensor:
        """[1, 1 + grid_h * grid_w, C]: cls entry + the learned grid resized to (grid_h, grid_w)."""
        side = self.config.pos_grid
        if grid_h * grid_w == side * side and grid_h == grid_w:
            return self.pos_embed.to(dtype)
        pos = self.pos_embed.float()
        dim = pos.shape[-1]
        grid = pos[:, 1:].reshape(1, side, side, dim).permute(0, 3, 1, 2)
        grid = F.interpolate(
            grid, size=(grid_h, grid_w), mode="bicubic", antialias=self.config.interpolate_antialias
        )
        grid = grid.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, dim)
        return torch.cat([pos[:, :1], grid], dim=1).to(dtype)

    def forward(self, images: Tensor) -> Tensor:
        """images [N, 3, H, W] (already normalized) -> patch tokens [N, H/p * W/p, C]."""
        n, _, h, w = images.shape
        grid_h, grid_w = h // self.patch_size, w // self.patch_size
        x = self.patch_embed(images)
        # torch.cat promotes mixed dtypes, so under autocast the token stream is float32 from
        # here on, as in the reference.
        x = torch.cat([self.cls_token.expand(n, -1, -1), x], dim=1)
        x = x + self.position_embedding(grid_h, grid_w, x.dtype)
        x = torch.cat([x[:, :1], self.register_tokens.expand(n, -1, -1), x[:, 1:]], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.norm(x[:, 1 + self.num_register_tokens :])
