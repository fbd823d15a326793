"""Where `precompute` takes its annotation files from: flags, VGGTCTL_ANNOTATIONS, vggtctl.toml."""

from __future__ import annotations

import os

import pytest

from vggtctl.cli.precompute import _path_list
from vggtctl.scan import list_dir


def test_annotation_sources_become_lists():
    assert _path_list(["a.jsonl", "b.json"]) == ["a.jsonl", "b.json"]
    assert _path_list(f"a.jsonl{os.pathsep}b.json") == ["a.jsonl", "b.json"]
    assert _path_list(None) == [] and _path_list("") == []


@pytest.mark.parametrize("table", [False, True])
def test_precompute_table_annotations_are_read(tmp_path, monkeypatch, table):
    from vggtctl.cli import precompute as cli
    from vggtctl.settings import find_config, pick

    body = '[precompute]\nannotations = ["x.jsonl"]\n' if table else 'annotations = ["x.jsonl"]\n'
    (tmp_path / "vggtctl.toml").write_text(body)
    monkeypatch.chdir(tmp_path)
    config = find_config(tmp_path)
    assert cli._path_list(pick("annotations", None, config, "precompute", [])) == ["x.jsonl"]


def test_listing_lookup_stats_files_it_did_not_list(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"1")
    (tmp_path / "frame.tif").write_bytes(b"22")
    listing = list_dir(str(tmp_path))
    lookup = listing.stat_lookup()
    assert lookup(str(tmp_path / "a.jpg")) is listing.images["a.jpg"]
    assert lookup(str(tmp_path / "frame.tif")).st_size == 2  # not an image name: stat'ed, not "gone"
    assert lookup(str(tmp_path / "nope.jpg")) is None
