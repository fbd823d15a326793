"""The VGGT aggregator: patch embedding, then alternating frame and global attention.

Input [B, S, 3, H, W] in [0, 1] (H, W multiples of 14). Per frame the token sequence is
[camera (1), registers (4), patches (row-major)]; the first frame of a sequence uses slot 0 of
the camera/register parameters, later frames slot 1. Layer i runs frame block i on each frame
alone ([B*S, P, C]) and global block i on all frames of a sequence ([B, S*P, C]); its output is
concat(frame_i, global_i) -> [B, S, P, 2C]. Only the requested layers are kept, and the trunk
stops after the deepest one.

Attention modes: "full" (every frame sees every frame, upstream VGGT) and "causal" (in global
attention frame i sees frames <= i). `stream_step` runs the causal model one frame at a time
with a K/V cache and equals the causal forward.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from vggtctl.model.config import AggregatorConfig
from vggtctl.model.layers import Attention, Block
from vggtctl.model.patch_embed import DinoViT
from vggtctl.model.rope import Rope2D
from vggtctl.model.streaming import StreamState

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
ATTENTION_MODES = ("full", "causal")


def resolve_layer(layer: int, depth: int) -> int:
    """A layer index as a non-negative int (-2 -> depth - 2); ValueError when out of range."""
    if not -depth <= layer < depth:
        raise ValueError(f"layer {layer} out of range for a model with {depth} layers")
    return layer % depth


def patch_tokens(layer_output: Tensor, patch_start_idx: int = 5) -> Tensor:
    """Drop the camera and register tokens: [..., P, 2C] -> [..., P - patch_start_idx, 2C]."""
    return layer_output[..., patch_start_idx:, :]


class Aggregator(nn.Module):
    """State-dict compatible with the `aggregator.*` part of a VGGT checkpoint."""

    def __init__(self, config: AggregatorConfig) -> None:
        super().__init__()
        self.config = config
        dim = config.embed_dim
        self.patch_start_idx = config.patch_start_idx
        self.patch_embed = DinoViT(config.vit)
        self.camera_token = nn.Parameter(torch.zeros(1, 2, 1, dim))
        self.register_token = nn.Parameter(torch.zeros(1, 2, config.num_register_tokens, dim))
        self.frame_blocks = nn.ModuleList(self._block() for _ in range(config.depth))
        self.global_blocks = nn.ModuleList(self._block() for _ in range(config.depth))
        self.register_buffer("image_mean", torch.empty(1, 3, 1, 1), persistent=False)
        self.register_buffer("image_std", torch.empty(1, 3, 1, 1), persistent=False)
        self.reset_constants()
        self.rope = Rope2D(config.head_dim, config.rope_freq)

    def _block(self) -> Block:
        c = self.config
        return Block(
            c.embed_dim,
            c.num_heads,
            c.mlp_ratio,
            qkv_bias=c.qkv_bias,
            proj_bias=c.proj_bias,
            ffn_bias=c.ffn_bias,
            qk_norm=c.qk_norm,
            norm_eps=c.layer_norm_eps,
        )

    @property
    def depth(self) -> int:
        return self.config.depth

    def reset_constants(self) -> None:
        """(Re)fill the non-persistent ImageNet mean/std, e.g. after loading onto a meta-built model."""
        device = self.camera_token.device
        if device.type == "meta":
            device = torch.device("cpu")
        self.image_mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
        self.image_std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)

    def set_attention_kernel(self, name: str) -> None:
        """Prefer `name`'s SDPA kernel in every attention layer (see vggtctl.model.sdpa)."""
        for module in self.modules():
            if isinstance(module, Attention):
                module.set_kernel(name)

    def compile_blocks(self, **compile_kwargs: Any) -> None:
        """torch.compile every transformer block, and the cached (streaming) path of global blocks.

        Blocks share code, so identical shapes reuse one graph; the trunk loop stays eager.
        """
        for block in [*self.patch_embed.blocks, *self.frame_blocks, *self.global_blocks]:
            block.compile(**compile_kwargs)
        for block in self.global_blocks:
            block.forward_cached = torch.compile(block.forward_cached, **compile_kwargs)

    # ------------------------------------------------------------------ pieces

    def embed_frames(self, images: Tensor) -> Tensor:
        """[N, 3, H, W] in [0, 1] -> patch tokens [N, H/14 * W/14, C]."""
        _, channels, h, w = images.shape
        p = self.config.patch_size
        if channels != 3 or h % p or w % p or h == 0 or w == 0:
            raise ValueError(
                f"expected images [N, 3, H, W] with H, W multiples of {p}, got {tuple(images.shape)}"
            )
        x = (images - self.image_mean) / self.image_std
        x = x.to(self.patch_embed.patch_embed.proj.weight.dtype)
        return self.patch_embed(x)

    def _rope_tables(self, h: int, w: int, like: Tensor) -> tuple[Tensor, Tensor]:
        # Under autocast q/k leave their LayerNorm in float32; otherwise they keep the token dtype.
        dtype = torch.float32 if torch.is_autocast_enabled(like.device.type) else like.dtype
        p = self.config.patch_size
        return self.rope.tables(h // p, w // p, self.patch_start_idx, like.device, dtype)

    def _specials(self, batch: int, frames: int) -> Tensor:
        """Camera + register tokens [batch * frames, 5, C]: slot 0 for frame 0, slot 1 after."""

        def expand(param: Tensor) -> Tensor:
            first = param[:, :1].expand(batch, 1, *param.shape[2:])
            rest = param[:, 1:].expand(batch, frames - 1, *param.shape[2:])
            return torch.cat([first, rest], dim=1).flatten(0, 1)

        return torch.cat([expand(self.camera_token), expand(self.register_token)], dim=1)

    def _wanted(self, layers: Sequence[int]) -> list[int]:
        if not layers:
            raise ValueError("ask for at least one layer")
        return [resolve_layer(int(i), self.depth) for i in layers]

    # ------------------------------------------------------------------ forward

    def forward(
        self,
        images: Tensor,
        layers: Sequence[int] = (-2,),
        attention: str = "full",
        frame_index: Tensor | None = None,
    ) -> list[Tensor]:
        """images [B, S, 3, H, W] -> one [B, S, P, 2C] tensor per entry of `layers`, in order.

        With `frame_index` ([B, S] integers), `images` holds distinct frames [U, 3, H, W] and
        sequence b's frame s is images[frame_index[b, s]]: a frame shared by several sequences
        (neighbouring steps of an episode) goes through the patch embedding once. The patch
        embedding sees one frame at a time, so sharing it changes nothing downstream.
        """
        if attention not in ATTENTION_MODES:
            raise ValueError(f"attention must be one of {ATTENTION_MODES}, got {attention!r}")
        if frame_index is not None:
            if images.dim() != 4 or frame_index.dim() != 2:
                raise ValueError("with frame_index, expected images [U, 3, H, W] and frame_index [B, S]")
            b, s = frame_index.shape
            h, w = images.shape[-2:]
            patches = self.embed_frames(images)[frame_index.flatten().to(images.device)]
        elif images.dim() != 5:
            raise ValueError(f"expected images [B, S, 3, H, W], got {tuple(images.shape)}")
        else:
            b, s, _, h, w = images.shape
            patches = self.embed_frames(images.flatten(0, 1))
        wanted = self._wanted(layers)
        tokens = torch.cat([self._specials(b, s), patches], dim=1)
        rope = self._rope_tables(h, w, tokens)
        n, p, c = tokens.shape
        causal = attention == "causal"
        kept: dict[int, Tensor] = {}
        for i in range(max(wanted) + 1):
            tokens = self.frame_blocks[i](tokens.view(n, p, c), rope)
            frame_out = tokens
            tokens = self.global_blocks[i](tokens.view(b, s * p, c), rope, frames=s, causal=causal)
            if i in wanted:
                kept[i] = torch.cat([frame_out.view(b, s, p, c), tokens.view(b, s, p, c)], dim=-1)
        return [kept[i] for i in wanted]

    def new_stream(self, evict_start: int | None = None, evict_recent: int | None = None) -> StreamState:
        """An empty streaming state (no frames yet) for `stream_step`."""
        return StreamState(depth=self.depth, evict_start=evict_start, evict_recent=evict_recent)

    def stream_step(self, frames: Tensor, state: StreamState, layers: Sequence[int] = (-2,)) -> list[Tensor]:
        """Feed frame k of B sequences ([B, 3, H, W]); returns [B, 1, P, 2C] per requested layer.

        Global attention of this frame sees every frame still in `state`'s cache plus itself;
        the cache is extended and then evicted according to the state's window.
        """
        if frames.dim() != 4:
            raise ValueError(f"expected frames [B, 3, H, W], got {tuple(frames.shape)}")
        b, _, h, w = frames.shape
        wanted = self._wanted(layers)
        last = max(wanted)
        state.check_step(b, (h, w), last + 1)
        patches = self.embed_frames(frames)
        slot = state.slot
        specials = torch.cat([self.camera_token[:, slot], self.register_token[:, slot]], dim=1)
        tokens = torch.cat([specials.expand(b, -1, -1), patches], dim=1)
        rope = self._rope_tables(h, w, tokens)
        _, p, c = tokens.shape
        kept: dict[int, Tensor] = {}
        for i in range(last + 1):
            tokens = self.frame_blocks[i](tokens, rope)
            frame_out = tokens
            tokens, state.caches[i] = self.global_blocks[i].forward_cached(tokens, rope, state.caches[i])
            if i in wanted:
                kept[i] = torch.cat([frame_out, tokens], dim=-1).view(b, 1, p, 2 * c)
        state.advance()
        return [kept[i] for i in wanted]
