"""Fingerprints that decide whether a cached feature equals what the trainer would compute.

Four keys: the image (size, mtime_ns, optional content hash), the model (checkpoint bytes +
layer, attention, dtype), the preprocessing preset (canonical JSON) and the context (ordered
frames + streaming settings). `FeatureKey` bundles the settings a trainer asks for; the
per-item context signature is computed from it and the item's frames.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

_HASH_CHUNK = 8 * 1024 * 1024


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace: the byte form every fingerprint hashes."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def fingerprint_json(obj: Any) -> str:
    """sha256 of the canonical JSON of `obj` (preset fingerprints, context signatures)."""
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Streamed sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


# --------------------------------------------------------------------------- image


@dataclass(frozen=True)
class ImageKey:
    """What identifies an image's content cheaply: size and mtime, plus an optional hash."""

    size: int
    mtime_ns: int
    hash: str | None = None

    @classmethod
    def from_stat(cls, st: os.stat_result, content_hash: str | None = None) -> ImageKey:
        return cls(size=st.st_size, mtime_ns=st.st_mtime_ns, hash=content_hash)

    @classmethod
    def of(cls, path: str | os.PathLike[str], with_hash: bool = False) -> ImageKey:
        st = os.stat(path)
        return cls.from_stat(st, f"sha256:{file_sha256(path)}" if with_hash else None)

    def to_meta(self, name: str) -> dict[str, Any]:
        meta: dict[str, Any] = {"name": name, "size": self.size, "mtime_ns": self.mtime_ns}
        if self.hash is not None:
            meta["hash"] = self.hash
        return meta


def image_change(recorded: dict[str, Any], st: os.stat_result, path: str | None = None) -> str | None:
    """Why the image no longer matches what a sidecar recorded, or None when it still does.

    With a recorded content hash, the hash decides (a touched but unchanged file stays valid);
    without one, size and mtime_ns decide.
    """
    recorded_hash = recorded.get("hash")
    if recorded_hash and path is not None:
        if st.st_size != recorded.get("size"):
            return f"image size changed ({recorded.get('size')} -> {st.st_size} bytes)"
        if st.st_mtime_ns == recorded.get("mtime_ns"):
            return None
        actual = f"sha256:{file_sha256(path)}"
        return None if actual == recorded_hash else "image content changed (hash differs)"
    if st.st_size != recorded.get("size"):
        return f"image size changed ({recorded.get('size')} -> {st.st_size} bytes)"
    if st.st_mtime_ns != recorded.get("mtime_ns"):
        return "image modified since the sidecar was written (mtime differs)"
    return None


# --------------------------------------------------------------------------- model

_memo_lock = threading.Lock()


def _fingerprint_cache_file() -> Path:
    base = os.environ.get("VGGTCTL_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "vggtctl"
    )
    return Path(base) / "fingerprints.json"


def checkpoint_fingerprint(path: str | os.PathLike[str]) -> str:
    """sha256 of a checkpoint file, memoized in the user cache by its real path and stat.

    A 5 GB checkpoint is hashed once per change, not once per command. Size and mtime alone do
    not tell a change: two checkpoints of one architecture have the same size, and `cp -p`,
    `rsync -a`, `tar x` or a reproducible image build carry the old mtime over, so new weights
    would keep the old fingerprint and the old cache would pass as valid. The key also holds the
    inode, the device and the ctime, which no copy can set: any rewrite changes one of them.
    """
    real = os.path.realpath(path)
    st = os.stat(real)
    memo_key = f"{real}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}|{st.st_dev}|{st.st_ctime_ns}"
    memo_file = _fingerprint_cache_file()
    with _memo_lock:
        memo = _read_memo(memo_file)
        if memo_key in memo:
            return memo[memo_key]
    digest = file_sha256(real)
    with _memo_lock:
        memo = _read_memo(memo_file)
        memo[memo_key] = digest
        _write_memo(memo_file, memo)
    return digest


def _read_memo(memo_file: Path) -> dict[str, str]:
    try:
        data = json.loads(memo_file.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_memo(memo_file: Path, memo: dict[str, str]) -> None:
    """Best effort: an unwritable cache dir only costs a re-hash next time."""
    try:
        memo_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo_file.with_name(f"{memo_file.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(memo, indent=0, sort_keys=True))
        os.replace(tmp, memo_file)
    except OSError:
        pass


def is_random_model_name(name: str) -> bool:
    return name == "tiny-random" or name.startswith("random:")


@dataclass(frozen=True)
class ModelKey:
    """The model half of a feature key; `meta["model"]` of a sidecar holds exactly these fields."""

    fingerprint: str
    name: str
    layer: int
    attention: str  # "full" | "causal"
    dtype: str  # torch dtype name without the "torch." prefix, e.g. "bfloat16"

    def to_meta(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def is_random(self) -> bool:
        """Seeded random weights (`tiny-random`, `random:<preset>`): for demos, tests, benchmarks."""
        return is_random_model_name(self.name)

    @property
    def label(self) -> str:
        """The model's name, marked when its features are meaningless."""
        return f"{self.name} (random weights: features are meaningless)" if self.is_random else self.name

    def mismatch(self, recorded: dict[str, Any]) -> str | None:
        """Why a recorded `meta["model"]` differs from this key, or None when it matches."""
        for name in ("fingerprint", "layer", "attention", "dtype"):
            if recorded.get(name) != getattr(self, name):
                shown = _short(recorded.get(name)), _short(getattr(self, name))
                return f"model {name} differs (cached {shown[0]}, wanted {shown[1]})"
        return None


# --------------------------------------------------------------------------- context


@dataclass(frozen=True)
class ContextSettings:
    """How an item's context is turned into features; part of every context signature."""

    kind: str = "none"  # "none" | "sequence"
    evict_start: int | None = None
    evict_recent: int | None = None

    def to_meta(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        """The kind, and for a streamed sequence with eviction, the frames its K/V cache keeps."""
        if self.kind != "sequence" or (self.evict_start is None and self.evict_recent is None):
            return self.kind
        kept = f"first {self.evict_start or 0} and last {self.evict_recent or 0}"
        return f"{self.kind} (K/V cache keeps the {kept} frames)"


def context_signature(
    frames: Sequence[tuple[str, ImageKey]], settings: ContextSettings, attention: str
) -> str | None:
    """sha256 over the ordered (relative name, image key) of the frames plus the settings.

    `frames` includes the current image as its last element. Context `none` has no signature.
    """
    if settings.kind == "none":
        return None
    payload = {
        "frames": [[name, key.size, key.mtime_ns] for name, key in frames],
        "attention": attention,
        "evict_start": settings.evict_start,
        "evict_recent": settings.evict_recent,
    }
    return fingerprint_json(payload)


# --------------------------------------------------------------------------- feature key


@dataclass(frozen=True)
class FeatureKey:
    """Everything a trainer asks for, except the per-item frames.

    `precompute` writes sidecars under one FeatureKey; `FeatureStore` and `verify` check
    sidecars against one. Exported to trainers as VGGTCTL_* variables (`to_env`).
    """

    model: ModelKey
    preprocess_fingerprint: str
    preset: str
    context: ContextSettings = field(default_factory=ContextSettings)

    def to_meta(self) -> dict[str, Any]:
        return {
            "model": self.model.to_meta(),
            "preprocess": {"fingerprint": self.preprocess_fingerprint, "preset": self.preset},
            "context": self.context.to_meta(),
        }

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> FeatureKey:
        model = ModelKey(
            **{k: meta["model"][k] for k in ("fingerprint", "name", "layer", "attention", "dtype")}
        )
        ctx = meta.get("context") or {}
        return cls(
            model=model,
            preprocess_fingerprint=meta["preprocess"]["fingerprint"],
            preset=meta["preprocess"]["preset"],
            context=ContextSettings(
                kind=ctx.get("kind", "none"),
                evict_start=ctx.get("evict_start"),
                evict_recent=ctx.get("evict_recent"),
            ),
        )

    def to_env(self) -> dict[str, str]:
        """The feature key as VGGTCTL_FEATURE_KEY (JSON), for a trainer's FeatureStore."""
        return {"VGGTCTL_FEATURE_KEY": canonical_json(self.to_meta())}

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> FeatureKey | None:
        raw = (environ if environ is not None else os.environ).get("VGGTCTL_FEATURE_KEY")
        return cls.from_meta(json.loads(raw)) if raw else None

    def signature_for(self, frames: Sequence[tuple[str, ImageKey]]) -> str | None:
        return context_signature(frames, self.context, self.model.attention)


def relative_names(paths: Iterable[str | os.PathLike[str]], base: str | os.PathLike[str]) -> list[str]:
    """Frame names as stored in a sidecar: relative to `base` (the image's folder or data root)."""
    return [os.path.relpath(p, base) for p in paths]


def _short(value: Any) -> str:
    text = str(value)
    return text[:12] if len(text) == 64 else text
