"""`vggtctl demo [DIR]`: the whole loop on a generated dataset, CPU only, under a minute."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from vggtctl.cli import render


def register(app: typer.Typer) -> None:
    @app.command("demo")
    def command(
        directory: Path = typer.Argument(Path("demo-data"), help="Where to generate the demo dataset."),
        episodes: int = typer.Option(3, "--episodes", min=1, help="Episodes to generate."),
        steps: int = typer.Option(6, "--steps", min=1, help="Frames per episode."),
        max_history: int = typer.Option(3, "--max-history", min=0, help="History frames per item."),
    ) -> None:
        """Generate a small synthetic episodes dataset, precompute it with the built-in
        `tiny-random` model on the CPU, then show `status`. DIR must be new, empty, or a
        demo made before: the demo never runs over real data.

        tiny-random has seeded random weights: its features are meaningless and only show the
        machinery. Rerunning the demo resumes (nothing left to encode).

        Example:

          vggtctl demo demo-data && vggtctl verify demo-data --recompute 3
        """
        from vggtctl.cli.precompute import RichReporter, _summary_table
        from vggtctl.cli.status import run as status_run
        from vggtctl.cli.status import show as status_show
        from vggtctl.demo import prepare_demo_root
        from vggtctl.precompute import PrecomputeOptions, run

        with render.command_errors():
            paths = prepare_demo_root(directory, episodes, steps)
        if paths:
            render.err.print(
                f"generated {render.count(len(paths), 'frame')} in {render.count(episodes, 'episode')} "
                f"under {directory}"
            )
        opts = PrecomputeOptions(
            root=directory,
            vggt_model="tiny-random",
            preset="janusvln",
            max_history=max_history,
            device="cpu",
        )
        render.err.print("precompute with tiny-random (seeded random weights: features are meaningless)")
        with render.command_errors("interrupted; rerun `vggtctl demo` to resume"):
            outcome = run(opts, RichReporter(enabled=sys.stderr.isatty()))
            render.out.print(_summary_table(outcome, directory))
            status_show(status_run(directory, 1, "name", None, None, None, True, None))
        render.out.print(
            f"next: vggtctl verify {directory} --recompute 3   ·   vggtctl prune {directory} --dry-run --all-invalid",
            soft_wrap=True,
        )
        if outcome.failed:
            raise typer.Exit(3)
