"""Classify every sidecar and temp file under a data root, in one walk (DESIGN §8).

`Auditor` takes the scan's per-folder listings as they stream in and classifies their sidecars
on a thread pool, reusing the listing's stat results (nothing is stat'ed twice; temp files are
judged by name and never opened). Only aggregates and problems are kept: a root with 10^7 valid
sidecars costs counters, not 10^7 objects. `status --deep`, `verify` and `prune` all start here.
"""

from __future__ import annotations

import bisect
import os
import stat
import threading
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

from vggtctl import manifest, scan
from vggtctl.catalog.base import Item, item_frames_for_key
from vggtctl.catalog.episodes import episode_histories
from vggtctl.keys import FeatureKey, checkpoint_fingerprint, is_random_model_name
from vggtctl.sidecar import (
    CHANGED_FRAME,
    Classification,
    Expectation,
    Verdict,
    changed_frame_reason,
    classify,
    other_context_settings,
)

DANGLING_IMAGE = "image is a dangling symbolic link (its source unmounted?)"
CHUNK = 32  # sidecars per pool task: amortizes task overhead on folders with many files

ProgressCallback = Callable[[int, int], None]  # (files classified, files found so far)


@dataclass(frozen=True)
class Problem:
    """One file that is not `valid`. `stamp` = (inode, size, mtime_ns) as scanned, so a
    deleter can tell whether the file changed since it was judged."""

    path: str
    verdict: Verdict
    reason: str
    bytes: int
    stamp: tuple[int, int, int] | None = None
    link: bool = False  # a symbolic link in a sidecar's place: reported, never deleted
    special: bool = False  # a socket, FIFO or device in a sidecar's place: reported, never deleted
    # its image is there but cannot be reached (a dangling link, a failed stat): an `orphan`
    # that may come back, so no prune category deletes it
    image_unreachable: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "verdict": self.verdict.value, "reason": self.reason, "bytes": self.bytes}


@dataclass
class VerdictStats:
    count: int = 0
    bytes: int = 0
    examples: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"count": self.count, "bytes": self.bytes, "examples": list(self.examples)}


@dataclass
class AuditReport:
    """Per verdict: count, bytes, example paths; every problem; optional per-group counts."""

    root: str | None = None
    full: bool = False
    examples: int = 5
    verdicts: dict[Verdict, VerdictStats] = field(
        default_factory=lambda: {v: VerdictStats() for v in Verdict}
    )
    problems: list[Problem] = field(default_factory=list)
    groups: dict[str, Counter[Verdict]] = field(default_factory=dict)
    group_bytes: dict[str, Counter[Verdict]] = field(default_factory=dict)
    images: int = 0
    unreadable: list[str] = field(default_factory=list)
    symlinked_dirs: list[str] = field(default_factory=list)
    expectation: str = ""

    # -- queries
    def count(self, verdict: Verdict) -> int:
        return self.verdicts[verdict].count

    def bytes(self, verdict: Verdict) -> int:
        return self.verdicts[verdict].bytes

    @property
    def files(self) -> int:
        """Sidecars and temp files judged."""
        return sum(s.count for s in self.verdicts.values())

    @property
    def problem_count(self) -> int:
        return sum(s.count for v, s in self.verdicts.items() if v is not Verdict.VALID)

    @property
    def unreachable_images(self) -> int:
        """Sidecars kept because their image is a dangling link or could not be stat'ed."""
        return sum(1 for p in self.problems if p.image_unreachable)

    @property
    def ok(self) -> bool:
        return self.problem_count == 0 and not self.unreadable

    # -- building
    def add(
        self,
        verdict: Verdict,
        path: str,
        nbytes: int,
        reason: str = "",
        *,
        group: str | None = None,
        stamp: tuple[int, int, int] | None = None,
        link: bool = False,
        special: bool = False,
        image_unreachable: bool = False,
    ) -> None:
        stats = self.verdicts[verdict]
        stats.count += 1
        stats.bytes += nbytes
        # the first paths in sorted order, not the first found: the checker threads finish in any
        # order, and two runs (or verify and prune) should show the same examples
        if len(stats.examples) < self.examples or (stats.examples and path < stats.examples[-1]):
            bisect.insort(stats.examples, path)
            del stats.examples[self.examples :]
        if verdict is not Verdict.VALID:
            self.problems.append(
                Problem(path, verdict, reason, nbytes, stamp, link, special, image_unreachable)
            )
        if group is not None:
            self.groups.setdefault(group, Counter())[verdict] += 1
            self.group_bytes.setdefault(group, Counter())[verdict] += nbytes

    def reclassify(
        self, path: str, old: Verdict, new: Verdict, reason: str, nbytes: int, *, group: str | None = None
    ) -> None:
        """Move one file to another verdict: how later checks (e.g. `verify --recompute`, which
        compares stored features with fresh ones) merge their findings into this report."""
        if old is new:
            return
        stats = self.verdicts[old]
        stats.count -= 1
        stats.bytes -= nbytes
        if path in stats.examples:
            stats.examples.remove(path)
        self.problems = [p for p in self.problems if p.path != path]
        if group is not None and group in self.groups:
            self.groups[group][old] -= 1
            self.group_bytes[group][old] -= nbytes
        self.add(new, path, nbytes, reason, group=group)

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "root": self.root,
            "mode": "full" if self.full else "header",
            "expectation": self.expectation,
            "images": self.images,
            "files": self.files,
            "problem_count": self.problem_count,
            "verdicts": {v.value: s.to_json() for v, s in self.verdicts.items()},
            "problems": [p.to_json() for p in sorted(self.problems, key=lambda p: p.path)],
            "unreadable": list(self.unreadable),
            "symlinked_dirs": list(self.symlinked_dirs),
        }
        if self.groups:
            doc["groups"] = {
                g: {
                    v.value: {"count": n, "bytes": self.group_bytes[g][v]}
                    for v, n in sorted(c.items(), key=lambda kv: kv[0].value)
                    if n
                }
                for g, c in sorted(self.groups.items())
            }
        return doc


def _stamp(st: os.stat_result) -> tuple[int, int, int]:
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def _image_stat(path: str) -> tuple[os.stat_result | None, str | None]:
    """(stat, None) for an image that is there; (None, None) when it is gone; (None, why) when
    its name is there but it cannot be reached: a dangling link, or a stat error other than
    ENOENT. Only a gone image makes an orphan that prune may delete."""
    try:
        return os.stat(path), None
    except FileNotFoundError:
        pass
    except OSError as err:
        return None, f"image cannot be read ({err.strerror or err})"
    try:
        linked = stat.S_ISLNK(os.lstat(path).st_mode)
    except OSError:
        return None, None
    return None, DANGLING_IMAGE if linked else None


class Auditor:
    """Feed it `scan.DirListing`s (e.g. as `scan.summarize(on_listing=auditor.feed)`), then
    call `report()`. Header reads by default; `full=True` reads and checks every tensor."""

    def __init__(
        self,
        expect: Expectation | None,
        *,
        full: bool = False,
        workers: int | None = None,
        examples: int = 5,
        group_of: Callable[[str], str] | None = None,
        progress: ProgressCallback | None = None,
        history: HistoryRule | None = None,
    ) -> None:
        self.expect = expect
        self.history = history
        self.full = full
        self.group_of = group_of
        self.progress = progress
        self._workers = workers or scan.default_workers()
        self._pool = ThreadPoolExecutor(max_workers=self._workers, thread_name_prefix="audit")
        # Back-pressure: a huge folder must not queue millions of tasks ahead of the pool.
        self._slots = threading.BoundedSemaphore(self._workers * 4)
        self._lock = threading.Lock()
        self._report = AuditReport(full=full, examples=examples)
        self._found = 0
        self._done = 0
        self._error: BaseException | None = None
        self._closed = False

    # -- feeding
    def feed(self, listing: scan.DirListing) -> None:
        """Judge every sidecar and temp file of one folder (sidecars on the pool)."""
        if self._closed:
            raise RuntimeError("Auditor.feed after report()")
        with self._lock:
            self._report.images += len(listing.images)
            if listing.error or listing.entry_errors:
                self._report.unreadable.extend(listing.unreadable())
            self._report.symlinked_dirs.extend(listing.symlinked_dirs)
            for name, st in listing.temps.items():
                path = os.path.join(listing.path, name)
                self._record(path, Verdict.TEMP, st, "temp file left by an interrupted write")
            self._found += len(listing.temps) + len(listing.sidecars)
            self._done += len(listing.temps)
        names = sorted(listing.sidecars)
        streamed = self.history.frames_by_image(listing) if self.history and names else {}
        for start in range(0, len(names), CHUNK):
            self._slots.acquire()
            try:
                self._pool.submit(self._classify_chunk, listing, names[start : start + CHUNK], streamed)
            except BaseException:
                self._slots.release()
                raise
        if listing.temps and self.progress is not None:
            self.progress(self._done, self._found)

    def _classify_chunk(
        self, listing: scan.DirListing, names: list[str], streamed: dict[str, tuple[str, ...]]
    ) -> None:
        try:
            lookup = listing.stat_lookup()
            results = []
            for name in names:
                path = os.path.join(listing.path, name)
                image_name = listing.image_of(name)
                image_stat = listing.images.get(image_name)
                unreachable = None
                if image_name in listing.dangling_images:
                    unreachable = DANGLING_IMAGE
                elif image_name in listing.entry_errors:
                    unreachable = f"image cannot be read ({listing.entry_errors[image_name]})"
                elif image_stat is None:
                    # Not listed: gone, or a name the scan does not count as an image (e.g.
                    # `.tif`). Ask the file system so such sidecars are never called orphans.
                    image_stat, unreachable = _image_stat(os.path.join(listing.path, image_name))
                if unreachable is not None:  # judged without opening it, like any orphan
                    results.append(
                        (Classification(path, Verdict.ORPHAN, unreachable), listing.sidecars[name], True)
                    )
                    continue
                frames = streamed.get(image_name)
                expect, gone = self.expect, None
                if frames is not None and self.expect is not None and self.history is not None:
                    expect, gone = self.history.expectation(self.expect, frames, lookup)
                result = classify(path, expect, full=self.full, image_stat=image_stat, stat_lookup=lookup)
                kept = False
                if result.verdict is Verdict.CONTEXT_MISMATCH and result.header is not None:
                    dangling = _dangling_frame(result.header.meta, listing)
                    if dangling is not None:
                        # the history frame's source is unmounted, not gone: like the frame's own
                        # sidecar, this one is kept and valid again once the source is back
                        why = f"context frame {dangling} is a dangling symbolic link (its source unmounted?)"
                        result, kept = replace(result, reason=why), True
                if (
                    not kept
                    and frames is not None
                    and result.verdict is Verdict.CONTEXT_MISMATCH
                    and self.history
                ):
                    meta = result.header.meta if result.header else None
                    recorded = meta["context"].get("frames") if meta else None
                    why = (
                        f"context frame {gone} is gone"
                        if gone
                        else self.history.explain(
                            recorded,
                            frames,
                            listing.path,
                            lookup,
                            meta=meta,
                            written_ns=listing.sidecars[name].st_mtime_ns,
                        )
                    )
                    result = replace(result, reason=why)
                results.append((result, listing.sidecars[name], kept))
            with self._lock:
                for result, st, unreachable_image in results:
                    self._record(result.path, result.verdict, st, result.reason, unreachable_image)
                self._done += len(results)
                done, found = self._done, self._found
            if self.progress is not None:
                self.progress(done, found)
        except BaseException as err:  # surfaced by report(); a bug must not vanish in a thread
            with self._lock:
                self._error = self._error or err
        finally:
            self._slots.release()

    def _record(
        self, path: str, verdict: Verdict, st: os.stat_result, reason: str, image_unreachable: bool = False
    ) -> None:
        group = self.group_of(path) if self.group_of is not None else None
        link = stat.S_ISLNK(st.st_mode)
        self._report.add(
            verdict,
            path,
            st.st_size,
            reason,
            group=group,
            stamp=_stamp(st),
            link=link,
            special=not link and not stat.S_ISREG(st.st_mode),
            image_unreachable=image_unreachable,
        )

    # -- result
    def report(self) -> AuditReport:
        """Wait for outstanding work and return the report (call once)."""
        if not self._closed:
            self._closed = True
            self._pool.shutdown(wait=True)
        if self._error is not None:
            raise self._error
        self._report.unreadable.sort()
        self._report.symlinked_dirs.sort()
        return self._report

    def close(self) -> None:
        """Stop early (e.g. on Ctrl-C): drop queued work."""
        self._closed = True
        self._pool.shutdown(wait=False, cancel_futures=True)


def audit(
    root: str | os.PathLike[str],
    expect: Expectation | None,
    *,
    full: bool = False,
    workers: int | None = None,
    progress: ProgressCallback | None = None,
    group_of: Callable[[str], str] | None = None,
    examples: int = 5,
    history: HistoryRule | None = None,
) -> AuditReport:
    """One walk of `root`, every sidecar and temp file classified."""
    auditor = Auditor(
        expect,
        full=full,
        workers=workers,
        examples=examples,
        group_of=group_of,
        progress=progress,
        history=history,
    )
    try:
        scan.summarize(root, workers=workers, on_listing=auditor.feed)
    except BaseException:
        auditor.close()
        raise
    report = auditor.report()
    report.root = os.fspath(root)
    report.expectation = describe(expect)
    if history is not None and has_model_check(expect):
        report.expectation += f", {history.describe()}"
    return report


# --------------------------------------------------------------------------- expectation


def resolve_checkpoint_file(spec: str) -> str:
    """The weights file behind `--vggt-model` (a file, a folder holding model.safetensors or
    model.pt, or a Hub id already in the local Hugging Face cache; never downloads).

    Delegates to the model package, so verify/prune fingerprint exactly the file precompute
    loaded; a bad spec raises CheckpointError (exit 2).
    """
    from vggtctl.model.checkpoint import resolve_weights

    return str(resolve_weights(spec, allow_download=False)[0])


def model_fingerprint(spec: str) -> str:
    """The fingerprint sidecars record for the model `spec` names (no weights are loaded)."""
    from vggtctl.errors import CheckpointError
    from vggtctl.model.checkpoint import RANDOM_PREFIX, TINY_RANDOM, TINY_RANDOM_FINGERPRINT

    if spec == TINY_RANDOM:
        return TINY_RANDOM_FINGERPRINT
    if spec.startswith(RANDOM_PREFIX):  # precompute takes it; a check has no file to hash
        raise CheckpointError(
            f"--vggt-model {spec}: a benchmark model of seeded random weights, without a checkpoint "
            "to fingerprint; leave --vggt-model out to judge by the key the root's manifest records"
        )
    return checkpoint_fingerprint(resolve_checkpoint_file(spec))


def expectation_from(root: str | os.PathLike[str], vggt_model: str | None = None) -> Expectation:
    """What `valid` means for this root: the manifest's current feature key (model, preprocess,
    context kind), its model replaced by the one `--vggt-model` names (by fingerprint: the
    checkpoint is not loaded); without a recorded key, only that model; without either, no
    model check (an empty Expectation: image freshness and context frames are still checked)."""
    key = manifest.load(root).current_key
    fingerprint = model_fingerprint(vggt_model) if vggt_model else None
    if key is None:
        return Expectation(model_fingerprint=fingerprint, model_name=vggt_model)
    if fingerprint is not None:
        return Expectation(
            model_fingerprint=fingerprint,
            model_name=vggt_model,
            preprocess_fingerprint=key.preprocess_fingerprint,
            preset=key.preset,
            context_kind=key.context.kind,
        )
    return Expectation(
        model=key.model,
        preprocess_fingerprint=key.preprocess_fingerprint,
        preset=key.preset,
        context_kind=key.context.kind,
    )


@dataclass(frozen=True)
class HistoryRule:
    """The history a trainer streams for each image: the episodes layout's rule with the
    recorded max_history. Checked per sidecar, a sidecar cached with another history (another
    --max-history) is a context-mismatch, as the trainer's preflight and FeatureStore see it;
    without the rule, a sidecar is only checked against the frames it names itself."""

    key: FeatureKey
    max_history: int

    def describe(self) -> str:
        return f"history of the episodes layout with max_history {self.max_history}"

    def frames_by_image(self, listing: scan.DirListing) -> dict[str, tuple[str, ...]]:
        return episode_histories(listing.path, listing.images, self.max_history)

    def expectation(
        self, base: Expectation, streamed: tuple[str, ...], lookup: Callable[[str], Any]
    ) -> tuple[Expectation, str | None]:
        """`base` with the item's context signature; and the first frame that is gone, if any."""
        try:
            signature = self.key.signature_for(item_frames_for_key(Item(streamed), lookup))
        except FileNotFoundError as err:
            gone = os.path.relpath(str(err.filename), os.path.dirname(streamed[-1]))
            return replace(base, context_signature="-", check_context_frames=False), gone
        return replace(base, context_signature=signature, check_context_frames=False), None

    def explain(
        self,
        header_frames: list[str] | None,
        streamed: tuple[str, ...],
        folder: str | None = None,
        lookup: Callable[[str], Any] | None = None,
        *,
        meta: dict[str, Any] | None = None,
        written_ns: int | None = None,
    ) -> str:
        """Why a sidecar's context differs from the history this rule streams, in one line.
        `meta` (the sidecar's header) tells eviction and attention apart from frame changes;
        `written_ns` (the sidecar file's mtime) dates it, so a changed frame can be named."""
        wanted = [os.path.relpath(p, os.path.dirname(streamed[-1])) for p in streamed]
        if header_frames is not None and folder is not None and lookup is not None:
            # a frame the sidecar was cached with is gone: the likely cause, and what the trainer's
            # store says too (the episode was re-indexed without it)
            for rel in header_frames:
                if isinstance(rel, str) and lookup(os.path.normpath(os.path.join(folder, rel))) is None:
                    return f"context frame {rel} is gone"
        streams = (
            f"the episodes layout with max_history {self.max_history} streams {len(wanted)} "
            f"({_history(len(wanted))} + current) for this step"
        )
        kind = ((meta or {}).get("context") or {}).get("kind", "sequence")
        if kind != "sequence":
            return f"context {kind!r} cached, 'sequence' wanted"
        if header_frames is not None and list(header_frames) != wanted:
            if len(header_frames) == len(wanted):
                got, want = next((a, b) for a, b in zip(header_frames, wanted, strict=True) if a != b)
                return f"cached with other history frames ({got} in place of {want}): {streams}"
            n = len(header_frames)
            return f"cached with {n} frames ({_history(n)} + current): {streams}"
        other = self._other_settings(meta)
        if other:
            return other
        if folder is not None and lookup is not None and header_frames is not None:
            return changed_frame_reason(list(header_frames), folder, lookup, written_ns)
        return CHANGED_FRAME

    def _other_settings(self, meta: dict[str, Any] | None) -> str | None:
        """Same frames, but another eviction or attention: the signature covers those too."""
        return other_context_settings(meta, self.key.context, self.key.model.attention)


def _history(frames: int) -> str:
    """How many history frames an item of `frames` frames (current included) streams, in words."""
    n = max(frames - 1, 0)
    return f"{n} history frame{'' if n == 1 else 's'}"


def _dangling_frame(meta: dict[str, Any], listing: scan.DirListing) -> str | None:
    """A frame the sidecar was cached with that is a dangling image link in its folder."""
    frames = meta.get("context", {}).get("frames")
    if not isinstance(frames, list) or not listing.dangling_images:
        return None
    for rel in frames:
        if isinstance(rel, str) and os.sep not in rel and rel in listing.dangling_images:
            return rel
    return None


def history_rule_from(root: str | os.PathLike[str]) -> HistoryRule | None:
    """The rule of the manifest's latest run, where it is the episodes layout with context."""
    loaded = manifest.load(root)
    key, settings = loaded.current_key, loaded.last_run_settings() or {}
    if key is None or key.context.kind != "sequence" or settings.get("layout") != "episodes":
        return None
    try:
        return HistoryRule(key, int(settings["max_history"]))
    except (KeyError, TypeError, ValueError):
        return None


def has_model_check(expect: Expectation | None) -> bool:
    return expect is not None and (expect.model is not None or expect.model_fingerprint is not None)


def describe(expect: Expectation | None) -> str:
    """One line saying what `valid` was checked against (shown by verify/prune)."""
    if not has_model_check(expect):
        return "no model check (pass --vggt-model, or run precompute to record the model in the manifest)"
    assert expect is not None
    parts = []
    if expect.model is not None:
        m = expect.model
        parts.append(f"model {m.label} {m.fingerprint[:12]} layer {m.layer} {m.attention} {m.dtype}")
    elif expect.model_name:
        name = expect.model_name
        if is_random_model_name(name):
            name += " (random weights: features are meaningless)"
        parts.append(f"model {name} {str(expect.model_fingerprint)[:12]}")
    else:
        parts.append(f"model {str(expect.model_fingerprint)[:12]}")
    if expect.preprocess_fingerprint:
        parts.append(f"preprocess {expect.preprocess_fingerprint[:12]}")
    if expect.context_kind:
        parts.append(f"context {expect.context_kind}")
    return ", ".join(parts)


def problems_in(report: AuditReport, verdicts: Iterable[Verdict]) -> list[Problem]:
    wanted = set(verdicts)
    return [p for p in report.problems if p.verdict in wanted]
