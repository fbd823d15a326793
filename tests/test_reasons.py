"""The one-line reasons verify, status --deep and the trainer's store give: each names what it
compared (the frames counted, the frame that changed, both presets), and a `random:` model given
to a check says what it is instead of calling it a missing file."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
import treebuilder as tb
from typer.testing import CliRunner

from vggtctl import audit, manifest, sidecar
from vggtctl.catalog.base import Item
from vggtctl.data import FeatureStore
from vggtctl.errors import CheckpointError
from vggtctl.keys import ContextSettings, FeatureKey
from vggtctl.sidecar import Verdict

SEQUENCE_KEY = FeatureKey(
    tb.CURRENT_MODEL, tb.PREPROCESS["fingerprint"], tb.PREPROCESS["preset"], ContextSettings("sequence")
)
STEPS = ["step_0_GO.jpg", "step_1_GO.jpg", "step_2_GO.jpg", "step_3_GO.jpg"]


def _episode(root: Path) -> Path:
    folder = root / "ep"
    for i, name in enumerate(STEPS):
        tb.write_image(folder / name, seed=i)
    return folder


def _episodes_root(root: Path, max_history: int) -> None:
    """The manifest of an episodes run with `max_history`: verify judges histories by its rule."""
    settings = {"layout": "episodes", "max_history": max_history, "vggt_model": "tiny-random"}
    manifest.record_run(root, {"kind": "precompute", "settings": settings}, SEQUENCE_KEY)


def _reasons(root: Path) -> dict[str, tuple[Verdict, str]]:
    """Sidecar file name -> (verdict, reason), as verify checks the root against its manifest."""
    report = audit.audit(root, audit.expectation_from(root), history=audit.history_rule_from(root))
    return {os.path.basename(p.path): (p.verdict, p.reason) for p in report.problems}


def _later(path: Path, seconds: float = 60.0) -> None:
    """Move a file's mtime `seconds` later than now (its ctime is now, whatever utime sets)."""
    import time

    ns = time.time_ns() + int(seconds * 1e9)
    os.utime(path, ns=(ns, ns))


# --------------------------------------------------------------------------- history counts


def test_a_shorter_history_counts_history_frames_and_the_current_one_apart(tmp_path: Path) -> None:
    folder = _episode(tmp_path)
    # step 1 cached with --max-history 1: one history frame (step 0) plus the current image
    tb.write_sidecar(folder / STEPS[1], frames=[STEPS[0], STEPS[1]])
    _episodes_root(tmp_path, 3)  # the layout with max_history 3 streams step 0 thrice, then step 1
    verdict, reason = _reasons(tmp_path)[f"{STEPS[1]}.vggt_cache.pt"]
    assert verdict is Verdict.CONTEXT_MISMATCH
    assert reason == (
        "cached with 2 frames (1 history frame + current): the episodes layout with max_history 3 "
        "streams 4 (3 history frames + current) for this step"
    )


def test_a_history_of_the_same_length_names_the_first_frame_that_differs(tmp_path: Path) -> None:
    folder = _episode(tmp_path)
    # step 3 with max_history 1 streams step 0 and step 3; this one was cached with step 2
    tb.write_sidecar(folder / STEPS[3], frames=[STEPS[2], STEPS[3]])
    _episodes_root(tmp_path, 1)
    verdict, reason = _reasons(tmp_path)[f"{STEPS[3]}.vggt_cache.pt"]
    assert verdict is Verdict.CONTEXT_MISMATCH
    assert reason == (
        f"cached with other history frames ({STEPS[2]} in place of {STEPS[0]}): the episodes layout "
        "with max_history 1 streams 2 (1 history frame + current) for this step"
    )


def test_the_verify_json_reason_counts_frames_as_the_docs_say(tmp_path: Path, cli_app, runner) -> None:
    folder = _episode(tmp_path)
    tb.write_sidecar(folder / STEPS[2], frames=[STEPS[1], STEPS[2]])
    _episodes_root(tmp_path, 2)
    doc = json.loads(runner.invoke(cli_app, ["verify", str(tmp_path), "--quick", "--json"]).stdout)
    assert [p["reason"] for p in doc["problems"]] == [
        "cached with 2 frames (1 history frame + current): the episodes layout with max_history 2 "
        "streams 3 (2 history frames + current) for this step"
    ]


# --------------------------------------------------------------------------- which frame changed


def test_a_changed_history_frame_is_named_under_the_episodes_rule(tmp_path: Path) -> None:
    folder = _episode(tmp_path)
    frames = [STEPS[0], STEPS[1], STEPS[2]]  # step 2 with max_history 2
    tb.write_sidecar(folder / STEPS[2], frames=frames)
    _episodes_root(tmp_path, 2)
    assert _reasons(tmp_path) == {}
    _later(folder / STEPS[1])
    verdict, reason = _reasons(tmp_path)[f"{STEPS[2]}.vggt_cache.pt"]
    assert verdict is Verdict.CONTEXT_MISMATCH
    assert reason == f"context frame {STEPS[1]} changed since the sidecar was written"


def test_a_changed_frame_is_named_without_a_history_rule(tmp_path: Path) -> None:
    """The annotations layout (no rule): the sidecar is checked against the frames it names."""
    image = tb.write_image(tmp_path / "cur.jpg")
    older, newer = tb.write_image(tmp_path / "h0.jpg", 1), tb.write_image(tmp_path / "h1.jpg", 2)
    path = tb.write_sidecar(image, frames=[older.name, newer.name, image.name])
    _later(newer)
    result = sidecar.classify(path, tb.expectation())
    assert result.verdict is Verdict.CONTEXT_MISMATCH
    assert result.reason == "context frame h1.jpg changed since the sidecar was written"


def test_a_frame_rewritten_with_its_old_mtime_is_found_by_its_ctime(tmp_path: Path) -> None:
    image = tb.write_image(tmp_path / "cur.jpg")
    frame = tb.write_image(tmp_path / "h0.jpg", 1)
    tb.age(frame, 3600)  # a frame from an hour before the sidecar
    old = os.stat(frame)
    path = tb.write_sidecar(image, frames=[frame.name, image.name])
    tb.age(path, 10)  # written 10 s ago: the file system's clock ticks coarser than its nanoseconds
    with open(frame, "ab") as fh:  # rewritten (another size) ...
        fh.write(b"\0" * 16)
    os.utime(frame, ns=(old.st_atime_ns, old.st_mtime_ns))  # ... with its old mtime put back
    assert os.stat(frame).st_mtime_ns < os.stat(path).st_mtime_ns
    result = sidecar.classify(path, tb.expectation())
    assert result.reason == "context frame h0.jpg changed since the sidecar was written"


def test_when_no_frame_is_newer_the_reason_says_it_cannot_tell_which(tmp_path: Path) -> None:
    image = tb.write_image(tmp_path / "cur.jpg")
    frame = tb.write_image(tmp_path / "h0.jpg", 1)
    path = tb.write_sidecar(image, frames=[frame.name, image.name])
    tb.touch_later(frame)  # changed ...
    _later(path, 3600)  # ... but the sidecar file is newer still (copied without its mtime, say)
    reason = sidecar.classify(path, tb.expectation()).reason
    assert reason.startswith("a context frame changed since the sidecar was written (which one")
    assert "h0.jpg" not in reason


def test_other_eviction_is_not_called_a_changed_frame(tmp_path: Path) -> None:
    folder = _episode(tmp_path)
    frames = [STEPS[0], STEPS[1], STEPS[2]]
    tb.write_sidecar(folder / STEPS[2], frames=frames, context=ContextSettings("sequence", 1, 1))
    _episodes_root(tmp_path, 2)
    verdict, reason = _reasons(tmp_path)[f"{STEPS[2]}.vggt_cache.pt"]
    assert verdict is Verdict.CONTEXT_MISMATCH
    assert "changed" not in reason
    assert "first 1 and last 1" in reason and "without eviction" in reason


# --------------------------------------------------------------------------- presets


def test_preset_mismatch_names_the_wanted_preset(tmp_path: Path) -> None:
    image = tb.write_image(tmp_path / "a.jpg")
    tb.write_sidecar(image, preprocess=tb.OTHER_PREPROCESS)
    manifest.record_run(tmp_path, {"kind": "precompute", "settings": {}}, tb.FEATURE_KEY)
    verdict, reason = _reasons(tmp_path)["a.jpg.vggt_cache.pt"]
    assert verdict is Verdict.PREPROCESS_MISMATCH
    assert reason == "preprocess preset 'other-preset' cached, 'test-preset' wanted"
    # the trainer's store says the same
    store = FeatureStore(tb.FEATURE_KEY)
    assert store.check(Item((str(image),))).reason == reason


def test_preset_of_the_same_name_with_other_settings_names_both_fingerprints(tmp_path: Path) -> None:
    image = tb.write_image(tmp_path / "a.jpg")
    tb.write_sidecar(image, preprocess={**tb.PREPROCESS, "fingerprint": "4" * 64})
    manifest.record_run(tmp_path, {"kind": "precompute", "settings": {}}, tb.FEATURE_KEY)
    _, reason = _reasons(tmp_path)["a.jpg.vggt_cache.pt"]
    assert reason == (
        f"preprocess preset 'test-preset' cached with other settings (fingerprint {'4' * 12}, "
        f"wanted {'1' * 12})"
    )


def test_an_expectation_without_the_preset_name_keeps_the_old_wording(tmp_path: Path) -> None:
    image = tb.write_image(tmp_path / "a.jpg")
    path = tb.write_sidecar(image, preprocess=tb.OTHER_PREPROCESS)
    expect = dataclasses.replace(tb.expectation(), preset=None)
    assert (
        sidecar.classify(path, expect).reason
        == "preprocess preset 'other-preset' differs from the one wanted"
    )


# --------------------------------------------------------------------------- random: models


def test_random_model_is_refused_with_what_it_is(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError) as caught:
        audit.expectation_from(tmp_path, "random:tiny")
    message = str(caught.value)
    assert "\n" not in message and "random:tiny" in message
    assert "no such checkpoint" not in message
    assert "without a checkpoint to fingerprint" in message and "leave --vggt-model out" in message


@pytest.mark.parametrize(
    "args",
    [
        ["verify", "--quick"],
        ["status", "--deep"],
        ["prune", "--model-changed", "--dry-run"],
    ],
)
def test_random_model_in_verify_status_and_prune_exits_2_with_one_line(tmp_path: Path, args) -> None:
    from vggtctl.cli.app import app

    tb.write_image(tmp_path / "a.jpg")
    command, *options = args
    result = CliRunner().invoke(app, [command, str(tmp_path), *options, "--vggt-model", "random:tiny"])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "random:tiny" in lines[0] and "leave --vggt-model out" in lines[0]
    assert "no such checkpoint" not in lines[0]


# --------------------------------------------------------------------------- the trainer's store


def test_the_trainers_store_names_where_its_history_differs_from_the_cached_one(tmp_path: Path) -> None:
    """FeatureStore knows the trainer's frames: a miss for another history names the first
    frame that differs, or the count, not only "context signature differs"."""
    folder = _episode(tmp_path)
    tb.write_sidecar(folder / STEPS[3], frames=[STEPS[0], STEPS[2], STEPS[3]])
    store = FeatureStore(SEQUENCE_KEY)
    other = store.check(Item.from_paths([folder / STEPS[1], folder / STEPS[2], folder / STEPS[3]]))
    assert other.verdict is Verdict.CONTEXT_MISMATCH
    assert other.reason == f"cached with another history: frame 0 was {STEPS[0]}, the trainer's is {STEPS[1]}"
    longer = store.check(Item.from_paths([folder / s for s in STEPS]))
    assert longer.reason == "cached with 3 frames, the trainer streams 4 for this item"


def test_the_trainers_store_names_the_frame_that_changed(tmp_path: Path) -> None:
    folder = _episode(tmp_path)
    tb.write_sidecar(folder / STEPS[2], frames=[STEPS[0], STEPS[1], STEPS[2]])
    tb.write_image(folder / STEPS[1], seed=99)  # rewritten after the sidecar
    _later(folder / STEPS[1])
    result = FeatureStore(SEQUENCE_KEY).check(Item.from_paths([folder / s for s in STEPS[:3]]))
    assert result.verdict is Verdict.CONTEXT_MISMATCH
    assert result.reason == f"context frame {STEPS[1]} changed since the sidecar was written"


def test_the_trainers_store_names_another_eviction_not_a_changed_frame(tmp_path: Path) -> None:
    """Same frames, cached with a K/V-cache eviction the trainer's key does not have."""
    folder = _episode(tmp_path)
    evicting = ContextSettings("sequence", 1, 1)
    tb.write_sidecar(folder / STEPS[2], frames=[STEPS[0], STEPS[1], STEPS[2]], context=evicting)
    result = FeatureStore(SEQUENCE_KEY).check(Item.from_paths([folder / s for s in STEPS[:3]]))
    assert result.verdict is Verdict.CONTEXT_MISMATCH
    assert result.reason.startswith("cached with context sequence (")
    assert result.reason.endswith("the current key's is sequence without eviction")
