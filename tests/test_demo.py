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
