"""Issue 8 with a real VM: live migration between two namespace hosts, each with its own libvirtd.

Host A lives in network namespace ``migA`` (10.78.0.1), host B in ``migB`` (10.78.0.2); each runs
a real ``libvirtd`` in a private mount namespace (``tests/helpers/libvirtd_ns.py``), listening on
its namespace address only. QEMU runs under TCG; the guest is the ``vm_images`` initramfs guest.
"""

from __future__ import annotations

import os
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.libvirtd_ns import NsLibvirtd, libvirtd_pair
from tests.helpers.netns import NetnsPair, two_hosts
from vm_images.build import READY_MARKER, GuestImage, build_image

BOOT_TIMEOUT = 150.0
NAMES = {"a": "migA", "b": "migB", "veth_a": "vmigA", "veth_b": "vmigB"}
ADDRS = {"addr_a": "10.78.0.1", "addr_b": "10.78.0.2"}


@pytest.fixture(scope="module")
def image() -> GuestImage:
    return build_image(progress=None)


@pytest.fixture(scope="module")
def lab() -> Iterator[tuple[NetnsPair, NsLibvirtd, NsLibvirtd, Path]]:
    if os.geteuid() != 0:
        pytest.fail("the e2e tier needs root for `ip netns` and libvirtd (platform-notes §7, §8)")
    # Short: QEMU's monitor socket lives under <root>/var/lib/libvirt/qemu/…
    root = Path(tempfile.mkdtemp(prefix="ml-", dir="/tmp"))
    with two_hosts(**NAMES, **ADDRS) as net, libvirtd_pair(net, root / "lv") as (a, b):
        yield net, a, b, root


def plain_domain_xml(image: GuestImage, name: str, vm_uuid: str, console: Path) -> str:
    """A guest with nothing of ours: memfd RAM (as adoption gives it), a file console."""
    return f"""<domain type='qemu'>
  <name>{name}</name><uuid>{vm_uuid}</uuid>
  <memory unit='MiB'>256</memory><vcpu>1</vcpu>
  <memoryBacking><source type='memfd'/><access mode='shared'/></memoryBacking>
  <os><type arch='x86_64' machine='pc'>hvm</type><kernel>{image.kernel}</kernel>
      <initrd>{image.initramfs}</initrd><cmdline>{image.cmdline}</cmdline></os>
  <features><acpi/><apic/></features>
  <devices>
    <serial type='file'><source path='{console}' append='on'/><target port='0'/></serial>
    <memballoon model='none'/>
  </devices>
</domain>"""


def wait_console(console: Path, marker: str, timeout: float = BOOT_TIMEOUT) -> float:
    start = time.monotonic()
    while marker not in (console.read_text(errors="replace") if console.exists() else ""):
        assert time.monotonic() - start < timeout, f"no {marker!r} on {console}"
        time.sleep(0.2)
    return time.monotonic() - start


def test_each_namespace_host_has_its_own_libvirtd(
    lab: tuple[NetnsPair, NsLibvirtd, NsLibvirtd, Path],
) -> None:
    net, a, b, _ = lab
    assert a.uri == "qemu+tcp://10.78.0.1/system" and b.uri == "qemu+tcp://10.78.0.2/system"
    uuids = {d.virsh("capabilities").stdout.split("<uuid>")[1][:36] for d in (a, b)}
    assert uuids == {a.host_uuid, b.host_uuid}, "distinct host UUIDs, or libvirt refuses"
    # B's libvirtd is reachable from A's namespace (what a peer-to-peer migration needs) …
    done = net.run(net.a, ["virsh", "-q", "-c", b.uri, "uri"])
    assert done.returncode == 0 and done.stdout.strip() == b.uri
    # … and from nowhere else: not from the root namespace.
    outside = os.system(f"timeout 5 virsh -q -c {b.uri} uri >/dev/null 2>&1")
    assert outside != 0


def test_plain_live_migration_between_the_two_libvirtds(
    lab: tuple[NetnsPair, NsLibvirtd, NsLibvirtd, Path], image: GuestImage
) -> None:
    _net, a, b, root = lab
    vm = str(uuid.uuid4())
    console = root / "plain-console.log"
    xml = root / "plain.xml"
    xml.write_text(plain_domain_xml(image, "plain", vm, console))
    a.virsh("create", str(xml))
    try:
        wait_console(console, READY_MARKER)
        [qemu_a] = a.pids("qemu-system")
        start = time.monotonic()
        a.virsh("migrate", "--live", "--p2p", "plain", b.uri, f"tcp://{b.address}")
        took = time.monotonic() - start
        assert a.domstate("plain") == "absent"  # a transient domain leaves the source
        assert b.domstate("plain") == "running"
        [qemu_b] = b.pids("qemu-system")
        assert qemu_b != qemu_a and not Path(f"/proc/{qemu_a}").exists()
        # The QEMU on B runs in B's network namespace.
        assert os.readlink(f"/proc/{qemu_b}/ns/net") != os.readlink("/proc/self/ns/net")
        assert b.virsh("qemu-monitor-command", "plain", "--hmp", "info status").stdout.strip() == (
            "VM status: running"
        )
        print(f"\nplain live migration (TCG, 256 MiB): {took:.2f} s")
    finally:
        a.virsh("destroy", "plain", check=False)
        b.virsh("destroy", "plain", check=False)
