"""Sequence batches with and without shared frames, same encoder, interleaved runs.

Neighbouring episode steps share most of their history; `encode_sequences(frames, frame_index=)`
embeds each distinct frame once. This times both forms on B consecutive sliding-window items
and checks they are bit-identical.

    python bench/shared_frames.py                      # CPU, tiny-random, 4 items x 9 frames, 644x644
    python bench/shared_frames.py --device cuda --model random:vggt-1b --items 16
"""

from __future__ import annotations

import argparse
import time
from types import SimpleNamespace

import torch

from vggtctl.encoder import Encoder
from vggtctl.model import load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny-random")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--items", type=int, default=4)
    ap.add_argument("--frames", type=int, default=9)
    ap.add_argument("--size", type=int, default=644)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    loaded = load_model(args.model, device=device, dtype=dtype)
    preset = SimpleNamespace(name="bench", fingerprint="0" * 64)
    encoder = Encoder(loaded, preset, attention="causal", dtype=dtype, device=device)
    torch.manual_seed(0)
    distinct = torch.rand(args.items + args.frames - 1, 3, args.size, args.size, device=device)
    index = torch.stack([torch.arange(i, i + args.frames) for i in range(args.items)]).to(device)
    expanded = distinct[index]
    runs = {
        "expanded": lambda: encoder.encode_sequences(expanded),
        "shared": lambda: encoder.encode_sequences(distinct, frame_index=index),
    }
    same = torch.equal(runs["expanded"](), runs["shared"]())
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.repeat):
        for name, fn in runs.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
    best = {name: min(t) for name, t in times.items()}
    print(
        f"{args.items} items x {args.frames} frames ({distinct.shape[0]} distinct) at {args.size}, "
        f"{args.model} on {args.device}: expanded {best['expanded']:.3f} s, shared {best['shared']:.3f} s "
        f"-> {best['expanded'] / best['shared']:.2f}x (min of {args.repeat}); bit-identical: {same}"
    )


if __name__ == "__main__":
    main()
