"""Which fused kernel `scaled_dot_product_attention` tries first: a speed knob, never a numerics one.

torch tries flash, then memory-efficient, then math, then cuDNN. Measured alone on an H200
(torch 2.11, cuDNN 9.19), cuDNN's fused attention runs VGGT's attention shapes (64-wide heads,
2,121 tokens per frame at 644x644) at 1.37-1.39x the FLOP rate of flash attention; "cudnn"
puts it first, and torch still falls back down the list where a kernel does not take the
inputs (on the CPU every choice ends in the same CPU kernels). Every kernel computes the same
softmax attention and they differ only in rounding, so the choice is not part of the feature key.

Inside the model the preference has not yet paid off: with "cudnn" the forward gave the same
output bits and speed as "auto", eager and compiled, so torch kept choosing flash there
(docs/performance.md). That is why no command exposes it; the encoder and the benchmarks do.

The preference is applied around each attention call inside the model (`attend`), not around
the whole forward: torch.compile then traces it into the graph (a preference set outside a
compiled region is not seen by graphs that were already traced or cached).
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

SDPA_CHOICES = ("auto", "flash", "cudnn", "efficient", "math")


def _has_priorities() -> bool:
    from torch.nn.attention import sdpa_kernel

    return "set_priority" in inspect.signature(sdpa_kernel).parameters


def check_sdpa(name: str) -> str:
    """`name` when it is a known choice this torch can apply, else ValueError saying why."""
    if name not in SDPA_CHOICES:
        raise ValueError(f"attention kernel {name!r}: use one of {', '.join(SDPA_CHOICES)}")
    if name != "auto" and not _has_priorities():
        raise ValueError(f"attention kernel {name!r} needs torch >= 2.6 (kernel priorities)")
    return name


def kernel_order(name: str) -> list[Any] | None:
    """torch's kernel list with `name` first; None for "auto" (leave torch's order alone)."""
    if check_sdpa(name) == "auto":
        return None
    from torch.nn.attention import SDPBackend

    kernels = {
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "math": SDPBackend.MATH,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
    }
    first = kernels[name]
    return [first, *(k for k in kernels.values() if k != first)]


def sdpa_preference(name: str) -> contextlib.AbstractContextManager[Any]:
    """A context in which `name`'s kernel is tried first ("auto": torch's own order)."""
    order = kernel_order(name)
    if order is None:
        return contextlib.nullcontext()
    from torch.nn.attention import sdpa_kernel

    return sdpa_kernel(order, set_priority=True)


def attend(q: Tensor, k: Tensor, v: Tensor, order: list[Any] | None = None) -> Tensor:
    """scaled_dot_product_attention, with the kernels tried in `order` (see `kernel_order`)."""
    if order is None:
        return F.scaled_dot_product_attention(q, k, v)
    with torch.nn.attention.sdpa_kernel(order, set_priority=True):
        return F.scaled_dot_product_attention(q, k, v)
