"""Sidecar and temp file names (DESIGN §3), without importing torch.

A listing of 10^6 files must not pay torch's import time just to tell `img.jpg` from
`img.jpg.vggt_cache.pt`; `vggtctl.sidecar` re-exports everything here.
"""

from __future__ import annotations

import os

SUFFIX = ".vggt_cache.pt"
TEMP_MARK = SUFFIX + ".tmp-"
_HEX = frozenset("0123456789abcdef")


def sidecar_path(image_path: str | os.PathLike[str]) -> str:
    return f"{os.fspath(image_path)}{SUFFIX}"


def image_path_of(path: str | os.PathLike[str]) -> str:
    """The image a sidecar (or one of its temp files) belongs to."""
    text = os.fspath(path)
    cut = text.rfind(SUFFIX)
    if cut < 0:
        raise ValueError(f"{text}: not a sidecar name")
    return text[:cut]


def is_sidecar_name(name: str) -> bool:
    return name.endswith(SUFFIX) and len(name) > len(SUFFIX)


def is_temp_name(name: str) -> bool:
    """Our temp files: `<image><SUFFIX>.tmp-<pid>-<hex>`."""
    cut = name.find(TEMP_MARK)
    if cut <= 0:
        return False
    pid, _, token = name[cut + len(TEMP_MARK) :].partition("-")
    return pid.isdigit() and bool(token) and all(c in _HEX for c in token)
