"""Sealed save and verified restore through libvirt (embedded driver), as an operator runs them.

One host: a swtpm as host TPM, the store, ``vtpm-host daemon`` as its own process. Every other
command is its own process too (``vtpm-host vm …``, ``virsh``): the embedded driver's root is
locked by whoever opens it. One VM made with ``vtpm-host vm create`` and booted once; it then goes
through ``vm save``/``vm restore``, plain ``virsh save``/``virsh restore``, managedsave, and an
external-memory snapshot with ``vm revert``. Tests run in file order and hand the VM on.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from host_agent.config import AgentConfig, TpmConfig
from host_agent.lifecycle.embedded import prepare_embedded_root
from host_agent.service.daemon import ControlClient
from host_agent.store.provision import ensure_store
from host_agent.tpm.adapter import PytssHostTpm
from tests.helpers.procs import kill_leftovers
from tests.helpers.swtpm import Swtpm, start_swtpm
from vm_images.build import GuestImage

REPO = Path(__file__).resolve().parents[2]
BOOT_TIMEOUT = 120.0
MARK = b"VTPM-TRUST-MARK!" * 256  # one page

GUEST_SCRIPT = r"""
printf 'VTPM-TRUST-MARK!%.0s' $(seq 1 1024) > /tmp/mark
python3 - <<'EOF'
import os, struct, hashlib
fd = os.open("/dev/tpmrm0", os.O_RDWR)
auth = struct.pack(">IHBH", 0x40000009, 0, 0, 0)
body = struct.pack(">II", 23, len(auth)) + auth + struct.pack(">IH", 1, 0xB)
body += hashlib.sha256(b"libvirt save").digest()
os.write(fd, struct.pack(">HII", 0x8002, 10 + len(body), 0x182) + body)
r = os.read(fd, 4096)
assert struct.unpack(">I", r[6:10])[0] == 0, r.hex()
print("EXTENDED")
EOF
"""


@dataclass
class Host:
    state: Path
    host_tpm: Swtpm
    image: GuestImage
    env: dict[str, str]
    daemon: subprocess.Popen[bytes] | None = None
    logs: list[Path] = field(default_factory=list)

    @property
    def root(self) -> Path:
        return self.state / "libvirt"

    @property
    def uri(self) -> str:
        return f"qemu:///embed?root={self.root}"

    @property
    def runtime(self) -> Path:
        return self.state / "run" / "bridges"

    @property
    def control(self) -> ControlClient:
        return ControlClient(self.state / "run" / "control.sock")

    def cli(
        self, *args: str, check: bool = True, state: bool = True
    ) -> subprocess.CompletedProcess[str]:
        extra = ["--state-dir", str(self.state)] if state else []
        cmd = [sys.executable, "-m", "host_agent.cli", *args, *extra]
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=300, cwd=REPO, env=self.env
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"{' '.join(args)}: rc {proc.returncode}\n{proc.stderr[-3000:]}\n{self.logs_tail()}"
            )
        return proc

    def vm(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.cli("vm", *args, "--tcti", self.host_tpm.tcti, "--runtime-dir",
                        str(self.runtime), check=check)  # fmt: skip

    def virsh(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            ["virsh", "-q", "-c", self.uri, *args], capture_output=True, text=True, timeout=300
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"virsh {' '.join(args)}: {proc.stderr[-2000:]}")
        return proc

    def domstate(self, name: str) -> str:
        return self.virsh("domstate", name).stdout.strip()

    def pcrs(self, name: str) -> dict[str, str]:
        out = self.cli(
            "vm", "pcrs", name, "--json", "--runtime-dir", str(self.runtime), state=False
        ).stdout
        pcrs: dict[str, str] = json.loads(out)["pcrs"]
        return pcrs

    def wait_armed(self, vm_uuid: str, timeout: float = 30.0) -> None:
        """Until a bridge of the VM is registered and alive (the daemon armed it)."""
        reg = self.runtime / f"{vm_uuid}.json"
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(OSError, ValueError):
                pid = json.loads(reg.read_text())["pid"]
                if Path(f"/proc/{pid}").exists():
                    return
            assert time.monotonic() < deadline, f"VM {vm_uuid} was not armed\n{self.logs_tail()}"
            time.sleep(0.1)

    def records(self, vm_uuid: str) -> list[dict[str, str]]:
        recs: list[dict[str, str]] = self.control.call("records", vm_uuid=vm_uuid)["records"]
        return recs

    def start_daemon(self) -> None:
        log = self.state / f"daemon{len(self.logs)}.log"
        self.logs.append(log)
        with open(log, "wb") as out:
            self.daemon = subprocess.Popen(
                [sys.executable, "-m", "host_agent.cli", "daemon", "--state-dir",
                 str(self.state), "--runtime-dir", str(self.runtime)],
                stdout=out, stderr=subprocess.STDOUT, env=self.env, cwd=REPO,
            )  # fmt: skip
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(Exception):
                if self.control.call("status")["run_state"] == "running":
                    return
            assert self.daemon.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline
            time.sleep(0.1)

    def log_text(self) -> str:
        return "".join(p.read_text(errors="replace") for p in self.logs if p.exists())

    def logs_tail(self) -> str:
        return "".join(p.read_text(errors="replace")[-3000:] for p in self.logs if p.exists())


@pytest.fixture(scope="module")
def host(guest_image: GuestImage) -> Iterator[Host]:
    state = Path(tempfile.mkdtemp(prefix="vsl-", dir="/tmp"))
    tpm = start_swtpm(state / "hosttpm")
    env = {**os.environ, "PYTHONPATH": str(REPO), "VTPM_TPM_TCTI": tpm.tcti}
    h = Host(state, tpm, guest_image, env)
    config = AgentConfig(state_dir=state, tpm=TpmConfig(tcti=tpm.tcti, state_dir=state / "tpm"))
    port = PytssHostTpm(tpm.tcti, config.tpm.state_dir, root="software", connection="per-call")
    try:
        ensure_store(port, config)
    finally:
        port.close()
    prepare_embedded_root(h.root)
    (h.root / "log").mkdir(parents=True, exist_ok=True)  # vm commands log libvirt there
    h.start_daemon()
    yield h
    with contextlib.suppress(AssertionError, subprocess.TimeoutExpired):
        h.virsh("destroy", "sr", check=False)
    if h.daemon is not None and h.daemon.poll() is None:
        h.daemon.terminate()
        h.daemon.wait(10)
    print(h.logs_tail())
    kill_leftovers(state)
    tpm.stop()
    shutil.rmtree(state, ignore_errors=True)


@pytest.fixture(scope="module")
def vm(host: Host) -> dict[str, str]:
    script = base64.b64encode(GUEST_SCRIPT.encode()).decode()
    made = json.loads(
        host.vm("create", "sr", "--image", str(host.image.directory), "--memory", "256",
                "--cmdline-extra", f"vtpm.run_b64={script} vtpm.poweroff=0", "--json").stdout
    )  # fmt: skip
    console = host.state / "vms" / made["uuid"] / "console.log"
    host.vm("start", "sr")
    deadline = time.monotonic() + BOOT_TIMEOUT
    while "VTPM-RUN-END" not in (console.read_text(errors="replace") if console.exists() else ""):
        assert time.monotonic() < deadline, "guest did not run its script"
        time.sleep(0.2)
    assert "EXTENDED" in console.read_text(errors="replace")
    return {"uuid": made["uuid"], "name": "sr", "pcrs": json.dumps(host.pcrs("sr"))}


def flipped_copy(src: Path, dst: Path) -> Path:
    data = bytearray(src.read_bytes())
    at = data.find(MARK)
    assert at > 0, "the marker page is in the image (uncompressed save format)"
    data[at + 100] ^= 0x01
    dst.write_bytes(bytes(data))
    return dst


def test_vm_save_and_vm_restore_through_the_agent(
    host: Host, vm: dict[str, str], tmp_path: Path
) -> None:
    pcrs = json.loads(vm["pcrs"])
    image = tmp_path / "agent.save"
    t0 = time.monotonic()
    saved = json.loads(host.vm("save", "sr", str(image), "--json").stdout)
    t_save = time.monotonic() - t0
    assert saved["record"] and saved["record"] == host.records(vm["uuid"])[0]["record_id"]
    assert host.domstate("sr") == "shut off"
    verify = json.loads(host.cli("image", "verify", str(image), "--json").stdout)
    assert verify["verdict"] == "match" and verify["record"] == saved["record"]

    t0 = time.monotonic()
    host.vm("restore", str(image))
    t_restore = time.monotonic() - t0
    assert host.domstate("sr") == "running"
    assert host.pcrs("sr") == pcrs
    print(f"\nvm save {t_save:.2f} s, vm restore {t_restore:.2f} s")


def test_plain_virsh_save_and_restore_behave_the_same(
    host: Host, vm: dict[str, str], tmp_path: Path
) -> None:
    pcrs = json.loads(vm["pcrs"])
    n = len(host.records(vm["uuid"]))
    image = tmp_path / "virsh.save"
    host.virsh("save", "sr", str(image))
    assert len(host.records(vm["uuid"])) == n + 1, "a plain virsh save is sealed too"
    host.wait_armed(vm["uuid"])  # the daemon arms a saved VM for its restore
    host.virsh("restore", str(image))  # no agent command at all
    assert host.domstate("sr") == "running"
    assert host.pcrs("sr") == pcrs

    image2 = tmp_path / "virsh2.save"
    host.virsh("save", "sr", str(image2))
    bad = flipped_copy(image2, tmp_path / "flipped.save")
    digest = hashlib.sha256(bad.read_bytes()).hexdigest()
    host.wait_armed(vm["uuid"])
    plain = host.virsh("restore", str(bad), check=False)
    assert plain.returncode != 0 and host.domstate("sr") == "shut off"
    refused = host.vm("restore", str(bad), check=False)
    assert refused.returncode == 2, refused.stderr
    assert "lifecycle.restore_refused" in refused.stderr and "1 page(s)" in refused.stderr
    assert host.domstate("sr") == "shut off"
    assert hashlib.sha256(bad.read_bytes()).hexdigest() == digest, "the image is untouched"
    out = json.loads(host.cli("image", "verify", str(bad), "--json", check=False).stdout)
    assert out["verdict"] == "mismatch" and len(out["differing_pages"]) == 1
    page = out["differing_pages"][0][0]
    assert f": {page} (" in refused.stderr

    host.vm("arm", "sr")  # nothing was sealed since: an operator arms it for a plain restore
    host.virsh("restore", str(image2))
    assert host.domstate("sr") == "running"
    assert host.pcrs("sr") == pcrs


RESTORE_SCRIPT = r"""
import json, sys
import libvirt
from host_agent.lifecycle.libvirt_adapter import start_event_loop
start_event_loop()
conn = libvirt.open(sys.argv[1])
try:
    conn.restore(sys.argv[2])
    print(json.dumps({"ok": True}))
except libvirt.libvirtError as err:
    print(json.dumps({"ok": False, "message": str(err), "code": err.get_error_code()}))
finally:
    conn.close()
"""


def test_libvirt_restore_error_says_why_and_which_pages(
    host: Host, vm: dict[str, str], tmp_path: Path
) -> None:
    """virDomainRestore itself (libvirt-python, no agent command) raises an error that carries
    the veto's reason and the differing pages, taken from the domain log libvirt quotes."""
    image = tmp_path / "lv.save"
    host.virsh("save", "sr", str(image))
    n = len(host.records(vm["uuid"]))
    bad = flipped_copy(image, tmp_path / "lv-flipped.save")
    digest = hashlib.sha256(bad.read_bytes()).hexdigest()
    definition = host.virsh("dumpxml", "--inactive", "sr").stdout
    out = json.loads(host.cli("image", "verify", str(bad), "--json", check=False).stdout)
    [(first, last)] = out["differing_pages"]
    pages = f"{first}" if first == last else f"{first}-{last}"
    host.wait_armed(vm["uuid"])

    proc = subprocess.run(
        [sys.executable, "-c", RESTORE_SCRIPT, host.uri, str(bad)],
        capture_output=True, text=True, timeout=300, cwd=REPO, env=host.env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["ok"] is False, "the changed image was restored"
    message = result["message"]
    print(f"\nlibvirt: {message}")
    assert "vtpm-trust: restore of VM sr refused" in message, message
    assert "differs from sealed record" in message and f"1 page(s): {pages} (" in message
    log_file = host.root / "log" / "qemu" / "sr.log"
    assert f"1 page(s): {pages} (" in log_file.read_text(errors="replace")
    assert "restore of VM" in host.log_text() and f"1 page(s): {pages} (" in host.log_text()

    assert host.domstate("sr") == "shut off", "the changed state never runs"
    assert hashlib.sha256(bad.read_bytes()).hexdigest() == digest, "the image is untouched"
    assert len(host.records(vm["uuid"])) == n, "no record added or removed"
    assert host.virsh("dumpxml", "--inactive", "sr").stdout == definition

    host.vm("arm", "sr")
    host.virsh("restore", str(image))  # the genuine image still restores
    assert host.domstate("sr") == "running"
    assert host.pcrs("sr") == json.loads(vm["pcrs"])


def test_managedsave_then_vm_start_is_verified(host: Host, vm: dict[str, str]) -> None:
    pcrs = json.loads(vm["pcrs"])
    n = len(host.records(vm["uuid"]))
    host.virsh("managedsave", "sr")
    assert len(host.records(vm["uuid"])) == n + 1
    host.wait_armed(vm["uuid"])
    host.vm("start", "sr")
    assert host.domstate("sr") == "running"
    assert host.pcrs("sr") == pcrs
    assert host.log_text().count("matches sealed record") == 5, "vm/virsh restores, start"


def test_external_snapshot_then_vm_revert_is_verified(
    host: Host, vm: dict[str, str], tmp_path: Path
) -> None:
    pcrs = json.loads(vm["pcrs"])
    n = len(host.records(vm["uuid"]))
    mem = tmp_path / "snap1.mem"
    host.virsh("snapshot-create-as", "sr", "snap1", "--memspec", f"file={mem},snapshot=external")
    assert host.domstate("sr") == "running", "the VM keeps running after the snapshot"
    assert len(host.records(vm["uuid"])) == n + 1, "the snapshot is sealed"
    host.vm("revert", "sr", "snap1")
    assert host.domstate("sr") == "running"
    assert host.pcrs("sr") == pcrs


def test_vm_revert_to_a_changed_snapshot_is_refused_like_a_restore(
    host: Host, vm: dict[str, str], tmp_path: Path
) -> None:
    pcrs = json.loads(vm["pcrs"])
    mem = tmp_path / "snap2.mem"
    host.virsh("snapshot-create-as", "sr", "snap2", "--memspec", f"file={mem},snapshot=external")
    good = tmp_path / "snap2.good"
    shutil.copy2(mem, good)
    flipped_copy(good, mem)  # the snapshot's memory file, changed on disk

    refused = host.vm("revert", "sr", "snap2", check=False)
    assert refused.returncode == 2, refused.stderr
    assert "lifecycle.restore_refused" in refused.stderr and "1 page(s)" in refused.stderr
    assert host.domstate("sr") == "shut off", "the changed state never runs"

    shutil.copy2(good, mem)  # the operator puts the genuine file back
    host.vm("revert", "sr", "snap2")
    assert host.domstate("sr") == "running"
    assert host.pcrs("sr") == pcrs


def test_old_records_are_pruned_and_what_the_snapshots_need_stays(
    host: Host, vm: dict[str, str]
) -> None:
    """Each verified restore pruned the VM's records (3 newest + what libvirt's files hold);
    ``vtpm-host store prune`` through the daemon keeps the snapshots' records, and a revert
    after the prune still passes."""
    recs = {r["record_id"] for r in host.records(vm["uuid"])}
    assert 2 <= len(recs) <= 5, recs
    assert "pruned" in host.log_text()
    needed = set()
    for snap in ("snap1", "snap2"):
        xml = host.virsh("snapshot-dumpxml", "sr", snap).stdout
        mem = xml.split("<memory snapshot='external' file='", 1)[1].split("'", 1)[0]
        verdict = json.loads(host.cli("image", "verify", mem, "--json").stdout)
        assert verdict["verdict"] == "match"
        needed.add(verdict["record"])
    assert needed <= recs

    dry = json.loads(host.cli("store", "prune", "--keep", "1", "--dry-run", "--json").stdout)
    assert dry["via"] == "daemon"
    assert {r["record_id"] for r in dry["kept"]} == needed
    assert {r["record_id"] for r in host.records(vm["uuid"])} == recs, "a dry run deletes nothing"
    done = json.loads(host.cli("store", "prune", "--keep", "1", "--json").stdout)
    assert {r["record_id"] for r in done["deleted"]} == recs - needed
    assert {r["record_id"] for r in host.records(vm["uuid"])} == needed
    bad = host.cli("store", "prune", "--keep", "0", check=False)
    assert bad.returncode == 2 and "expected an integer >= 1" in bad.stderr

    host.vm("revert", "sr", "snap1")
    assert host.domstate("sr") == "running"
    assert host.pcrs("sr") == json.loads(vm["pcrs"])


def test_every_save_path_announced_its_full_hash_at_the_stop(host: Host) -> None:
    """vm save, virsh save, managedsave and snapshots: each seal that hashed everything at the
    stop said why in the log (here: no soft-dirty, or no background pass running)."""
    from host_agent.memory.dirty import probe_soft_dirty

    text = host.log_text()
    sealed = text.count(": save sealed as ")
    full = text.count(" pages, full; hash ")
    announced = text.count("; hashing all guest memory at the stop")
    assert sealed >= 7 and announced == full, (sealed, full, announced)
    if not probe_soft_dirty().available:  # this machine: every path falls back
        assert full == sealed
