"""One parallel walk of a data root (DESIGN §8): every relevant file stat'ed exactly once,
directory symlinks never followed, unreadable folders reported not fatal.

Two ways to walk, one listing function (`list_dir`):

- `walk` streams one `DirListing` per folder from a thread pool, so consumers that need the
  per-file stats (audit, prune, `status --deep`) can work on a 10^7-file tree without holding it.
  Threads hide file-system latency (NFS), but per-file Python work is serialized by the GIL.
- `summarize` without `on_listing` only needs per-row sums, so it splits the tree into
  subtrees and folds them in worker processes, which use every core on a warm cache and keep
  the parent's memory flat. Each worker still runs threads when `workers` exceeds the processes.
"""

from __future__ import annotations

import contextlib
import gc
import multiprocessing
import os
import queue
import signal
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from stat import S_ISDIR, S_ISLNK, S_ISREG
from typing import Protocol, TypeVar

from vggtctl.distributed import usable_cpus
from vggtctl.names import SUFFIX, TEMP_MARK, is_temp_name

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp"})
PRIVATE_DIR = ".vggtctl"  # run state (failures, claims) inside a data root; never scanned
_SUFFIX_LEN = len(SUFFIX)


def is_image_name(name: str) -> bool:
    """An image by extension (case-insensitive); a name that is only an extension is not."""
    dot = name.rfind(".")
    return dot > 0 and name[dot:].lower() in IMAGE_EXTENSIONS


def cpu_count() -> int:
    return usable_cpus()


def default_workers() -> int:
    """Threads for metadata I/O: NFS latency, not CPU, is the limit, so go well past the cores."""
    return min(32, 4 * cpu_count())


def default_processes() -> int:
    """Processes for `summarize`: per-file work is CPU-bound on a warm cache, so one per core."""
    return max(1, min(8, cpu_count()))


@dataclass
class DirListing:
    """One folder: its images, sidecars and temp files with their stat results."""

    path: str
    images: dict[str, os.stat_result] = field(default_factory=dict)
    sidecars: dict[str, os.stat_result] = field(default_factory=dict)
    temps: dict[str, os.stat_result] = field(default_factory=dict)
    subdirs: list[str] = field(default_factory=list)
    symlinked_dirs: list[str] = field(default_factory=list)
    error: str | None = None
    # sidecars' "images" that are files of another kind (x.tif, readme.txt): not orphans
    non_image_owners: set[str] = field(default_factory=set)
    # image-named symbolic links whose target is missing (its source unmounted?): their
    # sidecars are not orphans, the image may come back
    dangling_images: set[str] = field(default_factory=set)
    # entries whose stat failed (ELOOP, EACCES, EIO): name -> reason; the rest is still listed
    entry_errors: dict[str, str] = field(default_factory=dict)

    def image_of(self, sidecar_name: str) -> str:
        return sidecar_name[: -len(SUFFIX)]

    def unreadable(self) -> list[str]:
        """'PATH: REASON' for the folder (when it could not be listed) and each failed entry."""
        found = [self.error] if self.error else []
        if self.entry_errors:
            prefix = self.path if self.path.endswith(os.sep) else self.path + os.sep
            found.extend(f"{prefix}{name}: {why}" for name, why in self.entry_errors.items())
        return found

    def image_unreachable(self, image_name: str) -> bool:
        """The image is there as a name but cannot be reached: a dangling link, a failed stat."""
        return image_name in self.dangling_images or image_name in self.entry_errors

    def orphans(self) -> list[str]:
        """Sidecars whose image is not in this folder (a file the scan does not count as an
        image, `x.tif` say, still owns its sidecar: `classify` asks the file system too; so
        does an image that is a dangling link or could not be stat'ed)."""
        return [
            name
            for name in self.sidecars
            if (image := self.image_of(name)) not in self.images
            and image not in self.non_image_owners
            and not self.image_unreachable(image)
        ]

    def stat_lookup(self) -> Callable[[str], os.stat_result | None]:
        """A stat function answering from this listing for files in this folder."""
        folder = os.path.normpath(self.path)

        def lookup(path: str) -> os.stat_result | None:
            head, name = os.path.split(path)
            if (head == folder or os.path.normpath(head) == folder) and name in self.images:
                return self.images[name]
            try:  # another folder, or a file the listing does not stat (e.g. a .tif frame)
                return os.stat(path)
            except OSError:
                return None

        return lookup


_SCANDIR_FD = os.scandir in os.supports_fd
_DIR_FLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0)


def list_dir(path: str) -> DirListing:
    """Scan one folder. Images are stat'ed through symlinks (datasets link images); our own
    files are stat'ed without following, so nothing is ever judged through a link.

    This loop runs once per file on 10^7 files: the name tests are ordered by frequency and
    use only C-level string methods, other files (labels, videos) are never stat'ed, and the
    folder is opened as a descriptor so each stat is relative to it (no path walk per file).
    """
    listing = DirListing(path)
    images, sidecars, temps = listing.images, listing.sidecars, listing.temps
    others: set[str] = set()  # names of other files, to tell an orphan from a .tif's sidecar
    prefix = path if path.endswith(os.sep) else path + os.sep
    fd = -1
    try:
        if _SCANDIR_FD:
            fd = os.open(path, _DIR_FLAGS)
        with os.scandir(fd if fd >= 0 else path) as entries:
            for entry in entries:
                name = entry.name
                try:
                    if entry.is_dir(follow_symlinks=False):
                        if name != PRIVATE_DIR:
                            listing.subdirs.append(prefix + name)
                    elif name.endswith(SUFFIX):
                        if len(name) > _SUFFIX_LEN:
                            sidecars[name] = entry.stat(follow_symlinks=False)
                    elif (dot := name.rfind(".")) > 0 and name[dot:].lower() in IMAGE_EXTENSIONS:
                        try:  # is_image_name, inlined
                            st = entry.stat()
                        except FileNotFoundError:
                            if entry.is_symlink():  # a link into a source that is not there now
                                listing.dangling_images.add(name)
                            continue
                        if S_ISREG(st.st_mode):
                            images[name] = st
                        elif S_ISDIR(st.st_mode):  # a link to a folder that is named like an image
                            listing.symlinked_dirs.append(prefix + name)
                    elif TEMP_MARK in name:
                        if is_temp_name(name):
                            temps[name] = entry.stat(follow_symlinks=False)
                    elif entry.is_symlink() and entry.is_dir():
                        listing.symlinked_dirs.append(prefix + name)
                    else:
                        others.add(name)
                except FileNotFoundError:
                    continue  # vanished between readdir and stat, or a dangling link
                except OSError as err:  # this entry only: the rest of the folder is still listed
                    listing.entry_errors[name] = err.strerror or str(err)
    except OSError as err:
        listing.error = f"{path}: {err.strerror or err}"
    finally:
        if fd >= 0:
            os.close(fd)
    if others:
        cut = -_SUFFIX_LEN
        listing.non_image_owners = {n[:cut] for n in sidecars if n[:cut] not in images and n[:cut] in others}
    return listing


class _Listing(Protocol):
    subdirs: list[str]


ListingT = TypeVar("ListingT", bound=_Listing)


def threaded_walk(
    roots: Iterable[str], lister: Callable[[str], ListingT], workers: int, name: str = "scan"
) -> Iterator[ListingT]:
    """`lister(folder)` for every folder under each of `roots` (roots included), on a thread
    pool, yielded as they finish; each listing's `subdirs` are queued as soon as it arrives.
    Shared by the scan (stats) and the catalog (names only)."""
    results: queue.Queue[ListingT | BaseException] = queue.Queue()

    def task(path: str) -> None:
        try:
            results.put(lister(path))
        except BaseException as err:  # surface bugs instead of hanging the walk
            results.put(err)

    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix=name) as pool:
        outstanding = 0
        for path in roots:
            pool.submit(task, path)
            outstanding += 1
        while outstanding:
            item = results.get()
            outstanding -= 1
            if isinstance(item, BaseException):
                raise item
            for sub in item.subdirs:
                outstanding += 1
                pool.submit(task, sub)
            yield item


def _walk_serial(roots: Iterable[str]) -> Iterator[DirListing]:
    """The same walk on the calling thread: no queue hand-off for the single-thread case."""
    stack = list(roots)
    while stack:
        listing = list_dir(stack.pop())
        stack.extend(reversed(listing.subdirs))
        yield listing


def walk(root: str | os.PathLike[str], workers: int | None = None) -> Iterator[DirListing]:
    """Yield a DirListing per folder under `root` (root included), in no particular order."""
    return threaded_walk([os.fspath(root)], list_dir, workers or default_workers())


# --------------------------------------------------------------------------- summaries


@dataclass
class DirStats:
    """Aggregates of one row of `vggtctl status` (a folder at the chosen depth)."""

    name: str
    folders: int = 0
    images: int = 0
    cached: int = 0
    orphans: int = 0
    linked_orphans: int = 0  # of the orphans, symbolic links named like sidecars (never pruned)
    dangling: int = 0  # sidecars whose image is a dangling symbolic link: not orphans, never pruned
    temps: int = 0
    image_bytes: int = 0
    image_disk: int = 0
    sidecar_bytes: int = 0
    sidecar_disk: int = 0
    temp_bytes: int = 0

    @property
    def missing(self) -> int:
        return self.images - self.cached

    @property
    def coverage(self) -> float:
        return self.cached / self.images if self.images else 1.0

    @property
    def sidecars(self) -> int:
        return self.cached + self.orphans + self.dangling

    def add(self, other: DirStats) -> None:
        for attr in _COUNTERS:
            setattr(self, attr, getattr(self, attr) + getattr(other, attr))

    def to_dict(self) -> dict[str, object]:
        data: dict[str, object] = {k: v for k, v in self.__dict__.items()}
        data.update(missing=self.missing, coverage=round(self.coverage, 6))
        return data


_COUNTERS = tuple(f.name for f in fields(DirStats) if f.name != "name")


ScanProgress = Callable[[int, int], None]  # (folders listed, files counted) so far


@dataclass
class ScanSummary:
    root: str
    depth: int
    rows: dict[str, DirStats]
    total: DirStats
    unreadable: list[str]
    symlinked_dirs: list[str]


def _disk(st: os.stat_result) -> int:
    return getattr(st, "st_blocks", 0) * 512 or st.st_size


def group_of(root: str, folder: str, depth: int) -> str:
    """The row a folder belongs to: its first `depth` path components under root ('.' = root)."""
    rel = os.path.relpath(folder, root)
    if rel == "." or depth <= 0:
        return "."
    return "/".join(rel.split(os.sep)[:depth])


def listing_stats(listing: DirListing, name: str) -> DirStats:
    stats = DirStats(name=name, folders=1)
    images = listing.images
    stats.images = len(images)
    for st in images.values():
        stats.image_bytes += st.st_size
        stats.image_disk += _disk(st)
    cut = -_SUFFIX_LEN
    for sidecar_name, st in listing.sidecars.items():
        if sidecar_name[:cut] in images:
            stats.cached += 1
        elif sidecar_name[:cut] in listing.dangling_images:
            stats.dangling += 1
        elif (
            sidecar_name[:cut] not in listing.non_image_owners
            and sidecar_name[:cut] not in listing.entry_errors
        ):
            # a sidecar next to a file the scan does not count as an image (x.tif, readme.txt)
            # is no orphan: classify asks the file system too, and prune --orphans agrees
            stats.orphans += 1
            stats.linked_orphans += S_ISLNK(st.st_mode)
        stats.sidecar_bytes += st.st_size
        stats.sidecar_disk += _disk(st)
    stats.temps = len(listing.temps)
    stats.temp_bytes = sum(st.st_size for st in listing.temps.values())
    return stats


@dataclass
class _Partial:
    """What one fold (a worker's share, or the parent's own listings) contributes."""

    rows: dict[str, DirStats] = field(default_factory=dict)
    unreadable: list[str] = field(default_factory=list)
    symlinked: list[str] = field(default_factory=list)
    folders: int = 0
    files: int = 0  # images, sidecars and temps (for progress)

    def fold(self, listing: DirListing, row_name: str) -> None:
        if listing.error or listing.entry_errors:
            self.unreadable.extend(listing.unreadable())
        self.symlinked.extend(listing.symlinked_dirs)
        row = self.rows.get(row_name)
        if row is None:
            row = self.rows[row_name] = DirStats(name=row_name)
        stats = listing_stats(listing, row_name)
        row.add(stats)
        self.folders += 1
        self.files += stats.images + stats.sidecars + stats.temps

    def merge(self, other: _Partial) -> None:
        for name, stats in other.rows.items():
            row = self.rows.get(name)
            if row is None:
                self.rows[name] = stats
            else:
                row.add(stats)
        self.unreadable.extend(other.unreadable)
        self.symlinked.extend(other.symlinked)
        self.folders += other.folders
        self.files += other.files


def _fold_subtrees(job: tuple[str, list[str], int, int]) -> _Partial:
    """Worker-process task: walk whole subtrees and return only their per-row sums."""
    root, paths, depth, threads = job
    partial = _Partial()
    listings = _walk_serial(paths) if threads <= 1 else threaded_walk(paths, list_dir, threads)
    for listing in listings:
        partial.fold(listing, group_of(root, listing.path, depth))
    return partial


def _init_worker() -> None:
    # Ctrl-C reaches the whole process group; the parent alone reports it (exit 130).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # A worker allocates millions of acyclic objects (stat results, names): the cycle
    # collector would only re-traverse them, and the heap inherited from the parent.
    gc.disable()


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause the cycle collector for an allocation-heavy walk that creates no cycles (about
    5-10% of a large scan), restoring whatever state the caller had."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _fork_context() -> multiprocessing.context.BaseContext | None:
    """fork is cheap and needs no re-import of the caller's program, but is unsafe once other
    threads exist; then (and where there is no fork) the walk stays in this process. Spawned
    workers would re-import the caller's main module, a surprise for a library call."""
    if "fork" in multiprocessing.get_all_start_methods() and threading.active_count() == 1:
        return multiprocessing.get_context("fork")
    return None


# The parent lists folders breadth-first until it has this many subtrees per process to hand
# out (or has seen enough files that the remaining subtrees are worth a process).
_SUBTREES_PER_PROCESS = 8
_SERIAL_FILE_BUDGET = 20_000


def _summarize_parallel(
    root: str, depth: int, processes: int, workers: int, progress: ScanProgress | None
) -> _Partial:
    partial = _Partial()
    frontier: deque[str] = deque([root])
    seen = 0
    while frontier and len(frontier) < processes * _SUBTREES_PER_PROCESS:
        if seen > _SERIAL_FILE_BUDGET and len(frontier) >= 2:
            break
        listing = list_dir(frontier.popleft())
        seen += len(listing.images) + len(listing.sidecars)
        partial.fold(listing, group_of(root, listing.path, depth))
        frontier.extend(listing.subdirs)
        if progress is not None:
            progress(partial.folders, partial.files)
    if not frontier:
        return partial
    subtrees = list(frontier)
    procs = min(processes, len(subtrees))
    threads = max(1, workers // procs)
    # Small tasks balance uneven subtrees; a few dozen per process keep IPC negligible.
    per_task = max(1, len(subtrees) // (procs * 16))
    jobs = [(root, subtrees[i : i + per_task], depth, threads) for i in range(0, len(subtrees), per_task)]
    context = _fork_context()
    try:
        pool = context.Pool(procs, initializer=_init_worker) if context is not None else None
    except OSError:  # no processes allowed here
        pool = None
    if pool is None:  # fold the rest in this process
        partial.merge(_fold_subtrees((root, subtrees, depth, workers)))
        if progress is not None:
            progress(partial.folders, partial.files)
        return partial
    with pool:
        for result in pool.imap_unordered(_fold_subtrees, jobs):
            partial.merge(result)
            if progress is not None:
                progress(partial.folders, partial.files)
    return partial


def _fold_here(
    root: str,
    depth: int,
    workers: int,
    on_listing: Callable[[DirListing], None] | None,
    progress: ScanProgress | None,
) -> _Partial:
    """The walk in this process: threads (or none), every listing passed to `on_listing`."""
    partial = _Partial()
    listings = _walk_serial([root]) if workers <= 1 else threaded_walk([root], list_dir, workers)
    for listing in listings:
        partial.fold(listing, group_of(root, listing.path, depth))
        if on_listing is not None:
            on_listing(listing)
        if progress is not None:
            progress(partial.folders, partial.files)
    return partial


def summarize(
    root: str | os.PathLike[str],
    depth: int = 1,
    workers: int | None = None,
    on_listing: Callable[[DirListing], None] | None = None,
    *,
    processes: int | None = None,
    progress: ScanProgress | None = None,
) -> ScanSummary:
    """Walk once and aggregate per row; `on_listing` sees every folder (e.g. for deep checks).

    With `on_listing` the walk runs on `workers` threads of this process (the callback needs
    the listings here); without it, `processes` worker processes (default: one per core) each
    fold whole subtrees, using `workers // processes` threads apiece. `progress(folders,
    files)` is called on this thread as the walk advances (no display thread needed, so the
    worker processes can be forked from a single-threaded parent).
    """
    root = os.fspath(root)
    workers = workers or default_workers()
    procs = processes if processes is not None else default_processes()
    if on_listing is None and procs > 1:
        with _gc_paused():
            partial = _summarize_parallel(root, depth, procs, workers, progress)
    elif on_listing is None:
        with _gc_paused():
            partial = _fold_here(root, depth, workers, None, progress)
    else:  # the callback may create cycles (e.g. header reads): leave the collector alone
        partial = _fold_here(root, depth, workers, on_listing, progress)
    total = DirStats(name="total")
    for row in partial.rows.values():
        total.add(row)
    return ScanSummary(
        root,
        depth,
        dict(sorted(partial.rows.items())),
        total,
        sorted(partial.unreadable),
        sorted(partial.symlinked),
    )
