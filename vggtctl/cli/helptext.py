"""Help texts as written in the source, laid out for the terminal.

The command help is written in wrapped paragraphs; Typer's rich help keeps those line breaks,
so a paragraph broke mid-sentence at the source's width. Paragraphs of prose are joined into
one line each (the terminal wraps them); indented lines (examples) stay as written.
"""

from __future__ import annotations

import inspect
import re


def reflow(text: str) -> str:
    """Prose paragraphs joined into single lines; paragraphs with indented lines kept."""
    paragraphs = inspect.cleandoc(text).split("\n\n")
    laid_out = []
    for paragraph in paragraphs:
        lines = paragraph.split("\n")
        if any(line.startswith((" ", "\t")) for line in lines):
            laid_out.append(paragraph)
        else:
            laid_out.append(" ".join(line.strip() for line in lines))
    return "\n\n".join(laid_out)


def first_sentence(text: str) -> str:
    """The command list's one-line summary: the help's first sentence."""
    first = reflow(text).split("\n\n", 1)[0]
    end = re.search(r"\.\s+(?=[A-Z`])", first)  # not "e.g. each"
    return first if end is None else first[: end.start() + 1]
