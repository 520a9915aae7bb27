"""The daemon side of the bridge link: a small, real server the tests (and later the daemon) use.

Bridges connect to its socket and say hello; the server keeps one connection per VM UUID (a
newer one replaces an older one). It routes each state-transfer hook to a Python callable on a
worker thread (so a callable may itself call :meth:`HooksServer.read_pcrs` on the same bridge),
answers with the callable's verdict, and can issue ``read_pcrs`` / ``status`` calls to any
connected bridge. A restarted server finds the bridges again because they reconnect on their own.

A handler takes the :class:`~host_agent.vtpm.daemon_link.HookCall` and returns :class:`Allow`,
:class:`Veto` or :class:`Replace`. A handler that raises vetoes with the exception as the reason.

A veto is also written, as one line, to the stderr of the QEMU it concerns (before QEMU gets the
answer): libvirt keeps QEMU's stderr as the domain log (``<root>/log/qemu/<name>.log`` for the
embedded driver, virtlogd's file for a system libvirtd), and when an incoming QEMU exits during a
restore libvirt puts the tail of that log into the error it raises. So a plain ``virsh restore``
of a refused image says why, and which pages differ, like ``vtpm-host vm restore`` does.

Run standalone: ``python -m host_agent.vtpm.hooks_server --listen PATH [--veto-get REASON]
[--veto-set REASON]`` (allows everything otherwise; logs every hook).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import selectors
import signal
import socket
import stat
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evidence.errors import ParseError
from host_agent.errors import StateError
from host_agent.vtpm.bridge_errors import BridgeTransportError, LinkCallError
from host_agent.vtpm.bridge_link import LinkPeer
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

__all__ = [
    "Allow",
    "HookHandler",
    "HooksServer",
    "Replace",
    "Veto",
    "main",
    "note_in_qemu_log",
    "veto_log_line",
]

log = logging.getLogger("host_agent.vtpm.hooks_server")


@dataclass(frozen=True)
class Allow:
    pass


@dataclass(frozen=True)
class Veto:
    reason: str


@dataclass(frozen=True)
class Replace:
    blob: bytes
    state_flags: int | None = None


Decision = Allow | Veto | Replace
HookHandler = Callable[[HookCall], Decision]


def _allow(_call: HookCall) -> Decision:
    return Allow()


#: A veto line is kept short: libvirt quotes only the last 1024 bytes of the domain log.
VETO_LINE_MAX = 640


def veto_log_line(event: str, vm: str, reason: str, now: float | None = None) -> str:
    """The one line a veto leaves in QEMU's log, timestamped the way QEMU stamps its own lines.

    It must not look like a libvirt log message (libvirt filters those out of the tail it
    quotes), and it stays under :data:`VETO_LINE_MAX` bytes however long the reason is."""
    now = time.time() if now is None else now
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now))
    frac = f"{now % 1:.6f}"[1:]
    what = "save" if event == HookEvent.GET_STATEBLOB else "restore"
    text = " ".join(f"vtpm-trust: {what} of VM {vm} refused: {reason}".split())
    head = f"{stamp}{frac}Z "
    room = VETO_LINE_MAX - len(head) - 1
    if len(text.encode()) > room:
        text = text.encode()[: room - 3].decode(errors="ignore") + "..."
    return f"{head}{text}\n"


def note_in_qemu_log(pid: int, line: str) -> bool:
    """Append ``line`` to the stderr of process ``pid`` when that is a file or a pipe.

    Opens ``/proc/PID/fd/2`` anew with ``O_APPEND`` (a log file keeps QEMU's own writes intact,
    and a pipe to virtlogd takes the line as QEMU's output), non-blocking so a full pipe cannot
    stall the answer QEMU waits for. Anything else (a terminal, a socket, no such process) is
    left alone. Returns whether the line was written."""
    try:
        fd = os.open(f"/proc/{pid}/fd/2", os.O_WRONLY | os.O_APPEND | os.O_NOCTTY | os.O_NONBLOCK)
    except OSError as err:
        log.warning("hooks server: cannot open the stderr of QEMU %d: %s", pid, err)
        return False
    try:
        mode = os.fstat(fd).st_mode
        if not (stat.S_ISREG(mode) or stat.S_ISFIFO(mode)):
            return False
        data = line.encode()
        return os.write(fd, data) == len(data)
    except OSError as err:
        log.warning("hooks server: cannot write to the stderr of QEMU %d: %s", pid, err)
        return False
    finally:
        os.close(fd)


class _Bridge:
    def __init__(self, peer: LinkPeer) -> None:
        self.peer = peer
        self.hello: Hello | None = None
        self.calls: dict[int, Future[dict[str, Any]]] = {}


class HooksServer:
    """Listen on ``path`` for bridges. ``start()`` runs the loop on a thread; ``close()`` stops.

    Attributes:
        hook_calls: every hook call received, oldest first (for tests and logs).
    """

    def __init__(
        self,
        path: Path,
        *,
        on_get_stateblob: HookHandler = _allow,
        on_set_stateblob: HookHandler = _allow,
        on_report: Callable[[Report], None] | None = None,
    ) -> None:
        self.path = path
        self.on_get_stateblob = on_get_stateblob
        self.on_set_stateblob = on_set_stateblob
        self.on_report = on_report
        self.hook_calls: list[HookCall] = []
        self._sel = selectors.DefaultSelector()
        self._listener: socket.socket | None = None
        self._peers: list[_Bridge] = []
        self._by_uuid: dict[str, _Bridge] = {}
        self._changed = threading.Condition()
        self._posted: list[Callable[[], None]] = []
        self._wake_r, self._wake_w = socket.socketpair()
        self._stop = False
        self._thread: threading.Thread | None = None
        self._next_call = 0

    # -------------------------------------------------------------- lifecycle

    def start(self) -> HooksServer:
        if self._listener is not None:
            raise StateError("started", ["created"], f"hooks server {self.path}: start()")
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(str(self.path))
            os.chmod(self.path, 0o600)
            sock.listen(64)
        except OSError as err:
            sock.close()
            raise BridgeTransportError(f"hooks server {self.path}", str(err)) from err
        self._listener = sock
        self._sel.register(sock, selectors.EVENT_READ, self._accept)
        self._sel.register(self._wake_r, selectors.EVENT_READ, self._drain_wake)
        self._thread = threading.Thread(target=self._run, name="hooks-server", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self.start()
        assert self._thread is not None
        while self._thread.is_alive():
            self._thread.join(0.5)

    def close(self) -> None:
        self._stop = True
        self._wake()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(5)

    def __enter__(self) -> HooksServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -------------------------------------------------------------- queries

    def bridges(self) -> dict[str, Hello]:
        """Connected bridges by VM UUID."""
        with self._changed:
            return {u: b.hello for u, b in self._by_uuid.items() if b.hello is not None}

    def wait_for_bridge(self, vm_uuid: str, timeout: float = 10.0) -> Hello:
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                b = self._by_uuid.get(vm_uuid)
                if b is not None and b.hello is not None:
                    return b.hello
                left = deadline - time.monotonic()
                if left <= 0:
                    raise BridgeTransportError(
                        f"hooks server {self.path}", f"bridge {vm_uuid} did not connect"
                    )
                self._changed.wait(left)

    def call(self, vm_uuid: str, op: str, timeout: float = 30.0, **args: Any) -> dict[str, Any]:
        """Run ``op`` on the bridge of ``vm_uuid`` and return its value.

        Raises:
            BridgeTransportError: that bridge is not connected or the link broke.
            LinkCallError: the bridge answered with an error.
        """
        fut: Future[dict[str, Any]] = Future()

        def send() -> None:
            b = self._by_uuid.get(vm_uuid)
            if b is None:
                fut.set_exception(
                    BridgeTransportError(f"hooks server {self.path}", f"no bridge {vm_uuid}")
                )
                return
            self._next_call += 1
            b.calls[self._next_call] = fut
            if not b.peer.send(Call(self._next_call, op, dict(args))):
                self._drop(b)

        self._post(send)
        try:
            return fut.result(timeout)
        except TimeoutError as err:
            raise BridgeTransportError(f"bridge {vm_uuid}", f"no answer to {op}") from err

    def read_pcrs(
        self, vm_uuid: str, bank: str = "sha256", timeout: float = 30.0
    ) -> dict[int, bytes]:
        value = self.call(vm_uuid, "read_pcrs", timeout=timeout, bank=bank)
        return {int(k): bytes.fromhex(v) for k, v in value["pcrs"].items()}

    # -------------------------------------------------------------- loop

    def _post(self, fn: Callable[[], None]) -> None:
        with self._changed:
            self._posted.append(fn)
        self._wake()

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")

    def _drain_wake(self, _sock: socket.socket) -> None:
        with contextlib.suppress(OSError):
            self._wake_r.recv(4096)

    def _run(self) -> None:
        try:
            while not self._stop:
                for key, _ in self._sel.select(1.0):
                    key.data(key.fileobj)
                with self._changed:
                    posted, self._posted = self._posted, []
                for fn in posted:
                    fn()
        finally:
            for b in list(self._peers):
                self._drop(b)
            if self._listener is not None:
                self._listener.close()
                with contextlib.suppress(OSError):
                    self.path.unlink()
            self._sel.close()

    def _accept(self, listener: socket.socket) -> None:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        b = _Bridge(LinkPeer(conn, "bridge", "bridge"))
        self._peers.append(b)
        self._sel.register(conn, selectors.EVENT_READ, lambda _s: self._on_bridge(b))

    def _drop(self, b: _Bridge) -> None:
        with contextlib.suppress(KeyError, ValueError, OSError):
            self._sel.unregister(b.peer.sock)
        b.peer.close()
        if b in self._peers:
            self._peers.remove(b)
        with self._changed:
            if b.hello is not None and self._by_uuid.get(b.hello.vm_uuid) is b:
                del self._by_uuid[b.hello.vm_uuid]
            self._changed.notify_all()
        for fut in b.calls.values():
            if not fut.done():
                fut.set_exception(BridgeTransportError("bridge link", "connection lost"))

    def _on_bridge(self, b: _Bridge) -> None:
        try:
            msgs = b.peer.receive()
        except ParseError as err:
            log.warning("hooks server: malformed frame from a bridge: %s", err)
            self._drop(b)
            return
        if msgs is None:
            self._drop(b)
            return
        for msg in msgs:
            if isinstance(msg, Hello):
                with self._changed:
                    old = self._by_uuid.get(msg.vm_uuid)
                    b.hello = msg
                    self._by_uuid[msg.vm_uuid] = b
                    self._changed.notify_all()
                if old is not None and old is not b:
                    self._drop(old)
                log.info("hooks server: bridge %s (pid %d) connected", msg.vm_uuid, msg.pid)
            elif isinstance(msg, HookCall):
                self.hook_calls.append(msg)
                threading.Thread(
                    target=self._run_hook, args=(b, msg), name="hook", daemon=True
                ).start()
            elif isinstance(msg, Report):
                self._on_report(b, msg)
            elif isinstance(msg, Result):
                fut = b.calls.pop(msg.id, None)
                if fut is None or fut.done():
                    continue
                if msg.ok:
                    fut.set_result(msg.value)
                else:
                    fut.set_exception(LinkCallError(msg.error_id, msg.message))
            else:
                log.warning("hooks server: unexpected %s from a bridge", type(msg).__name__)

    def _on_report(self, b: _Bridge, report: Report) -> None:
        """A bridge's relay error counts, pushed (see ``daemon_link``): only for its own VM."""
        if b.hello is None or b.hello.vm_uuid != report.vm_uuid:
            said = "no hello" if b.hello is None else f"hello for {b.hello.vm_uuid}"
            log.warning(
                "hooks server: ignoring a report for VM %s from a bridge that sent %s",
                report.vm_uuid,
                said,
            )
            return
        if self.on_report is None:
            return
        try:
            self.on_report(report)
        except Exception:  # a bad handler must not stop the loop; logged
            log.exception("hooks server: report of bridge %s not taken", report.vm_uuid)

    def _run_hook(self, b: _Bridge, call: HookCall) -> None:
        handler = (
            self.on_get_stateblob
            if call.event == HookEvent.GET_STATEBLOB
            else self.on_set_stateblob
        )
        try:
            decision = handler(call)
        except Exception as err:  # a handler bug must still give QEMU an answer
            log.exception("hooks server: handler for %s failed", call.event)
            decision = Veto(f"hook handler failed: {err!r}")
        if isinstance(decision, Veto):
            reply = HookReply(call.id, Verdict.VETO, decision.reason or "vetoed")
            self._note_veto(b, call, reply.reason)
        elif isinstance(decision, Replace):
            reply = HookReply(
                call.id, Verdict.REPLACE, blob=decision.blob, state_flags=decision.state_flags
            )
        else:
            reply = HookReply(call.id, Verdict.ALLOW)
        log.info(
            "hooks server: %s %s type %d (%d bytes, sha256 %s…) → %s %s",
            call.vm_uuid,
            call.event,
            call.blob_type,
            call.length,
            call.sha256[:16],
            reply.verdict,
            reply.reason,
        )
        self._post(lambda: None if b.peer.closed else _send(b, reply))

    def _note_veto(self, b: _Bridge, call: HookCall, reason: str) -> None:
        """Leave the veto in QEMU's log (see the module docstring); never fails the hook."""
        name = b.hello.vm_name if b.hello is not None and b.hello.vm_name else call.vm_uuid
        try:
            status = self.call(call.vm_uuid, "status", timeout=5.0)
        except (BridgeTransportError, LinkCallError) as err:
            log.warning("hooks server: no QEMU pid for %s to log the veto: %s", call.vm_uuid, err)
            return
        pid = status.get("qemu_pid")
        if isinstance(pid, int) and pid > 0:
            note_in_qemu_log(pid, veto_log_line(call.event, name, reason))


def _send(b: _Bridge, reply: HookReply) -> None:
    b.peer.send(reply)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m host_agent.vtpm.hooks_server")
    p.add_argument("--listen", required=True, type=Path)
    p.add_argument("--veto-get", metavar="REASON", help="veto every GET_STATEBLOB")
    p.add_argument("--veto-set", metavar="REASON", help="veto every SET_STATEBLOB")
    p.add_argument("--log-level", default="INFO")
    args = p.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )

    def policy(reason: str | None) -> HookHandler:
        return (lambda _c: Veto(reason)) if reason else _allow

    server = HooksServer(
        args.listen,
        on_get_stateblob=policy(args.veto_get),
        on_set_stateblob=policy(args.veto_set),
    )
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda _n, _f: server.close())
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
