"""`vggtctl demo` (placeholder until its issue lands)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    @app.command("demo")
    def command() -> None:
        """Not implemented yet."""
        raise typer.Exit(2)
