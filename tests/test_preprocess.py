"""Preprocessing presets against the golden reference tensors, plus bad-file and EXIF handling."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

from vggtctl import sidecar
from vggtctl.errors import ConfigError, ImageError
from vggtctl.keys import ContextSettings, ImageKey, ModelKey
from vggtctl.preprocess import (
    PRESETS,
    ExifOrientationIgnoredWarning,
    PreprocessedImage,
    Preset,
    get_preset,
    qwen_grid_thw,
    qwen_patch_merge,
    reset_exif_warning,
    smart_resize_fn,
    unit_pixels,
)
from vggtctl.preprocess import qwen as qwen_mod

GOLDEN = Path(__file__).parent / "data" / "golden_preprocess"
MANIFEST = json.loads((GOLDEN / "preprocess.json").read_text())
IMAGES = sorted(MANIFEST["images"])
# preset name -> key of the golden entry it must reproduce
GOLDEN_KEY = {"vggt-crop-518": "official_crop", "vggt-pad-518": "official_pad", "janusvln": "janus_vggt"}
TOL = 1e-6


def golden_tensor(rel: str) -> torch.Tensor:
    """Decode a golden PNG as its README says: uint8 HWC -> float32 / 255 -> CHW."""
    with Image.open(GOLDEN / rel) as img:
        arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(arr.astype(np.float32) / np.float32(255)).permute(2, 0, 1)


def pad_518_with_grid_step() -> Preset:
    """The golden's grid-step case: the Qwen grid step applied to the upstream pad-518 output."""
    return dataclasses.replace(
        get_preset("vggt-pad-518"),
        name="vggt-pad-518+grid",
        qwen_grid=True,
        patch_size=14,
        merge_size=2,
        grid_resize="bilinear",
    )


@pytest.fixture(autouse=True)
def _rearm_exif_warning():
    reset_exif_warning()
    yield
    reset_exif_warning()


# ----------------------------------------------------------------------------- golden parity


@pytest.mark.parametrize("preset_name", sorted(GOLDEN_KEY))
@pytest.mark.parametrize("image", IMAGES)
def test_matches_golden_tensor(image: str, preset_name: str) -> None:
    entry = MANIFEST["images"][image]
    gold = entry[GOLDEN_KEY[preset_name]]
    want = golden_tensor(gold["png"])
    assert list(want.shape) == gold["shape"][-3:]

    got = get_preset(preset_name).load(GOLDEN / entry["file"])

    assert got.tensor.dtype == torch.float32
    assert got.tensor.is_contiguous()
    assert got.tensor.shape == want.shape
    # PIL's bicubic is integer arithmetic and k/255 is one correctly rounded division, so the
    # tensors agree bit for bit (a multiply by 1/255 would already differ in the last bit).
    assert torch.equal(got.tensor, want)
    h, w = want.shape[1:]
    assert got.input_hw == (h, w)
    assert got.grid_hw == (h // 14, w // 14)
    assert got.source_hw == tuple(reversed(entry["size_wh"]))
    if "grid_thw" in gold:
        assert got.qwen_grid_thw == tuple(gold["grid_thw"])
    else:
        assert got.qwen_grid_thw is None


@pytest.mark.parametrize("preset_name", sorted(GOLDEN_KEY))
@pytest.mark.parametrize("image", IMAGES)
def test_compact_pixels_are_the_golden_tensor_in_bytes(image: str, preset_name: str) -> None:
    """Decode workers send `pixels` (a quarter of the float bytes); k/255 of them is the golden."""
    entry = MANIFEST["images"][image]
    got = get_preset(preset_name).load(GOLDEN / entry["file"])
    assert got.pixels.dtype == torch.uint8
    assert torch.equal(unit_pixels(got.pixels), golden_tensor(entry[GOLDEN_KEY[preset_name]]["png"]))


def test_unit_pixels_is_the_division_for_every_byte_and_leaves_floats_alone() -> None:
    every = torch.arange(256, dtype=torch.uint8).reshape(1, 16, 16).expand(3, 16, 16)
    got = unit_pixels(every)
    assert got.dtype == torch.float32 and got.shape == (3, 16, 16)
    # numpy's float32 division, independent of torch: one correctly rounded quotient per byte
    want = torch.from_numpy(np.arange(256, dtype=np.float32) / np.float32(255)).reshape(1, 16, 16)
    assert torch.equal(got, want.expand(3, 16, 16))
    assert got[0, 15, 15].item() == 1.0  # the pad value 1.0 travels as 255
    floats = torch.rand(3, 4, 4)
    assert unit_pixels(floats) is floats


def test_pixels_stay_float_where_no_byte_value_holds_them() -> None:
    """A bilinear grid step mixes neighbours; a pad value of no k/255 cannot be a byte either."""
    image = Image.open(GOLDEN / "images" / "rgba_300x200.png")
    resized = pad_518_with_grid_step().from_pil(image, "grid.png")
    assert resized.pixels.dtype == torch.float32 and resized.tensor is resized.pixels
    grey = dataclasses.replace(get_preset("vggt-pad-518"), name="grey-pad", pad_value=0.5)
    padded = grey.from_pil(image, "grey.png")
    assert padded.pixels.dtype == torch.float32
    assert padded.tensor[:, 0, 0].tolist() == [0.5] * 3  # the pad rows of a 300x200 image
    white = get_preset("vggt-pad-518").from_pil(image, "white.png").tensor
    inside = padded.tensor != 0.5
    assert torch.equal(padded.tensor[inside], white[inside])  # the image itself is the same


@pytest.mark.parametrize("image", IMAGES)
def test_grid_step_on_pad_518_matches_golden(image: str) -> None:
    entry = MANIFEST["images"][image]
    gold = entry["grid_step_on_official_pad518"]
    sub = load_file(GOLDEN / "preprocess_grid518_sub7.safetensors")[gold["subsample_key"]]

    got = pad_518_with_grid_step().load(GOLDEN / entry["file"])

    assert got.qwen_grid_thw == tuple(gold["grid_thw"])
    assert list(got.tensor.shape) == gold["shape"]
    assert got.grid_hw == tuple(gold["grid_thw"][1:])
    assert (got.tensor[:, ::7, ::7] - sub).abs().max().item() <= TOL
    full = got.tensor.double()
    stats = gold["stats_float64"]
    # Same float32 bilinear kernel as the reference: only summation order could differ.
    assert full.sum().item() == pytest.approx(stats["sum"], rel=TOL)
    assert (full * full).sum().item() == pytest.approx(stats["sum_sq"], rel=TOL)
    assert full.min().item() == pytest.approx(stats["min"], abs=TOL)
    assert full.max().item() == pytest.approx(stats["max"], abs=TOL)


def test_from_pil_equals_load() -> None:
    path = GOLDEN / "images" / "rgba_300x200.png"
    for preset in PRESETS.values():
        with Image.open(path) as img:
            got = preset.from_pil(img, "mem.png")
            assert img.mode == "RGBA"  # the caller's image is left alone
        assert torch.equal(got.tensor, preset.load(path).tensor)


def test_patch_merge_override_changes_grid() -> None:
    # Qwen3-VL-like 16x2: 644 is cropped to 640, grid 40x40, VGGT tensor resized to 40*14 = 560.
    entry = MANIFEST["images"]["rgb_640x480.jpg"]
    got = get_preset("janusvln", patch_size=16, merge_size=2).load(GOLDEN / entry["file"])
    assert got.qwen_grid_thw == (1, 40, 40)
    assert got.input_hw == (560, 560)
    assert got.grid_hw == (40, 40)
    base = golden_tensor(entry["janus_vggt"]["png"])
    want = F.interpolate(base[None], size=(560, 560), mode="bilinear", align_corners=False)[0]
    assert (got.tensor - want).abs().max().item() <= TOL


def test_qwen_grid_uses_cropped_multiples() -> None:
    assert qwen_grid_thw(644, 644, 14, 2) == (1, 46, 46)
    assert qwen_grid_thw(518, 518, 14, 2) == (1, 36, 36)
    assert qwen_grid_thw(518, 392, 14, 2) == (1, 36, 28)
    with pytest.raises(ValueError):
        qwen_grid_thw(20, 644, 14, 2)


def test_to_meta_fits_sidecar() -> None:
    got = get_preset("vggt-crop-518").load(GOLDEN / "images" / "rgb_640x480.jpg")
    meta = got.to_meta()
    assert meta == {
        "fingerprint": get_preset("vggt-crop-518").fingerprint,
        "preset": "vggt-crop-518",
        "input_hw": [392, 518],
        "grid_hw": [28, 37],
    }
    built = sidecar.build_meta(
        image_name="rgb_640x480.jpg",
        image_key=ImageKey(size=1, mtime_ns=1),
        model=ModelKey(fingerprint="f", name="m", layer=22, attention="full", dtype="float32"),
        preprocess=meta,
        context=ContextSettings(),
        frames=[],
        signature=None,
    )
    assert built["preprocess"] == meta


# ----------------------------------------------------------------------------- presets as data


def test_fingerprint_is_sha256_of_canonical_fields() -> None:
    expected_fields = {
        "name": "janusvln",
        "mode": "pad",
        "target_size": 644,
        "exif_transpose": False,
        "resize_filter": "bicubic",
        "pad_value": 1.0,
        "vggt_patch_size": 14,
        "qwen_grid": True,
        "patch_size": 14,
        "merge_size": 2,
        "grid_resize": "bilinear",
    }
    canonical = json.dumps(expected_fields, sort_keys=True, separators=(",", ":"))
    assert get_preset("janusvln").fingerprint == hashlib.sha256(canonical.encode()).hexdigest()


def test_fingerprints_distinct_and_stable() -> None:
    prints = {name: get_preset(name).fingerprint for name in PRESETS}
    assert len(set(prints.values())) == 3
    assert all(len(fp) == 64 for fp in prints.values())
    # Rebuilding a preset from its fields gives the same fingerprint.
    for preset in PRESETS.values():
        assert Preset(**preset.to_dict()).fingerprint == preset.fingerprint


def test_patch_merge_only_affects_grid_presets() -> None:
    base = get_preset("janusvln")
    assert get_preset("janusvln", patch_size=14, merge_size=2) == base
    assert get_preset("janusvln", patch_size=16).fingerprint != base.fingerprint
    assert get_preset("janusvln", merge_size=3).fingerprint != base.fingerprint
    for name in ("vggt-crop-518", "vggt-pad-518"):
        assert get_preset(name, patch_size=16, merge_size=3).fingerprint == get_preset(name).fingerprint


def test_preset_parameters() -> None:
    crop, pad, janus = (get_preset(n) for n in ("vggt-crop-518", "vggt-pad-518", "janusvln"))
    assert (crop.mode, crop.target_size, crop.exif_transpose, crop.qwen_grid) == ("crop", 518, True, False)
    assert (pad.mode, pad.target_size, pad.exif_transpose, pad.qwen_grid) == ("pad", 518, True, False)
    assert (janus.mode, janus.target_size, janus.exif_transpose, janus.qwen_grid) == ("pad", 644, False, True)
    with pytest.raises(dataclasses.FrozenInstanceError):
        crop.target_size = 1  # type: ignore[misc]


def test_unknown_preset_and_bad_parameters() -> None:
    with pytest.raises(ConfigError, match="vggt-crop-518"):
        get_preset("nope")
    with pytest.raises(ConfigError):
        Preset(name="x", mode="stretch", target_size=518, exif_transpose=True)  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        Preset(name="x", mode="crop", target_size=500, exif_transpose=True)
    with pytest.raises(ConfigError):
        Preset(name="x", mode="crop", target_size=518, exif_transpose=True, patch_size=14)
    with pytest.raises(ConfigError):
        Preset(name="x", mode="pad", target_size=518, exif_transpose=True, qwen_grid=True)


def test_resized_size_uses_python_round() -> None:
    crop, pad = get_preset("vggt-crop-518"), get_preset("vggt-pad-518")
    # 518*480/640 = 388.5 -> /14 = 27.75 -> 28*14 = 392; tall 480x640 -> 690.67/14 = 49.33 -> 686.
    assert crop.resized_size(640, 480) == (518, 392)
    assert crop.resized_size(480, 640) == (518, 686)
    assert pad.resized_size(480, 640) == (392, 518)
    # 7*518/518 = 7 -> 7/14 = 0.5: Python's round() goes to even (0), not up (14).
    assert crop.resized_size(518, 7) == (518, 0)
    assert crop.resized_size(518, 21) == (518, 28)  # 1.5 -> 2


# ----------------------------------------------------------------------------- qwen helpers


def test_smart_resize_comes_from_transformers() -> None:
    fn = smart_resize_fn()
    assert fn.__module__.startswith("transformers.models.qwen2_vl.")
    assert fn(644, 644, factor=28, min_pixels=644 * 644, max_pixels=644 * 644) == (644, 644)


def test_smart_resize_import_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    modules = ("vggtctl_no_such_module.image_processing", *qwen_mod._SMART_RESIZE_MODULES)
    monkeypatch.setattr(qwen_mod, "_SMART_RESIZE_MODULES", modules)
    qwen_mod.smart_resize_fn.cache_clear()
    try:
        assert qwen_mod.smart_resize_fn().__name__ == "smart_resize"
        monkeypatch.setattr(qwen_mod, "_SMART_RESIZE_MODULES", ("vggtctl_no_such_module.x", "json"))
        qwen_mod.smart_resize_fn.cache_clear()
        with pytest.raises(ImportError, match="smart_resize"):
            qwen_mod.smart_resize_fn()
    finally:
        qwen_mod.smart_resize_fn.cache_clear()


def test_qwen_patch_merge(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "preprocessor_config.json").write_text('{"patch_size": 16, "merge_size": 2}')
    assert qwen_patch_merge(tmp_path / "a") == (16, 2)

    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "preprocessor_config.json").write_text('{"temporal_patch_size": 2}')
    assert qwen_patch_merge(tmp_path / "b") == (14, 2)

    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "config.json").write_text(
        '{"vision_config": {"patch_size": 16, "spatial_merge_size": 3}}'
    )
    assert qwen_patch_merge(tmp_path / "c") == (16, 3)

    (tmp_path / "d").mkdir()
    with pytest.raises(ConfigError, match=r"preprocessor_config\.json"):
        qwen_patch_merge(tmp_path / "d")

    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "preprocessor_config.json").write_text("{not json")
    with pytest.raises(ConfigError):
        qwen_patch_merge(tmp_path / "e")

    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "preprocessor_config.json").write_text('{"patch_size": 0}')
    with pytest.raises(ConfigError, match="patch_size"):
        qwen_patch_merge(tmp_path / "f")


# ----------------------------------------------------------------------------- EXIF


def _marked_image(w: int = 60, h: int = 40) -> Image.Image:
    """A non-symmetric RGB picture, so any rotation or flip shows in the pixels."""
    y, x = np.mgrid[0:h, 0:w]
    arr = np.stack([x * 255 // (w - 1), y * 255 // (h - 1), (x * y) % 256], axis=-1).astype(np.uint8)
    return Image.fromarray(arr, "RGB")


def _save_with_orientation(img: Image.Image, path: Path, orientation: int) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    img.save(path, exif=exif)


@pytest.mark.parametrize(("orientation", "rot90_k"), [(3, 2), (6, -1), (8, 1)])
def test_upstream_presets_apply_exif(tmp_path: Path, orientation: int, rot90_k: int) -> None:
    base = _marked_image()
    tagged = tmp_path / "tagged.png"
    _save_with_orientation(base, tagged, orientation)
    upright = tmp_path / "upright.png"
    Image.fromarray(np.ascontiguousarray(np.rot90(np.asarray(base), k=rot90_k))).save(upright)

    for name in ("vggt-crop-518", "vggt-pad-518"):
        got = get_preset(name).load(tagged)
        want = get_preset(name).load(upright)
        assert got.exif_orientation == orientation
        assert got.source_hw == want.source_hw
        assert torch.equal(got.tensor, want.tensor)


def test_janusvln_ignores_exif_and_warns_once(tmp_path: Path) -> None:
    base = _marked_image()
    plain = tmp_path / "plain.png"
    base.save(plain)
    tagged = [tmp_path / f"tagged{i}.png" for i in range(2)]
    for path in tagged:
        _save_with_orientation(base, path, 6)
    janus = get_preset("janusvln")

    with pytest.warns(ExifOrientationIgnoredWarning, match="tagged0.png"):
        first = janus.load(tagged[0])
    assert first.exif_orientation == 6
    assert first.source_hw == (40, 60)
    assert torch.equal(first.tensor, janus.load(plain).tensor)

    with warnings.catch_warnings():
        warnings.simplefilter("error", ExifOrientationIgnoredWarning)
        janus.load(tagged[1])  # already reported in this run

    reset_exif_warning()
    with pytest.warns(ExifOrientationIgnoredWarning):
        janus.load(tagged[1])


def test_orientation_one_does_not_warn(tmp_path: Path) -> None:
    path = tmp_path / "one.png"
    _save_with_orientation(_marked_image(), path, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ExifOrientationIgnoredWarning)
        assert get_preset("janusvln").load(path).exif_orientation == 1


def test_from_pil_applies_exif_without_mutating(tmp_path: Path) -> None:
    path = tmp_path / "tagged.png"
    _save_with_orientation(_marked_image(), path, 6)
    with Image.open(path) as img:
        got = get_preset("vggt-pad-518").from_pil(img, "tagged.png")
        assert img.size == (60, 40)
    assert got.source_hw == (60, 40)


# ----------------------------------------------------------------------------- modes


def test_modes_convert_like_pil(tmp_path: Path) -> None:
    # CMYK converts (the reference converts everything after the RGBA composite): no ink is white,
    # full black ink is black.
    cmyk = Image.new("CMYK", (30, 20), (0, 0, 0, 0))
    cmyk.paste((0, 0, 0, 255), (0, 0, 15, 20))
    cmyk.save(tmp_path / "cmyk.tif")
    got = get_preset("vggt-crop-518").load(tmp_path / "cmyk.tif").tensor
    assert got[:, :, :200].max().item() == 0.0
    assert got[:, :, 320:].min().item() == 1.0

    # 16-bit greyscale converts (PIL clamps to 8 bits); it is not rejected.
    deep = Image.fromarray(np.full((20, 30), 40000, dtype=np.uint16))
    deep.save(tmp_path / "deep.png")
    assert get_preset("vggt-pad-518").load(tmp_path / "deep.png").tensor.shape == (3, 518, 518)


def test_rgba_transparent_becomes_white_and_la_drops_alpha(tmp_path: Path) -> None:
    clear = Image.new("RGBA", (28, 28), (10, 20, 30, 0))
    got = get_preset("vggt-crop-518").from_pil(clear).tensor
    assert torch.all(got == 1.0)
    # Only RGBA is composited in the references; LA keeps its grey value.
    la = Image.new("LA", (28, 28), (51, 0))
    got = get_preset("vggt-crop-518").from_pil(la).tensor
    assert torch.allclose(got, torch.full_like(got, 51 / 255), atol=TOL)


def test_unconvertible_mode_is_rejected() -> None:
    with pytest.raises(ImageError, match="unsupported mode") as err:
        get_preset("vggt-crop-518").from_pil(Image.new("La", (28, 28)), "odd.png")
    assert err.value.path == "odd.png"


# ----------------------------------------------------------------------------- bad files


def _png_header(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    )


def _jpeg_bytes() -> bytes:
    buf = io.BytesIO()
    _marked_image(200, 150).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"", "empty file"),
        (bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8)), "not an image"),
        (_jpeg_bytes()[:2000], "truncated"),
        (_jpeg_bytes()[:30], "truncated"),
        (_png_header(100_000, 100_000), "decompression bomb"),  # PIL's error (over 2x its limit)
        (_png_header(5, 5), "truncated"),  # header fine, no pixel data
    ],
    ids=["empty", "random", "truncated-jpeg", "truncated-header", "bomb", "no-data"],
)
def test_bad_files_raise_image_error(tmp_path: Path, content: bytes, reason: str) -> None:
    path = tmp_path / "bad.img"
    path.write_bytes(content)
    with pytest.raises(ImageError) as err:
        get_preset("vggt-crop-518").load(path)
    assert err.value.reason.startswith(reason)
    assert err.value.path == str(path)
    assert str(err.value).startswith(f"{path}: ")
    assert "\n" not in str(err.value)


def test_bomb_between_pil_warning_and_error_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "big.png"
    path.write_bytes(_png_header(10_000, 10_000))  # 1e8 pixels: PIL only warns
    limit = Image.MAX_IMAGE_PIXELS
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with pytest.raises(ImageError, match="decompression bomb"):
            get_preset("janusvln").load(path)
    assert limit == Image.MAX_IMAGE_PIXELS


def test_missing_and_directory(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="unreadable"):
        get_preset("vggt-crop-518").load(tmp_path / "missing.jpg")
    with pytest.raises(ImageError, match="unreadable"):
        get_preset("vggt-crop-518").load(tmp_path)


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root reads any file")
def test_permission_denied(tmp_path: Path) -> None:
    path = tmp_path / "secret.png"
    _marked_image().save(path)
    path.chmod(0)
    try:
        with pytest.raises(ImageError, match="unreadable"):
            get_preset("vggt-crop-518").load(path)
    finally:
        path.chmod(0o600)


def test_permission_denied_on_open(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "secret.png"
    _marked_image().save(path)

    def deny(*args: object, **kwargs: object) -> Image.Image:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Image, "open", deny)
    with pytest.raises(ImageError, match=r"unreadable \(permission denied\)"):
        get_preset("vggt-crop-518").load(path)


def test_degenerate_aspect_is_rejected() -> None:
    with pytest.raises(ImageError, match="unsupported size"):
        get_preset("vggt-crop-518").from_pil(Image.new("RGB", (2000, 2)), "thin.png")


def test_preprocessed_image_is_a_dataclass() -> None:
    fields = {f.name for f in dataclasses.fields(PreprocessedImage)}
    assert {"pixels", "input_hw", "grid_hw", "source_hw", "qwen_grid_thw", "fingerprint"} <= fields
    assert isinstance(PreprocessedImage.tensor, property)  # the model input, from the pixels
