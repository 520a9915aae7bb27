"""The guest channel and enrollment services against real TPMs: host swtpm + per-VM bridge + swtpm.

A VM here is its vTPM (swtpm) behind a real :class:`~host_agent.vtpm.bridge.Bridge`, booted by a
client that speaks QEMU's side of the control protocol (``QemuSide`` from the bridge tests), and
its attestation channel: a unix socket the test listens on, as QEMU does with a
``server=on`` chardev, so :class:`GuestChannelService` connects to it like to QEMU's. The test
then speaks the guest's side of the channel with the guest agent's own codec.
"""

from __future__ import annotations

import secrets
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from evidence import tpm2_policy
from evidence.bundle import parse_bundle
from evidence.errors import VtpmError
from evidence.tpm2 import TpmtPublic, public_key
from evidence.verify import VAIK_POLICY_REF, VerifyOptions, authkey_policy_digests, verify_bundle
from guest_agent import channel as guest_channel
from guest_agent.quote import build_bundle
from host_agent.service.attest import Attestor, GuestChannelService
from host_agent.service.enroll import (
    BridgeBootMarkers,
    EnrollmentService,
    enrollment_message,
    fingerprint,
)
from host_agent.store import StoreSettings, TrustedStore
from host_agent.tpm import AUTHKEY_PCRS
from host_agent.tpm.adapter import PytssHostTpm
from host_agent.vtpm.bridge import Bridge, BridgeConfig
from host_agent.vtpm.hooks_server import HooksServer
from tests.helpers.evidence_factory import NOW, Tenant, make_fleet
from tests.helpers.qemu import SwtpmUnix, start_swtpm_unix
from tests.helpers.swtpm import Swtpm, start_swtpm
from tests.sim.test_bridge import QemuSide

FLEET = make_fleet(0xA77E)
FLEET_POLICY_DER = FLEET.policy_key.public_key().public_bytes(
    serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
)
TENANT = Tenant.make("tenant-attest", 0x7A1)
OTHER = Tenant.make("tenant-intruder", 0x7A2)


class Owners:
    """An owner policy the test edits (the real ones are tested in test_enroll.py)."""

    def __init__(self) -> None:
        self.table: dict[uuid.UUID, frozenset[str]] = {}

    def owners(self, vm_uuid: uuid.UUID) -> frozenset[str]:
        return self.table.get(vm_uuid, frozenset())


class GuestEnd:
    """QEMU's listening end of a virtio-serial chardev, and the guest talking through it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen(1)
        self.listener.settimeout(10)
        self.conn: socket.socket | None = None
        self.decoder = guest_channel.FrameDecoder()

    def accept(self) -> None:
        self.conn, _ = self.listener.accept()
        self.conn.settimeout(10)

    def request(self, nonce: bytes, request_id: str = "r1") -> dict[str, Any]:
        if self.conn is None:
            self.accept()
        assert self.conn is not None
        import base64

        self.conn.sendall(
            guest_channel.encode_frame(
                {
                    "type": "quote",
                    "version": 1,
                    "id": request_id,
                    "nonce": base64.b64encode(nonce).decode(),
                }
            )
        )
        while (frame := self.decoder.next_frame()) is None:
            data = self.conn.recv(65536)
            assert data, "the daemon closed the channel"
            self.decoder.feed(data)
        return frame

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
        self.listener.close()


@dataclass
class Vm:
    uuid: uuid.UUID
    dir: Path
    swtpm: SwtpmUnix
    bridge: Bridge
    qemu: QemuSide
    guest: GuestEnd

    def reboot(self) -> None:
        """What QEMU does on a guest reset: STOP, SET_BUFFERSIZE, INIT; firmware Startup."""
        from host_agent.vtpm import ctrl_codec as cc
        from tests.sim.test_bridge import STARTUP_CLEAR

        assert self.qemu.request(cc.Stop()).result == 0
        assert self.qemu.request(cc.SetBufferSize(0xF80)).result == 0
        assert self.qemu.request(cc.Init(0)).result == 0
        self.qemu.tpm(STARTUP_CLEAR)

    def save_and_restore(self) -> None:
        """A save (GET_STATEBLOB x3, QEMU exits) and a restore into a fresh swtpm and QEMU."""
        from host_agent.vtpm import ctrl_codec as cc

        replies = [self.qemu.request(cc.GetStateBlob(t)) for t in cc.BlobType]
        blobs = [
            (t, r.data)
            for t, r in zip(cc.BlobType, replies, strict=True)
            if isinstance(r, cc.StateBlobReply) and r.result == 0 and r.data
        ]
        assert self.qemu.request(cc.Shutdown()).result == 0
        self.qemu.close()
        self.swtpm.stop()
        self.swtpm = start_swtpm_unix(self.dir / "restored", ctrl_path=self.dir / "swtpm.sock")
        q = QemuSide(self.dir / "ctrl.sock")
        q.set_data_fd()
        assert q.request(cc.Stop()).result == 0
        for t, blob in blobs:
            assert q.request(cc.SetStateBlob(t, blob)).result == 0
        assert q.request(cc.Init(cc.INIT_FLAG_DELETE_VOLATILE)).result == 0
        self.qemu = q

    def close(self) -> None:
        self.guest.close()
        self.qemu.close()
        self.bridge.close()
        self.swtpm.stop()


@dataclass
class Host:
    dir: Path
    hw: Swtpm | UnixSwtpm
    tpm: PytssHostTpm
    store: TrustedStore
    hooks: HooksServer
    owners: Owners
    enroll: EnrollmentService
    attestor: Attestor
    channels: GuestChannelService
    aik_certificates: tuple[bytes, ...]
    authkey_policies: frozenset[bytes]
    vms: list[Vm] = field(default_factory=list)

    def add_vm(self, owner: Tenant | None = TENANT) -> Vm:
        vm_uuid = uuid.uuid4()
        d = self.dir / f"vm{len(self.vms)}"
        d.mkdir()
        sw = start_swtpm_unix(d / "state", ctrl_path=d / "swtpm.sock")
        bridge = Bridge(
            BridgeConfig(
                vm_uuid=str(vm_uuid),
                vm_name=f"sim-{len(self.vms)}",
                listen=d / "ctrl.sock",
                swtpm_ctrl=sw.ctrl_path,
                daemon_socket=self.hooks.path,
                runtime_dir=d / "run",
                reconnect_interval=0.05,
            )
        ).start()
        self.hooks.wait_for_bridge(str(vm_uuid), 5)
        qemu = QemuSide(d / "ctrl.sock")
        qemu.boot()
        guest = GuestEnd(d / "attest.sock")
        vm = Vm(vm_uuid, d, sw, bridge, qemu, guest)
        self.vms.append(vm)
        if owner is not None:
            self.owners.table[vm_uuid] = frozenset({fingerprint(owner.cert_user)})
        self.channels.add_vm(vm_uuid, guest.path)
        guest.accept()
        return vm

    def enroll_vm(
        self, vm: Vm, tenant: Tenant = TENANT, nonce: bytes | None = None
    ) -> dict[str, Any]:
        nonce = nonce or secrets.token_bytes(32)
        challenge = self.enroll.challenge(vm.uuid)
        signature = tenant.key.sign(
            enrollment_message(nonce, vm.uuid, challenge), ec.ECDSA(hashes.SHA256())
        )
        return self.enroll.enroll(vm.uuid, tenant.cert_user, nonce, challenge, signature)

    def options(self, vm: Vm, nonce: bytes, tenant: Tenant = TENANT, **over: Any) -> VerifyOptions:
        args: dict[str, Any] = {
            "nonce": nonce,
            "now": NOW,
            "fleet_ca_certs": (FLEET.certificate,),
            "cert_user": tenant.cert_user,
            "vm_uuid": vm.uuid,
            "authkey_policies": self.authkey_policies,
            "fleet_policy_key_name": tpm2_policy.fleet_key_name(FLEET.policy_key.public_key()),
            "allow_missing_eventlog": True,
            "allow_missing_ima": True,
        }
        args.update(over)
        return VerifyOptions(**args)


def _aik_certificate(tpm: PytssHostTpm) -> bytes:
    aik_public = tpm.aik_public()
    key = public_key(TpmtPublic.unmarshal(aik_public))
    assert isinstance(key, ec.EllipticCurvePublicKey)
    cert = FLEET.issue_aik_certificate(
        "host-attest.sim",
        key,
        tpm.aik_name(),
        aik_public,
        now=NOW - timedelta(days=1),
        lifetime=timedelta(days=365),
        serial=secrets.randbits(63),
    )
    return cert.public_bytes(serialization.Encoding.DER)


class UnixSwtpm:
    """The host's swtpm on unix sockets, as the software root runs it (``swtpm:path=``): the
    swtpm TCTI connects for every command, which over TCP leaves a TIME_WAIT socket each."""

    def __init__(self, state_dir: Path) -> None:
        state_dir.mkdir(parents=True, exist_ok=True)
        self.socket = state_dir / "swtpm.sock"
        self.proc = subprocess.Popen(
            [
                "swtpm", "socket", "--tpm2", "--tpmstate", f"dir={state_dir}",
                "--server", f"type=unixio,path={self.socket}",
                "--ctrl", f"type=unixio,path={state_dir / 'swtpm.sock.ctrl'}",
                "--flags", "not-need-init,startup-clear",
                "--log", f"file={state_dir / 'swtpm.log'},level=1",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while not self.socket.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"swtpm did not create {self.socket}")
            time.sleep(0.02)

    @property
    def tcti(self) -> str:
        return f"swtpm:path={self.socket}"

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def make_host(
    root: Path,
    connection: Literal["persistent", "shared", "per-call"] = "persistent",
    transport: Literal["tcp", "unix"] = "tcp",
) -> Host:
    """A host; ``connection="shared"`` over ``transport="unix"`` is how the daemon uses the
    software root (discovery)."""
    hw: Swtpm | UnixSwtpm = (
        UnixSwtpm(root / "host-swtpm") if transport == "unix" else start_swtpm(root / "host-swtpm")
    )
    tpm = PytssHostTpm(hw.tcti, root / "host-keys", connection=connection)
    tpm.ensure_host_keys()
    values = tpm.pcr_values(AUTHKEY_PCRS)
    policies = authkey_policy_digests(
        tpm2_policy.pcr_composite_digest([values[i] for i in AUTHKEY_PCRS])
    )
    store = TrustedStore.create(
        StoreSettings(url=f"sqlite:///{root / 'store.sqlite'}", counter_index=0x0180_2001),
        sealer=tpm,
        counter=tpm,
        random_bytes=secrets.token_bytes,
    )
    hooks = HooksServer(root / "daemon.sock").start()
    approval = FLEET.approve_platform_policy(tpm.approved_sign_policy(), VAIK_POLICY_REF)
    aik = (_aik_certificate(tpm),)
    owners = Owners()
    enroll = EnrollmentService(
        tpm, store, owners, BridgeBootMarkers(hooks), FLEET_POLICY_DER, aik, now=lambda: NOW
    )
    attestor = Attestor(tpm, hooks, enroll, lambda: approval, aik)
    channels = GuestChannelService(attestor, reconnect_interval=0.05).start()
    return Host(root, hw, tpm, store, hooks, owners, enroll, attestor, channels, aik, policies)


def close_host(host: Host) -> None:
    host.channels.stop()
    host.attestor.close()
    for vm in host.vms:
        vm.close()
    host.hooks.close()
    host.store.close()
    host.tpm.close()
    host.hw.stop()


@pytest.fixture(scope="module")
def host() -> Iterator[Host]:
    root = Path(tempfile.mkdtemp(prefix="va-", dir="/tmp"))
    h = make_host(root)
    yield h
    close_host(h)
    shutil.rmtree(root, ignore_errors=True)


def attest(host: Host, vm: Vm, nonce: bytes | None = None) -> tuple[bytes, dict[str, Any]]:
    nonce = nonce or secrets.token_bytes(32)
    return nonce, vm.guest.request(nonce, request_id=secrets.token_hex(8))


def bundle_of(nonce: bytes, answer: dict[str, Any]) -> str:
    assert answer["ok"] is True, answer
    return build_bundle(answer["evidence"], nonce, None, None)


# --------------------------------------------------------------------------------------------


def test_enrolled_vm_attests_over_its_channel_and_the_bundle_verifies(host: Host) -> None:
    vm = host.add_vm()
    host.enroll_vm(vm)
    nonce, answer = attest(host, vm)
    raw = parse_bundle(bundle_of(nonce, answer))
    attested = verify_bundle(raw, host.options(vm, nonce))
    assert attested.vm_uuid == vm.uuid
    assert attested.vpcrs == host.hooks.read_pcrs(str(vm.uuid))


def test_a_vm_nobody_enrolled_is_refused_not_enrolled(host: Host) -> None:
    vm = host.add_vm()
    _, answer = attest(host, vm)
    assert answer["ok"] is False and answer["error"]["id"] == "attest.not_enrolled"


def test_after_a_guest_reboot_attestation_needs_a_new_enrollment(host: Host) -> None:
    vm = host.add_vm()
    first = host.enroll_vm(vm)
    assert attest(host, vm)[1]["ok"] is True
    vm.reboot()
    _, answer = attest(host, vm)
    assert answer["ok"] is False and answer["error"]["id"] == "attest.reauth_required"
    _, again = attest(host, vm)  # stays refused: the binding was deactivated in the store
    assert again["error"]["id"] in ("attest.reauth_required", "attest.not_enrolled")
    second = host.enroll_vm(vm)
    assert second["vaik"]["public"] == first["vaik"]["public"]  # same tenant keeps its vAIK
    nonce, answer = attest(host, vm)
    verify_bundle(parse_bundle(bundle_of(nonce, answer)), host.options(vm, nonce))


def test_a_new_tenant_enrolled_between_two_attestations_gets_its_own_vaik_signing(
    host: Host,
) -> None:
    """The attestor starts with the binding it used last; the confirmation after the vPCR
    read sees the new enrollment, and the answer is made with the new binding only."""
    vm = host.add_vm(owner=TENANT)
    first = host.enroll_vm(vm)
    assert attest(host, vm)[1]["ok"] is True
    host.owners.table[vm.uuid] = frozenset({fingerprint(OTHER.cert_user)})
    second = host.enroll_vm(vm, OTHER)
    assert second["vaik"]["public"] != first["vaik"]["public"]
    nonce, answer = attest(host, vm)
    assert answer["evidence"]["vaik"]["public"] == second["vaik"]["public"]
    raw = parse_bundle(bundle_of(nonce, answer))
    verify_bundle(raw, host.options(vm, nonce, OTHER))
    with pytest.raises(VtpmError):  # nothing in it is still the first tenant's
        verify_bundle(raw, host.options(vm, nonce, TENANT))


def test_a_malformed_frame_drops_the_connection_and_the_daemon_reconnects(host: Host) -> None:
    vm = host.add_vm()
    host.enroll_vm(vm)
    assert vm.guest.conn is not None
    vm.guest.conn.sendall(b"\xff\xff\xff\xff" + b"x" * 16)
    assert vm.guest.conn.recv(10) == b""  # dropped
    vm.guest.conn.close()
    vm.guest.conn = None
    vm.guest.decoder = guest_channel.FrameDecoder()
    _nonce, answer = attest(host, vm)  # accept()s the reconnection
    assert answer["ok"] is True


def test_a_bad_nonce_gets_a_refusal_with_the_request_id(host: Host) -> None:
    vm = host.add_vm()
    assert vm.guest.conn is not None
    vm.guest.conn.sendall(
        guest_channel.encode_frame({"type": "quote", "version": 1, "id": "x", "nonce": "AAAA"})
    )
    while (frame := vm.guest.decoder.next_frame()) is None:
        vm.guest.decoder.feed(vm.guest.conn.recv(65536))
    assert frame["id"] == "x" and frame["error"]["id"] == "attest.bad_request"


def test_host_side_attestation_takes_milliseconds(host: Host) -> None:
    vm = host.add_vm()
    host.enroll_vm(vm)
    times = []
    for _ in range(20):
        t0 = time.perf_counter()
        assert attest(host, vm)[1]["ok"] is True
        times.append(time.perf_counter() - t0)
    times.sort()
    assert times[len(times) // 2] < 0.1  # bench/attest.py measures properly; this only guards


def test_a_vaik_moving_in_a_migration_does_not_sign(host: Host) -> None:
    vm = host.add_vm()
    host.enroll_vm(vm)
    record = host.store.get("vaik", str(vm.uuid)).json()
    with host.store.transaction() as tx:  # what migration/source.py writes at step MOVING
        tx.put("vaik", str(vm.uuid), {**record, "state": "moving", "migration_id": "m-1"})
    _, answer = attest(host, vm)
    assert answer["ok"] is False and answer["error"]["id"] == "attest.vaik_migrating"
    with host.store.transaction() as tx:  # aborted: the source takes the vAIK back
        tx.put("vaik", str(vm.uuid), record)
    assert attest(host, vm)[1]["ok"] is True


def test_a_reboot_while_the_vpcrs_are_read_is_caught_before_signing(host: Host) -> None:
    vm = host.add_vm()
    host.enroll_vm(vm)
    real = host.attestor.pcrs

    class RebootFirst:
        """A fault-injecting PcrReader: the guest reboots just before its vPCRs are read."""

        def read_pcrs(self, vm_uuid: str, bank: str = "sha256", timeout: float = 30.0) -> Any:
            vm.reboot()
            return real.read_pcrs(vm_uuid, bank, timeout)

    host.attestor.pcrs = RebootFirst()
    try:
        _, answer = attest(host, vm)
    finally:
        host.attestor.pcrs = real
    assert answer["ok"] is False and answer["error"]["id"] == "attest.reauth_required"


def test_a_flooding_guest_gets_busy_refusals_not_a_queue(host: Host) -> None:
    import base64

    from host_agent.service.attest import MAX_PENDING

    vm = host.add_vm()
    host.enroll_vm(vm)
    real = host.attestor.pcrs

    class Slow:
        def read_pcrs(self, vm_uuid: str, bank: str = "sha256", timeout: float = 30.0) -> Any:
            time.sleep(0.3)
            return real.read_pcrs(vm_uuid, bank, timeout)

    host.attestor.pcrs = Slow()
    answers: list[dict[str, Any]] = []
    try:
        assert vm.guest.conn is not None
        n = MAX_PENDING + 6
        for i in range(n):
            nonce = base64.b64encode(secrets.token_bytes(32)).decode()
            vm.guest.conn.sendall(
                guest_channel.encode_frame(
                    {"type": "quote", "version": 1, "id": f"f{i}", "nonce": nonce}
                )
            )
        vm.guest.conn.settimeout(1.5)  # the daemon answers what it took on, drops the flood
        while True:
            frame = vm.guest.decoder.next_frame()
            if frame is not None:
                answers.append(frame)
                continue
            try:
                data = vm.guest.conn.recv(65536)
            except TimeoutError:
                break
            vm.guest.decoder.feed(data)
    finally:
        host.attestor.pcrs = real
        assert vm.guest.conn is not None
        vm.guest.conn.settimeout(10)
    ok = [a for a in answers if a["ok"]]
    busy = [a for a in answers if not a["ok"] and a["error"]["id"] == "attest.busy"]
    assert {a["id"] for a in ok} == {f"f{i}" for i in range(MAX_PENDING)}  # the first ones
    assert 1 <= len(busy) <= n - MAX_PENDING and len(answers) == len(ok) + len(busy)


def test_a_guest_that_never_reads_stalls_no_other_vm(host: Host) -> None:
    import base64

    hog, other = host.add_vm(), host.add_vm()
    host.enroll_vm(hog)
    host.enroll_vm(other)
    assert hog.guest.conn is not None
    hog.guest.conn.setblocking(False)
    sent = 0
    for i in range(400):  # requests it never reads the answers of (busy refusals included)
        nonce = base64.b64encode(secrets.token_bytes(32)).decode()
        frame = guest_channel.encode_frame(
            {"type": "quote", "version": 1, "id": f"h{i}", "nonce": nonce}
        )
        try:
            hog.guest.conn.sendall(frame)
            sent += 1
        except BlockingIOError:
            break
    assert sent > 50
    for _ in range(3):
        t0 = time.perf_counter()
        assert attest(host, other)[1]["ok"] is True
        assert time.perf_counter() - t0 < 1.5
