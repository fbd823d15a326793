"""`precompute` end to end, in this process (tiny-random model, CPU, fp32, no decode workers):
the three layouts, resume and --force, bad images, unwritable folders, a full disk, --dry-run
and --json. Every result is judged by the training side's `FeatureStore` or by ground truth the
test builds itself."""

from __future__ import annotations

import errno
import gc
import io
import json
import os
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from precompute_trees import (
    CLI_FAST,
    catalog_items,
    corrupt_sidecars,
    episodes_tree,
    failure_records,
    image,
    opts,
    plain_tree,
    sidecars_under,
    temp_files_under,
    verdicts,
)
from typer.testing import CliRunner

from vggtctl import manifest, sidecar
from vggtctl.catalog import Item
from vggtctl.cli.app import app
from vggtctl.errors import ConfigError
from vggtctl.keys import FeatureKey
from vggtctl.precompute import run
from vggtctl.precompute.stages import STAGES


def _key(outcome) -> FeatureKey:
    return FeatureKey.from_meta(outcome.feature_key)


def _invoke(*args: str):
    return CliRunner().invoke(app, ["precompute", *CLI_FAST, "--workers", "0", *args])  # later flags win


# --------------------------------------------------------------------------- layouts


def test_episodes_every_item_valid_rerun_encodes_nothing_force_all(tmp_path):
    images = episodes_tree(tmp_path)
    first = run(opts(tmp_path, max_history=2))
    assert (first.encoded, first.failed, first.plan.items) == (len(images), 0, len(images))
    assert sidecars_under(tmp_path) == sorted(sidecar.sidecar_path(p) for p in images)

    key = _key(first)
    assert manifest.load(tmp_path).current_key == key
    # where the loop's time went: every stage accounted, none longer than the run
    assert set(first.stage_seconds) == set(STAGES)
    assert all(v >= 0 for v in first.stage_seconds.values())
    assert sum(first.stage_seconds.values()) <= first.seconds + 0.05
    assert gc.get_freeze_count() == 0  # the loop froze the long-lived heap and gave it back
    assert key.context.kind == "sequence"
    items = catalog_items(tmp_path, max_history=2)
    assert verdicts(items, key) == {"valid": len(images)}
    header = sidecar.read_header(sidecar.sidecar_path(images[-1]))
    assert len(header.meta["context"]["frames"]) == 3  # max_history + 1, current image last
    assert header.meta["context"]["frames"][-1] == os.path.basename(images[-1])

    again = run(opts(tmp_path, max_history=2))
    assert (again.encoded, again.plan.already_valid, again.plan.to_encode) == (0, len(images), 0)

    before = {p: os.stat(p).st_mtime_ns for p in sidecars_under(tmp_path)}
    forced = run(opts(tmp_path, max_history=2, force=True))
    assert forced.encoded == len(images)
    assert all(os.stat(p).st_mtime_ns != before[p] for p in before)
    assert verdicts(items, key) == {"valid": len(images)}
    assert [r["encoded"] for r in manifest.load(tmp_path).runs] == [len(images), 0, len(images)]
    assert temp_files_under(tmp_path) == []
    assert list((tmp_path / ".vggtctl" / "claims").iterdir()) == []


def test_force_skips_what_another_run_wrote_after_it_began(tmp_path):
    """Two `--force` runs at once (two nodes) must not re-encode each other's fresh work: a
    sidecar written after the run began (here: its mtime an hour ahead) and valid is left."""
    images = episodes_tree(tmp_path, episodes=2, steps=4)
    run(opts(tmp_path, max_history=2))
    later = time.time() + 3600
    fresh, old = images[::2], images[1::2]
    for path in fresh:
        os.utime(sidecar.sidecar_path(path), (later, later))
    broken = sidecar.sidecar_path(fresh[0])  # fresh but not valid: must be re-encoded
    Path(broken).write_bytes(b"\0" * 64)
    os.utime(broken, (later, later))

    forced = run(opts(tmp_path, max_history=2, force=True))
    assert forced.encoded == len(old) + 1
    kept = [p for p in fresh[1:] if os.stat(sidecar.sidecar_path(p)).st_mtime == later]
    assert kept == fresh[1:]
    assert verdicts(catalog_items(tmp_path, max_history=2), _key(forced)) == {"valid": len(images)}
    assert [p.name for p in (tmp_path / ".vggtctl" / "claims").iterdir()] == []  # no probe left


def test_force_counts_from_when_the_run_began_not_from_when_encoding_began(tmp_path, monkeypatch):
    """A sidecar another run rewrote while this one was still walking the tree is fresh too."""
    from vggtctl.precompute import pipeline as pipeline_mod

    images = episodes_tree(tmp_path, episodes=2, steps=3)
    run(opts(tmp_path, max_history=2))
    real_load = pipeline_mod.load_catalog

    def slow_walk(*args, **kwargs):  # type: ignore[no-untyped-def]
        time.sleep(0.05)
        os.utime(sidecar.sidecar_path(images[0]))  # "rewritten" by another run meanwhile
        return real_load(*args, **kwargs)

    monkeypatch.setattr(pipeline_mod, "load_catalog", slow_walk)
    forced = run(opts(tmp_path, max_history=2, force=True))
    assert forced.encoded == len(images) - 1


def test_other_history_length_is_a_context_mismatch(tmp_path):
    episodes_tree(tmp_path, episodes=1, steps=4)
    outcome = run(opts(tmp_path, max_history=2))
    other = catalog_items(tmp_path, max_history=1)
    # step 0's history is frame 0 padded either way, so only the first item may still match
    assert verdicts(other[1:], _key(outcome)) == {"context-mismatch": 3}


def test_verify_status_and_prune_judge_histories_by_the_current_rule(tmp_path):
    """A run with another --max-history makes it current (and says so first); from then on,
    verify, status --deep and prune --model-changed agree with the trainer: the sidecars cached
    with the old history are context-mismatch, not valid."""
    images = episodes_tree(tmp_path, episodes=2, steps=3)
    run(opts(tmp_path, max_history=2))
    same = _invoke(str(tmp_path), "--max-history", "2", "--dry-run")
    assert "differ from the root's current ones" not in same.stderr
    cached_before = {p: Path(sidecar.sidecar_path(p)).read_bytes() for p in images}
    changed = _invoke(str(tmp_path), "--max-history", "3")
    assert changed.exit_code == 0, changed.output
    assert "note: these settings differ from the root's current ones (max_history 2 -> 3)" in changed.stderr
    for path in images[1:]:  # all but one sidecar still cached with the old history
        Path(sidecar.sidecar_path(path)).write_bytes(cached_before[path])

    doc = json.loads(CliRunner().invoke(app, ["verify", str(tmp_path), "--quick", "--json"]).stdout)
    counts = {v: d["count"] for v, d in doc["verdicts"].items() if d["count"]}
    assert counts == {"valid": 1, "context-mismatch": len(images) - 1}
    assert "max_history 3" in doc["expectation"]
    reasons = {p["reason"] for p in doc["problems"]}
    assert reasons == {
        "cached with 3 frames (2 history frames + current): the episodes layout with max_history 3 "
        "streams 4 (3 history frames + current) for this step"
    }
    served = verdicts(
        catalog_items(tmp_path, max_history=3), _key(run(opts(tmp_path, max_history=3, limit=0)))
    )
    assert served == {"valid": 1, "context-mismatch": len(images) - 1}  # what a trainer is served

    status = json.loads(CliRunner().invoke(app, ["status", str(tmp_path), "--deep", "--json"]).stdout)
    assert {v: d["count"] for v, d in status["deep"]["verdicts"].items()} == counts
    pruned = CliRunner().invoke(app, ["prune", str(tmp_path), "--model-changed", "--dry-run", "--json"])
    assert json.loads(pruned.stdout)["plan"]["categories"]["model-changed"]["files"] == len(images) - 1

    # naming the model replaces only the model of the check: preprocessing, context and history stay
    named = ["--vggt-model", "tiny-random"]
    doc = json.loads(CliRunner().invoke(app, ["verify", str(tmp_path), "--quick", "--json", *named]).stdout)
    assert {v: d["count"] for v, d in doc["verdicts"].items() if d["count"]} == counts
    pruned = CliRunner().invoke(
        app, ["prune", str(tmp_path), "--model-changed", "--dry-run", "--json", *named]
    )
    assert json.loads(pruned.stdout)["plan"]["categories"]["model-changed"]["files"] == len(images) - 1


def test_verify_names_the_history_frame_that_is_gone_as_the_trainer_does(tmp_path):
    images = sorted(p for p in episodes_tree(tmp_path, episodes=1, steps=4))
    run(opts(tmp_path, max_history=2))
    first = Path(images[0])
    os.unlink(first)
    doc = json.loads(CliRunner().invoke(app, ["verify", str(tmp_path), "--quick", "--json"]).stdout)
    reasons = {p["reason"] for p in doc["problems"] if p["verdict"] == "context-mismatch"}
    assert reasons == {f"context frame {first.name} is gone"}


def _episode_with_a_linked_frame(tmp_path):  # type: ignore[no-untyped-def]
    """One cached episode of 4 steps whose step 1 is a link into another 'mount'."""
    root = tmp_path / "root"
    images = sorted(episodes_tree(root, episodes=1, steps=4))
    source = tmp_path / "mount" / "frame.jpg"
    source.parent.mkdir()
    os.replace(images[1], source)
    os.symlink(source, images[1])
    run(opts(root, max_history=2))
    return root, images, source


def test_sidecars_streaming_a_dangling_history_frame_are_kept_not_pruned(tmp_path):
    """A history frame whose link lost its source (a mount down) is not gone: the sidecars that
    streamed it are valid again once the source is back, so no prune category deletes them."""
    root, images, source = _episode_with_a_linked_frame(tmp_path)
    os.replace(source, tmp_path / "away.jpg")  # the mount goes down
    doc = json.loads(CliRunner().invoke(app, ["verify", str(root), "--quick", "--json"]).stdout)
    later = {p["path"]: p["reason"] for p in doc["problems"] if p["verdict"] == "context-mismatch"}
    name = os.path.basename(images[1])
    assert later and set(later.values()) == {
        f"context frame {name} is a dangling symbolic link (its source unmounted?)"
    }
    plan = json.loads(
        CliRunner().invoke(app, ["prune", str(root), "--all-invalid", "--dry-run", "--json"]).stdout
    )["plan"]
    kept = {entry["path"] for entry in plan["image_unreachable_left"]}
    assert set(later) <= kept and plan["file_count"] == 0


def test_precompute_fails_the_items_of_a_dangling_frame_and_keeps_their_sidecars(tmp_path):
    """With a frame's source unmounted, the episode is not re-indexed without it: its items fail
    naming the link, and the sidecars of later steps (valid once the source is back) stay."""
    root, images, source = _episode_with_a_linked_frame(tmp_path)
    before = {p: Path(sidecar.sidecar_path(p)).read_bytes() for p in images[2:]}
    os.replace(source, tmp_path / "away.jpg")  # the mount goes down
    outcome = run(opts(root, max_history=2))
    assert outcome.encoded == 0 and outcome.failed == len(images) - 1  # the frame and its later steps
    reasons = {r["reason"] for r in failure_records(root)}
    assert any("symbolic link whose target is missing" in r for r in reasons), reasons
    assert {p: Path(sidecar.sidecar_path(p)).read_bytes() for p in images[2:]} == before
    os.replace(tmp_path / "away.jpg", source)  # back: everything valid again, nothing to encode
    assert run(opts(root, max_history=2)).encoded == 0


def test_a_rerun_without_max_history_resumes_with_the_roots(tmp_path):
    """The default 8 over a root cached with 3 would re-encode everything and make 8 current."""
    episodes_tree(tmp_path, episodes=1, steps=5)
    run(opts(tmp_path, max_history=3))
    again = _invoke(str(tmp_path), "--json")
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout)["encoded"] == 0 and "settings differ" not in again.stderr
    other = _invoke(str(tmp_path), "--max-history", "8", "--dry-run")
    assert "max_history 3 -> 8" in other.stderr  # named explicitly: announced, as before


def test_a_run_that_finds_no_items_leaves_the_current_key_alone(tmp_path):
    """A wrong --layout (or an empty annotation file) must not turn every sidecar into
    `model-changed` for verify and prune: the run is recorded, its key does not become current."""
    images = plain_tree(tmp_path)
    first = run(opts(tmp_path, context="none"))
    assert first.encoded == len(images)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    for wrong in (["--layout", "episodes"], ["--annotations", str(empty), "--context", "none"]):
        result = _invoke(str(tmp_path), *wrong)
        assert result.exit_code == 2, result.output
        assert manifest.load(tmp_path).current_key == _key(first)
    doc = json.loads(CliRunner().invoke(app, ["verify", str(tmp_path), "--quick", "--json"]).stdout)
    assert {v: d["count"] for v, d in doc["verdicts"].items() if d["count"]} == {"valid": len(images)}
    assert len(manifest.load(tmp_path).runs) == 1  # a run with no items records nothing


def test_a_limited_trial_with_other_settings_does_not_become_current(tmp_path):
    """One image tried with another preset must not make every other sidecar a mismatch that
    the next prune deletes; without --limit the new settings do become current."""
    images = episodes_tree(tmp_path, episodes=2, steps=3)
    first = run(opts(tmp_path, max_history=2))
    # another preset and a longer history: verify judges histories by the current run's rule
    trial = _invoke(str(tmp_path), "--max-history", "3", "--preset", "vggt-pad-518", "--limit", "1")
    assert trial.exit_code == 0 and "this run has --limit, so it is a trial" in trial.stderr
    recorded = manifest.load(tmp_path)
    assert recorded.current_key == _key(first) and len(recorded.runs) == 2
    assert verdicts(catalog_items(tmp_path, max_history=2), _key(first)) == {
        "valid": len(images) - 1,
        "preprocess-mismatch": 1,
    }
    settings = recorded.last_run_settings()
    assert (settings["preset"], settings["max_history"]) == ("vggt-crop-518", 2)
    checked = CliRunner().invoke(app, ["verify", str(tmp_path), "--quick", "--json"])
    assert json.loads(checked.stdout)["verdicts"]["valid"]["count"] == len(images) - 1
    run(opts(tmp_path, max_history=2, preset="vggt-pad-518"))
    assert manifest.load(tmp_path).current_key != _key(first)


def test_the_manifest_records_annotation_files_absolute(tmp_path, monkeypatch):
    """verify --recompute and train read them back from any folder and node."""
    image(tmp_path / "frames" / "a.jpg", 0)
    (tmp_path / "meta").mkdir()
    (tmp_path / "meta" / "train.jsonl").write_text(json.dumps({"image": "frames/a.jpg"}) + "\n")
    monkeypatch.chdir(tmp_path)
    result = _invoke(".", "--annotations", "meta/train.jsonl", "--data-path", ".")
    assert result.exit_code == 0, result.output
    settings = manifest.load(tmp_path).last_run_settings()
    assert settings["annotations"] == [str(tmp_path / "meta" / "train.jsonl")]
    assert settings["data_path"] == str(tmp_path)
    monkeypatch.chdir(tmp_path.parent)
    again = CliRunner().invoke(app, ["verify", str(tmp_path), "--recompute", "1", "--json"])
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout)["recompute"]["checked"] == 1


def test_the_settings_note_only_when_the_run_would_change_what_counts(tmp_path):
    """max_history means nothing to the annotations layout, and a run that finds no items does
    not become current: neither is announced as a change."""
    image(tmp_path / "frames" / "a.jpg", 0)
    image(tmp_path / "frames" / "b.jpg", 1)
    ann = tmp_path / "train.jsonl"
    ann.write_text(json.dumps({"images": ["frames/a.jpg", "frames/b.jpg"]}) + "\n")
    run(opts(tmp_path, annotations=[str(ann)], max_history=2))
    other = _invoke(str(tmp_path), "--annotations", str(ann), "--max-history", "5", "--dry-run")
    assert other.exit_code == 0 and "settings differ" not in other.stderr
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    nothing = _invoke(str(tmp_path), "--annotations", str(empty), "--context", "none", "--dry-run")
    assert nothing.exit_code == 2 and "settings differ" not in nothing.stderr
    changed = _invoke(str(tmp_path), "--annotations", str(ann), "--context", "none", "--dry-run")
    assert "note: these settings differ from the root's current ones (" in changed.stderr
    assert "context sequence -> none" in changed.stderr  # and attention full instead of causal
    evicting = _invoke(str(tmp_path), "--annotations", str(ann), "--evict-start", "1", "--dry-run")
    assert "context sequence -> sequence (K/V cache keeps the first 1 and last 0 frames)" in evicting.stderr
    assert "K/V cache keeps the first 1 and last 0 frames" in evicting.stdout  # the plan's context row


def test_status_of_an_annotations_root_promises_no_work_precompute_will_not_do(tmp_path):
    """Only the images the annotation files name are items: per-image projections (still to
    write, time to finish) would count the other images as work left."""
    for n in range(4):
        image(tmp_path / "frames" / f"{n}.jpg", n)
    ann = tmp_path / "train.jsonl"
    ann.write_text(json.dumps({"images": ["frames/0.jpg", "frames/1.jpg"]}) + "\n")
    assert run(opts(tmp_path, annotations=[str(ann)])).encoded == 1
    shown = CliRunner().invoke(app, ["status", str(tmp_path)])
    assert shown.exit_code == 0, shown.output
    assert "only the images they name need sidecars" in shown.stdout
    assert "Time to finish" not in shown.stdout and "still to write" not in shown.stdout
    footer = json.loads(CliRunner().invoke(app, ["status", str(tmp_path), "--json"]).stdout)["footer"]
    assert footer["layout"] == "annotations" and footer["eta_seconds"] is None
    # 3 images have no sidecar, but 0 items are left: the count of images is no count of work
    assert footer["todo_items"] is None and footer["remaining_cache_bytes"] is None


def test_plain_layout_context_none(tmp_path):
    images = plain_tree(tmp_path)
    outcome = run(opts(tmp_path))
    assert (outcome.plan.layout, outcome.plan.context) == ("plain", "none")
    assert outcome.encoded == len(images)
    key = _key(outcome)
    assert key.context.kind == "none"
    items = [Item.from_paths([p]) for p in images]  # ground truth: one item per image
    assert verdicts(items, key) == {"valid": len(images)}
    assert verdicts(catalog_items(tmp_path), key) == {"valid": len(images)}
    assert run(opts(tmp_path)).encoded == 0


@pytest.mark.parametrize("layout", ["plain", "episodes"])
def test_stored_features_are_what_the_trainer_computes_online(tmp_path, layout):
    """The pipeline sends bytes and makes k/255 where the model runs; the trainer's online path
    feeds `preset.load(...).tensor`. The two must give the same features (float32, CPU)."""
    from vggtctl.precompute.planning import build_encoder

    (plain_tree if layout == "plain" else episodes_tree)(tmp_path)
    options = opts(tmp_path, layout=layout, workers=2, batch_size=3)
    outcome = run(options)
    assert outcome.encoded > 0 and outcome.failed == 0
    sequence = outcome.plan.context == "sequence"
    encoder, preset = build_encoder(options, outcome.plan.context, torch.device("cpu"))
    for item in catalog_items(tmp_path, layout=layout):
        if sequence:
            frames = torch.stack([preset.load(frame).tensor for frame in item.frames])
            online = encoder.encode_sequences(frames[None])[0]
        else:
            online = encoder.encode_frames(preset.load(item.image).tensor[None])[0]
        stored = sidecar.read(sidecar.sidecar_path(item.image)).features
        torch.testing.assert_close(stored, online, rtol=1e-5, atol=1e-5)


def test_annotations_same_image_other_history_is_told_apart(tmp_path):
    a, b, c, d = (image(tmp_path / "frames" / f"{n}.jpg", seed) for seed, n in enumerate("abcd"))
    samples = [
        {"images": ["frames/a.jpg", "frames/c.jpg"]},
        {"images": ["frames/b.jpg", "frames/c.jpg"]},  # c again, after another history
        {"history_images": ["frames/a.jpg"], "current_image": "frames/b.jpg"},
        {"image": "frames/d.jpg"},
    ]
    ann = tmp_path / "train.jsonl"
    ann.write_text("".join(json.dumps(s) + "\n" for s in samples))
    outcome = run(opts(tmp_path, annotations=[str(ann)]))
    assert (outcome.plan.layout, outcome.plan.context) == ("annotations", "sequence")
    assert (outcome.plan.items, outcome.plan.sidecars, outcome.plan.conflicts) == (4, 3, 1)
    assert outcome.encoded == 3
    assert sidecars_under(tmp_path) == sorted(sidecar.sidecar_path(p) for p in (b, c, d))

    store_key = _key(outcome)
    first, second, third, fourth = (Item.from_paths(p) for p in ([a, c], [b, c], [a, b], [d]))
    judged = {item: verdicts([item], store_key) for item in (first, second, third, fourth)}
    assert judged[first] == {"valid": 1}
    assert judged[second] == {"context-mismatch": 1}  # never served the features of a's history
    assert judged[third] == {"valid": 1}
    assert judged[fourth] == {"valid": 1}
    assert run(opts(tmp_path, annotations=[str(ann)])).encoded == 0


def test_annotations_name_missing_images_and_images_outside_the_root(tmp_path):
    root = tmp_path / "root"
    image(root / "frames" / "a.jpg", 0)
    outside = image(tmp_path / "elsewhere" / "x.jpg", 1)
    ann = root / "train.jsonl"
    (root / "frames" / "dir.jpg").mkdir()
    samples = [
        {"image": "frames/a.jpg"},
        {"image": "frames/gone.jpg"},
        {"image": outside},
        {"image": "frames/dir.jpg"},
    ]
    ann.write_text("".join(json.dumps(s) + "\n" for s in samples))
    result = _invoke(str(root), "--annotations", str(ann), "--dry-run")
    assert result.exit_code == 0, result.output
    lines = result.stderr.splitlines()
    gone = root / "frames" / "gone.jpg"
    assert f"{gone}: image not found (named by the annotations; its samples are left out)" in lines
    folder = root / "frames" / "dir.jpg"
    assert f"{folder}: a folder, not an image (named by the annotations; its samples are left out)" in lines
    assert any(
        line.startswith(f"note: 1 annotated images lie outside {root} (e.g. {outside})") for line in lines
    ), lines


# --------------------------------------------------------------------------- --dry-run, --json


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    out = {}
    for folder, dirs, names in os.walk(root):
        for name in dirs + names:
            path = os.path.join(folder, name)
            st = os.stat(path)
            out[path] = (st.st_size, st.st_mtime_ns)
    return out


def test_dry_run_writes_nothing_and_json_is_one_document(tmp_path):
    images = episodes_tree(tmp_path)
    before = _snapshot(tmp_path)
    result = _invoke(str(tmp_path), "--max-history", "2", "--dry-run", "--json")
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)["plan"]  # the whole stdout is one document
    assert _snapshot(tmp_path) == before
    assert (plan["items"], plan["already_valid"], plan["to_encode"]) == (len(images), 0, len(images))
    assert plan["projected_bytes"] == plan["bytes_per_item"] * len(images) > 0
    assert plan["projected_seconds"] is None  # no run measured yet

    result = _invoke(str(tmp_path), "--max-history", "2", "--json")
    assert result.exit_code == 0, result.output
    done = json.loads(result.stdout)
    assert done["encoded"] == len(images)
    sizes = [os.path.getsize(p) for p in sidecars_under(tmp_path)]
    assert abs(plan["bytes_per_item"] - max(sizes)) / max(sizes) < 0.05

    assert set(done["stage_seconds"]) == set(STAGES)
    assert manifest.load(tmp_path).runs[-1]["stage_seconds"] == done["stage_seconds"]

    result = _invoke(str(tmp_path), "--max-history", "2", "--force")
    assert result.exit_code == 0 and "bound by" in result.stdout  # the summary reads the stages

    result = _invoke(str(tmp_path), "--max-history", "2", "--dry-run")
    assert result.exit_code == 0
    for label in ("items", "already valid", "to encode", "projected bytes", "projected time"):
        assert label in result.stdout
    result = _invoke(str(tmp_path), "--max-history", "2", "--dry-run", "--force", "--json")
    plan = json.loads(result.stdout)["plan"]
    assert plan["to_encode"] == len(images) and plan["projected_seconds"] > 0  # from the recorded rate


def test_limit_then_resume_and_verify(tmp_path):
    images = episodes_tree(tmp_path)
    part = run(opts(tmp_path, context="none", limit=3, verify=True))
    assert (part.encoded, part.verify_problems) == (3, 0)
    assert len(sidecars_under(tmp_path)) == 3
    rest = run(opts(tmp_path, context="none"))
    assert (rest.encoded, rest.plan.already_valid) == (len(images) - 3, 3)


def test_verify_read_back_shows_in_the_summary_and_compile_on_the_cpu_says_it_is_eager(tmp_path):
    images = episodes_tree(tmp_path, episodes=1, steps=3)
    result = _invoke(str(tmp_path), "--verify", "--compile")
    assert result.exit_code == 0, result.output
    assert f"{len(images)} sidecars, 0 corrupt" in result.stdout
    assert "--compile applies on a GPU only" in result.stderr
    doc = json.loads(_invoke(str(tmp_path), "--verify", "--force", "--json").stdout)
    assert (doc["verified"], doc["verify_problems"]) == (len(images), 0)


@pytest.mark.parametrize("where", ["run", "options_from"])
def test_ctrl_c_before_encoding_still_prints_one_json_document(tmp_path, monkeypatch, where):
    import vggtctl.precompute
    import vggtctl.precompute.configure

    episodes_tree(tmp_path, episodes=1, steps=2)

    def interrupted(*_args, **_kwargs):
        raise KeyboardInterrupt  # e.g. while the model loads, or while the settings are read

    module = vggtctl.precompute if where == "run" else vggtctl.precompute.configure
    monkeypatch.setattr(module, where, interrupted)
    result = _invoke(str(tmp_path), "--json")
    assert result.exit_code == 130
    assert json.loads(result.stdout) == {"interrupted": True, "encoded": 0, "before_encoding": True}
    assert "interrupted before encoding started" in result.stderr


def test_ctrl_c_after_the_encode_loop_reports_what_was_written(tmp_path, monkeypatch):
    """A Ctrl-C during --verify's read-back (or while rank 0 waits for slower ranks) comes after
    every sidecar was written: the run is interrupted, not 'before encoding', and is recorded."""
    images = episodes_tree(tmp_path)

    def classify(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sidecar, "classify", classify)
    result = _invoke(str(tmp_path), "--context", "none", "--verify", "--json")
    assert result.exit_code == 130, result.output
    doc = json.loads(result.stdout)
    assert doc["interrupted"] is True and doc["encoded"] == len(images) and "before_encoding" not in doc
    assert "before encoding started" not in result.stderr
    assert len(sidecars_under(tmp_path)) == len(images)
    (last,) = manifest.load(tmp_path).runs
    assert last["interrupted"] is True and last["encoded"] == len(images)


def test_a_ctrl_c_once_the_run_is_recorded_does_not_change_the_exit_code(tmp_path, monkeypatch):
    """The last half second (printing, exiting) comes after the manifest entry: a Ctrl-C then
    must not exit 130 next to a document that says the run completed."""
    import signal

    from vggtctl.cli import precompute as precompute_cli

    images = episodes_tree(tmp_path, episodes=1, steps=3)
    real_show = precompute_cli._show

    def show_after_a_late_ctrl_c(*args, **kwargs):  # type: ignore[no-untyped-def]
        os.kill(os.getpid(), signal.SIGINT)
        return real_show(*args, **kwargs)

    monkeypatch.setattr(precompute_cli, "_show", show_after_a_late_ctrl_c)
    result = _invoke(str(tmp_path), "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert (doc["interrupted"], doc["encoded"]) == (False, len(images))


BAD_OPTIONS = [
    (["--dtype", "int8"], "int8"),
    (["--preset", "nope"], "nope"),
    (["--layout", "nope"], "nope"),
    (["--batch-size", "-3"], "--batch-size -3"),  # once skipped 3 of every batch, exit 0
    (["--batch-size", "0"], "--batch-size 0"),
    (["--workers", "-2"], "--workers -2"),
    (["--limit", "-1"], "--limit -1"),
    (["--max-history", "-1"], "--max-history -1"),
    (["--gpus", "0"], "--gpus 0"),
    (["--device", "bogus"], "--device bogus: not a device name"),
    (["--device", "mps"], "--device mps: only cpu and cuda"),
    (["--devices", "foo"], "--devices foo: not a device name"),
]
if not torch.cuda.is_available():
    BAD_OPTIONS.append((["--device", "cuda"], "--device cuda: no CUDA device is visible"))


@pytest.mark.parametrize("bad, named", BAD_OPTIONS)
@pytest.mark.parametrize("dry_run", [False, True])
def test_bad_options_exit_2_with_one_line(tmp_path, bad, named, dry_run):
    episodes_tree(tmp_path, episodes=1, steps=2)
    result = _invoke(str(tmp_path), *bad, *(["--dry-run"] if dry_run else []))
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert named in result.stderr
    assert sidecars_under(tmp_path) == []


def test_a_check_that_cannot_stat_means_encode(tmp_path, monkeypatch):
    from vggtctl.data import FeatureStore
    from vggtctl.precompute import needs_encoding

    def check(self, item):
        raise PermissionError(errno.EACCES, "Permission denied", item.image)

    image(tmp_path / "x.jpg", 0)  # a root with an item: an empty one is an error of its own
    monkeypatch.setattr(FeatureStore, "check", check)
    key = FeatureKey.from_meta(run(opts(tmp_path, dry_run=True)).feature_key)
    assert needs_encoding(FeatureStore(key), Item.from_paths([tmp_path / "x.jpg"]))


# --------------------------------------------------------------------------- bad input


def test_bad_images_are_per_item_failures_exit_3(tmp_path):
    images = episodes_tree(tmp_path)
    garbage, empty, text, truncated = images[3], images[4], images[5], images[6]
    Path(garbage).write_bytes(os.urandom(3000))
    Path(empty).write_bytes(b"")
    Path(text).write_text("this is not an image\n")
    Path(truncated).write_bytes(Path(images[0]).read_bytes()[:400])
    bad = {garbage, empty, text, truncated}

    result = _invoke(str(tmp_path), "--context", "none", "--json")
    assert result.exit_code == 3, result.output
    doc = json.loads(result.stdout)
    assert (doc["encoded"], doc["failed"]) == (len(images) - len(bad), len(bad))
    records = failure_records(tmp_path)
    assert {r["path"] for r in records} == bad
    assert all(r["stage"] == "decode" and r["reason"] and r["run"] == doc["run_id"] for r in records)
    assert "failures.jsonl" in result.stderr
    key = FeatureKey.from_meta(doc["feature_key"])
    good = [Item.from_paths([p]) for p in images if p not in bad]
    assert verdicts(good, key) == {"valid": len(good)}
    assert not any(os.path.exists(sidecar.sidecar_path(p)) for p in bad)


def test_bad_history_frame_fails_the_items_that_stream_it(tmp_path):
    images = episodes_tree(tmp_path, episodes=1, steps=4)
    broken = images[1]
    Path(broken).write_bytes(b"\x89PNG but not really")
    outcome = run(opts(tmp_path, max_history=2))
    items = catalog_items(tmp_path, max_history=2)
    streaming_it = {item.image for item in items if broken in item.frames}
    assert len(streaming_it) == 3
    assert (outcome.encoded, outcome.failed) == (len(items) - 3, 3)
    records = {r["path"]: r for r in failure_records(tmp_path)}
    assert set(records) == streaming_it
    assert "context frame" not in records[broken]["reason"]
    for path in streaming_it - {broken}:
        assert records[path]["reason"].startswith(f"context frame {os.path.basename(broken)}: ")


def test_unwritable_folder_is_a_per_item_failure(tmp_path, monkeypatch):
    images = episodes_tree(tmp_path)
    locked = os.path.dirname(images[-1])
    real_write = sidecar.write

    def write(path, features, meta, *, fsync=False):
        if os.path.dirname(path) == locked:
            raise PermissionError(errno.EACCES, "Permission denied", path)
        return real_write(path, features, meta, fsync=fsync)

    monkeypatch.setattr(sidecar, "write", write)
    outcome = run(opts(tmp_path, context="none"))
    in_locked = [p for p in images if os.path.dirname(p) == locked]
    assert (outcome.encoded, outcome.failed) == (len(images) - len(in_locked), len(in_locked))
    records = failure_records(tmp_path)
    assert sorted(r["path"] for r in records) == in_locked
    for record in records:
        assert record["stage"] == "write"
        assert record["reason"] == (
            f"cannot write {os.path.basename(record['path'])}.vggt_cache.pt: Permission denied"
        )
    assert sidecars_under(tmp_path) == sorted(sidecar.sidecar_path(p) for p in images if p not in in_locked)


def test_an_unreadable_folder_is_named_once_and_makes_the_run_partial(tmp_path, monkeypatch):
    import scantree

    images = episodes_tree(tmp_path, episodes=2, steps=2)
    locked = tmp_path / "episode_001"
    scantree.deny(monkeypatch, locked)
    result = _invoke(str(tmp_path), "--max-history", "2")
    assert result.exit_code == 3, result.output
    line = f"{locked}: cannot read this folder (Permission denied); its images are left out"
    assert line in result.stderr.splitlines()
    assert "1 folders could not be read" in result.stderr
    assert sidecars_under(tmp_path) == sorted(sidecar.sidecar_path(p) for p in images if "episode_000" in p)


def test_a_symlinked_episode_folder_is_named_not_skipped_silently(tmp_path):
    root = tmp_path / "root"
    images = episodes_tree(root, episodes=1, steps=2)
    episodes_tree(tmp_path / "elsewhere", episodes=1, steps=2)
    (root / "episode_linked").symlink_to(tmp_path / "elsewhere" / "episode_000", target_is_directory=True)
    result = _invoke(str(root), "--dry-run")
    assert result.exit_code == 0, result.output
    assert "episode_linked: a symbolic link to a folder: not followed" in result.stderr
    as_json = _invoke(str(root), "--dry-run", "--json")  # scripts read stdout only
    examples = json.loads(as_json.stdout)["plan"]["catalog_problem_examples"]
    assert [(e["path"], e["line"]) for e in examples] == [(str(root / "episode_linked"), None)]
    assert "not followed" in examples[0]["reason"]
    assert run(opts(root)).encoded == len(images)  # still only the real folder's


def test_json_names_the_first_missing_images_and_counts_the_rest(tmp_path):
    image(tmp_path / "frames" / "0.jpg", 0)
    ann = tmp_path / "train.jsonl"
    lines = [{"images": ["frames/0.jpg"]}] + [{"images": [f"frames/gone{n:02d}.jpg"]} for n in range(25)]
    ann.write_text("".join(json.dumps(line) + "\n" for line in lines))
    result = _invoke(str(tmp_path), "--annotations", str(ann), "--dry-run", "--json")
    plan = json.loads(result.stdout)["plan"]
    assert plan["missing_images"] == 25
    assert plan["missing_image_examples"] == [
        str(tmp_path / "frames" / f"gone{n:02d}.jpg") for n in range(20)
    ]


def test_one_entry_that_cannot_be_read_leaves_out_that_entry_not_the_folder(tmp_path):
    images = episodes_tree(tmp_path, episodes=1, steps=4)
    loop = tmp_path / "episode_000" / "step_9_STOP.jpg"
    loop.symlink_to(loop)  # stat: too many levels of symbolic links
    outcome = run(opts(tmp_path))
    assert outcome.encoded == len(images)  # every other step of the folder is still there
    result = _invoke(str(tmp_path), "--dry-run")
    assert "step_9_STOP.jpg: cannot read it (Too many levels of symbolic links); left out" in result.stderr


def test_an_image_an_episode_cannot_place_is_named(tmp_path):
    episodes_tree(tmp_path, episodes=1, steps=2)
    stray = tmp_path / "episode_000" / "step_2_TURN LEFT.jpg"  # a space: not an action name
    image(stray, seed=5)
    image(tmp_path / "maps" / "m1.png", seed=6)  # a folder of other images under the root
    image(tmp_path / "maps" / "m0.png", seed=7)
    result = _invoke(str(tmp_path), "--layout", "episodes", "--max-history", "2", "--dry-run")
    assert result.exit_code == 0, result.output
    assert f"{stray}: image left out: its name is not step_<idx>_<ACTION>.(jpg|png)" in result.stderr
    maps = tmp_path / "maps"
    assert (
        f"{maps}: folder left out: its 2 images are not step_<idx>_<ACTION>.(jpg|png) frames (e.g. m0.png)"
        in (result.stderr)
    )


def test_unwritable_data_root_is_a_clear_error(tmp_path):
    episodes_tree(tmp_path, episodes=1, steps=2)
    (tmp_path / ".vggtctl").write_text("a file where the run state folder should be")
    with pytest.raises(ConfigError, match=r"\.vggtctl/claims: cannot create it"):
        run(opts(tmp_path, context="none"))


def test_out_of_memory_halves_the_batch_then_fails_single_items(tmp_path, monkeypatch):
    from vggtctl.encoder import Encoder

    images = episodes_tree(tmp_path)
    unlucky = images[5]
    real = Encoder.encode_frames

    def encode_frames(self, batch):
        # a forward of more than one frame "runs out of memory"; so does the unlucky image alone
        if batch.shape[0] > 1 or torch.equal(batch[0], self.preset.load(unlucky).tensor):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(self, batch)

    monkeypatch.setattr(Encoder, "encode_frames", encode_frames)
    outcome = run(opts(tmp_path, context="none", batch_size=4))
    assert (outcome.encoded, outcome.failed) == (len(images) - 1, 1)
    [record] = failure_records(tmp_path)
    assert (record["path"], record["stage"]) == (unlucky, "encode")
    assert "out of memory" in record["reason"]


@pytest.fixture
def disk_fills_after(monkeypatch):
    """Once `n` sidecar files were opened, later ones fail with ENOSPC after their first KiB.

    The real torch.save writes to them, as on a full disk: its zip writer swallows the OSError
    and raises a RuntimeError without errno ("unexpected pos"), which must still read as ENOSPC.
    """

    def install(n: int) -> None:
        opened = Counter()
        lock = threading.Lock()

        class FillingFile(io.FileIO):
            full = False

            def write(self, data):  # type: ignore[no-untyped-def]
                if self.full and self.tell() > 1024:
                    raise OSError(errno.ENOSPC, "No space left on device")
                return super().write(data)

        def open_sidecar(path, mode="r", *args, **kwargs):  # type: ignore[no-untyped-def]
            with lock:
                opened["files"] += 1
                full = opened["files"] > n
            fh = FillingFile(path, mode)
            fh.full = full
            return fh

        monkeypatch.setattr(sidecar, "open", open_sidecar, raising=False)

    return install


def test_disk_full_stops_cleanly(tmp_path, disk_fills_after):
    images = episodes_tree(tmp_path, episodes=3, steps=4)
    disk_fills_after(3)
    outcome = run(opts(tmp_path, context="none", batch_size=2))
    assert "No space left on device" in outcome.disk_full
    assert outcome.encoded == 3
    assert outcome.encoded + outcome.failed + outcome.not_written < len(images)  # it stopped early
    assert temp_files_under(tmp_path) == []
    written = sidecars_under(tmp_path)
    assert len(written) == 3
    assert corrupt_sidecars(tmp_path) == []
    assert verdicts([Item.from_paths([sidecar.image_path_of(p)]) for p in written], _key(outcome)) == {
        "valid": 3
    }
    assert manifest.load(tmp_path).runs[-1]["disk_full"]


def test_disk_full_counts_every_encoded_row(tmp_path, disk_fills_after, monkeypatch):
    from vggtctl.encoder import Encoder

    episodes_tree(tmp_path, episodes=3, steps=4)
    real, rows = Encoder.encode_frames, []
    monkeypatch.setattr(Encoder, "encode_frames", lambda self, b: rows.append(len(b)) or real(self, b))
    disk_fills_after(3)
    outcome = run(opts(tmp_path, context="none", batch_size=2))
    assert outcome.disk_full and outcome.not_written > 0
    assert sum(rows) == outcome.encoded + outcome.failed + outcome.not_written
    assert outcome.failed == 0 and failure_records(tmp_path) == []  # a full disk is no item's fault


def test_disk_full_exit_3_with_message(tmp_path, disk_fills_after):
    episodes_tree(tmp_path, episodes=2, steps=4)
    disk_fills_after(2)
    result = _invoke(str(tmp_path), "--context", "none", "--batch-size", "2", "--json")
    assert result.exit_code == 3, result.output
    assert json.loads(result.stdout)["encoded"] == 2
    assert "disk is full" in result.stderr and "rerun" in result.stderr
    human = _invoke(str(tmp_path), "--context", "none", "--batch-size", "2")
    assert "not written (disk full)" in human.stdout
    assert temp_files_under(tmp_path) == []


def test_a_claim_the_full_disk_refuses_stops_the_run_like_a_write(tmp_path, monkeypatch):
    from test_precompute_units import _claims_fail_after

    images = episodes_tree(tmp_path, episodes=3, steps=4)
    _claims_fail_after(monkeypatch, 2)
    outcome = run(opts(tmp_path, context="none", batch_size=2, chunk_items=2))
    assert outcome.disk_full.endswith(".claim: No space left on device")
    assert 0 < outcome.encoded < len(images) and outcome.failed == 0
    assert list((tmp_path / ".vggtctl" / "claims").glob("*.claim")) == []
    monkeypatch.undo()
    rerun = run(opts(tmp_path, context="none", batch_size=2, chunk_items=2))
    assert (rerun.skipped_claimed, rerun.encoded + outcome.encoded) == (0, len(images))


def test_a_claim_that_cannot_be_written_otherwise_is_one_clear_error(tmp_path, monkeypatch):
    from test_precompute_units import _claims_fail_after

    episodes_tree(tmp_path, episodes=3, steps=4)
    _claims_fail_after(monkeypatch, 1, errno.EIO)
    result = _invoke(str(tmp_path), "--context", "none", "--batch-size", "2", "--chunk-items", "2")
    assert result.exit_code == 2, result.output
    assert ".claim: cannot write this claim (Input/output error)" in result.stderr
    assert "Traceback" not in result.output
    assert list((tmp_path / ".vggtctl" / "claims").glob("*.claim")) == []


def test_the_threaded_handoff_of_the_gpu_path_writes_every_item(tmp_path, monkeypatch):
    # On CUDA the rows reach the writers from a handoff thread; run that path on the CPU.
    import functools

    from vggtctl.precompute import pipeline as pipeline_mod
    from vggtctl.precompute.gpu import GpuPipeline

    monkeypatch.setattr(pipeline_mod, "GpuPipeline", functools.partial(GpuPipeline, handoff_thread=True))
    images = episodes_tree(tmp_path)
    outcome = run(opts(tmp_path, max_history=2, batch_size=2))
    assert (outcome.encoded, outcome.failed) == (len(images), 0)
    assert verdicts(catalog_items(tmp_path, max_history=2), _key(outcome)) == Counter(valid=len(images))
    assert outcome.stage_seconds["handoff"] > 0  # rows went through the handoff
    assert not [t for t in threading.enumerate() if t.name == "vggtctl-handoff"]  # stopped with the run


def test_status_names_the_items_the_last_run_failed(tmp_path):
    """A bad image stays without a sidecar: status counts it as still to do, and says that the
    last run failed it and where the reason is, until a run no longer fails it."""
    images = plain_tree(tmp_path)
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg at all")
    first = run(opts(tmp_path))
    assert (first.encoded, first.failed) == (len(images), 1)
    shown = CliRunner().invoke(app, ["status", str(tmp_path)])
    assert "Failed: 1 item in the last precompute run" in shown.stdout
    assert "failures.jsonl" in shown.stdout
    footer = json.loads(CliRunner().invoke(app, ["status", str(tmp_path), "--json"]).stdout)["footer"]
    assert (footer["last_run_failed"], footer["todo_items"]) == (1, 1)
    image(bad, 99)  # fixed
    assert run(opts(tmp_path)).failed == 0
    shown = CliRunner().invoke(app, ["status", str(tmp_path)])
    assert "Failed:" not in shown.stdout
