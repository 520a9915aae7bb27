"""A fleet of two admitted hosts: one registrar, ``vtpm-host init`` twice, the fleet's approval.

:func:`build_fleet` runs one registrar (``vtpm-verify registrar init`` + ``serve`` as a child
process on 127.0.0.1, trusting swtpm-localca, stopped before it returns), admits two hosts with
``vtpm-host init`` against it (each its own software-root swtpm, store and mTLS identity, host
ids ``host-a`` and ``host-b``), approves the hosts' PCR0-8 state for vAIK signing and writes
the approvals as a host's ``migration/policy-approvals.json`` reads them. Optionally host A gets
a VM's vAIK and binding as enrollment writes them (the sim tier's migration tests start there).
The hosts' swtpms are stopped afterwards: a daemon or test starts them again on its own copy.

Shared by the tests (``tests/sim/test_migration_hosts.py`` re-exports it) and
``make demo-migration``.
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
from dataclasses import dataclass
from pathlib import Path

from evidence.tpm2_policy import HOST_PCRS, PolicyApproval, vaik_sign_policy
from host_agent.tpm.port import VAIK_POLICY_REF
from scripts.lab.procs import stop_process

__all__ = [
    "CERT_USER",
    "HOST_CLI",
    "PY",
    "REGISTRAR",
    "REPO",
    "VM",
    "Fleet",
    "Hosts",
    "build_fleet",
    "copy_hosts",
    "lab_env",
    "stop_swtpm",
]

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


def lab_env(**extra: str) -> dict[str, str]:
    """This process's environment without any ``VTPM_*`` setting, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("VTPM_")}
    return {**env, **extra}


def _run(cmd: list[str], **extra: str) -> str:
    done = subprocess.run(cmd, env=lab_env(**extra), capture_output=True, text=True, cwd=REPO)
    if done.returncode != 0:
        raise RuntimeError(f"{cmd} exited {done.returncode}: {done.stderr}\n{done.stdout}")
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
    """The fleet template (never run directly; tests copy it with :func:`copy_hosts`).

    ``registrar``: the registrar's state directory; ``vaik_public``: the public area of the
    vAIK made on host A (empty when none was)."""

    root: Path
    a: Path
    b: Path
    approvals: Path
    approval: PolicyApproval
    vaik_public: bytes

    @property
    def registrar(self) -> Path:
        return self.root / "registrar"


@dataclass(frozen=True)
class Hosts:
    a: Path
    b: Path
    approvals: Path
    no_approvals: Path


def build_fleet(root: Path, vaik_vm: uuid.UUID | None = VM) -> Fleet:
    """Registrar, two admitted hosts (``root/a``, ``root/b``) and the approvals (see the module
    docstring). ``vaik_vm``: the VM whose vAIK and binding host A gets (None: no vAIK, the VM
    is enrolled for real later). Every process it starts is stopped before it returns."""
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
    try:
        with open(root / "registrar.log", "ab") as log:
            serve = subprocess.Popen(
                [*REGISTRAR, "serve", "--state-dir", str(registrar), "--listen", "127.0.0.1:0",
                 "--json"],
                stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL, text=True,
                env=lab_env(), cwd=REPO,
            )  # fmt: skip
        try:
            assert serve.stdout is not None
            line = serve.stdout.readline()
            if not line:
                raise RuntimeError(f"the registrar exited {serve.wait()} (see {log.name})")
            url = json.loads(line)["url"]
            env = {"VTPM_REGISTRAR_URL": url, "VTPM_REGISTRAR_CA_SHA256": init["ca_sha256"]}
            for name in ("a", "b"):
                _run(
                    [*HOST_CLI, "init", "--state-dir", str(root / name)],
                    VTPM_HOST_ID=f"host-{name}",
                    **env,
                )
        finally:
            stop_process(serve, 10)
        spki = ca_doc["policy_key"]["spki_der"]
        cert_user = base64.b64encode(CERT_USER).decode()
        vm = str(vaik_vm or VM)
        out = _run([PY, "-c", _SETUP, str(root / "a"), spki if vaik_vm else "-", vm, cert_user])
        _run([PY, "-c", _SETUP, str(root / "b"), "-", vm, cert_user])
    finally:
        for name in ("a", "b"):  # also when an init failed half-way
            stop_swtpm(root / name)
    vaik_public = bytes.fromhex(out.strip()) if vaik_vm else b""
    return Fleet(root, root / "a", root / "b", approvals, approval, vaik_public)


def copy_hosts(fleet: Fleet, dest: Path) -> Hosts:
    """A copy of the fleet's host state directories under ``dest`` (``a``, ``b``), and an
    approvals file that approves nothing."""
    for name in ("a", "b"):
        shutil.copytree(getattr(fleet, name), dest / name, symlinks=True)
        with contextlib.suppress(FileNotFoundError):
            (dest / name / "tpm" / "swtpm" / "swtpm.pid").unlink()
    none = dest / "no-approvals.json"
    none.write_text(json.dumps({"approvals": []}))
    return Hosts(dest / "a", dest / "b", fleet.approvals, none)
