"""The Debian disk image (vm_images/disk.py) under QEMU/TCG with a real swtpm: one boot.

The guest runs from an ext4 root on virtio-blk with the image's IMA policy, so its IMA list holds
real measurements of the root file system; they must replay to the TPM's PCR 10, and the
firmware event log to PCRs 0-7. The guest is booted once for the module; every check only reads.
The disk is attached with ``snapshot=on``, so the cached image is never written.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from evidence.eventlog import parse_tcg2_log, replay_pcrs
from evidence.ima import parse_ima_list, replay_ima_pcr10
from tests.helpers.qemu import Guest, GuestConfig, GuestFactory, require_binaries
from vm_images.disk import DiskImage, build_disk_image

PORT = "org.example.attest.0"
EVENT_LOG = "/sys/kernel/security/tpm0/binary_bios_measurements"
IMA_DIR = "/sys/kernel/security/ima"
PCR = "/sys/class/tpm/tpm0/pcr-sha256"


@pytest.fixture(scope="module")
def disk_image(request: pytest.FixtureRequest) -> DiskImage:
    """The disk image, built through its cache (the first build takes a few minutes)."""
    require_binaries("qemu-system-x86_64", "swtpm", "debootstrap", "mkfs.ext4")
    reporter = request.config.pluginmanager.getplugin("terminalreporter")

    def progress(msg: str) -> None:
        line = f"vm_images.disk: {msg}"
        if reporter is not None:
            reporter.write_line(line)
        else:
            print(line, file=sys.stderr)

    return build_disk_image(progress=progress)


@pytest.fixture(scope="module")
def disk_guest(disk_image: DiskImage, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Guest]:
    config = GuestConfig(
        kernel=disk_image.kernel,
        initramfs=disk_image.initrd,
        ssh_key=disk_image.ssh_private_key,
        ssh_host_key=disk_image.ssh_host_public_key,
        cmdline=disk_image.cmdline,
        memory_mib=512,
        extra_args=disk_image.qemu_drive_args(),
    )
    factory = GuestFactory(config, tmp_path_factory.mktemp("disk"))
    try:
        guest = factory("disk", vports=(PORT,), wait=False)
        try:
            guest.wait_ready(timeout=300)
        except Exception:
            print(guest.diagnostics(), file=sys.stderr)
            raise
        yield guest
    finally:
        factory.close()


def _pcr(guest: Guest, index: int) -> bytes:
    return bytes.fromhex(guest.check(f"cat {PCR}/{index}").decode().strip())


def test_boots_from_the_ext4_root_to_ready(disk_guest: Guest, disk_image: DiskImage) -> None:
    line = disk_guest.wait_for_console("VTPM-GUEST-READY", timeout=1)
    assert f"image={disk_image.key}" in line
    ima_at_ready = int(line.rsplit("ima=", 1)[1])
    assert ima_at_ready > 20, "the boot alone measures init, sshd, libraries and modules"
    assert "IMA policy loaded" in disk_guest.console_text()
    source, fstype = disk_guest.check("findmnt -n -o SOURCE,FSTYPE /").decode().split()
    assert (source, fstype) == ("/dev/vda", "ext4")
    assert disk_image.root_uuid in disk_guest.check("busybox blkid /dev/vda").decode()
    assert disk_guest.check("uname -r").decode().strip() == disk_image.kernel_release
    print(f"boot to READY: {disk_guest.ready_seconds:.1f} s ({line})")


def test_ima_list_measures_the_root_file_system(disk_guest: Guest) -> None:
    # Run the programs the checks below rely on, so the list has them whatever the order.
    disk_guest.check("python3 -c 'import json' && /usr/local/bin/vtpm-guest --help >/dev/null")
    text = disk_guest.check(f"cat {IMA_DIR}/ascii_runtime_measurements").decode()
    entries = [line.split() for line in text.splitlines()]
    assert entries[0][4] == "boot_aggregate"
    paths = [e[4] for e in entries[1:]]
    assert all(e[2] == "ima-ng" and e[3].startswith("sha256:") for e in entries)
    assert len(paths) > 20
    assert all(p.startswith("/") for p in paths)
    assert sum(p.startswith(("/usr/bin/", "/usr/sbin/")) for p in paths) >= 3
    assert sum(p.startswith("/usr/lib/") for p in paths) >= 10
    for expected in ("/usr/sbin/sshd", "/usr/bin/python3.11", "/usr/sbin/vtpm-init"):
        assert expected in paths, f"{expected} not measured"
    assert any(p.endswith("/virtio_net.ko") for p in paths), "modprobe from the root not measured"
    assert any(p.startswith("/opt/vtpm-guest/guest_agent/") for p in paths)
    print(f"IMA entries: {len(entries)}")


def test_ima_list_replays_to_pcr10(disk_guest: Guest) -> None:
    # The list and PCR 10 are read by programs already measured; if anything new got measured
    # in between (PCR 10 moved during the read), read again.
    snap = "/tmp/ima.bin"
    for _ in range(5):
        before = disk_guest.check(
            f"cat {PCR}/10; cat {IMA_DIR}/binary_runtime_measurements > {snap}; cat {PCR}/10"
        ).split()
        if before[0] == before[1]:
            break
    else:
        pytest.fail("PCR 10 kept changing while the IMA list was read")
    data = disk_guest.ssh().read_file(snap)
    raw = parse_ima_list(data, "binary")
    replay = replay_ima_pcr10(raw, "5.8", banks=("sha256",))
    assert replay.entries > 20
    assert replay.template_hash_mismatches == 0
    assert replay.pcr10["sha256"] == bytes.fromhex(before[0].decode())


def test_event_log_replays_to_pcrs_0_to_7(disk_guest: Guest) -> None:
    data = disk_guest.ssh().read_file(EVENT_LOG)
    replayed = replay_pcrs(parse_tcg2_log(data))["sha256"]
    assert {i: replayed[i] for i in range(8)} == {i: _pcr(disk_guest, i) for i in range(8)}


def test_python_and_the_guest_agent(disk_guest: Guest) -> None:
    t = time.monotonic()
    out = disk_guest.check(
        "python3 -c 'import sys, guest_agent, guest_agent.cli, guest_agent.quote, "
        "guest_agent.channel; print(sys.version_info[:2], guest_agent.__file__)'"
    ).decode()
    assert "(3, 11) /opt/vtpm-guest/guest_agent/__init__.py" in out
    res = disk_guest.run("vtpm-guest --help")
    assert res.status == 0 and b"quote" in res.stdout
    print(f"agent import + --help: {time.monotonic() - t:.1f} s")


def test_virtio_serial_port_is_linked_by_name(disk_guest: Guest) -> None:
    assert disk_guest.check(f"readlink /dev/virtio-ports/{PORT}").startswith(b"../vport")


def test_second_build_is_a_noop(disk_image: DiskImage) -> None:
    lines: list[str] = []
    t = time.monotonic()
    again = build_disk_image(progress=lines.append)
    assert not again.built and again.key == disk_image.key
    assert any("nothing to do" in line for line in lines)
    assert time.monotonic() - t < 10
    assert Path(again.image).stat().st_size == disk_image.manifest["size_bytes"]
