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

Layout
------
This module is the core: lifecycle, sockets, the loop, the QEMU session and its control channel,
and ``main``. Around it: :mod:`~host_agent.vtpm.bridge_relay` (the data relay and injection
scheduler, a mixin of :class:`Bridge` because it shares the session state on the hot path),
:mod:`~host_agent.vtpm.bridge_hooks` (state-blob hooks) and :mod:`~host_agent.vtpm.bridge_peers`
(daemon link and query server), both helpers with explicit collaborators,
:mod:`~host_agent.vtpm.bridge_cli` (the argument parser), and the earlier
``bridge_state``/``bridge_link``/``bridge_pcr``/``bridge_errors``.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import logging
import os
import selectors
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from evidence.errors import ParseError, UnsupportedError, VtpmError
from host_agent.errors import StateError
from host_agent.vtpm import ctrl_codec as cc
from host_agent.vtpm.bridge_cli import build_parser, config_from_args
from host_agent.vtpm.bridge_errors import (
    BridgeTransportError,
    InjectionError,
    SwtpmCtrlError,
)
from host_agent.vtpm.bridge_hooks import DAEMON_UNAVAILABLE, StateBlobHooks
from host_agent.vtpm.bridge_link import (
    BridgeRecord,
    query_socket_path,
    remove_registration,
    write_registration,
)
from host_agent.vtpm.bridge_peers import LinkPeers
from host_agent.vtpm.bridge_relay import DataRelay
from host_agent.vtpm.bridge_state import (
    BridgeConfig,
    BridgeRunState,
    BridgeStats,
    Injection,
    PendingHook,
    Poller,
    Session,
)

__all__ = [
    "DAEMON_UNAVAILABLE",
    "Bridge",
    "BridgeConfig",
    "BridgeRunState",
    "BridgeStats",
    "build_parser",
    "main",
]

log = logging.getLogger("host_agent.vtpm.bridge")


class Bridge(DataRelay):
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
        self._injections: collections.deque[Injection] = collections.deque()
        self._blob_hooks = StateBlobHooks(
            config,
            self.stats,
            clock,
            session=lambda: self._session,
            answer=self._answer,
            forward=self._forward,
            daemon=lambda: self._peers.daemon,
        )
        #: The pending hooks' dict itself: the loop and the data relay read it without a call.
        self._hooks: dict[int, PendingHook] = self._blob_hooks.pending
        self._posted: collections.deque[Callable[[], None]] = collections.deque()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._thread: threading.Thread | None = None
        self._stop = False
        self._stopped = threading.Event()
        self._peers = LinkPeers(
            config,
            self.stats,
            clock,
            instance=self.instance,
            poller=self._sel,
            post=self._post,
            hooks=self._blob_hooks,
            target=self,
            record=self._record,
        )

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
                self._sel.register(self._query, selectors.EVENT_READ, self._peers.on_accept_query)
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
                self._peers.tick()
                timeout = self._next_timeout()
                for sock, handler in self._sel.poll(timeout):
                    handler(sock)
                while self._posted:
                    self._posted.popleft()()
                if self.stats.relay_errors_unreported and self._peers.daemon is not None:
                    self._peers.report()
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
        if self.stats.relay_errors_unreported and self._peers.daemon is not None:
            self._peers.report()  # the last counts, which no poll of the daemon would see
        self._peers.close()
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
            self.config.daemon_socket is None or self._peers.daemon is not None
        ):
            return 1.0
        now = self.clock()
        deadlines = [h.deadline for h in self._hooks.values()]
        deadlines += [i.deadline for i in self._injections]
        s = self._session
        if s is not None and isinstance(s.in_flight, Injection):
            deadlines.append(s.in_flight.deadline)
        if self.config.daemon_socket is not None and self._peers.daemon is None:
            deadlines.append(self._peers.daemon_next_try)
        if not deadlines:
            return 1.0
        return max(0.0, min(min(deadlines) - now, 1.0))

    def _expire(self) -> None:
        now = self.clock()
        self._blob_hooks.expire(now)
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
        self._blob_hooks.abandon()
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
            self._forward(req, self._blob_hooks.after_get_stateblob)
        elif isinstance(req, cc.SetStateBlob):
            self._blob_hooks.set_stateblob(req)
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

    # ------------------------------------------------------------------ public, thread-safe
    # (transact and read_pcrs are the data relay's: bridge_relay.DataRelay)

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
            "daemon_connected": self._peers.daemon is not None,
            "stats": self.stats.as_dict(),
        }


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError(f"connection closed after {len(buf)} of {n} bytes")
        buf += chunk
    return buf


# ---------------------------------------------------------------------- command line


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
    bridge = Bridge(config_from_args(args))
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
