"""What a run will do: the encoder for the options, one item per sidecar, fixed chunks sharded
by rank, and the header check that skips items already valid for the feature key."""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Sequence
from typing import Any

import torch

from vggtctl import sidecar
from vggtctl.catalog import Catalog, Item
from vggtctl.claims import chunk_id
from vggtctl.data import FeatureStore, check_items
from vggtctl.distributed import DistInfo, default_loader_workers
from vggtctl.keys import ContextSettings, FeatureKey, fingerprint_json
from vggtctl.precompute.options import (
    CHUNK_ITEMS,
    Plan,
    PrecomputeOptions,
    _dtype,
)
from vggtctl.precompute.shared_memory import LoaderFit, fit_loader, shm_free_bytes
from vggtctl.sidecar import Verdict


def build_encoder(opts: PrecomputeOptions, context_kind: str, device: torch.device) -> Any:
    """Model + preset + encoder for these options (shared with `verify --recompute`)."""
    from vggtctl.encoder import Encoder
    from vggtctl.model import load_model
    from vggtctl.preprocess import get_preset, qwen_patch_merge

    patch, merge = qwen_patch_merge(opts.qwen_model) if opts.qwen_model else (14, 2)
    preset = get_preset(opts.preset, patch_size=patch, merge_size=merge)
    dtype_name = opts.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    dtype = _dtype(dtype_name)
    # On a GPU the weights are held in the feature dtype, as a bf16 trainer holds its frozen
    # VGGT; on the CPU they stay float32 (the encoder computes in float32 there).
    weights_dtype = dtype if device.type == "cuda" else torch.float32
    loaded = load_model(
        opts.vggt_model, device=device, dtype=weights_dtype, allow_download=opts.allow_download
    )
    attention = opts.attention or ("causal" if context_kind == "sequence" else "full")
    encoder = Encoder(
        loaded,
        preset,
        layer=opts.layer,
        attention=attention,
        dtype=dtype,
        device=device,
        evict_start=opts.evict_start,
        evict_recent=opts.evict_recent,
        sdpa=opts.sdpa,
    )
    if opts.compile and device.type == "cuda":
        loaded.model.compile_blocks()
    return encoder, preset


def context_settings(opts: PrecomputeOptions, kind: str) -> ContextSettings:
    if kind == "none":
        return ContextSettings("none")
    return ContextSettings("sequence", opts.evict_start, opts.evict_recent)


def unique_by_sidecar(items: Sequence[Item]) -> tuple[list[Item], int]:
    """One item per sidecar: the first in catalog order. Others with the same current image but
    a different history cannot share the per-image sidecar; they are counted as conflicts."""
    seen: dict[str, Item] = {}
    conflicts = 0
    for item in items:
        first = seen.get(item.image)
        if first is None:
            seen[item.image] = item
        elif first.frames != item.frames:
            conflicts += 1
    return list(seen.values()), conflicts


def chunked(items: Sequence[Item], key_id: str, size: int = CHUNK_ITEMS) -> list[tuple[str, list[int]]]:
    """Fixed chunks of the full (deduplicated) item order: the same on every rank and host."""
    chunks = []
    for start in range(0, len(items), size):
        indices = list(range(start, min(start + size, len(items))))
        chunks.append((chunk_id(key_id, items[start].image, start, size), indices))
    return chunks


def needs_encoding(store: FeatureStore, item: Item) -> bool:
    """True unless the item's sidecar is valid for the store's key. An error while checking
    (an unreadable folder, say) means "encode it": the decode stage then reports it per item."""
    try:
        return store.check(item).verdict is not Verdict.VALID
    except OSError:
        return True


def rewritten_since(store: FeatureStore, item: Item, since_ns: int) -> bool:
    """True when the item's sidecar was written after `since_ns` (file-system clock) and is
    valid for the store's key: another process encoded it while this `--force` run was going.

    Strictly after: on a file system with one-second timestamps, a sidecar from the second in
    which this run started may predate it, and --force must re-encode that one.
    """
    try:
        if os.stat(sidecar.sidecar_path(item.image)).st_mtime_ns <= since_ns:
            return False
        return store.check(item).verdict is Verdict.VALID
    except OSError:
        return False


def find_todo(
    items: Sequence[Item], indices: Sequence[int], store: FeatureStore, workers: int
) -> tuple[list[int], int]:
    """Header-check items (one folder listing per folder, in parallel); returns the indices
    that need encoding and the count already valid."""
    if not indices:
        return [], 0
    results = check_items([items[i] for i in indices], store, workers=workers)
    todo = [i for i, result in zip(indices, results, strict=True) if result.verdict is not Verdict.VALID]
    return todo, len(indices) - len(todo)


def batch_size_for(opts: PrecomputeOptions, key: FeatureKey, device: torch.device) -> int:
    """--batch-size, else 32 on a GPU and 4 on the CPU, halved for sequences (9 frames each)."""
    if opts.batch_size:
        return opts.batch_size
    size = 32 if device.type == "cuda" else 4
    return max(1, size // 2) if key.context.kind == "sequence" else size


def task_items(batch_size: int) -> int:
    """Items per decode task (one DataLoader index list): up to 8, never more than a batch."""
    return max(1, min(8, batch_size))


def plan_loader(
    opts: PrecomputeOptions, key: FeatureKey, info: DistInfo, batch_size: int, item_bytes: int
) -> LoaderFit:
    """Decode workers and prefetch for this rank, fitted to the free /dev/shm."""
    workers = opts.workers if opts.workers is not None else default_loader_workers(info)
    return fit_loader(
        workers,
        2 if key.context.kind == "sequence" else 4,
        task_items(batch_size),
        item_bytes,
        held_items=2 * batch_size,  # a partial batch per shape and the one being staged
        free_bytes=shm_free_bytes(),
        local_ranks=info.local_world_size,
    )


def plan_run(
    opts: PrecomputeOptions,
    catalog: Catalog,
    key: FeatureKey,
    info: DistInfo,
    bytes_per_item: int,
    input_bytes_per_item: int,
    device: torch.device,
) -> tuple[Plan, list[Item], list[tuple[str, list[int]]], list[int], FeatureStore]:
    items, conflicts = unique_by_sidecar(catalog.items)
    store = FeatureStore(key)
    key_id = fingerprint_json(key.to_meta())
    chunks = chunked(items, key_id, opts.chunk_items)
    mine = [c for n, c in enumerate(chunks) if n % info.world_size == info.rank]
    shard = [i for _, idx in mine for i in idx]
    if opts.force:
        todo, valid = shard, 0
    else:
        todo, valid = find_todo(items, shard, store, opts.check_workers)
    if opts.limit is not None:
        todo = todo[: max(0, opts.limit)]
    rate = None
    with contextlib.suppress(Exception):
        from vggtctl.manifest import load as load_manifest

        rate = load_manifest(opts.root).last_rate
    plan = Plan(
        items=len(catalog.items),
        sidecars=len(items),
        conflicts=conflicts,
        already_valid=valid,
        to_encode=len(todo),
        shard_items=len(shard),
        bytes_per_item=bytes_per_item,
        projected_bytes=bytes_per_item * len(todo),
        projected_seconds=(len(todo) / rate) if rate else None,
        layout=catalog.layout,
        layout_reason=catalog.reason,
        context=catalog.context_kind,
        missing_images=len(catalog.missing_images),
        catalog_problems=len(catalog.problems),
        unreadable_folders=catalog.unreadable_folders,
        input_bytes_per_item=input_bytes_per_item,
        catalog_problem_examples=[
            {"path": p.file, "line": p.line, "reason": p.reason} for p in catalog.problems[:EXAMPLES]
        ],
        missing_image_examples=list(catalog.missing_images[:EXAMPLES]),
    )
    plan.batch_size = batch_size_for(opts, key, device)
    fit = plan_loader(opts, key, info, plan.batch_size, input_bytes_per_item)
    plan.decode_workers, plan.decode_prefetch = fit.workers, fit.prefetch
    plan.decode_in_flight_bytes, plan.decode_note = fit.in_flight_bytes, fit.note
    return plan, items, mine, todo, store


EXAMPLES = 20  # catalog problems and missing images named in the plan (--json); then counts only
ARCHIVE_BYTES = 2048  # a sidecar's bytes beyond its features: zip records, pickle, meta (about)


def first_decoded(preset: Any, samples: str | Sequence[str] | None) -> Any | None:
    """The first sample image that decodes, preprocessed (None when none does)."""
    if samples is None:
        samples = []
    elif isinstance(samples, str):
        samples = [samples]
    for path in samples:
        try:
            return preset.load(path)
        except Exception:
            continue
    return None


def sidecar_bytes(encoder: Any, decoded: Any | None) -> int:
    """Feature bytes for one item (patches x 2C x dtype) plus the archive overhead."""
    if decoded is None:
        return 0
    grid = decoded.grid_hw
    channels = 2 * encoder.embed_dim if hasattr(encoder, "embed_dim") else 0
    itemsize = torch.empty((), dtype=encoder.dtype).element_size()
    return grid[0] * grid[1] * channels * itemsize + ARCHIVE_BYTES


def estimate_sidecar_bytes(encoder: Any, preset: Any, samples: str | Sequence[str] | None) -> int:
    """`sidecar_bytes` from the first sample image that decodes (0 when none does)."""
    return sidecar_bytes(encoder, first_decoded(preset, samples))


def input_bytes(decoded: Any | None, frames: int) -> int:
    """Bytes of one item's decoded input: what a decode worker hands over per item."""
    if decoded is None:
        return 0
    return decoded.pixels.numel() * decoded.pixels.element_size() * max(1, frames)


DEFAULT_MAX_HISTORY = 8


def recorded_max_history(root: Any) -> int:
    """The root's current max_history (where its settings use the episodes layout), else 8.

    What a run that names none resumes with, on the command line and in the library alike: a
    default of 8 over a root cached with 3 would re-encode every item and make 8 current, and a
    trainer using 3 would then miss on every sample.
    """
    from vggtctl import manifest

    settings = manifest.load(root).last_run_settings() or {}
    value = settings.get("max_history")
    if settings.get("layout") == "episodes" and type(value) is int and value >= 0:
        return value
    return DEFAULT_MAX_HISTORY


def changed_settings(root: Any, key: FeatureKey, layout: str, max_history: int | None) -> list[str]:
    """How this run's key and history rule differ from the root's current ones (the manifest's
    latest run); [] when they agree or nothing is recorded. The run's settings become current
    when it ends, and verify, status, prune and training then judge every sidecar by them."""
    from vggtctl import manifest

    recorded = manifest.load(root)
    old = recorded.current_key
    if old is None:
        return []
    settings = recorded.last_run_settings() or {}
    changes = []
    if old.model.fingerprint != key.model.fingerprint:
        changes.append(f"model {old.model.label} -> {key.model.label}")
    else:
        changes += [
            f"{name} {getattr(old.model, name)} -> {getattr(key.model, name)}"
            for name in ("layer", "attention", "dtype")
            if getattr(old.model, name) != getattr(key.model, name)
        ]
    if old.preprocess_fingerprint != key.preprocess_fingerprint:
        changes.append(f"preprocessing {old.preset} -> {key.preset}")
    if old.context != key.context:
        changes.append(f"context {old.context.describe()} -> {key.context.describe()}")
    if settings.get("layout") not in (None, layout):
        changes.append(f"layout {settings.get('layout')} -> {layout}")
    # max_history shapes histories in the episodes layout only (annotations name their frames)
    episodes = layout == "episodes" and settings.get("layout") == "episodes"
    sequence = key.context.kind == "sequence" and old.context.kind == "sequence"
    if episodes and sequence and settings.get("max_history") not in (None, max_history):
        changes.append(f"max_history {settings.get('max_history')} -> {max_history}")
    return changes


def sample_items(items: Sequence[Item], k: int, seed: int | None = None) -> list[Item]:
    rng = random.Random(seed)
    return rng.sample(list(items), min(k, len(items)))
