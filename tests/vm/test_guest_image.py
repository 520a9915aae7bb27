"""The vm_images test guest under QEMU/TCG with a real swtpm: everything other issues rely on.

One guest is booted for the module and shared by the read-only checks; tests that power off,
save or restore boot their own.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import re
import subprocess
import threading
import time
from pathlib import Path

import pytest

from evidence.eventlog import parse_tcg2_log, replay_pcrs
from tests.helpers.qemu import Guest, GuestFactory, QemuError, SshResult
from vm_images.build import GuestImage, build_image

REPO = Path(__file__).resolve().parents[2]
PORT = "org.example.attest.0"
EVENT_LOG = "/sys/kernel/security/tpm0/binary_bios_measurements"


@pytest.fixture(scope="module")
def guest(module_boot_guest: GuestFactory) -> Guest:
    """A guest with TPM, SSH, one virtio-serial port, the repo over 9p and memfd RAM."""
    return module_boot_guest("shared", vports=(PORT,), repo=True, memfd=True)


def _sysfs_pcrs(guest: Guest) -> dict[int, bytes]:
    out = guest.check(
        "for i in 0 1 2 3 4 5 6 7; do echo $i $(cat /sys/class/tpm/tpm0/pcr-sha256/$i); done"
    )
    pcrs = {}
    for line in out.decode().splitlines():
        index, value = line.split()
        pcrs[int(index)] = bytes.fromhex(value)
    return pcrs


def test_boot_reaches_ready_marker(guest: Guest, guest_image: GuestImage) -> None:
    line = guest.wait_for_console("VTPM-GUEST-READY", timeout=1)
    assert f"image={guest_image.key}" in line
    assert guest.ready_seconds is not None and guest.ready_seconds < 60
    print(f"boot to READY: {guest.ready_seconds:.2f} s ({line})")


def test_ssh_exec_returns_output_and_status(guest: Guest, guest_image: GuestImage) -> None:
    assert guest.check("uname -r").decode().strip() == guest_image.kernel_version
    assert guest.check("cat /etc/vtpm/image-key").decode().strip() == guest_image.key
    res = guest.run("echo out; echo err >&2; exit 3")
    assert res == SshResult(status=3, stdout=b"out\n", stderr=b"err\n")
    assert guest.check("cat", stdin=b"\x00\xffbinary") == b"\x00\xffbinary"


def test_guest_has_tpm_device(guest: Guest) -> None:
    guest.check("test -c /dev/tpm0 && test -c /dev/tpmrm0")
    assert guest.check("cat /sys/class/tpm/tpm0/tpm_version_major").strip() == b"2"


def test_sysfs_pcrs_are_readable(guest: Guest) -> None:
    pcrs = _sysfs_pcrs(guest)
    assert sorted(pcrs) == list(range(8))
    assert all(len(v) == 32 for v in pcrs.values())
    assert pcrs[0] != bytes(32), "SeaBIOS measures into PCR0"


def test_event_log_replays_to_sysfs_pcrs(guest: Guest, tmp_path: Path) -> None:
    data = guest.ssh().read_file(EVENT_LOG)
    assert len(data) > 1000
    assert b"Spec ID Event03" in data[:100], "SeaBIOS writes a crypto-agile (TCG2) log"
    pcrs = _sysfs_pcrs(guest)

    replayed = replay_pcrs(parse_tcg2_log(data))["sha256"]
    assert {i: replayed[i] for i in range(8)} == pcrs

    # tpm2_eventlog as an independent oracle (STYLE.md: allowed in tests, never in the product).
    log = tmp_path / "bios.log"
    log.write_bytes(data)
    yaml = subprocess.run(["tpm2_eventlog", str(log)], capture_output=True, text=True, check=True)
    section = yaml.stdout.split("\npcrs:", 1)[1].split("  sha256:\n", 1)[1]
    oracle = {}
    for line in section.splitlines():
        m = re.fullmatch(r"\s+(\d+)\s*:\s*0x([0-9a-fA-F]+)", line)
        if not m:
            break  # the next bank starts
        oracle[int(m[1])] = bytes.fromhex(m[2])
    assert {i: oracle[i] for i in range(8)} == pcrs


def test_virtio_serial_port_carries_bytes_both_ways(guest: Guest) -> None:
    assert guest.check(f"readlink /dev/virtio-ports/{PORT}").startswith(b"../vport")
    with guest.vport_connect(PORT) as host_end:
        result: list[SshResult] = []
        reader = threading.Thread(
            target=lambda: result.append(guest.run(f"head -c 5 /dev/virtio-ports/{PORT}"))
        )
        reader.start()
        time.sleep(0.3)
        host_end.sendall(b"hello")
        reader.join(30)
        assert result and result[0].stdout == b"hello"

        guest.check(f"printf pong > /dev/virtio-ports/{PORT}")
        host_end.settimeout(10)
        got = b""
        while len(got) < 4:
            chunk = host_end.recv(16)
            assert chunk, "host end closed"
            got += chunk
        assert got == b"pong"


def test_python_runs_with_the_agent_modules(guest: Guest) -> None:
    assert guest.check("python3 -c 'import json,hashlib; print(1)'") == b"1\n"
    modules = "json argparse base64 hashlib hmac os select struct socket asyncio mmap fcntl"
    script = (
        f"import importlib, hashlib, hmac, sys\n"
        f"for m in {modules.split()!r}: importlib.import_module(m)\n"
        f"print(sys.version.split()[0], hashlib.sha256(b'x').hexdigest(),"
        f" hmac.new(b'k', b'm', 'sha256').hexdigest())\n"
    )
    version, sha, mac = guest.check("python3 -", stdin=script.encode()).decode().split()
    assert version.startswith("3.11.")
    assert sha == hashlib.sha256(b"x").hexdigest()
    assert mac == hmac.new(b"k", b"m", "sha256").hexdigest()


def test_guest_agent_imports_with_the_trimmed_stdlib(guest: Guest) -> None:
    """Every guest_agent module imports in the guest's Python, straight from the 9p share."""
    script = (
        "import importlib, pkgutil, guest_agent\n"
        "for m in pkgutil.walk_packages(guest_agent.__path__, 'guest_agent.'):\n"
        "    if not m.name.endswith('.__main__'):\n"  # importing __main__ would run the CLI
        "        importlib.import_module(m.name)\n"
        "        print(m.name)\n"
    )
    res = guest.run("cd /mnt/repo && PYTHONDONTWRITEBYTECODE=1 python3 -", stdin=script.encode())
    assert res.status == 0, res.stderr.decode(errors="replace")
    host = set()
    for path in (REPO / "guest_agent").rglob("*.py"):
        parts = path.relative_to(REPO).with_suffix("").parts
        parts = parts[:-1] if parts[-1] == "__init__" else parts
        if len(parts) > 1 and parts[-1] != "__main__":
            host.add(".".join(parts))
    assert sorted(res.text.split()) == sorted(host)


def test_repo_share_is_mounted_read_only(guest: Guest) -> None:
    mounts = guest.check("grep ' /mnt/repo ' /proc/mounts").decode()
    assert " 9p " in mounts and " ro," in mounts
    assert (
        guest.ssh().read_file("/mnt/repo/pyproject.toml") == (REPO / "pyproject.toml").read_bytes()
    )
    assert guest.run("touch /mnt/repo/should-not-exist").status != 0


def test_memwriter_reports_pages_and_soft_dirty_agrees(guest: Guest) -> None:
    out = guest.check("memwriter -m 8 -r 3 -n 5 -s 7 -d -p").decode().splitlines()
    events = [json.loads(line) for line in out]
    ready, rounds, done = events[0], events[1:-1], events[-1]
    assert ready["event"] == "ready" and ready["pages"] == 2048 and len(ready["pfns"]) == 2048
    assert done == {"event": "done", "rounds": 3}
    assert [r["round"] for r in rounds] == [1, 2, 3]
    for r in rounds:
        assert len(set(r["pages"])) == 5 and all(0 <= p < 2048 for p in r["pages"])
        # Soft-dirty works in the guest kernel (CONFIG_MEM_SOFT_DIRTY=y), unlike on the host:
        # exactly the written pages are dirty after each clear_refs.
        assert r["soft_dirty"] == r["pages"]
        assert r["pfns"] == [ready["pfns"][p] for p in r["pages"]]
    # Same seed, same pages: the test's ground truth is reproducible.
    again = guest.check("memwriter -m 8 -r 3 -n 5 -s 7").decode().splitlines()
    assert [json.loads(x).get("pages") for x in again[1:-1]] == [r["pages"] for r in rounds]


def test_memwriter_pfns_are_offsets_in_the_memfd(guest: Guest) -> None:
    """What the memory engine relies on: guest pfn × 4096 is the page's offset in the memfd."""
    out = guest.check(
        "(memwriter -m 4 -r 1 -n 3 -s 3 -p -H > /tmp/mw.json 2>&1 &);"
        " while ! grep -q done /tmp/mw.json; do usleep 20000; done; cat /tmp/mw.json"
    )
    ready, written = (json.loads(x) for x in out.decode().splitlines()[:2])
    fd = os.open(guest.memfd_path(), os.O_RDONLY)
    try:
        for page, pfn in zip(written["pages"], written["pfns"], strict=True):
            vpage = int(ready["addr"], 16) // 4096 + page
            in_guest = guest.check(
                f"dd if=/proc/{ready['pid']}/mem bs=4096 skip={vpage} count=1 2>/dev/null"
            )
            assert len(in_guest) == 4096
            assert os.pread(fd, 4096, pfn * 4096) == in_guest
    finally:
        os.close(fd)
        guest.check(f"kill {ready['pid']}")


def test_qmp_stop_cont_events_and_memfd(guest: Guest) -> None:
    assert guest.qmp.query_status() == "running"
    guest.qmp.stop()
    assert guest.qmp.query_status() == "paused"
    assert guest.qmp.wait_event("STOP", timeout=5)["event"] == "STOP"
    guest.qmp.cont()
    assert guest.qmp.wait_event("RESUME", timeout=5)["event"] == "RESUME"
    assert guest.qmp.query_status() == "running"
    assert guest.memfd_path().stat().st_size == 256 * 1024 * 1024
    guest.check("true")  # still answers after the pause


def test_second_build_is_a_noop(guest_image: GuestImage) -> None:
    lines: list[str] = []
    t = time.monotonic()
    again = build_image(progress=lines.append)
    assert time.monotonic() - t < 5
    assert not again.built and again.key == guest_image.key
    assert lines and "nothing to do" in lines[0]


def test_run_and_ima_policy_options_then_power_off(boot_guest: GuestFactory) -> None:
    script = (
        "before=$(wc -l < /sys/kernel/security/ima/ascii_runtime_measurements)\n"
        "/usr/bin/memwriter -m 1 -r 0 >/dev/null\n"
        "after=$(wc -l < /sys/kernel/security/ima/ascii_runtime_measurements)\n"
        'echo "ima $before $after"\n'
    )
    b64 = base64.b64encode(script.encode()).decode()
    guest = boot_guest(
        net=False,
        wait=False,
        append=(
            'ima_policy=tcb ima_hash=sha256 vtpm.ima_policy="measure func=BPRM_CHECK" '
            f"vtpm.run_b64={b64}"
        ),
    )
    guest.wait_ready()
    end = guest.wait_for_console("VTPM-RUN-END", timeout=60)
    assert end == "VTPM-RUN-END rc=0"
    m = re.search(r"ima (\d+) (\d+)", guest.console_text())
    assert m, guest.console_text()[-2000:]
    before, after = int(m[1]), int(m[2])
    assert after > before >= 1, "the vtpm.ima_policy rule measures every exec"
    assert guest.proc is not None and guest.proc.wait(30) == 0, "vtpm.run powers off"


def test_save_to_file_and_restore_into_a_new_swtpm(
    boot_guest: GuestFactory, tmp_path: Path
) -> None:
    src = boot_guest("source", memfd=True)
    src.check("echo remember-me > /tmp/marker")
    pcrs = _sysfs_pcrs(src)
    state = tmp_path / "state.bin"
    t = time.monotonic()
    src.qmp.stop()  # a save stops first (platform-notes §6); the restore then ends "paused"
    info = src.qmp.migrate_to_file(state)
    saved_in = time.monotonic() - t
    assert info["status"] == "completed"
    assert b"tpm-emulator" in state.read_bytes()
    dump = tmp_path / "mem.elf"
    src.qmp.dump_guest_memory(dump)
    assert dump.read_bytes()[:4] == b"\x7fELF"
    src.shutdown()

    dst = boot_guest("restored", memfd=True, incoming=f"exec:cat {state}")
    deadline = time.monotonic() + 30
    while (status := dst.qmp.query_status()) == "inmigrate":
        if time.monotonic() > deadline:
            raise QemuError(f"restore still inmigrate after 30 s\n{dst.diagnostics()}")
        time.sleep(0.05)
    assert status == "paused"
    dst.qmp.cont()
    assert dst.check("cat /tmp/marker") == b"remember-me\n"
    assert _sysfs_pcrs(dst) == pcrs, "the vTPM state came back through the migration stream"
    print(f"migrate to file: {saved_in:.2f} s, {state.stat().st_size / 1e6:.1f} MB")

    dst.check("poweroff")  # busybox init runs PID 1, so a guest can shut itself down
    assert dst.proc is not None and dst.proc.wait(30) == 0


def test_boot_failure_reports_the_console_tail(boot_guest: GuestFactory, tmp_path: Path) -> None:
    bad = tmp_path / "not-a-cpio"
    bad.write_bytes(b"this is not an initramfs\n" * 100)
    with pytest.raises(QemuError) as err:
        boot_guest(initramfs=bad, tpm=False, net=False)
    assert "Kernel panic" in str(err.value), str(err.value)
    assert "console tail" in str(err.value)
    assert not boot_guest.guests, "a guest that failed to boot is not kept"
