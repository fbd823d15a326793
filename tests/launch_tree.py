"""A small data root for the `train` tests: plain images, some with valid sidecars.

The feature key is made up here (its fingerprints are arbitrary hex); sidecars are written
through the codec with metadata built for that key, so the expected coverage is known
without running the code under test: `valid` of `total` images.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from PIL import Image

from vggtctl import sidecar
from vggtctl.keys import ContextSettings, FeatureKey, ImageKey, ModelKey

MODEL = ModelKey(hashlib.sha256(b"launch test model").hexdigest(), "test-model", -2, "full", "bfloat16")
PREPROCESS = {"fingerprint": "3" * 64, "preset": "test-preset", "input_hw": [28, 28], "grid_hw": [2, 2]}
KEY = FeatureKey(MODEL, PREPROCESS["fingerprint"], PREPROCESS["preset"], ContextSettings("none"))


def make_root(base: Path, total: int = 6, valid: int = 6) -> Path:
    """`total` images under base/data/scenes/, the first `valid` with a sidecar valid for KEY."""
    root = base / "data"
    folder = root / "scenes"
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(total):
        image = folder / f"view_{i:02d}.jpg"
        Image.new("RGB", (16, 12), (i * 40 % 256, 90, 30)).save(image)
        if i < valid:
            meta = sidecar.build_meta(
                image_name=image.name,
                image_key=ImageKey.of(image),
                model=MODEL,
                preprocess=PREPROCESS,
                context=ContextSettings("none"),
                frames=[],
                signature=None,
            )
            feats = torch.full((4, 8), float(i), dtype=torch.bfloat16)
            sidecar.write(sidecar.sidecar_path(image), feats, meta)
    return root
