"""Output conventions (DESIGN §7): tables on stdout, progress/logs on stderr, --json alone on
stdout, plain output for NO_COLOR and non-TTY, errors as one line with a meaningful exit code."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, NoReturn

import humanize
import typer
from rich.console import Console
from rich.markup import escape

from vggtctl.errors import EXIT_INTERRUPTED, VggtctlError
from vggtctl.wording import count as count  # re-exported: commands say render.count

if TYPE_CHECKING:
    from rich.table import Table


def _color_allowed() -> bool:
    return "NO_COLOR" not in os.environ


# Piped into a file or a log, Rich would lay out for 80 columns: table cells wrap, long paths
# are cut with an ellipsis, and one error becomes two lines. Off a terminal, lines are as long
# as their content (COLUMNS, when set, still decides).
PIPED_WIDTH = 4096


def _width(stream: Any) -> int | None:
    if "COLUMNS" in os.environ:
        return None
    try:
        return None if stream.isatty() else PIPED_WIDTH
    except (AttributeError, ValueError):  # a closed or unusual stream
        return PIPED_WIDTH


out = Console(no_color=not _color_allowed(), highlight=False, soft_wrap=False, width=_width(sys.stdout))
err = Console(stderr=True, no_color=not _color_allowed(), highlight=False, width=_width(sys.stderr))


def plain() -> bool:
    """NO_COLOR, or stdout is not a terminal (a pipe, a file, a log): plain output."""
    return not _color_allowed() or not out.is_terminal


def table(**options: Any) -> Table:
    """A Rich table that is plain text where the output is: no box-drawing characters in a log
    or a grep, columns separated by spaces; boxed in a terminal."""
    from rich.table import Table

    if plain():
        options.update(box=None, show_edge=False, pad_edge=False)
    return Table(**options)


def print_json(document: Any) -> None:
    """One JSON document on stdout and nothing else."""
    sys.stdout.write(json.dumps(document, indent=2, default=str) + "\n")
    sys.stdout.flush()


def size(nbytes: int | float) -> str:
    return humanize.naturalsize(nbytes, binary=True)


def duration(seconds: float) -> str:
    return humanize.precisedelta(seconds, minimum_unit="seconds", format="%0.0f")


def fail(error: VggtctlError | str, code: int | None = None) -> NoReturn:
    """Print a one-line error on stderr and exit with its code."""
    message = str(error)
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    exit_code = code if code is not None else getattr(error, "exit_code", 2)
    raise typer.Exit(exit_code)


@contextlib.contextmanager
def command_errors(interrupted: str = "interrupted", *, as_json: bool = False) -> Iterator[None]:
    """The error convention of every command: a VggtctlError is one line on stderr with its
    exit code; Ctrl-C prints `interrupted` and exits 130 (with `--json`, stdout still gets its
    one document: `{"interrupted": true}`)."""
    try:
        yield
    except VggtctlError as error:
        fail(error)
    except KeyboardInterrupt:
        if as_json:
            print_json({"interrupted": True, "exit_code": EXIT_INTERRUPTED})
        err.print(interrupted, markup=False)
        raise typer.Exit(EXIT_INTERRUPTED) from None


def results_are_final() -> None:
    """From here on the command only reports work that is done and recorded: a Ctrl-C now would
    turn the exit code into 130 next to a result that says the run completed. SIGINT is ignored
    until the process exits."""
    with contextlib.suppress(ValueError):  # not the main thread (an embedding test runner)
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def is_interactive() -> bool:
    return sys.stdin.isatty() and sys.stdout.isatty()
