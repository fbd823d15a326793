"""The cache side of a launch: which feature key the trainer asks for, and how much of the
training set the cache covers for it.

The key comes from `--feature-key` / VGGTCTL_FEATURE_KEY (JSON, a JSON file, or a sidecar whose
header holds it) or else from the data root's manifest (the key `precompute` last wrote).
The catalog, data and manifest modules are imported lazily: a dry run without a cache needs none.
"""

from __future__ import annotations

import json
import os
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vggtctl import sidecar
from vggtctl.errors import ConfigError
from vggtctl.keys import FeatureKey
from vggtctl.launch.options import Setting, pick


def parse_feature_key(text: str) -> FeatureKey:
    """JSON text, a JSON file, or a sidecar path -> FeatureKey; ConfigError naming the input."""
    stripped = text.strip()
    if stripped.startswith("{"):
        return _key_from_document(_json(stripped, "--feature-key"), "--feature-key")
    if not os.path.isfile(stripped):
        raise ConfigError(f"{stripped}: feature key file not found (give JSON, a .json file or a sidecar)")
    if sidecar.is_sidecar_name(os.path.basename(stripped)):
        try:
            header = sidecar.read_header(stripped)
        except Exception as err:
            raise ConfigError(f"{stripped}: cannot read the sidecar header: {err}") from err
        if header.version == 0:
            raise ConfigError(f"{stripped}: legacy sidecar without provenance holds no feature key")
        return _key_from_document(header.meta, stripped)
    try:
        with open(stripped, encoding="utf-8") as fh:
            document = _json(fh.read(), stripped)
    except OSError as err:
        raise ConfigError(f"{stripped}: cannot read: {err}") from err
    return _key_from_document(document, stripped)


def _json(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as err:
        raise ConfigError(f"{where}: not valid JSON: {err}") from None


def _key_from_document(document: Any, where: str) -> FeatureKey:
    if isinstance(document, dict):
        for nested in ("feature_key", "current_key"):
            if isinstance(document.get(nested), dict):
                document = document[nested]
                break
    try:
        return FeatureKey.from_meta(document)
    except (KeyError, TypeError) as err:
        raise ConfigError(f"{where}: not a feature key (missing {err})") from None


@dataclass(frozen=True)
class ManifestInfo:
    """What the data root's manifest says: the current key and the settings precompute used."""

    key: FeatureKey | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    note: str = ""


def last_run_failed(data_root: Path) -> int | None:
    """Items the root's latest precompute run failed (bad images: a rerun fails them again), as
    `vggtctl status` reads it; None when the manifest records no such count."""
    from vggtctl import manifest

    return manifest.load(data_root).last_run_failed


def read_manifest(data_root: Path | None) -> ManifestInfo:
    if data_root is None:
        return ManifestInfo(note="no data root")
    if not data_root.is_dir():
        return ManifestInfo(note=f"{data_root} is not a folder")
    try:
        from vggtctl import manifest
    except ImportError:  # pragma: no cover - part of the package
        return ManifestInfo(note="manifest support missing")
    loaded = manifest.load(data_root)
    settings = loaded.last_run_settings() or {}
    note = loaded.problem or ("" if loaded.current_key else "the manifest names no current key")
    return ManifestInfo(loaded.current_key, dict(settings), note)


def resolve_feature_key(
    flag: str | None,
    info: ManifestInfo,
    data_root: Path | None,
    config: Mapping[str, Any],
    environ: Mapping[str, str] | None = None,
) -> tuple[FeatureKey | None, Setting]:
    """(key, where it came from); key None with the reason as the setting's value."""
    chosen = pick("feature_key", flag, config, environ=environ)
    if chosen.value not in (None, ""):
        try:
            key = parse_feature_key(str(chosen.value))
        except ConfigError as err:
            if chosen.source == "flag":
                raise
            raise ConfigError(f"{err} ({chosen.where})") from None
        return key, Setting("feature_key", "given", chosen.source)
    if info.key is None:
        return None, Setting("feature_key", f"none: {info.note or 'no manifest key'}", "-")
    return info.key, Setting("feature_key", "current key", f"manifest of {data_root}")


def describe_key(key: FeatureKey) -> str:
    """One line a person can compare with a precompute run."""
    ctx = key.context.kind
    if key.context.evict_start is not None or key.context.evict_recent is not None:
        ctx += f" (evict {key.context.evict_start}/{key.context.evict_recent})"
    return (
        f"{key.model.name} [{key.model.fingerprint[:12]}] layer {key.model.layer}, "
        f"{key.model.attention}, {key.model.dtype}; preset {key.preset}; context {ctx}"
    )


@dataclass(frozen=True)
class CatalogSpec:
    """How to list the training Items: the same options `precompute` was given."""

    root: Path
    layout: str = "auto"
    annotations: tuple[str, ...] = ()
    max_history: int | None = None
    data_path: str | None = None

    def load(self, key: FeatureKey | None) -> Any:
        from vggtctl.catalog import load_catalog

        kwargs: dict[str, Any] = {"annotations": tuple(self.annotations), "data_path": self.data_path}
        if self.max_history is not None:
            kwargs["max_history"] = self.max_history
        if key is not None:
            kwargs["context"] = key.context.kind
        return load_catalog(self.root, self.layout, **kwargs)

    def cli_args(self) -> list[str]:
        args: list[str] = []
        if self.layout != "auto":
            args += ["--layout", self.layout]
        for annotation in self.annotations:
            args += ["--annotations", annotation]
        if self.data_path is not None:
            args += ["--data-path", self.data_path]
        if self.max_history is not None:
            args += ["--max-history", str(self.max_history)]
        return args


@dataclass(frozen=True)
class Coverage:
    total: int
    valid: int
    by_verdict: dict[str, int] = field(default_factory=dict)
    catalog_problems: int = 0
    layout: str = ""

    @property
    def fraction(self) -> float:
        return self.valid / self.total if self.total else 0.0


def measure_coverage(spec: CatalogSpec, key: FeatureKey, *, workers: int = 8) -> Coverage:
    """Header-only check of every training Item's sidecar against `key`."""
    from vggtctl.data import coverage

    catalog = spec.load(key)
    report = coverage(catalog.items, key, workers=workers)
    return Coverage(
        total=int(report.total),
        valid=int(report.valid),
        by_verdict={str(k): int(v) for k, v in dict(report.by_verdict).items()},
        catalog_problems=len(getattr(catalog, "problems", []) or []),
        layout=str(getattr(catalog, "layout", spec.layout)),
    )


def precompute_command(spec: CatalogSpec, key: FeatureKey, settings: Mapping[str, Any] | None = None) -> str:
    """The `vggtctl precompute` command that writes sidecars for exactly this key.

    `settings`: the manifest's record of the run that produced the key, for what the key
    itself does not hold (the model as it was named, the Qwen model that sized the grid).
    """
    settings = settings or {}
    args = [
        "vggtctl",
        "precompute",
        str(spec.root),
        "--vggt-model",
        str(settings.get("vggt_model") or key.model.name),
    ]
    if settings.get("qwen_model"):
        args += ["--qwen-model", str(settings["qwen_model"])]
    args += [
        "--preset",
        key.preset,
        "--layer",
        str(key.model.layer),
        "--attention",
        key.model.attention,
        "--context",
        key.context.kind,
        "--dtype",
        key.model.dtype,
    ]
    if key.context.evict_start is not None:
        args += ["--evict-start", str(key.context.evict_start)]
    if key.context.evict_recent is not None:
        args += ["--evict-recent", str(key.context.evict_recent)]
    args += spec.cli_args()
    return " ".join(shlex.quote(a) for a in args)
