"""Protocol steps (3)/(4) with a real VM: libvirt's live migration between the two daemons.

The key-move protocol (:mod:`.source`, :mod:`.target`) asks two hooks of the host it runs on;
this module feeds them from the VM's bridge hooks and starts libvirt's migration:

source (:class:`SourceVmMove`, one per outgoing migration)
    installed as ``daemon.sealer.delegate(vm)`` before libvirt starts. libvirt's final stop asks
    the bridge for the vTPM state (GET_STATEBLOB PERMANENT, VOLATILE, SAVESTATE): at PERMANENT
    the VM is stopped and its RAM was sent, so the guest-RAM memfd is hashed (Merkle root) and
    the vPCRs are read through the bridge; each blob's SHA-256 is kept. QEMU gets every blob
    unchanged (a failure here vetoes, so the migration fails and the source VM resumes).
    libvirt's peer-to-peer live migration starts on a thread once the target's ExgKey passed
    the source's checks (its pre-copy overlaps the vAIK's duplication and import);
    ``record_source`` (the protocol, right after the target imported the vAIK) waits for the
    capture, and the vAIK signs the :class:`~host_agent.migration.record.MigrationRecord`. An
    abort that is not a target's veto cancels libvirt's job. Before the commit point the
    source waits until libvirt reports the migration done; a libvirt failure aborts (the
    source keeps the VM, which libvirt resumes, and the vAIK).

target (:class:`TargetVmMove`, one per incoming migration)
    on the Offer, the VM is *armed* for the incoming QEMU (its swtpm restarted for incoming
    state, a bridge listening on the domain's TPM socket: ``host_agent.lifecycle.restore.arm_vm``)
    and ``daemon.restorer.delegate(vm)`` routes its SET_STATEBLOBs here. At SET_STATEBLOB
    PERMANENT the incoming QEMU has loaded the guest RAM and does not run yet: the memfd is
    hashed, and the hook waits for the signed record (``record_check``, after the protocol
    verified the vAIK signature); the root and the PERMANENT digest must equal the record's,
    else the hook vetoes (TPM_FAIL: QEMU fails the load and exits, libvirt's migration fails,
    the VM never runs here). At VOLATILE the digest must equal the record's: the vPCRs live in
    the volatile state, so equal digests mean the vPCRs the source signed are the ones this
    vTPM starts with (the record carries the vPCR values too; the bridge cannot read them
    before QEMU's INIT, which comes after the last hook). ``record_check`` answers the
    protocol's Verdict only once both hooks decided. On the commit the target writes the VM's
    adoption record from the domain definition libvirt brought (its sockets), so the
    attestation component serves the VM's channel here and the guest attests with the moved
    vAIK, chained through this host's AuthKey and AIK.

Memory root: the record carries the root of the source memfd at the final stop, the memory of
the VM that stopped. Under TCG, QEMU's pre-copy now and then never re-sends a page a busy guest
wrote (docs/NOTES.md: 0-11 pages per run), so the target loads memory the source never had and
refuses it: such a migration fails whole, and the operator retries. An idle or lightly loaded
guest shows no difference.

Test hook: ``tamper`` (``"memory"`` or ``"state"``) on the target changes what arrived before it
is checked: one byte of a guest page in the incoming QEMU's memfd, or one byte of the incoming
PERMANENT blob as the check sees it. Only the tests set it (``settings.json`` ``test_tamper``).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evidence.errors import VtpmError
from host_agent.vtpm.daemon_link import HookCall
from host_agent.vtpm.hooks_server import Allow, Decision, Veto

from .errors import MigrationError
from .record import MigrationRecord, RecordRefused

__all__ = ["LibvirtMigrationFailed", "SourceVmMove", "TargetVmMove", "VmMoves"]

log = logging.getLogger("host_agent.migration.vm")

PERMANENT, VOLATILE, SAVESTATE = 1, 2, 3
_NAMES = {PERMANENT: "permanent", VOLATILE: "volatile", SAVESTATE: "savestate"}


class LibvirtMigrationFailed(MigrationError):
    """libvirt's migration of the VM failed (the source keeps the VM and the vAIK)."""

    id = "migration.libvirt_failed"


# ------------------------------------------------------------------------------ source


@dataclass
class SourceVmMove:
    """One outgoing VM migration (see the module docstring).

    Args:
        vm_uuid: the VM.
        start_libvirt: runs libvirt's migration to the end (raises on failure); called on a
            thread of its own by :meth:`start`.
        hash_ram: QEMU pid → (memory root, pages) of its guest-RAM memfd.
        qemu_pid: VM → QEMU's pid (from the bridge).
        read_pcrs: VM → sha256 vPCRs (through the bridge).
        clock: monotonic clock.
    """

    vm_uuid: uuid.UUID
    start_libvirt: Callable[[], None]
    hash_ram: Callable[[int], bytes]
    qemu_pid: Callable[[str], int]
    read_pcrs: Callable[[str], dict[int, bytes]]
    clock: Callable[[], float] = time.monotonic
    memory_root: bytes | None = None
    vpcrs: dict[int, bytes] = field(default_factory=dict)
    digests: dict[str, bytes] = field(default_factory=dict)
    stop_started: float | None = None
    stop_seconds: float | None = None
    libvirt_seconds: float | None = None
    error: BaseException | None = None
    _captured: threading.Event = field(default_factory=threading.Event)
    _done: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    # -- the GET_STATEBLOB delegate ---------------------------------------------------------

    def on_get_stateblob(self, call: HookCall) -> Decision:
        """Keep the blob digests; at PERMANENT hash the RAM and read the vPCRs. A failure vetoes
        (the final stop fails, the source VM resumes)."""
        name = _NAMES.get(call.blob_type)
        if name is None:
            return Veto(f"unexpected GET_STATEBLOB of type {call.blob_type}")
        if len(call.blob) != call.length:
            return Veto(f"the bridge sent {len(call.blob)} of the blob's {call.length} bytes")
        try:
            if call.blob_type == PERMANENT:
                self.stop_started = self.clock()
                vm = str(self.vm_uuid)
                self.memory_root = self.hash_ram(self.qemu_pid(vm))
                self.vpcrs = self.read_pcrs(vm)
            elif self.memory_root is None:
                return Veto(f"GET_STATEBLOB {name} before PERMANENT: not a migration's stop")
        except (VtpmError, OSError) as err:
            log.error("VM %s: cannot capture its state at the final stop: %s", self.vm_uuid, err)
            return Veto(f"migration record not made: {err}")
        self.digests[name] = hashlib.sha256(call.blob).digest()
        if call.blob_type == SAVESTATE:
            assert self.stop_started is not None
            self.stop_seconds = self.clock() - self.stop_started
            self._captured.set()
        return Allow()

    # -- libvirt ----------------------------------------------------------------------------

    @property
    def started(self) -> bool:
        return self._thread is not None

    @property
    def finished(self) -> bool:
        return self._done.is_set()

    def start(self) -> None:
        """Start libvirt's migration on a thread (idempotent)."""
        if self._thread is not None:
            return
        t0 = self.clock()

        def run() -> None:
            try:
                self.start_libvirt()
            except BaseException as err:
                self.error = err
            finally:
                self.libvirt_seconds = self.clock() - t0
                self._done.set()
                self._captured.set()  # wake a waiter: the capture will never come

        self._thread = threading.Thread(target=run, name=f"migrate-{self.vm_uuid}", daemon=True)
        self._thread.start()

    def record(self, migration_id: uuid.UUID, timeout: float) -> MigrationRecord:
        """Start libvirt, wait for the final stop's capture; the record to sign.

        Raises:
            LibvirtMigrationFailed: libvirt failed (or ended) before the final stop.
            MigrationError: no final stop within ``timeout`` seconds.
        """
        self.start()
        if not self._captured.wait(timeout):
            raise MigrationError(f"VM {self.vm_uuid}: no final stop within {timeout:g} s")
        if self.memory_root is None or "savestate" not in self.digests:
            raise LibvirtMigrationFailed(
                f"libvirt's migration of VM {self.vm_uuid} ended before its final stop: "
                f"{self.error or 'no vTPM state was read'}"
            )
        return MigrationRecord(
            migration_id,
            self.vm_uuid,
            self.memory_root,
            dict(self.vpcrs),
            {k: v for k, v in self.digests.items() if k != "savestate"},
        )

    def wait(self, timeout: float) -> None:
        """Until libvirt's migration ended.

        Raises:
            LibvirtMigrationFailed: it failed, or did not end within ``timeout`` seconds.
        """
        self.start()
        if not self._done.wait(timeout):
            raise LibvirtMigrationFailed(
                f"libvirt's migration of VM {self.vm_uuid} did not end within {timeout:g} s"
            )
        if self.error is not None:
            raise LibvirtMigrationFailed(
                f"libvirt's migration of VM {self.vm_uuid} failed: {self.error}"
            ) from self.error


# ------------------------------------------------------------------------------ target


@dataclass
class TargetVmMove:
    """One incoming VM migration (see the module docstring).

    Args:
        vm_uuid: the VM.
        hash_ram: QEMU pid → memory root of its guest-RAM memfd.
        qemu_pid: VM → the incoming QEMU's pid (from the bridge).
        tamper: test hook (``"memory"``, ``"state"`` or None).
        timeout: how long a hook waits for the record.
    """

    vm_uuid: uuid.UUID
    hash_ram: Callable[[int], bytes]
    qemu_pid: Callable[[str], int]
    tamper: str | None = None
    timeout: float = 60.0
    record: MigrationRecord | None = None
    verdicts: dict[str, str] = field(default_factory=dict)  # blob name → "" (ok) or reason
    loaded_root: bytes | None = None
    _have_record: threading.Event = field(default_factory=threading.Event)
    _decided: threading.Condition = field(default_factory=threading.Condition)

    def on_set_stateblob(self, call: HookCall) -> Decision:
        name = _NAMES.get(call.blob_type)
        if name not in ("permanent", "volatile"):
            return Veto(f"unexpected SET_STATEBLOB of type {call.blob_type} in a migration")
        try:
            reason = self._check(call, name)
        except (VtpmError, OSError) as err:
            reason = f"the incoming VM could not be checked: {err}"
        with self._decided:
            self.verdicts[name] = reason
            self._decided.notify_all()
        if reason:
            log.error("incoming VM %s refused: %s", self.vm_uuid, reason)
            return Veto(reason)
        return Allow()

    def _check(self, call: HookCall, name: str) -> str:
        blob = call.blob
        if name == "permanent":
            pid = self.qemu_pid(str(self.vm_uuid))
            if self.tamper == "memory":
                _flip_guest_byte(pid)
            if self.tamper == "state":
                blob = bytes([blob[0] ^ 1]) + blob[1:] if blob else b"\x01"
            self.loaded_root = self.hash_ram(pid)
        if not self._have_record.wait(self.timeout):
            return f"no signed migration record arrived within {self.timeout:g} s"
        record = self.record
        assert record is not None
        wrong = []
        if name == "permanent" and record.memory_root != self.loaded_root:
            assert self.loaded_root is not None
            wrong.append(
                f"loaded memory root {self.loaded_root.hex()[:16]}… is not the signed "
                f"{record.memory_root.hex()[:16]}…"
            )
        digest = hashlib.sha256(blob).digest()
        expected = record.state_digests.get(name)
        if expected != digest:
            got = "none" if expected is None else expected.hex()[:16] + "…"
            wrong.append(
                f"vTPM {name} state sha256 {digest.hex()[:16]}… is not the signed {got}"
                + (" (the vPCRs live in it)" if name == "volatile" else "")
            )
        if not wrong:
            log.info(
                "incoming VM %s: %s matches the signed record%s",
                self.vm_uuid,
                f"vTPM {name} state",
                f" (memory root {record.memory_root.hex()[:16]}…)" if name == "permanent" else "",
            )
        return "; ".join(wrong)

    def check(self, record: MigrationRecord) -> None:
        """``record_check``: hand the verified record to the hooks; wait for both decisions.

        Raises:
            RecordRefused: a hook vetoed, or the VM's state did not arrive in time.
        """
        if record.vm_uuid != self.vm_uuid:
            raise RecordRefused(f"the record is for VM {record.vm_uuid}, not {self.vm_uuid}")
        self.record = record
        self._have_record.set()
        deadline = time.monotonic() + self.timeout
        with self._decided:
            while not all(k in self.verdicts for k in ("permanent", "volatile")):
                refused = [v for v in self.verdicts.values() if v]
                left = deadline - time.monotonic()
                if refused or left <= 0:
                    break
                self._decided.wait(left)
            refused = [v for v in self.verdicts.values() if v]
            done = all(k in self.verdicts for k in ("permanent", "volatile"))
        if refused:
            raise RecordRefused("; ".join(refused))
        if not done:
            raise RecordRefused(
                f"the VM's state did not arrive within {self.timeout:g} s "
                f"(checked: {sorted(self.verdicts) or 'nothing'})"
            )


def _flip_guest_byte(pid: int, page: int = 0x200) -> None:
    """Test hook: change one byte of one guest page in QEMU ``pid``'s RAM memfd."""
    from host_agent.memory.sources import find_qemu_memfd

    path, _block, _size = find_qemu_memfd(pid)
    fd = os.open(path, os.O_RDWR)
    try:
        at = page * 4096 + 123
        old = os.pread(fd, 1, at) or b"\0"
        os.pwrite(fd, bytes([old[0] ^ 0x5A]), at)
    finally:
        os.close(fd)
    log.warning("TEST HOOK: changed guest page %d of the incoming VM (pid %d)", page, pid)


# ------------------------------------------------------------------------------ registry


class VmMoves:
    """The moves a host runs now, by VM; what the daemon component wires into the protocol.

    Args:
        daemon: the vtpm-host daemon (``sealer``, ``restorer``, ``hooks``, ``hasher``,
            ``config``, ``paths``, ``registry``).
        tamper: the target's test hook (see the module docstring), asked per migration.
        hook_timeout: the incoming bridge's ``--hook-timeout`` and the record wait.
    """

    def __init__(
        self,
        daemon: Any,
        *,
        tamper: Callable[[], str | None] = lambda: None,
        hook_timeout: float = 60.0,
    ) -> None:
        self.daemon = daemon
        self.tamper = tamper
        self.hook_timeout = hook_timeout
        self._lock = threading.Lock()
        self.outgoing: dict[uuid.UUID, SourceVmMove] = {}
        self.incoming: dict[uuid.UUID, TargetVmMove] = {}
        self.last: dict[str, Any] = {}

    # -- shared -----------------------------------------------------------------------------

    def _qemu_pid(self, vm: str) -> int:
        from host_agent.lifecycle.seal import qemu_pid_of

        return qemu_pid_of(self.daemon.hooks, vm)

    def _hash_ram(self, pid: int) -> bytes:
        return bytes(self.daemon.hasher.hash(pid).root())

    # -- source -----------------------------------------------------------------------------

    def begin_outgoing(self, vm_uuid: uuid.UUID, start_libvirt: Callable[[], None]) -> SourceVmMove:
        move = SourceVmMove(
            vm_uuid,
            start_libvirt,
            self._hash_ram,
            self._qemu_pid,
            lambda vm: self.daemon.hooks.read_pcrs(vm),
        )
        with self._lock:
            if vm_uuid in self.outgoing:
                raise MigrationError(f"VM {vm_uuid} is being migrated already")
            self.outgoing[vm_uuid] = move
        self.daemon.sealer.delegate(str(vm_uuid), move.on_get_stateblob)
        return move

    def end_outgoing(self, vm_uuid: uuid.UUID) -> None:
        with self._lock:
            move = self.outgoing.pop(vm_uuid, None)
        self.daemon.sealer.delegate(str(vm_uuid), None)
        if move is not None:
            self.last = {
                "stop_seconds": move.stop_seconds,
                "libvirt_seconds": move.libvirt_seconds,
            }

    def record_source(self, migration_id: uuid.UUID, vm_uuid: uuid.UUID) -> MigrationRecord:
        with self._lock:
            move = self.outgoing.get(vm_uuid)
        if move is None:
            raise MigrationError(f"VM {vm_uuid} has no VM migration under way")
        return move.record(migration_id, self.hook_timeout * 5)

    # -- target -----------------------------------------------------------------------------

    def prepare_incoming(self, vm_uuid: uuid.UUID) -> None:
        """Arm the VM for the incoming QEMU and route its SET_STATEBLOBs to the check."""
        from host_agent.lifecycle.adoption import VmLayout
        from host_agent.lifecycle.restore import ArmSpec, arm_vm

        vm = str(vm_uuid)
        move = TargetVmMove(
            vm_uuid, self._hash_ram, self._qemu_pid, self.tamper(), self.hook_timeout
        )
        with self._lock:
            if vm_uuid in self.incoming:
                raise MigrationError(f"VM {vm_uuid} is arriving already")
            self.incoming[vm_uuid] = move
        self.daemon.restorer.delegate(vm, move.on_set_stateblob)
        try:
            state_dir = Path(self.daemon.paths.state_dir)
            layout = VmLayout.of(state_dir, vm)
            layout.vm_dir.mkdir(parents=True, exist_ok=True)
            os.chmod(layout.vm_dir, 0o711)
            gid = None
            uri = self.daemon.config.libvirt.uri_for(state_dir)
            if not uri.startswith("qemu:///embed"):
                import grp

                with contextlib.suppress(KeyError):
                    gid = grp.getgrnam("libvirt-qemu").gr_gid
            spec = ArmSpec(
                vm_uuid=vm,
                vm_name=vm,
                vm_dir=layout.vm_dir,
                bridge_socket=layout.bridge_socket,
                runtime_dir=self.daemon.paths.runtime_dir,
                daemon_socket=self.daemon.paths.hooks_socket,
                listen_gid=gid,
                hook_timeout=self.hook_timeout,
            )
            arm_vm(spec, self.daemon._swtpm_of(vm, vm))
        except BaseException as err:
            self.end_incoming(vm_uuid, "abort")
            if isinstance(err, VtpmError) or not isinstance(err, Exception):
                raise
            raise MigrationError(f"cannot arm VM {vm} for its incoming QEMU: {err}") from err

    def record_check(self, record: MigrationRecord) -> None:
        with self._lock:
            move = self.incoming.get(record.vm_uuid)
        if move is None:
            raise RecordRefused(f"VM {record.vm_uuid} is not armed for an incoming migration")
        move.check(record)

    def record_arrival(self, vm_uuid: uuid.UUID) -> None:
        """Write the arrived VM's adoption record, from the domain definition libvirt brought
        (its ``vtpm`` metadata names the bridge and channel sockets), unless one is there or
        libvirt does not run the VM here: the attestation component finds the VM's channel
        socket in it, so the guest can attest on this host. Never raises (the move is
        committed already); a failure is logged."""
        from datetime import UTC, datetime

        from host_agent.lifecycle.adoption import AdoptionRecord, VmLayout
        from host_agent.lifecycle.domain_xml import DEFAULT_CHANNEL_NAME, describe_domain_xml
        from host_agent.lifecycle.libvirt_adapter import Hypervisor

        vm = str(vm_uuid)
        try:
            state_dir = Path(self.daemon.paths.state_dir)
            layout = VmLayout.of(state_dir, vm)
            if layout.record.exists():
                return
            with Hypervisor(self.daemon.config.libvirt.uri_for(state_dir)) as hv:
                if not hv.info(vm).active:
                    log.warning("migration: arrived VM %s does not run here; no record", vm)
                    return
                xml = hv.xml(vm)
            described = describe_domain_xml(xml)
            if not described.adopted or not described.channel_socket:
                log.warning("migration: arrived VM %s has no adoption metadata; no record", vm)
                return
            digest = hashlib.sha256(xml.encode()).hexdigest()
            record = AdoptionRecord(
                name=described.name,
                uuid=vm,
                adopted_at=datetime.now(UTC).isoformat(),
                bridge_socket=described.bridge_socket or str(layout.bridge_socket),
                channel_socket=described.channel_socket,
                channel_name=described.channel_name or DEFAULT_CHANNEL_NAME,
                tpm_model=described.tpm_model or "",
                previous_tpm_backend=None,
                vtpm_state="migrated-in",
                xml_sha256_before=digest,
                xml_sha256_after=digest,
            )
            tmp = layout.record.with_suffix(".json.tmp")
            tmp.write_text(record.to_json())
            os.replace(tmp, layout.record)
            log.info("migration: VM %s arrived; adoption record written", vm)
        except Exception as err:  # committed already: report, never raise
            log.warning("migration: no adoption record for arrived VM %s: %s", vm, err)

    def end_incoming(self, vm_uuid: uuid.UUID, decision: str) -> None:
        """Give the hooks back; after an abort stop what was armed (the QEMU, if any, failed)."""
        with self._lock:
            self.incoming.pop(vm_uuid, None)
        vm = str(vm_uuid)
        self.daemon.restorer.delegate(vm, None)
        if decision == "commit":
            self.record_arrival(vm_uuid)
            return
        from host_agent.lifecycle.adoption import VmLayout
        from host_agent.lifecycle.restore import _bridge_pid, _stop_pid

        layout = VmLayout.of(Path(self.daemon.paths.state_dir), vm)
        with contextlib.suppress(Exception):
            from host_agent.lifecycle.restore import ArmSpec

            spec = ArmSpec(vm, vm, layout.vm_dir, layout.bridge_socket, Path("."), Path("."))
            pid = _bridge_pid(spec)
            if pid is not None:
                _stop_pid(pid)
        with contextlib.suppress(VtpmError):
            inst = self.daemon._swtpm_of(vm, vm)
            inst.adopt()
            inst.stop()
