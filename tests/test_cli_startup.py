"""The console starts without importing torch: a plain `status` or `--help` must not pay ~1.5 s."""

from __future__ import annotations

import subprocess
import sys


def test_importing_the_app_does_not_import_torch():
    code = "import sys, vggtctl.cli.app; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_help_lists_every_command():
    out = subprocess.run(
        [sys.executable, "-m", "vggtctl", "--help"], capture_output=True, text=True, check=True, env=None
    )
    for command in ("precompute", "status", "verify", "prune", "train", "demo"):
        assert command in out.stdout
