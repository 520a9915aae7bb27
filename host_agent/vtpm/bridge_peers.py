"""The bridge's link peers: the daemon connection it keeps and the query clients it accepts.

The bridge reconnects to the daemon socket on its own (``reconnect_interval``), so a restarted
daemon finds every running bridge; on connecting it says hello, reports its relay error counts
and sends the state-blob hooks still waiting. The daemon sends hook verdicts and calls; a query
client (``vtpm-host vm pcrs``, on the bridge's query socket) sends calls only. A call that
blocks (``read_pcrs``) runs on a reused call thread, its result posted back to the loop.

:class:`LinkPeers` is a helper of :class:`~host_agent.vtpm.bridge.Bridge` with explicit
collaborators: the loop's poller and ``post``, the state-blob hooks, and the target of calls
(:class:`CallTarget`, the bridge itself). Everything but the call threads runs on the loop thread.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import selectors
import socket
import threading
from collections.abc import Callable
from typing import Any, Protocol

from evidence.errors import ParseError, VtpmError
from host_agent.vtpm.bridge_hooks import StateBlobHooks
from host_agent.vtpm.bridge_link import BridgeRecord, LinkPeer
from host_agent.vtpm.bridge_state import BridgeConfig, BridgeStats, Poller
from host_agent.vtpm.daemon_link import Call, Hello, HookReply, Report, Result

__all__ = ["CallTarget", "LinkPeers"]

log = logging.getLogger("host_agent.vtpm.bridge")


class CallTarget(Protocol):
    """What link calls are answered from (the bridge)."""

    def status(self) -> dict[str, Any]: ...

    def read_pcrs(
        self, bank: str = "sha256", *, timeout: float | None = None
    ) -> dict[int, bytes]: ...


class LinkPeers:
    """The daemon peer (``daemon``, None while disconnected) and the query clients.

    Args:
        config, stats, clock: the bridge's.
        instance: the bridge instance id, sent with relay error reports.
        poller: the loop's poller; peers register their sockets there.
        post: run a function on the loop thread (from a call thread).
        hooks: the pending state-blob hooks (sent on connect, given their verdicts).
        target: answers ``status`` and ``read_pcrs`` calls.
        record: this bridge's registry record (for the hello).
    """

    def __init__(
        self,
        config: BridgeConfig,
        stats: BridgeStats,
        clock: Callable[[], float],
        *,
        instance: str,
        poller: Poller,
        post: Callable[[Callable[[], None]], None],
        hooks: StateBlobHooks,
        target: CallTarget,
        record: Callable[[], BridgeRecord],
    ) -> None:
        self.config = config
        self.stats = stats
        self.clock = clock
        self.instance = instance
        self._sel = poller
        self._post = post
        self._hooks = hooks
        self._target = target
        self._record = record
        self.daemon: LinkPeer | None = None
        #: When the next connection attempt to the daemon is due (loop clock).
        self.daemon_next_try = 0.0
        self._daemon_ever = False
        self._queries: list[LinkPeer] = []
        self._lock = threading.Lock()
        # link calls that block (read_pcrs) run on reused daemon threads, one per call in flight
        self._call_work: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._call_idle = 0

    def tick(self) -> None:
        """Connect to the daemon if a connection is configured, missing and due."""
        path = self.config.daemon_socket
        if path is None or self.daemon is not None or self.clock() < self.daemon_next_try:
            return
        self.daemon_next_try = self.clock() + self.config.reconnect_interval
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
        self.daemon = peer
        self._sel.register(sock, selectors.EVENT_READ, lambda _s: self._on_peer(peer))
        log.info(
            "bridge %s: connected to daemon %s%s",
            self.config.vm_uuid,
            path,
            " (again)" if self._daemon_ever else "",
        )
        self._daemon_ever = True
        if self.stats.relay_errors:
            self.report()  # a restarted daemon learns this instance's counts at once
        self._hooks.send_all(peer)

    def report(self) -> None:
        """Send the daemon this bridge's relay error counts (cleared as unreported if sent)."""
        peer = self.daemon
        if peer is None:
            return
        report = Report(self.config.vm_uuid, self.instance, dict(self.stats.relay_errors))
        if peer.send(report):
            self.stats.relay_errors_unreported = False
        else:
            self._drop_peer(peer, "report not sent")

    def close(self) -> None:
        """Close the daemon connection and every query client (the bridge is stopping)."""
        for peer in [self.daemon, *self._queries]:
            if peer is not None:
                peer.close()
        self.daemon = None
        self._queries.clear()

    def on_accept_query(self, listener: socket.socket) -> None:
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
        if peer is self.daemon:
            self.daemon = None
            self.daemon_next_try = self.clock() + self.config.reconnect_interval
            self._hooks.mark_unsent()
            log.warning("bridge %s: daemon link lost (%s)", self.config.vm_uuid, why)
        elif peer in self._queries:
            self._queries.remove(peer)

    def _on_peer(self, peer: LinkPeer) -> None:
        try:
            msgs = peer.receive()
        except ParseError as err:
            if peer is self.daemon:
                self.stats.relay_error("daemon_malformed")
            self._drop_peer(peer, f"malformed frame: {err}")
            return
        if msgs is None:
            self._drop_peer(peer, "closed")
            return
        for msg in msgs:
            if isinstance(msg, HookReply) and peer.kind == "daemon":
                self._hooks.verdict(msg)
            elif isinstance(msg, Call):
                self._on_call(peer, msg)
            else:
                if peer is self.daemon:
                    self.stats.relay_error("daemon_malformed")
                self._drop_peer(peer, f"unexpected {type(msg).__name__}")
                return

    def _on_call(self, peer: LinkPeer, call: Call) -> None:
        if call.op == "status":
            peer.send(Result(call.id, True, self._target.status()))
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
                pcrs = self._target.read_pcrs(
                    str(bank), timeout=float(timeout) if timeout else None
                )
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
