"""Claims and twin hosts: two cloned VMs or containers from one image may share the host name
and the pid namespace's inode number. Only the kernel boot id tells their process tables apart,
so neither may judge the other's claim by a pid lookup in its own table."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from vggtctl import claims

HERE = "11111111-2222-4333-8444-555555555555"  # this host's boot id, as the tests pretend
TWIN = "99999999-8888-4777-8666-555555555555"  # a clone's: same host name, same pid namespace


@pytest.fixture
def book(monkeypatch, tmp_path):
    """A claim book on a host whose boot id is HERE, whatever this machine's really is."""
    monkeypatch.setattr(claims, "_boot_id", lambda: HERE)
    yield claims.ClaimBook(tmp_path)


def _gone_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _owner(pid: int, boot_id: str | None, start: int | None = 1234) -> dict:
    """An owner record on this host name and pid namespace; boot_id None leaves the field out,
    as versions before it did."""
    owner = {
        "host": socket.gethostname(),
        "pidns": claims._pid_namespace(),
        "pid": pid,
        "start": start,
        "book": "0123456789ab",
        "time": time.time(),
    }
    if boot_id is not None:
        owner["boot_id"] = boot_id
    return owner


def test_claims_record_the_boot_id(book, tmp_path):
    assert book.try_claim("c")
    assert json.loads((claims.claims_dir(tmp_path) / "c.claim").read_text())["boot_id"] == HERE
    book.release_all()


def test_twin_claim_with_a_pid_unknown_here_waits_for_the_ttl(book, tmp_path):
    owner = _owner(_gone_pid(), TWIN)
    assert not book.is_dead(owner, age_s=0.0)
    assert not book.is_dead(owner, age_s=book.ttl_s - 1)
    assert book.is_dead(owner, age_s=book.ttl_s + 1)
    path = claims.claims_dir(tmp_path) / "c.claim"
    path.write_text(json.dumps(owner))
    assert not book.try_claim("c")
    assert json.loads(path.read_text()) == owner


def test_twin_claim_with_our_own_pid_and_start_is_not_ours(book):
    """Clones booted alike may even give their runs the same pid and start tick: the claim
    still belongs to the twin, not to a closed book of this process."""
    owner = _owner(os.getpid(), TWIN, start=claims.process_start(os.getpid()))
    assert not book.is_dead(owner, age_s=0.0)


def test_claim_from_this_boot_with_a_gone_pid_is_dead(book, tmp_path):
    owner = _owner(_gone_pid(), HERE)
    assert book.is_dead(owner, age_s=0.0)
    (claims.claims_dir(tmp_path) / "c.claim").write_text(json.dumps(owner))
    assert book.try_claim("c") and book.taken_over == 1
    book.release_all()


def test_claim_without_a_boot_id_is_judged_as_before(book):
    assert book.is_dead(_owner(_gone_pid(), None), age_s=0.0)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = _owner(sleeper.pid, None, start=claims.process_start(sleeper.pid))
        assert not book.is_dead(live, age_s=0.0)
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_boot_id_unreadable_here_keeps_the_old_rule(monkeypatch, tmp_path):
    monkeypatch.setattr(claims, "_boot_id", lambda: None)
    book = claims.ClaimBook(tmp_path)
    assert book.is_dead(_owner(_gone_pid(), TWIN), age_s=0.0)
