"""`<root>/vggt_cache_manifest.json`: what the cache under a data root was computed with.

It holds the current feature key (so `verify`/`prune` know the current model without flags),
the settings it was computed with, and a bounded history of precompute runs (their rate feeds
`status`' time estimate) and prunes. The file is advisory: a missing or corrupt manifest is a
warning and a fresh start, never a crash. Writers re-read and merge under a lock file in
`<root>/.vggtctl/`, and replace the file atomically, so two nodes recording at once lose nothing
(where the file system has no locks, the atomic replace still prevents a torn file).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import secrets
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from vggtctl.keys import FeatureKey
from vggtctl.scan import PRIVATE_DIR

MANIFEST_NAME = "vggt_cache_manifest.json"
LOCK_NAME = "manifest.lock"
FORMAT = "vggtctl.manifest"
VERSION = 1
HISTORY_LIMIT = 100

log = logging.getLogger(__name__)

try:
    import fcntl
except ImportError:  # pragma: no cover - non-POSIX
    fcntl = None  # type: ignore[assignment]


def manifest_path(root: str | os.PathLike[str]) -> str:
    return os.path.join(os.fspath(root), MANIFEST_NAME)


@dataclass
class Manifest:
    """The parsed manifest. `problem` says why the file on disk was ignored, if it was."""

    root: str
    feature_key: dict[str, Any] | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    updated: float | None = None
    runs: list[dict[str, Any]] = field(default_factory=list)
    prunes: list[dict[str, Any]] = field(default_factory=list)
    problem: str | None = None

    @property
    def path(self) -> str:
        return manifest_path(self.root)

    @property
    def current_key(self) -> FeatureKey | None:
        """The feature key of the latest recorded run, or None (absent or unreadable)."""
        if not self.feature_key:
            return None
        try:
            return FeatureKey.from_meta(self.feature_key)
        except (KeyError, TypeError, ValueError):
            return None

    @property
    def last_rate(self) -> float | None:
        """Items per second of the latest run that reported one (for time-to-finish estimates)."""
        for run in reversed(self.runs):
            rate = _run_rate(run)
            if rate:
                return rate
        return None

    @property
    def last_run_failed(self) -> int | None:
        """Items the latest precompute run failed (bad images: a rerun fails them again); None
        where the manifest records no such count."""
        runs = [run for run in self.runs if run.get("kind") == "precompute"]
        failed = runs[-1].get("failed") if runs else None
        return failed if type(failed) is int and failed >= 0 else None

    def last_run_settings(self) -> dict[str, Any] | None:
        """The settings that go with the current key (those of the run that made it current;
        what `verify --recompute` reuses), else those of the latest run that recorded any. A
        later run that did not become current (it found no items) does not count."""
        if self.settings:
            return dict(self.settings)
        for run in reversed(self.runs):
            if isinstance(run.get("settings"), dict) and run["settings"]:
                return dict(run["settings"])
        return None

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "updated": self.updated,
            "current": {"feature_key": self.feature_key, "settings": self.settings},
            "runs": self.runs,
            "prunes": self.prunes,
        }


def _run_rate(run: dict[str, Any]) -> float | None:
    rate = run.get("rate")
    if isinstance(rate, (int, float)) and not isinstance(rate, bool) and rate > 0:
        return float(rate)
    items, seconds = run.get("items"), run.get("seconds")
    if isinstance(items, (int, float)) and isinstance(seconds, (int, float)) and items > 0 and seconds > 0:
        return float(items) / float(seconds)
    return None


# --------------------------------------------------------------------------- read


def _parse(root: str, data: Any) -> Manifest:
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError("not a vggtctl manifest")
    if data.get("version") != VERSION:
        raise ValueError(f"unsupported manifest version {data.get('version')!r}")
    # Valid JSON that is not what we write is a damaged manifest, said as such: read leniently,
    # it would silently mean "no current key" and turn every check off.
    current = data.get("current", {})
    if not isinstance(current, dict):
        raise ValueError("'current' is not an object")
    key = current.get("feature_key")
    if key is not None:
        try:
            FeatureKey.from_meta(key)
        except (AttributeError, KeyError, TypeError, ValueError) as err:
            raise ValueError(f"current.feature_key is malformed ({type(err).__name__}: {err})") from None
    settings = current.get("settings")
    runs, prunes = data.get("runs"), data.get("prunes")
    for name, value, kind in (("runs", runs, list), ("prunes", prunes, list), ("settings", settings, dict)):
        if value is not None and not isinstance(value, kind):
            raise ValueError(f"{name!r} is not a {'list' if kind is list else 'object'}")
    return Manifest(
        root=root,
        feature_key=key if isinstance(key, dict) else None,
        settings=settings if isinstance(settings, dict) else {},
        updated=data.get("updated") if isinstance(data.get("updated"), (int, float)) else None,
        runs=[r for r in runs if isinstance(r, dict)] if isinstance(runs, list) else [],
        prunes=[p for p in prunes if isinstance(p, dict)] if isinstance(prunes, list) else [],
    )


class _Newer(ValueError):
    """A manifest of a later format version: not ours to rewrite."""


def _read(root: str) -> tuple[Manifest, str, tuple[int, int, int] | None]:
    """(manifest, state, identity). state: "ok", "corrupt" (read whole, not what we write),
    "unreadable" (an I/O error: it may be fine) or "newer" (a later vggtctl's format); a missing
    file is an empty manifest, "ok". identity: (inode, mtime_ns, size) of the file read."""
    path = manifest_path(root)
    try:
        with open(path, encoding="utf-8") as fh:
            st = os.fstat(fh.fileno())
            data = json.load(fh)
        identity = (st.st_ino, st.st_mtime_ns, st.st_size)
        version = data.get("version") if isinstance(data, dict) and data.get("format") == FORMAT else None
        if isinstance(version, int) and version > VERSION:
            raise _Newer(f"written by a newer vggtctl (manifest version {version})")
        return _parse(root, data), "ok", identity
    except FileNotFoundError:
        return Manifest(root=root), "ok", None
    except _Newer as err:
        return Manifest(root=root, problem=f"{path}: ignored, {err}"), "newer", None
    except OSError as err:
        reason = err.strerror or str(err)
        return Manifest(root=root, problem=f"{path}: ignored, cannot read it ({reason})"), "unreadable", None
    except (ValueError, UnicodeDecodeError) as err:
        return Manifest(root=root, problem=f"{path}: ignored, cannot read it ({err})"), "corrupt", None


def _identity(root: str) -> tuple[int, int, int] | None:
    """The manifest file's (inode, mtime_ns, size) now, None when there is none. Opened, not
    just stat'ed: on NFS an open revalidates cached attributes (close-to-open consistency)."""
    try:
        with open(manifest_path(root), "rb") as fh:
            st = os.fstat(fh.fileno())
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def load(root: str | os.PathLike[str]) -> Manifest:
    """The manifest under `root`; missing -> empty, corrupt -> empty with `problem` set (and logged)."""
    manifest, state, _ = _read(os.fspath(root))
    if state != "ok" and manifest.problem not in _WARNED:  # once per process: commands read it twice
        _WARNED.add(manifest.problem)
        log.warning("%s", manifest.problem)
    return manifest


_WARNED: set[str | None] = set()


# --------------------------------------------------------------------------- write


@contextlib.contextmanager
def _locked(root: str) -> Iterator[None]:
    """Exclusive lock on `<root>/.vggtctl/manifest.lock`; best effort where locks are unsupported."""
    fh = None
    try:
        folder = os.path.join(root, PRIVATE_DIR)
        os.makedirs(folder, exist_ok=True)
        fh = open(os.path.join(folder, LOCK_NAME), "a+b")  # noqa: SIM115 - held across the yield
        if fcntl is not None:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
    except OSError as err:
        # _update's identity check still catches most concurrent writes; say that it is needed
        log.warning(
            "manifest lock unavailable under %s (%s): relying on a re-check before writing", root, err
        )
    try:
        yield
    finally:
        if fh is not None:
            fh.close()  # closing releases the flock


def _write(manifest: Manifest, expect: tuple[int, int, int] | None) -> bool:
    """Write atomically, unless the file on disk is no longer `expect` (what was read; None:
    no file): then nothing is written and False says to read again."""
    path = manifest.path
    tmp = f"{path}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(manifest.to_json(), fh, indent=2, sort_keys=True, default=str)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        if _identity(manifest.root) != expect:
            os.unlink(tmp)
            return False
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return True


def _stamp(entry: dict[str, Any]) -> dict[str, Any]:
    stamped = dict(entry)
    stamped.setdefault("time", time.time())
    stamped.setdefault("host", socket.gethostname())
    return stamped


_UPDATE_TRIES = 5
_STALE_TEMP_S = 3600  # a writer holds its temp file for milliseconds


def _remove_stale_temps(path: str) -> None:
    """Temp files of writers that died between write and replace: ours by name, an hour old."""
    folder, name = os.path.split(path)
    pattern = re.compile(re.escape(name) + r"\.tmp-[0-9]+-[0-9a-f]{8}", re.ASCII)
    now = time.time()
    with contextlib.suppress(OSError):
        for entry in os.scandir(folder or "."):
            if pattern.fullmatch(entry.name):
                with contextlib.suppress(OSError):
                    if now - entry.stat(follow_symlinks=False).st_mtime > _STALE_TEMP_S and entry.is_file(
                        follow_symlinks=False
                    ):
                        os.unlink(entry.path)


def _update(root: str | os.PathLike[str], change: Any) -> Manifest | None:
    """Re-read under the lock, apply `change(manifest)`, write atomically. Never raises OSError:
    the manifest is advisory, so a read-only root costs a warning, not the command.

    The lock may not hold across hosts (NFS mounted `nolock`, or no flock at all): just before
    the new file replaces the old one, the old one must still be the file that was read; when
    another process wrote it meanwhile, its content is read again and the change re-applied.
    Without this a prune recording its entry could put back the key it read, undoing a run
    that had made a new model current (and the next `prune --model-changed` would delete it).
    """
    root = os.fspath(root)
    try:
        with _locked(root):
            for _ in range(_UPDATE_TRIES):
                manifest, state, read_as = _read(root)
                if state in ("unreadable", "newer"):
                    # an I/O error may pass, and a later version is not ours: never replace either
                    log.warning("%s; not updated", manifest.problem)
                    return None
                if state == "corrupt":
                    aside = f"{manifest.path}.corrupt-{int(time.time())}"
                    with contextlib.suppress(OSError):
                        os.replace(manifest.path, aside)
                    log.warning("%s; moved aside to %s", manifest.problem, os.path.basename(aside))
                    read_as = None
                change(manifest)
                manifest.updated = time.time()
                manifest.problem = None
                if _write(manifest, expect=read_as):
                    _remove_stale_temps(manifest.path)
                    return manifest
            log.warning(
                "%s: changed by other processes %d times while updating; not updated",
                manifest_path(root),
                _UPDATE_TRIES,
            )
            return None
    except OSError as err:
        log.warning("%s: cannot update the manifest: %s", manifest_path(root), err.strerror or err)
        return None


def record_run(
    root: str | os.PathLike[str], entry: dict[str, Any], key: FeatureKey | None = None
) -> Manifest | None:
    """Append a precompute run; with `key`, it becomes the current feature key.

    `entry` (JSON-able): "settings" (dict; becomes the current settings when `key` is given),
    "counts" (dict), "items" (int), "seconds" (float), "rate" (items/s; derived from items and
    seconds when absent). "time" and "host" are filled in when missing.
    """

    def change(manifest: Manifest) -> None:
        run = _stamp(entry)
        if "rate" not in run and _run_rate(run):
            run["rate"] = _run_rate(run)
        if key is not None:
            manifest.feature_key = key.to_meta()
            run.setdefault("feature_key", manifest.feature_key)
            if isinstance(entry.get("settings"), dict):
                manifest.settings = dict(entry["settings"])
        manifest.runs = [*manifest.runs, run][-HISTORY_LIMIT:]

    return _update(root, change)


def record_prune(root: str | os.PathLike[str], entry: dict[str, Any]) -> Manifest | None:
    """Append a prune: "categories", "files", "bytes_freed", "failed" ("time"/"host" filled in)."""

    def change(manifest: Manifest) -> None:
        manifest.prunes = [*manifest.prunes, _stamp(entry)][-HISTORY_LIMIT:]

    return _update(root, change)
