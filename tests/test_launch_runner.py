"""The child runner: output reaches the terminal and the log, exit codes pass through, and a
SIGTERM sent to vggtctl reaches the child (which runs in its own session)."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

from vggtctl.launch.runner import log_path_for, run_child


def test_exit_code_and_log(tmp_path: Path) -> None:
    code = (
        "import sys\nprint('line one')\nprint('line two', file=sys.stderr)\nprint('line three')\nsys.exit(3)"
    )
    out, err = io.BytesIO(), io.BytesIO()
    log = tmp_path / "logs" / "train.log"
    rc = run_child(
        [sys.executable, "-c", code], None, log, header=["started by a test"], stdout=out, stderr=err
    )
    assert rc == 3
    text = log.read_text()
    for line in ("# started by a test", "line one", "line two", "line three", "# exit code 3"):
        assert line in text
    assert out.getvalue().decode().splitlines() == ["line one", "line three"]
    assert err.getvalue().decode().splitlines() == ["line two"]


def test_a_child_killed_by_a_signal_gives_128_plus_n(tmp_path: Path) -> None:
    code = "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"
    rc = run_child(
        [sys.executable, "-c", code], None, tmp_path / "x.log", stdout=io.BytesIO(), stderr=io.BytesIO()
    )
    assert rc == 128 + signal.SIGKILL


def test_environment_is_passed(tmp_path: Path) -> None:
    out = io.BytesIO()
    env = {**os.environ, "VGGTCTL_TEST_VALUE": "forty-two"}
    code = "import os; print(os.environ['VGGTCTL_TEST_VALUE'])"
    assert (
        run_child([sys.executable, "-c", code], env, tmp_path / "e.log", stdout=out, stderr=io.BytesIO()) == 0
    )
    assert out.getvalue().strip() == b"forty-two"


def test_sigterm_is_forwarded_to_the_child(tmp_path: Path) -> None:
    child = tmp_path / "child.py"
    child.write_text(
        textwrap.dedent(
            """
            import signal, sys, time
            def bye(signum, frame):
                print("got SIGTERM", flush=True)
                sys.exit(7)
            signal.signal(signal.SIGTERM, bye)
            print("ready", flush=True)
            time.sleep(60)
            """
        )
    )
    log = tmp_path / "run.log"
    driver = (
        "import sys\nfrom vggtctl.launch.runner import run_child\n"
        f"sys.exit(run_child([sys.executable, {str(child)!r}], None, {str(log)!r}))"
    )
    proc = subprocess.Popen([sys.executable, "-c", driver], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 7
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "got SIGTERM" in log.read_text()


def test_log_name_has_time_and_node(tmp_path: Path) -> None:
    path = log_path_for(tmp_path, 1, now=0)
    assert path.parent == tmp_path
    assert path.name.startswith("train_") and path.name.endswith("_node1.log")
