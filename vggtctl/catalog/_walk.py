"""A names-only walk for catalogs: the same folder rules as `vggtctl.scan`, without the stats.

A catalog needs file names, not sizes: on a 10^6-image NFS root every avoided stat counts, so
regular files are never stat'ed here. Only symlinks are (to skip linked folders as
`scan.list_dir` does, and to tell dangling image links, which are kept, from other dangling ones).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field

from vggtctl.names import is_sidecar_name, is_temp_name
from vggtctl.scan import PRIVATE_DIR, default_workers, is_image_name, threaded_walk


@dataclass
class NameListing:
    """One folder: image names, other file names (not ours), subfolders, and a read error."""

    path: str
    images: list[str] = field(default_factory=list)
    others: list[str] = field(default_factory=list)
    subdirs: list[str] = field(default_factory=list)
    linked_dirs: list[str] = field(default_factory=list)  # symbolic links to folders: not followed
    entry_errors: list[str] = field(default_factory=list)  # "PATH: REASON" of entries not listed
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
                            listing.linked_dirs.append(entry.path)  # never followed (same as scan)
                            continue
                        entry.stat()  # raises for a dangling link
                except FileNotFoundError:
                    if is_image_name(name) and entry.is_symlink():
                        # a dangling image link (its source unmounted?) stays in the catalog: its
                        # items fail naming it, and an episode is not re-indexed without it (later
                        # steps would be encoded with another history, over valid sidecars)
                        listing.images.append(name)
                    continue
                except OSError as err:  # one entry (a link loop, EIO): that entry, not the folder
                    listing.entry_errors.append(f"{entry.path}: {err.strerror or err}")
                    continue
                if is_sidecar_name(name) or is_temp_name(name):
                    continue
                (listing.images if is_image_name(name) else listing.others).append(name)
    except OSError as err:
        listing.error = f"{path}: {err.strerror or err}"
    return listing


def walk_names(root: str, workers: int | None = None) -> Iterator[NameListing]:
    """Yield a NameListing per folder under `root` (root included), in no particular order."""
    return threaded_walk([root], list_names, workers or default_workers(), name="catalog")
