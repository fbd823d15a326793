"""Small helpers for the words around numbers in messages (no Rich, usable by the library)."""

from __future__ import annotations


def count(n: int, noun: str, plural: str | None = None) -> str:
    """`1 folder`, `2 folders`: a number with its noun in the right number."""
    return f"{n:,} {noun if n == 1 else plural or noun + 's'}"
