"""Choose a layout and a context, and build the catalog (one names-only walk at most)."""

from __future__ import annotations

import os
from collections.abc import Sequence

from vggtctl.catalog._walk import NameListing, walk_names
from vggtctl.catalog.annotations import build_annotations
from vggtctl.catalog.base import CONTEXT_KINDS, Catalog, CatalogProblem, as_none_context
from vggtctl.catalog.episodes import build_episodes, step_index
from vggtctl.catalog.plain import build_plain
from vggtctl.errors import ConfigError

LAYOUTS = ("auto", "episodes", "annotations", "plain")
EPISODE_MAJORITY = 0.5  # more than half of the images must be step images for `auto` to pick episodes


def load_catalog(
    root: str | os.PathLike[str] | None,
    layout: str = "auto",
    *,
    annotations: Sequence[str | os.PathLike[str]] = (),
    data_path: str | os.PathLike[str] | None = None,
    max_history: int = 8,
    context: str = "auto",
    workers: int | None = None,
) -> Catalog:
    """Items for a data root (or annotation files) in the given or detected layout.

    `context="auto"`: sequence for episodes and annotations, none for plain. `"none"`: one
    single-frame item per distinct frame. `"sequence"` with the plain layout is a ConfigError
    (plain images have no order to stream).
    """
    if layout not in LAYOUTS:
        raise ConfigError(f"unknown layout {layout!r} (choose from {', '.join(LAYOUTS)})")
    if context not in ("auto", *CONTEXT_KINDS):
        raise ConfigError(f"unknown context {context!r} (choose from auto, none, sequence)")
    if isinstance(max_history, bool) or not isinstance(max_history, int) or max_history < 0:
        raise ConfigError(f"max_history must be a whole number >= 0, not {max_history!r}")
    files = [os.fspath(a) for a in annotations]
    if layout in ("episodes", "plain") and files:
        raise ConfigError(f"annotation files only apply to the annotations layout, not {layout!r}")
    if layout == "annotations" and not files:
        raise ConfigError("the annotations layout needs at least one annotation file")
    root_text = os.path.abspath(os.fspath(root)) if root is not None else None
    data_text = os.fspath(data_path) if data_path is not None else None

    if files:
        kind = _context_kind("annotations", context)
        items, problems, missing, dropped = build_annotations(
            files, data_text, sequence=kind == "sequence", workers=workers
        )
        if kind == "none":
            items = as_none_context(items)
        names = ", ".join(os.path.basename(f) for f in files)
        reason = (
            f"annotation files were given ({names})"
            if layout == "auto"
            else f"annotations layout requested ({names})"
        )
        return Catalog(
            items,
            "annotations",
            reason,
            kind,
            problems=problems,
            missing_images=missing,
            root=root_text,
            dropped_items=dropped,
        )

    if root_text is None:
        raise ConfigError("a data root is needed unless annotation files are given")
    if not os.path.isdir(root_text):
        raise ConfigError(f"{root_text}: not a folder")
    listings = list(walk_names(root_text, workers))
    unreadable = [listing for listing in listings if listing.error]
    problems = [
        CatalogProblem(
            listing.path,
            None,
            f"cannot read this folder ({listing.error.removeprefix(listing.path + ': ')}); "
            "its images are left out",
        )
        for listing in unreadable
    ]
    problems += [
        CatalogProblem(path, None, f"cannot read it ({reason}); left out")
        for listing in listings
        for path, _, reason in (error.rpartition(": ") for error in listing.entry_errors)
    ]
    problems += [
        CatalogProblem(
            linked,
            None,
            "a symbolic link to a folder: not followed, its images are left out (link the images "
            "instead, or run over the folder it points to)",
        )
        for listing in listings
        for linked in listing.linked_dirs
    ]
    chosen, reason = _pick_layout(root_text, listings, layout)
    kind = _context_kind(chosen, context)
    if chosen == "plain":
        return Catalog(
            build_plain(root_text, listings),
            "plain",
            reason,
            kind,
            problems,
            root=root_text,
            unreadable_folders=len(unreadable),
        )
    items, builder = build_episodes(root_text, listings, max_history, kind == "sequence")
    return Catalog(
        items,
        "episodes",
        reason,
        kind,
        problems=problems + builder.problems,
        root=root_text,
        max_history=max_history,
        episodes=len(builder.episodes),
        ignored_files=builder.ignored,
        ignored_examples=builder.ignored_examples,
        unreadable_folders=len(unreadable),
    )


def _context_kind(layout: str, context: str) -> str:
    if context == "auto":
        return "none" if layout == "plain" else "sequence"
    if context == "sequence" and layout == "plain":
        raise ConfigError(
            "context 'sequence' needs ordered frames: use the episodes or annotations layout, "
            "or context 'none' for plain images"
        )
    return context


def _pick_layout(root: str, listings: list[NameListing], layout: str) -> tuple[str, str]:
    total = sum(len(listing.images) for listing in listings)
    steps = sum(1 for listing in listings for name in listing.images if step_index(name) is not None)
    if layout == "episodes":
        if not steps:
            return "episodes", f"episodes layout requested, but no step_<idx>_<ACTION> images under {root}"
        return "episodes", f"episodes layout requested ({steps} of {total} images are step images)"
    if layout == "plain":
        return "plain", f"plain layout requested ({total} images)"
    if total and steps > EPISODE_MAJORITY * total:
        return "episodes", f"{steps} of {total} images are named step_<idx>_<ACTION>, so episodes"
    if not total:
        return "plain", f"no images under {root}, so plain"
    return "plain", f"only {steps} of {total} images are named step_<idx>_<ACTION>, so plain"
