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


def recompute_options(root: str, vggt_model: str | None):  # -> PrecomputeOptions
    """The settings `--recompute` runs with. The model is resolved here, before the audit's long
    pass: a recorded checkpoint that moved fails in seconds, and the error says the path came
    from the manifest (where a user who never typed it would not look)."""
    from vggtctl.errors import CheckpointError
    from vggtctl.keys import is_random_model_name
    from vggtctl.model.checkpoint import resolve_weights
    from vggtctl.recompute import options_from_manifest

    opts = options_from_manifest(Path(root), vggt_model, None)
    if vggt_model is None and opts.vggt_model and not is_random_model_name(opts.vggt_model):
        try:
            resolve_weights(opts.vggt_model, allow_download=False)
        except CheckpointError as err:
            raise CheckpointError(
                f"{err} (the model the manifest of {root} records for its last precompute run; "
                "pass --vggt-model to name where that checkpoint is now)"
            ) from None
    return opts


SHOWN_PATHS = 5


def recompute_remedy(root: str, report, vggt_model: str | None) -> list[str]:  # report: RecomputeReport
    """How to re-encode the sidecars a recompute found wrong, as lines to print: they pass the
    header check (image, model, preprocess and context as recorded), so `prune` keeps them and
    `precompute` skips them as valid; deleting them is what makes precompute encode them again."""
    import shlex

    bad = [check.path for check in report.problems]
    if not bad:
        return []
    command = precompute_command(root, vggt_model)
    shown = " ".join(shlex.quote(path) for path in bad[:SHOWN_PATHS])
    more = len(bad) - SHOWN_PATHS
    more_text = f"  # and {more} more: `--json` lists them (recompute.checks)" if more > 0 else ""
    them = "it" if len(bad) == 1 else "them"
    lines = [
        f"The header check passes {'this sidecar' if len(bad) == 1 else 'these sidecars'}, so "
        f"`vggtctl prune` keeps {them} and `vggtctl precompute` skips {them}. To re-encode "
        f"{them}, delete {them} and rerun precompute:",
        f"  rm -- {shown}{more_text}",
        f"  {command}",
        "or re-encode every item of the root: the same precompute command with --force.",
    ]
    return lines


def precompute_command(root: str, vggt_model: str | None) -> str:
    """The precompute command for the root's current key and recorded settings (as `train`'s
    preflight prints it), with `vggt_model` in place of the recorded model when given."""
    import shlex

    from vggtctl import manifest
    from vggtctl.launch.cache import CatalogSpec
    from vggtctl.launch.cache import precompute_command as command_for

    loaded = manifest.load(root)
    key, settings = loaded.current_key, loaded.last_run_settings() or {}
    if key is None:
        return f"vggtctl precompute {shlex.quote(root)} --vggt-model MODEL  # the settings that wrote them"
    if vggt_model:
        settings["vggt_model"] = vggt_model
    max_history = settings.get("max_history")
    spec = CatalogSpec(
        Path(root),
        str(settings.get("layout") or "auto"),
        tuple(str(a) for a in settings.get("annotations") or ()),
        max_history if isinstance(max_history, int) and not isinstance(max_history, bool) else None,
        settings.get("data_path") or None,
    )
    return command_for(spec, key, settings)


def recompute_table(report):  # -> rich.table.Table
    from vggtctl.cli import render

    table = render.table(title="recompute check")
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
    recompute_opts = recompute_options(root, vggt_model) if recompute else None
    if not audit.has_model_check(expect) and not as_json:
        render.err.print(f"note: {audit.describe(expect)}")
    # the history the manifest's layout streams (what training is served)
    history = audit.history_rule_from(root)
    report = audit_view.run_audit(
        root, expect, full=not quick, workers=workers, label="Verifying sidecars", history=history
    )
    rechecked = None
    if recompute and recompute_opts is not None:
        from vggtctl.recompute import recompute as recompute_items

        rechecked = recompute_items(recompute_opts, recompute)
    ok = report.ok and not (rechecked and rechecked.problems)
    code = EXIT_OK if ok else EXIT_PROBLEMS
    if as_json:
        document = {**report.to_json(), "ok": ok, "exit_code": code}
        if rechecked is not None:
            document["recompute"] = rechecked.to_json()
            if rechecked.problems:  # what the plain output prints: the command that re-encodes them
                document["recompute"]["reencode_after_deleting"] = precompute_command(root, vggt_model)
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
            for line in recompute_remedy(root, rechecked, vggt_model):  # commands: one line each
                render.out.print(line, markup=False, highlight=False, soft_wrap=True)
        if rechecked.skipped_not_valid:
            render.out.print(
                f"{rechecked.skipped_not_valid} sampled sidecars were not valid for the key and were "
                "not recomputed (the verdicts above count them)"
            )
    return code
