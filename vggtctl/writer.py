"""Concurrent, memory-bounded sidecar writes.

One thread doing torch.save + rename manages ~40-110 files/s on local disks, below the GPU's
rate for 8.7 MB janusvln sidecars, so writes run on a thread pool (file I/O releases the GIL).
`submit` blocks once `max_pending_bytes` are queued, which bounds host memory and lets the
GPU loop feel back-pressure instead of growing an unbounded queue.

`submit_copy` takes a row of a batch buffer the caller will reuse and copies it into a pooled
host buffer that goes back to the pool after its write. A fresh 8.7 MB tensor per sidecar costs
page faults, not just a copy: 32 janusvln rows took 400-500 ms as fresh clones against 17-30 ms
into reused memory on a 2-vCPU VM, and on the GPU loop's thread that is time the GPU idles.
"""

from __future__ import annotations

import errno
import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_for
from typing import Any

import torch

from vggtctl import sidecar

DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


_log = logging.getLogger("vggtctl")


class DiskFullSkipped(OSError):
    """A write not attempted because the disk filled up earlier in this run (not the item's fault)."""


# on_done(token, bytes_written or None, error or None)
DoneCallback = Callable[[Any, "int | None", "BaseException | None"], None]


class RowPool:
    """Host buffers for feature rows, reused across writes (see the module docstring)."""

    def __init__(self) -> None:
        self._free: dict[tuple[tuple[int, ...], torch.dtype], list[torch.Tensor]] = defaultdict(list)
        self._lock = threading.Lock()
        self.allocated = 0

    def copy_of(self, row: torch.Tensor) -> torch.Tensor:
        key = (tuple(row.shape), row.dtype)
        with self._lock:
            free = self._free[key]
            buffer = free.pop() if free else None
        if buffer is None:
            buffer = torch.empty(key[0], dtype=key[1])
            self.allocated += 1
        return buffer.copy_(row)

    def give_back(self, buffer: torch.Tensor) -> None:
        with self._lock:
            self._free[(tuple(buffer.shape), buffer.dtype)].append(buffer)


class SidecarWriter:
    def __init__(
        self,
        on_done: DoneCallback,
        *,
        threads: int = 8,
        max_pending_bytes: int = 2 << 30,
        fsync: bool = False,
    ) -> None:
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="sidecar-writer")
        self._on_done = on_done
        self._fsync = fsync
        self._budget = threading.Condition()
        self._pending_bytes = 0
        self._max_pending = max_pending_bytes
        self._futures: set[Future[None]] = set()
        self.blocked_seconds = 0.0  # time `submit` waited for the pool to catch up
        self._rows = RowPool()
        self.disk_full = threading.Event()
        self.disk_full_message = ""
        self._callback_error: BaseException | None = None

    def submit(self, path: str, features: torch.Tensor, meta: dict[str, Any], token: Any) -> None:
        """Queue `features` (owned by the writer from now on) for `path`."""
        nbytes = self._reserve(features)
        self._enqueue(path, features, meta, token, nbytes, recycle=False)

    def submit_copy(self, path: str, row: torch.Tensor, meta: dict[str, Any], token: Any) -> None:
        """Queue a copy of `row`; the caller may overwrite `row` as soon as this returns."""
        nbytes = self._reserve(row)  # wait for the budget first: the pool never outgrows it
        self._enqueue(path, self._rows.copy_of(row), meta, token, nbytes, recycle=True)

    def _reserve(self, features: torch.Tensor) -> int:
        nbytes = features.numel() * features.element_size()
        with self._budget:
            if self._pending_bytes > 0 and self._pending_bytes + nbytes > self._max_pending:
                started = time.perf_counter()
                while self._pending_bytes > 0 and self._pending_bytes + nbytes > self._max_pending:
                    self._budget.wait()
                self.blocked_seconds += time.perf_counter() - started
            self._pending_bytes += nbytes
        return nbytes

    def _enqueue(
        self, path: str, features: torch.Tensor, meta: dict[str, Any], token: Any, nbytes: int, recycle: bool
    ) -> None:
        future = self._pool.submit(self._write, path, features, meta, token, nbytes, recycle)
        self._futures.add(future)
        future.add_done_callback(self._futures.discard)

    def _write(
        self,
        path: str,
        features: torch.Tensor,
        meta: dict[str, Any],
        token: Any,
        nbytes: int,
        recycle: bool = False,
    ) -> None:
        written: int | None = None
        error: BaseException | None = None
        try:
            if self.disk_full.is_set():
                raise DiskFullSkipped(errno.ENOSPC, "not written: the disk filled up earlier in this run")
            written = sidecar.write(path, features, meta, fsync=self._fsync)
        except OSError as err:
            error = err
            if err.errno in DISK_FULL_ERRNOS:
                self.mark_disk_full(f"{path}: {err.strerror or err}")
        except Exception as err:  # one bad write fails that item, not the run
            error = err
        finally:
            if recycle and error is None:
                self._rows.give_back(features)  # sidecar.write holds no reference after it returns
            with self._budget:
                self._pending_bytes -= nbytes
                self._budget.notify_all()
        try:
            self._on_done(token, written, error)
        except BaseException as err:  # a future would swallow it: close() raises it instead
            self._callback_error = self._callback_error or err

    def mark_disk_full(self, message: str) -> None:
        """Stop writing: later writes fail fast as `DiskFullSkipped`; the first message is kept."""
        with self._budget:
            if not self.disk_full.is_set():
                self.disk_full_message = message
                self.disk_full.set()

    @property
    def pending_bytes(self) -> int:
        return self._pending_bytes

    def close(self) -> None:
        """Finish every submitted write; then raise what an `on_done` callback raised, if one did
        (its item's bookkeeping is incomplete).

        A Ctrl-C while waiting here does not cut the wait short: the caller reads the run's
        counts and releases its claims right after, so a write still running would be left out
        of both. The first Ctrl-C lets the queued writes finish too (rows already computed), a
        second one drops those not started (a rerun encodes them); the interrupt is raised once
        every started write has ended.
        """
        interrupt: KeyboardInterrupt | None = None
        interrupts = 0
        while True:
            # the futures, not the threads, are waited on: an interrupted Thread.join can leave
            # the thread marked as ended (CPython), and a second join would return at once
            try:
                if interrupts >= 2:  # writes not started are dropped
                    for future in list(self._futures):
                        future.cancel()
                wait_for(list(self._futures))
                break
            except KeyboardInterrupt as err:
                interrupts += 1
                interrupt = interrupt or err
                left = sum(1 for future in list(self._futures) if not future.done())
                more = "; Ctrl-C again drops those not started" if interrupts == 1 else ""
                _log.warning("finishing %d sidecar writes before stopping%s", left, more)
        self._pool.shutdown(wait=True)  # every write has ended: the threads only exit
        if self._callback_error is None and interrupt is not None:
            raise interrupt
        if self._callback_error is not None:
            error, self._callback_error = self._callback_error, None
            raise error
