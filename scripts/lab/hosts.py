"""``vtpm-host daemon`` inside a namespace host (its libvirtd's network and mount namespace).

The agent's state directory has one path on both hosts (``agent_state``, e.g.
``/run/vtpm-mig``): a bind mount, in each host's mount namespace (:class:`NsLibvirtd` ``binds``),
of a directory of its own, as real hosts share one layout; the domain XML libvirt carries from
A to B then names the same bridge and channel sockets, which B's agent arms. :func:`qemu_hook`
is the libvirt qemu hook (``vtpm-host hook script``'s text) for that path, so a plain
``virsh migrate`` of a protected VM runs the vAIK move.

Each daemon runs the migration component (listening on the host's address, its peers, the
fleet's approvals) and the attestation component (the fleet policy key, the enrollment API on
the host's address, the operator's owner policy). Every command runs through
:meth:`NsLibvirtd.argv` (``nsenter`` into the daemon's namespaces).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Self

from host_agent.migration.hook import hook_script
from host_agent.migration.service import DEFAULT_PORT
from scripts.lab.fleet import HOST_CLI, REPO, Fleet, Hosts, copy_hosts, lab_env
from scripts.lab.libvirtd_ns import NsLibvirtd, libvirtd_pair
from scripts.lab.netns import NetnsPair, two_hosts
from scripts.lab.procs import stop_process

__all__ = ["ATTEST", "ATTEST_PORT", "MIGRATION", "NsAgent", "host_pair", "qemu_hook"]

MIGRATION = "host_agent.migration.service:MigrationComponent"
ATTEST = "host_agent.service.attest:AttestService"
ATTEST_PORT = 7788


def qemu_hook(agent_state: str, *, log: str | None = None) -> str:
    """``/etc/libvirt/hooks/qemu`` for agents whose state is ``agent_state``; ``log``: a file
    (in the host's libvirt root) where every call libvirt makes is appended first."""
    script = hook_script(
        [sys.executable, "-m", "host_agent.cli", "hook", "qemu", "--state-dir", agent_state, "--"]
    )
    if log is None:
        return script
    return script.replace("#!/bin/sh\n", f'#!/bin/sh\necho "$@" >> {log}\n', 1)


@contextlib.contextmanager
def host_pair(
    fleet: Fleet,
    root: Path,
    agent_state: str,
    names: dict[str, str],
    addrs: dict[str, str],
    hooks: dict[str, str] | None = None,
) -> Iterator[tuple[NetnsPair, NsLibvirtd, NsLibvirtd, Hosts]]:
    """Two namespace hosts (:func:`~scripts.lab.netns.two_hosts` ``names``, ``addrs``), each
    with its libvirtd (roots ``root/lv``, libvirt ``hooks``) and its copy of the fleet's host
    state (``root/agents``, :func:`~scripts.lab.fleet.copy_hosts`) bound at ``agent_state``;
    yields the pair, both libvirtds and the copies. The libvirtds (and whatever runs in their
    hosts) are stopped and the namespaces deleted afterwards; ``root`` stays."""
    agents = copy_hosts(fleet, root / "agents")
    binds_a, binds_b = {agent_state: agents.a}, {agent_state: agents.b}
    with (
        two_hosts(**names, **addrs) as net,
        libvirtd_pair(net, root / "lv", binds_a, binds_b, hooks) as (a, b),
    ):
        yield net, a, b, agents


class NsAgent:
    """``vtpm-host daemon`` (migration + attestation components) inside one namespace host.

    ``state``: the state directory as the root namespace sees it (bound at ``agent_state``
    inside the host); ``peers``: host id → migration address, what a pull asks (a plain virsh
    migrate to this host)."""

    def __init__(
        self,
        host: NsLibvirtd,
        state: Path,
        approvals: Path,
        peers: dict[str, str],
        *,
        agent_state: str,
        components: tuple[str, ...] = (MIGRATION, ATTEST),
    ) -> None:
        self.host = host
        self.peers = peers
        self.state = state
        self.approvals = approvals
        self.agent_state = agent_state
        self.components = components
        self.log = state / "daemon.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.configure()

    def configure(self) -> None:
        """Write the components' files into the state directory: the fleet's approvals and
        policy key, the migration settings (no test hook), the attestation listen address and
        an empty owner policy. Done at construction; again after a test replaced the state."""
        mig = self.state / "migration"
        mig.mkdir(exist_ok=True)
        shutil.copy(self.approvals, mig / "policy-approvals.json")
        self.settings({})
        attest = self.state / "attest"
        attest.mkdir(exist_ok=True)
        key_pem = json.loads(self.approvals.read_text())["policy_key"]["pem"]
        (attest / "fleet-policy-key.pem").write_text(key_pem)
        listen = {"listen": f"{self.host.address}:{ATTEST_PORT}"}
        (attest / "settings.json").write_text(json.dumps(listen))
        self.owners({})

    @property
    def runtime(self) -> str:
        return f"{self.agent_state}/run/bridges"

    @property
    def attest_url(self) -> str:
        return f"https://{self.host.address}:{ATTEST_PORT}"

    @property
    def migration_address(self) -> str:
        return f"{self.host.address}:{DEFAULT_PORT}"

    def settings(self, extra: dict[str, Any]) -> None:
        """Write the migration ``settings.json`` (listen address, peers and ``extra``, the test
        hooks ``test_tamper``, ``test_kill_at``). Replaced in one step: the daemon reads it for
        each migration, and ``test_kill_at`` before every journal write."""
        doc = {"listen": self.migration_address, "peers": self.peers, **extra}
        path = self.state / "migration" / "settings.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(doc))
        os.replace(tmp, path)

    def owners(self, vms: dict[str, list[str]]) -> None:
        """The operator's owner policy: VM UUID → the tenant certificate fingerprints."""
        doc = {"format": "vtpm-trust/owners/1", "vms": vms}
        (self.state / "attest" / "owners.json").write_text(json.dumps(doc))

    @property
    def env(self) -> dict[str, str]:
        return lab_env(VTPM_LIBVIRT_URI=self.host.uri)

    def cli(
        self, *args: str, check: bool = True, timeout: float = 300
    ) -> subprocess.CompletedProcess[str]:
        """``vtpm-host ARGS --state-dir AGENT_STATE`` inside this host."""
        cmd = [*HOST_CLI, *args, "--state-dir", self.agent_state]
        done = subprocess.run(
            self.host.argv(cmd), capture_output=True, text=True, env=self.env, cwd=REPO,
            timeout=timeout,
        )  # fmt: skip
        if check and done.returncode != 0:
            raise RuntimeError(
                f"vtpm-host {' '.join(args[:3])} on {self.host.ns}: exit {done.returncode}\n"
                f"{done.stderr[-3000:]}\n--- daemon log\n{self.log_tail()}"
            )
        return done

    def vm(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """``vtpm-host vm ARGS --runtime-dir …`` inside this host."""
        return self.cli("vm", *args, "--runtime-dir", self.runtime, check=check)

    def vm_migrate(
        self, vm: uuid.UUID | str, to: NsAgent, host_id: str
    ) -> subprocess.CompletedProcess[str]:
        """``vtpm-host vm migrate VM --to HOST_ID --address … --libvirt-uri … --json`` from this
        host to ``to`` (not checked: the caller reads the exit and the JSON)."""
        return self.cli("vm", "migrate", str(vm), "--to", host_id, "--address",
                        to.migration_address, "--libvirt-uri", to.host.uri,
                        "--json", check=False)  # fmt: skip

    def pcrs(self, vm: uuid.UUID | str) -> dict[str, str]:
        """The VM's sha256 vPCRs, read through its bridge on this host (``vtpm-host vm pcrs``)."""
        cmd = [*HOST_CLI, "vm", "pcrs", str(vm), "--json", "--runtime-dir", self.runtime]
        done = subprocess.run(self.host.argv(cmd), capture_output=True, text=True,
                              env=self.env, timeout=120)  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"vm pcrs on {self.host.ns}: {done.stderr[-2000:]}")
        pcrs: dict[str, str] = json.loads(done.stdout)["pcrs"]
        return pcrs

    def journal(self, vm: uuid.UUID | str) -> tuple[str, list[str]]:
        """The vAIK state of ``vm`` on this host and its journal (sorted ``side:step``), asked of
        the running migration service (``vtpm-host migration journal --vm``)."""
        out = json.loads(self.cli("migration", "journal", "--vm", str(vm)).stdout)
        steps = sorted(f"{e['side']}:{e['step']}" for e in out["entries"])
        return str(out["vaik_state"]), steps

    def start(self, timeout: float = 60) -> Self:
        """Start the daemon; return once its control socket is there (a killed daemon's is
        removed first).

        Raises:
            RuntimeError: the daemon exited, or did not come up within ``timeout`` seconds
                (the message carries its log's tail).
        """
        sock = self.state / "run" / "migration.sock"
        sock.unlink(missing_ok=True)
        cmd = [*HOST_CLI, "daemon", "--state-dir", self.agent_state, "--runtime-dir",
               self.runtime, *(a for c in self.components for a in ("--component", c))]  # fmt: skip
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                self.host.argv(cmd), stdout=out, stderr=out, stdin=subprocess.DEVNULL,
                env=self.env, cwd=REPO, start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + timeout
        while not sock.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"the daemon on {self.host.ns} exited: {self.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the daemon on {self.host.ns} did not come up: "
                                   f"{self.log_tail()}")  # fmt: skip
            time.sleep(0.1)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, 30)

    def log_tail(self, n: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else ""
