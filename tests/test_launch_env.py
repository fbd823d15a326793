"""Launch profiles, environment precedence, NCCL value checks and interface discovery."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from vggtctl.errors import ConfigError
from vggtctl.launch import netif
from vggtctl.launch.envcheck import check_env
from vggtctl.launch.profiles import available_profiles, fill, load_profile, merge_env


def test_h800_profile_carries_the_infiniband_settings() -> None:
    assert {"h800", "cpu"} <= set(available_profiles())
    profile = load_profile("h800")
    env = profile.env
    assert profile.gpus_per_node == 8
    assert env["NCCL_IB_DISABLE"] == "0"
    assert env["NCCL_IB_HCA"].startswith("mlx5")
    assert env["NCCL_SOCKET_IFNAME"] == "{iface}" and env["GLOO_SOCKET_IFNAME"] == "{iface}"
    assert 1 <= int(env["NCCL_IB_TIMEOUT"]) <= 31 and 0 <= int(env["NCCL_IB_RETRY_CNT"]) <= 7
    assert env["PYTHONUNBUFFERED"] == "1" and "OMP_NUM_THREADS" in env
    # The packaged values must pass our own checks.
    filled = {k: fill(v, {"iface": "ib0", "omp_threads": "8"}) or "" for k, v in env.items()}
    assert check_env(filled) == []


def test_profile_from_a_file_and_unknown_names(tmp_path: Path) -> None:
    path = tmp_path / "mine.toml"
    path.write_text('name = "mine"\ngpus_per_node = 4\n[env]\nNCCL_DEBUG = "INFO"\nFLAG = true\n')
    profile = load_profile(str(path))
    assert profile.gpus_per_node == 4 and profile.env == {"NCCL_DEBUG": "INFO", "FLAG": "1"}
    with pytest.raises(ConfigError, match="not found"):
        load_profile("no-such-profile")
    with pytest.raises(ConfigError, match="not found"):
        load_profile(str(tmp_path / "missing.toml"))


def test_merge_precedence_profile_config_environment() -> None:
    profile = load_profile("h800")
    config = {"NCCL_IB_HCA": "mlx5_0,mlx5_1", "NCCL_DEBUG": "INFO"}
    environ = {"NCCL_DEBUG": "VERSION", "NCCL_NTHREADS": "256", "HOME": "/home/x", "PYTHONUNBUFFERED": ""}
    env, unset = merge_env(profile, config, {"iface": "ib0", "omp_threads": "4"}, environ)
    assert unset == []
    assert (env["NCCL_IB_DISABLE"].value, env["NCCL_IB_DISABLE"].source) == ("0", "profile h800")
    assert (env["NCCL_IB_HCA"].value, env["NCCL_IB_HCA"].source) == ("mlx5_0,mlx5_1", "vggtctl.toml")
    assert (env["NCCL_DEBUG"].value, env["NCCL_DEBUG"].source) == ("VERSION", "environment")
    assert env["NCCL_NTHREADS"].source == "environment"  # relevant user variables are shown too
    assert env["NCCL_SOCKET_IFNAME"].value == "ib0" and env["OMP_NUM_THREADS"].value == "4"
    assert env["PYTHONUNBUFFERED"].value == "1"  # an empty variable counts as unset
    assert "HOME" not in env


def test_unknown_interface_leaves_the_variable_unset_unless_the_user_set_it() -> None:
    profile = load_profile("h800")
    env, unset = merge_env(profile, {}, {"iface": None, "omp_threads": "1"}, {})
    assert set(unset) == {"NCCL_SOCKET_IFNAME", "GLOO_SOCKET_IFNAME"}
    assert "NCCL_SOCKET_IFNAME" not in env
    env, unset = merge_env(profile, {}, {"iface": None, "omp_threads": "1"}, {"NCCL_SOCKET_IFNAME": "eth1"})
    assert unset == ["GLOO_SOCKET_IFNAME"] and env["NCCL_SOCKET_IFNAME"].value == "eth1"


def test_unknown_placeholder_is_an_error() -> None:
    with pytest.raises(ConfigError, match="placeholder"):
        fill("{nope}", {"iface": "lo"})


@pytest.mark.parametrize(
    ("name", "value", "status"),
    [
        ("NCCL_NTHREADS", "100", "fail"),
        ("NCCL_NTHREADS", "256", None),
        ("NCCL_DEBUG_SUBSYS", "ALL", "warn"),
        ("NCCL_DEBUG_SUBSYS", "INIT,NET", None),
        ("NCCL_DEBUG_SUBSYS", "INIT,BOGUS", "fail"),
        ("TORCH_DISTRIBUTED_DEBUG", "DETAIL", "warn"),
        ("TORCH_DISTRIBUTED_DEBUG", "OFF", None),
        ("TORCH_DISTRIBUTED_DEBUG", "LOUD", "fail"),
        ("NCCL_DEBUG", "TRACE", "warn"),
        ("NCCL_DEBUG", "warn", None),
        ("NCCL_DEBUG", "VERBOSE", "fail"),
        ("NCCL_IB_TIMEOUT", "40", "fail"),
        ("NCCL_IB_TIMEOUT", "22", None),
        ("NCCL_IB_RETRY_CNT", "8", "fail"),
        ("NCCL_IB_DISABLE", "yes", "fail"),
        ("NCCL_IB_HCA", "=mlx5_0:1,mlx5_1:1", None),
        ("NCCL_IB_HCA", "mlx5_0:x", "fail"),
        ("NCCL_ALGO", "Ring", "warn"),
        ("NCCL_PROTO", "^LL128", None),
        ("CUDA_LAUNCH_BLOCKING", "1", "warn"),
        ("OMP_NUM_THREADS", "0", "fail"),
        ("NCCL_ASYNC_ERROR_HANDLING", "1", "warn"),
        ("SOMETHING_ELSE", "whatever", None),
    ],
)
def test_env_values(name: str, value: str, status: str | None) -> None:
    findings = check_env({name: value})
    assert [f.status for f in findings] == ([status] if status else [])


def test_socket_threads_product_is_bounded() -> None:
    findings = check_env({"NCCL_SOCKET_NTHREADS": "16", "NCCL_NSOCKS_PERTHREAD": "8"})
    assert [f.status for f in findings] == ["fail"] and "64" in findings[0].detail


def test_parse_ip_route_get() -> None:
    text = "10.2.0.9 via 10.1.0.1 dev ib0 src 10.1.0.5 uid 0 \\    cache "
    assert netif.parse_ip_route_get(text) == "ib0"
    assert netif.parse_ip_route_get("local 127.0.0.1 dev lo src 127.0.0.1 uid 0") == "lo"
    assert netif.parse_ip_route_get("unreachable") is None


def test_loopback_interface_and_local_address() -> None:
    names = netif.interfaces()
    loopback = [name for name, addr in names.items() if addr == "127.0.0.1"]
    assert loopback, "this machine has no interface holding 127.0.0.1"
    name, why = netif.route_interface("127.0.0.1")
    assert name == loopback[0] and "127.0.0.1" in why
    assert netif.is_local_address("127.0.0.1")
    assert not netif.is_local_address("nonexistent.invalid")
    assert netif.route_interface("nonexistent.invalid")[0] is None


def test_netif_main_prints_the_interface(capsys: pytest.CaptureFixture[str]) -> None:
    assert netif.main(["127.0.0.1"]) == 0
    assert capsys.readouterr().out.strip() in [name for _, name in socket.if_nameindex()]
    assert netif.main([]) == 2
