"""Where `precompute` takes its annotation files from: flags, VGGTCTL_ANNOTATIONS, vggtctl.toml."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vggtctl.scan import list_dir


def _options(root, flags=None, **env):
    from vggtctl.precompute.configure import options_from
    from vggtctl.settings import find_config

    flags = {"vggt_model": "tiny-random", **(flags or {})}
    return options_from(root, flags, find_config(root))


def test_annotation_sources_become_lists(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    both = [str(tmp_path / "a.jsonl"), str(tmp_path / "b.json")]  # absolute: the manifest keeps them
    flagged = _options(tmp_path, {"annotations": ["a.jsonl", "b.json"]})
    assert flagged.annotations == both
    monkeypatch.setenv("VGGTCTL_ANNOTATIONS", f"a.jsonl{os.pathsep}b.json")
    assert _options(tmp_path).annotations == both
    monkeypatch.delenv("VGGTCTL_ANNOTATIONS")
    assert _options(tmp_path).annotations == []


@pytest.mark.parametrize("table", [False, True])
def test_precompute_table_annotations_are_read_relative_to_the_file(tmp_path, monkeypatch, table):
    root = tmp_path / "root"
    root.mkdir()
    body = '[precompute]\nannotations = ["meta/x.jsonl"]\n' if table else 'annotations = ["meta/x.jsonl"]\n'
    (root / "vggtctl.toml").write_text(body)
    monkeypatch.chdir(tmp_path)  # started elsewhere: the path is the toml's, not the working folder's
    assert _options(root).annotations == [str(root / "meta" / "x.jsonl")]


def test_every_option_reads_env_and_toml_eviction_and_limit_included(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "vggtctl.toml").write_text(
        "evict_start = 1\nevict_recent = 2\nlimit = 5\n[precompute]\nforce = true\n"
    )
    opts = _options(tmp_path)
    assert (opts.evict_start, opts.evict_recent, opts.limit, opts.force) == (1, 2, 5, True)
    monkeypatch.setenv("VGGTCTL_LIMIT", "3")
    monkeypatch.setenv("VGGTCTL_FSYNC", "yes")
    opts = _options(tmp_path, {"evict_recent": 4})
    assert (opts.evict_recent, opts.limit, opts.fsync) == (4, 3, True)  # flag > env > toml


@pytest.mark.parametrize(
    "where, body, message",
    [
        ("env", ("VGGTCTL_LAYER", "abc"), "layer = 'abc' (env VGGTCTL_LAYER): not a whole number"),
        ("env", ("VGGTCTL_BATCH_SIZE", "0"), "batch_size = '0' (env VGGTCTL_BATCH_SIZE): must be at least 1"),
        ("toml", "layer = 1.7\n", "layer = 1.7 (vggtctl.toml, "),
        ("toml", "max_history = true\n", "max_history = True (vggtctl.toml, "),
        ("toml", "layer = [1]\n", "layer = [1] (vggtctl.toml, "),
        ("toml", "annotations = 5\n", "annotations = 5 (vggtctl.toml, "),
        ("toml", '[precompute]\nworkers = "lots"\n', "workers = 'lots' (vggtctl.toml [precompute], "),
        ("toml", "preset = 3\n", "preset = 3 (vggtctl.toml, "),
        ("env", ("VGGTCTL_DEVICE", "bogus"), "device = 'bogus' (env VGGTCTL_DEVICE): not a device name"),
        ("toml", 'devices = ["cpu", "gpu7"]\n', "devices = ['cpu', 'gpu7'] (vggtctl.toml, "),
    ],
)
def test_a_bad_setting_is_one_line_naming_its_source(tmp_path, monkeypatch, where, body, message):
    from vggtctl.errors import ConfigError

    monkeypatch.chdir(tmp_path)
    if where == "env":
        monkeypatch.setenv(*body)
    else:
        (tmp_path / "vggtctl.toml").write_text(body)
    with pytest.raises(ConfigError) as err:
        _options(tmp_path)
    assert str(err.value).startswith(message), str(err.value)
    assert "\n" not in str(err.value)


def test_the_cli_reports_a_broken_toml_and_takes_root_from_the_environment(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from vggtctl.cli.app import app

    data = tmp_path / "data"
    data.mkdir()
    _one_image(data)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    (work / "vggtctl.toml").write_text("this is not toml\n")
    result = CliRunner().invoke(app, ["precompute", str(data), "--vggt-model", "tiny-random", "--dry-run"])
    assert result.exit_code == 2 and result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert "vggtctl.toml: cannot read settings" in result.stderr
    (work / "vggtctl.toml").unlink()
    monkeypatch.setenv("VGGTCTL_DATA_ROOT", str(data))
    args = ["precompute", "--vggt-model", "tiny-random", "--device", "cpu", "--dry-run", "--json"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    monkeypatch.delenv("VGGTCTL_DATA_ROOT")
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and "no data root" in result.stderr


def test_listing_lookup_stats_files_it_did_not_list(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"1")
    (tmp_path / "frame.tif").write_bytes(b"22")
    listing = list_dir(str(tmp_path))
    lookup = listing.stat_lookup()
    assert lookup(str(tmp_path / "a.jpg")) is listing.images["a.jpg"]
    assert lookup(str(tmp_path / "frame.tif")).st_size == 2  # not an image name: stat'ed, not "gone"
    assert lookup(str(tmp_path / "nope.jpg")) is None


def test_a_misspelled_setting_is_warned_about(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from vggtctl.cli.app import app

    monkeypatch.chdir(tmp_path)
    _one_image(tmp_path)
    (tmp_path / "vggtctl.toml").write_text("max_hisotry = 3\n")
    args = ["precompute", str(tmp_path), "--vggt-model", "tiny-random", "--device", "cpu", "--dry-run"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    warning = f"warning: {tmp_path / 'vggtctl.toml'}: unknown setting(s) ignored: max_hisotry"
    assert warning in result.stderr.splitlines()


def _one_image(folder: Path) -> None:
    """A root with one item: a root with none is an error of its own (exit 2)."""
    from PIL import Image

    Image.new("RGB", (32, 24), (120, 30, 200)).save(folder / "one.jpg")
