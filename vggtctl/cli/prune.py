"""`vggtctl prune`: scan -> plan -> confirm -> delete invalid sidecars and temp files."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer

from vggtctl.errors import EXIT_INTERRUPTED, EXIT_OK, EXIT_PARTIAL, ConfigError

if TYPE_CHECKING:  # the library imports torch; keep `vggtctl --help` fast
    from vggtctl.audit import AuditReport
    from vggtctl.prune import PrunePlan

HELP = """Delete sidecars that can never be served, and temp files left by interrupted writes.

Pick categories with flags; in a terminal without any, the categories found are offered.
Shows the plan, then asks (y/n, default no); --yes skips the question, --dry-run only shows. Without a
terminal it refuses unless --yes or --dry-run is given. Only files named *.vggt_cache.pt or our
temp names, inside ROOT and not behind a symlink, are ever deleted; valid sidecars never are.

Exit codes: 0 done (or nothing to do, or declined), 2 usage error or refusal, 3 some files could
not be deleted, 130 interrupted.

Examples:

  vggtctl prune /data/train --model-changed --vggt-model /models/VGGT-1B

  vggtctl prune /data/train --orphans --stale --temp --dry-run

  vggtctl prune --all-invalid --older-than 30d --yes --json
"""


def register(app: typer.Typer) -> None:
    @app.command("prune", help=HELP)
    def command(
        root: Path | None = typer.Argument(
            None,
            help="Data root (default: VGGTCTL_DATA_ROOT, vggtctl.toml data_root, or the working folder).",
        ),
        model_changed: bool = typer.Option(
            False, "--model-changed", help="Cached for another model, preset or context than the current one."
        ),
        orphans: bool = typer.Option(False, "--orphans", help="The image is gone."),
        stale: bool = typer.Option(False, "--stale", help="The image changed after caching."),
        corrupt: bool = typer.Option(False, "--corrupt", help="Unreadable or not following the format."),
        legacy: bool = typer.Option(False, "--legacy", help="Files of the earlier script (no provenance)."),
        temp: bool = typer.Option(
            False, "--temp", help="Temp files of interrupted writes (older than 15 min)."
        ),
        all_invalid: bool = typer.Option(False, "--all-invalid", help="Every category above."),
        older_than: str | None = typer.Option(
            None,
            "--older-than",
            metavar="AGE",
            help="Only files modified longer ago than AGE (30d, 12h, 1w2d).",
        ),
        vggt_model: str | None = typer.Option(
            None, "--vggt-model", help="The current checkpoint (default: the manifest's current key)."
        ),
        dry_run: bool = typer.Option(False, "--dry-run", help="Show the plan, delete nothing."),
        yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation."),
        workers: int | None = typer.Option(None, "--workers", min=1, help="I/O threads for the scan."),
        as_json: bool = typer.Option(False, "--json", help="One JSON document on stdout: plan and result."),
    ) -> None:
        from vggtctl.cli import render

        flags = {
            "model-changed": model_changed,
            "orphans": orphans,
            "stale": stale,
            "corrupt": corrupt,
            "legacy": legacy,
            "temp": temp,
        }
        chosen = [name for name, on in flags.items() if on or all_invalid]
        with render.command_errors("interrupted; nothing more deleted", as_json=as_json):
            code = run(
                root,
                chosen,
                explicit_model_changed=model_changed,
                older_than=older_than,
                vggt_model=vggt_model,
                dry_run=dry_run,
                yes=yes,
                workers=workers,
                as_json=as_json,
            )
        raise typer.Exit(code)


def _files(count: int) -> str:
    return f"{count:,} file" if count == 1 else f"{count:,} files"


def _flag_list() -> str:
    from vggtctl.prune import iter_category_help

    return ", ".join(flag for flag, _ in iter_category_help()) + ", --all-invalid"


def run(
    root_arg: Path | None,
    categories: list[str],
    *,
    explicit_model_changed: bool,
    older_than: str | None,
    vggt_model: str | None,
    dry_run: bool,
    yes: bool,
    workers: int | None,
    as_json: bool,
) -> int:
    from vggtctl import audit, prune, settings
    from vggtctl.cli import audit_view, render

    root = str(settings.resolve_data_root(root_arg))
    config = settings.find_config(root)
    settings.warn_unknown_keys(config, lambda line: render.err.print(line, markup=False, soft_wrap=True))
    workers = settings.as_int(settings.pick_setting("workers", workers, config, "prune"), minimum=1)
    age = prune.parse_duration(older_than) if older_than is not None else None
    interactive = render.is_interactive()
    if not interactive and not categories:
        raise ConfigError(f"no category chosen and no terminal to ask in: pass one or more of {_flag_list()}")
    if not interactive and not (yes or dry_run):
        raise ConfigError(
            "refusing to delete without a terminal to confirm in: pass --yes, or --dry-run to only look"
        )
    expect = audit.expectation_from(root, vggt_model)
    if not audit.has_model_check(expect):
        if explicit_model_changed:
            raise ConfigError(
                "--model-changed needs the current model: pass --vggt-model PATH, or run precompute "
                "first (it records the model in vggt_cache_manifest.json)"
            )
        if "model-changed" in categories and not as_json:
            render.err.print("note: no current model known, so model changes are not detected")

    history = audit.history_rule_from(root)  # as verify and status judge
    report = audit_view.run_audit(
        root, expect, full=False, workers=workers, label="Scanning sidecars", history=history
    )
    if not as_json:
        audit_view.print_scan_warnings(report)
    if not categories:
        categories = _ask_categories(report, has_model=audit.has_model_check(expect))
        if not categories:
            render.err.print("Nothing chosen; nothing deleted.")
            return EXIT_OK
    plan = prune.plan_prune(report, categories, older_than=age)

    if not as_json:
        _print_plan(plan)
    if not plan.files:
        if as_json:
            render.print_json({"dry_run": dry_run, "plan": plan.to_json(), "result": None})
        else:
            render.out.print("Nothing to prune.")
        return EXIT_OK
    if dry_run:
        if as_json:
            render.print_json({"dry_run": True, "plan": plan.to_json(), "result": None})
        else:
            render.out.print(f"Dry run: would delete {_files(len(plan.files))}, freeing {plan.freed_str}.")
        return EXIT_OK
    if not yes and not _confirm(f"Delete {_files(len(plan.files))}, freeing {plan.freed_str}?"):
        if as_json:
            render.print_json({"dry_run": False, "declined": True, "plan": plan.to_json(), "result": None})
        else:
            render.err.print("Declined; nothing deleted.")
        return EXIT_OK

    with audit_view.progress_bar("Deleting") as bar:
        task = bar.add_task("Deleting", total=len(plan.files))
        result = prune.execute(plan, on_file=lambda _target, _error: bar.advance(task))

    for path, reason in result.failed:
        render.err.print(f"[red]failed:[/] {audit_view.shown_path(root, path)}: {reason}")
    for path, reason in result.skipped:
        render.err.print(f"skipped: {audit_view.shown_path(root, path)}: {reason}")
    if as_json:
        render.print_json({"dry_run": False, "plan": plan.to_json(), "result": result.to_json()})
    else:
        render.out.print(f"Deleted {_files(result.deleted)}, freed {result.freed_str}.")
        if result.failed:
            render.out.print(f"[red]{_files(len(result.failed))} could not be deleted[/] (listed on stderr).")
    if result.interrupted:
        return EXIT_INTERRUPTED
    return EXIT_PARTIAL if result.failed else EXIT_OK


def _print_plan(plan: PrunePlan) -> None:
    from rich.markup import escape

    from vggtctl.cli import audit_view, render

    # what `valid` meant: a smoke test that made other settings current shows up here
    render.out.print(f"Checked against: {escape(plan.expectation)}")
    table = render.table(
        show_edge=False, pad_edge=False, title=f"Prune plan for {plan.root}", title_justify="left"
    )
    table.add_column("Category")
    table.add_column("Files", justify="right")
    table.add_column("Size", justify="right")
    table.add_column("Examples", overflow="fold")
    for total in plan.categories:
        examples = [t.path for t in plan.files if t.category == total.name][:3]
        table.add_row(
            f"--{total.name}",
            f"{total.files:,}",
            total.bytes_str,
            "\n".join(escape(audit_view.shown_path(plan.root, p)) for p in examples),
        )
    table.add_section()
    table.add_row("total", f"{len(plan.files):,}", plan.freed_str, "")
    render.out.print(table)
    if plan.kept_recent_temps:
        render.out.print(
            f"Kept {render.count(plan.kept_recent_temps, 'temp file')} younger than 15 minutes (a write may be in "
            "progress); --older-than 0s includes them."
        )
    if plan.links_left:
        example = audit_view.shown_path(plan.root, plan.links_left[0])
        render.out.print(
            f"Left {render.count(len(plan.links_left), 'symbolic link')} named like sidecars (e.g. {escape(example)}): "
            "vggtctl never deletes links; remove them by hand."
        )
    if plan.specials_left:
        example = audit_view.shown_path(plan.root, plan.specials_left[0])
        render.out.print(
            f"Left {render.count(len(plan.specials_left), 'special file')} (socket, FIFO or device) named like "
            f"sidecars (e.g. {escape(example)}): vggtctl deletes only regular files; remove them by hand."
        )
    if plan.unreachable_left:
        path, reason = plan.unreachable_left[0]
        render.out.print(
            f"Kept {render.count(len(plan.unreachable_left), 'sidecar')} whose image or a history frame "
            "cannot be reached (e.g. "
            f"{escape(audit_view.shown_path(plan.root, path))}: {escape(reason)}): no prune "
            "category deletes them; they are valid again once the image's source is back."
        )


def _ask_categories(report: AuditReport, *, has_model: bool) -> list[str]:
    """Offer the categories found (counts, sizes) and read the choice from the terminal."""
    from rich.prompt import Prompt

    from vggtctl.cli import render
    from vggtctl.prune import CATEGORY_HELP, found_categories

    found = found_categories(report)
    if not found:
        render.out.print(
            "Nothing to prune: every sidecar is valid." if has_model else "Nothing to prune found."
        )
        return []
    # what `valid` means, before a category like --model-changed is picked
    render.err.print(f"Checked against: {report.expectation}", markup=False, soft_wrap=True)
    table = render.table(show_edge=False, pad_edge=False, title="Found", title_justify="left")
    for column, justify in (
        ("#", "right"),
        ("Category", "left"),
        ("Files", "right"),
        ("Size", "right"),
        ("Meaning", "left"),
    ):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    for number, total in enumerate(found, 1):
        table.add_row(
            str(number), f"--{total.name}", f"{total.files:,}", total.bytes_str, CATEGORY_HELP[total.name]
        )
    render.err.print(table)
    names = [t.name for t in found]
    while True:
        answer = Prompt.ask(
            "Prune which? numbers or names, comma-separated; 'all'; empty to cancel",
            console=render.err,
            default="",
            show_default=False,
        ).strip()
        if not answer:
            return []
        picked = _parse_choice(answer, names)
        if picked:
            return picked
        render.err.print(f"Not understood: {answer!r}. Choose from 1-{len(names)} or {', '.join(names)}.")


def _parse_choice(answer: str, names: list[str]) -> list[str]:
    if answer.lower() == "all":
        return list(names)
    picked: list[str] = []
    for token in answer.replace(" ", ",").split(","):
        token = token.strip().removeprefix("--")
        if not token:
            continue
        if token.isascii() and token.isdigit() and 1 <= int(token) <= len(names):  # not '²' or '١'
            picked.append(names[int(token) - 1])
        elif token in names:
            picked.append(token)
        else:
            return []
    return list(dict.fromkeys(picked))


def _confirm(question: str) -> bool:
    from rich.prompt import Confirm

    from vggtctl.cli import render

    return Confirm.ask(question, console=render.err, default=False)
