"""Settings resolution shared by all commands: flag, then VGGTCTL_* variable, then vggtctl.toml.

`vggtctl.toml` is looked for in the working folder, then in the data root. Its top-level keys
apply to every command; a `[<command>]` table overrides them for that command. Every value
keeps where it came from (`Setting.source`), so a bad one is reported as one line naming the
setting, the value and its source, and a relative path from a vggtctl.toml is taken relative
to that file's folder, not to wherever the command was started.
"""

from __future__ import annotations

import os
import shlex
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from vggtctl.errors import ConfigError

CONFIG_NAME = "vggtctl.toml"
ENV_PREFIX = "VGGTCTL_"
CONFIG_FILE_KEY = "__file__"  # find_config adds it: the file the values were read from


@dataclass(frozen=True)
class Setting:
    """One resolved value and where it came from ("flag", "env VGGTCTL_X", "vggtctl.toml
    [command]", "default"); `origin` is the vggtctl.toml it was read from, if any."""

    name: str
    value: Any
    source: str
    origin: str | None = None

    @property
    def where(self) -> str:
        return f"{self.source}, {self.origin}" if self.origin else self.source

    def fail(self, reason: str) -> ConfigError:
        """A one-line error naming the setting, its value and its source."""
        if self.source == "flag":
            return ConfigError(f"--{self.name.replace('_', '-')} {self.value}: {reason}")
        return ConfigError(f"{self.name} = {self.value!r} ({self.where}): {reason}")


def read_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            config = tomllib.load(fh)
    except FileNotFoundError:
        return {}
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise ConfigError(f"{path}: cannot read settings: {err}") from err
    config[CONFIG_FILE_KEY] = os.path.abspath(path)
    return config


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


# Every setting name any command reads from vggtctl.toml, and the command tables; a key outside
# them is a typo to warn about (tests/test_settings_names.py keeps the list in step with the code).
KNOWN_SETTINGS = frozenset(
    {
        # precompute
        "allow_download", "annotations", "attention", "batch_size", "chunk_items", "compile",
        "context", "data_path", "device", "devices", "dtype", "evict_recent", "evict_start",
        "force", "fsync", "gpus", "layer", "layout", "limit", "max_history", "preset",
        "qwen_model", "verify", "vggt_model", "workers",
        # status, verify, prune; every command
        "processes", "data_root",
        # train
        "cache", "cache_flag", "entry", "feature_key", "gpus_per_node", "log_dir", "master_addr",
        "master_port", "min_coverage", "node_rank", "nodes", "profile", "trainer_args",
    }
)  # fmt: skip
COMMAND_TABLES = frozenset({"precompute", "status", "verify", "prune", "train", "demo"})
TABLE_EXTRAS = {"train": frozenset({"env"})}  # [train.env]: variables for the launch


def unknown_keys(config: Mapping[str, Any]) -> list[str]:
    """Keys of a vggtctl.toml no command reads ("max_hisotry", "[precompute] layr")."""
    unknown = []
    for key, value in config.items():
        if key == CONFIG_FILE_KEY or key in KNOWN_SETTINGS:
            continue
        if key in COMMAND_TABLES and isinstance(value, dict):
            extras = TABLE_EXTRAS.get(key, frozenset())
            unknown += [f"[{key}] {k}" for k in value if k not in KNOWN_SETTINGS and k not in extras]
            continue
        unknown.append(key)
    return unknown


def warn_unknown_keys(config: Mapping[str, Any], say: Any) -> None:
    """One line for the keys of `config` that no command reads (a typo falls back silently)."""
    unknown = unknown_keys(config)
    if unknown:
        origin = config.get(CONFIG_FILE_KEY, CONFIG_NAME)
        say(f"warning: {origin}: unknown setting(s) ignored: {', '.join(unknown)}")


def env_name(name: str) -> str:
    return ENV_PREFIX + name.upper().replace("-", "_")


def pick_setting(
    name: str,
    flag_value: Any,
    config: Mapping[str, Any],
    command: str | None = None,
    default: Any = None,
    *,
    environ: Mapping[str, str] | None = None,
) -> Setting:
    """flag > VGGTCTL_<NAME> > [command] table > top-level key > default, with the source."""
    environ = os.environ if environ is None else environ
    if flag_value is not None:
        return Setting(name, flag_value, "flag")
    variable = env_name(name)
    if environ.get(variable) not in (None, ""):
        return Setting(name, environ[variable], f"env {variable}")
    key = name.lower().replace("-", "_")
    origin = config.get(CONFIG_FILE_KEY)
    table = config.get(command) if command else None
    if isinstance(table, dict) and key in table:
        return Setting(name, table[key], f"{CONFIG_NAME} [{command}]", origin)
    if key in config and key != CONFIG_FILE_KEY:
        return Setting(name, config[key], CONFIG_NAME, origin)
    return Setting(name, default, "default")


# --------------------------------------------------------------------------- converters


def as_int(setting: Setting, minimum: int | None = None, maximum: int | None = None) -> int | None:
    """A whole number (TOML integer or its text); true/false and 1.7 are refused, not rounded."""
    value = setting.value
    if value is None:
        return None
    if isinstance(value, (bool, float)):
        raise setting.fail("not a whole number")
    if not isinstance(value, int):
        try:
            value = int(str(value).strip())
        except ValueError:
            raise setting.fail("not a whole number") from None
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        bounds = f"at least {minimum}" if maximum is None else f"in {minimum}..{maximum}"
        raise setting.fail(f"must be {bounds}")
    return value


def as_float(setting: Setting, minimum: float, maximum: float) -> float:
    if isinstance(setting.value, bool):
        raise setting.fail("not a number")
    try:
        value = float(setting.value)
    except (TypeError, ValueError):
        raise setting.fail("not a number") from None
    if not minimum <= value <= maximum:
        raise setting.fail(f"must be in {minimum}..{maximum}")
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
    raise setting.fail("not true/false")


def as_str(setting: Setting) -> str | None:
    """Text (a TOML string, or a flag/env value); a list or number in a text setting is refused."""
    if setting.value is None:
        return None
    if not isinstance(setting.value, str):
        raise setting.fail("not text")
    return setting.value


def as_list(setting: Setting, separator: str | None = None) -> list[str]:
    """A TOML list of strings, or one string: split at `separator`, else like a shell would."""
    value = setting.value
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        if not all(isinstance(v, str) for v in value):
            raise setting.fail("not a list of text")
        return list(value)
    if not isinstance(value, str):
        raise setting.fail("not text or a list of text")
    if separator is not None:
        return [part for part in value.split(separator) if part.strip()]
    try:
        return shlex.split(value)
    except ValueError as err:  # an unbalanced quote
        raise setting.fail(f"cannot split it like a shell line ({str(err).lower()})") from None


def as_path(setting: Setting, text: str | None = None) -> Path | None:
    """The setting (or one `text` of it) as a path; relative to its vggtctl.toml's folder when
    it came from one, else to the working folder."""
    text = as_str(setting) if text is None else text
    if text is None:
        return None
    path = Path(text).expanduser()
    if setting.origin and not path.is_absolute():
        path = _tidy(Path(setting.origin).parent / path)
    return path


def _tidy(path: Path) -> Path:
    """`path` without `..` steps where that names the same file (it is shown and exported:
    `/srv/cfg/../data` reads oddly); kept as it is where a symlink makes `..` mean elsewhere."""
    tidy = Path(os.path.normpath(path))
    try:
        return tidy if tidy == path or os.path.samefile(tidy, path) else path
    except OSError:  # not there (yet): the caller says so, naming the path as written
        return path


def resolve_data_root(argument: str | os.PathLike[str] | None) -> Path:
    """ROOT from the argument, else VGGTCTL_DATA_ROOT, else vggtctl.toml `data_root`, else cwd."""
    setting = pick_setting("data_root", None if argument is None else str(argument), find_config())
    root = as_path(setting) or Path.cwd()
    if not root.is_dir():
        if setting.source == "flag":
            raise ConfigError(f"{root}: data root is not a folder")
        raise setting.fail("not a folder")
    return root
