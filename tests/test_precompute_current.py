"""Which settings a run makes current, and which it leaves alone.

verify, status, prune and train judge every sidecar by the root's current settings, so a run
that switches them by accident turns a whole valid cache into "mismatch", and the routine
`prune --model-changed` then deletes it.
"""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

import pytest
from precompute_trees import CLI_FAST, episodes_tree, opts
from typer.testing import CliRunner

from vggtctl import manifest
from vggtctl.cli.app import app
from vggtctl.errors import ConfigError
from vggtctl.keys import FeatureKey
from vggtctl.precompute import PrecomputeInterrupted, run
from vggtctl.reporter import Reporter


def _current(root: Path) -> tuple[FeatureKey | None, dict]:
    loaded = manifest.load(root)
    return loaded.current_key, loaded.last_run_settings() or {}


def test_the_library_resumes_with_the_roots_max_history(tmp_path, caplog):
    """`run(PrecomputeOptions(root, model))`, as the docs show it, over a root cached with
    max_history 2: nothing to encode and 2 stays current (a default of 8 would re-encode every
    item and make 8 current). Naming another value is announced through the `vggtctl` logger."""
    images = episodes_tree(tmp_path, episodes=1, steps=3)
    assert run(opts(tmp_path, max_history=2)).encoded == len(images)
    again = run(opts(tmp_path))
    assert (again.encoded, again.plan.already_valid) == (0, len(images))
    assert _current(tmp_path)[1]["max_history"] == 2

    with caplog.at_level(logging.WARNING, logger="vggtctl"):
        run(opts(tmp_path, max_history=4, dry_run=True))
    assert any("max_history 2 -> 4" in record.getMessage() for record in caplog.records)


class _CtrlCAfterFirstWrite(Reporter):
    """Ctrl-C (a real SIGINT to this process) once the first sidecar is on disk."""

    def __init__(self) -> None:
        self.sent = False

    def update(self, encoded: int, failed: int, nbytes: int) -> None:
        if encoded and not self.sent:
            self.sent = True
            os.kill(os.getpid(), signal.SIGINT)


def test_an_interrupted_run_with_other_settings_leaves_the_current_ones(tmp_path):
    """Stopped seconds into a run with the wrong settings (here the preset), the root keeps its
    settings: the sidecars it replaced are the mismatches, not the whole cache. The rerun with
    the same settings resumes and, finished, makes them current."""
    images = episodes_tree(tmp_path, episodes=2, steps=4)
    first = run(opts(tmp_path, max_history=2, batch_size=1))
    old_key = FeatureKey.from_meta(first.feature_key)
    other = opts(tmp_path, max_history=2, batch_size=1, preset="vggt-pad-518")
    with pytest.raises(PrecomputeInterrupted) as stopped:
        run(other, _CtrlCAfterFirstWrite())
    partial = stopped.value.outcome
    assert 1 <= partial.encoded < len(images) and partial.settings_kept
    assert _current(tmp_path)[0] == old_key

    resumed = run(other)
    # what the stopped run wrote is valid for these settings and not encoded again
    assert resumed.plan.already_valid >= partial.encoded
    assert resumed.encoded + resumed.plan.already_valid == len(images)
    assert _current(tmp_path)[0] == FeatureKey.from_meta(resumed.feature_key) != old_key


def test_an_interrupted_first_run_or_same_settings_run_is_recorded_as_usual(tmp_path):
    """With nothing current yet, or the same settings, there is nothing to protect."""
    episodes_tree(tmp_path, episodes=2, steps=4)
    with pytest.raises(PrecomputeInterrupted) as stopped:
        run(opts(tmp_path, max_history=2, batch_size=1), _CtrlCAfterFirstWrite())
    assert not stopped.value.outcome.settings_kept
    assert _current(tmp_path)[0] == FeatureKey.from_meta(stopped.value.outcome.feature_key)


def test_the_cli_says_the_current_settings_stayed(tmp_path, monkeypatch):
    episodes_tree(tmp_path, episodes=2, steps=4)
    base = [
        "precompute",
        str(tmp_path),
        *CLI_FAST,
        "--workers",
        "0",
        "--batch-size",
        "1",
        "--max-history",
        "2",
    ]
    assert CliRunner().invoke(app, base).exit_code == 0
    # the command's own run, with a reporter that sends Ctrl-C after the first write
    monkeypatch.setattr(
        "vggtctl.precompute.run", lambda options, _reporter: run(options, _CtrlCAfterFirstWrite())
    )
    signal.signal(signal.SIGINT, signal.default_int_handler)  # the first command ignored it from its end on
    result = CliRunner().invoke(app, [*base, "--preset", "vggt-pad-518"])
    assert result.exit_code == 130, result.output
    assert "so the current ones stay" in result.stderr


def test_a_root_with_no_items_is_an_error_that_writes_nothing(tmp_path):
    """A wrong root, layout or annotation file: exit 2 with one line, no model loaded, no
    manifest entry and no run state written into the root, nothing on stdout for --json."""
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(ConfigError, match="no items found under"):
        run(opts(tmp_path))
    for extra in ([], ["--json"], ["--dry-run", "--json"]):
        result = CliRunner().invoke(app, ["precompute", str(tmp_path), *CLI_FAST, *extra])
        assert result.exit_code == 2, (extra, result.output)
        assert result.stdout == ""
        assert result.stderr.startswith("error: no items found under")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_an_empty_root_is_said_once_per_run_not_once_per_rank(tmp_path, capsys):
    """Every rank stops with exit 2; only rank 0 prints the line."""
    from vggtctl.catalog import load_catalog
    from vggtctl.cli.precompute import _error
    from vggtctl.distributed import DistInfo
    from vggtctl.precompute.pipeline import _no_items

    catalog = load_catalog(tmp_path, "auto")
    codes = []
    for rank in (0, 1):
        with pytest.raises(ConfigError) as stopped:
            _no_items(opts(tmp_path), catalog, DistInfo(rank, 2, rank, 2), Reporter())
        codes.append(_error(stopped.value))
    assert codes == [2, 2]
    lines = [line for line in capsys.readouterr().err.splitlines() if "no items found" in line]
    assert len(lines) == 1 and lines[0].startswith("error: ")


def test_the_settings_note_names_the_model_setting_that_changed(tmp_path):
    episodes_tree(tmp_path, episodes=1, steps=2)
    assert run(opts(tmp_path, max_history=1)).encoded == 2
    result = CliRunner().invoke(app, ["precompute", str(tmp_path), *CLI_FAST, "--layer", "1", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "these settings differ from the root's current ones (layer 0 -> 1)" in result.stderr
