"""Issue 8 across two namespace hosts: the protocol over the veth pair, with mTLS.

Host A lives in network namespace ``hostA`` (10.77.0.1), host B in ``hostB`` (10.77.0.2); each
runs its own ``vtpm-host migration serve`` bound to its namespace address only, so the protocol
can only go over the veth pair. Every client (``vtpm-host vm migrate``, the probes) runs inside a
namespace. The fleet (registrar, admission, the vAIK on A) is made once beforehand over loopback
(tests/sim/test_migration_hosts.py).
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from host_agent.migration import SourceStep, TargetStep, VaikState
from host_agent.migration.service import DEFAULT_PORT
from tests.helpers.netns import NetnsPair, two_hosts
from tests.sim.test_migration_hosts import (
    HOST_CLI,
    PY,
    VM,
    Fleet,
    HostProcess,
    Hosts,
    fresh_hosts,
    inspect_host,
    session_fleet,
)


@pytest.fixture(scope="module")
def net() -> Iterator[NetnsPair]:
    if os.geteuid() != 0:
        pytest.fail("the e2e tier needs root for `ip netns` (platform-notes §8)")
    with two_hosts() as pair:
        yield pair


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Fleet:
    return session_fleet(tmp_path_factory)


@pytest.fixture
def hosts(fleet: Fleet, tmp_path: Path) -> Iterator[Hosts]:
    yield from fresh_hosts(fleet, tmp_path)


def _serve(net: NetnsPair, ns: str, state: Path, approvals: Path, cmd: list[str]) -> HostProcess:
    listen = f"{net.address(ns)}:{DEFAULT_PORT}"
    return HostProcess(state, approvals, net.argv(ns, cmd)).start(listen=listen)


def _migrate_cmd(state: Path, address: str) -> list[str]:
    args = ["vm", "migrate", str(VM), "--to", "host-b", "--address", address, "--json"]
    return [*HOST_CLI, *args, "--state-dir", str(state)]


def _migrate(net: NetnsPair, a: HostProcess, b: HostProcess) -> dict[str, object]:
    done = net.run(net.a, _migrate_cmd(a.state, b.address), timeout=120)
    assert done.returncode == 0, done.stderr + a.log_text()[-2000:] + b.log_text()[-2000:]
    out: dict[str, object] = json.loads(done.stdout)
    return out


def test_namespaces_see_each_other_only_over_the_veth_pair(net: NetnsPair) -> None:
    routes = net.run(net.a, ["ip", "-j", "route"]).stdout
    assert "10.77.0.0/24" in routes and "default" not in routes


def test_migrate_between_namespace_hosts_over_mtls(net: NetnsPair, hosts: Hosts) -> None:
    serve = [*HOST_CLI, "migration", "serve"]
    a = _serve(net, net.a, hosts.a, hosts.approvals, serve)
    b = _serve(net, net.b, hosts.b, hosts.approvals, serve)
    try:
        assert a.address == "10.77.0.1:7787" and b.address == "10.77.0.2:7787"
        # B reaches A's listener over the veth pair (a client inside a namespace).
        assert net.call_function(net.b, "tests.helpers.netns:probe_tcp", "10.77.0.1", 7787)
        result = _migrate(net, a, b)
        assert result["outcome"] == "committed" and result["acknowledged"] is True
    finally:
        a.stop()
        b.stop()
    src, tgt = inspect_host(hosts.a), inspect_host(hosts.b)
    assert (src.state, tgt.state) == (VaikState.ABSENT, VaikState.ACTIVE)
    [s], [t] = src.journal, tgt.journal
    assert (s.step, t.step) == (SourceStep.DONE, TargetStep.ACTIVE)
    assert s.peer_address == "10.77.0.2:7787"  # reached over the veth pair
    assert t.peer == "host-a" and t.peer_address == "10.77.0.1:7787"  # mTLS identity, address


def test_target_recovers_from_a_source_crash_at_commit_across_namespaces(
    net: NetnsPair, hosts: Hosts
) -> None:
    """SIGKILL the source right after COMMITTED; the target learns the outcome over the veth."""
    killer = [PY, "-m", "tests.sim.test_migration_crash", "--kill", "source:committed"]
    a = _serve(net, net.a, hosts.a, hosts.approvals, killer)
    b = _serve(net, net.b, hosts.b, hosts.approvals, [*HOST_CLI, "migration", "serve"])
    try:
        done = net.run(net.a, _migrate_cmd(hosts.a, b.address), timeout=120)
        assert done.returncode == 2  # the source died under the CLI
        assert a.wait_dead(60) == -signal.SIGKILL
        states = (inspect_host(hosts.a).state, inspect_host(hosts.b).state)
        assert states == (VaikState.ABSENT, VaikState.PENDING)  # signs nowhere meanwhile
        a.stop()
        a = _serve(net, net.a, hosts.a, hosts.approvals, [*HOST_CLI, "migration", "serve"])
        deadline = time.monotonic() + 60
        while inspect_host(hosts.b).state is not VaikState.ACTIVE:
            assert inspect_host(hosts.a).state is VaikState.ABSENT
            assert time.monotonic() < deadline, b.log_text()[-3000:]
            time.sleep(0.3)
    finally:
        a.stop()
        b.stop()
    assert [e.step for e in inspect_host(hosts.a).journal] == [SourceStep.DONE]
