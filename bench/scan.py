"""Scan benchmark: `vggtctl status` against `find`, a naive walk that loads every sidecar, and
header reads against full loads of realistic sidecars.

    python bench/scan.py --files 200000 --out result.json

Builds a synthetic data root (episode folders of ~100 empty images, a share of them with small
real sidecars written by the codec), then, in one run:

  a) `vggtctl status ROOT --json` (the installed executable, a subprocess);
  b) `find ROOT -printf '%s %p\\n' > /dev/null` (one lstat per file, C, single thread);
  c) a naive `os.walk` + `os.stat` + `torch.load` of every sidecar (loads timed on a sample and
     extrapolated when the tree is large: the output says so);
  d) header reads (`sidecar.read_header`, and for reference the torch.load(mmap=True) path it
     falls back to) against full loads (`torch.load` without mmap, then a reduction over the
     tensor) of realistic sidecars (bf16 [2116, 2048], ~8.7 MB), with the page cache dropped for
     those files before every pass (posix_fadvise DONTNEED after fsync), then on a warm cache;
     and, warm, verify's full read (`sidecar.read`) without and with the CRC-32 checks.

`--skip status --skip naive` runs (d) alone and builds no tree.

(a) and (b) run on a warm cache: one untimed run of each first, then --repeat timed runs,
interleaved; the minimum and median are reported. Goals: status <= 1.5x find at 1M files;
header reads >= 20x faster than full loads.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from vggtctl import sidecar
from vggtctl.keys import ContextSettings, ImageKey, ModelKey

IMAGES_PER_EPISODE = 100
MARKER = ".bench-tree.json"
BIG_SHAPE = (2116, 2048)  # 46 x 46 patches of a 644 px crop, 2 x 1024 channels: VGGT-1B's layout


# --------------------------------------------------------------------------- the tree


def _meta(image_name: str, grid: tuple[int, int], dtype: str = "bfloat16") -> dict:
    model = ModelKey("0" * 64, "bench", -2, "full", dtype)
    preprocess = {
        "fingerprint": "1" * 64,
        "preset": "bench",
        "input_hw": [grid[0] * 14, grid[1] * 14],
        "grid_hw": list(grid),
    }
    return sidecar.build_meta(
        image_name=image_name,
        image_key=ImageKey(0, 0),
        model=model,
        preprocess=preprocess,
        context=ContextSettings(),
        frames=[],
        signature=None,
    )


def small_sidecar_bytes(workdir: Path) -> bytes:
    """One real (small) sidecar written by the codec; the tree gets copies of its bytes."""
    path = workdir / "template.jpg.vggt_cache.pt"
    sidecar.write(path, torch.zeros(4, 16, dtype=torch.bfloat16), _meta("template.jpg", (2, 2)))
    data = path.read_bytes()
    path.unlink()
    return data


def build_tree(root: Path, files: int, ratio: float, workdir: Path, seed: int = 0) -> dict:
    """`files` = images + sidecars. Empty images; each sidecar is a real file (own inode)."""
    images = round(files / (1 + ratio))
    rng = random.Random(seed)
    blob = small_sidecar_bytes(workdir)
    made_images = made_sidecars = 0
    flags = os.O_CREAT | os.O_WRONLY | os.O_EXCL  # a fresh tree: never overwrite a file
    episode = 0
    while made_images < images:
        folder = root / f"ep_{episode:05d}"
        folder.mkdir(parents=True, exist_ok=True)
        for j in range(min(IMAGES_PER_EPISODE, images - made_images)):
            image = f"{folder}/frame_{j:04d}.jpg"
            os.close(os.open(image, flags, 0o644))
            made_images += 1
            if rng.random() < ratio:
                fd = os.open(image + sidecar.SUFFIX, flags, 0o644)
                os.write(fd, blob)
                os.close(fd)
                made_sidecars += 1
        episode += 1
    info = {
        "files": files,
        "ratio": ratio,
        "seed": seed,
        "images": made_images,
        "sidecars": made_sidecars,
        "folders": episode + 1,
        "sidecar_bytes": len(blob),
    }
    (root / MARKER).write_text(json.dumps(info))
    return info


def ensure_tree(root: Path, files: int, ratio: float, workdir: Path) -> tuple[dict, float | None]:
    """Build the tree, or reuse one this script built with the same settings (build time None)."""
    marker = root / MARKER
    if marker.exists():
        info = json.loads(marker.read_text())
        if info.get("files") == files and info.get("ratio") == ratio:
            return info, None
        raise SystemExit(f"{root}: holds a tree built with other settings ({info}); pick another --root")
    if root.exists() and any(root.iterdir()):
        raise SystemExit(f"{root}: not empty and not a benchmark tree; pick another --root")
    started = time.perf_counter()
    info = build_tree(root, files, ratio, workdir)
    os.sync()
    return info, time.perf_counter() - started


# --------------------------------------------------------------------------- timings


# The status command on an app of its own: what `vggtctl status` costs when no other command
# module imports torch at start-up (the root app imports every command module).
LEAN_STATUS = (
    "import sys, typer; from vggtctl.cli import status; app = typer.Typer(); "
    "app.callback()(lambda: None); status.register(app); sys.argv[0] = 'vggtctl'; app()"
)


def vggtctl_exe() -> str:
    exe = Path(sys.executable).with_name("vggtctl")
    found = str(exe) if exe.exists() else shutil.which("vggtctl")
    if not found:
        raise SystemExit("the vggtctl executable is not installed (pip install -e .)")
    return found


def timed(cmd: list[str], **kwargs) -> tuple[float, subprocess.CompletedProcess]:
    started = time.perf_counter()
    proc = subprocess.run(cmd, **kwargs)
    seconds = time.perf_counter() - started
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)}: exit {proc.returncode}\n{proc.stderr or ''}")
    return seconds, proc


def time_status_vs_find(root: Path, repeat: int, info: dict) -> dict:
    exe = vggtctl_exe()
    status_cmd = [exe, "status", str(root), "--json"]
    threads_cmd = [*status_cmd, "--processes", "1"]
    lean_cmd = [sys.executable, "-c", LEAN_STATUS, "status", str(root), "--json"]
    find_cmd = ["find", str(root), "-printf", "%s %p\\n"]
    env = {**os.environ, "NO_COLOR": "1"}
    runs: dict[str, list[float]] = {
        "status": [],
        "status_threads_only": [],
        "status_lean": [],
        "find": [],
        "startup": [],
    }
    scan_inside: list[float] = []
    # Warm-up (untimed): both see the same warm dentry/inode cache afterwards.
    subprocess.run(find_cmd, check=True, stdout=subprocess.DEVNULL)
    _, proc = timed(status_cmd, capture_output=True, text=True, env=env)
    doc = json.loads(proc.stdout)
    totals = doc["totals"]
    if (totals["images"], totals["cached"]) != (info["images"], info["sidecars"]):
        raise SystemExit(
            f"status counted {totals['images']} images / {totals['cached']} cached, "
            f"the tree has {info['images']} / {info['sidecars']}"
        )
    for _ in range(repeat):
        seconds, _ = timed(find_cmd, stdout=subprocess.DEVNULL)
        runs["find"].append(seconds)
        seconds, proc = timed(status_cmd, capture_output=True, text=True, env=env)
        runs["status"].append(seconds)
        scan_inside.append(json.loads(proc.stdout)["scan_seconds"])
        seconds, _ = timed(threads_cmd, stdout=subprocess.DEVNULL, env=env)
        runs["status_threads_only"].append(seconds)
        seconds, _ = timed(lean_cmd, stdout=subprocess.DEVNULL, env=env)
        runs["status_lean"].append(seconds)
        seconds, _ = timed([exe, "--version"], stdout=subprocess.DEVNULL)
        runs["startup"].append(seconds)
    result = {name: {"min": min(v), "median": statistics.median(v), "runs": v} for name, v in runs.items()}
    result["status_scan_only"] = {
        "min": min(scan_inside),
        "median": statistics.median(scan_inside),
        "runs": scan_inside,
    }
    result["commands"] = {
        "status": " ".join(status_cmd),
        "find": f"find {root} -printf '%s %p\\n' > /dev/null",
    }
    return result


def time_naive(root: Path, sample: int) -> dict:
    """os.walk + os.stat of everything, torch.load of every sidecar (a sample, extrapolated)."""
    started = time.perf_counter()
    sidecars = []
    for folder, _dirs, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            os.stat(path)
            if name.endswith(sidecar.SUFFIX):
                sidecars.append(path)
    walk_seconds = time.perf_counter() - started
    chosen = sidecars if len(sidecars) <= sample else random.Random(1).sample(sidecars, sample)
    started = time.perf_counter()
    for path in chosen:
        torch.load(path, map_location="cpu", weights_only=True)
    load_seconds = time.perf_counter() - started
    per_load = load_seconds / max(1, len(chosen))
    return {
        "walk_stat_seconds": walk_seconds,
        "sidecars": len(sidecars),
        "loaded": len(chosen),
        "extrapolated": len(chosen) < len(sidecars),
        "per_load_seconds": per_load,
        "total_seconds": walk_seconds + per_load * len(sidecars),
    }


def drop_cache(paths: list[str]) -> None:
    """Evict these files' pages (they were fsync'ed, so the pages are clean and can go)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def header_pass(paths: list[str]) -> float:
    started = time.perf_counter()
    for path in paths:
        sidecar.read_header(path)
    return time.perf_counter() - started


def torch_header_pass(paths: list[str]) -> float:
    """The reference header read: torch.load(weights_only=True, mmap=True) + the same schema check
    (what `read_header` did before the fast reader, and what it falls back to)."""
    started = time.perf_counter()
    for path in paths:
        sidecar._parse(sidecar._load(path))
    return time.perf_counter() - started


def load_pass(paths: list[str], touch: bool) -> float:
    """torch.load without mmap (reads every byte); with `touch`, also sum the tensor in its own
    dtype, as any consumer of the features reads them at least once."""
    started = time.perf_counter()
    for path in paths:
        obj = torch.load(path, map_location="cpu", weights_only=True)
        if touch:
            float(obj["features"].sum())
    return time.perf_counter() - started


def verify_pass(paths: list[str], crc: bool) -> float:
    """What `verify`'s full read does per file: torch.load(mmap), the finite check and, with
    `crc`, every zip record against its CRC-32."""
    started = time.perf_counter()
    for path in paths:
        sidecar.read(path, check_crc=crc)
    return time.perf_counter() - started


def time_header_vs_full(workdir: Path, count: int, passes: int) -> dict:
    folder = workdir / "big"
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    paths = []
    for i in range(count):
        name = f"big_{i:04d}.jpg"
        features = torch.randn(*BIG_SHAPE, generator=gen).to(torch.bfloat16)
        path = str(folder / (name + sidecar.SUFFIX))
        sidecar.write(path, features, _meta(name, (46, 46)), fsync=True)  # clean pages: droppable
        paths.append(path)
    size = os.path.getsize(paths[0])
    cold: dict[str, list[float]] = {"header": [], "header_torch": [], "load": [], "load_touch": []}
    for _ in range(passes):
        drop_cache(paths)
        cold["header"].append(header_pass(paths))
        drop_cache(paths)
        cold["header_torch"].append(torch_header_pass(paths))
        drop_cache(paths)
        cold["load"].append(load_pass(paths, touch=False))
        drop_cache(paths)
        cold["load_touch"].append(load_pass(paths, touch=True))
    # The pages are cached now: how much of a cold pass was the disk.
    runs = max(passes, 5)
    warm_passes = {
        "header": [header_pass(paths) for _ in range(runs)],
        "header_torch": [torch_header_pass(paths) for _ in range(runs)],
        "load": [load_pass(paths, touch=False) for _ in range(runs)],
        "verify": [verify_pass(paths, crc=False) for _ in range(runs)],
        "verify_crc": [verify_pass(paths, crc=True) for _ in range(runs)],
    }
    warm = {name: statistics.median(values) for name, values in warm_passes.items()}
    shutil.rmtree(folder)
    median = {name: statistics.median(values) for name, values in cold.items()}
    return {
        "files": count,
        "file_bytes": size,
        "shape": list(BIG_SHAPE),
        "dtype": "bfloat16",
        "cache_drop": "fsync at write, then os.posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED) per file before each pass",
        "cold_seconds": median,
        "cold_passes": cold,
        "warm_seconds": warm,
        "warm_passes": warm_passes,
        "ratio_load_over_header": median["load"] / median["header"],
        "ratio_load_touch_over_header": median["load_touch"] / median["header"],
        "ratio_torch_header_over_header": median["header_torch"] / median["header"],
        "warm_ratio_torch_header_over_header": warm["header_torch"] / warm["header"],
        "warm_ratio_verify_crc_over_verify": warm["verify_crc"] / warm["verify"],
    }


# --------------------------------------------------------------------------- machine


def machine(root: Path) -> dict:
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), cpu)
    except OSError:
        pass
    fstype = "unknown"
    try:
        real = os.path.realpath(root)
        best = ""
        with open("/proc/mounts") as fh:
            for line in fh:
                _dev, mount, kind, *_ = line.split()
                if (real == mount or real.startswith(mount.rstrip("/") + "/")) and len(mount) > len(best):
                    best, fstype = mount, kind
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu": cpu,
        "cores": cores,
        "filesystem": fstype,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "loadavg": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--files", type=int, default=200_000, help="images + sidecars in the tree")
    parser.add_argument(
        "--root", type=Path, default=None, help="where to build the tree (default: a temp dir)"
    )
    parser.add_argument("--sidecar-ratio", type=float, default=0.5, help="share of images with a sidecar")
    parser.add_argument("--keep", action="store_true", help="keep the tree (rerun with the same --root)")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs of status and find")
    parser.add_argument("--naive-sample", type=int, default=2000, help="sidecars torch.load'ed by (c)")
    parser.add_argument("--big", type=int, default=100, help="realistic sidecars for (d)")
    parser.add_argument("--passes", type=int, default=3, help="cold passes of (d)")
    parser.add_argument(
        "--skip",
        choices=["status", "naive", "headers"],
        action="append",
        default=[],
        help="leave out (a)+(b) (status), (c) (naive) or (d) (headers); repeatable",
    )
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)

    own_root = args.root is None
    needs_tree = "status" not in args.skip or "naive" not in args.skip  # (d) needs none
    base = Path(tempfile.mkdtemp(prefix="vggtctl-bench-")) if own_root else args.root.parent
    root = base / "tree" if own_root else args.root
    root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="vggtctl-bench-work-", dir=base))
    created = False
    result: dict = {"command": " ".join([Path(sys.argv[0]).as_posix(), *(argv or sys.argv[1:])])}
    try:
        result["machine"] = machine(root)
        if needs_tree:
            info, build_seconds = ensure_tree(root, args.files, args.sidecar_ratio, work)
            created = build_seconds is not None
            result["tree"] = {**info, "build_seconds": build_seconds}
            print(
                f"tree: {info['images']:,} images, {info['sidecars']:,} sidecars, {info['folders']:,} folders"
                + (f" (built in {build_seconds:.1f} s)" if build_seconds else " (reused)"),
                flush=True,
            )

        status_median = None
        if "status" not in args.skip:
            timing = time_status_vs_find(root, args.repeat, info)
            result["status_vs_find"] = timing
            med = {name: timing[name]["median"] for name in timing if name != "commands"}
            status_median = med["status"]
            ratio = med["status"] / med["find"]
            result["ratio_status_over_find"] = ratio
            result["ratio_lean_status_over_find"] = med["status_lean"] / med["find"]
            print(
                f"(a) vggtctl status --json: median {med['status']:.2f} s (min {timing['status']['min']:.2f}); "
                f"of which the scan {med['status_scan_only']:.2f} s and CLI start-up (`vggtctl --version`) "
                f"{med['startup']:.2f} s; --processes 1: {med['status_threads_only']:.2f} s; status alone on its "
                f"own Typer app (no other command imported): {med['status_lean']:.2f} s"
            )
            print(f"(b) find -printf: median {med['find']:.2f} s (min {timing['find']['min']:.2f})")
            print(
                f"    status / find = {ratio:.2f}; lean status / find = {result['ratio_lean_status_over_find']:.2f} "
                "(medians; goal <= 1.5 at 1M files)",
                flush=True,
            )

        if "naive" not in args.skip:
            naive = time_naive(root, args.naive_sample)
            result["naive"] = naive
            note = (
                f"torch.load timed on {naive['loaded']:,} of {naive['sidecars']:,} sidecars and extrapolated"
                if naive["extrapolated"]
                else "every sidecar loaded"
            )
            versus = (
                f"; naive / status = {naive['total_seconds'] / status_median:.1f}x" if status_median else ""
            )
            print(
                f"(c) naive os.walk + os.stat + torch.load: {naive['total_seconds']:.1f} s ({note}; "
                f"walk+stat {naive['walk_stat_seconds']:.2f} s, {1000 * naive['per_load_seconds']:.2f} ms per load)"
                + versus,
                flush=True,
            )

        if "headers" not in args.skip:
            big = time_header_vs_full(work, args.big, args.passes)
            result["header_vs_full"] = big
            print(
                f"(d) {big['files']} sidecars of {big['file_bytes'] / 2**20:.1f} MiB, page cache dropped before each pass "
                "(fsync, then posix_fadvise DONTNEED):"
            )
            per = {k: 1000 * v / big["files"] for k, v in big["cold_seconds"].items()}
            warm = {k: 1000 * v / big["files"] for k, v in big["warm_seconds"].items()}
            print(
                f"    header reads {per['header']:.3f} ms/file (torch.load mmap path: {per['header_torch']:.3f}, "
                f"{big['ratio_torch_header_over_header']:.1f}x); full loads {per['load']:.2f} ms/file, "
                f"{per['load_touch']:.2f} ms/file with a sum over the tensor"
            )
            print(
                f"    full / header = {big['ratio_load_touch_over_header']:.1f}x with the sum (goal >= 20x), "
                f"{big['ratio_load_over_header']:.1f}x load alone; warm cache: header {warm['header']:.3f} "
                f"(torch.load mmap path {warm['header_torch']:.3f}, "
                f"{big['warm_ratio_torch_header_over_header']:.1f}x), load {warm['load']:.2f} ms/file",
                flush=True,
            )
            print(
                f"    verify's full read, warm: {warm['verify']:.2f} ms/file without CRC checks, "
                f"{warm['verify_crc']:.2f} with ({big['warm_ratio_verify_crc_over_verify']:.2f}x)",
                flush=True,
            )
        result["machine"]["loadavg_after"] = os.getloadavg() if hasattr(os, "getloadavg") else None
        m = result["machine"]
        print(
            f"machine: {m['cpu']}, {m['cores']} cores, {m['filesystem']}, Python {m['python']}, "
            f"torch {m['torch']}, {m['date']}, load average before {m['loadavg']}, after {m['loadavg_after']}"
        )
        if args.out:
            args.out.write_text(json.dumps(result, indent=2) + "\n")
            print(f"results: {args.out}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if own_root and not needs_tree:
            shutil.rmtree(base, ignore_errors=True)
        elif args.keep or not created:
            if own_root:
                print(f"tree kept: {root} (rerun with --root {root} --keep)")
        else:  # only a tree this run built is removed
            shutil.rmtree(base if own_root else root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
