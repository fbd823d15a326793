"""`verify --recompute K`: re-encode K random items and compare them with what is stored.

This is the proof that the cache equals online features: same catalog, preset, context and
encoder as `precompute` (its settings come from the manifest's last run), fresh forward,
element-wise comparison. A difference beyond the storage dtype's rounding is a problem.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from vggtctl import sidecar
from vggtctl.catalog import load_catalog
from vggtctl.data import FeatureStore
from vggtctl.errors import ConfigError
from vggtctl.precompute import (
    Failed,
    ItemDataset,
    PrecomputeOptions,
    build_encoder,
    context_settings,
    sample_items,
    unique_by_sidecar,
)
from vggtctl.precompute.planning import recorded_max_history
from vggtctl.preprocess import unit_pixels

# Allowed disagreement per storage dtype: (minimum cosine, max abs diff / max |stored|).
# 16-bit caches are usually written on a GPU and rechecked elsewhere: rounding of activations
# through 24 layers moves values by a few percent of their range, never their direction.
TOLERANCES = {"float32": (0.99999, 1e-3), "bfloat16": (0.99, 0.1), "float16": (0.995, 0.05)}


@dataclass
class RecomputeCheck:
    path: str
    ok: bool
    max_abs_diff: float | None = None
    cosine: float | None = None
    reason: str = ""


@dataclass
class RecomputeReport:
    requested: int
    checks: list[RecomputeCheck] = field(default_factory=list)
    skipped_not_valid: int = 0  # drawn, but the header check failed: nothing to compare

    @property
    def problems(self) -> list[RecomputeCheck]:
        return [c for c in self.checks if not c.ok]

    def to_json(self) -> dict[str, Any]:
        return {
            "requested": self.requested,
            "checked": len(self.checks),
            "mismatches": len(self.problems),
            "skipped_not_valid": self.skipped_not_valid,
            "checks": [asdict(c) for c in self.checks],
        }


def compare(stored: torch.Tensor, fresh: torch.Tensor, dtype_name: str) -> tuple[bool, float, float, str]:
    """(ok, max abs diff, cosine, reason) of stored vs recomputed features."""
    if stored.shape != fresh.shape:
        return (
            False,
            float("inf"),
            0.0,
            f"shape {tuple(stored.shape)} cached, {tuple(fresh.shape)} recomputed",
        )
    a, b = stored.double().flatten(), fresh.double().flatten()  # float64: a cosine of 1.000004 reads badly
    max_abs = float((a - b).abs().max()) if a.numel() else 0.0
    cosine = float(torch.nn.functional.cosine_similarity(a, b, dim=0)) if a.numel() else 1.0
    min_cos, rel = TOLERANCES.get(dtype_name, TOLERANCES["bfloat16"])
    scale = float(b.abs().max()) if b.numel() else 1.0
    if cosine < min_cos:
        return False, max_abs, cosine, f"cosine {cosine:.6f} < {min_cos}"
    if max_abs > rel * max(scale, 1e-6):
        return False, max_abs, cosine, f"max abs diff {max_abs:.4g} > {rel} x max|features| ({scale:.4g})"
    return True, max_abs, cosine, ""


def options_from_manifest(root: Path, vggt_model: str | None, device: str | None) -> PrecomputeOptions:
    """The settings of the last precompute run recorded in the manifest, with this model."""
    from vggtctl.manifest import load as load_manifest

    manifest = load_manifest(root)
    settings = manifest.last_run_settings() if hasattr(manifest, "last_run_settings") else None
    if not settings:
        raise ConfigError(f"{root}: no precompute run in the manifest; --recompute needs its settings")
    model = vggt_model or settings.get("vggt_model")
    if not model:
        raise ConfigError("--recompute needs --vggt-model (the manifest names no model)")
    return PrecomputeOptions(
        root=root,
        vggt_model=model,
        qwen_model=settings.get("qwen_model"),
        preset=settings.get("preset", "janusvln"),
        layer=int(settings.get("layer", -2)),
        attention=settings.get("attention"),
        layout=settings.get("layout", "auto"),
        annotations=list(settings.get("annotations") or []),
        data_path=settings.get("data_path"),
        max_history=int(settings.get("max_history", 8)),
        context=settings.get("context", "auto"),
        evict_start=_count_or_none(settings.get("evict_start")),
        evict_recent=_count_or_none(settings.get("evict_recent")),
        dtype=settings.get("dtype"),
        device=device,
    )


def _count_or_none(value: object) -> int | None:
    """A recorded K/V-cache eviction count (absent in manifests written before it was kept)."""
    return value if type(value) is int and value >= 0 else None


def recompute(opts: PrecomputeOptions, k: int, seed: int | None = None) -> RecomputeReport:
    """Re-encode up to `k` random items that have a sidecar and compare each."""
    if opts.max_history is None:  # as precompute: the root's current one
        opts = dataclasses.replace(opts, max_history=recorded_max_history(opts.root))
    catalog = load_catalog(
        opts.root,
        opts.layout,
        annotations=opts.annotations,
        data_path=opts.data_path,
        max_history=opts.max_history,
        context=opts.context,
    )
    items, _ = unique_by_sidecar(catalog.items)
    cached = [it for it in items if os.path.exists(sidecar.sidecar_path(it.image))]
    report = RecomputeReport(requested=k)
    if not cached:
        return report
    device = torch.device(opts.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    encoder, preset = build_encoder(opts, catalog.context_kind, device)
    key = encoder.feature_key(context_settings(opts, catalog.context_kind))
    store = FeatureStore(key)
    chosen = _valid_sample(cached, store, k, seed, report)
    dataset = ItemDataset(chosen, preset, key)
    sequence = key.context.kind == "sequence"
    for index, item in enumerate(chosen):
        path = sidecar.sidecar_path(item.image)
        try:
            stored = sidecar.read(path).features
        except Exception as err:  # NaN/Inf or unreadable since the header check: a problem, not a crash
            report.checks.append(
                RecomputeCheck(path, False, reason=f"cannot read the stored features: {err}")
            )
            continue
        prepared = dataset[index]
        if isinstance(prepared, Failed):
            report.checks.append(RecomputeCheck(path, False, reason=prepared.failure.reason))
            continue
        pixels = unit_pixels(prepared.stacked().unsqueeze(0).to(device))
        fresh = (encoder.encode_sequences(pixels) if sequence else encoder.encode_frames(pixels))[0].cpu()
        ok, max_abs, cosine, reason = compare(stored, fresh, str(stored.dtype).removeprefix("torch."))
        report.checks.append(RecomputeCheck(path, ok, max_abs, cosine, reason))
    return report


def _valid_sample(
    cached: list[Any], store: FeatureStore, k: int, seed: int | None, report: RecomputeReport
) -> list[Any]:
    """Up to `k` random items whose sidecar passes the header check for the key.

    A stale or mismatched sidecar cannot be compared with a fresh encoding (it was made from
    other inputs); verify's own pass already reports it. Drawing until k valid ones are found
    keeps the K comparisons K, but stops after 20 x k candidates (at least 100): a cache that is
    mostly invalid is shown by the verdicts, and its header checks should not run on forever.
    """
    chosen: list[Any] = []
    for item in sample_items(cached, min(len(cached), max(100, 20 * k)), seed):
        if len(chosen) == k:
            break
        if store.check(item).verdict is sidecar.Verdict.VALID:
            chosen.append(item)
        else:
            report.skipped_not_valid += 1
    return chosen
