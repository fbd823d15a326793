"""Typer command layer: parse options, call one library function, render."""
