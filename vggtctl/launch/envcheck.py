"""Values NCCL, Gloo and torch.distributed accept, and the debug-only ones that slow a run.

NCCL reads malformed values silently (falling back to defaults, or misbehaving), and debug
settings copied from a troubleshooting session stay in scripts for months: both are cheaper
to catch before 16 GPUs start. Each rule returns (status, detail) or None when the value is fine.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

Finding = tuple[str, str]  # (status "fail" | "warn", detail)
Rule = Callable[[str], Finding | None]

DEBUG_ONLY = "debug only: slows or destabilizes production runs; unset it"


@dataclass(frozen=True)
class EnvFinding:
    name: str
    value: str
    status: str
    detail: str


def _choice(*allowed: str, case: bool = False) -> Rule:
    def rule(value: str) -> Finding | None:
        probe = value if case else value.upper()
        options = allowed if case else tuple(a.upper() for a in allowed)
        if probe.strip() not in options:
            return "fail", f"must be one of {', '.join(allowed)}"
        return None

    return rule


def _int_range(low: int, high: int | None = None) -> Rule:
    def rule(value: str) -> Finding | None:
        try:
            number = int(value.strip())
        except ValueError:
            return "fail", "must be an integer"
        if number < low or (high is not None and number > high):
            return "fail", f"must be {low}..{high}" if high is not None else f"must be >= {low}"
        return None

    return rule


def _token_list(known: tuple[str, ...], debug_tokens: tuple[str, ...] = ()) -> Rule:
    """Comma lists like NCCL_DEBUG_SUBSYS / NCCL_ALGO, with an optional leading ^ (exclude)."""
    lookup = {k.upper(): k for k in known}

    def rule(value: str) -> Finding | None:
        body = value.strip().removeprefix("^")
        tokens = [t.strip() for t in body.split(",") if t.strip()]
        unknown = [t for t in tokens if t.upper() not in lookup]
        if not tokens or unknown:
            return "fail", f"unknown value(s) {', '.join(unknown) or '(empty)'}; known: {', '.join(known)}"
        if not value.strip().startswith("^") and any(t.upper() in debug_tokens for t in tokens):
            return "warn", DEBUG_ONLY
        return None

    return rule


def _nthreads(value: str) -> Finding | None:
    if value.strip() not in {"64", "128", "256", "512"}:
        return "fail", "must be one of 64, 128, 256, 512"
    return None


def _debug_level(value: str) -> Finding | None:
    level = value.strip().upper()
    if level not in {"VERSION", "WARN", "INFO", "TRACE"}:
        return "fail", "must be one of VERSION, WARN, INFO, TRACE"
    if level == "TRACE":
        return "warn", DEBUG_ONLY
    return None


def _torch_debug(value: str) -> Finding | None:
    level = value.strip().upper()
    if level not in {"OFF", "INFO", "DETAIL"}:
        return "fail", "must be one of OFF, INFO, DETAIL"
    if level == "DETAIL":
        return "warn", DEBUG_ONLY + " (DETAIL checks every collective)"
    return None


def _debug_if_set(bad: str) -> Rule:
    def rule(value: str) -> Finding | None:
        if value.strip() == bad:
            return "warn", DEBUG_ONLY
        return None

    return rule


def _hca_list(value: str) -> Finding | None:
    body = value.strip().removeprefix("^").removeprefix("=")
    for item in body.split(","):
        name, _, port = item.strip().partition(":")
        if not name or (port and not port.isdigit()):
            return "fail", "must be a comma list of HCA names, each optionally :port (e.g. mlx5_0:1)"
    return None


def _deprecated(replacement: str) -> Rule:
    def rule(value: str) -> Finding | None:
        return "warn", f"deprecated; use {replacement}"

    return rule


_BOOL = _choice("0", "1")
_SUBSYS = (
    "INIT", "COLL", "P2P", "SHM", "NET", "GRAPH", "TUNING", "ENV", "ALLOC", "CALL", "PROXY", "NVLS",
    "BOOTSTRAP", "REG", "PROFILE", "RAS", "ALL",
)  # fmt: skip
_ALGOS = ("Ring", "Tree", "CollnetDirect", "CollnetChain", "NVLS", "NVLSTree", "PAT")
_LEVELS = ("LOC", "NVL", "PIX", "PXB", "PHB", "SYS", "0", "1", "2", "3", "4", "5")

RULES: dict[str, Rule] = {
    "NCCL_NTHREADS": _nthreads,
    "NCCL_DEBUG": _debug_level,
    "NCCL_DEBUG_SUBSYS": _token_list(_SUBSYS, debug_tokens=("ALL",)),
    "NCCL_IB_DISABLE": _BOOL,
    "NCCL_P2P_DISABLE": _BOOL,
    "NCCL_SHM_DISABLE": _BOOL,
    "NCCL_NET_GDR_READ": _BOOL,
    "NCCL_CUMEM_ENABLE": _BOOL,
    "NCCL_NVLS_ENABLE": _BOOL,
    "NCCL_IGNORE_CPU_AFFINITY": _BOOL,
    "NCCL_IB_TIMEOUT": _int_range(1, 31),  # a 5-bit exponent: 4.096 us * 2^value
    "NCCL_IB_RETRY_CNT": _int_range(0, 7),  # a 3-bit InfiniBand field
    "NCCL_IB_GID_INDEX": _int_range(0, 255),
    "NCCL_IB_SL": _int_range(0, 15),
    "NCCL_IB_TC": _int_range(0, 255),
    "NCCL_IB_QPS_PER_CONNECTION": _int_range(1, 128),
    "NCCL_IB_HCA": _hca_list,
    "NCCL_SOCKET_NTHREADS": _int_range(1, 16),
    "NCCL_NSOCKS_PERTHREAD": _int_range(1, 64),
    "NCCL_MIN_NCHANNELS": _int_range(1, 64),
    "NCCL_MAX_NCHANNELS": _int_range(1, 64),
    "NCCL_BUFFSIZE": _int_range(1),
    "NCCL_CROSS_NIC": _choice("0", "1", "2"),
    "NCCL_P2P_LEVEL": _choice(*_LEVELS),
    "NCCL_NET_GDR_LEVEL": _choice(*_LEVELS),
    "NCCL_SOCKET_FAMILY": _choice("AF_INET", "AF_INET6"),
    "NCCL_LAUNCH_MODE": _choice("PARALLEL", "GROUP"),
    "NCCL_ALGO": _token_list(_ALGOS, debug_tokens=tuple(a.upper() for a in _ALGOS)),
    "NCCL_PROTO": _token_list(("LL", "LL128", "Simple"), debug_tokens=("LL", "LL128", "SIMPLE")),
    "NCCL_CHECK_POINTERS": _debug_if_set("1"),
    "NCCL_ASYNC_ERROR_HANDLING": _deprecated("TORCH_NCCL_ASYNC_ERROR_HANDLING"),
    "NCCL_BLOCKING_WAIT": _deprecated("TORCH_NCCL_BLOCKING_WAIT"),
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": _choice("0", "1", "2", "3"),
    "TORCH_NCCL_BLOCKING_WAIT": _BOOL,
    "TORCH_DISTRIBUTED_DEBUG": _torch_debug,
    "TORCH_CPP_LOG_LEVEL": _choice("INFO", "WARNING", "ERROR", "FATAL"),
    "CUDA_LAUNCH_BLOCKING": _debug_if_set("1"),
    "OMP_NUM_THREADS": _int_range(1),
}


def check_env(env: Mapping[str, str]) -> list[EnvFinding]:
    """Findings for every variable with a rule whose value is wrong or debug-only."""
    findings: list[EnvFinding] = []
    for name, value in env.items():
        rule = RULES.get(name)
        result = rule(value) if rule else None
        if result:
            findings.append(EnvFinding(name, value, result[0], result[1]))
    threads, socks = env.get("NCCL_SOCKET_NTHREADS"), env.get("NCCL_NSOCKS_PERTHREAD")
    if threads and socks and threads.isdigit() and socks.isdigit() and int(threads) * int(socks) > 64:
        findings.append(
            EnvFinding(
                "NCCL_SOCKET_NTHREADS",
                threads,
                "fail",
                f"NCCL_SOCKET_NTHREADS x NCCL_NSOCKS_PERTHREAD = {int(threads) * int(socks)}, must be <= 64",
            )
        )
    return findings


def interface_names(value: str) -> tuple[list[str], bool, bool]:
    """NCCL_SOCKET_IFNAME syntax -> (names or prefixes, exact, exclude)."""
    text = value.strip()
    exclude = text.startswith("^")
    text = text.removeprefix("^")
    exact = text.startswith("=")
    text = text.removeprefix("=")
    return [n.strip() for n in text.split(",") if n.strip()], exact, exclude
