"""`vggtctl precompute` as real processes: killed with SIGKILL, stopped with Ctrl-C, two runs
on one root at once, and two ranks under torch's launcher (CPU workers with gloo)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from precompute_trees import (
    CLI_FAST,
    catalog_items,
    cli_env,
    corrupt_sidecars,
    episodes_tree,
    opts,
    sidecars_under,
    start_cli,
    temp_files_under,
    verdicts,
)

from vggtctl import audit, manifest
from vggtctl.keys import FeatureKey
from vggtctl.precompute import run
from vggtctl.sidecar import Verdict

pytestmark = pytest.mark.slow

TIMEOUT_S = 120


def _wait_for_sidecars(proc: subprocess.Popen[str], root: Path, count: int) -> None:
    """Poll until `count` sidecars exist; fails if the process ends first."""
    deadline = time.monotonic() + TIMEOUT_S
    while len(sidecars_under(root)) < count:
        if proc.poll() is not None:
            _, err = proc.communicate()
            pytest.fail(f"precompute ended (exit {proc.returncode}) before {count} sidecars: {err[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("no sidecars appeared")
        time.sleep(0.02)


def _slow_args(root: Path, workers: int = 0) -> list[str]:
    # one item per forward, so the run is still going when the test signals it
    return [
        "precompute",
        str(root),
        *CLI_FAST,
        "--max-history",
        "2",
        "--batch-size",
        "1",
        "--workers",
        str(workers),
    ]


def _full_coverage(root: Path, key: FeatureKey, items: int) -> None:
    """Every item served by the training-side store, and `verify`'s full read finds no corrupt file."""
    assert verdicts(catalog_items(root, max_history=2), key) == {"valid": items}
    assert corrupt_sidecars(root) == []
    report = audit.audit(root, audit.expectation_from(root), full=True, workers=2)
    assert (report.count(Verdict.VALID), report.count(Verdict.CORRUPT)) == (items, 0)


def test_sigkill_then_rerun_resumes_without_corrupt_sidecars(tmp_path):
    images = episodes_tree(tmp_path, episodes=6, steps=8)
    proc = start_cli(*_slow_args(tmp_path), "--json")
    _wait_for_sidecars(proc, tmp_path, 2)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=TIMEOUT_S)
    assert proc.returncode == -signal.SIGKILL
    survived = len(sidecars_under(tmp_path))
    assert 2 <= survived < len(images)
    assert corrupt_sidecars(tmp_path) == []
    assert list((tmp_path / ".vggtctl" / "claims").iterdir())  # the dead run's claim is left behind

    rerun = run(opts(tmp_path, max_history=2))  # takes the dead pid's claim over
    assert rerun.encoded == len(images) - survived
    _full_coverage(tmp_path, FeatureKey.from_meta(rerun.feature_key), len(images))
    assert list((tmp_path / ".vggtctl" / "claims").iterdir()) == []
    # a SIGKILL may leave one temp file of a write in flight: debris, never a sidecar
    assert all(".tmp-" in os.path.basename(p) for p in temp_files_under(tmp_path))


@pytest.mark.parametrize(
    ("signum", "whole_group"),
    [(signal.SIGINT, True), (signal.SIGTERM, False)],
    ids=["ctrl-c-to-the-group", "sigterm-to-the-process"],
)
def test_interrupt_finishes_inflight_writes_exit_130_and_rerun_resumes(tmp_path, signum, whole_group):
    images = episodes_tree(tmp_path, episodes=6, steps=8)
    proc = start_cli(*_slow_args(tmp_path, workers=1), "--json", own_group=True)
    _wait_for_sidecars(proc, tmp_path, 2)
    if whole_group:
        os.killpg(proc.pid, signum)  # like Ctrl-C in a terminal: the decode worker gets it too
    else:
        proc.send_signal(signum)  # like a scheduler stopping the job
    out, err = proc.communicate(timeout=TIMEOUT_S)
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted" in err
    doc = json.loads(out)
    assert doc["interrupted"] is True
    on_disk = sidecars_under(tmp_path)
    assert doc["encoded"] == len(on_disk) < len(images)  # every write it started has landed
    assert temp_files_under(tmp_path) == []
    assert corrupt_sidecars(tmp_path) == []
    assert list((tmp_path / ".vggtctl" / "claims").iterdir()) == []
    assert manifest.load(tmp_path).runs[-1]["interrupted"] is True

    rerun = run(opts(tmp_path, max_history=2))
    assert rerun.encoded == len(images) - len(on_disk)
    _full_coverage(tmp_path, FeatureKey.from_meta(rerun.feature_key), len(images))


def test_interrupting_two_ranks_counts_both_and_leaves_no_run_folder(tmp_path):
    """Ctrl-C under --gpus 2: the summary and the manifest count what every rank wrote."""
    episodes_tree(tmp_path, episodes=6, steps=8)
    args = [*_slow_args(tmp_path), "--gpus", "2", "--chunk-items", "2", "--json"]
    proc = start_cli(*args, own_group=True)
    _wait_for_sidecars(proc, tmp_path, 4)
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=TIMEOUT_S)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err, err[-3000:]  # the launcher is not signalled: the ranks are
    doc = json.loads(out)
    on_disk = sidecars_under(tmp_path)
    assert doc["interrupted"] is True and doc["ranks"] == 2
    assert len(doc["per_rank"]) == 2 and doc["encoded"] == sum(doc["per_rank"]) == len(on_disk)
    assert manifest.load(tmp_path).runs[-1]["encoded"] == len(on_disk)
    assert not list((tmp_path / ".vggtctl" / "runs").glob("*"))
    assert corrupt_sidecars(tmp_path) == []


# `python -m vggtctl ARGS` whose first successful claim waits until the other run holds one too:
# both runs are then in their claim loops at once, however late the second one starts.
_AFTER_THE_FIRST_CLAIM_WAIT = textwrap.dedent(
    """
    import os, runpy, sys, time
    from vggtctl import claims
    gate, me = sys.argv[1], sys.argv[2]
    claim = claims.ClaimBook.try_claim
    def try_claim(self, chunk):
        got = claim(self, chunk)
        if got and not os.path.exists(os.path.join(gate, me)):
            open(os.path.join(gate, me), "w").close()
            deadline = time.monotonic() + 100
            while len(os.listdir(gate)) < 2 and time.monotonic() < deadline:
                time.sleep(0.01)
        return got
    claims.ClaimBook.try_claim = try_claim
    sys.argv = ["vggtctl", *sys.argv[3:]]
    runpy.run_module("vggtctl", run_name="__main__", alter_sys=True)
    """
)


def test_two_concurrent_runs_share_the_work(tmp_path):
    """Each run holds a chunk while the other is claiming: they overlap for sure, so a claim that
    did not exclude the other run would show as items encoded twice."""
    root, gate = tmp_path / "data", tmp_path / "gate"
    gate.mkdir()
    images = episodes_tree(root, episodes=4, steps=4)
    args = [*_slow_args(root), "--chunk-items", "2", "--json"]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _AFTER_THE_FIRST_CLAIM_WAIT, str(gate), name, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=cli_env(),
        )
        for name in ("first", "second")
    ]
    docs = []
    for proc in procs:
        out, err = proc.communicate(timeout=TIMEOUT_S)
        assert proc.returncode == 0, err[-2000:]
        docs.append(json.loads(out))
    assert sorted(os.listdir(gate)) == ["first", "second"]
    assert all(d["encoded"] > 0 for d in docs)  # both did work
    assert sum(d["encoded"] for d in docs) == len(images)  # nothing encoded twice
    # the run that claimed second found the first one's chunk held (chunks go in one order)
    assert sum(d["skipped_claimed"] for d in docs) >= 2
    _full_coverage(root, FeatureKey.from_meta(docs[0]["feature_key"]), len(images))
    assert list((root / ".vggtctl" / "claims").iterdir()) == []
    assert len(manifest.load(root).runs) == 2


def test_two_ranks_under_torch_launcher_cover_the_tree_once(tmp_path):
    images = episodes_tree(tmp_path, episodes=2, steps=4)
    args = ["precompute", str(tmp_path), *CLI_FAST, "--max-history", "2", "--workers", "0"]
    proc = start_cli(*args, "--gpus", "2", "--chunk-items", "2", "--json")
    out, err = proc.communicate(timeout=TIMEOUT_S)
    assert proc.returncode == 0, err[-3000:]
    doc = json.loads(out)
    assert doc["ranks"] == 2
    assert doc["encoded"] == len(images)
    assert len(doc["per_rank"]) == 2 and all(n > 0 for n in doc["per_rank"])
    assert sum(doc["per_rank"]) == len(images)  # with full coverage: disjoint shards
    assert doc["plan"]["to_encode"] == len(images)  # both shards' plans summed
    _full_coverage(tmp_path, FeatureKey.from_meta(doc["feature_key"]), len(images))
    last = manifest.load(tmp_path).runs[-1]
    assert (last["ranks"], last["per_rank"]) == (2, doc["per_rank"])
    assert list((tmp_path / ".vggtctl" / "runs").iterdir()) == []
