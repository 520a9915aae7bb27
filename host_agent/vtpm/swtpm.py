"""Per-VM swtpm supervision: one encrypted, EK-certified software TPM per VM UUID.

Layout (``vtpm_dir`` is ``<agent state_dir>/vtpm``; every directory mode 0700)::

    <vtpm_dir>/<uuid>/
        tpm2/               swtpm --tpmstate (tpm2-00.permall …, files 0600, AES-256 encrypted)
        statekey.sealed     the state key, sealed by the host TPM (swtpm_key.py)
        swtpm.ctrl          swtpm's control socket (0600): the VM's bridge connects here
        swtpm.pid           swtpm's pid file        swtpm.log, swtpm_setup.log

The swtpm command line (swtpm 0.7.1)::

    swtpm socket --tpm2 --tpmstate dir=<uuid>/tpm2,mode=0600
                 --ctrl type=unixio,path=<uuid>/swtpm.ctrl,mode=0600
                 --log file=<uuid>/swtpm.log,level=1 --pid file=<uuid>/swtpm.pid
                 --key fd=N,mode=aes-256-cbc,format=binary --terminate

No ``--server``: the data channel arrives as an fd with CMD_SET_DATAFD (from QEMU, through the
bridge). No ``--flags startup-*``: QEMU sends CMD_INIT and the firmware TPM2_Startup.
``--terminate`` makes swtpm exit when that data channel closes, so it cannot outlive its QEMU
even when QEMU dies without sending CMD_SHUTDOWN. The log level stays at 1: from level 2 on,
swtpm hex-dumps control messages, and a state blob is a control message.

Run states (qemu.qmp ``Runstate`` style; :class:`StateError` names current and required)::

    NEW ──start()──► STARTING ──► RUNNING ──stop()──► STOPPING ──► STOPPED
                         │            │ poll(): exited 0 ───────────► STOPPED
                         │            └ poll(): exited ≠ 0 ─────────► FAILED
                         └ failure: rollback (kill, remove socket and pid file) ► FAILED
    start() from NEW, STOPPED, FAILED; restart_for_incoming() from any settled state;
    adopt() finds a swtpm a previous daemon started (NEW/STOPPED/FAILED → RUNNING);
    remove() deletes the vTPM (sealed key first) and goes back to NEW.

A swtpm runs in its own session, so it survives the daemon (invariant 6): a restarted daemon
calls :meth:`SwtpmSupervisor.recover` with the VMs that still exist, which is
:func:`reap_orphans` for the others followed by :meth:`SwtpmInstance.adopt` for each of them.
"""

from __future__ import annotations

import enum
import logging
import os
import secrets
import shutil
import subprocess
import threading
import time
import uuid as uuid_mod
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path

from host_agent.errors import StateError, SwtpmError

from . import swtpm_proc as proc_util
from .swtpm_key import (
    STATE_KEY_CIPHER,
    FileSealedKeyStore,
    SealedKeyStore,
    StateKeySealer,
    key_pipe,
    load_or_create_state_key,
    wipe,
)
from .swtpm_provision import LOCALCA_DIR, provision_vtpm

__all__ = [
    "PERMALL",
    "ReapedSwtpm",
    "SwtpmInstance",
    "SwtpmOptions",
    "SwtpmRunState",
    "SwtpmSupervisor",
    "VtpmPaths",
    "reap_orphans",
    "vtpm_dir_of",
]

log = logging.getLogger(__name__)

#: swtpm's permanent-state file for a TPM 2.0 (swtpm_nvstore.c).
PERMALL = "tpm2-00.permall"
_SUN_PATH_MAX = 107  # sizeof(sockaddr_un.sun_path) - 1 on Linux


def vtpm_dir_of(state_dir: Path) -> Path:
    """The directory holding the VMs' vTPM directories, under the agent's state directory."""
    return Path(state_dir) / "vtpm"


class SwtpmRunState(enum.Enum):
    NEW = "new"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"
    FAILED = "failed"


_SETTLED = (
    SwtpmRunState.NEW,
    SwtpmRunState.RUNNING,
    SwtpmRunState.STOPPED,
    SwtpmRunState.FAILED,
)


@dataclass(frozen=True)
class SwtpmOptions:
    """How swtpm is run.

    Attributes:
        swtpm: the swtpm program.
        swtpm_setup: the swtpm_setup program.
        pcr_banks: PCR banks a new vTPM keeps active.
        localca_dir: swtpm-localca's directory (its ownership is restored after swtpm_setup).
        start_timeout: seconds for swtpm to listen on its control socket.
        setup_timeout: seconds swtpm_setup may take.
        shutdown_timeout: seconds to wait for an answer to CMD_SHUTDOWN (a held control
            connection means no answer) and then for the exit.
        term_timeout: seconds after SIGTERM before SIGKILL.
        terminate: pass ``--terminate`` (exit when the data channel closes).
        extra_args: appended to swtpm's command line. For tests and debugging only, e.g.
            ``("--server", "type=unixio,path=<uuid>/swtpm")`` to reach the TPM without QEMU.
    """

    swtpm: str = "swtpm"
    swtpm_setup: str = "swtpm_setup"
    pcr_banks: str = "sha256"
    localca_dir: Path = LOCALCA_DIR
    start_timeout: float = 5.0
    setup_timeout: float = 60.0
    shutdown_timeout: float = 1.0
    term_timeout: float = 2.0
    terminate: bool = True
    extra_args: tuple[str, ...] = ()


@dataclass(frozen=True)
class VtpmPaths:
    """Where one VM's vTPM lives (see the module docstring)."""

    vm_dir: Path

    @classmethod
    def for_vm(cls, vtpm_dir: Path, vm_uuid: str) -> VtpmPaths:
        return cls(Path(vtpm_dir) / vm_uuid)

    @property
    def state_dir(self) -> Path:
        return self.vm_dir / "tpm2"

    @property
    def permall(self) -> Path:
        return self.state_dir / PERMALL

    @property
    def ctrl_socket(self) -> Path:
        return self.vm_dir / "swtpm.ctrl"

    @property
    def pid_file(self) -> Path:
        return self.vm_dir / "swtpm.pid"

    @property
    def log_file(self) -> Path:
        return self.vm_dir / "swtpm.log"

    @property
    def setup_log(self) -> Path:
        return self.vm_dir / "swtpm_setup.log"


def _state_files(state_dir: Path) -> list[str]:
    """Names in ``state_dir`` other than swtpm's ``.lock`` (raises ``OSError``)."""
    if not state_dir.exists():
        return []
    return sorted(n.name for n in state_dir.iterdir() if n.name != ".lock")


def _canonical_uuid(value: str) -> str:
    try:
        return str(uuid_mod.UUID(value))
    except (TypeError, ValueError) as err:
        raise ValueError(f"expected a VM UUID, got {value!r}") from err


class SwtpmInstance:
    """The swtpm of one VM.

    Args:
        vtpm_dir: the directory of all VMs' vTPMs (:func:`vtpm_dir_of` the agent's state dir).
        vm_uuid: the VM's UUID (its directory name, and in its EK certificate).
        vm_name: the VM's name (in its EK certificate's subject, ``CN=NAME:UUID``).
        sealer: the host TPM, which seals the VM's state key.
        key_store: where the sealed key is kept (default: a file in the VM's directory).
        options: how swtpm is run.
        random_bytes: ``n -> n`` random bytes for a new state key.
        clock: monotonic clock for deadlines.
        on_state: called with every new run state (tests assert the sequence).
    """

    def __init__(
        self,
        vtpm_dir: Path,
        vm_uuid: str,
        vm_name: str,
        sealer: StateKeySealer,
        *,
        key_store: SealedKeyStore | None = None,
        options: SwtpmOptions | None = None,
        random_bytes: Callable[[int], bytes] = secrets.token_bytes,
        clock: Callable[[], float] = time.monotonic,
        on_state: Callable[[SwtpmRunState], None] | None = None,
    ) -> None:
        if not vm_name or "\0" in vm_name:
            raise ValueError(f"expected a VM name, got {vm_name!r}")
        # Absolute and resolved: reap_orphans() recognises a swtpm by this spelling in its argv.
        self.vtpm_dir = Path(vtpm_dir).resolve()
        self.uuid = _canonical_uuid(vm_uuid)
        self.name = vm_name
        self.paths = VtpmPaths.for_vm(self.vtpm_dir, self.uuid)
        if len(os.fsencode(self.paths.ctrl_socket)) > _SUN_PATH_MAX:
            raise ValueError(
                f"control socket path {self.paths.ctrl_socket} is longer than a unix socket "
                f"allows ({_SUN_PATH_MAX} bytes); use a shorter state directory"
            )
        self._sealer = sealer
        self._keys = key_store if key_store is not None else FileSealedKeyStore(self.vtpm_dir)
        self.options = options or SwtpmOptions()
        self._random_bytes = random_bytes
        self._clock = clock
        self._on_state = on_state
        self._state = SwtpmRunState.NEW
        self._lock = threading.RLock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._pid: int | None = None
        self.error: BaseException | None = None
        self.returncode: int | None = None

    def __repr__(self) -> str:
        return f"<SwtpmInstance {self.uuid} {self._state.value} pid={self._pid}>"

    # ------------------------------------------------------------------ state

    @property
    def state(self) -> SwtpmRunState:
        return self._state

    @property
    def pid(self) -> int | None:
        """swtpm's pid while RUNNING (or STOPPING), else None."""
        return self._pid

    @property
    def ctrl_socket(self) -> Path:
        """The control socket the VM's bridge connects to."""
        return self.paths.ctrl_socket

    @property
    def provisioned(self) -> bool:
        """Whether the VM has a vTPM state on disk (made by swtpm_setup or brought in)."""
        return self.paths.permall.is_file()

    def _set(self, state: SwtpmRunState) -> None:
        self._state = state
        log.debug("swtpm %s: %s", self.uuid, state.value)
        if self._on_state is not None:
            self._on_state(state)

    def _require(self, op: str, *states: SwtpmRunState) -> None:
        if self._state not in states:
            raise StateError(
                self._state.value, [s.value for s in states], f"swtpm of VM {self.uuid}: {op}"
            )

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Start swtpm for a VM that boots: provision the vTPM first if it has no state yet.

        On failure everything this call started is undone (process killed, socket and pid file
        removed) and the state is FAILED; the vTPM state and the sealed key stay.

        Raises:
            StateError: not NEW, STOPPED or FAILED.
            SwtpmProvisionError: swtpm_setup failed.
            SwtpmError: the control socket is in use, or swtpm did not come up in time.
            VtpmError: the host TPM could not seal or unseal the state key.
        """
        with self._lock:
            self._require("start()", SwtpmRunState.NEW, SwtpmRunState.STOPPED, SwtpmRunState.FAILED)
            if self._pid is not None:  # FAILED with a process that outlived a stop(): retry it
                self._stop()
            self._start(incoming=False)

    def restart_for_incoming(self) -> None:
        """Give a new QEMU that will push the vTPM state (restore, incoming migration) a swtpm.

        Stops any running swtpm of this VM, then starts a fresh one on the same state directory
        without ever running swtpm_setup: an incoming VM's EK, certificates and NV come with its
        state blobs, and a new EK made here would be replaced by them anyway (libvirt runs
        ``swtpm_setup --overwrite`` there; we simply start on an empty directory). The new swtpm
        has not been initialised, so it accepts QEMU's CMD_STOP + CMD_SET_STATEBLOB + CMD_INIT.
        Files already in the state directory are left alone: a refused restore keeps them.

        Raises:
            StateError: STARTING or STOPPING.
            SwtpmError, VtpmError: as :meth:`start`.
        """
        with self._lock:
            self._require("restart_for_incoming()", *_SETTLED)
            if self._state in (SwtpmRunState.RUNNING, SwtpmRunState.FAILED):
                self._stop()
            self._start(incoming=True)

    def stop(self) -> None:
        """Stop swtpm: CMD_SHUTDOWN, then SIGTERM, then SIGKILL, each bounded.

        A no-op when nothing runs. Removes the control socket and pid file.

        Raises:
            StateError: STARTING or STOPPING.
            SwtpmError: the process survived SIGKILL (state FAILED).
        """
        with self._lock:
            self._require("stop()", *_SETTLED)
            self._stop()

    def poll(self) -> SwtpmRunState:
        """Notice a swtpm that exited on its own (CMD_SHUTDOWN from QEMU, data channel closed).

        Returns:
            The state: STOPPED if it exited with status 0 (or, not being our child, we cannot
            know), FAILED otherwise.
        """
        with self._lock:
            running = self._state is SwtpmRunState.RUNNING and self._pid is not None
            if running and not proc_util.pid_alive(self._pid or 0, self._proc):
                self.returncode = self._proc.returncode if self._proc is not None else None
                self._forget_process()
                if self.returncode in (0, None):
                    self._set(SwtpmRunState.STOPPED)
                else:
                    self.error = SwtpmError(
                        self.uuid, f"swtpm exited with status {self.returncode}"
                    )
                    self._set(SwtpmRunState.FAILED)
            return self._state

    def adopt(self) -> bool:
        """Take over a swtpm of this VM that a previous daemon process started.

        Returns:
            True (state RUNNING) if the pid file names a live swtpm on this VM's state
            directory; False (state unchanged) otherwise.

        Raises:
            StateError: not NEW, STOPPED or FAILED.
        """
        with self._lock:
            self._require("adopt()", SwtpmRunState.NEW, SwtpmRunState.STOPPED, SwtpmRunState.FAILED)
            pid = proc_util.read_pid_file(self.paths.pid_file)
            if pid is None or not proc_util.pid_alive(pid):
                return False
            if not proc_util.is_swtpm_for(pid, self.paths.state_dir):
                return False
            self._proc, self._pid, self.error, self.returncode = None, pid, None, None
            self._set(SwtpmRunState.RUNNING)
            return True

    def remove(self) -> None:
        """Delete the VM's vTPM for good: sealed state key first (so what might be left of the
        state can no longer be decrypted), then its directory. For an undefined VM, or the
        source of a committed migration. The instance is NEW afterwards.

        Raises:
            StateError: not NEW, STOPPED or FAILED (stop() first).
            SwtpmError: a swtpm still runs on the state, or the files cannot be removed.
        """
        with self._lock:
            self._require(
                "remove()", SwtpmRunState.NEW, SwtpmRunState.STOPPED, SwtpmRunState.FAILED
            )
            if self._pid is not None:
                self._stop()
            self._refuse_other_swtpm()
            self._keys.delete(self.uuid)
            try:
                shutil.rmtree(self.paths.vm_dir)
            except FileNotFoundError:
                pass
            except OSError as err:
                raise SwtpmError(self.uuid, f"cannot remove {self.paths.vm_dir}: {err}") from err
            self.error, self.returncode = None, None
            self._set(SwtpmRunState.NEW)
            log.info("swtpm %s: vTPM removed", self.uuid)

    # ------------------------------------------------------------------ internals

    def _start(self, *, incoming: bool) -> None:
        self._set(SwtpmRunState.STARTING)
        self.error, self.returncode = None, None
        try:
            provision = self._prepare(incoming=incoming)
            key = load_or_create_state_key(
                self.uuid,
                self._sealer,
                self._keys,
                self._random_bytes,
                may_create=not self.provisioned,
            )
            try:
                if provision:
                    provision_vtpm(
                        vm_uuid=self.uuid,
                        vm_name=self.name,
                        state_dir=self.paths.state_dir,
                        key=key,
                        log_file=self.paths.setup_log,
                        swtpm_setup=self.options.swtpm_setup,
                        pcr_banks=self.options.pcr_banks,
                        localca_dir=self.options.localca_dir,
                        timeout=self.options.setup_timeout,
                    )
                    log.info("swtpm %s: vTPM provisioned (EK certificates)", self.uuid)
                self._spawn(key)
            finally:
                wipe(key)
            self._wait_listening()
        except BaseException as err:
            self._rollback()
            self.error = err
            self._set(SwtpmRunState.FAILED)
            raise
        self._set(SwtpmRunState.RUNNING)
        log.info("swtpm %s: running, pid %s (incoming=%s)", self.uuid, self._pid, incoming)

    def _prepare(self, *, incoming: bool) -> bool:
        """Check and make what a start needs; return whether swtpm_setup must run first.

        Directories 0700; no other swtpm on this state; a control socket path nobody serves; an
        incoming VM gets an empty state directory, a booting VM without state gets provisioned
        (unless files it does not recognise sit there).
        """
        try:
            self._make_dir(self.vtpm_dir)
            self._make_dir(self.paths.vm_dir)
            self._refuse_other_swtpm()
            sock = self.paths.ctrl_socket
            if os.path.lexists(sock):
                # swtpm would unlink and rebind the path, stealing a live socket: refuse instead.
                if proc_util.ctrl_accepts(sock):
                    pid = proc_util.read_pid_file(self.paths.pid_file)
                    raise SwtpmError(
                        self.uuid,
                        f"control socket {sock} is in use (pid file names {pid}); adopt() or "
                        "stop that swtpm first",
                    )
                sock.unlink()
            if self.provisioned or incoming:
                self._make_dir(self.paths.state_dir)
                return False
            if stray := _state_files(self.paths.state_dir):
                raise SwtpmError(
                    self.uuid,
                    f"{self.paths.state_dir} holds {stray} but no {PERMALL}; refusing to "
                    "provision over them",
                )
            return True
        except OSError as err:
            raise SwtpmError(self.uuid, f"cannot prepare {self.paths.vm_dir}: {err}") from err

    def _refuse_other_swtpm(self) -> None:
        other = proc_util.read_pid_file(self.paths.pid_file)
        if (
            other is not None
            and proc_util.pid_alive(other)
            and proc_util.is_swtpm_for(other, self.paths.state_dir)
        ):
            raise SwtpmError(
                self.uuid, f"a swtpm (pid {other}) already runs on this state; adopt() or stop it"
            )

    @staticmethod
    def _make_dir(path: Path) -> None:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(path, 0o700)

    def _command(self, key_fd: int) -> list[str]:
        p, o = self.paths, self.options
        cmd = [
            o.swtpm,
            "socket",
            "--tpm2",
            "--tpmstate",
            f"dir={p.state_dir},mode=0600",
            "--ctrl",
            f"type=unixio,path={p.ctrl_socket},mode=0600",
            "--log",
            f"file={p.log_file},level=1",
            "--pid",
            f"file={p.pid_file}",
            "--key",
            f"fd={key_fd},mode={STATE_KEY_CIPHER},format=binary",
        ]
        if o.terminate:
            cmd.append("--terminate")
        cmd.extend(o.extra_args)
        return cmd

    def _spawn(self, key: bytearray) -> None:
        try:
            with (
                key_pipe(key) as fd,
                open(self.paths.log_file, "ab") as out,
            ):
                self._proc = subprocess.Popen(
                    self._command(fd),
                    pass_fds=(fd,),
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=out,
                    start_new_session=True,  # survives the daemon (invariant 6)
                )
        except OSError as err:
            raise SwtpmError(self.uuid, f"cannot run {self.options.swtpm}: {err}") from err
        self._pid = self._proc.pid

    def _wait_listening(self) -> None:
        assert self._proc is not None
        deadline = self._clock() + self.options.start_timeout
        while True:
            status = self._proc.poll()
            if status is not None:
                raise SwtpmError(
                    self.uuid, f"swtpm exited with status {status} at start; {self._log_tail()}"
                )
            # swtpm listens before it writes its pid file; reap_orphans() and adopt() need both.
            if proc_util.read_pid_file(self.paths.pid_file) == self._proc.pid and (
                proc_util.ctrl_accepts(self.paths.ctrl_socket)
            ):
                return
            if self._clock() >= deadline:
                raise SwtpmError(
                    self.uuid,
                    f"swtpm did not listen on {self.paths.ctrl_socket} and write "
                    f"{self.paths.pid_file.name} within {self.options.start_timeout:g} s; "
                    f"{self._log_tail()}",
                )
            time.sleep(0.005)

    def _rollback(self) -> None:
        """Undo a failed start: kill what we spawned (it served nobody), remove its files.

        Nothing is removed if nothing was spawned: the socket path may belong to someone else.
        """
        if self._pid is None:
            self._proc = None
            return
        proc_util.end_process(
            self._pid, self._proc, term_timeout=0.0, kill_timeout=5.0, clock=self._clock
        )
        self._forget_process()

    def _stop(self) -> None:
        if self._pid is None:  # nothing of ours runs; files at our paths may be another's
            self._proc = None
            if self._state is not SwtpmRunState.NEW:
                self._set(SwtpmRunState.STOPPED)
            return
        self._set(SwtpmRunState.STOPPING)
        pid, o = self._pid, self.options
        gone = not proc_util.pid_alive(pid, self._proc)
        if not gone and proc_util.ctrl_shutdown(self.paths.ctrl_socket, o.shutdown_timeout):
            gone = proc_util.wait_gone(pid, self._proc, o.shutdown_timeout, self._clock)
        if not gone:
            log.warning("swtpm %s: no answer to CMD_SHUTDOWN, signalling pid %d", self.uuid, pid)
            gone = proc_util.end_process(
                pid,
                self._proc,
                term_timeout=o.term_timeout,
                kill_timeout=o.term_timeout,
                clock=self._clock,
            )
        if not gone:
            self.error = SwtpmError(self.uuid, f"pid {pid} survived SIGKILL")
            self._set(SwtpmRunState.FAILED)
            raise self.error
        self.returncode = self._proc.returncode if self._proc is not None else None
        self._forget_process()
        self._set(SwtpmRunState.STOPPED)

    def _forget_process(self) -> None:
        """Drop our (dead) process; remove its socket and pid file unless a newer swtpm's."""
        pid, self._proc, self._pid = self._pid, None, None
        owner = proc_util.read_pid_file(self.paths.pid_file)
        if owner is None or owner == pid:
            _remove_runtime_files(self.paths)

    def _log_tail(self, n: int = 300) -> str:
        try:
            text = self.paths.log_file.read_text(errors="replace").strip()
        except OSError:
            text = ""
        return f"swtpm log: {text[-n:]}" if text else "swtpm log is empty"


def _remove_runtime_files(paths: VtpmPaths) -> None:
    """Remove swtpm's control socket and pid file (swtpm removes them itself on a clean exit)."""
    for path in (paths.ctrl_socket, paths.pid_file):
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        except OSError as err:
            log.warning("cannot remove %s: %s", path, err)


@dataclass(frozen=True)
class ReapedSwtpm:
    """A leftover swtpm :func:`reap_orphans` found.

    Attributes:
        vm: the VM's UUID.
        pid: the pid from its pid file.
        how: ``"shutdown"`` (CMD_SHUTDOWN), ``"signal"`` (SIGTERM/SIGKILL) or ``"stale"``
            (no such swtpm was running: only its pid file and socket were removed).
    """

    vm: str
    pid: int
    how: str


def reap_orphans(
    vtpm_dir: Path,
    live_vms: Collection[str],
    *,
    options: SwtpmOptions | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> list[ReapedSwtpm]:
    """Stop every swtpm under ``vtpm_dir`` whose VM is not in ``live_vms`` (run at daemon start).

    A pid is signalled only if ``/proc`` shows a swtpm serving that VM's state directory (pids
    get recycled). The swtpms of live VMs are left running, for :meth:`SwtpmInstance.adopt`.

    Args:
        vtpm_dir: :func:`vtpm_dir_of` the agent's state directory.
        live_vms: UUIDs of the VMs that exist (any spelling :class:`uuid.UUID` accepts).
        options: timeouts (``shutdown_timeout``, ``term_timeout``).
        clock: monotonic clock for deadlines.

    Returns:
        What was found and how each was ended.

    Raises:
        SwtpmError: a leftover swtpm survived SIGKILL, or ``vtpm_dir`` cannot be listed.
    """
    o = options or SwtpmOptions()
    live = {_canonical_uuid(v) for v in live_vms}
    reaped: list[ReapedSwtpm] = []
    try:
        entries = sorted(p for p in Path(vtpm_dir).resolve().iterdir() if p.is_dir())
    except FileNotFoundError:
        return reaped
    except OSError as err:
        raise SwtpmError("*", f"cannot list {vtpm_dir}: {err}") from err
    for vm_dir in entries:
        paths = VtpmPaths(vm_dir)
        pid = proc_util.read_pid_file(paths.pid_file)
        if pid is None or vm_dir.name in live:
            continue
        how = "stale"
        if proc_util.pid_alive(pid) and proc_util.is_swtpm_for(pid, paths.state_dir):
            how = "signal"
            if proc_util.ctrl_shutdown(
                paths.ctrl_socket, o.shutdown_timeout
            ) and proc_util.wait_gone(pid, None, o.shutdown_timeout, clock):
                how = "shutdown"
            elif not proc_util.end_process(
                pid, None, term_timeout=o.term_timeout, kill_timeout=o.term_timeout, clock=clock
            ):
                raise SwtpmError(vm_dir.name, f"leftover swtpm pid {pid} survived SIGKILL")
        _remove_runtime_files(paths)
        log.warning("reaped the swtpm of vanished VM %s (pid %d, %s)", vm_dir.name, pid, how)
        reaped.append(ReapedSwtpm(vm_dir.name, pid, how))
    return reaped


class SwtpmSupervisor:
    """The swtpms of all VMs on this host: one :class:`SwtpmInstance` per VM UUID.

    At daemon start, :meth:`recover` with the VMs that exist ends the swtpms of vanished VMs and
    takes over the running ones; afterwards :meth:`instance` hands out the per-VM objects.
    Stopping the daemon stops no swtpm (invariant 6).

    Args:
        vtpm_dir: :func:`vtpm_dir_of` the agent's state directory.
        sealer: the host TPM.
        key_store: where sealed state keys live (default: files in the VM directories).
        options: how swtpm is run.
        random_bytes: ``n -> n`` random bytes for new state keys.
        clock: monotonic clock for deadlines.
    """

    def __init__(
        self,
        vtpm_dir: Path,
        sealer: StateKeySealer,
        *,
        key_store: SealedKeyStore | None = None,
        options: SwtpmOptions | None = None,
        random_bytes: Callable[[int], bytes] = secrets.token_bytes,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.vtpm_dir = Path(vtpm_dir).resolve()
        self._sealer = sealer
        self._keys = key_store if key_store is not None else FileSealedKeyStore(self.vtpm_dir)
        self.options = options or SwtpmOptions()
        self._random_bytes = random_bytes
        self._clock = clock
        self._instances: dict[str, SwtpmInstance] = {}
        self._lock = threading.Lock()

    def instance(self, vm_uuid: str, vm_name: str) -> SwtpmInstance:
        """The VM's instance, made on first use (NEW until started or adopted)."""
        key = _canonical_uuid(vm_uuid)
        with self._lock:
            inst = self._instances.get(key)
            if inst is None:
                inst = SwtpmInstance(
                    self.vtpm_dir,
                    key,
                    vm_name,
                    self._sealer,
                    key_store=self._keys,
                    options=self.options,
                    random_bytes=self._random_bytes,
                    clock=self._clock,
                )
                self._instances[key] = inst
            return inst

    def recover(self, live_vms: Mapping[str, str]) -> list[ReapedSwtpm]:
        """Daemon start: reap the swtpms of VMs not in ``live_vms``, adopt the others' swtpms.

        Args:
            live_vms: UUID → name of every VM that exists on this host.

        Returns:
            The reaped leftovers (:func:`reap_orphans`).

        Raises:
            SwtpmError: a leftover swtpm survived SIGKILL.
        """
        reaped = reap_orphans(
            self.vtpm_dir, live_vms.keys(), options=self.options, clock=self._clock
        )
        for vm, name in live_vms.items():
            inst = self.instance(vm, name)
            if inst.state in (SwtpmRunState.NEW, SwtpmRunState.STOPPED, SwtpmRunState.FAILED):
                inst.adopt()
        return reaped

    def running(self) -> dict[str, SwtpmInstance]:
        """The instances whose swtpm runs now (after :meth:`SwtpmInstance.poll`)."""
        with self._lock:
            instances = list(self._instances.items())
        return {vm: i for vm, i in instances if i.poll() is SwtpmRunState.RUNNING}
