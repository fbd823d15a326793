"""The structure of a `torch.save` zip without torch: the pickled object, tensors as `TensorInfo`.

Why: a sidecar header check through `torch.load(weights_only=True, mmap=True)` costs ~0.4 ms of
GIL-bound CPU; 10^6 of them take minutes. This reader makes two small reads (the archive's first
and last pages), parses the zip directory itself, and unpickles `data.pkl` with the C unpickler
restricted to a whitelist: `torch._utils._rebuild_tensor_v2`, `collections.OrderedDict` and the
plain storage types, each mapped to a stub of ours that only records shape, dtype and storage
key. Nothing of torch's is called and no tensor byte is read; the storage record's size is
checked against what the tensor needs, which catches truncated tensor data.

It never guesses. A global outside the whitelist raises `UnknownGlobal` (an UnpicklingError,
raised before anything is called); anything else it does not model (zip64 offsets, compression,
a pickle protocol other than 2, tensor subclasses, values other than plain Python ones, ...)
raises `NotUnderstood`, so the caller can ask `torch.load`, the reference. `BadArchive` is for
what is broken whoever reads it: a storage record that is missing or shorter than its tensor.
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import re
import stat
import struct
import zlib
from _compat_pickle import IMPORT_MAPPING, NAME_MAPPING
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, NoReturn

# torch's storage type name -> (dtype name as torch prints it, bytes per element).
STORAGE_TYPES: dict[str, tuple[str, int]] = {
    "BFloat16Storage": ("bfloat16", 2),
    "HalfStorage": ("float16", 2),
    "FloatStorage": ("float32", 4),
    "DoubleStorage": ("float64", 8),
    "ByteStorage": ("uint8", 1),
    "CharStorage": ("int8", 1),
    "ShortStorage": ("int16", 2),
    "IntStorage": ("int32", 4),
    "LongStorage": ("int64", 8),
    "BoolStorage": ("bool", 1),
}

HEAD = TAIL = 4096  # bytes read at each end: data.pkl and the small records, the directory
# The most a record torch.save writes for a sidecar can hold: torch writes a few bytes of
# version, byteorder and alignment, and a sidecar's data.pkl is a few KiB. A crafted file may
# declare gigabytes (sparse on disk, or deflated); read, it would take that much memory.
SMALL_RECORD_MAX = 64
PICKLE_MAX = 16 << 20
_EOCD = struct.Struct("<4s4H2LH")  # end of central directory record
_CDIR = struct.Struct("<4s6H3L5H2L")  # central directory file header
_LOCAL = struct.Struct("<4s5H3L2H")  # local file header
_VERSION = re.compile(rb"\s*\+?(\d+)")
_WILLNEED = getattr(os, "POSIX_FADV_WILLNEED", None)


class NotUnderstood(Exception):
    """Something this reader does not model; torch.load must decide."""


class UnknownGlobal(NotUnderstood, pickle.UnpicklingError):
    """data.pkl names a global outside the whitelist; it was not imported or called."""

    def __init__(self, module: str, name: str) -> None:
        super().__init__(module, name)
        self.module, self.name = module, name

    def __str__(self) -> str:
        return f"global {self.module}.{self.name} is not allowed"


class BadArchive(ValueError):
    """Broken for any reader: a tensor's storage record is missing or too short."""


class _Frozen:
    """Records a pickle may hold but never modify: BUILD (`__setstate__`) is refused."""

    __slots__ = ()

    def __setstate__(self, state: Any) -> NoReturn:
        raise NotUnderstood(f"BUILD on {type(self).__name__}")

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={getattr(self, k)!r}" for k in self.__slots__)
        return f"{type(self).__name__}({fields})"


class StorageType(_Frozen):
    __slots__ = ("dtype", "itemsize", "name")

    def __init__(self, name: str) -> None:
        self.name = name
        self.dtype, self.itemsize = STORAGE_TYPES[name]


class StorageRef(_Frozen):
    """A persistent id `('storage', type, key, location, numel)`: the bytes are not read."""

    __slots__ = ("dtype", "itemsize", "key", "numel")

    def __init__(self, kind: StorageType, key: str, numel: int) -> None:
        self.dtype, self.itemsize, self.key, self.numel = kind.dtype, kind.itemsize, key, numel


class TensorInfo(_Frozen):
    """What `_rebuild_tensor_v2` would build, minus the data."""

    __slots__ = ("dtype", "nbytes", "shape", "storage_key")

    def __init__(self, shape: tuple[int, ...], dtype: str, storage_key: str, nbytes: int) -> None:
        self.shape, self.dtype, self.storage_key, self.nbytes = shape, dtype, storage_key, nbytes


class _Stub(_Frozen):
    """The callable a whitelisted global resolves to: ours, never the real one."""

    __slots__ = ("fn", "qualname")

    def __init__(self, qualname: str, fn: Callable[..., Any]) -> None:
        self.qualname, self.fn = qualname, fn

    def __call__(self, *args: Any) -> Any:
        return self.fn(*args)


def _is_int(value: Any) -> bool:
    return type(value) is int


def _rebuild_tensor_v2(
    storage: Any,
    offset: Any,
    size: Any,
    stride: Any,
    requires_grad: Any,
    hooks: Any,
    metadata: Any = None,
) -> TensorInfo:
    """Mirror of torch's checks in `set_`: plain dims and strides, inside the storage."""
    if type(storage) is not StorageRef:
        raise NotUnderstood("tensor without a storage persistent id")
    if not (type(size) is tuple and type(stride) is tuple and len(size) == len(stride)):
        raise NotUnderstood("tensor size/stride are not tuples of one length")
    if not (_is_int(offset) and offset >= 0 and all(_is_int(v) and v >= 0 for v in size + stride)):
        raise NotUnderstood("tensor offset, size or stride is not a non-negative int")
    if requires_grad is not False or type(hooks) is not OrderedDict or hooks or metadata:
        raise NotUnderstood("tensor with grad, hooks or metadata")
    if 0 in size:
        elements = 0
    else:
        elements = offset + 1 + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
    if elements > storage.numel:
        raise BadArchive(f"tensor needs {elements} elements, its storage holds {storage.numel}")
    return TensorInfo(size, storage.dtype, storage.key, elements * storage.itemsize)


def _ordered_dict(*args: Any) -> OrderedDict[Any, Any]:
    if args:  # torch.save emits OrderedDict() and fills it with SETITEMS
        raise NotUnderstood("OrderedDict called with arguments")
    return OrderedDict()


_GLOBALS: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor_v2"): _Stub("torch._utils._rebuild_tensor_v2", _rebuild_tensor_v2),
    ("collections", "OrderedDict"): _Stub("collections.OrderedDict", _ordered_dict),
    **{("torch", name): StorageType(name) for name in STORAGE_TYPES},
}


class _Unpickler(pickle.Unpickler):
    """The C unpickler; every global and persistent id goes through the two methods below."""

    def find_class(self, module: str, name: str) -> Any:
        # The names torch's weights-only unpickler sees (Python 2 names mapped as it maps them).
        if (module, name) in NAME_MAPPING:
            module, name = NAME_MAPPING[(module, name)]
        elif module in IMPORT_MAPPING:
            module = IMPORT_MAPPING[module]
        found = _GLOBALS.get((module, name))
        if found is None:
            raise UnknownGlobal(module, name)
        return found

    def persistent_load(self, pid: Any) -> StorageRef:
        if not (type(pid) is tuple and len(pid) == 5 and pid[0] == "storage"):
            raise NotUnderstood(f"persistent id {pid!r:.80}")
        _, kind, key, location, numel = pid
        if type(kind) is not StorageType or type(key) is not str or type(location) is not str:
            raise NotUnderstood(f"persistent id {pid!r:.80}")
        if not (_is_int(numel) and numel >= 0):
            raise NotUnderstood(f"storage numel {numel!r:.40}")
        return StorageRef(kind, key, numel)


_SCALARS = frozenset({str, int, float, bool, type(None)})


def _tensors_in(obj: Any) -> list[TensorInfo]:
    """Every TensorInfo in `obj` (repeats included); NotUnderstood if anything is not plain."""
    found: list[TensorInfo] = []
    try:
        _collect(obj, found, set())
    except RecursionError:
        raise NotUnderstood("nested too deep to check here") from None
    return found


def _collect(obj: Any, found: list[TensorInfo], seen: set[int]) -> None:
    kind = type(obj)
    if kind is dict or kind is OrderedDict:
        if id(obj) not in seen:
            seen.add(id(obj))
            for key, value in obj.items():
                if type(key) not in _SCALARS:
                    _collect(key, found, seen)
                if type(value) not in _SCALARS:
                    _collect(value, found, seen)
    elif kind is list or kind is tuple:
        if id(obj) not in seen:
            seen.add(id(obj))
            for value in obj:
                if type(value) not in _SCALARS:
                    _collect(value, found, seen)
    elif kind is TensorInfo:
        found.append(obj)
    elif kind not in _SCALARS:
        raise NotUnderstood(f"a {kind.__name__} in the pickle")


# --------------------------------------------------------------------------- the zip


# A sidecar is a regular file: a symlink in its place is refused (ELOOP), not followed to
# wherever it points (outside the data root, say). O_NONBLOCK: opening a FIFO named like a
# sidecar would otherwise wait for a writer forever (and Ctrl-C cannot end a blocked open).
_OPEN_FLAGS = (
    os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
)


def _open(path: str | os.PathLike[str]) -> int:
    fd = os.open(path, _OPEN_FLAGS)
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        os.close(fd)
        raise
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise BadArchive("a FIFO, socket or device named like a sidecar, not a file")
    return fd


def damage(path: str | os.PathLike[str]) -> str | None:
    """What is evidently wrong with a file that does not load as a torch zip, in plain words;
    None where nothing is evident (then the loader's own error is the best account)."""
    try:
        st = os.lstat(path)
        if not os.path.isfile(path) or os.path.islink(path):
            return "a symbolic link or special file, not a sidecar (links are not followed)"
        if st.st_size == 0:
            return "empty file (0 bytes)"
        with open(path, "rb") as fh:
            head = fh.read(4)
        if head != b"PK\x03\x04":
            return "not a zip archive: not written by torch.save"
        fd = _open(path)
        try:
            _Archive(fd)
        finally:
            os.close(fd)
    except BadArchive as err:
        return str(err)
    except NotUnderstood as err:
        if str(err) in ("too short for a zip", "no plain end-of-directory record at the end"):
            return f"truncated: the zip directory at the end is missing ({st.st_size:,} bytes)"
        if str(err).startswith("directory runs past"):
            return f"truncated: the zip directory is cut short ({st.st_size:,} bytes)"
        return None
    except (OSError, struct.error, UnicodeDecodeError):
        return None
    return None


class _Archive:
    """A torch zip's directory from two reads; members are sliced from them when they can be."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.size = os.fstat(fd).st_size
        if self.size < _EOCD.size:
            raise NotUnderstood("too short for a zip")
        self.tail_at = max(0, self.size - TAIL)
        if self.tail_at > HEAD and _WILLNEED is not None:
            # Start the tail's read now, so it overlaps the head's on a cold cache (-25% here).
            with contextlib.suppress(OSError):  # only advice
                os.posix_fadvise(fd, self.tail_at, TAIL, _WILLNEED)
        self.head = os.pread(fd, min(HEAD, self.size), 0)
        if not self.head.startswith(b"PK\x03\x04"):
            raise NotUnderstood("not a zip archive")  # torch checks the first bytes, too
        self.tail = os.pread(fd, self.size - self.tail_at, self.tail_at)
        self.members = self._directory()

    def read(self, offset: int, length: int) -> bytes:
        end = offset + length
        if end <= len(self.head):
            return self.head[offset:end]
        if offset >= self.tail_at and end <= self.size:
            return self.tail[offset - self.tail_at : end - self.tail_at]
        data = os.pread(self.fd, length, offset)
        if len(data) != length:
            raise NotUnderstood("short read")
        return data

    def _directory(self) -> dict[str, tuple[int, int, int, int]]:
        """name -> (flags, method, size, local header offset), from the central directory."""
        magic, disk, cd_disk, count, total, cd_size, cd_at, comment = _EOCD.unpack_from(
            self.tail, len(self.tail) - _EOCD.size
        )
        if magic != b"PK\x05\x06" or comment or disk or cd_disk or count != total:
            raise NotUnderstood("no plain end-of-directory record at the end")
        if 0xFFFF in (count, total) or 0xFFFFFFFF in (cd_size, cd_at):
            raise NotUnderstood("zip64 directory")
        if cd_at + cd_size > self.size - _EOCD.size:
            raise NotUnderstood("directory runs past its end record")
        table = self.read(cd_at, cd_size)
        members: dict[str, tuple[int, int, int, int]] = {}
        self.crcs: dict[str, int] = {}  # name -> CRC-32 the directory records
        pos = 0
        for _ in range(count):
            fields = _CDIR.unpack_from(table, pos)
            if fields[0] != b"PK\x01\x02":
                raise NotUnderstood("bad directory entry")
            flags, method, packed, size = fields[3], fields[4], fields[8], fields[9]
            name_len, extra_len, comment_len, offset = fields[10], fields[11], fields[12], fields[16]
            start = pos + _CDIR.size
            name = table[start : start + name_len].decode("utf-8")  # torch writes ASCII names
            pos = start + name_len + extra_len + comment_len
            if 0xFFFFFFFF in (packed, size, offset) or name in members:
                raise NotUnderstood(f"zip64 or duplicate member {name}")
            if flags & 0x1 or method != 0 or packed != size:
                # torch.save stores every record as is; inflating one could take any memory
                raise BadArchive(f"record {name} is encrypted or compressed: not written by torch.save")
            members[name] = (flags, method, size, offset)
            self.crcs[name] = fields[7]
        if pos != cd_size:
            raise NotUnderstood("directory size does not match its entries")
        self.cd_at = cd_at
        return members

    def data_span(self, name: str) -> tuple[int, int]:
        """(offset, size) of a member's bytes, from its local header (which must name it)."""
        _flags, _method, size, offset = self.members[name]
        encoded = name.encode("utf-8")
        local = self.read(offset, _LOCAL.size + len(encoded))
        magic, *_, name_len, extra_len = _LOCAL.unpack_from(local)
        if magic != b"PK\x03\x04" or local[_LOCAL.size :] != encoded or name_len != len(encoded):
            raise NotUnderstood(f"the local header of {name} does not match the directory")
        return offset + _LOCAL.size + name_len + extra_len, size

    def member(self, name: str, limit: int = SMALL_RECORD_MAX) -> bytes:
        start, size = self.data_span(name)
        if start + size > self.cd_at:
            raise NotUnderstood(f"{name} runs into the directory")
        if size > limit:  # for any reader: torch.load would read it whole, too
            raise BadArchive(f"record {name} declares {size:,} bytes, more than torch.save writes there")
        return self.read(start, size)


def load_structure(path: str | os.PathLike[str]) -> tuple[Any, list[TensorInfo]]:
    """The unpickled object (tensors as TensorInfo) and every tensor in it, each checked against
    its storage record. Only the archive's first and last pages are read (more only for a
    data.pkl longer than a page)."""
    fd = _open(path)
    try:
        archive = _Archive(fd)
        first = next(iter(archive.members), "")
        prefix, slash, _ = first.partition("/")
        if not slash:
            raise NotUnderstood("first member is not in a folder")  # as torch requires
        prefix += "/"
        _check_records(archive, prefix)
        pickled = archive.member(prefix + "data.pkl", PICKLE_MAX)
        if not pickled.startswith(b"\x80\x02"):
            raise NotUnderstood("pickle protocol is not 2")  # what torch.save writes
        try:
            # A BufferedReader lets the C unpickler prefetch: 2x faster than a bare BytesIO.
            obj = _Unpickler(io.BufferedReader(io.BytesIO(pickled)), encoding="utf-8").load()
        except (NotUnderstood, BadArchive):
            raise
        except Exception as err:  # truncated or odd pickle: the reference decides
            raise NotUnderstood(f"{type(err).__name__}: {err}") from err
        tensors = _tensors_in(obj)
        for tensor in tensors:
            _check_storage(archive, prefix, tensor)
        return obj, tensors
    except KeyError as err:  # a record named in data.pkl or required by torch is missing
        raise NotUnderstood(f"missing record {err}") from None
    except (struct.error, UnicodeDecodeError) as err:
        raise NotUnderstood(f"{type(err).__name__}: {err}") from None
    finally:
        os.close(fd)


def check_checksums(path: str | os.PathLike[str], chunk: int = 4 << 20) -> int:
    """Compare every record's bytes with the CRC-32 in the zip directory; returns how many
    records were checked.

    torch.load does not: its zip reader is built without CRC checks and maps storages as they
    are, so a flipped bit in a tensor loads silently (only NaN/Inf would show). A record whose
    CRC is 0 is skipped: torch writes 0 when told not to compute CRCs. Raises `BadArchive` on a
    mismatch, `NotUnderstood` where the archive is not one this module models.
    """
    fd = _open(path)
    try:
        archive = _Archive(fd)
        checked = 0
        for name, expected in archive.crcs.items():
            if expected == 0:
                continue
            start, size = archive.data_span(name)
            crc, done = 0, 0
            while done < size:
                block = os.pread(fd, min(chunk, size - done), start + done)
                if not block:
                    raise BadArchive(f"record {name} ends early")
                crc = zlib.crc32(block, crc)
                done += len(block)
            if crc != expected:
                raise BadArchive(f"record {name}: CRC-32 {crc:08x}, the archive recorded {expected:08x}")
            checked += 1
        return checked
    except (struct.error, UnicodeDecodeError) as err:
        raise NotUnderstood(f"{type(err).__name__}: {err}") from None
    finally:
        os.close(fd)


def _check_records(archive: _Archive, prefix: str) -> None:
    """The small records torch.load reads and can refuse: version, byteorder, alignment."""
    members = archive.members
    version = prefix + ".data/version"
    if version not in members:
        version = prefix + "version"
    found = _VERSION.match(archive.member(version))
    if not found or not 1 <= int(found.group(1)) <= 3:
        raise NotUnderstood("archive format version is missing or unknown")
    if prefix + "byteorder" in members and archive.member(prefix + "byteorder") not in (b"little", b"big"):
        raise NotUnderstood("unknown byteorder")
    if prefix + ".storage_alignment" in members:
        try:
            int(archive.member(prefix + ".storage_alignment"))
        except ValueError:
            raise NotUnderstood("bad .storage_alignment") from None


def _check_storage(archive: _Archive, prefix: str, tensor: TensorInfo) -> None:
    name = f"{prefix}data/{tensor.storage_key}"
    if name not in archive.members:
        raise BadArchive(f"storage record data/{tensor.storage_key} is missing")
    start, size = archive.data_span(name)
    if size < tensor.nbytes or start + tensor.nbytes > archive.cd_at:
        raise BadArchive(
            f"storage record data/{tensor.storage_key} holds {size} bytes, the tensor needs {tensor.nbytes}"
        )
