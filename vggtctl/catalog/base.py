"""What every layout produces: Items (ordered frames, current image last) in a Catalog."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from vggtctl.keys import ImageKey

CONTEXT_KINDS = ("none", "sequence")
StatLookup = Callable[[str], "os.stat_result | None"]


@dataclass(frozen=True, slots=True)
class Item:
    """One cache entry: the frames streamed through VGGT, in order, the current image last.

    With context `none`, `frames == (image,)`. Paths are absolute and normalized, so two
    layouts that name the same file produce equal Items.
    """

    frames: tuple[str, ...]
    sample_id: str | None = None

    def __post_init__(self) -> None:
        if not self.frames:
            raise ValueError("an Item needs at least one frame")

    @property
    def image(self) -> str:
        return self.frames[-1]

    @classmethod
    def from_paths(cls, paths: Iterable[str | os.PathLike[str]], sample_id: str | None = None) -> Item:
        """An Item from a trainer's own frame list (history then current), paths made absolute."""
        return cls(tuple(os.path.normpath(os.path.abspath(os.fspath(p))) for p in paths), sample_id)


@dataclass(frozen=True)
class CatalogProblem:
    """A part of the input that was skipped; `line` is 1-based, None when it has no line."""

    file: str
    line: int | None
    reason: str

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        return f"{where}: {self.reason}"


@dataclass
class Catalog:
    """A layout's items plus what it skipped and why it was chosen."""

    items: list[Item]
    layout: str  # "episodes" | "annotations" | "plain"
    reason: str
    context_kind: str  # "none" | "sequence"
    problems: list[CatalogProblem] = field(default_factory=list)
    missing_images: list[str] = field(default_factory=list)
    root: str | None = None
    max_history: int | None = None
    episodes: int = 0  # episode folders (episodes layout)
    ignored_files: int = 0  # files in episode folders that are not step images
    ignored_examples: list[str] = field(default_factory=list)
    dropped_items: int = 0  # samples dropped because a frame is missing
    unreadable_folders: int = 0  # folders the walk could not list: their images are unknown

    def __len__(self) -> int:
        return len(self.items)

    def summary(self) -> str:
        """One line for logs: layout, items, context and what was skipped."""
        parts = [f"{self.layout}: {len(self.items)} items, context {self.context_kind}"]
        if self.context_kind == "sequence" and self.max_history is not None and self.layout == "episodes":
            parts.append(f"max_history {self.max_history}")
        if self.episodes:
            parts.append(f"{self.episodes} episodes")
        if self.problems:
            parts.append(f"{len(self.problems)} problems")
        if self.missing_images:
            parts.append(f"{len(self.missing_images)} missing images ({self.dropped_items} samples dropped)")
        if self.ignored_files:
            parts.append(f"{self.ignored_files} other files ignored")
        return "; ".join(parts)


def _stat_or_none(path: str) -> os.stat_result | None:
    try:
        return os.stat(path)
    except FileNotFoundError:
        return None


def item_frames_for_key(item: Item, stat_lookup: StatLookup | None = None) -> list[tuple[str, ImageKey]]:
    """The item's frames as (name relative to the current image's folder, ImageKey), in order.

    Feed the result to `FeatureKey.signature_for`. Each distinct frame is stat'ed once (padded
    histories repeat frame 0); pass `stat_lookup` to answer from a listing instead of the disk.
    Raises FileNotFoundError naming the first frame that is gone.
    """
    lookup = stat_lookup or _stat_or_none
    folder = os.path.dirname(item.image)
    prefix = os.path.join(folder, "")
    seen: dict[str, tuple[str, ImageKey]] = {}
    out: list[tuple[str, ImageKey]] = []
    for path in item.frames:
        entry = seen.get(path)
        if entry is None:
            st = lookup(path)
            if st is None:
                raise FileNotFoundError(2, "context frame is gone", path)
            # a frame beside the image is named by its file name: what relpath says for it, at a
            # fraction of the cost (relpath was half of a signature's time; this runs per item)
            rest = path[len(prefix) :] if path.startswith(prefix) else ""
            name = rest if rest and os.sep not in rest else os.path.relpath(path, folder)
            entry = seen[path] = (name, ImageKey.from_stat(st))
        out.append(entry)
    return out


def frame_names(item: Item) -> list[str]:
    """The frames' names relative to the current image's folder (what a sidecar records)."""
    folder = os.path.dirname(item.image)
    return [os.path.relpath(path, folder) for path in item.frames]


def as_none_context(items: list[Item]) -> list[Item]:
    """Context `none`: one single-frame item per distinct frame, in first-seen order.

    History frames are included: a per-image trainer looks up every frame it feeds, so a
    per-image cache must cover them too (for episodes every frame is some step's image anyway).
    """
    seen: set[str] = set()
    out: list[Item] = []
    for item in items:
        last = len(item.frames) - 1
        for pos, path in enumerate(item.frames):
            if path not in seen:
                seen.add(path)
                out.append(Item((path,), item.sample_id if pos == last else None))
    return out
