"""Chunk claims: how independent `precompute` processes share one data root without encoding
an item twice.

Items are cut into fixed chunks of the full catalog order, so every process sees the same
chunks. A process claims a chunk by creating `<root>/.vggtctl/claims/<chunk>.claim` with
O_CREAT|O_EXCL (atomic on local disks and NFSv3+), encodes it, and removes the claim.

A claim records who holds it: host name, kernel boot id, pid namespace, pid and the pid's start
time. A claim is taken over when its owner is provably dead (same host, boot and pid namespace,
and the pid is gone or now belongs to a process that started later: pids repeat, in containers
especially), or when its mtime is older than the TTL (owners on other hosts cannot be asked; a
live owner refreshes the mtime of its claims with `heartbeat`). So a killed run never blocks a
rerun for long.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import socket
import threading
import time
from pathlib import Path
from typing import Any

from vggtctl.scan import PRIVATE_DIR

DEFAULT_TTL_S = 15 * 60
HEARTBEAT_S = 30.0
_OPEN_BOOKS: set[str] = set()  # books of this process that may still hold claims


def claims_dir(root: str | os.PathLike[str]) -> Path:
    return Path(root) / PRIVATE_DIR / "claims"


def chunk_id(key_fingerprint: str, first_item: str, index: int, size: int = 64) -> str:
    """Names a chunk by the feature key, its position, its size and its first item, so processes
    with different catalogs or chunk sizes never mistake each other's chunks for their own."""
    text = f"{key_fingerprint}|{index}|{size}|{first_item}"
    return hashlib.sha1(text.encode()).hexdigest()[:20]


def _pid_namespace() -> str | None:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _boot_id() -> str | None:
    """The running kernel's boot id (Linux), None where there is none.

    Host name and pid namespace alone do not tell cloned VMs or containers from one image apart:
    both often report the same host name, and pid namespace inode numbers repeat across kernels
    (the initial namespace has the same one everywhere). Such a twin would look a live owner's
    pid up in its own process table and take a live claim over. The boot id is random per kernel
    boot, and a pid namespace's inode is unique within one running kernel, so (boot id, pid
    namespace) names one process table; containers on one kernel share the boot id and differ
    in the namespace. /etc/machine-id was not chosen, nor combined: cloned VM images and
    containers often share it (it is written once, into the image), so it does not separate the
    twins this is for, and it adds nothing where the boot ids differ. Claims written without a
    boot id (older versions, or a side that cannot read it) are judged as before.
    """
    try:
        with open("/proc/sys/kernel/random/boot_id") as fh:
            return fh.read().strip() or None
    except OSError:
        return None


def process_start(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux), None where unknown."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read()
    except OSError:
        return None
    # the command name (field 2) may hold spaces and parentheses: split after its last ')'
    fields = stat[stat.rfind(b")") + 2 :].split()
    try:
        return int(fields[19])  # field 22 of the full line
    except (IndexError, ValueError):
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def file_system_now_ns(root: str | os.PathLike[str]) -> int | None:
    """The time on the data root's file system's own clock (ns), None where it cannot be read.

    Files on NFS get their mtimes from the server; comparing them with this host's clock
    would be off by the clocks' skew. A file created there and stat'ed reads the server's.
    """
    folder = claims_dir(root)
    probe = folder / f".now-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.touch(exist_ok=False)
        return probe.stat().st_mtime_ns
    except OSError:
        return None
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()


def _put_back(aside: Path, path: Path, text: str | None) -> None:
    """Return a live claim moved aside by mistake to its name, unless someone claimed the chunk
    meanwhile (a hard link fails then). File systems without hard links get an exclusive create
    with the same content instead."""
    try:
        os.link(aside, path)
    except FileExistsError:
        pass
    except OSError:
        if text is not None:
            with contextlib.suppress(OSError):
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                with os.fdopen(fd, "w") as fh:
                    fh.write(text)
    with contextlib.suppress(OSError):
        aside.unlink()


class ClaimBook:
    """Claims held by this process; `release_all` on every exit path. Thread-safe: writer
    threads release chunks as their last item lands."""

    def __init__(self, root: str | os.PathLike[str], ttl_s: float = DEFAULT_TTL_S) -> None:
        self.dir = claims_dir(root)
        self.ttl_s = ttl_s
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self.owner = {
            "host": self.host,
            "boot_id": _boot_id(),
            "pidns": _pid_namespace(),
            "pid": self.pid,
            "start": process_start(self.pid),
            "book": secrets.token_hex(6),
        }
        self.held: set[str] = set()
        self.taken_over = 0
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._beating: threading.Thread | None = None
        self.dir.mkdir(parents=True, exist_ok=True)
        _OPEN_BOOKS.add(self.owner["book"])

    def _path(self, chunk: str) -> Path:
        return self.dir / f"{chunk}.claim"

    def try_claim(self, chunk: str) -> bool:
        """Claim `chunk` unless a live owner holds it."""
        path = self._path(chunk)
        for _ in range(2):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if not self._take_over_if_dead(path):
                    return False
                continue
            with self._lock:  # held from here: an interrupt below still gets it released
                self.held.add(chunk)
            try:
                with os.fdopen(fd, "w") as fh:
                    json.dump({**self.owner, "time": time.time()}, fh)
            except BaseException as err:
                # an empty claim left behind would read as "being written" to every other run
                # (and to a rerun) until the TTL: remove it
                with self._lock:
                    self.held.discard(chunk)
                with contextlib.suppress(OSError):
                    path.unlink()
                if isinstance(err, OSError):
                    raise OSError(err.errno, err.strerror, str(path)) from err
                raise
            return True
        return False

    def is_dead(self, owner: dict[str, Any], age_s: float) -> bool:
        """Whether a claim with this content and age may be taken over."""
        if age_s > self.ttl_s:
            return True
        same_process_space = owner.get("host") == self.host and owner.get("pidns") == self.owner["pidns"]
        boot, our_boot = owner.get("boot_id"), self.owner["boot_id"]
        if boot is not None and our_boot is not None and boot != our_boot:
            same_process_space = False  # a twin host (clone, container from one image)
        pid = owner.get("pid")
        if not same_process_space or not isinstance(pid, int):
            return False  # another host (or an unreadable claim being written): only the TTL decides
        if pid == self.pid and owner.get("start") == self.owner["start"]:
            # this very process: alive only while the book that wrote it is open
            return owner.get("book") not in _OPEN_BOOKS
        if not _pid_alive(pid):
            return True
        start = owner.get("start")
        return start is not None and process_start(pid) not in (None, start)

    def _take_over_if_dead(self, path: Path) -> bool:
        try:
            text = path.read_text()
            age = time.time() - path.stat().st_mtime
        except FileNotFoundError:
            return True  # released meanwhile: try the exclusive create again
        except OSError:
            return False
        try:
            owner = json.loads(text) if text else {}
        except ValueError:
            owner = {}
        if not isinstance(owner, dict) or not self.is_dead(owner, age):
            return False
        # Move the dead claim aside atomically, then make sure what we moved is the claim we
        # judged: a racing process may have taken it over and written its own in between.
        aside = path.with_name(f"{path.name}.stale-{self.pid}-{secrets.token_hex(4)}")
        try:
            os.rename(path, aside)
        except FileNotFoundError:
            return True
        except OSError:
            return False
        try:
            moved = aside.read_text()
        except OSError:
            moved = None
        if moved != text:
            _put_back(aside, path, moved)
            return False
        with contextlib.suppress(OSError):
            aside.unlink()
        self.taken_over += 1
        return True

    def _still_ours(self, chunk: str) -> bool:
        """Whether the claim file still names this book: a process stalled past the TTL may have
        lost its claims to another host, whose claims it must then neither refresh nor remove."""
        try:
            owner = json.loads(self._path(chunk).read_text())
        except (OSError, ValueError):
            return False
        return isinstance(owner, dict) and owner.get("book") == self.owner["book"]

    def heartbeat(self) -> None:
        """Refresh the mtime of held claims so other hosts see them as alive."""
        with self._lock:
            held = list(self.held)
        for chunk in held:
            if not self._still_ours(chunk):
                with self._lock:
                    self.held.discard(chunk)  # taken over: the new owner's claim is left alone
                continue
            with contextlib.suppress(OSError):
                os.utime(self._path(chunk))

    def keep_alive(self, interval_s: float = HEARTBEAT_S) -> None:
        """Refresh the held claims every `interval_s` on a thread of their own until
        `release_all`: the loop's own pauses (compiling a new shape, a slow final flush, a hung
        decode) must not let another host take live claims over."""
        if self._beating is not None:
            return

        def beat() -> None:
            while not self._closed.wait(interval_s):
                self.heartbeat()

        self._beating = threading.Thread(target=beat, name="vggtctl-claims", daemon=True)
        self._beating.start()

    def release(self, chunk: str) -> None:
        with self._lock:
            if chunk not in self.held:
                return
            self.held.discard(chunk)
        if self._still_ours(chunk):
            with contextlib.suppress(FileNotFoundError):
                self._path(chunk).unlink()

    def release_all(self) -> None:
        """Release every held claim; the book is closed afterwards (its leftovers are dead)."""
        with self._lock:
            held = list(self.held)
        self._closed.set()
        if self._beating is not None:
            self._beating.join()
        for chunk in held:
            self.release(chunk)
        _OPEN_BOOKS.discard(self.owner["book"])
