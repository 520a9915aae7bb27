"""``vtpm-host daemon``: the host agent's long-running process (runs in the foreground).

What it owns (ARCHITECTURE.md §1):

- the host TPM port (``open_host_tpm``) and the trusted store (``open_store``): the daemon
  refuses to start on a rolled-back, tampered or foreign store (the store's typed error);
- the hooks server on ``<state_dir>/run/daemon.sock``, where every VM's bridge connects (and
  reconnects on its own): GET_STATEBLOB goes to :class:`~host_agent.lifecycle.seal.Sealer`,
  SET_STATEBLOB to :class:`~host_agent.lifecycle.restore.Restorer`;
- the VM registry (:mod:`host_agent.service.vm_registry`): VM UUID → swtpm, bridge, adoption;
- the control socket ``<state_dir>/run/control.sock`` (0600) for ``vtpm-host`` commands that
  need the daemon's store or state: one JSON request line, one JSON reply line
  (``{"op": "status"}`` → ``{"ok": true, "value": …}`` or ``{"ok": false, "error_id", "message"}``);
  ops: ``status``, ``prepare_save`` (start the background hashing pass of a VM), ``adopt_state``
  (seal a record for an image made without the agent), ``records`` (sealed records, newest
  first), ``last_veto`` (why a restore was refused), ``prune`` (drop old sealed records,
  :mod:`host_agent.lifecycle.retention`; also run for a VM after each verified restore);
- the ``components``: other services that live inside the daemon;
- arming after a save: once an adopted VM's save is sealed and its QEMU has gone, the daemon
  restarts its swtpm for incoming state and starts a bridge on its TPM socket, so that a plain
  ``virsh restore`` (or managedsave start) goes through the same verification
  (:meth:`Daemon.sync`). The libvirt connection itself stays with the ``vtpm-host vm`` commands:
  the embedded driver's root is locked by the process that opens it.

Start order: TPM → store → registry (adoption records, bridge registry) → reap the swtpms of
VMs that are gone, take over those of VMs that still run → hooks server → control socket →
components. A failure undoes what was done and the daemon exits with the error.

Stop (SIGTERM, SIGINT, or :meth:`Daemon.stop`): components (reverse order), control socket, hooks
server, store, TPM. **Bridges and swtpms are left running** (invariant 6: guests keep their TPM
while the daemon restarts; bridges reconnect to the next daemon within their reconnect interval,
and a hook that arrives meanwhile waits for it, bounded). Signals are handled in one place,
:meth:`Daemon.run`; a second SIGINT/SIGTERM while stopping exits at once.

The ``components`` extension point
----------------------------------
A component is any object with two methods (:class:`Component`)::

    start(daemon: Daemon) -> None   # after the store, hooks server and registry are up
    stop() -> None                  # before they go down; must not raise

It may use ``daemon.store``, ``daemon.tpm``, ``daemon.hooks`` (``read_pcrs(uuid)``,
``call(uuid, op)``), ``daemon.registry`` (also ``daemon.vms``), ``daemon.config``,
``daemon.paths``, ``daemon.host_id``, ``daemon.now()``, and take over one VM's state-transfer
hooks for a while: ``daemon.sealer.delegate(uuid, handler)`` (GET_STATEBLOB, e.g. an outgoing
migration) and ``daemon.restorer.delegate(uuid, handler)`` (SET_STATEBLOB, e.g. an incoming one);
``delegate(uuid, None)`` gives them back. Components start in list order and stop in reverse;
one that fails to start stops the ones started before it and the daemon does not run.

The attestation side's services (``host_agent.service.attest``: the guest channel server;
``host_agent.service.enroll``: the enrollment API) and the status/metrics components plug in
here, programmatically (``Daemon(config, components=[…])``) or by name:
``vtpm-host daemon --component host_agent.service.status:StatusComponent`` (a
``module:callable`` that returns a component when called with no arguments). The names listed in
:data:`DEFAULT_COMPONENTS` are loaded whenever their module exists.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import enum
import importlib
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any, ClassVar, Protocol, runtime_checkable

from evidence.errors import VtpmError
from host_agent._jsonline import call_json_line
from host_agent.config import LOG_LEVELS, AgentConfig, load_config, with_state_dir
from host_agent.errors import StateError
from host_agent.lifecycle.restore import Restorer
from host_agent.lifecycle.seal import RamHasher, Sealer
from host_agent.logging_setup import LOG_FORMATS, setup_logging
from host_agent.memory.dirty import TrackerSupport, probe_soft_dirty
from host_agent.service.relay_errors import RelayErrorTally
from host_agent.service.vm_registry import VmRegistry
from host_agent.store import TrustedStore
from host_agent.store.provision import open_store
from host_agent.vtpm.cli import DEFAULT_RUNTIME_DIR
from host_agent.vtpm.daemon_link import HookCall
from host_agent.vtpm.hooks_server import Decision, HooksServer, Veto
from host_agent.vtpm.swtpm import SwtpmInstance, reap_orphans, vtpm_dir_of

__all__ = [
    "DEFAULT_COMPONENTS",
    "Component",
    "ControlClient",
    "Daemon",
    "DaemonError",
    "DaemonPaths",
    "DaemonRunState",
    "register",
]

log = logging.getLogger("host_agent.service.daemon")

#: Components loaded by name when their module is installed (``module:callable``).
DEFAULT_COMPONENTS: tuple[str, ...] = ()


def observe_hook(
    handler: Callable[[HookCall], Decision],
    kind: str,
    observed: Callable[[str, HookCall, float, Decision], None],
    clock: Callable[[], float] = time.monotonic,
) -> Callable[[HookCall], Decision]:
    """Wrap a state-transfer hook so each call's duration and decision reach ``observed``.

    ``observed`` must not change the decision: its exceptions are logged and dropped, and the
    handler's own exceptions propagate unchanged (the hooks server turns them into vetoes).
    """

    def wrapped(call: HookCall) -> Decision:
        start = clock()
        decision = handler(call)
        try:
            observed(kind, call, clock() - start, decision)
        except Exception:
            log.exception("recording the %s hook of VM %s", kind, call.vm_uuid)
        return decision

    return wrapped


class DaemonError(VtpmError):
    """The daemon cannot start, or a control request failed."""

    id: ClassVar[str] = "daemon.error"


@runtime_checkable
class Component(Protocol):
    """A service living inside the daemon (see the module docstring)."""

    def start(self, daemon: Daemon) -> None: ...

    def stop(self) -> None: ...


class DaemonRunState(enum.Enum):
    CREATED = "created"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"
    FAILED = "failed"


@dataclass(frozen=True)
class DaemonPaths:
    """Where the daemon keeps its sockets (``<state_dir>/run``) and finds the bridges."""

    state_dir: Path
    runtime_dir: Path

    @property
    def run_dir(self) -> Path:
        return self.state_dir / "run"

    @property
    def hooks_socket(self) -> Path:
        return self.run_dir / "daemon.sock"

    @property
    def control_socket(self) -> Path:
        return self.run_dir / "control.sock"

    @property
    def vtpm_dir(self) -> Path:
        return vtpm_dir_of(self.state_dir)


def default_host_id(config: AgentConfig) -> str:
    """This host's id in records: ``registrar.host_id``, else the hostname in lower case."""
    return config.registrar.host_id or socket.gethostname().lower()


class Daemon:
    """The daemon (see the module docstring).

    Args:
        config: the agent configuration (built once, at the edge).
        runtime_dir: where bridges register themselves.
        components: services started after the core, stopped before it.
        open_tpm: ``TpmConfig -> HostTpm`` (default: discovery's ``open_host_tpm``).
        now: wall clock (records' times).
        clock: monotonic clock.
        hash_workers: memory hashing processes (default: one per core).
        reap: stop the swtpms of VMs that no longer exist at start.
        auto_arm: after a sealed save of an adopted VM, arm it for its restore (:meth:`sync`).
        background_pass: keep a background hashing pass over every VM whose vTPM runs, where
            soft-dirty tracking works (:meth:`poll_bridges`), so that every save path re-hashes
            only the pages written since; False leaves it to ``vtpm-host vm save``.
        soft_dirty_probe: how to learn whether soft-dirty tracking works (default: probe the
            kernel; tests force either answer).
    """

    #: Seconds after a sealed save within which the VM's QEMU must have gone for it to be armed.
    ARM_WINDOW = 60.0
    #: Seconds between two rounds of asking the connected bridges for their relay errors.
    RELAY_POLL_INTERVAL = 5.0
    #: Seconds one bridge has to answer that question.
    RELAY_POLL_TIMEOUT = 2.0

    def __init__(
        self,
        config: AgentConfig,
        *,
        runtime_dir: Path = DEFAULT_RUNTIME_DIR,
        components: Sequence[Component] = (),
        open_tpm: Callable[[Any], Any] | None = None,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
        clock: Callable[[], float] = time.monotonic,
        hash_workers: int | None = None,
        reap: bool = True,
        auto_arm: bool = True,
        background_pass: bool = True,
        soft_dirty_probe: Callable[[], TrackerSupport] = probe_soft_dirty,
    ) -> None:
        self.config = config
        self.paths = DaemonPaths(Path(config.state_dir), Path(runtime_dir))
        self.components: list[Component] = list(components)
        self._open_tpm = open_tpm
        self.now = now
        self.clock = clock
        self.hash_workers = hash_workers
        self.reap = reap
        self.host_id = default_host_id(config)
        self.run_state = DaemonRunState.CREATED
        self.tpm: Any = None
        self.store: TrustedStore | None = None
        self.hooks: HooksServer | None = None
        self.sealer: Sealer | None = None
        self.restorer: Restorer | None = None
        self.hasher: RamHasher | None = None
        self.registry = VmRegistry(
            self.paths.state_dir, self.paths.runtime_dir, swtpm_factory=self._swtpm_of
        )
        self._control: _ControlServer | None = None
        self._arm_pending: dict[str, float] = {}
        #: Relay errors of the bridges, per VM and kind (:meth:`poll_bridges` feeds it).
        self.relay_errors = RelayErrorTally()
        self._relay_polled = float("-inf")
        self.auto_arm = auto_arm
        self.background_pass = background_pass
        self._soft_dirty_probe = soft_dirty_probe
        self._started: list[Component] = []
        self._stop_requested = threading.Event()
        self._lock = threading.RLock()

    @property
    def vms(self) -> VmRegistry:
        """The VM registry (the name components use)."""
        return self.registry

    # ------------------------------------------------------------------ lifecycle

    def _require(self, what: str, *states: DaemonRunState) -> None:
        if self.run_state not in states:
            raise StateError(self.run_state.value, [s.value for s in states], f"daemon: {what}")

    def _swtpm_of(self, vm_uuid: str, vm_name: str) -> SwtpmInstance:
        return SwtpmInstance(self.paths.vtpm_dir, vm_uuid, vm_name, _Sealer(self))

    def start(self) -> Daemon:
        """Bring everything up (see the module docstring). Idempotent only in the sense that a
        second call raises :class:`StateError`.

        Raises:
            StoreRolledBack, StoreIntegrityError, … : the store is refused (nothing runs).
            VtpmError: the TPM, the sockets or a component failed (everything is undone).
        """
        with self._lock:
            self._require("start()", DaemonRunState.CREATED)
            self.run_state = DaemonRunState.STARTING
            try:
                self._start()
            except BaseException:
                self._teardown()
                self.run_state = DaemonRunState.FAILED
                raise
            self.run_state = DaemonRunState.RUNNING
        log.info(
            "daemon running: store %s, hooks %s, %d VM(s) known, %d component(s)",
            self.paths.state_dir,
            self.paths.hooks_socket,
            len(self.registry.uuids()),
            len(self._started),
        )
        return self

    def _start(self) -> None:
        opener = self._open_tpm
        if opener is None:
            from host_agent.tpm.discovery import open_host_tpm

            opener = open_host_tpm
        self.tpm = opener(self.config.tpm)
        self.store = open_store(self.config, self.tpm)
        log.info("store open (generation %d)", self.store.generation)
        self.paths.run_dir.mkdir(parents=True, exist_ok=True, mode=0o711)
        self.registry.load()
        live = self.registry.uuids()
        if self.reap:
            for reaped in reap_orphans(self.paths.vtpm_dir, live):
                log.warning("reaped swtpm of vanished VM %s (%s)", reaped.vm, reaped.how)
        attached = self.registry.attach_swtpms(live)
        if attached:
            log.info("took over the running swtpm of %d VM(s): %s", len(attached), attached)
        self.hasher = RamHasher(self.hash_workers).start()
        self.hooks = HooksServer(
            self.paths.hooks_socket,
            on_report=lambda r: self.relay_errors.update(r.vm_uuid, r.instance, r.relay_errors),
        ).start()
        self.sealer = Sealer(
            self.store,
            self.hooks,
            host_id=self.host_id,
            now=self.now,
            vm_name=self.registry.name_of,
            domain_xml_sha256=self._domain_xml_sha256,
            workers=self.hash_workers,
            hasher=self.hasher,
            probe=self._soft_dirty_probe,
            clock=self.clock,
        )
        from host_agent.lifecycle.retention import AutoPrune

        self.restorer = Restorer(
            self.store,
            self.hooks,
            host_id=self.host_id,
            hasher=self.hasher,
            after_restore=AutoPrune(
                self.store,
                self.config.libvirt.uri_for(self.config.state_dir),
                vm_name=self.registry.name_of,
            ),
        )
        self.hooks.on_get_stateblob = observe_hook(
            self.sealer.on_get_stateblob, "save", self._hook_observed
        )
        self.hooks.on_set_stateblob = observe_hook(
            self.restorer.on_set_stateblob, "restore", self._hook_observed
        )
        self._control = _ControlServer(self.paths.control_socket, self._control_op).start()
        for component in self.components:
            component.start(self)
            self._started.append(component)

    def _domain_xml_sha256(self, vm_uuid: str) -> str | None:
        entry = self.registry.get(vm_uuid)
        if entry is None or entry.adoption is None:
            return None
        value = entry.adoption.get("xml_sha256_after")
        return str(value) if value else None

    def stop(self) -> None:
        """Stop the daemon; bridges and swtpms keep running (invariant 6). Idempotent."""
        with self._lock:
            if self.run_state in (DaemonRunState.STOPPED, DaemonRunState.FAILED):
                return
            if self.run_state is DaemonRunState.CREATED:
                self.run_state = DaemonRunState.STOPPED
                return
            self.run_state = DaemonRunState.STOPPING
            self._teardown()
            self.run_state = DaemonRunState.STOPPED
        log.info("daemon stopped (bridges and swtpms left running)")

    def _teardown(self) -> None:
        for component in reversed(self._started):
            try:
                component.stop()
            except Exception:
                log.exception("component %r failed to stop", component)
        self._started.clear()
        if self._control is not None:
            self._control.close()
            self._control = None
        if self.hooks is not None:
            self.hooks.close()
            self.hooks = None
        if self.hasher is not None:
            self.hasher.close()
            self.hasher = None
        if self.store is not None:
            with contextlib.suppress(VtpmError):
                self.store.close()
            self.store = None
        if self.tpm is not None:
            with contextlib.suppress(Exception):
                self.tpm.close()
            self.tpm = None

    def request_stop(self) -> None:
        """Ask :meth:`run` to stop (thread-safe; what the signal handler does)."""
        self._stop_requested.set()

    def run(self, *, poll: float = 0.5) -> int:
        """Start, then serve until SIGTERM/SIGINT (the one place signals are handled), then stop.

        Returns:
            The exit status: 0.
        """
        previous: dict[signal.Signals, Any] = {}
        hits = [0]

        def on_signal(signum: int, _frame: FrameType | None) -> None:
            hits[0] += 1
            if hits[0] > 1:
                log.error("second %s: exiting at once", signal.Signals(signum).name)
                os._exit(1)
            log.info("%s: stopping (bridges and swtpms stay up)", signal.Signals(signum).name)
            self.request_stop()

        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, on_signal)
        try:
            self.start()
            while not self._stop_requested.wait(poll):
                self.sync()
        finally:
            self.stop()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return 0

    def sync(self) -> None:
        """Refresh the registry: adoption records and registered bridges (VMs adopted or started
        since), and which bridges are connected to the hooks server now; then arm the adopted
        VMs whose save was sealed and whose QEMU has gone (:meth:`_arm_saved`)."""
        self.registry.load()
        if self.hooks is not None:
            self.registry.sync_bridges(self.hooks.bridges())
            if self.clock() - self._relay_polled >= self.RELAY_POLL_INTERVAL:
                self.poll_bridges()
        if self.auto_arm and self.sealer is not None:
            self._arm_saved()

    def poll_bridges(self) -> dict[tuple[str, str], int]:
        """Ask every connected bridge for its relay error counters (its ``status`` on the daemon
        link), fold them into :attr:`relay_errors` and return the totals ``{(vm, kind): n}``.
        The same answer says whether the VM's vTPM runs and under which QEMU: such a VM gets a
        background hashing pass (:meth:`Sealer.track_running`) unless one already runs.

        A bridge that does not answer within ``RELAY_POLL_TIMEOUT`` is skipped this round.
        """
        self._relay_polled = self.clock()
        hooks = self.hooks
        if hooks is not None:
            for vm_uuid in hooks.bridges():
                try:
                    value = hooks.call(vm_uuid, "status", timeout=self.RELAY_POLL_TIMEOUT)
                    counts = value["stats"].get("relay_errors", {})
                    self.relay_errors.update(vm_uuid, str(value.get("instance", "")), counts)
                except (VtpmError, KeyError, TypeError, AttributeError, ValueError) as err:
                    log.debug("relay errors of bridge %s not read: %s", vm_uuid, err)
                    continue
                self._keep_background_pass(vm_uuid, value)
        return self.relay_errors.counts()

    def _keep_background_pass(self, vm_uuid: str, status: dict[str, Any]) -> None:
        sealer, pid = self.sealer, status.get("qemu_pid")
        if not self.background_pass or sealer is None or status.get("tpm") != "running":
            return
        if not isinstance(pid, int) or pid <= 0:
            return
        try:
            if sealer.track_running(vm_uuid, pid):
                log.info("VM %s: background hashing pass started (QEMU pid %d)", vm_uuid, pid)
        except VtpmError as err:  # e.g. no memfd RAM: the save hashes in full and says why
            log.warning("VM %s: no background hashing pass: %s", vm_uuid, err)

    def _hook_observed(self, kind: str, call: HookCall, seconds: float, decision: Decision) -> None:
        """Feed the metrics component (when one runs) with a hook's duration and its veto."""
        metrics = getattr(self, "metrics", None)
        if metrics is None:
            return
        if kind == "save":
            metrics.seal_duration(seconds)
        else:
            metrics.verify_duration(seconds)
        if isinstance(decision, Veto):
            # The reason names pages and digests; the metric label stays a stable category.
            metrics.refusal(f"{kind}.vetoed")

    def _arm_saved(self) -> None:
        """After a save (``virsh save``, managedsave, ``vm save``) the VM's QEMU, bridge and
        swtpm go away; arm the VM again (swtpm for incoming state + a listening bridge), so that
        a plain ``virsh restore`` of the image goes through the same verification as ``vtpm-host
        vm restore``. A VM whose bridge is still there after ``ARM_WINDOW`` seconds kept running
        (a live snapshot) and is left alone; a VM shut down or destroyed without a save is never
        armed."""
        assert self.sealer is not None
        now = self.clock()
        for vm, at in self.sealer.take_sealed().items():
            self._arm_pending.setdefault(vm, at)
        for vm, at in list(self._arm_pending.items()):
            entry = self.registry.get(vm)
            if entry is None or entry.adoption is None or not entry.adoption.get("bridge_socket"):
                del self._arm_pending[vm]
                continue
            if now - at > self.ARM_WINDOW:
                del self._arm_pending[vm]
                continue
            if entry.bridge_connected or any(r.vm_uuid == vm for r in self._live_bridges()):
                continue
            del self._arm_pending[vm]
            threading.Thread(
                target=self._arm, args=(entry,), name=f"arm-{vm[:8]}", daemon=True
            ).start()

    def _live_bridges(self) -> list[Any]:
        from host_agent.vtpm.bridge_link import registered_bridges

        return list(registered_bridges(self.paths.runtime_dir))

    def _arm(self, entry: Any) -> None:
        from host_agent.lifecycle.restore import ArmSpec, arm_vm

        gid = None
        uri = self.config.libvirt.uri_for(self.config.state_dir)
        if not uri.startswith("qemu:///embed"):  # system libvirtd: QEMU runs as libvirt-qemu
            import grp

            with contextlib.suppress(KeyError):
                gid = grp.getgrnam("libvirt-qemu").gr_gid
        spec = ArmSpec(
            vm_uuid=entry.uuid,
            vm_name=entry.name or entry.uuid,
            vm_dir=self.paths.state_dir / "vms" / entry.uuid,
            bridge_socket=Path(str(entry.adoption["bridge_socket"])),
            runtime_dir=self.paths.runtime_dir,
            daemon_socket=self.paths.hooks_socket,
            listen_gid=gid,
        )
        try:
            arm_vm(spec, self._swtpm_of(entry.uuid, entry.name or entry.uuid))
        except VtpmError as err:
            log.error("cannot arm VM %s for its restore: %s", entry.uuid, err)

    # ------------------------------------------------------------------ control

    def status(self) -> dict[str, Any]:
        self.sync()
        return {
            "run_state": self.run_state.value,
            "pid": os.getpid(),
            "host_id": self.host_id,
            "state_dir": str(self.paths.state_dir),
            "store_generation": None if self.store is None else self.store.generation,
            "vms": [
                {**e.as_json(), "relay_errors": self.relay_errors.total(e.uuid)}
                for e in self.registry.entries()
            ],
            "components": [type(c).__name__ for c in self._started],
        }

    def _control_op(self, op: str, args: dict[str, Any]) -> dict[str, Any]:
        if op == "status":
            return self.status()
        if self.run_state is not DaemonRunState.RUNNING:
            raise DaemonError(f"daemon is {self.run_state.value}")
        assert self.sealer is not None and self.restorer is not None and self.store is not None
        if op == "prepare_save":
            return {"mode": self.sealer.prepare(_arg(args, "vm_uuid"))}
        if op == "records":
            from host_agent.lifecycle.seal import list_sealed

            vm = args.get("vm_uuid")
            found = list_sealed(self.store, str(vm) if vm else None)
            return {
                "records": [
                    {"record_id": s.record_id, "vm_uuid": s.vm_uuid, "sealed_at": s.sealed_at,
                     "origin": s.origin, "memory_root": s.memory_root.hex()}
                    for s in found
                ]
            }  # fmt: skip
        if op == "last_veto":
            vm = _arg(args, "vm_uuid")
            return {
                "reason": self.restorer.last_veto.get(vm),
                "count": self.restorer.vetoes.get(vm, 0),
            }
        if op == "prune":
            from host_agent.lifecycle.retention import prune_request

            return prune_request(
                self.store,
                self.config.libvirt.uri_for(self.config.state_dir),
                args,
                pinned=self.restorer.in_flight(),
                vm_names={e.uuid: e.name for e in self.registry.entries() if e.name},
            )
        if op == "adopt_state":
            from host_agent.lifecycle.image_verify import adopt_image_state

            sealed = adopt_image_state(
                self.store,
                Path(_arg(args, "file")),
                vm_uuid=_arg(args, "vm_uuid"),
                vm_name=str(args.get("vm_name", "")),
                host_id=self.host_id,
                now=self.now(),
                workers=self.hash_workers,
            )
            return {"record": sealed.record_id, "memory_root": sealed.memory_root.hex()}
        raise DaemonError(f"unknown control op {op!r}")


def _arg(args: dict[str, Any], name: str) -> str:
    value = args.get(name)
    if not isinstance(value, str) or not value:
        raise ValueError(f"control request needs a string {name!r}")
    return value


class _Sealer:
    """The daemon's TPM as a swtpm state-key sealer, looked up when a swtpm needs it."""

    def __init__(self, daemon: Daemon) -> None:
        self._daemon = daemon

    def seal(self, data: bytes) -> bytes:
        return bytes(self._daemon.tpm.seal(data))

    def unseal(self, blob: bytes) -> bytes:
        return bytes(self._daemon.tpm.unseal(blob))


# ---------------------------------------------------------------------- control socket


class _ControlServer:
    """One JSON line in, one JSON line out, per connection; a thread per connection."""

    def __init__(self, path: Path, handler: Callable[[str, dict[str, Any]], dict[str, Any]]):
        self.path = path
        self._handler = handler
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._closing = False

    def start(self) -> _ControlServer:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(str(self.path))
            os.chmod(self.path, 0o600)
            sock.listen(16)
        except OSError as err:
            sock.close()
            raise DaemonError(f"control socket {self.path}: {err}") from err
        self._sock = sock
        self._thread = threading.Thread(target=self._accept, name="control", daemon=True)
        self._thread.start()
        return self

    def _accept(self) -> None:
        assert self._sock is not None
        while not self._closing:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            buf = b""
            try:
                while b"\n" not in buf:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    buf += chunk
                req = json.loads(buf.split(b"\n", 1)[0])
                if not isinstance(req, dict) or not isinstance(req.get("op"), str):
                    raise ValueError('expected {"op": …, "args": {…}}')
                args = req.get("args") or {}
                reply: dict[str, Any] = {"ok": True, "value": self._handler(req["op"], args)}
            except VtpmError as err:
                reply = {"ok": False, "error_id": err.id, "message": str(err)}
            except (ValueError, TypeError) as err:
                reply = {"ok": False, "error_id": "daemon.bad_request", "message": str(err)}
            except OSError:
                return
            with contextlib.suppress(OSError):
                conn.sendall(json.dumps(reply).encode() + b"\n")

    def close(self) -> None:
        self._closing = True
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)
            self._sock.close()
            self._sock = None
            with contextlib.suppress(OSError):
                self.path.unlink()


class ControlClient:
    """A ``vtpm-host`` command's way to the daemon's control socket.

    Raises (from :meth:`call`):
        DaemonError: the daemon is not running (socket absent or refused), or the op failed
            (the daemon's error id and message are kept in the text).
    """

    def __init__(self, path: Path, *, timeout: float = 120.0) -> None:
        self.path = Path(path)
        self.timeout = timeout

    def call(self, op: str, **args: Any) -> dict[str, Any]:
        try:
            reply = call_json_line(self.path, {"op": op, "args": args}, self.timeout, "the daemon")
        except (OSError, EOFError) as err:
            raise DaemonError(
                f"cannot reach the vtpm-host daemon at {self.path}: {err} (is it running?)"
            ) from err
        if not reply.get("ok"):
            raise DaemonError(f"daemon: [{reply.get('error_id')}] {reply.get('message')}")
        value = reply.get("value")
        return value if isinstance(value, dict) else {}


# ---------------------------------------------------------------------- command line


def _load_component(spec: str) -> Component:
    module, _, name = spec.partition(":")
    factory = getattr(importlib.import_module(module), name)
    component = factory()
    if not isinstance(component, Component):
        raise DaemonError(f"component {spec} has no start(daemon)/stop()")
    return component


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "daemon",
        help="run the host agent daemon in the foreground (store, bridges' hooks, VM registry)",
    )
    p.add_argument("--config", type=Path, metavar="FILE", help="agent configuration (TOML)")
    p.add_argument("--state-dir", type=Path, metavar="DIR", help="agent state directory")
    p.add_argument(
        "--runtime-dir",
        type=Path,
        default=DEFAULT_RUNTIME_DIR,
        help=f"where bridges register themselves (default {DEFAULT_RUNTIME_DIR})",
    )
    p.add_argument(
        "--component",
        action="append",
        default=[],
        metavar="MODULE:CALLABLE",
        help="load a service into the daemon (repeatable)",
    )
    p.add_argument("--hash-workers", type=int, help="memory hashing processes (default: cores)")
    p.add_argument(
        "--no-background-pass",
        dest="background_pass",
        action="store_false",
        help="do not keep a background hashing pass over running VMs (where soft-dirty tracking "
        "works, saves then re-hash only the pages written since it; without it only "
        "'vtpm-host vm save' starts one and other saves hash all memory at the stop)",
    )
    p.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        help="logs on stderr: readable text or one JSON object per line "
        "(default: [logging] format of the config file, else text)",
    )
    p.add_argument(
        "--log-level",
        metavar="LEVEL",
        help=f"one of {', '.join(LOG_LEVELS)} (default: [logging] level, else info)",
    )
    p.add_argument(
        "--metrics-listen",
        metavar="HOST:PORT|off",
        help="serve Prometheus metrics at http://HOST:PORT/metrics, or 'off' (default: "
        "[metrics] listen of the config file; loads the metrics component when not off)",
    )
    p.set_defaults(func=_cmd_daemon)


METRICS_COMPONENT = "host_agent.service.metrics:MetricsComponent"


def with_command_line(
    config: AgentConfig,
    *,
    log_format: str | None = None,
    log_level: str | None = None,
    metrics_listen: str | None = None,
) -> AgentConfig:
    """``config`` with the daemon's command-line options applied (they win over the file and
    the environment).

    Raises:
        ConfigError: a bad level or listen address (what was expected, what arrived).
    """
    logs = config.logging
    if log_format is not None or log_level is not None:
        logs = dataclasses.replace(
            logs,
            format=logs.format if log_format is None else log_format,
            level=logs.level if log_level is None else log_level,
        )
    metrics = config.metrics
    if metrics_listen is not None:
        metrics = dataclasses.replace(metrics, listen=metrics_listen)
    return dataclasses.replace(config, logging=logs, metrics=metrics)


def _cmd_daemon(args: argparse.Namespace) -> int:
    config = load_config(args.config, os.environ)
    if args.state_dir is not None:
        config = with_state_dir(config, args.state_dir.resolve())
    config = with_command_line(
        config,
        log_format=args.log_format,
        log_level=args.log_level,
        metrics_listen=args.metrics_listen,
    )
    setup_logging(config.logging.format, config.logging.level, sys.stderr)
    specs = list(args.component)
    if config.metrics.enabled and METRICS_COMPONENT not in specs:
        specs.append(METRICS_COMPONENT)
    for spec in DEFAULT_COMPONENTS:
        with contextlib.suppress(ImportError):
            importlib.import_module(spec.partition(":")[0])
            specs.append(spec)
    components = [_load_component(s) for s in specs]
    daemon = Daemon(
        config,
        runtime_dir=args.runtime_dir,
        components=components,
        hash_workers=args.hash_workers,
        background_pass=args.background_pass,
    )
    return daemon.run()


def control_client(config: AgentConfig) -> ControlClient:
    """The control client of the daemon serving ``config``'s state directory."""
    return ControlClient(DaemonPaths(config.state_dir, DEFAULT_RUNTIME_DIR).control_socket)
