"""Progress aggregated over ranks without collectives: every rank rewrites a small JSON file
under `<root>/.vggtctl/runs/<run>/`, and rank 0 shows the sum. Ranks run at different speeds,
so a periodic all-reduce would make fast ranks wait for slow ones."""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path
from typing import Any

from vggtctl.scan import PRIVATE_DIR


def run_dir(root: str | os.PathLike[str], run_id: str) -> Path:
    return Path(root) / PRIVATE_DIR / "runs" / run_id


class RankAggregator:
    """Wraps a reporter: counts locally, publishes them, and (on rank 0) reports the sum."""

    def __init__(self, inner: Any, folder: Path, rank: int, world_size: int, interval_s: float = 1.0) -> None:
        self.inner = inner
        self.folder = folder
        self.rank = rank
        self.world_size = world_size
        self.interval_s = interval_s
        self.counts = {"total": 0, "encoded": 0, "failed": 0, "bytes": 0}
        self._last = 0.0
        folder.mkdir(parents=True, exist_ok=True)

    def start(self, total: int, plan: Any) -> None:
        self.counts["total"] = total
        self._publish(force=True)
        if self.rank == 0:
            self.inner.start(self._sum()["total"], plan)

    def update(self, encoded: int, failed: int, nbytes: int) -> None:
        self.counts.update(encoded=encoded, failed=failed, bytes=nbytes)
        if self._publish() and self.rank == 0:
            totals = self._sum()
            self.inner.set_total(totals["total"])
            self.inner.update(totals["encoded"], totals["failed"], totals["bytes"])

    def message(self, text: str) -> None:
        self.inner.message(f"[rank {self.rank}] {text}" if self.world_size > 1 else text)

    def finish(self) -> None:
        """Publish the final counts. The inner reporter is not finished here: rank 0 finishes it
        with the exact totals once every rank has reported (the run gathers them)."""
        self.counts["final"] = 1
        self._publish(force=True)
        if self.rank == 0:
            totals = self._sum()
            self.inner.update(totals["encoded"], totals["failed"], totals["bytes"])

    def _publish(self, force: bool = False) -> bool:
        now = time.monotonic()
        if not force and now - self._last < self.interval_s:
            return False
        self._last = now
        path = self.folder / f"rank{self.rank}.json"
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        with contextlib.suppress(OSError):
            tmp.write_text(json.dumps(self.counts))
            os.replace(tmp, path)
        return True

    def _sum(self) -> dict[str, int]:
        totals = {"total": 0, "encoded": 0, "failed": 0, "bytes": 0}
        for rank in range(self.world_size):
            counts = self.counts if rank == self.rank else _read(self.folder / f"rank{rank}.json")
            for name in totals:
                totals[name] += int(counts.get(name, 0))
        return totals


def final_counts(folder: Path, world_size: int, timeout_s: float = 60.0) -> tuple[list[dict[str, Any]], bool]:
    """Every rank's final counts, as published in `folder`, waiting up to `timeout_s` for ranks
    still finishing their writes; (counts per rank, whether all were final).

    For an interrupted run, where a collective could hang on a rank that is gone: the files
    are written by each rank's `finish`, which runs however the rank's loop ended.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        counts = [_read(folder / f"rank{rank}.json") for rank in range(world_size)]
        complete = all(c.get("final") for c in counts)
        if complete or time.monotonic() >= deadline:
            return counts, complete
        time.sleep(0.2)


def remove_run_dir(root: str | os.PathLike[str], run_id: str) -> None:
    """Drop a finished run's progress files (rank 0, after every rank has reported)."""
    folder = run_dir(root, run_id)
    for path in folder.glob("rank*.json*"):
        with contextlib.suppress(OSError):
            path.unlink()
    with contextlib.suppress(OSError):
        folder.rmdir()


def _read(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
