"""The GPU stage: launch batch k, then hand batch k-1 (already copied to host) to the writers."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from vggtctl import sidecar
from vggtctl.catalog import Item
from vggtctl.failures import Failure
from vggtctl.precompute.loading import (
    Prepared,
)

if TYPE_CHECKING:
    from vggtctl.precompute.pipeline import RunCounters


class GpuPipeline:
    """Launch batch k, then hand batch k-1's features (already copied to host) to the writers."""

    def __init__(
        self,
        encoder: Any,
        sequence: bool,
        device: torch.device,
        writer: Any,
        items: list[Item],
        progress: RunCounters,
        item_done: Callable[[int], None],
    ) -> None:
        self.encoder = encoder
        self.sequence = sequence
        self.device = device
        self.writer = writer
        self.items = items
        self.progress = progress
        self.item_done = item_done
        self.pending: tuple[Any, torch.Tensor, list[Prepared]] | None = None
        self.halved = 0  # batches split after running out of memory
        self.pad_to: int | None = None

    def submit(self, batch: list[Prepared]) -> None:
        try:
            launched = self._launch(batch)
        except Exception as err:
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            if _out_of_memory(err) and len(batch) > 1:
                # a batch of long sequences may not fit where shorter ones did: halve and retry
                self.halved += 1
                half = len(batch) // 2
                self.submit(batch[:half])
                self.submit(batch[half:])
                return
            for sample in batch:  # one bad batch fails its items, not the run
                self.progress.fail(
                    Failure(self.items[sample.index].image, "encode", f"{type(err).__name__}: {err}")
                )
                self.item_done(sample.index)
            return
        self._drain()
        self.pending = launched

    def flush(self) -> None:
        self._drain()

    def _launch(self, batch: list[Prepared]) -> tuple[Any, torch.Tensor, list[Prepared]]:
        cuda = self.device.type == "cuda"
        rows = max(len(batch), self.pad_to or 0)
        if self.sequence:
            staging, frame_index = _distinct_frames(batch, rows, pin=cuda, multiple=8 if self.pad_to else 1)
            pixels = staging.to(self.device, non_blocking=True)
            feats = self.encoder.encode_sequences(pixels, frame_index=frame_index)
        else:
            first = batch[0].pixels
            staging = torch.empty((rows, *first.shape), dtype=first.dtype, pin_memory=cuda)
            staging[len(batch) :].zero_()
            torch.stack([s.pixels for s in batch], out=staging[: len(batch)])
            pixels = staging.to(self.device, non_blocking=True)
            feats = self.encoder.encode_frames(pixels)
        feats = feats[: len(batch)]
        if not cuda:
            return None, feats, batch
        host = torch.empty(feats.shape, dtype=feats.dtype, pin_memory=True)
        host.copy_(feats, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return event, host, batch

    def _drain(self) -> None:
        if self.pending is None:
            return
        event, host, batch = self.pending
        self.pending = None
        if event is not None:
            event.synchronize()
        for row, sample in enumerate(batch):
            image = self.items[sample.index].image
            path = sidecar.sidecar_path(image)
            # clone: each sidecar owns exactly its rows; the batch buffer is reused by torch.
            self.writer.submit(path, host[row].clone(), sample.meta, (sample.index, path))


def _out_of_memory(err: BaseException) -> bool:
    oom = getattr(torch, "OutOfMemoryError", None)
    return (oom is not None and isinstance(err, oom)) or "out of memory" in str(err).lower()


def _distinct_frames(
    batch: list[Prepared], rows: int, *, pin: bool, multiple: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch's distinct frames [U, 3, H, W] and each item's frame index [rows, S].

    Neighbouring steps of an episode share most of their history: 16 items of 9 frames hold
    ~24 distinct frames, not 144, so the patch embedding (a third of a frame's FLOPs) and the
    host-to-device copy shrink accordingly. Padding rows (compiled batches) reuse frame 0;
    `multiple` rounds U up to limit the shapes a compiled model sees.
    """
    slots: dict[tuple[str, int, int], int] = {}
    sources: list[torch.Tensor] = []
    steps = batch[0].pixels.shape[0]
    index = torch.zeros((rows, steps), dtype=torch.long)
    for row, sample in enumerate(batch):
        for step, frame_id in enumerate(sample.frame_ids):
            slot = slots.get(frame_id)
            if slot is None:
                slot = slots[frame_id] = len(sources)
                sources.append(sample.pixels[step])
            index[row, step] = slot
    distinct = -(-len(sources) // multiple) * multiple
    staging = torch.empty((distinct, *sources[0].shape), dtype=sources[0].dtype, pin_memory=pin)
    staging[len(sources) :].zero_()
    torch.stack(sources, out=staging[: len(sources)])
    return staging, index
