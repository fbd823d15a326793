"""SidecarWriter.close under Ctrl-C: the counts a run reads after close() must be final."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import torch

from vggtctl import sidecar
from vggtctl.writer import SidecarWriter


def _interrupt_while_closing(
    writer: SidecarWriter, in_close: threading.Event, then: threading.Semaphore, n: int
):
    """From another thread: once the main thread is inside close(), send it `n` SIGINTs, then
    let the blocked writes go on."""

    def send() -> None:
        in_close.wait(30)
        for _ in range(n):
            time.sleep(0.2)  # the main thread is waiting in close() by now
            os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.2)
        then.release(8)

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("interrupts", [1, 2])
def test_a_ctrl_c_in_close_waits_for_the_writes_it_started(monkeypatch, caplog, interrupts):
    """Ctrl-C while close() waits: the write already running ends and is reported before the
    interrupt surfaces; the queued one is written after one Ctrl-C and dropped after two."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    gate = threading.Semaphore(0)
    running = threading.Event()

    def blocked_write(path, features, meta, fsync=False):
        running.set()
        gate.acquire()
        return 7

    monkeypatch.setattr(sidecar, "write", blocked_write)
    done: list[str] = []
    writer = SidecarWriter(lambda token, nbytes, error: done.append(token), threads=1)
    rows = torch.zeros(2, 4)
    writer.submit("a", rows[0].clone(), {}, "started")
    writer.submit("b", rows[1].clone(), {}, "queued")
    assert running.wait(30)
    in_close = threading.Event()
    sender = _interrupt_while_closing(writer, in_close, gate, interrupts)
    in_close.set()
    reported: list[str] = []
    try:
        writer.close()
    except KeyboardInterrupt:
        reported = list(done)  # what the run would count, read right after close()
    sender.join(30)
    assert reported == (["started", "queued"] if interrupts == 1 else ["started"])
    said = [r.getMessage() for r in caplog.records if r.name == "vggtctl"]
    assert said[0].startswith("finishing ") and "Ctrl-C again drops those not started" in said[0]
    assert len(said) == interrupts
