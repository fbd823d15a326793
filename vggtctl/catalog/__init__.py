"""Training layouts -> Items (ordered frames, current image last): episodes, annotations, plain.

`load_catalog` picks or obeys a layout and a context kind; `item_frames_for_key` turns an Item
into the (relative name, ImageKey) pairs a context signature is computed from.
"""

from vggtctl.catalog.auto import LAYOUTS, load_catalog
from vggtctl.catalog.base import Catalog, CatalogProblem, Item, frame_names, item_frames_for_key
from vggtctl.catalog.episodes import STEP_PATTERN, history_positions

__all__ = [
    "LAYOUTS",
    "STEP_PATTERN",
    "Catalog",
    "CatalogProblem",
    "Item",
    "frame_names",
    "history_positions",
    "item_frames_for_key",
    "load_catalog",
]
