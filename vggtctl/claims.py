"""Chunk claims: how independent `precompute` processes share one data root without encoding
an item twice.

Items are cut into fixed chunks of the full catalog order, so every process sees the same
chunks. A process claims a chunk by creating `<root>/.vggtctl/claims/<chunk>.claim` with
O_CREAT|O_EXCL (atomic on local disks and NFSv3+), encodes it, and removes the claim. A claim
whose owner died (same host, pid gone) or whose heartbeat is older than the TTL is taken over,
so a killed run never blocks a rerun.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import time
from pathlib import Path

from vggtctl.scan import PRIVATE_DIR

DEFAULT_TTL_S = 15 * 60


def claims_dir(root: str | os.PathLike[str]) -> Path:
    return Path(root) / PRIVATE_DIR / "claims"


def chunk_id(key_fingerprint: str, first_item: str, index: int) -> str:
    return hashlib.sha1(f"{key_fingerprint}|{index}|{first_item}".encode()).hexdigest()[:20]


class ClaimBook:
    """Claims held by this process; `release_all` on every exit path."""

    def __init__(self, root: str | os.PathLike[str], ttl_s: float = DEFAULT_TTL_S) -> None:
        self.dir = claims_dir(root)
        self.ttl_s = ttl_s
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self.held: set[str] = set()
        self.dir.mkdir(parents=True, exist_ok=True)

    def _path(self, chunk: str) -> Path:
        return self.dir / f"{chunk}.claim"

    def try_claim(self, chunk: str) -> bool:
        path = self._path(chunk)
        for _ in range(2):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if not self._take_over_if_dead(path):
                    return False
                continue
            with os.fdopen(fd, "w") as fh:
                json.dump({"host": self.host, "pid": self.pid, "time": time.time()}, fh)
            self.held.add(chunk)
            return True
        return False

    def _take_over_if_dead(self, path: Path) -> bool:
        try:
            owner = json.loads(path.read_text() or "{}")
            age = time.time() - path.stat().st_mtime
        except (OSError, ValueError):
            return False
        dead = False
        if owner.get("host") == self.host and isinstance(owner.get("pid"), int):
            dead = owner["pid"] != self.pid and not _pid_alive(owner["pid"])
        if dead or age > self.ttl_s:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            return True
        return False

    def heartbeat(self) -> None:
        """Refresh the mtime of held claims so other hosts see them as alive."""
        for chunk in list(self.held):
            with contextlib.suppress(OSError):
                os.utime(self._path(chunk))

    def release(self, chunk: str) -> None:
        if chunk in self.held:
            self.held.discard(chunk)
            with contextlib.suppress(FileNotFoundError):
                self._path(chunk).unlink()

    def release_all(self) -> None:
        for chunk in list(self.held):
            self.release(chunk)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
