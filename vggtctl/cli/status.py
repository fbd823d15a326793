"""`vggtctl status`: cache coverage per folder, from one walk of the data root."""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable, Sequence
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from vggtctl.errors import EXIT_PARTIAL, ConfigError
from vggtctl.wording import shown

if TYPE_CHECKING:
    from vggtctl.status import StatusReport

HELP = """Show how much of ROOT is cached: one row per folder at --depth (default: each direct
subfolder, e.g. each episode; files directly in ROOT form a "." row), with images, cached,
coverage, missing, orphan sidecars, temp debris and sizes; then free space, the projected
cache size at full coverage and the time to finish at the last measured precompute rate.

Exit codes: 0 shown, 2 usage error, 3 some folders or files could not be read (their images are not
counted), 130 interrupted.

Counts come from file names and one stat per file; nothing is opened. --deep also reads each
sidecar's header (never its tensor) and splits cached into valid / stale / mismatch / ...

Examples:

  vggtctl status /data/train

  vggtctl status /data/train --sort coverage --top 20

  vggtctl status /data/train --depth 0 --json

  vggtctl status /data/train --deep --vggt-model /models/VGGT-1B
"""


class Sort(str, Enum):
    name = "name"
    coverage = "coverage"
    missing = "missing"
    size = "size"


def register(app: typer.Typer) -> None:
    @app.command(
        "status",
        help=HELP,
        short_help="Cache coverage, missing and orphan sidecars and sizes per folder of ROOT, from "
        "one walk of the tree; free space and time to finish.",
    )
    def command(
        root: Path | None = typer.Argument(
            None,
            help="Data root (default: VGGTCTL_DATA_ROOT, vggtctl.toml data_root, or the working folder).",
        ),
        depth: int = typer.Option(1, "--depth", min=0, help="Folder depth of a row (0: one row for ROOT)."),
        sort: Sort = typer.Option(
            Sort.name, "--sort", help="Row order: name, coverage (worst first), missing, size (most first)."
        ),
        top: int | None = typer.Option(None, "--top", min=1, metavar="K", help="Show only the first K rows."),
        workers: int | None = typer.Option(
            None, "--workers", min=1, help="Concurrent listings (default: 4 per core, max 32; more on NFS)."
        ),
        processes: int | None = typer.Option(
            None, "--processes", min=1, help="Scan processes (default: one per core; 1 = threads only)."
        ),
        deep: bool = typer.Option(
            False, "--deep", help="Read every sidecar's header and split cached into verdicts."
        ),
        vggt_model: str | None = typer.Option(
            None, "--vggt-model", help="With --deep: the current checkpoint (default: the manifest's key)."
        ),
        as_json: bool = typer.Option(False, "--json", help="One JSON document on stdout and nothing else."),
    ) -> None:
        from vggtctl.cli import render

        with render.command_errors(as_json=as_json):
            report = run(root, depth, sort.value, top, workers, processes, deep, vggt_model)
        for problem in report.unreadable:
            render.err.print(f"warning: cannot read {problem} (skipped)", markup=False, soft_wrap=True)
        if as_json:
            render.print_json(report.to_json())
        else:
            show(report)
        if report.unreadable:  # the counts miss those folders: a partial report
            raise typer.Exit(EXIT_PARTIAL)


def run(
    root_arg: Path | None,
    depth: int,
    sort: str,
    top: int | None,
    workers: int | None,
    processes: int | None,
    deep: bool,
    vggt_model: str | None,
) -> StatusReport:
    """Resolve settings and build the report (a spinner on stderr when it is a terminal)."""
    from vggtctl import settings
    from vggtctl.cli import render
    from vggtctl.status import build_status

    if vggt_model and not deep:
        raise ConfigError("--vggt-model only applies with --deep")
    root = settings.resolve_data_root(root_arg)
    config = settings.find_config(root)
    settings.warn_unknown_keys(config, lambda line: render.err.print(line, markup=False, soft_wrap=True))
    workers = settings.as_int(settings.pick_setting("workers", workers, config, "status"), minimum=1)
    processes = settings.as_int(settings.pick_setting("processes", processes, config, "status"), minimum=1)
    build = functools.partial(
        build_status,
        root,
        depth=depth,
        sort=sort,
        top=top,
        workers=workers,
        processes=processes,
        deep=deep,
        vggt_model=vggt_model,
    )
    if not render.err.is_terminal:
        return build()
    if deep:
        from vggtctl.cli.audit_view import progress_bar

        with progress_bar("Reading sidecar headers") as bar:
            task = bar.add_task("Reading sidecar headers", total=None)
            return build(progress=lambda done, found: bar.update(task, completed=done, total=found))
    return _with_scan_line(root, build)


def _with_scan_line(root: Path, build: Callable[..., StatusReport]) -> StatusReport:
    """A transient "Scanning..." line on stderr, redrawn from this thread: a display thread
    would keep the scan from forking its worker processes."""
    from rich.live import Live
    from rich.text import Text

    from vggtctl.cli import render

    last = 0.0
    with Live(Text(f"Scanning {root} ..."), console=render.err, auto_refresh=False, transient=True) as live:

        def tick(folders: int, files: int) -> None:
            nonlocal last
            now = time.monotonic()
            if now - last >= 0.1:
                last = now
                live.update(Text(f"Scanning {root}: {folders:,} folders, {files:,} files"), refresh=True)

        return build(scan_progress=tick)


# --------------------------------------------------------------------------- rendering


# Columns a narrow terminal drops first (all of them stay in --json and in plain output).
# "bar" drops the coverage bar, "merge" folds the deep verdicts into valid/stale/mismatch/other.
_DROPPABLE = ("image size", "temps", "orphans", "bar", "merge", "cached", "cache size")
_MERGED = {
    "valid": ("valid",),
    "stale": ("stale",),
    "mismatch": ("model-mismatch", "preprocess-mismatch", "context-mismatch"),
    "other": ("legacy", "corrupt"),
}


def show(report: StatusReport) -> None:
    """The table and its footer on stdout."""
    from vggtctl.cli import render

    plain = "NO_COLOR" in os.environ or not render.out.is_terminal
    console = render.out
    hidden: list[str] = []
    if plain:
        from rich.console import Console

        # Not a terminal (or a reader who wants plain text): no fixed width, so never wrap or
        # cut a folder name; colors stay off exactly as on `render.out`.
        console = Console(width=100_000, no_color=render.out.no_color, highlight=False)
        table = status_table(report, plain=True)
    else:
        # Rich would squeeze an over-wide table by cutting numbers ("1…"): drop whole
        # columns instead, least useful first.
        from rich.measure import Measurement

        unbounded = console.options.update_width(100_000)
        table = status_table(report, plain=False)
        for column in _DROPPABLE:
            if Measurement.get(console, unbounded, table).maximum <= console.width:
                break
            hidden.append(column)
            table = status_table(report, plain=False, hide=hidden)
    console.print(table)
    hidden_columns = [c for c in hidden if c not in ("bar", "merge")]
    if hidden_columns:
        console.print(
            f"(narrow terminal: {', '.join(hidden_columns)} not shown; --json has every column)",
            soft_wrap=True,
            markup=False,
            highlight=False,
        )
    if "merge" in hidden:
        console.print(
            "(mismatch = model/preprocess/context-mismatch; other = legacy + corrupt)", soft_wrap=True
        )
    for line in footer_lines(report):
        console.print(line, markup=False, highlight=False, soft_wrap=True)


def status_table(report: StatusReport, *, plain: bool, hide: Sequence[str] = ()):  # -> rich.table.Table
    """The per-row table; `hide` names columns to leave out."""
    from rich import box
    from rich.table import Table
    from rich.text import Text

    from vggtctl.cli import render
    from vggtctl.status import VERDICT_ORDER

    deep = report.deep is not None
    groups: list[tuple[str, tuple[str, ...]]] = []  # verdict column -> the verdicts it sums
    if report.deep is not None:
        found = report.deep.count
        if "merge" in hide:
            groups = [(t, vs) for t, vs in _MERGED.items() if any(found(v) for v in vs)]
        else:
            groups = [(v, (v,)) for v in VERDICT_ORDER if v not in ("orphan", "temp") and found(v)]

    def cells(stats, verdicts) -> dict[str, object]:  # column -> renderable
        # With --deep, coverage counts only what training can use: valid sidecars.
        covered = (verdicts or {}).get("valid", 0) if deep else stats.cached
        row: dict[str, object] = {
            "folder": Text(shown(stats.name)),
            "images": f"{stats.images:,}",
            "cached": f"{stats.cached:,}",
            "coverage": _coverage_cell(covered, stats.images, plain or "bar" in hide),
            "missing": f"{stats.missing:,}",
        }
        for title, members in groups:
            row[title] = f"{sum((verdicts or {}).get(v, 0) for v in members):,}"
        row.update(
            {
                "orphans": f"{stats.orphans:,}",
                "temps": f"{stats.temps:,}",
                "cache size": render.size(stats.sidecar_bytes),
                "image size": render.size(stats.image_bytes),
            }
        )
        return row

    rows = [cells(row.stats, row.verdicts) for row in report.rows]
    if report.rows_total > 1 or report.top is not None:
        totals = {v: report.deep.count(v) for v in VERDICT_ORDER} if report.deep is not None else None
        total_row = cells(report.total, totals)
        total_row["folder"] = Text("total", style="" if plain else "bold")
    else:
        total_row = None

    table = Table(
        box=None if plain else box.SIMPLE_HEAD,
        show_footer=False,
        pad_edge=False,
        header_style="" if plain else "bold",
    )
    columns = [c for c in cells(report.total, {}) if c not in hide]
    bar = not plain and "bar" not in hide
    for column in columns:
        title = column
        if column == "coverage" and deep:
            title = "coverage(valid)" if plain else "coverage\n(valid)"
        elif not plain:  # a terminal is narrow: "model-mismatch", "cache size" over two lines
            title = column.replace("-", "\n", 1).replace(" ", "\n", 1)
        if column == "folder":
            longest = max((len(row.name) for row in report.rows), default=0)
            table.add_column(title, no_wrap=True, min_width=min(24, max(len("folder"), longest)))
        elif column == "coverage":
            table.add_column(title, justify="left" if bar else "right", no_wrap=True)
        else:
            table.add_column(title, justify="right", no_wrap=True)
    for row in rows:
        table.add_row(*(row[c] for c in columns))  # type: ignore[misc]
    if total_row is not None:
        table.add_section()
        table.add_row(*(total_row[c] for c in columns))  # type: ignore[misc]
    return table


def _coverage_cell(cached: int, images: int, plain: bool):  # -> str | Text
    from rich.text import Text

    if not images:
        return "-"
    share = cached / images
    percent = f"{100 * share:5.1f}%"
    if plain:
        return percent.strip()
    width = 10
    filled = round(share * width)
    if cached < images:
        filled = min(filled, width - 1)  # a bar is full only when nothing is missing
    color = "green" if cached == images else "yellow" if share >= 0.5 else "red"
    return Text.assemble(("█" * filled, color), ("░" * (width - filled), "dim"), " ", percent)


def footer_lines(report: StatusReport) -> list[str]:
    from vggtctl.cli import render
    from vggtctl.failures import failures_path
    from vggtctl.status import VERDICT_ORDER

    foot = report.footer
    total = report.total
    lines = []
    if report.top is not None and report.rows_total > len(report.rows):
        lines.append(f"Showing {len(report.rows)} of {report.rows_total} rows (sorted by {report.sort}).")
    if foot.free_bytes is not None:
        lines.append(
            f"Free space: {render.size(foot.free_bytes)} of {render.size(foot.fs_total_bytes or 0)} "
            "on this file system."
        )
    if foot.layout == "annotations":
        lines.append(
            "Coverage counts every image; this root's items come from annotation files (the last "
            "precompute run), and only the images they name need sidecars: `vggtctl precompute "
            "--dry-run` with the same --annotations says how many are left."
        )
    elif foot.projected_cache_bytes is None:
        lines.append("Cache at full coverage: unknown until the first sidecar is written.")
    else:
        fits = "" if foot.fits is None else ("; fits" if foot.fits else "; does NOT fit in the free space")
        lines.append(
            f"Cache at full coverage: ~{render.size(foot.projected_cache_bytes)} "
            f"({render.size(foot.mean_sidecar_bytes or 0)} per sidecar x {render.count(total.images, 'image')}); "
            f"{render.size(foot.remaining_cache_bytes or 0)} still to write{fits}."
        )
    if foot.todo_items is None:
        pass  # annotations root, said above: the images without sidecars are not the items left
    elif foot.todo_items == 0:
        lines.append("Time to finish: nothing left to compute.")
    elif foot.eta_seconds is None:
        lines.append(
            f"Time to finish: unknown for {render.count(foot.todo_items, 'item')} (no precompute rate in the "
            "manifest yet)."
        )
    else:
        lines.append(
            f"Time to finish: ~{render.duration(foot.eta_seconds)} for {foot.todo_items:,} items "
            f"at {foot.rate:,.1f} items/s (last precompute run)."
        )
    if foot.last_run_failed:
        lines.append(
            f"Failed: {render.count(foot.last_run_failed, 'item')} in the last precompute run "
            f"(which and why: {shown(str(failures_path(report.root)))}); counted as still to do until fixed."
        )
    if foot.manifest_problem:
        lines.append(f"Note: {foot.manifest_problem}")
    if total.temps:
        lines.append(
            f"Temp debris: {render.count(total.temps, 'file')}, {render.size(total.temp_bytes)} "
            "(left by interrupted writes; `vggtctl prune --temp` removes them)."
        )
    if total.orphans:
        links = total.linked_orphans
        left = (
            f"; {links} of them are symbolic links, which vggtctl never deletes: remove those by hand"
            if links
            else ""
        )
        lines.append(
            f"Orphans: {render.count(total.orphans, 'sidecar')} whose image is gone "
            f"(`vggtctl prune --orphans` removes them{left})."
        )
    if total.dangling:
        lines.append(
            f"Dangling: {render.count(total.dangling, 'sidecar')} whose image is a dangling symbolic "
            "link (its source unmounted?): not counted as orphans above (the verdicts below call "
            "them orphan), and no prune category deletes them."
        )
    if report.deep is not None:
        verdicts = report.deep.verdicts
        counts = ", ".join(f"{v} {verdicts[v]['count']:,}" for v in VERDICT_ORDER if v in verdicts)
        lines.append(f"Headers checked against: {report.deep.expectation}.")
        lines.append(f"Verdicts: {counts or 'no sidecars'}.")
    if report.symlinked_dirs:
        lines.append(f"Not followed: {render.count(len(report.symlinked_dirs), 'symlinked folder')}.")
    if report.unreadable:
        lines.append(
            f"Unreadable: {render.count(len(report.unreadable), 'path')} skipped (see the warnings above)."
        )
    lines.append(f"Scanned {render.count(total.folders, 'folder')} in {report.scan_seconds:.1f} s.")
    return lines
