"""The connection side of the host TPM adapter: its thread, ESAPI context and TPM lease.

:class:`TpmConnection` holds how the adapter reaches the TPM, apart from what it does there:
the single TPM thread every call runs on (``_call``, with the reconnect-and-retry of a broken
connection or of handles the TPM lost), the ESAPI context and the hot path's raw connection
kept beside it (``_open``, ``_e``, ``_disconnect``), the inter-process ``tpm.lock`` lease of
``per-call`` and ``shared`` mode with its watcher thread, the cleanup of what a crashed client
left (``_flush_leftovers``) and of what the hot path keeps (``_quiesce``), and the one place a
``TSS2_Exception`` becomes a :class:`~host_agent.tpm.errors.TpmCommandError` (``_x``). It is
a base class of the adapter, not an object of its own: ``PytssHostTpm.__init__`` sets the state
annotated below, and the adapter module docstring ("Sharing a simulator") tells the design.
Kept apart so the TPM operations read without the locking and reconnection around them.
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, Literal, TypeVar

from tpm2_pytss import ESAPI, TSS2_Exception
from tpm2_pytss.constants import ESYS_TR, TPM2_CAP, TPM2_HC, TPM2_PT_HR
from tpm2_pytss.types import TPM2_HANDLE

from ._raw import RawTpm, RawTpmError, RawTpmRc
from .errors import TpmCommandError, TpmError, TpmObjectMemoryFull
from .keyfile import HostKeyFile

__all__ = ["Connection", "TpmConnection"]

# Records keep the adapter's logger name, as before the connection code moved here.
log = logging.getLogger("host_agent.tpm.adapter")
T = TypeVar("T")

_RC_OBJECT_MEMORY = 0x902
_DEFAULT_OBJECT_SLOTS = 3  # swtpm's; the TPM's TPM_PT_HR_TRANSIENT_MIN replaces it at connect

Connection = Literal["persistent", "shared", "per-call"]


def _rc_text(err: TSS2_Exception) -> str:
    return str(err)


def _is_stale_handle(rc: int) -> bool:
    """TPM_RC_REFERENCE_H0..S6, or TPM_RC_HANDLE on a handle: a handle we hold is not loaded
    (the TPM restarted under us, or someone flushed it)."""
    if rc >> 16:
        return False
    fmt1_handle = (rc & 0xC0) == 0x80 and (rc & 0x3F) == 0x0B  # TPM_RC_HANDLE, P clear
    return 0x910 <= (rc & 0xFFF) <= 0x91E or fmt1_handle


def _is_link_error(rc: int) -> bool:
    """A TSS return code that means the connection to the TPM broke (not a TPM refusal):
    an I/O error or no connection, reported by the TCTI or by ESAPI on its behalf."""
    layer, base = (rc >> 16) & 0xFF, rc & 0xFFFF
    return layer in (0x07, 0x0A) and base in (0x0A, 0x0F)  # IO_ERROR, NO_CONNECTION


class TpmConnection:
    """How :class:`~host_agent.tpm.adapter.PytssHostTpm` reaches the TPM (module docstring)."""

    # set by PytssHostTpm.__init__
    _mode: Connection
    _per_call: bool
    _tcti: str
    _keyfile: HostKeyFile
    _executor: ThreadPoolExecutor
    _esys: ESAPI | None
    _lock: threading.Lock
    _closed: bool
    _srk_tr: ESYS_TR | None
    _nv_trs: dict[int, ESYS_TR]
    _capacity: int
    _raw: RawTpm | None
    _kept_address: tuple[int, Any] | None
    _resident: OrderedDict[bytes, int]
    _sessions: dict[str, int]
    _lease_fd: int | None
    _yielded: bool
    _lease_poll: float
    _lease_wake: threading.Event
    _probe_lock: threading.Lock
    _lease_watch: threading.Thread | None
    _stats: dict[str, int]

    def _call(self, fn: Callable[[], T], *, hot: bool = False, retry: bool = False) -> T:
        """Run ``fn`` on the TPM thread (connecting first if not connected) and wait.

        ``hot``: ``fn`` uses the hot-path caches (loaded keys, policy sessions); any other call
        starts from an empty TPM (:meth:`_quiesce`), as before those caches existed. ``retry``:
        ``fn`` may run twice (it changes nothing in the TPM): after a broken connection it is
        run again once on a new one.
        """

        def run() -> T:
            if self._per_call:
                with self._tpm_lock():
                    self._open()
                    try:
                        return fn()
                    finally:
                        self._quiesce()
                        self._disconnect()
            for attempt in (1, 2):
                if self._mode == "shared" and self._lease_fd is None:
                    self._take_lease()
                if self._esys is None:
                    self._open()
                try:
                    if not hot:
                        self._quiesce()
                    return fn()
                except TpmCommandError as err:
                    stale = hot and _is_stale_handle(err.rc)
                    if not (_is_link_error(err.rc) or stale):
                        raise
                    log.warning(
                        "host TPM %s (%s): reconnecting",
                        "lost what we had loaded" if stale else "connection lost",
                        err,
                    )
                    self._stats["reconnects"] += 1
                    self._disconnect(broken=True)
                    if not retry or attempt == 2:
                        raise
                finally:
                    if self._lease_fd is not None and self._others_waiting():
                        self._give_up_lease()
            raise AssertionError("unreachable")

        with self._lock:
            if self._closed:
                raise ValueError("the host TPM is closed")
            future = self._executor.submit(run)
        return future.result()

    def _lock_paths(self) -> tuple[Path, Path]:
        d = self._keyfile.path.parent
        return d / "tpm.lock", d / "tpm.waiting"

    def _open_lock_file(self, path: Path) -> int:
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            return os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as err:
            raise TpmError(f"cannot open the TPM lock {path}: {err}") from err

    def _acquire_tpm_lock(self) -> int:
        """Take ``tpm.lock`` exclusively; returns its fd (closing it releases the lock).

        A process waiting for the lock holds ``tpm.waiting`` shared meanwhile, so a process in
        ``shared`` mode, which keeps the lock between calls, sees it and gives the lock up.
        """
        lock_path, waiting_path = self._lock_paths()
        waiting = self._open_lock_file(waiting_path)
        try:
            if self._yielded:  # we just gave way: let the waiters in first
                fcntl.flock(waiting, fcntl.LOCK_EX)
                self._yielded = False
            fcntl.flock(waiting, fcntl.LOCK_SH)
            fd = self._open_lock_file(lock_path)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            except BaseException:
                os.close(fd)
                raise
            return fd
        finally:
            os.close(waiting)

    @contextmanager
    def _tpm_lock(self) -> Iterator[None]:
        """Exclusive use of the TPM across agent processes sharing this state directory.

        swtpm interleaves commands of concurrent connections and has no resource manager, so
        one process's loads would eat another's object slots: a per-call connection holds an
        ``flock`` on ``<key_dir>/tpm.lock`` for the whole call.
        """
        fd = self._acquire_tpm_lock()
        try:
            yield
        finally:
            os.close(fd)  # releases the lock

    def _take_lease(self) -> None:
        """Shared mode: take ``tpm.lock`` and keep it across calls; clean up what another
        process may have left in the TPM meanwhile."""
        self._lease_fd = self._acquire_tpm_lock()
        self._lease_wake.set()
        if self._esys is not None:
            try:
                self._flush_leftovers()
            except TpmCommandError as err:
                if not _is_link_error(err.rc):
                    raise
                self._disconnect(broken=True)

    def _give_up_lease(self) -> None:
        """Empty our part of the TPM, close the hot path's kept connection and release
        ``tpm.lock``. The ESAPI context stays: the swtpm TCTI connects for each command anyway
        (swtpm serves one connection at a time), and nothing is sent without the lease."""
        if self._lease_fd is None:
            return
        try:
            self._quiesce()
        finally:
            if self._raw is not None:
                self._raw.release()  # before the lock: the next holder connects to swtpm
            os.close(self._lease_fd)
            self._lease_fd = None
            self._yielded = True
            self._stats["lease_yields"] += 1

    def _others_waiting(self) -> bool:
        """Does another process wait for ``tpm.lock`` (holding ``tpm.waiting`` shared)?"""
        if self._mode != "shared":
            return False
        _, waiting_path = self._lock_paths()
        with self._probe_lock:  # our own two probes (TPM thread, watcher) must not collide
            try:
                fd = os.open(waiting_path, os.O_RDWR | os.O_CREAT, 0o600)
            except OSError:
                return False
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            finally:
                os.close(fd)
            return False

    def _watch_lease(self) -> None:
        """Shared mode, idle: give the lease up as soon as another process waits for it, and
        close the kept swtpm connection after a ``lease_poll`` without a hot-path command (a
        client outside the lease, e.g. tpm2-tools, then gets swtpm within two polls)."""
        seen = -1
        while not self._closed:
            if self._lease_fd is None:
                self._lease_wake.wait(1.0)
                self._lease_wake.clear()
                continue
            time.sleep(self._lease_poll)
            if self._lease_fd is not None and self._others_waiting():
                with self._lock:
                    if self._closed:
                        return
                    self._executor.submit(self._give_up_lease)
                continue
            rt = self._raw
            if rt is not None and rt.holds_connection:
                n = rt.commands
                if n == seen:
                    with self._lock:
                        if self._closed:
                            return
                        self._executor.submit(self._release_idle, rt, n)
                seen = n

    def _release_idle(self, rt: RawTpm, commands: int) -> None:
        """On the TPM thread: close the kept connection if no command ran since the watcher
        looked."""
        if rt is self._raw and rt.commands == commands:
            rt.release()

    def _disconnect(self, *, broken: bool = False) -> None:
        """Close the ESAPI context and the kept connection; the ESYS_TRs, loaded keys and policy
        sessions tied to them die with them. ``broken``: after a failed connection, where the
        TPM may have restarted and closing may fail too (ignored then)."""
        self._resident.clear()
        self._sessions.clear()
        if self._raw is not None:
            self._raw.release()
            self._stats["kept_connects"] += self._raw.connects
        esys, self._esys = self._esys, None
        if esys is not None:
            try:
                esys.close()
            except Exception:
                if not broken:
                    raise
        self._raw = None
        self._srk_tr = None
        self._nv_trs.clear()

    def _quiesce(self) -> None:
        """Flush the hot path's loaded keys and policy sessions (their saved contexts and the
        approval tickets stay cached): the TPM holds nothing of ours after this."""
        handles = list(self._resident.values()) + list(self._sessions.values())
        self._resident.clear()
        self._sessions.clear()
        if self._raw is None:
            return
        for h in handles:
            with suppress(RawTpmError, RawTpmRc):
                self._raw.flush(h)

    def _x(self, command: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run one ESAPI call; wrap a TSS2_Exception once, naming the TPM command."""
        try:
            return fn(*args, **kwargs)
        except TSS2_Exception as err:
            cls = TpmObjectMemoryFull if (err.rc & 0xFFF) == _RC_OBJECT_MEMORY else TpmCommandError
            raise cls(int(err.rc), command, _rc_text(err)) from err

    @property
    def _e(self) -> ESAPI:
        """The ESAPI context, the hot path's kept swtpm connection closed first (the TCTI
        connects for each command; swtpm would not accept it while ours is open)."""
        assert self._esys is not None
        if self._raw is not None:
            self._raw.release()
        return self._esys

    def _open(self) -> None:
        """Connect and flush what a crashed client (or, per call, a dead process) left behind."""
        try:
            self._esys = ESAPI(self._tcti)
        except TSS2_Exception as err:
            hint = f"{err}; check tpm.tcti / --tcti / VTPM_TPM_TCTI, or unset it for discovery"
            raise TpmCommandError(int(err.rc), f"connect to TPM via {self._tcti}", hint) from err
        self._resident.clear()
        self._sessions.clear()
        self._raw = RawTpm(self._esys.tcti, kept=self._kept_address)
        self._flush_leftovers()
        self._capacity = self._object_slots()

    def _object_slots(self) -> int:
        """Transient object slots the TPM guarantees (TPM_PT_HR_TRANSIENT_MIN, at least 3)."""
        try:
            _, data = self._x(
                "TPM2_GetCapability",
                self._e.get_capability,
                TPM2_CAP.TPM_PROPERTIES,
                TPM2_PT_HR.TRANSIENT_MIN,
                1,
            )
        except TpmCommandError:
            return _DEFAULT_OBJECT_SLOTS
        for prop in data.data.tpmProperties:
            if int(prop.property) == int(TPM2_PT_HR.TRANSIENT_MIN):
                return max(_DEFAULT_OBJECT_SLOTS, min(int(prop.value), 16))
        return _DEFAULT_OBJECT_SLOTS

    def _handles(self, first: int) -> list[int]:
        """Handles of one type (TPM_CAP_HANDLES from ``first``); loaded sessions are reported
        with HMAC (0x02) and policy (0x03) handles alike."""
        types = {first >> 24}
        if first >> 24 == 0x02:
            types.add(0x03)
        out: list[int] = []
        more = True
        prop = first
        while more:
            more, data = self._x(
                "TPM2_GetCapability", self._e.get_capability, TPM2_CAP.HANDLES, prop, 64
            )
            hs = [int(h) for h in data.data.handles]
            out.extend(h for h in hs if (h >> 24) in types)
            if not hs:
                break
            prop = hs[-1] + 1
        return out

    def _flush_leftovers(self) -> None:
        """Flush transient objects and sessions a crashed client left in the TPM."""
        leftovers = self._handles(int(TPM2_HC.TRANSIENT_FIRST))
        leftovers += self._handles(int(TPM2_HC.LOADED_SESSION_FIRST))
        for h in leftovers:
            tr = self._x("ESYS_TR_FromTPMPublic", self._e.tr_from_tpmpublic, TPM2_HANDLE(h))
            self._x("TPM2_FlushContext", self._e.flush_context, tr)
        if leftovers:
            log.warning(
                "flushed %d leftover TPM handle(s) at open: %s",
                len(leftovers),
                ", ".join(f"0x{h:08x}" for h in leftovers),
            )
