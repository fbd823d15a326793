"""The `plain` layout: every image under the root, each on its own (context none)."""

from __future__ import annotations

import os
from collections.abc import Iterable

from vggtctl.catalog._walk import NameListing
from vggtctl.catalog.base import Item


def build_plain(root: str, listings: Iterable[NameListing]) -> list[Item]:
    paths = [os.path.join(listing.path, name) for listing in listings for name in listing.images]
    paths.sort()
    return [Item((path,), os.path.relpath(path, root).replace(os.sep, "/")) for path in paths]
