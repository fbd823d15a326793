"""2D rotary position embedding of the VGGT aggregator, with cached cos/sin tables.

Patch (row i, col j) sits at (y, x) = (i + 1, j + 1); the camera and register tokens sit at
(0, 0). The head dim is split in halves: the first half rotates by y, the second by x. Within
a half of size d, element t pairs with t + d/2 (rotate-half form) at angle pos * base^(-2t/d).
Positions are per frame only, so one [P, head_dim] table serves every frame of a sequence.
"""

from __future__ import annotations

import threading

import torch
from torch import Tensor


class Rope2D:
    """Builds and caches per-token cos/sin tables keyed by (grid, special tokens, device, dtype)."""

    def __init__(self, head_dim: int, base: float = 100.0) -> None:
        if head_dim % 4:
            raise ValueError(f"2D RoPE needs a head dim divisible by 4, got {head_dim}")
        self.head_dim = head_dim
        self.base = base
        self._cache: dict[tuple, tuple[Tensor, Tensor]] = {}
        self._lock = threading.Lock()

    def tables(
        self, grid_h: int, grid_w: int, num_special: int, device: torch.device, dtype: torch.dtype
    ) -> tuple[Tensor, Tensor]:
        """cos and sin, each [num_special + grid_h * grid_w, head_dim], computed once."""
        key = (grid_h, grid_w, num_special, torch.device(device), dtype)
        found = self._cache.get(key)
        if found is None:
            # Normal (non-inference) tensors, so a table built under inference_mode stays usable
            # outside it.
            with torch.inference_mode(False), torch.no_grad():
                found = self._build(grid_h, grid_w, num_special, torch.device(device), dtype)
            with self._lock:
                self._cache[key] = found
        return found

    def _build(
        self, grid_h: int, grid_w: int, num_special: int, device: torch.device, dtype: torch.dtype
    ) -> tuple[Tensor, Tensor]:
        half = self.head_dim // 2
        # Same float32 arithmetic as the reference: inv_freq = 1 / base^(2t/half).
        inv_freq = 1.0 / (self.base ** (torch.arange(0, half, 2, dtype=torch.float32) / half))
        ys = torch.arange(grid_h, dtype=torch.float32).repeat_interleave(grid_w) + 1
        xs = torch.arange(grid_w, dtype=torch.float32).repeat(grid_h) + 1
        zeros = torch.zeros(num_special, dtype=torch.float32)
        ys, xs = torch.cat([zeros, ys]), torch.cat([zeros, xs])
        ang_y = torch.outer(ys, inv_freq)
        ang_x = torch.outer(xs, inv_freq)
        angles = torch.cat([ang_y, ang_y, ang_x, ang_x], dim=-1)  # [P, head_dim]
        return angles.cos().to(device, dtype), angles.sin().to(device, dtype)


def rotate_halves(x: Tensor) -> Tensor:
    """Rotate-half applied to each half of the last dim separately: (a, b | c, d) -> (-b, a | -d, c)."""
    q = x.unflatten(-1, (2, 2, -1))
    return torch.stack((-q[..., 1, :], q[..., 0, :]), dim=-2).flatten(-3)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor, frames: int = 1) -> Tensor:
    """RoPE on x [..., frames * P, D] with per-frame tables cos/sin [P, D] (broadcast over frames)."""
    if frames > 1:
        shape = x.shape
        x = x.unflatten(-2, (frames, -1))
        return (x * cos.to(x.dtype) + rotate_halves(x) * sin.to(x.dtype)).reshape(shape)
    return x * cos.to(x.dtype) + rotate_halves(x) * sin.to(x.dtype)
