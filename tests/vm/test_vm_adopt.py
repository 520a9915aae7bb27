"""``vtpm-host vm adopt|create|list|start|stop`` end to end: the real CLI, libvirt's embedded
driver, QEMU under TCG, swtpm and the bridge, the ``vm_images/`` guest.

Every command runs as its own process, as an operator runs it: each opens the embedded root
(``<state>/libvirt``), does its work and exits; QEMU, swtpm and the bridge outlive it. ``virsh``
on the same root defines the "foreign" domains and reads definitions back (one process at a time:
the embedded root is locked by whoever opens it). The host TPM that seals the VMs' state keys is
a plain swtpm (``--tcti``).

The guest's kernel command line carries ``vtpm.run`` (the image's ``/init`` runs it after
READY and prints its output on the console, a file serial with ``append='on'``), so a boot shows
whether the guest sees ``/dev/tpm0`` and its PCR 0 without SSH.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

import pytest

from host_agent.lifecycle.domain_xml import ADOPTION_NS, DEFAULT_CHANNEL_NAME
from host_agent.lifecycle.embedded import prepare_embedded_root
from tests.helpers.procs import kill_leftovers, pids_under
from tests.helpers.swtpm import Swtpm, start_swtpm
from vm_images.build import GuestImage

REPO = Path(__file__).resolve().parents[2]
BOOT_TIMEOUT = 120.0  # TCG on 2 shared cores: 5-8 s idle, far more when the machine is busy
RUN = (
    "vtpm.run='ls /dev/tpm0; cat /sys/class/tpm/tpm0/pcr-sha256/0; ls /dev/virtio-ports' "
    "vtpm.poweroff=0"
)
SEABIOS_PCR0 = "E21B703EE69C77476BCCB43EC0336A9A1B2914B378944F7B00A10214CA8FEA93"


@dataclass
class Host:
    state: Path
    host_tpm: Swtpm
    image: GuestImage

    @property
    def root(self) -> Path:
        return self.state / "libvirt"

    @property
    def uri(self) -> str:
        return f"qemu:///embed?root={self.root}"

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "host_agent.cli", "vm", *args,
               "--state-dir", str(self.state), "--tcti", self.host_tpm.tcti,
               "--runtime-dir", str(self.state / "run" / "bridges")]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=REPO)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(args)}: rc {proc.returncode}\n{proc.stderr[-3000:]}")
        return proc

    def cli_json(self, *args: str) -> object:
        return json.loads(self.cli(*args, "--json").stdout)

    def virsh(self, *args: str, check: bool = True) -> str:
        proc = subprocess.run(
            ["virsh", "-q", "-c", self.uri, *args], capture_output=True, text=True, timeout=120
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"virsh {' '.join(args)}: {proc.stderr[-2000:]}\n{self.qemu_logs()}"
            )
        return proc.stdout

    def qemu_logs(self) -> str:
        """The tail of every QEMU and swtpm log under the root (for failure messages)."""
        parts = []
        for log in sorted((self.root / "log").glob("*/*.log")):
            parts.append(f"--- {log.name}\n{log.read_text(errors='replace')[-1500:]}")
        return "\n".join(parts)

    def inactive_xml(self, name: str) -> str:
        return self.virsh("dumpxml", "--inactive", "--security-info", name)

    def define(self, xml: str) -> None:
        with tempfile.NamedTemporaryFile("w", suffix=".xml", delete=False) as f:
            f.write(xml)
        try:
            self.virsh("define", f.name)
        finally:
            os.unlink(f.name)


def plain_domain(host: Host, name: str, vm_uuid: str, tpm: str, console: Path) -> str:
    img = host.image
    cmdline = escape(f"{img.cmdline} {RUN}")
    return f"""<domain type='qemu'>
  <name>{name}</name><uuid>{vm_uuid}</uuid>
  <memory unit='MiB'>256</memory><vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type><kernel>{img.kernel}</kernel>
      <initrd>{img.initramfs}</initrd><cmdline>{cmdline}</cmdline></os>
  <features><apic/></features>
  <devices>
    <serial type='file'><source path='{console}' append='on'/><target port='0'/></serial>
    {tpm}
    <memballoon model='none'/>
  </devices>
</domain>"""


@pytest.fixture(scope="module")
def host(guest_image: GuestImage) -> Iterator[Host]:
    # short: QEMU's monitor socket and swtpm's socket live under <state>/libvirt
    state = Path(tempfile.mkdtemp(prefix="va-", dir="/tmp"))
    tpm = start_swtpm(state / "hosttpm")
    h = Host(state, tpm, guest_image)
    prepare_embedded_root(h.root)  # virsh may open the root before any vtpm-host command
    yield h
    with contextlib.suppress(AssertionError, subprocess.TimeoutExpired):
        for line in h.virsh("list", "--name").split():
            h.cli("stop", line, check=False)
    kill_leftovers(state)
    tpm.stop()
    shutil.rmtree(state, ignore_errors=True)


def _wait_for(predicate: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def _wait_console(console: Path, marker: str, timeout: float = BOOT_TIMEOUT) -> str:
    def seen() -> bool:
        return console.exists() and marker in console.read_text(errors="replace")

    _wait_for(seen, timeout, f"{marker!r} on {console}")
    return console.read_text(errors="replace")


def _tpm_read(state_dir: Path, nv_index: str) -> bytes:
    """An NV index of a *plaintext* swtpm state, read with a scratch swtpm on a copy."""
    with tempfile.TemporaryDirectory(prefix="vr-", dir="/tmp") as tmp:
        shutil.copytree(state_dir, f"{tmp}/s", ignore=shutil.ignore_patterns(".lock"))
        proc = subprocess.Popen(
            ["swtpm", "socket", "--tpm2", "--tpmstate", f"dir={tmp}/s",
             "--server", f"type=unixio,path={tmp}/tpm",
             "--ctrl", f"type=unixio,path={tmp}/tpm.ctrl",
             "--flags", "not-need-init,startup-clear"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            _wait_for(lambda: Path(f"{tmp}/tpm").exists(), 10, "scratch swtpm")
            env = dict(os.environ, TPM2TOOLS_TCTI=f"swtpm:path={tmp}/tpm")
            out = subprocess.run(
                ["tpm2_nvread", nv_index], env=env, capture_output=True, check=True, timeout=30
            )
            return out.stdout
        finally:
            proc.terminate()
            proc.wait(10)


def _our_ek_cert(host: Host, vm_uuid: str, name: str) -> bytes:
    """The EK certificate in the VM's own (encrypted) vTPM, through SwtpmInstance.

    The swtpm TCTI finds the control socket at ``<data path>.ctrl``: the data socket is
    ``<vm dir>/swtpm`` so that its control socket is the instance's own ``swtpm.ctrl``.
    """
    from host_agent.tpm.adapter import PytssHostTpm
    from host_agent.vtpm.swtpm import SwtpmInstance, SwtpmOptions

    tpm = PytssHostTpm(host.host_tpm.tcti, host.state / "tpm", root="software")
    vm_dir = host.state / "vtpm" / vm_uuid
    inst = SwtpmInstance(
        host.state / "vtpm",
        vm_uuid,
        name,
        tpm,
        options=SwtpmOptions(
            terminate=False, extra_args=("--server", f"type=unixio,path={vm_dir}/swtpm")
        ),
    )
    inst.start()
    try:
        subprocess.run(["swtpm_ioctl", "--unix", str(inst.ctrl_socket), "-i"], check=True)
        env = dict(os.environ, TPM2TOOLS_TCTI=f"swtpm:path={vm_dir}/swtpm")
        subprocess.run(["tpm2_startup", "-c"], env=env, check=True, capture_output=True)
        return subprocess.run(
            ["tpm2_nvread", "0x01c00002"], env=env, capture_output=True, check=True, timeout=30
        ).stdout
    finally:
        inst.stop()
        tpm.close()


# ---------------------------------------------------------------------------- tests


def test_adopt_rewrites_a_libvirt_domain_and_keeps_its_vtpm_identity(host: Host) -> None:
    vm_uuid, name = str(uuid.uuid4()), "plain1"
    console = host.state / "plain1.console"
    host.define(
        plain_domain(
            host, name, vm_uuid,
            "<tpm model='tpm-crb'><backend type='emulator' version='2.0'/></tpm>", console,
        )
    )  # fmt: skip
    # libvirt's own swtpm_setup runs at the first start: the domain gets a libvirt-made vTPM
    host.virsh("start", name)
    host.virsh("destroy", name, check=False)  # may race libvirt's reconnection: see below
    assert "shut off" in host.virsh("domstate", name)
    libvirt_state = host.root / "lib" / "swtpm" / vm_uuid / "tpm2"
    assert (libvirt_state / "tpm2-00.permall").is_file()
    libvirt_ek = _tpm_read(libvirt_state, "0x01c00002")

    t0 = time.monotonic()
    out = host.cli_json("adopt", name)
    adopt_s = time.monotonic() - t0
    assert isinstance(out, dict)
    assert out["changed"] is True and out["vtpm_state"] == "migrated-from-libvirt"
    assert out["previous_tpm_backend"] == "emulator"
    xml = ET.fromstring(host.inactive_xml(name))
    assert xml.find("memoryBacking/source").get("type") == "memfd"
    assert xml.find("memoryBacking/access").get("mode") == "shared"
    assert xml.find("devices/tpm/backend").get("type") == "external"
    assert xml.find("devices/tpm/backend/source").get("path") == out["bridge_socket"]
    chan = [
        c
        for c in xml.findall("devices/channel")
        if c.find("target").get("name") == DEFAULT_CHANNEL_NAME
    ]
    assert len(chan) == 1 and chan[0].find("source").get("path") == out["channel_socket"]
    assert xml.find("features/acpi") is not None
    assert xml.find(f"metadata/{{{ADOPTION_NS}}}adopted") is not None
    record = json.loads((host.state / "vms" / vm_uuid / "adoption.json").read_text())
    assert record["uuid"] == vm_uuid and record["format"] == "vtpm-trust/adoption/1"

    # the VM keeps its vTPM identity: the same EK certificate, now in an encrypted state
    assert _our_ek_cert(host, vm_uuid, name) == libvirt_ek
    permall = (host.state / "vtpm" / vm_uuid / "tpm2" / "tpm2-00.permall").read_bytes()
    assert permall[:8] != (libvirt_state / "tpm2-00.permall").read_bytes()[:8]  # encrypted
    print(f"\nadopt (state carried over): {adopt_s:.2f} s")

    # adopting twice changes nothing
    before = host.inactive_xml(name)
    again = host.cli_json("adopt", name)
    assert isinstance(again, dict) and again["changed"] is False
    assert host.inactive_xml(name) == before
    assert json.loads((host.state / "vms" / vm_uuid / "adoption.json").read_text()) == record


def test_vm_start_boots_the_adopted_domain_with_its_tpm_through_the_bridge(host: Host) -> None:
    name = "plain1"
    console = host.state / "plain1.console"
    start = console.stat().st_size if console.exists() else 0
    t0 = time.monotonic()
    started = host.cli_json("start", name)
    start_s = time.monotonic() - t0
    assert isinstance(started, dict) and started["state"] == "running"
    text = _wait_console(console, "VTPM-RUN-END")[start:]
    ready_s = time.monotonic() - t0
    assert "/dev/tpm0" in text and "No such file" not in text
    assert SEABIOS_PCR0 in text
    assert DEFAULT_CHANNEL_NAME in text  # the attestation channel's port
    # guest RAM is the shared memfd the agent reads (platform-notes, "Guest memory …")
    (qemu,) = pids_under(host.root, "qemu-system")
    fds = [os.readlink(f) for f in Path(f"/proc/{qemu}/fd").iterdir() if f.is_symlink()]
    assert any(f.startswith("/memfd:") for f in fds), fds
    (vm,) = [v for v in host.cli_json("list") if v["name"] == name]  # type: ignore[union-attr]
    assert vm["adopted"] and vm["state"] == "running"
    assert vm["bridge_running"] and vm["swtpm_running"]
    bridge_log = (host.state / "vms" / vm["uuid"] / "bridge.log").read_text()
    assert "QEMU attached" in bridge_log
    print(f"\nvm start returned in {start_s:.2f} s, guest TPM seen after {ready_s:.1f} s")

    stopped = host.cli_json("stop", name)
    assert isinstance(stopped, dict) and stopped["state"] == "shutoff"
    assert not pids_under(host.state / "vtpm" / vm["uuid"], "swtpm")
    assert not pids_under(host.state / "vms" / vm["uuid"], "host_agent.vtpm.bridge")


def test_vm_list_json_shape(host: Host) -> None:
    vms = host.cli_json("list")
    assert isinstance(vms, list) and vms
    for vm in vms:
        assert set(vm) == {
            "name", "uuid", "state", "adopted", "bridge_socket", "bridge_running", "swtpm_running"
        }  # fmt: skip
        assert isinstance(vm["adopted"], bool)
        assert (vm["bridge_socket"] is None) == (not vm["adopted"])
        uuid.UUID(vm["uuid"])
    text = host.cli("list").stdout
    assert all(vm["name"] in text for vm in vms)


def test_unadoptable_domain_is_refused_and_left_unchanged(host: Host) -> None:
    name, vm_uuid = "tpm12", str(uuid.uuid4())
    host.define(
        plain_domain(
            host, name, vm_uuid,
            "<tpm model='tpm-tis'><backend type='emulator' version='1.2'/></tpm>",
            host.state / "tpm12.console",
        )
    )  # fmt: skip
    before = host.inactive_xml(name)
    proc = host.cli("adopt", name, check=False)
    assert proc.returncode == 2
    assert "[lifecycle.domain.unadoptable]" in proc.stderr and "1.2" in proc.stderr
    assert host.inactive_xml(name) == before
    assert not (host.state / "vms" / vm_uuid / "adoption.json").exists()
    assert not (host.state / "vtpm" / vm_uuid).exists()
    # and a domain that was never adopted cannot be started through the agent
    proc = host.cli("start", name, check=False)
    assert proc.returncode == 2 and "not adopted" in proc.stderr
    missing = host.cli("adopt", "no-such-domain", check=False)
    assert missing.returncode == 2 and "[hypervisor.domain_not_found]" in missing.stderr


def test_vm_create_boots_an_image_and_nothing_outlives_a_destroyed_vm(host: Host) -> None:
    t0 = time.monotonic()
    made = host.cli_json(
        "create", "made1", "--image", str(host.image.directory), "--memory", "256",
        "--cmdline-extra", RUN,
    )  # fmt: skip
    create_s = time.monotonic() - t0
    assert isinstance(made, dict) and made["vtpm_state"] == "provisioned"
    vm_uuid = made["uuid"]
    console = host.state / "vms" / vm_uuid / "console.log"
    host.cli_json("start", "made1")
    text = _wait_console(console, "VTPM-RUN-END")
    assert "/dev/tpm0" in text and SEABIOS_PCR0 in text and DEFAULT_CHANNEL_NAME in text
    print(f"\nvm create (incl. swtpm_setup): {create_s:.2f} s")

    # QEMU goes away without the agent (virsh destroy): swtpm (--terminate) and the bridge
    # (--once) end on their own, so no vTPM outlives its VM even with no daemon running
    # (a new process's destroy races libvirt's reconnection to QEMU, and may report "not
    # running" for the domain it has just killed: check the state instead)
    host.virsh("destroy", "made1", check=False)
    assert "shut off" in host.virsh("domstate", "made1")
    _wait_for(
        lambda: (
            not pids_under(host.state / "vtpm" / vm_uuid, "swtpm")
            and not pids_under(host.state / "vms" / vm_uuid, "host_agent.vtpm.bridge")
        ),
        15,
        "swtpm and bridge to exit after QEMU",
    )
    (vm,) = [v for v in host.cli_json("list") if v["name"] == "made1"]  # type: ignore[union-attr]
    assert vm["state"] == "shutoff" and not vm["bridge_running"] and not vm["swtpm_running"]


# ---------------------------------------------------------------------------- the daemon's hook
# VmManager.supervise() runs where the embedded root is held (the daemon): here a spawned worker
# holds it, since libvirt binds a process to its first embedded root (see test_libvirt_adapter).

_W: dict[str, Any] = {}


def _w_supervise(state: str, tcti: str) -> None:
    from host_agent.lifecycle.adoption import VmManager, daemon_socket_of
    from host_agent.lifecycle.embedded import embedded_uri
    from host_agent.lifecycle.libvirt_adapter import Hypervisor
    from host_agent.tpm.adapter import PytssHostTpm

    hv = Hypervisor(embedded_uri(Path(state) / "libvirt"))
    tpm = PytssHostTpm(tcti, Path(state) / "tpm", root="software")
    events: list[Any] = []
    hv.subscribe(events.append)
    m = VmManager(
        hypervisor=hv,
        state_dir=Path(state),
        sealer=lambda: tpm,
        runtime_dir=Path(state) / "run" / "bridges",
        daemon_socket=daemon_socket_of(Path(state)),
    )
    m.supervise()
    _W.update(hv=hv, tpm=tpm, events=events, m=m)


def _w_start_then_destroy(name: str, timeout: float) -> dict[str, Any]:
    m, hv = _W["m"], _W["hv"]
    info = m.start(name)
    layout = m.layout(info.uuid)
    pid_file_while_running = layout.bridge_pid.exists()
    hv.destroy(name)  # not m.stop(): as if QEMU went away on its own
    deadline = time.monotonic() + timeout
    while layout.bridge_pid.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return {
        "uuid": info.uuid,
        "pid_file_while_running": pid_file_while_running,
        "pid_file_after": layout.bridge_pid.exists(),
        "events": [e.name for e in _W["events"] if e.vm.uuid == info.uuid],
    }


def _w_close() -> None:
    _W["hv"].close()
    _W["tpm"].close()


def test_supervise_cleans_up_after_a_vm_that_stops_on_its_own(host: Host) -> None:
    pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))
    try:
        pool.submit(_w_supervise, str(host.state), host.host_tpm.tcti).result(60)
        out = pool.submit(_w_start_then_destroy, "made1", 20.0).result(120)
        pool.submit(_w_close).result(30)
    finally:
        pool.shutdown(wait=True)
    assert out["pid_file_while_running"] and not out["pid_file_after"]
    assert "stopped.destroyed" in out["events"]
    vm_uuid = out["uuid"]
    _wait_for(
        lambda: (
            not pids_under(host.state / "vtpm" / vm_uuid, "swtpm")
            and not pids_under(host.state / "vms" / vm_uuid, "host_agent.vtpm.bridge")
        ),
        15,
        "swtpm and bridge to be gone",
    )
