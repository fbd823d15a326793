"""`vggtctl train --dry-run` and `--emit-scripts`: the printed per-node commands, parsed back.

The torchrun part is checked with torch's own argument parser, the environment against values
this test sets up (profile defaults, a user override, the feature key it wrote).
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

sys.path.insert(0, os.path.dirname(__file__))

import launch_tree

from vggtctl.keys import FeatureKey
from vggtctl.launch.plan import TrainOptions, build_plan
from vggtctl.launch.scripts import emit_scripts
from vggtctl.launch.torchrun import parse_entry

KEY_JSON = launch_tree.KEY_JSON


@pytest.fixture
def app() -> typer.Typer:
    return launch_tree.train_app()


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    launch_tree.clean_launch_env(monkeypatch, ())


free_port = launch_tree.free_port


def parse_blocks(stdout: str) -> dict[int, tuple[dict[str, str], list[str]]]:
    """`# node R` blocks -> (exported variables, argv of the command)."""
    blocks: dict[int, tuple[dict[str, str], list[str]]] = {}
    for chunk in stdout.split("\n# node ")[1:]:
        header, _, body = chunk.partition("\n")
        rank = int(header.split()[0])
        env: dict[str, str] = {}
        command: list[str] = []
        body = body.replace("\\\n", " ")
        for line in body.splitlines():
            if line.startswith("export "):
                name, _, value = shlex.split(line[len("export ") :])[0].partition("=")
                env[name] = value
            elif line.strip():
                command = shlex.split(line)
                break
        blocks[rank] = (env, command)
    return blocks


def test_two_node_dry_run_prints_paste_ready_commands(
    app: typer.Typer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from torch.distributed.run import get_args_parser

    root = launch_tree.make_root(tmp_path, total=4, valid=4)
    ds = tmp_path / "ds_zero2.json"
    ds.write_text("{}")
    port = free_port()
    monkeypatch.setenv("NCCL_IB_TIMEOUT", "20")  # the user's value must win over the profile's 22
    args = [
        "train", "--nodes", "2", "--master-addr", "127.0.0.1", "--master-port", str(port),
        "--data-root", str(root), "--feature-key", KEY_JSON, "--log-dir", str(tmp_path / "logs"),
        "--dry-run", "--", "--deepspeed", str(ds), "--learning_rate", "2e-5",
    ]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "effective settings" in result.stdout and "preflight" in result.stdout
    blocks = parse_blocks(result.stdout)
    assert sorted(blocks) == [0, 1]
    for rank, (env, argv) in blocks.items():
        assert argv[1:3] == ["-m", "torch.distributed.run"]
        parsed = get_args_parser().parse_args(argv[3:])
        assert (parsed.nnodes, parsed.nproc_per_node, parsed.node_rank) == ("2", "8", rank)
        assert (parsed.master_addr, parsed.master_port) == ("127.0.0.1", port)
        assert parsed.rdzv_backend == "static"
        assert parsed.module and parsed.training_script == "qwen_vl.train.train_vln"
        assert parsed.training_script_args == [
            "--deepspeed", str(ds), "--learning_rate", "2e-5", "--use_vggt_cache", "True",
        ]  # fmt: skip
        assert env["USE_VGGT_CACHE"] == "true"
        assert FeatureKey.from_env(env) == launch_tree.KEY
        assert env["VGGTCTL_DATA_ROOT"] == str(root)
        assert env["NCCL_IB_DISABLE"] == "0" and env["NCCL_IB_HCA"] == "mlx5"
        assert env["NCCL_IB_TIMEOUT"] == "20" and env["NCCL_IB_RETRY_CNT"] == "7"
        assert env["NCCL_SOCKET_IFNAME"] == env["GLOO_SOCKET_IFNAME"] != ""
        assert env["PYTHONUNBUFFERED"] == "1" and int(env["OMP_NUM_THREADS"]) >= 1


def test_a_relative_data_root_is_exported_absolute(tmp_path, monkeypatch) -> None:
    """Node 1, another working folder and emitted scripts must all reach the same root."""
    root = launch_tree.make_root(tmp_path, total=2, valid=2)
    monkeypatch.chdir(root.parent)
    plan = build_plan(
        TrainOptions(nodes=1, data_root=root.name, feature_key=KEY_JSON),
        environ={"PATH": os.environ["PATH"]},
        cuda_devices=0,
    )
    assert plan.cache_env()["VGGTCTL_DATA_ROOT"] == str(root)
    assert Path(plan.cache_env()["VGGTCTL_DATA_ROOT"]).is_absolute()


def test_annotation_files_from_the_environment_are_listed_like_path(tmp_path, monkeypatch) -> None:
    """As precompute reads VGGTCTL_ANNOTATIONS: os.pathsep between files, spaces kept."""
    root = launch_tree.make_root(tmp_path, total=2, valid=2)
    monkeypatch.chdir(tmp_path)
    environ = {"PATH": os.environ["PATH"], "VGGTCTL_ANNOTATIONS": f"my anns/a.jsonl{os.pathsep}b.jsonl"}
    plan = build_plan(
        TrainOptions(nodes=1, data_root=str(root), feature_key=KEY_JSON), environ=environ, cuda_devices=0
    )
    assert plan.catalog.annotations == (str(tmp_path / "my anns" / "a.jsonl"), str(tmp_path / "b.jsonl"))


def test_trainer_args_with_an_unbalanced_quote_are_one_line_not_a_traceback(tmp_path) -> None:
    from vggtctl.errors import ConfigError

    root = launch_tree.make_root(tmp_path, total=2, valid=2)
    environ = {"PATH": os.environ["PATH"], "VGGTCTL_TRAINER_ARGS": '--x "a'}
    with pytest.raises(ConfigError, match=r"trainer_args = .* \(env VGGTCTL_TRAINER_ARGS\): cannot split it"):
        build_plan(
            TrainOptions(nodes=1, data_root=str(root), feature_key=KEY_JSON), environ=environ, cuda_devices=0
        )


@pytest.mark.parametrize(
    "cache, args, turned",
    [
        (True, ["--use_vggt_cache", "False"], "off"),
        (True, ["--use-vggt-cache", "false"], "off"),  # the dash spelling argparse also accepts
        (False, ["--use_vggt_cache=True"], "on"),
        (False, ["--use_vggt_cache", "--output_dir", "x"], "on"),  # a bare boolean flag is true
    ],
)
def test_trainer_arguments_that_contradict_the_cache_switch_are_refused(
    tmp_path, cache, args, turned
) -> None:
    """The trainer would get the flag one way and USE_VGGT_CACHE (and the feature key) the other."""
    from vggtctl.errors import ConfigError

    root = launch_tree.make_root(tmp_path, total=2, valid=2)
    options = TrainOptions(nodes=1, data_root=str(root), feature_key=KEY_JSON, cache=cache, trainer_args=args)
    with pytest.raises(ConfigError, match=f"the trainer arguments turn the cache {turned}"):
        build_plan(options, environ={"PATH": os.environ["PATH"]}, cuda_devices=0)
    agreeing = TrainOptions(
        nodes=1,
        data_root=str(root),
        feature_key=KEY_JSON,
        cache=True,
        trainer_args=["--use_vggt_cache", "true"],
    )
    plan = build_plan(agreeing, environ={"PATH": os.environ["PATH"]}, cuda_devices=0)
    assert plan.args.count("--use_vggt_cache") == 1


def test_other_nodes_find_their_interface_themselves() -> None:
    environ = {"PATH": os.environ["PATH"]}
    plan = build_plan(
        TrainOptions(nodes=2, node_rank=0, master_addr="127.0.0.2", cache=False),
        environ=environ,
        cuda_devices=0,
    )
    assert plan.topology.master_addr == "127.0.0.2"
    # 127.x is loopback: every node is this machine, so node 1 gets the same value.
    assert plan.command(1).env["NCCL_SOCKET_IFNAME"] == plan.command(0).env["NCCL_SOCKET_IFNAME"]
    plan = build_plan(
        TrainOptions(nodes=2, node_rank=1, master_addr="192.0.2.77", cache=False),
        environ=environ,
        cuda_devices=0,
    )
    text = plan.command(0).shell()
    assert 'NCCL_SOCKET_IFNAME="$(python -m vggtctl.launch.netif 192.0.2.77)"' in text
    with pytest.raises(ValueError, match="another node"):
        plan.command(0).child_env()


def test_no_cache_sets_the_switch_off_and_skips_coverage(app: typer.Typer, tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app,
        ["train", "--no-cache", "--dry-run", "--log-dir", str(tmp_path), "--master-port", str(free_port())],
    )
    assert result.exit_code == 0, result.output
    env, argv = parse_blocks(result.stdout)[0]
    assert env["USE_VGGT_CACHE"] == "false" and "VGGTCTL_FEATURE_KEY" not in env
    assert "--use_vggt_cache" not in argv


def test_entry_parsing() -> None:
    assert parse_entry("-m qwen_vl.train.train_vln") == ["-m", "qwen_vl.train.train_vln"]
    assert parse_entry("-mpkg.mod --x 1") == ["-m", "pkg.mod", "--x", "1"]
    assert parse_entry("train/train_vln.py --fast") == ["train/train_vln.py", "--fast"]
    for bad in ("", "-m", "--oops"):
        with pytest.raises(Exception, match="entry"):
            parse_entry(bad)


def test_config_file_and_environment_settings(tmp_path: Path) -> None:
    config = tmp_path / "vggtctl.toml"
    config.write_text(
        '[train]\nnodes = 2\nmaster_addr = "127.0.0.1"\nentry = "-m my.trainer"\n'
        'cache = false\ntrainer_args = ["--bf16", "True"]\n[train.env]\nNCCL_IB_HCA = "mlx5_0"\n'
    )
    environ = {"PATH": os.environ["PATH"], "VGGTCTL_MASTER_PORT": "31111"}
    plan = build_plan(TrainOptions(config=str(config), trainer_args=["--x"]), environ=environ, cuda_devices=0)
    cmd = plan.command()
    assert plan.topology.nnodes == 2 and plan.topology.master_port == 31111
    assert cmd.argv[-5:] == ["-m", "my.trainer", "--bf16", "True", "--x"]
    assert cmd.env["NCCL_IB_HCA"] == "mlx5_0" and cmd.sources["NCCL_IB_HCA"] == "vggtctl.toml"
    sources = {s.name: s.source for s in plan.settings}
    assert sources["master_port"] == "env VGGTCTL_MASTER_PORT" and sources["nodes"].startswith("vggtctl.toml")


def test_probe_on_cpu_falls_back_to_one_process_per_node() -> None:
    environ = {"PATH": os.environ["PATH"]}
    plan = build_plan(TrainOptions(probe=True, cache=False), environ=environ, cuda_devices=0)
    assert plan.topology.nproc_per_node == 1
    assert any("1 process per node" in note for note in plan.notes)
    assert plan.entry == ("-m", "vggtctl.launch.probe")
    plan = build_plan(TrainOptions(probe=True, cache=False, gpus_per_node=3), environ=environ, cuda_devices=0)
    assert plan.topology.nproc_per_node == 3


def _fake_python(tmp_path: Path) -> Path:
    """Runs the interface finder for real; for the torchrun call, dumps argv and env as JSON."""
    fake = tmp_path / "fake-python"
    dump = "import json, os, sys; json.dump({'argv': sys.argv[1:], 'env': dict(os.environ)}, open(os.environ['DUMP'], 'w'))"
    fake.write_text(
        "#!/bin/sh\n"
        f'if [ "$1 $2" = "-m vggtctl.launch.netif" ]; then exec {shlex.quote(sys.executable)} "$@"; fi\n'
        f'exec {shlex.quote(sys.executable)} -c {shlex.quote(dump)} "$@"\n'
    )
    fake.chmod(0o755)
    return fake


@pytest.mark.parametrize("nodes", [1, 2])
def test_emitted_scripts_run_the_dry_run_command(tmp_path: Path, nodes: int) -> None:
    root = launch_tree.make_root(tmp_path, total=2, valid=2)
    base = {"PATH": os.environ["PATH"], "NCCL_DEBUG": "INFO"}
    port = free_port()
    plan = build_plan(
        TrainOptions(
            nodes=2, master_addr="127.0.0.1", master_port=port, data_root=str(root),
            feature_key=KEY_JSON, trainer_args=["--output_dir", "out dir/run 1"],
        ),
        environ=base,
        cuda_devices=0,
    )  # fmt: skip
    single, multi = emit_scripts(plan, tmp_path / "scripts")
    assert (single.name, multi.name) == ("train_h800.sh", "train_2node_h800.sh")
    script = single if nodes == 1 else multi
    rank = nodes - 1
    dump = tmp_path / "dump.json"
    env = {**base, "PYTHON": str(_fake_python(tmp_path)), "DUMP": str(dump)}
    if nodes == 2:
        env.update(NODE_RANK=str(rank), MASTER_ADDR="127.0.0.1")
    else:
        env.update(MASTER_PORT=str(port))
    done = subprocess.run(
        ["bash", str(script), "--extra"], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    seen = json.loads(dump.read_text())
    expected = plan.command(rank)
    want_argv = [*expected.argv[1:], "--extra"]
    if nodes == 1:
        want_argv[2] = "--nnodes=1"
    assert seen["argv"] == want_argv
    for name, value in expected.env.items():
        assert seen["env"].get(name) == value, name
    assert seen["env"]["NCCL_DEBUG"] == "INFO"


def test_two_node_script_needs_rank_and_master(tmp_path: Path) -> None:
    plan = build_plan(
        TrainOptions(nodes=2, master_addr="127.0.0.1", cache=False),
        environ={"PATH": os.environ["PATH"]},
        cuda_devices=0,
    )
    _, multi = emit_scripts(plan, tmp_path)
    done = subprocess.run(
        ["bash", str(multi)], env={"PATH": os.environ["PATH"]}, capture_output=True, text=True, timeout=30
    )
    assert done.returncode != 0 and "NODE_RANK" in done.stderr


def test_two_node_script_defaults_to_the_master_address_it_was_given(tmp_path: Path) -> None:
    """`--emit-scripts --master-addr A`: A is the script's MASTER_ADDR unless one is exported;
    without an address named, the script still demands one."""
    plan = build_plan(
        TrainOptions(nodes=2, master_addr="10.1.2.3", cache=False),
        environ={"PATH": os.environ["PATH"]},
        cuda_devices=0,
    )
    _, multi = emit_scripts(plan, tmp_path / "given")
    text = multi.read_text()
    assert 'MASTER_ADDR="${MASTER_ADDR:-10.1.2.3}"' in text
    assert "scontrol" not in text  # inside an allocation too, the named address wins over Slurm's first host
    assert "0 on the master node, 1 on the other}" in text
    from_slurm = build_plan(
        TrainOptions(nodes=2, cache=False),
        environ={
            "PATH": os.environ["PATH"],
            "SLURM_JOB_ID": "7",
            "SLURM_JOB_NODELIST": "gpu[1-2]",
            "SLURM_NNODES": "2",
        },
        cuda_devices=0,
    )
    _, multi = emit_scripts(from_slurm, tmp_path / "slurm")
    assert "MASTER_ADDR:?set MASTER_ADDR" in multi.read_text()  # gpu1 is this job's, not the script's


def test_emit_scripts_flag_writes_and_runs_nothing(app: typer.Typer, tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app,
        [
            "train",
            "--no-cache",
            "--nodes",
            "2",
            "--master-addr",
            "127.0.0.1",
            "--emit-scripts",
            str(tmp_path),
        ],
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "train_h800.sh").is_file() and (tmp_path / "train_2node_h800.sh").is_file()
    assert "preflight" not in result.stdout


def test_a_misspelled_option_before_the_separator_is_an_error_not_a_trainer_flag(
    app: typer.Typer, tmp_path: Path
) -> None:
    root = launch_tree.make_root(tmp_path, total=2, valid=2)
    args = ["train", "--data-root", str(root), "--feature-key", KEY_JSON, "--nodse", "2", "--dry-run"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    assert "--nodse" in result.output and "--nodes" in result.output  # click suggests the option
    assert "torch.distributed.run" not in result.output  # nothing was planned or launched
