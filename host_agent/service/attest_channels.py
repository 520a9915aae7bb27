"""The guest channel server: every VM's virtio-serial socket, one selector thread, a worker pool.

:class:`GuestChannelService` connects to each VM's channel socket (QEMU listens, the daemon is
the client), keeps reconnecting, decodes request frames (:mod:`host_agent.service.attest_wire`)
and hands each to an :class:`~host_agent.service.attest_attestor.Attestor` on a worker thread;
the loop thread itself never sends. Limits against an untrusted guest live here:
:data:`MAX_PENDING` requests in flight per VM, :data:`SEND_TIMEOUT` for an answer to leave.
"""

from __future__ import annotations

import contextlib
import logging
import selectors
import socket
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Final

from evidence.errors import ParseError
from host_agent.service.attest_attestor import Attestor
from host_agent.service.attest_wire import FrameDecoder, encode_frame, refusal

__all__ = ["MAX_PENDING", "SEND_TIMEOUT", "GuestChannelService"]

# The daemon's operators filter on this name: it is the one the code logged under before the split.
log = logging.getLogger("host_agent.service.attest")

MAX_PENDING: Final = 4
"""Requests one VM may have in flight; more are refused (``attest.busy``)."""
SEND_TIMEOUT: Final = 2.0
"""Seconds an answer may take to leave; a guest that does not read is disconnected."""


# --------------------------------------------------------------------------------------------
# The channel sockets


class _Channel:
    def __init__(self, vm_uuid: uuid.UUID, path: Path) -> None:
        self.vm_uuid = vm_uuid
        self.path = path
        self.sock: socket.socket | None = None
        self.decoder = FrameDecoder()
        self.send_lock = threading.Lock()  # one answer on the socket at a time
        self.pending_lock = threading.Lock()  # never held while sending
        self.pending = 0
        self.busy_queued = False  # one attest.busy refusal on its way at most
        self.next_attempt = 0.0
        self.connects = 0
        self.answers = 0


class GuestChannelService:
    """Connects to every VM's channel socket and answers quote requests on it.

    Usable standalone (``start()``/``stop()``, :meth:`add_vm`) and as a daemon component
    (``start(daemon)``: see :meth:`start`).

    Args:
        attestor: does the work of each request.
        reconnect_interval: seconds between connection attempts to an absent socket.
        workers: threads answering requests (the TPM serialises its part anyway).
        clock: monotonic clock (tests may pass their own).
        observer: called with (VM UUID, answer frame) after each answer, e.g. to feed the
            daemon's status board and metrics; its exceptions are logged, never raised.
    """

    def __init__(
        self,
        attestor: Attestor | None = None,
        *,
        reconnect_interval: float = 0.5,
        workers: int = 8,
        clock: Callable[[], float] = time.monotonic,
        observer: Callable[[uuid.UUID, Mapping[str, Any]], None] | None = None,
    ) -> None:
        self.attestor = attestor
        self.observer = observer
        self.reconnect_interval = reconnect_interval
        self.clock = clock
        self._workers = workers
        self._pool: ThreadPoolExecutor | None = None
        self._sel = selectors.DefaultSelector()
        self._channels: dict[uuid.UUID, _Channel] = {}
        self._lock = threading.Lock()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    # ---------------------------------------------------------------- lifecycle

    def start(self, daemon: Any = None) -> GuestChannelService:
        """Start the loop thread. As a daemon component, ``daemon`` provides what is missing.

        From ``daemon`` (when given): ``attestor`` if none was passed, and the VMs to serve from
        ``daemon.vms.entries()`` whose adoption record names a ``channel_socket``.
        """
        if self._thread is not None:
            raise RuntimeError("GuestChannelService already started")
        if daemon is not None:
            if self.attestor is None:
                self.attestor = getattr(daemon, "attestor", None)
            registry = getattr(daemon, "vms", None)
            for entry in registry.entries() if registry is not None else ():
                path = (entry.adoption or {}).get("channel_socket")
                if path:
                    self.add_vm(uuid.UUID(entry.uuid), Path(path))
        if self.attestor is None:
            raise ValueError("GuestChannelService needs an Attestor")
        self._pool = ThreadPoolExecutor(self._workers, thread_name_prefix="attest")
        self._thread = threading.Thread(target=self._run, name="guest-channels", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._wake()
        if self._thread is not None:
            self._thread.join(5)
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            for ch in self._channels.values():
                self._disconnect(ch)
        self._sel.close()
        self._wake_r.close()
        self._wake_w.close()

    def __enter__(self) -> GuestChannelService:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---------------------------------------------------------------- VMs

    def add_vm(self, vm_uuid: uuid.UUID, socket_path: Path) -> None:
        """Serve ``vm_uuid``'s channel at ``socket_path`` (connecting now and whenever lost)."""
        with self._lock:
            old = self._channels.pop(vm_uuid, None)
            if old is not None:
                self._disconnect(old)
            self._channels[vm_uuid] = _Channel(vm_uuid, Path(socket_path))
        self._wake()

    def remove_vm(self, vm_uuid: uuid.UUID) -> None:
        with self._lock:
            ch = self._channels.pop(vm_uuid, None)
            if ch is not None:
                self._disconnect(ch)

    def connected(self, vm_uuid: uuid.UUID) -> bool:
        ch = self._channels.get(vm_uuid)
        return ch is not None and ch.sock is not None

    def stats(self) -> dict[str, dict[str, int | bool]]:
        with self._lock:
            return {
                str(u): {
                    "connected": c.sock is not None,
                    "connects": c.connects,
                    "answers": c.answers,
                }
                for u, c in self._channels.items()
            }

    # ---------------------------------------------------------------- loop

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")

    def _disconnect(self, ch: _Channel) -> None:
        if ch.sock is None:
            return
        with contextlib.suppress(KeyError, ValueError, OSError):
            self._sel.unregister(ch.sock)
        ch.sock.close()
        ch.sock = None
        ch.decoder = FrameDecoder()
        ch.next_attempt = self.clock() + self.reconnect_interval

    def _connect_due(self) -> None:
        now = self.clock()
        with self._lock:
            for ch in self._channels.values():
                if ch.sock is not None or now < ch.next_attempt:
                    continue
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    sock.connect(str(ch.path))
                except OSError:
                    sock.close()
                    ch.next_attempt = now + self.reconnect_interval
                    continue
                sock.settimeout(SEND_TIMEOUT)  # answers are sent whole from worker threads
                ch.sock = sock
                ch.connects += 1
                self._sel.register(sock, selectors.EVENT_READ, ch)
                log.info("attest: connected to the channel of VM %s", ch.vm_uuid)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._connect_due()
            for key, _ in self._sel.select(self.reconnect_interval):
                if key.data is None:
                    with contextlib.suppress(OSError):
                        self._wake_r.recv(4096)
                    continue
                self._readable(key.data)

    def _readable(self, ch: _Channel) -> None:
        sock = ch.sock
        if sock is None:
            return
        try:
            data = sock.recv(65536)
        except OSError:
            data = b""
        if not data:  # QEMU went away (VM stopped, saved, migrated): reconnect later
            with self._lock:
                self._disconnect(ch)
            return
        ch.decoder.feed(data)
        try:
            while (frame := ch.decoder.next_frame()) is not None:
                self._dispatch(ch, sock, frame)
        except ParseError as err:
            log.warning("attest: VM %s sent a malformed frame (%s); reconnecting", ch.vm_uuid, err)
            with self._lock:
                self._disconnect(ch)

    def _dispatch(self, ch: _Channel, sock: socket.socket, frame: dict[str, Any]) -> None:
        """Hand one request to the pool; the loop thread itself never sends (a guest that does
        not read could otherwise stall every VM's channel)."""
        assert self._pool is not None and self.attestor is not None
        with ch.pending_lock:
            busy = ch.pending >= MAX_PENDING
            if not busy:
                ch.pending += 1
            refuse = busy and not ch.busy_queued
            if refuse:
                ch.busy_queued = True
        rid = frame.get("id")
        request_id = rid if isinstance(rid, str) else ""
        if busy:
            if refuse:  # more are dropped until this one left: a flood ties up one worker
                message = f"at most {MAX_PENDING} requests in flight per VM"

                def tell_busy() -> None:
                    try:
                        self._send(ch, sock, refusal(request_id, "attest.busy", message))
                    finally:
                        with ch.pending_lock:
                            ch.busy_queued = False

                self._pool.submit(tell_busy)
            return
        attestor = self.attestor

        def work() -> None:
            try:
                answer = attestor.answer(ch.vm_uuid, frame)
            except Exception as err:
                log.exception("attest: VM %s", ch.vm_uuid)
                answer = refusal(request_id, "attest.internal", repr(err))
            finally:
                with ch.pending_lock:
                    ch.pending -= 1
            if self.observer is not None:  # before the answer: whoever has it sees it counted
                try:
                    self.observer(ch.vm_uuid, answer)
                except Exception:  # bookkeeping never breaks attestation
                    log.exception("attest: observer failed")
            self._send(ch, sock, answer)

        self._pool.submit(work)

    def _send(self, ch: _Channel, sock: socket.socket, answer: dict[str, Any]) -> None:
        data = encode_frame(answer)
        if not ch.send_lock.acquire(timeout=SEND_TIMEOUT):
            self._drop_stuck(ch, sock, "an earlier answer is still stuck")
            return
        try:
            if ch.sock is not sock:
                return  # the connection this request came on is gone; the guest resends
            sock.sendall(data)
            ch.answers += 1
        except OSError as err:
            self._drop_stuck(ch, sock, str(err) or type(err).__name__)
        finally:
            ch.send_lock.release()

    def _drop_stuck(self, ch: _Channel, sock: socket.socket, why: str) -> None:
        """A guest that does not read its answers (or a full port): drop the connection. The
        loop sees EOF and reconnects; the guest's agent resends its request."""
        log.info("attest: VM %s: answer not delivered (%s); reconnecting", ch.vm_uuid, why)
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
