"""Running an audit with a progress line on stderr, and the verdict table (verify, prune, status)."""

from __future__ import annotations

import os
from collections.abc import Callable

from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from vggtctl.audit import AuditReport, HistoryRule, audit
from vggtctl.cli import render
from vggtctl.sidecar import Expectation, Verdict
from vggtctl.wording import shown


def progress_bar(description: str, *, enabled: bool = True) -> Progress:
    """A transient progress display on stderr; off when stderr is not a terminal."""
    return Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=render.err,
        transient=True,
        disable=not (enabled and render.err.is_terminal),
    )


def run_audit(
    root: str,
    expect: Expectation | None,
    *,
    full: bool,
    workers: int | None,
    group_of: Callable[[str], str] | None = None,
    label: str = "Checking sidecars",
    history: HistoryRule | None = None,
) -> AuditReport:
    with progress_bar(label) as bar:
        task = bar.add_task(label, total=None)

        def tick(done: int, found: int) -> None:
            bar.update(task, completed=done, total=found)

        return audit(
            root, expect, full=full, workers=workers, progress=tick, group_of=group_of, history=history
        )


def shown_path(root: str, path: str) -> str:
    rel = os.path.relpath(path, root)
    return shown(path if rel.startswith("..") else rel)


def verdict_table(report: AuditReport, *, examples: int = 5) -> Table:
    """Verdict | Files | Size | Examples: every verdict found, `valid` always."""
    table = render.table(show_edge=False, pad_edge=False)
    table.add_column("Verdict")
    table.add_column("Files", justify="right")
    table.add_column("Size", justify="right")
    table.add_column("Examples", overflow="fold")
    root = report.root or "."
    for verdict in Verdict:
        stats = report.verdicts[verdict]
        if not stats.count and verdict is not Verdict.VALID:
            continue
        shown = [] if verdict is Verdict.VALID else stats.examples[:examples]
        style = "green" if verdict is Verdict.VALID else "red" if verdict is Verdict.CORRUPT else "yellow"
        table.add_row(
            f"[{style}]{verdict.value}[/]",
            f"{stats.count:,}",
            render.size(stats.bytes),
            "\n".join(escape(shown_path(root, p)) for p in shown),
        )
    return table


def print_scan_warnings(report: AuditReport) -> None:
    for line in report.unreadable:
        render.err.print(f"[yellow]warning:[/] cannot read {escape(line)} (skipped)")
    if report.symlinked_dirs:
        render.err.print(
            f"note: {render.count(len(report.symlinked_dirs), 'symlinked folder')} not followed, "
            f"e.g. {escape(shown_path(report.root or '.', report.symlinked_dirs[0]))}"
        )
