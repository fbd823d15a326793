"""One parallel walk of a data root (DESIGN §8): threads over `os.scandir`, every relevant file
stat'ed exactly once, directory symlinks never followed, unreadable folders reported not fatal.

`walk` streams one `DirListing` per folder so consumers (status, audit, prune) can work on a
10^7-file tree without holding it; `summarize` folds the listings into per-directory rows.
"""

from __future__ import annotations

import os
import queue
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from vggtctl.sidecar import SUFFIX, is_sidecar_name, is_temp_name

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp"})
PRIVATE_DIR = ".vggtctl"  # run state (failures, claims) inside a data root; never scanned


def is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def default_workers() -> int:
    """Threads for metadata I/O: NFS latency, not CPU, is the limit, so go well past the cores."""
    return min(32, 4 * (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 2))


@dataclass
class DirListing:
    """One folder: its images, sidecars and temp files with their stat results."""

    path: str
    images: dict[str, os.stat_result] = field(default_factory=dict)
    sidecars: dict[str, os.stat_result] = field(default_factory=dict)
    temps: dict[str, os.stat_result] = field(default_factory=dict)
    subdirs: list[str] = field(default_factory=list)
    symlinked_dirs: list[str] = field(default_factory=list)
    error: str | None = None

    def image_of(self, sidecar_name: str) -> str:
        return sidecar_name[: -len(SUFFIX)]

    def orphans(self) -> list[str]:
        """Sidecars whose image is not in this folder."""
        return [name for name in self.sidecars if self.image_of(name) not in self.images]

    def stat_lookup(self) -> Callable[[str], os.stat_result | None]:
        """A stat function answering from this listing for files in this folder."""
        folder = self.path

        def lookup(path: str) -> os.stat_result | None:
            head, name = os.path.split(path)
            if os.path.normpath(head) == os.path.normpath(folder):
                return self.images.get(name)
            try:
                return os.stat(path)
            except OSError:
                return None

        return lookup


def list_dir(path: str) -> DirListing:
    """Scan one folder. Images are stat'ed through symlinks (datasets link images); our own
    files are stat'ed without following, so nothing is ever judged through a link."""
    listing = DirListing(path)
    try:
        with os.scandir(path) as entries:
            for entry in entries:
                name = entry.name
                try:
                    if entry.is_dir(follow_symlinks=False):
                        if name != PRIVATE_DIR:
                            listing.subdirs.append(entry.path)
                    elif entry.is_symlink() and entry.is_dir():
                        listing.symlinked_dirs.append(entry.path)
                    elif is_sidecar_name(name):
                        listing.sidecars[name] = entry.stat(follow_symlinks=False)
                    elif is_temp_name(name):
                        listing.temps[name] = entry.stat(follow_symlinks=False)
                    elif is_image_name(name):
                        listing.images[name] = entry.stat()
                except FileNotFoundError:
                    continue  # vanished between readdir and stat, or a dangling link
    except OSError as err:
        listing.error = f"{path}: {err.strerror or err}"
    return listing


def walk(root: str | os.PathLike[str], workers: int | None = None) -> Iterator[DirListing]:
    """Yield a DirListing per folder under `root` (root included), in no particular order."""
    results: queue.Queue[DirListing | BaseException] = queue.Queue()

    def task(path: str) -> None:
        try:
            results.put(list_dir(path))
        except BaseException as err:  # surface bugs instead of hanging the walk
            results.put(err)

    with ThreadPoolExecutor(max_workers=workers or default_workers(), thread_name_prefix="scan") as pool:
        pool.submit(task, os.fspath(root))
        outstanding = 1
        while outstanding:
            item = results.get()
            outstanding -= 1
            if isinstance(item, BaseException):
                raise item
            for sub in item.subdirs:
                outstanding += 1
                pool.submit(task, sub)
            yield item


# --------------------------------------------------------------------------- summaries


@dataclass
class DirStats:
    """Aggregates of one row of `vggtctl status` (a folder at the chosen depth)."""

    name: str
    folders: int = 0
    images: int = 0
    cached: int = 0
    orphans: int = 0
    temps: int = 0
    image_bytes: int = 0
    image_disk: int = 0
    sidecar_bytes: int = 0
    sidecar_disk: int = 0
    temp_bytes: int = 0

    @property
    def missing(self) -> int:
        return self.images - self.cached

    @property
    def coverage(self) -> float:
        return self.cached / self.images if self.images else 1.0

    def add(self, other: DirStats) -> None:
        for attr in (
            "folders",
            "images",
            "cached",
            "orphans",
            "temps",
            "image_bytes",
            "image_disk",
            "sidecar_bytes",
            "sidecar_disk",
            "temp_bytes",
        ):
            setattr(self, attr, getattr(self, attr) + getattr(other, attr))

    def to_dict(self) -> dict[str, object]:
        data = {k: v for k, v in self.__dict__.items()}
        data.update(missing=self.missing, coverage=round(self.coverage, 6))
        return data


@dataclass
class ScanSummary:
    root: str
    depth: int
    rows: dict[str, DirStats]
    total: DirStats
    unreadable: list[str]
    symlinked_dirs: list[str]


def _disk(st: os.stat_result) -> int:
    return getattr(st, "st_blocks", 0) * 512 or st.st_size


def group_of(root: str, folder: str, depth: int) -> str:
    """The row a folder belongs to: its first `depth` path components under root ('.' = root)."""
    rel = os.path.relpath(folder, root)
    if rel == "." or depth <= 0:
        return "."
    return "/".join(rel.split(os.sep)[:depth])


def listing_stats(listing: DirListing, name: str) -> DirStats:
    stats = DirStats(name=name, folders=1)
    stats.images = len(listing.images)
    for st in listing.images.values():
        stats.image_bytes += st.st_size
        stats.image_disk += _disk(st)
    for sidecar_name, st in listing.sidecars.items():
        if listing.image_of(sidecar_name) in listing.images:
            stats.cached += 1
        else:
            stats.orphans += 1
        stats.sidecar_bytes += st.st_size
        stats.sidecar_disk += _disk(st)
    stats.temps = len(listing.temps)
    stats.temp_bytes = sum(st.st_size for st in listing.temps.values())
    return stats


def summarize(
    root: str | os.PathLike[str],
    depth: int = 1,
    workers: int | None = None,
    on_listing: Callable[[DirListing], None] | None = None,
) -> ScanSummary:
    """Walk once and aggregate per row; `on_listing` sees every folder (e.g. for deep checks)."""
    root = os.fspath(root)
    rows: dict[str, DirStats] = {}
    unreadable: list[str] = []
    symlinked: list[str] = []
    for listing in walk(root, workers):
        if listing.error:
            unreadable.append(listing.error)
        symlinked.extend(listing.symlinked_dirs)
        name = group_of(root, listing.path, depth)
        row = rows.get(name)
        if row is None:
            row = rows[name] = DirStats(name=name, folders=0)
        row.add(listing_stats(listing, name))
        if on_listing is not None:
            on_listing(listing)
    total = DirStats(name="total", folders=0)
    for row in rows.values():
        total.add(row)
    return ScanSummary(root, depth, dict(sorted(rows.items())), total, sorted(unreadable), sorted(symlinked))
