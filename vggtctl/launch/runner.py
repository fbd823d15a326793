"""Run torchrun as a child: stream its output to the terminal and a log file, forward signals.

The child gets its own session, so a Ctrl-C in the terminal reaches it once (through us)
instead of twice; a second Ctrl-C escalates to SIGTERM, a third to SIGKILL of the whole
process group. The exit code is the child's (128 + N when a signal N ended it).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import BinaryIO

_CHUNK = 64 * 1024


def log_path_for(log_dir: str | os.PathLike[str], node_rank: int, now: float | None = None) -> Path:
    stamp = time.strftime("%Y%m%d_%H%M%S", time.localtime(now))
    return Path(log_dir) / f"train_{stamp}_node{node_rank}.log"


def _pump(source: BinaryIO, sink: BinaryIO, log: BinaryIO, lock: threading.Lock) -> None:
    """Copy chunks as they arrive (progress bars with \\r keep flowing), to terminal and log."""
    fd = source.fileno()
    while True:
        try:
            chunk = os.read(fd, _CHUNK)
        except OSError:
            break
        if not chunk:
            break
        with contextlib.suppress(OSError, ValueError):
            sink.write(chunk)
            sink.flush()
        with lock:
            log.write(chunk)
            log.flush()


def run_child(
    argv: Sequence[str],
    env: Mapping[str, str] | None,
    log_path: str | os.PathLike[str],
    *,
    header: Sequence[str] = (),
    stdout: BinaryIO | None = None,
    stderr: BinaryIO | None = None,
) -> int:
    """Run `argv`, tee its stdout/stderr into `log_path`, forward SIGINT/SIGTERM; its exit code."""
    out = stdout if stdout is not None else sys.stdout.buffer
    err = stderr if stderr is not None else sys.stderr.buffer
    path = Path(log_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = threading.Lock()
    with open(path, "ab") as log:
        for line in header:
            log.write(f"# {line}\n".encode())
        log.flush()
        proc = subprocess.Popen(
            list(argv),
            env=dict(env) if env is not None else None,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        assert proc.stdout is not None and proc.stderr is not None
        pumps = [
            threading.Thread(target=_pump, args=(proc.stdout, out, log, lock), daemon=True),
            threading.Thread(target=_pump, args=(proc.stderr, err, log, lock), daemon=True),
        ]
        for pump in pumps:
            pump.start()
        with _forward_signals(proc):
            code = proc.wait()
        for pump in pumps:
            pump.join()
        with lock:
            log.write(f"# exit code {code}\n".encode())
    return code if code >= 0 else 128 - code


@contextlib.contextmanager
def _forward_signals(proc: subprocess.Popen[bytes]):  # type: ignore[no-untyped-def]
    """While the child runs, our SIGINT/SIGTERM go to it (escalating when repeated)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = 0

    def forward(signum: int, _frame: object) -> None:
        nonlocal received
        received += 1
        with contextlib.suppress(ProcessLookupError):
            if received == 1:
                os.kill(proc.pid, signum)
            elif received == 2:
                os.kill(proc.pid, signal.SIGTERM)
            else:
                os.killpg(proc.pid, signal.SIGKILL)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
