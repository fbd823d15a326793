"""`verify --recompute K`: passes on what precompute wrote, fails once a stored tensor is altered."""

from __future__ import annotations

import json
import os

import pytest
import torch
from precompute_trees import cached_episode
from typer.testing import CliRunner

from vggtctl import sidecar
from vggtctl.cli.app import app
from vggtctl.recompute import compare


@pytest.fixture(scope="module")
def cached_tree(tmp_path_factory):
    return cached_episode(tmp_path_factory.mktemp("recompute"))


def _verify(root, k):
    result = CliRunner().invoke(app, ["verify", str(root), "--recompute", str(k), "--json"])
    return result.exit_code, json.loads(result.stdout)


def test_recompute_passes_on_fresh_cache(cached_tree):
    code, doc = _verify(cached_tree, 3)
    assert code == 0, doc
    assert doc["recompute"]["checked"] == 3
    assert all(check["ok"] and check["max_abs_diff"] == 0.0 for check in doc["recompute"]["checks"])


def test_recompute_fails_after_tensor_altered(cached_tree):
    victim = sorted(cached_tree.glob("episode_*/*.vggt_cache.pt"))[1]
    stored = torch.load(victim, map_location="cpu", weights_only=True)
    altered = stored["features"].clone()
    altered[0] += 0.5  # one patch token moved: still finite, same shape, header still valid
    sidecar.write(victim, altered, stored["meta"])
    try:
        code, doc = _verify(cached_tree, 3)
        assert code == 1
        bad = [c for c in doc["recompute"]["checks"] if not c["ok"]]
        assert [c["path"] for c in bad] == [str(victim)]
        assert bad[0]["max_abs_diff"] == pytest.approx(0.5, rel=1e-4)
    finally:
        sidecar.write(victim, stored["features"], stored["meta"])


def test_compare_tolerances():
    ref = torch.randn(16, 8, generator=torch.Generator().manual_seed(0))
    assert compare(ref, ref.clone(), "float32")[0]
    assert not compare(ref, ref + 0.01, "float32")[0]
    assert not compare(ref, -ref, "bfloat16")[0]
    noisy = ref.bfloat16().float()
    assert compare(noisy, ref, "bfloat16")[0]


def test_compare_catches_a_scaled_tensor_by_its_max_abs_diff_alone():
    """Same direction (cosine exactly 1), half again as large: only the max-abs check sees it."""
    ref = torch.randn(16, 8, generator=torch.Generator().manual_seed(0))
    ok, max_abs, cosine, reason = compare(ref * 1.5, ref, "float32")
    assert not ok and reason.startswith("max abs diff")
    assert max_abs == pytest.approx(0.5 * float(ref.abs().max()), rel=1e-6)
    assert cosine == pytest.approx(1.0, abs=1e-9)


def test_compare_catches_noise_within_the_max_abs_bound_by_its_cosine_alone():
    """Every element moved by 8% of the largest value, in random directions: within bf16's 10%
    max-abs bound, but the direction of the whole tensor has changed."""
    ref = torch.randn(16, 8, generator=torch.Generator().manual_seed(0))
    signs = torch.randn(16, 8, generator=torch.Generator().manual_seed(1)).sign()
    noise = 0.08 * ref.abs().max() * signs
    stored = ref + noise
    # the construction, checked here without compare(): max-abs passes, cosine does not
    assert float((stored - ref).abs().max()) < 0.1 * float(ref.abs().max())
    a, b = stored.double().flatten(), ref.double().flatten()
    assert float(a @ b / (a.norm() * b.norm())) < 0.99
    ok, _, cosine, reason = compare(stored, ref, "bfloat16")
    assert not ok and reason.startswith("cosine") and cosine < 0.99


def test_compare_a_shape_mismatch_is_a_result_not_an_error():
    ref = torch.randn(16, 8, generator=torch.Generator().manual_seed(0))
    ok, max_abs, cosine, reason = compare(ref, ref[:8], "float32")
    assert (ok, max_abs, cosine) == (False, float("inf"), 0.0)
    assert "shape" in reason and "(16, 8)" in reason and "(8, 8)" in reason


def test_recompute_reports_unreadable_features_instead_of_crashing(cached_tree):
    victim = sorted(cached_tree.glob("episode_*/*.vggt_cache.pt"))[0]
    stored = torch.load(victim, map_location="cpu", weights_only=True)
    poisoned = stored["features"].clone()
    poisoned[0, 0] = float("nan")  # the header stays valid; only reading the tensor tells
    sidecar.write(victim, poisoned, stored["meta"])
    try:
        code, doc = _verify(cached_tree, 3)
        assert code == 1
        bad = [c for c in doc["recompute"]["checks"] if not c["ok"]]
        assert [c["path"] for c in bad] == [str(victim)]
        assert "cannot read the stored features" in bad[0]["reason"] and "NaN" in bad[0]["reason"]
    finally:
        sidecar.write(victim, stored["features"], stored["meta"])


def test_recompute_compares_only_valid_sidecars_and_counts_the_others(cached_tree):
    images = sorted(cached_tree.glob("episode_*/*.jpg"))
    last = images[-1]  # no later frame streams it as history: only its own sidecar goes stale
    before = last.stat()
    last.write_bytes(last.read_bytes() + b"\0")  # the image changed: its sidecar is stale
    try:
        result = CliRunner().invoke(app, ["verify", str(cached_tree), "--recompute", "3", "--json"])
        doc = json.loads(result.stdout)
        assert result.exit_code == 1  # the stale sidecar is a problem of the verdicts
        assert doc["recompute"]["skipped_not_valid"] == 1
        assert doc["recompute"]["checked"] == 2 and doc["recompute"]["mismatches"] == 0
        text = CliRunner().invoke(app, ["verify", str(cached_tree), "--recompute", "3"]).stdout
        assert "1 sampled sidecars were not valid for the key" in text
    finally:
        last.write_bytes(last.read_bytes()[:-1])
        os.utime(last, ns=(before.st_atime_ns, before.st_mtime_ns))
