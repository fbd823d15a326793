"""Small helpers for the words around numbers in messages (no Rich, usable by the library)."""

from __future__ import annotations


def count(n: int, noun: str, plural: str | None = None) -> str:
    """`1 folder`, `2 folders`: a number with its noun in the right number."""
    return f"{n:,} {noun if n == 1 else plural or noun + 's'}"


def shown(path: str) -> str:
    """A path as printed: bytes that are not UTF-8 (surrogate-escaped in Python) as `\\xNN`,
    the same in every command, instead of replacement characters that cannot be typed back."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return path
