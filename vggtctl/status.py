"""What `vggtctl status` reports, as data: per-row coverage from one scan, the footer figures
(free space, projected cache size, time to finish) and, with `deep`, the verdict of every
sidecar from its header. The CLI only renders a `StatusReport`; notebooks can use it directly.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from vggtctl import scan
from vggtctl.errors import ConfigError
from vggtctl.scan import DirStats

SORT_KEYS = ("name", "coverage", "missing", "size")

# Display order of deep verdicts: the split of `cached` first, then orphans and debris.
VERDICT_ORDER = (
    "valid",
    "stale",
    "model-mismatch",
    "preprocess-mismatch",
    "context-mismatch",
    "legacy",
    "corrupt",
    "orphan",
    "temp",
)


@dataclass(frozen=True)
class StatusRow:
    """One table row: a folder at the chosen depth, with its verdict counts when deep."""

    stats: DirStats
    verdicts: dict[str, int] | None = None

    @property
    def name(self) -> str:
        return self.stats.name

    @property
    def valid(self) -> int | None:
        return None if self.verdicts is None else self.verdicts.get("valid", 0)

    def to_json(self) -> dict[str, Any]:
        doc = self.stats.to_dict()
        if self.verdicts is not None:
            doc["verdicts"] = dict(sorted(self.verdicts.items()))
            doc["valid_coverage"] = round(_valid_share(self), 6)
        return doc


@dataclass(frozen=True)
class Footer:
    """Figures below the table. None means "cannot say" (no sidecar yet, no rate measured)."""

    free_bytes: int | None
    fs_total_bytes: int | None
    mean_sidecar_bytes: float | None
    projected_cache_bytes: int | None  # mean sidecar size x images: the cache at full coverage
    remaining_cache_bytes: int | None  # what writing the missing ones would add
    todo_items: int | None  # images without a (valid, when deep) sidecar; None: annotations root
    rate: float | None  # items/s of the last precompute run in the manifest
    eta_seconds: float | None
    manifest_problem: str | None = None
    # the current settings' layout: with "annotations" only the images the files name are items,
    # so per-image projections (cache at full coverage, time to finish) would promise work that
    # precompute will never do
    layout: str | None = None
    # items the latest precompute run failed (failures.jsonl says which): they stay without a
    # sidecar, so they are in todo_items and the time to finish until their images are fixed
    last_run_failed: int | None = None

    @property
    def fits(self) -> bool | None:
        if self.remaining_cache_bytes is None or self.free_bytes is None:
            return None
        return self.remaining_cache_bytes <= self.free_bytes

    def to_json(self) -> dict[str, Any]:
        return {
            "free_bytes": self.free_bytes,
            "fs_total_bytes": self.fs_total_bytes,
            "mean_sidecar_bytes": self.mean_sidecar_bytes,
            "projected_cache_bytes": self.projected_cache_bytes,
            "remaining_cache_bytes": self.remaining_cache_bytes,
            "fits_in_free_space": self.fits,
            "todo_items": self.todo_items,
            "rate_items_per_s": self.rate,
            "eta_seconds": self.eta_seconds,
            "manifest_problem": self.manifest_problem,
            "layout": self.layout,
            "last_run_failed": self.last_run_failed,
        }


@dataclass(frozen=True)
class DeepSummary:
    """Header verdicts of every sidecar and temp file (`status --deep`)."""

    expectation: str
    verdicts: dict[str, dict[str, Any]]  # verdict -> {"count", "bytes", "examples"}
    problem_count: int

    def count(self, verdict: str) -> int:
        return int(self.verdicts.get(verdict, {}).get("count", 0))

    def to_json(self) -> dict[str, Any]:
        return {
            "expectation": self.expectation,
            "verdicts": self.verdicts,
            "problem_count": self.problem_count,
        }


@dataclass(frozen=True)
class StatusReport:
    root: str
    depth: int
    sort: str
    top: int | None
    rows: list[StatusRow]  # sorted, cut to `top`
    rows_total: int  # rows before the cut
    total: DirStats  # over all rows, shown or not
    footer: Footer
    unreadable: list[str] = field(default_factory=list)
    symlinked_dirs: list[str] = field(default_factory=list)
    deep: DeepSummary | None = None
    scan_seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "root": self.root,
            "depth": self.depth,
            "sort": self.sort,
            "top": self.top,
            "rows_total": self.rows_total,
            "rows_shown": len(self.rows),
            "rows": [row.to_json() for row in self.rows],
            # with --deep, the totals carry the verdict counts too: "same fields as a row"
            "totals": StatusRow(
                self.total,
                None if self.deep is None else {v: int(d["count"]) for v, d in self.deep.verdicts.items()},
            ).to_json(),
            "footer": self.footer.to_json(),
            "unreadable": list(self.unreadable),
            "symlinked_dirs": list(self.symlinked_dirs),
            "scan_seconds": round(self.scan_seconds, 3),
        }
        if self.deep is not None:
            doc["deep"] = self.deep.to_json()
        return doc


# --------------------------------------------------------------------------- building


def _row_is_shown(stats: DirStats, depth: int) -> bool:
    """Folders at the chosen depth always get a row; a folder above it (ROOT itself at depth
    1, an episode at depth 2) only when files lie directly in it."""
    at_depth = depth <= 0 or (stats.name != "." and stats.name.count("/") + 1 >= depth)
    return at_depth or bool(stats.images or stats.sidecars or stats.temps)


def _sort_key(sort: str) -> Callable[[StatusRow], Any]:
    if sort == "name":
        return lambda r: r.name
    if sort == "coverage":  # worst first
        return lambda r: (r.stats.coverage if r.valid is None else _valid_share(r), r.name)
    if sort == "missing":  # most first
        return lambda r: (-r.stats.missing, r.name)
    if sort == "size":  # largest (images + cache) first
        return lambda r: (-(r.stats.image_bytes + r.stats.sidecar_bytes), r.name)
    raise ConfigError(f"--sort {sort}: choose one of {', '.join(SORT_KEYS)}")


def _valid_share(row: StatusRow) -> float:
    return (row.valid or 0) / row.stats.images if row.stats.images else 1.0


def _last_run(root: str) -> tuple[float | None, str | None, str | None, int | None]:
    """(items/s of the last precompute run, why the manifest was ignored, the current layout,
    items the latest precompute run failed)."""
    try:
        from vggtctl import manifest
    except ImportError:  # manifest support not installed in this build: no rate yet
        return None, None, None, None
    loaded = manifest.load(root)
    layout = (loaded.last_run_settings() or {}).get("layout")
    return (
        loaded.last_rate,
        getattr(loaded, "problem", None),
        layout if isinstance(layout, str) else None,
        loaded.last_run_failed,
    )


def _footer(root: str, total: DirStats, todo: int) -> Footer:
    try:
        usage = shutil.disk_usage(root)
        free, fs_total = usage.free, usage.total
    except OSError:
        free = fs_total = None
    sidecars = total.sidecars
    mean = total.sidecar_bytes / sidecars if sidecars else None
    projected = round(mean * total.images) if mean is not None else None
    remaining = round(mean * total.missing) if mean is not None else None
    rate, problem, layout, failed = _last_run(root)
    eta = todo / rate if rate else None
    if layout == "annotations":
        projected = remaining = eta = None
        return Footer(free, fs_total, mean, projected, remaining, None, rate, eta, problem, layout, failed)
    return Footer(free, fs_total, mean, projected, remaining, todo, rate, eta, problem, layout, failed)


def _deep_summary(report: Any) -> DeepSummary:
    verdicts = {verdict.value: stats.to_json() for verdict, stats in report.verdicts.items() if stats.count}
    return DeepSummary(report.expectation, verdicts, report.problem_count)


def build_status(
    root: str | os.PathLike[str],
    *,
    depth: int = 1,
    sort: str = "name",
    top: int | None = None,
    workers: int | None = None,
    processes: int | None = None,
    deep: bool = False,
    vggt_model: str | None = None,
    progress: Callable[[int, int], None] | None = None,
    scan_progress: scan.ScanProgress | None = None,
) -> StatusReport:
    """Scan `root` once and build the report.

    deep: also read every sidecar's header (on `workers` threads) and count verdicts per row,
    against `vggt_model` if given, else the manifest's current key. `progress(done, found)`
    is called as headers are read, `scan_progress(folders, files)` as a plain scan advances.
    """
    root = os.fspath(root)
    if depth < 0:
        raise ConfigError(f"--depth {depth}: must be 0 or more")
    if top is not None and top < 1:
        raise ConfigError(f"--top {top}: must be 1 or more")
    key = _sort_key(sort)
    started = time.perf_counter()
    audit_report = None
    if deep:
        # Imported here: the codec pulls in torch, which a plain listing never needs.
        from vggtctl import audit

        expect = audit.expectation_from(root, vggt_model)
        history = audit.history_rule_from(root)
        auditor = audit.Auditor(
            expect,
            full=False,
            workers=workers,
            group_of=lambda path: scan.group_of(root, os.path.dirname(path), depth),
            progress=progress,
            history=history,
        )
        try:
            summary = scan.summarize(root, depth, workers, on_listing=auditor.feed)
        except BaseException:
            auditor.close()
            raise
        audit_report = auditor.report()
        audit_report.expectation = audit.describe(expect)
        if history is not None and audit.has_model_check(expect):
            audit_report.expectation += f", {history.describe()}"
    else:
        summary = scan.summarize(root, depth, workers, processes=processes, progress=scan_progress)
    elapsed = time.perf_counter() - started

    rows = []
    for name, stats in summary.rows.items():
        if not _row_is_shown(stats, depth):
            continue
        verdicts = None
        if audit_report is not None:
            counts = audit_report.groups.get(name, {})
            verdicts = {v.value: n for v, n in counts.items() if n}
        rows.append(StatusRow(stats, verdicts))
    rows.sort(key=key)
    shown = rows[:top] if top is not None else rows

    deep_summary = _deep_summary(audit_report) if audit_report is not None else None
    if deep_summary is not None:
        valid = deep_summary.count("valid")
        todo = max(0, summary.total.images - valid)
    else:
        todo = summary.total.missing
    return StatusReport(
        root=root,
        depth=depth,
        sort=sort,
        top=top,
        rows=shown,
        rows_total=len(rows),
        total=summary.total,
        footer=_footer(root, summary.total, todo),
        unreadable=summary.unreadable,
        symlinked_dirs=summary.symlinked_dirs,
        deep=deep_summary,
        scan_seconds=elapsed,
    )
