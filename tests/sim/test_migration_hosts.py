"""Two admitted hosts for the migration tests, and the smoke test that they are what they claim.

A *fleet* is built once per run (:func:`scripts.lab.fleet.build_fleet`, shared with
``make demo-migration``): one registrar (``vtpm-verify registrar init`` + ``serve`` as a
child process, trusting swtpm-localca), two hosts admitted by ``vtpm-host init`` against it
(each with its own software-root swtpm, store and mTLS identity), the fleet's approval of the
hosts' PCR0-8 state, and on host A a VM's vAIK and binding as enrollment writes them. Each test
gets a fresh copy of both state directories (:func:`fresh_hosts`), so tests never share a TPM.

Each host runs as its own process, ``vtpm-host migration serve`` (:class:`HostProcess`), so a
SIGKILL is a real crash. Tests look at a host's store read-only (:func:`inspect_host`).
"""

from __future__ import annotations

import json
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from evidence.aik_cert import verify_aik_certificate
from host_agent.config import AgentConfig, with_state_dir
from host_agent.migration import JournalEntry, VaikState, vaik_state
from host_agent.migration.journal import StoreJournal
from scripts.lab.fleet import (
    HOST_CLI,
    PY,
    REPO,
    VM,
    Fleet,
    Hosts,
    build_fleet,
    copy_hosts,
    stop_swtpm,
)
from scripts.lab.fleet import lab_env as _env
from scripts.lab.procs import stop_process

__all__ = [  # what the other migration tests import from here (the lab lives in scripts/lab)
    "HOST_CLI",
    "PY",
    "REPO",
    "VM",
    "Fleet",
    "HostProcess",
    "Hosts",
    "_env",
    "build_fleet",
    "copy_hosts",
    "fresh_hosts",
    "inspect_host",
    "session_fleet",
    "stop_swtpm",
]

_FLEET: list[Fleet] = []


def session_fleet(tmp_path_factory: pytest.TempPathFactory) -> Fleet:
    """The run's fleet, built on first use (every migration test module shares it)."""
    if not _FLEET:
        _FLEET.append(build_fleet(tmp_path_factory.mktemp("fleet")))
    return _FLEET[0]


def fresh_hosts(fleet: Fleet, dest: Path) -> Iterator[Hosts]:
    """A copy of the fleet's hosts under ``dest``; their swtpms are stopped afterwards."""
    h = copy_hosts(fleet, dest)
    yield h
    stop_swtpm(h.a)
    stop_swtpm(h.b)


@pytest.fixture(scope="session")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Fleet:
    return session_fleet(tmp_path_factory)


@pytest.fixture
def hosts(fleet: Fleet, tmp_path: Path) -> Iterator[Hosts]:
    yield from fresh_hosts(fleet, tmp_path)


class HostProcess:
    """One host's ``vtpm-host migration serve`` (or a test worker with the same banner)."""

    def __init__(self, state: Path, approvals: Path, cmd: list[str] | None = None) -> None:
        self.state = state
        self.log = state / "migration.log"
        base = cmd or [*HOST_CLI, "migration", "serve"]
        self.cmd = [
            *base,
            "--state-dir",
            str(state),
            "--listen",
            "127.0.0.1:0",
            "--approvals",
            str(approvals),
            "--resolve-interval",
            "0.3",
        ]
        self.proc: subprocess.Popen[str] | None = None
        self.address = ""

    def start(self, listen: str | None = None) -> HostProcess:
        cmd = list(self.cmd)
        if listen is not None:
            cmd[cmd.index("127.0.0.1:0")] = listen
        with open(self.log, "ab") as err:
            self.proc = subprocess.Popen(
                cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=_env(), cwd=REPO
            )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise AssertionError(f"{cmd} exited {self.proc.wait()}: {self.log_text()[-3000:]}")
        self.address = json.loads(line)["listen"]
        return self

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def migrate(self, vm: uuid.UUID, to: str, address: str) -> subprocess.CompletedProcess[str]:
        return self.migrate_name(str(vm), to, address)

    def migrate_name(self, vm: str, to: str, address: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                *HOST_CLI,
                "vm",
                "migrate",
                vm,
                "--to",
                to,
                "--address",
                address,
                "--json",
                "--state-dir",
                str(self.state),
            ],
            capture_output=True,
            text=True,
            env=_env(),
            cwd=REPO,
            timeout=120,
        )

    def wait_dead(self, timeout: float = 60) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, 15)


@dataclass(frozen=True)
class HostView:
    state: VaikState
    journal: tuple[JournalEntry, ...]

    @property
    def open(self) -> list[JournalEntry]:
        return [e for e in self.journal if not e.terminal]


def inspect_host(state: Path, vm: uuid.UUID = VM) -> HostView:
    """The vAIK state and journal in ``state``'s store (read-only; attaches to a running swtpm)."""
    from host_agent.store.provision import open_store
    from host_agent.tpm.discovery import open_host_tpm

    config: AgentConfig = with_state_dir(AgentConfig(), state)
    tpm = open_host_tpm(config.tpm)
    try:
        store = open_store(config, tpm, read_only=True)
        try:
            return HostView(vaik_state(store, vm), tuple(StoreJournal(store).entries()))
        finally:
            store.close()
    finally:
        tpm.close()


def test_the_fleet_has_two_admitted_hosts_and_a_vaik_on_a(fleet: Fleet, hosts: Hosts) -> None:
    for name, state in (("host-a", hosts.a), ("host-b", hosts.b)):
        ca = x509.load_pem_x509_certificate((state / "identity" / "ca.pem").read_bytes())
        aik = x509.load_pem_x509_certificate((state / "identity" / "aik.pem").read_bytes())
        der = aik.public_bytes(serialization.Encoding.DER)
        verify_aik_certificate(der, [ca], datetime.now(UTC))
        assert aik.subject.rfc4514_string() == f"CN={name}"
    assert inspect_host(hosts.a).state is VaikState.ACTIVE
    assert inspect_host(hosts.b).state is VaikState.ABSENT
