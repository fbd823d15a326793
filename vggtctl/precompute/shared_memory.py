"""Size the decode workers to the shared memory the node has.

DataLoader workers hand each decoded sample to the main process as a file in /dev/shm. A
container often gets only 64 MiB there (Docker's default), while a rank's workers keep up to
workers x prefetch x samples-per-task decoded samples in flight: 15 workers at 4 x 8 janusvln
samples of 5 MB each hold 2.4 GB, and eight ranks share one node's /dev/shm. A worker that
cannot grow its file dies with SIGBUS and takes the run with it, hours in. So the run checks
first and, where the space is short, lowers the prefetch, then the worker count, and says so.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import humanize

SHM_PATH = "/dev/shm"
# The part of the free space one node's ranks may plan to fill: the rest is left for the
# collective library, other jobs and the estimate's error.
SHARE = 0.5


@dataclass(frozen=True)
class LoaderFit:
    """Decode workers and prefetch depth for one rank, and the note that explains a cut."""

    workers: int
    prefetch: int | None  # None without workers (DataLoader's rule)
    in_flight_bytes: int
    note: str | None = None


def in_flight_bytes(workers: int, prefetch: int, task_items: int, item_bytes: int, held_items: int) -> int:
    """Shared memory one rank fills: the workers' queued tasks plus what the main loop holds
    (its partial batches) before it copies them into the batch buffer."""
    return (workers * prefetch * task_items + held_items) * item_bytes


def fit_loader(
    workers: int,
    prefetch: int,
    task_items: int,
    item_bytes: int,
    held_items: int,
    free_bytes: int | None,
    local_ranks: int = 1,
) -> LoaderFit:
    """The largest of (workers, prefetch), (workers, 1), (fewer workers, 1), (0 workers) whose
    samples fit this rank's part of the free shared memory; unchanged where it is unknown."""
    if workers == 0 or free_bytes is None or item_bytes <= 0:
        return LoaderFit(workers, prefetch if workers else None, 0)
    allowed = int(free_bytes * SHARE / max(1, local_ranks))
    wanted = in_flight_bytes(workers, prefetch, task_items, item_bytes, held_items)
    if wanted <= allowed:
        return LoaderFit(workers, prefetch, wanted)
    per_worker = task_items * item_bytes
    fitting = min(workers, (allowed - held_items * item_bytes) // per_worker)
    if fitting >= 1:
        fit = LoaderFit(int(fitting), 1, in_flight_bytes(int(fitting), 1, task_items, item_bytes, held_items))
        action = f"using {fit.workers} decode workers with prefetch 1"
    else:
        fit = LoaderFit(0, None, 0)
        action = "decoding in the main process instead (slow)"
    share = f"{SHARE:.0%}" if local_ranks == 1 else f"{SHARE:.0%} split over {local_ranks} ranks"
    note = (
        f"{SHM_PATH} has {_size(free_bytes)} free, and {workers} decode workers would keep up to "
        f"{_size(wanted)} of decoded images there ({share} of the free space is used): {action}. "
        "Give the container more shared memory (e.g. docker run --shm-size 16g) for full speed."
    )
    return LoaderFit(fit.workers, fit.prefetch, fit.in_flight_bytes, note)


def shm_free_bytes(path: str = SHM_PATH) -> int | None:
    """Free bytes of the shared-memory file system, None where there is none to ask."""
    try:
        stat = os.statvfs(path)
    except OSError:
        return None
    return stat.f_bavail * stat.f_frsize


def _size(nbytes: int) -> str:
    return humanize.naturalsize(nbytes, binary=True)
