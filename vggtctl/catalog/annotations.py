"""The `annotations` layout: samples listed in JSON (a list) or JSONL files.

A sample names its frames in one of three ways: `images` (history then current), `image` (one
path, or a list read like `images`), or `history_images` + `current_image`. Relative paths are
resolved against `data_path` when given, else against the annotation file's folder. A bad
line or sample is reported with its line number and skipped, never fatal; samples whose
frames are missing are dropped and the missing paths listed. Existence is checked by listing
each referenced folder once, not by stat'ing every frame.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from vggtctl.catalog.base import CatalogProblem, Item
from vggtctl.errors import ConfigError
from vggtctl.scan import default_workers

_WS = " \t\r\n"


class _SampleError(ValueError):
    pass


def read_annotation_file(path: str) -> tuple[list[tuple[int, Any]], list[CatalogProblem]]:
    """The file's samples as (1-based line, decoded JSON value), plus the lines that failed."""
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except FileNotFoundError as err:
        raise ConfigError(f"{path}: annotation file not found") from err
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: cannot read annotation file: {err}") from err
    if text.startswith("\ufeff"):
        text = text[1:]
    if text.lstrip(_WS).startswith("["):
        return _read_json_list(path, text)
    return _read_jsonl(path, text)


def _read_jsonl(path: str, text: str) -> tuple[list[tuple[int, Any]], list[CatalogProblem]]:
    samples: list[tuple[int, Any]] = []
    problems: list[CatalogProblem] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            samples.append((number, json.loads(line)))
        except json.JSONDecodeError as err:
            problems.append(CatalogProblem(path, number, f"invalid JSON: {err.msg} (column {err.colno})"))
    return samples, problems


def _read_json_list(path: str, text: str) -> tuple[list[tuple[int, Any]], list[CatalogProblem]]:
    """Decode a top-level list element by element, so each sample keeps its line number."""
    decoder = json.JSONDecoder()
    samples: list[tuple[int, Any]] = []
    line, counted = 1, 0

    def line_at(pos: int) -> int:
        nonlocal line, counted
        line += text.count("\n", counted, pos)
        counted = pos
        return line

    def skip(pos: int) -> int:
        while pos < len(text) and text[pos] in _WS:
            pos += 1
        return pos

    def fail(pos: int, msg: str) -> tuple[list[tuple[int, Any]], list[CatalogProblem]]:
        where = line_at(pos)
        return samples, [CatalogProblem(path, where, f"invalid JSON: {msg}; the rest of the file is skipped")]

    pos = skip(text.index("[") + 1)
    if pos < len(text) and text[pos] == "]":
        pos = skip(pos + 1)
        return (samples, []) if pos == len(text) else fail(pos, "extra data after the list")
    while True:
        try:
            value, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as err:
            return fail(err.pos, err.msg)
        samples.append((line_at(pos), value))
        pos = skip(end)
        if pos < len(text) and text[pos] == ",":
            pos = skip(pos + 1)
            continue
        if pos < len(text) and text[pos] == "]":
            pos = skip(pos + 1)
            return (samples, []) if pos == len(text) else fail(pos, "extra data after the list")
        return fail(pos, "expected ',' or ']' between samples")


def sample_frames(sample: Any) -> list[str]:
    """The sample's frame paths as written (history then current); raises _SampleError."""
    if not isinstance(sample, dict):
        raise _SampleError(f"sample is a JSON {_json_type(sample)}, expected an object")
    if "images" in sample:
        return _path_list(sample["images"], "images")
    if "image" in sample:
        value = sample["image"]
        return [_path(value, "image")] if isinstance(value, str) else _path_list(value, "image")
    if "history_images" in sample or "current_image" in sample:
        if "current_image" not in sample:
            raise _SampleError("'history_images' without 'current_image'")
        history = sample.get("history_images")
        history = [] if history is None else _path_list(history, "history_images", allow_empty=True)
        return [*history, _path(sample["current_image"], "current_image")]
    raise _SampleError("no 'images', 'image' or 'history_images' + 'current_image' key")


def _path_list(value: Any, key: str, allow_empty: bool = False) -> list[str]:
    if not isinstance(value, list):
        raise _SampleError(f"'{key}' is a JSON {_json_type(value)}, expected a list of paths")
    if not value and not allow_empty:
        raise _SampleError(f"'{key}' is an empty list")
    return [_path(v, f"{key}[{i}]") for i, v in enumerate(value)]


def _path(value: Any, key: str) -> str:
    if not isinstance(value, str):
        raise _SampleError(f"'{key}' is a JSON {_json_type(value)}, expected a path string")
    if not value.strip():
        raise _SampleError(f"'{key}' is an empty path")
    return value


def _json_type(value: Any) -> str:
    for kind, name in ((bool, "boolean"), (str, "string"), (int, "number"), (float, "number")):
        if isinstance(value, kind):
            return name
    if value is None:
        return "null"
    return (
        "list" if isinstance(value, list) else "object" if isinstance(value, dict) else type(value).__name__
    )


def _sample_id(sample: dict[str, Any], file: str, line: int) -> str:
    value = sample.get("id")
    if isinstance(value, (str, int)) and not isinstance(value, bool):
        return str(value)
    return f"{os.path.basename(file)}:{line}"


def iter_samples(files: list[str], data_path: str | None) -> Iterator[tuple[str, int, Item] | CatalogProblem]:
    """Every sample of every file as (file, line, Item), or the CatalogProblem that skipped it."""
    canonical: dict[str, str] = {}  # one string object per distinct path, shared by all items
    for file in files:
        file = os.path.abspath(file)
        base = os.path.abspath(data_path) if data_path else os.path.dirname(file)
        resolved: dict[str, str] = {}  # as written in this file -> canonical absolute path
        samples, problems = read_annotation_file(file)
        yield from problems
        for line, sample in samples:
            try:
                frames = sample_frames(sample)
            except _SampleError as err:
                yield CatalogProblem(file, line, str(err))
                continue
            paths = []
            for raw in frames:
                path = resolved.get(raw)
                if path is None:
                    path = os.path.normpath(os.path.join(base, raw))
                    path = resolved[raw] = canonical.setdefault(path, path)
                paths.append(path)
            yield file, line, Item(tuple(paths), _sample_id(sample, file, line))


def existing_names(folders: set[str], workers: int | None = None) -> dict[str, frozenset[str]]:
    """The file names present in each folder (empty for a folder that cannot be listed)."""

    def names(folder: str) -> frozenset[str]:
        try:
            with os.scandir(folder) as entries:
                return frozenset(e.name for e in entries if not e.is_dir(follow_symlinks=False))
        except OSError:
            return frozenset()

    ordered = sorted(folders)
    with ThreadPoolExecutor(max_workers=workers or default_workers()) as pool:
        return dict(zip(ordered, pool.map(names, ordered), strict=True))


def build_annotations(
    files: list[str], data_path: str | None, *, sequence: bool = True, workers: int | None = None
) -> tuple[list[Item], list[CatalogProblem], list[str], int]:
    """Items in file order (exact duplicates once), problems, missing frame paths, dropped count.

    With `sequence`, a current image that two samples give different histories is reported: it
    has one sidecar, so only one of those histories can be cached (both items are kept).
    """
    raw: list[tuple[str, int, Item]] = []
    problems: list[CatalogProblem] = []
    for entry in iter_samples(files, data_path):
        if isinstance(entry, CatalogProblem):
            problems.append(entry)
        else:
            raw.append(entry)
    split = {path: os.path.split(path) for _, _, item in raw for path in item.frames}
    present = existing_names({folder for folder, _ in split.values()}, workers)
    gone_paths = {path for path, (folder, name) in split.items() if name not in present[folder]}
    missing: set[str] = set()
    items: list[Item] = []
    seen: set[tuple[str, ...]] = set()
    first_for_image: dict[str, tuple[str, int, tuple[str, ...]]] = {}
    dropped = 0
    for file, line, item in raw:
        gone = [p for p in item.frames if p in gone_paths] if gone_paths else None
        if gone:
            missing.update(gone)
            dropped += 1
            continue
        if item.frames in seen:
            continue
        seen.add(item.frames)
        items.append(item)
        if not sequence:
            continue
        first = first_for_image.setdefault(item.image, (file, line, item.frames))
        if first[2] != item.frames:
            problems.append(
                CatalogProblem(
                    file,
                    line,
                    f"{item.image} is also the current image of "
                    f"{os.path.basename(first[0])}:{first[1]} with a different history; "
                    "its one sidecar can hold only one of them",
                )
            )
    order = {os.path.abspath(f): i for i, f in enumerate(files)}
    problems.sort(key=lambda p: (order.get(p.file, len(order)), p.line or 0))
    return items, problems, sorted(missing), dropped
