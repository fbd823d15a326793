"""The built-in probe, run under torchrun in place of the trainer (`vggtctl train --probe`).

Every rank joins the process group (NCCL on GPUs, Gloo on CPU), proves connectivity with an
all-reduce whose sum it checks, times a larger all-reduce for bus bandwidth, then reads its
DistributedSampler shard of the training Items through FeatureStore (the trainer's path) and
times it. Rank 0 prints one row per rank and a JSON line (`VGGTCTL_PROBE {...}`) for scripts.
Exit 0 when every rank connected and no rank failed reading.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

JSON_MARK = "VGGTCTL_PROBE"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m vggtctl.launch.probe", description=__doc__)
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--layout", default="auto")
    parser.add_argument("--annotations", action="append", default=[])
    parser.add_argument("--max-history", type=int, default=None)
    parser.add_argument("--data-path", default=None)
    parser.add_argument("--max-samples", type=int, default=256, help="Items read per rank at most")
    parser.add_argument("--allreduce-mb", type=float, default=None, help="default 64 on GPU, 8 on CPU")
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--timeout-s", type=float, default=300.0)
    return parser.parse_args(argv)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def check_allreduce(device: torch.device, world: int, rank: int) -> bool:
    """Each rank contributes rank+1; the sum must be world*(world+1)/2 everywhere."""
    probe = torch.full((16,), float(rank + 1), device=device)
    dist.all_reduce(probe)
    return bool(torch.all(probe == world * (world + 1) / 2).item())


def time_allreduce(device: torch.device, world: int, megabytes: float, iters: int) -> dict[str, float]:
    numel = max(1, int(megabytes * (1 << 20)) // 4)
    data = torch.ones(numel, dtype=torch.float32, device=device)
    dist.all_reduce(data)  # warm-up: connections, buffers
    _sync(device)
    dist.barrier()
    start = time.perf_counter()
    for _ in range(iters):
        dist.all_reduce(data)
    _sync(device)
    per_op = (time.perf_counter() - start) / max(1, iters)
    nbytes = numel * 4
    algbw = nbytes / per_op
    # Ring all-reduce moves 2(n-1)/n of the buffer per rank: the nccl-tests "bus bandwidth".
    # One rank moves nothing between processes: no bus bandwidth to report.
    busbw = algbw * (2 * (world - 1) / world) / 1e9 if world > 1 else None
    return {"bytes": nbytes, "seconds": per_op, "algbw_GBps": algbw / 1e9, "busbw_GBps": busbw}


def read_shard(args: argparse.Namespace, rank: int, world: int) -> dict[str, Any]:
    """This rank's DistributedSampler shard, read through FeatureStore as the trainer would."""
    from vggtctl.keys import FeatureKey

    if os.environ.get("USE_VGGT_CACHE", "").lower() != "true":
        return {"cache": False}
    if args.data_root is None:
        return {"cache": True, "skipped": "no data root: connectivity only"}
    key = FeatureKey.from_env()
    if key is None:
        return {"cache": True, "skipped": "no feature key: connectivity only"}
    from torch.utils.data.distributed import DistributedSampler

    from vggtctl.data import FeatureStore
    from vggtctl.launch.cache import CatalogSpec

    spec = CatalogSpec(args.data_root, args.layout, tuple(args.annotations), args.max_history, args.data_path)
    items = spec.load(key).items
    if not items:
        return {"cache": True, "items": 0, "samples": 0, "hits": 0, "error": "the catalog lists no Items"}
    sampler = DistributedSampler(range(len(items)), num_replicas=world, rank=rank, shuffle=False)
    indices = list(sampler)[: args.max_samples]
    store = FeatureStore.from_env()
    start = time.perf_counter()
    for index in indices:
        store.get(items[index])
    elapsed = time.perf_counter() - start
    stats = store.stats
    return {
        "cache": True,
        "items": len(items),
        "samples": len(indices),
        "hits": stats.hits,
        "hit_rate": stats.hits / len(indices) if indices else None,
        "samples_per_s": len(indices) / elapsed if elapsed > 0 else None,
        "misses": dict(stats.misses),
    }


def render(ranks: list[dict[str, Any]]) -> str:
    """A plain text table, one row per rank (rank 0 prints it)."""
    header = (
        "rank",
        "node",
        "host",
        "device",
        "all-reduce",
        "busbw GB/s",
        "samples",
        "hit rate",
        "samples/s",
    )
    rows = [header]
    for r in ranks:
        data = r.get("data", {})
        rate = data.get("hit_rate")
        sps = data.get("samples_per_s")
        rows.append(
            (
                str(r["rank"]),
                str(r["node_rank"]),
                r["host"],
                r["device"],
                "ok" if r["allreduce_ok"] else "WRONG SUM",
                "-" if r["bandwidth"]["busbw_GBps"] is None else f"{r['bandwidth']['busbw_GBps']:.2f}",
                str(data.get("samples", "-")),
                "-" if rate is None else f"{rate:.1%}",
                "-" if sps is None else f"{sps:.1f}",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    for r in ranks:
        data = r.get("data", {})
        if data.get("error"):
            lines.append(f"rank {r['rank']}: {data['error']}")
        elif data.get("skipped") and r["rank"] == 0:
            lines.append(f"cache not read: {data['skipped']}")
        if data.get("misses"):
            lines.append(
                f"rank {r['rank']} misses: " + ", ".join(f"{n} {v}" for v, n in data["misses"].items())
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    node_rank = int(os.environ.get("GROUP_RANK", os.environ.get("NODE_RANK", "0")))
    use_cuda = torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    backend = "nccl" if use_cuda else "gloo"
    dist.init_process_group(backend, timeout=timedelta(seconds=args.timeout_s))
    try:
        ok = check_allreduce(device, world, rank)
        megabytes = args.allreduce_mb if args.allreduce_mb is not None else (64.0 if use_cuda else 8.0)
        bandwidth = time_allreduce(device, world, megabytes, args.iters)
        try:
            data = read_shard(args, rank, world)
        except Exception as err:  # report it in the table; the other ranks still report
            data = {"cache": True, "error": f"{type(err).__name__}: {err}"}
        stats = {
            "rank": rank,
            "local_rank": local_rank,
            "node_rank": node_rank,
            "host": socket.gethostname(),
            "backend": backend,
            "device": str(device),
            "allreduce_ok": ok,
            "bandwidth": bandwidth,
            "data": data,
        }
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, stats)
        if rank == 0:
            print(render(gathered), flush=True)
            summary = {"world_size": world, "backend": backend, "ranks": gathered}
            print(f"{JSON_MARK} {json.dumps(summary, sort_keys=True)}", flush=True)
        dist.barrier()
        good = all(r["allreduce_ok"] and not r["data"].get("error") for r in gathered)
    finally:
        dist.destroy_process_group()
    return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main())
