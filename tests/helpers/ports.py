"""Free TCP ports on 127.0.0.1 for the servers tests start (swtpm, QEMU, PostgreSQL, daemons).

A port is free when chosen, not reserved: the server binds it later. Ports are chosen below the
kernel's ephemeral range when there is room, so that no outgoing connection of the suite (which
takes an ephemeral port) can take one in between. CI once lost a test to exactly that race.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

__all__ = ["free_port", "free_port_pair"]


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def _candidates() -> list[int]:
    low, _high = _ephemeral_range()
    if low > 10002:
        return [random.randrange(10000, low - 1) for _ in range(200)]
    return [0] * 200  # no room below: let the kernel choose


def free_port() -> int:
    """A TCP port free on 127.0.0.1 a moment ago."""
    for wanted in _candidates():
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", wanted))
            except OSError:
                continue
            return int(s.getsockname()[1])
    raise RuntimeError("no free TCP port on 127.0.0.1")


def free_port_pair() -> int:
    """A port p such that p and p+1 are both free on 127.0.0.1 (swtpm's server and control)."""
    for _ in range(200):
        port = free_port()
        if port >= 65535:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise RuntimeError("no free pair of TCP ports on 127.0.0.1")
