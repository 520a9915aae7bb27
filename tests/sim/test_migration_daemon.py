"""The migration service as a daemon component: ``vtpm-host daemon --component …`` on both hosts.

The daemon owns the TPM and the store (one writer); the component brings the peer listener,
recovery and ``<state>/run/migration.sock`` into it, so ``vtpm-host vm migrate`` works against a
running daemon exactly as against ``migration serve``.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from host_agent.migration import SourceStep, TargetStep, VaikState
from tests.helpers.ports import free_port
from tests.sim.test_migration_hosts import (
    HOST_CLI,
    REPO,
    VM,
    Fleet,
    HostProcess,
    Hosts,
    _env,
    fresh_hosts,
    inspect_host,
    session_fleet,
)

COMPONENT = "host_agent.migration.service:MigrationComponent"


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Fleet:
    return session_fleet(tmp_path_factory)


@pytest.fixture
def hosts(fleet: Fleet, tmp_path: Path) -> Iterator[Hosts]:
    yield from fresh_hosts(fleet, tmp_path)


class Daemon:
    def __init__(self, state: Path, approvals: Path, listen: str) -> None:
        (state / "migration").mkdir(exist_ok=True)
        shutil.copy(approvals, state / "migration" / "policy-approvals.json")
        (state / "migration" / "settings.json").write_text(json.dumps({"listen": listen}))
        self.state = state
        self.listen = listen
        self.log = state / "daemon.log"
        runtime = state / "runtime"
        runtime.mkdir(exist_ok=True)
        with open(self.log, "ab") as err:
            self.proc = subprocess.Popen(
                [
                    *HOST_CLI,
                    "daemon",
                    "--state-dir",
                    str(state),
                    "--runtime-dir",
                    str(runtime),
                    "--component",
                    COMPONENT,
                ],
                stdout=err,
                stderr=err,
                env=_env(),
                cwd=REPO,
            )
        deadline = time.monotonic() + 60
        while not (state / "run" / "migration.sock").exists():
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            assert time.monotonic() < deadline, self.log.read_text()[-3000:]
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(30)


def test_vm_migrate_through_the_daemons_migration_component(hosts: Hosts) -> None:
    a = Daemon(hosts.a, hosts.approvals, "127.0.0.1:0")
    b = Daemon(hosts.b, hosts.approvals, f"127.0.0.1:{free_port()}")
    try:
        done = HostProcess(hosts.a, hosts.approvals).migrate(VM, "host-b", b.listen)
        assert done.returncode == 0, done.stderr + a.log.read_text()[-2000:]
        assert json.loads(done.stdout)["acknowledged"] is True
    finally:
        a.stop()
        b.stop()
    src, tgt = inspect_host(hosts.a), inspect_host(hosts.b)
    assert (src.state, tgt.state) == (VaikState.ABSENT, VaikState.ACTIVE)
    assert [e.step for e in src.journal] == [SourceStep.DONE]
    assert [e.step for e in tgt.journal] == [TargetStep.ACTIVE]


def test_vm_migrate_names_an_unknown_domain(hosts: Hosts) -> None:
    done = HostProcess(hosts.a, hosts.approvals).migrate_name("no-such-vm", "host-b", "x:1")
    assert done.returncode == 2
    assert "[migration.unknown_vm]" in done.stderr
