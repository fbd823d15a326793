"""The scan: exact per-row counts, depth, symlinks, unreadable folders, one stat per file,
and the same answer from threads and from worker processes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import scantree

from vggtctl import scan


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    return scantree.build(tmp_path / "data")


def _row(stats: scan.DirStats) -> dict[str, int]:
    return {key: getattr(stats, key) for key in scantree.TOTAL}


@pytest.mark.parametrize("processes", [1, 2])
def test_depth1_rows_match_the_layout(tree: Path, processes: int) -> None:
    summary = scan.summarize(tree, depth=1, workers=3, processes=processes)
    assert set(summary.rows) == set(scantree.ROWS_DEPTH1)
    for name, expected in scantree.ROWS_DEPTH1.items():
        row = summary.rows[name]
        for key, value in expected.items():
            assert getattr(row, key) == value, (name, key)
    assert _row(summary.total) == scantree.TOTAL
    assert summary.rows["ep1"].missing == 3
    assert summary.rows["ep1"].coverage == pytest.approx(4 / 7)
    assert summary.total.temp_bytes == 7


def test_depth0_is_one_row_and_depth2_splits_subfolders(tree: Path) -> None:
    flat = scan.summarize(tree, depth=0)
    assert list(flat.rows) == ["."]
    assert _row(flat.rows["."]) == scantree.TOTAL

    deep = scan.summarize(tree, depth=2)
    assert set(deep.rows) == {".", "ep1", "ep1/sub", "ep2", "ep3"}
    assert (deep.rows["ep1"].images, deep.rows["ep1"].cached) == (5, 3)
    assert (deep.rows["ep1/sub"].images, deep.rows["ep1/sub"].cached) == (2, 1)
    assert _row(deep.total) == scantree.TOTAL


def test_symlinked_folder_is_reported_not_followed(tree: Path) -> None:
    summary = scan.summarize(tree, processes=1)
    assert summary.symlinked_dirs == [str(tree / "link_ep")]
    assert "link_ep" not in summary.rows
    assert summary.total.images == scantree.TOTAL["images"]  # ep2's files counted once


@pytest.mark.parametrize("processes", [1, 2])
def test_a_link_to_a_folder_named_like_an_image_is_not_an_image(tree: Path, processes: int) -> None:
    (tree / "ep3" / "frames.jpg").symlink_to(tree / "ep2", target_is_directory=True)
    (tree / "ep3" / "gone.png").symlink_to(tree / "nowhere.png")  # dangling: not an image either
    summary = scan.summarize(tree, depth=1, processes=processes)
    assert _row(summary.total) == scantree.TOTAL
    assert str(tree / "ep3" / "frames.jpg") in summary.symlinked_dirs


def test_private_folder_is_never_scanned(tree: Path) -> None:
    folders = {listing.path for listing in scan.walk(tree, workers=2)}
    assert str(tree / scan.PRIVATE_DIR) not in folders
    assert str(tree / "ep1" / "sub") in folders


def test_image_names() -> None:
    assert scan.is_image_name("a.JPG") and scan.is_image_name("b.webp") and scan.is_image_name("x.y.png")
    assert not scan.is_image_name(".jpg") and not scan.is_image_name("a.jpg.vggt_cache.pt")
    assert not scan.is_image_name("notes.txt") and not scan.is_image_name("jpg")


@pytest.mark.parametrize("processes", [1, 2])
def test_unreadable_folder_is_reported_not_fatal(tree: Path, monkeypatch, processes: int) -> None:
    scantree.deny(monkeypatch, tree / "ep1")
    summary = scan.summarize(tree, workers=2, processes=processes)
    assert summary.unreadable == [f"{tree / 'ep1'}: Permission denied"]
    assert summary.rows["ep1"].images == 0  # nothing below it could be seen
    assert summary.rows["ep2"].images == 2 and summary.rows["."].cached == 1


def test_unreadable_folder_with_real_permissions(tree: Path) -> None:
    folder = tree / "ep2"
    folder.chmod(0)
    try:
        if os.access(folder, os.R_OK):
            pytest.skip("running as root: chmod does not stop this process reading the folder")
        summary = scan.summarize(tree)
        assert summary.unreadable == [f"{folder}: Permission denied"]
        assert summary.rows["ep1"].images == 7
    finally:
        folder.chmod(0o755)


class _CountingEntry:
    """A DirEntry stand-in that logs every stat to `log` (a file, so forked workers count too)."""

    def __init__(self, entry: os.DirEntry, folder: str, log: str) -> None:
        self._entry, self._folder, self._log = entry, folder, log
        self.name = entry.name
        self.path = entry.path

    def is_dir(self, *, follow_symlinks: bool = True) -> bool:
        return self._entry.is_dir(follow_symlinks=follow_symlinks)

    def is_file(self, *, follow_symlinks: bool = True) -> bool:
        return self._entry.is_file(follow_symlinks=follow_symlinks)

    def is_symlink(self) -> bool:
        return self._entry.is_symlink()

    def stat(self, *, follow_symlinks: bool = True) -> os.stat_result:
        _log(self._log, os.path.join(self._folder, self.name))
        return self._entry.stat(follow_symlinks=follow_symlinks)


def _log(log: str, line: str) -> None:
    with open(log, "a") as fh:
        fh.write(line + "\n")


def _count_stats(monkeypatch: pytest.MonkeyPatch, log: str) -> None:
    real_stat, real_lstat = os.stat, os.lstat
    listing = scantree.wrapped_scandir(lambda entry, folder: _CountingEntry(entry, folder, log))

    def stat(path, *args, **kwargs):  # type: ignore[no-untyped-def]
        _log(log, os.fspath(path))
        return real_stat(path, *args, **kwargs)

    def lstat(path, *args, **kwargs):  # type: ignore[no-untyped-def]
        _log(log, os.fspath(path))
        return real_lstat(path, *args, **kwargs)

    monkeypatch.setattr(os, "scandir", listing)
    monkeypatch.setattr(os, "stat", stat)
    monkeypatch.setattr(os, "lstat", lstat)


@pytest.mark.parametrize("processes", [1, 2])
def test_every_file_is_stated_exactly_once(tree: Path, tmp_path: Path, monkeypatch, processes: int) -> None:
    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("needs /proc to name the folders listed by descriptor")
    # Enough folders that processes=2 really hands subtrees to worker processes.
    wide = scantree.build_wide(tree / "wide")
    log = str(tmp_path / "stats.log")
    _count_stats(monkeypatch, log)
    summary = scan.summarize(tree, workers=4, processes=processes)
    monkeypatch.undo()

    with open(log) as fh:
        # Only the tree counts: libraries' fork hooks (filelock, via huggingface_hub) stat
        # /proc/self/ns/pid in forked workers, which is not the scan's doing.
        statted = [line.rstrip("\n") for line in fh if line.startswith(str(tree))]
    assert len(statted) == len(set(statted)), "a file was stat'ed twice"
    expected = {str(tree / rel) for rel in scantree.STATTED}
    expected |= {str(p) for p in (tree / "wide").rglob("*") if p.is_file()}
    assert set(statted) == expected
    assert summary.rows["wide"].images == wide["images"]
    assert summary.rows["wide"].cached == wide["cached"]


def test_processes_and_threads_agree(tmp_path: Path) -> None:
    root = tmp_path / "data"
    wide = scantree.build_wide(root, episodes=60)
    runs = [
        scan.summarize(root, depth=2, workers=1, processes=1),
        scan.summarize(root, depth=2, workers=8, processes=1),
        scan.summarize(root, depth=2, workers=4, processes=2),
        scan.summarize(root, depth=2, on_listing=lambda listing: None),
    ]
    for summary in runs:
        assert summary.total.images == wide["images"]
        assert summary.total.cached == wide["cached"]
        assert summary.rows == runs[0].rows
    assert "ep007/a" in runs[0].rows  # depth 2 reaches the nested level


def test_progress_reports_every_folder(tree: Path) -> None:
    seen: list[tuple[int, int]] = []
    summary = scan.summarize(tree, processes=1, progress=lambda folders, files: seen.append((folders, files)))
    assert seen[-1][0] == summary.total.folders
    assert seen[-1][1] == TOTAL_FILES


TOTAL_FILES = scantree.TOTAL["images"] + scantree.TOTAL["cached"] + scantree.TOTAL["orphans"] + 1


def test_collector_state_is_restored(tree: Path) -> None:
    import gc

    assert gc.isenabled()
    scan.summarize(tree, processes=1)
    assert gc.isenabled()
    gc.disable()
    try:
        scan.summarize(tree, processes=1)
        assert not gc.isenabled()  # a caller's choice is kept
    finally:
        gc.enable()


def test_no_fork_while_other_threads_run(tmp_path: Path, monkeypatch) -> None:
    import threading

    root = tmp_path / "data"
    wide = scantree.build_wide(root)
    stop = threading.Event()
    other = threading.Thread(target=stop.wait)
    other.start()
    try:
        forked = []
        monkeypatch.setattr(os, "fork", lambda: forked.append(1) or pytest.fail("forked with threads"))
        summary = scan.summarize(root, processes=2)
    finally:
        stop.set()
        other.join()
    assert not forked
    assert (summary.total.images, summary.total.cached) == (wide["images"], wide["cached"])
