"""Two "hosts" on one machine: network namespaces joined by a veth pair (platform-notes §8).

Shared by the e2e tests (``tests/helpers/netns.py`` re-exports it) and ``make demo-migration``.

::

    with two_hosts() as net:          # hostA 10.77.0.1/24  ⇄  hostB 10.77.0.2/24
        proc = net.popen("hostA", [sys.executable, "-m", "host_agent.cli", ...])
        out = net.call_function("hostB", "tests.e2e.probe:connect", "10.77.0.1", 7787)

Rules (platform-notes §8): test clients run only inside the namespaces, traffic goes only to
loopback and the test namespaces' addresses, and the namespaces are deleted afterwards (also
when creating them failed half-way). Names that exist already are refused, never reused, so a
second run or another suite's namespaces are never clobbered. Needs root (``ip netns``).
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["NetnsPair", "probe_tcp", "two_hosts"]


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")


@dataclass
class NetnsPair:
    """Namespaces ``a`` and ``b`` joined by ``veth_a`` ⇄ ``veth_b``."""

    a: str = "hostA"
    b: str = "hostB"
    addr_a: str = "10.77.0.1"
    addr_b: str = "10.77.0.2"
    veth_a: str = "vethA"
    veth_b: str = "vethB"

    def address(self, ns: str) -> str:
        return {self.a: self.addr_a, self.b: self.addr_b}[ns]

    def create(self) -> NetnsPair:
        existing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        taken = {line.split()[0] for line in existing.splitlines() if line.strip()}
        if taken & {self.a, self.b}:
            raise RuntimeError(f"network namespace(s) {sorted(taken & {self.a, self.b})} exist")
        try:
            _ip("netns", "add", self.a)
            _ip("netns", "add", self.b)
            _ip("link", "add", self.veth_a, "type", "veth", "peer", "name", self.veth_b)
            _ip("link", "set", self.veth_a, "netns", self.a)
            _ip("link", "set", self.veth_b, "netns", self.b)
            _ip("-n", self.a, "addr", "add", f"{self.addr_a}/24", "dev", self.veth_a)
            _ip("-n", self.b, "addr", "add", f"{self.addr_b}/24", "dev", self.veth_b)
            for ns, dev in ((self.a, self.veth_a), (self.b, self.veth_b)):
                _ip("-n", ns, "link", "set", dev, "up")
                _ip("-n", ns, "link", "set", "lo", "up")
        except BaseException:
            self.delete()
            raise
        return self

    def delete(self) -> None:
        """Delete both namespaces (their veth ends go with them) and a veth left in the root."""
        for ns in (self.a, self.b):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        subprocess.run(["ip", "link", "del", self.veth_a], capture_output=True)

    def argv(self, ns: str, argv: Sequence[str]) -> list[str]:
        if ns not in (self.a, self.b):
            raise ValueError(f"{ns!r} is not one of this pair's namespaces")
        return ["ip", "netns", "exec", ns, *argv]

    def popen(self, ns: str, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[str]:
        """Start ``argv`` inside ``ns`` (text mode; ``kwargs`` go to Popen)."""
        return subprocess.Popen(self.argv(ns, argv), text=True, **kwargs)

    def run(self, ns: str, argv: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.argv(ns, argv), text=True, capture_output=True, **kwargs)

    def call_function(self, ns: str, target: str, *args: Any, timeout: float = 60) -> Any:
        """Run ``module:function(*args)`` in a Python process inside ``ns``; return its result.

        Arguments and result travel as JSON.
        """
        module, _, func = target.partition(":")
        code = (
            "import importlib, json, sys; "
            f"f = getattr(importlib.import_module({module!r}), {func!r}); "
            "print(json.dumps(f(*json.loads(sys.argv[1]))))"
        )
        argv = [sys.executable, "-c", code, json.dumps(list(args))]
        done = self.run(ns, argv, timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(f"{target} in {ns} failed: {done.stderr.strip()[-2000:]}")
        return json.loads(done.stdout.strip().splitlines()[-1])


def probe_tcp(host: str, port: int, timeout: float = 3.0) -> bool:
    """Whether a TCP connection to ``host:port`` succeeds (run it inside a namespace with
    :meth:`NetnsPair.call_function`)."""
    import socket

    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError:
        return False
    return True


@contextlib.contextmanager
def two_hosts(**names: str) -> Iterator[NetnsPair]:
    """Create the pair, yield it, delete it (always)."""
    pair = NetnsPair(**names).create()
    try:
        yield pair
    finally:
        pair.delete()
