"""Settings, plan and outcome of a precompute run (plain data, shared by every stage)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from vggtctl.errors import ConfigError

CHUNK_ITEMS = 64


@dataclass
class PrecomputeOptions:
    root: Path
    vggt_model: str
    qwen_model: str | None = None
    preset: str = "janusvln"
    layer: int = -2
    attention: str | None = None  # default: causal for sequences, full for single frames
    layout: str = "auto"
    annotations: list[str] = field(default_factory=list)
    data_path: str | None = None
    max_history: int | None = None  # None: the root's current one (episodes), else 8
    context: str = "auto"
    evict_start: int | None = None
    evict_recent: int | None = None
    batch_size: int | None = None
    workers: int | None = None
    dtype: str | None = None  # default: bfloat16 on GPU, float32 on CPU
    device: str | None = None
    devices: list[str] | None = None
    limit: int | None = None
    force: bool = False
    verify: bool = False
    dry_run: bool = False
    allow_download: bool = False
    fsync: bool = False
    compile: bool = False  # torch.compile the blocks (GPU); partial batches are padded to size
    sdpa: str = "auto"  # attention kernel tried first (vggtctl.model.sdpa); rounding only
    writer_threads: int = 8
    check_workers: int = 16
    chunk_items: int = CHUNK_ITEMS  # items per claim; every process on one root must agree


def check_options(opts: PrecomputeOptions) -> None:
    """Refuse values that would otherwise pass quietly: a negative batch size skipped items."""
    lowest = {
        "--batch-size": (opts.batch_size, 1),
        "--workers": (opts.workers, 0),
        "--limit": (opts.limit, 0),
        "--max-history": (opts.max_history, 0),
        "--chunk-items": (opts.chunk_items, 1),
        "writer threads": (opts.writer_threads, 1),
    }
    for name, (value, least) in lowest.items():
        if value is not None and value < least:
            raise ConfigError(f"{name} {value}: must be at least {least}")


@dataclass
class Plan:
    items: int
    sidecars: int
    conflicts: int
    already_valid: int
    to_encode: int
    shard_items: int
    bytes_per_item: int
    projected_bytes: int
    projected_seconds: float | None
    layout: str
    layout_reason: str
    context: str
    missing_images: int
    catalog_problems: int
    input_bytes_per_item: int = 0  # decoded pixels of one item (sizes the decode workers)
    unreadable_folders: int = 0  # the walk could not list them: their images were not seen
    batch_size: int = 0
    decode_workers: int = 0  # per rank, after fitting /dev/shm
    decode_prefetch: int | None = None  # tasks queued per worker
    decode_in_flight_bytes: int = 0  # /dev/shm the decoded items may take (per rank)
    decode_note: str | None = None  # why the workers were cut, if they were
    # the first catalog problems and missing images, for --json readers (stderr lists them too)
    catalog_problem_examples: list[dict[str, Any]] = field(default_factory=list)
    missing_image_examples: list[str] = field(default_factory=list)


@dataclass
class Outcome:
    plan: Plan
    encoded: int = 0
    failed: int = 0
    not_written: int = 0  # decoded and encoded, but the disk was full
    skipped_claimed: int = 0
    bytes_written: int = 0
    seconds: float = 0.0
    interrupted: bool = False
    disk_full: str = ""
    verify_problems: int = 0
    verified: int = 0  # sidecars --verify read back in full (verify_problems of them corrupt)
    run_id: str = ""
    ranks: int = 1
    per_rank: list[int] = field(default_factory=list)  # encoded per rank (rank order)
    feature_key: dict[str, Any] = field(default_factory=dict)
    # seconds of the encode loop per stage (vggtctl.precompute.stages); summed over ranks
    stage_seconds: dict[str, float] = field(default_factory=dict)
    # the run's settings differ from the root's current ones and it did not finish (or was a
    # --limit trial), so they did not become current
    settings_kept: bool = False

    @property
    def rate(self) -> float:
        return self.encoded / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["rate"] = self.rate
        data["disk_full"] = self.disk_full or None  # as in the manifest: null, not ""
        return data


class PrecomputeInterrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGTERM) stopped the run after its in-flight writes; `outcome` says how far it got."""

    def __init__(self, outcome: Outcome) -> None:
        super().__init__("interrupted")
        self.outcome = outcome


# --------------------------------------------------------------------------- setup


FEATURE_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def _dtype(name: str) -> torch.dtype:
    value = FEATURE_DTYPES.get(str(name).removeprefix("torch."))
    if value is None:
        raise ConfigError(f"--dtype {name}: use one of {', '.join(FEATURE_DTYPES)}")
    return value
