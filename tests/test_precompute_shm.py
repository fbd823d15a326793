"""Decode workers sized to the shared memory there is: cut the prefetch, then the workers, and say so."""

from __future__ import annotations

import json

import pytest
from precompute_trees import CLI_FAST, catalog_items, episodes_tree, opts, verdicts

from vggtctl.keys import FeatureKey
from vggtctl.precompute import planning, run
from vggtctl.precompute.shared_memory import fit_loader, in_flight_bytes, shm_free_bytes
from vggtctl.reporter import Reporter

MB = 1 << 20


def test_enough_shared_memory_changes_nothing():
    fit = fit_loader(15, 4, 8, 5 * MB, held_items=64, free_bytes=64 << 30)
    assert (fit.workers, fit.prefetch, fit.note) == (15, 4, None)
    assert fit.in_flight_bytes == (15 * 4 * 8 + 64) * 5 * MB


def test_short_shared_memory_cuts_prefetch_first_then_workers():
    # 15 x 1 x 8 + 64 samples of 5 MB = 920 MB: fits half of 2 GiB, 15 x 4 x 8 + 64 does not
    fit = fit_loader(15, 4, 8, 5 * MB, held_items=64, free_bytes=2 << 30)
    assert (fit.workers, fit.prefetch) == (15, 1)
    fit = fit_loader(15, 4, 8, 5 * MB, held_items=64, free_bytes=1 << 30)  # 512 MiB allowed
    assert (fit.workers, fit.prefetch) == (4, 1)  # (4 x 8 + 64) x 5 MiB = 480 MiB
    assert fit.in_flight_bytes <= (1 << 30) // 2 < in_flight_bytes(5, 1, 8, 5 * MB, 64)
    assert "/dev/shm has 1.0 GiB free" in fit.note and "using 4 decode workers" in fit.note
    assert "--shm-size" in fit.note


def test_ranks_of_a_node_share_the_space_and_docker_default_means_no_workers():
    alone = fit_loader(15, 4, 8, 5 * MB, held_items=64, free_bytes=8 << 30)
    eight = fit_loader(15, 4, 8, 5 * MB, held_items=64, free_bytes=8 << 30, local_ranks=8)
    assert (alone.workers, alone.prefetch) == (15, 4)
    assert (eight.workers, eight.prefetch) == (4, 1)  # 512 MiB each: (4 x 8 + 64) x 5 MiB = 480
    docker = fit_loader(15, 4, 8, 5 * MB, held_items=64, free_bytes=64 * MB)
    assert (docker.workers, docker.prefetch, docker.in_flight_bytes) == (0, None, 0)
    assert "decoding in the main process" in docker.note


@pytest.mark.parametrize("free", [None, 0])
def test_unknown_space_or_no_workers_keep_the_settings(free):
    assert fit_loader(3, 4, 8, MB, held_items=8, free_bytes=None).workers == 3
    assert fit_loader(0, 4, 8, MB, held_items=8, free_bytes=free).prefetch is None


def test_shm_free_bytes_reads_a_file_system_and_none_without_one(tmp_path):
    assert shm_free_bytes(str(tmp_path)) > 0
    assert shm_free_bytes(str(tmp_path / "missing")) is None


class _Messages(Reporter):
    def __init__(self) -> None:
        self.lines: list[str] = []

    def message(self, text: str) -> None:
        self.lines.append(text)


@pytest.mark.parametrize("free, workers_note", [(2 * MB, "decoding in the main process"), (None, None)])
def test_a_run_with_little_shared_memory_completes_and_says_why(tmp_path, monkeypatch, free, workers_note):
    images = episodes_tree(tmp_path, episodes=2, steps=3)
    monkeypatch.setattr(planning, "shm_free_bytes", lambda: free)
    messages = _Messages()
    outcome = run(opts(tmp_path, max_history=2, workers=2), messages)
    assert outcome.plan.input_bytes_per_item == 3 * 3 * 154 * 518  # 3 frames of 518x154, one byte a value
    assert (outcome.encoded, outcome.failed) == (len(images), 0)
    key = FeatureKey.from_meta(outcome.feature_key)
    assert verdicts(catalog_items(tmp_path, max_history=2), key) == {"valid": len(images)}
    notes = [line for line in messages.lines if "/dev/shm" in line]
    assert [workers_note in n for n in notes] == ([True] if workers_note else [])


def test_dry_run_shows_the_decode_workers_and_why_they_were_cut(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from vggtctl.cli.app import app

    episodes_tree(tmp_path, episodes=1, steps=3)
    monkeypatch.setattr(planning, "shm_free_bytes", lambda: 2 * MB)
    args = ["precompute", str(tmp_path), *CLI_FAST, "--workers", "3", "--max-history", "2", "--dry-run"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "decode workers" in result.output and "0 per rank (reduced: see below)" in result.output
    assert "/dev/shm has 2.0 MiB free, and 3 decode workers" in result.output
    doc = CliRunner().invoke(app, [*args, "--json"])
    plan = json.loads(doc.stdout)["plan"]
    assert (plan["decode_workers"], plan["decode_prefetch"], plan["batch_size"]) == (0, None, 2)
    assert plan["decode_note"].startswith("/dev/shm has 2.0 MiB free")

    monkeypatch.setattr(planning, "shm_free_bytes", lambda: 64 << 30)
    plan = json.loads(CliRunner().invoke(app, [*args, "--json"]).stdout)["plan"]
    assert (plan["decode_workers"], plan["decode_prefetch"], plan["decode_note"]) == (3, 2, None)
    assert plan["decode_in_flight_bytes"] == (3 * 2 * 2 + 2 * 2) * plan["input_bytes_per_item"]
