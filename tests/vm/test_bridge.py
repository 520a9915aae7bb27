"""The bridge under real QEMU (``-tpmdev emulator``, TCG) and real swtpm, booting the test guest.

Each test gets its own short socket directory, swtpm, hooks server and bridge; the guest's
``tpm_socket`` is the bridge's listen socket. Boots take 4-8 s under TCG.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
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

from evidence.eventlog import parse_tcg2_log, replay_pcrs
from host_agent.vtpm.bridge import Bridge, BridgeConfig
from host_agent.vtpm.bridge_link import LinkClient, find_bridge
from host_agent.vtpm.hooks_server import HooksServer, Veto
from tests.helpers.guest_load import GUEST_EXTEND, GUEST_LOAD, run_py
from tests.helpers.qemu import Guest, GuestFactory, QemuError, SwtpmUnix, start_swtpm_unix

REPO = Path(__file__).resolve().parents[2]
EVENT_LOG = "/sys/kernel/security/tpm0/binary_bios_measurements"


def sysfs_pcrs(guest: Guest) -> dict[int, bytes]:
    out = guest.check(
        "for i in $(seq 0 23); do echo $i $(cat /sys/class/tpm/tpm0/pcr-sha256/$i); done"
    )
    return {int(a): bytes.fromhex(b) for a, b in (ln.split() for ln in out.decode().splitlines())}


@dataclass
class Rig:
    dir: Path
    vm_uuid: str
    swtpm: SwtpmUnix
    bridge: Bridge
    server: HooksServer | None
    extra: list[SwtpmUnix] = field(default_factory=list)

    @property
    def ctrl(self) -> Path:
        return self.bridge.config.listen

    @property
    def swtpm_ctrl(self) -> Path:
        return self.dir / "swtpm.sock"

    def fresh_swtpm(self, name: str) -> SwtpmUnix:
        """A new, empty swtpm on the same control path (what a restore needs)."""
        tpm = start_swtpm_unix(self.dir / name, ctrl_path=self.swtpm_ctrl)
        self.extra.append(tpm)
        return tpm


@pytest.fixture
def rig() -> Iterator[Rig]:
    d = Path(tempfile.mkdtemp(prefix="vbv-", dir="/tmp"))
    vm_uuid = str(uuid.uuid4())
    tpm = start_swtpm_unix(d / "state", ctrl_path=d / "swtpm.sock")
    server = HooksServer(d / "daemon.sock").start()
    bridge = Bridge(
        BridgeConfig(
            vm_uuid=vm_uuid,
            vm_name="vm-test",
            listen=d / "ctrl.sock",
            swtpm_ctrl=d / "swtpm.sock",
            daemon_socket=d / "daemon.sock",
            runtime_dir=d / "run",
            reconnect_interval=0.05,
        )
    ).start()
    server.wait_for_bridge(vm_uuid)
    r = Rig(d, vm_uuid, tpm, bridge, server)
    yield r
    bridge.close()
    server.close()
    for t in [tpm, *r.extra]:
        t.stop()
    shutil.rmtree(d, ignore_errors=True)


def boot(boot_guest: GuestFactory, rig: Rig, name: str = "g", **kw: object) -> Guest:
    return boot_guest(name, tpm_socket=rig.ctrl, **kw)


def test_guest_boots_through_the_bridge_and_vpcrs_match_sysfs_and_event_log(
    boot_guest: GuestFactory, rig: Rig
) -> None:
    guest = boot(boot_guest, rig)
    vpcrs = rig.bridge.read_pcrs()
    assert sorted(vpcrs) == list(range(24))
    assert sysfs_pcrs(guest) == vpcrs
    replayed = replay_pcrs(parse_tcg2_log(guest.ssh().read_file(EVENT_LOG)))["sha256"]
    assert replayed and {i: vpcrs[i] for i in replayed} == replayed
    assert set(range(8)) <= set(replayed), "SeaBIOS measures PCRs 0-7"
    stats = rig.bridge.stats
    assert stats.ctrl_commands["CMD_SET_DATAFD"] == 1 and stats.ctrl_commands["CMD_INIT"] == 1
    print(f"guest commands relayed during boot: {stats.guest_commands}")


def test_1000_injected_pcr_reads_while_the_guest_keeps_its_tpm_busy(
    boot_guest: GuestFactory, rig: Rig
) -> None:
    guest = boot(boot_guest, rig)
    result: list[str] = []
    t = threading.Thread(target=lambda: result.append(run_py(guest, GUEST_LOAD, "6")))
    t.start()
    time.sleep(1.5)  # the guest's load is under way
    g0 = rig.bridge.stats.guest_commands
    t0 = time.monotonic()
    reads = []
    while len(reads) < 1000:
        reads.append(rig.bridge.read_pcrs())
        time.sleep(0.001)  # spread the reads over the guest's load
    elapsed = time.monotonic() - t0
    during = rig.bridge.stats.guest_commands - g0
    t.join(60)
    first = reads[0]
    assert all(r == first for r in reads), "nothing extends PCRs meanwhile"
    assert sysfs_pcrs(guest) == first
    assert result and result[0].startswith("DONE"), result
    _, done, errors = result[0].split()
    assert int(errors) == 0 and int(done) > 500, result[0]
    assert during > 200, f"the guest sent only {during} commands during the injections"
    s = rig.bridge.stats
    assert s.injections_failed == 0 and s.injected_commands >= 3000
    print(
        f"1000 read_pcrs in {elapsed:.2f} s beside {during} guest commands ({done} in the guest's "
        f"run, 0 errors); max injection wait {s.max_injection_wait * 1e3:.2f} ms, max guest "
        f"hold {s.max_guest_hold * 1e3:.2f} ms ({s.held_guest_commands} held)"
    )


def test_save_and_restore_through_qemu_carry_the_vtpm_state(
    boot_guest: GuestFactory, rig: Rig, tmp_path: Path
) -> None:
    guest = boot(boot_guest, rig)
    assert "EXTENDED" in run_py(guest, GUEST_EXTEND, "vtpm-trust bridge")
    before = rig.bridge.read_pcrs()
    assert before[23] != bytes(32)
    image = tmp_path / "save.img"
    guest.qmp.stop()
    guest.qmp.migrate_to_file(image)
    guest.shutdown()  # QEMU quits: SHUTDOWN through the bridge, swtpm exits
    rig.swtpm.proc.wait(10)
    gets = [c for c in rig.server.hook_calls if c.event == "get_stateblob"]  # type: ignore[union-attr]
    assert [c.blob_type for c in gets] == [1, 2, 3]

    rig.fresh_swtpm("state2")
    restored = boot(boot_guest, rig, "restored", incoming=f"exec:cat {image}")
    deadline = time.monotonic() + 30
    while restored.qmp.query_status() != "paused":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    restored.qmp.cont()
    sets = [c for c in rig.server.hook_calls if c.event == "set_stateblob"]  # type: ignore[union-attr]
    assert [c.blob_type for c in sets] == [1, 2]
    assert [c.sha256 for c in sets] == [c.sha256 for c in gets[:2]], "the saved blobs came back"
    assert rig.bridge.read_pcrs() == before
    assert sysfs_pcrs(restored) == before


def test_vetoed_save_fails_and_the_vm_keeps_running(
    boot_guest: GuestFactory, rig: Rig, tmp_path: Path
) -> None:
    assert rig.server is not None
    rig.server.on_get_stateblob = lambda call: Veto("test: no sealed record")
    guest = boot(boot_guest, rig)
    before = rig.bridge.read_pcrs()
    with pytest.raises(QemuError, match="failed"):
        guest.qmp.migrate_to_file(tmp_path / "save.img")  # live: the VM was running
    deadline = time.monotonic() + 10
    while guest.qmp.query_status() != "running":
        assert time.monotonic() < deadline, guest.qmp.query_status()
        time.sleep(0.05)
    assert rig.bridge.stats.vetoes == ["get_stateblob PERMANENT vetoed: test: no sealed record"]
    assert sysfs_pcrs(guest) == before, "the guest and its TPM go on"
    assert rig.bridge.read_pcrs() == before


def test_vetoed_restore_makes_qemu_exit_and_leaves_the_image_untouched(
    boot_guest: GuestFactory, rig: Rig, tmp_path: Path
) -> None:
    guest = boot(boot_guest, rig)
    image = tmp_path / "save.img"
    guest.qmp.stop()
    guest.qmp.migrate_to_file(image)
    guest.shutdown()
    digest = hashlib.sha256(image.read_bytes()).hexdigest()

    assert rig.server is not None
    rig.server.on_set_stateblob = lambda call: Veto("test: memory does not match the record")
    tpm2 = rig.fresh_swtpm("state2")
    restored = boot(boot_guest, rig, "restored", incoming=f"exec:cat {image}", wait=False)
    assert restored.proc is not None
    assert restored.proc.wait(30) != 0
    assert "stateblob" in restored.stderr_log.read_text()
    assert rig.bridge.stats.vetoes == [
        "set_stateblob PERMANENT vetoed: test: memory does not match the record"
    ]
    assert hashlib.sha256(image.read_bytes()).hexdigest() == digest
    assert not (tpm2.state_dir / "tpm2-00.permall").exists(), "nothing reached the new swtpm"


# --------------------------------------------------------------------- separate processes


def _spawn(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        return subprocess.Popen(
            [sys.executable, *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )


def test_sigkilled_hooks_server_leaves_the_guest_unaffected_and_a_new_one_finds_the_bridge(
    boot_guest: GuestFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    d = Path(tempfile.mkdtemp(prefix="vbk-", dir="/tmp"))
    vm_uuid = str(uuid.uuid4())
    tpm = start_swtpm_unix(d / "state", ctrl_path=d / "swtpm.sock")
    server = _spawn(
        ["-m", "host_agent.vtpm.hooks_server", "--listen", str(d / "daemon.sock")], d / "server.log"
    )
    bridge = _spawn(
        [
            "-m", "host_agent.vtpm.bridge", "--vm-uuid", vm_uuid, "--vm-name", "killtest",
            "--listen", str(d / "ctrl.sock"), "--swtpm-ctrl", str(d / "swtpm.sock"),
            "--daemon-sock", str(d / "daemon.sock"), "--runtime-dir", str(d / "run"),
            "--reconnect-interval", "0.1",
        ],
        d / "bridge.log",
    )  # fmt: skip
    restarted: HooksServer | None = None
    try:
        deadline = time.monotonic() + 10
        while not (d / "ctrl.sock").exists():
            assert time.monotonic() < deadline and bridge.poll() is None
            time.sleep(0.02)
        guest = boot_guest("k", tpm_socket=d / "ctrl.sock")
        result: list[str] = []
        t = threading.Thread(target=lambda: result.append(run_py(guest, GUEST_LOAD, "4")))
        t.start()
        time.sleep(1.0)
        server.send_signal(signal.SIGKILL)
        server.wait(5)
        t.join(60)
        assert result and "DONE" in result[0] and "BAD" not in result[0], result
        assert int(result[0].split()[-2]) > 50, "the guest kept using its TPM"

        restarted = HooksServer(d / "daemon.sock").start()
        hello = restarted.wait_for_bridge(vm_uuid, timeout=5)
        assert hello.pid == bridge.pid and hello.vm_name == "killtest"
        vpcrs = restarted.read_pcrs(vm_uuid)
        assert vpcrs == sysfs_pcrs(guest)

        # the CLI reaches the same bridge through the registry
        from host_agent.cli import main

        assert find_bridge(d / "run", "killtest").pid == bridge.pid
        assert main(["vm", "pcrs", "killtest", "--json", "--runtime-dir", str(d / "run")]) == 0
        out = json.loads(capsys.readouterr().out)
        assert out == {"bank": "sha256", "pcrs": {str(k): v.hex() for k, v in vpcrs.items()}}
        with LinkClient(d / "run" / f"{vm_uuid}.sock") as client:
            assert client.call("status")["daemon_connected"] is True
    finally:
        if restarted is not None:
            restarted.close()
        for proc in (bridge, server):
            if proc.poll() is None:
                proc.terminate()
                proc.wait(10)
        tpm.stop()
        print((d / "bridge.log").read_text()[-3000:])
        shutil.rmtree(d, ignore_errors=True)
