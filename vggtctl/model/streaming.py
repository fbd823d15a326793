"""Streaming state for causal VGGT: one frame per step, a K/V cache per global block.

B independent sequences advance in lockstep (frame k of every sequence in step k). Each global
block keeps the keys (after k-norm and RoPE) and values of all past frames as
[B, heads, frames, P, head_dim]. After a
step the cache may be evicted to the first `start` and the last `recent` frames (the
JanusVLN-style window). The camera/register slot is 0 for the first frame, 1 afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

KVPair = tuple[Tensor, Tensor]


def check_eviction(start: int | None, recent: int | None) -> tuple[int, int] | None:
    """Normalize eviction settings: None when off, else (start, recent) with a missing side as 0."""
    if start is None and recent is None:
        return None
    start, recent = start or 0, recent or 0
    if start < 0 or recent < 0:
        raise ValueError(f"eviction sizes must be >= 0, got start={start}, recent={recent}")
    if start + recent < 1:
        raise ValueError("eviction must keep at least one frame (start + recent >= 1)")
    return start, recent


def evict_frames(kv: KVPair, start: int, recent: int) -> KVPair:
    """Keep the first `start` and last `recent` frames (dim 2) when there are more than both."""
    k, v = kv
    frames = k.shape[2]
    if frames <= start + recent:
        return kv
    first, last = slice(0, start), slice(frames - recent, frames)
    return (
        torch.cat([k[:, :, first], k[:, :, last]], dim=2),
        torch.cat([v[:, :, first], v[:, :, last]], dim=2),
    )


@dataclass
class StreamState:
    """Everything a streaming pass carries between steps; create it with `Aggregator.new_stream`."""

    depth: int
    evict_start: int | None = None
    evict_recent: int | None = None
    frames_seen: int = 0
    batch_size: int | None = None
    image_hw: tuple[int, int] | None = None
    caches: list[KVPair | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._window = check_eviction(self.evict_start, self.evict_recent)
        if not self.caches:
            self.caches = [None] * self.depth

    @property
    def slot(self) -> int:
        """Camera/register slot for the next frame: 0 for a sequence's first frame, else 1."""
        return 0 if self.frames_seen == 0 else 1

    @property
    def cached_frames(self) -> int:
        """Frames held by the first global block's cache (all filled blocks hold the same)."""
        first = self.caches[0]
        return 0 if first is None else first[0].shape[2]

    def check_step(self, batch_size: int, image_hw: tuple[int, int], needed_depth: int) -> None:
        """Refuse a step that does not continue this stream (other batch, size or deeper layer)."""
        if self.frames_seen == 0:
            self.batch_size, self.image_hw = batch_size, image_hw
            return
        if batch_size != self.batch_size or image_hw != self.image_hw:
            raise ValueError(
                f"stream step got batch {batch_size} at {image_hw}, "
                f"the stream holds batch {self.batch_size} at {self.image_hw}"
            )
        if any(self.caches[i] is None for i in range(needed_depth)):
            raise ValueError("stream step needs a deeper layer than earlier steps cached")

    def advance(self) -> None:
        """Count the step and apply the eviction window to every cache."""
        self.frames_seen += 1
        if self._window is not None:
            start, recent = self._window
            self.caches = [None if kv is None else evict_frames(kv, start, recent) for kv in self.caches]

    def reset(self) -> None:
        self.frames_seen = 0
        self.batch_size = self.image_hw = None
        self.caches = [None] * self.depth
