"""Transformer pieces shared by the patch-embed ViT and the aggregator.

Pre-norm block: x += ls1 * Attn(LN1(x)); x += ls2 * MLP(LN2(x)). Attention uses one fused qkv
Linear (rows ordered q|k|v x heads x head_dim), optional LayerNorm on q and k per head, 2D RoPE
and `scaled_dot_product_attention`. Parameter names follow the reference state dict.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from vggtctl.model.rope import apply_rope
from vggtctl.model.sdpa import attend, kernel_order

RopeTables = tuple[Tensor, Tensor]
KVPair = tuple[Tensor, Tensor]


class Mlp(nn.Module):
    """Linear - GELU (exact) - Linear."""

    def __init__(self, dim: int, hidden: int, bias: bool = True) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=bias)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class LayerScale(nn.Module):
    """Per-channel residual scale (`gamma`)."""

    def __init__(self, dim: int, init_value: float = 1.0) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), init_value))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


def frame_causal_attention(q: Tensor, k: Tensor, v: Tensor, frames: int, order: list | None = None) -> Tensor:
    """Attention where the queries of frame i see the keys of frames 0..i only.

    q, k, v: [B, heads, frames * P, D]. Equivalent to a block-causal mask, but each frame is an
    unmasked SDPA call on a key prefix: no mask tensor, flash-eligible, half the work.
    """
    per_frame = q.shape[-2] // frames
    outs = []
    for i in range(frames):
        rows = slice(i * per_frame, (i + 1) * per_frame)
        keys = slice(0, (i + 1) * per_frame)
        outs.append(attend(q[:, :, rows], k[:, :, keys], v[:, :, keys], order))
    return torch.cat(outs, dim=2)


class Attention(nn.Module):
    """Multi-head self-attention with optional QK-LayerNorm and 2D RoPE."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        qk_norm: bool = False,
        norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.q_norm = nn.LayerNorm(self.head_dim, eps=norm_eps) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim, eps=norm_eps) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        self.kernel_order: list | None = None  # SDPA kernels to try first; None: torch's order

    def set_kernel(self, name: str) -> None:
        """Prefer `name`'s attention kernel (vggtctl.model.sdpa); "auto" restores torch's order."""
        self.kernel_order = kernel_order(name)

    def _split(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """[B, N, C] -> q, k, v each [B, heads, N, head_dim] (raw: before norm and RoPE)."""
        b, n, _ = x.shape
        qkv = self.qkv(x).view(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return qkv[0], qkv[1], qkv[2]

    def _merge(self, out: Tensor) -> Tensor:
        b, _, n, _ = out.shape
        return self.proj(out.transpose(1, 2).reshape(b, n, self.num_heads * self.head_dim))

    def forward(
        self, x: Tensor, rope: RopeTables | None = None, frames: int = 1, causal: bool = False
    ) -> Tensor:
        """x [B, frames * P, C]; `rope` holds per-frame tables [P, head_dim]."""
        q, k, v = self._split(x)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q = apply_rope(q, *rope, frames=frames)
            k = apply_rope(k, *rope, frames=frames)
        if causal and frames > 1:
            out = frame_causal_attention(q, k, v, frames, self.kernel_order)
        else:
            out = attend(q, k, v, self.kernel_order)
        return self._merge(out)

    def forward_cached(
        self, x: Tensor, rope: RopeTables | None, past: KVPair | None
    ) -> tuple[Tensor, KVPair]:
        """One new frame x [B, P, C] attending to the cached frames plus itself.

        The cache holds keys [B, heads, frames, P, head_dim] after k-norm and RoPE, and values.
        The reference caches raw keys and re-applies k-norm and RoPE to the whole concatenation
        every step; both act per token with per-frame positions, so applying them once per frame
        gives the same keys bit for bit and saves O(frames) work per step. Keys are stored in
        the values' dtype, the precision attention reads them in (autocast included).
        """
        q, k, v = self._split(x)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        k, v = k.to(v.dtype).unsqueeze(2), v.unsqueeze(2)
        if past is not None:
            k = torch.cat([past[0], k], dim=2)
            v = torch.cat([past[1], v], dim=2)
        out = attend(q, k.flatten(2, 3), v.flatten(2, 3), self.kernel_order)
        return self._merge(out), (k, v)


class Block(nn.Module):
    """Pre-norm transformer block with LayerScale."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        ffn_bias: bool = True,
        qk_norm: bool = False,
        norm_eps: float = 1e-5,
        init_values: float = 1.0,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias, proj_bias, qk_norm, norm_eps)
        self.ls1 = LayerScale(dim, init_values)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), bias=ffn_bias)
        self.ls2 = LayerScale(dim, init_values)

    def forward(
        self, x: Tensor, rope: RopeTables | None = None, frames: int = 1, causal: bool = False
    ) -> Tensor:
        x = x + self.ls1(self.attn(self.norm1(x), rope, frames, causal))
        return x + self.ls2(self.mlp(self.norm2(x)))

    def forward_cached(
        self, x: Tensor, rope: RopeTables | None, past: KVPair | None
    ) -> tuple[Tensor, KVPair]:
        attn_out, cache = self.attn.forward_cached(self.norm1(x), rope, past)
        x = x + self.ls1(attn_out)
        return x + self.ls2(self.mlp(self.norm2(x))), cache
