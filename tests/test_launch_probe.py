"""The acceptance test for two nodes: two `vggtctl train --nodes 2 --probe` processes on one
machine (node ranks 0 and 1, 127.0.0.1, Gloo on CPU) rendezvous, and every rank reports.

The tree has 6 images of which 4 have a valid sidecar: over both ranks' shards the probe must
find exactly 4 hits in 6 reads.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(__file__))

import launch_tree

from vggtctl.launch.probe import JSON_MARK

pytestmark = pytest.mark.slow
TIMEOUT_S = 150


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def clean_env() -> dict[str, str]:
    drop = ("NCCL_", "GLOO_", "TORCH_NCCL_", "TORCH_DISTRIBUTED_", "SLURM_", "VGGTCTL_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    for name in ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "NNODES", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(name, None)
    env.update(
        NO_COLOR="1", CUDA_VISIBLE_DEVICES="", VGGTCTL_CACHE_DIR=os.environ.get("VGGTCTL_CACHE_DIR", "")
    )
    return env


def test_two_nodes_on_one_machine(tmp_path: Path) -> None:
    root = launch_tree.make_root(tmp_path, total=6, valid=4)
    port = free_port()
    logs = tmp_path / "logs"
    key = json.dumps(launch_tree.KEY.to_meta())

    def start(rank: int) -> subprocess.Popen[str]:
        args = [sys.executable, "-m", "vggtctl", "train", "--nodes", "2", "--node-rank", str(rank)]
        args += ["--master-addr", "127.0.0.1", "--master-port", str(port), "--gpus-per-node", "1", "--probe"]
        args += [
            "--data-root",
            str(root),
            "--feature-key",
            key,
            "--min-coverage",
            "0.5",
            "--log-dir",
            str(logs),
        ]
        return subprocess.Popen(
            args, cwd=tmp_path, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )

    nodes = [start(0), start(1)]
    outputs = []
    try:
        for proc in nodes:
            out, err = proc.communicate(timeout=TIMEOUT_S)
            outputs.append((proc.returncode, out, err))
    finally:
        for proc in nodes:
            if proc.poll() is None:
                proc.kill()
    for rank, (code, out, err) in enumerate(outputs):
        assert code == 0, f"node {rank} exited {code}\n{out}\n{err}"

    lines = [line for line in outputs[0][1].splitlines() if line.startswith(JSON_MARK + " ")]
    assert len(lines) == 1, outputs[0][1]
    report = json.loads(lines[0][len(JSON_MARK) + 1 :])
    assert report["world_size"] == 2 and report["backend"] == "gloo"
    ranks = sorted(report["ranks"], key=lambda r: r["rank"])
    assert [r["rank"] for r in ranks] == [0, 1]
    assert [r["node_rank"] for r in ranks] == [0, 1]
    assert all(r["allreduce_ok"] and r["bandwidth"]["busbw_GBps"] > 0 for r in ranks)
    assert [r["data"]["samples"] for r in ranks] == [3, 3]
    assert sum(r["data"]["hits"] for r in ranks) == 4
    assert sum(sum(r["data"]["misses"].values()) for r in ranks) == 2
    assert JSON_MARK not in outputs[1][1]  # only rank 0 prints the report

    node_logs = sorted(p.name.rsplit("_", 1)[-1] for p in logs.glob("train_*_node*.log"))
    assert node_logs == ["node0.log", "node1.log"]
    node0_log = next(logs.glob("train_*_node0.log")).read_text()
    assert JSON_MARK in node0_log and "torch.distributed.run" in node0_log
