"""The sidecar codec (DESIGN §3): the one module that writes, reads and judges cache files.

`img.jpg` -> `img.jpg.vggt_cache.pt`: a `torch.save` zip of {"features", "format", "version",
"meta"} holding only tensors and plain values, so `torch.load(weights_only=True, mmap=True)`
reads it and a header read never touches the tensor bytes. Writes go to a temp file in the
same folder and are renamed into place, so readers see the old file or the new one, never a
torn one. Imported by precompute, status/verify/prune and the training dataset: no CLI, no GPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from vggtctl import __version__, torchzip
from vggtctl.keys import ContextSettings, ImageKey, ModelKey, context_signature, image_change

# Names live in a torch-free module so listings (scan, status) do not import torch.
from vggtctl.names import (  # noqa: F401  re-exported: the codec's public names
    SUFFIX,
    TEMP_MARK,
    image_path_of,
    is_sidecar_name,
    is_temp_name,
    sidecar_path,
)

FORMAT = "vggtctl.sidecar"
VERSION = 1


# --------------------------------------------------------------------------- meta


def build_meta(
    *,
    image_name: str,
    image_key: ImageKey,
    model: ModelKey,
    preprocess: dict[str, Any],
    context: ContextSettings,
    frames: list[str],
    signature: str | None,
) -> dict[str, Any]:
    """The `meta` dict of a v1 sidecar.

    preprocess: {"fingerprint", "preset", "input_hw", "grid_hw"}; frames: ordered names of the
    context frames relative to the image's folder, the current image last ([] for `none`).
    """
    return {
        "image": image_key.to_meta(image_name),
        "model": model.to_meta(),
        "preprocess": {k: preprocess[k] for k in ("fingerprint", "preset", "input_hw", "grid_hw")},
        "context": {
            "kind": context.kind,
            "signature": signature,
            "frames": list(frames),
            "evict_start": context.evict_start,
            "evict_recent": context.evict_recent,
        },
        "created": time.time(),
        "tool": f"vggtctl {__version__}",
    }


# --------------------------------------------------------------------------- write


def temp_path_for(path: str) -> str:
    return f"{path}.tmp-{os.getpid()}-{secrets.token_hex(4)}"


def write(
    path: str | os.PathLike[str], features: torch.Tensor, meta: dict[str, Any], *, fsync: bool = False
) -> int:
    """Atomically write a v1 sidecar; returns the bytes written.

    A crash leaves the previous file or a temp file (`prune --temp` debris), never a torn sidecar.
    """
    path = os.fspath(path)
    features = features.detach().to("cpu")
    if (
        not features.is_contiguous()
        or features.untyped_storage().nbytes() != features.numel() * features.element_size()
    ):
        # torch.save stores the whole storage: a row view of a batch would write the batch.
        features = features.contiguous().clone()
    payload = {"features": features, "format": FORMAT, "version": VERSION, "meta": meta}
    tmp = temp_path_for(path)
    try:
        with open(tmp, "wb") as fh:
            _save(payload, fh)
            fh.flush()
            if fsync:
                os.fsync(fh.fileno())
            size = fh.tell()
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return size


class _KeepWriteError:
    """The file torch.save writes to, keeping the first OSError a write raised.

    torch's zip writer swallows that error and fails later with a RuntimeError that has no
    errno ("unexpected pos ..."), so a full disk would look like a bug in one item instead of
    ENOSPC, which stops a run cleanly.
    """

    def __init__(self, fh: Any) -> None:
        self._fh = fh
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            return self._fh.write(data)
        except OSError as err:
            self.error = self.error or err
            raise

    def flush(self) -> None:
        self._fh.flush()


def _save(payload: dict[str, Any], fh: Any) -> None:
    sink = _KeepWriteError(fh)
    try:
        torch.save(payload, sink)
    except RuntimeError:
        if sink.error is not None:
            raise sink.error from None  # the real reason, errno included
        raise


# --------------------------------------------------------------------------- read


@dataclass(frozen=True)
class Header:
    """Everything but the tensor bytes: version (0 = legacy), meta, and the tensor's shape/dtype."""

    version: int
    meta: dict[str, Any]
    shape: tuple[int, ...]
    dtype: str
    legacy_path: str | None = None


@dataclass(frozen=True)
class Sidecar:
    header: Header
    features: torch.Tensor


class SidecarFormatError(ValueError):
    """The file loads but does not follow the sidecar schema."""


def _load(path: str | os.PathLike[str]) -> Any:
    # weights_only=True: a sidecar in a shared folder must never run code when read.
    path = os.fspath(path)
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        # a name that is not UTF-8 (its bytes surrogate-escaped): torch's mmap loader cannot
        # take it as text, so the file is opened here and handed over by descriptor
        return _load_by_descriptor(path)
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def _load_by_descriptor(path: str) -> Any:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0))
    try:
        by_fd = f"/proc/self/fd/{fd}"
        if os.path.exists(by_fd):  # Linux: still mapped, not read (the mapping outlives the fd)
            return torch.load(by_fd, map_location="cpu", weights_only=True, mmap=True)
        with os.fdopen(os.dup(fd), "rb") as fh:
            return torch.load(fh, map_location="cpu", weights_only=True)
    finally:
        os.close(fd)


TensorFacts = Callable[[Any], "tuple[tuple[int, ...], str] | None"]


def _torch_facts(value: Any) -> tuple[tuple[int, ...], str] | None:
    if not isinstance(value, torch.Tensor):
        return None
    return tuple(value.shape), str(value.dtype).removeprefix("torch.")


def _stub_facts(value: Any) -> tuple[tuple[int, ...], str] | None:
    return (value.shape, value.dtype) if type(value) is torchzip.TensorInfo else None


def _check(obj: Any, facts: TensorFacts) -> Header:
    """The schema, once for both readers: `facts` gives a tensor's (shape, dtype), None if not one."""
    if not isinstance(obj, dict):
        raise SidecarFormatError(f"top level is {type(obj).__name__}, not a dict")
    found = facts(obj.get("features"))
    if found is None:
        raise SidecarFormatError("no 'features' tensor")
    shape, dtype = found
    if "format" not in obj and "version" not in obj:
        if isinstance(obj.get("path"), str):
            return Header(0, {}, shape, dtype, legacy_path=obj["path"])
        raise SidecarFormatError("neither a v1 sidecar nor a legacy {features, path} file")
    if obj.get("format") != FORMAT:
        raise SidecarFormatError(f"format is {obj.get('format')!r}, expected {FORMAT!r}")
    if obj.get("version") != VERSION:
        raise SidecarFormatError(f"unsupported version {obj.get('version')!r}")
    meta = obj.get("meta")
    if not isinstance(meta, dict):
        raise SidecarFormatError("'meta' is missing or not a dict")
    for section in ("image", "model", "preprocess", "context"):
        if not isinstance(meta.get(section), dict):
            raise SidecarFormatError(f"meta.{section} is missing")
    if len(shape) != 2:
        raise SidecarFormatError(f"features are {len(shape)}-D, expected [num_patches, 2*embed_dim]")
    grid = meta["preprocess"].get("grid_hw")
    if isinstance(grid, (list, tuple)) and len(grid) == 2:
        if not all(isinstance(g, (int, float)) for g in grid):  # "x" * 10**12 would not end well
            raise SidecarFormatError(f"meta grid {grid!r:.80} is not two numbers")
        if shape[0] != grid[0] * grid[1]:
            raise SidecarFormatError(
                f"features have {shape[0]} patches, meta grid {grid} says {grid[0] * grid[1]}"
            )
    if meta["model"].get("dtype") not in (None, dtype):
        raise SidecarFormatError(f"features are {dtype}, meta says {meta['model'].get('dtype')}")
    return Header(VERSION, meta, shape, dtype)


def _parse(obj: Any) -> tuple[Header, torch.Tensor]:
    return _check(obj, _torch_facts), obj["features"]


def _torch_would_allow(module: str, name: str) -> bool:
    """Whether torch's weights-only unpickler accepts this global (then it decides, not us)."""
    if module in ("sys", "os", "posix", "nt"):  # torch's own blocklist
        return False
    try:
        from torch import _weights_only_unpickler as allow

        full = f"{module}.{name}"
        return full in allow._get_allowed_globals() or full in allow._get_user_allowed_globals()
    except Exception:  # a torch without these helpers: let torch.load say
        return True


# torch.save writes pickle protocol 2; torch.load reads other protocols but, unlike torchzip,
# never checks a storage record's length (a short one is read past, into the zip directory).
_NOT_FROM_TORCH_SAVE = "pickle protocol is not 2"


def _fast_header(path: str) -> Header | _NotSaved | None:
    """The header through `torchzip` (no torch, no tensor bytes); None where torch must decide.

    Raises for a global that neither reader allows, a storage record that is missing or too
    short, a record no torch.save writes (compressed, or declaring gigabytes), and a schema
    violation: what `torch.load` would refuse, or should.
    """
    try:
        obj, tensors = torchzip.load_structure(path)
    except torchzip.UnknownGlobal as err:
        if _torch_would_allow(err.module, err.name):
            return None
        raise
    except torchzip.NotUnderstood as err:
        if str(err) == _NOT_FROM_TORCH_SAVE:
            return _NotSaved(str(err))
        return None
    if tensors and not (len(tensors) == 1 and isinstance(obj, dict) and obj.get("features") is tensors[0]):
        return None  # a tensor elsewhere would sit in Header.meta as a stub: torch builds it
    return _check(obj, _stub_facts)


class _NotSaved(str):
    """Why the file was not written by torch.save: torch.load may read it, its version says."""


def _by_torch(path: str, fast: Header | _NotSaved | None) -> tuple[Header, torch.Tensor]:
    """The reference's reading, for files torchzip handed over. A v1 sidecar is always written
    by `write` (torch.save): one that was not can be read past a short storage record by torch,
    so it is corrupt; legacy files (another writer) are left to torch."""
    header, features = _parse(_load(path))
    if isinstance(fast, _NotSaved) and header.version == VERSION:
        raise SidecarFormatError(f"not laid out as torch.save writes sidecars ({fast})")
    return header, features


def read_header(path: str | os.PathLike[str]) -> Header:
    """The sidecar's header; the tensor bytes are never read.

    `torchzip` reads it in ~0.03 ms instead of torch.load's ~0.4 ms; anything it does not model
    goes to `torch.load(weights_only=True, mmap=True)`, the reference.
    """
    path = os.fspath(path)
    header = _fast_header(path)
    return header if isinstance(header, Header) else _by_torch(path, header)[0]


def read(path: str | os.PathLike[str], *, check_finite: bool = True, check_crc: bool = False) -> Sidecar:
    """Full read: the features are materialized (still backed by mmap until touched).

    The structural pass of `read_header` runs first: torch.load would silently read past a
    storage record that is too short, the header reader refuses it. `check_crc` also compares
    every record with its zip CRC-32 (`verify`): torch.load would serve a flipped bit.
    """
    path = os.fspath(path)
    fast = _fast_header(path)
    if check_crc:
        with contextlib.suppress(torchzip.NotUnderstood):  # an archive torchzip does not model
            torchzip.check_checksums(path)
    header, features = _by_torch(path, None if isinstance(fast, Header) else fast)
    if check_finite and features.numel() and not bool(torch.isfinite(features).all()):
        raise SidecarFormatError("features contain NaN or Inf")
    return Sidecar(header, features)


# --------------------------------------------------------------------------- classify


class Verdict(str, enum.Enum):
    VALID = "valid"
    STALE = "stale"
    ORPHAN = "orphan"
    MODEL_MISMATCH = "model-mismatch"
    PREPROCESS_MISMATCH = "preprocess-mismatch"
    CONTEXT_MISMATCH = "context-mismatch"
    LEGACY = "legacy"
    CORRUPT = "corrupt"
    TEMP = "temp"

    def __str__(self) -> str:
        return self.value


PROBLEMS = frozenset(Verdict) - {Verdict.VALID}


@dataclass(frozen=True)
class Expectation:
    """What a sidecar must match to be `valid`; None fields are not checked.

    `context_signature` is the per-item signature a trainer computes from its catalog. Without
    it, `check_context_frames` re-derives the signature from the frames the sidecar names
    (their current size/mtime), which catches edited or deleted history frames.
    """

    model: ModelKey | None = None
    model_fingerprint: str | None = None  # checked alone when only the checkpoint is known
    model_name: str | None = field(default=None, compare=False)  # the name given: messages only
    preprocess_fingerprint: str | None = None
    preset: str | None = field(default=None, compare=False)  # the wanted preset's name: messages only
    context_kind: str | None = None
    context_signature: str | None = None
    check_context_frames: bool = True


@dataclass(frozen=True)
class Classification:
    path: str
    verdict: Verdict
    reason: str = ""
    header: Header | None = None


StatLookup = Callable[[str], "os.stat_result | None"]


def _stat_or_none(path: str) -> os.stat_result | None:
    try:
        return os.stat(path)
    except FileNotFoundError:
        return None


_UNSET: Any = object()


def classify(
    path: str | os.PathLike[str],
    expect: Expectation | None = None,
    *,
    full: bool = False,
    image_stat: os.stat_result | None = _UNSET,
    stat_lookup: StatLookup | None = None,
) -> Classification:
    """One verdict per file, in precedence order: temp, orphan, corrupt, legacy, stale,
    model-, preprocess-, context-mismatch, valid.

    `full=True` reads the tensor (verify), checks it is finite and every record against its
    CRC-32; otherwise only the header.
    `image_stat` / `stat_lookup` let callers reuse stats from a scan instead of stat'ing again.
    """
    path = os.fspath(path)
    name = os.path.basename(path)
    if is_temp_name(name):
        return Classification(path, Verdict.TEMP, "temp file left by an interrupted write")
    lookup = stat_lookup or _stat_or_none
    try:
        image: str | None = image_path_of(path)
    except ValueError:
        image = None  # not named like a sidecar: judged by its content, then refused below
    st = None
    if image is not None:
        st = lookup(image) if image_stat is _UNSET else image_stat
        if st is None:  # judged without opening the file: whatever it holds, nothing can use it
            return Classification(path, Verdict.ORPHAN, "image is gone")
    try:
        header = read(path, check_crc=True).header if full else read_header(path)
    except SidecarFormatError as err:
        return Classification(path, Verdict.CORRUPT, str(err))
    except Exception as err:  # any unloadable file: truncated zip, pickle, permissions, ...
        reason = torchzip.damage(path) or f"cannot load: {type(err).__name__}: {_first_line(err)}"
        return Classification(path, Verdict.CORRUPT, reason)
    if image is None:
        image_path_of(path)  # raises: the name says which image it belongs to, and this one does not
    if header.version == 0:
        return Classification(path, Verdict.LEGACY, "legacy file without provenance", header)
    try:
        return _judge(path, header, image, st, expect or Expectation(), lookup)
    except (TypeError, ValueError, AttributeError, KeyError) as err:
        # the schema holds, but a field has the wrong type (frames = 5, say): this file, not the run
        reason = f"meta holds a value of the wrong type ({type(err).__name__}: {_first_line(err)})"
        return Classification(path, Verdict.CORRUPT, reason, header)
    except OSError as err:  # the image (or a history frame) cannot be read for its hash
        return Classification(path, Verdict.STALE, f"cannot check the image: {err.strerror or err}", header)


def _judge(
    path: str,
    header: Header,
    image: str,
    st: os.stat_result,
    expect: Expectation,
    lookup: StatLookup,
) -> Classification:
    """The verdict of a sidecar whose header was read: freshness, model, preprocess, context."""
    meta = header.meta
    change = image_change(meta["image"], st, image)
    if change:
        return Classification(path, Verdict.STALE, change, header)
    if expect.model is not None:
        why = expect.model.mismatch(meta["model"])
        if why:
            return Classification(path, Verdict.MODEL_MISMATCH, why, header)
    elif (
        expect.model_fingerprint is not None and meta["model"].get("fingerprint") != expect.model_fingerprint
    ):
        cached = str(meta["model"].get("fingerprint"))[:12]
        return Classification(
            path, Verdict.MODEL_MISMATCH, f"cached for model {cached}, not the current one", header
        )
    if expect.preprocess_fingerprint is not None:
        recorded = meta["preprocess"].get("fingerprint")
        if recorded != expect.preprocess_fingerprint:
            return Classification(path, Verdict.PREPROCESS_MISMATCH, _preset_reason(meta, expect), header)
    why = _context_problem(meta, expect, os.path.dirname(image), lookup)
    if why == CHANGED_FRAME:
        written = None
        with contextlib.suppress(OSError):
            written = os.stat(path).st_mtime_ns
        why = changed_frame_reason(
            meta["context"].get("frames") or [], os.path.dirname(image), lookup, written
        )
    if why:
        return Classification(path, Verdict.CONTEXT_MISMATCH, why, header)
    return Classification(path, Verdict.VALID, "", header)


def _context_problem(
    meta: dict[str, Any], expect: Expectation, folder: str, lookup: StatLookup
) -> str | None:
    ctx = meta["context"]
    kind = ctx.get("kind", "none")
    if expect.context_kind is not None and kind != expect.context_kind:
        return f"context {kind!r} cached, {expect.context_kind!r} wanted"
    if expect.context_signature is not None:
        if ctx.get("signature") != expect.context_signature:
            return OTHER_HISTORY
        return None
    if kind == "none" or not expect.check_context_frames:
        return None
    frames: list[tuple[str, ImageKey]] = []
    for rel in ctx.get("frames") or []:
        st = lookup(os.path.normpath(os.path.join(folder, rel)))
        if st is None:
            return f"context frame {rel} is gone"
        frames.append((rel, ImageKey.from_stat(st)))
    settings = ContextSettings(kind, ctx.get("evict_start"), ctx.get("evict_recent"))
    if context_signature(frames, settings, meta["model"].get("attention", "")) != ctx.get("signature"):
        return CHANGED_FRAME
    return None


CHANGED_FRAME = "a context frame changed since the sidecar was written"
# a signature given by the caller (the trainer's store) differs; the caller knows the frames
OTHER_HISTORY = "cached for a different history (context signature differs)"
_SHOWN_FRAMES = 3


def other_context_settings(meta: Any, context: ContextSettings, attention: str) -> str | None:
    """Same frames, but another K/V-cache eviction or attention than the key's (`context`,
    `attention`): the signature covers those too, so name them rather than "a frame changed"."""
    if not isinstance(meta, dict):
        return None
    ctx, model = meta.get("context") or {}, meta.get("model") or {}
    cached = ContextSettings("sequence", ctx.get("evict_start"), ctx.get("evict_recent"))
    current = dataclasses.replace(context, kind="sequence")
    if cached != current:
        return f"cached with context {_eviction(cached)}, the current key's is {_eviction(current)}"
    if model.get("attention") != attention:
        return f"cached with {model.get('attention')} attention, the current key's is {attention}"
    return None


def _eviction(context: ContextSettings) -> str:
    if context.evict_start is None and context.evict_recent is None:
        return f"{context.kind} without eviction"
    return context.describe()


def _preset_reason(meta: dict[str, Any], expect: Expectation) -> str:
    """Name both presets: the cached one, and the wanted one where the expectation knows it."""
    cached = meta["preprocess"].get("preset")
    if expect.preset is None:
        return f"preprocess preset {cached!r} differs from the one wanted"
    if cached == expect.preset:  # same name, other sizes (e.g. another Qwen model sized the grid)
        recorded = str(meta["preprocess"].get("fingerprint"))[:12]
        wanted = str(expect.preprocess_fingerprint)[:12]
        return f"preprocess preset {cached!r} cached with other settings (fingerprint {recorded}, wanted {wanted})"
    return f"preprocess preset {cached!r} cached, {expect.preset!r} wanted"


def changed_frame_reason(
    frames: list[Any], folder: str, lookup: StatLookup, written_ns: int | None = None
) -> str:
    """Why a context signature no longer matches although every frame is there, naming the
    frames that changed where the file system tells. The sidecar records one signature over all
    its frames, not each frame's size and mtime; so the frames named are those modified after
    the sidecar file was (`written_ns`, its mtime: one file system's clock, no skew): their mtime
    is later, else their ctime (an mtime set back). The current image (last) is left out: its
    own change reads `stale`."""
    history = list(dict.fromkeys(rel for rel in frames[:-1] if isinstance(rel, str)))
    stats = {rel: lookup(os.path.normpath(os.path.join(folder, rel))) for rel in history}
    later: list[str] = []
    if written_ns is not None:
        for field_name in ("st_mtime_ns", "st_ctime_ns"):
            later = [
                rel for rel, st in stats.items() if st is not None and getattr(st, field_name) > written_ns
            ]
            if later:
                break
    if not later:
        return f"{CHANGED_FRAME} (which one is not recorded: the sidecar keeps one signature over its frames)"
    shown = ", ".join(later[:_SHOWN_FRAMES])
    if len(later) > _SHOWN_FRAMES:
        shown += f" and {len(later) - _SHOWN_FRAMES} more"
    noun = "frame" if len(later) == 1 else "frames"
    return f"context {noun} {shown} changed since the sidecar was written"


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0][:200] if text else ""
