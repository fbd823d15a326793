"""Which network interface carries traffic to the master address.

NCCL and Gloo must bind their sockets to the interface on the route to node 0; on node 0
itself that is the interface holding the master address. Uses only the standard library:
`ip -o route get` when the tool is there, else a UDP "connect" (no packet is sent) to learn
the source address, matched to interface addresses via SIOCGIFADDR.

`python -m vggtctl.launch.netif ADDR` prints the interface name (used by emitted scripts).
"""

from __future__ import annotations

import contextlib
import fcntl
import shutil
import socket
import struct
import subprocess
import sys

_SIOCGIFADDR = 0x8915


def interfaces() -> dict[str, str | None]:
    """Interface name -> its (primary) IPv4 address, or None when it has none."""
    found: dict[str, str | None] = {}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for _, name in socket.if_nameindex():
            try:
                raw = fcntl.ioctl(sock.fileno(), _SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
                found[name] = socket.inet_ntoa(raw[20:24])
            except OSError:
                found[name] = None
    return found


def resolve_ipv4(host: str) -> str | None:
    """The IPv4 address of a host name or address, or None when it does not resolve."""
    try:
        return socket.getaddrinfo(host, None, socket.AF_INET, socket.SOCK_STREAM)[0][4][0]
    except (OSError, IndexError):
        return None


def is_local_address(addr: str) -> bool:
    """True when `addr` is assigned to this machine (binding to it succeeds)."""
    ip = resolve_ipv4(addr)
    if ip is None:
        return False
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((ip, 0))
        except OSError:
            return False
    return True


def parse_ip_route_get(text: str) -> str | None:
    """The `dev` field of `ip -o route get ADDR` output, or None."""
    words = text.split()
    for i, word in enumerate(words[:-1]):
        if word == "dev":
            return words[i + 1]
    return None


def _route_dev_from_ip_tool(ip: str) -> str | None:
    tool = shutil.which("ip")
    if tool is None:
        return None
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        done = subprocess.run(
            [tool, "-o", "route", "get", ip], capture_output=True, text=True, timeout=5, check=False
        )
        if done.returncode == 0:
            return parse_ip_route_get(done.stdout)
    return None


def _source_address(ip: str) -> str | None:
    """The local address the kernel would use to reach `ip` (UDP connect sends nothing)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect((ip, 9))
            return sock.getsockname()[0]
        except OSError:
            return None


def route_interface(addr: str) -> tuple[str | None, str]:
    """(interface, how it was found) for traffic to `addr`; (None, why) when unknown."""
    ip = resolve_ipv4(addr)
    if ip is None:
        return None, f"{addr} does not resolve to an IPv4 address"
    table = interfaces()
    for name, own in table.items():
        if own == ip:
            return name, f"{name} holds {ip} (this is the master node)"
    dev = _route_dev_from_ip_tool(ip)
    if dev:
        return dev, f"route to {ip} goes through {dev}"
    source = _source_address(ip)
    if source:
        for name, own in table.items():
            if own == source:
                return name, f"source address {source} for {ip} is on {name}"
    return None, f"no route to {ip}"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m vggtctl.launch.netif ADDRESS", file=sys.stderr)
        return 2
    name, why = route_interface(args[0])
    if name is None:
        print(f"error: {why}", file=sys.stderr)
        return 1
    print(name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
