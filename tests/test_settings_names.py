"""vggtctl.toml keys: the list of known setting names follows the code, and a typo is named."""

from __future__ import annotations

import re
from pathlib import Path

from vggtctl import settings

PACKAGE = Path(settings.__file__).parent
# the calls through which a command reads a setting by name
LOOKUP = re.compile(
    r"\b(?:pick|pick_setting|setting|whole|text|switch|from_config|flag_or_env|catalog_pick)\(\s*\"([a-z_]+)\""
)


def _names_read_by_the_code() -> set[str]:
    found: set[str] = set()
    for path in PACKAGE.rglob("*.py"):
        found |= set(LOOKUP.findall(path.read_text()))
    return found


def test_every_setting_the_code_reads_is_known_and_every_known_one_is_read():
    read = _names_read_by_the_code()
    assert read, "the pattern found no setting lookups: it has gone stale"
    assert read - settings.KNOWN_SETTINGS == set()  # a new setting must be added to the list
    assert settings.KNOWN_SETTINGS - read == set()  # and a removed one taken off it


def test_typos_are_named_command_tables_and_train_env_are_not():
    config = {
        "__file__": "/x/vggtctl.toml",
        "max_hisotry": 3,
        "workers": 2,
        "precompute": {"layr": 2, "force": True},
        "train": {"master_port": 29600, "env": {"NCCL_DEBUG": "INFO"}},
        "status": {"processes": 2},
    }
    assert settings.unknown_keys(config) == ["max_hisotry", "[precompute] layr"]
    said: list[str] = []
    settings.warn_unknown_keys(config, said.append)
    assert said == ["warning: /x/vggtctl.toml: unknown setting(s) ignored: max_hisotry, [precompute] layr"]
    said.clear()
    settings.warn_unknown_keys({"workers": 2}, said.append)
    assert said == []


def test_a_toml_relative_path_is_shown_without_dot_dot_unless_a_symlink_decides(tmp_path, monkeypatch):
    """`data_root = "../data"` in cfg/vggtctl.toml names tmp/data, and is shown and exported so;
    through a symlinked folder `..` means the link target's parent, and the path stays as written."""
    (tmp_path / "data").mkdir()
    (tmp_path / "cfg").mkdir()
    toml = tmp_path / "cfg" / "vggtctl.toml"
    toml.write_text('data_root = "../data"\n')
    monkeypatch.chdir(tmp_path / "cfg")
    monkeypatch.delenv("VGGTCTL_DATA_ROOT", raising=False)
    assert settings.resolve_data_root(None) == tmp_path / "data"

    elsewhere = tmp_path / "deep" / "cfg"
    elsewhere.mkdir(parents=True)
    (tmp_path / "deep" / "data").mkdir()
    (tmp_path / "link").symlink_to(elsewhere)
    through_link = settings.Setting(
        "data_root", "../data", "vggtctl.toml", str(tmp_path / "link" / "vggtctl.toml")
    )
    path = settings.as_path(through_link)
    assert path is not None and ".." in path.parts  # tmp/data would be the wrong folder
    assert path.resolve() == (tmp_path / "deep" / "data").resolve()
