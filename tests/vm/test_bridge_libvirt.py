"""The bridge behind libvirt's external TPM backend, through the embedded driver.

``<tpm model='tpm-crb'><backend type='external'><source type='unix' mode='connect' path=BRIDGE/>``
makes libvirt start QEMU with ``-chardev socket,path=BRIDGE -tpmdev emulator``; libvirt starts no
swtpm of its own. ``dom.save`` / ``restoreFlags`` then move the vTPM state through the bridge.
The embedded driver needs the ``libvirt-qemu`` user and a qemu.conf (platform-notes §7); the
fixture creates both.
"""

from __future__ import annotations

import contextlib
import hashlib
import shutil
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from xml.sax.saxutils import escape

import libvirt
import pytest

from host_agent.vtpm.bridge import Bridge, BridgeConfig
from host_agent.vtpm.hooks_server import HooksServer, Veto
from tests.helpers.qemu import GuestSsh, SwtpmUnix, free_port, start_swtpm_unix
from vm_images.build import GuestImage

QEMU_CONF = """\
user = "root"
group = "root"
swtpm_user = "root"
swtpm_group = "root"
cgroup_controllers = [ ]
namespaces = [ ]
security_driver = "none"
stdio_handler = "file"
"""

_EVENT_LOOP_STARTED = False


def _ensure_libvirt_qemu_user() -> None:
    """The embedded driver parses user 'libvirt-qemu' before reading qemu.conf."""
    if subprocess.run(["id", "libvirt-qemu"], capture_output=True).returncode == 0:
        return
    subprocess.run(["groupadd", "-r", "-f", "libvirt-qemu"], check=True)
    subprocess.run(
        ["useradd", "-r", "-g", "libvirt-qemu", "-d", "/var/lib/libvirt", "-s",
         "/usr/sbin/nologin", "-M", "libvirt-qemu"],
        check=True,
    )  # fmt: skip


def _start_event_loop() -> None:
    global _EVENT_LOOP_STARTED
    if _EVENT_LOOP_STARTED:
        return
    libvirt.virEventRegisterDefaultImpl()

    def run() -> None:
        while True:
            libvirt.virEventRunDefaultImpl()

    threading.Thread(target=run, name="libvirt-events", daemon=True).start()
    _EVENT_LOOP_STARTED = True


@pytest.fixture(scope="module")
def conn() -> Iterator[libvirt.virConnect]:
    _ensure_libvirt_qemu_user()
    _start_event_loop()
    root = Path(tempfile.mkdtemp(prefix="lv-", dir="/tmp"))
    (root / "etc").mkdir()
    (root / "etc" / "qemu.conf").write_text(QEMU_CONF)
    c = libvirt.open(f"qemu:///embed?root={root}")
    yield c
    for dom in c.listAllDomains():
        with contextlib.suppress(libvirt.libvirtError):
            if dom.isActive():
                dom.destroy()
        with contextlib.suppress(libvirt.libvirtError):
            dom.undefine()
    c.close()
    shutil.rmtree(root, ignore_errors=True)


class LibvirtRig:
    def __init__(self, conn: libvirt.virConnect, image: GuestImage) -> None:
        self.conn = conn
        self.image = image
        self.dir = Path(tempfile.mkdtemp(prefix="vbl-", dir="/tmp"))
        self.vm_uuid = str(uuid.uuid4())
        self.name = f"bridge-{self.vm_uuid[:8]}"
        self.swtpms: list[SwtpmUnix] = [self.fresh_swtpm("state")]
        self.server = HooksServer(self.dir / "daemon.sock").start()
        self.bridge = Bridge(
            BridgeConfig(
                vm_uuid=self.vm_uuid,
                vm_name=self.name,
                listen=self.dir / "ctrl.sock",
                swtpm_ctrl=self.dir / "swtpm.sock",
                daemon_socket=self.dir / "daemon.sock",
                reconnect_interval=0.05,
            )
        ).start()
        self.server.wait_for_bridge(self.vm_uuid)
        self.ssh_port = free_port()
        self.console = self.dir / "console.log"
        self.dom = conn.defineXML(self.xml())

    def fresh_swtpm(self, name: str) -> SwtpmUnix:
        tpm = start_swtpm_unix(self.dir / name, ctrl_path=self.dir / "swtpm.sock")
        if hasattr(self, "swtpms"):
            self.swtpms.append(tpm)
        return tpm

    def xml(self) -> str:
        img = self.image
        return f"""
<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>{self.name}</name><uuid>{self.vm_uuid}</uuid>
  <memory unit='MiB'>256</memory><vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type><kernel>{img.kernel}</kernel>
      <initrd>{img.initramfs}</initrd><cmdline>{escape(img.cmdline)}</cmdline></os>
  <features><acpi/><apic/></features>
  <on_reboot>destroy</on_reboot>
  <devices>
    <serial type='file'><source path='{self.console}' append='on'/><target port='0'/></serial>
    <tpm model='tpm-crb'>
      <backend type='external'>
        <source type='unix' mode='connect' path='{self.bridge.config.listen}'/>
      </backend>
    </tpm>
    <memballoon model='none'/>
  </devices>
  <qemu:commandline>
    <qemu:arg value='-netdev'/>
    <qemu:arg value='user,id=n0,hostfwd=tcp:127.0.0.1:{self.ssh_port}-:22'/>
    <qemu:arg value='-device'/><qemu:arg value='virtio-net-pci,netdev=n0,addr=0x10'/>
  </qemu:commandline>
</domain>"""

    def wait_ready(self, start: int = 0, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while True:
            text = self.console.read_text(errors="replace") if self.console.exists() else ""
            if "VTPM-GUEST-READY" in text[start:]:
                return
            assert time.monotonic() < deadline, text[-2000:]
            time.sleep(0.1)

    def ssh(self) -> GuestSsh:
        s = GuestSsh(self.ssh_port, self.image.ssh_private_key, self.image.ssh_host_public_key)
        s.connect()
        return s

    def sysfs_pcrs(self) -> dict[int, bytes]:
        s = self.ssh()
        try:
            out = s.check(
                "for i in $(seq 0 23); do echo $i $(cat /sys/class/tpm/tpm0/pcr-sha256/$i); done"
            )
        finally:
            s.close()
        return {
            int(a): bytes.fromhex(b) for a, b in (ln.split() for ln in out.decode().splitlines())
        }

    def close(self) -> None:
        with contextlib.suppress(libvirt.libvirtError):
            if self.dom.isActive():
                self.dom.destroy()
        with contextlib.suppress(libvirt.libvirtError):
            self.dom.undefine()
        self.bridge.close()
        self.server.close()
        for tpm in self.swtpms:
            tpm.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def lrig(conn: libvirt.virConnect, guest_image: GuestImage) -> Iterator[LibvirtRig]:
    r = LibvirtRig(conn, guest_image)
    yield r
    r.close()


def test_libvirt_save_and_restore_carry_the_vtpm_state_across_the_bridge(
    lrig: LibvirtRig, tmp_path: Path
) -> None:
    lrig.dom.create()
    lrig.wait_ready()
    before = lrig.bridge.read_pcrs()
    assert lrig.sysfs_pcrs() == before
    image = tmp_path / "dom.save"
    lrig.dom.save(str(image))
    assert not lrig.dom.isActive()
    lrig.swtpms[0].proc.wait(10)  # QEMU's SHUTDOWN went through the bridge
    gets = [c for c in lrig.server.hook_calls if c.event == "get_stateblob"]
    assert [c.blob_type for c in gets] == [1, 2, 3] and all(c.vm_uuid == lrig.vm_uuid for c in gets)

    lrig.fresh_swtpm("state2")
    size = lrig.console.stat().st_size
    lrig.conn.restoreFlags(str(image), None, 0)
    assert lrig.dom.isActive()
    assert lrig.dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING
    sets = [c for c in lrig.server.hook_calls if c.event == "set_stateblob"]
    assert [c.sha256 for c in sets] == [c.sha256 for c in gets[:2]]
    assert lrig.bridge.read_pcrs() == before
    assert lrig.sysfs_pcrs() == before
    assert lrig.console.stat().st_size >= size


def test_libvirt_vetoed_save_fails_and_the_domain_keeps_running(
    lrig: LibvirtRig, tmp_path: Path
) -> None:
    lrig.server.on_get_stateblob = lambda call: Veto("test: sealing failed")
    lrig.dom.create()
    lrig.wait_ready()
    before = lrig.bridge.read_pcrs()
    with pytest.raises(libvirt.libvirtError):
        lrig.dom.save(str(tmp_path / "dom.save"))
    assert lrig.dom.isActive() and lrig.dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING
    assert lrig.bridge.stats.vetoes == ["get_stateblob PERMANENT vetoed: test: sealing failed"]
    assert lrig.sysfs_pcrs() == before


def test_libvirt_vetoed_restore_fails_and_leaves_the_image_untouched(
    lrig: LibvirtRig, tmp_path: Path
) -> None:
    lrig.dom.create()
    lrig.wait_ready()
    image = tmp_path / "dom.save"
    lrig.dom.save(str(image))
    digest = hashlib.sha256(image.read_bytes()).hexdigest()
    lrig.server.on_set_stateblob = lambda call: Veto("test: memory differs from the record")
    lrig.fresh_swtpm("state2")
    with pytest.raises(libvirt.libvirtError):
        lrig.conn.restoreFlags(str(image), None, 0)
    assert not lrig.dom.isActive()
    assert lrig.bridge.stats.vetoes == [
        "set_stateblob PERMANENT vetoed: test: memory differs from the record"
    ]
    assert hashlib.sha256(image.read_bytes()).hexdigest() == digest
    assert not (lrig.dir / "state2" / "tpm2-00.permall").exists()
