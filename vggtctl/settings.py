"""Settings resolution shared by all commands: flag, then VGGTCTL_* variable, then vggtctl.toml.

`vggtctl.toml` is looked for in the working folder, then in the data root. Its top-level keys
apply to every command; a `[<command>]` table overrides them for that command.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from vggtctl.errors import ConfigError

CONFIG_NAME = "vggtctl.toml"
ENV_PREFIX = "VGGTCTL_"


def read_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        return {}
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise ConfigError(f"{path}: cannot read settings: {err}") from err


def find_config(
    data_root: str | os.PathLike[str] | None = None, explicit: str | None = None
) -> dict[str, Any]:
    """The first vggtctl.toml found (explicit path, working folder, data root), or {}."""
    if explicit:
        if not os.path.isfile(explicit):
            raise ConfigError(f"{explicit}: config file not found")
        return read_config(explicit)
    candidates = [Path.cwd() / CONFIG_NAME]
    if data_root is not None:
        candidates.append(Path(data_root) / CONFIG_NAME)
    for candidate in candidates:
        if candidate.is_file():
            return read_config(candidate)
    return {}


def pick(
    name: str,
    flag_value: Any,
    config: dict[str, Any],
    command: str | None = None,
    default: Any = None,
) -> Any:
    """Resolve one setting: flag > VGGTCTL_<NAME> > [command] table > top-level key > default.

    Environment values arrive as strings; the caller converts them.
    """
    if flag_value is not None:
        return flag_value
    env = os.environ.get(ENV_PREFIX + name.upper().replace("-", "_"))
    if env not in (None, ""):
        return env
    key = name.lower().replace("-", "_")
    if command and isinstance(config.get(command), dict) and key in config[command]:
        return config[command][key]
    if key in config:
        return config[key]
    return default


def resolve_data_root(argument: str | os.PathLike[str] | None) -> Path:
    """ROOT from the argument, else VGGTCTL_DATA_ROOT, else vggtctl.toml `data_root`, else cwd."""
    if argument is not None:
        root = Path(argument)
    elif os.environ.get("VGGTCTL_DATA_ROOT"):
        root = Path(os.environ["VGGTCTL_DATA_ROOT"])
    else:
        configured = find_config().get("data_root")
        root = Path(configured) if configured else Path.cwd()
    if not root.is_dir():
        raise ConfigError(f"{root}: data root is not a folder")
    return root
