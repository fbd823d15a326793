"""Decode workers: items -> preprocessed pixels + sidecar meta, claimed chunk by chunk."""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import Dataset

from vggtctl import sidecar
from vggtctl.catalog import Item, item_frames_for_key
from vggtctl.claims import ClaimBook
from vggtctl.errors import ImageError
from vggtctl.failures import Failure
from vggtctl.keys import FeatureKey

# --------------------------------------------------------------------------- decode workers


@dataclass
class Prepared:
    """One decoded item. A sequence item's frames stay separate tensors, the very ones the
    worker's frame cache holds: neighbouring items share most of their frames, and a tensor sent
    to the main process twice crosses shared memory once. Stacked per item, a 9-frame janusvln
    item would copy 45 MB into /dev/shm, most of it frames its neighbours had sent already."""

    index: int
    # [3,H,W] (single frame) or S x [3,H,W], in the preset's compact form: uint8 where it can
    # be (a quarter of the bytes through shared memory and to the GPU), see `unit_pixels`
    pixels: torch.Tensor | tuple[torch.Tensor, ...]
    meta: dict[str, Any]
    # per frame: (path, size, mtime_ns) it was decoded at; equal identities decode equally,
    # which lets the GPU stage embed a frame shared by neighbouring items once
    frame_ids: tuple[tuple[str, int, int], ...] = ()

    @property
    def shape(self) -> tuple[int, ...]:
        """[3,H,W] or [S,3,H,W]."""
        if isinstance(self.pixels, tuple):
            return (len(self.pixels), *self.pixels[0].shape)
        return tuple(self.pixels.shape)

    @property
    def batch_key(self) -> tuple[Any, ...]:
        """Items with equal keys can share a batch: same shape, same pixel dtype."""
        first = self.pixels[0] if isinstance(self.pixels, tuple) else self.pixels
        return (first.dtype, *self.shape)

    def stacked(self) -> torch.Tensor:
        """The pixels as one tensor ([S,3,H,W] for a sequence item)."""
        return torch.stack(self.pixels) if isinstance(self.pixels, tuple) else self.pixels


@dataclass
class Failed:
    index: int
    failure: Failure


class ItemDataset(Dataset):
    """Decodes and preprocesses one item in a DataLoader worker; a bad image becomes `Failed`.

    Consecutive items of an episode share frames, so each worker keeps a small LRU of
    preprocessed frames and of history frames' stats: the current image is stat'ed afresh
    (its key goes into the sidecar), a history frame once per worker while it is in the LRU.
    A frame edited meanwhile makes the written sidecar stale at the next check, never wrong.
    """

    def __init__(self, items: Sequence[Item], preset: Any, key: FeatureKey, frame_cache: int = 32) -> None:
        self.items = items
        self.preset = preset
        self.key = key
        self.frame_cache = frame_cache
        self._cache: OrderedDict[str, Any] = OrderedDict()
        self._stats: OrderedDict[str, os.stat_result] = OrderedDict()
        import_dependencies = getattr(preset, "import_dependencies", None)
        if import_dependencies is not None:  # before the workers fork: they inherit the modules
            import_dependencies()

    def _stat(self, path: str, fresh: bool) -> os.stat_result | None:
        st = None if fresh else self._stats.get(path)
        if st is None:
            try:
                st = os.stat(path)
            except FileNotFoundError:
                self._stats.pop(path, None)
                return None
            self._stats[path] = st
            if len(self._stats) > 8 * self.frame_cache:
                self._stats.popitem(last=False)
        return st

    def __len__(self) -> int:
        return len(self.items)

    def _load(self, path: str) -> Any:
        hit = self._cache.get(path)
        if hit is not None:
            self._cache.move_to_end(path)
            return hit
        value = self.preset.load(path)
        self._cache[path] = value
        if len(self._cache) > self.frame_cache:
            self._cache.popitem(last=False)
        return value

    def __getitem__(self, index: int) -> Prepared | Failed:
        item = self.items[index]
        sequence = self.key.context.kind == "sequence"
        try:
            frames = item_frames_for_key(item, lambda path: self._stat(path, fresh=path == item.image))
        except OSError as err:
            path = str(getattr(err, "filename", None) or item.image)
            reason = f"cannot stat: {err.strerror or err}"
            if os.path.islink(path) and not os.path.exists(path):
                reason = "a symbolic link whose target is missing (its source unmounted?)"
            return Failed(index, Failure(item.image, "decode", _naming_frame(item, path, reason)))
        try:
            loaded = [self._load(p) for p in item.frames] if sequence else [self._load(item.image)]
        except ImageError as err:
            return Failed(index, Failure(item.image, "decode", _naming_frame(item, err.path, err.reason)))
        except Exception as err:
            return Failed(index, Failure(item.image, "decode", f"{type(err).__name__}: {err}"))
        current = loaded[-1]
        if sequence and any(p.pixels.shape != current.pixels.shape for p in loaded):
            reason = "context frames preprocess to different sizes; cannot stream them together"
            return Failed(index, Failure(item.image, "decode", reason))
        if not sequence:
            pixels: Any = current.pixels
        elif len({p.pixels.dtype for p in loaded}) == 1:
            pixels = tuple(p.pixels for p in loaded)
        else:  # some frames needed float pixels: the item's frames are stacked as floats
            pixels = tuple(p.tensor for p in loaded)
        _image_name, image_key = frames[-1]
        meta = sidecar.build_meta(
            image_name=os.path.basename(item.image),
            image_key=image_key,
            model=self.key.model,
            preprocess={
                "fingerprint": self.key.preprocess_fingerprint,
                "preset": self.key.preset,
                "input_hw": list(current.input_hw),
                "grid_hw": list(current.grid_hw),
            },
            context=self.key.context,
            frames=[name for name, _ in frames] if sequence else [],
            signature=self.key.signature_for(frames) if sequence else None,
        )
        ids = tuple(
            (path, key.size, key.mtime_ns) for path, (_, key) in zip(item.frames, frames, strict=True)
        )
        return Prepared(index, pixels, meta, ids if sequence else ())


def _naming_frame(item: Item, path: str, reason: str) -> str:
    """The failure is the item's; when a history frame caused it, the reason names that frame."""
    if os.path.normpath(path) == item.image:
        return reason
    return f"context frame {os.path.relpath(path, os.path.dirname(item.image))}: {reason}"


def _identity(batch: list[Any]) -> list[Any]:
    return batch


class ClaimingSampler:
    """Yields small lists of item indices, claiming each chunk just before its first index is
    handed to a worker (the DataLoader consumes samplers in the main process)."""

    def __init__(
        self,
        chunks: list[tuple[str, list[int]]],
        claims: ClaimBook | None,
        load_batch: int,
        recheck: Callable[[list[int]], list[int]],
        on_chunk: Callable[[str, list[int]], None],
        stop: threading.Event,
    ) -> None:
        self.chunks = chunks
        self.claims = claims
        self.load_batch = load_batch
        self.recheck = recheck
        self.on_chunk = on_chunk
        self.stop = stop
        self.skipped_claimed = 0
        self.claim_error: OSError | None = None  # a claim could not be written: no more chunks

    def __iter__(self) -> Iterator[list[int]]:
        for chunk, indices in self.chunks:
            if self.stop.is_set():
                return
            if self.claims is not None:
                try:
                    claimed = self.claims.try_claim(chunk)
                except OSError as err:  # the loop decides (a full disk stops it like a write)
                    self.claim_error = err
                    return
                if not claimed:
                    self.skipped_claimed += len(indices)
                    continue
                indices = self.recheck(indices)  # another process may have finished some
            self.on_chunk(chunk, indices)
            for start in range(0, len(indices), self.load_batch):
                yield indices[start : start + self.load_batch]
