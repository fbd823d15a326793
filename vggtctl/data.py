"""Training side of the cache: look features up, refuse the ones that do not match, count misses.

A trainer builds one `FeatureStore` from the feature key `vggtctl train` exports
(`FeatureStore.from_env()`), asks it for each item's features, and computes a miss online with
`OnlineFeatures` — the same encoder call `precompute` makes, so a hit and a miss give the same
tensor. A sidecar is served only when its model, preprocessing and context (the exact history
frames, for streaming VGGT) match the key; everything else is a counted miss, never wrong data.

Importable inside DataLoader workers: no CLI code, no GPU, and the store pickles.
"""

from __future__ import annotations

import contextlib
import enum
import os
import threading
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import Dataset

from vggtctl import sidecar
from vggtctl.catalog import Catalog, Item, frame_names, item_frames_for_key
from vggtctl.errors import ConfigError
from vggtctl.keys import FeatureKey
from vggtctl.scan import DirListing, list_dir
from vggtctl.sidecar import Classification, Expectation, Verdict

HIT = "hit"
LEGACY_HIT = "legacy-hit"
LOAD_IMAGES = ("miss", "always", "never")
_EXAMPLES = 3


class Missing(str, enum.Enum):
    """The verdict of an item that has no sidecar at all (not a file verdict, so not in Verdict)."""

    MISSING = "missing"

    def __str__(self) -> str:
        return self.value


MISSING = Missing.MISSING


def use_vggt_cache(environ: Mapping[str, str] | None = None) -> bool:
    """The trainer switch `vggtctl train` sets: USE_VGGT_CACHE=true (also 1/yes/on)."""
    value = (environ if environ is not None else os.environ).get("USE_VGGT_CACHE", "")
    return value.strip().lower() in ("1", "true", "yes", "on")


# --------------------------------------------------------------------------- stats


@dataclass
class FeatureStats:
    """Hits and misses (by verdict) of one process; merge workers' stats with `add`/`update`."""

    hits: int = 0
    legacy_hits: int = 0
    misses: Counter[str] = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    @property
    def lookups(self) -> int:
        return self.hits + sum(self.misses.values())

    @property
    def hit_rate(self) -> float:
        return self.hits / self.lookups if self.lookups else 0.0

    def record(self, status: str, detail: str | None = None) -> None:
        """Count one lookup: `hit`, `legacy-hit`, or the verdict of a miss."""
        if status in (HIT, LEGACY_HIT):
            self.hits += 1
            self.legacy_hits += status == LEGACY_HIT
            return
        self.misses[status] += 1
        shown = self.examples.setdefault(status, [])
        if detail and len(shown) < _EXAMPLES:
            shown.append(detail)

    def update(self, statuses: Iterable[str]) -> None:
        """Count statuses collected elsewhere, e.g. a batch's `cache_status` list."""
        for status in statuses:
            self.record(status)

    def add(self, other: FeatureStats) -> None:
        self.hits += other.hits
        self.legacy_hits += other.legacy_hits
        self.misses.update(other.misses)
        for status, shown in other.examples.items():
            mine = self.examples.setdefault(status, [])
            mine.extend(shown[: max(0, _EXAMPLES - len(mine))])

    def summary(self) -> str:
        """One line: 'vggt cache: 980/1000 hits (98.0%); misses: context-mismatch 12, missing 8'."""
        if not self.lookups:
            return "vggt cache: no lookups yet"
        legacy = f", {self.legacy_hits} legacy" if self.legacy_hits else ""
        misses = ", ".join(f"{status} {count}" for status, count in self.misses.most_common()) or "none"
        return (
            f"vggt cache: {self.hits}/{self.lookups} hits ({100 * self.hit_rate:.1f}%{legacy}); "
            f"misses: {misses}"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "hits": self.hits,
            "legacy_hits": self.legacy_hits,
            "lookups": self.lookups,
            "misses": dict(self.misses),
        }


# --------------------------------------------------------------------------- store


@dataclass(frozen=True)
class FeatureLookup:
    """One lookup's outcome: the features (None on a miss), the status and why."""

    features: torch.Tensor | None
    status: str  # "hit", "legacy-hit", or a miss verdict ("missing", "context-mismatch", ...)
    reason: str = ""


class FeatureStore:
    """Serves a sidecar's features only when they equal what `key` would compute for the item.

    `stats` count this process's lookups (each DataLoader worker has its own copy; they start
    at zero after unpickling). Legacy files carry no provenance and are refused unless
    `accept_legacy`. `check_finite` re-checks served tensors for NaN/Inf (a `corrupt` miss).
    """

    def __init__(self, key: FeatureKey, *, accept_legacy: bool = False, check_finite: bool = True) -> None:
        if not isinstance(key, FeatureKey):
            raise TypeError(f"FeatureStore needs a FeatureKey, not {type(key).__name__}")
        self.key = key
        self.accept_legacy = accept_legacy
        self.check_finite = check_finite
        self.stats = FeatureStats()
        self._lock = threading.Lock()

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, *, accept_legacy: bool = False
    ) -> FeatureStore:
        """The store for the key `vggtctl train` exported as VGGTCTL_FEATURE_KEY."""
        env = dict(environ if environ is not None else os.environ)
        try:
            key = FeatureKey.from_env(env)
        except (ValueError, KeyError, TypeError) as err:
            raise ConfigError(f"VGGTCTL_FEATURE_KEY is not a valid feature key: {err}") from err
        if key is None:
            raise ConfigError(
                "VGGTCTL_FEATURE_KEY is not set: launch training with `vggtctl train`, which exports "
                "the key the cache was built with"
            )
        return cls(key, accept_legacy=accept_legacy)

    # pickling: DataLoader workers under spawn get a fresh lock and their own zeroed stats
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        del state["_lock"]
        state["stats"] = FeatureStats()
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def expectation_for(self, item: Item, stat_lookup: sidecar.StatLookup | None = None) -> Expectation:
        """What the item's sidecar must match. Raises FileNotFoundError when a frame is gone."""
        sequence = self.key.context.kind == "sequence"
        signature = self.key.signature_for(item_frames_for_key(item, stat_lookup)) if sequence else None
        return Expectation(
            model=self.key.model,
            preprocess_fingerprint=self.key.preprocess_fingerprint,
            preset=self.key.preset,
            context_kind=self.key.context.kind,
            context_signature=signature,
            check_context_frames=False,
        )

    def check(self, item: Item) -> Classification:
        """Header-only verdict for the item's sidecar; `verdict` is `MISSING` when there is none."""
        lookup = _caching_lookup()
        path = sidecar.sidecar_path(item.image)
        try:
            os.stat(path)
        except FileNotFoundError:
            return Classification(path, MISSING, "no sidecar")  # type: ignore[arg-type]
        except OSError as err:
            return Classification(path, Verdict.CORRUPT, f"cannot stat: {err.strerror or err}")
        return self._classify(item, path, lookup)

    def _classify(self, item: Item, path: str, lookup: sidecar.StatLookup) -> Classification:
        gone: str | None = None
        try:
            expect = self.expectation_for(item, lookup)
        except FileNotFoundError as err:
            if err.filename == item.image:
                expect = self._expectation_without_context()
            else:
                gone = os.path.relpath(str(err.filename), os.path.dirname(item.image))
                expect = self._expectation_without_context(impossible_signature=True)
        result = sidecar.classify(path, expect, stat_lookup=lookup)
        if gone is not None and result.verdict is Verdict.CONTEXT_MISMATCH:
            return Classification(path, result.verdict, f"context frame {gone} is gone", result.header)
        if result.verdict is Verdict.CONTEXT_MISMATCH and result.reason == sidecar.OTHER_HISTORY:
            reason = _history_reason(item, result, lookup, self.key)
            return Classification(path, result.verdict, reason, result.header)
        return result

    def _expectation_without_context(self, impossible_signature: bool = False) -> Expectation:
        return Expectation(
            model=self.key.model,
            preprocess_fingerprint=self.key.preprocess_fingerprint,
            preset=self.key.preset,
            context_kind=self.key.context.kind,
            context_signature="<a context frame is gone>" if impossible_signature else None,
            check_context_frames=False,
        )

    def lookup(self, item: Item) -> FeatureLookup:
        """Classify by header; read the tensor (mmap-backed) only for a servable sidecar."""
        result = self.check(item)
        verdict = result.verdict
        if verdict is Verdict.VALID or (verdict is Verdict.LEGACY and self.accept_legacy):
            try:
                features = sidecar.read(result.path, check_finite=self.check_finite).features
            except Exception as err:  # replaced, truncated or non-finite since the header read
                outcome = FeatureLookup(None, str(Verdict.CORRUPT), f"{type(err).__name__}: {err}")
            else:
                outcome = FeatureLookup(features, HIT if verdict is Verdict.VALID else LEGACY_HIT)
        else:
            outcome = FeatureLookup(None, str(verdict), result.reason)
        with self._lock:
            self.stats.record(outcome.status, f"{item.image}: {outcome.reason}" if outcome.reason else None)
        return outcome

    def get(self, item: Item) -> torch.Tensor | None:
        """The cached features `[num_patches, 2*embed_dim]`, or None (a counted miss)."""
        return self.lookup(item).features

    def summary(self) -> str:
        return self.stats.summary()


def _caching_lookup() -> sidecar.StatLookup:
    """A stat function that stats each path once (padded histories repeat frame 0)."""
    cache: dict[str, os.stat_result | None] = {}

    def lookup(path: str) -> os.stat_result | None:
        if path not in cache:
            try:
                cache[path] = os.stat(path)
            except FileNotFoundError:
                cache[path] = None
        return cache[path]

    return lookup


# --------------------------------------------------------------------------- coverage


@dataclass
class CoverageReport:
    """How many items the store would serve: header checks only, nothing loaded."""

    total: int
    valid: int
    by_verdict: dict[str, int]
    examples: dict[str, list[str]] = field(default_factory=dict)

    @property
    def fraction(self) -> float:
        return self.valid / self.total if self.total else 1.0

    def summary(self) -> str:
        rest = ", ".join(f"{v} {n}" for v, n in sorted(self.by_verdict.items(), key=lambda kv: -kv[1]))
        return f"{self.valid}/{self.total} items cached ({100 * self.fraction:.1f}%): {rest or 'no items'}"


def _history_reason(item: Item, result: Classification, lookup: sidecar.StatLookup, key: FeatureKey) -> str:
    """A miss for "another history", made specific (it only runs on a miss): the first frame
    where the sidecar's history and the trainer's differ; where the frames are the same, another
    eviction or attention, else the frame that changed since the sidecar was written."""
    meta = result.header.meta if result.header is not None else {}
    cached = list((meta.get("context") or {}).get("frames") or [])
    wanted = frame_names(item)
    if cached != wanted:
        if len(cached) != len(wanted):
            return f"cached with {len(cached)} frames, the trainer streams {len(wanted)} for this item"
        step, was, now = next(
            (i, a, b) for i, (a, b) in enumerate(zip(cached, wanted, strict=True)) if a != b
        )
        return f"cached with another history: frame {step} was {was}, the trainer's is {now}"
    other = sidecar.other_context_settings(meta, key.context, key.model.attention)
    if other:
        return other
    written = None
    with contextlib.suppress(OSError):
        written = os.stat(result.path).st_mtime_ns
    return sidecar.changed_frame_reason(cached, os.path.dirname(item.image), lookup, written)


def check_items(items: Sequence[Item], store: FeatureStore, *, workers: int = 8) -> list[Classification]:
    """Header verdicts for many items, in their order, one folder listing per folder of current
    images: each image and sidecar is stat'ed once by its listing (DESIGN §8), frames outside the
    folder once each on demand. `verdict` is `MISSING` where there is no sidecar; a check that
    fails with an OS error is reported as missing too, so a caller re-creates it (and the
    decode stage reports the real problem per item)."""
    by_folder: dict[str, list[int]] = defaultdict(list)
    for index, item in enumerate(items):
        by_folder[os.path.dirname(item.image)].append(index)
    results: list[Classification | None] = [None] * len(items)

    def check_folder(folder: str) -> None:
        listing = list_dir(folder)
        lookup = _listing_lookup(listing)
        for index in by_folder[folder]:
            item = items[index]
            path = sidecar.sidecar_path(item.image)
            if f"{os.path.basename(item.image)}{sidecar.SUFFIX}" not in listing.sidecars:
                results[index] = Classification(path, MISSING, "no sidecar")  # type: ignore[arg-type]
                continue
            try:
                results[index] = store._classify(item, path, lookup)
            except OSError as err:
                reason = f"cannot check: {err.strerror or err}"
                results[index] = Classification(path, MISSING, reason)  # type: ignore[arg-type]

    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="check") as pool:
        list(pool.map(check_folder, sorted(by_folder)))
    return results  # type: ignore[return-value]


def coverage(
    items: Catalog | Sequence[Item], key: FeatureKey, *, workers: int = 8, accept_legacy: bool = False
) -> CoverageReport:
    """How many items have a sidecar valid for `key` (header checks through `check_items`).

    `accept_legacy` counts legacy files as valid, like the store would.
    """
    store = FeatureStore(key, accept_legacy=accept_legacy)
    listed = list(items.items if isinstance(items, Catalog) else items)
    total: Counter[str] = Counter()
    examples: dict[str, list[str]] = {}
    for item, result in zip(listed, check_items(listed, store, workers=workers), strict=True):
        verdict = str(result.verdict)
        if result.verdict is Verdict.LEGACY and accept_legacy:
            verdict = str(Verdict.VALID)
        total[verdict] += 1
        shown = examples.setdefault(verdict, [])
        if verdict != str(Verdict.VALID) and len(shown) < _EXAMPLES:
            shown.append(f"{item.image}: {result.reason}")
    return CoverageReport(
        sum(total.values()),
        total.get(str(Verdict.VALID), 0),
        dict(total),
        {k: v for k, v in examples.items() if v},
    )


def _listing_lookup(listing: DirListing) -> sidecar.StatLookup:
    folder = os.path.normpath(listing.path)
    others = _caching_lookup()

    def lookup(path: str) -> os.stat_result | None:
        head, name = os.path.split(path)
        if os.path.normpath(head) == folder:
            st = listing.images.get(name)
            if st is not None:
                return st
        return others(path)

    return lookup


# --------------------------------------------------------------------------- dataset


class CachedFeaturesDataset(Dataset):
    """A reference Dataset: per item, the cached features and (on a miss) the VGGT input frames.

    Yields dicts with `vggt_features` (Tensor or None), `images_vggt` (Tensor [S,3,H,W] of the
    preprocessed frames, or None), `image_paths`, `item_index`, `sample_id`, `cache_status`
    (`hit`, `legacy-hit` or the miss verdict; feed a batch's list to `FeatureStats.update` to
    count workers' lookups in the main process) and `cache_reason` (why a miss missed). `load_images`: `miss` loads frames only
    when the features are missing, `always` on every item, `never` not at all.
    """

    def __init__(
        self,
        items: Catalog | Sequence[Item],
        store: FeatureStore,
        preset: Any = None,
        *,
        load_images: str = "miss",
    ) -> None:
        if load_images not in LOAD_IMAGES:
            raise ConfigError(f"load_images must be one of {', '.join(LOAD_IMAGES)}, not {load_images!r}")
        if load_images != "never" and preset is None:
            raise ConfigError("a preprocess preset is needed to load images (or pass load_images='never')")
        fingerprint = getattr(preset, "fingerprint", None)
        if fingerprint is not None and fingerprint != store.key.preprocess_fingerprint:
            # frames loaded for a miss would not be the ones the cache was computed from
            raise ConfigError(
                f"preset {getattr(preset, 'name', '?')!r} is not the preprocessing the cache was built "
                f"with ({store.key.preset!r}, {store.key.preprocess_fingerprint[:12]}): use "
                "vggtctl.preprocess.get_preset(store.key.preset) (with the Qwen model's patch and "
                "merge sizes for presets with the grid step)"
            )
        self.items = list(items.items if isinstance(items, Catalog) else items)
        self.store = store
        self.preset = preset
        self.load_images = load_images

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.items[index]
        found = self.store.lookup(item)
        wanted = self.load_images == "always" or (self.load_images == "miss" and found.features is None)
        return {
            "vggt_features": found.features,
            "images_vggt": self.load_frames(item) if wanted else None,
            "image_paths": list(item.frames),
            "item_index": index,
            "sample_id": item.sample_id,
            "cache_status": found.status,
            "cache_reason": found.reason,  # why a miss missed ("" on a hit): worth logging
        }

    def load_frames(self, item: Item) -> torch.Tensor:
        """The item's frames through the preset, stacked [S,3,H,W]; repeated frames load once."""
        frames = item.frames if self.store.key.context.kind == "sequence" else item.frames[-1:]
        loaded: dict[str, torch.Tensor] = {}
        for path in frames:
            if path not in loaded:
                loaded[path] = self.preset.load(path).tensor
        tensors = [loaded[path] for path in frames]
        shapes = {tuple(t.shape) for t in tensors}
        if len(shapes) > 1:
            raise ValueError(f"{item.image}: frames preprocess to different sizes {sorted(shapes)}")
        return torch.stack(tensors)


def collate_features(batch: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Lists per key; `vggt_features` is stacked when every sample has features of one shape."""
    out: dict[str, Any] = {key: [sample[key] for sample in batch] for key in batch[0]} if batch else {}
    features = out.get("vggt_features")
    if (
        features
        and all(f is not None for f in features)
        and len({(tuple(f.shape), f.dtype) for f in features}) == 1
    ):
        out["vggt_features"] = torch.stack(features)
    return out


# --------------------------------------------------------------------------- online fallback


class OnlineFeatures:
    """Computes a miss with the same encoder call `precompute` makes, so hit == miss bit for bit
    (same device, dtype and batch shape). Context `none` -> `encode_frames` on the one frame;
    `sequence` -> `encode_sequences` on the ordered frames. Without a context kind, S == 1
    means `none`; pass the key's kind (or use `for_store`) when a sequence can have one frame.
    """

    def __init__(self, encoder: Any, context_kind: str | None = None) -> None:
        if context_kind not in (None, "none", "sequence"):
            raise ConfigError(f"context kind must be 'none' or 'sequence', not {context_kind!r}")
        self.encoder = encoder
        self.context_kind = context_kind

    @classmethod
    def for_store(cls, encoder: Any, store: FeatureStore) -> OnlineFeatures:
        """Check that the encoder computes the store's feature key, then follow its context kind."""
        own = encoder.feature_key(store.key.context)
        if own != store.key:
            diff = _key_difference(own, store.key)
            raise ConfigError(f"the online encoder does not compute the cached feature key: {diff}")
        return cls(encoder, store.key.context.kind)

    def __call__(self, images_vggt: torch.Tensor) -> torch.Tensor:
        """[S,3,H,W] frames (current last) -> [P, 2C] features of the current frame."""
        if images_vggt.dim() != 4:
            raise ValueError(f"expected frames [S,3,H,W], got shape {tuple(images_vggt.shape)}")
        kind = self.context_kind or ("none" if images_vggt.shape[0] == 1 else "sequence")
        with torch.inference_mode():
            if kind == "none":
                return self.encoder.encode_frames(images_vggt[-1:])[0]
            return self.encoder.encode_sequences(images_vggt.unsqueeze(0))[0]

    def fill(self, batch: Mapping[str, Any], device: torch.device | str | None = None) -> list[torch.Tensor]:
        """Every sample's features: cached where present, computed for the misses."""
        out: list[torch.Tensor] = []
        for i, features in enumerate(batch["vggt_features"]):
            if features is None:
                images = batch["images_vggt"][i]
                if images is None:
                    raise ValueError(
                        f"sample {i} ({batch['image_paths'][i][-1]}) has neither cached features nor "
                        "images; build the dataset with load_images='miss'"
                    )
                features = self(images)
            out.append(features if device is None else features.to(device))
        return out


def _key_difference(own: FeatureKey, wanted: FeatureKey) -> str:
    why = wanted.model.mismatch(own.model.to_meta())
    if why:
        return why.replace("cached", "encoder")
    if own.preprocess_fingerprint != wanted.preprocess_fingerprint:
        return f"preprocess preset {own.preset!r} differs from the cached {wanted.preset!r}"
    return f"context settings differ ({own.context} vs {wanted.context})"
