"""A names-only walk for catalogs: the same folder rules as `vggtctl.scan`, without the stats.

A catalog needs file names, not sizes: on a 10^6-image NFS root every avoided stat counts, so
regular files are never stat'ed here. Only symlinks are (to skip dangling links and linked
folders exactly as `scan.list_dir` does).
"""

from __future__ import annotations

import os
import queue
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from vggtctl.names import is_sidecar_name, is_temp_name
from vggtctl.scan import PRIVATE_DIR, default_workers, is_image_name


@dataclass
class NameListing:
    """One folder: image names, other file names (not ours), subfolders, and a read error."""

    path: str
    images: list[str] = field(default_factory=list)
    others: list[str] = field(default_factory=list)
    subdirs: list[str] = field(default_factory=list)
    error: str | None = None


def list_names(path: str) -> NameListing:
    listing = NameListing(path)
    try:
        with os.scandir(path) as entries:
            for entry in entries:
                name = entry.name
                try:
                    if entry.is_dir(follow_symlinks=False):
                        if name != PRIVATE_DIR:
                            listing.subdirs.append(entry.path)
                        continue
                    if entry.is_symlink():
                        if entry.is_dir():
                            continue  # linked folders are never followed (same as scan)
                        entry.stat()  # raises for a dangling link
                except FileNotFoundError:
                    continue
                if is_sidecar_name(name) or is_temp_name(name):
                    continue
                (listing.images if is_image_name(name) else listing.others).append(name)
    except OSError as err:
        listing.error = f"{path}: {err.strerror or err}"
    return listing


def walk_names(root: str, workers: int | None = None) -> Iterator[NameListing]:
    """Yield a NameListing per folder under `root` (root included), in no particular order."""
    results: queue.Queue[NameListing | BaseException] = queue.Queue()

    def task(path: str) -> None:
        try:
            results.put(list_names(path))
        except BaseException as err:  # surface bugs instead of hanging the walk
            results.put(err)

    with ThreadPoolExecutor(max_workers=workers or default_workers(), thread_name_prefix="catalog") as pool:
        pool.submit(task, root)
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
