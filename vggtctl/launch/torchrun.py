"""The torchrun command line and environment for each node.

`python -m torch.distributed.run` with a static rendezvous (`--master-addr/--master-port`,
no rendezvous backend): node 0 hosts the store, every node names it, which is what two nodes
started by hand need. The entry is `-m package.module` or a script path; trainer arguments
follow it unchanged.
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from vggtctl.errors import ConfigError

LAUNCHER = ("-m", "torch.distributed.run")
PROBE_ENTRY = ("-m", "vggtctl.launch.probe")
# Stands for "the interface on this node's route to the master", computed on that node.
IFACE_ON_NODE = "\x00iface\x00"


def parse_entry(entry: str) -> list[str]:
    """`-m pkg.module [args]` or `path/to/script.py [args]` -> argv pieces."""
    parts = shlex.split(entry)
    if not parts:
        raise ConfigError("--entry is empty: give `-m package.module` or a script path")
    if parts[0].startswith("-m") and len(parts[0]) > 2:
        parts = ["-m", parts[0][2:], *parts[1:]]
    if parts[0] == "-m" and (len(parts) < 2 or parts[1].startswith("-")):
        raise ConfigError(f"--entry {entry!r}: `-m` needs a module name")
    if parts[0] != "-m" and parts[0].startswith("-"):
        raise ConfigError(f"--entry {entry!r}: expected `-m package.module` or a script path")
    return parts


def torchrun_argv(
    *,
    nnodes: int,
    nproc_per_node: int,
    node_rank: int,
    master_addr: str,
    master_port: int,
    entry: Sequence[str],
    args: Sequence[str] = (),
    python: str | None = None,
) -> list[str]:
    """The full argv: python -m torch.distributed.run OPTIONS ENTRY ARGS."""
    return [
        python or sys.executable,
        *LAUNCHER,
        f"--nnodes={nnodes}",
        f"--nproc-per-node={nproc_per_node}",
        f"--node-rank={node_rank}",
        f"--master-addr={master_addr}",
        f"--master-port={master_port}",
        *entry,
        *args,
    ]


@dataclass(frozen=True)
class NodeCommand:
    """What to run on one node: argv plus the variables set on top of the inherited environment.

    For a node other than this one, interface values may hold IFACE_ON_NODE: printed as a
    command substitution that finds the interface on that node.
    """

    node_rank: int
    argv: list[str]
    env: dict[str, str]
    master_addr: str
    sources: dict[str, str] = field(default_factory=dict)

    def child_env(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        if any(IFACE_ON_NODE in v for v in self.env.values()):
            raise ValueError("this command is for another node; its interface is found there")
        merged = dict(os.environ if base is None else base)
        merged.update(self.env)
        return merged

    def shell(self, python: str | None = None) -> str:
        """Paste-ready text: `export` lines, then the command (continued over a few lines)."""
        lines = [f"export {name}={self._value(value)}" for name, value in self.env.items()]
        argv = list(self.argv)
        argv[0] = python or display_python(argv[0])
        split = _entry_index(argv)
        head = " ".join(shlex.quote(a) for a in argv[:split])
        entry_end = split + (2 if argv[split] == "-m" else 1)
        entry = " ".join(shlex.quote(a) for a in argv[split:entry_end])
        rest = " ".join(shlex.quote(a) for a in argv[entry_end:])
        lines.append(f"{head} \\\n  {entry}" + (f" \\\n  {rest}" if rest else ""))
        return "\n".join(lines)

    def _value(self, value: str) -> str:
        if IFACE_ON_NODE not in value:
            return shlex.quote(value)
        finder = f"$(python -m vggtctl.launch.netif {shlex.quote(self.master_addr)})"
        literal = [_double_quote_escape(part) for part in value.split(IFACE_ON_NODE)]
        return '"' + finder.join(literal) + '"'


def _entry_index(argv: Sequence[str]) -> int:
    """Index of the entry (`-m` or script) after the launcher's own options."""
    for i in range(3, len(argv)):
        if not argv[i].startswith("--"):
            return i
    return len(argv)


def _double_quote_escape(text: str) -> str:
    return "".join("\\" + c if c in '\\"$`' else c for c in text)


def display_python(executable: str) -> str:
    """`python` when that is what PATH finds anyway, else the full interpreter path.

    Compared without resolving links: a virtualenv's python links to the system one.
    """
    found = shutil.which("python")
    if (
        found
        and os.path.dirname(os.path.abspath(found)) == os.path.dirname(os.path.abspath(executable))
        and os.path.realpath(found) == os.path.realpath(executable)
    ):
        return "python"
    return executable
