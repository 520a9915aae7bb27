#!/usr/bin/env python3
"""``make demo``: vtpm-trust end to end on one machine, with nothing but the embedded defaults.

Acts (each prints a heading and one-line results; a summary table ends the run):

0. corpus replay — the shared corpus's real firmware event logs replay to their PCR values;
1. host init — ``vtpm-host init``: software root TPM (DEVELOPMENT ONLY), embedded registrar,
   trusted store; the fleet approves the host's platform state for vAIK signing;
2. boot — the guest image (built through its cache: by default the Debian disk image, whose
   IMA policy measures its ext4 root so the IMA list is real; ``--guest initramfs`` for the
   small test initramfs), ``vtpm-host daemon`` with the attestation component, ``vtpm-host vm
   create`` + ``vm start`` (an adopted VM: memfd RAM, external vTPM behind a bridge, attestation
   channel) under libvirt's embedded driver;
3. enroll — a tenant key and self-signed ``cert_user`` made on the fly, ``vtpm-verify enroll``;
4. attest — ``vtpm-verify attest --ssh`` (paramiko into the guest, guest agent, host daemon,
   full verification): trusted;
5. save — ``vtpm-host vm save`` (the daemon seals memory and vTPM state), ``image verify``;
6. tamper — one byte of guest RAM flipped in a copy of the save image: ``image verify`` names the
   page, ``vm restore`` of it is refused and the VM stays off;
7. restore — ``vm restore`` of the genuine image (verified), vPCRs unchanged, attest: trusted.

Every act runs the real thing; an act whose prerequisite failed is reported as not run. Exit 0
only when every act gave the expected outcome (trusted where trust is expected, refused where a
refusal is expected), 1 otherwise, 2 on bad usage. ``--json`` prints one JSON document on stdout
(the narrative goes to stderr). All state lives in a temporary directory (or ``--state-dir``);
every listener binds 127.0.0.1. Whatever happens, the VM, its swtpm and bridge, the daemon, the
software root and the registrar child are stopped, and the directory is removed unless ``--keep``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import ssl
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

# The stage (Demo, Act, Narrator, run_acts...) lives in scripts/demo_stage.py; re-exported here.
from scripts.demo_stage import COMMAND_TIMEOUT as COMMAND_TIMEOUT  # noqa: E402
from scripts.demo_stage import (  # noqa: E402
    GUEST_AGENT_DIR,
    GUEST_COMMAND,
    VM_NAME,
    Act,
    Demo,
    DemoFailure,
    Narrator,
    Skipped,
    run_acts,
)
from scripts.demo_stage import Run as Run  # noqa: E402
from scripts.demo_stage import Stage as Stage  # noqa: E402
from scripts.demo_stage import free_port as free_port  # noqa: E402
from scripts.lab.procs import stop_process  # noqa: E402

# IMA on: Debian's kernel with the tcb policy, plus a rule that measures every program the
# guest runs from its initramfs (tmpfs is not covered by tcb).
IMA_CMDLINE = 'ima_policy=tcb ima_hash=sha256 vtpm.ima_policy="measure func=BPRM_CHECK"'
MARK = b"VTPM-DEMO-MARKER" * 256  # one 4 KiB page of guest RAM the demo can find in a save image
BOOT_TIMEOUT = 180.0


# --------------------------------------------------------------------------------------------
# the acts


def act_corpus(demo: Demo, act: Act) -> str:
    import demo_corpus

    ok, line = demo_corpus.summary()
    if not ok:
        if "not found" in line:
            raise Skipped(line)
        raise DemoFailure(line)
    act.outcome = "replayed: " + line.split(";")[1].strip().replace("expected PCR ", "")
    return line


def _fleet_approval(demo: Demo) -> str:
    """The embedded registrar approves this host's platform state; the host keeps the result.

    What the ansible role does against a fleet registrar (roles/vtpm_host/tasks/attest.yml):
    read the host's PolicyPCR digest for vAIK signing, ``registrar approve`` it, fetch
    ``GET /v1/policy-approvals`` and write the fleet policy key and the approvals.
    """
    from host_agent.config import load_config
    from host_agent.tpm.discovery import open_host_tpm

    config = load_config(None, {**os.environ, "VTPM_STATE_DIR": str(demo.state)})
    logging.disable(logging.WARNING)  # init printed the software root notice already
    try:
        tpm = open_host_tpm(config.tpm)
        try:
            policy = tpm.approved_sign_policy().hex()
        finally:
            tpm.close()
    finally:
        logging.disable(logging.NOTSET)
    registrar = demo.state / "registrar"
    from evidence.verify import VAIK_POLICY_REF

    # vAIKs bind the policyRef VAIK_POLICY_REF (the registrar's default, spelled out here):
    # an approval for another policyRef does not authorise them.
    demo.verify("registrar", "approve", "--state-dir", str(registrar), "--pcr-policy", policy,
                "--policy-ref", VAIK_POLICY_REF.decode(), "--json")  # fmt: skip
    approvals = _fetch_approvals(demo, registrar)
    (demo.state / "attest").mkdir(mode=0o700, exist_ok=True)
    (demo.state / "migration").mkdir(mode=0o700, exist_ok=True)
    (demo.state / "attest" / "fleet-policy-key.pem").write_text(approvals["policy_key"]["pem"])
    (demo.state / "migration" / "policy-approvals.json").write_text(json.dumps(approvals))
    (demo.state / "attest" / "settings.json").write_text(
        json.dumps({"listen": f"127.0.0.1:{demo.enroll_port}"})
    )
    return policy


def _fetch_approvals(demo: Demo, registrar: Path) -> dict[str, Any]:
    """``GET /v1/policy-approvals`` from the embedded registrar, run for just this request."""
    import select
    import urllib.request

    with open(demo.state / "registrar.log", "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "verifier.cli", "registrar", "serve", "--state-dir",
             str(registrar), "--listen", "127.0.0.1:0", "--json"],
            stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL, text=True,
            env=demo.env, cwd=REPO,
        )  # fmt: skip
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 30)
        if not ready:
            raise DemoFailure("the embedded registrar did not report its URL within 30 s")
        url = json.loads(proc.stdout.readline())["url"]
        context = ssl.create_default_context(cafile=str(demo.state / "identity" / "ca.pem"))
        context.check_hostname = False  # the fleet CA is pinned; it serves on 127.0.0.1
        with urllib.request.urlopen(f"{url}/v1/policy-approvals", context=context) as resp:
            approvals: dict[str, Any] = json.loads(resp.read())
        return approvals
    finally:
        stop_process(proc, 10)


def act_init(demo: Demo, act: Act) -> str:
    demo.say.step("vtpm-host init (no TPM configured: the software root is provisioned)")
    proc = demo.host("init")
    notice = next(
        (line for line in proc.stderr.splitlines() if "DEVELOPMENT ONLY" in line),
        None,
    )
    if notice is None:
        raise DemoFailure("init printed no DEVELOPMENT ONLY notice for the software root")
    demo.say.notice(notice)
    for line in proc.stdout.splitlines():
        if line.startswith(("created", "registered")):
            demo.say.info(line)
    if not (demo.state / "identity" / "aik.pem").is_file():
        raise DemoFailure("init left no AIK certificate (identity/aik.pem)")
    demo.say.step("the fleet approves this host's platform state (PCR0-8) for vAIK signing")
    policy = _fleet_approval(demo)
    act.details.update(sign_policy=policy, development_only_notice=notice)
    act.outcome = "admitted (software root: DEVELOPMENT ONLY)"
    return (
        f"host admitted by the embedded registrar (AIK certificate from the fleet CA), store "
        f"created, platform policy {policy[:16]}… approved"
    )


def _build(demo: Demo, module: str) -> dict[str, Any]:
    """``python -m MODULE --json`` through its cache; its progress lines go to the narrative."""
    build = subprocess.run(
        [sys.executable, "-m", module, "--json"],
        stdout=subprocess.PIPE, stderr=demo.say.out, text=True, cwd=REPO, env=demo.env,
        timeout=1800,
    )  # fmt: skip
    if build.returncode != 0:
        raise DemoFailure(f"{module} exited {build.returncode}")
    built: dict[str, Any] = json.loads(build.stdout)
    return built


def _initramfs_image(demo: Demo) -> None:
    """The test initramfs: the guest agent is copied in over SSH after boot."""
    demo.say.step("guest image: the test initramfs (python -m vm_images.build, cached)")
    built = _build(demo, "vm_images.build")
    manifest = json.loads(Path(built["manifest"]).read_text())
    demo.image = {
        **manifest,
        **built,
        "ssh_private_key": str(Path(built["manifest"]).parent / manifest["ssh_private_key"]),
    }
    demo.boot_manifest = Path(built["manifest"])
    demo.memory_mib = 256
    demo.cmdline_extra = IMA_CMDLINE
    demo.extra_qemu_args = []
    demo.guest_command = GUEST_COMMAND


def _disk_image(demo: Demo) -> None:
    """The Debian disk image: ext4 root, IMA measuring it, the guest agent installed.

    ``vtpm-host vm create`` boots a kernel + initramfs manifest (``vtpm-trust/guest-image/1``);
    the disk's kernel, initrd and command line go into one such manifest in the state
    directory, and its root disk is attached as a QEMU drive (``snapshot=on``: the cached image
    is never written, and writes of the guest are discarded when its QEMU exits, so a restored
    guest finds the pristine image under its page cache: fine for the minutes of a demo, not for
    a tenant's VM, whose disk libvirt would manage).
    """
    demo.say.step("guest image: the Debian disk with IMA (python -m vm_images.disk, cached)")
    built = _build(demo, "vm_images.disk")
    boot = demo.state / "disk-boot"
    boot.mkdir(exist_ok=True)
    demo.boot_manifest = boot / "manifest.json"
    demo.boot_manifest.write_text(
        json.dumps(
            {
                "format": "vtpm-trust/guest-image/1",
                "kernel": built["kernel"],
                "initramfs": built["initrd"],
                "cmdline": built["cmdline"],
            }
        )
    )
    demo.image = {
        **built,
        "ssh_private_key": built["ssh_key"],
        "ready_marker": "VTPM-GUEST-READY",
    }
    demo.memory_mib = 512
    demo.cmdline_extra = ""
    # The image's drive options with if=virtio would take the PCI slot libvirt gives its own
    # devices: the disk gets an explicit one, like the NIC.
    drive = str(built["qemu_drive"][-1]).replace("if=virtio", "if=none,id=vdisk")
    demo.extra_qemu_args = [
        "--qemu-arg=-drive", f"--qemu-arg={drive}",
        "--qemu-arg=-device", "--qemu-arg=virtio-blk-pci,drive=vdisk,addr=0x11",
    ]  # fmt: skip
    demo.guest_command = "vtpm-guest"


def act_boot(demo: Demo, act: Act) -> str:
    t0 = time.monotonic()
    if demo.guest == "disk":
        _disk_image(demo)
    else:
        _initramfs_image(demo)
    demo.say.info(f"image {demo.image['key']} ready in {time.monotonic() - t0:.1f} s")
    act.details["image"] = {"kind": demo.guest, "key": demo.image["key"]}

    # The owner policy: this VM belongs to the tenant whose certificate act 3 makes.
    _make_tenant(demo)
    from host_agent.service.enroll import fingerprint

    cert_der = (demo.tenant / "cert.der").read_bytes()
    (demo.state / "attest" / "owners.json").write_text(
        json.dumps(
            {"format": "vtpm-trust/owners/1", "vms": {demo.vm_uuid: [fingerprint(cert_der)]}}
        )
    )

    demo.say.step("vtpm-host daemon --component host_agent.service.attest:AttestService")
    demo.start_daemon()
    demo.say.info(f"daemon up; enrollment API on https://127.0.0.1:{demo.enroll_port}")

    demo.say.step(f"vtpm-host vm create {VM_NAME} --image … (adopted: memfd RAM, vTPM bridge)")
    made = json.loads(
        demo.vm(
            "create", VM_NAME, "--image", str(demo.boot_manifest),
            "--memory", str(demo.memory_mib), "--uuid", demo.vm_uuid,
            *(["--cmdline-extra", demo.cmdline_extra] if demo.cmdline_extra else []),
            *demo.extra_qemu_args,
            "--qemu-arg=-netdev",
            f"--qemu-arg=user,id=n0,hostfwd=tcp:127.0.0.1:{demo.ssh_port}-:22",
            "--qemu-arg=-device", "--qemu-arg=virtio-net-pci,netdev=n0,addr=0x10",
            "--json",
        ).stdout
    )  # fmt: skip
    demo.vm_created = True
    act.details["vm_uuid"] = made.get("uuid", demo.vm_uuid)
    demo.say.step(f"vtpm-host vm start {VM_NAME} (swtpm, bridge, then QEMU under TCG)")
    t0 = time.monotonic()
    demo.vm("start", VM_NAME)
    console = demo.state / "vms" / demo.vm_uuid / "console.log"
    marker = str(demo.image.get("ready_marker", "VTPM-GUEST-READY"))
    shown = 0
    while marker not in (console.read_text(errors="replace") if console.exists() else ""):
        waited = time.monotonic() - t0
        if waited > BOOT_TIMEOUT:
            raise DemoFailure(f"the guest printed no {marker} within {BOOT_TIMEOUT:.0f} s")
        if waited >= shown + 10:  # TCG boots take a while: show that it is moving
            shown += 10
            demo.say.info(f"booting under TCG… {shown} s")
        time.sleep(0.5)
    boot = time.monotonic() - t0
    demo.say.info(f"guest ready after {boot:.1f} s; state {demo.vm_state()}")
    if demo.guest == "disk":
        demo.say.step("SSH into the guest (the image has the guest agent installed)")
        command, payload = "command -v vtpm-guest", None
    else:
        demo.say.step("deploy the guest agent (standard library only) into the guest over SSH")
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            for path in sorted((REPO / "guest_agent").glob("*.py")):
                tar.add(path, arcname=f"guest_agent/{path.name}")
        command = f"mkdir -p {GUEST_AGENT_DIR} && tar -x -C {GUEST_AGENT_DIR}"
        payload = buf.getvalue()
    deadline = time.monotonic() + 60
    while True:
        try:
            demo.guest_ssh(command, stdin=payload)
            break
        except DemoFailure:
            raise
        except Exception as err:  # SSH not up yet
            if time.monotonic() > deadline:
                raise DemoFailure(f"no SSH into the guest: {err}") from err
            time.sleep(1)
    act.details["boot_seconds"] = round(boot, 1)
    act.outcome = f"running (boot {boot:.1f} s)"
    return f"VM {VM_NAME} ({demo.vm_uuid}) running, adopted, booted in {boot:.1f} s"


def _make_tenant(demo: Demo) -> None:
    """The tenant's key and self-signed certificate (cert_user), made on the fly."""
    if (demo.tenant / "cert.der").exists():
        return
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    demo.tenant.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "demo tenant")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    (demo.tenant / "cert.der").write_bytes(cert.public_bytes(serialization.Encoding.DER))
    keyfile = demo.tenant / "key.pem"
    keyfile.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    keyfile.chmod(0o600)


def act_enroll(demo: Demo, act: Act) -> str:
    _make_tenant(demo)
    demo.say.step("vtpm-verify enroll (proves possession of cert_user's key over HTTPS)")
    proc = demo.verify(
        "enroll", "--host", f"https://127.0.0.1:{demo.enroll_port}", "--vm", demo.vm_uuid,
        "--cert", str(demo.tenant / "cert.der"), "--key", str(demo.tenant / "key.pem"),
        "--fleet-ca", str(demo.state / "identity" / "ca.pem"),
        "--fleet-policy-key", str(demo.state / "attest" / "fleet-policy-key.pem"),
        "--state-dir", str(demo.tenant / "state"), "--json",
    )  # fmt: skip
    with contextlib.suppress(ValueError):
        act.details["enrollment"] = json.loads(proc.stdout)
    act.outcome = "enrolled (vAIK bound)"
    return (
        "vAIK created and bound to this VM and cert_user; chain CertvAIK → CertAuthKey → "
        "AIK certificate → fleet CA checked"
    )


def trusted_findings(
    proc: subprocess.CompletedProcess[str], act: Act, say: Narrator
) -> list[dict[str, Any]]:
    """The findings of a trusted ``vtpm-verify attest --json`` run (``proc``); the verdict and
    the findings go into ``act.details``, each finding is said.

    Raises:
        DemoFailure: no verdict on stdout (not JSON), or the verdict is not trusted.
    """
    try:
        verdict = json.loads(proc.stdout)
    except ValueError as err:
        raise DemoFailure(
            f"attest exited {proc.returncode} without a verdict: {proc.stderr.strip()[-800:]}"
        ) from err
    findings: list[dict[str, Any]] = verdict.get("findings", [])
    act.details.update(trusted=verdict.get("trusted"), findings=findings)
    for f in findings:
        say.info(f"[{f['severity']}] {f['id']}: {f['message'][:150]}")
    if proc.returncode != 0 or verdict.get("trusted") is not True:
        raise DemoFailure(f"NOT TRUSTED (exit {proc.returncode}), {len(findings)} finding(s)")
    return findings


def _attest(demo: Demo, act: Act, label: str) -> str:
    bundle = demo.state / f"bundle-{label}.json"
    demo.say.step("vtpm-verify attest --ssh root@127.0.0.1:… (paramiko → vtpm-guest quote)")
    proc = demo.verify(
        "attest", "--ssh", f"{demo.image['ssh_user']}@127.0.0.1:{demo.ssh_port}",
        "--identity", demo.image["ssh_private_key"],
        "--host-key", demo.image["ssh_host_public_key"],
        "--state-dir", str(demo.tenant / "state"), "--vm", demo.vm_uuid,
        "--guest-command", demo.guest_command, "--save-bundle", str(bundle), "--json",
        check=False,
    )  # fmt: skip
    findings = trusted_findings(proc, act, demo.say)
    summary = _vpcr_summary(bundle)
    act.details["vpcrs"] = summary
    act.outcome = f"TRUSTED, {len(findings)} finding(s)"
    demo.say.info(summary["text"])
    return f"TRUSTED — {len(findings)} finding(s); {summary['short']}"


def _ranges(indices: list[int]) -> str:
    """[0, 1, 2, 3, 10] -> "0-3, 10"."""
    out: list[str] = []
    for i in sorted(indices):
        if out and out[-1].split("-")[-1] == str(i - 1):
            out[-1] = f"{out[-1].split('-')[0]}-{i}"
        else:
            out.append(str(i))
    return ", ".join(out) or "none"


def _vpcr_summary(path: Path) -> dict[str, Any]:
    from evidence.bundle import parse_bundle

    raw = parse_bundle(path.read_bytes())
    pcrs = raw.message.pcrs
    # PCRs 17-22 start at all-ones (locality reset); neither they nor all-zero ones were touched
    nonzero = [i for i, v in pcrs.items() if v.strip(b"\x00") and v.strip(b"\xff")]
    events = len(raw.event_log.events) if raw.event_log is not None else 0
    ima = len(raw.ima_list.entries) if raw.ima_list is not None else 0
    text = "signed vPCRs: " + ", ".join(f"{i}={pcrs[i].hex()[:12]}…" for i in nonzero)
    short = (
        f"{len(pcrs)} vPCRs signed, extended: {_ranges(nonzero)}; {events} firmware events and "
        f"{ima} IMA entries replayed to them"
    )
    return {
        "text": text,
        "short": short,
        "pcrs": {str(i): v.hex() for i, v in pcrs.items()},
        "eventlog_events": events,
        "ima_entries": ima,
    }


def act_attest(demo: Demo, act: Act) -> str:
    return _attest(demo, act, "boot")


def act_save(demo: Demo, act: Act) -> str:
    demo.say.step("the guest writes one recognisable page into its RAM (for act 6)")
    demo.guest_ssh(
        "printf 'VTPM-DEMO-MARKER%.0s' $(seq 1 256) > /tmp/mark && sync && wc -c < /tmp/mark"
    )
    demo.pcrs_before_save = demo.vm_pcrs()
    image = demo.state / "demo.save"
    demo.say.step("vtpm-host vm save (the daemon hashes every page and seals a record)")
    t0 = time.monotonic()
    saved = json.loads(demo.vm("save", VM_NAME, str(image), "--json").stdout)
    took = time.monotonic() - t0
    if not demo.vm_off():
        raise DemoFailure(f"after the save the VM is {demo.vm_state()!r}, expected shut off")
    demo.say.step("vtpm-host image verify (offline: the image against its sealed record)")
    check = json.loads(demo.host("image", "verify", str(image), "--json").stdout)
    if check.get("verdict") != "match":
        raise DemoFailure(f"image verify says {check.get('verdict')!r} for the genuine image")
    act.details.update(record=saved.get("record"), save_seconds=round(took, 2), verify=check)
    rec = str(saved.get("record"))
    demo.say.info(f"sealed record {rec}: memory root, vPCRs and vTPM state digests")
    act.outcome = f"sealed in {took:.1f} s; image: match"
    return f"saved in {took:.1f} s and sealed; image verify: match; the VM is off"


def act_tamper(demo: Demo, act: Act) -> str:
    good = demo.state / "demo.save"
    bad = demo.state / "demo-tampered.save"
    data = bytearray(good.read_bytes())
    at = data.find(MARK)
    if at < 0:
        raise DemoFailure("the guest's marker page is not in the save image")
    data[at + 100] ^= 0x01
    bad.write_bytes(bytes(data))
    demo.say.info(f"flipped one bit at byte {at + 100} of a copy of the save image")
    demo.say.step("vtpm-host image verify on the tampered copy")
    proc = demo.host("image", "verify", str(bad), "--json", check=False)
    try:
        check = json.loads(proc.stdout)
    except ValueError as err:
        raise DemoFailure(f"image verify printed no verdict: {proc.stderr.strip()[-500:]}") from err
    pages = check.get("differing_pages") or []
    if check.get("verdict") != "mismatch" or not pages:
        raise DemoFailure(f"image verify says {check.get('verdict')!r}, expected a mismatch")
    page = pages[0][0] if isinstance(pages[0], list) else pages[0]
    demo.say.info(f"image verify: mismatch, {len(pages)} page(s) differ, first: page {page}")
    demo.say.step("vtpm-host vm restore on the tampered copy")
    refused = demo.vm("restore", str(bad), check=False)
    line = next(
        (ln for ln in refused.stderr.splitlines() if "restore_refused" in ln),
        refused.stderr.strip().splitlines()[-1] if refused.stderr.strip() else "",
    )
    head, sep, reason = line.partition(" refused: ")
    demo.say.info(f"{head}{sep.rstrip()}")
    if reason:
        demo.say.info(f"  {reason.split('; restore ')[0][:240]}")  # not libvirt's own words
    state = demo.vm_state()
    act.details.update(
        differing_pages=pages, restore_exit=refused.returncode, vm_state=state, refusal=line
    )
    if refused.returncode == 0 or "restore_refused" not in refused.stderr:
        raise DemoFailure(f"the tampered image was not refused (exit {refused.returncode})")
    if f": {page} (" not in line and f": {page}-" not in line:
        raise DemoFailure(f"the refusal does not name page {page}: {line[:300]}")
    if state.replace(" ", "") not in ("shutoff", "absent"):
        raise DemoFailure(f"after a refused restore the VM is {state!r}, expected shut off")
    act.outcome = f"REFUSED (page {page}); VM off"
    shown = "shut off" if state == "shutoff" else state
    return f"REFUSED as expected — page {page} differs; the VM stays {shown}"


def act_restore(demo: Demo, act: Act) -> str:
    demo.say.step("vtpm-host vm restore of the genuine image (verified before the VM runs)")
    t0 = time.monotonic()
    demo.vm("restore", str(demo.state / "demo.save"))
    took = time.monotonic() - t0
    state = demo.vm_state()
    if state != "running":
        raise DemoFailure(f"after the restore the VM is {state!r}")
    if "matches sealed record" not in demo.log_tail(100_000):
        raise DemoFailure("the daemon logged no verified restore ('matches sealed record')")
    pcrs = demo.vm_pcrs()
    if pcrs != demo.pcrs_before_save:
        raise DemoFailure("the restored VM's vPCRs differ from those before the save")
    demo.say.info(f"restored and verified in {took:.1f} s; vPCRs identical to before the save")
    act.details["restore_seconds"] = round(took, 2)
    line = _attest(demo, act, "restored")
    act.outcome = f"verified in {took:.1f} s; {act.outcome}"
    return f"verified restore in {took:.1f} s; {line}"


ACTS: list[tuple[str, str, Callable[[Demo, Act], str], bool]] = [
    # title, expected outcome, function, needed by the acts after it
    ("Corpus replay (real firmware logs)", "all values reproduced", act_corpus, False),
    ("Host init (root, registrar, store)", "host admitted", act_init, True),
    ("Boot an adopted VM, daemon running", "VM running", act_boot, True),
    ("Tenant enrollment", "enrolled", act_enroll, True),
    ("Attest over SSH", "trusted", act_attest, True),
    ("Save (sealed)", "sealed, image matches", act_save, True),
    ("Tampered save image", "refused, VM not running", act_tamper, False),
    ("Restore (verified), attest again", "verified, trusted", act_restore, True),
]


# --------------------------------------------------------------------------------------------
# main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json", action="store_true", help="one JSON document on stdout")
    parser.add_argument(
        "--state-dir",
        type=Path,
        help="an empty or new directory (removed after the run unless --keep)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the state directory")
    parser.add_argument(
        "--guest",
        choices=("initramfs", "disk"),
        default="disk",
        help="the Debian disk image with real IMA lists (default), or the test initramfs",
    )
    args = parser.parse_args(argv)

    say = Narrator(sys.stderr if args.json else sys.stdout)
    if args.state_dir is not None:
        state = args.state_dir.resolve()
        if state.exists() and any(state.iterdir()):
            parser.error(f"--state-dir {state} is not empty")
        state.mkdir(parents=True, exist_ok=True)
    else:
        # short: unix socket paths (QEMU monitor, swtpm, bridges) end at 107 bytes
        state = Path(tempfile.mkdtemp(prefix="vtpm-demo-", dir="/tmp"))
    state.chmod(0o700)
    demo = Demo(state, say, args.guest)
    acts = [Act(i, title, expected) for i, (title, expected, _, _) in enumerate(ACTS)]
    say.out.write(f"vtpm-trust demo — state in {state}\n")
    steps = [(act, fn, needed) for act, (_, _, fn, needed) in zip(acts, ACTS, strict=True)]
    run = run_acts(demo, steps, say, state, args.keep)
    ok = not run.interrupted and all(
        a.status == "passed" or (a.number == 0 and a.status == "skipped") for a in acts
    )
    if args.json:
        doc = {
            "ok": ok,
            "guest": args.guest,
            "total_seconds": round(run.total, 1),
            "state_dir": str(state),
            "kept": bool(args.keep),
            "acts": [{**asdict(a), "seconds": round(a.seconds, 2)} for a in acts],
        }
        print(json.dumps(doc, indent=2, default=str))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
