"""Options in, launch plan out: every setting resolved once, with its source.

The CLI fills `TrainOptions` from flags; `build_plan` adds VGGTCTL_* variables, vggtctl.toml,
Slurm and the profile, and returns a frozen `TrainPlan` that preflight, the dry run, the
script writer and the runner all read. Nothing here starts a process.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vggtctl.distributed import usable_cpus
from vggtctl.errors import ConfigError
from vggtctl.keys import FeatureKey
from vggtctl.launch import netif
from vggtctl.launch.cache import CatalogSpec, read_manifest, resolve_feature_key
from vggtctl.launch.options import Setting, as_bool, as_float, as_int, as_list, pick
from vggtctl.launch.profiles import EnvVar, Profile, load_profile, merge_env
from vggtctl.launch.topology import Topology, resolve_topology
from vggtctl.launch.torchrun import IFACE_ON_NODE, PROBE_ENTRY, NodeCommand, parse_entry, torchrun_argv
from vggtctl.settings import CONFIG_FILE_KEY, as_path, find_config, unknown_keys

DEFAULT_ENTRY = "-m qwen_vl.train.train_vln"
DEFAULT_CACHE_FLAG = "--use_vggt_cache"
LOOPBACK = ("127.", "localhost", "::1")


@dataclass
class TrainOptions:
    """Raw flag values; None means "not given on the command line"."""

    nodes: int | None = None
    node_rank: int | None = None
    master_addr: str | None = None
    master_port: int | None = None
    gpus_per_node: int | None = None
    profile: str | None = None
    config: str | None = None
    entry: str | None = None
    cache: bool | None = None
    min_coverage: float | None = None
    log_dir: str | None = None
    data_root: str | None = None
    data_path: str | None = None
    layout: str | None = None
    annotations: list[str] | None = None
    max_history: int | None = None
    feature_key: str | None = None
    cache_flag: str | None = None
    probe: bool = False
    probe_samples: int | None = None
    trainer_args: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class TrainPlan:
    topology: Topology
    profile: Profile
    entry: tuple[str, ...]
    args: tuple[str, ...]  # what the entry receives: trainer args, or the probe's own
    cache: bool
    feature_key: FeatureKey | None
    catalog: CatalogSpec | None
    fix_settings: dict[str, Any]
    min_coverage: float
    log_dir: Path
    probe: bool
    cuda_devices: int
    iface: str | None
    iface_reason: str
    settings: tuple[Setting, ...]
    notes: tuple[str, ...]
    config_env: dict[str, Any]
    environ: dict[str, str]
    omp_threads: int

    @property
    def data_root(self) -> Path | None:
        return self.catalog.root if self.catalog else None

    def launch_env(self, node_rank: int | None = None) -> tuple[dict[str, EnvVar], list[str]]:
        """Variables for a node's launch and the profile names left unset (unknown interface)."""
        rank = self.topology.node_rank if node_rank is None else node_rank
        here = rank == self.topology.node_rank or self.topology.master_addr.startswith(LOOPBACK)
        values = {"iface": self.iface if here else IFACE_ON_NODE, "omp_threads": str(self.omp_threads)}
        env, unset = merge_env(self.profile, self.config_env, values, self.environ)
        for name, value in self.cache_env().items():
            env[name] = EnvVar(name, value, "vggtctl")
        return env, unset

    def cache_env(self) -> dict[str, str]:
        if not self.cache:
            return {"USE_VGGT_CACHE": "false"}
        env = {"USE_VGGT_CACHE": "true"}
        if self.feature_key is not None:
            env.update(self.feature_key.to_env())
        if self.data_root is not None:
            env["VGGTCTL_DATA_ROOT"] = str(self.data_root)
        return env

    def command(self, node_rank: int | None = None, python: str | None = None) -> NodeCommand:
        rank = self.topology.node_rank if node_rank is None else node_rank
        env, _ = self.launch_env(rank)
        argv = torchrun_argv(
            nnodes=self.topology.nnodes,
            nproc_per_node=self.topology.nproc_per_node,
            node_rank=rank,
            master_addr=self.topology.master_addr,
            master_port=self.topology.master_port,
            entry=self.entry,
            args=self.args,
            python=python,
        )
        return NodeCommand(
            node_rank=rank,
            argv=argv,
            env={k: v.value for k, v in env.items()},
            master_addr=self.topology.master_addr,
            sources={k: v.source for k, v in env.items()},
        )

    def commands(self, python: str | None = None) -> list[NodeCommand]:
        return [self.command(rank, python) for rank in range(self.topology.nnodes)]


def count_cuda_devices() -> int:
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return 0
    return int(torch.cuda.device_count()) if torch.cuda.is_available() else 0


def build_plan(
    options: TrainOptions,
    *,
    environ: Mapping[str, str] | None = None,
    cuda_devices: int | None = None,
) -> TrainPlan:
    """Resolve every setting; ConfigError (exit 2) for values that cannot work."""
    environ = dict(os.environ if environ is None else environ)
    notes: list[str] = []

    root_setting = pick("data_root", options.data_root, {}, environ=environ)
    config = find_config(root_setting.value, explicit=options.config)
    if unknown := unknown_keys(config):
        notes.append(f"{config.get(CONFIG_FILE_KEY)}: unknown setting(s) ignored: {', '.join(unknown)}")
    if root_setting.value in (None, ""):
        root_setting = pick("data_root", None, config, environ={})
    # absolute: the path is exported to every rank of every node and written into scripts;
    # relative in a vggtctl.toml means relative to that file
    root_path = as_path(root_setting) if root_setting.value not in (None, "") else None
    data_root = root_path.absolute() if root_path is not None else None

    profile_setting = pick("profile", options.profile, config, "h800", environ=environ)
    profile = load_profile(str(profile_setting.value))
    cuda = count_cuda_devices() if cuda_devices is None else cuda_devices

    topology = resolve_topology(
        nodes=options.nodes,
        node_rank=options.node_rank,
        master_addr=options.master_addr,
        master_port=options.master_port,
        gpus_per_node=options.gpus_per_node,
        config=config,
        default_gpus=profile.gpus_per_node,
        default_gpus_source=f"profile {profile.name}",
        environ=environ,
    )
    notes.extend(topology.notes)
    gpus_source = dict((s.name, s.source) for s in topology.settings)["gpus_per_node"]
    if options.probe and cuda == 0 and gpus_source.startswith(("profile", "default")):
        topology = _with_gpus(topology, 1, "probe on CPU: 1 process per node")
        notes.append(
            "no CUDA GPUs here: the probe runs 1 process per node with Gloo (--gpus-per-node to change)"
        )

    cache_setting = pick("cache", options.cache, config, True, environ=environ)
    cache = as_bool(cache_setting)
    cov_setting = pick("min_coverage", options.min_coverage, config, 1.0, environ=environ)
    min_cov = as_float(cov_setting, 0.0, 1.0)
    log_setting = pick("log_dir", options.log_dir, config, "logs", environ=environ)
    log_dir = Path(str(log_setting.value)).expanduser()

    info = read_manifest(data_root)
    recorded = info.settings

    def catalog_pick(name: str, flag: Any, default: Any) -> Setting:
        chosen = pick(name, flag, config, None, environ=environ)
        if chosen.value is None and recorded.get(name) not in (None, "", []):
            return Setting(name, recorded[name], "manifest (last precompute run)")
        return chosen if chosen.value is not None else Setting(name, default, "default")

    layout = catalog_pick("layout", options.layout, "auto")
    annotations = catalog_pick("annotations", options.annotations or None, None)
    # files in an environment variable are listed like PATH, as precompute reads them
    annotation_files = as_list(
        annotations, separator=os.pathsep if annotations.source.startswith("env") else None
    )
    max_history = catalog_pick("max_history", options.max_history, None)
    data_path = catalog_pick("data_path", options.data_path, None)
    catalog = None
    if data_root is not None:
        catalog = CatalogSpec(
            data_root,
            str(layout.value),
            # absolute, like the data root: other nodes and emitted scripts start elsewhere
            tuple(str(as_path(annotations, text).absolute()) for text in annotation_files),
            as_int(max_history, minimum=0),
            str(as_path(data_path).absolute()) if data_path.value else None,
        )

    key, key_setting = (None, Setting("feature_key", "not used (--no-cache)", "-"))
    if cache:
        key, key_setting = resolve_feature_key(options.feature_key, info, data_root, config, environ)
    fix_settings = dict(recorded) if key is not None and key == info.key else {}

    entry_setting = pick("entry", options.entry, config, DEFAULT_ENTRY, environ=environ)
    cache_flag = pick("cache_flag", options.cache_flag, config, DEFAULT_CACHE_FLAG, environ=environ)
    configured_args = pick("trainer_args", None, config, environ=environ)
    trainer_args = [*as_list(configured_args), *options.trainer_args]
    if options.probe:
        entry = list(PROBE_ENTRY)
        args = _probe_args(catalog, options.probe_samples)
        if trainer_args:
            notes.append("--probe: trainer arguments are not used")
    else:
        entry = parse_entry(str(entry_setting.value))
        args = list(trainer_args)
        flag = str(cache_flag.value or "")
        given = _flag_value(args, flag) if flag else None
        if given is not None and given != cache:
            said = "off" if cache else "on"
            raise ConfigError(
                f"the trainer arguments turn the cache {said} ({flag}) while vggtctl's cache is "
                f"{'on' if cache else 'off (--no-cache)'}: the trainer would get both; drop the "
                f"flag, or use {'--no-cache' if cache else '--cache'}"
            )
        if cache and flag and given is None and not _names_flag(args, flag):
            args += [flag, "True"]

    iface, why = netif.route_interface(topology.master_addr)
    config_env = _config_env(config)
    omp = max(1, usable_cpus() // topology.nproc_per_node)
    settings = (
        *topology.settings,
        profile_setting,
        Setting("entry", " ".join(entry), "probe" if options.probe else entry_setting.source),
        Setting("cache", cache, cache_setting.source),
        Setting("feature_key", key_setting.value, key_setting.source),
        Setting("data_root", str(data_root) if data_root else "-", root_setting.source),
        layout,
        Setting("annotations", ", ".join(annotation_files) or "-", annotations.source),
        Setting(
            "max_history", max_history.value if max_history.value is not None else "-", max_history.source
        ),
        Setting("data_path", data_path.value or "-", data_path.source),
        Setting("min_coverage", min_cov, cov_setting.source),
        Setting("log_dir", str(log_dir), log_setting.source),
        Setting("interface", iface or "-", why),
        Setting("args", " ".join(args) or "-", "trainer" if not options.probe else "probe"),
    )
    return TrainPlan(
        topology=topology,
        profile=profile,
        entry=tuple(entry),
        args=tuple(args),
        cache=cache,
        feature_key=key,
        catalog=catalog,
        fix_settings=fix_settings,
        min_coverage=min_cov,
        log_dir=log_dir,
        probe=options.probe,
        cuda_devices=cuda,
        iface=iface,
        iface_reason=why,
        settings=settings,
        notes=tuple(notes),
        config_env=config_env,
        environ=environ,
        omp_threads=omp,
    )


def _with_gpus(topology: Topology, gpus: int, source: str) -> Topology:
    settings = tuple(
        Setting(s.name, gpus, source) if s.name == "gpus_per_node" else s for s in topology.settings
    )
    return Topology(
        topology.nnodes,
        topology.node_rank,
        topology.master_addr,
        topology.master_port,
        gpus,
        settings,
        topology.notes,
        topology.slurm_job,
    )


_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def _spelling(arg: str) -> str:
    """`--use-vggt-cache` and `--use_vggt_cache` are one flag to an argparse-based trainer."""
    return "--" + arg[2:].replace("-", "_") if arg.startswith("--") else arg


def _names_flag(args: list[str], flag: str) -> bool:
    wanted = _spelling(flag)
    return any(_spelling(a.split("=", 1)[0]) == wanted for a in args)


def _flag_value(args: list[str], flag: str) -> bool | None:
    """What the trainer arguments set `flag` to (`--flag X`, `--flag=X`, or `--flag` alone,
    which a boolean trainer flag reads as true), None when they do not, or not to a
    recognisable boolean."""
    wanted = _spelling(flag)
    for i, arg in enumerate(args):
        name, eq, text = arg.partition("=")
        if _spelling(name) != wanted:
            continue
        if not eq:
            following = args[i + 1] if i + 1 < len(args) else None
            if following is None or following.startswith("--"):
                return True  # a bare flag
            text = following
        word = text.strip().lower()
        return True if word in _TRUE else False if word in _FALSE else None
    return None


def _probe_args(catalog: CatalogSpec | None, samples: int | None) -> list[str]:
    args: list[str] = []
    if catalog is not None:
        args += ["--data-root", str(catalog.root), *catalog.cli_args()]
    if samples is not None:
        args += ["--max-samples", str(samples)]
    return args


def _config_env(config: Mapping[str, Any]) -> dict[str, Any]:
    table = config.get("train")
    env = table.get("env") if isinstance(table, dict) else None
    if env is None:
        return {}
    if not isinstance(env, dict):
        raise ConfigError("vggtctl.toml: [train.env] must be a table of NAME = value")
    return dict(env)
