"""`vggtctl verify`: read every sidecar in full and report what is not `valid` (exit 1 if any)."""

from __future__ import annotations

from pathlib import Path

import typer

from vggtctl.errors import EXIT_OK, EXIT_PROBLEMS

HELP = """Check every sidecar under ROOT: full read (tensor finite, shape matches its meta), image
freshness, model/preprocess/context against the current feature key.

The current model is --vggt-model, else the key recorded in ROOT/vggt_cache_manifest.json by
precompute; without either, no model check is made (the output says so).

Exit codes: 0 all valid, 1 problems found (anything not valid, legacy and temp files included,
or a folder or file that could not be read), 2 usage error, 130 interrupted.

Examples:

  vggtctl verify /data/train

  vggtctl verify /data/train --quick --json > report.json

  vggtctl verify /data/train --vggt-model /models/VGGT-1B
"""


def register(app: typer.Typer) -> None:
    @app.command("verify", help=HELP)
    def command(
        root: Path | None = typer.Argument(
            None,
            help="Data root (default: VGGTCTL_DATA_ROOT, vggtctl.toml data_root, or the working folder).",
        ),
        quick: bool = typer.Option(
            False, "--quick", help="Headers only: no tensor reads (like status --deep)."
        ),
        vggt_model: str | None = typer.Option(
            None, "--vggt-model", help="Checkpoint file/folder (or cached Hub id) that is current."
        ),
        workers: int | None = typer.Option(
            None, "--workers", min=1, help="I/O threads (default: 4 per core, max 32)."
        ),
        recompute: int | None = typer.Option(
            None,
            "--recompute",
            min=1,
            metavar="K",
            help="Also re-encode K random items with the model and compare with the cache.",
        ),
        as_json: bool = typer.Option(
            False, "--json", help="One JSON document on stdout: counts, bytes, every problem."
        ),
    ) -> None:
        from vggtctl.cli import render

        with render.command_errors(as_json=as_json):
            code = run(
                root,
                quick=quick,
                vggt_model=vggt_model,
                workers=workers,
                recompute=recompute,
                as_json=as_json,
            )
        raise typer.Exit(code)


def recompute_check(root: str, k: int, vggt_model: str | None):  # -> RecomputeReport
    """`--recompute K`: re-encode K random cached items with the settings of the last precompute
    run (from the manifest) and compare them element-wise with the stored features."""
    from vggtctl.recompute import options_from_manifest, recompute

    return recompute(options_from_manifest(Path(root), vggt_model, None), k)


def recompute_table(report):  # -> rich.table.Table
    from rich.table import Table

    table = Table(title="recompute check")
    for name in ("sidecar", "max abs diff", "cosine", "result"):
        table.add_column(name, justify="left" if name == "sidecar" else "right")
    for check in report.checks:
        diff = "-" if check.max_abs_diff is None else f"{check.max_abs_diff:.3g}"
        cosine = "-" if check.cosine is None else f"{check.cosine:.6f}"
        table.add_row(check.path, diff, cosine, "ok" if check.ok else f"MISMATCH {check.reason}")
    return table


def run(
    root_arg: Path | None,
    *,
    quick: bool,
    vggt_model: str | None,
    workers: int | None,
    recompute: int | None,
    as_json: bool,
) -> int:
    from vggtctl import audit, settings
    from vggtctl.cli import audit_view, render

    root = str(settings.resolve_data_root(root_arg))
    config = settings.find_config(root)
    settings.warn_unknown_keys(config, lambda line: render.err.print(line, markup=False, soft_wrap=True))
    workers = settings.as_int(settings.pick_setting("workers", workers, config, "verify"), minimum=1)
    expect = audit.expectation_from(root, vggt_model)
    if not audit.has_model_check(expect) and not as_json:
        render.err.print(f"note: {audit.describe(expect)}")
    # the history the manifest's layout streams (what training is served)
    history = audit.history_rule_from(root)
    report = audit_view.run_audit(
        root, expect, full=not quick, workers=workers, label="Verifying sidecars", history=history
    )
    rechecked = recompute_check(root, recompute, vggt_model) if recompute else None
    ok = report.ok and not (rechecked and rechecked.problems)
    code = EXIT_OK if ok else EXIT_PROBLEMS
    if as_json:
        document = {**report.to_json(), "ok": ok, "exit_code": code}
        if rechecked is not None:
            document["recompute"] = rechecked.to_json()
        render.print_json(document)
        return code
    mode = "header check" if quick else "full read"
    render.out.print(f"Verified {report.files:,} files under {root} ({mode}); images: {report.images:,}")
    render.out.print(f"Checked against: {report.expectation}")
    render.out.print(audit_view.verdict_table(report))
    audit_view.print_scan_warnings(report)
    specials = sum(1 for p in report.problems if p.special or p.link)  # never deleted by prune
    if report.ok:
        valid = report.count(audit.Verdict.VALID)
        said = {0: "No sidecars to check.", 1: "The one sidecar is valid."}
        render.out.print(f"[green]{said.get(valid, f'All {valid:,} sidecars are valid.')}[/]")
    else:
        kept = report.unreachable_images + specials
        render.out.print(
            f"[red]{render.count(report.problem_count, 'problem')}[/] in {render.count(report.files, 'file')}"
            + (f", {render.count(len(report.unreadable), 'unreadable path')}" if report.unreadable else "")
            + "; `--json` lists every path with its reason, `vggtctl prune` removes "
            + ("the others (below)." if kept else "them.")
        )
    if report.unreachable_images:
        render.out.print(
            f"Kept by `vggtctl prune`: {render.count(report.unreachable_images, 'sidecar')} whose image "
            "or a history frame is a dangling symbolic link (its source unmounted?) or cannot be "
            "read; they are valid again once the source is back."
        )
    if specials:
        render.out.print(
            f"Never deleted by `vggtctl prune`: {render.count(specials, 'file')} named like a sidecar "
            "but a symbolic link or a special file (socket, FIFO, device); remove them by hand."
        )
    if rechecked is not None:
        render.out.print(recompute_table(rechecked))
        if rechecked.problems:
            render.out.print(
                f"[red]{len(rechecked.problems)} of {len(rechecked.checks)} recomputed items differ[/]"
            )
        if rechecked.skipped_not_valid:
            render.out.print(
                f"{rechecked.skipped_not_valid} sampled sidecars were not valid for the key and were "
                "not recomputed (the verdicts above count them)"
            )
    return code
