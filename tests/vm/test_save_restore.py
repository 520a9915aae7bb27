"""Sealed save and verified restore with QEMU directly (patent steps 1-1 and 1-2; invariants 1, 6).

One host for the module: a swtpm as host TPM, the SQLite store, and ``vtpm-host daemon`` as a
separate process (so it can be SIGKILLed). One VM: its encrypted swtpm (``SwtpmInstance``), its
bridge (in this process, connected to the daemon), and a TCG guest with memfd RAM. The guest is
booted once; saves go through QMP ``migrate`` to a file, restores through ``-incoming "exec:cat
FILE"`` into a new QEMU with the VM's swtpm restarted for incoming state. The tests run in file
order and hand the running guest on (each test that refuses a restore leaves the last good one).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from host_agent.config import AgentConfig, TpmConfig
from host_agent.lifecycle.image_verify import main_ram
from host_agent.lifecycle.seal import list_sealed
from host_agent.memory.merkle import diff
from host_agent.memory.sources import hash_source
from host_agent.service.daemon import ControlClient
from host_agent.store.provision import ensure_store, open_store
from host_agent.tpm.adapter import PytssHostTpm
from host_agent.vtpm.bridge import Bridge, BridgeConfig
from host_agent.vtpm.swtpm import SwtpmInstance, SwtpmOptions, vtpm_dir_of
from tests.helpers.guest_load import (
    GUEST_EXTEND,
    GUEST_LOAD,
    READ_TPM_LOOP,
    START_MEMWRITER,
    STOP_BUSY,
    run_py,
    start_tpm_loop,
    tpm_answers,
)
from tests.helpers.qemu import Guest, GuestFactory
from tests.helpers.swtpm import Swtpm, start_swtpm

REPO = Path(__file__).resolve().parents[2]


MARK = b"VTPM-TRUST-MARK!" * 256  # one page


def sysfs_pcrs(guest: Guest) -> dict[int, bytes]:
    out = guest.check(
        "for i in $(seq 0 23); do echo $i $(cat /sys/class/tpm/tpm0/pcr-sha256/$i); done"
    )
    return {int(a): bytes.fromhex(b) for a, b in (ln.split() for ln in out.decode().splitlines())}


def uptime(guest: Guest) -> float:
    return float(guest.check("cat /proc/uptime").split()[0])


def replace_tpm_blobs(image: bytes, permanent: bytes, volatile: bytes, savestate: bytes) -> bytes:
    """``image`` (a raw migration stream) with its tpm-emulator section's blobs replaced."""
    hdr = b"\x0ctpm-emulator"
    pos = image.rfind(hdr)
    assert pos > 0
    p = pos + len(hdr) + 8  # instance id, version
    start = p
    for _ in range(3):
        _flags, size = struct.unpack_from(">II", image, p)
        p += 8 + size
    flags = [struct.unpack_from(">I", image, start)[0]]
    q = start + 8 + struct.unpack_from(">I", image, start + 4)[0]
    flags.append(struct.unpack_from(">I", image, q)[0])
    q += 8 + struct.unpack_from(">I", image, q + 4)[0]
    flags.append(struct.unpack_from(">I", image, q)[0])
    body = b"".join(
        struct.pack(">II", f, len(b)) + b
        for f, b in zip(flags, (permanent, volatile, savestate), strict=True)
    )
    return image[:start] + body + image[p:]


def tpm_blobs_of(path: Path) -> tuple[bytes, bytes, bytes]:
    st = hash_source(str(path)).tpm_state
    assert st is not None
    return st.permanent, st.volatile, st.savestate


@dataclass
class Host:
    dir: Path
    config: AgentConfig
    host_tpm: Swtpm
    env: dict[str, str]
    daemon: subprocess.Popen[bytes] | None = None
    logs: list[Path] = field(default_factory=list)

    @property
    def control(self) -> ControlClient:
        return ControlClient(self.dir / "run" / "control.sock")

    def start_daemon(self) -> None:
        log = self.dir / f"daemon{len(self.logs)}.log"
        self.logs.append(log)
        with open(log, "wb") as out:
            self.daemon = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "host_agent.cli",
                    "daemon",
                    "--state-dir",
                    str(self.dir),
                    "--runtime-dir",
                    str(self.dir / "bridges"),
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=REPO,
            )
        deadline = time.monotonic() + 30
        while True:
            try:
                if self.control.call("status")["run_state"] == "running":
                    return
            except Exception:
                pass
            assert self.daemon.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "daemon did not come up"
            time.sleep(0.1)

    def kill_daemon(self) -> None:
        assert self.daemon is not None
        self.daemon.send_signal(signal.SIGKILL)
        self.daemon.wait(10)
        self.daemon = None

    def tpm_port(self) -> PytssHostTpm:
        return PytssHostTpm(
            self.host_tpm.tcti, self.config.tpm.state_dir, root="software", connection="per-call"
        )

    def sealed(self, vm_uuid: str) -> list:  # type: ignore[type-arg]
        port = self.tpm_port()
        try:
            with open_store(self.config, port, read_only=True) as store:
                return list_sealed(store, vm_uuid)
        finally:
            port.close()

    def log_text(self) -> str:
        return "".join(p.read_text(errors="replace") for p in self.logs if p.exists())


@dataclass
class Vm:
    uuid: str
    name: str
    swtpm: SwtpmInstance
    bridge: Bridge
    guest: Guest
    boots: int = 0


@pytest.fixture(scope="module")
def host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Host]:
    d = Path(tempfile.mkdtemp(prefix="vsr-", dir="/tmp"))
    tpm = start_swtpm(tmp_path_factory.mktemp("hosttpm"))
    config = AgentConfig(state_dir=d, tpm=TpmConfig(tcti=tpm.tcti, state_dir=d / "tpm"))
    env = {**os.environ, "PYTHONPATH": str(REPO), "VTPM_TPM_TCTI": tpm.tcti}
    h = Host(d, config, tpm, env)
    port = h.tpm_port()
    try:
        ensure_store(port, config)
    finally:
        port.close()
    h.start_daemon()
    yield h
    if h.daemon is not None and h.daemon.poll() is None:
        h.daemon.terminate()
        h.daemon.wait(10)
    print(h.log_text()[-6000:])
    tpm.stop()
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def vm(host: Host, module_boot_guest: GuestFactory) -> Iterator[Vm]:
    vm_uuid = str(uuid.uuid4())
    port = host.tpm_port()
    inst = SwtpmInstance(
        vtpm_dir_of(host.dir), vm_uuid, "vm-sr", port, options=SwtpmOptions(terminate=True)
    )
    inst.start()
    vdir = host.dir / "vms" / vm_uuid
    vdir.mkdir(parents=True)
    bridge = Bridge(
        BridgeConfig(
            vm_uuid=vm_uuid,
            vm_name="vm-sr",
            listen=vdir / "ctrl.sock",
            swtpm_ctrl=inst.ctrl_socket,
            daemon_socket=host.dir / "run" / "daemon.sock",
            runtime_dir=host.dir / "bridges",
            reconnect_interval=0.1,
            hook_timeout=30.0,
        )
    ).start()
    guest = module_boot_guest("vm-sr", tpm_socket=vdir / "ctrl.sock", memfd=True)
    v = Vm(vm_uuid, "vm-sr", inst, bridge, guest)
    yield v
    v.guest.shutdown()
    bridge.close()
    inst.stop()
    port.close()


def save(vm: Vm, path: Path) -> None:
    vm.guest.qmp.stop()
    vm.guest.qmp.migrate_to_file(path)
    vm.guest.shutdown()  # QEMU quits: CMD_SHUTDOWN through the bridge, swtpm exits


def restore(vm: Vm, factory: GuestFactory, image: Path) -> tuple[Guest, bool]:
    """Start a QEMU on ``image``; returns it and whether it reached ``paused`` (else it exited)."""
    vm.swtpm.restart_for_incoming()
    vm.boots += 1
    g = factory(f"{vm.name}-r{vm.boots}", tpm_socket=vm.bridge.config.listen, memfd=True,
                incoming=f"exec:cat {image}", wait=False)  # fmt: skip
    deadline = time.monotonic() + 60
    while True:
        assert g.proc is not None
        if g.proc.poll() is not None:
            return g, False
        try:
            if g.qmp.query_status() == "paused":
                return g, True
        except Exception:
            pass
        assert time.monotonic() < deadline, g.diagnostics()
        time.sleep(0.05)


def refused(vm: Vm, host: Host, factory: GuestFactory, image: Path) -> str:
    digest = hashlib.sha256(image.read_bytes()).hexdigest()
    g, paused = restore(vm, factory, image)
    assert not paused, "a refused restore must never reach the paused (loaded) state"
    assert g.proc is not None and g.proc.wait(30) != 0
    assert "stateblob" in g.stderr_log.read_text()
    g.shutdown()
    vm.swtpm.stop()  # QEMU sent no SHUTDOWN after the veto: the agent stops swtpm
    assert hashlib.sha256(image.read_bytes()).hexdigest() == digest, "the image is untouched"
    reason = host.control.call("last_veto", vm_uuid=vm.uuid)["reason"]
    assert isinstance(reason, str) and reason
    return reason


def resumed(vm: Vm, factory: GuestFactory, image: Path) -> Guest:
    g, paused = restore(vm, factory, image)
    assert paused, g.diagnostics()
    g.qmp.cont()
    vm.guest = g
    return g


def verify_cli(host: Host, image: Path) -> dict:  # type: ignore[type-arg]
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "host_agent.cli",
            "image",
            "verify",
            str(image),
            "--json",
            "--state-dir",
            str(host.dir),
        ],
        capture_output=True,
        env=host.env,
        cwd=REPO,
        timeout=120,
    )
    assert res.returncode in (0, 1), res.stderr.decode()[-2000:]
    out: dict = json.loads(res.stdout)  # type: ignore[type-arg]
    assert out["verdict"] in ("match", "mismatch", "no-record")
    assert (res.returncode == 0) == (out["verdict"] == "match")
    return out


# ------------------------------------------------------------------------------------- tests

STATE: dict[str, object] = {}


def test_save_then_restore_continues_with_the_same_vpcrs_and_uptime(
    host: Host, vm: Vm, module_boot_guest: GuestFactory, tmp_path_factory: pytest.TempPathFactory
) -> None:
    w = tmp_path_factory.mktemp("sr")
    assert "EXTENDED" in run_py(vm.guest, GUEST_EXTEND, "first")
    before = vm.bridge.read_pcrs()
    up = uptime(vm.guest)
    image = w / "save1.img"
    save(vm, image)
    [record] = host.sealed(vm.uuid)
    assert record.vpcrs == before, "the sealed vPCRs are the guest's at the stop"
    assert record.host_id and record.origin == "save" and record.hash_mode.startswith("full")
    note = record.extra.get("hash_note")  # a QMP save: no background pass, announced as such
    assert note and f"{note}; hashing all guest memory at the stop" in host.log_text()
    st = hash_source(str(image)).tpm_state
    assert st is not None
    assert record.blob(1).blob == st.permanent and record.blob(2).blob == st.volatile
    assert verify_cli(host, image) == {"verdict": "match", "differing_pages": [],
                                       "record": record.record_id, "reason": "memory and vTPM "
                                       "state match", "vm_uuid": vm.uuid}  # fmt: skip

    g = resumed(vm, module_boot_guest, image)
    assert vm.bridge.read_pcrs() == before
    assert sysfs_pcrs(g) == before
    assert uptime(g) >= up, "the guest's uptime continues"
    assert "matches sealed record" in host.log_text()
    STATE["save1"] = image
    STATE["pcrs1"] = before


def test_inv1_changed_memory_never_runs_with_old_vpcrs(
    host: Host, vm: Vm, module_boot_guest: GuestFactory, tmp_path_factory: pytest.TempPathFactory
) -> None:
    w = tmp_path_factory.mktemp("inv1")
    vm.guest.check("cat > /tmp/mark", stdin=MARK * 4)
    assert "EXTENDED" in run_py(vm.guest, GUEST_EXTEND, "second")
    pcrs2 = vm.bridge.read_pcrs()
    image = w / "save2.img"
    save(vm, image)
    data = image.read_bytes()
    at = data.find(MARK)
    assert at > 0, "the marker page is in the saved stream"
    flipped = bytearray(data)
    flipped[at + 1000] ^= 0x01
    bad = w / "flipped.img"
    bad.write_bytes(bytes(flipped))
    expected = diff(
        main_ram(hash_source(str(image)).leaves), main_ram(hash_source(str(bad)).leaves)
    )
    assert len(expected) == 1 and expected[0][0] == expected[0][1]
    page = expected[0][0]

    reason = refused(vm, host, module_boot_guest, bad)
    assert "1 page(s)" in reason and f": {page} (" in reason, reason
    out = verify_cli(host, bad)
    assert out["verdict"] == "mismatch" and out["differing_pages"] == [[page, page]]

    g = resumed(vm, module_boot_guest, image)  # the untouched image still restores
    assert vm.bridge.read_pcrs() == pcrs2 and sysfs_pcrs(g) == pcrs2
    STATE["save2"] = image
    STATE["pcrs2"] = pcrs2


def test_vtpm_state_of_an_older_save_or_of_another_vm_is_refused(
    host: Host, vm: Vm, module_boot_guest: GuestFactory, tmp_path_factory: pytest.TempPathFactory
) -> None:
    w = tmp_path_factory.mktemp("blobs")
    save2 = STATE["save2"]
    assert isinstance(save2, Path)
    data = save2.read_bytes()

    older = w / "older-state.img"
    older.write_bytes(replace_tpm_blobs(data, *tpm_blobs_of(STATE["save1"])))  # type: ignore[arg-type]
    reason = refused(vm, host, module_boot_guest, older)
    # A PCR extend changes only the VOLATILE blob: PERMANENT and memory match the newer record,
    # and the older VOLATILE state is caught at the second SET_STATEBLOB, before the VM runs.
    assert "VOLATILE vTPM state differs from sealed record" in reason, reason
    assert verify_cli(host, older)["verdict"] == "mismatch"

    # another VM's vTPM: a second, freshly provisioned vTPM's blobs
    other_uuid = str(uuid.uuid4())
    port = host.tpm_port()
    other = SwtpmInstance(vtpm_dir_of(host.dir), other_uuid, "other", port)
    other.start()
    blobs = []
    subprocess.run(["swtpm_ioctl", "--unix", str(other.ctrl_socket), "-i"], check=True)
    for kind in ("permanent", "volatile", "savestate"):
        out = w / kind
        subprocess.run(
            ["swtpm_ioctl", "--unix", str(other.ctrl_socket), "--save", kind, str(out)], check=True
        )
        blobs.append(out.read_bytes())
    other.stop()
    other.remove()
    port.close()
    foreign = w / "foreign-state.img"
    foreign.write_bytes(replace_tpm_blobs(data, *blobs))
    reason = refused(vm, host, module_boot_guest, foreign)
    assert "no sealed record" in reason and "adopt-state" in reason, reason
    assert verify_cli(host, foreign)["verdict"] == "no-record"
    STATE["foreign"] = foreign


def test_a_state_without_a_record_restores_only_once_adopted(
    host: Host, vm: Vm, module_boot_guest: GuestFactory
) -> None:
    foreign = STATE["foreign"]
    assert isinstance(foreign, Path)
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "host_agent.cli",
            "vm",
            "adopt-state",
            vm.uuid,
            str(foreign),
            "--json",
            "--state-dir",
            str(host.dir),
        ],
        capture_output=True,
        env=host.env,
        cwd=REPO,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr.decode()
    record = json.loads(res.stdout)["record"]
    assert verify_cli(host, foreign)["record"] == record
    g, paused = restore(vm, module_boot_guest, foreign)
    assert paused, "the adopted state restores"
    g.shutdown()
    vm.swtpm.stop()


def test_agent_restarted_between_save_and_restore_changes_nothing(
    host: Host, vm: Vm, module_boot_guest: GuestFactory
) -> None:
    save2 = STATE["save2"]
    assert isinstance(save2, Path)
    host.kill_daemon()
    host.start_daemon()
    g = resumed(vm, module_boot_guest, save2)
    assert vm.bridge.read_pcrs() == STATE["pcrs2"] and sysfs_pcrs(g) == STATE["pcrs2"]


def test_inv6_guest_keeps_tpm_while_daemon_restarts(host: Host, vm: Vm) -> None:
    result: list[str] = []
    t = threading.Thread(target=lambda: result.append(run_py(vm.guest, GUEST_LOAD, "4")))
    t.start()
    time.sleep(1.0)
    host.kill_daemon()
    t.join(60)
    assert result and result[0].startswith("DONE"), result
    _, done, errors = result[0].split()
    assert int(errors) == 0 and int(done) > 50, result[0]
    host.start_daemon()
    deadline = time.monotonic() + 10
    while True:
        vms = {v["uuid"]: v for v in host.control.call("status")["vms"]}
        if vms.get(vm.uuid, {}).get("bridge_connected"):
            break
        assert time.monotonic() < deadline, vms
        time.sleep(0.1)
    assert vms[vm.uuid]["swtpm"] == "running", "the restarted daemon took the swtpm over"
    assert vm.bridge.read_pcrs() == sysfs_pcrs(vm.guest)


def test_a_guest_busy_with_memory_and_its_tpm_is_saved_and_restored_unharmed(
    host: Host, vm: Vm, module_boot_guest: GuestFactory, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The guest rewrites 64 pages every 2 ms and sends TPM commands without pause while it is
    saved and restored: the restore matches the sealed record (memory and vTPM state), and the
    guest's TPM loop goes on without an error or a wrong answer."""
    image = tmp_path_factory.mktemp("busy") / "busy.img"
    vm.guest.check(START_MEMWRITER)
    vm.guest.check(start_tpm_loop())
    time.sleep(2.0)
    before = tpm_answers(vm.guest.check(READ_TPM_LOOP).decode())
    matched = host.log_text().count("matches sealed record")
    save(vm, image)
    g = resumed(vm, module_boot_guest, image)
    assert host.log_text().count("matches sealed record") == matched + 1
    time.sleep(1.0)
    after = tpm_answers(g.check(READ_TPM_LOOP).decode())
    time.sleep(1.0)
    later = tpm_answers(g.check(READ_TPM_LOOP).decode())
    print(f"\nguest TPM commands answered: {before} at the save, {after} and {later} after")
    assert before < after < later, "the guest's TPM loop stopped"
    g.check(STOP_BUSY)
    assert vm.bridge.read_pcrs() == sysfs_pcrs(g)
