"""End-to-end precompute throughput against the pure forward and a naive per-image loop.

One run, one process, on generated data (no checkpoint: seeded random weights, `random:vggt-1b`):
  gen   N JPEGs of --image-size (default 640x480) in a flat folder, and an episodes tree for the
        sequence run; written by a process pool, not timed as part of any measure.
  (a)   pure forward: the encoder the pipeline builds (same preset, layer, dtype, attention),
        `encode_frames` on a batch of real preprocessed images already on the device, at
        --batch-size and at B = 1; CUDA-event timed after warm-up. images/s = B / s per batch.
  (b)   end-to-end: `vggtctl.precompute.run` over the flat folder (layout plain, context none,
        force), every image decoded, encoded and written as a sidecar. images/s = encoded /
        Outcome.seconds (the encode phase: loader start to the last write; no model load,
        catalog or plan); also reported over run()'s whole wall clock (model load included).
        Also (b) in steady state: the rate between the moments 10 % and 90 % of the items were
        written (leaves out starting the decode workers, the first batch, compiling it and the
        last writes).
  (c)   naive: per image preprocess, one forward at B = 1, `.cpu()`, synchronous torch.save,
        over --naive-images images after 2 untimed ones, on the pipeline's encoder run eagerly
        (bf16 weights, stops after the cached layer): the naive loop around our own model.
  (c_legacy) the same loop with the model configured as the earlier script ran upstream VGGT:
        float32 weights under bf16 autocast, every aggregator layer kept (the upstream
        aggregator returns all of them) and layer -2 picked afterwards; the feature is saved in
        bf16, like ours (the cheaper choice for the baseline). (a_legacy_b1) is its forward
        alone at B = 1, to compare with the issue's upstream anchor (~17-21 images/s, H200).
  (d)   sequence: `run` over the episodes tree (layout episodes, context sequence, history
        --history, causal attention), items/s = encoded / Outcome.seconds and frames/s =
        items/s x (history + 1) (every item streams history + 1 frames, padded early on).
  decode: preset.load in this one process (capacity of one decode worker).
Goals from the issue: b/a >= 0.9 and b/c >= 4 (reported against c and c_legacy). MB/s = sidecar bytes written / encode seconds.
Sidecars are written into --workdir (default: a temp folder) and deleted after each phase.

CPU smoke (about half a minute):
  python bench/precompute_gpu.py --device cpu --model tiny --images 24 --seq-items 6 --batch-size 4
Device run:
  python bench/precompute_gpu.py --out precompute.json
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from forward_gpu import Clock, _fmt, emit, is_oom, peak_gib, reset_peak

from vggtctl import precompute
from vggtctl.demo import make_episode
from vggtctl.distributed import default_loader_workers, dist_info, usable_cpus
from vggtctl.failures import read_failures
from vggtctl.model import load_model, patch_tokens
from vggtctl.precompute import PrecomputeOptions
from vggtctl.reporter import Reporter

MODEL_SPECS = {"vggt-1b": "random:vggt-1b", "tiny": "tiny-random"}
EPISODE_STEPS = 20
MB = 1e6


# --------------------------------------------------------------------------- data


def _plain_image(job: tuple[str, int, int, int]) -> int:
    """One photo-like JPEG: smooth colour field, a few boxes, light sensor noise."""
    path, width, height, seed = job
    rng = np.random.default_rng(seed)
    low = (rng.random((6, 8, 3)) * 255).astype(np.uint8)
    field_ = np.asarray(Image.fromarray(low).resize((width, height), Image.Resampling.BICUBIC), np.float32)
    for _ in range(6):
        h, w = int(rng.integers(height // 8, height // 2)), int(rng.integers(width // 10, width // 3))
        top, left = int(rng.integers(0, height - h)), int(rng.integers(0, width - w))
        field_[top : top + h, left : left + w] = rng.uniform(0, 255, size=3)
    field_ += rng.normal(0, 4, size=field_.shape)
    Image.fromarray(np.clip(field_, 0, 255).astype(np.uint8)).save(path, quality=90)
    return os.path.getsize(path)


def _episode(job: tuple[str, int, int, int, int]) -> int:
    folder, steps, width, height, seed = job
    paths = make_episode(Path(folder), steps, np.random.default_rng(seed), (width, height))
    return sum(p.stat().st_size for p in paths)


def generate(workdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The flat folder and the episodes tree, written in parallel; returns counts and timing."""
    width, height = args.image_size
    plain, episodes = workdir / "plain", workdir / "episodes"
    plain.mkdir(parents=True)
    episodes.mkdir(parents=True)
    jobs = [
        (str(plain / f"img_{i:06d}.jpg"), width, height, args.seed * 1_000_003 + i)
        for i in range(args.images)
    ]
    steps = max(1, min(EPISODE_STEPS, args.seq_items))
    count = math.ceil(args.seq_items / steps) if args.seq_items else 0
    ep_jobs = [
        (str(episodes / f"episode_{k:04d}"), steps, width, height, args.seed + k) for k in range(count)
    ]
    started = time.perf_counter()
    with ProcessPoolExecutor(max_workers=usable_cpus()) as pool:
        plain_bytes = sum(pool.map(_plain_image, jobs, chunksize=16))
        ep_bytes = sum(pool.map(_episode, ep_jobs))
    return {
        "seconds": time.perf_counter() - started,
        "plain_images": len(jobs),
        "plain_mean_kb": plain_bytes / max(1, len(jobs)) / 1e3,
        "episodes": count,
        "episode_steps": steps,
        "episode_bytes": ep_bytes,
        "paths": [j[0] for j in jobs],
    }


# --------------------------------------------------------------------------- measures


@dataclass
class Row:
    key: str
    what: str
    items: int = 0
    frames_per_item: int = 1
    seconds: float | None = None
    batch: int | None = None
    bytes: int = 0
    peak_mem_gib: float | None = None
    steady_items_per_s: float | None = None
    stage_seconds: dict[str, float] | None = None
    # torch's pinned-memory pool during the run (CUDA, where torch reports it): blocks created
    # (num_host_alloc) and microseconds in cudaHostAlloc (host_alloc_time.total), as deltas
    host_pool: dict[str, float] | None = None
    status: str = "ok"

    @property
    def items_per_s(self) -> float | None:
        return self.items / self.seconds if self.seconds and self.items else None

    @property
    def frames_per_s(self) -> float | None:
        rate = self.items_per_s
        return rate * self.frames_per_item if rate is not None else None

    @property
    def mb_per_s(self) -> float | None:
        return self.bytes / MB / self.seconds if self.seconds and self.bytes else None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(items_per_s=self.items_per_s, frames_per_s=self.frames_per_s, mb_per_s=self.mb_per_s)
        return data


def load_batch(preset: Any, paths: list[str], threads: int) -> torch.Tensor:
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        tensors = [p.tensor for p in pool.map(preset.load, paths)]
    return torch.stack(tensors)


def forward_row(encoder: Any, pixels: torch.Tensor, clock: Clock, args: argparse.Namespace, key: str) -> Row:
    """(a): encode_frames on tensors already on the device."""
    batch = pixels.shape[0]
    row = Row(key, f"encode_frames, tensors on {pixels.device.type}", batch=batch)
    reset_peak(encoder.device)
    try:
        seconds = clock.seconds(lambda: encoder.encode_frames(pixels), args.warmup, args.iters)
        row.items, row.seconds = batch * args.iters, seconds * args.iters
        row.peak_mem_gib = peak_gib(encoder.device)
    except Exception as exc:
        traceback.print_exc()
        row.status = "OOM" if is_oom(exc) else f"error: {type(exc).__name__}: {exc}"[:200]
    return row


def decode_row(preset: Any, paths: list[str]) -> Row:
    started = time.perf_counter()
    for path in paths:
        preset.load(path)
    return Row("decode", "preset.load in 1 process", items=len(paths), seconds=time.perf_counter() - started)


def naive_row(
    key: str, what: str, features: Any, preset: Any, paths: list[str], out: Path, warm: int = 2
) -> Row:
    """(c): preprocess, B = 1 forward (`features`), .cpu(), synchronous torch.save, one at a time."""
    out.mkdir(parents=True, exist_ok=True)
    row = Row(key, what, batch=1)

    def one(path: str) -> int:
        pixels = preset.load(path).tensor.unsqueeze(0)
        feats = features(pixels)[0].cpu()
        target = out / (Path(path).stem + ".pt")
        torch.save({"features": feats, "image": os.path.basename(path)}, target)
        return target.stat().st_size

    for path in paths[:warm]:
        one(path)
    timed = paths[warm:]
    started = time.perf_counter()
    row.bytes = sum(one(p) for p in timed)
    row.seconds = time.perf_counter() - started
    row.items = len(timed)
    shutil.rmtree(out, ignore_errors=True)
    return row


class LegacyForward:
    """The earlier script's per-image forward, on our model: float32 weights under bf16 autocast
    (on CUDA), all aggregator layers kept as the upstream aggregator returns them, layer -2's
    patch tokens picked afterwards and cast to bf16."""

    def __init__(self, model_spec: str, device: torch.device) -> None:
        self.model = load_model(model_spec, device=device, dtype=torch.float32).model
        self.device = device

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        cuda = self.device.type == "cuda"
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            images = pixels.to(self.device).unsqueeze(1)
            layers = self.model(images, layers=list(range(self.model.depth)))
            return patch_tokens(layers[-2][:, 0], self.model.patch_start_idx).to(torch.bfloat16)


class Timeline(Reporter):
    """Records (time, items written) at every write: the steady-state rate comes from it."""

    def __init__(self) -> None:
        self.points: list[tuple[float, int]] = []

    def update(self, encoded: int, failed: int, nbytes: int) -> None:
        self.points.append((time.perf_counter(), encoded))

    def steady_rate(self, low: float = 0.1, high: float = 0.9) -> float | None:
        """Items/s between the first moments `low` and `high` of the final count were written."""
        if not self.points or self.points[-1][1] < 10:
            return None
        total = self.points[-1][1]
        t0, n0 = next((t, n) for t, n in self.points if n >= low * total)
        t1, n1 = next((t, n) for t, n in self.points if n >= high * total)
        return (n1 - n0) / (t1 - t0) if t1 > t0 else None


def guarded(key: str, measure: Any) -> Row:
    """One measure; an exception becomes the row's status instead of ending the run."""
    (row,) = guarded_rows(key, lambda: [measure()])
    return row


def guarded_rows(key: str, measure: Any) -> list[Row]:
    try:
        return list(measure())
    except Exception as exc:
        traceback.print_exc()
        return [
            Row(key, "failed", status=("OOM" if is_oom(exc) else f"error: {type(exc).__name__}: {exc}")[:200])
        ]


def guarded_check(check: Any) -> dict[str, Any]:
    try:
        return check()
    except Exception as exc:
        traceback.print_exc()
        return {"error": f"{type(exc).__name__}: {exc}"[:200]}


def free_device(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def options(args: argparse.Namespace, root: Path, **overrides: Any) -> PrecomputeOptions:
    base = dict(
        root=root,
        vggt_model=MODEL_SPECS[args.model],
        preset=args.preset,
        batch_size=args.batch_size,
        workers=args.workers,
        device=args.device,
        force=True,
        fsync=args.fsync,
        writer_threads=args.writer_threads,
        compile=args.compile,
        sdpa=args.sdpa,
    )
    base.update(overrides)
    return PrecomputeOptions(**base)


def host_pool_counters() -> dict[str, float] | None:
    """torch.cuda.memory.host_memory_stats() flattened to numbers; None where unavailable."""
    stats_of = getattr(torch.cuda.memory, "host_memory_stats", None)
    if stats_of is None or not torch.cuda.is_available():
        return None
    try:
        stats = stats_of()
    except Exception:
        return None
    flat: dict[str, float] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for name, inner in value.items():
                walk(f"{prefix}.{name}" if prefix else str(name), inner)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[prefix] = value

    walk("", stats)
    return flat


def host_pool_delta(
    before: dict[str, float] | None, after: dict[str, float] | None
) -> dict[str, float] | None:
    if before is None or after is None:
        return None
    keep = ("num_host_alloc", "num_host_free", "host_alloc_time.total", "host_alloc_time.max")
    delta = {name: after[name] - before.get(name, 0) for name in keep if name in after}
    for name in ("allocated_bytes.current", "allocated_bytes.peak"):
        if name in after:
            delta[name] = after[name]  # levels, not deltas
    return delta


def pipeline_row(
    key: str, what: str, opts: PrecomputeOptions, frames: int, device: torch.device
) -> tuple[Row, Row]:
    """(b)/(d): run() once; returns (encode phase, whole run() wall clock incl. model load)."""
    row = Row(key, what, frames_per_item=frames, batch=opts.batch_size)
    wall = Row(
        key + "_wall", what + ", whole run() incl. model load", frames_per_item=frames, batch=opts.batch_size
    )
    reset_peak(device)
    timeline = Timeline()
    pool_before = host_pool_counters()
    started = time.perf_counter()
    try:
        outcome = precompute.run(opts, timeline)
    except Exception as exc:
        traceback.print_exc()
        row.status = wall.status = "OOM" if is_oom(exc) else f"error: {type(exc).__name__}: {exc}"[:300]
        return row, wall
    wall.seconds = time.perf_counter() - started
    row.seconds = outcome.seconds
    row.items = wall.items = outcome.encoded
    row.bytes = wall.bytes = outcome.bytes_written
    row.peak_mem_gib = wall.peak_mem_gib = peak_gib(device)
    row.steady_items_per_s = timeline.steady_rate()
    row.stage_seconds = dict(outcome.stage_seconds)
    row.host_pool = host_pool_delta(pool_before, host_pool_counters())
    if outcome.failed or outcome.disk_full or outcome.not_written:
        first = read_failures(opts.root, outcome.run_id)[:1]
        reason = f"{first[0]['stage']}: {first[0]['reason']}"[:200] if first else ""
        row.status = wall.status = (
            f"{outcome.failed} failed, {outcome.not_written} not written {outcome.disk_full} {reason}".strip()
        )
    return row, wall


def recompute_check(opts: PrecomputeOptions, k: int) -> dict[str, Any]:
    """`verify --recompute k` on what a run wrote (eager, torch's own attention kernel), plus a
    control: the cosine between the stored features of two different images, to show how far
    apart a wrong row would be."""
    from vggtctl import sidecar
    from vggtctl.recompute import recompute

    plain = PrecomputeOptions(**{**asdict(opts), "compile": False, "sdpa": "auto", "force": False})
    report = recompute(plain, k, seed=0)
    cosines = [c.cosine for c in report.checks if c.cosine is not None]
    diffs = [c.max_abs_diff for c in report.checks if c.max_abs_diff is not None]
    control = None
    if len(report.checks) >= 2:
        a, b = (sidecar.read(c.path).features.double().flatten() for c in report.checks[:2])
        control = torch.nn.functional.cosine_similarity(a, b, dim=0).item()
    return {
        "checked": len(report.checks),
        "mismatches": len(report.problems),
        "min_cosine": min(cosines) if cosines else None,
        "max_abs_diff": max(diffs) if diffs else None,
        "control_cosine_two_images": control,
    }


def remove_sidecars(root: Path) -> None:
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            if ".vggt_cache.pt" in name:
                os.unlink(os.path.join(dirpath, name))


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    def size(text: str) -> tuple[int, int]:
        w, _, h = text.lower().partition("x")
        return int(w), int(h)

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=2000, help="generated images for (b) (default 2000)")
    ap.add_argument("--image-size", type=size, default=(640, 480), help="WxH of generated JPEGs")
    ap.add_argument("--model", choices=sorted(MODEL_SPECS), default="vggt-1b", help="random weights")
    ap.add_argument("--preset", default="janusvln", help="preprocessing preset (default janusvln)")
    ap.add_argument("--batch-size", type=int, default=None, help="default 32 on CUDA, 4 on CPU")
    ap.add_argument("--seq-batch-size", type=int, default=None, help="sequence batch (default batch / 2)")
    ap.add_argument("--workers", type=int, default=None, help="decode workers (default: CPUs - 1)")
    ap.add_argument("--writer-threads", type=int, default=8)
    ap.add_argument("--fsync", action="store_true", help="fsync every sidecar")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--seq-items", type=int, default=200, help="items of the sequence run (0: skip)")
    ap.add_argument("--history", type=int, default=8, help="max history of the sequence run")
    ap.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the encoder for (a), (b), (d); (a_b1), (c) and (c_legacy) stay eager",
    )
    ap.add_argument("--no-legacy", dest="legacy", action="store_false", help="skip (c_legacy)")
    ap.add_argument(
        "--recompute",
        type=int,
        default=8,
        help="items of (b) and (d) re-encoded and compared (verify --recompute)",
    )
    ap.add_argument("--seq-eager", action="store_true", help="run (d) eagerly even with --compile")
    ap.add_argument(
        "--sdpa", default="auto", help="attention kernel tried first for (a), (b), (d) (auto, cudnn, ...)"
    )
    ap.add_argument(
        "--naive-images",
        type=int,
        default=None,
        help="timed images of the naive loop (default min(200, N/4))",
    )
    ap.add_argument("--warmup", type=int, default=None, help="untimed batches (default 3 on CUDA, 1 on CPU)")
    ap.add_argument("--iters", type=int, default=None, help="timed batches (default 10 on CUDA, 2 on CPU)")
    ap.add_argument("--time-budget", type=float, default=240.0, help="seconds; later phases shrink to fit")
    ap.add_argument("--workdir", default=None, help="parent of the scratch folder (default: the temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the scratch folder (generated images)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    cuda = args.device.startswith("cuda")
    args.batch_size = args.batch_size or (32 if cuda else 4)
    args.seq_batch_size = args.seq_batch_size or max(1, args.batch_size // 2)
    args.warmup = args.warmup if args.warmup is not None else (3 if cuda else 1)
    args.iters = args.iters if args.iters is not None else (10 if cuda else 2)
    if args.naive_images is None:
        args.naive_images = min(200, max(4, args.images // 4))
    args.naive_images = max(1, min(args.naive_images, args.images - 2))
    if args.images < args.batch_size or args.images < 3:
        ap.error(f"--images must be at least the batch size ({args.batch_size}) and 3")
    if args.workers is None:
        args.workers = default_loader_workers(dist_info())
    return args


def shrink_to_budget(
    args: argparse.Namespace, left: float, rate_b: float, rate_1: float, notes: list[str]
) -> None:
    """Scale (b), (c) and (d) down so their estimated time fits what is left of the budget."""
    frames = args.history + 1
    est_b = args.images / (0.8 * rate_b) + 10
    est_c = args.naive_images / (0.7 * rate_1) * (2 if args.legacy else 1)
    est_d = args.seq_items * frames / (0.5 * rate_b) + 10 if args.seq_items else 0.0
    total = est_b + est_c + est_d
    if total <= left:
        return
    factor = max(0.05, (left - 20) / total)
    args.images_limit = max(args.batch_size, int(args.images * factor))
    args.naive_images = max(4, int(args.naive_images * factor))
    args.seq_items = max(args.seq_batch_size, int(args.seq_items * factor)) if args.seq_items else 0
    notes.append(
        f"time budget: estimated {total:.0f} s > {left:.0f} s left; (b) {args.images_limit} images, "
        f"(c) {args.naive_images}, (d) {args.seq_items} items"
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    started = time.monotonic()
    deadline = started + args.time_budget
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("CUDA is not available (use --device cpu for a smoke run)")
    if args.workdir:
        os.makedirs(args.workdir, exist_ok=True)  # a missing parent cost a device run once
    workdir = Path(tempfile.mkdtemp(prefix="vggtctl-bench-", dir=args.workdir))
    notes: list[str] = []
    rows: list[Row] = []
    checks: dict[str, Any] = {}
    args.images_limit = args.images
    try:
        gen = generate(workdir, args)
        paths = gen.pop("paths")
        clock = Clock(device)

        # (a): the encoder exactly as run() builds it (compiled with --compile).
        t0 = time.perf_counter()
        encoder, preset = precompute.build_encoder(options(args, workdir / "plain"), "none", device)
        model_load_s = time.perf_counter() - t0
        feature_dtype = str(encoder.dtype).removeprefix("torch.")
        pixels = load_batch(preset, paths[: args.batch_size], args.workers).to(device)
        rows.append(forward_row(encoder, pixels, clock, args, "a"))
        rate_b = rows[-1].items_per_s or 1.0
        del encoder
        free_device(device)

        # The eager encoder: (a_b1) and the naive loop (c) around our own model.
        eager, preset = precompute.build_encoder(
            options(args, workdir / "plain", compile=False, sdpa="auto"), "none", device
        )
        sample = preset.load(paths[0])
        bytes_per_item = precompute.estimate_sidecar_bytes(eager, preset, paths[0])
        free = shutil.disk_usage(workdir).free
        if bytes_per_item * args.images > 0.9 * free:
            args.images_limit = max(args.batch_size, int(0.9 * free / bytes_per_item))
            notes.append(f"disk: {free / 1e9:.1f} GB free; (b) limited to {args.images_limit} images")
        rows.append(decode_row(preset, paths[: min(len(paths), 16)]))
        rows.append(forward_row(eager, pixels[:1].clone(), clock, args, "a_b1"))
        rate_1 = rows[-1].items_per_s or 1.0
        shrink_to_budget(args, deadline - time.monotonic(), rate_b, rate_1, notes)
        naive_paths = paths[: min(len(paths), args.naive_images + 2)]
        rows.append(
            guarded(
                "c",
                lambda features=eager.encode_frames: naive_row(
                    "c",
                    "naive: 1 image/forward, .cpu(), torch.save (our encoder, eager)",
                    features,
                    preset,
                    naive_paths,
                    workdir / "naive",
                ),
            )
        )
        del eager
        free_device(device)

        # The earlier script's configuration of the same loop (see LegacyForward).
        def legacy_rows(one: torch.Tensor) -> list[Row]:
            legacy = LegacyForward(MODEL_SPECS[args.model], device)
            forward = forward_row(
                SimpleNamespace(encode_frames=legacy, device=device),
                one,
                clock,
                args,
                "a_legacy_b1",
            )
            loop = naive_row(
                "c_legacy",
                "naive loop as the earlier script: fp32 weights + bf16 autocast, all layers kept",
                legacy,
                preset,
                naive_paths,
                workdir / "naive",
            )
            return [forward, loop]

        if args.legacy:
            rows += guarded_rows("c_legacy", lambda one=pixels[:1].clone(): legacy_rows(one))
        del pixels
        free_device(device)

        plain = options(args, workdir / "plain", layout="plain", context="none", limit=args.images_limit)
        rows += pipeline_row("b", "precompute run(), plain, context none", plain, 1, device)
        checks["b"] = guarded_check(lambda: recompute_check(plain, args.recompute))
        remove_sidecars(workdir / "plain")

        if args.seq_items:
            seq = options(
                args,
                workdir / "episodes",
                layout="episodes",
                context="sequence",
                max_history=args.history,
                batch_size=args.seq_batch_size,
                limit=args.seq_items,
                compile=args.compile and not args.seq_eager,
            )
            rows += pipeline_row(
                "d", f"precompute run(), episodes, history {args.history}", seq, args.history + 1, device
            )
            checks["d"] = guarded_check(lambda: recompute_check(seq, args.recompute))
            remove_sidecars(workdir / "episodes")
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)

    by_key = {r.key: r for r in rows}

    def ratio(a: str, b: str, steady: bool = False) -> float | None:
        x, y = by_key.get(a), by_key.get(b)
        top = (x.steady_items_per_s if steady else x.items_per_s) if x else None
        if not top or y is None or not y.items_per_s:
            return None
        return top / y.items_per_s

    result = {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "date": time.strftime("%Y-%m-%d"),
        "torch": torch.__version__,
        "cpus": usable_cpus(),
        "model": MODEL_SPECS[args.model],
        "preset": args.preset,
        "dtype": feature_dtype,
        "image_size": list(args.image_size),
        "input_hw": list(sample.input_hw),
        "grid_hw": list(sample.grid_hw),
        "bytes_per_sidecar": bytes_per_item,
        "batch_size": args.batch_size,
        "seq_batch_size": args.seq_batch_size,
        "decode_workers": args.workers,
        "writer_threads": args.writer_threads,
        "fsync": args.fsync,
        "history": args.history,
        "model_load_s": model_load_s,
        "generate": gen,
        "rows": [r.to_dict() for r in rows],
        "sdpa": args.sdpa,
        "compile": args.compile,
        "ratios": {
            "b/a": ratio("b", "a"),
            "b_steady/a": ratio("b", "a", steady=True),
            "b/c": ratio("b", "c"),
            "b/c_legacy": ratio("b", "c_legacy"),
        },
        "goals": {"b/a": 0.9, "b_steady/a": 0.9, "b/c": 4.0, "b/c_legacy": 4.0},
        "recompute_checks": checks,
        "notes": notes,
        "elapsed_s": time.monotonic() - started,
        "argv": sys.argv[1:] if argv is None else argv,
    }
    return emit(result, render, args.out)


def render(result: dict[str, Any]) -> str:
    r = result
    lines = [
        f"device: {r['device']} | {r['date']} | torch {r['torch']} | {r['cpus']} CPUs | model {r['model']} "
        f"| preset {r['preset']} ({r['image_size'][0]}x{r['image_size'][1]} -> {r['input_hw'][1]}x{r['input_hw'][0]}, "
        f"grid {r['grid_hw'][0]}x{r['grid_hw'][1]}) | {r['dtype']} | batch {r['batch_size']} "
        f"(sequence {r['seq_batch_size']}) | decode workers {r['decode_workers']} | writer threads "
        f"{r['writer_threads']} | sidecar {r['bytes_per_sidecar'] / MB:.2f} MB | model load {r['model_load_s']:.1f} s "
        f"| compile {r['compile']} | sdpa {r['sdpa']}",
        "",
        "| measure | what | batch | items | seconds | items/s | steady items/s | frames/s | MB/s | peak GiB | status |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in r["rows"]:
        lines.append(
            f"| {row['key']} | {row['what']} | {row['batch'] or '-'} | {row['items']} | "
            f"{_fmt(row['seconds'], 2)} | {_fmt(row['items_per_s'])} | {_fmt(row['steady_items_per_s'])} | "
            f"{_fmt(row['frames_per_s'])} | "
            f"{_fmt(row['mb_per_s'])} | {_fmt(row['peak_mem_gib'], 2)} | {row['status']} |"
        )
    lines.append("")
    for name, value in r["ratios"].items():
        goal = r["goals"][name]
        verdict = "-" if value is None else ("meets" if value >= goal else "BELOW")
        lines.append(f"{name} = {_fmt(value, 2)} (goal >= {goal}: {verdict})")
    g = r["generate"]
    lines.append(
        f"generated {g['plain_images']} images (mean {g['plain_mean_kb']:.0f} kB) and {g['episodes']} "
        f"episodes x {g['episode_steps']} steps in {g['seconds']:.1f} s"
    )
    for row in r["rows"]:
        if row.get("stage_seconds"):
            lines.append(f"encode loop of ({row['key']}), seconds per stage: {row['stage_seconds']}")
        if row.get("host_pool"):
            lines.append(f"pinned pool during ({row['key']}): {row['host_pool']}")
    for name, check in r.get("recompute_checks", {}).items():
        lines.append(f"recompute check of ({name}): {check}")
    lines += [f"note: {n}" for n in r["notes"]]
    lines.append(f"elapsed: {r['elapsed_s']:.1f} s")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
