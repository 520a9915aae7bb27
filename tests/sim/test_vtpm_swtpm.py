"""Per-VM swtpm supervision on real programs: swtpm, swtpm_setup, tpm2-tools, a host TPM (swtpm).

Each test's vTPM gets an extra ``--server type=unixio,path=<vm dir>/swtpm`` (and no
``--terminate``, which would end swtpm when a tpm2-tools run disconnects) so tpm2-tools can reach
the TPM with the ``swtpm:path=<vm dir>/swtpm`` TCTI, whose control socket ``<vm dir>/swtpm.ctrl``
is the instance's own. Tests that need the product's command line unchanged say so.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import stat
import struct
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from host_agent.errors import StateError, SwtpmError, SwtpmProvisionError
from host_agent.tpm.adapter import PytssHostTpm
from host_agent.vtpm import swtpm_proc
from host_agent.vtpm.swtpm import (
    SwtpmInstance,
    SwtpmOptions,
    SwtpmRunState,
    SwtpmSupervisor,
    VtpmPaths,
    reap_orphans,
)
from host_agent.vtpm.swtpm_key import STATE_KEY_BYTES
from host_agent.vtpm.swtpm_provision import LOCALCA_DIR, restore_localca_owner
from tests.helpers.qemu import QEMU, QmpClient
from tests.helpers.qemu import require_binaries as require_qemu
from tests.helpers.swtpm import Swtpm, require_binaries

S = SwtpmRunState
EK_RSA_CERT = "0x01c00002"
NV_TEST = "0x01500016"

CMD_INIT, CMD_STOP, CMD_GET_STATEBLOB, CMD_SET_STATEBLOB = 0x02, 0x0E, 0x0C, 0x0D
CMD_SET_DATAFD = 0x10
PTM_STATE_FLAG_DECRYPTED, PTM_INIT_FLAG_DELETE_VOLATILE = 1, 1
TPM_NON_FATAL = 0x800
BLOB_PERMANENT, BLOB_VOLATILE, BLOB_SAVESTATE = 1, 2, 3
PLAINTEXT_BLOB_MAGIC = bytes.fromhex("0201000a00040000")  # GET_STATEBLOB, decrypted


# ---------------------------------------------------------------- fixtures and helpers


@pytest.fixture(scope="module")
def host_tpm(swtpm: Swtpm, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PytssHostTpm]:
    require_binaries("swtpm", "swtpm_setup", "tpm2_nvread")
    tpm = PytssHostTpm(swtpm.tcti, tmp_path_factory.mktemp("vtpm-host-keys"), root="software")
    yield tpm
    tpm.close()


@pytest.fixture
def vtpm_dir() -> Iterator[Path]:
    """A short directory (unix socket paths are limited to 107 bytes)."""
    d = Path(tempfile.mkdtemp(prefix="vt", dir="/tmp"))
    yield d / "vtpm"
    _kill_swtpms_under(d)  # a failed test must not leak a swtpm whose directory is gone
    shutil.rmtree(d, ignore_errors=True)


def _kill_swtpms_under(root: Path) -> None:
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"swtpm") and any(f"={root}/".encode() in a for a in argv):
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(entry.name), signal.SIGKILL)


Make = Callable[..., SwtpmInstance]


@pytest.fixture(scope="module")
def template(host_tpm: PytssHostTpm) -> Iterator[Path]:
    """One provisioned VM directory (state + sealed key), copied by tests that need not watch
    swtpm_setup run: each provisioning costs about a second."""
    root = Path(tempfile.mkdtemp(prefix="vt", dir="/tmp"))
    inst = SwtpmInstance(root, str(uuid.uuid4()), "template", host_tpm)
    inst.start()
    inst.stop()
    yield inst.paths.vm_dir
    _kill_swtpms_under(root)
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def make(host_tpm: PytssHostTpm, vtpm_dir: Path, template: Path) -> Iterator[Make]:
    """Build instances (debug data socket unless ``debug=False``); none is left running after.

    ``provisioned=True`` gives the new VM a copy of :func:`template`'s vTPM and sealed key.
    """
    made: list[SwtpmInstance] = []

    def build(
        vm: str | None = None,
        *,
        root: Path | None = None,
        debug: bool = True,
        name: str = "guest",
        provisioned: bool = False,
        **opts: object,
    ) -> SwtpmInstance:
        vm = vm or str(uuid.uuid4())
        base = root or vtpm_dir
        if provisioned:
            vm_dir = VtpmPaths.for_vm(base, vm).vm_dir
            vm_dir.mkdir(mode=0o700, parents=True)
            shutil.copytree(template / "tpm2", vm_dir / "tpm2")
            shutil.copy2(template / "statekey.sealed", vm_dir)
        if debug:
            data = VtpmPaths.for_vm(base, vm).vm_dir / "swtpm"
            opts.setdefault("extra_args", ("--server", f"type=unixio,path={data}"))
            opts.setdefault("terminate", False)
        states: list[SwtpmRunState] = []
        inst = SwtpmInstance(
            base,
            vm,
            name,
            host_tpm,
            options=SwtpmOptions(**opts),  # type: ignore[arg-type]
            on_state=states.append,
        )
        inst.states = states  # type: ignore[attr-defined]
        made.append(inst)
        return inst

    yield build
    for inst in made:
        if inst.state in (S.RUNNING, S.FAILED):
            inst.stop()
    for inst in made:
        assert not _swtpm_pids(inst.paths.state_dir), f"{inst} left a swtpm running"


def _swtpm_pids(state_dir: Path) -> list[int]:
    """Live swtpm processes serving ``state_dir``, found by scanning /proc."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            pid = int(entry.name)
            if swtpm_proc.is_swtpm_for(pid, state_dir) and swtpm_proc.pid_alive(pid):
                pids.append(pid)
    return pids


def _recv_exact(s: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = s.recv(n - len(out))
        assert chunk, "control channel closed early"
        out += chunk
    return out


def _ctrl(path: Path, request: bytes, reply_len: int = 4) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(str(path))
        s.sendall(request)
        return _recv_exact(s, reply_len)


def _result(reply: bytes) -> int:
    return int(struct.unpack(">I", reply[:4])[0])


def _tools_env(inst: SwtpmInstance) -> dict[str, str]:
    return dict(os.environ, TPM2TOOLS_TCTI=f"swtpm:path={inst.paths.vm_dir / 'swtpm'}")


def _tool(inst: SwtpmInstance, *args: str, stdin: bytes | None = None) -> bytes:
    done = subprocess.run(
        args, env=_tools_env(inst), input=stdin, capture_output=True, timeout=20, check=False
    )
    assert done.returncode == 0, f"{args}: {done.stderr.decode(errors='replace')}"
    return done.stdout


def _power_on(inst: SwtpmInstance) -> None:
    """What QEMU and the firmware do: CMD_INIT, then TPM2_Startup(CLEAR)."""
    assert _result(_ctrl(inst.ctrl_socket, struct.pack(">II", CMD_INIT, 0))) == 0
    _tool(inst, "tpm2_startup", "-c")


def _ek_cert(inst: SwtpmInstance) -> x509.Certificate:
    der = _tool(inst, "tpm2_nvread", EK_RSA_CERT)
    return x509.load_der_x509_certificate(der)


def _sealed_key(inst: SwtpmInstance, host_tpm: PytssHostTpm) -> bytes:
    return host_tpm.unseal((inst.paths.vm_dir / "statekey.sealed").read_bytes())


# ---------------------------------------------------------------- provisioning and restart


def test_first_start_provisions_ek_cert_and_second_start_does_not(make: Make) -> None:
    inst = make(name="web-1")
    assert inst.state is S.NEW and not inst.provisioned
    inst.start()
    if os.geteuid() == 0 and LOCALCA_DIR.is_dir() and LOCALCA_DIR.stat().st_uid != 0:
        wrong = [p for p in LOCALCA_DIR.rglob("*") if p.lstat().st_uid == 0]
        assert not wrong, f"swtpm_setup as root left root-owned files in {LOCALCA_DIR}: {wrong}"
    assert inst.state is S.RUNNING and inst.provisioned
    assert inst.states == [S.STARTING, S.RUNNING]  # type: ignore[attr-defined]
    _power_on(inst)
    cert = _ek_cert(inst)
    cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    assert cn == f"web-1:{inst.uuid}"
    issuer = cert.issuer.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    assert issuer == "swtpm-localca"
    assert _tool(inst, "tpm2_nvreadpublic", "0x01c00016")  # the ECC EK certificate too
    sealed = (inst.paths.vm_dir / "statekey.sealed").read_bytes()
    setup_log = inst.paths.setup_log.read_bytes()
    inst.stop()

    inst.start()
    _power_on(inst)
    assert _ek_cert(inst) == cert
    assert inst.paths.setup_log.read_bytes() == setup_log, "swtpm_setup ran again"
    assert (inst.paths.vm_dir / "statekey.sealed").read_bytes() == sealed
    assert inst.states == [S.STARTING, S.RUNNING, S.STOPPING, S.STOPPED, S.STARTING, S.RUNNING]  # type: ignore[attr-defined]


def test_restore_localca_owner_hands_root_files_back(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("chown needs root")
    tss = pwd.getpwnam("tss")
    ca = tmp_path / "localca"
    ca.mkdir()
    os.chown(ca, tss.pw_uid, 0)
    (ca / "certserial").write_text("7")  # as swtpm_localca running as root would leave it
    (ca / "sub").mkdir()
    (ca / "sub" / "x").write_text("")
    restore_localca_owner(ca)
    assert {p.stat().st_uid for p in ca.rglob("*")} == {tss.pw_uid}

    fresh = tmp_path / "fresh"  # created by a root run: goes to tss:root, 0750
    fresh.mkdir()
    (fresh / "signkey.pem").write_text("")
    restore_localca_owner(fresh, created=True)
    assert fresh.stat().st_uid == tss.pw_uid and stat.S_IMODE(fresh.stat().st_mode) == 0o750
    assert (fresh / "signkey.pem").stat().st_uid == tss.pw_uid


def test_state_survives_restart(make: Make) -> None:
    inst = make(provisioned=True)
    inst.start()
    _power_on(inst)
    secret = os.urandom(32)
    _tool(inst, "tpm2_nvdefine", NV_TEST, "-C", "o", "-s", "32", "-a", "ownerread|ownerwrite")
    _tool(inst, "tpm2_nvwrite", NV_TEST, "-C", "o", "-i", "-", stdin=secret)
    first_pid = inst.pid
    inst.stop()
    assert not swtpm_proc.pid_alive(first_pid or 0)

    inst.start()
    _power_on(inst)  # a new power cycle: PCRs reset, NV stays
    assert _tool(inst, "tpm2_nvread", NV_TEST, "-C", "o") == secret


def test_failed_provisioning_leaves_no_half_made_vtpm(make: Make, tmp_path: Path) -> None:
    failing = tmp_path / "swtpm_setup"
    failing.write_text("#!/bin/sh\necho 'no CA today' >&2\nexit 3\n")
    failing.chmod(0o755)
    vm = str(uuid.uuid4())
    inst = make(vm, swtpm_setup=str(failing))
    with pytest.raises(SwtpmProvisionError, match="status 3: no CA today"):
        inst.start()
    assert inst.state is S.FAILED and not inst.provisioned
    assert not inst.paths.state_dir.exists()
    assert not inst.paths.state_dir.with_name("tpm2.setup").exists()
    sealed = (inst.paths.vm_dir / "statekey.sealed").read_bytes()

    retry = make(vm)  # the real swtpm_setup: provisions, with the key already sealed
    retry.start()
    assert retry.provisioned
    assert (inst.paths.vm_dir / "statekey.sealed").read_bytes() == sealed


def test_a_hung_swtpm_setup_is_killed_with_its_swtpm(make: Make, tmp_path: Path) -> None:
    child_pid = tmp_path / "child.pid"
    hung = tmp_path / "swtpm_setup"
    hung.write_text(f"#!/bin/sh\nsleep 60 &\necho $! > {child_pid}\nsleep 60\n")
    hung.chmod(0o755)
    inst = make(swtpm_setup=str(hung), setup_timeout=1.0)
    with pytest.raises(SwtpmProvisionError, match="took more than 1 s"):
        inst.start()
    assert inst.state is S.FAILED and not inst.paths.state_dir.exists()
    assert not swtpm_proc.pid_alive(int(child_pid.read_text()))


def test_unknown_files_in_the_state_dir_are_not_provisioned_over(make: Make) -> None:
    inst = make()
    inst.paths.state_dir.mkdir(parents=True)
    (inst.paths.state_dir / "tpm2-00.volatilestate").write_bytes(b"?")
    with pytest.raises(SwtpmError, match="refusing to provision"):
        inst.start()
    assert inst.state is S.FAILED
    assert not (inst.paths.vm_dir / "statekey.sealed").exists(), "a key was made for nothing"
    assert (inst.paths.state_dir / "tpm2-00.volatilestate").read_bytes() == b"?"


def test_two_vms_provision_at_once(make: Make) -> None:
    a, b = make(name="a"), make(name="b")
    errors: list[BaseException] = []

    def run(inst: SwtpmInstance) -> None:
        try:
            inst.start()
        except BaseException as err:  # reported below
            errors.append(err)

    threads = [threading.Thread(target=run, args=(i,)) for i in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    certs = []
    for inst in (a, b):
        _power_on(inst)
        certs.append(_ek_cert(inst))
    assert certs[0].serial_number != certs[1].serial_number
    assert certs[0].public_key() != certs[1].public_key()


def test_remove_deletes_the_key_then_the_state(make: Make) -> None:
    inst = make(provisioned=True)
    inst.start()
    with pytest.raises(StateError):
        inst.remove()
    _power_on(inst)
    old_cert = _ek_cert(inst)
    inst.stop()
    inst.remove()
    assert inst.state is S.NEW and not inst.paths.vm_dir.exists()
    inst.start()  # a new VM with this UUID: a new vTPM
    _power_on(inst)
    assert _ek_cert(inst).public_key() != old_cert.public_key()


# ---------------------------------------------------------------- invariant 5


def test_inv5_state_key_never_touches_disk(make: Make, host_tpm: PytssHostTpm) -> None:
    inst = make()
    inst.start()
    _power_on(inst)
    _tool(inst, "tpm2_nvdefine", NV_TEST, "-C", "o", "-s", "8", "-a", "ownerread|ownerwrite")
    cmdline = Path(f"/proc/{inst.pid}/cmdline").read_bytes()
    inst.stop()

    key = _sealed_key(inst, host_tpm)
    assert len(key) == STATE_KEY_BYTES
    forms = [key, key.hex().encode(), key.hex().upper().encode()]
    assert not any(f in cmdline for f in forms), "the key is on swtpm's command line"
    for path in inst.vtpm_dir.parent.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert not any(f in data for f in forms), f"{path} holds the state key"

    for d in (inst.vtpm_dir, inst.paths.vm_dir, inst.paths.state_dir):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700, d
    for f in inst.paths.state_dir.iterdir():
        assert stat.S_IMODE(f.stat().st_mode) & 0o077 == 0, f

    permall = inst.paths.permall.read_bytes()
    assert not permall.startswith(PLAINTEXT_BLOB_MAGIC)
    assert not permall.startswith(bytes.fromhex("0201000a00000000"))  # unencrypted file
    flags = struct.unpack(">H", permall[4:6])[0]
    assert flags & 0x1 and flags & 0x8, f"blob flags {flags:#x}: not AES-256 encrypted"

    # The same files, loaded without the key, do not make a TPM.
    copy = inst.vtpm_dir.parent / "nokey"
    shutil.copytree(inst.paths.state_dir, copy)
    ctrl = copy / "ctrl"
    argv = ["swtpm", "socket", "--tpm2", "--tpmstate", f"dir={copy}"]
    proc = subprocess.Popen([*argv, "--ctrl", f"type=unixio,path={ctrl}"])
    try:
        deadline = time.monotonic() + 5
        while not swtpm_proc.ctrl_accepts(ctrl):
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.01)
        assert _result(_ctrl(ctrl, struct.pack(">II", CMD_INIT, 0))) != 0
    finally:
        proc.kill()
        proc.wait()


def test_missing_sealed_key_refuses_to_start_on_encrypted_state(make: Make) -> None:
    inst = make(provisioned=True)
    inst.start()
    inst.stop()
    (inst.paths.vm_dir / "statekey.sealed").unlink()
    with pytest.raises(SwtpmError, match="no sealed state key"):
        inst.start()
    assert inst.state is S.FAILED and inst.provisioned
    assert not _swtpm_pids(inst.paths.state_dir)


# ---------------------------------------------------------------- start failures roll back


def test_start_fails_on_busy_socket_and_leaves_no_process(make: Make) -> None:
    inst = make()
    inst.paths.vm_dir.mkdir(parents=True)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as squatter:
        squatter.bind(str(inst.ctrl_socket))
        squatter.listen()
        with pytest.raises(SwtpmError, match="is in use"):
            inst.start()
        assert inst.state is S.FAILED and inst.pid is None
        assert isinstance(inst.error, SwtpmError)
        assert swtpm_proc.ctrl_accepts(inst.ctrl_socket), "the other socket was taken over"
    assert not _swtpm_pids(inst.paths.state_dir)
    assert inst.states == [S.STARTING, S.FAILED]  # type: ignore[attr-defined]


def test_start_rolls_back_when_swtpm_exits(make: Make) -> None:
    inst = make(debug=False, provisioned=True)
    inst.paths.pid_file.mkdir()  # swtpm cannot write its pid file and exits
    with pytest.raises(SwtpmError, match="exited with status") as info:
        inst.start()
    assert "pidfile" in str(info.value)  # swtpm's own words, from its log
    assert inst.state is S.FAILED
    assert not os.path.lexists(inst.ctrl_socket)
    assert not _swtpm_pids(inst.paths.state_dir)
    inst.paths.pid_file.rmdir()
    inst.start()  # FAILED → RUNNING once the cause is gone
    assert inst.state is S.RUNNING


def test_start_rolls_back_when_swtpm_never_listens(make: Make, tmp_path: Path) -> None:
    pid_file = tmp_path / "fake.pid"
    fake = tmp_path / "swtpm"
    fake.write_text(f"#!/bin/sh\necho $$ > {pid_file}\nexec sleep 60\n")
    fake.chmod(0o755)
    inst = make(debug=False, swtpm=str(fake), start_timeout=0.5, provisioned=True)
    began = time.monotonic()
    with pytest.raises(SwtpmError, match="did not listen"):
        inst.start()
    assert time.monotonic() - began < 10
    assert inst.state is S.FAILED and inst.pid is None
    assert not swtpm_proc.pid_alive(int(pid_file.read_text()))


def test_start_requires_a_stopped_instance(make: Make) -> None:
    inst = make(provisioned=True)
    inst.start()
    with pytest.raises(StateError) as info:
        inst.start()
    assert info.value.state == "running"
    assert set(info.value.required) == {"new", "stopped", "failed"}
    with pytest.raises(StateError):
        inst.adopt()
    assert inst.state is S.RUNNING


# ---------------------------------------------------------------- never left running


def test_stop_leaves_no_process(make: Make) -> None:
    inst = make(debug=False, provisioned=True)
    inst.start()
    pid = inst.pid
    assert pid is not None and swtpm_proc.is_swtpm_for(pid, inst.paths.state_dir)
    inst.stop()
    assert inst.state is S.STOPPED and inst.pid is None
    assert inst.returncode == 0, "CMD_SHUTDOWN should have ended it, not a signal"
    assert not swtpm_proc.pid_alive(pid)
    assert not os.path.lexists(inst.ctrl_socket) and not inst.paths.pid_file.exists()
    inst.stop()  # idempotent
    assert inst.state is S.STOPPED


def test_stop_ends_swtpm_whose_control_channel_is_held(make: Make) -> None:
    inst = make(debug=False, shutdown_timeout=0.3, term_timeout=2.0, provisioned=True)
    inst.start()
    pid = inst.pid
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as qemu:  # holds the one ctrl client
        qemu.connect(str(inst.ctrl_socket))
        began = time.monotonic()
        inst.stop()
        assert time.monotonic() - began < 5
    assert inst.state is S.STOPPED
    assert not swtpm_proc.pid_alive(pid or 0)


def test_swtpm_exits_when_its_data_channel_closes(make: Make) -> None:
    inst = make(
        debug=False, provisioned=True
    )  # the product's command line: --terminate, no --server
    inst.start()
    ours, theirs = socket.socketpair()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as ctrl:  # what QEMU does at start
        ctrl.connect(str(inst.ctrl_socket))
        ctrl.sendmsg(
            [struct.pack(">I", CMD_SET_DATAFD)],
            [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", theirs.fileno()))],
        )
        theirs.close()
        assert _result(_recv_exact(ctrl, 4)) == 0
    ours.close()  # QEMU is gone (killed: no CMD_SHUTDOWN)
    deadline = time.monotonic() + 5
    while inst.poll() is S.RUNNING:
        assert time.monotonic() < deadline, "swtpm outlived its data channel"
        time.sleep(0.02)
    assert inst.state is S.STOPPED and inst.returncode == 0
    assert not os.path.lexists(inst.ctrl_socket)


def test_reap_orphans_kills_leftovers_and_spares_live_vms(make: Make, vtpm_dir: Path) -> None:
    gone, alive = make(debug=False, provisioned=True), make(debug=False, provisioned=True)
    gone.start()
    alive.start()
    gone_pid, alive_pid = gone.pid, alive.pid
    assert gone_pid and alive_pid
    # The daemon "crashes": the swtpms (own sessions) keep running; a new daemon reaps
    # (naming the directory another way: a swtpm is recognised by its resolved path).
    reaped = reap_orphans(vtpm_dir / ".." / "vtpm", [alive.uuid.upper()])
    assert [(r.vm, r.pid, r.how) for r in reaped] == [(gone.uuid, gone_pid, "shutdown")]
    assert not swtpm_proc.pid_alive(gone_pid)
    assert swtpm_proc.pid_alive(alive_pid)
    assert not gone.paths.pid_file.exists() and not os.path.lexists(gone.ctrl_socket)
    assert reap_orphans(vtpm_dir, [alive.uuid]) == []

    # The restarted daemon takes over the live VM's swtpm and can stop it; it cannot start a
    # second one on the same state, even with the socket gone.
    again = make(alive.uuid, debug=False)
    alive.ctrl_socket.rename(alive.ctrl_socket.with_suffix(".moved"))
    with pytest.raises(SwtpmError, match=f"pid {alive_pid}"):
        again.start()
    again.stop()  # FAILED → STOPPED; must not touch the other swtpm's files
    assert again.paths.pid_file.exists()
    alive.ctrl_socket.with_suffix(".moved").rename(alive.ctrl_socket)
    assert again.adopt() and again.state is S.RUNNING and again.pid == alive_pid
    again.stop()
    assert not swtpm_proc.pid_alive(alive_pid)
    assert not again.adopt()
    assert gone.poll() is S.STOPPED and alive.poll() is S.STOPPED  # the old objects notice


def test_supervisor_recovers_after_a_daemon_crash(
    host_tpm: PytssHostTpm, vtpm_dir: Path, template: Path
) -> None:
    vms = {str(uuid.uuid4()): "kept", str(uuid.uuid4()): "deleted"}
    for vm in vms:  # two provisioned VMs (copies of the template's vTPM)
        vm_dir = vtpm_dir / vm
        vm_dir.mkdir(mode=0o700, parents=True)
        shutil.copytree(template / "tpm2", vm_dir / "tpm2")
        shutil.copy2(template / "statekey.sealed", vm_dir)
    kept, deleted = vms
    first = SwtpmSupervisor(vtpm_dir, host_tpm)
    for vm, name in vms.items():
        first.instance(vm, name).start()
    pids = {vm: first.instance(vm, vms[vm]).pid for vm in vms}
    second = SwtpmSupervisor(vtpm_dir, host_tpm)
    try:
        # The daemon dies; the VM "deleted" is undefined meanwhile; a new daemon starts.
        reaped = second.recover({kept: "kept"})
        assert [(r.vm, r.pid) for r in reaped] == [(deleted, pids[deleted])]
        assert not swtpm_proc.pid_alive(pids[deleted] or 0)
        assert set(second.running()) == {kept}
        assert second.instance(kept, "kept").pid == pids[kept]
        second.instance(kept, "kept").stop()
        assert not swtpm_proc.pid_alive(pids[kept] or 0)
        # The old objects notice their processes are gone without touching a newer swtpm's files.
        second.instance(kept, "kept").start()
        assert first.running() == {}
        assert swtpm_proc.ctrl_accepts(second.instance(kept, "kept").ctrl_socket)
    finally:
        for sup in (first, second):
            for vm, name in vms.items():
                sup.instance(vm, name).stop()


def test_reap_orphans_never_signals_a_recycled_pid(make: Make, vtpm_dir: Path) -> None:
    inst = make(debug=False)
    inst.paths.vm_dir.mkdir(parents=True)
    with subprocess.Popen(["sleep", "30"]) as stranger:
        inst.paths.pid_file.write_text(f"{stranger.pid}\n")
        reaped = reap_orphans(vtpm_dir, [])
        assert [(r.vm, r.how) for r in reaped] == [(inst.uuid, "stale")]
        assert stranger.poll() is None, "a process that is not our swtpm was signalled"
        stranger.kill()
    assert not inst.paths.pid_file.exists()


# ---------------------------------------------------------------- restore and incoming migration


def _state_blobs(inst: SwtpmInstance) -> dict[int, bytes]:
    """CMD_GET_STATEBLOB ×3 with PTM_STATE_FLAG_DECRYPTED, as QEMU's pre_save does."""
    blobs = {}
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(str(inst.ctrl_socket))
        for kind in (BLOB_PERMANENT, BLOB_VOLATILE, BLOB_SAVESTATE):
            s.sendall(struct.pack(">IIII", CMD_GET_STATEBLOB, PTM_STATE_FLAG_DECRYPTED, kind, 0))
            result, _flags, total, length = struct.unpack(">IIII", _recv_exact(s, 16))
            # TPM_RETRY (0x800, non-fatal): no such blob, as QEMU reads it (no SAVESTATE here)
            assert result in (0, TPM_NON_FATAL) and total == length
            blobs[kind] = _recv_exact(s, length)
    return blobs


def _push_state(inst: SwtpmInstance, blobs: dict[int, bytes]) -> None:
    """QEMU's post_load: CMD_STOP, CMD_SET_STATEBLOB ×3, CMD_INIT(DELETE_VOLATILE)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(str(inst.ctrl_socket))
        s.sendall(struct.pack(">I", CMD_STOP))
        assert _result(_recv_exact(s, 4)) == 0
        for kind, blob in blobs.items():
            if blob:
                s.sendall(struct.pack(">IIII", CMD_SET_STATEBLOB, 0, kind, len(blob)) + blob)
                assert _result(_recv_exact(s, 4)) == 0, f"SET_STATEBLOB type {kind}"
        s.sendall(struct.pack(">II", CMD_INIT, PTM_INIT_FLAG_DELETE_VOLATILE))
        assert _result(_recv_exact(s, 4)) == 0


def test_restart_for_incoming_takes_state_blobs_from_another_host(
    make: Make, vtpm_dir: Path, host_tpm: PytssHostTpm
) -> None:
    source = make(name="mig")
    source.start()
    _power_on(source)
    secret = os.urandom(16)
    _tool(source, "tpm2_nvdefine", NV_TEST, "-C", "o", "-s", "16", "-a", "ownerread|ownerwrite")
    _tool(source, "tpm2_nvwrite", NV_TEST, "-C", "o", "-i", "-", stdin=secret)
    ek = _ek_cert(source)
    blobs = _state_blobs(source)
    assert blobs[BLOB_PERMANENT].startswith(PLAINTEXT_BLOB_MAGIC)  # what QEMU's stream carries

    target = make(source.uuid, root=vtpm_dir.parent / "host-b", name="mig")
    target.restart_for_incoming()
    assert target.state is S.RUNNING
    assert not target.provisioned and not target.paths.setup_log.exists(), "swtpm_setup ran"
    _push_state(target, blobs)
    _tool(target, "tpm2_startup", "-c")
    assert _tool(target, "tpm2_nvread", NV_TEST, "-C", "o") == secret
    assert _ek_cert(target) == ek, "the EK comes with the state"

    # On the target the state rests encrypted under the target's own key.
    assert _sealed_key(target, host_tpm) != _sealed_key(source, host_tpm)
    permall = target.paths.permall.read_bytes()
    assert struct.unpack(">H", permall[4:6])[0] & 0x9 == 0x9
    target.stop()
    target.start()  # a later boot on the target: no provisioning, same vTPM
    _power_on(target)
    assert _ek_cert(target) == ek


def test_restart_for_incoming_replaces_a_running_swtpm(make: Make) -> None:
    inst = make(provisioned=True)
    inst.start()
    _power_on(inst)
    blobs = _state_blobs(inst)  # a save
    old_pid = inst.pid
    permall = inst.paths.permall.read_bytes()

    inst.restart_for_incoming()  # the restoring QEMU gets a fresh swtpm on the same state
    assert inst.state is S.RUNNING and inst.pid != old_pid
    assert not swtpm_proc.pid_alive(old_pid or 0)
    assert inst.paths.permall.read_bytes() == permall, "the state on disk was touched"
    assert inst.states[-4:] == [S.STOPPING, S.STOPPED, S.STARTING, S.RUNNING]  # type: ignore[attr-defined]
    _push_state(inst, blobs)
    _tool(inst, "tpm2_startup", "-c")
    _ek_cert(inst)


def test_incoming_that_never_arrived_then_a_boot_provisions(make: Make) -> None:
    inst = make()
    inst.restart_for_incoming()  # the migration fails before QEMU pushes any state
    assert not inst.provisioned
    inst.stop()
    inst.start()  # the VM is then booted here: it gets a vTPM of its own
    assert inst.provisioned
    _power_on(inst)
    _ek_cert(inst)


# ---------------------------------------------------------------- with a real QEMU (no guest OS)


def _qemu(ctrl: Path, qmp: Path, *extra: str) -> subprocess.Popen[bytes]:
    """QEMU/TCG with only SeaBIOS, its TPM on ``ctrl`` the way libvirt's external backend does."""
    require_qemu(QEMU)
    args = [QEMU, "-machine", "pc,accel=tcg", "-m", "32", "-nodefaults", "-display", "none"]
    args += ["-chardev", f"socket,id=chrtpm,path={ctrl}", "-tpmdev"]
    args += ["emulator,id=tpm0,chardev=chrtpm", "-device", "tpm-tis,tpmdev=tpm0"]
    args += ["-qmp", f"unix:{qmp},server=on,wait=off", *extra]
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


@contextlib.contextmanager
def _running_qemu(ctrl: Path, qmp: Path, *extra: str) -> Iterator[QmpClient]:
    proc = _qemu(ctrl, qmp, *extra)
    client = QmpClient(qmp, timeout=20)
    try:
        client.connect(deadline=time.monotonic() + 20, alive=lambda: proc.poll() is None)
        yield client
    finally:
        client.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)  # after a QMP quit: let QEMU send CMD_SHUTDOWN on its way out
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


def _wait_state(inst: SwtpmInstance, want: SwtpmRunState, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while inst.poll() is not want:
        assert time.monotonic() < deadline, f"{inst} is not {want.value} after {timeout} s"
        time.sleep(0.02)


@pytest.mark.vm
def test_qemu_migration_to_a_fresh_incoming_swtpm_on_another_host(
    make: Make, vtpm_dir: Path, host_tpm: PytssHostTpm
) -> None:
    source = make(name="mig", debug=False)  # the product's command line
    source.start()
    stream = vtpm_dir.parent / "vm.state"
    with _running_qemu(source.ctrl_socket, vtpm_dir.parent / "q1") as qmp:
        time.sleep(0.3)  # SeaBIOS sends TPM2_Startup and measures itself
        qmp.migrate_to_file(stream)
        qmp.quit()
    _wait_state(source, S.STOPPED)  # QEMU's CMD_SHUTDOWN ended it
    assert source.returncode == 0 and not _swtpm_pids(source.paths.state_dir)

    target = make(source.uuid, root=vtpm_dir.parent / "host-b", name="mig", debug=False)
    target.restart_for_incoming()
    with _running_qemu(
        target.ctrl_socket, vtpm_dir.parent / "q2", "-incoming", f"exec:cat {stream}"
    ) as qmp:
        deadline = time.monotonic() + 20
        while qmp.query_status() != "running":
            assert time.monotonic() < deadline, "the incoming VM did not run"
            time.sleep(0.05)
        qmp.quit()
    _wait_state(target, S.STOPPED)
    assert target.returncode == 0
    assert target.provisioned and not target.paths.setup_log.exists()
    assert struct.unpack(">H", target.paths.permall.read_bytes()[4:6])[0] & 0x9 == 0x9

    # Both ends, powered on outside QEMU, are the same vTPM (same EK certificate).
    certs = []
    for root in (vtpm_dir, vtpm_dir.parent / "host-b"):
        inst = make(source.uuid, root=root, name="mig")
        inst.start()
        _power_on(inst)
        certs.append(_ek_cert(inst))
        inst.stop()
    assert certs[0] == certs[1]


@pytest.mark.vm
def test_swtpm_does_not_outlive_a_killed_qemu(make: Make, vtpm_dir: Path) -> None:
    inst = make(debug=False, provisioned=True)
    inst.start()
    proc = _qemu(inst.ctrl_socket, vtpm_dir.parent / "q")
    qmp = QmpClient(vtpm_dir.parent / "q", timeout=20)
    try:
        qmp.connect(deadline=time.monotonic() + 20, alive=lambda: proc.poll() is None)
        assert qmp.query_status() == "running"
    finally:
        qmp.close()
        proc.kill()  # no CMD_SHUTDOWN; --terminate ends swtpm as its data channel closes
        proc.wait(10)
    _wait_state(inst, S.STOPPED)
    assert not _swtpm_pids(inst.paths.state_dir)
