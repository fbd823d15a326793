"""A small synthetic `episodes` dataset for the demo and the tests.

Frames of an episode are correlated like an agent's camera: one procedurally drawn scene,
shifted and zoomed a little per action, so neighbouring steps look alike.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

ACTIONS = ("MOVE_FORWARD", "TURN_LEFT", "TURN_RIGHT")


def _scene(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A wide panorama: sky/floor gradient plus random coloured boxes."""
    pano_w = width * 3
    img = np.zeros((height, pano_w, 3), dtype=np.float32)
    sky = np.linspace(0.9, 0.5, height // 2)[:, None, None] * np.array([0.6, 0.8, 1.0])
    floor = np.linspace(0.4, 0.2, height - height // 2)[:, None, None] * np.array([0.8, 0.7, 0.5])
    img[: height // 2] = sky
    img[height // 2 :] = floor
    for _ in range(12):
        h = int(rng.integers(height // 6, height // 2))
        w = int(rng.integers(width // 10, width // 3))
        top = int(rng.integers(height // 4, height - h))
        left = int(rng.integers(0, pano_w - w))
        img[top : top + h, left : left + w] = rng.uniform(0.1, 1.0, size=3)
    return img


def make_episode(folder: Path, steps: int, rng: np.random.Generator, size: tuple[int, int]) -> list[Path]:
    """Write `steps` frames `step_<i>_<ACTION>.jpg`; the last action is STOP."""
    width, height = size
    pano = _scene(rng, height, width)
    folder.mkdir(parents=True, exist_ok=True)
    offset, zoom, paths = width, 1.0, []
    for step in range(steps):
        action = "STOP" if step == steps - 1 else ACTIONS[int(rng.integers(0, len(ACTIONS)))]
        crop_w = int(width / zoom)
        x0 = int(np.clip(offset + (width - crop_w) // 2, 0, pano.shape[1] - crop_w))
        view = pano[:, x0 : x0 + crop_w]
        noise = rng.normal(0, 0.01, size=view.shape)
        frame = Image.fromarray((np.clip(view + noise, 0, 1) * 255).astype(np.uint8)).resize((width, height))
        path = folder / f"step_{step}_{action}.jpg"
        frame.save(path, quality=90)
        paths.append(path)
        if action == "MOVE_FORWARD":
            zoom = min(zoom * 1.08, 2.0)
        elif action == "TURN_LEFT":
            offset -= width // 8
        elif action == "TURN_RIGHT":
            offset += width // 8
    return paths


def make_dataset(
    root: str | os.PathLike[str],
    episodes: int = 3,
    steps: int = 8,
    size: tuple[int, int] = (320, 240),
    seed: int = 0,
) -> list[Path]:
    """Create `<root>/episode_<k>/step_<i>_<ACTION>.jpg`; returns every image path."""
    rng = np.random.default_rng(seed)
    paths: list[Path] = []
    for k in range(episodes):
        paths += make_episode(Path(root) / f"episode_{k:03d}", steps, rng, size)
    return paths
