"""One setting, with where its value came from: flag > VGGTCTL_* > vggtctl.toml > default.

Same order as `vggtctl.settings.pick`, plus the source, so `train` can print an "effective
settings" table and say why a value is what it is. Environment values arrive as text; the
converters here turn them into the types a setting needs, with one-line errors.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from vggtctl.errors import ConfigError
from vggtctl.settings import ENV_PREFIX

COMMAND = "train"


@dataclass(frozen=True)
class Setting:
    name: str
    value: Any
    source: str


def env_name(name: str) -> str:
    return ENV_PREFIX + name.upper().replace("-", "_")


def pick(
    name: str,
    flag_value: Any,
    config: Mapping[str, Any],
    default: Any = None,
    *,
    environ: Mapping[str, str] | None = None,
) -> Setting:
    """flag > VGGTCTL_<NAME> > [train] table > top-level key > default."""
    environ = os.environ if environ is None else environ
    if flag_value is not None:
        return Setting(name, flag_value, "flag")
    variable = env_name(name)
    if environ.get(variable) not in (None, ""):
        return Setting(name, environ[variable], f"env {variable}")
    key = name.lower().replace("-", "_")
    table = config.get(COMMAND)
    if isinstance(table, dict) and key in table:
        return Setting(name, table[key], f"vggtctl.toml [{COMMAND}]")
    if key in config:
        return Setting(name, config[key], "vggtctl.toml")
    return Setting(name, default, "default")


def as_int(setting: Setting, minimum: int | None = None, maximum: int | None = None) -> int | None:
    if setting.value is None:
        return None
    try:
        value = int(str(setting.value).strip()) if not isinstance(setting.value, int) else setting.value
    except ValueError:
        raise ConfigError(f"{setting.name}: {setting.value!r} is not an integer ({setting.source})") from None
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        bounds = f">= {minimum}" if maximum is None else f"in {minimum}..{maximum}"
        raise ConfigError(f"{setting.name}: {value} must be {bounds} ({setting.source})")
    return value


def as_float(setting: Setting, minimum: float, maximum: float) -> float:
    try:
        value = float(setting.value)
    except (TypeError, ValueError):
        raise ConfigError(f"{setting.name}: {setting.value!r} is not a number ({setting.source})") from None
    if not minimum <= value <= maximum:
        raise ConfigError(f"{setting.name}: {value} must be in {minimum}..{maximum} ({setting.source})")
    return value


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def as_bool(setting: Setting) -> bool:
    if isinstance(setting.value, bool):
        return setting.value
    text = str(setting.value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ConfigError(f"{setting.name}: {setting.value!r} is not true/false ({setting.source})")


def as_list(setting: Setting) -> list[str]:
    """A TOML list, or text split like a shell would (env values, one string in TOML)."""
    value = setting.value
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    return shlex.split(str(value))
