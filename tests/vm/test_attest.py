"""Enrollment and attestation end to end: real QEMU (TCG), swtpm, bridge, SSH into the guest.

The host side is the sim tier's rig (tests/sim/test_attest_service.py: host swtpm, trusted store,
hooks server, the guest channel service and the enrollment service) plus the HTTPS enrollment
server; each VM is a swtpm behind a bridge, booted from the vm_images test guest with the
attestation port ``org.vtpm-trust.attest.0``. The tenant side is ``vtpm-verify`` itself
(``verifier.cli.main``): ``enroll`` over HTTPS, ``attest`` over paramiko running the guest agent
from the repository shared at /mnt/repo (``PYTHONPATH=/mnt/repo python3 -m guest_agent.cli``),
on the guest's trimmed Python. IMA is on (tcb policy plus BPRM_CHECK), so the bundle carries the
real SeaBIOS event log and a real IMA list, verified strictly.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import secrets
import shutil
import tarfile
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from evidence.bundle import encode_bundle, parse_bundle
from evidence.tpm2 import TpmtSignature
from guest_agent.channel import DEFAULT_PORT_NAME
from host_agent.service.enroll import EnrollmentServer, fingerprint
from host_agent.vtpm.bridge import Bridge, BridgeConfig
from tests.helpers.qemu import Guest, GuestFactory, SwtpmUnix, start_swtpm_unix
from tests.sim.test_attest_service import FLEET, OTHER, TENANT, Host, close_host, make_host
from tests.sim.test_enroll import _tls_identity
from verifier import cli
from verifier.commands.tenant import assess_bundle, load_enrollment

REPO = Path(__file__).resolve().parents[2]
IMA = 'ima_policy=tcb ima_hash=sha256 vtpm.ima_policy="measure func=BPRM_CHECK"'
FROM_REPO = "PYTHONPATH=/mnt/repo python3 -m guest_agent.cli"
FROM_TMP = "PYTHONPATH=/tmp/vtpm python3 -m guest_agent.cli"


@dataclass
class Site:
    root: Path
    host: Host
    server: EnrollmentServer


@pytest.fixture(scope="module")
def site() -> Iterator[Site]:
    root = Path(tempfile.mkdtemp(prefix="vva-", dir="/tmp"))
    host = make_host(root)
    server = EnrollmentServer(host.enroll, ("127.0.0.1", 0), *_tls_identity(root)).start()
    (root / "fleet-ca.pem").write_bytes(FLEET.certificate_pem)
    for t in (TENANT, OTHER):
        (root / f"{t.name}.der").write_bytes(t.cert_user)
        (root / f"{t.name}.key").write_bytes(
            t.key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    yield Site(root, host, server)
    server.stop()
    close_host(host)
    shutil.rmtree(root, ignore_errors=True)


@dataclass
class Vm:
    uuid: uuid.UUID
    dir: Path
    swtpm: SwtpmUnix
    bridge: Bridge
    guest: Guest


def start_vm(site: Site, factory: GuestFactory, name: str, *, repo: bool = True, **kw: Any) -> Vm:
    vm_uuid = uuid.uuid4()
    d = site.root / name
    d.mkdir()
    sw = start_swtpm_unix(d / "state", ctrl_path=d / "swtpm.sock")
    bridge = Bridge(
        BridgeConfig(
            vm_uuid=str(vm_uuid),
            vm_name=name,
            listen=d / "ctrl.sock",
            swtpm_ctrl=d / "swtpm.sock",
            daemon_socket=site.host.hooks.path,
            runtime_dir=d / "run",
            reconnect_interval=0.05,
        )
    ).start()
    site.host.hooks.wait_for_bridge(str(vm_uuid), 5)
    guest = factory(
        name,
        tpm_socket=d / "ctrl.sock",
        vports=(DEFAULT_PORT_NAME,),
        repo=repo,
        append=IMA,
        **kw,
    )
    site.host.channels.add_vm(vm_uuid, guest.vport_path(DEFAULT_PORT_NAME))
    site.host.owners.table[vm_uuid] = frozenset({fingerprint(TENANT.cert_user)})
    return Vm(vm_uuid, d, sw, bridge, guest)


def stop_vm(vm: Vm) -> None:
    vm.guest.shutdown()
    vm.bridge.close()
    vm.swtpm.stop()


def vtpm_verify(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    with redirect_stdout(out):
        rc = cli.main(list(argv))
    return rc, out.getvalue()


def enroll(site: Site, vm: Vm, state: Path, tenant: str = "tenant-attest") -> None:
    rc, out = vtpm_verify(
        "enroll", "--host", site.server.url, "--vm", str(vm.uuid),
        "--cert", str(site.root / f"{tenant}.der"), "--key", str(site.root / f"{tenant}.key"),
        "--fleet-ca", str(site.root / "fleet-ca.pem"), "--state-dir", str(state), "--json",
    )  # fmt: skip
    assert rc == 0, out


def attest(
    vm: Vm, state: Path, *extra: str, command: str = FROM_REPO
) -> tuple[int, dict[str, Any]]:
    g = vm.guest
    assert g.ssh_port is not None and g.config.ssh_key is not None
    rc, out = vtpm_verify(
        "attest", "--ssh", f"root@127.0.0.1:{g.ssh_port}", "--identity", str(g.config.ssh_key),
        "--host-key", str(g.config.ssh_host_key), "--state-dir", str(state), "--vm", str(vm.uuid),
        "--guest-command", command, "--json", *extra,
    )  # fmt: skip
    return rc, json.loads(out) if out.strip() else {}


def ids(report: dict[str, Any]) -> list[str]:
    return [f["id"] for f in report.get("findings", [])]


def errors(report: dict[str, Any]) -> list[str]:
    return [f["id"] for f in report.get("findings", []) if f["severity"] == "error"]


# --------------------------------------------------------------------------------------------


def test_enroll_attest_reboot_reenroll_and_the_rejections(
    site: Site, boot_guest: GuestFactory, tmp_path: Path
) -> None:
    vm = start_vm(site, boot_guest, "att", extra_args=("-action", "reboot=reset"))
    mine, theirs = tmp_path / "tenant-a", tmp_path / "tenant-b"
    try:
        # the guest agent on the guest's trimmed Python, help included
        assert b"exit status" in vm.guest.check(f"{FROM_REPO} quote --help")

        # enroll over HTTPS, attest over SSH: trusted, strictly (event log and IMA list)
        enroll(site, vm, mine)
        rc, report = attest(vm, mine, "--save-bundle", str(tmp_path / "b1.json"))
        assert rc == 0 and report["trusted"] is True, report
        assert report["vm"] == str(vm.uuid) and errors(report) == []

        # reference values learnt from that bundle accept the next attestation
        rc, out = vtpm_verify(
            "policy", "learn", str(tmp_path / "b1.json"), "--state-dir", str(mine),
            "-o", str(tmp_path / "refs.json"),
        )  # fmt: skip
        assert rc == 0, out
        rc, report = attest(vm, mine, "--policy", str(tmp_path / "refs.json"))
        assert rc == 0 and report["trusted"] is True, report

        # a program nobody listed runs: IMA measures it, the allowlist does not know it
        vm.guest.check("cp /bin/busybox /tmp/true && /tmp/true")  # busybox runs as argv[0]
        rc, report = attest(vm, mine, "--policy", str(tmp_path / "refs.json"))
        assert rc == 1 and "ima.entry.unknown_file" in errors(report), report
        assert any("/tmp/true" in f["message"] for f in report["findings"]), report

        # one edited IMA entry (the file digest of the first entry after boot_aggregate)
        enrollment = load_enrollment(mine, vm.uuid)
        raw = parse_bundle((tmp_path / "b1.json").read_bytes())
        assert raw.ima_list is not None and raw.ima_list_bytes is not None
        entry = raw.ima_list.entries[1]
        digest = entry.digest
        data = bytearray(raw.ima_list_bytes)
        at = data.index(digest, entry.location)
        data[at] ^= 0x01
        edited = dataclasses.replace(raw, ima_list_bytes=bytes(data))
        verdict, _ = assess_bundle(encode_bundle(edited), raw.nonce, enrollment)
        assert verdict.ids == ("verify.replay.ima",), verdict.ids

        # replayed: the old bundle against a fresh nonce
        old = (tmp_path / "b1.json").read_bytes()
        verdict, _ = assess_bundle(old, secrets.token_bytes(32), enrollment)
        assert verdict.ids == ("verify.nonce",)

        # forged attestation signature (a key that is not the vAIK) over the same message
        raw = parse_bundle(old)
        r, s = decode_dss_signature(
            ec.generate_private_key(ec.SECP256R1()).sign(
                raw.message_bytes, ec.ECDSA(hashes.SHA256())
            )
        )
        forged = TpmtSignature.unmarshal(
            bytes.fromhex("0018000b0020") + r.to_bytes(32, "big") + bytes.fromhex("0020")
            + s.to_bytes(32, "big")
        )  # fmt: skip
        text = encode_bundle(dataclasses.replace(raw, message_signature=forged))
        verdict, _ = assess_bundle(text, raw.nonce, enrollment)
        assert verdict.ids == ("verify.signature.attestation",)

        # a guest reboot: attestation fails until the tenant authenticates again
        console = len(vm.guest.console_text())
        vm.guest.run("(sleep 1; reboot -f) >/dev/null 2>&1 &")
        vm.guest.wait_for_console("VTPM-GUEST-READY", start=console, timeout=120)
        vm.guest._ssh = None
        rc, report = attest(vm, mine)
        assert rc == 1 and ids(report) == ["attest.reauth_required"], report
        enroll(site, vm, mine)
        rc, report = attest(vm, mine)
        assert rc == 0 and report["trusted"] is True, report

        # another tenant takes the VM over: our verifier sees their cert_user
        site.host.owners.table[vm.uuid] |= {fingerprint(OTHER.cert_user)}
        enroll(site, vm, theirs, "tenant-intruder")
        rc, report = attest(vm, mine)
        assert rc == 1 and errors(report) == ["verify.cert_user"], report
        rc, report = attest(vm, theirs)
        assert rc == 0, report
    finally:
        stop_vm(vm)


def test_a_clone_gets_no_vaik(site: Site, boot_guest: GuestFactory, tmp_path: Path) -> None:
    vm = start_vm(site, boot_guest, "orig")
    try:
        enroll(site, vm, tmp_path)
        clone = start_vm(site, boot_guest, "clone")  # same image and owner, another UUID
        try:
            # the tenant is pointed at the clone: its host has no binding for it
            clone_as_vm = dataclasses.replace(clone, uuid=vm.uuid)
            rc, report = attest(clone_as_vm, tmp_path)
            assert rc == 1 and ids(report) == ["attest.not_enrolled"], report
        finally:
            stop_vm(clone)
        rc, report = attest(vm, tmp_path)
        assert rc == 0, report
    finally:
        stop_vm(vm)


def _install_guest_agent(guest: Guest) -> None:
    """Copy guest_agent/ into the guest's /tmp over SSH (no 9p share: it blocks migration)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for path in sorted((REPO / "guest_agent").glob("*.py")):
            tar.add(path, arcname=f"guest_agent/{path.name}")
    guest.check("mkdir -p /tmp/vtpm && tar -x -C /tmp/vtpm", stdin=buf.getvalue())


def test_save_and_restore_stays_trusted_without_reenrollment(
    site: Site, boot_guest: GuestFactory, tmp_path: Path
) -> None:
    vm = start_vm(site, boot_guest, "sr", repo=False)
    state = tmp_path / "tenant"
    try:
        _install_guest_agent(vm.guest)
        enroll(site, vm, state)
        rc, report = attest(vm, state, command=FROM_TMP)
        assert rc == 0, report
        before = site.host.hooks.read_pcrs(str(vm.uuid))

        image = tmp_path / "vm.save"
        vm.guest.qmp.stop()
        vm.guest.qmp.migrate_to_file(image)
        vm.guest.shutdown()  # QEMU quits; CMD_SHUTDOWN through the bridge ends the swtpm
        vm.swtpm.stop()
        vm.swtpm = start_swtpm_unix(vm.dir / "restored", ctrl_path=vm.dir / "swtpm.sock")
        restored = boot_guest(
            "sr-restored",
            tpm_socket=vm.dir / "ctrl.sock",
            vports=(DEFAULT_PORT_NAME,),
            append=IMA,
            incoming=f"exec:cat {image}",
            wait=False,
        )
        deadline = time.monotonic() + 90
        while restored.qmp.query_status() != "paused":
            assert time.monotonic() < deadline, restored.diagnostics()
            time.sleep(0.1)
        restored.qmp.cont()
        site.host.channels.add_vm(vm.uuid, restored.vport_path(DEFAULT_PORT_NAME))
        vm.guest = restored
        assert site.host.hooks.read_pcrs(str(vm.uuid)) == before

        rc, report = attest(vm, state, command=FROM_TMP)
        assert rc == 0 and report["trusted"] is True, report
    finally:
        stop_vm(vm)


def test_guest_waits_for_the_host_and_its_bundle_validates_against_the_schema(
    site: Site, boot_guest: GuestFactory
) -> None:
    import jsonschema

    vm = start_vm(site, boot_guest, "schema")
    try:
        site.host.enroll_vm(vm)  # type: ignore[arg-type]
        # the daemon is not connected: the guest's port reads EOF; the agent keeps it open
        site.host.channels.remove_vm(vm.uuid)
        nonce = secrets.token_bytes(32)
        vm.guest.check(
            f"({FROM_REPO} quote --nonce {nonce.hex()} --timeout 60 >/tmp/b.json 2>/tmp/e;"
            " echo $? >/tmp/rc) >/dev/null 2>&1 &"
        )
        time.sleep(2)
        assert vm.guest.run("cat /tmp/rc").status != 0  # still waiting
        site.host.channels.add_vm(vm.uuid, vm.guest.vport_path(DEFAULT_PORT_NAME))
        deadline = time.monotonic() + 60
        while (rc := vm.guest.run("cat /tmp/rc")).status != 0:
            assert time.monotonic() < deadline, vm.guest.run("cat /tmp/e").stdout
            time.sleep(0.5)
        assert rc.stdout.strip() == b"0", vm.guest.run("cat /tmp/e").stdout
        out = vm.guest.check("cat /tmp/b.json")
        obj = json.loads(out)
        schema = json.loads((REPO / "docs" / "evidence-bundle.schema.json").read_text())
        jsonschema.validate(obj, schema)
        raw = parse_bundle(out)
        assert raw.nonce == nonce and raw.event_log is not None and raw.ima_list is not None
        assert base64.b64decode(obj["vm_uuid"]) == vm.uuid.bytes
    finally:
        stop_vm(vm)
