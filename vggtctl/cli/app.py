"""The root Typer app: global options and one sub-module per command."""

from __future__ import annotations

import contextlib
import inspect

import typer

from vggtctl import __version__
from vggtctl.cli import demo, precompute, prune, status, train, verify
from vggtctl.cli.helptext import first_sentence, reflow

app = typer.Typer(
    name="vggtctl",
    help=(
        "Operations console for precomputed VGGT feature caches.\n\n"
        "Examples:\n\n"
        "  vggtctl status /data/train\n\n"
        "  vggtctl verify /data/train --quick\n\n"
        "  vggtctl prune --model-changed\n\n"
        "  vggtctl precompute /data/train --vggt-model facebook/VGGT-1B\n\n"
        "  vggtctl train --nodes 2    (inside a 2-node Slurm allocation; elsewhere add "
        "--master-addr HOST, and --node-rank 1 on the second node)"
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"vggtctl {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Operations console for precomputed VGGT feature caches."""


for module in (precompute, status, verify, prune, train, demo):
    module.register(app)

for info in app.registered_commands:
    text = info.help or inspect.getdoc(info.callback) or ""
    info.help = reflow(text)
    info.short_help = info.short_help or first_sentence(text)


def _usage_error_line(error: Exception) -> None:
    """A usage error (unknown option, bad value) as one line on stderr, like every other error
    of the tool, instead of Typer's framed panel: it reaches logs and `grep` whole. Exit code 2
    stays Click's."""
    if type(error).__name__ == "NoArgsIsHelpError":  # the help was printed: nothing to add
        return
    from vggtctl.cli import render

    ctx = getattr(error, "ctx", None)
    message = " ".join(str(error.format_message()).split()).replace("Value error, ", "")  # type: ignore[attr-defined]
    where = f"{ctx.command_path}: " if ctx is not None else ""
    # some errors come without a context (an option missing its value): the root's help then
    hint = f" (see {ctx.command_path if ctx is not None else 'vggtctl'} --help)"
    render.err.print(f"error: {where}{message}{hint}", markup=False, highlight=False, soft_wrap=True)


def _use_one_line_usage_errors() -> None:
    """Typer prints Click's usage errors through `rich_utils.rich_format_error`; where this Typer
    has it, ours takes its place (an older or newer Typer without it keeps its own format)."""
    with contextlib.suppress(ImportError):
        from typer import rich_utils

        if hasattr(rich_utils, "rich_format_error"):
            rich_utils.rich_format_error = _usage_error_line


_use_one_line_usage_errors()


def main() -> None:
    app()
