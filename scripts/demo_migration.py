#!/usr/bin/env python3
"""``make demo-migration``: a protected VM and its vAIK move between two hosts on this machine.

Two hosts, each a network namespace (``demoA`` 10.80.0.1 ⇄ ``demoB`` 10.80.0.2, a veth pair)
with its own libvirtd (in a private mount namespace), ``vtpm-host daemon`` (migration and
attestation components), software-root host TPM (DEVELOPMENT ONLY), store and mTLS identity,
both admitted by one fleet registrar. libvirt's qemu hook on each host is the one
``vtpm-host hook script`` ships, so a plain ``virsh migrate`` runs the vAIK move. Every client
(virsh, vtpm-host, the tenant's vtpm-verify and SSH) runs inside the namespaces. The lab is
``scripts/lab`` (the same code the e2e tests use).

Acts (each prints a heading and a one-line result; a summary table ends the run):

1. hosts — the fleet registrar admits ``host-a`` and ``host-b`` (AIK certificates from the fleet
   CA, checked here); a libvirtd and a daemon start in each namespace host;
2. boot — the protected VM (``vtpm-host vm create`` + ``vm start``: memfd RAM, vTPM behind a
   bridge, attestation channel) boots on host A under TCG. The guest is the small test
   initramfs (``vm_images.build``): the Debian disk image would make every live migration
   carry a larger, busier guest under TCG;
3. enroll + attest — the tenant enrolls at A's API and attests over SSH: trusted;
4. migrate — plain ``virsh migrate --live --p2p`` to B, no vtpm command: B's hook pulls the
   VM, A's daemon runs the protocol (certified ExgKey, vAIK duplicated, the vAIK-signed record
   of the final stop checked by B before the VM runs, commit): the VM runs on B;
5. attest on B — trusted, the same vAIK public key, the chain now through B's AIK; A, asked for
   the VM through its channel, answers ``attest.not_enrolled``;
6. tampered migration back — ``virsh migrate`` to A with one byte of guest memory changed in
   flight (A's test hook ``test_tamper``): A refuses before the VM runs; the VM keeps running
   on B with its vAIK; attest: trusted.

Exit 0 only when every act gave its expected outcome, 1 otherwise, 2 on bad usage (also: not
root). ``--json`` prints one JSON document on stdout (the narrative goes to stderr). Whatever
happens (an act fails, Ctrl-C, SIGTERM), every process the run started (QEMU, swtpm, bridges,
daemons, libvirtds, the registrar) is stopped and both namespaces are deleted; the state
directory is removed unless ``--keep``. Needs root (``ip netns``, libvirtd).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from host_agent.migration.service import DEFAULT_PORT  # noqa: E402
from scripts import demo as one_host  # noqa: E402  (the one-host demo: image build, tenant, verdict)
from scripts.demo_stage import Act, DemoFailure, Narrator, run_acts  # noqa: E402
from scripts.lab.fleet import Fleet, build_fleet, lab_env  # noqa: E402
from scripts.lab.guest import GUEST_COMMAND, ask_channel  # noqa: E402
from scripts.lab.hosts import NsAgent, qemu_hook  # noqa: E402
from scripts.lab.libvirtd_ns import NsLibvirtd  # noqa: E402
from scripts.lab.netns import NetnsPair  # noqa: E402
from scripts.lab.procs import processes  # noqa: E402

NAMES = {"a": "demoA", "b": "demoB", "veth_a": "vdemoA", "veth_b": "vdemoB"}
ADDRS = {"addr_a": "10.80.0.1", "addr_b": "10.80.0.2"}
#: The agents' state directory inside each host (a bind mount of the host's own directory).
AGENT_STATE = "/run/vtpm-demo-mig"
VM_NAME = "demo-mig"
SSH_PORT = 2222  # the guest's hostfwd, on 127.0.0.1 of the namespace its QEMU runs in
IMA_CMDLINE = one_host.IMA_CMDLINE
BOOT_TIMEOUT = 180.0
SETTLE_TIMEOUT = 60.0
TOOLS = ("ip", "unshare", "nsenter", "virsh", "/usr/sbin/libvirtd", "swtpm", "qemu-system-x86_64")


class MigrationDemo:
    def __init__(self, state: Path, narrator: Narrator) -> None:
        self.state = state
        self.say = narrator
        self.env = lab_env(PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")  # for one_host._build
        self.tenant = state / "tenant"
        self.vm_uuid = str(uuid.uuid4())
        self.net: NetnsPair | None = None
        self.fleet: Fleet | None = None
        self.fleet_ca = state / "fleet-ca.pem"
        self.libvirtds: list[NsLibvirtd] = []
        self.agents: dict[str, NsAgent] = {}
        self.image: dict[str, Any] = {}
        self.bundles: dict[str, Path] = {}
        self.last_output = ""
        self.run_dir_created = False

    # ---- the pieces

    @property
    def a(self) -> NsAgent:
        return self.agents["a"]

    @property
    def b(self) -> NsAgent:
        return self.agents["b"]

    def log_tail(self, limit: int = 1500) -> str:
        return "\n".join(
            f"--- {agent.host.ns} daemon log\n{agent.log_tail(limit)}"
            for agent in self.agents.values()
        )

    def verify(self, agent: NsAgent, *args: str) -> subprocess.CompletedProcess[str]:
        """``vtpm-verify ARGS`` inside ``agent``'s network namespace (the tenant's client)."""
        assert self.net is not None
        cmd = [sys.executable, "-m", "verifier.cli", *args]
        return self.net.run(agent.host.ns, cmd, env=lab_env(), cwd=REPO, timeout=300)

    def attest(self, agent: NsAgent, act: Act, label: str) -> str:
        """The tenant's ``vtpm-verify attest --ssh`` to the guest on ``agent``'s host; the act's
        details get the verdict; raises DemoFailure unless trusted."""
        bundle = self.state / f"bundle-{label}.json"
        self.say.step(f"vtpm-verify attest --ssh root@127.0.0.1:{SSH_PORT} (in {agent.host.ns})")
        proc = self.verify(
            agent, "attest", "--ssh", f"root@127.0.0.1:{SSH_PORT}",
            "--identity", self.image["ssh_private_key"],
            "--host-key", self.image["ssh_host_public_key"],
            "--state-dir", str(self.tenant / "state"), "--vm", self.vm_uuid,
            "--guest-command", GUEST_COMMAND, "--save-bundle", str(bundle), "--json",
        )  # fmt: skip
        try:
            findings = one_host.trusted_findings(proc, act, self.say)
        except DemoFailure:
            self.last_output = proc.stderr[-3000:]
            raise
        self.bundles[label] = bundle
        return f"TRUSTED, {len(findings)} finding(s)"

    def chain(self, label: str) -> dict[str, Any]:
        """What bundle ``label`` carries: vAIK public key digest, the AIK certificate's subject
        and whether it chains to the fleet CA."""
        from cryptography import x509

        from evidence.aik_cert import verify_aik_certificate
        from evidence.bundle import parse_bundle

        bundle = parse_bundle(self.bundles[label].read_bytes())
        aik = x509.load_der_x509_certificate(bundle.aik_certificates_der[0])
        ca = x509.load_pem_x509_certificate(self.fleet_ca.read_bytes())
        try:
            verify_aik_certificate(bundle.aik_certificates_der[0], [ca], datetime.now(UTC))
            chained = True
        except Exception:
            chained = False
        return {
            "vaik_public_sha256": hashlib.sha256(bundle.vaik_public.marshal()).hexdigest(),
            "aik_subject": aik.subject.rfc4514_string(),
            "aik_chains_to_fleet_ca": chained,
            "authkey_public_sha256": hashlib.sha256(bundle.authkey_public.marshal()).hexdigest(),
        }

    def wait_journal(self, agent: NsAgent, step: str, count: int) -> tuple[str, list[str]]:
        """Poll ``agent``'s journal until ``step`` appears ``count`` times; return the last view."""
        deadline = time.monotonic() + SETTLE_TIMEOUT
        while (now := agent.journal(self.vm_uuid))[1].count(step) < count:
            if time.monotonic() > deadline:
                raise DemoFailure(f"{agent.host.ns}: no {step} within {SETTLE_TIMEOUT:.0f} s "
                                  f"(journal {now[1]}, vAIK {now[0]})")  # fmt: skip
            time.sleep(0.3)
        return now

    def virsh_migrate(self, src: NsAgent, dst: NsAgent) -> subprocess.CompletedProcess[str]:
        """``virsh migrate --live --p2p VM DST_URI tcp://DST`` inside the source host."""
        self.say.step(
            f"virsh migrate --live --p2p {VM_NAME} {dst.host.uri} tcp://{dst.host.address} "
            f"(in {src.host.ns})"
        )
        return src.host.virsh("migrate", "--live", "--p2p", VM_NAME, dst.host.uri,
                              f"tcp://{dst.host.address}", check=False)  # fmt: skip

    def running(self, agent: NsAgent) -> bool:
        if agent.host.domstate(VM_NAME) != "running":
            return False
        status = agent.host.virsh("qemu-monitor-command", VM_NAME, "--hmp", "info status",
                                  check=False).stdout.strip()  # fmt: skip
        return status == "VM status: running"

    # ---- cleanup

    def cleanup(self) -> list[str]:
        """Stop everything this run started, delete the namespaces; what was stopped."""
        done: list[str] = []
        for agent in self.agents.values():
            if agent.proc is not None and agent.proc.poll() is None:
                with contextlib.suppress(Exception):
                    agent.stop()
                    done.append(f"daemon {agent.host.ns}")
        for lv in reversed(self.libvirtds):
            left = lv.pids()
            with contextlib.suppress(Exception):
                if lv.proc is not None and lv.proc.poll() is None:
                    lv.stop()
                    done.append(
                        f"libvirtd {lv.ns}" + (f" (+{len(left)} processes)" if left else "")
                    )
        if self.net is not None:
            self.net.delete()
            done.append(f"namespaces {self.net.a}, {self.net.b}")
            # Anything else of ours (an init's software root whose parent died, a registrar):
            # its command line names this run's state directory or the agents' bound path.
            for marker in (str(self.state), AGENT_STATE):
                for pid in processes([marker]):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                        done.append(f"pid {pid}")
            if self.run_dir_created:  # the empty mount point the libvirtds' binds left
                with contextlib.suppress(OSError):
                    Path(AGENT_STATE).rmdir()
        return done


# --------------------------------------------------------------------------------------------
# the acts


def act_hosts(demo: MigrationDemo, act: Act) -> str:
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    from evidence.aik_cert import verify_aik_certificate

    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        raise DemoFailure(f"missing programs: {', '.join(missing)} (make installs them)")
    demo.say.step(f"network namespaces {NAMES['a']} ({ADDRS['addr_a']}) ⇄ {NAMES['b']} "
                  f"({ADDRS['addr_b']}), a veth pair")  # fmt: skip
    try:
        demo.net = NetnsPair(**NAMES, **ADDRS).create()
    except RuntimeError as err:
        raise DemoFailure(
            f"{err}: another demo-migration runs, or one was killed without cleaning up "
            f"(then: ip netns del {NAMES['a']}; ip netns del {NAMES['b']})"
        ) from err
    net = demo.net
    demo.say.step("fleet registrar (vtpm-verify registrar init/serve), vtpm-host init × 2")
    fleet = demo.fleet = build_fleet(demo.state / "fleet", vaik_vm=None)
    ca_doc = json.loads(subprocess.run(
        [sys.executable, "-m", "verifier.cli", "registrar", "ca", "--state-dir",
         str(fleet.registrar), "--json"],
        capture_output=True, text=True, check=True, env=lab_env(), cwd=REPO, timeout=120,
    ).stdout)  # fmt: skip
    demo.fleet_ca.write_text(ca_doc["ca_certificate"])
    ca = x509.load_pem_x509_certificate(demo.fleet_ca.read_bytes())
    hosts: dict[str, Any] = {}
    for name, state, ns, addr in (("host-a", fleet.a, net.a, net.addr_a),
                                  ("host-b", fleet.b, net.b, net.addr_b)):  # fmt: skip
        aik = x509.load_pem_x509_certificate((state / "identity" / "aik.pem").read_bytes())
        verify_aik_certificate(aik.public_bytes(Encoding.DER), [ca], datetime.now(UTC))
        subject = aik.subject.rfc4514_string()
        if subject != f"CN={name}":
            raise DemoFailure(f"{name}'s AIK certificate names {subject!r}")
        issuer = aik.issuer.rfc4514_string()
        hosts[name] = {"namespace": ns, "address": addr, "aik_subject": subject,
                       "aik_issuer": issuer, "aik_chains_to_fleet_ca": True}  # fmt: skip
        demo.say.info(f"{name}: AIK certificate {subject}, issued by "
                      f"{aik.issuer.rfc4514_string()} (checked against the fleet CA)")  # fmt: skip
    act.details.update(hosts=hosts, fleet_ca_sha256=ca_doc["ca_sha256"])

    demo.say.step("a libvirtd in each host (own mount namespace, qemu hook of vtpm-host)")
    demo.run_dir_created = not Path(AGENT_STATE).exists()
    hook = qemu_hook(AGENT_STATE)
    for key, ns, state in (("a", net.a, fleet.a), ("b", net.b, fleet.b)):
        lv = NsLibvirtd(net, ns, demo.state / "libvirt" / key, binds={AGENT_STATE: state},
                        hooks={"qemu": hook})  # fmt: skip
        demo.libvirtds.append(lv)
        lv.start()
    lv_a, lv_b = demo.libvirtds
    demo.say.step("vtpm-host daemon in each host (migration + attestation components)")
    for key, lv, peer, peer_lv in (("a", lv_a, "host-b", lv_b), ("b", lv_b, "host-a", lv_a)):
        state = fleet.a if key == "a" else fleet.b
        peers = {peer: f"{peer_lv.address}:{DEFAULT_PORT}"}
        demo.agents[key] = NsAgent(lv, state, fleet.approvals, peers, agent_state=AGENT_STATE)
        demo.agents[key].start()
    act.details["libvirt_uris"] = [lv_a.uri, lv_b.uri]
    act.outcome = "host-a, host-b admitted (fleet CA)"
    return (
        f"host-a ({net.addr_a}) and host-b ({net.addr_b}) admitted: AIK certificates from the "
        "fleet CA (software-root TPMs: DEVELOPMENT ONLY); libvirtd and vtpm-host daemon in each"
    )


def act_boot(demo: MigrationDemo, act: Act) -> str:
    from host_agent.service.enroll import fingerprint

    demo.say.step("guest image: the test initramfs (python -m vm_images.build, cached)")
    demo.image = one_host._build(demo, "vm_images.build")  # type: ignore[arg-type]
    one_host._make_tenant(demo)  # type: ignore[arg-type]
    cert_der = (demo.tenant / "cert.der").read_bytes()
    demo.a.owners({demo.vm_uuid: [fingerprint(cert_der)]})  # the operator's owner policy on A
    demo.say.step(f"vtpm-host vm create {VM_NAME} on host-a (memfd RAM, vTPM bridge, channel)")
    nic = ["-netdev", f"user,id=n0,hostfwd=tcp:127.0.0.1:{SSH_PORT}-:22",
           "-device", "virtio-net-pci,netdev=n0,addr=0x10"]  # fmt: skip
    made = json.loads(demo.a.vm(
        "create", VM_NAME, "--image", str(demo.image["directory"]), "--uuid", demo.vm_uuid,
        "--memory", "256", "--cmdline-extra", IMA_CMDLINE,
        *(f"--qemu-arg={arg}" for arg in nic), "--json",
    ).stdout)  # fmt: skip
    act.details["vm_uuid"] = made.get("uuid", demo.vm_uuid)
    demo.say.step(f"vtpm-host vm start {VM_NAME} (swtpm, bridge, then QEMU under TCG)")
    t0 = time.monotonic()
    demo.a.vm("start", VM_NAME)
    console = demo.a.state / "vms" / demo.vm_uuid / "console.log"
    shown = 0
    while "VTPM-GUEST-READY" not in (console.read_text(errors="replace") if console.exists()
                                     else ""):  # fmt: skip
        waited = time.monotonic() - t0
        if waited > BOOT_TIMEOUT:
            raise DemoFailure(f"the guest printed no VTPM-GUEST-READY within {BOOT_TIMEOUT:.0f} s")
        if waited >= shown + 10:
            shown += 10
            demo.say.info(f"booting under TCG… {shown} s")
        time.sleep(0.3)
    boot = time.monotonic() - t0
    demo.say.step("deploy the guest agent into the guest over SSH (from inside demoA)")
    assert demo.net is not None
    demo.net.call_function(
        demo.net.a, "scripts.lab.guest:install_guest_agent", SSH_PORT,
        demo.image["ssh_private_key"], demo.image["ssh_host_public_key"], timeout=120,
    )  # fmt: skip
    state = demo.a.host.domstate(VM_NAME)
    if state != "running":
        raise DemoFailure(f"the VM is {state!r} on host-a after its boot")
    act.details.update(host="host-a", guest="initramfs", boot_seconds=round(boot, 1),
                       domstate=state, image_key=demo.image.get("key"))  # fmt: skip
    act.outcome = f"running on host-a (boot {boot:.1f} s)"
    return f"VM {VM_NAME} ({demo.vm_uuid}) running on host-a, test initramfs, boot {boot:.1f} s"


def act_enroll_attest(demo: MigrationDemo, act: Act) -> str:
    demo.say.step(f"vtpm-verify enroll --host {demo.a.attest_url} (in {demo.a.host.ns})")
    proc = demo.verify(
        demo.a, "enroll", "--host", demo.a.attest_url, "--vm", demo.vm_uuid,
        "--cert", str(demo.tenant / "cert.der"), "--key", str(demo.tenant / "key.pem"),
        "--fleet-ca", str(demo.fleet_ca), "--state-dir", str(demo.tenant / "state"), "--json",
    )  # fmt: skip
    if proc.returncode != 0:
        demo.last_output = proc.stderr[-3000:]
        last = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "no output"
        raise DemoFailure(f"enroll exited {proc.returncode}: {last}")
    act.details["enrolled"] = True
    verdict = demo.attest(demo.a, act, "a")
    chain = demo.chain("a")
    act.details.update(chain)
    demo.say.info(f"vAIK {chain['vaik_public_sha256'][:16]}…, chain through {chain['aik_subject']}")
    if chain["aik_subject"] != "CN=host-a" or not chain["aik_chains_to_fleet_ca"]:
        raise DemoFailure(f"the chain is not host-a's from the fleet CA: {chain}")
    act.outcome = f"enrolled; {verdict} (host-a)"
    return f"enrolled on host-a; attest: {verdict}, chain through host-a's AIK"


def act_migrate(demo: MigrationDemo, act: Act) -> str:
    a, b = demo.a, demo.b
    vpcrs = a.pcrs(demo.vm_uuid)
    before_b = b.journal(demo.vm_uuid)[1]
    t0 = time.monotonic()
    done = demo.virsh_migrate(a, b)
    took = time.monotonic() - t0
    act.details.update(virsh_exit=done.returncode, seconds=round(took, 2))
    if done.returncode != 0:
        demo.last_output = done.stderr[-3000:]
        raise DemoFailure(f"virsh migrate exited {done.returncode}: {done.stderr.strip()[-300:]}")
    demo.say.step("wait for both journals: target active on host-b, source done on host-a")
    vaik_b, _ = demo.wait_journal(b, "target:active", before_b.count("target:active") + 1)
    vaik_a, _ = a.journal(demo.vm_uuid)
    state_a, state_b = a.host.domstate(VM_NAME), b.host.domstate(VM_NAME)
    same_vpcrs = b.pcrs(demo.vm_uuid) == vpcrs
    act.details.update(domstate_a=state_a, domstate_b=state_b, vaik_a=vaik_a, vaik_b=vaik_b,
                       qemu_on_a=len(a.host.pids("qemu-system")), vpcrs_unchanged=same_vpcrs,
                       running_on_b=demo.running(b))  # fmt: skip
    demo.say.info(f"host-a: {state_a}, vAIK {vaik_a}; host-b: {state_b}, vAIK {vaik_b}")
    if not act.details["running_on_b"] or act.details["qemu_on_a"]:
        raise DemoFailure(f"after the migration: host-a {state_a}, host-b {state_b}")
    if (vaik_a, vaik_b) != ("absent", "active"):
        raise DemoFailure(f"vAIK on host-a {vaik_a}, on host-b {vaik_b} (expected absent/active)")
    if not same_vpcrs:
        raise DemoFailure("the vPCRs on host-b differ from those on host-a before the move")
    act.outcome = f"running on host-b ({took:.1f} s), vAIK moved"
    return (
        f"the VM runs on host-b after {took:.1f} s; vAIK absent on host-a, active on host-b; "
        "vPCRs unchanged"
    )


def act_attest_b(demo: MigrationDemo, act: Act) -> str:
    verdict = demo.attest(demo.b, act, "b")
    before, after = demo.chain("a"), demo.chain("b")
    act.details.update(after)
    act.details["same_vaik"] = before["vaik_public_sha256"] == after["vaik_public_sha256"]
    demo.say.info(
        f"vAIK {after['vaik_public_sha256'][:16]}…, chain through "
        f"{after['aik_subject']} (to the fleet CA: {after['aik_chains_to_fleet_ca']})"
    )
    if not act.details["same_vaik"]:
        raise DemoFailure("the vAIK public key on host-b is not the one enrolled on host-a")
    if after["aik_subject"] != "CN=host-b" or not after["aik_chains_to_fleet_ca"]:
        raise DemoFailure(f"the chain is not host-b's from the fleet CA: {after}")
    demo.say.step("host-a asked for the VM through its channel (a stand-in for a stale copy)")
    answer = ask_channel(demo.a.state / "vms" / demo.vm_uuid / "attest.sock")
    error = answer.get("error") or {}
    act.details["host_a_answer"] = {"ok": answer.get("ok"), "error_id": error.get("id")}
    demo.say.info(f"host-a: ok={answer.get('ok')} [{error.get('id')}] "
                  f"{str(error.get('message', '')).split(':')[0]}")  # fmt: skip
    if answer.get("ok") is not False or error.get("id") != "attest.not_enrolled":
        raise DemoFailure(f"host-a answered {answer!r}, expected attest.not_enrolled")
    act.outcome = f"{verdict}, same vAIK; host-a: not_enrolled"
    return (
        f"attest on host-b: {verdict}, same vAIK, chain through host-b's AIK; "
        "host-a answers attest.not_enrolled"
    )


def act_tampered_back(demo: MigrationDemo, act: Act) -> str:
    a, b = demo.a, demo.b
    before_a, before_b = a.journal(demo.vm_uuid)[1], b.journal(demo.vm_uuid)[1]
    mark = len(a.log_tail(10**9))
    demo.say.step("host-a's test hook: change one byte of guest memory after it arrived")
    a.settings({"test_tamper": "memory"})
    try:
        done = demo.virsh_migrate(b, a)
    finally:
        a.settings({})
    refusal = next((ln for ln in a.log_tail(10**9)[mark:].splitlines()
                    if "refused: loaded memory root" in ln), "")  # fmt: skip
    act.details.update(virsh_exit=done.returncode, virsh_error=done.stderr.strip()[-500:],
                       refusal=refusal[-400:])  # fmt: skip
    lines = done.stderr.strip().splitlines()
    shown = next((ln for ln in lines if "refused" in ln), lines[-1] if lines else "no output")
    shown = shown[shown.find("vtpm-trust:") :] if "vtpm-trust:" in shown else shown
    demo.say.info(f"virsh: exit {done.returncode}: {shown.strip()[:200]}")
    if done.returncode == 0:
        raise DemoFailure("libvirt moved a VM whose memory changed in flight")
    if not refusal:
        raise DemoFailure("host-a logged no refusal of the loaded memory")
    demo.say.info(f"host-a's daemon: refused: {refusal.split('refused: ', 1)[-1][:150]}")
    demo.say.step("wait for both journals: target discarded on host-a, source aborted on host-b")
    vaik_a, _ = demo.wait_journal(a, "target:discarded", before_a.count("target:discarded") + 1)
    vaik_b, _ = demo.wait_journal(b, "source:aborted", before_b.count("source:aborted") + 1)
    act.details.update(vaik_a=vaik_a, vaik_b=vaik_b, running_on_b=demo.running(b),
                       qemu_on_a=len(a.host.pids("qemu-system")),
                       domstate_a=a.host.domstate(VM_NAME))  # fmt: skip
    if not act.details["running_on_b"] or act.details["qemu_on_a"]:
        raise DemoFailure(f"after the refusal: host-a {act.details['domstate_a']}, "
                          f"host-b running: {act.details['running_on_b']}")  # fmt: skip
    if (vaik_a, vaik_b) != ("absent", "active"):
        raise DemoFailure(f"vAIK on host-a {vaik_a}, on host-b {vaik_b} (expected absent/active)")
    verdict = demo.attest(b, act, "b-after")
    act.details["same_vaik"] = (
        demo.chain("b-after")["vaik_public_sha256"] == demo.chain("a")["vaik_public_sha256"]
    )
    if not act.details["same_vaik"]:
        raise DemoFailure("the VM's vAIK changed")
    act.outcome = f"REFUSED by host-a; runs on host-b, {verdict}"
    return f"REFUSED by host-a (memory changed in flight); the VM runs on host-b: {verdict}"


ACTS: list[tuple[str, str, Callable[[MigrationDemo, Act], str]]] = [
    # title, expected outcome, function (every act needs the ones before it)
    ("Two hosts admitted by the fleet", "admitted", act_hosts),
    ("Protected VM boots on host A", "running on A", act_boot),
    ("Tenant enrolls, attests over SSH", "trusted", act_enroll_attest),
    ("Plain virsh migrate --live to B", "running on B, vAIK moved", act_migrate),
    ("Attest on B; A refuses", "trusted, same vAIK; A not_enrolled", act_attest_b),
    ("Tampered migration back to A", "refused; on B, trusted", act_tampered_back),
]


# --------------------------------------------------------------------------------------------
# main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json", action="store_true", help="one JSON document on stdout")
    parser.add_argument(
        "--keep", action="store_true", help="keep the state directory (processes still stop)"
    )
    args = parser.parse_args(argv)
    say = Narrator(sys.stderr if args.json else sys.stdout)
    if os.geteuid() != 0:
        message = (
            "demo_migration.py needs root: it creates network namespaces (ip netns) and starts "
            f"a libvirtd in each; run it as root (sudo make demo-migration). Running as uid "
            f"{os.geteuid()}."
        )
        print(f"error: {message}", file=sys.stderr)
        if args.json:
            print(json.dumps({"ok": False, "error": {"id": "demo.not_root", "message": message}}))
        return 2

    os.chdir(REPO)  # namespace helpers run `python -c` that import this checkout's packages
    # short: unix socket paths (QEMU monitor, swtpm, bridges) end at 107 bytes
    state = Path(tempfile.mkdtemp(prefix="vtpm-demo-mig-", dir="/tmp"))
    state.chmod(0o700)
    demo = MigrationDemo(state, say)
    acts = [Act(i + 1, title, expected) for i, (title, expected, _) in enumerate(ACTS)]
    say.out.write(f"vtpm-trust migration demo — state in {state}\n")
    steps = [(act, fn, True) for act, (_, _, fn) in zip(acts, ACTS, strict=True)]
    run = run_acts(demo, steps, say, state, args.keep)
    ok = not run.interrupted and all(a.status == "passed" for a in acts)
    if args.json:
        doc = {
            "ok": ok,
            "guest": "initramfs",
            "total_seconds": round(run.total, 1),
            "state_dir": str(state),
            "kept": bool(args.keep),
            "namespaces": [NAMES["a"], NAMES["b"]],
            "agent_state": AGENT_STATE,
            "stopped": run.stopped,
            "acts": [{**asdict(a), "seconds": round(a.seconds, 2)} for a in acts],
        }
        print(json.dumps(doc, indent=2, default=str))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
