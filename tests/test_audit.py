"""The audit library: one walk, exact verdict counts and bytes, no double stats, no temp reads."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import treebuilder as tb

from vggtctl import audit, manifest, scan, sidecar
from vggtctl.errors import CheckpointError
from vggtctl.sidecar import Expectation, Verdict


def test_counts_bytes_and_problems_match_ground_truth(make_tree) -> None:
    tree = make_tree(tb.EVERY_KIND)
    report = audit.audit(tree.root, tb.expectation(), workers=3)
    assert report.images == len(tree.images) + 1  # + the context-mismatch history frame
    for verdict in Verdict:
        assert report.count(verdict) == tree.counts()[verdict], verdict
        assert report.bytes(verdict) == tree.sizes(verdict), verdict
    assert {p.path: p.verdict for p in report.problems} == tree.problems()
    assert all(p.reason for p in report.problems)
    assert report.problem_count == len(tree.problems())
    assert not report.ok
    json.dumps(report.to_json())  # serializable as is


def test_full_mode_reads_tensors(make_tree) -> None:
    tree = make_tree({"a.jpg": "valid", "b.jpg": "valid"})
    nan = tb.features()
    nan[1, 1] = float("inf")
    bad = tb.write_sidecar(tree.root / "b.jpg", feats=nan)
    quick = audit.audit(tree.root, tb.expectation())
    full = audit.audit(tree.root, tb.expectation(), full=True)
    assert quick.count(Verdict.VALID) == 2
    assert full.count(Verdict.VALID) == 1
    assert [(p.path, p.verdict) for p in full.problems] == [(str(bad), Verdict.CORRUPT)]


def test_examples_are_bounded_and_valid_files_not_kept(make_tree) -> None:
    spec = {f"many/img{i:03d}.jpg": "valid" for i in range(70)}  # > one chunk per folder
    spec.update({f"many/stale{i}.jpg": "stale" for i in range(7)})
    tree = make_tree(spec)
    report = audit.audit(tree.root, tb.expectation(), workers=1)
    assert report.count(Verdict.VALID) == 70 and report.count(Verdict.STALE) == 7
    assert len(report.verdicts[Verdict.VALID].examples) == 5
    assert len(report.verdicts[Verdict.STALE].examples) == 5
    assert len(report.problems) == 7  # problems only: valid files leave nothing behind


def test_groups_split_counts(make_tree) -> None:
    tree = make_tree(tb.EVERY_KIND)
    root = str(tree.root)
    report = audit.audit(root, tb.expectation())
    auditor = audit.Auditor(tb.expectation(), group_of=lambda p: scan.group_of(root, os.path.dirname(p), 1))
    scan.summarize(root, on_listing=auditor.feed)
    grouped = auditor.report()
    expected: dict[str, dict[Verdict, int]] = {}
    for path, verdict in tree.expected.items():
        parts = os.path.relpath(path, root).split(os.sep)
        group = parts[0] if len(parts) > 1 else "."
        expected.setdefault(group, {}).setdefault(verdict, 0)
        expected[group][verdict] += 1
    assert {g: {v: n for v, n in c.items() if n} for g, c in grouped.groups.items()} == expected
    assert grouped.count(Verdict.VALID) == report.count(Verdict.VALID)
    assert set(grouped.to_json()["groups"]) == set(expected)


def test_no_second_stat_and_temps_never_opened(make_tree, monkeypatch: pytest.MonkeyPatch) -> None:
    tree = make_tree({"a.jpg": "valid", "b.jpg": "stale", "c.jpg": "temp", "d.jpg": "corrupt"})
    loaded: list[str] = []
    stats: list[str] = []
    torch_loaded: list[str] = []  # the header reader's fallback (torch.load) for what it does not model
    real_fast, real_load = sidecar._fast_header, sidecar._load
    real_image_stat, real_stat = audit._image_stat, sidecar._stat_or_none

    def spy_fast(path):
        loaded.append(os.fspath(path))
        return real_fast(path)

    def spy_load(path):
        torch_loaded.append(os.fspath(path))
        return real_load(path)

    def spy_stat(path):
        stats.append(path)
        return real_stat(path)

    def spy_image_stat(path):
        stats.append(path)
        return real_image_stat(path)

    monkeypatch.setattr(sidecar, "_fast_header", spy_fast)
    monkeypatch.setattr(sidecar, "_load", spy_load)
    monkeypatch.setattr(audit, "_image_stat", spy_image_stat)
    monkeypatch.setattr(sidecar, "_stat_or_none", spy_stat)
    report = audit.audit(tree.root, tb.expectation())
    assert report.count(Verdict.TEMP) == 1
    assert sorted(loaded) == sorted(tree.paths(Verdict.VALID, Verdict.STALE, Verdict.CORRUPT))
    assert set(torch_loaded) <= set(loaded)
    assert stats == []  # every image stat came from the scan's listing


def test_header_mode_never_reads_tensors(make_tree, monkeypatch: pytest.MonkeyPatch) -> None:
    tree = make_tree({"a.jpg": "valid", "b.jpg": "model-mismatch"})

    def no_full_read(*_a, **_k):
        raise AssertionError("header mode must not read tensors")

    monkeypatch.setattr(sidecar, "read", no_full_read)
    report = audit.audit(tree.root, tb.expectation())
    assert report.count(Verdict.VALID) == 1 and report.count(Verdict.MODEL_MISMATCH) == 1


def test_sidecar_of_unlisted_image_type_is_not_an_orphan(tmp_path: Path) -> None:
    image = tmp_path / "scan.tif"
    tb.write_image(tmp_path / "scan.png").rename(image)
    tb.write_sidecar(image)
    report = audit.audit(tmp_path, tb.expectation())
    assert report.count(Verdict.VALID) == 1 and report.count(Verdict.ORPHAN) == 0


def test_reclassify_moves_a_file(make_tree) -> None:
    tree = make_tree({"a.jpg": "valid", "b.jpg": "valid"})
    report = audit.audit(tree.root, tb.expectation())
    target = sorted(tree.paths(Verdict.VALID))[0]
    size = os.path.getsize(target)
    report.reclassify(target, Verdict.VALID, Verdict.CORRUPT, "features differ from a recompute", size)
    assert report.count(Verdict.VALID) == 1 and report.count(Verdict.CORRUPT) == 1
    assert report.bytes(Verdict.CORRUPT) == size
    assert [(p.path, p.reason) for p in report.problems] == [(target, "features differ from a recompute")]


def test_bug_in_a_worker_surfaces(make_tree, monkeypatch: pytest.MonkeyPatch) -> None:
    tree = make_tree({"a.jpg": "valid"})

    def broken(*_a, **_k):
        raise RuntimeError("boom")

    monkeypatch.setattr(audit, "classify", broken)
    with pytest.raises(RuntimeError, match="boom"):
        audit.audit(tree.root, None)


# --------------------------------------------------------------------------- expectation


def test_expectation_from_vggt_model_folder_and_file(tmp_path: Path, checkpoint: Path) -> None:
    by_folder = audit.expectation_from(tmp_path, str(checkpoint))
    by_file = audit.expectation_from(tmp_path, str(checkpoint / "model.safetensors"))
    assert by_folder == by_file == Expectation(model_fingerprint=tb.CURRENT_FINGERPRINT)
    assert audit.has_model_check(by_folder)


def test_expectation_from_manifest_key(tmp_path: Path) -> None:
    manifest.record_run(tmp_path, {"rate": 1.0}, tb.FEATURE_KEY)
    expect = audit.expectation_from(tmp_path)
    assert expect.model == tb.CURRENT_MODEL
    assert expect.preprocess_fingerprint == tb.PREPROCESS["fingerprint"]
    assert expect.context_kind == "none"
    assert tb.CURRENT_FINGERPRINT[:12] in audit.describe(expect)


def test_expectation_without_anything_checks_no_model(tmp_path: Path) -> None:
    expect = audit.expectation_from(tmp_path)
    assert expect == Expectation()
    assert not audit.has_model_check(expect)
    assert audit.describe(expect).startswith("no model check")


def test_tiny_random_fingerprint_matches_the_model_package(tmp_path: Path) -> None:
    from vggtctl.model import TINY_RANDOM_FINGERPRINT

    expect = audit.expectation_from(tmp_path, "tiny-random")
    assert expect.model_fingerprint == TINY_RANDOM_FINGERPRINT
    assert audit.describe(expect) == (
        f"model tiny-random (random weights: features are meaningless) {TINY_RANDOM_FINGERPRINT[:12]}"
    )


@pytest.mark.parametrize("spec", ["empty-folder", "missing/file.safetensors"])
def test_bad_checkpoint_specs_are_clear_errors(tmp_path: Path, spec: str) -> None:
    (tmp_path / "empty-folder").mkdir()
    with pytest.raises(CheckpointError, match=str(tmp_path / spec).split("/")[-1]):
        audit.expectation_from(tmp_path, str(tmp_path / spec))


def test_examples_are_the_first_paths_in_sorted_order_whatever_order_they_arrive_in() -> None:
    """Checker threads finish in any order; verify and prune must show the same examples."""
    import random

    paths = [f"/data/scene{s}/ep{e}/img.jpg.vggt_cache.pt" for s in range(3) for e in range(4)]
    for seed in range(3):
        shuffled = paths[:]
        random.Random(seed).shuffle(shuffled)
        report = audit.AuditReport(full=False, examples=5)
        for path in shuffled:
            report.add(Verdict.ORPHAN, path, 10)
        assert report.verdicts[Verdict.ORPHAN].examples == sorted(paths)[:5]
        assert report.verdicts[Verdict.ORPHAN].count == len(paths)
