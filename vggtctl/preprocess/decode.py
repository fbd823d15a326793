"""Open an image file the way the reference loaders do, turning every failure into ImageError.

The references call `Image.open`, optionally `ImageOps.exif_transpose`, composite RGBA over
white and `convert("RGB")`. This module does the same and nothing else (no JPEG draft mode,
no change to PIL's global decompression-bomb limit), so decoded pixels are identical.
"""

from __future__ import annotations

import os
import struct
import threading
import warnings

from PIL import Image, ImageOps, UnidentifiedImageError

from vggtctl.errors import ImageError

# Categories that start every ImageError.reason written here.
EMPTY = "empty file"
UNREADABLE = "unreadable"
NOT_AN_IMAGE = "not an image"
BOMB = "decompression bomb"
TRUNCATED = "truncated"
UNSUPPORTED_MODE = "unsupported mode"
UNSUPPORTED_SIZE = "unsupported size"

ORIENTATION_TAG = 0x0112
_ROTATING = frozenset(range(2, 9))  # EXIF orientations that exif_transpose acts on


class ExifOrientationIgnoredWarning(UserWarning):
    """A file has an EXIF orientation that the chosen preset's reference loader ignores."""


_warn_lock = threading.Lock()
_warned = False


def reset_exif_warning() -> None:
    """Re-arm the once-per-process EXIF warning (for tests and for a new run in the same process)."""
    global _warned
    with _warn_lock:
        _warned = False


def _warn_ignored_orientation(name: str, orientation: int) -> None:
    global _warned
    with _warn_lock:
        if _warned:
            return
        _warned = True
    warnings.warn(
        f"{name}: EXIF orientation {orientation} is ignored, as the trainer's loader ignores it "
        "(reported once per run; other files may be affected too)",
        ExifOrientationIgnoredWarning,
        stacklevel=4,
    )


def exif_orientation(img: Image.Image) -> int:
    """The EXIF orientation tag (1 when absent or unreadable)."""
    try:
        value = img.getexif().get(ORIENTATION_TAG, 1)
    except Exception:  # a broken EXIF block must not fail the image; PIL ignores it too
        return 1
    return value if isinstance(value, int) else 1


def to_rgb(img: Image.Image, name: str, *, apply_exif: bool, owned: bool) -> tuple[Image.Image, int]:
    """Orientation, alpha and mode handling of the references; returns (RGB image, orientation).

    `owned` means `img` may be modified in place (an image this module opened); a caller's
    image is never mutated.
    """
    orientation = exif_orientation(img)
    if orientation in _ROTATING:
        if apply_exif:
            if owned:
                ImageOps.exif_transpose(img, in_place=True)
            else:
                img = ImageOps.exif_transpose(img)
        else:
            _warn_ignored_orientation(name, orientation)
    if img.mode == "RGBA":
        # Only RGBA is composited, exactly as in the references (LA/PA lose alpha in convert).
        img = Image.alpha_composite(Image.new("RGBA", img.size, (255, 255, 255, 255)), img)
    if img.mode != "RGB":  # convert("RGB") of an RGB image is a plain copy: skip it
        try:
            img = img.convert("RGB")
        except ValueError as exc:
            raise ImageError(name, f"{UNSUPPORTED_MODE} {img.mode!r} ({exc})") from None
    return img, orientation


def open_image(path: str | os.PathLike[str]) -> Image.Image:
    """Open and fully decode `path`; the caller owns the returned image."""
    name = os.fspath(path)
    try:
        if os.stat(name).st_size == 0:
            raise ImageError(name, EMPTY)
    except PermissionError:
        raise ImageError(name, f"{UNREADABLE} (permission denied)") from None
    except OSError as exc:
        raise ImageError(name, f"{UNREADABLE} ({exc.strerror or exc})") from None
    try:
        img = Image.open(name)
    except UnidentifiedImageError:
        raise ImageError(name, NOT_AN_IMAGE) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(name, f"{BOMB} ({exc})") from None
    except PermissionError:
        raise ImageError(name, f"{UNREADABLE} (permission denied)") from None
    except OSError as exc:
        if exc.errno is None:  # PIL's own OSError: the header ends early ("Truncated File Read")
            raise ImageError(name, f"{TRUNCATED} or corrupt image header ({exc})") from None
        raise ImageError(name, f"{UNREADABLE} ({exc.strerror or exc})") from None
    except (SyntaxError, ValueError, EOFError) as exc:  # PIL plugins signal bad headers this way
        raise ImageError(name, f"{NOT_AN_IMAGE} ({exc})") from None
    try:
        width, height = img.size
        limit = Image.MAX_IMAGE_PIXELS
        if limit and width * height > limit:
            # PIL only warns between 1x and 2x its limit; a cache builder refuses both.
            raise ImageError(name, f"{BOMB} ({width}x{height} pixels exceeds PIL's limit of {limit})")
        try:
            img.load()
        except MemoryError:
            raise ImageError(name, f"{BOMB} (out of memory decoding {width}x{height})") from None
        except (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error) as exc:
            raise ImageError(name, f"{TRUNCATED} or corrupt image data ({exc})") from None
    except BaseException:
        img.close()
        raise
    return img
