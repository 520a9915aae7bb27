"""Two admitted hosts for the migration tests, and the smoke test that they are what they claim.

A *fleet* is built once per run: one registrar (``vtpm-verify registrar init`` + ``serve`` as a
child process, trusting swtpm-localca), two hosts admitted by ``vtpm-host init`` against it
(each with its own software-root swtpm, store and mTLS identity), the fleet's approval of the
hosts' PCR0-8 state, and on host A a VM's vAIK and binding as enrollment writes them. Each test
gets a fresh copy of both state directories (:func:`fresh_hosts`), so tests never share a TPM.

Each host runs as its own process, ``vtpm-host migration serve`` (:class:`HostProcess`), so a
SIGKILL is a real crash. Tests look at a host's store read-only (:func:`inspect_host`).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from evidence.aik_cert import verify_aik_certificate
from evidence.tpm2_policy import HOST_PCRS, PolicyApproval, vaik_sign_policy
from host_agent.config import AgentConfig, with_state_dir
from host_agent.migration import JournalEntry, VaikState, vaik_state
from host_agent.migration.journal import StoreJournal
from host_agent.tpm.port import VAIK_POLICY_REF

REPO = Path(__file__).resolve().parents[2]
PY = sys.executable
HOST_CLI = [PY, "-m", "host_agent.cli"]
REGISTRAR = [PY, "-m", "verifier.cli", "registrar"]
VM = uuid.UUID("6f1c3a52-8d0e-4b7a-9c11-2f4e5d6a7b80")
CERT_USER = b"0\x82tenant-cert-user-der-bytes"

_SETUP = r"""
import json, sys, base64
from pathlib import Path
from host_agent.config import AgentConfig, with_state_dir
from host_agent.store.provision import ensure_store, open_store
from host_agent.tpm.discovery import open_host_tpm
state, fleet_key, vm = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
config = with_state_dir(AgentConfig(), state)
tpm = open_host_tpm(config.tpm)
try:
    ensure_store(tpm, config)
    if fleet_key != "-":
        vaik = tpm.create_vaik(base64.b64decode(fleet_key))
        store = open_store(config, tpm)
        with store.transaction() as tx:
            tx.put("vaik", vm, {"generation": 1, "key": vaik.to_bytes().hex()})
            tx.put("binding", vm, {"vm_uuid": vm, "generation": 1, "cert_user": sys.argv[4],
                   "fingerprint": "sha256:" + "0" * 64, "vaik_name": vaik.name.hex(),
                   "boot": {"bridge_pid": 1, "sessions": 1, "inits": 1, "set_stateblobs": 0},
                   "active": True, "enrolled_at": "2026-01-01T00:00:00+00:00"})
        store.close()
        print(vaik.public.hex())
finally:
    tpm.close()
"""


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VTPM_")}
    return {**env, **extra}


def _run(cmd: list[str], **extra: str) -> str:
    done = subprocess.run(cmd, env=_env(**extra), capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, f"{cmd}: {done.stderr}\n{done.stdout}"
    return done.stdout


def stop_swtpm(state: Path) -> None:
    """Stop the software-root swtpm a (killed) host process left running on ``state``."""
    pid_file = state / "tpm" / "swtpm" / "swtpm.pid"
    with contextlib.suppress(OSError, ValueError):
        pid = int(pid_file.read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        if b"swtpm" in cmdline and str(state).encode() in cmdline:
            os.kill(pid, signal.SIGTERM)
            for _ in range(50):
                if not Path(f"/proc/{pid}").exists():
                    break
                time.sleep(0.05)


@dataclass(frozen=True)
class Fleet:
    """The fleet template (never run directly; tests copy it with :func:`fresh_hosts`)."""

    root: Path
    a: Path
    b: Path
    approvals: Path
    approval: PolicyApproval
    vaik_public: bytes


@dataclass(frozen=True)
class Hosts:
    a: Path
    b: Path
    approvals: Path
    no_approvals: Path


def build_fleet(root: Path) -> Fleet:
    registrar = root / "registrar"
    init = json.loads(
        _run([*REGISTRAR, "init", "--state-dir", str(registrar), "--swtpm-localca", "--json"])
    )
    ca_doc = json.loads(_run([*REGISTRAR, "ca", "--state-dir", str(registrar), "--json"]))
    zeros = [bytes(32)] * len(HOST_PCRS)  # a fresh swtpm's PCR0-8: the hosts' platform state
    approved = json.loads(
        _run(
            [
                *REGISTRAR,
                "approve",
                "--state-dir",
                str(registrar),
                "--pcr-policy",
                vaik_sign_policy(zeros).hex(),
                "--policy-ref",
                VAIK_POLICY_REF.decode(),
                "--json",
            ]
        )
    )
    approval = PolicyApproval(
        bytes.fromhex(approved["approved_policy"]),
        bytes.fromhex(approved["policy_ref"]),
        bytes.fromhex(approved["signature"]),
    )
    approvals = root / "policy-approvals.json"
    approvals.write_text(
        json.dumps(
            {
                "policy_key": ca_doc["policy_key"],
                "approvals": [
                    {
                        "approved_policy": approval.approved_policy.hex(),
                        "policy_ref": approval.policy_ref.hex(),
                        "signature": base64.b64encode(approval.signature).decode(),
                    }
                ],
            }
        )
    )
    log = open(root / "registrar.log", "ab")  # noqa: SIM115 - closed below
    serve = subprocess.Popen(
        [*REGISTRAR, "serve", "--state-dir", str(registrar), "--listen", "127.0.0.1:0", "--json"],
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
        env=_env(),
        cwd=REPO,
    )
    try:
        assert serve.stdout is not None
        url = json.loads(serve.stdout.readline())["url"]
        env = {"VTPM_REGISTRAR_URL": url, "VTPM_REGISTRAR_CA_SHA256": init["ca_sha256"]}
        for name in ("a", "b"):
            _run(
                [*HOST_CLI, "init", "--state-dir", str(root / name)],
                VTPM_HOST_ID=f"host-{name}",
                **env,
            )
    finally:
        serve.terminate()
        serve.wait(10)
        log.close()
    spki = ca_doc["policy_key"]["spki_der"]
    cert_user = base64.b64encode(CERT_USER).decode()
    out = _run([PY, "-c", _SETUP, str(root / "a"), spki, str(VM), cert_user])
    _run([PY, "-c", _SETUP, str(root / "b"), "-", str(VM), cert_user])
    for name in ("a", "b"):
        stop_swtpm(root / name)
    return Fleet(root, root / "a", root / "b", approvals, approval, bytes.fromhex(out.strip()))


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


def copy_hosts(fleet: Fleet, dest: Path) -> Hosts:
    for name in ("a", "b"):
        shutil.copytree(getattr(fleet, name), dest / name, symlinks=True)
        with contextlib.suppress(FileNotFoundError):
            (dest / name / "tpm" / "swtpm" / "swtpm.pid").unlink()
    none = dest / "no-approvals.json"
    none.write_text(json.dumps({"approvals": []}))
    return Hosts(dest / "a", dest / "b", fleet.approvals, none)


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
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()


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
