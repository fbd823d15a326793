"""The fast header reader (`vggtctl.torchzip` behind `sidecar.read_header`): the same header as
torch.load gives, every kind of damage is `corrupt`, a hostile pickle is refused before anything
is called, and what it does not model goes to torch.load and classifies as before."""

from __future__ import annotations

import os
import pickle
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import treebuilder as tb
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vggtctl import sidecar, torchzip
from vggtctl.keys import ContextSettings, ImageKey
from vggtctl.sidecar import Verdict


def torch_header(path: Path) -> sidecar.Header:
    """The reference: the torch.load(weights_only=True, mmap=True) path."""
    return sidecar._parse(sidecar._load(path))[0]


def fast_header(path: Path) -> sidecar.Header:
    header = sidecar._fast_header(str(path))
    assert header is not None, "the fast reader fell back to torch.load"
    return header


def outcome(read: Callable[[Path], sidecar.Header], path: Path) -> tuple[str, Any]:
    try:
        return "ok", read(path)
    except Exception as err:
        return type(err).__name__, str(err)


def base_meta(image: Path, grid: tuple[int, int] = (2, 2), dtype: str = "bfloat16") -> dict[str, Any]:
    meta = sidecar.build_meta(
        image_name=image.name,
        image_key=ImageKey.of(image),
        model=tb.CURRENT_MODEL,
        preprocess={**tb.PREPROCESS, "grid_hw": list(grid)},
        context=ContextSettings(),
        frames=[],
        signature=None,
    )
    meta["model"]["dtype"] = dtype
    return meta


def write(
    tmp_path: Path, feats: torch.Tensor, meta: dict[str, Any] | None = None, name: str = "a.jpg"
) -> Path:
    image = tb.write_image(tmp_path / name)
    grid = (feats.shape[0], 1) if feats.dim() else (1, 1)
    if meta is None:
        meta = base_meta(image, grid, str(feats.dtype).removeprefix("torch."))
    path = Path(sidecar.sidecar_path(image))
    sidecar.write(path, feats, meta)
    return path


def rezip(src: Path, dst: Path, change: Callable[[str, bytes], bytes | None], compression: int = 0) -> Path:
    """Copy a torch zip member by member with Python's zipfile; `change` edits or drops members."""
    with zipfile.ZipFile(src) as old, zipfile.ZipFile(dst, "w", compression) as new:
        for info in old.infolist():
            data = change(info.filename, old.read(info.filename))
            if data is not None:
                new.writestr(info.filename, data)
    return dst


def member_span(path: Path, suffix: str) -> tuple[int, int]:
    """(data offset, size) of the member whose name ends with `suffix`, found with zipfile."""
    with zipfile.ZipFile(path) as zf:
        (info,) = [i for i in zf.infolist() if i.filename.endswith(suffix)]
        raw = path.read_bytes()
        name_len = int.from_bytes(raw[info.header_offset + 26 : info.header_offset + 28], "little")
        extra_len = int.from_bytes(raw[info.header_offset + 28 : info.header_offset + 30], "little")
        return info.header_offset + 30 + name_len + extra_len, info.file_size


# --------------------------------------------------------------------------- same header


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(4, 8), (1, 2), (15, 6), (64, 3)])
def test_fast_header_equals_torch_header(tmp_path: Path, dtype: torch.dtype, shape: tuple[int, int]) -> None:
    path = write(tmp_path, torch.randn(*shape).to(dtype))
    header = fast_header(path)
    assert header == torch_header(path)
    assert header.shape == shape and header.dtype == str(dtype).removeprefix("torch.")


def test_row_view_of_a_batch_reads_as_its_own_shape(tmp_path: Path) -> None:
    batch = torch.randn(3, 4, 8, dtype=torch.bfloat16)
    path = write(tmp_path, batch[1])
    assert fast_header(path) == torch_header(path)
    assert fast_header(path).shape == (4, 8)


def test_legacy_file(tmp_path: Path) -> None:
    image = tb.write_image(tmp_path / "a.jpg")
    path = tb.write_legacy(image)
    header = fast_header(path)
    assert header == torch_header(path)
    assert header.version == 0 and header.legacy_path == str(image) and header.meta == {}


def test_meta_with_nested_values(tmp_path: Path) -> None:
    image = tb.write_image(tmp_path / "a.jpg")
    meta = base_meta(image)
    meta["extra"] = {
        "nested": [1, [2.5, None, {"deep": [True, False]}], {"k": "ü ✓ 😀"}],
        "floats": [float("inf"), -0.0, 1e-300, float("nan")],
        "big": [2**70, -(2**64), -1, 255, 65536],
        "tuple": (1, "two", (3.0,)),
        "empty": [{}, [], ()],
        7: "an int key",
    }
    path = write(tmp_path, tb.features(), meta)
    header = fast_header(path)
    expected = torch_header(path)
    # NaN != NaN: compare through repr, which spells every value out.
    assert repr(header) == repr(expected)
    assert header.meta["extra"]["big"][0] == 2**70


def test_long_meta_beyond_the_first_page(tmp_path: Path) -> None:
    image = tb.write_image(tmp_path / "a.jpg")
    meta = base_meta(image)
    meta["context"]["frames"] = [f"frame_{i:05d}.jpg" for i in range(2000)]
    path = write(tmp_path, tb.features(), meta)
    assert member_span(path, "data.pkl")[1] > 4 * torchzip.HEAD
    assert fast_header(path) == torch_header(path)


@pytest.mark.filterwarnings("ignore:TypedStorage is deprecated")
def test_storage_type_table_matches_torch() -> None:
    for name, (dtype, itemsize) in torchzip.STORAGE_TYPES.items():
        real = getattr(torch, name).dtype
        assert str(real).removeprefix("torch.") == dtype
        assert torch.empty(0, dtype=real).element_size() == itemsize


def test_rewritten_by_pythons_zipfile_still_reads(tmp_path: Path) -> None:
    """Another zip writer (no data descriptors, no zip64 records, no alignment)."""
    path = write(tmp_path, tb.features())
    copy = rezip(path, tmp_path / "copy.pt", lambda _n, data: data)
    assert fast_header(copy) == torch_header(path)


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)


@settings(deadline=None, max_examples=40, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(extra=st.dictionaries(st.text(max_size=6), _json, max_size=5), rows=st.integers(1, 6))
def test_random_meta_fast_equals_torch(tmp_path: Path, extra: dict[str, Any], rows: int) -> None:
    image = tb.write_image(tmp_path / "h.jpg")
    meta = {**base_meta(image, (rows, 1)), **{f"x_{k}": v for k, v in extra.items()}}
    path = write(tmp_path, torch.randn(rows, 4).to(torch.bfloat16), meta, name="h.jpg")
    assert fast_header(path) == torch_header(path)


# --------------------------------------------------------------------------- schema errors


@pytest.mark.parametrize(
    "payload",
    [
        [1, 2],
        {"features": "not a tensor", "path": "x"},
        {"features": torch.zeros(4, 8), "format": "other", "version": 1, "meta": {}},
        {"features": torch.zeros(4, 8), "format": "vggtctl.sidecar", "version": 2, "meta": {}},
        {"features": torch.zeros(4, 8), "format": "vggtctl.sidecar", "version": 1, "meta": {"image": {}}},
        {"features": torch.zeros(4, 8), "nothing": 1},
    ],
)
def test_schema_errors_are_the_same(tmp_path: Path, payload: object) -> None:
    path = tmp_path / "s.jpg.vggt_cache.pt"
    torch.save(payload, path)
    fast = outcome(lambda p: sidecar._fast_header(str(p)), path)
    assert fast[0] == "SidecarFormatError"  # judged by the fast reader, no fallback needed
    assert fast == outcome(torch_header, path)


def test_schema_errors_on_shape_and_dtype_are_the_same(tmp_path: Path) -> None:
    image = tb.write_image(tmp_path / "a.jpg")
    for feats, grid, dtype in (
        (torch.zeros(4, 8), (3, 3), "float32"),  # patch count != grid
        (torch.zeros(4, 8), (2, 2), "bfloat16"),  # dtype != meta
        (torch.zeros(2, 2, 2), (2, 1), "float32"),  # not 2-D
        (torch.zeros(4, 8), ("x", 10**12), "float32"),  # a grid that is not two numbers
    ):
        path = Path(sidecar.sidecar_path(image))
        sidecar.write(path, feats, base_meta(image, grid, dtype))
        fast = outcome(lambda p: sidecar._fast_header(str(p)), path)
        assert fast[0] == "SidecarFormatError"
        assert fast == outcome(torch_header, path)


# --------------------------------------------------------------------------- damage


def cut(path: Path, at: int) -> None:
    path.write_bytes(path.read_bytes()[:at])


@pytest.mark.parametrize("where", ["tensor data", "data.pkl", "central directory", "end record"])
def test_truncated_anywhere_is_corrupt(tmp_path: Path, where: str) -> None:
    path = write(tmp_path, torch.randn(64, 16).to(torch.bfloat16))
    size = path.stat().st_size
    with zipfile.ZipFile(path) as zf:
        directory_at = zf.start_dir
    at = {
        "tensor data": member_span(path, "data/0")[0] + 100,
        "data.pkl": member_span(path, "data.pkl")[0] + 50,
        "central directory": size - 120,
        "end record": size - 5,
    }[where]
    assert 0 < at < size
    if where == "central directory":
        assert at > directory_at
    cut(path, at)
    got = sidecar.classify(path)
    assert got.verdict is Verdict.CORRUPT, got.reason
    with pytest.raises(Exception):  # noqa: B017 - any refusal will do
        sidecar.read_header(path)


def test_storage_record_shorter_than_the_tensor_is_corrupt(tmp_path: Path) -> None:
    path = write(tmp_path, torch.randn(4, 8).to(torch.bfloat16))
    short = rezip(
        path, tmp_path / "b.jpg.vggt_cache.pt", lambda n, d: d[: len(d) // 2] if n.endswith("/data/0") else d
    )
    with pytest.raises(torchzip.BadArchive, match="holds 32 bytes, the tensor needs 64"):
        sidecar.read_header(short)
    tb.write_image(tmp_path / "b.jpg")
    assert sidecar.classify(short).verdict is Verdict.CORRUPT
    # the full read (verify) refuses it too, where torch.load alone would read past the record
    with pytest.raises(torchzip.BadArchive):
        sidecar.read(short)
    assert sidecar.classify(short, full=True).verdict is Verdict.CORRUPT


def test_missing_storage_record_is_corrupt(tmp_path: Path) -> None:
    path = write(tmp_path, tb.features())
    gone = rezip(path, tmp_path / "b.jpg.vggt_cache.pt", lambda n, d: None if n.endswith("/data/0") else d)
    with pytest.raises(torchzip.BadArchive, match="missing"):
        sidecar.read_header(gone)
    with pytest.raises(RuntimeError):  # the reference refuses it too
        torch_header(gone)


@pytest.mark.parametrize(
    "content", [b"", b"PK", b"PK\x03\x04" + b"\0" * 40, b"not a zip at all\n" * 10, os.urandom(3000)]
)
def test_not_a_zip_is_corrupt(tmp_path: Path, content: bytes) -> None:
    image = tb.write_image(tmp_path / "a.jpg")
    path = Path(sidecar.sidecar_path(image))
    path.write_bytes(content)
    assert sidecar.classify(path).verdict is Verdict.CORRUPT


def test_random_bytes_after_a_zip_header_are_corrupt(tmp_path: Path) -> None:
    path = write(tmp_path, tb.features())
    raw = bytearray(path.read_bytes())
    raw[200:] = os.urandom(len(raw) - 200)
    path.write_bytes(bytes(raw))
    assert sidecar.classify(path).verdict is Verdict.CORRUPT


# --------------------------------------------------------------------------- fallback


def spy_torch_loads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []
    real = sidecar._load

    def spy(path: Any) -> Any:
        calls.append(os.fspath(path))
        return real(path)

    monkeypatch.setattr(sidecar, "_load", spy)
    return calls


def test_codec_files_never_reach_torch_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tree = tb.make_tree(tmp_path, {"a.jpg": "valid", "b.jpg": "stale", "c.jpg": "legacy", "d.jpg": "orphan"})
    calls = spy_torch_loads(monkeypatch)
    for path, verdict in tree.expected.items():
        assert sidecar.classify(path, tb.expectation()).verdict is verdict
    assert calls == []


@pytest.mark.filterwarnings("ignore:Detected pickle protocol 4")
@pytest.mark.parametrize(
    "variant",
    ["parameter", "tensor in meta", "no version record", "bad byteorder", "protocol 4"],
)
def test_what_the_fast_reader_does_not_model_classifies_as_before(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, variant: str
) -> None:
    image = tb.write_image(tmp_path / "a.jpg")
    path = Path(sidecar.sidecar_path(image))
    meta = base_meta(image)
    feats = tb.features()
    payload: dict[str, Any] = {"features": feats, "format": "vggtctl.sidecar", "version": 1, "meta": meta}
    if variant == "parameter":
        payload["features"] = torch.nn.Parameter(feats, requires_grad=False)
    elif variant == "tensor in meta":
        meta["extra"] = torch.arange(3)
    if variant == "protocol 4":  # torch's weights-only unpickler lacks its opcodes: corrupt
        torch.save(payload, path, pickle_protocol=4)
    else:
        torch.save(payload, path)
    edits: dict[str, Callable[[str, bytes], bytes | None]] = {
        "no version record": lambda n, d: None if n.endswith("/version") else d,
        "bad byteorder": lambda n, d: b"middle" if n.endswith("/byteorder") else d,
    }
    if variant in edits:
        source = path.rename(tmp_path / "orig.pt")
        rezip(source, path, edits[variant], zipfile.ZIP_STORED)
    assert not isinstance(sidecar._fast_header(str(path)), sidecar.Header)  # handed to the reference
    reference = outcome(torch_header, path)
    calls = spy_torch_loads(monkeypatch)
    assert repr(outcome(sidecar.read_header, path)) == repr(reference)  # repr: a tensor in meta
    assert calls == [str(path)]
    got = sidecar.classify(path, tb.expectation())
    assert got.verdict is (Verdict.VALID if reference[0] == "ok" else Verdict.CORRUPT), got.reason


def test_a_compressed_archive_is_corrupt_without_reaching_torch_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """torch.save stores records as they are; inflating a deflated one could take any memory
    (a small file can declare gigabytes), so no reader inflates it."""
    path = write(tmp_path, tb.features())
    source = path.rename(tmp_path / "orig.pt")
    rezip(source, path, lambda _n, d: d, zipfile.ZIP_DEFLATED)
    calls = spy_torch_loads(monkeypatch)
    got = sidecar.classify(path, tb.expectation(), full=True)
    assert got.verdict is Verdict.CORRUPT and "compressed: not written by torch.save" in got.reason
    assert calls == []


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_a_v1_sidecar_not_written_by_torch_save_is_corrupt(tmp_path: Path) -> None:
    """torch.save writes pickle protocol 2. torch.load reads protocol 3 too, but reads past a
    storage record that is too short; a v1 sidecar is only ever written by sidecar.write."""
    image = tb.write_image(tmp_path / "a.jpg")
    path = Path(sidecar.sidecar_path(image))
    payload = {"features": tb.features(), "format": "vggtctl.sidecar", "version": 1, "meta": base_meta(image)}
    torch.save(payload, path, pickle_protocol=3)
    for full in (False, True):
        got = sidecar.classify(path, tb.expectation(), full=full)
        assert got.verdict is Verdict.CORRUPT and "not laid out as torch.save writes" in got.reason


def test_a_fifo_named_like_a_sidecar_is_corrupt_at_once(tmp_path: Path) -> None:
    """Opening a FIFO for reading waits for a writer; verify/prune/status must not hang."""
    import threading

    image = tb.write_image(tmp_path / "a.jpg")
    path = sidecar.sidecar_path(image)
    os.mkfifo(path)
    got: list[Any] = []
    worker = threading.Thread(
        target=lambda: got.append(sidecar.classify(path, tb.expectation())), daemon=True
    )
    worker.start()
    worker.join(timeout=20)
    assert got, "classify hung on a FIFO"
    assert got[0].verdict is Verdict.CORRUPT and "special file" in got[0].reason


def test_a_record_declaring_more_than_torch_save_writes_is_corrupt(tmp_path: Path) -> None:
    """A small (or sparse) file can declare huge records; neither reader may load them."""
    path = write(tmp_path, tb.features())
    source = path.rename(tmp_path / "orig.pt")
    rezip(source, path, lambda n, d: b" " * 100_000 + d if n.endswith("/version") else d)
    got = sidecar.classify(path, tb.expectation(), full=True)
    assert got.verdict is Verdict.CORRUPT and "declares 100,002 bytes" in got.reason, got.reason


def test_a_meta_field_of_the_wrong_type_is_that_file_corrupt_not_a_crash(tmp_path: Path) -> None:
    image = tb.write_image(tmp_path / "a.jpg")
    meta = base_meta(image)
    meta["context"] = {"kind": "sequence", "frames": 5, "signature": "x"}
    path = Path(sidecar.sidecar_path(image))
    sidecar.write(path, tb.features(), meta)
    got = sidecar.classify(path, tb.expectation())
    assert got.verdict is Verdict.CORRUPT and "meta holds a value of the wrong type" in got.reason


# --------------------------------------------------------------------------- safety


class _Call:
    """Pickles as a call of `fn(*args)`."""

    def __init__(self, fn: Callable[..., Any], *args: Any) -> None:
        self.fn, self.args = fn, args

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return (self.fn, self.args)


def hostile_sidecar(tmp_path: Path, evil: object) -> Path:
    """A real codec sidecar whose data.pkl is swapped for one that holds `evil` in its meta."""
    path = write(tmp_path, tb.features())
    meta = base_meta(tmp_path / "a.jpg")
    meta["evil"] = evil
    pickled = pickle.dumps({"format": "vggtctl.sidecar", "version": 1, "meta": meta}, protocol=2)
    return rezip(path, tmp_path / "x.pt", lambda n, d: pickled if n.endswith("/data.pkl") else d)


@pytest.mark.parametrize("how", ["os.system", "builtins.eval", "builtins.exec", "builtins.open"])
def test_hostile_global_is_refused_by_the_fast_reader_itself(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    marker = tmp_path / "PWNED"
    evil = {
        "os.system": _Call(os.system, f"touch {marker}"),
        "builtins.eval": _Call(eval, f"open({str(marker)!r}, 'w')"),
        "builtins.exec": _Call(exec, f"open({str(marker)!r}, 'w')"),
        "builtins.open": _Call(open, str(marker), "w"),
    }[how]
    path = hostile_sidecar(tmp_path, evil)
    with pytest.raises(torchzip.UnknownGlobal) as refused:
        torchzip.load_structure(path)
    assert isinstance(refused.value, pickle.UnpicklingError)
    calls = spy_torch_loads(monkeypatch)
    with pytest.raises(pickle.UnpicklingError):
        sidecar.read_header(path)
    assert calls == []  # refused without asking torch
    monkeypatch.undo()
    got = sidecar.classify(path, full=False)
    assert got.verdict is Verdict.CORRUPT and "not allowed" in got.reason
    assert sidecar.classify(path, full=True).verdict is Verdict.CORRUPT
    assert not marker.exists()


def test_a_pickle_cannot_modify_the_stubs(tmp_path: Path) -> None:
    """BUILD on a whitelisted global would set state on our stub: refused, the stub unchanged."""
    path = write(tmp_path, tb.features())
    before = fast_header(path)
    # {"x": _rebuild_tensor_v2 with BUILD({"fn": print})}, by hand: GLOBAL, EMPTY_DICT, BUILD.
    pickled = b"\x80\x02}X\x01\x00\x00\x00xctorch._utils\n_rebuild_tensor_v2\n}X\x02\x00\x00\x00fn\x89sbs."
    tampered = rezip(path, tmp_path / "t.pt", lambda n, d: pickled if n.endswith("/data.pkl") else d)
    with pytest.raises(torchzip.NotUnderstood, match="BUILD"):
        torchzip.load_structure(tampered)
    assert sidecar.classify(tampered).verdict is Verdict.CORRUPT  # torch refuses it too
    assert fast_header(path) == before
    stub = torchzip._GLOBALS[("torch._utils", "_rebuild_tensor_v2")]
    assert stub.fn is torchzip._rebuild_tensor_v2
