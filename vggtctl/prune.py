"""Remove invalid sidecars and temp files: scan -> plan -> execute, usable without the CLI.

`plan_prune` turns an audit report into a frozen `PrunePlan` (what goes, per category, how much
it frees); `execute` deletes exactly the plan's files, each one re-checked right before unlink:
its name must be ours (sidecar or temp), it must lie inside the root reached through real
folders only (every folder is opened with O_NOFOLLOW relative to its parent, so a symlinked
folder is never entered even if one is swapped in after the scan), it must be a regular file
and unchanged since the scan (inode, size, mtime). Valid sidecars are never planned.

Remaining race: a writer that replaces a file in the instant between that last check and the
unlink loses its new file. `execute` only removes files judged invalid, so the worst case is
one recomputation, never a wrong feature served.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import humanize

from vggtctl import manifest
from vggtctl.audit import AuditReport, Problem
from vggtctl.errors import EXIT_PARTIAL, ConfigError, VggtctlError
from vggtctl.sidecar import SUFFIX, Verdict, is_sidecar_name, is_temp_name

# Category (the `--flag` without dashes) -> the verdicts it removes.
CATEGORIES: dict[str, frozenset[Verdict]] = {
    "model-changed": frozenset(
        {Verdict.MODEL_MISMATCH, Verdict.PREPROCESS_MISMATCH, Verdict.CONTEXT_MISMATCH}
    ),
    "orphans": frozenset({Verdict.ORPHAN}),
    "stale": frozenset({Verdict.STALE}),
    "corrupt": frozenset({Verdict.CORRUPT}),
    "legacy": frozenset({Verdict.LEGACY}),
    "temp": frozenset({Verdict.TEMP}),
}
CATEGORY_HELP = {
    "model-changed": "cached for another model, preprocess preset or context than the current one",
    "orphans": "the image is gone",
    "stale": "the image changed after caching",
    "corrupt": "unreadable or not following the sidecar format",
    "legacy": "files of the earlier script, without provenance",
    "temp": "temp files left by interrupted writes",
}
# A temp file this young may belong to a write in progress; kept unless --older-than says otherwise.
TEMP_GRACE_S = 15 * 60

_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str) -> float:
    """'30d', '12h', '1w2d', '90s' -> seconds. A unit is required: '30' is ambiguous."""
    cleaned = text.strip().lower().replace(" ", "")
    if not cleaned or _DURATION.sub("", cleaned) != "":
        raise ConfigError(
            f"--older-than {text!r}: expected a duration such as 30d, 12h, 1w2d (units s m h d w)"
        )
    return float(sum(float(n) * _UNIT_S[u] for n, u in _DURATION.findall(cleaned)))


def category_of(verdict: Verdict) -> str | None:
    for name, verdicts in CATEGORIES.items():
        if verdict in verdicts:
            return name
    return None


# --------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class PruneTarget:
    path: str
    verdict: Verdict
    category: str
    bytes: int
    reason: str = ""
    stamp: tuple[int, int, int] | None = None  # (inode, size, mtime_ns) when scanned

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "category": self.category,
            "verdict": self.verdict.value,
            "bytes": self.bytes,
            "reason": self.reason,
        }


@dataclass(frozen=True)
class CategoryTotal:
    name: str
    files: int
    bytes: int

    @property
    def bytes_str(self) -> str:
        return humanize.naturalsize(self.bytes, binary=True)


@dataclass(frozen=True)
class PrunePlan:
    """What `execute` will delete: the files, their totals per category, the bytes freed."""

    root: str
    categories: tuple[CategoryTotal, ...]
    files: tuple[PruneTarget, ...]
    older_than: float | None = None
    kept_recent_temps: int = 0
    links_left: tuple[str, ...] = ()  # symbolic links named like sidecars: never deleted
    specials_left: tuple[str, ...] = ()  # sockets, FIFOs, devices named like sidecars: never deleted
    # sidecars whose image is a dangling link or cannot be stat'ed: (path, reason), never deleted
    unreachable_left: tuple[tuple[str, str], ...] = ()
    expectation: str = ""  # what `valid` was judged against (audit.describe + history rule)
    unreadable: tuple[str, ...] = ()  # 'PATH: REASON' the scan could not read: not judged

    @property
    def freed_bytes(self) -> int:
        return sum(t.bytes for t in self.files)

    @property
    def freed_str(self) -> str:
        return humanize.naturalsize(self.freed_bytes, binary=True)

    @property
    def category_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.categories)

    def to_json(self) -> dict[str, Any]:
        return {
            "root": self.root,
            "categories": {c.name: {"files": c.files, "bytes": c.bytes} for c in self.categories},
            "older_than_seconds": self.older_than,
            "kept_recent_temps": self.kept_recent_temps,
            "files": [t.to_json() for t in self.files],
            "file_count": len(self.files),
            "freed_bytes": self.freed_bytes,
            "links_left": list(self.links_left),
            "specials_left": list(self.specials_left),
            "image_unreachable_left": [{"path": p, "reason": r} for p, r in self.unreachable_left],
            "expectation": self.expectation,
            "unreadable": list(self.unreadable),
        }


def _never_deleted(problem: Problem) -> bool:
    return problem.link or problem.special or problem.image_unreachable


def found_categories(report: AuditReport) -> tuple[CategoryTotal, ...]:
    """Every category with at least one file in `report` that a prune could delete (what an
    interactive prune offers); links, special files and sidecars of unreachable images are not."""
    totals = []
    for name, verdicts in CATEGORIES.items():
        mine = [p for p in report.problems if p.verdict in verdicts and not _never_deleted(p)]
        if mine:
            totals.append(CategoryTotal(name, len(mine), sum(p.bytes for p in mine)))
    return tuple(totals)


def plan_prune(
    report: AuditReport,
    categories: Iterable[str],
    *,
    older_than: float | None = None,
    now: float | None = None,
    temp_grace: float = TEMP_GRACE_S,
) -> PrunePlan:
    """The files of `report` in the chosen categories; with `older_than` (seconds), only those
    whose mtime is older (sidecars are written atomically, so mtime is their creation time)."""
    chosen = list(dict.fromkeys(categories))
    unknown = [c for c in chosen if c not in CATEGORIES]
    if unknown:
        raise ConfigError(f"unknown prune categories: {', '.join(unknown)}")
    if report.root is None:
        raise ValueError("plan_prune needs a report with its root (from audit.audit)")
    now = time.time() if now is None else now
    wanted = {v: c for c in chosen for v in CATEGORIES[c]}
    files: list[PruneTarget] = []
    kept_recent = 0
    links: list[str] = []
    specials: list[str] = []
    unreachable: list[tuple[str, str]] = []
    for problem in report.problems:
        if problem.image_unreachable:  # its image may come back (a source remounted): kept by all
            unreachable.append((problem.path, problem.reason))
            continue
        category = wanted.get(problem.verdict)
        if category is None:
            continue
        if problem.link:  # execute would refuse it: say so up front instead of failing each run
            links.append(problem.path)
            continue
        if problem.special:  # a socket, FIFO or device: the same
            specials.append(problem.path)
            continue
        age = now - problem.stamp[2] / 1e9 if problem.stamp else None
        if older_than is not None:
            if age is None or age < older_than:
                continue
        elif problem.verdict is Verdict.TEMP and age is not None and age < temp_grace:
            kept_recent += 1
            continue
        files.append(
            PruneTarget(problem.path, problem.verdict, category, problem.bytes, problem.reason, problem.stamp)
        )
    files.sort(key=lambda t: t.path)
    totals = tuple(
        CategoryTotal(
            c, sum(1 for t in files if t.category == c), sum(t.bytes for t in files if t.category == c)
        )
        for c in chosen
    )
    return PrunePlan(
        report.root,
        totals,
        tuple(files),
        older_than,
        kept_recent,
        tuple(sorted(links)),
        tuple(sorted(specials)),
        tuple(sorted(unreachable)),
        report.expectation,
        tuple(report.unreadable),
    )


# --------------------------------------------------------------------------- execute


@dataclass(frozen=True)
class PruneResult:
    deleted: int
    freed_bytes: int
    failed: tuple[tuple[str, str], ...]  # (path, reason): deletion attempted or refused
    skipped: tuple[tuple[str, str], ...]  # (path, reason): changed since the scan, left alone
    interrupted: bool = False

    @property
    def freed_str(self) -> str:
        return humanize.naturalsize(self.freed_bytes, binary=True)

    def to_json(self) -> dict[str, Any]:
        return {
            "deleted": self.deleted,
            "freed_bytes": self.freed_bytes,
            "failed": [{"path": p, "reason": r} for p, r in self.failed],
            "skipped": [{"path": p, "reason": r} for p, r in self.skipped],
            "interrupted": self.interrupted,
        }


class RootGoneError(VggtctlError):
    """The data root cannot be opened any more (unmounted, removed since the scan): nothing was
    deleted (exit 3, as for files that could not be deleted)."""

    exit_code = EXIT_PARTIAL


class _Refused(Exception):
    """This file must not be deleted (reason in args[0])."""


class _Skip(Exception):
    """This file changed since the scan; leave it (reason in args[0])."""


def _relative_parts(root: str, path: str) -> tuple[list[str], str]:
    """(folders under root, file name) of `path`, refusing anything that leaves the root."""
    rel = os.path.relpath(path, root)
    parts = rel.split(os.sep)
    if os.path.isabs(rel) or any(p in ("", ".", "..") for p in parts):
        raise _Refused("outside the data root")
    real_root = os.path.realpath(root)
    if os.path.commonpath([real_root, os.path.realpath(path)]) != real_root:
        raise _Refused("resolves outside the data root (symlink)")
    return parts[:-1], parts[-1]


def _check_name(name: str, verdict: Verdict) -> None:
    ours = is_temp_name(name) if verdict is Verdict.TEMP else is_sidecar_name(name)
    if not ours:
        raise _Refused(f"not a {'temp file' if verdict is Verdict.TEMP else 'sidecar'} name")


def _check_file(st: os.stat_result, target: PruneTarget) -> None:
    if stat.S_ISLNK(st.st_mode):
        raise _Refused("is a symlink")
    if not stat.S_ISREG(st.st_mode):
        raise _Refused("not a regular file")
    if target.stamp is not None and (st.st_ino, st.st_size, st.st_mtime_ns) != target.stamp:
        raise _Skip("changed since the scan")


class _FolderOpener:
    """Opens folders below the root one component at a time with O_NOFOLLOW, caching the last."""

    def __init__(self, root: str) -> None:
        self.root_fd = os.open(os.path.realpath(root), os.O_RDONLY | os.O_DIRECTORY)
        self._key: tuple[str, ...] | None = None
        self._fd: int | None = None

    def folder(self, parts: list[str]) -> int:
        key = tuple(parts)
        if key != self._key:
            self._drop()
            fd = os.dup(self.root_fd)
            try:
                for part in parts:
                    try:
                        nxt = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
                    except OSError as err:
                        raise _Refused(f"folder {part!r} is not a real folder ({err.strerror})") from err
                    os.close(fd)
                    fd = nxt
            except BaseException:
                os.close(fd)
                raise
            self._key, self._fd = key, fd
        assert self._fd is not None
        return self._fd

    def _drop(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
        self._key, self._fd = None, None

    def close(self) -> None:
        self._drop()
        os.close(self.root_fd)


_DIR_FD_OK = (
    os.open in os.supports_dir_fd and os.unlink in os.supports_dir_fd and os.stat in os.supports_dir_fd
)


def _delete_with_dir_fd(opener: _FolderOpener, root: str, target: PruneTarget) -> None:
    folders, name = _relative_parts(root, target.path)
    _check_name(name, target.verdict)
    fd = opener.folder(folders)
    _check_file(os.stat(name, dir_fd=fd, follow_symlinks=False), target)
    if target.verdict is Verdict.ORPHAN:
        with contextlib.suppress(FileNotFoundError):  # a dangling link is an image not gone
            _image_back(os.stat(name[: -len(SUFFIX)], dir_fd=fd, follow_symlinks=False))
    os.unlink(name, dir_fd=fd)


def _image_back(st: os.stat_result) -> None:
    """An orphan's image name is there again (a file, or a link whose source may be remounted)."""
    raise _Skip("its image is a symbolic link now" if stat.S_ISLNK(st.st_mode) else "its image is back")


def _delete_by_path(root: str, target: PruneTarget) -> None:  # pragma: no cover - non-Linux
    folders, name = _relative_parts(root, target.path)
    _check_name(name, target.verdict)
    current = os.path.realpath(root)
    for part in folders:
        current = os.path.join(current, part)
        if not stat.S_ISDIR(os.lstat(current).st_mode):
            raise _Refused(f"folder {part!r} is not a real folder")
    path = os.path.join(current, name)
    _check_file(os.lstat(path), target)
    if target.verdict is Verdict.ORPHAN:
        with contextlib.suppress(FileNotFoundError):
            _image_back(os.lstat(path[: -len(SUFFIX)]))
    os.unlink(path)


def execute(
    plan: PrunePlan,
    *,
    on_file: Callable[[PruneTarget, str | None], None] | None = None,
    record: bool = True,
) -> PruneResult:
    """Delete the plan's files, one safety check each (see the module docstring).

    Per-file errors are collected and the run goes on. `on_file(target, error_or_None)` reports
    progress. Ctrl-C stops between files and returns a partial result (`interrupted`). With
    `record`, the prune is appended to the root's manifest.
    """
    deleted = freed = 0
    failed: list[tuple[str, str]] = []
    skipped: list[tuple[str, str]] = []
    interrupted = False
    try:
        opener = _FolderOpener(plan.root) if _DIR_FD_OK and plan.files else None
    except OSError as err:
        raise RootGoneError(
            f"{plan.root}: cannot open the data root to delete ({err.strerror or err}); nothing deleted"
        ) from None
    try:
        for target in plan.files:
            error: str | None = None
            try:
                if opener is not None:
                    _delete_with_dir_fd(opener, plan.root, target)
                else:
                    _delete_by_path(plan.root, target)
                deleted += 1
                freed += target.bytes
            except _Skip as why:
                skipped.append((target.path, str(why)))
                error = str(why)
            except FileNotFoundError:
                skipped.append((target.path, "already gone"))
                error = "already gone"
            except _Refused as why:
                failed.append((target.path, f"refused: {why}"))
                error = str(why)
            except OSError as err:
                failed.append((target.path, err.strerror or str(err)))
                error = err.strerror or str(err)
            if on_file is not None:
                on_file(target, error)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        if opener is not None:
            opener.close()
    result = PruneResult(deleted, freed, tuple(failed), tuple(skipped), interrupted)
    if record and plan.files:
        manifest.record_prune(
            plan.root,
            {
                "categories": list(plan.category_names),
                "older_than_seconds": plan.older_than,
                "files": deleted,
                "bytes_freed": freed,
                "failed": len(failed),
                "skipped": len(skipped),
                "interrupted": interrupted,
            },
        )
    return result


def iter_category_help() -> Iterator[tuple[str, str]]:
    """(flag, meaning) for every category, for help texts and refusals."""
    for name in CATEGORIES:
        yield f"--{name}", CATEGORY_HELP[name]
