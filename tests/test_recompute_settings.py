"""`verify --recompute` re-encodes with the settings the root was cached with, eviction included."""

from __future__ import annotations

from precompute_trees import episodes_tree, opts

from vggtctl.precompute import run
from vggtctl.recompute import options_from_manifest, recompute


def test_recompute_uses_the_recorded_kv_cache_eviction(tmp_path):
    """A root cached with a K/V-cache eviction: the recompute key must carry the same eviction,
    or every sampled sidecar is "not valid" for it and nothing is compared."""
    images = episodes_tree(tmp_path, episodes=1, steps=5)
    assert run(opts(tmp_path, max_history=3, evict_start=1, evict_recent=1)).encoded == len(images)
    options = options_from_manifest(tmp_path, None, "cpu")
    assert (options.evict_start, options.evict_recent) == (1, 1)
    report = recompute(options, 3, seed=0)
    assert (len(report.checks), report.skipped_not_valid, len(report.problems)) == (3, 0, 0)


def test_recompute_without_max_history_takes_the_roots(tmp_path):
    """Library use: options that name no max_history mean the root's, as for precompute."""
    images = episodes_tree(tmp_path, episodes=1, steps=4)
    assert run(opts(tmp_path, max_history=2)).encoded == len(images)
    report = recompute(opts(tmp_path), 2, seed=0)
    assert (len(report.checks), report.skipped_not_valid, len(report.problems)) == (2, 0, 0)
