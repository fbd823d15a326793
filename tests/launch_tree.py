"""A small data root for the `train` tests: plain images, some with valid sidecars.

The feature key is made up here (its fingerprints are arbitrary hex); sidecars are written
through the codec with metadata built for that key, so the expected coverage is known
without running the code under test: `valid` of `total` images.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from PIL import Image

from vggtctl import sidecar
from vggtctl.keys import ContextSettings, FeatureKey, ImageKey, ModelKey

MODEL = ModelKey(hashlib.sha256(b"launch test model").hexdigest(), "test-model", -2, "full", "bfloat16")
PREPROCESS = {"fingerprint": "3" * 64, "preset": "test-preset", "input_hw": [28, 28], "grid_hw": [2, 2]}
KEY = FeatureKey(MODEL, PREPROCESS["fingerprint"], PREPROCESS["preset"], ContextSettings("none"))
KEY_JSON = json.dumps(KEY.to_meta())  # the form `--feature-key` takes on the command line


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


# --------------------------------------------------------------------------- shared fixtures

LAUNCH_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "NNODES", "OMP_NUM_THREADS", "USE_VGGT_CACHE")
LAUNCH_PREFIXES = ("NCCL_", "GLOO_", "TORCH_NCCL_", "TORCH_DISTRIBUTED_", "SLURM_")


def train_app():  # -> typer.Typer
    """A Typer app holding only `train`, as the launch tests drive it."""
    import typer

    from vggtctl.cli import train

    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)

    @app.callback()
    def _root() -> None:
        """Test root."""

    train.register(app)
    return app


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def clean_launch_env(monkeypatch, extra: tuple[str, ...] = ()) -> None:
    """No launch variables from the machine running the tests, plain output, no GPUs seen."""
    import os

    from vggtctl.launch import plan as plan_module

    for name in list(os.environ):
        if name.startswith(LAUNCH_PREFIXES) or name in LAUNCH_VARIABLES + extra:
            monkeypatch.delenv(name)
    monkeypatch.setenv("NO_COLOR", "1")
    monkeypatch.setattr(plan_module, "count_cuda_devices", lambda: 0)
