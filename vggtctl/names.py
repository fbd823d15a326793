"""Sidecar and temp file names (DESIGN §3), without importing torch.

A listing of 10^6 files must not pay torch's import time just to tell `img.jpg` from
`img.jpg.vggt_cache.pt`; `vggtctl.sidecar` re-exports everything here.
"""

from __future__ import annotations

import os
import re

SUFFIX = ".vggt_cache.pt"
TEMP_MARK = SUFFIX + ".tmp-"
# Exactly what `sidecar.temp_path_for` writes: an ASCII decimal pid and 4 random bytes as 8
# lowercase hex digits. Temp files are deleted without being opened, so nothing looser matches.
_TEMP_TAIL = re.compile(r"[0-9]+-[0-9a-f]{8}", re.ASCII)


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
    """Our temp files: `<image><SUFFIX>.tmp-<ASCII decimal pid>-<8 lowercase hex>`."""
    cut = name.find(TEMP_MARK)
    return cut > 0 and _TEMP_TAIL.fullmatch(name, cut + len(TEMP_MARK)) is not None
