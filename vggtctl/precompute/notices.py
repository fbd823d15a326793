"""What a run says before it starts: what the catalog left out, and what the run would change.

Lines for stderr (rank 0 prints them, also for --dry-run, where they matter most); each names
the file it is about, so a user can act on it.
"""

from __future__ import annotations

import os
from typing import Any

from vggtctl.catalog import Catalog

SHOWN = 10  # per kind of notice; then a count


def settings_notice(changes: list[str], limited: bool = False) -> list[str]:
    if not changes:
        return []
    if limited:  # see pipeline._record_manifest
        return [
            f"note: these settings differ from the root's current ones ({'; '.join(changes)}); "
            "this run has --limit, so it is a trial: the current settings stay as they are (a run "
            "without --limit makes new settings current); the items it encodes get sidecars for the "
            "trial's settings in place of their current ones (one sidecar per image), and a normal "
            "run encodes them again"
        ]
    return [
        f"note: these settings differ from the root's current ones ({'; '.join(changes)}); a run "
        "with them that finishes makes them current, and verify, status, prune and training then "
        "judge every sidecar by them: sidecars cached with the old ones no longer count as valid "
        "(stopped before it finishes, the current ones stay)"
    ]


def catalog_notices(catalog: Catalog, root: str | os.PathLike[str], items: list[Any]) -> list[str]:
    """Catalog problems, images the annotations name but that do not exist, and items whose
    image lies outside the root (their sidecars are written next to them, where status,
    verify and prune of this root do not look)."""
    lines = [str(problem) for problem in catalog.problems[:SHOWN]]
    if len(catalog.problems) > SHOWN:
        lines.append(f"... and {len(catalog.problems) - SHOWN} more catalog problems")
    missing = catalog.missing_images
    lines += [
        f"{path}: {'a folder, not an image' if os.path.isdir(path) else 'image not found'} "
        "(named by the annotations; its samples are left out)"
        for path in missing[:SHOWN]
    ]
    if len(missing) > SHOWN:
        lines.append(f"... and {len(missing) - SHOWN} more missing images")
    top = os.path.join(os.path.abspath(root), "")
    outside = [item.image for item in items if not item.image.startswith(top)]
    if outside:
        lines.append(
            f"note: {len(outside)} annotated images lie outside {os.path.abspath(root)} (e.g. {outside[0]}); "
            "their sidecars are written next to them, where status, verify and prune of this root "
            "do not look"
        )
    return lines
