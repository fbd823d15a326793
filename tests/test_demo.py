"""`vggtctl demo`: generates episodes, precomputes them with tiny-random, shows status; reruns resume."""

from __future__ import annotations

from typer.testing import CliRunner

from vggtctl.catalog import load_catalog
from vggtctl.cli.app import app
from vggtctl.data import FeatureStore
from vggtctl.manifest import load as load_manifest


def test_demo_covers_every_item_and_resumes(tmp_path):
    root = tmp_path / "demo"
    args = ["demo", str(root), "--episodes", "2", "--steps", "3", "--max-history", "1"]
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0, first.output
    assert "features are meaningless" in first.output
    images = sorted(root.glob("episode_*/step_*.jpg"))
    assert len(images) == 6
    key = load_manifest(root).current_key
    assert key is not None and key.model.name == "tiny-random"
    store = FeatureStore(key)
    catalog = load_catalog(root, "episodes", max_history=1)
    assert all(store.get(item) is not None for item in catalog.items)
    assert store.stats.hits == 6

    second = CliRunner().invoke(app, args)
    assert second.exit_code == 0, second.output
    assert load_manifest(root).runs[-1]["encoded"] == 0


def test_precomputed_features_equal_the_online_fallback_bit_for_bit(tmp_path):
    """What precompute wrote is what a trainer's online fallback computes (CPU, fp32, tiny):
    the dataset yields the frames, OnlineFeatures encodes them with the same encoder."""
    import torch

    from vggtctl.data import CachedFeaturesDataset, OnlineFeatures
    from vggtctl.demo import make_dataset
    from vggtctl.precompute import PrecomputeOptions, build_encoder, run

    root = tmp_path / "eps"
    make_dataset(root, episodes=1, steps=4, size=(64, 48))
    opts = PrecomputeOptions(root=root, vggt_model="tiny-random", max_history=2, device="cpu", workers=0)
    assert run(opts).encoded == 4
    encoder, preset = build_encoder(opts, "sequence", torch.device("cpu"))
    store = FeatureStore(load_manifest(root).current_key)
    online = OnlineFeatures.for_store(encoder, store)
    items = load_catalog(root, "episodes", max_history=2).items
    dataset = CachedFeaturesDataset(items, store, preset, load_images="always")
    for index in range(len(items)):
        sample = dataset[index]
        assert sample["cache_status"] == "hit"
        assert torch.equal(online(sample["images_vggt"]), sample["vggt_features"])


def test_demo_interrupted_exits_130_with_one_line(tmp_path, monkeypatch):
    import vggtctl.precompute

    def interrupted(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(vggtctl.precompute, "run", interrupted)
    result = CliRunner().invoke(app, ["demo", str(tmp_path / "demo"), "--episodes", "1", "--steps", "2"])
    assert result.exit_code == 130
    assert "interrupted; rerun `vggtctl demo` to resume" in result.output


def test_demo_refuses_a_folder_it_did_not_make_and_touches_nothing(tmp_path):
    from vggtctl.demo import make_dataset

    real = tmp_path / "real"
    make_dataset(real, episodes=1, steps=2, size=(32, 24))
    (real / "notes.txt").write_text("mine")
    before = sorted(p.name for p in real.rglob("*"))
    result = CliRunner().invoke(app, ["demo", str(real)])
    assert result.exit_code == 2
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert "not made by `vggtctl demo`" in result.stderr
    assert sorted(p.name for p in real.rglob("*")) == before  # no sidecar, no manifest

    afile = tmp_path / "afile"
    afile.write_text("x")
    result = CliRunner().invoke(app, ["demo", str(afile)])
    assert result.exit_code == 2 and "not a folder" in result.stderr

    empty = tmp_path / "empty"
    empty.mkdir()
    result = CliRunner().invoke(app, ["demo", str(empty), "--episodes", "1", "--steps", "2"])
    assert result.exit_code == 0, result.output
    assert (empty / ".vggtctl" / "demo").is_file()
