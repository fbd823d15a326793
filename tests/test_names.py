"""Temp names: exactly what `sidecar.temp_path_for` writes is ours, nothing looser (temp files
are deleted by name without being opened)."""

from __future__ import annotations

import re

import pytest

from vggtctl import sidecar
from vggtctl.names import is_temp_name

IMAGE = "a.jpg.vggt_cache.pt"


def test_a_name_written_by_temp_path_for_is_a_temp_name() -> None:
    name = sidecar.temp_path_for(IMAGE)
    assert re.fullmatch(r"a\.jpg\.vggt_cache\.pt\.tmp-[0-9]+-[0-9a-f]{8}", name)  # the format we test
    assert is_temp_name(name)


@pytest.mark.parametrize(
    "name",
    [
        f"{IMAGE}.tmp-\u00b2-0a1b2c3d",  # superscript two: str.isdigit() says yes
        f"{IMAGE}.tmp-\u0661\u0662-0a1b2c3d",  # Arabic-Indic digits
        f"{IMAGE}.tmp-12-ab",  # a token shorter than 8 hex digits
        f"{IMAGE}.tmp-12-0a1b2c3d4e",  # longer
        "backup.vggt_cache.pt.tmp-20240101-dead",
        f"{IMAGE}.tmp-12-0A1B2C3D",  # upper-case hex
        f"{IMAGE}.tmp-12-0a1b2c3d\n",
        f"{IMAGE}.tmp--0a1b2c3d",  # no pid
        f"{IMAGE}.tmp-1",
    ],
)
def test_names_we_never_write_are_not_temp_names(name: str) -> None:
    assert not is_temp_name(name)
