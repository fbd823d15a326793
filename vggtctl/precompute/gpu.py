"""The GPU stage: stage and launch each batch; hand finished batches' rows to the writers.

On CUDA the copies run on their own streams: batch k+1's pixels go up while batch k computes,
and batch k's features come down while batch k+1 computes. On the compute stream the copies
would cost the GPU ~4 % of a janusvln batch (160 MB up, 280 MB down per 32 images).

Also on CUDA, a handoff thread waits for each batch's features and copies its rows to the
writers, so the launching thread only decodes-waits, stages and launches. On an H200 the loop
was host-bound with the handoff inline: per 32-image batch about 127 ms staging, 120 ms
launching and 122 ms handing off against 376 ms of GPU time. The handoff queue holds two
batches: when the GPU (or the writers behind the handoff) fall behind, launching waits there.
On the CPU the forward runs inside the launch and the handoff stays inline.
"""

from __future__ import annotations

import contextlib
import gc
import queue
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from vggtctl import sidecar
from vggtctl.catalog import Item
from vggtctl.failures import Failure
from vggtctl.precompute.loading import Prepared
from vggtctl.precompute.stages import StageClock
from vggtctl.preprocess import unit_pixels

if TYPE_CHECKING:
    from vggtctl.precompute.pipeline import RunCounters


class GpuPipeline:
    """Stage and launch each batch; hand its features, once on the host, to the writers.

    `handoff_thread` (default: on CUDA only) moves the handoff to its own thread; without it
    the handoff of batch k-1 runs inline after batch k is launched.
    """

    def __init__(
        self,
        encoder: Any,
        sequence: bool,
        device: torch.device,
        writer: Any,
        items: list[Item],
        progress: RunCounters,
        item_done: Callable[[int], None],
        clock: StageClock | None = None,
        handoff_thread: bool | None = None,
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
        # rows a batch of this shape may have, learnt from an out-of-memory error: later batches
        # of that shape are split before they are launched, not after failing once each
        self.max_rows: dict[Any, int] = {}
        self.pad_to: int | None = None
        self.launches = 0
        self.copy_streams = _CopyStreams(device) if device.type == "cuda" else None
        self.clock = clock or StageClock()
        threaded = self.copy_streams is not None if handoff_thread is None else handoff_thread
        self._handoff = _HandoffThread(self._hand_off, device) if threaded else None

    def submit(self, batch: list[Prepared]) -> None:
        limit = self.max_rows.get(_shape_of(batch))
        if limit is not None and len(batch) > limit:
            for start in range(0, len(batch), limit):
                self.submit(batch[start : start + limit])
            return
        if self._handoff is not None:
            # a failed handoff (a CUDA fault) stops the run here, before more work is launched
            # whose rows nobody would hand off
            self._handoff.raise_error()
        first = self.launches == 0
        self.launches += 1
        try:
            launched = self._launch(batch)
        except Exception as err:
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            if _out_of_memory(err) and len(batch) > 1:
                # a batch of long sequences may not fit where shorter ones did: halve and retry
                self.halved += 1
                half = len(batch) // 2
                self.max_rows[_shape_of(batch)] = half
                if self.pad_to:  # padded back to full size, the halves would not fit either
                    self.pad_to = half  # the compiled shape for the rest of the run
                self.submit(batch[:half])
                self.submit(batch[half:])
                return
            for sample in batch:  # one bad batch fails its items, not the run
                self.progress.fail(
                    Failure(self.items[sample.index].image, "encode", f"{type(err).__name__}: {err}")
                )
                self.item_done(sample.index)
            return
        if self._handoff is not None:
            with self.clock("wait_handoff"):
                self._handoff.put(launched)
        else:
            # pending first: interrupted while handing off the previous batch, this one is
            # still written by flush()
            previous, self.pending = self.pending, launched
            if previous is not None:
                self._hand_off(previous)
        if first:
            # Whatever the first batch left alive (compiled graphs and guards with --compile:
            # hundreds of thousands of objects) lives for the run: stop the cycle collector from
            # walking it in every full collection (0.23 s each after compiling one small block,
            # measured on a 2-vCPU VM), pauses in which the launching thread feeds no GPU work.
            gc.freeze()

    def warm_host_pool(self, staging_bytes: int, features_bytes: int) -> None:
        """Have torch's pinned-memory pool hold the blocks the first batches will ask for.

        A new pinned block is a cudaHostAlloc, hundreds of milliseconds for the 256-512 MB
        blocks of a janusvln batch, and it holds a driver lock other CUDA calls wait on. Without
        this, the first batches pay for it on the launching thread while the GPU idles; called
        while the decode workers start, it costs nothing. Two staging blocks (one may still be
        uploading) and four feature blocks (one computing, two queued for the handoff thread,
        one being handed off): what the loop holds at most. Freed blocks stay in torch's pool.
        """
        if self.copy_streams is None or staging_bytes <= 0 or features_bytes <= 0:
            return
        with self.clock("stage"), contextlib.suppress(RuntimeError):  # only a head start
            sizes = [staging_bytes] * 2 + [features_bytes] * 4
            held = [torch.empty(n, dtype=torch.uint8, pin_memory=True) for n in sizes]
            del held

    def flush(self) -> None:
        """Hand every launched batch to the writers (waits for the GPU)."""
        if self._handoff is not None:
            self._handoff.join()
        self._drain()

    def stop(self) -> None:
        """Hand off what is queued or pending, then end the handoff thread (never raises: for
        `finally`). After a full disk the writers count those rows as not written."""
        if self._handoff is not None:
            self._handoff.stop()
        with contextlib.suppress(Exception):
            self._drain()

    def _launch(self, batch: list[Prepared]) -> tuple[Any, torch.Tensor, list[Prepared]]:
        cuda = self.copy_streams is not None
        rows = max(len(batch), self.pad_to or 0)
        frame_index = None
        with self.clock("stage"):
            if self.sequence:
                staging, frame_index = _distinct_frames(
                    batch, rows, pin=cuda, multiple=8 if self.pad_to else 1
                )
            else:
                first = batch[0].pixels
                staging = torch.empty((rows, *first.shape), dtype=first.dtype, pin_memory=cuda)
                staging[len(batch) :].zero_()
                torch.stack([s.pixels for s in batch], out=staging[: len(batch)])
        if self.copy_streams is None:  # CPU: the forward runs inside the call
            with self.clock("wait_model"):
                return None, self._encode(staging, frame_index)[: len(batch)], batch
        with self.clock("launch"):
            pixels = self.copy_streams.upload(staging, self.device)
            if frame_index is not None:
                # pinned, on the copy stream: the model's own .to(device) of a pageable index
                # would wait for the whole compute stream, one batch ahead at most
                frame_index = self.copy_streams.upload(frame_index, self.device)
            feats = self._encode(pixels, frame_index)[: len(batch)]
            event, host = self.copy_streams.download(feats)
        return event, host, batch

    def _encode(self, pixels: torch.Tensor, frame_index: torch.Tensor | None) -> torch.Tensor:
        pixels = unit_pixels(pixels)  # bytes travel; k/255 is made where the model runs
        if self.sequence:
            return self.encoder.encode_sequences(pixels, frame_index=frame_index)
        return self.encoder.encode_frames(pixels)

    def _drain(self) -> None:
        if self.pending is None:
            return
        launched, self.pending = self.pending, None
        self._hand_off(launched)

    def _hand_off(self, launched: tuple[Any, torch.Tensor, list[Prepared]]) -> None:
        event, host, batch = launched
        handed = 0
        try:
            if event is not None:
                with self.clock("wait_model"):
                    event.synchronize()
            with self.clock("handoff"):
                for row, sample in enumerate(batch):
                    image = self.items[sample.index].image
                    path = sidecar.sidecar_path(image)
                    # a copy into the writer's pooled buffers: the pinned batch buffer goes back
                    # to torch's pool now, not when the writers reach its last row
                    self.writer.submit_copy(path, host[row], sample.meta, (sample.index, path))
                    handed += 1
        except Exception as err:
            for sample in batch[handed:]:  # their claims must not wait for writes that never come
                self.progress.fail(
                    Failure(self.items[sample.index].image, "encode", f"{type(err).__name__}: {err}")
                )
                self.item_done(sample.index)
            raise
        # a KeyboardInterrupt (the inline handoff waiting for the writers) is no failure: the
        # rows not handed off are not written, their claims go with the run's, a rerun does them


class _HandoffThread:
    """Runs `hand_off` on each launched batch, in order, on one background thread.

    An error fails that batch's items (the callback's job) and is kept for `join` to raise, so
    a CUDA fault is never swallowed; the thread goes on with the next batch.
    """

    def __init__(self, hand_off: Callable[[Any], None], device: torch.device) -> None:
        self._hand_off = hand_off
        self._device = device
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=2)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="vggtctl-handoff", daemon=True)
        self._thread.start()

    def put(self, launched: Any) -> None:
        self._queue.put(launched)

    def join(self) -> None:
        self._queue.join()
        self.raise_error()

    def raise_error(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def stop(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()

    def _run(self) -> None:
        try:
            if self._device.type == "cuda" and self._device.index is not None:
                # a new thread starts on device 0: without this, the CUDA calls it makes (event
                # waits, freeing pinned buffers) would open a context on GPU 0 for every rank
                torch.cuda.set_device(self._device)
        except BaseException as err:  # kept for the next submit; the thread must stay to drain
            self._error = err
        while True:
            launched = self._queue.get()
            try:
                if launched is None:
                    return
                self._hand_off(launched)
            except BaseException as err:  # kept for join(); the loop must keep draining
                if self._error is None:
                    self._error = err
            finally:
                # drop the batch's pinned buffer now, not when the next batch arrives
                launched = None
                self._queue.task_done()


class _CopyStreams:
    """Host-to-device and device-to-host copies on two side streams, ordered by events."""

    def __init__(self, device: torch.device) -> None:
        self.up = torch.cuda.Stream(device)
        self.down = torch.cuda.Stream(device)

    def upload(self, staging: torch.Tensor, device: torch.device) -> torch.Tensor:
        """Copy pinned `staging` to the device; the compute stream waits for it, not the host."""
        compute = torch.cuda.current_stream(device)
        with torch.cuda.stream(self.up):
            pixels = staging.to(device, non_blocking=True)
        compute.wait_stream(self.up)
        pixels.record_stream(compute)  # allocated on `up`, used on the compute stream
        return pixels

    def download(self, feats: torch.Tensor) -> tuple[torch.cuda.Event, torch.Tensor]:
        """Queue the copy of `feats` into pinned host memory after the compute that makes them."""
        computed = torch.cuda.Event()
        computed.record(torch.cuda.current_stream(feats.device))
        host = torch.empty(feats.shape, dtype=feats.dtype, pin_memory=True)
        self.down.wait_event(computed)
        with torch.cuda.stream(self.down):
            host.copy_(feats, non_blocking=True)
        feats.record_stream(self.down)  # not reused by the compute stream before it is copied
        copied = torch.cuda.Event(blocking=True)  # the handoff thread sleeps on it, no spinning
        copied.record(self.down)
        return copied, host


def _shape_of(batch: list[Any]) -> Any:
    """The batch's input shape (what decides its memory), None where samples do not say."""
    return getattr(batch[0], "batch_key", None) if batch else None


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
    steps = len(batch[0].pixels)
    index = torch.zeros((rows, steps), dtype=torch.long, pin_memory=pin)
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
