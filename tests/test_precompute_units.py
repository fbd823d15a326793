"""Precompute building blocks without a model: claims, the writer pool, CPU counting, the
relaunch exit code, deduplication and chunking."""

from __future__ import annotations

import errno
import gc
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import types
from pathlib import Path
from typing import ClassVar

import pytest
import torch

from vggtctl import claims, distributed, sidecar
from vggtctl.catalog import Item
from vggtctl.cli.precompute import _strip_gpus
from vggtctl.distributed import DistInfo
from vggtctl.precompute import chunked, unique_by_sidecar
from vggtctl.preprocess import unit_pixels
from vggtctl.writer import DiskFullSkipped, SidecarWriter

# --------------------------------------------------------------------------- claims


@pytest.fixture
def sleeper():
    """A live process that is not us."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc
    proc.kill()
    proc.wait()


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _write_claim(root: Path, chunk: str, owner: dict, age_s: float = 0.0) -> Path:
    path = claims.claims_dir(root) / f"{chunk}.claim"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(owner))
    if age_s:
        past = time.time() - age_s
        os.utime(path, (past, past))
    return path


def _local_owner(pid: int) -> dict:
    return {
        "host": socket.gethostname(),
        "pidns": claims._pid_namespace(),
        "pid": pid,
        "start": claims.process_start(pid),
        "time": time.time(),
    }


def test_claim_is_exclusive_and_released(tmp_path):
    book = claims.ClaimBook(tmp_path)
    assert book.try_claim("c1")
    owner = json.loads((claims.claims_dir(tmp_path) / "c1.claim").read_text())
    assert owner["pid"] == os.getpid() and owner["host"] == socket.gethostname()
    other = claims.ClaimBook(tmp_path)  # a second open book in this live process
    assert not other.try_claim("c1")
    book.release("c1")
    assert not (claims.claims_dir(tmp_path) / "c1.claim").exists()
    assert other.try_claim("c1")
    other.release_all()
    assert list(claims.claims_dir(tmp_path).iterdir()) == []


def _claims_fail_after(monkeypatch, n: int, err: int = errno.ENOSPC) -> None:
    """Writing a claim's owner record fails (a full disk) once `n` claims were written."""
    real_dump = json.dump
    written = []

    def dump(obj, fh, *args, **kwargs):  # type: ignore[no-untyped-def]
        if isinstance(obj, dict) and "book" in obj:
            if len(written) >= n:
                raise OSError(err, os.strerror(err))
            written.append(obj)
        return real_dump(obj, fh, *args, **kwargs)

    monkeypatch.setattr(json, "dump", dump)


def test_a_claim_that_cannot_be_written_is_not_left_behind(tmp_path, monkeypatch):
    book = claims.ClaimBook(tmp_path)
    _claims_fail_after(monkeypatch, 0)
    with pytest.raises(OSError) as info:
        book.try_claim("c1")
    assert info.value.errno == errno.ENOSPC and info.value.filename.endswith("c1.claim")
    assert list(claims.claims_dir(tmp_path).iterdir()) == [] and book.held == set()
    monkeypatch.undo()
    assert claims.ClaimBook(tmp_path).try_claim("c1")  # not "being written" for 15 minutes


def test_a_stalled_owner_leaves_the_claim_it_lost_alone(tmp_path):
    """Owner A stalls past the TTL; B (another host) takes the chunk over. When A wakes up, its
    heartbeat and release must not touch B's claim, or a third process could claim it too."""
    a, b, c = (claims.ClaimBook(tmp_path) for _ in range(3))
    for book, host in ((a, "node-a"), (b, "node-b"), (c, "node-c")):
        book.owner["host"] = host
    assert a.try_claim("chunk0")
    path = claims.claims_dir(tmp_path) / "chunk0.claim"
    stale = time.time() - claims.DEFAULT_TTL_S - 60
    os.utime(path, (stale, stale))
    assert b.try_claim("chunk0")
    earlier = time.time() - 120
    os.utime(path, (earlier, earlier))
    a.heartbeat()
    assert path.stat().st_mtime == pytest.approx(earlier)  # B's claim, not refreshed by A
    assert "chunk0" not in a.held  # A knows it lost it
    a.release("chunk0")
    a.held.add("chunk0")  # even a release of a claim A still believes it holds
    a.release("chunk0")
    assert json.loads(path.read_text())["host"] == "node-b"
    assert not c.try_claim("chunk0")
    b.release("chunk0")
    assert c.try_claim("chunk0")
    for book in (a, b, c):
        book.release_all()


def test_claim_of_live_process_is_respected(tmp_path, sleeper):
    path = _write_claim(tmp_path, "c", _local_owner(sleeper.pid))
    before = path.read_text()
    assert not claims.ClaimBook(tmp_path).try_claim("c")
    assert path.read_text() == before


def test_claim_of_dead_pid_on_this_host_is_taken_over(tmp_path):
    owner = _local_owner(os.getpid())
    owner["pid"] = _dead_pid()
    _write_claim(tmp_path, "c", owner)
    book = claims.ClaimBook(tmp_path)
    assert book.try_claim("c")
    assert json.loads((claims.claims_dir(tmp_path) / "c.claim").read_text())["pid"] == os.getpid()
    assert book.taken_over == 1
    assert [p.name for p in claims.claims_dir(tmp_path).iterdir()] == ["c.claim"]  # nothing left aside


@pytest.mark.skipif(claims.process_start(os.getpid()) is None, reason="no /proc start times here")
def test_claim_of_reused_pid_is_taken_over(tmp_path, sleeper):
    owner = _local_owner(sleeper.pid)
    owner["start"] -= 1  # the pid now belongs to a process that started later than the owner
    _write_claim(tmp_path, "c", owner)
    assert claims.ClaimBook(tmp_path).try_claim("c")


def test_leftover_claim_of_a_closed_book_in_this_process_is_taken_over(tmp_path):
    first = claims.ClaimBook(tmp_path)
    assert first.try_claim("c")
    first.held.clear()  # as if the run died without releasing
    first.release_all()  # closes the book
    assert claims.ClaimBook(tmp_path).try_claim("c")


def test_claim_from_another_host_waits_for_the_ttl(tmp_path):
    foreign = {"host": "elsewhere-" + socket.gethostname(), "pidns": None, "pid": 1, "start": 5}
    _write_claim(tmp_path, "fresh", foreign)
    _write_claim(tmp_path, "old", foreign, age_s=claims.DEFAULT_TTL_S + 60)
    book = claims.ClaimBook(tmp_path)
    assert not book.try_claim("fresh")
    assert book.try_claim("old")


def test_old_claim_is_taken_over_even_from_a_live_local_pid(tmp_path, sleeper):
    _write_claim(tmp_path, "c", _local_owner(sleeper.pid), age_s=120)
    assert not claims.ClaimBook(tmp_path, ttl_s=600).try_claim("c")
    assert claims.ClaimBook(tmp_path, ttl_s=60).try_claim("c")


def test_empty_claim_being_written_is_respected(tmp_path):
    _write_claim(tmp_path, "c", {}).write_text("")
    assert not claims.ClaimBook(tmp_path).try_claim("c")


def _held_claim_an_hour_old(tmp_path):  # type: ignore[no-untyped-def]
    book = claims.ClaimBook(tmp_path)
    assert book.try_claim("c")
    path = claims.claims_dir(tmp_path) / "c.claim"
    past = time.time() - 3600
    os.utime(path, (past, past))
    return book, path, past


def test_heartbeat_refreshes_held_claims(tmp_path):
    book, path, past = _held_claim_an_hour_old(tmp_path)
    book.heartbeat()
    assert path.stat().st_mtime > past + 1800


def test_claims_are_kept_alive_by_a_thread_until_released(tmp_path):
    book, path, past = _held_claim_an_hour_old(tmp_path)
    book.keep_alive(interval_s=0.01)
    deadline = time.monotonic() + 10
    while path.stat().st_mtime < past + 1800 and time.monotonic() < deadline:
        time.sleep(0.01)  # no main loop calls heartbeat(): the thread does
    assert path.stat().st_mtime > past + 1800
    book.release_all()
    assert not path.exists() and not book._beating.is_alive()


@pytest.mark.parametrize("hard_links", [True, False])
def test_a_live_claim_moved_aside_goes_back_unless_the_chunk_was_claimed_meanwhile(
    tmp_path, monkeypatch, hard_links
):
    if not hard_links:  # some network and FUSE file systems refuse hard links

        def refuse(*_args, **_kwargs):  # type: ignore[no-untyped-def]
            raise PermissionError(errno.EPERM, "Operation not permitted")

        monkeypatch.setattr(os, "link", refuse)
    path, aside = tmp_path / "c.claim", tmp_path / "c.claim.stale-1"
    aside.write_text('{"host": "live"}')
    claims._put_back(aside, path, '{"host": "live"}')
    assert path.read_text() == '{"host": "live"}' and not aside.exists()
    aside.write_text('{"host": "live"}')
    path.write_text('{"host": "newer"}')  # another process claimed the chunk in between
    claims._put_back(aside, path, '{"host": "live"}')
    assert path.read_text() == '{"host": "newer"}' and not aside.exists()


def test_chunk_ids_depend_on_key_position_and_size():
    base = claims.chunk_id("key", "/a.jpg", 0, 64)
    assert base == claims.chunk_id("key", "/a.jpg", 0, 64)
    assert len({base, claims.chunk_id("other", "/a.jpg", 0, 64), claims.chunk_id("key", "/a.jpg", 0, 8)}) == 3


# --------------------------------------------------------------------------- writer


class _Recorder:
    def __init__(self) -> None:
        self.done: dict[str, tuple[int | None, BaseException | None]] = {}
        self.lock = threading.Lock()

    def __call__(self, token, nbytes, error) -> None:
        with self.lock:
            self.done[token] = (nbytes, error)


def _meta() -> dict:
    return {"any": "thing"}


def test_writer_bounds_pending_bytes(monkeypatch):
    gate = threading.Semaphore(0)
    peak = []

    def slow_write(path, features, meta, fsync=False):
        peak.append(writer.pending_bytes)
        gate.acquire()
        return 1

    monkeypatch.setattr(sidecar, "write", slow_write)
    rows = torch.zeros(4, 8)  # 128 bytes each
    recorder = _Recorder()
    writer = SidecarWriter(recorder, threads=4, max_pending_bytes=256)
    started = threading.Event()

    def third() -> None:
        started.set()
        writer.submit("c", rows, _meta(), "c")

    thread = threading.Thread(target=third, daemon=True)
    try:
        writer.submit("a", rows, _meta(), "a")
        writer.submit("b", rows, _meta(), "b")
        assert writer.pending_bytes == 256
        thread.start()
        assert started.wait(30)
        thread.join(0.05)
        # blocked: the budget is spent until a write finishes (a submit that returned would
        # have left the thread and counted its 128 bytes)
        assert thread.is_alive() and writer.pending_bytes == 256
        gate.release()  # "a" or "b" completes
        thread.join(30)
        assert not thread.is_alive()
        assert writer.blocked_seconds > 0  # the back-pressure is measured (stage "wait_writers")
    finally:
        gate.release(8)  # every write that is or will be waiting, whatever failed above
        writer.close()
    assert max(peak) <= 256
    assert writer.pending_bytes == 0
    assert set(recorder.done) == {"a", "b", "c"}


def test_writer_accepts_one_item_larger_than_the_budget(monkeypatch):
    monkeypatch.setattr(sidecar, "write", lambda path, features, meta, fsync=False: 7)
    recorder = _Recorder()
    writer = SidecarWriter(recorder, threads=1, max_pending_bytes=16)
    writer.submit("big", torch.zeros(100), _meta(), "big")
    writer.close()
    assert recorder.done == {"big": (7, None)}


def test_writer_disk_full_fails_later_writes_fast(monkeypatch):
    calls = []

    def write(path, features, meta, fsync=False):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return 10

    monkeypatch.setattr(sidecar, "write", write)
    recorder = _Recorder()
    writer = SidecarWriter(recorder, threads=1)
    for name in "abcd":
        writer.submit(f"/x/{name}", torch.zeros(2), _meta(), name)
    writer.close()
    assert calls == ["/x/a", "/x/b"]  # c and d never reached the disk
    assert writer.disk_full.is_set()
    assert "/x/b" in writer.disk_full_message and "No space left" in writer.disk_full_message
    assert recorder.done["a"] == (10, None)
    assert isinstance(recorder.done["b"][1], OSError) and not isinstance(
        recorder.done["b"][1], DiskFullSkipped
    )
    for name in "cd":
        nbytes, error = recorder.done[name]
        assert nbytes is None and isinstance(error, DiskFullSkipped) and error.errno == errno.ENOSPC


def test_writer_reports_errors_per_item(monkeypatch):
    def write(path, features, meta, fsync=False):
        if path == "ro":
            raise PermissionError(errno.EACCES, "Permission denied", path)
        if path == "odd":
            raise ValueError("cannot pickle this")
        return 5

    monkeypatch.setattr(sidecar, "write", write)
    recorder = _Recorder()
    writer = SidecarWriter(recorder, threads=3)
    for name in ("ok1", "ro", "odd", "ok2"):
        writer.submit(name, torch.zeros(2), _meta(), name)
    writer.close()
    assert recorder.done["ok1"] == (5, None) and recorder.done["ok2"] == (5, None)
    assert isinstance(recorder.done["ro"][1], PermissionError)
    assert isinstance(recorder.done["odd"][1], ValueError)
    assert not writer.disk_full.is_set()


def test_a_failing_done_callback_is_raised_by_close_not_swallowed(monkeypatch):
    monkeypatch.setattr(sidecar, "write", lambda path, features, meta, fsync=False: 5)
    done = []

    def on_done(token, nbytes, error):  # type: ignore[no-untyped-def]
        if token == "bad":
            raise RuntimeError("bookkeeping bug")
        done.append(token)

    writer = SidecarWriter(on_done, threads=2)
    for name in ("a", "bad", "b"):
        writer.submit(name, torch.zeros(2), _meta(), name)
    with pytest.raises(RuntimeError, match="bookkeeping bug"):
        writer.close()
    assert sorted(done) == ["a", "b"]


# --------------------------------------------------------------------------- CPUs


def test_usable_cpus_follows_affinity_not_cpu_count(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 256)
    monkeypatch.setattr(distributed, "cgroup_cpu_limit", lambda: None)
    monkeypatch.delenv("SLURM_CPUS_ON_NODE", raising=False)
    assert distributed.usable_cpus() == 4


def test_usable_cpus_honours_slurm_and_cgroup(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(32)), raising=False)
    monkeypatch.setattr(distributed, "cgroup_cpu_limit", lambda: None)
    monkeypatch.setenv("SLURM_CPUS_ON_NODE", "6")
    assert distributed.usable_cpus() == 6
    monkeypatch.setenv("SLURM_CPUS_ON_NODE", "garbage")
    assert distributed.usable_cpus() == 32
    monkeypatch.setattr(distributed, "cgroup_cpu_limit", lambda: 3)
    assert distributed.usable_cpus() == 3


def test_default_loader_workers_split_over_local_ranks(monkeypatch):
    monkeypatch.setattr(distributed, "usable_cpus", lambda: 16)
    assert distributed.default_loader_workers(DistInfo(0, 1, 0, 1)) == 15
    assert distributed.default_loader_workers(DistInfo(3, 8, 3, 4)) == 3
    monkeypatch.setattr(distributed, "usable_cpus", lambda: 1)
    assert distributed.default_loader_workers(DistInfo()) == 0


@pytest.mark.parametrize(
    ("text", "expected"), [("max 100000", None), ("150000 100000", 2), ("50000 100000", 1), ("junk", None)]
)
def test_cgroup_cpu_limit(tmp_path, text, expected):
    path = tmp_path / "cpu.max"
    path.write_text(text + "\n")
    assert distributed.cgroup_cpu_limit(str(path)) == expected
    assert distributed.cgroup_cpu_limit(str(tmp_path / "absent")) is None


# --------------------------------------------------------------------------- relaunch


class _FakeLauncher:
    """Stands in for `python -m torch.distributed.run`: each 'rank' leaves its exit code."""

    codes: ClassVar[dict[int, int]] = {}
    returncode = 0
    argv: ClassVar[list[str]] = []

    def __init__(self, argv, env, start_new_session=False):
        type(self).argv = argv
        self.env = env
        assert start_new_session  # a terminal's Ctrl-C must not reach torch's launcher

    def wait(self) -> int:
        folder = self.env[distributed.RESULT_DIR_ENV]
        for rank, code in self.codes.items():
            Path(folder, f"rank{rank}.code").write_text(str(code))
        return self.returncode


@pytest.mark.parametrize(
    ("codes", "launcher", "expected"),
    [
        ({0: 0, 1: 0}, 0, 0),
        ({0: 3, 1: 0}, 0, 3),
        ({0: 0, 1: 130}, 0, 130),
        ({0: 0}, 1, 1),
        ({1: 130}, 1, 1),  # rank 0 crashed; the launcher's SIGTERM made rank 1 report 130
    ],
)
def test_relaunch_exit_code_is_the_worst_rank(monkeypatch, codes, launcher, expected):
    monkeypatch.setattr(distributed.subprocess, "Popen", _FakeLauncher)
    monkeypatch.setattr(_FakeLauncher, "codes", codes)
    monkeypatch.setattr(_FakeLauncher, "returncode", launcher)
    assert distributed.relaunch(2, ["precompute", "/data", "--json"]) == expected
    argv = _FakeLauncher.argv
    assert argv[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    assert argv[5:] == ["-m", "vggtctl", "precompute", "/data", "--json"]


@pytest.mark.parametrize("nproc, launcher_told", [(1, False), (2, True)])
def test_ctrl_c_reaches_announced_ranks_and_the_launcher_while_some_are_missing(
    tmp_path, sleeper, nproc, launcher_told
):
    (tmp_path / f"{sleeper.pid}.pid").write_text(str(sleeper.pid))
    told = []
    launcher = types.SimpleNamespace(send_signal=told.append)
    distributed._interrupt_ranks(str(tmp_path), launcher, nproc)
    assert sleeper.wait(timeout=10) != 0  # the announced rank got SIGINT
    assert told == ([signal.SIGINT] if launcher_told else [])


def test_report_exit_code_only_under_relaunch(monkeypatch, tmp_path):
    monkeypatch.delenv(distributed.RELAUNCHED_ENV, raising=False)
    monkeypatch.setenv(distributed.RESULT_DIR_ENV, str(tmp_path))
    assert not distributed.report_exit_code(3, DistInfo(1, 2, 1, 2))
    monkeypatch.setenv(distributed.RELAUNCHED_ENV, "1")
    assert distributed.report_exit_code(3, DistInfo(1, 2, 1, 2))
    assert (tmp_path / "rank1.code").read_text() == "3"


def test_strip_gpus():
    argv = ["precompute", "/d", "--gpus", "8", "--json", "--gpus=4", "--workers", "2"]
    assert _strip_gpus(argv) == ["precompute", "/d", "--json", "--workers", "2"]


# --------------------------------------------------------------------------- planning


def test_unique_by_sidecar_keeps_the_first_history():
    first = Item(("/d/a.jpg", "/d/c.jpg"))
    other_history = Item(("/d/b.jpg", "/d/c.jpg"))
    same_again = Item(("/d/a.jpg", "/d/c.jpg"))
    single = Item(("/d/b.jpg",))
    items, conflicts = unique_by_sidecar([first, other_history, same_again, single])
    assert items == [first, single]
    assert conflicts == 1


def test_chunks_cover_every_item_once():
    items = [Item((f"/d/{n}.jpg",)) for n in range(10)]
    chunks = chunked(items, "key", 4)
    assert [idx for _, idx in chunks] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert len({cid for cid, _ in chunks}) == 3
    assert chunked(items, "key", 4) == chunks  # the same on every rank and host


# --------------------------------------------------------------------------- decode workers


class _FakePreset:
    """Stands in for a preset: fixed 14x28 byte pixels per file (floats for files named in
    `float_for`), no decoding."""

    def __init__(self, float_for: tuple[str, ...] = ()) -> None:
        self.float_for = float_for

    def load(self, path):  # type: ignore[no-untyped-def]
        from types import SimpleNamespace

        if os.path.basename(path) in self.float_for:
            pixels = torch.full((3, 14, 28), 0.25)
        else:
            pixels = torch.full((3, 14, 28), 51, dtype=torch.uint8)
        return SimpleNamespace(pixels=pixels, tensor=unit_pixels(pixels), input_hw=(14, 28), grid_hw=(1, 2))


def _six_step_episode(tmp_path):
    """Six step files of one episode (not images: _FakePreset decodes nothing) and a sequence key."""
    from vggtctl.catalog import load_catalog
    from vggtctl.keys import ContextSettings, FeatureKey, ModelKey

    for i in range(6):
        (tmp_path / "ep").mkdir(exist_ok=True)
        (tmp_path / "ep" / f"step_{i}_MOVE_FORWARD.jpg").write_bytes(b"x" * (i + 1))
    items = load_catalog(tmp_path, "episodes", max_history=3).items
    key = FeatureKey(
        ModelKey("f" * 64, "m", 0, "causal", "float32"), "p" * 64, "fake", ContextSettings("sequence")
    )
    return items, key


def test_item_dataset_stats_the_current_image_afresh_and_history_from_its_lru(tmp_path, monkeypatch):
    from vggtctl.precompute import ItemDataset, Prepared

    items, key = _six_step_episode(tmp_path)
    dataset = ItemDataset(items, _FakePreset(), key)
    counted: list[str] = []
    real_stat = os.stat
    monkeypatch.setattr(os, "stat", lambda p, *a, **k: counted.append(os.fspath(p)) or real_stat(p, *a, **k))
    prepared = [dataset[i] for i in range(len(items))]
    monkeypatch.undo()
    assert all(isinstance(p, Prepared) for p in prepared)
    # 6 items x 4 frames = 24 frame references; one stat per item for its current image
    assert sorted(counted) == sorted(item.image for item in items)
    # and the recorded image key is that fresh stat
    for item, done in zip(items, prepared, strict=True):
        assert done.meta["image"]["size"] == os.path.getsize(item.image)


def test_a_frame_shared_by_neighbouring_items_crosses_shared_memory_once(tmp_path):
    """Sequence items reach the main process with their frames as the worker cached them: 6
    items of 4 frames name 6 distinct frames, and 6 storages arrive, not 24 (nor 6 stacks)."""
    from torch.utils.data import DataLoader

    from vggtctl.precompute import ItemDataset, Prepared
    from vggtctl.precompute.loading import _identity

    items, key = _six_step_episode(tmp_path)
    loader = DataLoader(
        ItemDataset(items, _FakePreset(), key),
        batch_sampler=[list(range(6))],
        num_workers=1,
        collate_fn=_identity,
    )
    (received,) = list(loader)
    assert all(isinstance(p, Prepared) and p.shape == (4, 3, 14, 28) for p in received)
    frames = [frame for p in received for frame in p.pixels]
    storages = {frame.untyped_storage().data_ptr() for frame in frames}
    assert len(frames) == 24 and len(storages) == 6
    by_path = {}
    for p in received:
        for frame_id, frame in zip(p.frame_ids, p.pixels, strict=True):
            by_path.setdefault(frame_id[0], set()).add(frame.untyped_storage().data_ptr())
    assert all(len(ptrs) == 1 for ptrs in by_path.values())  # one frame, one storage
    assert torch.equal(received[3].stacked(), torch.full((4, 3, 14, 28), 51, dtype=torch.uint8))


def test_an_item_whose_frames_mix_bytes_and_floats_sends_floats(tmp_path):
    """Frames of one item are stacked together: where one needed float pixels, all go as
    floats (the model input is the same), and such items batch apart from byte items."""
    from vggtctl.precompute import ItemDataset

    items, key = _six_step_episode(tmp_path)
    dataset = ItemDataset(items, _FakePreset(float_for=("step_4_MOVE_FORWARD.jpg",)), key)
    mixed, clean = dataset[4], dataset[3]  # item 4 streams step 4; item 3 does not
    assert "step_4_MOVE_FORWARD.jpg" in {os.path.basename(f) for f in items[4].frames}
    assert "step_4_MOVE_FORWARD.jpg" not in {os.path.basename(f) for f in items[3].frames}
    assert {f.dtype for f in mixed.pixels} == {torch.float32} and len(mixed.pixels) > 1
    assert torch.equal(mixed.stacked()[0], unit_pixels(torch.full((3, 14, 28), 51, dtype=torch.uint8)))
    assert {f.dtype for f in clean.pixels} == {torch.uint8}
    assert mixed.batch_key[0] == torch.float32 and clean.batch_key[0] == torch.uint8


def test_stage_clock_moves_writer_back_pressure_out_of_handoff():
    from vggtctl.precompute.stages import STAGES, StageClock

    clock = StageClock()
    with clock("handoff"):
        time.sleep(0.02)
    with clock("wait_model"):
        pass
    report = clock.report(writer_blocked=0.015)
    assert set(report) == set(STAGES)
    assert report["wait_writers"] == 0.015
    assert 0.0 <= report["handoff"] <= clock.seconds["handoff"] - 0.015 + 1e-3


@pytest.mark.parametrize(
    ("seconds", "expected"),
    [
        ({"wait_model": 9.0, "wait_decode": 1.0}, "model-bound"),
        ({"wait_model": 2.0, "wait_decode": 5.0, "stage": 3.0}, "decoding"),
        ({"wait_model": 2.0, "wait_writers": 4.0, "handoff": 4.0}, "writes"),
        ({"wait_model": 1.0, "stage": 5.0, "launch": 4.0}, "host-bound"),
        ({}, None),
    ],
)
def test_bottleneck_reading(seconds, expected):
    from vggtctl.precompute.stages import bottleneck

    reading = bottleneck(seconds)
    assert (reading is None) if expected is None else (expected in reading)


def test_submit_copy_writes_what_the_row_held_and_reuses_buffers(monkeypatch):
    written = {}

    def write(path, features, meta, fsync=False):
        written[path] = features.clone()  # what the writer would have serialised
        return features.numel()

    monkeypatch.setattr(sidecar, "write", write)
    writer = SidecarWriter(_Recorder(), threads=2)
    batch = torch.zeros(4, 3, 5)
    for step in range(10):
        batch.copy_(torch.arange(60.0).view(4, 3, 5) + 100 * step)
        for row in range(4):
            writer.submit_copy(f"{step}-{row}", batch[row], _meta(), (step, row))
        batch.fill_(-1)  # the caller reuses its batch buffer at once
        time.sleep(0.01)
    writer.close()
    assert len(written) == 40
    for step in range(10):
        for row in range(4):
            expected = torch.arange(60.0).view(4, 3, 5)[row] + 100 * step
            assert torch.equal(written[f"{step}-{row}"], expected)
    assert writer._rows.allocated < 40  # buffers came back to the pool and were reused


# --------------------------------------------------------------------------- GPU loop, on the CPU


class _RowSink:
    """Stands in for SidecarWriter: records each handed-off row."""

    def __init__(self, fail_on: str | None = None) -> None:
        self.rows: dict[str, torch.Tensor] = {}
        self.fail_on = fail_on

    def submit_copy(self, path, row, meta, token) -> None:
        if self.fail_on and self.fail_on in path:
            raise RuntimeError("handoff broke")
        self.rows[path] = row.clone()


@pytest.fixture
def _unfreeze():
    yield
    gc.unfreeze()  # GpuPipeline freezes the heap after its first batch; run() gives it back


def _gpu_pipeline(tmp_path, sink, n_items, *, thread=True):
    from types import SimpleNamespace

    from vggtctl.precompute.gpu import GpuPipeline

    items = [Item.from_paths([tmp_path / f"img{i}.jpg"]) for i in range(n_items)]
    failed, done = [], []
    progress = SimpleNamespace(fail=failed.append)
    encoder = SimpleNamespace(encode_frames=lambda x: x.flatten(1) * 2)
    pipeline = GpuPipeline(
        encoder, False, torch.device("cpu"), sink, items, progress, done.append, handoff_thread=thread
    )
    samples = [
        SimpleNamespace(index=i, pixels=torch.full((3, 2, 2), float(i)), meta={}) for i in range(n_items)
    ]
    return pipeline, samples, failed, done


@pytest.mark.parametrize("thread", [True, False])
def test_gpu_loop_hands_every_row_to_the_writers(tmp_path, thread, _unfreeze):
    sink = _RowSink()
    pipeline, samples, failed, _done = _gpu_pipeline(tmp_path, sink, 10, thread=thread)
    for start in range(0, 10, 3):
        pipeline.submit(samples[start : start + 3])
    pipeline.flush()
    pipeline.stop()
    assert failed == [] and len(sink.rows) == 10
    for i in range(10):
        assert torch.equal(
            sink.rows[sidecar.sidecar_path(tmp_path / f"img{i}.jpg")], torch.full((12,), 2.0 * i)
        )


def test_a_failed_handoff_fails_its_items_and_stops_the_run(tmp_path, _unfreeze):
    sink = _RowSink(fail_on="img4")
    pipeline, samples, failed, done = _gpu_pipeline(tmp_path, sink, 6)
    pipeline.submit(samples[:3])
    pipeline.submit(samples[3:6])  # img3 is handed off, img4 breaks: img4 and img5 fail
    with pytest.raises(RuntimeError, match="handoff broke"):
        pipeline.flush()
    pipeline.stop()
    assert sorted(os.path.basename(f.path) for f in failed) == ["img4.jpg", "img5.jpg"]
    assert sorted(done) == [4, 5] and len(sink.rows) == 4


def test_after_a_failed_handoff_no_more_work_is_launched(tmp_path, _unfreeze):
    """The error stops the run at the next submit, before its batch is launched: a launched
    batch nobody hands off would be neither written nor failed."""
    sink = _RowSink(fail_on="img4")
    pipeline, samples, failed, _done = _gpu_pipeline(tmp_path, sink, 9)
    launched = []
    encode = pipeline.encoder.encode_frames
    pipeline.encoder.encode_frames = lambda x: launched.append(len(x)) or encode(x)
    pipeline.submit(samples[:3])
    pipeline.submit(samples[3:6])
    pipeline._handoff._queue.join()  # the second batch's handoff has failed by now
    with pytest.raises(RuntimeError, match="handoff broke"):
        pipeline.submit(samples[6:9])
    pipeline.stop()
    assert launched == [3, 3] and len(sink.rows) == 4 and len(failed) == 2


def test_an_interrupt_in_the_inline_handoff_fails_nothing_and_keeps_the_new_batch(tmp_path, _unfreeze):
    """CPU: the launching thread hands off inline and can be interrupted there (waiting for the
    writers). That is no failure, and the batch just computed is still written by flush()."""

    class InterruptedOnce(_RowSink):
        def submit_copy(self, path, row, meta, token) -> None:
            if "img1" in path and not getattr(self, "fired", False):
                self.fired = True
                raise KeyboardInterrupt
            super().submit_copy(path, row, meta, token)

    sink = InterruptedOnce()
    pipeline, samples, failed, _done = _gpu_pipeline(tmp_path, sink, 6, thread=False)
    pipeline.submit(samples[:3])
    with pytest.raises(KeyboardInterrupt):
        pipeline.submit(samples[3:6])  # hands off the first batch inline: img1 is interrupted
    pipeline.flush()  # what _encode_all does on Ctrl-C
    pipeline.stop()
    written = sorted(os.path.basename(sidecar.image_path_of(p)) for p in sink.rows)
    assert failed == []
    assert written == ["img0.jpg", "img3.jpg", "img4.jpg", "img5.jpg"]  # img1, img2: the rerun's


def test_stop_hands_off_the_inline_pending_batch(tmp_path, _unfreeze):
    """After a full disk the loop skips flush(); stop() still hands the computed rows to the
    writers, which count them as not written (nothing encoded goes uncounted)."""
    sink = _RowSink()
    pipeline, samples, failed, _done = _gpu_pipeline(tmp_path, sink, 4, thread=False)
    pipeline.submit(samples[:2])
    pipeline.submit(samples[2:4])
    assert len(sink.rows) == 2
    pipeline.stop()
    assert len(sink.rows) == 4 and failed == []


def _pipeline_on_a_gpu_of_4_rows(tmp_path):  # type: ignore[no-untyped-def]
    """A CPU pipeline of 8 samples whose encoder runs out of memory above 4 rows; `rows` logs
    every forward's row count."""
    pipeline, samples, failed, _done = _gpu_pipeline(tmp_path, _RowSink(), 8, thread=False)
    rows: list[int] = []

    def encode_frames(x):  # type: ignore[no-untyped-def]
        rows.append(len(x))
        if len(x) > 4:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return x.flatten(1)

    pipeline.encoder.encode_frames = encode_frames
    return pipeline, samples, failed, rows


def test_out_of_memory_under_a_padded_shape_lowers_the_shape(tmp_path, _unfreeze):
    """--compile pads every batch to one shape; halves padded back to it would not fit either."""
    pipeline, samples, failed, rows = _pipeline_on_a_gpu_of_4_rows(tmp_path)
    pipeline.pad_to = 8
    pipeline.submit(samples)
    pipeline.submit(samples[:1])  # later batches are padded to the new shape
    pipeline.flush()
    pipeline.stop()
    assert failed == [] and rows == [8, 4, 4, 4] and pipeline.pad_to == 4


def test_after_running_out_of_memory_later_batches_of_that_shape_are_split_before_launch(tmp_path, _unfreeze):
    pipeline, samples, failed, rows = _pipeline_on_a_gpu_of_4_rows(tmp_path)
    pipeline.submit(samples)
    pipeline.submit(samples)  # the same shape again: no second failed attempt
    pipeline.flush()
    pipeline.stop()
    assert failed == [] and rows == [8, 4, 4, 4, 4] and pipeline.halved == 1


def test_the_pinned_pool_is_warmed_with_what_the_loop_holds_at_most(tmp_path, monkeypatch, _unfreeze):
    """CUDA only (faked here): two staging blocks and four feature blocks, pinned, then freed;
    on the CPU nothing is allocated; a failing allocation is only a lost head start."""
    from vggtctl.precompute import gpu

    sink = _RowSink()
    pipeline, _samples, _failed, _done = _gpu_pipeline(tmp_path, sink, 1, thread=False)
    asked = []
    real_empty = torch.empty

    def pinned(n, dtype=None, pin_memory=False):
        asked.append((n, dtype, pin_memory))
        return real_empty(0)

    monkeypatch.setattr(gpu.torch, "empty", pinned)
    pipeline.warm_host_pool(100, 300)
    assert asked == []  # the CPU pipeline has no copy streams
    pipeline.copy_streams = object()
    pipeline.warm_host_pool(100, 300)
    assert asked == [(100, torch.uint8, True)] * 2 + [(300, torch.uint8, True)] * 4
    pipeline.warm_host_pool(0, 300)  # unknown sizes: nothing
    assert len(asked) == 6

    def refused(*_args, **_kwargs):
        raise RuntimeError("CUDA error: out of memory")

    monkeypatch.setattr(gpu.torch, "empty", refused)
    pipeline.warm_host_pool(100, 300)  # does not raise
    monkeypatch.undo()
    pipeline.copy_streams = None
    pipeline.stop()


def test_failure_lines_are_written_under_a_lock_and_without_one_where_locks_fail(tmp_path, monkeypatch):
    import fcntl

    from vggtctl import failures as failures_mod
    from vggtctl.failures import Failure, FailureLog, read_failures

    calls = []
    real_lockf = fcntl.lockf

    def lockf(fh, op):
        calls.append(op)
        if op == fcntl.LOCK_EX and len(calls) > 2:
            raise OSError(errno.ENOLCK, "No locks available")  # a nolock NFS mount
        return real_lockf(fh, op)

    monkeypatch.setattr(failures_mod.fcntl, "lockf", lockf)
    log = FailureLog(tmp_path, "run-1", rank=3)
    log.add(Failure("a.jpg", "decode", "truncated"))
    log.add(Failure("b.jpg", "write", "read-only folder"))
    assert calls == [fcntl.LOCK_EX, fcntl.LOCK_UN, fcntl.LOCK_EX]  # locked; then refused, written anyway
    records = read_failures(tmp_path, "run-1")
    assert [(r["path"], r["stage"], r["rank"]) for r in records] == [
        ("a.jpg", "decode", 3),
        ("b.jpg", "write", 3),
    ]


def test_concurrent_processes_append_whole_failure_lines(tmp_path):
    script = (
        "import sys\n"
        "from vggtctl.failures import Failure, FailureLog\n"
        "log = FailureLog(sys.argv[1], 'run', rank=int(sys.argv[2]))\n"
        "for i in range(200):\n"
        "    log.add(Failure(f'img{i:04d}-' + 'x' * 300 + '.jpg', 'decode', 'truncated ' * 20))\n"
    )
    procs = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path), str(r)]) for r in range(4)]
    assert all(p.wait(timeout=60) == 0 for p in procs)
    lines = (tmp_path / ".vggtctl" / "failures.jsonl").read_text().splitlines()
    assert len(lines) == 800 and all(json.loads(line)["stage"] == "decode" for line in lines)


def test_only_rank_0_walks_the_tree_and_the_others_get_its_catalog(tmp_path, monkeypatch):
    from precompute_trees import episodes_tree, opts

    from vggtctl.precompute import pipeline as pipeline_mod

    episodes_tree(tmp_path)
    sent = []
    monkeypatch.setattr(pipeline_mod, "broadcast_object", lambda value, info: sent.append(value) or value)
    built = pipeline_mod.shared_catalog(opts(tmp_path, max_history=2), DistInfo(0, 2, 0, 2))
    assert sent == [("catalog", built)] and len(built.items) > 0

    def no_walk(*args, **kwargs):
        raise AssertionError("rank 1 walked the tree")

    monkeypatch.setattr(pipeline_mod, "load_catalog", no_walk)
    monkeypatch.setattr(pipeline_mod, "broadcast_object", lambda value, info: ("catalog", built))
    assert pipeline_mod.shared_catalog(opts(tmp_path), DistInfo(1, 2, 1, 2)) is built


def test_rank_0s_catalog_error_stops_every_rank_with_its_message(tmp_path, monkeypatch):
    from precompute_trees import opts

    from vggtctl.errors import ConfigError
    from vggtctl.precompute import pipeline as pipeline_mod

    sent = []
    monkeypatch.setattr(pipeline_mod, "broadcast_object", lambda value, info: sent.append(value) or value)
    bad = opts(tmp_path, layout="annotations", annotations=[str(tmp_path / "nope.jsonl")])
    with pytest.raises(ConfigError) as rank0:
        pipeline_mod.shared_catalog(bad, DistInfo(0, 2, 0, 2))
    assert sent == [("error", str(rank0.value))]

    monkeypatch.setattr(pipeline_mod, "broadcast_object", lambda value, info: sent[0])
    with pytest.raises(ConfigError, match="reported by rank 0") as rank1:
        pipeline_mod.shared_catalog(bad, DistInfo(1, 2, 1, 2))
    assert str(rank0.value) in str(rank1.value)


def test_item_dataset_imports_the_grid_step_before_the_workers_fork(tmp_path):
    """Built in the main process, the dataset imports transformers' smart_resize there, so the
    forked decode workers inherit it instead of each importing it on its first image."""
    from vggtctl.precompute import ItemDataset
    from vggtctl.preprocess import get_preset, qwen

    items, key = _six_step_episode(tmp_path)
    qwen.smart_resize_fn.cache_clear()
    ItemDataset(items, get_preset("janusvln"), key)
    assert qwen.smart_resize_fn.cache_info().currsize == 1
    qwen.smart_resize_fn.cache_clear()
    ItemDataset(items, get_preset("vggt-pad-518"), key)  # no grid step: nothing to import
    assert qwen.smart_resize_fn.cache_info().currsize == 0
