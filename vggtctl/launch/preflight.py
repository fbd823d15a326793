"""Checks before any process starts: each returns table rows (name, status, detail, fix).

A failed check ends `vggtctl train` with exit 2 before torchrun runs, so a missing checkpoint
or a half-built cache costs seconds, not a 16-GPU allocation. Cheap checks run first; the
cache coverage check (one header read per Item) runs only when they all pass.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from vggtctl.failures import failures_path
from vggtctl.launch import netif
from vggtctl.launch.cache import describe_key, last_run_failed, measure_coverage, precompute_command
from vggtctl.launch.envcheck import check_env, interface_names
from vggtctl.launch.plan import TrainPlan
from vggtctl.wording import count

OK, WARN, FAIL, SKIP = "ok", "warn", "fail", "skip"
# Trainer flags whose values must be existing paths (JanusVLN / Qwen-VL style arguments).
PATH_FLAGS = ("--model_name_or_path", "--vggt_model_path", "--deepspeed", "--data_path", "--dataset_path")
OUTPUT_FLAGS = ("--output_dir",)
MIN_FREE_BYTES = 1 << 30
LOW_FREE_BYTES = 20 << 30
CONNECT_TIMEOUT_S = 3.0


@dataclass(frozen=True)
class Check:
    name: str
    status: str  # ok | warn | fail | skip
    detail: str
    fix: str | None = None


@dataclass(frozen=True)
class Preflight:
    checks: tuple[Check, ...]

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if c.status == FAIL]

    @property
    def ok(self) -> bool:
        return not self.failed


def run_preflight(
    plan: TrainPlan,
    *,
    dry_run: bool = False,
    workers: int = 8,
    connect_timeout: float = CONNECT_TIMEOUT_S,
) -> Preflight:
    checks: list[Check] = [check_topology(plan)]
    checks += check_paths(plan)
    checks.append(check_feature_key(plan))
    checks.append(check_gpus(plan, dry_run=dry_run))
    checks += check_master(plan, timeout=connect_timeout)
    checks += check_interfaces(plan)
    checks.append(check_infiniband(plan))
    checks += check_environment(plan)
    checks += check_disk(plan)
    if any(c.status == FAIL for c in checks):
        checks.append(Check("cache coverage", SKIP, "not measured: fix the failures above first"))
    else:
        checks.append(check_coverage(plan, workers=workers))
    return Preflight(tuple(checks))


# --------------------------------------------------------------------------- checks


def check_topology(plan: TrainPlan) -> Check:
    top = plan.topology
    backend = "NCCL" if plan.cuda_devices > 0 else "Gloo"
    detail = (
        f"{count(top.nnodes, 'node')} x {count(top.nproc_per_node, 'process', 'processes')} = "
        f"{count(top.world_size, 'rank')}; "
        f"this is node {top.node_rank}; master {top.master_addr}:{top.master_port}"
    )
    if plan.probe:
        detail += f"; probe backend {backend}"
    if top.slurm_job:
        detail += f"; Slurm job {top.slurm_job}"
    return Check("topology", WARN if top.notes else OK, detail + "".join(f"; {n}" for n in top.notes))


def trainer_flag_values(args: Sequence[str], flags: Sequence[str]) -> list[tuple[str, str]]:
    """(flag, value) for `--flag value` and `--flag=value` in an argument list."""
    found: list[tuple[str, str]] = []
    for i, arg in enumerate(args):
        name, eq, value = arg.partition("=")
        if name in flags:
            if eq:
                found.append((name, value))
            elif i + 1 < len(args):
                found.append((name, args[i + 1]))
    return found


def _looks_like_hub_id(value: str) -> bool:
    parts = value.split("/")
    return len(parts) == 2 and all(parts) and not value.startswith((".", "~")) and not os.path.isabs(value)


def check_paths(plan: TrainPlan) -> list[Check]:
    checks: list[Check] = []
    root = plan.data_root
    if root is None:
        if not plan.cache:
            checks.append(Check("data root", SKIP, "no data root given (not needed without the cache)"))
        else:
            checks.append(
                Check(
                    "data root",
                    WARN if plan.probe else FAIL,
                    "no data root: pass --data-root, set VGGTCTL_DATA_ROOT or data_root in vggtctl.toml"
                    + ("; the probe checks connectivity only" if plan.probe else ""),
                )
            )
    elif not root.is_dir():
        checks.append(Check("data root", FAIL, f"{root}: not a folder"))
    else:
        checks.append(Check("data root", OK, str(root)))
    if plan.probe:
        return checks
    if plan.entry[0] != "-m":
        script = Path(plan.entry[0])
        checks.append(
            Check(
                "entry script",
                OK if script.is_file() else FAIL,
                f"{script}" + ("" if script.is_file() else ": not found"),
            )
        )
    for flag, value in trainer_flag_values(plan.args, PATH_FLAGS):
        path = Path(value).expanduser()
        if path.exists():
            checks.append(Check(f"path {flag}", OK, str(path)))
        elif flag == "--model_name_or_path" and _looks_like_hub_id(value):
            checks.append(Check(f"path {flag}", WARN, f"{value}: not a local path; assumed a Hub model id"))
        else:
            checks.append(Check(f"path {flag}", FAIL, f"{value}: does not exist"))
    return checks


def check_feature_key(plan: TrainPlan) -> Check:
    if not plan.cache:
        return Check("feature key", SKIP, "--no-cache: the trainer computes VGGT features online")
    if plan.feature_key is None:
        reason = next((str(s.value) for s in plan.settings if s.name == "feature_key"), "none")
        return Check(
            "feature key",
            WARN if plan.probe else FAIL,
            f"{reason}: run `vggtctl precompute` first, or pass --feature-key (JSON, a .json file or a sidecar)"
            + ("; the probe checks connectivity only" if plan.probe else ""),
        )
    return Check("feature key", OK, describe_key(plan.feature_key))


def check_gpus(plan: TrainPlan, *, dry_run: bool) -> Check:
    want = plan.topology.nproc_per_node
    have = plan.cuda_devices
    if dry_run:
        return Check("gpus", SKIP, f"--dry-run (this machine sees {have} GPU(s); {want} needed per node)")
    if plan.probe and have == 0:
        return Check("gpus", SKIP, "no GPUs: the probe uses Gloo on CPU")
    if have >= want:
        return Check("gpus", OK, f"{have} visible, {want} used")
    return Check(
        "gpus",
        FAIL,
        f"{have} CUDA GPU(s) visible, {want} needed per node"
        + (" (check CUDA_VISIBLE_DEVICES)" if "CUDA_VISIBLE_DEVICES" in plan.environ else "")
        + "; use --probe or --dry-run on a machine without GPUs",
    )


def port_free(port: int) -> str | None:
    """None when the port can be bound on all interfaces (as the rendezvous store will), else why."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("", port))
        except OSError as err:
            return os.strerror(err.errno) if err.errno else str(err)
    return None


def probe_connect(addr: str, port: int, timeout: float) -> tuple[str, str]:
    """(status, detail) of a TCP connect to the master: refused still proves the host answers."""
    try:
        with socket.create_connection((addr, port), timeout=timeout):
            return OK, f"{addr}:{port} accepts connections (node 0 is up)"
    except ConnectionRefusedError:
        return OK, f"{addr} answers; port {port} not open yet (node 0 not started)"
    except TimeoutError:
        return FAIL, f"{addr}:{port}: no answer within {timeout:g} s (firewall, wrong address or host down)"
    except socket.gaierror as err:
        return FAIL, f"{addr}: cannot resolve ({err.strerror})"
    except OSError as err:
        reason = os.strerror(err.errno) if err.errno else str(err)
        if err.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH):
            reason = f"no route ({reason})"
        return FAIL, f"{addr}:{port}: {reason}"


def _loopback_row(addr: str, nnodes: int) -> Check | None:
    """A warning when nodes on other machines are told to reach node 0 through loopback."""
    ip = netif.resolve_ipv4(addr) or addr
    if nnodes < 2 or not (ip.startswith("127.") or ip == "::1"):
        return None
    # Debian-style /etc/hosts maps the host name to 127.0.1.1: NCCL would bind to lo, too.
    said = f"{addr} is a loopback address" if ip == addr else f"{addr} resolves to {ip} here"
    return Check(
        "master address",
        WARN,
        f"{said}: other machines cannot reach node 0 through it (fine only if every node runs here)",
        "pass node 0's address on the cluster network as --master-addr",
    )


def _master_address_row(addr: str, nnodes: int) -> Check:
    return _loopback_row(addr, nnodes) or Check("master address", OK, f"{addr} is this machine (node 0)")


def check_master(plan: TrainPlan, *, timeout: float) -> list[Check]:
    top = plan.topology
    if top.is_master:
        checks = []
        if not netif.is_local_address(top.master_addr):
            checks.append(
                Check(
                    "master address",
                    FAIL,
                    f"{top.master_addr} is not an address of this machine, but node 0 hosts the rendezvous",
                    "run node rank 0 on the machine that owns --master-addr",
                )
            )
        else:
            checks.append(_master_address_row(top.master_addr, top.nnodes))
        busy = port_free(top.master_port)
        checks.append(
            Check(
                "master port",
                OK if busy is None else FAIL,
                f"{top.master_port} is free" if busy is None else f"{top.master_port}: {busy}",
                None if busy is None else "pick another --master-port (the same on every node)",
            )
        )
        return checks
    status, detail = probe_connect(top.master_addr, top.master_port, timeout)
    loopback = _loopback_row(top.master_addr, top.nnodes)
    return [*([loopback] if loopback else []), Check("master reachable", status, detail)]


def _interface_matches(value: str, names: Sequence[str]) -> tuple[bool, str]:
    wanted, exact, exclude = interface_names(value)
    if exclude or not wanted:
        return True, "exclusion list; not checked"
    hits = [n for n in names if any((n == w) if exact else n.startswith(w) for w in wanted)]
    return bool(hits), ", ".join(hits)


def check_interfaces(plan: TrainPlan) -> list[Check]:
    env, unset = plan.launch_env()
    names = list(netif.interfaces())
    checks: list[Check] = []
    for variable in ("NCCL_SOCKET_IFNAME", "GLOO_SOCKET_IFNAME"):
        if variable in unset:
            checks.append(
                Check(
                    f"interface {variable}",
                    WARN,
                    f"not set: {plan.iface_reason}; set {variable} to the interface that reaches node 0",
                )
            )
            continue
        var = env.get(variable)
        if var is None:
            continue
        if variable == "GLOO_SOCKET_IFNAME":
            missing = [n for n in var.value.split(",") if n.strip() and n.strip() not in names]
            good, detail = (not missing, var.value) if not missing else (False, ", ".join(missing))
        else:
            good, detail = _interface_matches(var.value, names)
        checks.append(
            Check(
                f"interface {variable}",
                OK if good else FAIL,
                f"{var.value} ({var.source}): "
                + (f"present ({detail})" if good else "no such interface here")
                + ("" if good else f"; interfaces: {', '.join(names)}"),
            )
        )
    return checks


def infiniband_devices(sysfs: str = "/sys/class/infiniband") -> list[str]:
    with contextlib.suppress(OSError):
        return sorted(os.listdir(sysfs))
    return []


def check_infiniband(plan: TrainPlan, devices: Callable[[], list[str]] = infiniband_devices) -> Check:
    env, _ = plan.launch_env()
    if plan.cuda_devices == 0 and plan.probe:
        return Check("infiniband", SKIP, "Gloo on CPU does not use InfiniBand")
    if plan.topology.nnodes == 1:
        return Check("infiniband", SKIP, "one node: NVLink/PCIe inside the node")
    disabled = env.get("NCCL_IB_DISABLE")
    if disabled is not None and disabled.value.strip() == "1":
        return Check(
            "infiniband", WARN, "NCCL_IB_DISABLE=1: traffic between nodes goes over TCP sockets (slow)"
        )
    found = devices()
    hca = env.get("NCCL_IB_HCA")
    if hca is not None:
        wanted, exact, exclude = interface_names(hca.value)
        if not exclude:
            found = [
                d
                for d in found
                if any((d == w.split(":")[0]) if exact else d.startswith(w.split(":")[0]) for w in wanted)
            ]
    if found:
        return Check("infiniband", OK, f"HCAs: {', '.join(found)}")
    want = f" matching NCCL_IB_HCA={hca.value}" if hca is not None else ""
    return Check(
        "infiniband",
        WARN,
        f"no InfiniBand HCA{want} under /sys/class/infiniband: NCCL falls back to TCP sockets (slow)",
    )


def check_environment(plan: TrainPlan) -> list[Check]:
    env, _ = plan.launch_env()
    values = {name: var.value for name, var in env.items()}
    findings = check_env(values)
    if not findings:
        relevant = [n for n in values if n.startswith(("NCCL_", "GLOO_", "TORCH_"))]
        return [Check("nccl/gloo env", OK, f"{count(len(relevant), 'variable')}: accepted values")]
    return [
        Check(f"env {f.name}", f.status, f"{f.name}={f.value} ({env[f.name].source}): {f.detail}")
        for f in findings
    ]


def _existing_parent(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_disk(plan: TrainPlan) -> list[Check]:
    targets = [("logs", plan.log_dir)]
    targets += [("outputs", Path(v).expanduser()) for _, v in trainer_flag_values(plan.args, OUTPUT_FLAGS)]
    checks: list[Check] = []
    for label, path in targets:
        base = _existing_parent(path)
        try:
            free = shutil.disk_usage(base).free
        except OSError as err:
            checks.append(Check(f"disk {label}", FAIL, f"{path}: {err.strerror}"))
            continue
        status = (
            FAIL if free < MIN_FREE_BYTES else WARN if label == "outputs" and free < LOW_FREE_BYTES else OK
        )
        checks.append(Check(f"disk {label}", status, f"{path}: {free / (1 << 30):.1f} GiB free"))
    return checks


def check_coverage(plan: TrainPlan, *, workers: int = 8) -> Check:
    if not plan.cache:
        return Check("cache coverage", SKIP, "--no-cache")
    if plan.feature_key is None or plan.catalog is None:
        return Check("cache coverage", SKIP, "no feature key or data root")
    if plan.min_coverage <= 0:
        return Check("cache coverage", SKIP, "--min-coverage 0")
    try:
        cov = measure_coverage(plan.catalog, plan.feature_key, workers=workers)
    except ImportError as err:
        return Check("cache coverage", FAIL, f"cannot measure coverage: {err}")
    except Exception as err:  # a catalog or sidecar problem: name it, do not crash the table
        return Check("cache coverage", FAIL, f"cannot measure coverage: {type(err).__name__}: {err}")
    fix = precompute_command(plan.catalog, plan.feature_key, plan.fix_settings)
    problems = ", ".join(f"{n} {v}" for v, n in sorted(cov.by_verdict.items()) if v != "valid" and n)
    detail = f"{cov.valid}/{cov.total} Items valid ({cov.fraction:.1%}, need {plan.min_coverage:.1%})"
    if problems:
        detail += f"; {problems}"
    if cov.total == 0:
        return Check("cache coverage", FAIL, f"the catalog ({cov.layout}) lists no training Items", fix)
    failed = _failed_last_run(plan)
    if failed and failed >= cov.total - cov.valid:
        fix = None  # every miss is an item the last run failed: a rerun would fail them again
    if cov.fraction + 1e-12 < plan.min_coverage:
        if failed:  # the fix command cannot close that part of the gap: say what can
            detail += (
                f"; {_failures_note(plan, failed)}: fix or remove those images, or lower "
                f"--min-coverage (now {plan.min_coverage})"
            )
        return Check("cache coverage", FAIL, detail, fix)
    if cov.valid < cov.total:
        detail += "; misses are computed online (slower)"
        if failed:
            detail += f"; {_failures_note(plan, failed)}"
        return Check("cache coverage", WARN, detail, fix)
    return Check("cache coverage", OK, detail)


def _failed_last_run(plan: TrainPlan) -> int:
    """Items the last precompute run of the data root failed, when that run wrote the key the
    trainer asks for (0 otherwise, or when the manifest cannot tell)."""
    if plan.catalog is None or not plan.fix_settings:  # fix_settings: the key is the manifest's
        return 0
    try:
        return last_run_failed(plan.catalog.root) or 0
    except Exception:  # an unreadable manifest: the coverage line still stands on its own
        return 0


def _failures_note(plan: TrainPlan, failed: int) -> str:
    root = plan.catalog.root if plan.catalog is not None else Path(".")
    return (
        f"the last precompute run failed {count(failed, 'item')}, which a rerun fails again "
        f"(which and why: {failures_path(root)})"
    )
