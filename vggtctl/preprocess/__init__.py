"""Trainer-exact image preprocessing presets (see docs/preprocessing.md)."""

from vggtctl.preprocess.decode import ExifOrientationIgnoredWarning, reset_exif_warning
from vggtctl.preprocess.presets import PRESETS, PreprocessedImage, Preset, get_preset, unit_pixels
from vggtctl.preprocess.qwen import qwen_grid_thw, qwen_patch_merge, smart_resize_fn

__all__ = [
    "PRESETS",
    "ExifOrientationIgnoredWarning",
    "PreprocessedImage",
    "Preset",
    "get_preset",
    "qwen_grid_thw",
    "qwen_patch_merge",
    "reset_exif_warning",
    "smart_resize_fn",
    "unit_pixels",
]
