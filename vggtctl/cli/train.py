"""`vggtctl train`: launch a JanusVLN-style trainer (or the built-in probe) under torchrun.

Thin layer: options -> `build_plan` -> preflight table -> dry run / scripts / child process.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.markup import escape

from vggtctl.cli import render
from vggtctl.errors import EXIT_USAGE

if TYPE_CHECKING:
    from vggtctl.launch.plan import TrainPlan

HELP = """Launch training with the VGGT feature cache through torchrun, on one node or several
(typically 1 or 2 nodes of 8 GPUs; any count works the same way).

Everything after `--` goes to the trainer unchanged. Runbook: docs/multi-node.md.

Examples:

  vggtctl train --data-root /data/train -- --deepspeed ds.json

  vggtctl train --nodes 2 --node-rank 0 --master-addr 10.0.0.1

  srun --nodes 2 --ntasks-per-node 1 vggtctl train --nodes 2

  vggtctl train --nodes 2 --master-addr 10.0.0.1 --dry-run

  vggtctl train --nodes 2 --master-addr 10.0.0.1 --probe
"""

_STATUS_STYLE = {"ok": "green", "warn": "yellow", "fail": "bold red", "skip": "dim"}


def register(app: typer.Typer) -> None:
    @app.command(
        "train",
        help=HELP,
        # trainer arguments follow `--`; an unknown option before it is a typo, not a trainer flag
        context_settings={"allow_extra_args": True},
    )
    def command(
        ctx: typer.Context,
        nodes: int | None = typer.Option(
            None, "--nodes", help="Nodes in the job (typically 1 or 2; any count).", min=1
        ),
        node_rank: int | None = typer.Option(
            None, "--node-rank", help="This node's rank (0 = master).", min=0
        ),
        master_addr: str | None = typer.Option(
            None, "--master-addr", help="Address of node 0 every node reaches."
        ),
        master_port: int | None = typer.Option(
            None, "--master-port", help="Rendezvous port on node 0 (default: 29500)."
        ),
        gpus_per_node: int | None = typer.Option(
            None,
            "--gpus-per-node",
            help="Processes per node (default: 8 from the profile; 1 for --probe on CPU).",
            min=1,
        ),
        profile: str | None = typer.Option(
            None, "--profile", help="Launch profile name or .toml path (default: h800)."
        ),
        config: str | None = typer.Option(None, "--config", help="Settings file (default: ./vggtctl.toml)."),
        entry: str | None = typer.Option(
            None,
            "--entry",
            help="Trainer: `-m package.module` or a script (default: -m qwen_vl.train.train_vln).",
        ),
        cache: bool | None = typer.Option(
            None, "--cache/--no-cache", help="Use the precomputed features (USE_VGGT_CACHE) (default: on)."
        ),
        min_coverage: float | None = typer.Option(
            None,
            "--min-coverage",
            help="Fail unless this fraction of Items has a valid sidecar (default: 1.0).",
        ),
        log_dir: str | None = typer.Option(
            None, "--log-dir", help="Where train_<time>_node<R>.log goes (default: logs)."
        ),
        data_root: str | None = typer.Option(
            None, "--data-root", help="Training data root (sidecars, manifest)."
        ),
        data_path: str | None = typer.Option(
            None, "--data-path", help="Base folder for annotation paths, as for precompute."
        ),
        layout: str | None = typer.Option(
            None, "--layout", help="Catalog layout, as for precompute (default: auto)."
        ),
        annotations: list[str] | None = typer.Option(
            None, "--annotations", help="Annotation file(s) for the catalog."
        ),
        max_history: int | None = typer.Option(
            None, "--max-history", help="History frames per Item, as for precompute."
        ),
        feature_key: str | None = typer.Option(
            None,
            "--feature-key",
            help="Key JSON, a .json file or a sidecar (default: the manifest's current key).",
        ),
        cache_flag: str | None = typer.Option(
            None,
            "--cache-flag",
            help="Trainer flag switched on with the cache (default: --use_vggt_cache); '' for none.",
        ),
        dry_run: bool = typer.Option(
            False, "--dry-run", help="Print each node's environment and command; run nothing."
        ),
        emit_scripts: Path | None = typer.Option(
            None,
            "--emit-scripts",
            help="Write train_<profile>.sh and train_2node_<profile>.sh here; run nothing.",
        ),
        probe: bool = typer.Option(False, "--probe", help="Run the built-in probe instead of the trainer."),
        probe_samples: int | None = typer.Option(
            None, "--probe-samples", help="Items each rank reads (default: 256).", min=1
        ),
    ) -> None:
        from vggtctl.launch.plan import TrainOptions, build_plan

        options = TrainOptions(
            nodes=nodes,
            node_rank=node_rank,
            master_addr=master_addr,
            master_port=master_port,
            gpus_per_node=gpus_per_node,
            profile=profile,
            config=config,
            entry=entry,
            cache=cache,
            min_coverage=min_coverage,
            log_dir=log_dir,
            data_root=data_root,
            data_path=data_path,
            layout=layout,
            annotations=annotations or None,
            max_history=max_history,
            feature_key=feature_key,
            cache_flag=cache_flag,
            probe=probe,
            probe_samples=probe_samples,
            trainer_args=list(ctx.args),
        )
        with render.command_errors():
            plan = build_plan(options)
        for note in plan.notes:
            render.err.print(f"[yellow]note:[/] {escape(note)}")
        _print_settings(plan)
        if emit_scripts is not None:
            _emit(plan, emit_scripts)
            if not dry_run:
                raise typer.Exit(0)
        _launch(plan, dry_run=dry_run)


def _print_settings(plan: TrainPlan) -> None:
    table = render.table(title="effective settings", title_justify="left")
    table.add_column("setting")
    table.add_column("value", overflow="fold")
    table.add_column("source", style="dim")
    for setting in plan.settings:
        table.add_row(setting.name, escape(str(setting.value)), escape(setting.source))
    render.out.print(table)


def _emit(plan: TrainPlan, folder: Path) -> None:
    from vggtctl.launch.scripts import emit_scripts

    for path in emit_scripts(plan, folder):
        render.out.print(f"wrote {escape(str(path))}")


def _launch(plan: TrainPlan, *, dry_run: bool) -> None:
    from vggtctl.launch.preflight import run_preflight

    report = run_preflight(plan, dry_run=dry_run)
    table = render.table(title="preflight", title_justify="left")
    table.add_column("check")
    table.add_column("status")
    table.add_column("detail", overflow="fold")
    for check in report.checks:
        style = _STATUS_STYLE.get(check.status, "")
        table.add_row(check.name, f"[{style}]{check.status}[/]", escape(check.detail))
    render.out.print(table)
    fixes = [c for c in report.checks if c.fix]
    for check in fixes:
        # Plain write: a command must stay on one line to be pasted.
        sys.stdout.write(f"fix ({check.name}): {check.fix}\n")
    if dry_run:
        for cmd in plan.commands():
            here = " (this node)" if cmd.node_rank == plan.topology.node_rank else ""
            sys.stdout.write(f"\n# node {cmd.node_rank}{here}\n{cmd.shell()}\n")
    sys.stdout.flush()
    if not report.ok:
        names = ", ".join(c.name for c in report.failed)
        render.fail(f"preflight failed ({names}); nothing was started", EXIT_USAGE)
    if dry_run:
        raise typer.Exit(0)
    _run(plan)


def _run(plan: TrainPlan) -> None:
    from vggtctl import __version__
    from vggtctl.launch.runner import log_path_for, run_child

    cmd = plan.command()
    log_path = log_path_for(plan.log_dir, cmd.node_rank)
    render.err.print(f"log: {escape(str(log_path))}")
    header = [
        f"vggtctl {__version__} train, node {cmd.node_rank} of {plan.topology.nnodes}, "
        f"{time.strftime('%Y-%m-%d %H:%M:%S')}",
        *cmd.shell().splitlines(),
    ]
    code = run_child(cmd.argv, cmd.child_env(), log_path, header=header)
    if code:
        render.err.print(f"[bold red]torchrun exited with {code}[/]; log: {escape(str(log_path))}")
    raise typer.Exit(code)
