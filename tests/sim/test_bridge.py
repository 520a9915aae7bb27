"""The bridge against a real swtpm, driven by a client that speaks QEMU's side of the protocol.

``QemuSide`` does what QEMU's tpm-emulator backend does (protocols.md §2): SET_DATAFD with one end
of a socketpair, STOP/SET_BUFFERSIZE/INIT, then TPM commands on the data channel, one at a time;
GET_STATEBLOB ×3 for a save and STOP/SET_STATEBLOB/INIT for a restore. Every response it gets is
checked against what swtpm must answer.
"""

from __future__ import annotations

import hashlib
import shutil
import socket
import struct
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from host_agent.errors import StateError
from host_agent.vtpm import ctrl_codec as cc
from host_agent.vtpm.bridge import Bridge, BridgeConfig, BridgeRunState
from host_agent.vtpm.bridge_errors import InjectionRefused
from host_agent.vtpm.bridge_link import LinkClient, find_bridge
from host_agent.vtpm.daemon_link import HookCall
from host_agent.vtpm.hooks_server import Allow, HooksServer, Replace, Veto
from tests.helpers.qemu import SwtpmUnix, start_swtpm_unix

PCR = 23  # resettable, nobody else extends it here


def _u16(v: int) -> bytes:
    return struct.pack(">H", v)


def tpm_cmd(cc_code: int, body: bytes, tag: int = 0x8001) -> bytes:
    return struct.pack(">HII", tag, 10 + len(body), cc_code) + body


STARTUP_CLEAR = tpm_cmd(0x144, _u16(0))


def get_random(n: int) -> bytes:
    return tpm_cmd(0x17B, _u16(n))


def pcr_extend(pcr: int, digest: bytes) -> bytes:
    auth = struct.pack(">IHBH", 0x40000009, 0, 0, 0)
    body = struct.pack(">I", pcr) + struct.pack(">I", len(auth)) + auth
    body += struct.pack(">IH", 1, 0x000B) + digest
    return tpm_cmd(0x182, body, tag=0x8002)


def pcr_read(pcr: int) -> bytes:
    bitmap = bytearray(3)
    bitmap[pcr // 8] |= 1 << (pcr % 8)
    return tpm_cmd(0x17E, struct.pack(">IHB", 1, 0x000B, 3) + bytes(bitmap))


def rc_of(resp: bytes) -> int:
    return int(struct.unpack_from(">I", resp, 6)[0])


class QemuSide:
    """The QEMU end of the control and data channels (blocking, like QEMU's own code)."""

    def __init__(self, ctrl_path: Path) -> None:
        self.ctrl = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.ctrl.settimeout(20)
        self.ctrl.connect(str(ctrl_path))
        self.data: socket.socket | None = None
        self.running = False

    def request(self, req: cc.Request) -> cc.Reply:
        if isinstance(req, cc.SetStateBlob):
            self.ctrl.sendall(req.header())  # QEMU: header, then the body, then read
            self.ctrl.sendall(req.data)
        else:
            self.ctrl.sendall(req.encode())
        dec = cc.ReplyDecoder()
        dec.expect(req, self.running)
        while (reply := dec.next_reply()) is None:
            chunk = self.ctrl.recv(1 << 20)
            assert chunk, "bridge closed the control socket"
            dec.feed(chunk)
        if isinstance(req, cc.Init):
            self.running = reply.result == 0
        elif isinstance(req, cc.Stop) and reply.result == 0:
            self.running = False
        return reply

    def set_data_fd(self) -> None:
        ours, theirs = socket.socketpair()
        socket.send_fds(self.ctrl, [cc.SetDataFd().encode()], [theirs.fileno()])
        theirs.close()
        assert self.ctrl.recv(4) == b"\0\0\0\0"
        ours.settimeout(20)
        self.data = ours

    def boot(self) -> None:
        self.set_data_fd()
        assert isinstance(self.request(cc.GetCapability()), cc.CapabilityReply)
        for size in (0, 0xF80):
            assert self.request(cc.Stop()).result == 0
            assert self.request(cc.SetBufferSize(size)).result == 0
        assert self.request(cc.Init(0)) == cc.ResultReply(0)
        assert self.request(cc.GetTpmEstablished()).result == 0
        assert self.request(cc.SetLocality(0, b"\0\0\0")) == cc.ResultReply(0)
        assert rc_of(self.tpm(STARTUP_CLEAR)) == 0

    def tpm(self, command: bytes) -> bytes:
        assert self.data is not None
        self.data.sendall(command)
        head = b""
        while len(head) < 10:
            chunk = self.data.recv(10 - len(head))
            assert chunk, "data channel closed"
            head += chunk
        size = struct.unpack_from(">I", head, 2)[0]
        body = b""
        while len(head) + len(body) < size:
            body += self.data.recv(size - 10 - len(body))
        return head + body

    def close(self) -> None:
        if self.data is not None:
            self.data.close()
        self.ctrl.close()


@dataclass
class Rig:
    dir: Path
    swtpm: SwtpmUnix
    server: HooksServer
    bridge: Bridge
    vm_uuid: str

    @property
    def ctrl(self) -> Path:
        return self.bridge.config.listen

    def qemu(self) -> QemuSide:
        return QemuSide(self.ctrl)


@pytest.fixture
def sockdir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="vb-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def make_rig(
    sockdir: Path, *, hook_timeout: float = 5.0, server: bool = True, response_spin: float = 0.0
) -> Rig:
    vm_uuid = str(uuid.uuid4())
    tpm = start_swtpm_unix(sockdir / "state", ctrl_path=sockdir / "swtpm.sock")
    srv = HooksServer(sockdir / "daemon.sock")
    if server:
        srv.start()
    bridge = Bridge(
        BridgeConfig(
            vm_uuid=vm_uuid,
            vm_name="sim-vm",
            listen=sockdir / "ctrl.sock",
            swtpm_ctrl=tpm.ctrl_path,
            daemon_socket=sockdir / "daemon.sock",
            runtime_dir=sockdir / "run",
            hook_timeout=hook_timeout,
            reconnect_interval=0.05,
            response_spin=response_spin,
        )
    ).start()
    if server:
        srv.wait_for_bridge(vm_uuid, 5)
    return Rig(sockdir, tpm, srv, bridge, vm_uuid)


@pytest.fixture
def rig(sockdir: Path) -> Iterator[Rig]:
    r = make_rig(sockdir)
    yield r
    r.bridge.close()
    r.server.close()
    r.swtpm.stop()


def test_bridge_relays_the_qemu_startup_sequence(rig: Rig) -> None:
    q = rig.qemu()
    q.boot()
    assert rig.bridge.run_state is BridgeRunState.ATTACHED
    resp = q.tpm(get_random(16))
    assert rc_of(resp) == 0 and len(resp) == 12 + 16
    status = rig.bridge.status()
    assert status["tpm"] == "running" and status["locality"] == 0 and status["data_channel"]
    assert status["stats"]["ctrl_commands"]["CMD_SET_DATAFD"] == 1
    q.close()
    deadline = time.monotonic() + 5
    while rig.bridge.run_state is not BridgeRunState.LISTENING and time.monotonic() < deadline:
        time.sleep(0.01)
    assert rig.bridge.run_state is BridgeRunState.LISTENING


def test_1000_pcr_reads_injected_while_a_client_keeps_the_tpm_busy(rig: Rig) -> None:
    q = rig.qemu()
    q.boot()
    history = [bytes(32)]  # PCR 23 values the client has produced, in order
    errors: list[str] = []
    stop = threading.Event()
    counts = {"commands": 0}

    def guest() -> None:
        i = 0
        value = bytes(32)
        while not stop.is_set():
            i += 1
            n = 1 + i % 48
            r = q.tpm(get_random(n))
            if rc_of(r) != 0 or len(r) != 12 + n or struct.unpack_from(">H", r, 10)[0] != n:
                errors.append(f"GetRandom({n}) → {r.hex()}")
            if i % 3 == 0:
                digest = hashlib.sha256(b"%d" % i).digest()
                r = q.tpm(pcr_extend(PCR, digest))
                if rc_of(r) != 0:
                    errors.append(f"PCR_Extend → {r.hex()}")
                value = hashlib.sha256(value + digest).digest()
                history.append(value)
                r = q.tpm(pcr_read(PCR))
                if rc_of(r) != 0 or r[-32:] != value:
                    errors.append(f"PCR_Read({PCR}) → {r.hex()}, expected …{value.hex()}")
            counts["commands"] += 1 if i % 3 else 3
            if len(errors) > 5:
                return

    t = threading.Thread(target=guest)
    t.start()
    try:
        t0 = time.monotonic()
        seen: list[bytes] = []
        for _ in range(1000):
            pcrs = rig.bridge.read_pcrs()
            assert sorted(pcrs) == list(range(24))
            # 0-16 zero, 17-22 all-ones (DRTM PCRs before any DRTM event), 23 the guest's
            assert all(pcrs[i] == bytes(32) for i in range(17))
            assert all(pcrs[i] == b"\xff" * 32 for i in range(17, 23))
            seen.append(pcrs[PCR])
        elapsed = time.monotonic() - t0
    finally:
        stop.set()
        t.join(30)
    assert not errors, errors
    # every injected value of PCR 23 is one the guest had, and they never go backwards
    positions = [history.index(v) for v in seen]
    assert positions == sorted(positions)
    stats = rig.bridge.stats
    assert stats.injected_commands >= 3000 and stats.injections_failed == 0
    assert counts["commands"] > 1000, "the client really kept the TPM busy"
    print(
        f"1000 read_pcrs (3 PCR_Read each) in {elapsed:.2f} s beside {counts['commands']} "
        f"guest commands; max injection wait {stats.max_injection_wait * 1e3:.2f} ms, "
        f"max guest hold {stats.max_guest_hold * 1e3:.2f} ms ({stats.held_guest_commands} held)"
    )
    q.close()


def _save(q: QemuSide) -> list[cc.Reply]:
    return [q.request(cc.GetStateBlob(t)) for t in cc.BlobType]


def test_get_stateblob_hook_sees_each_blob_and_allows(rig: Rig) -> None:
    q = rig.qemu()
    q.boot()
    replies = _save(q)
    assert [r.result for r in replies] == [0, 0, 0x800]
    calls = rig.server.hook_calls
    assert [(c.event, c.blob_type) for c in calls] == [("get_stateblob", t) for t in (1, 2, 3)]
    for call, reply in zip(calls, replies, strict=True):
        assert isinstance(reply, cc.StateBlobReply)
        assert call.vm_uuid == rig.vm_uuid and call.blob == reply.data
        assert call.sha256 == hashlib.sha256(reply.data).hexdigest()
        assert call.length == len(reply.data)


def test_vetoed_get_stateblob_answers_tpm_fail_in_the_16_byte_shape(rig: Rig) -> None:
    rig.server.on_get_stateblob = lambda call: Veto("memory hash not sealed")
    q = rig.qemu()
    q.boot()
    reply = q.request(cc.GetStateBlob(cc.BlobType.PERMANENT))
    assert reply == cc.StateBlobReply(cc.PtmResult.TPM_FAIL, 0, 0, 0)
    assert rig.bridge.stats.vetoes == ["get_stateblob PERMANENT vetoed: memory hash not sealed"]
    # the VM goes on: the TPM still answers
    assert rc_of(q.tpm(get_random(8))) == 0


def test_set_stateblob_hook_gets_the_blob_and_can_veto_or_replace(sockdir: Path) -> None:
    r = make_rig(sockdir)
    try:
        q = r.qemu()
        q.boot()
        q.tpm(pcr_extend(PCR, hashlib.sha256(b"before save").digest()))
        saved = [x for x in _save(q) if isinstance(x, cc.StateBlobReply) and x.result == 0]
        before = r.bridge.read_pcrs()
        assert q.request(cc.Shutdown()).result == 0
        q.close()
        r.swtpm.stop()
        r.swtpm = start_swtpm_unix(sockdir / "state2", ctrl_path=sockdir / "swtpm.sock")

        # restore 1: vetoed at the first blob, nothing reaches swtpm
        r.server.on_set_stateblob = lambda call: Veto("no sealed record")
        q = r.qemu()
        q.set_data_fd()
        assert q.request(cc.Stop()).result == 0
        reply = q.request(cc.SetStateBlob(1, saved[0].data))
        assert reply == cc.ResultReply(cc.PtmResult.TPM_FAIL)
        q.close()

        # restore 2: the daemon substitutes the (here: same) sealed blob; PCRs come back
        seen: list[HookCall] = []

        def replace(call: HookCall) -> Replace | Allow:
            seen.append(call)
            return Replace(call.blob) if call.blob_type == 1 else Allow()

        r.server.on_set_stateblob = replace
        q = r.qemu()
        q.set_data_fd()
        assert q.request(cc.Stop()).result == 0
        for t, blob in zip((1, 2), saved, strict=True):
            assert q.request(cc.SetStateBlob(t, blob.data)).result == 0
        assert q.request(cc.Init(cc.INIT_FLAG_DELETE_VOLATILE)).result == 0
        assert [c.blob for c in seen] == [b.data for b in saved]
        assert all(c.sha256 == hashlib.sha256(c.blob).hexdigest() for c in seen)
        assert r.bridge.read_pcrs() == before
        q.close()
    finally:
        r.bridge.close()
        r.server.close()
        r.swtpm.stop()


def test_hook_waits_for_a_restarted_daemon(sockdir: Path) -> None:
    r = make_rig(sockdir, hook_timeout=5.0)
    try:
        q = r.qemu()
        q.boot()
        r.server.close()
        time.sleep(0.1)
        restarted: list[HooksServer] = []

        def later() -> None:
            time.sleep(0.5)
            restarted.append(HooksServer(sockdir / "daemon.sock").start())

        t = threading.Thread(target=later)
        t.start()
        t0 = time.monotonic()
        reply = q.request(cc.GetStateBlob(1))
        waited = time.monotonic() - t0
        t.join()
        assert reply.result == 0 and 0.4 < waited < 3
        assert restarted[0].hook_calls[0].blob_type == 1
        # the restarted server found the bridge and can read its PCRs
        assert restarted[0].read_pcrs(r.vm_uuid) == r.bridge.read_pcrs()
        restarted[0].close()
        q.close()
    finally:
        r.bridge.close()
        r.swtpm.stop()


def test_hook_vetoes_with_daemon_unavailable_after_the_bound(sockdir: Path) -> None:
    r = make_rig(sockdir, hook_timeout=0.5, server=False)
    try:
        q = r.qemu()
        q.boot()
        t0 = time.monotonic()
        reply = q.request(cc.GetStateBlob(1))
        assert 0.4 < time.monotonic() - t0 < 2
        assert reply == cc.StateBlobReply(cc.PtmResult.TPM_FAIL, 0, 0, 0)
        assert r.bridge.stats.vetoes == ["get_stateblob PERMANENT vetoed: daemon unavailable"]
        q.close()
    finally:
        r.bridge.close()
        r.swtpm.stop()


def test_injection_needs_an_attached_running_tpm(rig: Rig) -> None:
    with pytest.raises(StateError, match="attached"):
        rig.bridge.read_pcrs()
    q = rig.qemu()
    q.set_data_fd()
    assert q.request(cc.Stop()).result == 0
    with pytest.raises(StateError, match="tpm stopped"):
        rig.bridge.read_pcrs()
    q.close()


def test_state_changing_injection_refused_from_the_first_get_stateblob(rig: Rig) -> None:
    q = rig.qemu()
    q.boot()
    extend = pcr_extend(PCR, bytes(32))
    assert rc_of(rig.bridge.transact(extend, state_changing=True)) == 0
    q.request(cc.GetStateBlob(1))
    with pytest.raises(InjectionRefused):
        rig.bridge.transact(extend, state_changing=True)
    assert len(rig.bridge.read_pcrs()) == 24, "read-only injections still run"
    q.tpm(get_random(4))  # the guest runs again: the save is over
    assert rc_of(rig.bridge.transact(extend, state_changing=True)) == 0


def test_unknown_control_command_gets_tpm_bad_ordinal(rig: Rig) -> None:
    q = rig.qemu()
    q.set_data_fd()
    q.ctrl.sendall(b"\0\0\0\x77")
    assert q.ctrl.recv(16) == b"\0\0\0\x0a"
    assert q.request(cc.GetCapability()).result == 0, "the channel still works"


def test_cli_resolves_the_bridge_by_uuid_and_name(
    rig: Rig, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    from host_agent.cli import main

    q = rig.qemu()
    q.boot()
    run = rig.dir / "run"
    assert find_bridge(run, rig.vm_uuid).vm_name == "sim-vm"
    with LinkClient(Path(find_bridge(run, "sim-vm").query_socket)) as client:
        assert client.call("status")["tpm"] == "running"
    assert main(["vm", "pcrs", "sim-vm", "--json", "--runtime-dir", str(run)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["bank"] == "sha256" and sorted(out["pcrs"], key=int) == [str(i) for i in range(24)]
    assert out["pcrs"] == {str(k): v.hex() for k, v in rig.bridge.read_pcrs().items()}
    assert main(["vm", "pcrs", rig.vm_uuid, "--runtime-dir", str(run)]) == 0
    assert "PCR 23" in capsys.readouterr().out
    assert main(["vm", "pcrs", "no-such-vm", "--runtime-dir", str(run)]) == 2
    assert "vtpm.bridge.not_found" in capsys.readouterr().err


def test_a_hook_handler_may_read_the_pcrs_of_the_bridge_that_called_it(rig: Rig) -> None:
    """What the daemon does at a save: read the vPCRs before letting the blob go."""
    got: list[dict[int, bytes]] = []

    def handler(call: HookCall) -> Allow:
        got.append(rig.server.read_pcrs(call.vm_uuid, timeout=5))
        return Allow()

    rig.server.on_get_stateblob = handler
    q = rig.qemu()
    q.boot()
    q.tpm(pcr_extend(PCR, hashlib.sha256(b"x").digest()))
    expected = rig.bridge.read_pcrs()
    assert [r.result for r in _save(q)] == [0, 0, 0x800]
    assert got == [expected] * 3


def test_second_bridge_on_a_live_socket_is_refused(rig: Rig) -> None:
    from host_agent.vtpm.bridge_errors import BridgeTransportError

    other = Bridge(
        BridgeConfig(
            vm_uuid=str(uuid.uuid4()),
            listen=rig.ctrl,
            swtpm_ctrl=rig.swtpm.ctrl_path,
            allow_unhooked_state_transfer=True,
        )
    )
    with pytest.raises(BridgeTransportError, match="in use"):
        other.start()
    assert other.run_state is BridgeRunState.CREATED
    q = rig.qemu()
    q.boot()  # the first bridge still serves


def test_get_stateblob_hook_may_replace_the_blob_qemu_receives(rig: Rig) -> None:
    rig.server.on_get_stateblob = lambda call: (
        Replace(b"sealed-" + bytes([call.blob_type]), state_flags=2)
        if call.blob_type == 1
        else Allow()
    )
    q = rig.qemu()
    q.boot()
    perm, vol, _save3 = _save(q)
    assert perm == cc.StateBlobReply.of(b"sealed-\x01", 2)
    assert isinstance(vol, cc.StateBlobReply) and vol.data[:8] == bytes.fromhex("0201000a00040000")


def test_run_state_transitions_and_guards(sockdir: Path) -> None:
    tpm = start_swtpm_unix(sockdir / "state", ctrl_path=sockdir / "swtpm.sock")
    bridge = Bridge(
        BridgeConfig(
            vm_uuid=str(uuid.uuid4()),
            listen=sockdir / "ctrl.sock",
            swtpm_ctrl=tpm.ctrl_path,
            allow_unhooked_state_transfer=True,
            exit_when_qemu_leaves=True,
        )
    )
    seen = [bridge.run_state]
    try:
        bridge.start()
        seen.append(bridge.run_state)
        with pytest.raises(StateError, match="start"):
            bridge.start()
        q = QemuSide(sockdir / "ctrl.sock")
        q.boot()
        seen.append(bridge.run_state)
        q.close()
        assert bridge.wait_closed(5), "exit_when_qemu_leaves stops the loop"
        seen.append(bridge.run_state)
        assert not (sockdir / "ctrl.sock").exists() and not (sockdir / "ctrl.sock.lock").exists()
    finally:
        bridge.close()
        tpm.stop()
    assert [s.value for s in seen] == ["created", "listening", "attached", "closed"]


def test_response_spin_relays_the_same_bytes(sockdir: Path) -> None:
    r = make_rig(sockdir, response_spin=0.0005)
    try:
        q = r.qemu()
        q.boot()
        for i in range(1, 200):
            n = 1 + i % 64  # GetRandom returns at most 64 bytes (the largest digest)
            resp = q.tpm(get_random(n))
            assert rc_of(resp) == 0 and len(resp) == 12 + n
            if i % 10 == 0:
                assert len(r.bridge.read_pcrs()) == 24
        q.close()
    finally:
        r.bridge.close()
        r.server.close()
        r.swtpm.stop()


def test_an_abandoned_injection_response_never_reaches_the_guest(rig: Rig) -> None:
    from host_agent.vtpm.bridge_errors import InjectionError

    q = rig.qemu()
    q.boot()
    for _ in range(20):
        # expires while in flight: its response comes later and must be dropped
        with pytest.raises(InjectionError, match="got no response"):
            rig.bridge.transact(get_random(40), timeout=1e-6)
        resp = q.tpm(get_random(7))
        assert rc_of(resp) == 0 and len(resp) == 12 + 7
    assert len(rig.bridge.read_pcrs()) == 24
    assert rig.bridge.stats.injections_failed == 20


def test_normal_ends_are_not_relay_errors_and_a_dead_swtpm_is(sockdir: Path) -> None:
    r = make_rig(sockdir)
    try:
        q = r.qemu()
        q.boot()
        assert rc_of(q.tpm(get_random(4))) == 0
        q.close()  # QEMU leaves: not an error
        deadline = time.monotonic() + 10
        while r.bridge.attached and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not r.bridge.attached
        q = r.qemu()
        q.boot()
        assert q.request(cc.Shutdown()).result == 0  # swtpm exits after CMD_SHUTDOWN: not one
        r.swtpm.proc.wait(10)
        deadline = time.monotonic() + 10
        while r.bridge.attached and time.monotonic() < deadline:
            time.sleep(0.02)
        q.close()
        assert r.bridge.status()["stats"]["relay_errors"] == {}

        r.swtpm = start_swtpm_unix(sockdir / "state", ctrl_path=sockdir / "swtpm.sock")
        q = r.qemu()
        q.boot()
        r.swtpm.proc.kill()  # swtpm dies under a running guest TPM: one error, counted once
        r.swtpm.proc.wait(10)
        deadline = time.monotonic() + 10
        while r.bridge.attached and time.monotonic() < deadline:
            time.sleep(0.02)
        q.close()
        assert r.bridge.status()["stats"]["relay_errors"] == {"swtpm_gone": 1}
    finally:
        r.bridge.close()
        r.server.close()
        r.swtpm.stop()
