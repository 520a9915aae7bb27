"""The bridge's data-channel relay and its injection scheduler (the relay's hot path).

After CMD_SET_DATAFD, TPM packets are relayed between QEMU's data fd and swtpm's, byte for byte,
one ``recv`` + one ``send`` per packet. Injected TPM commands (:meth:`DataRelay.transact`,
:meth:`DataRelay.read_pcrs`) go out only at idle moments: no guest command in flight or partly
received. While an injected command is in flight, guest commands are held and forwarded in order
after its response; responses are routed by who sent the command, so the guest never sees an
injected response. State-changing injections are refused from the first GET_STATEBLOB until the
guest sends a command again or the TPM is re-initialised.

:class:`DataRelay` is a mixin of :class:`~host_agent.vtpm.bridge.Bridge`, not a helper object:
the relay shares the QEMU session, the injection queue, the pending hooks, the poller and the
counters with the control channel and the loop, and its handlers (``_on_guest_data``,
``_on_tpm_data``) are latency-critical, so they read that state straight off the bridge with no
extra call or attribute hop. The attributes it relies on are declared below.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import TYPE_CHECKING

from evidence.errors import ParseError
from host_agent.errors import StateError
from host_agent.vtpm import ctrl_codec as cc
from host_agent.vtpm.bridge_errors import InjectionError, InjectionRefused
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

__all__ = ["DataRelay"]

log = logging.getLogger("host_agent.vtpm.bridge")


class DataRelay:
    """The data relay and injection scheduler of :class:`~host_agent.vtpm.bridge.Bridge`."""

    # set by Bridge.__init__
    config: BridgeConfig
    clock: Callable[[], float]
    stats: BridgeStats
    run_state: BridgeRunState
    _sel: Poller
    _session: Session | None
    _injections: collections.deque[Injection]
    _hooks: dict[int, PendingHook]
    _thread: threading.Thread | None

    if TYPE_CHECKING:

        def _post(self, fn: Callable[[], None]) -> None: ...

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
