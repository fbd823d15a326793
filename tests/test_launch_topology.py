"""Slurm node lists and topology resolution (flags > VGGTCTL_* > Slurm > torch variables > toml)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from vggtctl.errors import ConfigError
from vggtctl.launch.topology import expand_nodelist, hostnames, resolve_topology


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("a[1-3,5]", ["a1", "a2", "a3", "a5"]),
        ("gpu-[01-02]-ib", ["gpu-01-ib", "gpu-02-ib"]),
        ("n[001-003],m1", ["n001", "n002", "n003", "m1"]),
        ("gpu[01-03,07],cpu5", ["gpu01", "gpu02", "gpu03", "gpu07", "cpu5"]),
        ("a[1-2,4],b[3,5-6],c", ["a1", "a2", "a4", "b3", "b5", "b6", "c"]),
        ("x[8-10]", ["x8", "x9", "x10"]),
        ("x[08-10]", ["x08", "x09", "x10"]),
        ("r[1-2]-n[1-2]", ["r1-n1", "r1-n2", "r2-n1", "r2-n2"]),
        ("single", ["single"]),
        ("h1, h2", ["h1", "h2"]),
        ("10.0.0.1,10.0.0.2", ["10.0.0.1", "10.0.0.2"]),
    ],
)
def test_expand_nodelist(spec: str, expected: list[str]) -> None:
    assert expand_nodelist(spec) == expected


@pytest.mark.parametrize("spec", ["a[1-", "a]1", "a[3-1]", "a[x]", "a[1-2", "a[[1]]", "a[1-b]"])
def test_expand_nodelist_rejects_malformed(spec: str) -> None:
    with pytest.raises(ValueError, match="node list"):
        expand_nodelist(spec)


def test_hostnames_prefers_scontrol(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / "scontrol"
    fake.write_text("#!/bin/sh\n[ \"$1 $2\" = 'show hostnames' ] && printf 'alpha\\nbeta\\n'\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    assert hostnames("whatever[1-2]") == ["alpha", "beta"]


def test_hostnames_falls_back_without_scontrol(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    assert hostnames("gpu[1-2]") == ["gpu1", "gpu2"]


def test_flags_and_defaults() -> None:
    top = resolve_topology(nodes=2, node_rank=1, master_addr="10.1.2.3", environ={})
    assert (top.nnodes, top.node_rank, top.master_addr, top.master_port) == (2, 1, "10.1.2.3", 29500)
    assert top.nproc_per_node == 8 and top.world_size == 16 and not top.is_master
    sources = {s.name: s.source for s in top.settings}
    assert sources["nodes"] == "flag" and sources["master_port"] == "default"


def test_one_node_defaults_to_loopback() -> None:
    top = resolve_topology(environ={})
    assert (top.nnodes, top.node_rank, top.master_addr) == (1, 0, "127.0.0.1")


def test_slurm_gives_nodes_rank_and_master() -> None:
    env = {
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NUM_NODES": "2",
        "SLURM_NODEID": "1",
        "SLURM_JOB_NODELIST": "gpu-[07-08]-ib",
    }
    top = resolve_topology(environ=env, hostnames_fn=expand_nodelist)
    assert (top.nnodes, top.node_rank, top.master_addr) == (2, 1, "gpu-07-ib")
    assert top.master_port == 20000 + 4242 % 20000
    assert top.slurm_job == "4242"


def test_flags_and_vggtctl_env_beat_slurm() -> None:
    env = {
        "SLURM_JOB_ID": "7",
        "SLURM_JOB_NUM_NODES": "2",
        "SLURM_NODEID": "1",
        "SLURM_JOB_NODELIST": "n[1-2]",
        "VGGTCTL_MASTER_PORT": "31000",
    }
    top = resolve_topology(master_addr="10.9.9.9", environ=env, hostnames_fn=expand_nodelist)
    assert top.master_addr == "10.9.9.9" and top.master_port == 31000 and top.node_rank == 1


def test_slurm_several_tasks_per_node_is_noted() -> None:
    env = {"SLURM_JOB_ID": "1", "SLURM_JOB_NUM_NODES": "1", "SLURM_NTASKS_PER_NODE": "8"}
    top = resolve_topology(environ=env, hostnames_fn=expand_nodelist)
    assert any("ntasks-per-node=1" in note for note in top.notes)


def test_torch_style_variables() -> None:
    env = {"MASTER_ADDR": "node0", "MASTER_PORT": "12345", "NNODES": "2", "NODE_RANK": "1"}
    top = resolve_topology(environ=env)
    assert (top.nnodes, top.node_rank, top.master_addr, top.master_port) == (2, 1, "node0", 12345)


def test_toml_config_is_the_last_resort() -> None:
    config = {"train": {"nodes": 2, "master_addr": "10.0.0.5", "gpus_per_node": 4}}
    top = resolve_topology(config=config, environ={})
    assert (top.nnodes, top.master_addr, top.nproc_per_node) == (2, "10.0.0.5", 4)
    top = resolve_topology(config=config, environ={"VGGTCTL_NODES": "1"})
    assert top.nnodes == 1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"nodes": 2, "node_rank": 2, "master_addr": "h"}, "must be below"),
        ({"nodes": 2}, "--master-addr is required"),
        ({"master_port": 70000}, "--master-port 70000: must be in"),
        ({"nodes": 0}, "nodes"),
    ],
)
def test_invalid_topologies(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        resolve_topology(environ={}, **kwargs)  # type: ignore[arg-type]


def test_env_value_that_is_not_a_number() -> None:
    with pytest.raises(ConfigError, match="VGGTCTL_NODES"):
        resolve_topology(environ={"VGGTCTL_NODES": "two"})
