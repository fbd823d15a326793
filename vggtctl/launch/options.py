"""`train`'s settings: `vggtctl.settings` resolution with the `[train]` table of vggtctl.toml.

Every setting keeps its source, so `train` can print an "effective settings" table and say why
a value is what it is; the converters (shared with every command) give one-line errors.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from vggtctl.settings import Setting, as_bool, as_float, as_int, as_list, env_name, pick_setting

COMMAND = "train"

__all__ = ["COMMAND", "Setting", "as_bool", "as_float", "as_int", "as_list", "env_name", "pick"]


def pick(
    name: str,
    flag_value: Any,
    config: Mapping[str, Any],
    default: Any = None,
    *,
    environ: Mapping[str, str] | None = None,
) -> Setting:
    """flag > VGGTCTL_<NAME> > [train] table > top-level key > default."""
    return pick_setting(name, flag_value, config, COMMAND, default, environ=environ)
