"""Forward throughput and model FLOP utilization (MFU) of the built-in VGGT aggregator.

What it measures, in one run:
  * single-frame batches (S = 1) at each --sizes (square HxW) and --batches: images/s, ms per
    batch, peak memory (torch.cuda.max_memory_allocated), achieved TFLOP/s and MFU;
  * streaming: --stream-frames-frame sequences at --stream-size, B sequences in lockstep for each
    --stream-batches: sequences/s, frames/s, peak memory, TFLOP/s, MFU;
  * for each mode (eager, and torch.compile with --compile or --modes eager,compile): the
    feature of a small batch against an eager float32 reference (max abs diff, cosine);
  * the bf16 peak of this device, measured in the same run: an 8192^3 bf16 matmul timed with
    CUDA events (best of a few trials). MFU = achieved FLOP/s / that peak.

The model is `--preset` (default vggt-1b) with seeded random weights initialized on the device
(no checkpoint); weights are cast to --weights-dtype (bfloat16 on CUDA by default). The forward
computes only up to --layer (default -2, what trainers cache), so L = depth + layer + 1 layers.

FLOP formula (matmul FLOPs only; norms, softmax, GELU, RoPE and adds are not counted), per frame:
  N   = (H/p)(W/p) patches, p = 14; T = N + 5 tokens (aggregator), T_v = N + 5 (ViT: cls + 4 reg)
  lin = 2 * (3C^2 + C^2 + 2rC^2)        FLOPs per token of one block's Linear layers (r = mlp ratio)
  F   = 2 * (3 p^2) * C * N                                   patch-embed conv
      + D_vit * (lin * T_v + 4 * T_v^2 * C)                   ViT blocks
      + L     * (lin * T   + 4 * T^2   * C)                   frame blocks
      + L     * (lin * T   + 4 * T * (K * T) * C)             global blocks
  where 4 * Tq * Tk * C counts QK^T and AV, and K is the number of frames a frame's global
  attention sees (K = 1 for single frames; K = k + 1 for frame k of a stream).

CPU smoke run (seconds): python bench/forward_gpu.py --device cpu --preset tiny --sizes 56 --batches 1,2 --quick
Device run:               python bench/forward_gpu.py --modes eager,compile --out bench_forward.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vggtctl.model import Aggregator, build_model, get_config, init_random, patch_tokens
from vggtctl.model.config import AggregatorConfig
from vggtctl.model.sdpa import SDPA_CHOICES

FLOP_FORMULA = (
    "per frame: 2*3p^2*C*N + D_vit*(lin*Tv + 4*Tv^2*C) + L*(lin*T + 4*T^2*C) + L*(lin*T + 4*T*(K*T)*C); "
    "lin = 2*(4+2r)*C^2, T = Tv = N+5, N = (H/p)(W/p), L = layers run, K = frames attended "
    "(matmul FLOPs only)"
)


# --------------------------------------------------------------------------- FLOPs


def frame_flops(cfg: AggregatorConfig, h: int, w: int, layers_run: int, frames_attended: int = 1) -> float:
    """Matmul FLOPs of one frame (see the module docstring for the formula)."""
    p, c, r = cfg.patch_size, cfg.embed_dim, cfg.mlp_ratio
    n = (h // p) * (w // p)
    t = n + cfg.patch_start_idx
    t_vit = n + 1 + cfg.vit.num_register_tokens
    lin = 2 * (4 + 2 * r) * c * c
    patch = 2 * 3 * p * p * c * n
    vit = cfg.vit.depth * (lin * t_vit + 4 * t_vit * t_vit * c)
    frame = layers_run * (lin * t + 4 * t * t * c)
    global_ = layers_run * (lin * t + 4 * t * (frames_attended * t) * c)
    return float(patch + vit + frame + global_)


# --------------------------------------------------------------------------- timing


class Clock:
    """Wall time of a callable on the bench device: CUDA events on GPU, perf_counter on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def seconds(self, fn: Callable[[], Any], warmup: int, iters: int) -> float:
        """Mean seconds per call after `warmup` untimed calls."""
        for _ in range(warmup):
            fn()
        self.sync()
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(iters):
                fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1000.0 / iters
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        return (time.perf_counter() - t0) / iters


def measure_peak_bf16(clock: Clock, device: torch.device, n: int = 8192, trials: int = 3) -> float | None:
    """Best achieved TFLOP/s of an n^3 bf16 matmul on this device (None on CPU)."""
    if device.type != "cuda":
        return None
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    seconds = [clock.seconds(lambda x=a, y=b: x @ y, warmup=3, iters=20) for _ in range(trials)]
    return 2 * n**3 / min(seconds) / 1e12


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


# --------------------------------------------------------------------------- runs


@dataclass
class Row:
    kind: str  # "forward" | "stream" | "attention"
    mode: str
    size: int
    batch: int
    frames: int = 1
    sdpa: str = "auto"
    status: str = "ok"
    seconds_per_batch: float | None = None
    images_per_s: float | None = None
    sequences_per_s: float | None = None
    peak_mem_gib: float | None = None
    tflops: float | None = None
    mfu: float | None = None


@dataclass
class Bench:
    args: argparse.Namespace
    device: torch.device
    cfg: AggregatorConfig
    layers_run: int
    clock: Clock
    peak_tflops: float | None
    deadline: float
    rows: list[Row] = field(default_factory=list)
    parity: list[dict[str, Any]] = field(default_factory=list)

    def out_of_time(self) -> bool:
        return time.monotonic() > self.deadline

    def record(self, row: Row, flops_per_batch: float) -> None:
        if row.seconds_per_batch:
            row.tflops = flops_per_batch / row.seconds_per_batch / 1e12
            row.mfu = row.tflops / self.peak_tflops if self.peak_tflops else None
        self.rows.append(row)

    def forward_rows(self, model: Aggregator, mode: str, sdpa: str) -> None:
        for size in self.args.sizes:
            for batch in self.args.batches:
                row = Row("forward", mode, size, batch, sdpa=sdpa)
                if self.out_of_time():
                    row.status = "skipped (time budget)"
                    self.rows.append(row)
                    continue
                images = torch.rand(batch, 1, 3, size, size, device=self.device)
                self.run_row(row, lambda m=model, x=images: m(x, layers=[self.args.layer]))
                flops = batch * frame_flops(self.cfg, size, size, self.layers_run)
                if row.seconds_per_batch:
                    row.images_per_s = batch / row.seconds_per_batch
                self.record(row, flops)
                del images

    def stream_rows(self, model: Aggregator, mode: str, sdpa: str) -> None:
        size, frames = self.args.stream_size, self.args.stream_frames
        for batch in self.args.stream_batches:
            row = Row("stream", mode, size, batch, frames=frames, sdpa=sdpa)
            if self.out_of_time():
                row.status = "skipped (time budget)"
                self.rows.append(row)
                continue
            clip = torch.rand(batch, frames, 3, size, size, device=self.device)

            def run(m: Aggregator = model, x: torch.Tensor = clip) -> torch.Tensor:
                state = m.new_stream()
                for k in range(x.shape[1]):
                    (out,) = m.stream_step(x[:, k], state, layers=[self.args.layer])
                return out

            self.run_row(row, run)
            flops = batch * sum(
                frame_flops(self.cfg, size, size, self.layers_run, k + 1) for k in range(frames)
            )
            if row.seconds_per_batch:
                row.sequences_per_s = batch / row.seconds_per_batch
                row.images_per_s = batch * frames / row.seconds_per_batch
            self.record(row, flops)
            del clip

    def attention_rows(self, size: int) -> None:
        """Each SDPA kernel alone (no fallback) on the attention shapes of the model at `size`:
        frame/ViT attention of a B=32 batch and a streamed frame's global attention over k frames
        (B=16). TFLOP/s = 4 * B * heads * Tq * Tk * head_dim / s."""
        from torch.nn.attention import SDPBackend, sdpa_kernel

        heads, head_dim = self.cfg.num_heads, self.cfg.head_dim
        t = (size // self.cfg.patch_size) ** 2 + self.cfg.patch_start_idx
        shapes = [(32, 1), (16, 1), (16, 5), (16, 9)]  # (batch, frames attended)
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        for name in ("flash", "cudnn", "efficient"):
            backend = {
                "flash": SDPBackend.FLASH_ATTENTION,
                "cudnn": SDPBackend.CUDNN_ATTENTION,
                "efficient": SDPBackend.EFFICIENT_ATTENTION,
            }[name]
            for batch, frames in shapes:
                row = Row("attention", "sdpa", size, batch, frames=frames, sdpa=name)
                if self.out_of_time() or (self.device.type != "cuda" and name != "flash"):
                    row.status = "skipped"
                    self.rows.append(row)
                    continue
                q = torch.randn(batch, heads, t, head_dim, device=self.device, dtype=dtype)
                kv = torch.randn(2, batch, heads, frames * t, head_dim, device=self.device, dtype=dtype)

                def attend(q: torch.Tensor = q, kv: torch.Tensor = kv, b: Any = backend) -> torch.Tensor:
                    with sdpa_kernel([b]):
                        return torch.nn.functional.scaled_dot_product_attention(q, kv[0], kv[1])

                self.run_row(row, attend)
                self.record(row, 4.0 * batch * heads * t * frames * t * head_dim)
                del q, kv

    def kernel_choice(self, size: int) -> list[dict[str, Any]]:
        """Which kernel SDPA runs under the "cudnn" preference, for contiguous q/k/v and for the
        model's layout (q, k contiguous after norm and RoPE; v a view into the packed qkv
        projection): the preferred call's output is compared bit for bit with each kernel's."""
        from torch.nn.attention import SDPBackend, sdpa_kernel

        from vggtctl.model.sdpa import attend, kernel_order

        if self.device.type != "cuda":
            return []
        heads, head_dim = self.cfg.num_heads, self.cfg.head_dim
        t = (size // self.cfg.patch_size) ** 2 + self.cfg.patch_start_idx
        qkv = torch.randn(8, t, 3, heads, head_dim, device=self.device, dtype=torch.bfloat16)
        packed = qkv.permute(2, 0, 3, 1, 4)
        layouts = {
            "contiguous": (packed[0].contiguous(), packed[1].contiguous(), packed[2].contiguous()),
            "model": (packed[0].contiguous(), packed[1].contiguous(), packed[2]),
        }
        results = []
        for name, (q, k, v) in layouts.items():
            entry: dict[str, Any] = {"layout": name}
            outputs = {}
            for kernel, backend in (
                ("flash", SDPBackend.FLASH_ATTENTION),
                ("cudnn", SDPBackend.CUDNN_ATTENTION),
            ):
                try:
                    with sdpa_kernel([backend]):
                        outputs[kernel] = torch.nn.functional.scaled_dot_product_attention(q, k, v)
                except Exception as exc:
                    entry[f"{kernel}_error"] = f"{type(exc).__name__}: {exc}"[:160]
            preferred = attend(q, k, v, kernel_order("cudnn"))
            entry["preferred_equals"] = [kn for kn, out in outputs.items() if torch.equal(out, preferred)]
            results.append(entry)
        return results

    def run_row(self, row: Row, fn: Callable[[], Any]) -> None:
        reset_peak(self.device)
        try:
            row.seconds_per_batch = self.clock.seconds(fn, self.args.warmup, self.args.iters)
            row.peak_mem_gib = peak_gib(self.device)
        except Exception as exc:  # one configuration fails, the run goes on
            row.status = "OOM" if is_oom(exc) else f"error: {type(exc).__name__}: {exc}"[:200]
            row.seconds_per_batch = None
        finally:
            reset_peak(self.device)


def features(model: Aggregator, images: torch.Tensor, layer: int) -> torch.Tensor:
    (out,) = model(images, layers=[layer])
    return patch_tokens(out, model.patch_start_idx).float()


def compare(reference: torch.Tensor, other: torch.Tensor) -> dict[str, float]:
    a, b = reference.flatten().double(), other.flatten().double()
    cosine = torch.nn.functional.cosine_similarity(a, b, dim=0).item()
    per_token = torch.nn.functional.cosine_similarity(
        reference.double().flatten(0, -2), other.double().flatten(0, -2), dim=-1
    )
    return {
        "max_abs_diff": (a - b).abs().max().item(),
        "cosine": cosine,
        "min_token_cosine": per_token.min().item(),
        "reference_std": a.std().item(),
    }


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ints = lambda text: [int(x) for x in text.split(",") if x]  # noqa: E731
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda", help="cuda or cpu (default cuda)")
    ap.add_argument("--preset", default="vggt-1b", help="model preset: vggt-1b or tiny")
    ap.add_argument("--sizes", type=ints, default=[504, 644], help="square image sizes, e.g. 504,644")
    ap.add_argument("--batches", type=ints, default=[1, 8, 32, 64], help="single-frame batch sizes")
    ap.add_argument("--stream-size", type=int, default=None, help="streaming image size (default 644)")
    ap.add_argument("--stream-frames", type=int, default=9, help="frames per streamed sequence")
    ap.add_argument(
        "--stream-batches", type=ints, default=None, help="streaming batch sizes (default 1,8,16)"
    )
    ap.add_argument("--no-stream", action="store_true", help="skip the streaming rows")
    ap.add_argument(
        "--sdpa",
        default="auto",
        help="comma list of attention-kernel preferences to run each mode under (auto,cudnn,flash)",
    )
    ap.add_argument(
        "--attn-bench", action="store_true", help="time each SDPA kernel alone on the model's shapes"
    )
    ap.add_argument("--layer", type=int, default=-2, help="layer to compute up to (default -2)")
    ap.add_argument("--weights-dtype", default=None, help="bfloat16 (CUDA default) or float32 (CPU default)")
    ap.add_argument("--modes", default=None, help="comma list of eager,compile (default eager)")
    ap.add_argument("--compile", action="store_true", help="same as --modes compile")
    ap.add_argument(
        "--compile-mode", default="default", help="torch.compile mode, e.g. max-autotune-no-cudagraphs"
    )
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--parity-batch", type=int, default=2, help="batch of the parity check")
    ap.add_argument("--time-budget", type=float, default=300.0, help="seconds; later rows are skipped")
    ap.add_argument("--quick", action="store_true", help="1 warmup, 2 iters; stream at the smallest size")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    if args.modes is None:
        args.modes = "compile" if args.compile else "eager"
    args.modes = [m for m in args.modes.split(",") if m]
    args.sdpa = [c for c in args.sdpa.split(",") if c]
    if bad := [c for c in args.sdpa if c not in SDPA_CHOICES]:
        ap.error(f"unknown --sdpa choice(s) {bad}; use {','.join(SDPA_CHOICES)}")
    if bad := [m for m in args.modes if m not in ("eager", "compile")]:
        ap.error(f"unknown mode(s) {bad}")
    if args.quick:
        args.warmup, args.iters = 1, 2
    if args.stream_size is None:
        args.stream_size = min(args.sizes) if args.quick else 644
    if args.stream_batches is None:
        args.stream_batches = list(args.batches) if args.quick else [1, 8, 16]
    if args.weights_dtype is None:
        args.weights_dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
    return args


def build(cfg: AggregatorConfig, device: torch.device, seed: int) -> Aggregator:
    """Random weights drawn on the target device (seconds for 1B parameters on a GPU)."""
    model = init_random(build_model(cfg, device), seed)
    model.reset_constants()
    return model.requires_grad_(False).eval()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    started = time.monotonic()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("CUDA is not available (use --device cpu for a smoke run)")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    cfg = get_config(args.preset)
    layers_run = (args.layer % cfg.depth) + 1
    weights_dtype = getattr(torch, args.weights_dtype)
    clock = Clock(device)
    peak = measure_peak_bf16(clock, device)
    bench = Bench(args, device, cfg, layers_run, clock, peak, started + args.time_budget)

    with torch.inference_mode():
        # float32 reference features for the parity check, then the bench model.
        model = build(cfg, device, args.seed)
        gen = torch.Generator(device="cpu").manual_seed(args.seed + 1)
        size = min(args.sizes)
        parity_images = torch.rand(args.parity_batch, 1, 3, size, size, generator=gen).to(device)
        reference = features(model, parity_images, args.layer)
        model = model.to(weights_dtype)
        model.image_mean, model.image_std = model.image_mean.float(), model.image_std.float()

        compiled = False
        kernel_choice: list[dict[str, Any]] = []
        if args.attn_bench:
            bench.attention_rows(args.stream_size)
            try:
                kernel_choice = bench.kernel_choice(args.stream_size)
            except Exception as exc:
                kernel_choice = [{"error": f"{type(exc).__name__}: {exc}"[:300]}]
        for sdpa in args.sdpa:
            for mode in args.modes:
                if mode == "compile":
                    args.warmup = max(args.warmup, 2)  # the first call of a new shape compiles
                    import torch._dynamo as dynamo

                    if compiled:
                        dynamo.reset()  # graphs traced under another kernel preference
                    else:
                        # 72 blocks share one code object; every shape is a separate entry.
                        dynamo.config.cache_size_limit = max(dynamo.config.cache_size_limit, 256)
                        with contextlib.suppress(AttributeError):
                            dynamo.config.accumulated_cache_size_limit = max(
                                dynamo.config.accumulated_cache_size_limit, 2048
                            )
                        model.compile_blocks(mode=args.compile_mode)
                        compiled = True
                check = {
                    "mode": mode,
                    "sdpa": sdpa,
                    "weights_dtype": args.weights_dtype,
                    "batch": args.parity_batch,
                    "size": size,
                }
                model.set_attention_kernel(sdpa)
                try:
                    check.update(compare(reference, features(model, parity_images, args.layer)))
                except Exception as exc:
                    check["error"] = f"{type(exc).__name__}: {exc}"[:300]
                bench.parity.append(check)
                bench.forward_rows(model, mode, sdpa)
                if not args.no_stream:
                    bench.stream_rows(model, mode, sdpa)

    result = {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "torch": torch.__version__,
        "preset": args.preset,
        "weights_dtype": args.weights_dtype,
        "layer": args.layer,
        "layers_run": layers_run,
        "compile_mode": args.compile_mode if "compile" in args.modes else None,
        "peak_bf16_tflops": peak,
        "flop_formula": FLOP_FORMULA,
        "rows": [asdict(r) for r in bench.rows],
        "parity": bench.parity,
        "kernel_choice": kernel_choice,
        "elapsed_s": time.monotonic() - started,
        "argv": sys.argv[1:] if argv is None else argv,
    }
    return emit(result, render, args.out)


def emit(
    result: dict[str, Any], render_table: Callable[[dict[str, Any]], str], out: str | None
) -> dict[str, Any]:
    """Print a bench's table and write its JSON when asked: the last step of every bench."""
    print(render_table(result))
    if out:
        Path(out).write_text(json.dumps(result, indent=2))
    return result


def _fmt(value: float | None, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


def render(result: dict[str, Any]) -> str:
    peak = result["peak_bf16_tflops"]
    lines = [
        f"device: {result['device']} | torch {result['torch']} | preset {result['preset']} | "
        f"weights {result['weights_dtype']} | layers run {result['layers_run']} | "
        f"measured bf16 peak: {_fmt(peak)} TFLOP/s",
        f"FLOPs: {result['flop_formula']}",
        "",
        "| kind | mode | sdpa | size | batch | frames | images/s | seq/s | ms/batch | peak GiB | TFLOP/s | MFU | status |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in result["rows"]:
        ms = r["seconds_per_batch"] * 1000 if r["seconds_per_batch"] else None
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        lines.append(
            f"| {r['kind']} | {r['mode']} | {r.get('sdpa', 'auto')} | {r['size']} | {r['batch']} | {r['frames']} | "
            f"{_fmt(r['images_per_s'])} | {_fmt(r['sequences_per_s'], 2)} | {_fmt(ms)} | "
            f"{_fmt(r['peak_mem_gib'], 2)} | {_fmt(r['tflops'])} | {mfu} | {r['status']} |"
        )
    lines += ["", "| parity vs eager fp32 | size | batch | max abs diff | cosine | min token cosine |"]
    lines.append("| --- | --- | --- | --- | --- | --- |")
    for p in result["parity"]:
        lines.append(
            f"| {p['mode']} ({p['weights_dtype']}, sdpa {p.get('sdpa', 'auto')}) | {p['size']} | {p['batch']} | "
            f"{p.get('max_abs_diff', p.get('error', '-'))} | {p.get('cosine', '-')} | {p.get('min_token_cosine', '-')} |"
        )
    for choice in result.get("kernel_choice", []):
        lines.append(f"kernel under the cudnn preference: {choice}")
    lines.append(f"\nelapsed: {result['elapsed_s']:.1f} s")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
