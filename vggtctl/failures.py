"""Per-item failures of a run: `<root>/.vggtctl/failures.jsonl`, one JSON object per line.

A bad image fails that image, not the run; this file is where the user finds which and why.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO

from vggtctl.scan import PRIVATE_DIR

FAILURES_NAME = "failures.jsonl"


@dataclass(frozen=True)
class Failure:
    path: str
    stage: str  # "catalog" | "decode" | "encode" | "write"
    reason: str


def failures_path(root: str | os.PathLike[str]) -> Path:
    return Path(root) / PRIVATE_DIR / FAILURES_NAME


class FailureLog:
    """Appends failures as they happen (thread-safe), so a killed run still leaves its record."""

    def __init__(self, root: str | os.PathLike[str], run_id: str, rank: int = 0) -> None:
        self.path = failures_path(root)
        self.run_id = run_id
        self.rank = rank
        self.count = 0
        self._lock = threading.Lock()

    def add(self, failure: Failure) -> None:
        record = {**asdict(failure), "run": self.run_id, "rank": self.rank, "time": time.time()}
        line = json.dumps(record) + "\n"
        with self._lock:
            self.count += 1
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with open(self.path, "a", encoding="utf-8") as fh, _locked(fh):
                    fh.write(line)
            except OSError:
                pass  # the count still reaches the summary and the exit code


@contextlib.contextmanager
def _locked(fh: IO[str]) -> Iterator[None]:
    """Hold an exclusive POSIX lock on `fh` while writing, where the file system grants one.

    O_APPEND alone keeps a line whole between processes of one host, not between hosts on NFS:
    each client appends at the end it last saw. Under a lock the NFS client revalidates the
    size first and flushes on unlock, so ranks on several nodes cannot overwrite each other's
    lines. Where locks are unavailable (a `nolock` mount) the line is appended without one.
    """
    try:
        fcntl.lockf(fh, fcntl.LOCK_EX)
    except OSError:
        yield
        return
    try:
        yield
        fh.flush()
    finally:
        fcntl.lockf(fh, fcntl.LOCK_UN)


def read_failures(root: str | os.PathLike[str], run_id: str | None = None) -> list[dict]:
    path = failures_path(root)
    records = []
    try:
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if run_id is None or record.get("run") == run_id:
                    records.append(record)
    except FileNotFoundError:
        pass
    return records
