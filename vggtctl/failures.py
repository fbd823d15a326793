"""Per-item failures of a run: `<root>/.vggtctl/failures.jsonl`, one JSON object per line.

A bad image fails that image, not the run; this file is where the user finds which and why.
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

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
                # O_APPEND writes of one short line are atomic enough for several ranks.
                with open(self.path, "a", encoding="utf-8") as fh:
                    fh.write(line)
            except OSError:
                pass  # the count still reaches the summary and the exit code


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
