"""Who is who in a launch: number of nodes, this node's rank, the master address and port.

Sources, first wins: flags, VGGTCTL_* variables, Slurm (`SLURM_JOB_ID` set: node count, node
rank and the first host of the job's node list), the usual torch variables (`MASTER_ADDR`,
`MASTER_PORT`, `NNODES`, `NODE_RANK`), vggtctl.toml, defaults.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from vggtctl.errors import ConfigError
from vggtctl.launch.options import Setting, as_int, pick

DEFAULT_PORT = 29500


# --------------------------------------------------------------------------- Slurm node lists


def expand_nodelist(spec: str) -> list[str]:
    """Slurm's compact host list -> host names in order.

    `gpu[01-03,07],cpu5` -> gpu01 gpu02 gpu03 gpu07 cpu5; `gpu-[01-02]-ib` -> gpu-01-ib gpu-02-ib;
    several bracket groups in one name expand as a product. Zero padding follows the lower bound.
    """
    hosts: list[str] = []
    for word in _split_top_level(spec.strip()):
        hosts.extend(_expand_word(word, spec))
    return hosts


def _split_top_level(spec: str) -> list[str]:
    words: list[str] = []
    depth = 0
    start = 0
    for i, char in enumerate(spec):
        if char == "[":
            depth += 1
            if depth > 1:
                raise ValueError(f"node list {spec!r}: nested '[' at position {i}")
        elif char == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"node list {spec!r}: ']' without '[' at position {i}")
        elif char == "," and depth == 0:
            words.append(spec[start:i])
            start = i + 1
    if depth:
        raise ValueError(f"node list {spec!r}: '[' is never closed")
    words.append(spec[start:])
    return [w.strip() for w in words if w.strip()]


def _expand_word(word: str, spec: str) -> list[str]:
    open_at = word.find("[")
    if open_at < 0:
        return [word]
    close_at = word.index("]", open_at)
    prefix, body, rest = word[:open_at], word[open_at + 1 : close_at], word[close_at + 1 :]
    tails = _expand_word(rest, spec)
    return [f"{prefix}{value}{tail}" for value in _expand_range(body, spec) for tail in tails]


def _expand_range(body: str, spec: str) -> list[str]:
    values: list[str] = []
    for part in body.split(","):
        part = part.strip()
        low, dash, high = part.partition("-")
        if not low.isdigit() or (dash and not high.isdigit()):
            raise ValueError(f"node list {spec!r}: bad range {part!r}")
        if not dash:
            values.append(low)
            continue
        start, stop = int(low), int(high)
        if stop < start:
            raise ValueError(f"node list {spec!r}: range {part!r} runs backwards")
        values.extend(str(n).zfill(len(low)) for n in range(start, stop + 1))
    return values


def hostnames(nodelist: str) -> list[str]:
    """`scontrol show hostnames` when Slurm's tools are here, else our expander."""
    tool = shutil.which("scontrol")
    if tool:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            done = subprocess.run(
                [tool, "show", "hostnames", nodelist], capture_output=True, text=True, timeout=10, check=False
            )
            names = done.stdout.split()
            if done.returncode == 0 and names:
                return names
    return expand_nodelist(nodelist)


# --------------------------------------------------------------------------- topology


@dataclass(frozen=True)
class Topology:
    nnodes: int
    node_rank: int
    master_addr: str
    master_port: int
    nproc_per_node: int
    settings: tuple[Setting, ...] = ()
    notes: tuple[str, ...] = field(default=())
    slurm_job: str | None = None

    @property
    def world_size(self) -> int:
        return self.nnodes * self.nproc_per_node

    @property
    def is_master(self) -> bool:
        return self.node_rank == 0


def _first(*candidates: Setting) -> Setting:
    for candidate in candidates:
        if candidate.value not in (None, ""):
            return candidate
    return candidates[-1]


def _from_env(name: str, variable: str, environ: Mapping[str, str]) -> Setting:
    return Setting(name, environ.get(variable), f"env {variable}")


def resolve_topology(
    *,
    nodes: int | None = None,
    node_rank: int | None = None,
    master_addr: str | None = None,
    master_port: int | None = None,
    gpus_per_node: int | None = None,
    config: Mapping[str, Any] | None = None,
    default_gpus: int = 8,
    default_gpus_source: str = "default",
    environ: Mapping[str, str] | None = None,
    hostnames_fn: Callable[[str], list[str]] = hostnames,
) -> Topology:
    """Resolve and validate the launch topology for this node."""
    environ = os.environ if environ is None else environ
    config = config or {}
    notes: list[str] = []

    def flag_or_env(name: str, flag: Any) -> Setting:
        return pick(name, flag, {}, environ=environ)

    def from_config(name: str, default: Any) -> Setting:
        return pick(name, None, config, default, environ={})

    slurm_job = environ.get("SLURM_JOB_ID") or None
    slurm: dict[str, Setting] = {}
    if slurm_job:
        count = environ.get("SLURM_JOB_NUM_NODES") or environ.get("SLURM_NNODES")
        slurm["nodes"] = Setting("nodes", count, "Slurm SLURM_JOB_NUM_NODES")
        slurm["node_rank"] = Setting("node_rank", environ.get("SLURM_NODEID"), "Slurm SLURM_NODEID")
        nodelist = environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST")
        first = None
        if nodelist:
            try:
                names = hostnames_fn(nodelist)
            except ValueError as err:
                raise ConfigError(str(err)) from None
            first = names[0] if names else None
        slurm["master_addr"] = Setting("master_addr", first, "Slurm first host of SLURM_JOB_NODELIST")
        # One port per job, the same on every node of it: jobs sharing a node do not collide.
        port = 20000 + int(slurm_job) % 20000 if slurm_job.isdigit() else None
        slurm["master_port"] = Setting("master_port", port, "Slurm derived from SLURM_JOB_ID")
        tasks = environ.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0]
        if tasks.isdigit() and int(tasks) > 1:
            notes.append(
                f"SLURM_NTASKS_PER_NODE={tasks}: run one `vggtctl train` per node "
                "(srun --ntasks-per-node=1); torchrun starts the per-GPU processes"
            )
    none = Setting("", None, "default")

    nodes_s = _first(
        flag_or_env("nodes", nodes),
        slurm.get("nodes", none),
        _from_env("nodes", "NNODES", environ),
        from_config("nodes", 1),
    )
    rank_s = _first(
        flag_or_env("node_rank", node_rank),
        slurm.get("node_rank", none),
        _from_env("node_rank", "NODE_RANK", environ),
        from_config("node_rank", 0),
    )
    addr_s = _first(
        flag_or_env("master_addr", master_addr),
        slurm.get("master_addr", none),
        _from_env("master_addr", "MASTER_ADDR", environ),
        from_config("master_addr", None),
    )
    port_s = _first(
        flag_or_env("master_port", master_port),
        slurm.get("master_port", none),
        _from_env("master_port", "MASTER_PORT", environ),
        from_config("master_port", DEFAULT_PORT),
    )
    gpus_s = _first(
        flag_or_env("gpus_per_node", gpus_per_node),
        from_config("gpus_per_node", None),
        Setting("gpus_per_node", default_gpus, default_gpus_source),
    )

    n = as_int(nodes_s, minimum=1)
    rank = as_int(rank_s, minimum=0)
    port = as_int(port_s, minimum=1, maximum=65535)
    gpus = as_int(gpus_s, minimum=1)
    assert n is not None and rank is not None and port is not None and gpus is not None
    if rank >= n:
        raise ConfigError(
            f"node rank {rank} ({rank_s.source}) must be below the node count {n} ({nodes_s.source})"
        )
    addr = addr_s.value
    if addr in (None, ""):
        if n > 1:
            raise ConfigError(
                f"--master-addr is required for {n} nodes: an address of node 0 that every node can reach"
            )
        addr_s = Setting("master_addr", "127.0.0.1", "default (one node)")
        addr = "127.0.0.1"
    settings = (
        Setting("nodes", n, nodes_s.source),
        Setting("node_rank", rank, rank_s.source),
        Setting("master_addr", str(addr), addr_s.source),
        Setting("master_port", port, port_s.source),
        Setting("gpus_per_node", gpus, gpus_s.source),
    )
    return Topology(n, rank, str(addr), port, gpus, settings, tuple(notes), slurm_job)
