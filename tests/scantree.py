"""Trees for scan/status tests whose counts are known by construction.

The scan only looks at names and stat results, so files here are plain bytes with image-like
names (no Pillow, no torch): fast enough to build a few hundred per test. Every expected figure
below is written down by hand from the layout, not computed by the code under test.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

SIDECAR = ".vggt_cache.pt"

# relative path -> size in bytes
FILES: dict[str, int] = {
    # directly in ROOT: the "." row
    "top.jpg": 10,
    "top.jpg" + SIDECAR: 100,
    # ep1: five images (mixed case and extensions), three cached, one orphan, one temp, clutter
    "ep1/0.jpg": 11,
    "ep1/1.jpg": 12,
    "ep1/2.JPG": 13,
    "ep1/3.png": 14,
    "ep1/4.webp": 15,
    "ep1/0.jpg" + SIDECAR: 100,
    "ep1/1.jpg" + SIDECAR: 100,
    "ep1/2.JPG" + SIDECAR: 100,
    "ep1/gone.jpg" + SIDECAR: 100,  # orphan: its image is not there
    "ep1/3.png" + SIDECAR + ".tmp-123-abcd0123": 7,  # temp debris
    "ep1/notes.txt": 5,  # not an image: never counted, never stat'ed
    "ep1/labels.json": 6,
    # ep1/sub: two images, one cached (depth 2 gives it its own row)
    "ep1/sub/s0.png": 20,
    "ep1/sub/s1.png": 21,
    "ep1/sub/s0.png" + SIDECAR: 100,
    # ep2: two images, none cached
    "ep2/0.jpg": 30,
    "ep2/1.jpg": 31,
    # run state of vggtctl: never scanned
    ".vggtctl/x.jpg": 1,
    ".vggtctl/x.jpg" + SIDECAR: 100,
}
EMPTY_DIRS = ("ep3",)
DIR_SYMLINKS = {"link_ep": "ep2"}  # a symlinked folder: not followed, its files not counted

# Expected rows at depth 1 (from the layout above).
ROWS_DEPTH1 = {
    ".": {"images": 1, "cached": 1, "orphans": 0, "temps": 0, "image_bytes": 10, "sidecar_bytes": 100},
    "ep1": {
        "images": 7,
        "cached": 4,
        "orphans": 1,
        "temps": 1,
        "image_bytes": 11 + 12 + 13 + 14 + 15 + 20 + 21,
        "sidecar_bytes": 500,
        "temp_bytes": 7,
    },
    "ep2": {"images": 2, "cached": 0, "orphans": 0, "temps": 0, "image_bytes": 61, "sidecar_bytes": 0},
    "ep3": {"images": 0, "cached": 0, "orphans": 0, "temps": 0, "image_bytes": 0, "sidecar_bytes": 0},
}
TOTAL = {
    "images": 10,
    "cached": 5,
    "orphans": 1,
    "temps": 1,
    "image_bytes": 10 + (11 + 12 + 13 + 14 + 15 + 20 + 21) + (30 + 31),
    "sidecar_bytes": 600,
}

# Files the scan must stat (exactly once each): images, sidecars, temps outside .vggtctl.
STATTED = {rel for rel in FILES if not rel.startswith(".vggtctl/") and not rel.endswith((".txt", ".json"))}


def write(path: Path, size: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)


def build(root: Path) -> Path:
    """The tree above under `root`."""
    for rel, size in FILES.items():
        write(root / rel, size)
    for rel in EMPTY_DIRS:
        (root / rel).mkdir(parents=True, exist_ok=True)
    for link, target in DIR_SYMLINKS.items():
        os.symlink(target, root / link, target_is_directory=True)
    return root


def build_wide(root: Path, episodes: int = 40) -> dict[str, int]:
    """Enough folders for the scan to hand subtrees to worker processes. Episode i holds
    i % 5 + 1 images, the first i % 3 of them cached (capped at the image count), and two
    nested levels. Returns the expected totals."""
    images = cached = 0
    for i in range(episodes):
        n = i % 5 + 1
        k = min(i % 3, n)
        for j in range(n):
            folder = root / f"ep{i:03d}" / ("a/b" if j % 2 else "")
            write(folder / f"{j}.jpg", j + 1)
            if j < k:
                write(folder / f"{j}.jpg{SIDECAR}", 50)
        images += n
        cached += k
    return {"images": images, "cached": cached}


def deny(monkeypatch: pytest.MonkeyPatch, folder: Path) -> None:
    """Make `folder` unreadable to this process even as root: refuse to open or list it."""
    denied = str(folder)
    real_open, real_scandir = os.open, os.scandir

    def fake_open(path, *args, **kwargs):  # type: ignore[no-untyped-def]
        if os.fspath(path) == denied:
            raise PermissionError(errno.EACCES, "Permission denied", denied)
        return real_open(path, *args, **kwargs)

    def fake_scandir(path="."):  # type: ignore[no-untyped-def]
        if not isinstance(path, int) and os.fspath(path) == denied:
            raise PermissionError(errno.EACCES, "Permission denied", denied)
        return real_scandir(path)

    monkeypatch.setattr(os, "open", fake_open)
    monkeypatch.setattr(os, "scandir", fake_scandir)


def wrapped_scandir(wrap):  # type: ignore[no-untyped-def]
    """A stand-in for `os.scandir` (monkeypatch it in) whose entries are `wrap(entry, folder)`:
    for tests that watch or break the stat calls a listing makes. Takes a path or a folder fd."""
    real_scandir = os.scandir

    class Listing:
        def __init__(self, target) -> None:  # type: ignore[no-untyped-def]
            if isinstance(target, int):  # scandir(fd): recover the folder's name
                self.folder = os.readlink(f"/proc/self/fd/{target}")
            else:
                self.folder = os.fspath(target)
            self._it = real_scandir(target)

        def __enter__(self):  # type: ignore[no-untyped-def]
            return self

        def __exit__(self, *exc) -> None:  # type: ignore[no-untyped-def]
            self._it.close()

        def __iter__(self):  # type: ignore[no-untyped-def]
            return (wrap(entry, self.folder) for entry in self._it)

    return Listing
