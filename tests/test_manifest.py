"""The manifest: tolerant reads, bounded history, atomic and lock-protected merges."""

from __future__ import annotations

import json
import multiprocessing
import os
from pathlib import Path

import pytest
import treebuilder as tb

from vggtctl import manifest


def test_missing_manifest_is_empty(tmp_path: Path) -> None:
    m = manifest.load(tmp_path)
    assert m.current_key is None and m.last_rate is None and m.runs == [] and m.problem is None
    assert not (tmp_path / "vggt_cache_manifest.json").exists()


MALFORMED = [  # valid JSON, but not what we write: once read as "no current key", silently
    b'{"format": "vggtctl.manifest", "version": 1, "current": {"feature_key": {"model": 5}}}',
    b'{"format": "vggtctl.manifest", "version": 1, "current": [], "runs": []}',
    b'{"format": "vggtctl.manifest", "version": 1, "runs": "x"}',
    b'{"format": "vggtctl.manifest", "version": 1, "current": {"settings": 3}}',
]


@pytest.mark.parametrize(
    "content", [b"{not json", b"[1, 2]", b'{"format": "other"}', b"\xff\xfe", b"", *MALFORMED]
)
def test_corrupt_manifest_warns_and_starts_fresh(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "vggt_cache_manifest.json"
    path.write_bytes(content)
    m = manifest.load(tmp_path)
    assert m.problem and "vggt_cache_manifest.json" in m.problem
    assert m.current_key is None
    written = manifest.record_prune(tmp_path, {"categories": ["temp"], "files": 1, "bytes_freed": 9})
    assert written is not None
    fresh = manifest.load(tmp_path)
    assert fresh.problem is None and len(fresh.prunes) == 1
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("vggt_cache_manifest.json.corrupt-")]
    assert len(aside) == 1 and aside[0].read_bytes() == content


def test_record_run_sets_current_key_settings_and_rate(tmp_path: Path) -> None:
    manifest.record_run(
        tmp_path, {"settings": {"preset": "test-preset"}, "items": 50, "seconds": 10.0}, tb.FEATURE_KEY
    )
    manifest.record_run(tmp_path, {"settings": {"preset": "test-preset"}, "rate": 8.5, "seconds": 3})
    m = manifest.load(tmp_path)
    assert m.current_key == tb.FEATURE_KEY
    assert m.settings == {"preset": "test-preset"}
    assert m.last_rate == 8.5
    assert m.runs[0]["rate"] == 5.0  # derived from items / seconds
    assert {"time", "host"} <= set(m.runs[0])
    assert m.last_run_settings() == {"preset": "test-preset"}
    data = json.loads((tmp_path / "vggt_cache_manifest.json").read_text())
    assert data["format"] == "vggtctl.manifest" and data["version"] == 1
    assert data["current"]["feature_key"] == tb.FEATURE_KEY.to_meta()


def test_last_run_settings_are_those_of_the_current_key_not_a_later_trial(tmp_path: Path) -> None:
    """A later run that did not become current (a --limit trial) must not lend its settings to
    verify --recompute and the history rule: prune would then delete the valid sidecars."""
    manifest.record_run(tmp_path, {"settings": {"preset": "a"}, "items": 8, "seconds": 1.0}, tb.FEATURE_KEY)
    manifest.record_run(tmp_path, {"settings": {"preset": "b"}, "items": 1, "seconds": 1.0})  # no key
    m = manifest.load(tmp_path)
    assert m.current_key == tb.FEATURE_KEY
    assert m.runs[-1]["settings"] == {"preset": "b"}  # the trial is in the history
    assert m.last_run_settings() == {"preset": "a"}


def test_last_rate_skips_runs_without_one(tmp_path: Path) -> None:
    manifest.record_run(tmp_path, {"rate": 3.0})
    manifest.record_run(tmp_path, {"rate": None, "seconds": 1.0})
    assert manifest.load(tmp_path).last_rate == 3.0


def test_history_is_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(manifest, "HISTORY_LIMIT", 4)
    for i in range(7):
        manifest.record_run(tmp_path, {"n": i})
        manifest.record_prune(tmp_path, {"n": i})
    m = manifest.load(tmp_path)
    assert [r["n"] for r in m.runs] == [3, 4, 5, 6]
    assert [p["n"] for p in m.prunes] == [3, 4, 5, 6]


def test_unwritable_root_is_a_warning_not_a_crash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def refuse(*_args: object, **_kwargs: object) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(manifest.os, "replace", refuse)
    assert manifest.record_run(tmp_path, {"rate": 1.0}) is None
    assert "cannot update the manifest" in caplog.text
    assert not (tmp_path / "vggt_cache_manifest.json").exists()
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]  # no temp debris


def _writer(root: str, worker: int, count: int) -> None:
    for i in range(count):
        manifest.record_run(root, {"worker": worker, "i": i})


def test_concurrent_writers_lose_nothing(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), w, 15)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    m = manifest.load(tmp_path)
    assert m.problem is None
    assert sorted((r["worker"], r["i"]) for r in m.runs) == [(w, i) for w in range(4) for i in range(15)]
    assert (tmp_path / ".vggtctl" / "manifest.lock").exists()
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]


def test_a_write_by_another_host_in_between_is_read_again_not_undone(tmp_path: Path, monkeypatch) -> None:
    """Where the lock does not hold across hosts (NFS mounted nolock), a prune that read the old
    key must not write it back over a run that just made a new model current."""
    import contextlib
    import dataclasses

    from vggtctl.keys import ModelKey

    monkeypatch.setattr(manifest, "_locked", lambda root: contextlib.nullcontext())
    manifest.record_run(tmp_path, {"settings": {}, "items": 1, "seconds": 1.0}, tb.FEATURE_KEY)
    newer = dataclasses.replace(
        tb.FEATURE_KEY, model=ModelKey("e" * 64, "new-model", -2, "causal", "bfloat16")
    )
    calls = []

    def prune_entry(m: manifest.Manifest) -> None:
        calls.append(m.current_key)
        if len(calls) == 1:  # another host records its run between our read and our write
            manifest.record_run(tmp_path, {"settings": {}, "items": 5, "seconds": 1.0}, newer)
        m.prunes = [*m.prunes, {"files": 3}]

    assert manifest._update(tmp_path, prune_entry) is not None
    assert calls == [tb.FEATURE_KEY, newer]  # applied again to what the other host wrote
    final = manifest.load(tmp_path)
    assert final.current_key == newer and len(final.runs) == 2 and final.prunes == [{"files": 3}]


def test_an_unreadable_or_newer_manifest_is_never_replaced(tmp_path: Path) -> None:
    path = tmp_path / "vggt_cache_manifest.json"
    path.mkdir()  # reading it fails with an I/O error, not a parse error: it may be fine
    assert manifest.record_prune(tmp_path, {"files": 1}) is None
    assert path.is_dir() and not list(tmp_path.glob("*.corrupt-*"))
    path.rmdir()
    later = b'{"format": "vggtctl.manifest", "version": 2, "current": {"new": "fields"}}'
    path.write_bytes(later)
    assert manifest.record_prune(tmp_path, {"files": 1}) is None
    assert path.read_bytes() == later and not list(tmp_path.glob("*.corrupt-*"))
    assert "newer vggtctl" in (manifest.load(tmp_path).problem or "")


def test_temp_files_of_writers_that_died_are_removed_an_hour_later(tmp_path: Path) -> None:
    import time

    old = tmp_path / "vggt_cache_manifest.json.tmp-123-deadbeef"
    young = tmp_path / "vggt_cache_manifest.json.tmp-124-cafef00d"
    lookalike = tmp_path / "vggt_cache_manifest.json.tmp-notes"
    for path in (old, young, lookalike):
        path.write_text("{")
    hour_ago = time.time() - 2 * 3600
    for path in (old, lookalike):
        os.utime(path, (hour_ago, hour_ago))
    assert manifest.record_prune(tmp_path, {"files": 1}) is not None
    assert not old.exists() and young.exists() and lookalike.exists()
