"""Launch profiles: the environment a kind of cluster needs, kept as TOML data files.

A profile ships in the package (`vggtctl/launch/profiles/<name>.toml`) or is a path to a
TOML file of the same shape. Values may hold placeholders (`{iface}`, `{omp_threads}`) that
are filled per node. Precedence when merging: profile < `[train.env]` of vggtctl.toml < the
user's environment, so a variable someone exported on purpose is never overridden.
"""

from __future__ import annotations

import importlib.resources
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from vggtctl.errors import ConfigError

PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")

# Variables from the user's environment worth showing and checking even when no profile sets them.
RELEVANT_PREFIXES = ("NCCL_", "GLOO_", "TORCH_NCCL_", "TORCH_DISTRIBUTED_")
RELEVANT_NAMES = (
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "PYTHONUNBUFFERED",
    "CUDA_VISIBLE_DEVICES",
    "CUDA_LAUNCH_BLOCKING",
)


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    gpus_per_node: int
    env: dict[str, str]
    origin: str  # "package" or the file it came from


@dataclass(frozen=True)
class EnvVar:
    """One variable of the launch environment and the layer that decided its value."""

    name: str
    value: str
    source: str  # "profile h800", "vggtctl.toml", "environment", "vggtctl"


def available_profiles() -> list[str]:
    folder = importlib.resources.files("vggtctl.launch") / "profiles"
    return sorted(entry.name[: -len(".toml")] for entry in folder.iterdir() if entry.name.endswith(".toml"))


def load_profile(name: str) -> Profile:
    """A packaged profile by name, or a profile file by path."""
    if name.endswith(".toml") or os.sep in name:
        try:
            with open(name, "rb") as fh:
                data = tomllib.load(fh)
        except FileNotFoundError:
            raise ConfigError(f"{name}: profile file not found") from None
        except (OSError, tomllib.TOMLDecodeError) as err:
            raise ConfigError(f"{name}: cannot read profile: {err}") from err
        return _parse(data, name, origin=name)
    resource = importlib.resources.files("vggtctl.launch") / "profiles" / f"{name}.toml"
    if not resource.is_file():
        known = ", ".join(available_profiles())
        raise ConfigError(f"profile {name!r} not found (packaged profiles: {known}; or pass a .toml path)")
    return _parse(tomllib.loads(resource.read_text(encoding="utf-8")), name, origin="package")


def _parse(data: dict[str, Any], name: str, origin: str) -> Profile:
    where = origin if origin != "package" else f"profile {name}"
    env = data.get("env", {})
    if not isinstance(env, dict):
        raise ConfigError(f"{where}: [env] must be a table of NAME = value")
    gpus = data.get("gpus_per_node", 8)
    if not isinstance(gpus, int) or gpus < 1:
        raise ConfigError(f"{where}: gpus_per_node must be a positive integer, not {gpus!r}")
    return Profile(
        name=str(data.get("name", name)),
        description=str(data.get("description", "")),
        gpus_per_node=gpus,
        env={str(k): env_text(v, where, str(k)) for k, v in env.items()},
        origin=origin,
    )


def env_text(value: Any, where: str, name: str) -> str:
    """TOML scalar -> environment string (true -> "1"); tables and lists are errors."""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, (str, int, float)):
        return str(value)
    raise ConfigError(f"{where}: {name} must be a string or number, not {type(value).__name__}")


def fill(template: str, values: Mapping[str, str | None]) -> str | None:
    """Replace `{name}` placeholders; None when one of them has no value here."""
    missing = False

    def swap(match: re.Match[str]) -> str:
        nonlocal missing
        key = match.group(1)
        if key not in values:
            raise ConfigError(f"unknown placeholder {{{key}}} in {template!r} (known: {', '.join(values)})")
        value = values[key]
        if value is None:
            missing = True
            return ""
        return value

    text = PLACEHOLDER.sub(swap, template)
    return None if missing else text


def merge_env(
    profile: Profile,
    config_env: Mapping[str, Any],
    values: Mapping[str, str | None],
    environ: Mapping[str, str],
) -> tuple[dict[str, EnvVar], list[str]]:
    """Merged launch variables and the names left unset because a placeholder had no value."""
    merged: dict[str, EnvVar] = {}
    unset: list[str] = []
    layers = [
        (profile.env, f"profile {profile.name}"),
        ({k: env_text(v, "vggtctl.toml [train.env]", k) for k, v in config_env.items()}, "vggtctl.toml"),
    ]
    for layer, source in layers:
        for name, template in layer.items():
            value = fill(template, values)
            if value is None:
                merged.pop(name, None)
                unset.append(name)
                continue
            if name in unset:
                unset.remove(name)
            merged[name] = EnvVar(name, value, source)
    for name, value in environ.items():
        if value == "":  # an empty variable counts as unset, as in the scripts' ${VAR:-default}
            continue
        if name in merged or name.startswith(RELEVANT_PREFIXES) or name in RELEVANT_NAMES:
            merged[name] = EnvVar(name, value, "environment")
            if name in unset:
                unset.remove(name)
    return merged, unset
