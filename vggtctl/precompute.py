"""The precompute pipeline (DESIGN §2, §6, §8):

catalog -> one item per sidecar -> drop items already valid for this feature key (header
check) -> fixed chunks, sharded by rank and claimed -> DataLoader workers decode/preprocess ->
batches grouped by input shape -> encoder -> asynchronous atomic writes -> manifest entry.

The GPU never waits on decoding (workers prefetch) or on writing (a bounded writer pool); the
device->host copy of batch k overlaps the forward of batch k+1.
"""

from __future__ import annotations

import contextlib
import os
import random
import threading
import time
import uuid
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from vggtctl import sidecar
from vggtctl.catalog import Catalog, Item, item_frames_for_key, load_catalog
from vggtctl.claims import HEARTBEAT_S, ClaimBook, chunk_id, claims_dir
from vggtctl.data import FeatureStore
from vggtctl.distributed import (
    DistInfo,
    broadcast_object,
    close_group,
    default_loader_workers,
    dist_info,
    gather_objects,
    init_group,
    pick_device,
)
from vggtctl.errors import ConfigError, ImageError
from vggtctl.failures import Failure, FailureLog
from vggtctl.keys import ContextSettings, FeatureKey, fingerprint_json
from vggtctl.rankprogress import RankAggregator, remove_run_dir, run_dir
from vggtctl.reporter import Reporter
from vggtctl.sidecar import Verdict
from vggtctl.writer import DiskFullSkipped, SidecarWriter

CHUNK_ITEMS = 64
SHOWN_PROBLEMS = 10  # catalog problems printed before a count


@dataclass
class PrecomputeOptions:
    root: Path
    vggt_model: str
    qwen_model: str | None = None
    preset: str = "janusvln"
    layer: int = -2
    attention: str | None = None  # default: causal for sequences, full for single frames
    layout: str = "auto"
    annotations: list[str] = field(default_factory=list)
    data_path: str | None = None
    max_history: int = 8
    context: str = "auto"
    evict_start: int | None = None
    evict_recent: int | None = None
    batch_size: int | None = None
    workers: int | None = None
    dtype: str | None = None  # default: bfloat16 on GPU, float32 on CPU
    device: str | None = None
    devices: list[str] | None = None
    limit: int | None = None
    force: bool = False
    verify: bool = False
    dry_run: bool = False
    allow_download: bool = False
    fsync: bool = False
    compile: bool = False  # torch.compile the blocks (GPU); partial batches are padded to size
    writer_threads: int = 8
    check_workers: int = 16
    chunk_items: int = CHUNK_ITEMS  # items per claim; every process on one root must agree


@dataclass
class Plan:
    items: int
    sidecars: int
    conflicts: int
    already_valid: int
    to_encode: int
    shard_items: int
    bytes_per_item: int
    projected_bytes: int
    projected_seconds: float | None
    layout: str
    layout_reason: str
    context: str
    missing_images: int
    catalog_problems: int


@dataclass
class Outcome:
    plan: Plan
    encoded: int = 0
    failed: int = 0
    not_written: int = 0  # decoded and encoded, but the disk was full
    skipped_claimed: int = 0
    bytes_written: int = 0
    seconds: float = 0.0
    interrupted: bool = False
    disk_full: str = ""
    verify_problems: int = 0
    run_id: str = ""
    ranks: int = 1
    per_rank: list[int] = field(default_factory=list)  # encoded per rank (rank order)
    feature_key: dict[str, Any] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.encoded / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["rate"] = self.rate
        return data


class PrecomputeInterrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGTERM) stopped the run after its in-flight writes; `outcome` says how far it got."""

    def __init__(self, outcome: Outcome) -> None:
        super().__init__("interrupted")
        self.outcome = outcome


# --------------------------------------------------------------------------- setup


FEATURE_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def _dtype(name: str) -> torch.dtype:
    value = FEATURE_DTYPES.get(str(name).removeprefix("torch."))
    if value is None:
        raise ConfigError(f"--dtype {name}: use one of {', '.join(FEATURE_DTYPES)}")
    return value


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


def find_todo(
    items: Sequence[Item], indices: Sequence[int], store: FeatureStore, workers: int
) -> tuple[list[int], int]:
    """Header-check items in parallel; returns the indices that need encoding and the valid count."""
    if not indices:
        return [], 0

    def needs_work(i: int) -> bool:
        return needs_encoding(store, items[i])

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="check") as pool:
        flags = list(pool.map(needs_work, indices, chunksize=64))
    todo = [i for i, flag in zip(indices, flags, strict=True) if flag]
    return todo, len(indices) - len(todo)


# --------------------------------------------------------------------------- decode workers


@dataclass
class Prepared:
    index: int
    pixels: torch.Tensor  # [S,3,H,W] (sequence) or [3,H,W] (single frame)
    meta: dict[str, Any]


@dataclass
class Failed:
    index: int
    failure: Failure


class ItemDataset(Dataset):
    """Decodes and preprocesses one item in a DataLoader worker; a bad image becomes `Failed`.

    Consecutive items of an episode share frames, so each worker keeps a small LRU of
    preprocessed frames.
    """

    def __init__(self, items: Sequence[Item], preset: Any, key: FeatureKey, frame_cache: int = 32) -> None:
        self.items = items
        self.preset = preset
        self.key = key
        self.frame_cache = frame_cache
        self._cache: OrderedDict[str, Any] = OrderedDict()

    def __len__(self) -> int:
        return len(self.items)

    def _load(self, path: str) -> Any:
        hit = self._cache.get(path)
        if hit is not None:
            self._cache.move_to_end(path)
            return hit
        value = self.preset.load(path)
        self._cache[path] = value
        if len(self._cache) > self.frame_cache:
            self._cache.popitem(last=False)
        return value

    def __getitem__(self, index: int) -> Prepared | Failed:
        item = self.items[index]
        sequence = self.key.context.kind == "sequence"
        try:
            frames = item_frames_for_key(item)
        except OSError as err:
            path = str(getattr(err, "filename", None) or item.image)
            reason = f"cannot stat: {err.strerror or err}"
            return Failed(index, Failure(item.image, "decode", _naming_frame(item, path, reason)))
        try:
            loaded = [self._load(p) for p in item.frames] if sequence else [self._load(item.image)]
        except ImageError as err:
            return Failed(index, Failure(item.image, "decode", _naming_frame(item, err.path, err.reason)))
        except Exception as err:
            return Failed(index, Failure(item.image, "decode", f"{type(err).__name__}: {err}"))
        current = loaded[-1]
        if sequence and any(p.tensor.shape != current.tensor.shape for p in loaded):
            reason = "context frames preprocess to different sizes; cannot stream them together"
            return Failed(index, Failure(item.image, "decode", reason))
        pixels = torch.stack([p.tensor for p in loaded]) if sequence else current.tensor
        _image_name, image_key = frames[-1]
        meta = sidecar.build_meta(
            image_name=os.path.basename(item.image),
            image_key=image_key,
            model=self.key.model,
            preprocess={
                "fingerprint": self.key.preprocess_fingerprint,
                "preset": self.key.preset,
                "input_hw": list(current.input_hw),
                "grid_hw": list(current.grid_hw),
            },
            context=self.key.context,
            frames=[name for name, _ in frames] if sequence else [],
            signature=self.key.signature_for(frames) if sequence else None,
        )
        return Prepared(index, pixels, meta)


def _naming_frame(item: Item, path: str, reason: str) -> str:
    """The failure is the item's; when a history frame caused it, the reason names that frame."""
    if os.path.normpath(path) == item.image:
        return reason
    return f"context frame {os.path.relpath(path, os.path.dirname(item.image))}: {reason}"


def _identity(batch: list[Any]) -> list[Any]:
    return batch


class ClaimingSampler:
    """Yields small lists of item indices, claiming each chunk just before its first index is
    handed to a worker (the DataLoader consumes samplers in the main process)."""

    def __init__(
        self,
        chunks: list[tuple[str, list[int]]],
        claims: ClaimBook | None,
        load_batch: int,
        recheck: Callable[[list[int]], list[int]],
        on_chunk: Callable[[str, list[int]], None],
        stop: threading.Event,
    ) -> None:
        self.chunks = chunks
        self.claims = claims
        self.load_batch = load_batch
        self.recheck = recheck
        self.on_chunk = on_chunk
        self.stop = stop
        self.skipped_claimed = 0

    def __iter__(self) -> Iterator[list[int]]:
        for chunk, indices in self.chunks:
            if self.stop.is_set():
                return
            if self.claims is not None:
                if not self.claims.try_claim(chunk):
                    self.skipped_claimed += len(indices)
                    continue
                indices = self.recheck(indices)  # another process may have finished some
            self.on_chunk(chunk, indices)
            for start in range(0, len(indices), self.load_batch):
                yield indices[start : start + self.load_batch]


# --------------------------------------------------------------------------- the run


class _Progress:
    """Counters shared by the writer threads and the main loop."""

    def __init__(self, reporter: Reporter, failures: FailureLog, keep_paths: bool = False) -> None:
        self.reporter = reporter
        self.failures = failures
        self.lock = threading.Lock()
        self.encoded = 0
        self.bytes = 0
        self.not_written = 0
        self.keep_paths = keep_paths  # only --verify needs them; 10^7 paths are a gigabyte
        self.written_paths: list[str] = []

    def fail(self, failure: Failure) -> None:
        self.failures.add(failure)
        self._report()

    def wrote(self, path: str, nbytes: int) -> None:
        with self.lock:
            self.encoded += 1
            self.bytes += nbytes
            if self.keep_paths:
                self.written_paths.append(path)
        self._report()

    def skipped(self) -> None:
        with self.lock:
            self.not_written += 1

    def _report(self) -> None:
        with self.lock:
            self.reporter.update(self.encoded, self.failures.count, self.bytes)


class _ChunkTracker:
    """Releases a chunk's claim when its last item is written or has failed."""

    def __init__(self, claims: ClaimBook) -> None:
        self.claims = claims
        self.lock = threading.Lock()
        self.left: dict[str, int] = {}
        self.chunk_of: dict[int, str] = {}

    def started(self, chunk: str, indices: list[int]) -> None:
        with self.lock:
            self.left[chunk] = len(indices)
            for i in indices:
                self.chunk_of[i] = chunk
        if not indices:
            self.claims.release(chunk)

    def done(self, index: int) -> None:
        with self.lock:
            chunk = self.chunk_of.pop(index, None)
            if chunk is None:
                return
            self.left[chunk] -= 1
            finished = self.left[chunk] == 0
        if finished:
            self.claims.release(chunk)


def plan_run(
    opts: PrecomputeOptions, catalog: Catalog, key: FeatureKey, info: DistInfo, bytes_per_item: int
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
    )
    return plan, items, mine, todo, store


def estimate_sidecar_bytes(encoder: Any, preset: Any, samples: str | Sequence[str] | None) -> int:
    """Features bytes for one item (patches x 2C x dtype) plus the archive overhead, from the
    first sample image that decodes (0 when none does)."""
    if samples is None:
        samples = []
    elif isinstance(samples, str):
        samples = [samples]
    for path in samples:
        try:
            grid = preset.load(path).grid_hw
            break
        except Exception:
            continue
    else:
        return 0
    channels = 2 * encoder.embed_dim if hasattr(encoder, "embed_dim") else 0
    itemsize = torch.empty((), dtype=encoder.dtype).element_size()
    return grid[0] * grid[1] * channels * itemsize + 2048


def run(opts: PrecomputeOptions, reporter: Reporter | None = None) -> Outcome:
    """Run (or plan, with dry_run) a precompute over `opts.root` on this rank.

    Returns the outcome (on rank 0 summed over ranks). Ctrl-C raises `PrecomputeInterrupted`
    (a KeyboardInterrupt) once the in-flight writes are done; it carries the outcome so far.
    """
    reporter = reporter or Reporter()
    info = dist_info()
    root = Path(opts.root)
    if not root.is_dir():
        raise ConfigError(f"{root}: data root is not a folder")
    if opts.chunk_items < 1:
        raise ConfigError(f"chunk size must be at least 1 item, not {opts.chunk_items}")
    catalog = load_catalog(
        root,
        opts.layout,
        annotations=opts.annotations,
        data_path=opts.data_path,
        max_history=opts.max_history,
        context=opts.context,
    )
    device = pick_device(opts.device, info, opts.devices)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    encoder, preset = build_encoder(opts, catalog.context_kind, device)
    key: FeatureKey = encoder.feature_key(context_settings(opts, catalog.context_kind))
    samples = [item.image for item in catalog.items[:3]]
    plan, items, mine, todo, store = plan_run(
        opts, catalog, key, info, estimate_sidecar_bytes(encoder, preset, samples)
    )
    outcome = Outcome(plan=plan, feature_key=key.to_meta(), ranks=info.world_size)
    grouped = init_group(info)
    try:
        if opts.dry_run:
            if grouped:
                _merge_plans(outcome, info)
            return outcome
        _execute(
            opts, catalog, items, mine, todo, store, encoder, preset, key, device, info, outcome, reporter
        )
        return outcome
    finally:
        if grouped:
            close_group()


def _execute(
    opts: PrecomputeOptions,
    catalog: Catalog,
    items: list[Item],
    mine: list[tuple[str, list[int]]],
    todo: list[int],
    store: FeatureStore,
    encoder: Any,
    preset: Any,
    key: FeatureKey,
    device: torch.device,
    info: DistInfo,
    outcome: Outcome,
    reporter: Reporter,
) -> None:
    root = Path(opts.root)
    run_id = broadcast_object(time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6], info)
    outcome.run_id = run_id
    try:
        claims = ClaimBook(root)
    except OSError as err:
        raise ConfigError(
            f"{claims_dir(root)}: cannot create it ({err.strerror or err}); precompute keeps its "
            "claims and failure log under the data root, which must be writable"
        ) from err
    failures = FailureLog(root, run_id, info.rank)
    rank_reporter: Any = reporter
    if info.is_distributed:
        rank_reporter = RankAggregator(reporter, run_dir(root, run_id), info.rank, info.world_size)
    progress = _Progress(rank_reporter, failures, keep_paths=opts.verify)
    todo_set = set(todo)
    my_chunks = [(cid, [i for i in idx if i in todo_set]) for cid, idx in mine]
    my_chunks = [(cid, idx) for cid, idx in my_chunks if idx]

    start = time.perf_counter()
    try:
        rank_reporter.start(len(todo), outcome.plan)
        if info.is_main:
            for problem in catalog.problems[:SHOWN_PROBLEMS]:
                rank_reporter.message(f"{problem}")
            if len(catalog.problems) > SHOWN_PROBLEMS:
                rank_reporter.message(
                    f"... and {len(catalog.problems) - SHOWN_PROBLEMS} more catalog problems"
                )
        _encode_all(opts, items, my_chunks, store, encoder, key, preset, device, claims, progress, outcome)
    except KeyboardInterrupt:
        outcome.interrupted = True
    finally:
        claims.release_all()
        outcome.seconds = time.perf_counter() - start
        outcome.encoded = progress.encoded
        outcome.bytes_written = progress.bytes
        outcome.not_written = progress.not_written
        outcome.failed = failures.count
        outcome.per_rank = [progress.encoded]
        rank_reporter.finish()  # with several ranks: publishes this rank's final counts

    if outcome.interrupted:
        if info.is_main:
            if info.is_distributed:
                reporter.finish()
            _record_manifest(opts, outcome, key)
        raise PrecomputeInterrupted(outcome)
    if opts.verify and progress.written_paths:
        outcome.verify_problems = sum(
            sidecar.classify(p, full=True).verdict is Verdict.CORRUPT for p in progress.written_paths
        )
    if info.is_distributed:
        _merge_ranks(outcome, info)
    if info.is_main:
        if info.is_distributed:
            reporter.update(outcome.encoded, outcome.failed, outcome.bytes_written)
            reporter.finish()
            remove_run_dir(root, run_id)  # every rank has published its last counts
        _record_manifest(opts, outcome, key)


def _plan_counts(plan: Plan) -> tuple[int, int, int, int]:
    return plan.already_valid, plan.to_encode, plan.shard_items, plan.projected_bytes


def _merge_plans(outcome: Outcome, info: DistInfo) -> None:
    """Rank 0's plan becomes the whole run's: shard counts summed over ranks."""
    parts = gather_objects(_plan_counts(outcome.plan), info)
    plan = outcome.plan
    rate = plan.to_encode / plan.projected_seconds if plan.projected_seconds else None
    plan.already_valid, plan.to_encode, plan.shard_items, plan.projected_bytes = (
        sum(p[n] for p in parts) for n in range(4)
    )
    plan.projected_seconds = plan.to_encode / rate if rate else None


def _merge_ranks(outcome: Outcome, info: DistInfo) -> None:
    _merge_plans(outcome, info)
    parts = gather_objects(
        (
            outcome.encoded,
            outcome.failed,
            outcome.bytes_written,
            outcome.skipped_claimed,
            outcome.verify_problems,
            outcome.not_written,
            outcome.disk_full,
        ),
        info,
    )
    outcome.encoded = sum(p[0] for p in parts)
    outcome.failed = sum(p[1] for p in parts)
    outcome.bytes_written = sum(p[2] for p in parts)
    outcome.skipped_claimed = sum(p[3] for p in parts)
    outcome.verify_problems = sum(p[4] for p in parts)
    outcome.not_written = sum(p[5] for p in parts)
    outcome.disk_full = next((p[6] for p in parts if p[6]), "")
    outcome.per_rank = [p[0] for p in parts]


def _record_manifest(opts: PrecomputeOptions, outcome: Outcome, key: FeatureKey) -> None:
    try:
        from vggtctl import manifest
    except ImportError:
        return
    settings = {
        "vggt_model": opts.vggt_model,
        "qwen_model": opts.qwen_model,
        "preset": opts.preset,
        "layer": opts.layer,
        "attention": key.model.attention,
        "layout": outcome.plan.layout,
        "annotations": list(opts.annotations),
        "data_path": opts.data_path,
        "max_history": opts.max_history,
        "context": outcome.plan.context,
        "dtype": key.model.dtype,
    }
    entry = {
        "kind": "precompute",
        "run": outcome.run_id,
        "settings": settings,
        "encoded": outcome.encoded,
        "failed": outcome.failed,
        "already_valid": outcome.plan.already_valid,
        "bytes": outcome.bytes_written,
        "seconds": round(outcome.seconds, 3),
        "rate": outcome.rate if outcome.encoded else None,
        "ranks": outcome.ranks,
        "per_rank": list(outcome.per_rank),
        "interrupted": outcome.interrupted,
        "disk_full": outcome.disk_full or None,
    }
    with contextlib.suppress(OSError):
        manifest.record_run(opts.root, entry, key)


def _encode_all(
    opts: PrecomputeOptions,
    items: list[Item],
    chunks: list[tuple[str, list[int]]],
    store: FeatureStore,
    encoder: Any,
    key: FeatureKey,
    preset: Any,
    device: torch.device,
    claims: ClaimBook,
    progress: _Progress,
    outcome: Outcome,
) -> None:
    """Claim, decode, encode and write this rank's chunks. KeyboardInterrupt propagates after
    the in-flight writes have finished (the claims are released by the caller)."""
    if not chunks:
        return
    cuda = device.type == "cuda"
    batch_size = opts.batch_size or (32 if cuda else 4)
    if key.context.kind == "sequence" and opts.batch_size is None:
        batch_size = max(1, batch_size // 2)
    workers = opts.workers if opts.workers is not None else default_loader_workers(dist_info())
    stop = threading.Event()
    tracker = _ChunkTracker(claims)

    def recheck(indices: list[int]) -> list[int]:
        if opts.force:
            return indices
        return [i for i in indices if needs_encoding(store, items[i])]

    def on_written(token: Any, nbytes: int | None, error: BaseException | None) -> None:
        index, path = token
        if error is None and nbytes is not None:
            progress.wrote(path, nbytes)
        elif isinstance(error, DiskFullSkipped):
            progress.skipped()  # not this item's fault: the run stops and says why
        else:
            reason = getattr(error, "strerror", None) or str(error)
            progress.fail(
                Failure(items[index].image, "write", f"cannot write {os.path.basename(path)}: {reason}")
            )
        tracker.done(index)

    sampler = ClaimingSampler(chunks, claims, max(1, min(8, batch_size)), recheck, tracker.started, stop)
    loader = DataLoader(
        ItemDataset(items, preset, key),
        batch_sampler=sampler,
        num_workers=workers,
        collate_fn=_identity,
        pin_memory=False,  # samples are dataclasses; the staging buffer in _launch is pinned
        prefetch_factor=(2 if key.context.kind == "sequence" else 4) if workers else None,
        persistent_workers=False,
    )
    writer = SidecarWriter(on_written, threads=opts.writer_threads, fsync=opts.fsync)
    pipeline = _GpuPipeline(
        encoder, key.context.kind == "sequence", device, writer, items, progress, tracker.done
    )
    if opts.compile and cuda:
        pipeline.pad_to = batch_size  # one compiled shape: no recompiles for the last, short batch
    buckets: dict[tuple[int, ...], list[Prepared]] = defaultdict(list)
    heartbeat = time.monotonic()
    batches = iter(loader)
    try:
        for loaded in batches:
            for sample in loaded:
                if isinstance(sample, Failed):
                    progress.fail(sample.failure)
                    tracker.done(sample.index)
                    continue
                bucket = buckets[tuple(sample.pixels.shape)]
                bucket.append(sample)
                if len(bucket) >= batch_size:
                    pipeline.submit(bucket[:batch_size])
                    del bucket[:batch_size]
            if writer.disk_full.is_set():
                stop.set()
                break
            if time.monotonic() - heartbeat > HEARTBEAT_S:
                claims.heartbeat()
                heartbeat = time.monotonic()
        if not stop.is_set():
            for bucket in buckets.values():
                for start in range(0, len(bucket), batch_size):
                    pipeline.submit(bucket[start : start + batch_size])
            pipeline.flush()
    except KeyboardInterrupt:
        stop.set()
        pipeline.flush()  # the batch already computed is written; a second Ctrl-C skips it
        raise
    finally:
        del batches  # stops the decode workers now, not when a traceback lets go of this frame
        writer.close()
        outcome.skipped_claimed = sampler.skipped_claimed
        if writer.disk_full.is_set():
            outcome.disk_full = writer.disk_full_message


class _GpuPipeline:
    """Launch batch k, then hand batch k-1's features (already copied to host) to the writers."""

    def __init__(
        self,
        encoder: Any,
        sequence: bool,
        device: torch.device,
        writer: Any,
        items: list[Item],
        progress: _Progress,
        item_done: Callable[[int], None],
    ) -> None:
        self.encoder = encoder
        self.sequence = sequence
        self.device = device
        self.writer = writer
        self.items = items
        self.progress = progress
        self.item_done = item_done
        self.pending: tuple[Any, torch.Tensor, list[Prepared]] | None = None
        self.halved = 0  # batches split after running out of memory
        self.pad_to: int | None = None

    def submit(self, batch: list[Prepared]) -> None:
        try:
            launched = self._launch(batch)
        except Exception as err:
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            if _out_of_memory(err) and len(batch) > 1:
                # a batch of long sequences may not fit where shorter ones did: halve and retry
                self.halved += 1
                half = len(batch) // 2
                self.submit(batch[:half])
                self.submit(batch[half:])
                return
            for sample in batch:  # one bad batch fails its items, not the run
                self.progress.fail(
                    Failure(self.items[sample.index].image, "encode", f"{type(err).__name__}: {err}")
                )
                self.item_done(sample.index)
            return
        self._drain()
        self.pending = launched

    def flush(self) -> None:
        self._drain()

    def _launch(self, batch: list[Prepared]) -> tuple[Any, torch.Tensor, list[Prepared]]:
        cuda = self.device.type == "cuda"
        first = batch[0].pixels
        rows = max(len(batch), self.pad_to or 0)
        staging = torch.empty((rows, *first.shape), dtype=first.dtype, pin_memory=cuda)
        staging[len(batch) :].zero_()
        torch.stack([s.pixels for s in batch], out=staging[: len(batch)])
        pixels = staging.to(self.device, non_blocking=True)
        feats = self.encoder.encode_sequences(pixels) if self.sequence else self.encoder.encode_frames(pixels)
        feats = feats[: len(batch)]
        if not cuda:
            return None, feats, batch
        host = torch.empty(feats.shape, dtype=feats.dtype, pin_memory=True)
        host.copy_(feats, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return event, host, batch

    def _drain(self) -> None:
        if self.pending is None:
            return
        event, host, batch = self.pending
        self.pending = None
        if event is not None:
            event.synchronize()
        for row, sample in enumerate(batch):
            image = self.items[sample.index].image
            path = sidecar.sidecar_path(image)
            # clone: each sidecar owns exactly its rows; the batch buffer is reused by torch.
            self.writer.submit(path, host[row].clone(), sample.meta, (sample.index, path))


def _out_of_memory(err: BaseException) -> bool:
    oom = getattr(torch, "OutOfMemoryError", None)
    return (oom is not None and isinstance(err, oom)) or "out of memory" in str(err).lower()


def sample_items(items: Sequence[Item], k: int, seed: int | None = None) -> list[Item]:
    rng = random.Random(seed)
    return rng.sample(list(items), min(k, len(items)))
