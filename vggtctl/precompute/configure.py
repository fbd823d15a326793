"""`PrecomputeOptions` from flags, VGGTCTL_* variables and vggtctl.toml (`[precompute]` table).

Every option resolves the same way (`vggtctl.settings`): a bad value is one line naming the
setting, the value and where it came from; relative paths in a vggtctl.toml are relative to
that file. `--dry-run` and `--json` describe one invocation and stay flags only.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from vggtctl.errors import ConfigError
from vggtctl.precompute.options import CHUNK_ITEMS, PrecomputeOptions
from vggtctl.precompute.planning import recorded_max_history
from vggtctl.settings import (
    Setting,
    as_bool,
    as_int,
    as_list,
    as_path,
    as_str,
    find_config,
    pick_setting,
    resolve_data_root,
)

COMMAND = "precompute"


def gpu_count(flags: Mapping[str, Any], config: Mapping[str, Any]) -> int | None:
    """--gpus (or its setting): None, or a count of at least 1."""
    return as_int(pick_setting("gpus", flags.get("gpus"), config, COMMAND), minimum=1)


def resolve_root(argument: Path | None) -> Path:
    """ROOT, else VGGTCTL_DATA_ROOT, else `data_root` of the working folder's vggtctl.toml."""
    if argument is None and not os.environ.get("VGGTCTL_DATA_ROOT") and "data_root" not in find_config():
        raise ConfigError("no data root: pass ROOT, or set VGGTCTL_DATA_ROOT or data_root in vggtctl.toml")
    return resolve_data_root(argument)


def options_from(root: Path, flags: Mapping[str, Any], config: Mapping[str, Any]) -> PrecomputeOptions:
    """Every option of the run; `flags` holds the command line's values (None: not given)."""

    def setting(name: str, default: Any = None) -> Setting:
        return pick_setting(name, flags.get(name), config, COMMAND, default)

    def whole(name: str, default: int | None = None, minimum: int | None = None) -> int | None:
        return as_int(setting(name, default), minimum=minimum)

    def text(name: str, default: str | None = None) -> str | None:
        return as_str(setting(name, default))

    def switch(name: str) -> bool:
        return as_bool(setting(name, False))

    model = text("vggt_model")
    if not model:
        raise ConfigError("no model: pass --vggt-model (a checkpoint, a Hub id, or tiny-random)")
    annotations = setting("annotations")
    # an environment value lists files like PATH does (os.pathsep); TOML gives a list
    files = as_list(annotations, separator=os.pathsep if annotations.source.startswith("env") else None)
    data_path = setting("data_path")
    devices = setting("devices")
    device_list = as_list(devices, separator=",") if isinstance(devices.value, str) else as_list(devices)
    for name, chosen in (("device", [text("device")]), ("devices", device_list)):
        _check_devices(setting(name), [d for d in chosen if d and d.strip() and d != "auto"])
    return PrecomputeOptions(
        root=root,
        vggt_model=_model_path(setting("vggt_model"), model),
        qwen_model=_model_path(setting("qwen_model"), text("qwen_model")),
        preset=text("preset", "janusvln") or "janusvln",
        layer=whole("layer", -2) or 0,
        attention=text("attention"),
        layout=text("layout", "auto") or "auto",
        # absolute: the manifest keeps them for verify --recompute and train, run from anywhere
        annotations=[str(_absolute(as_path(annotations, name))) for name in files],
        data_path=str(_absolute(as_path(data_path))) if data_path.value not in (None, "") else None,
        # a rerun that names no history resumes with the root's (as train reads it): the default
        # 8 over a root cached with another value would re-encode every item, and make it current
        max_history=whole("max_history", recorded_max_history(root), minimum=0) or 0,
        context=text("context", "auto") or "auto",
        evict_start=whole("evict_start", minimum=0),
        evict_recent=whole("evict_recent", minimum=0),
        batch_size=whole("batch_size", minimum=1),
        workers=whole("workers", minimum=0),
        dtype=text("dtype"),
        device=text("device"),
        devices=[d.strip() for d in device_list if d.strip()] or None,
        limit=whole("limit", minimum=0),
        force=switch("force"),
        verify=switch("verify"),
        dry_run=bool(flags.get("dry_run")),
        allow_download=switch("allow_download"),
        fsync=switch("fsync"),
        compile=switch("compile"),
        chunk_items=whole("chunk_items", CHUNK_ITEMS, minimum=1) or CHUNK_ITEMS,
    )


def _model_path(setting: Setting, value: str | None) -> str | None:
    """A model that is a path (relative to its vggtctl.toml, or to the working folder) becomes
    absolute, as the manifest records it; Hub ids and tiny-random are kept as they are."""
    if value is None or os.path.isabs(value):
        return value
    candidate = as_path(setting, value)
    return str(_absolute(candidate)) if candidate is not None and candidate.exists() else value


def _check_devices(setting: Setting, names: list[str]) -> None:
    """Device names that cannot work, reported with where they came from (not as a flag)."""
    from vggtctl.distributed import usable_device

    option = f"--{setting.name}"
    for name in names:
        try:
            usable_device(name, option)
        except ConfigError as err:
            if setting.source == "flag":
                raise
            raise setting.fail(str(err).removeprefix(f"{option} {name}: ")) from None


def _absolute(path: Path | None) -> Path | None:
    return None if path is None else path.absolute()
