"""Write shell scripts equivalent to a `vggtctl train` launch: one node, and N nodes by hand or Slurm.

For clusters where the launch must be a plain script (a scheduler template, a colleague
without vggtctl on PATH). The scripts set the same variables and run the same torchrun
command as the plan; what they cannot know in advance (node rank, master address, the
interface on the route to it, CPU cores) they compute on the node. Variables already
exported win, as they do for `vggtctl train`. No preflight: run `vggtctl train --dry-run`.
"""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

from vggtctl import __version__
from vggtctl.launch.plan import TrainPlan
from vggtctl.launch.profiles import merge_env

_SHVAR = "\x01{}\x01"
_SHVAR_RE = re.compile("\x01([A-Z_]+)\x01")


def script_names(plan: TrainPlan) -> tuple[str, str]:
    nodes = max(2, plan.topology.nnodes)
    return f"train_{plan.profile.name}.sh", f"train_{nodes}node_{plan.profile.name}.sh"


def emit_scripts(plan: TrainPlan, directory: str | os.PathLike[str]) -> list[Path]:
    """Write the one-node and the multi-node script into `directory`; their paths."""
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    single_name, multi_name = script_names(plan)
    written = []
    for name, nodes in ((single_name, 1), (multi_name, max(2, plan.topology.nnodes))):
        path = folder / name
        tmp = path.with_name(f".{name}.tmp-{os.getpid()}")
        tmp.write_text(render_script(plan, nodes, name), encoding="utf-8")
        tmp.chmod(0o755)
        os.replace(tmp, path)
        written.append(path)
    return written


def _dq(value: str) -> str:
    """Inside double quotes: escape literal text, turn markers into ${VAR} references."""
    parts = _SHVAR_RE.split(value)
    out = []
    for i, part in enumerate(parts):
        if i % 2:
            out.append("${" + part + "}")
        else:
            out.append("".join("\\" + c if c in '\\"$`' else c for c in part))
    return "".join(out)


def _given_master_addr(plan: TrainPlan) -> str | None:
    """The master address the user named (flag, environment, vggtctl.toml): the script's default
    for MASTER_ADDR. A default or Slurm's first host is left to the node the script runs on."""
    setting = next(s for s in plan.topology.settings if s.name == "master_addr")
    return None if setting.source.startswith(("default", "Slurm")) else str(setting.value)


def _port_is_fixed(plan: TrainPlan) -> bool:
    source = next(s.source for s in plan.topology.settings if s.name == "master_port")
    return not source.startswith(("default", "Slurm"))


def render_script(plan: TrainPlan, nodes: int, name: str) -> str:
    top = plan.topology
    values = {"iface": _SHVAR.format("IFACE"), "omp_threads": _SHVAR.format("OMP_THREADS")}
    env, _ = merge_env(plan.profile, plan.config_env, values, plan.environ)
    uses_iface = [n for n, v in env.items() if "\x01IFACE\x01" in v.value]
    uses_omp = any("\x01OMP_THREADS\x01" in v.value for v in env.values())
    port = top.master_port if _port_is_fixed(plan) else 29500
    entry = " ".join(shlex.quote(a) for a in plan.entry)
    args = " ".join(shlex.quote(a) for a in plan.args)
    lines = [
        "#!/usr/bin/env bash",
        f"# {'One node' if nodes == 1 else f'{nodes} nodes'} x {top.nproc_per_node} processes, profile "
        f"{plan.profile.name}: written by `vggtctl train --emit-scripts` (vggtctl {__version__}).",
        "# Runs the same torchrun command with the same variables as `vggtctl train`, without its",
        "# preflight checks (see `vggtctl train --dry-run`). A variable already exported wins.",
    ]
    if nodes == 1:
        lines += ["#   ./" + name + " [more trainer args]"]
    else:
        lines += [
            "# By hand, on every node (any order):",
            f"#   NODE_RANK=0 MASTER_ADDR=<node-0 address> ./{name} [more trainer args]",
            f"#   NODE_RANK=1 MASTER_ADDR=<node-0 address> ./{name} [more trainer args]",
            f"# Under Slurm: srun --nodes={nodes} --ntasks-per-node=1 ./{name}",
        ]
    lines += ["set -euo pipefail", "", 'PYTHON="${PYTHON:-python}"', f"NNODES={nodes}"]
    lines.append(f'NPROC_PER_NODE="${{NPROC_PER_NODE:-{top.nproc_per_node}}}"')
    if nodes == 1:
        lines += [
            "NODE_RANK=0",
            'MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"',
            f'MASTER_PORT="${{MASTER_PORT:-{port}}}"',
        ]
    else:
        given = _given_master_addr(plan)  # named when the script was written: wins over Slurm's
        first_host = '$(scontrol show hostnames "${SLURM_JOB_NODELIST}" | head -n 1)'
        lines += [
            'if [[ -n "${SLURM_JOB_ID:-}" ]]; then',
            '  NODE_RANK="${NODE_RANK:-${SLURM_NODEID:-}}"',
            f'  MASTER_ADDR="${{MASTER_ADDR:-{_dq(given) if given else first_host}}}"',
        ]
        if not _port_is_fixed(plan):
            lines.append('  MASTER_PORT="${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}"')
        others = "1 on the other" if nodes == 2 else f"1..{nodes - 1} on the others"
        master = (
            f'MASTER_ADDR="${{MASTER_ADDR:-{_dq(given)}}}"'
            if given
            else 'MASTER_ADDR="${MASTER_ADDR:?set MASTER_ADDR: an address of node 0 that every node reaches}"'
        )
        lines += [
            "fi",
            f'NODE_RANK="${{NODE_RANK:?set NODE_RANK: 0 on the master node, {others}}}"',
            master,
            f'MASTER_PORT="${{MASTER_PORT:-{port}}}"',
        ]
    if uses_iface:
        unset_test = " || ".join(f'-z "${{{n}:-}}"' for n in uses_iface)
        lines += [
            'IFACE=""',
            f"if [[ {unset_test} ]]; then",
            "  # The interface on the route to the master (on node 0: the one holding its address).",
            '  IFACE="$("$PYTHON" -m vggtctl.launch.netif "$MASTER_ADDR")" || {',
            f'    echo "{name}: no interface reaches $MASTER_ADDR; export {" and ".join(uses_iface)}" >&2',
            "    exit 2",
            "  }",
            "fi",
        ]
    if uses_omp:
        lines += ["OMP_THREADS=$(( $(nproc) / NPROC_PER_NODE ))", "(( OMP_THREADS >= 1 )) || OMP_THREADS=1"]
    lines.append("")
    for var_name, var in env.items():
        lines.append(f'export {var_name}="${{{var_name}:-{_dq(var.value)}}}"  # {var.source}')
    for var_name, value in plan.cache_env().items():
        lines.append(f"export {var_name}={shlex.quote(value)}")
    lines += [
        "",
        'exec "$PYTHON" -m torch.distributed.run --nnodes="$NNODES" --nproc-per-node="$NPROC_PER_NODE" \\',
        '  --node-rank="$NODE_RANK" --master-addr="$MASTER_ADDR" --master-port="$MASTER_PORT" \\',
        f"  {entry} \\",
        f'  {args + " " if args else ""}"$@"',
        "",
    ]
    return "\n".join(lines)
