"""The per-VM bridge between QEMU's ``-tpmdev emulator`` and the VM's swtpm.

Theory of operation
-------------------
swtpm serves one control client and QEMU holds it for the VM's life, so the host sees a running
vTPM only by standing in between (ARCHITECTURE.md §1). The bridge listens on the VM's control
socket (what libvirt's ``<backend type='external'>`` points QEMU at) and, for each QEMU that
connects, connects to swtpm's control socket and:

- forwards every control command in one write and every reply in one write (swtpm gives a
  command 500 ms to arrive; QEMU's probe reads a reply with a single ``read``), framing both
  directions with :mod:`host_agent.vtpm.ctrl_codec` and the run state it tracks;
- on CMD_SET_DATAFD keeps QEMU's fd (every read from QEMU makes room for passed fds) and gives
  swtpm one end of its own socketpair; TPM packets are then relayed between the two, byte for
  byte, one ``recv`` + one ``send`` per packet;
- injects TPM commands (:meth:`Bridge.read_pcrs`) only at idle moments: no guest command in
  flight or partly received. While an injected command is in flight, guest commands are held
  and forwarded in order after its response; responses are routed by who sent the command, so
  the guest never sees an injected response. Injected commands run at QEMU's cached locality
  (the bridge never sends SET_LOCALITY). State-changing injections are refused from the first
  GET_STATEBLOB until the guest sends a command again or the TPM is re-initialised;
- calls the daemon on CMD_GET_STATEBLOB (after swtpm answered, before QEMU gets the blob) and
  on CMD_SET_STATEBLOB (before the blob reaches swtpm). The daemon answers allow, veto(reason)
  or replace(blob); a veto answers QEMU with TPM_FAIL in the reply shape QEMU reads, so QEMU
  aborts the save or the restore. With the daemon gone, a hook waits for it up to
  ``hook_timeout`` and then vetoes with reason "daemon unavailable".

Everything runs on one thread with a ``selectors`` loop; other threads talk to it only through
:meth:`Bridge._post`. The bridge reconnects to the daemon socket on its own
(``reconnect_interval``), so a restarted daemon finds every running bridge; guests never notice
the daemon. A QEMU session ends when QEMU closes its control socket; the bridge then listens for
the next QEMU (a restore or an incoming migration), connecting to swtpm afresh.

Run with ``python -m host_agent.vtpm.bridge --vm-uuid U --listen CTRL --swtpm-ctrl SWTPM_CTRL
--daemon-sock DAEMON [--runtime-dir DIR]``, or in-process: ``Bridge(config).start()``.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import fcntl
import logging
import os
import queue
import selectors
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from evidence.errors import ParseError, UnsupportedError, VtpmError
from host_agent.errors import StateError
from host_agent.vtpm import ctrl_codec as cc
from host_agent.vtpm.bridge_errors import (
    BridgeTransportError,
    InjectionError,
    InjectionRefused,
    SwtpmCtrlError,
)
from host_agent.vtpm.bridge_link import (
    BridgeRecord,
    LinkPeer,
    query_socket_path,
    remove_registration,
    write_registration,
)
from host_agent.vtpm.bridge_pcr import read_pcr_bank, response_code
from host_agent.vtpm.bridge_state import (
    BridgeConfig,
    BridgeRunState,
    BridgeStats,
    Injection,
    PendingHook,
    Poller,
    Session,
)
from host_agent.vtpm.daemon_link import (
    Call,
    Hello,
    HookCall,
    HookEvent,
    HookReply,
    Report,
    Result,
    Verdict,
)

__all__ = ["Bridge", "BridgeConfig", "BridgeRunState", "BridgeStats", "main"]

log = logging.getLogger("host_agent.vtpm.bridge")

#: Reason given when a hook's bound passes with no daemon connected (the issue's wording).
DAEMON_UNAVAILABLE = "daemon unavailable"


class Bridge:
    """One VM's bridge. ``start()`` runs it on its own thread; ``serve_forever()`` on this one."""

    def __init__(self, config: BridgeConfig, *, clock: Callable[[], float] = time.monotonic):
        self.config = config
        self.clock = clock
        self.stats = BridgeStats()
        #: Tells this bridge's counters from those of an earlier bridge of the same VM.
        self.instance = os.urandom(8).hex()
        self.run_state = BridgeRunState.CREATED
        self._sel = Poller()
        self._listener: socket.socket | None = None
        self._locks: list[tuple[int, Path]] = []
        self._query: socket.socket | None = None
        self._session: Session | None = None
        self._daemon: LinkPeer | None = None
        self._daemon_next_try = 0.0
        self._daemon_ever = False
        self._queries: list[LinkPeer] = []
        self._injections: collections.deque[Injection] = collections.deque()
        self._hooks: dict[int, PendingHook] = {}
        self._next_hook = 0
        self._posted: collections.deque[Callable[[], None]] = collections.deque()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._thread: threading.Thread | None = None
        self._stop = False
        self._stopped = threading.Event()
        self._lock = threading.Lock()
        # link calls that block (read_pcrs) run on reused daemon threads, one per call in flight
        self._call_work: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._call_idle = 0

    # ------------------------------------------------------------------ lifecycle

    def _require(self, what: str, *states: BridgeRunState) -> None:
        if self.run_state not in states:
            raise StateError(
                self.run_state.value,
                [s.value for s in states],
                f"bridge {self.config.vm_uuid}: {what}",
            )

    def _open(self) -> None:
        self._require("start()", BridgeRunState.CREATED)
        cfg = self.config
        try:
            self._listener = self._bind(cfg.listen, cfg.listen_mode, cfg.listen_uid, cfg.listen_gid)
            self._sel.register(self._listener, selectors.EVENT_READ, self._on_accept_qemu)
            if cfg.runtime_dir is not None:
                qpath = query_socket_path(cfg.runtime_dir, cfg.vm_uuid)
                cfg.runtime_dir.mkdir(parents=True, exist_ok=True)
                self._query = self._bind(qpath, 0o600, None, None)
                self._sel.register(self._query, selectors.EVENT_READ, self._on_accept_query)
                write_registration(cfg.runtime_dir, self._record())
        except OSError as err:
            for sock in (self._listener, self._query):
                if sock is not None:
                    with contextlib.suppress(KeyError, ValueError, OSError):
                        self._sel.unregister(sock)
            self._close_sockets()
            raise BridgeTransportError(f"bridge listen {cfg.listen}", str(err)) from err
        self._sel.register(self._wake_r, selectors.EVENT_READ, self._on_wake)
        self.run_state = BridgeRunState.LISTENING
        if cfg.daemon_socket is None:
            level = logging.WARNING if cfg.allow_unhooked_state_transfer else logging.ERROR
            log.log(
                level,
                "bridge %s has no daemon socket: state transfers %s",
                cfg.vm_uuid,
                "pass unhooked" if cfg.allow_unhooked_state_transfer else "are refused",
            )
        log.info("bridge %s listening on %s (swtpm %s)", cfg.vm_uuid, cfg.listen, cfg.swtpm_ctrl)

    def _record(self) -> BridgeRecord:
        cfg = self.config
        qpath = query_socket_path(cfg.runtime_dir, cfg.vm_uuid) if cfg.runtime_dir else ""
        return BridgeRecord(cfg.vm_uuid, cfg.vm_name, os.getpid(), str(cfg.listen), str(qpath))

    def _bind(self, path: Path, mode: int, uid: int | None, gid: int | None) -> socket.socket:
        """Bind a listening socket at ``path``, guarded by ``path.lock`` (flock): a second bridge
        for the same path fails instead of stealing it; a stale socket file is replaced."""
        lock = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(lock)
            raise OSError(f"{path} is in use by another bridge (lock {path}.lock held)") from None
        self._locks.append((lock, Path(f"{path}.lock")))
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(str(path))
            os.chmod(path, mode)
            if uid is not None or gid is not None:
                os.chown(path, -1 if uid is None else uid, -1 if gid is None else gid)
            sock.listen(8)
        except OSError:
            sock.close()
            raise
        return sock

    def start(self) -> Bridge:
        """Bind the sockets and run the loop on a daemon thread. Returns self."""
        self._open()
        self._thread = threading.Thread(
            target=self._run, name=f"bridge-{self.config.vm_uuid[:8]}", daemon=True
        )
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        """Bind and run the loop on the calling thread until :meth:`close` (or a signal)."""
        self._open()
        self._thread = threading.current_thread()
        self._run()

    def close(self, timeout: float = 5.0) -> None:
        """Stop the loop, end the QEMU session, unregister. Idempotent."""
        if self.run_state is BridgeRunState.CREATED:
            self.run_state = BridgeRunState.CLOSED
            return
        self._stop = True
        self._wake()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._stopped.wait(timeout)

    def _close_sockets(self) -> None:
        """Close and unlink only what this bridge bound (never another bridge's socket)."""
        cfg = self.config
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.close()
            with contextlib.suppress(OSError):
                cfg.listen.unlink()
        if self._query is not None and cfg.runtime_dir is not None:
            with contextlib.suppress(OSError):
                self._query.close()
            with contextlib.suppress(OSError):
                query_socket_path(cfg.runtime_dir, cfg.vm_uuid).unlink()
            remove_registration(cfg.runtime_dir, cfg.vm_uuid, os.getpid())
        self._listener = self._query = None
        for fd, lock_path in self._locks:
            with contextlib.suppress(OSError):
                lock_path.unlink()
            os.close(fd)
        self._locks.clear()

    @property
    def attached(self) -> bool:
        return self.run_state is BridgeRunState.ATTACHED

    def wait_closed(self, timeout: float | None = None) -> bool:
        return self._stopped.wait(timeout)

    # ------------------------------------------------------------------ loop

    def _post(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the loop thread (thread-safe)."""
        self._posted.append(fn)
        self._wake()

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")

    def _on_wake(self, _sock: socket.socket) -> None:
        with contextlib.suppress(OSError):
            self._wake_r.recv(4096)

    def _run(self) -> None:
        try:
            while not self._stop:
                self._tick_daemon()
                timeout = self._next_timeout()
                for sock, handler in self._sel.poll(timeout):
                    handler(sock)
                while self._posted:
                    self._posted.popleft()()
                if self.stats.relay_errors_unreported and self._daemon is not None:
                    self._report()
                if self._hooks or self._injections or self._inject_in_flight():
                    self._expire()
                if (
                    self.config.exit_when_qemu_leaves
                    and self.stats.sessions > 0
                    and self._session is None
                ):
                    break
        except Exception:
            log.exception("bridge %s loop failed", self.config.vm_uuid)
            raise
        finally:
            self._shutdown()

    def _shutdown(self) -> None:
        if self._session is not None:
            self._end_session("bridge stopping")
        if self.stats.relay_errors_unreported and self._daemon is not None:
            self._report()  # the last counts, which no poll of the daemon would see
        for peer in [self._daemon, *self._queries]:
            if peer is not None:
                peer.close()
        self._daemon = None
        self._queries.clear()
        self._close_sockets()
        for inj in self._injections:
            self._fail(inj, InjectionError("the bridge stopped"))
        self._injections.clear()
        self.run_state = BridgeRunState.CLOSED
        self._sel.close()
        self._wake_r.close()
        self._wake_w.close()
        self._stopped.set()
        log.info("bridge %s stopped", self.config.vm_uuid)

    def _inject_in_flight(self) -> bool:
        s = self._session
        return s is not None and isinstance(s.in_flight, Injection)

    def _next_timeout(self) -> float:
        if not (self._hooks or self._injections or self._inject_in_flight()) and (
            self.config.daemon_socket is None or self._daemon is not None
        ):
            return 1.0
        now = self.clock()
        deadlines = [h.deadline for h in self._hooks.values()]
        deadlines += [i.deadline for i in self._injections]
        s = self._session
        if s is not None and isinstance(s.in_flight, Injection):
            deadlines.append(s.in_flight.deadline)
        if self.config.daemon_socket is not None and self._daemon is None:
            deadlines.append(self._daemon_next_try)
        if not deadlines:
            return 1.0
        return max(0.0, min(min(deadlines) - now, 1.0))

    def _expire(self) -> None:
        now = self.clock()
        for hook in [h for h in self._hooks.values() if h.deadline <= now]:
            connected = self._daemon is not None
            reason = (
                f"daemon did not answer within {self.config.hook_timeout:g} s"
                if connected and hook.sent
                else DAEMON_UNAVAILABLE
            )
            del self._hooks[hook.call.id]
            hook.done(HookReply(hook.call.id, Verdict.VETO, reason))
        for inj in [i for i in self._injections if i.deadline <= now]:
            self._injections.remove(inj)
            self._fail(inj, InjectionError("injected command found no idle moment in time"))
        s = self._session
        if s is not None and isinstance(s.in_flight, Injection) and s.in_flight.deadline <= now:
            # Cannot recall it: its response will still come and be dropped; the caller gives up.
            self._fail(s.in_flight, InjectionError("injected command got no response in time"))

    # ------------------------------------------------------------------ QEMU session

    def _on_accept_qemu(self, listener: socket.socket) -> None:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        if self._session is not None:
            log.warning("bridge %s: second QEMU connection refused", self.config.vm_uuid)
            conn.close()
            return
        try:
            swtpm, running = self._connect_swtpm()
        except VtpmError as err:
            self.stats.relay_error("swtpm_connect")
            log.error("bridge %s: %s; closing QEMU's connection", self.config.vm_uuid, err)
            conn.close()
            return
        s = Session(conn, swtpm, running)
        self._session = s
        self.stats.sessions += 1
        self.run_state = BridgeRunState.ATTACHED
        self._sel.register(conn, selectors.EVENT_READ, self._on_qemu_ctrl)
        self._sel.register(swtpm, selectors.EVENT_READ, self._on_swtpm_ctrl)
        log.info("bridge %s: QEMU attached (TPM %s)", self.config.vm_uuid, s.state.state.value)

    def _connect_swtpm(self) -> tuple[socket.socket, bool]:
        """Connect to swtpm's control socket and learn whether its TPM runs.

        The probe is GET_TPMESTABLISHED, read-only: a bare TPM_BAD_ORDINAL means stopped.
        """
        path = str(self.config.swtpm_ctrl)
        deadline = self.clock() + self.config.swtpm_connect_timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(path)
                break
            except OSError as err:
                sock.close()
                if self.clock() > deadline:
                    raise BridgeTransportError(f"swtpm ctrl {path}", str(err)) from err
                time.sleep(0.02)
        try:
            sock.settimeout(5.0)
            sock.sendall(cc.GetTpmEstablished().encode())
            head = _recv_exact(sock, 4)
            result = int.from_bytes(head, "big")
            running = result != cc.PtmResult.TPM_BAD_ORDINAL
            if running:
                _recv_exact(sock, 4)
            sock.settimeout(None)
        except OSError as err:
            sock.close()
            raise SwtpmCtrlError("CMD_GET_TPMESTABLISHED", 0, f"probe failed: {err}") from err
        return sock, running

    def _end_session(self, why: str) -> None:
        s = self._session
        if s is None:
            return
        for sock in (s.qemu, s.swtpm, s.guest, s.tpm):
            if sock is not None:
                with contextlib.suppress(KeyError, ValueError):
                    self._sel.unregister(sock)
        s.close()
        self._session = None
        if isinstance(s.in_flight, Injection):
            self._fail(s.in_flight, InjectionError(f"QEMU session ended: {why}"))
        for inj in self._injections:
            self._fail(inj, InjectionError(f"QEMU session ended: {why}"))
        self._injections.clear()
        for hook in self._hooks.values():
            hook.done = lambda _r: None
        self._hooks.clear()
        if self.run_state is BridgeRunState.ATTACHED:
            self.run_state = BridgeRunState.LISTENING
        log.info("bridge %s: QEMU session ended (%s)", self.config.vm_uuid, why)

    def _on_qemu_ctrl(self, sock: socket.socket) -> None:
        s = self._session
        if s is None or sock is not s.qemu:
            return  # closed by an earlier event of the same select() round
        try:
            data, fds, _flags, _addr = socket.recv_fds(sock, 1 << 20, 4)
        except OSError as err:
            self.stats.relay_error("qemu_io")
            self._end_session(f"QEMU ctrl read failed: {err}")
            return
        s.passed_fds.extend(fds)
        if not data:
            self._end_session("QEMU closed the control socket")
            return
        s.requests.feed(data)
        self._next_request()

    def _next_request(self) -> None:
        s = self._session
        if s is None or s.busy:
            return
        try:
            req = s.requests.next_request()
        except UnsupportedError as err:
            s.requests.clear()
            self.stats.relay_error("qemu_malformed")
            log.warning("bridge %s: %s; answering TPM_BAD_ORDINAL", self.config.vm_uuid, err)
            self._answer(cc.ResultReply(cc.PtmResult.TPM_BAD_ORDINAL))
            return
        except ParseError as err:
            s.requests.clear()
            self.stats.relay_error("qemu_malformed")
            log.warning("bridge %s: %s; answering TPM_BAD_PARAMETER", self.config.vm_uuid, err)
            self._answer(cc.ResultReply(cc.PtmResult.TPM_BAD_PARAMETER))
            return
        if req is None:
            return
        s.busy = True
        self.stats.ctrl_commands[req.code.name] += 1
        if not isinstance(req, cc.SetDataFd):
            for fd in s.passed_fds:  # fds only ever come with SET_DATAFD
                os.close(fd)
            s.passed_fds.clear()
        if isinstance(req, cc.SetDataFd):
            self._set_data_fd(req)
        elif isinstance(req, cc.GetStateBlob):
            s.frozen = True
            self._forward(req, self._after_get_stateblob)
        elif isinstance(req, cc.SetStateBlob):
            self._hook(
                HookEvent.SET_STATEBLOB,
                req.blob_type,
                req.data,
                req.state_flags,
                0,
                lambda verdict: self._after_set_hook(req, verdict),
            )
        else:
            self._forward(req, lambda _req, reply: self._answer(reply))

    def _forward(
        self,
        req: cc.Request,
        on_reply: Callable[[cc.Request, cc.Reply], None],
        fds: Sequence[int] = (),
    ) -> None:
        s = self._session
        assert s is not None
        s.pending = req
        s.on_reply = on_reply
        s.replies.expect(req, s.state.running)
        try:
            if fds:
                socket.send_fds(s.swtpm, [req.encode()], list(fds))
            else:
                s.swtpm.sendall(req.encode())
        except OSError as err:
            self.stats.relay_error("swtpm_io")
            self._end_session(f"swtpm ctrl write failed: {err}")

    def _on_swtpm_ctrl(self, sock: socket.socket) -> None:
        s = self._session
        if s is None or sock is not s.swtpm:
            return  # closed by an earlier event of the same select() round
        try:
            data = sock.recv(1 << 20)
        except OSError as err:
            self.stats.relay_error("swtpm_io")
            self._end_session(f"swtpm ctrl read failed: {err}")
            return
        if not data:
            # After SHUTDOWN swtpm exits: QEMU will not ask again. Otherwise QEMU must learn.
            # With --terminate it also exits once its data channel closed (QEMU left).
            if s.state.state is not cc.RunState.TERMINATED and not s.data_closed:
                self.stats.relay_error("swtpm_gone")
            self._end_session("swtpm closed its control socket")
            return
        s.replies.feed(data)
        try:
            reply = s.replies.next_reply()
        except ParseError as err:
            self.stats.relay_error("swtpm_malformed")
            self._end_session(f"swtpm sent a malformed reply: {err}")
            return
        if reply is None:
            return
        req, on_reply = s.pending, s.on_reply
        assert req is not None and on_reply is not None
        s.pending = s.on_reply = None
        s.state.apply(req, reply)
        if isinstance(req, cc.Init) and reply.result == 0:
            s.frozen = False
        on_reply(req, reply)

    def _answer(self, reply: cc.Reply) -> None:
        s = self._session
        if s is None:
            return
        try:
            s.qemu.sendall(reply.encode())
        except OSError as err:
            self.stats.relay_error("qemu_io")
            self._end_session(f"QEMU ctrl write failed: {err}")
            return
        s.busy = False
        self._next_request()

    # ------------------------------------------------------------------ data channel

    def _set_data_fd(self, req: cc.SetDataFd) -> None:
        s = self._session
        assert s is not None
        if len(s.passed_fds) != 1:
            self.stats.relay_error("qemu_malformed")
            log.warning("bridge %s: SET_DATAFD with %d fds", self.config.vm_uuid, len(s.passed_fds))
            for fd in s.passed_fds:
                os.close(fd)
            s.passed_fds.clear()
            self._answer(cc.ResultReply(cc.PtmResult.TPM_BAD_PARAMETER))
            return
        guest_fd = s.passed_fds.pop()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)

        def done(_req: cc.Request, reply: cc.Reply) -> None:
            theirs.close()
            if reply.result == 0 and self._session is s and s.guest is None:
                s.guest = socket.socket(fileno=guest_fd)
                s.tpm = ours
                self._sel.register(s.guest, selectors.EVENT_READ, self._on_guest_data)
                self._sel.register(s.tpm, selectors.EVENT_READ, self._on_tpm_data)
            else:
                os.close(guest_fd)
                ours.close()
            self._answer(reply)

        self._forward(req, done, fds=[theirs.fileno()])

    def _on_guest_data(self, sock: socket.socket) -> None:
        s = self._session
        if s is None or sock is not s.guest:
            return  # closed by an earlier event of the same select() round
        try:
            data = sock.recv(65536)
        except OSError as err:
            self._drop_data_channel(s, f"QEMU data channel read failed: {err}", "qemu_io")
            return
        if not data:
            self._drop_data_channel(s, "QEMU closed the data channel")
            return
        if (
            s.in_flight is None
            and not s.held
            and not s.guest_framer.buffered
            and len(data) >= cc.TPM_HEADER_SIZE
            and int.from_bytes(data[2:6], "big") == len(data) <= cc.MAX_TPM_PACKET
            and s.tpm is not None
        ):
            # the common case: one whole command, nothing queued: straight on to swtpm
            s.in_flight = "guest"
            self.stats.guest_commands += 1
            if s.frozen and not self._hooks:
                s.frozen = False
            try:
                s.tpm.sendall(data)
            except OSError:
                self._drop_data_channel(s, "swtpm data channel write failed", "swtpm_io")
                return
            if self.config.response_spin > 0:
                self._spin_for_response(s)
            return
        s.guest_framer.feed(data)
        now = self.clock()
        try:
            while (packet := s.guest_framer.next_packet()) is not None:
                s.held.append((packet, now))
        except ParseError as err:
            # Cannot frame: give up interposing, the stream is QEMU's problem now.
            self._drop_data_channel(s, f"guest stream unframeable: {err}", "qemu_malformed")
            return
        self._pump(s)

    def _spin_for_response(self, s: Session) -> None:
        """Poll for swtpm's response for up to ``response_spin`` seconds before going back to
        epoll: most responses take tens of µs, and a sleeping loop pays a wake-up for each."""
        tpm = s.tpm
        assert tpm is not None
        end = time.perf_counter() + self.config.response_spin
        while time.perf_counter() < end:
            try:
                data = tpm.recv(65536, socket.MSG_DONTWAIT)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            self._on_tpm_data(tpm, data)
            return

    def _on_tpm_data(self, sock: socket.socket, data: bytes | None = None) -> None:
        s = self._session
        if s is None or sock is not s.tpm:
            return  # closed by an earlier event of the same select() round
        if data is None:
            try:
                data = sock.recv(65536)
            except OSError as err:
                self._drop_data_channel(s, f"swtpm data channel read failed: {err}", "swtpm_io")
                return
        if not data:
            gone = None if s.state.state is cc.RunState.TERMINATED else "swtpm_gone"
            self._drop_data_channel(s, "swtpm closed the data channel", gone)
            return
        if (
            not s.tpm_framer.buffered
            and len(data) >= cc.TPM_HEADER_SIZE
            and int.from_bytes(data[2:6], "big") == len(data)
        ):
            packet: bytes | None = data  # the common case: one whole response
        else:
            s.tpm_framer.feed(data)
            try:
                packet = s.tpm_framer.next_packet()
            except ParseError as err:
                self._drop_data_channel(s, f"swtpm stream unframeable: {err}", "swtpm_malformed")
                return
        if packet is None:
            return
        owner, s.in_flight = s.in_flight, None
        if owner == "guest":
            try:
                s.guest.sendall(packet)  # type: ignore[union-attr]
            except OSError:
                self._drop_data_channel(s, "QEMU data channel write failed", "qemu_io")
                return
            if s.held or self._injections:
                self._pump(s)
            return
        self._route_response(s, owner, packet)

    def _route_response(self, s: Session, owner: str | Injection | None, packet: bytes) -> None:
        if isinstance(owner, Injection):
            self.stats.injected_commands += 1
            if not owner.future.done():
                owner.future.set_result(packet)
        else:
            self.stats.relay_error("swtpm_malformed")
            log.error("bridge %s: swtpm answered with nothing in flight", self.config.vm_uuid)
        self._pump(s)

    def _pump(self, s: Session) -> None:
        """Send the next command to swtpm if none is in flight: guest first, else an injection
        when the guest is idle (nothing held, nothing partly received)."""
        if s.in_flight is not None or s.tpm is None:
            return
        now = self.clock()
        if s.held:
            packet, arrived = s.held.popleft()
            hold = now - arrived
            if hold > 0.0005:
                self.stats.held_guest_commands += 1
                self.stats.max_guest_hold = max(self.stats.max_guest_hold, hold)
            if not self._hooks:
                s.frozen = False  # the guest runs again: the state transfer is over
            s.in_flight = "guest"
            self.stats.guest_commands += 1
            try:
                s.tpm.sendall(packet)
            except OSError:
                self._drop_data_channel(s, "swtpm data channel write failed", "swtpm_io")
            return
        if s.guest_framer.buffered:
            return
        while self._injections:
            inj = self._injections.popleft()
            if inj.future.done():
                continue
            inj.sent_at = now
            self.stats.max_injection_wait = max(self.stats.max_injection_wait, now - inj.queued_at)
            s.in_flight = inj
            try:
                s.tpm.sendall(inj.packet)
            except OSError:
                self._drop_data_channel(s, "swtpm data channel write failed", "swtpm_io")
            return

    def _drop_data_channel(self, s: Session, why: str, error: str | None = None) -> None:
        """Close the data channel; ``error`` is the relay error kind to count, if it is one."""
        if error is not None:
            self.stats.relay_error(error)
        s.data_closed = True
        for sock in (s.guest, s.tpm):
            if sock is not None:
                with contextlib.suppress(KeyError, ValueError):
                    self._sel.unregister(sock)
                sock.close()
        s.guest = s.tpm = None
        if isinstance(s.in_flight, Injection):
            self._fail(s.in_flight, InjectionError(f"data channel closed: {why}"))
        s.in_flight = None
        log.info("bridge %s: data channel closed (%s)", self.config.vm_uuid, why)

    def _fail(self, inj: Injection, err: Exception) -> None:
        if not inj.future.done():
            self.stats.injections_failed += 1
            self.stats.relay_error("injection_failed")
            inj.future.set_exception(err)

    def _submit(
        self, packet: bytes, state_changing: bool, timeout: float, fut: Future[bytes]
    ) -> None:
        s = self._session
        if s is None or s.tpm is None:
            fut.set_exception(
                StateError(
                    self.run_state.value,
                    ["attached"],
                    f"bridge {self.config.vm_uuid}: inject (no QEMU data channel)",
                )
            )
            return
        if not s.state.running:
            fut.set_exception(
                StateError(
                    f"tpm {s.state.state.value}",
                    ["tpm running"],
                    f"bridge {self.config.vm_uuid}: inject",
                )
            )
            return
        if state_changing and s.frozen:
            fut.set_exception(
                InjectionRefused(
                    "state-changing injection refused: QEMU is transferring the TPM state "
                    "(GET_STATEBLOB seen); it would miss the saved state"
                )
            )
            return
        now = self.clock()
        self._injections.append(Injection(packet, fut, now, now + timeout))
        self._pump(s)

    # ------------------------------------------------------------------ public, thread-safe

    def transact(
        self, packet: bytes, *, state_changing: bool = False, timeout: float | None = None
    ) -> bytes:
        """Inject one TPM command at an idle moment and return its response packet.

        Args:
            packet: a complete TPM 2.0 command.
            state_changing: the command changes TPM state (refused while a state transfer
                runs, see module docstring).
            timeout: seconds to wait for an idle moment and the response.

        Raises:
            StateError: no QEMU attached, no data channel yet, or the TPM is not running.
            InjectionRefused: a state-changing command during a state transfer.
            InjectionError: no idle moment or no response in time; the session ended.
        """
        if threading.current_thread() is self._thread:
            raise RuntimeError("transact() blocks; it cannot run on the bridge's loop thread")
        timeout = self.config.injection_timeout if timeout is None else timeout
        fut: Future[bytes] = Future()
        self._post(lambda: self._submit(packet, state_changing, timeout, fut))
        try:
            return fut.result(timeout + 1.0)
        except TimeoutError as err:
            raise InjectionError("injected command got no response in time") from err

    def read_pcrs(self, bank: str = "sha256", *, timeout: float | None = None) -> dict[int, bytes]:
        """The 24 PCRs of ``bank``, read by injected TPM2_PCR_Read commands.

        Raises:
            StateError, InjectionError: see :meth:`transact`; InjectionError (with ``rc``) also
                when the TPM answers with an error (e.g. 0x100 before the guest's TPM2_Startup).
        """

        def transact(cmd: bytes) -> bytes:
            resp = self.transact(cmd, timeout=timeout)
            rc = response_code(resp)
            if rc != 0:
                raise InjectionError(f"TPM2_PCR_Read failed with rc 0x{rc:x}", rc)
            return resp

        return read_pcr_bank(transact, bank)

    def status(self) -> dict[str, Any]:
        """A snapshot for the status call (approximate when read from another thread)."""
        s = self._session
        return {
            "vm_uuid": self.config.vm_uuid,
            "vm_name": self.config.vm_name,
            "instance": self.instance,
            "pid": os.getpid(),
            "run_state": self.run_state.value,
            "tpm": None if s is None else s.state.state.value,
            "qemu_pid": None if s is None else s.qemu_pid,
            "locality": None if s is None else s.state.locality,
            "data_channel": s is not None and s.tpm is not None,
            "daemon_connected": self._daemon is not None,
            "stats": self.stats.as_dict(),
        }

    # ------------------------------------------------------------------ hooks

    def _hook(
        self,
        event: str,
        blob_type: int,
        blob: bytes,
        state_flags: int,
        result: int,
        done: Callable[[HookReply], None],
    ) -> None:
        self._next_hook += 1
        call = HookCall.for_blob(
            self._next_hook,
            self.config.vm_uuid,
            event,
            blob_type,
            blob,
            state_flags=state_flags,
            result=result,
            include_blob=True,  # the daemon seals GET blobs and checks SET blobs
        )
        self.stats.hooks += 1
        if self.config.daemon_socket is None:
            if self.config.allow_unhooked_state_transfer:
                done(HookReply(call.id, Verdict.ALLOW))
            else:
                done(HookReply(call.id, Verdict.VETO, "no daemon configured for this bridge"))
            return
        hook = PendingHook(call, self.clock() + self.config.hook_timeout, done)
        self._hooks[call.id] = hook
        if self._daemon is not None:
            hook.sent = self._daemon.send(call)

    def _verdict(self, reply: HookReply) -> None:
        hook = self._hooks.pop(reply.id, None)
        if hook is None:
            log.warning("bridge %s: verdict for unknown hook %d", self.config.vm_uuid, reply.id)
            return
        hook.done(reply)

    def _log_veto(self, event: str, blob_type: int, reason: str) -> None:
        text = f"{event} {_blob_name(blob_type)} vetoed: {reason}"
        self.stats.vetoes.append(text)
        log.warning("bridge %s: %s", self.config.vm_uuid, text)

    def _after_get_stateblob(self, req: cc.Request, reply: cc.Reply) -> None:
        assert isinstance(req, cc.GetStateBlob)
        if not isinstance(reply, cc.StateBlobReply):
            self._answer(reply)  # a bare error: nothing was handed out
            return

        def done(verdict: HookReply) -> None:
            if self._session is None:
                return
            if verdict.verdict == Verdict.ALLOW:
                self._answer(reply)
            elif verdict.verdict == Verdict.REPLACE:
                flags = reply.state_flags if verdict.state_flags is None else verdict.state_flags
                self._answer(cc.StateBlobReply.of(verdict.blob, flags))
            else:
                self._log_veto(HookEvent.GET_STATEBLOB, req.blob_type, verdict.reason)
                self._answer(cc.fault_reply(req, True, cc.PtmResult.TPM_FAIL))

        self._hook(
            HookEvent.GET_STATEBLOB,
            req.blob_type,
            reply.data,
            reply.state_flags,
            reply.result,
            done,
        )

    def _after_set_hook(self, req: cc.SetStateBlob, verdict: HookReply) -> None:
        s = self._session
        if s is None:
            return
        if verdict.verdict == Verdict.VETO:
            self._log_veto(HookEvent.SET_STATEBLOB, req.blob_type, verdict.reason)
            self._answer(cc.fault_reply(req, s.state.running, cc.PtmResult.TPM_FAIL))
            return
        if verdict.verdict == Verdict.REPLACE:
            flags = req.state_flags if verdict.state_flags is None else verdict.state_flags
            req = cc.SetStateBlob(req.blob_type, verdict.blob, flags)
        self._forward(req, lambda _req, reply: self._answer(reply))

    # ------------------------------------------------------------------ daemon link

    def _tick_daemon(self) -> None:
        path = self.config.daemon_socket
        if path is None or self._daemon is not None or self.clock() < self._daemon_next_try:
            return
        self._daemon_next_try = self.clock() + self.config.reconnect_interval
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(str(path))
        except OSError:
            sock.close()
            return
        peer = LinkPeer(sock, "daemon", str(path))
        rec = self._record()
        if not peer.send(
            Hello(rec.vm_uuid, rec.vm_name, rec.pid, rec.ctrl_socket, rec.query_socket)
        ):
            return
        self._daemon = peer
        self._sel.register(sock, selectors.EVENT_READ, lambda _s: self._on_peer(peer))
        log.info(
            "bridge %s: connected to daemon %s%s",
            self.config.vm_uuid,
            path,
            " (again)" if self._daemon_ever else "",
        )
        self._daemon_ever = True
        if self.stats.relay_errors:
            self._report()  # a restarted daemon learns this instance's counts at once
        for hook in self._hooks.values():
            hook.sent = peer.send(hook.call)

    def _report(self) -> None:
        """Send the daemon this bridge's relay error counts (cleared as unreported if sent)."""
        peer = self._daemon
        if peer is None:
            return
        report = Report(self.config.vm_uuid, self.instance, dict(self.stats.relay_errors))
        if peer.send(report):
            self.stats.relay_errors_unreported = False
        else:
            self._drop_peer(peer, "report not sent")

    def _on_accept_query(self, listener: socket.socket) -> None:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        peer = LinkPeer(conn, "query", "query client")
        self._queries.append(peer)
        self._sel.register(conn, selectors.EVENT_READ, lambda _s: self._on_peer(peer))

    def _drop_peer(self, peer: LinkPeer, why: str) -> None:
        with contextlib.suppress(KeyError, ValueError, OSError):
            self._sel.unregister(peer.sock)
        peer.close()
        if peer is self._daemon:
            self._daemon = None
            self._daemon_next_try = self.clock() + self.config.reconnect_interval
            for hook in self._hooks.values():
                hook.sent = False
            log.warning("bridge %s: daemon link lost (%s)", self.config.vm_uuid, why)
        elif peer in self._queries:
            self._queries.remove(peer)

    def _on_peer(self, peer: LinkPeer) -> None:
        try:
            msgs = peer.receive()
        except ParseError as err:
            if peer is self._daemon:
                self.stats.relay_error("daemon_malformed")
            self._drop_peer(peer, f"malformed frame: {err}")
            return
        if msgs is None:
            self._drop_peer(peer, "closed")
            return
        for msg in msgs:
            if isinstance(msg, HookReply) and peer.kind == "daemon":
                self._verdict(msg)
            elif isinstance(msg, Call):
                self._on_call(peer, msg)
            else:
                if peer is self._daemon:
                    self.stats.relay_error("daemon_malformed")
                self._drop_peer(peer, f"unexpected {type(msg).__name__}")
                return

    def _on_call(self, peer: LinkPeer, call: Call) -> None:
        if call.op == "status":
            peer.send(Result(call.id, True, self.status()))
            return
        if call.op != "read_pcrs":
            peer.send(
                Result(
                    call.id,
                    False,
                    error_id="vtpm.link.unknown_op",
                    message=f"unknown op {call.op!r}; known: read_pcrs, status",
                )
            )
            return
        bank = call.args.get("bank", "sha256")
        timeout = call.args.get("timeout")

        def work() -> None:
            try:
                pcrs = self.read_pcrs(str(bank), timeout=float(timeout) if timeout else None)
                result = Result(
                    call.id,
                    True,
                    {"bank": bank, "pcrs": {str(i): v.hex() for i, v in sorted(pcrs.items())}},
                )
            except VtpmError as err:
                result = Result(call.id, False, error_id=err.id, message=str(err))
            except ValueError as err:
                result = Result(call.id, False, error_id="vtpm.link.bad_args", message=str(err))
            self._post(lambda: _send_unless_closed(peer, result))

        self._run_call(work)

    def _run_call(self, work: Callable[[], None]) -> None:
        """Run ``work`` on an idle call thread, or a new one (a thread start costs more CPU
        than the PCR read it serves: ~0.12 ms of ~0.7)."""
        with self._lock:
            idle = self._call_idle > 0
            if idle:
                self._call_idle -= 1
        self._call_work.put(work)
        if not idle:
            threading.Thread(target=self._call_thread, name="bridge-call", daemon=True).start()

    def _call_thread(self) -> None:
        """Serve calls until idle for 10 s (a caller that counted this thread idle finds it)."""
        while True:
            try:
                work = self._call_work.get(timeout=10.0)
            except queue.Empty:
                with self._lock:
                    if self._call_idle > 0:  # nobody counted on this thread: leave
                        self._call_idle -= 1
                        return
                continue  # a call was handed to this thread meanwhile: take it
            try:
                work()
            except Exception:  # one bad call does not take the thread down
                log.exception("bridge %s: link call failed", self.config.vm_uuid)
            with self._lock:
                self._call_idle += 1


def _send_unless_closed(peer: LinkPeer, msg: Result) -> None:
    if not peer.closed:
        peer.send(msg)


def _blob_name(blob_type: int) -> str:
    try:
        return cc.BlobType(blob_type).name
    except ValueError:
        return f"type {blob_type}"


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError(f"connection closed after {len(buf)} of {n} bytes")
        buf += chunk
    return buf


# ---------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m host_agent.vtpm.bridge",
        description="Per-VM bridge between QEMU's tpm-emulator backend and swtpm.",
    )
    p.add_argument("--vm-uuid", required=True)
    p.add_argument("--vm-name", default="")
    p.add_argument("--listen", required=True, type=Path, help="the VM's control socket (QEMU)")
    p.add_argument("--swtpm-ctrl", required=True, type=Path, help="swtpm's --ctrl socket")
    p.add_argument("--daemon-sock", type=Path, help="the daemon's link socket")
    p.add_argument("--runtime-dir", type=Path, help="registry + query socket directory")
    p.add_argument("--hook-timeout", type=float, default=10.0)
    p.add_argument("--reconnect-interval", type=float, default=0.2)
    p.add_argument("--response-spin-us", type=float, default=0.0)
    p.add_argument("--listen-mode", type=lambda v: int(v, 8), default=0o600)
    p.add_argument("--listen-uid", type=int)
    p.add_argument("--listen-gid", type=int)
    p.add_argument("--allow-unhooked-state-transfer", action="store_true")
    p.add_argument("--once", action="store_true", help="exit when the first QEMU leaves")
    p.add_argument("--log-level", default="INFO")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    if args.daemon_sock is None and not args.allow_unhooked_state_transfer:
        print(
            "bridge: --daemon-sock is required (or --allow-unhooked-state-transfer)",
            file=sys.stderr,
        )
        return 2
    config = BridgeConfig(
        vm_uuid=args.vm_uuid,
        vm_name=args.vm_name,
        listen=args.listen,
        swtpm_ctrl=args.swtpm_ctrl,
        daemon_socket=args.daemon_sock,
        runtime_dir=args.runtime_dir,
        hook_timeout=args.hook_timeout,
        reconnect_interval=args.reconnect_interval,
        response_spin=args.response_spin_us / 1e6,
        listen_mode=args.listen_mode,
        listen_uid=args.listen_uid,
        listen_gid=args.listen_gid,
        allow_unhooked_state_transfer=args.allow_unhooked_state_transfer,
        exit_when_qemu_leaves=args.once,
    )
    bridge = Bridge(config)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda _n, _f: bridge.close())
    try:
        bridge.serve_forever()
    except VtpmError as err:
        print(f"bridge: error [{err.id}]: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
