"""Shared fixtures: an isolated environment per test, tree builders, and a CLI runner."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

sys.path.insert(0, os.path.dirname(__file__))  # tests/treebuilder.py, importable from any test

import treebuilder


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """No user settings leak in: own fingerprint memo, no data root or feature key, no colour."""
    monkeypatch.setenv("VGGTCTL_CACHE_DIR", str(tmp_path_factory.mktemp("vggtctl-cache")))
    for name in list(os.environ):
        if name.startswith("VGGTCTL_") and name != "VGGTCTL_CACHE_DIR":
            monkeypatch.delenv(name)


@pytest.fixture(autouse=True)
def _signal_handlers_restored() -> Iterator[None]:
    """A command ignores Ctrl-C once its results are final, until its process exits; tests run
    many commands in one process, so each gets the handlers back."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


@pytest.fixture
def make_tree(tmp_path: Path) -> Callable[[Mapping[str, str]], treebuilder.Tree]:
    """`make_tree({"ep1/a.jpg": "valid", ...})` -> a Tree under tmp_path/data."""

    def build(spec: Mapping[str, str]) -> treebuilder.Tree:
        return treebuilder.make_tree(tmp_path / "data", spec)

    return build


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    """A checkpoint folder whose fingerprint is treebuilder.CURRENT_FINGERPRINT."""
    return treebuilder.checkpoint_dir(tmp_path)


@pytest.fixture
def cli_app() -> typer.Typer:
    """The verify and prune commands on an app of their own, so their tests do not depend on
    every other command importing; the installed-executable tests cover the real root app."""
    from vggtctl.cli import prune, verify

    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)

    @app.callback()
    def _root() -> None:
        """Test root."""

    verify.register(app)
    prune.register(app)
    return app


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture
def vggtctl_exe() -> Callable[..., subprocess.CompletedProcess[str]]:
    """Run the installed `vggtctl` console script (next to this interpreter) with NO_COLOR."""
    exe = Path(sys.executable).with_name("vggtctl")
    if not exe.exists():
        pytest.skip("the vggtctl console script is not installed next to this Python")

    def run(
        *args: str, env: Mapping[str, str] | None = None, stdin: str = ""
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(exe), *args],
            input=stdin,
            capture_output=True,
            text=True,
            env={**os.environ, "NO_COLOR": "1", **(env or {})},
            timeout=120,
        )

    return run
