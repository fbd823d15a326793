"""Small data roots and checks shared by the precompute tests.

Images are 160x48, so the `vggt-crop-518` preset feeds the tiny model 518x154 inputs (11x37
patches) instead of janusvln's 644x644: the tests stay fast while the pipeline is the real one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from vggtctl import sidecar
from vggtctl.catalog import Item, load_catalog
from vggtctl.data import FeatureStore
from vggtctl.demo import make_dataset
from vggtctl.keys import FeatureKey
from vggtctl.precompute import PrecomputeOptions

SIZE = (160, 48)  # width, height
FAST = {"vggt_model": "tiny-random", "preset": "vggt-crop-518", "device": "cpu", "workers": 0}
CLI_FAST = ["--vggt-model", "tiny-random", "--preset", "vggt-crop-518", "--device", "cpu"]


def episodes_tree(root: Path, episodes: int = 2, steps: int = 4, seed: int = 0) -> list[str]:
    """`<root>/episode_<k>/step_<i>_<ACTION>.jpg`; returns every image path (one item each)."""
    return sorted(str(p) for p in make_dataset(root, episodes=episodes, steps=steps, size=SIZE, seed=seed))


def image(path: Path, seed: int, size: tuple[int, int] = SIZE) -> str:
    """A random RGB image at `path` (format from the suffix)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return str(path)


def plain_tree(root: Path) -> list[str]:
    """Images in nested folders with no episode naming: the plain layout, context none."""
    names = ["cams/front/0001.jpg", "cams/front/0002.jpg", "cams/rear/0001.png", "misc/shot.jpg", "top.png"]
    return sorted(image(root / name, seed) for seed, name in enumerate(names))


def opts(root: Path, **overrides: Any) -> PrecomputeOptions:
    return PrecomputeOptions(root=root, **{**FAST, **overrides})


def catalog_items(root: Path, **kwargs: Any) -> list[Item]:
    return load_catalog(root, **kwargs).items


def verdicts(items: Iterable[Item], key: FeatureKey) -> Counter[str]:
    """How the training-side store judges each item's sidecar (header check)."""
    store = FeatureStore(key)
    return Counter(str(store.check(item).verdict) for item in items)


def sidecars_under(root: Path) -> list[str]:
    return sorted(
        os.path.join(d, n) for d, _, names in os.walk(root) for n in names if sidecar.is_sidecar_name(n)
    )


def temp_files_under(root: Path) -> list[str]:
    return sorted(
        os.path.join(d, n) for d, _, names in os.walk(root) for n in names if sidecar.is_temp_name(n)
    )


def corrupt_sidecars(root: Path) -> list[str]:
    """Sidecars that do not load in full (what `verify` calls corrupt)."""
    return [
        p for p in sidecars_under(root) if sidecar.classify(p, full=True).verdict is sidecar.Verdict.CORRUPT
    ]


def failure_records(root: Path) -> list[dict[str, Any]]:
    path = root / ".vggtctl" / "failures.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def cli_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VGGTCTL_") or k == "VGGTCTL_CACHE_DIR"}
    env.update({"NO_COLOR": "1", "OMP_NUM_THREADS": "1"})
    env.update(extra or {})
    return env


def start_cli(
    *args: str, env: Mapping[str, str] | None = None, own_group: bool = False
) -> subprocess.Popen[str]:
    """`python -m vggtctl ARGS` in a new process (works without the console script).
    `own_group`: a process group of its own, so a signal can reach it and its workers at once,
    as Ctrl-C in a terminal does."""
    return subprocess.Popen(
        [sys.executable, "-m", "vggtctl", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=cli_env(env),
        start_new_session=own_group,
    )


def cached_episode(root: Path) -> Path:
    """One demo episode of 3 steps under `root`, cached by precompute with tiny-random (history 1,
    CPU, seconds): a root to recompute, verify and alter."""
    from vggtctl.precompute import run

    make_dataset(root, episodes=1, steps=3, size=(64, 48))
    outcome = run(
        PrecomputeOptions(root=root, vggt_model="tiny-random", max_history=1, device="cpu", workers=0)
    )
    assert outcome.encoded == 3
    return root
