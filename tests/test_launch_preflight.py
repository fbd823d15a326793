"""Preflight: coverage below the minimum fails with exit 2 and the exact precompute command;
paths, GPUs, master port/reachability, interfaces and NCCL values each fail on their own."""

from __future__ import annotations

import os
import shlex
import socket
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

sys.path.insert(0, os.path.dirname(__file__))

import launch_tree

from vggtctl import manifest
from vggtctl.launch import preflight
from vggtctl.launch.plan import TrainOptions, build_plan

KEY_JSON = launch_tree.KEY_JSON


@pytest.fixture
def app() -> typer.Typer:
    return launch_tree.train_app()


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    launch_tree.clean_launch_env(monkeypatch, ("CUDA_LAUNCH_BLOCKING",))
    monkeypatch.setenv("COLUMNS", "200")


free_port = launch_tree.free_port


def expected_fix(root: Path) -> str:
    """The precompute command for launch_tree.KEY, spelled out from the key's parts."""
    model = launch_tree.MODEL
    return (
        f"vggtctl precompute {shlex.quote(str(root))} --vggt-model {model.name} "
        f"--preset {launch_tree.PREPROCESS['preset']} --layer {model.layer} --attention {model.attention} "
        f"--context none --dtype {model.dtype}"
    )


def test_coverage_below_minimum_fails_with_the_fix_command(app: typer.Typer, tmp_path: Path) -> None:
    root = launch_tree.make_root(tmp_path, total=6, valid=4)
    args = ["train", "--data-root", str(root), "--feature-key", KEY_JSON, "--log-dir", str(tmp_path / "logs")]
    args += ["--master-port", str(free_port()), "--dry-run"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "4/6 Items valid" in result.stdout
    assert f"fix (cache coverage): {expected_fix(root)}\n" in result.stdout
    assert "preflight failed (cache coverage)" in result.stderr
    # The same cache passes a lower bar, still naming the command that completes it.
    result = CliRunner().invoke(app, [*args, "--min-coverage", "0.6"])
    assert result.exit_code == 0, result.output
    assert expected_fix(root) in result.stdout


def test_a_real_run_with_low_coverage_starts_nothing(app: typer.Typer, tmp_path: Path) -> None:
    root = launch_tree.make_root(tmp_path, total=3, valid=1)
    logs = tmp_path / "logs"
    args = ["train", "--probe", "--data-root", str(root), "--feature-key", KEY_JSON, "--log-dir", str(logs)]
    result = CliRunner().invoke(app, [*args, "--master-port", str(free_port())])
    assert result.exit_code == 2, result.output
    assert "1/3 Items valid" in result.stdout and not logs.exists()


def test_key_and_catalog_settings_come_from_the_manifest(tmp_path: Path) -> None:
    root = launch_tree.make_root(tmp_path, total=3, valid=3)
    settings = {"vggt_model": "/models/VGGT-1B", "qwen_model": "/models/qwen", "layout": "plain"}
    manifest.record_run(root, {"kind": "precompute", "settings": settings}, launch_tree.KEY)
    plan = build_plan(TrainOptions(data_root=str(root)), environ={"PATH": os.environ["PATH"]}, cuda_devices=0)
    assert plan.feature_key == launch_tree.KEY
    assert plan.catalog is not None and plan.catalog.layout == "plain"
    check = preflight.check_coverage(plan)
    assert check.status == "ok" and "3/3" in check.detail
    plan = build_plan(
        TrainOptions(data_root=str(root), min_coverage=1.0),
        environ={"PATH": os.environ["PATH"]},
        cuda_devices=0,
    )
    fix = preflight.precompute_command(plan.catalog, plan.feature_key, plan.fix_settings)
    assert "--vggt-model /models/VGGT-1B --qwen-model /models/qwen" in fix and "--layout plain" in fix


def _record_failed_run(root: Path, failed: int) -> None:
    settings = {"vggt_model": "/models/VGGT-1B", "layout": "plain"}
    manifest.record_run(root, {"kind": "precompute", "settings": settings, "failed": failed}, launch_tree.KEY)


def test_coverage_failure_after_failed_items_names_failures_and_min_coverage(
    app: typer.Typer, tmp_path: Path
) -> None:
    """Items the last precompute run failed (bad images) fail again on a rerun: the printed fix
    command cannot close that gap, so the check names where the failures are listed and the
    option that accepts the gap."""
    root = launch_tree.make_root(tmp_path, total=5, valid=3)
    _record_failed_run(root, 2)
    args = ["train", "--data-root", str(root), "--log-dir", str(tmp_path / "logs")]
    args += ["--master-port", str(free_port()), "--dry-run"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    plan = build_plan(TrainOptions(data_root=str(root)), environ={"PATH": os.environ["PATH"]}, cuda_devices=0)
    check = preflight.check_coverage(plan)
    assert check.status == "fail" and check.detail.startswith("3/5 Items valid")
    assert "the last precompute run failed 2 items" in check.detail
    assert str(root / ".vggtctl" / "failures.jsonl") in check.detail
    assert "--min-coverage" in check.detail
    assert check.fix is None  # both misses are failed items: a rerun would fail them again
    # the table folds the detail; its words reach stdout all the same
    assert "failures.jsonl" in "".join(result.stdout.split())
    # above the bar, the misses are a warning that still says where the failures are
    check = preflight.check_coverage(
        build_plan(
            TrainOptions(data_root=str(root), min_coverage=0.5),
            environ={"PATH": os.environ["PATH"]},
            cuda_devices=0,
        )
    )
    assert check.status == "warn" and "failures.jsonl" in check.detail
    assert "--min-coverage" not in check.detail


def test_the_rerun_is_offered_while_some_misses_are_not_failed_items(tmp_path: Path) -> None:
    root = launch_tree.make_root(tmp_path, total=5, valid=3)
    _record_failed_run(root, 1)  # one of the two misses failed; the other a rerun encodes
    plan = build_plan(TrainOptions(data_root=str(root)), environ={"PATH": os.environ["PATH"]}, cuda_devices=0)
    check = preflight.check_coverage(plan)
    assert check.status == "fail" and "failed 1 item" in check.detail
    assert check.fix is not None and check.fix.startswith("vggtctl precompute")


def test_coverage_failure_without_failed_items_says_nothing_of_failures(tmp_path: Path) -> None:
    root = launch_tree.make_root(tmp_path, total=5, valid=3)
    _record_failed_run(root, 0)
    plan = build_plan(TrainOptions(data_root=str(root)), environ={"PATH": os.environ["PATH"]}, cuda_devices=0)
    check = preflight.check_coverage(plan)
    assert check.status == "fail" and "failures.jsonl" not in check.detail
    assert "--min-coverage" not in check.detail


def test_no_feature_key_fails(tmp_path: Path) -> None:
    root = launch_tree.make_root(tmp_path, total=1, valid=0)
    plan = build_plan(TrainOptions(data_root=str(root)), environ={"PATH": os.environ["PATH"]}, cuda_devices=0)
    check = preflight.check_feature_key(plan)
    assert check.status == "fail" and "precompute" in check.detail


def test_bad_feature_key_is_a_one_line_error(app: typer.Typer, tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["train", "--feature-key", str(tmp_path / "nope.json"), "--dry-run"])
    assert result.exit_code == 2 and "nope.json" in result.stderr


def test_missing_paths_fail(app: typer.Typer, tmp_path: Path) -> None:
    ds = tmp_path / "ds.json"
    args = ["train", "--no-cache", "--dry-run", "--log-dir", str(tmp_path), "--master-port", str(free_port())]
    args += ["--", "--deepspeed", str(ds), "--model_name_or_path", "Qwen/Qwen2.5-VL-3B-Instruct"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    assert "path --deepspeed" in result.stdout and "does not exist" in result.stdout
    assert "assumed a Hub model id" in result.stdout  # a Hub id is a warning, not a failure
    ds.write_text("{}")
    assert CliRunner().invoke(app, args).exit_code == 0


def test_a_real_run_without_gpus_fails_and_says_why(app: typer.Typer, tmp_path: Path) -> None:
    args = ["train", "--no-cache", "--log-dir", str(tmp_path / "logs"), "--master-port", str(free_port())]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    assert "0 CUDA GPU(s) visible, 8 needed per node" in result.stdout
    assert not (tmp_path / "logs").exists()


def _plan(**kwargs: object):  # type: ignore[no-untyped-def]
    return build_plan(TrainOptions(cache=False, **kwargs), environ=dict(os.environ), cuda_devices=0)  # type: ignore[arg-type]


def test_master_port_in_use_fails_on_node_zero() -> None:
    with socket.socket() as busy:
        busy.bind(("0.0.0.0", 0))
        busy.listen()
        port = busy.getsockname()[1]
        checks = {c.name: c for c in preflight.check_master(_plan(master_port=port), timeout=1)}
        assert checks["master port"].status == "fail" and checks["master port"].fix
        assert checks["master address"].status == "ok"
    free = {c.name: c for c in preflight.check_master(_plan(master_port=free_port()), timeout=1)}
    assert free["master port"].status == "ok"


def test_node_zero_must_own_the_master_address() -> None:
    plan = _plan(nodes=2, node_rank=0, master_addr="nonexistent.invalid", master_port=free_port())
    checks = {c.name: c for c in preflight.check_master(plan, timeout=1)}
    assert checks["master address"].status == "fail"


def test_other_nodes_connect_to_the_master() -> None:
    port = free_port()
    plan = _plan(nodes=2, node_rank=1, master_addr="127.0.0.1", master_port=port)
    loopback, refused = preflight.check_master(plan, timeout=1)
    assert refused.status == "ok" and "not open yet" in refused.detail
    # two nodes, one of them told to reach node 0 through loopback: only works on one machine
    assert loopback.status == "warn" and "127.0.0.1 is a loopback address" in loopback.detail
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        plan = _plan(nodes=2, node_rank=1, master_addr="127.0.0.1", master_port=server.getsockname()[1])
        _loopback, accepted = preflight.check_master(plan, timeout=1)
        assert accepted.status == "ok" and "accepts" in accepted.detail


def test_a_loopback_master_for_several_nodes_is_a_warning_on_node_zero() -> None:
    plan = _plan(nodes=2, node_rank=0, master_addr="127.0.0.1", master_port=free_port())
    checks = {c.name: c for c in preflight.check_master(plan, timeout=1)}
    assert checks["master address"].status == "warn" and "loopback" in checks["master address"].detail
    one = {c.name: c for c in preflight.check_master(_plan(master_port=free_port()), timeout=1)}
    assert one["master address"].status == "ok"  # one node: loopback is right


def test_unanswered_connect_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    def silent(*_args: object, **_kwargs: object) -> socket.socket:
        raise TimeoutError("timed out")

    monkeypatch.setattr(preflight.socket, "create_connection", silent)
    status, detail = preflight.probe_connect("10.255.0.1", 29500, timeout=0.1)
    assert status == "fail" and "no answer" in detail


def test_interface_that_does_not_exist_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NCCL_SOCKET_IFNAME", "=nosuch0")
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "nosuch1")
    checks = {c.name: c for c in preflight.check_interfaces(_plan())}
    assert checks["interface NCCL_SOCKET_IFNAME"].status == "fail"
    assert checks["interface GLOO_SOCKET_IFNAME"].status == "fail"
    monkeypatch.setenv("NCCL_SOCKET_IFNAME", "^docker")  # exclusion lists are not checked
    checks = {c.name: c for c in preflight.check_interfaces(_plan())}
    assert checks["interface NCCL_SOCKET_IFNAME"].status == "ok"


def test_nccl_values_and_debug_settings(
    app: typer.Typer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NCCL_DEBUG_SUBSYS", "ALL")
    monkeypatch.setenv("TORCH_DISTRIBUTED_DEBUG", "DETAIL")
    args = ["train", "--no-cache", "--dry-run", "--log-dir", str(tmp_path), "--master-port", str(free_port())]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output  # slow, not wrong: warnings
    assert "env NCCL_DEBUG_SUBSYS" in result.stdout and "env TORCH_DISTRIBUTED_DEBUG" in result.stdout
    assert "debug only" in result.stdout
    monkeypatch.setenv("NCCL_NTHREADS", "100")
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and "env NCCL_NTHREADS" in result.stdout


def test_infiniband_check(monkeypatch: pytest.MonkeyPatch) -> None:
    plan = _plan(nodes=2, master_addr="127.0.0.1")
    assert preflight.check_infiniband(plan, lambda: ["mlx5_0", "mlx5_1"]).status == "ok"
    assert preflight.check_infiniband(plan, lambda: []).status == "warn"
    monkeypatch.setenv("NCCL_IB_HCA", "=mlx5_3")
    assert (
        preflight.check_infiniband(_plan(nodes=2, master_addr="127.0.0.1"), lambda: ["mlx5_0"]).status
        == "warn"
    )


def test_disk_check_reports_free_space(tmp_path: Path) -> None:
    plan = _plan(log_dir=str(tmp_path / "a" / "b"), trainer_args=["--output_dir", str(tmp_path / "out")])
    checks = preflight.check_disk(plan)
    assert [c.name for c in checks] == ["disk logs", "disk outputs"]
    assert all("GiB free" in c.detail for c in checks)


def test_master_host_name_resolving_to_loopback_warns(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(preflight.netif, "resolve_ipv4", lambda addr: "127.0.1.1")
    row = preflight._master_address_row("gpu01", 2)
    assert row.status == "warn" and "127.0.1.1" in row.detail and row.fix
    assert preflight._master_address_row("gpu01", 1).status == "ok"  # one node: nothing to reach
    monkeypatch.setattr(preflight.netif, "resolve_ipv4", lambda addr: addr)
    # two nodes on one machine work, but so does a typo: said, not refused
    row = preflight._master_address_row("127.0.0.1", 2)
    assert row.status == "warn" and "fine only if every node runs here" in row.detail
