"""The Qwen2-VL side of the janusvln preset: transformers' `smart_resize` and patch/merge sizes.

`smart_resize` is imported from transformers, never re-derived, so the grid follows whatever
the installed processor does. Its home moved between releases: transformers 4.x keeps it in
`image_processing_qwen2_vl` (no torchvision needed); 5.x moved the torchvision-free copy to
`image_processing_pil_qwen2_vl` and the old module now imports torchvision.
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

from vggtctl.errors import ConfigError

DEFAULT_PATCH_SIZE = 14
DEFAULT_MERGE_SIZE = 2

_SMART_RESIZE_MODULES = (
    "transformers.models.qwen2_vl.image_processing_pil_qwen2_vl",  # transformers 5.x
    "transformers.models.qwen2_vl.image_processing_qwen2_vl",  # transformers 4.x
)

SmartResize = Callable[..., tuple[int, int]]


@lru_cache(maxsize=1)
def smart_resize_fn() -> SmartResize:
    """transformers' Qwen2-VL `smart_resize`, from the first module that imports cleanly."""
    failures = []
    for module_name in _SMART_RESIZE_MODULES:
        try:
            fn = importlib.import_module(module_name).smart_resize
        except (ImportError, AttributeError) as exc:
            failures.append(f"{module_name}: {exc}")
            continue
        return fn
    raise ImportError("cannot import Qwen2-VL smart_resize from transformers: " + "; ".join(failures))


def qwen_grid_thw(height: int, width: int, patch_size: int, merge_size: int) -> tuple[int, int, int]:
    """`image_grid_thw` of one image of `height` x `width` when min_pixels = max_pixels = its area.

    The image is first cropped to multiples of patch*merge, as the trainer does before calling
    the processor; the processor then resizes with `smart_resize` and counts patches.
    """
    factor = patch_size * merge_size
    crop_h, crop_w = height // factor * factor, width // factor * factor
    if crop_h == 0 or crop_w == 0:
        raise ValueError(f"{height}x{width} is smaller than one {factor}x{factor} merged patch")
    area = crop_h * crop_w
    resized_h, resized_w = smart_resize_fn()(crop_h, crop_w, factor=factor, min_pixels=area, max_pixels=area)
    return 1, resized_h // patch_size, resized_w // patch_size


def qwen_patch_merge(model_dir: str | os.PathLike[str]) -> tuple[int, int]:
    """(patch_size, merge_size) of a local Qwen-VL model folder.

    Reads `preprocessor_config.json` (`patch_size`, `merge_size`); a folder without it falls
    back to `config.json`'s `vision_config` (`patch_size`, `spatial_merge_size`). Missing keys
    default to 14 and 2, the Qwen2-VL values.
    """
    folder = Path(model_dir)
    for file_name, patch_key, merge_key in (
        ("preprocessor_config.json", "patch_size", "merge_size"),
        ("config.json", "patch_size", "spatial_merge_size"),
    ):
        path = folder / file_name
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError(f"{path}: cannot read ({exc})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a JSON object")
        if file_name == "config.json":
            data = data.get("vision_config")
            if not isinstance(data, dict):
                continue
        patch = data.get(patch_key, DEFAULT_PATCH_SIZE)
        merge = data.get(merge_key, DEFAULT_MERGE_SIZE)
        for key, value in ((patch_key, patch), (merge_key, merge)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{path}: {key} must be a positive integer, got {value!r}")
        return patch, merge
    raise ConfigError(f"{folder}: no preprocessor_config.json (or config.json with a vision_config) found")
