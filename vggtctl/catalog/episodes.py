"""The `episodes` layout: folders of `step_<idx>_<ACTION>.<ext>` frames, one folder per episode.

An episode is any folder under the root (the root itself included) that directly holds step
images; usually `<root>/<episode>/`. Steps are ordered by the integer idx; the sample at
position j streams frames 0..j, left-padded with frame 0 to `max_history + 1` frames while
j <= max_history, else `numpy.linspace(0, j, max_history + 1, dtype=int)` — the history rule of
JanusVLN-style trainers, so every sequence has exactly max_history + 1 frames, current last.
Only names are read: no image is stat'ed or opened.
"""

from __future__ import annotations

import functools
import os
import re
from collections import Counter
from collections.abc import Iterable

import numpy as np

from vggtctl.catalog._walk import NameListing
from vggtctl.catalog.base import CatalogProblem, Item

# The action alphabet follows the reference trainer; the extension is matched case-insensitively.
STEP_PATTERN = re.compile(r"^step_(\d+)_([A-Za-z_]+)\.(?i:jpe?g|png)$")
IGNORED_EXAMPLES = 5


def step_index(name: str) -> int | None:
    """The integer idx of a step image name, or None when the name is not a step image."""
    match = STEP_PATTERN.match(name)
    return int(match.group(1)) if match else None


@functools.lru_cache(maxsize=65536)
def history_positions(j: int, max_history: int) -> tuple[int, ...]:
    """Positions (in step order) of the frames streamed for the sample at position j.

    numpy itself computes the linspace case (float steps truncated), so the rounding is the
    trainer's; memoized because every episode repeats the same j values.
    """
    if max_history == 0:
        return (j,)
    if j <= max_history:
        return (0,) * (max_history - j) + tuple(range(j + 1))
    return tuple(np.linspace(0, j, max_history + 1, dtype=int).tolist())


class EpisodeBuilder:
    """Folds name listings into episode items; feed listings in any order, then `finish`."""

    def __init__(self, root: str, max_history: int, sequence: bool) -> None:
        self.root = root
        self.max_history = max_history
        self.sequence = sequence
        self.episodes: dict[str, list[tuple[int, str]]] = {}
        self.problems: list[CatalogProblem] = []
        self.ignored = 0
        self.ignored_examples: list[str] = []

    def add(self, listing: NameListing) -> None:
        steps: list[tuple[int, str]] = []
        for name in listing.images:
            idx = step_index(name)
            if idx is not None:
                steps.append((idx, name))
        if not steps:
            if listing.images:  # a folder of other images under an episodes root: say so, once
                example = sorted(listing.images)[0]
                self.problems.append(
                    CatalogProblem(
                        listing.path,
                        None,
                        f"folder left out: its {len(listing.images)} images are not "
                        f"step_<idx>_<ACTION>.(jpg|png) frames (e.g. {example})",
                    )
                )
            return
        misnamed = [n for n in listing.images if step_index(n) is None]
        for name in listing.others + misnamed:
            self.ignored += 1
            if len(self.ignored_examples) < IGNORED_EXAMPLES:
                self.ignored_examples.append(os.path.join(listing.path, name))
        for name in misnamed:  # an image in an episode that is no step of it: say so, by name
            self.problems.append(
                CatalogProblem(
                    os.path.join(listing.path, name),
                    None,
                    "image left out: its name is not step_<idx>_<ACTION>.(jpg|png)",
                )
            )
        steps.sort()
        duplicates = sorted(idx for idx, count in Counter(idx for idx, _ in steps).items() if count > 1)
        if duplicates:
            names = [name for idx, name in steps if idx == duplicates[0]]
            more = f" (and {len(duplicates) - 1} more duplicated steps)" if len(duplicates) > 1 else ""
            self.problems.append(
                CatalogProblem(
                    listing.path,
                    None,
                    f"episode skipped: step {duplicates[0]} appears {len(names)} times "
                    f"({', '.join(names)}){more}",
                )
            )
            return
        self.episodes[listing.path] = steps

    def finish(self) -> list[Item]:
        items: list[Item] = []
        for folder in sorted(self.episodes):
            paths = [os.path.join(folder, name) for _, name in self.episodes[folder]]
            rel = os.path.relpath(folder, self.root).replace(os.sep, "/")
            for j, path in enumerate(paths):
                sample_id = os.path.basename(path) if rel == "." else f"{rel}/{os.path.basename(path)}"
                frames = _streamed(paths, j, self.max_history) if self.sequence else (path,)
                items.append(Item(frames, sample_id))
        return items


def _streamed(paths: list[str], j: int, max_history: int) -> tuple[str, ...]:
    """The frames the sample at step position j streams, current last."""
    return tuple(paths[p] for p in history_positions(j, max_history))


def episode_histories(
    folder: str, image_names: Iterable[str], max_history: int
) -> dict[str, tuple[str, ...]]:
    """For one folder: each step image's name -> the frames its item streams (paths), as the
    catalog builds them; {} for a folder that is no episode (no step image, or a step twice).

    Lets a check that walks folders one at a time (verify, status --deep) judge a sidecar's
    history against the layout's rule without building the whole catalog.
    """
    steps = sorted((idx, name) for name in image_names if (idx := step_index(name)) is not None)
    if not steps or len({idx for idx, _ in steps}) != len(steps):
        return {}
    paths = [os.path.join(folder, name) for _, name in steps]
    return {name: _streamed(paths, j, max_history) for j, (_, name) in enumerate(steps)}


def build_episodes(
    root: str, listings: Iterable[NameListing], max_history: int, sequence: bool
) -> tuple[list[Item], EpisodeBuilder]:
    builder = EpisodeBuilder(root, max_history, sequence)
    for listing in listings:
        builder.add(listing)
    return builder.finish(), builder
