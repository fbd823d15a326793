"""Concurrent, memory-bounded sidecar writes.

One thread doing torch.save + rename manages ~40-110 files/s on local disks, below the GPU's
rate for 8.7 MB janusvln sidecars, so writes run on a thread pool (file I/O releases the GIL).
`submit` blocks once `max_pending_bytes` are queued, which bounds host memory and lets the
GPU loop feel back-pressure instead of growing an unbounded queue.
"""

from __future__ import annotations

import errno
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from vggtctl import sidecar

DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


class DiskFullSkipped(OSError):
    """A write not attempted because the disk filled up earlier in this run (not the item's fault)."""


# on_done(token, bytes_written or None, error or None)
DoneCallback = Callable[[Any, "int | None", "BaseException | None"], None]


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
        self.disk_full = threading.Event()
        self.disk_full_message = ""

    def submit(self, path: str, features: torch.Tensor, meta: dict[str, Any], token: Any) -> None:
        nbytes = features.numel() * features.element_size()
        with self._budget:
            while self._pending_bytes > 0 and self._pending_bytes + nbytes > self._max_pending:
                self._budget.wait()
            self._pending_bytes += nbytes
        future = self._pool.submit(self._write, path, features, meta, token, nbytes)
        self._futures.add(future)
        future.add_done_callback(self._futures.discard)

    def _write(
        self, path: str, features: torch.Tensor, meta: dict[str, Any], token: Any, nbytes: int
    ) -> None:
        written: int | None = None
        error: BaseException | None = None
        try:
            if self.disk_full.is_set():
                raise DiskFullSkipped(errno.ENOSPC, "not written: the disk filled up earlier in this run")
            written = sidecar.write(path, features, meta, fsync=self._fsync)
        except OSError as err:
            error = err
            if err.errno in DISK_FULL_ERRNOS and not self.disk_full.is_set():
                with self._budget:
                    if not self.disk_full.is_set():
                        self.disk_full_message = f"{path}: {err.strerror or err}"
                        self.disk_full.set()
        except Exception as err:  # one bad write fails that item, not the run
            error = err
        finally:
            with self._budget:
                self._pending_bytes -= nbytes
                self._budget.notify_all()
        self._on_done(token, written, error)

    @property
    def pending_bytes(self) -> int:
        return self._pending_bytes

    def close(self) -> None:
        """Finish every submitted write (also on Ctrl-C: in-flight writes complete)."""
        self._pool.shutdown(wait=True)
