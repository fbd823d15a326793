"""The sidecar codec: round trip, classification of every kind of file, and the safety promises
(a hostile pickle never runs, a killed writer never leaves a torn sidecar)."""

from __future__ import annotations

import errno
import io
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import treebuilder as tb

from vggtctl import sidecar
from vggtctl.keys import ContextSettings, ImageKey
from vggtctl.sidecar import Expectation, Verdict


def test_round_trip_keeps_features_and_meta(tmp_path: Path) -> None:
    image = tb.write_image(tmp_path / "a.jpg")
    feats = tb.features(3)
    path = tb.write_sidecar(image, feats=feats)
    assert path.name == "a.jpg.vggt_cache.pt"
    loaded = sidecar.read(path)
    assert torch.equal(loaded.features, feats)
    assert loaded.header.version == 1
    assert loaded.header.shape == (4, 8)
    assert loaded.header.meta["model"]["fingerprint"] == tb.CURRENT_FINGERPRINT
    assert loaded.header.meta["image"]["size"] == image.stat().st_size
    # The documented three-line read works on a file the codec wrote.
    raw = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    assert set(raw) == {"features", "format", "version", "meta"}
    assert raw["format"] == "vggtctl.sidecar"


def test_write_leaves_no_temp_files(tmp_path: Path) -> None:
    image = tb.write_image(tmp_path / "a.jpg")
    tb.write_sidecar(image)
    tb.write_sidecar(image, feats=tb.features(1))  # overwrite
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jpg", "a.jpg.vggt_cache.pt"]


def test_a_write_that_fails_midway_keeps_the_previous_sidecar(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full disk halfway through torch.save: readers still get the old file, and no temp file
    is left behind (a writer straight to the final name would leave a torn or no sidecar)."""
    image = tb.write_image(tmp_path / "a.jpg")
    path = tb.write_sidecar(image, feats=tb.features(1))

    def half_then_full(payload: object, fh: io.BufferedWriter) -> None:
        fh.write(b"PK\x03\x04partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(sidecar, "_save", half_then_full)
    with pytest.raises(OSError) as info:
        tb.write_sidecar(image, feats=tb.features(2))
    assert info.value.errno == errno.ENOSPC
    assert torch.equal(sidecar.read(path).features, tb.features(1))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jpg", "a.jpg.vggt_cache.pt"]


def test_a_row_view_writes_only_the_row(tmp_path: Path) -> None:
    """torch.save stores a view's whole storage: a row of a batch must not write the batch."""
    batch = torch.randn(16, 64, 32).bfloat16()  # 16 rows of an 8x8 grid
    grid = {**tb.PREPROCESS, "grid_hw": [8, 8]}
    path = tb.write_sidecar(tb.write_image(tmp_path / "a.jpg"), preprocess=grid, feats=batch[0].clone())
    meta = sidecar.read_header(path).meta
    n_view = sidecar.write(path, batch[3], meta)
    assert torch.equal(sidecar.read(path).features, batch[3])
    n_own = sidecar.write(path, batch[3].clone(), meta)
    assert n_view == n_own == path.stat().st_size
    assert n_view < batch.numel() * batch.element_size() // 4  # the row is 1/16 of the batch


@pytest.mark.parametrize("kind", [k for k, v in tb.KINDS.items() if v is not None])
def test_classify_each_kind(tmp_path: Path, kind: str) -> None:
    tree = tb.make_tree(tmp_path, {"ep/x.jpg": kind})
    ((path, verdict),) = tree.expected.items()
    got = sidecar.classify(path, tb.expectation())
    assert got.verdict is verdict, got.reason
    assert (got.reason == "") == (verdict is Verdict.VALID)


def test_an_orphan_is_an_orphan_whatever_it_holds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Image gone: orphan before corrupt and legacy, judged without opening the file, so status's
    count by name, `prune --orphans` and verify agree."""
    corrupt_orphan = tb.write_sidecar(tb.write_image(tmp_path / "a.jpg"))
    tb.truncate(corrupt_orphan)
    (tmp_path / "a.jpg").unlink()
    legacy_orphan = tb.write_legacy(tb.write_image(tmp_path / "b.jpg"))
    (tmp_path / "b.jpg").unlink()
    opened: list[str] = []
    real_open = os.open
    monkeypatch.setattr(os, "open", lambda p, *a, **k: opened.append(os.fspath(p)) or real_open(p, *a, **k))
    for path in (corrupt_orphan, legacy_orphan):
        for full in (False, True):
            got = sidecar.classify(path, full=full)
            assert (got.verdict, got.reason) == (Verdict.ORPHAN, "image is gone")
    assert opened == []
    monkeypatch.undo()
    # with its image present, a truncated sidecar is corrupt and a legacy file legacy
    tb.write_image(tmp_path / "a.jpg")
    tb.write_image(tmp_path / "b.jpg")
    assert sidecar.classify(corrupt_orphan).verdict is Verdict.CORRUPT
    assert sidecar.classify(legacy_orphan).verdict is Verdict.LEGACY


def test_quick_vs_full_read_of_nan_features(tmp_path: Path) -> None:
    image = tb.write_image(tmp_path / "a.jpg")
    feats = tb.features()
    feats[0, 0] = float("nan")
    path = tb.write_sidecar(image, feats=feats)
    assert sidecar.classify(path).verdict is Verdict.VALID  # the header is fine
    full = sidecar.classify(path, full=True)
    assert full.verdict is Verdict.CORRUPT and "NaN" in full.reason


def _flip_bit_in_features(path: Path) -> None:
    """One bit of the tensor's bytes flipped in place (bit rot, a bad copy): the file keeps its size."""
    from vggtctl import torchzip

    fd = os.open(path, os.O_RDONLY)
    try:
        archive = torchzip._Archive(fd)
        name = next(n for n in archive.members if "/data/" in n and not n.endswith(".data/version"))
        start, size = archive.data_span(name)
    finally:
        os.close(fd)
    raw = bytearray(path.read_bytes())
    raw[start + size // 2] ^= 0x04
    path.write_bytes(bytes(raw))


def test_a_flipped_bit_in_the_tensor_is_corrupt_on_a_full_read(tmp_path: Path) -> None:
    image = tb.write_image(tmp_path / "a.jpg")
    feats = tb.features()  # bf16: the flipped bit lands in a mantissa, the value stays finite
    path = tb.write_sidecar(image, feats=feats)
    assert sidecar.classify(path, full=True).verdict is Verdict.VALID
    _flip_bit_in_features(path)
    # torch.load serves it, and its values are finite: only the CRC tells
    changed = sidecar.read(path).features
    assert not torch.equal(changed, feats) and bool(torch.isfinite(changed).all())
    assert sidecar.classify(path).verdict is Verdict.VALID  # the header check reads no tensor byte
    full = sidecar.classify(path, full=True)
    assert full.verdict is Verdict.CORRUPT and "CRC-32" in full.reason


def test_a_record_without_a_crc_is_not_checked(tmp_path: Path) -> None:
    """torch can be told not to compute CRCs; it then records 0, which must not read as a mismatch."""
    from vggtctl import torchzip

    path = tb.write_sidecar(tb.write_image(tmp_path / "a.jpg"))
    fd = os.open(path, os.O_RDONLY)
    try:
        archive = torchzip._Archive(fd)
        crcs = dict(archive.crcs)
        table_at = archive.cd_at
    finally:
        os.close(fd)
    assert torchzip.check_checksums(path) == len(crcs)
    raw = bytearray(path.read_bytes())
    pos = table_at
    for _ in crcs:  # zero the CRC of every directory entry (offset 16 of each entry)
        raw[pos + 16 : pos + 20] = b"\0\0\0\0"
        name_len, extra_len, comment_len = (
            int.from_bytes(raw[pos + k : pos + k + 2], "little") for k in (28, 30, 32)
        )
        pos += 46 + name_len + extra_len + comment_len
    path.write_bytes(bytes(raw))
    assert torchzip.check_checksums(path) == 0
    assert sidecar.classify(path, full=True).verdict is Verdict.VALID


def test_model_fingerprint_only_expectation(tmp_path: Path) -> None:
    path = tb.write_sidecar(tb.write_image(tmp_path / "a.jpg"), model=tb.OTHER_MODEL)
    expect = Expectation(model_fingerprint=tb.CURRENT_FINGERPRINT)
    assert sidecar.classify(path, expect).verdict is Verdict.MODEL_MISMATCH
    assert (
        sidecar.classify(path, Expectation(model_fingerprint=tb.OTHER_FINGERPRINT)).verdict is Verdict.VALID
    )


def test_image_hash_keeps_touched_image_valid(tmp_path: Path) -> None:
    image = tb.write_image(tmp_path / "a.jpg")
    meta = sidecar.build_meta(
        image_name=image.name,
        image_key=ImageKey.of(image, with_hash=True),
        model=tb.CURRENT_MODEL,
        preprocess=tb.PREPROCESS,
        context=ContextSettings(),
        frames=[],
        signature=None,
    )
    path = sidecar.sidecar_path(image)
    sidecar.write(path, tb.features(), meta)
    tb.touch_later(image)
    assert sidecar.classify(path).verdict is Verdict.VALID


@pytest.mark.parametrize(
    ("name", "is_sidecar", "is_temp"),
    [
        ("x.jpg.vggt_cache.pt", True, False),
        ("x.vggt_cache.pt.bak", False, False),
        ("x.vggt_cache.pt2", False, False),
        ("vggt_cache.pt", False, False),
        (".vggt_cache.pt", False, False),
        ("x.jpg.vggt_cache.pt.tmp-123-0a1b2c3d", False, True),
        ("x.jpg.vggt_cache.pt.tmp-abc-0a1b2c3d", False, False),
        ("x.jpg.vggt_cache.pt.tmp-123-XYZ", False, False),
        (".vggt_cache.pt.tmp-1-0a1b2c3d", False, False),
    ],
)
def test_name_rules(name: str, is_sidecar: bool, is_temp: bool) -> None:
    assert sidecar.is_sidecar_name(name) is is_sidecar
    assert sidecar.is_temp_name(name) is is_temp


# --------------------------------------------------------------------------- safety


class _Plant:
    """Unpickling this calls open(marker, "w"): it would create the marker file."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (self.marker, "w"))


def test_hostile_raw_pickle_is_corrupt_and_never_runs(tmp_path: Path) -> None:
    image = tb.write_image(tmp_path / "a.jpg")
    marker = tmp_path / "PWNED"
    path = Path(sidecar.sidecar_path(image))
    path.write_bytes(pickle.dumps({"features": None, "x": _Plant(str(marker))}, protocol=2))
    assert not marker.exists()
    for full in (False, True):
        got = sidecar.classify(path, full=full)
        assert got.verdict is Verdict.CORRUPT
    with pytest.raises(Exception):  # noqa: B017 - any refusal will do, as long as nothing runs
        sidecar.read(path)
    assert not marker.exists()


def test_hostile_torch_save_is_corrupt_and_never_runs(tmp_path: Path) -> None:
    image = tb.write_image(tmp_path / "a.jpg")
    marker = tmp_path / "PWNED"
    path = Path(sidecar.sidecar_path(image))
    torch.save(
        {
            "features": tb.features(),
            "format": "vggtctl.sidecar",
            "version": 1,
            "meta": {"evil": _Plant(str(marker))},
        },
        path,
    )
    assert not marker.exists()
    got = sidecar.classify(path, tb.expectation())
    assert got.verdict is Verdict.CORRUPT
    assert sidecar.classify(path, full=True).verdict is Verdict.CORRUPT
    assert not marker.exists()


def test_truncated_and_empty_and_garbage_are_corrupt_with_a_plain_reason(tmp_path: Path) -> None:
    outside = tmp_path / "outside.txt"
    outside.write_text("a user's file")

    def link(p: Path) -> None:
        p.unlink()
        p.symlink_to(outside)

    for name, mangle, reason in (
        ("t.jpg", lambda p: tb.truncate(p, 0.7), "truncated: the zip directory at the end is missing"),
        ("e.jpg", lambda p: p.write_bytes(b""), "empty file (0 bytes)"),
        ("g.jpg", lambda p: p.write_bytes(b"\x00" + os.urandom(300)), "not a zip archive"),
        ("s.jpg", link, "a symbolic link or special file, not a sidecar (links are not followed)"),
    ):
        path = tb.write_sidecar(tb.write_image(tmp_path / name))
        mangle(path)
        for full in (False, True):
            got = sidecar.classify(path, full=full)
            assert got.verdict is Verdict.CORRUPT, name
            assert got.reason.startswith(reason), (name, got.reason)
    assert outside.read_text() == "a user's file"


def test_legacy_file_is_legacy_and_readable(tmp_path: Path) -> None:
    image = tb.write_image(tmp_path / "a.jpg")
    path = tb.write_legacy(image)
    got = sidecar.classify(path, tb.expectation())
    assert got.verdict is Verdict.LEGACY
    header = sidecar.read_header(path)
    assert header.version == 0 and header.legacy_path == str(image)


# One interpreter imports torch once, then forks writer children and SIGKILLs each mid-loop.
_KILLER = textwrap.dedent(
    """
    import os, signal, sys, time, torch
    from vggtctl import sidecar
    from vggtctl.keys import ContextSettings, ImageKey, ModelKey
    torch.set_num_threads(1)  # no OpenMP pool in the parent: a forked child would hang in it
    folder, count = sys.argv[1], int(sys.argv[2])
    delays = [float(d) for d in sys.argv[3].split(",")]
    model = ModelKey("a" * 64, "m", -2, "full", "float32")
    pre = {"fingerprint": "1" * 64, "preset": "p", "input_hw": [28, 28], "grid_hw": [64, 64]}
    images = [f"{folder}/img{i}.jpg" for i in range(count)]
    metas = [sidecar.build_meta(image_name=p.rsplit("/", 1)[1], image_key=ImageKey.of(p), model=model,
             preprocess=pre, context=ContextSettings(), frames=[], signature=None) for p in images]
    for delay in delays:
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # writer: rewrite every sidecar forever (1 MiB each, slow enough to be hit)
            os.close(read_end)
            feats = torch.randn(64 * 64, 64)
            n = 0
            while True:
                i = n % count
                sidecar.write(sidecar.sidecar_path(images[i]), feats + n, metas[i])
                n += 1
                if n == count:
                    os.write(write_end, b"r")
        os.close(write_end)
        assert os.read(read_end, 1) == b"r"
        time.sleep(delay)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(read_end)
        # judged after each kill: the next writer rewrites every sidecar before it can be hit
        for name in sorted(os.listdir(folder)):
            if sidecar.is_sidecar_name(name):
                got = sidecar.classify(os.path.join(folder, name), full=True)
                if got.verdict is not sidecar.Verdict.VALID:
                    print(f"after the kill at {delay}s: {name} is {got.verdict.value}: {got.reason}")
    print("done", flush=True)
    """
)


def test_sigkilled_writers_never_leave_a_torn_sidecar(tmp_path: Path) -> None:
    """Kill a writer mid-loop, several times: after each kill every final-named file reads in
    full. (test_a_write_that_fails_midway_keeps_the_previous_sidecar is the deterministic check.)"""
    for i in range(3):
        tb.write_image(tmp_path / f"img{i}.jpg", i)
    delays = "0.0,0.013,0.031,0.005,0.047,0.021,0.002,0.038"
    done = subprocess.run(
        [sys.executable, "-c", _KILLER, str(tmp_path), "3", delays],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["done"]
    finals = 0
    for entry in tmp_path.iterdir():
        if sidecar.is_temp_name(entry.name):
            assert sidecar.classify(entry).verdict is Verdict.TEMP
        elif sidecar.is_sidecar_name(entry.name):
            finals += 1
            got = sidecar.classify(entry, full=True)
            assert got.verdict is Verdict.VALID, (entry, got.reason)
            assert sidecar.read(entry).features.shape == (64 * 64, 64)
    assert finals == 3


def test_a_folder_name_that_is_not_utf8_reads_like_any_other(tmp_path: Path) -> None:
    """Byte names are surrogate-escaped str in Python; torch's mmap loader refused them, so
    full verify called these sidecars corrupt and the trainer's store never served them."""
    folder = tmp_path / os.fsdecode(b"ep_\xff\xfe")
    try:
        folder.mkdir()
    except (OSError, UnicodeEncodeError):
        pytest.skip("this file system refuses names that are not UTF-8")
    image = tb.write_image(folder / "a.jpg")
    path = tb.write_sidecar(image)
    assert torch.equal(sidecar.read(path, check_crc=True).features, tb.features())
    assert sidecar.classify(path, tb.expectation(), full=True).verdict is Verdict.VALID
