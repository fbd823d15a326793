"""`vggtctl precompute ROOT --vggt-model M`: parse, call `vggtctl.precompute.run`, render."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import typer
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from vggtctl.cli import render
from vggtctl.distributed import (
    RELAUNCHED_ENV,
    DistInfo,
    announce_rank,
    dist_info,
    relaunch,
    report_exit_code,
)
from vggtctl.errors import EXIT_INTERRUPTED, EXIT_PARTIAL, EXIT_USAGE, VggtctlError
from vggtctl.failures import failures_path
from vggtctl.reporter import Reporter
from vggtctl.settings import find_config, warn_unknown_keys

if TYPE_CHECKING:  # the pipeline imports torch: only when the command runs
    from vggtctl.precompute import Outcome, Plan


class RichReporter(Reporter):
    """Progress bar on stderr: items/s, ETA, bytes written, failures."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.progress: Progress | None = None
        self.task = None

    def start(self, total: int, plan: Plan) -> None:
        if not self.enabled:
            return
        self.progress = Progress(
            TextColumn("[bold]encoding"),
            BarColumn(),
            MofNCompleteColumn(),
            TaskProgressColumn(),
            TextColumn("{task.fields[rate]}"),
            TextColumn("{task.fields[written]}"),
            TextColumn("{task.fields[failed]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=render.err,
            transient=False,
        )
        self.progress.start()
        self.task = self.progress.add_task("encode", total=total, rate="", written="", failed="")

    def set_total(self, total: int) -> None:
        if self.progress is not None:
            self.progress.update(self.task, total=total)

    def update(self, encoded: int, failed: int, nbytes: int) -> None:
        if self.progress is None:
            return
        task = self.progress.tasks[0]
        speed = task.speed or 0.0
        self.progress.update(
            self.task,
            completed=encoded + failed,
            rate=f"{speed:.1f} items/s",
            written=render.size(nbytes),
            failed=f"[red]{failed} failed[/]" if failed else "",
        )

    def message(self, text: str) -> None:
        render.err.print(text, markup=False, highlight=False, soft_wrap=True)

    def finish(self) -> None:
        if self.progress is not None:
            self.progress.stop()


def _plan_table(outcome: Outcome) -> Table:
    from vggtctl.keys import FeatureKey

    plan = outcome.plan
    table = render.table(title="precompute plan", show_header=False)
    table.add_column("what")
    table.add_column("value", justify="left" if render.plain() else "right")
    table.add_row("model", _model_label(outcome))
    table.add_row("layout", f"{plan.layout} ({escape(plan.layout_reason)})")
    table.add_row("context", FeatureKey.from_meta(outcome.feature_key).context.describe())
    table.add_row("items", f"{plan.items:,}")
    if plan.conflicts:
        table.add_row("conflicting histories", f"{plan.conflicts:,} (one sidecar per image: first item kept)")
    table.add_row("sidecars (one per image)", f"{plan.sidecars:,}")
    if plan.shard_items != plan.sidecars:
        table.add_row("in this process's shard", f"{plan.shard_items:,}")
    table.add_row("already valid", f"{plan.already_valid:,}")
    table.add_row("to encode", f"{plan.to_encode:,}")
    table.add_row("projected bytes", render.size(plan.projected_bytes))
    if plan.to_encode == 0:
        eta = "nothing to do"
    elif plan.projected_seconds is None:
        eta = "no rate measured yet"
    else:
        eta = render.duration(plan.projected_seconds)
    table.add_row("projected time", eta)
    if plan.to_encode and plan.batch_size:
        table.add_row("batch size", str(plan.batch_size))
        workers = f"{plan.decode_workers} per rank"
        if plan.decode_workers:
            workers += (
                f", prefetch {plan.decode_prefetch}, up to {render.size(plan.decode_in_flight_bytes)}"
                " of /dev/shm"
            )
        table.add_row("decode workers", workers + (" (reduced: see below)" if plan.decode_note else ""))
    if plan.missing_images or plan.catalog_problems:
        table.add_row(
            "catalog problems",
            f"{render.count(plan.catalog_problems, 'problem')}, "
            f"{render.count(plan.missing_images, 'missing image')}",
        )
    return table


def _model_label(outcome: Outcome) -> str:
    from vggtctl.keys import FeatureKey

    model = FeatureKey.from_meta(outcome.feature_key).model
    return f"{model.label}, layer {model.layer}, {model.attention}, {model.dtype}"


def _summary_table(outcome: Outcome, root: Path) -> Table:
    table = render.table(title="precompute summary", show_header=False)
    table.add_column("what")
    table.add_column("value", justify="left" if render.plain() else "right")
    table.add_row("model", _model_label(outcome))
    table.add_row("layout", f"{outcome.plan.layout} ({escape(outcome.plan.layout_reason)})")
    table.add_row("encoded", f"{outcome.encoded:,}")
    table.add_row("already valid", f"{outcome.plan.already_valid:,}")
    table.add_row("failed", f"{outcome.failed:,}")
    if outcome.not_written:
        table.add_row("not written (disk full)", f"{outcome.not_written:,}")
    if outcome.skipped_claimed:
        table.add_row("claimed by another process", f"{outcome.skipped_claimed:,}")
    table.add_row("written", render.size(outcome.bytes_written))
    if outcome.verified:
        table.add_row(
            "read back (--verify)",
            f"{render.count(outcome.verified, 'sidecar')}, {outcome.verify_problems:,} corrupt",
        )
    table.add_row("time", render.duration(outcome.seconds))
    table.add_row("rate", f"{outcome.rate:.2f} items/s" if outcome.encoded else "-")
    if outcome.ranks > 1:
        table.add_row("ranks", str(outcome.ranks))
    from vggtctl.precompute.stages import bottleneck

    if outcome.encoded and (reading := bottleneck(outcome.stage_seconds)):
        table.add_row("bound by", reading)
    if outcome.failed:
        table.add_row("failures listed in", str(failures_path(root)))
    if outcome.plan.unreadable_folders:
        table.add_row(
            "unreadable folders", f"{outcome.plan.unreadable_folders:,} (their images were not seen)"
        )
    return table


def _strip_gpus(argv: list[str]) -> list[str]:
    """The command line without --gpus, for the relaunched workers."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == "--gpus":
            skip = True
            continue
        if arg.startswith("--gpus="):
            continue
        out.append(arg)
    return out


def register(app: typer.Typer) -> None:
    @app.command("precompute")
    def precompute(
        root: Path | None = typer.Argument(
            None, help="Data root holding the training images (default: VGGTCTL_DATA_ROOT, data_root)."
        ),
        vggt_model: str | None = typer.Option(
            None, "--vggt-model", help="Checkpoint folder/file, Hub id from the local cache, or tiny-random."
        ),
        qwen_model: str | None = typer.Option(
            None, "--qwen-model", help="Qwen model folder: patch/merge sizes from its preprocessor config."
        ),
        preset: str | None = typer.Option(None, "--preset", help="vggt-crop-518 | vggt-pad-518 | janusvln."),
        layer: int | None = typer.Option(None, "--layer", help="Aggregator layer to cache (default -2)."),
        attention: str | None = typer.Option(
            None, "--attention", help="full | causal (default: causal with context, full without)."
        ),
        layout: str | None = typer.Option(None, "--layout", help="auto | episodes | annotations | plain."),
        annotations: list[str] | None = typer.Option(
            None, "--annotations", help="JSON/JSONL file (repeatable)."
        ),
        data_path: str | None = typer.Option(None, "--data-path", help="Base folder for annotation paths."),
        max_history: int | None = typer.Option(
            None,
            "--max-history",
            help="History frames per item (episodes layout; default: the root's current value, else 8).",
        ),
        context: str | None = typer.Option(None, "--context", help="auto | none | sequence."),
        evict_start: int | None = typer.Option(
            None,
            "--evict-start",
            help="Streaming eviction (causal sequences): the K/V cache keeps the first N frames "
            "(0 when only --evict-recent is given).",
        ),
        evict_recent: int | None = typer.Option(
            None,
            "--evict-recent",
            help="Streaming eviction (causal sequences): the K/V cache keeps the last N frames "
            "(0 when only --evict-start is given).",
        ),
        batch_size: int | None = typer.Option(
            None, "--batch-size", help="Items per forward (32 GPU, 4 CPU)."
        ),
        workers: int | None = typer.Option(
            None, "--workers", help="Decode workers per rank (from usable CPUs)."
        ),
        dtype: str | None = typer.Option(None, "--dtype", help="bfloat16 (GPU default) | float16 | float32."),
        device: str | None = typer.Option(None, "--device", help="cpu, cuda, cuda:N (default: auto)."),
        devices: str | None = typer.Option(
            None, "--devices", help="Comma list mapping local ranks to devices."
        ),
        gpus: int | None = typer.Option(
            None, "--gpus", help="Relaunch through torch's launcher with N workers."
        ),
        limit: int | None = typer.Option(None, "--limit", help="Encode at most N items."),
        force: bool | None = typer.Option(
            None, "--force", help="Re-encode items whose sidecar is already valid."
        ),
        verify: bool | None = typer.Option(
            None, "--verify", help="Full-read every written sidecar afterwards."
        ),
        dry_run: bool = typer.Option(False, "--dry-run", help="Show the plan only."),
        allow_download: bool | None = typer.Option(
            None, "--allow-download", help="Let a Hub id download weights."
        ),
        fsync: bool | None = typer.Option(None, "--fsync", help="fsync every sidecar before its rename."),
        compile_model: bool | None = typer.Option(
            None, "--compile", help="torch.compile the model blocks on GPU (~1 min warm-up, ~1.5x faster)."
        ),
        chunk_items: int | None = typer.Option(
            None,
            "--chunk-items",
            min=1,
            help="Items per claim chunk (64); processes sharing a root must use the same.",
        ),
        as_json: bool = typer.Option(False, "--json", help="Print one JSON document with the outcome."),
    ) -> None:
        """Compute VGGT features for every item under ROOT and write sidecars; resumable.

        Examples:

          vggtctl precompute /data/train --vggt-model facebook/VGGT-1B --gpus 8

          vggtctl precompute /data/train --vggt-model /models/VGGT-1B --preset janusvln --dry-run

          torchrun --nnodes 2 --nproc-per-node 8 ... -m vggtctl precompute /data/train --vggt-model M
        """
        info = dist_info()
        flags = {
            "vggt_model": vggt_model,
            "qwen_model": qwen_model,
            "preset": preset,
            "layer": layer,
            "attention": attention,
            "layout": layout,
            "annotations": annotations or None,
            "data_path": data_path,
            "max_history": max_history,
            "context": context,
            "evict_start": evict_start,
            "evict_recent": evict_recent,
            "batch_size": batch_size,
            "workers": workers,
            "dtype": dtype,
            "device": device,
            "devices": devices,
            "gpus": gpus,
            "limit": limit,
            "force": force,
            "verify": verify,
            "dry_run": dry_run,
            "allow_download": allow_download,
            "fsync": fsync,
            "compile": compile_model,
            "chunk_items": chunk_items,
        }
        try:
            _precompute(root, flags, as_json, dry_run, info)
        except KeyboardInterrupt:  # before run() began: importing torch, reading settings
            _interrupted_before_encoding(as_json, info)


def _precompute(
    root: Path | None, flags: dict[str, Any], as_json: bool, dry_run: bool, info: DistInfo
) -> None:
    from vggtctl.precompute import PrecomputeInterrupted, run
    from vggtctl.precompute.configure import gpu_count, options_from, resolve_root

    try:
        root = resolve_root(root)
        config = find_config(root)
        if info.is_main:
            warn_unknown_keys(config, lambda line: render.err.print(line, markup=False, soft_wrap=True))
        gpus_value = gpu_count(flags, config)
    except VggtctlError as err:
        _exit(_error(err), info)
    if gpus_value and gpus_value > 1 and not os.environ.get(RELAUNCHED_ENV) and "RANK" not in os.environ:
        with _sigterm_as_interrupt():
            raise typer.Exit(relaunch(gpus_value, _strip_gpus(sys.argv[1:])))
    announce_rank()  # under --gpus: Ctrl-C is passed to the ranks, not to torch's launcher
    try:
        opts = options_from(root, flags, config)
    except VggtctlError as err:
        _exit(_error(err), info)
    show = info.is_main and not as_json and sys.stderr.isatty()
    try:
        with _sigterm_as_interrupt():
            outcome = run(opts, RichReporter(enabled=show))
    except VggtctlError as err:
        _exit(_error(err), info)
    except PrecomputeInterrupted as stop:
        render.results_are_final()
        if info.is_main:
            _show(stop.outcome, root, as_json, dry_run=False)
            render.err.print("interrupted: in-flight writes finished; rerun to resume", markup=False)
        _exit(EXIT_INTERRUPTED, info)
    except KeyboardInterrupt:
        _interrupted_before_encoding(as_json, info)
    render.results_are_final()  # the run is recorded: a late Ctrl-C must not make it 130
    if info.is_main:
        _show(outcome, root, as_json, dry_run)
    _exit(exit_code(outcome), info)


def _interrupted_before_encoding(as_json: bool, info: DistInfo) -> NoReturn:
    if as_json and info.is_main:  # scripts parse stdout: still one document
        render.print_json({"interrupted": True, "encoded": 0, "before_encoding": True})
    render.err.print("interrupted before encoding started; nothing was written", markup=False)
    _exit(EXIT_INTERRUPTED, info)


def exit_code(outcome: Outcome) -> int:
    """0 when every item this run took on has a sidecar now, 3 (partial) otherwise; also 3 when
    folders could not be read (their images were never seen, so they cannot be covered). A root
    with no items at all never gets here: `run` stops it as a usage error (exit 2)."""
    if outcome.disk_full or outcome.verify_problems or outcome.failed or outcome.plan.unreadable_folders:
        return EXIT_PARTIAL
    return 0


def _show(outcome: Outcome, root: Path, as_json: bool, dry_run: bool) -> None:
    if as_json:
        render.print_json(outcome.to_dict())
    elif dry_run:
        render.out.print(_plan_table(outcome))
        if outcome.plan.decode_note:
            render.err.print(outcome.plan.decode_note, markup=False, soft_wrap=True)
    else:
        render.out.print(_summary_table(outcome, root))
    if outcome.disk_full:
        render.err.print(
            f"stopped: the disk is full ({outcome.disk_full}); free space and rerun to resume. "
            "Sidecars already written are complete; nothing partial was left behind.",
            markup=False,
            soft_wrap=True,
        )
    if outcome.settings_kept and (outcome.interrupted or outcome.disk_full):
        render.err.print(
            "note: this run's settings differ from the root's current ones and it did not finish, "
            "so the current ones stay (verify, status, prune and train still judge by them); a "
            "rerun with the same settings resumes and makes them current when it completes",
            markup=False,
            soft_wrap=True,
        )
    if outcome.verify_problems:
        render.err.print(f"{outcome.verify_problems} written sidecars failed the full read", markup=False)
    if outcome.plan.unreadable_folders:
        render.err.print(
            f"{outcome.plan.unreadable_folders} folders could not be read; their images were not "
            "encoded (listed above; fix their permissions and rerun)",
            markup=False,
            soft_wrap=True,
        )
    if outcome.failed:
        # soft_wrap: a path broken over two lines cannot be pasted
        render.err.print(
            f"{render.count(outcome.failed, 'item')} failed; see {failures_path(root)}",
            markup=False,
            soft_wrap=True,
        )


def _error(err: Exception) -> int:
    """Print a one-line error and return its exit code (not on a rank whose rank 0 prints the
    same error: one line per run, not one per rank)."""
    if getattr(err, "said_by_rank0", False):
        return getattr(err, "exit_code", EXIT_USAGE)
    render.err.print(f"error: {err}", markup=False, highlight=False, soft_wrap=True)
    return getattr(err, "exit_code", EXIT_USAGE)


def _exit(code: int, info: DistInfo) -> NoReturn:
    """Exit with `code`; a rank started by `--gpus` hands it to the parent instead."""
    raise typer.Exit(0 if report_exit_code(code, info) else code)


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (a scheduler's or torchrun's stop) ends the run like Ctrl-C: in-flight writes
    finish, claims are released, exit 130."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread (e.g. an embedding test runner)
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
