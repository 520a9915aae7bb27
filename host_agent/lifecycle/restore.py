"""Verified restore (patent step 1-2): at the SET_STATEBLOB hook, check memory before the VM runs.

An incoming QEMU (``virsh restore``, managedsave start, ``-incoming``, ``vtpm-host vm restore`` or
``vm revert``) loads guest RAM first and then pushes the vTPM state: SET_STATEBLOB PERMANENT, then
VOLATILE, then CMD_INIT; the VM is not running yet, and at the first SET_STATEBLOB its memfd holds
exactly the RAM of the image (platform-notes, "A control-channel bridge"). The daemon routes
each call to :meth:`Restorer.on_set_stateblob`:

PERMANENT (the decision):
  1. find the sealed records (:mod:`host_agent.lifecycle.seal`) whose PERMANENT digest equals the
     image's; keep those of THIS VM sealed on THIS host. None → veto, saying whether the state
     belongs to another VM, was sealed on another host, or has no record at all (``vtpm-host vm
     adopt-state`` is the operator's explicit way in);
  2. hash the memory QEMU has just loaded (QEMU's pid from the bridge, its guest-RAM memfd) and
     compare the root with each candidate (newest first). Equal → **replace** the blob with the
     sealed PERMANENT blob (the sealed state is installed, not the image's copy) and remember the
     record for this VM; different → veto naming the differing page ranges (against the newest
     candidate's leaves).
VOLATILE:
  the image's VOLATILE digest must equal the remembered record's → replace with the sealed
  VOLATILE blob; else veto. (What reached swtpm at PERMANENT was the sealed blob of a record whose
  memory matched, so a veto here leaves nothing foreign behind.)

A veto answers QEMU with TPM_FAIL: QEMU fails the load and exits, the VM never runs, and nothing
on disk changes (the image, the record, the domain definition). The reason goes to the agent log,
is kept in :attr:`Restorer.last_veto` for the CLI to report, and reaches QEMU's log, which
libvirt quotes in the error of a plain ``virsh restore`` (:mod:`host_agent.vtpm.hooks_server`).

After a verified restore (VOLATILE installed) ``after_restore`` runs on a thread of its own, off
QEMU's path: the daemon prunes the VM's old records there
(:class:`~host_agent.lifecycle.retention.AutoPrune`).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from evidence.errors import VtpmError
from host_agent.errors import MemoryLayoutMismatch
from host_agent.lifecycle.seal import (
    PERMANENT,
    VOLATILE,
    BridgeCalls,
    RamHasher,
    SealedState,
    list_sealed,
    load_leaves,
    qemu_pid_of,
)
from host_agent.memory.merkle import LeafSet, diff
from host_agent.store import TrustedStore
from host_agent.vtpm.bridge_link import registration_path
from host_agent.vtpm.daemon_link import HookCall
from host_agent.vtpm.hooks_server import Decision, HookHandler, Replace, Veto
from host_agent.vtpm.swtpm import SwtpmInstance

__all__ = [
    "ArmSpec",
    "MemoryVerdict",
    "RestoreRefused",
    "Restorer",
    "arm_vm",
    "compare_memory",
    "format_ranges",
]

log = logging.getLogger(__name__)


class RestoreRefused(VtpmError):
    """A restore was vetoed (the message is the veto's reason)."""

    id: ClassVar[str] = "lifecycle.restore_refused"


def format_ranges(ranges: Sequence[tuple[int, int]], limit: int = 8) -> str:
    """``"12, 40-47 and 3 more ranges"``."""
    parts = [f"{a}" if a == b else f"{a}-{b}" for a, b in ranges[:limit]]
    more = len(ranges) - limit
    text = ", ".join(parts)
    return f"{text} and {more} more ranges" if more > 0 else text


@dataclass(frozen=True)
class MemoryVerdict:
    """The memory comparison of one image or one loaded VM with one sealed record."""

    match: bool
    differing_pages: tuple[tuple[int, int], ...]
    reason: str


def compare_memory(
    loaded: LeafSet, sealed: SealedState, sealed_leaves: Callable[[], LeafSet]
) -> MemoryVerdict:
    """Compare loaded memory with a sealed record (its root first; leaves only on a mismatch).

    ``loaded`` may carry more blocks than the record (a stream's ROMs): only the record's blocks
    are compared. Page numbers are those of :func:`~host_agent.memory.merkle.diff`.
    """
    names = [n for n, _ in sealed.layout]
    try:
        mine = loaded.select(names)
    except MemoryLayoutMismatch as err:
        reason = f"memory layout differs from record {sealed.record_id}: {err}"
        return MemoryVerdict(False, (), reason)
    if mine.layout != sealed.layout:
        return MemoryVerdict(
            False,
            (),
            f"memory layout {list(mine.layout)} differs from record {sealed.record_id}'s "
            f"{list(sealed.layout)}",
        )
    if mine.root() == sealed.memory_root:
        return MemoryVerdict(True, (), "memory matches")
    ranges = tuple(diff(sealed_leaves(), mine))
    pages = sum(b - a + 1 for a, b in ranges)
    return MemoryVerdict(
        False,
        ranges,
        f"guest memory differs from sealed record {sealed.record_id} in {pages} page(s): "
        f"{format_ranges(ranges)} (root sealed {sealed.memory_root.hex()[:16]}…, loaded "
        f"{mine.root().hex()[:16]}…)",
    )


class Restorer:
    """The SET_STATEBLOB handler (see the module docstring).

    Args:
        store: the trusted store holding the sealed records.
        bridges: the hooks server (QEMU's pid).
        host_id: this host's id; records sealed elsewhere are refused.
        hasher: hashes the loaded guest RAM (default: in this process).
        clock: monotonic clock for timings.
        after_restore: called as ``(vm_uuid, record_id, in_flight)`` on a thread after a
            verified restore; ``in_flight`` are the records other restores are using.
    """

    def __init__(
        self,
        store: TrustedStore,
        bridges: BridgeCalls,
        *,
        host_id: str,
        hasher: RamHasher | None = None,
        clock: Callable[[], float] = time.monotonic,
        after_restore: Callable[[str, str, frozenset[str]], object] | None = None,
    ) -> None:
        self.store = store
        self.after_restore = after_restore
        self.bridges = bridges
        self.host_id = host_id
        self._hasher = hasher or RamHasher(1)
        self._clock = clock
        self._lock = threading.Lock()
        self._verified: dict[str, SealedState] = {}
        self._delegates: dict[str, HookHandler] = {}
        self.last_veto: dict[str, str] = {}
        self.vetoes: dict[str, int] = {}  # VM → how many restores were refused (a new one shows)
        self.last_verify_seconds: dict[str, float] = {}

    def delegate(self, vm_uuid: str, handler: HookHandler | None) -> None:
        """Route this VM's SET_STATEBLOB hooks to ``handler`` instead of the sealed-record check
        (an incoming migration verifies against the record its source signed), until called
        with None. The handler's vetoes are recorded in :attr:`last_veto` like ours."""
        with self._lock:
            if handler is None:
                self._delegates.pop(vm_uuid, None)
            else:
                self._delegates[vm_uuid] = handler

    def in_flight(self) -> frozenset[str]:
        """The records restores under way are verified against (not to be pruned)."""
        with self._lock:
            return frozenset(s.record_id for s in self._verified.values())

    def _restored(self, vm: str, record_id: str) -> None:
        if self.after_restore is None:
            return
        callback = self.after_restore
        pinned = self.in_flight() | {record_id}

        def run() -> None:
            try:
                callback(vm, record_id, pinned)
            except Exception:  # a failed prune must not touch the restore
                log.exception("after the restore of VM %s", vm)

        threading.Thread(target=run, name=f"after-restore-{vm[:8]}", daemon=True).start()

    def on_set_stateblob(self, call: HookCall) -> Decision:
        """Hook handler: verify at PERMANENT, check VOLATILE, install the sealed blobs."""
        vm = call.vm_uuid
        with self._lock:
            delegate = self._delegates.get(vm)
        try:
            if delegate is not None:
                decision = delegate(call)
            elif call.blob_type == PERMANENT:
                decision = self._permanent(call)
            elif call.blob_type == VOLATILE:
                decision = self._volatile(call)
            else:
                decision = Veto(f"unexpected SET_STATEBLOB of type {call.blob_type}")
        except VtpmError as err:
            decision = Veto(f"restore not verified: {err}")
        if isinstance(decision, Veto):
            with self._lock:
                self._verified.pop(vm, None)
                self.last_veto[vm] = decision.reason
                self.vetoes[vm] = self.vetoes.get(vm, 0) + 1
            log.error("restore of VM %s refused: %s", vm, decision.reason)
        return decision

    def _permanent(self, call: HookCall) -> Decision:
        vm = call.vm_uuid
        with self._lock:
            self._verified.pop(vm, None)
        t0 = self._clock()
        same_digest = [
            s for s in list_sealed(self.store) if s.blob(PERMANENT).sha256 == call.sha256
        ]
        candidates = [s for s in same_digest if s.vm_uuid == vm and s.host_id == self.host_id]
        if not candidates:
            return Veto(self._no_record_reason(vm, call.sha256, same_digest))
        pid = qemu_pid_of(self.bridges, vm)
        loaded = self._hasher.hash(pid)
        first: tuple[SealedState, str] | None = None
        for sealed in candidates:
            verdict = compare_memory(
                loaded, sealed, functools.partial(load_leaves, self.store, sealed.record_id)
            )
            if verdict.match:
                with self._lock:
                    self._verified[vm] = sealed
                self.last_verify_seconds[vm] = self._clock() - t0
                log.info(
                    "VM %s: loaded memory matches sealed record %s (%.3f s); installing the "
                    "sealed vTPM state",
                    vm,
                    sealed.record_id,
                    self.last_verify_seconds[vm],
                )
                blob = sealed.blob(PERMANENT)
                return Replace(blob.blob, blob.flags)
            if first is None:
                first = (sealed, verdict.reason)
        assert first is not None
        return Veto(first[1])

    def _no_record_reason(self, vm: str, digest: str, same_digest: list[SealedState]) -> str:
        others = [s for s in same_digest if s.vm_uuid != vm]
        if others:
            return (
                f"the image's vTPM state belongs to VM {others[0].vm_uuid} (sealed record "
                f"{others[0].record_id}), not to VM {vm}"
            )
        elsewhere = [s for s in same_digest if s.host_id != self.host_id]
        if elsewhere:
            return (
                f"the image's vTPM state was sealed on host {elsewhere[0].host_id!r}, not on "
                f"this host {self.host_id!r}"
            )
        return (
            f"no sealed record of VM {vm} holds this vTPM state (PERMANENT sha256 "
            f"{digest[:16]}…): a state made without the agent, or an older one; an operator "
            "may adopt it with `vtpm-host vm adopt-state`"
        )

    def _volatile(self, call: HookCall) -> Decision:
        vm = call.vm_uuid
        with self._lock:
            sealed = self._verified.pop(vm, None)
        if sealed is None:
            return Veto("SET_STATEBLOB VOLATILE without a verified PERMANENT state first")
        blob = sealed.blob(VOLATILE)
        if blob.sha256 != call.sha256:
            return Veto(
                f"the image's VOLATILE vTPM state differs from sealed record {sealed.record_id} "
                f"(sha256 {call.sha256[:16]}… instead of {blob.sha256[:16]}…)"
            )
        self._restored(vm, sealed.record_id)
        return Replace(blob.blob, blob.flags)


# ---------------------------------------------------------------------------- arming


@dataclass(frozen=True)
class ArmSpec:
    """What arming one VM needs (the layout of ``host_agent.lifecycle.adoption``).

    Attributes:
        vm_uuid, vm_name: the VM.
        vm_dir: ``<state_dir>/vms/<uuid>`` (``bridge.pid``, ``bridge.log``, ``arm.lock``).
        bridge_socket: the domain's ``<tpm><backend type='external'>`` socket.
        runtime_dir: where bridges register themselves.
        daemon_socket: the daemon's hooks socket.
        listen_gid: group allowed on the bridge socket (system libvirtd), None for the embedded
            driver.
        python: the interpreter that runs the bridge.
        hook_timeout: the bridge's ``--hook-timeout``.
    """

    vm_uuid: str
    vm_name: str
    vm_dir: Path
    bridge_socket: Path
    runtime_dir: Path
    daemon_socket: Path
    listen_gid: int | None = None
    python: str = sys.executable
    hook_timeout: float = 10.0


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return state != "Z"


def _bridge_pid(spec: ArmSpec) -> int | None:
    """The pid in ``bridge.pid`` if it is a live bridge of this VM."""
    try:
        pid = int((spec.vm_dir / "bridge.pid").read_text().strip())
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError):
        return None
    ok = b"host_agent.vtpm.bridge" in argv and spec.vm_uuid.encode() in argv
    return pid if ok and _pid_alive(pid) else None


def _stop_pid(pid: int, timeout: float = 5.0) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _pid_alive(pid) and time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, os.WNOHANG)
        time.sleep(0.01)
    if _pid_alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def arm_vm(spec: ArmSpec, swtpm: SwtpmInstance, *, timeout: float = 10.0) -> int:
    """Make a stopped VM ready for an incoming QEMU (restore, managedsave start, revert).

    Its swtpm is restarted on the VM's state without swtpm_setup (it serves a plain boot just as
    well), and a fresh bridge (``--once``) listens on the domain's TPM socket, so that whoever
    starts the incoming QEMU — ``vtpm-host vm restore``, a plain ``virsh restore`` — goes through
    the daemon's verification. A VM already armed (its bridge alive and registered, its swtpm
    running) is left as it is. Serialised per VM with ``arm.lock`` (the daemon and a command may
    arm the same VM at once).

    Returns:
        The bridge's pid.

    Raises:
        RestoreRefused: the bridge did not come up; SwtpmError, VtpmError: swtpm failed.
    """
    spec.vm_dir.mkdir(parents=True, exist_ok=True)
    with open(spec.vm_dir / "arm.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        reg = registration_path(spec.runtime_dir, spec.vm_uuid)
        pid = _bridge_pid(spec)
        if pid is not None and swtpm.state.value != "running":
            swtpm.adopt()
        if pid is not None and swtpm.state.value == "running":
            with contextlib.suppress(OSError, ValueError):
                if json.loads(reg.read_text()).get("pid") == pid:
                    return pid
        if pid is not None:
            _stop_pid(pid)
        if swtpm.state.value in ("new", "stopped", "failed"):
            swtpm.adopt()
        swtpm.restart_for_incoming()
        return _start_bridge(spec, swtpm, reg, timeout)


def _start_bridge(spec: ArmSpec, swtpm: SwtpmInstance, reg: Path, timeout: float) -> int:
    cmd = [
        spec.python, "-m", "host_agent.vtpm.bridge",
        "--vm-uuid", spec.vm_uuid, "--vm-name", spec.vm_name,
        "--listen", str(spec.bridge_socket), "--swtpm-ctrl", str(swtpm.ctrl_socket),
        "--daemon-sock", str(spec.daemon_socket), "--runtime-dir", str(spec.runtime_dir),
        "--hook-timeout", str(spec.hook_timeout), "--once",
    ]  # fmt: skip
    if spec.listen_gid is not None:
        cmd += ["--listen-mode", "660", "--listen-gid", str(spec.listen_gid)]
    with contextlib.suppress(FileNotFoundError):
        reg.unlink()
    log_path = spec.vm_dir / "bridge.log"
    try:
        with open(log_path, "ab") as out:
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                start_new_session=True,  # outlives its starter, like QEMU (invariant 6)
            )
    except OSError as err:
        swtpm.stop()
        raise RestoreRefused(f"cannot run the bridge of VM {spec.vm_uuid}: {err}") from err
    (spec.vm_dir / "bridge.pid").write_text(f"{proc.pid}\n")
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError, ValueError):
            if json.loads(reg.read_text()).get("pid") == proc.pid:
                log.info("VM %s armed for an incoming QEMU (bridge %d)", spec.vm_uuid, proc.pid)
                return proc.pid
        if proc.poll() is not None or time.monotonic() > deadline:
            if proc.poll() is None:
                proc.kill()
            proc.wait(5)
            swtpm.stop()
            tail = log_path.read_text(errors="replace")[-400:]
            raise RestoreRefused(f"the bridge of VM {spec.vm_uuid} did not come up: {tail}")
        time.sleep(0.01)
