"""One entry whose stat fails (a symlink loop here: ELOOP; EACCES and EIO take the same path)
costs that entry only: the rest of its folder and its subfolders are still listed, and the
entry is reported as unreadable with its own path and reason (status exits 3, verify 1)."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
import scantree
from typer.testing import CliRunner

from vggtctl import scan

IMAGES = 30  # enough that the broken entry is not the last one readdir returns


def _build(root: Path, *, sidecars: bool = True) -> Path:
    ep = root / "ep"
    for i in range(IMAGES):
        scantree.write(ep / f"img{i:02d}.jpg", 10)
        if sidecars:
            scantree.write(ep / f"img{i:02d}.jpg.vggt_cache.pt", 100)
    scantree.write(ep / "sub" / "deep.jpg", 10)  # a subfolder after the bad entry, maybe
    os.symlink("loop.jpg", ep / "loop.jpg")  # stat: ELOOP
    return ep


def _loop_reason() -> str:
    return os.strerror(errno.ELOOP)


@pytest.mark.parametrize("processes", [1, 2])
def test_a_failing_entry_stat_drops_only_that_entry(tmp_path: Path, processes: int) -> None:
    ep = _build(tmp_path)
    listing = scan.list_dir(str(ep))
    assert listing.error is None
    assert len(listing.images) == IMAGES and len(listing.sidecars) == IMAGES
    assert listing.subdirs == [str(ep / "sub")]
    assert listing.unreadable() == [f"{ep / 'loop.jpg'}: {_loop_reason()}"]

    summary = scan.summarize(tmp_path, workers=2, processes=processes)
    assert summary.total.images == IMAGES + 1 and summary.total.cached == IMAGES
    assert summary.total.orphans == 0
    assert summary.unreadable == [f"{ep / 'loop.jpg'}: {_loop_reason()}"]


def test_the_sidecar_of_an_image_that_cannot_be_stated_is_no_orphan(tmp_path: Path) -> None:
    ep = _build(tmp_path)
    scantree.write(ep / "loop.jpg.vggt_cache.pt", 100)
    summary = scan.summarize(tmp_path, processes=1)
    assert summary.total.orphans == 0  # the image's name is there: not gone


def test_other_stat_errors_are_per_entry_too(tmp_path: Path, monkeypatch) -> None:
    """EIO on one image (a flaky NFS server), simulated: the folder's other files still count."""
    ep = tmp_path / "ep"
    for i in range(5):
        scantree.write(ep / f"img{i}.jpg", 10)

    class Entry:
        def __init__(self, entry: os.DirEntry, _folder: str) -> None:
            self._entry, self.name, self.path = entry, entry.name, entry.path

        def is_dir(self, *, follow_symlinks: bool = True) -> bool:
            return self._entry.is_dir(follow_symlinks=follow_symlinks)

        def is_symlink(self) -> bool:
            return self._entry.is_symlink()

        def stat(self, *, follow_symlinks: bool = True) -> os.stat_result:
            if self.name == "img2.jpg":
                raise OSError(errno.EIO, os.strerror(errno.EIO))
            return self._entry.stat(follow_symlinks=follow_symlinks)

    monkeypatch.setattr(os, "scandir", scantree.wrapped_scandir(Entry))
    listing = scan.list_dir(str(ep))
    assert sorted(listing.images) == ["img0.jpg", "img1.jpg", "img3.jpg", "img4.jpg"]
    assert listing.error is None
    assert listing.unreadable() == [f"{ep / 'img2.jpg'}: {os.strerror(errno.EIO)}"]


def test_status_and_verify_report_the_entry_and_exit_as_for_a_folder(tmp_path: Path) -> None:
    from vggtctl.cli.app import app

    ep = _build(tmp_path, sidecars=False)  # no sidecar to judge: only the entry makes verify fail
    line = f"{ep / 'loop.jpg'}: {_loop_reason()}"
    status = CliRunner().invoke(app, ["status", str(tmp_path), "--json"])
    assert status.exit_code == 3, status.output
    doc = json.loads(status.stdout)
    assert doc["unreadable"] == [line]
    assert doc["totals"]["images"] == IMAGES + 1
    assert f"warning: cannot read {line} (skipped)" in status.stderr

    verify = CliRunner().invoke(app, ["verify", str(tmp_path), "--quick", "--json"])
    assert verify.exit_code == 1  # an unreadable path is a finding, as an unreadable folder is
    assert json.loads(verify.stdout)["unreadable"] == [line]
