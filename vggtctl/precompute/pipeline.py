"""`run`: plan, then decode -> encode -> write across ranks, then record the outcome."""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import os
import threading
import time
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any, NoReturn

import torch
from torch.utils.data import DataLoader

from vggtctl import sidecar
from vggtctl.catalog import Catalog, Item, load_catalog
from vggtctl.claims import ClaimBook, claims_dir, file_system_now_ns
from vggtctl.data import FeatureStore
from vggtctl.distributed import (
    DistInfo,
    broadcast_object,
    close_group,
    dist_info,
    gather_objects,
    init_group,
    pick_device,
)
from vggtctl.errors import ConfigError
from vggtctl.failures import Failure, FailureLog
from vggtctl.keys import FeatureKey
from vggtctl.precompute.gpu import GpuPipeline
from vggtctl.precompute.loading import (
    ClaimingSampler,
    Failed,
    ItemDataset,
    Prepared,
    _identity,
)
from vggtctl.precompute.notices import catalog_notices, settings_notice
from vggtctl.precompute.options import (
    Outcome,
    Plan,
    PrecomputeInterrupted,
    PrecomputeOptions,
    check_options,
)
from vggtctl.precompute.planning import (
    ARCHIVE_BYTES,
    build_encoder,
    changed_settings,
    context_settings,
    first_decoded,
    input_bytes,
    needs_encoding,
    plan_run,
    recorded_max_history,
    rewritten_since,
    sidecar_bytes,
    task_items,
)
from vggtctl.rankprogress import RankAggregator, final_counts, remove_run_dir, run_dir
from vggtctl.reporter import Reporter
from vggtctl.sidecar import Verdict
from vggtctl.wording import shown
from vggtctl.writer import DISK_FULL_ERRNOS, DiskFullSkipped, SidecarWriter

# --------------------------------------------------------------------------- the run


class RunCounters:
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
    check_options(opts)
    if opts.max_history is None:  # a run that names none resumes with the root's
        opts = dataclasses.replace(opts, max_history=recorded_max_history(root))
    # --force re-encodes what was there when the run began, not what a concurrent run (another
    # --force on a second node, say) wrote for this key since: that is fresh by definition.
    # Taken before the catalog walk and the model load, which can take minutes on 10^7 items.
    forced_since = file_system_now_ns(root) if opts.force and not opts.dry_run else None
    grouped = init_group(info)
    try:
        catalog = shared_catalog(opts, info)
        if not catalog.items:
            _no_items(opts, catalog, info, reporter)
        device = pick_device(opts.device, info, opts.devices)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        encoder, preset = build_encoder(opts, catalog.context_kind, device)
        key: FeatureKey = encoder.feature_key(context_settings(opts, catalog.context_kind))
        probe = first_decoded(preset, [item.image for item in catalog.items[:3]])
        frames = max((len(item.frames) for item in catalog.items[:64]), default=1)
        plan, items, mine, todo, store = plan_run(
            opts,
            catalog,
            key,
            info,
            sidecar_bytes(encoder, probe),
            input_bytes(probe, frames if key.context.kind == "sequence" else 1),
            device,
        )
        outcome = Outcome(plan=plan, feature_key=key.to_meta(), ranks=info.world_size)
        if opts.compile and device.type != "cuda" and info.is_main:
            reporter.message("note: --compile applies on a GPU only; this run on the CPU is eager")
        if info.is_main:  # a dry run is where they matter most
            changes = changed_settings(opts.root, key, catalog.layout, opts.max_history)
            for line in settings_notice(changes, opts.limit is not None) + catalog_notices(
                catalog, opts.root, items
            ):
                reporter.message(shown(line))
        if opts.dry_run:
            if grouped:
                _merge_plans(outcome, info)
            return outcome
        _execute(
            opts,
            catalog,
            items,
            mine,
            todo,
            store,
            encoder,
            preset,
            key,
            device,
            info,
            outcome,
            reporter,
            forced_since,
        )
        return outcome
    finally:
        if grouped:
            close_group()


def _no_items(opts: PrecomputeOptions, catalog: Catalog, info: DistInfo, reporter: Reporter) -> NoReturn:
    """Stop a run whose catalog is empty before it loads a model or writes anything.

    A wrong root, layout or annotation file, or an unmounted share: a usage error (exit 2), not
    a finished run, and nothing is recorded (a manifest entry would say the root was processed).
    What the catalog left out, and why, comes first: it is usually the reason.
    """
    if info.is_main:
        for line in catalog_notices(catalog, opts.root, []):
            reporter.message(shown(line))
    error = ConfigError(f"no items found under {opts.root} ({catalog.layout}: {catalog.reason})")
    error.said_by_rank0 = not info.is_main  # every rank stops; rank 0 says why, once
    raise error


def shared_catalog(opts: PrecomputeOptions, info: DistInfo) -> Catalog:
    """The run's catalog: rank 0 walks the tree and the other ranks receive its result.

    DESIGN §8: a tree is never walked twice; eight ranks per node listing one NFS tree at once
    would multiply the metadata load on the server for an identical result (the shards must be
    cut from the same catalog anyway). Rank 0's error reaches every rank, so all of them stop
    with the same message instead of waiting for a catalog that never comes.
    """

    def build() -> Catalog:
        return load_catalog(
            Path(opts.root),
            opts.layout,
            annotations=opts.annotations,
            data_path=opts.data_path,
            max_history=opts.max_history,
            context=opts.context,
        )

    if not info.is_distributed:
        return build()
    if info.is_main:
        try:
            catalog = build()
        except Exception as err:
            broadcast_object(("error", str(err)), info)
            raise
        broadcast_object(("catalog", catalog), info)
        return catalog
    kind, value = broadcast_object(None, info)
    if kind == "error":
        raise ConfigError(f"{value} (reported by rank 0)")
    return value


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
    forced_since: int | None,
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
    progress = RunCounters(rank_reporter, failures, keep_paths=opts.verify)
    todo_set = set(todo)
    my_chunks = [(cid, [i for i in idx if i in todo_set]) for cid, idx in mine]
    my_chunks = [(cid, idx) for cid, idx in my_chunks if idx]

    start = time.perf_counter()
    try:
        rank_reporter.start(len(todo), outcome.plan)
        _encode_all(
            opts,
            items,
            my_chunks,
            store,
            encoder,
            key,
            preset,
            device,
            claims,
            progress,
            outcome,
            forced_since,
        )
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

    recorded = False
    if not outcome.interrupted:
        # A Ctrl-C here (a long --verify read-back, rank 0 waiting for slower ranks in the
        # gather) is still an interrupted run that wrote sidecars: it takes the path below.
        try:
            if opts.verify and progress.written_paths:
                outcome.verify_problems = sum(
                    sidecar.classify(p, full=True).verdict is Verdict.CORRUPT for p in progress.written_paths
                )
                outcome.verified = len(progress.written_paths)
            if info.is_distributed:
                _merge_ranks(outcome, info)
            if info.is_main:
                if info.is_distributed:
                    reporter.update(outcome.encoded, outcome.failed, outcome.bytes_written)
                    reporter.finish()
                    remove_run_dir(root, run_id)  # every rank has published its last counts
                recorded = True
                _record_manifest(opts, outcome, key)
            return
        except KeyboardInterrupt:
            outcome.interrupted = True
    if info.is_main:
        if info.is_distributed:
            _merge_interrupted(outcome, root, run_id, info)
            reporter.update(outcome.encoded, outcome.failed, outcome.bytes_written)
            reporter.finish()
        if not recorded:
            _record_manifest(opts, outcome, key)
    raise PrecomputeInterrupted(outcome)


def _merge_interrupted(outcome: Outcome, root: Path, run_id: str, info: DistInfo) -> None:
    """Rank 0 of an interrupted run sums what every rank published when its loop ended (no
    collective: a rank may be gone). The run's folder is removed once all ranks are in."""
    counts, complete = final_counts(run_dir(root, run_id), info.world_size)
    outcome.per_rank = [int(c.get("encoded", 0)) for c in counts]
    outcome.encoded = sum(outcome.per_rank)
    outcome.failed = sum(int(c.get("failed", 0)) for c in counts)
    outcome.bytes_written = sum(int(c.get("bytes", 0)) for c in counts)
    if complete:
        remove_run_dir(root, run_id)


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
            outcome.stage_seconds,
            outcome.verified,
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
    outcome.verified = sum(p[8] for p in parts)
    stages = {name for p in parts for name in p[7]}
    outcome.stage_seconds = {
        name: round(sum(p[7].get(name, 0.0) for p in parts), 3) for name in sorted(stages)
    }


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
        "evict_start": opts.evict_start,
        "evict_recent": opts.evict_recent,
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
        "stage_seconds": dict(outcome.stage_seconds),
    }
    # The key becomes the root's current one only when the run has sidecars for it: a run whose
    # every item failed (a wrong --layout picking stray images, an unreadable share) would
    # otherwise make every existing sidecar "model-changed" for verify and prune.
    current = key if outcome.encoded or outcome.plan.already_valid else None
    # A --limit run over a root whose current settings differ is a trial (one image with another
    # preset, say): made current, it would turn every other sidecar into a mismatch, which the
    # next `prune --all-invalid` deletes. So is a run with other settings that did not finish
    # (Ctrl-C, a preempted job, a full disk): the likeliest reason to stop a run seconds in is
    # the wrong checkpoint, and the routine `prune --model-changed` after it would delete the
    # whole, intended cache. Its rerun resumes and makes the settings current when it finishes.
    # The first run on a root, or one with the same settings, is recorded as usual.
    unfinished = opts.limit is not None or outcome.interrupted or bool(outcome.disk_full)
    if (
        current is not None
        and unfinished
        and changed_settings(opts.root, key, outcome.plan.layout, opts.max_history)
    ):
        current = None
        outcome.settings_kept = True
    with contextlib.suppress(OSError):
        manifest.record_run(opts.root, entry, current)


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
    progress: RunCounters,
    outcome: Outcome,
    forced_since: int | None,
) -> None:
    """Claim, decode, encode and write this rank's chunks. KeyboardInterrupt propagates after
    the in-flight writes have finished (the claims are released by the caller)."""
    if not chunks:
        return
    cuda = device.type == "cuda"
    plan = outcome.plan
    batch_size = plan.batch_size
    info = dist_info()
    stop = threading.Event()
    tracker = _ChunkTracker(claims)

    def recheck(indices: list[int]) -> list[int]:
        if opts.force:
            if forced_since is None:
                return indices
            return [i for i in indices if not rewritten_since(store, items[i], forced_since)]
        return [i for i in indices if needs_encoding(store, items[i])]

    def on_written(token: Any, nbytes: int | None, error: BaseException | None) -> None:
        index, path = token
        if error is None and nbytes is not None:
            progress.wrote(path, nbytes)
        elif isinstance(error, DiskFullSkipped) or getattr(error, "errno", None) in DISK_FULL_ERRNOS:
            progress.skipped()  # not this item's fault (the write that hit the full disk neither)
        else:
            reason = getattr(error, "strerror", None) or str(error)
            progress.fail(
                Failure(items[index].image, "write", f"cannot write {os.path.basename(path)}: {reason}")
            )
        tracker.done(index)

    if plan.decode_note and info.local_rank == 0:
        progress.reporter.message(plan.decode_note)
    sampler = ClaimingSampler(chunks, claims, task_items(batch_size), recheck, tracker.started, stop)
    loader = DataLoader(
        ItemDataset(items, preset, key),
        batch_sampler=sampler,
        num_workers=plan.decode_workers,
        collate_fn=_identity,
        pin_memory=False,  # samples are dataclasses; the staging buffer in _launch is pinned
        prefetch_factor=plan.decode_prefetch,
        persistent_workers=False,
    )
    writer = SidecarWriter(on_written, threads=opts.writer_threads, fsync=opts.fsync)
    pipeline = GpuPipeline(
        encoder, key.context.kind == "sequence", device, writer, items, progress, tracker.done
    )
    if opts.compile and cuda:
        pipeline.pad_to = batch_size  # one compiled shape: no recompiles for the last, short batch
        if info.local_rank == 0:  # progress stands still meanwhile: say why, once a node
            progress.reporter.message("compiling the model on the first batch (about a minute)")
    buckets: dict[tuple[int, ...], list[Prepared]] = defaultdict(list)
    claims.keep_alive()
    batches = iter(loader)  # the decode workers start here
    if not pipeline.sequence:  # fixed batch shapes: the pinned blocks they need are known
        rows = pipeline.pad_to or batch_size
        pipeline.warm_host_pool(
            rows * plan.input_bytes_per_item, rows * max(0, plan.bytes_per_item - ARCHIVE_BYTES)
        )
    gc.freeze()  # the model, the catalog and torch itself: long-lived, see GpuPipeline.submit
    clock = pipeline.clock
    try:
        while True:
            with clock("wait_decode"):
                loaded = next(batches, None)
            claim_error = sampler.claim_error
            if claim_error is not None and claim_error.errno in DISK_FULL_ERRNOS:
                writer.mark_disk_full(f"{claim_error.filename}: {claim_error.strerror or claim_error}")
            if loaded is None:
                break
            for sample in loaded:
                if isinstance(sample, Failed):
                    progress.fail(sample.failure)
                    tracker.done(sample.index)
                    continue
                bucket = buckets[sample.batch_key]
                bucket.append(sample)
                if len(bucket) >= batch_size:
                    pipeline.submit(bucket[:batch_size])
                    del bucket[:batch_size]
            if writer.disk_full.is_set():
                stop.set()
                break
        if not stop.is_set() and not writer.disk_full.is_set():
            for bucket in buckets.values():
                for start in range(0, len(bucket), batch_size):
                    pipeline.submit(bucket[start : start + batch_size])
            pipeline.flush()
        if sampler.claim_error is not None and not writer.disk_full.is_set():
            err = sampler.claim_error
            raise ConfigError(
                f"{err.filename}: cannot write this claim ({err.strerror or err}); the chunks "
                "claimed before it were encoded, the rest were not: fix the data root's "
                ".vggtctl folder and rerun to resume"
            )
    except KeyboardInterrupt:
        stop.set()
        # the batches already computed are written (a second Ctrl-C skips them); a failed
        # handoff was already counted per item and must not turn the interrupt into an error
        with contextlib.suppress(Exception):
            pipeline.flush()
        raise
    finally:
        del batches  # stops the decode workers now, not when a traceback lets go of this frame
        try:
            pipeline.stop()  # queued batches are handed off first
        finally:
            # also after a second Ctrl-C in stop(): the counts and the claims' release below
            # must come after the last write
            writer.close()
        gc.unfreeze()
        outcome.stage_seconds = clock.report(writer.blocked_seconds)
        outcome.skipped_claimed = sampler.skipped_claimed
        if writer.disk_full.is_set():
            outcome.disk_full = writer.disk_full_message
