"""Decode workers -> staging buffer: float32 pixels (before) against byte pixels (now).

precompute's decode workers hand each preprocessed image to the main process through shared
memory, and the launching thread stacks a batch of them into one (pinned, on CUDA) staging
buffer. Every tensor that arrives is a fresh shared-memory mapping, so the stack first-touches
every page of it: the cost grows with the bytes sent. This times that stage on real
`janusvln` preprocessing of generated 640x480 JPEGs through the real `ItemDataset`, once with
the pixels the workers send now (uint8, k standing for k/255) and once with them converted to
float32 in the worker, as they were sent before. Runs alternate; medians are reported.

    python bench/staging.py                         # 2 workers, 256 images, batch 32
    python bench/staging.py --workers 15 --images 2000 --pin   # a GPU host, pinned staging
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from vggtctl.catalog import Item
from vggtctl.precompute import ItemDataset, PrecomputeOptions, Prepared, build_encoder, context_settings
from vggtctl.precompute.loading import _identity
from vggtctl.preprocess import unit_pixels


class FloatPixels(ItemDataset):
    """The workers as they were: pixels converted to float32 before they cross shared memory."""

    def __getitem__(self, index: int) -> Any:
        sample = super().__getitem__(index)
        if isinstance(sample, Prepared):
            sample.pixels = unit_pixels(sample.pixels)
        return sample


def make_images(folder: Path, count: int) -> list[Item]:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, size=(480, 640, 3), dtype=np.uint8)
    items = []
    for i in range(count):
        path = folder / f"img{i:05d}.jpg"
        Image.fromarray(np.roll(base, i, axis=1)).save(path, quality=90)
        items.append(Item.from_paths([path]))
    return items


def one_pass(dataset: ItemDataset, args: argparse.Namespace) -> dict[str, float]:
    """Seconds waiting for workers and stacking, per batch, over one pass of the images."""
    tasks = [list(range(i, min(i + 8, len(dataset)))) for i in range(0, len(dataset), 8)]
    loader = DataLoader(
        dataset, batch_sampler=tasks, num_workers=args.workers, collate_fn=_identity, prefetch_factor=4
    )
    waits, stages, pending = [], [], []
    start = time.perf_counter()
    batches = iter(loader)
    while True:
        t0 = time.perf_counter()
        loaded = next(batches, None)
        waits.append(time.perf_counter() - t0)
        if loaded is None:
            break
        pending += loaded
        while len(pending) >= args.batch_size:
            batch, pending = pending[: args.batch_size], pending[args.batch_size :]
            first = batch[0].pixels
            t0 = time.perf_counter()
            staging = torch.empty((len(batch), *first.shape), dtype=first.dtype, pin_memory=args.pin)
            torch.stack([s.pixels for s in batch], out=staging)
            stages.append(time.perf_counter() - t0)
    wall = time.perf_counter() - start
    return {
        "stage_ms_per_batch": 1000 * statistics.median(stages),
        "stage_s_total": sum(stages),
        "wait_s_total": sum(waits),
        "images_per_s": len(dataset) / wall,
        "bytes_per_image": first.numel() * first.element_size(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--pin", action="store_true", help="pinned staging (needs CUDA)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="vggtctl-staging-") as tmp:
        items = make_images(Path(tmp), args.images)
        options = PrecomputeOptions(root=Path(tmp), vggt_model="tiny-random", preset="janusvln", device="cpu")
        encoder, preset = build_encoder(options, "none", torch.device("cpu"))
        key = encoder.feature_key(context_settings(options, "none"))
        forms = {
            "float32 (before)": FloatPixels(items, preset, key),
            "uint8 (now)": ItemDataset(items, preset, key),
        }
        runs: dict[str, list[dict[str, float]]] = {name: [] for name in forms}
        for _ in range(args.repeat):
            for name, dataset in forms.items():
                runs[name].append(one_pass(dataset, args))
    result = {
        name: {field: statistics.median(r[field] for r in passes) for field in passes[0]}
        for name, passes in runs.items()
    }
    before, now = result["float32 (before)"], result["uint8 (now)"]
    result["stage_ratio"] = before["stage_ms_per_batch"] / now["stage_ms_per_batch"]
    result["setup"] = {k: v for k, v in vars(args).items() if k != "out"}
    for name in forms:
        r = result[name]
        print(
            f"{name:17} stage {r['stage_ms_per_batch']:7.1f} ms per {args.batch_size}-image batch, "
            f"waiting {r['wait_s_total']:5.2f} s, loader {r['images_per_s']:6.1f} images/s, "
            f"{r['bytes_per_image'] / 2**20:.2f} MiB per image"
        )
    print(
        f"staging: float32 / uint8 = {result['stage_ratio']:.1f}x (median of {args.repeat} alternating passes)"
    )
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
