"""Preprocessing presets: data that fully describes how an image becomes the VGGT input tensor.

Each preset reproduces one reference loader bit for bit (see docs/preprocessing.md). The
canonical JSON of a preset's fields is hashed into `Preset.fingerprint`, which sidecars record:
two presets with the same fingerprint produce the same tensors.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from vggtctl.errors import ConfigError, ImageError
from vggtctl.keys import fingerprint_json
from vggtctl.preprocess import decode, qwen

_FILTERS = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "lanczos": Image.Resampling.LANCZOS,
    "nearest": Image.Resampling.NEAREST,
}


# k/255 for every byte value k, with the same float32 division as torchvision's to_tensor: a
# lookup in this table gives, on any device, the very values the division gives on the CPU
# (CUDA divides by a scalar as a multiply by its reciprocal, which can differ in the last bit).
_UNIT_TABLE = torch.arange(256, dtype=torch.float32).div_(255)


@functools.cache
def _unit_table(device: torch.device) -> torch.Tensor:
    # one copy per device, made once: a copy per batch from pageable memory would block the host
    return _UNIT_TABLE.to(device)


def unit_pixels(pixels: torch.Tensor) -> torch.Tensor:
    """The model's float32 input from a preset's `pixels`: bytes k become k/255, on their device.

    Float pixels (a preset that resizes after the byte stage) are returned as they are.
    """
    if pixels.dtype != torch.uint8:
        return pixels
    return _unit_table(pixels.device)[pixels.long()]


@dataclass(frozen=True)
class PreprocessedImage:
    """One image ready for the model, plus the facts a sidecar records about it.

    `pixels` is the compact form: uint8 [3, H, W] whenever every value of the model input is
    k/255 (the pad value 1.0 is 255), which is a quarter of the bytes decode workers send
    through shared memory and the host sends to the GPU; float32 when a later bilinear step
    mixed them. `tensor` is the model input itself (`unit_pixels`).
    """

    pixels: torch.Tensor  # uint8 [3, H, W] (k stands for k/255) or float32 [3, H, W]
    input_hw: tuple[int, int]  # (H, W) of `tensor`: what the model is fed
    grid_hw: tuple[int, int]  # (H, W) // VGGT patch size: the patch grid of the features
    source_hw: tuple[int, int]  # decoded image size (after EXIF transpose when the preset applies it)
    exif_orientation: int  # the file's EXIF orientation tag (1 when absent), applied or not
    qwen_grid_thw: tuple[int, int, int] | None  # the Qwen processor's grid (presets with the grid step)
    preset: str
    fingerprint: str

    @property
    def tensor(self) -> torch.Tensor:
        """float32 [3, H, W]: values k/255 (pad 1.0), or bilinear mixes of them."""
        return unit_pixels(self.pixels)

    def to_meta(self) -> dict[str, Any]:
        """The `preprocess` section of a sidecar's meta."""
        return {
            "fingerprint": self.fingerprint,
            "preset": self.preset,
            "input_hw": list(self.input_hw),
            "grid_hw": list(self.grid_hw),
        }


@dataclass(frozen=True)
class Preset:
    """How one reference loader turns an image into a VGGT input (all fields are fingerprinted).

    mode "crop": width -> target, height by aspect (rounded to the VGGT patch), centre-crop rows
    beyond target. mode "pad": longer side -> target, shorter by aspect, pad to a target square.
    With `qwen_grid`, the tensor is then resized (bilinear) so its patch grid equals the grid the
    Qwen2-VL processor computes for the same image with `patch_size` and `merge_size`.
    """

    name: str
    mode: Literal["crop", "pad"]
    target_size: int
    exif_transpose: bool
    resize_filter: str = "bicubic"
    pad_value: float = 1.0
    vggt_patch_size: int = 14
    qwen_grid: bool = False
    patch_size: int | None = None  # Qwen vision patch size (only with qwen_grid)
    merge_size: int | None = None  # Qwen spatial merge size (only with qwen_grid)
    grid_resize: str | None = None  # "bilinear" (align_corners False); only with qwen_grid

    def __post_init__(self) -> None:
        if self.mode not in ("crop", "pad"):
            raise ConfigError(f"preset {self.name!r}: mode must be 'crop' or 'pad', got {self.mode!r}")
        if self.resize_filter not in _FILTERS:
            raise ConfigError(f"preset {self.name!r}: unknown resize filter {self.resize_filter!r}")
        if self.target_size <= 0 or self.target_size % self.vggt_patch_size:
            raise ConfigError(
                f"preset {self.name!r}: target size {self.target_size} is not a positive multiple "
                f"of the VGGT patch size {self.vggt_patch_size}"
            )
        qwen_fields = (self.patch_size, self.merge_size, self.grid_resize)
        if self.qwen_grid:
            if not all(isinstance(v, int) and v > 0 for v in (self.patch_size, self.merge_size)):
                raise ConfigError(f"preset {self.name!r}: the grid step needs positive patch and merge sizes")
            if self.grid_resize != "bilinear":
                raise ConfigError(f"preset {self.name!r}: grid resize must be 'bilinear'")
        elif any(v is not None for v in qwen_fields):
            raise ConfigError(f"preset {self.name!r}: patch/merge/grid_resize only apply with qwen_grid")

    # ------------------------------------------------------------------ identity

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @cached_property
    def fingerprint(self) -> str:
        """sha256 of the canonical JSON of every field."""
        return fingerprint_json(self.to_dict())

    # ------------------------------------------------------------------ entry points

    def import_dependencies(self) -> None:
        """Import now what `load` would import on its first image (transformers, for the grid step).

        Called in the main process before decode workers fork: each worker then inherits the
        module instead of importing transformers on its first image (2.5 s on a 2-vCPU VM; 15
        workers of 8 ranks importing at once from a shared file system is far slower). Failing
        to import is left to `load`, which reports it per image.
        """
        if self.qwen_grid:
            with contextlib.suppress(ImportError):
                qwen.smart_resize_fn()

    def load(self, path: str | os.PathLike[str]) -> PreprocessedImage:
        """Decode `path` and preprocess it; bad files raise ImageError(path, reason)."""
        name = os.fspath(path)
        with decode.open_image(name) as img:
            return self._run(img, name, owned=True)

    def from_pil(self, img: Image.Image, name: str = "<image>") -> PreprocessedImage:
        """Preprocess an already opened image (not modified); `name` labels errors and warnings."""
        try:
            img.load()
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            raise ImageError(name, f"{decode.TRUNCATED} or corrupt image data ({exc})") from None
        return self._run(img, name, owned=False)

    # ------------------------------------------------------------------ pipeline

    def _run(self, img: Image.Image, name: str, *, owned: bool) -> PreprocessedImage:
        rgb, orientation = decode.to_rgb(img, name, apply_exif=self.exif_transpose, owned=owned)
        width, height = rgb.size
        pixels = self._resize_to_bytes(rgb, name)
        grid_thw = None
        if self.qwen_grid:
            pixels, grid_thw = self._grid_step(pixels, name)
        h, w = pixels.shape[1:]
        return PreprocessedImage(
            pixels=pixels,
            input_hw=(h, w),
            grid_hw=(h // self.vggt_patch_size, w // self.vggt_patch_size),
            source_hw=(height, width),
            exif_orientation=orientation,
            qwen_grid_thw=grid_thw,
            preset=self.name,
            fingerprint=self.fingerprint,
        )

    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) after the aspect-preserving resize, with the references' arithmetic."""
        target, patch = self.target_size, self.vggt_patch_size
        if self.mode == "pad" and width < height:
            return round(width * (target / height) / patch) * patch, target
        return target, round(height * (target / width) / patch) * patch

    def _resize_to_bytes(self, rgb: Image.Image, name: str) -> torch.Tensor:
        """uint8 [3, H, W] (float32 k/255 where the pad value is no byte value)."""
        width, height = rgb.size
        new_w, new_h = self.resized_size(width, height)
        if new_w <= 0 or new_h <= 0:
            raise ImageError(
                name,
                f"{decode.UNSUPPORTED_SIZE} {width}x{height}: one side rounds to 0 pixels at {new_w}x{new_h}",
            )
        resized = torch.from_numpy(np.array(rgb.resize((new_w, new_h), _FILTERS[self.resize_filter])))
        pixels = resized.permute(2, 0, 1)  # uint8 CHW view of the HWC array
        target = self.target_size
        if self.mode == "crop":
            if new_h > target:
                top = (new_h - target) // 2
                pixels = pixels[:, top : top + target]
            return pixels.contiguous()
        pad = self.pad_value * 255
        if pad == int(pad) and 0 <= pad <= 255:
            out = torch.full((3, target, target), int(pad), dtype=torch.uint8)
        else:
            out = torch.full((3, target, target), self.pad_value, dtype=torch.float32)
            pixels = unit_pixels(pixels)
        top, left = (target - new_h) // 2, (target - new_w) // 2
        out[:, top : top + new_h, left : left + new_w] = pixels
        return out

    def _grid_step(self, pixels: torch.Tensor, name: str) -> tuple[torch.Tensor, tuple[int, int, int]]:
        assert self.patch_size is not None and self.merge_size is not None
        h, w = pixels.shape[1:]
        try:
            grid = qwen.qwen_grid_thw(h, w, self.patch_size, self.merge_size)
        except ValueError as exc:
            raise ImageError(name, f"{decode.UNSUPPORTED_SIZE} for the Qwen grid ({exc})") from None
        size = (grid[1] * self.vggt_patch_size, grid[2] * self.vggt_patch_size)
        if size != (h, w):  # the bilinear mix leaves the byte values: float32 from here on
            unit = unit_pixels(pixels)[None]
            pixels = F.interpolate(unit, size=size, mode="bilinear", align_corners=False)[0]
        return pixels, grid


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(name="vggt-crop-518", mode="crop", target_size=518, exif_transpose=True),
        Preset(name="vggt-pad-518", mode="pad", target_size=518, exif_transpose=True),
        Preset(
            name="janusvln",
            mode="pad",
            target_size=644,
            exif_transpose=False,
            qwen_grid=True,
            patch_size=qwen.DEFAULT_PATCH_SIZE,
            merge_size=qwen.DEFAULT_MERGE_SIZE,
            grid_resize="bilinear",
        ),
    )
}


def get_preset(
    name: str, *, patch_size: int = qwen.DEFAULT_PATCH_SIZE, merge_size: int = qwen.DEFAULT_MERGE_SIZE
) -> Preset:
    """The named preset; patch/merge (from `qwen_patch_merge`) apply to presets with the grid step.

    Presets without the grid step ignore them, so their fingerprint never depends on the Qwen model.
    """
    try:
        preset = PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preprocessing preset {name!r} (known: {', '.join(PRESETS)})") from None
    if not preset.qwen_grid or (preset.patch_size, preset.merge_size) == (patch_size, merge_size):
        return preset
    return dataclasses.replace(preset, patch_size=patch_size, merge_size=merge_size)
