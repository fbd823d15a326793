"""Rank detection, device choice and self-relaunch through torch's elastic launcher.

`precompute --gpus N` re-executes itself under `torch.distributed.run`; under an external
torchrun the RANK/WORLD_SIZE/LOCAL_RANK variables decide the shard and the device. No
home-made process pools across machines (DESIGN §8).
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from vggtctl.errors import ConfigError

if TYPE_CHECKING:
    import torch


RELAUNCHED_ENV = "VGGTCTL_RELAUNCHED"
RESULT_DIR_ENV = "VGGTCTL_RESULT_DIR"  # where relaunched ranks leave their exit codes
CGROUP_CPU_MAX = "/sys/fs/cgroup/cpu.max"


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def dist_info(environ: dict[str, str] | None = None) -> DistInfo:
    env = os.environ if environ is None else environ
    world = int(env.get("WORLD_SIZE", "1"))
    rank = int(env.get("RANK", "0"))
    local_rank = int(env.get("LOCAL_RANK", str(rank)))
    local_world = int(env.get("LOCAL_WORLD_SIZE", str(world)))
    return DistInfo(rank, world, local_rank, local_world)


def cgroup_cpu_limit(path: str = CGROUP_CPU_MAX) -> int | None:
    """CPUs a cgroup v2 quota allows (`docker --cpus`, Kubernetes limits), None when unlimited."""
    try:
        with open(path, encoding="ascii") as fh:
            quota, _, period = fh.read().strip().partition(" ")
        if quota == "max":
            return None
        return max(1, math.ceil(int(quota) / int(period or "100000")))
    except (OSError, ValueError, ZeroDivisionError):
        return None


def usable_cpus() -> int:
    """CPUs this process may use: its affinity mask, Slurm's allocation and a cgroup quota,
    not os.cpu_count() (the machine's CPUs, which a job rarely owns)."""
    if hasattr(os, "sched_getaffinity"):
        count = len(os.sched_getaffinity(0))
    else:  # pragma: no cover - macOS, Windows
        count = os.cpu_count() or 1
    slurm = os.environ.get("SLURM_CPUS_ON_NODE", "").strip()
    if slurm.isdigit() and int(slurm) > 0:
        count = min(count, int(slurm))
    quota = cgroup_cpu_limit()
    if quota is not None:
        count = min(count, quota)
    return max(1, count)


def default_loader_workers(info: DistInfo) -> int:
    """Decode workers per rank: the usable CPUs split over the ranks of this node, minus one
    for the main (GPU-feeding) thread."""
    return max(0, usable_cpus() // max(1, info.local_world_size) - 1)


def pick_device(requested: str | None, info: DistInfo, devices: list[str] | None = None) -> torch.device:
    """`--devices cuda:0,cuda:3` maps local ranks onto devices; default: cuda:LOCAL_RANK or CPU."""
    import torch  # here, not at module level: the CLI imports this module and must start fast

    if devices:
        return usable_device(devices[info.local_rank % len(devices)], "--devices")
    if requested and requested != "auto":
        device = usable_device(requested, "--device")
        if device.type == "cuda" and device.index is None:  # "cuda" means this rank's GPU
            device = torch.device("cuda", info.local_rank % max(1, torch.cuda.device_count()))
        return device
    if torch.cuda.is_available():
        return torch.device("cuda", info.local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def usable_device(name: str, option: str = "--device") -> torch.device:
    """`name` as a device this process can use: cpu, or a CUDA device that is visible."""
    import torch

    try:
        device = torch.device(name.strip())
    except (RuntimeError, ValueError):
        raise ConfigError(f"{option} {name}: not a device name (cpu, cuda, cuda:N)") from None
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"{option} {name}: only cpu and cuda devices are supported")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(f"{option} {name}: no CUDA device is visible to this process")
        if device.index is not None and device.index >= count:
            raise ConfigError(f"{option} {name}: only {count} CUDA device(s) are visible")
    return device


def init_group(info: DistInfo, timeout_s: float = 3600) -> bool:
    """A Gloo group for small control messages (run id, final counts); None on a single rank."""
    if not info.is_distributed:
        return False
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=timedelta(seconds=timeout_s))
    return True


def broadcast_object(value: Any, info: DistInfo) -> Any:
    if not info.is_distributed:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(value: Any, info: DistInfo) -> list[Any]:
    if not info.is_distributed:
        return [value]
    import torch.distributed as dist

    boxes: list[Any] = [None] * info.world_size
    dist.all_gather_object(boxes, value)
    return boxes


def close_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def relaunch_argv(nproc: int, cli_args: list[str]) -> list[str]:
    """`python -m torch.distributed.run --standalone --nproc-per-node N -m vggtctl ARGS`."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "vggtctl",
        *cli_args,
    ]


def report_exit_code(code: int, info: DistInfo) -> bool:
    """Under `relaunch`, leave this rank's exit code for the parent and return True: the rank
    then exits 0, so torchrun does not print a failure report for an ordinary exit 3 or 130."""
    folder = os.environ.get(RESULT_DIR_ENV)
    if not folder or not os.environ.get(RELAUNCHED_ENV):
        return False
    try:
        with open(os.path.join(folder, f"rank{info.rank}.code"), "w", encoding="ascii") as fh:
            fh.write(str(code))
    except OSError:
        return False
    return True


def announce_rank() -> None:
    """A rank started by `relaunch` leaves its pid, so Ctrl-C can reach it past the launcher."""
    folder = os.environ.get(RESULT_DIR_ENV)
    if folder and os.environ.get(RELAUNCHED_ENV):
        with contextlib.suppress(OSError), open(os.path.join(folder, f"{os.getpid()}.pid"), "w") as fh:
            fh.write(str(os.getpid()))


def _interrupt_ranks(folder: str, launcher: subprocess.Popen[bytes], nproc: int) -> None:
    """SIGINT to each rank, not to torch's launcher: the ranks finish their writes and exit
    normally, and the launcher, which turns a signal of its own into tracebacks on stderr, ends
    as after any run. While some ranks have not announced themselves yet, the launcher is told
    too (they would otherwise wait for the others in a collective until its timeout)."""
    pids = []
    for name in os.listdir(folder):
        if name.endswith(".pid"):
            with contextlib.suppress(ValueError):
                pids.append(int(name.removesuffix(".pid")))
    if len(pids) < nproc:
        with contextlib.suppress(ProcessLookupError):
            launcher.send_signal(signal.SIGINT)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGINT)


def relaunch(nproc: int, cli_args: list[str]) -> int:
    """Run the command again under torch's elastic launcher; the exit code is the worst a rank
    reported (130 > 3 > 2 > 0), or the launcher's own (1) when a rank crashed (left no code:
    the launcher then stops the others with SIGTERM, which they report as 130).

    The launcher runs in a session of its own, so a terminal's Ctrl-C reaches this process
    only, which passes it on to the ranks (`_interrupt_ranks`).
    """
    folder = tempfile.mkdtemp(prefix="vggtctl-ranks-")
    env = dict(os.environ, **{RELAUNCHED_ENV: "1", RESULT_DIR_ENV: folder})
    env.setdefault("OMP_NUM_THREADS", str(max(1, usable_cpus() // nproc)))
    try:
        proc = subprocess.Popen(relaunch_argv(nproc, cli_args), env=env, start_new_session=True)
        try:
            launcher = proc.wait()
            interrupted = False
        except KeyboardInterrupt:
            _interrupt_ranks(folder, proc, nproc)
            try:
                launcher = proc.wait()
            except KeyboardInterrupt:  # a second Ctrl-C: stop the launcher itself
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGINT)
                launcher = proc.wait()
            interrupted = True
        codes = []
        for name in os.listdir(folder):
            if not name.endswith(".code"):
                continue
            with contextlib.suppress(OSError, ValueError), open(os.path.join(folder, name)) as fh:
                codes.append(int(fh.read().strip()))
        if interrupted:
            return 130
        if launcher != 0 and len(codes) < nproc:
            # a rank crashed (it left no code); the others' 130 is only the launcher's SIGTERM
            return launcher
        return 130 if 130 in codes else max([launcher, *codes])
    finally:
        shutil.rmtree(folder, ignore_errors=True)
