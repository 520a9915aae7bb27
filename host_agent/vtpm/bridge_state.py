"""State of a bridge, kept apart from its event loop (:mod:`host_agent.vtpm.bridge`).

- :class:`BridgeConfig`: what one bridge serves and its bounds;
- :class:`BridgeRunState`, :class:`BridgeStats`: lifecycle and counters;
- :class:`Session`: one QEMU connection (control decoders, run state, data-channel framers, held
  guest commands, what is in flight); :class:`Injection`, :class:`PendingHook`;
- :class:`Poller`: the few ``selectors`` calls the loop needs, on ``select.epoll`` directly.
"""

from __future__ import annotations

import collections
import contextlib
import enum
import os
import select
import socket
import struct
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from host_agent.vtpm import ctrl_codec as cc
from host_agent.vtpm.daemon_link import HookCall, HookReply

__all__ = [
    "RELAY_ERROR_KINDS",
    "BridgeConfig",
    "BridgeRunState",
    "BridgeStats",
    "Injection",
    "PendingHook",
    "Poller",
    "Session",
]


@dataclass(frozen=True)
class BridgeConfig:
    """What one bridge serves.

    Attributes:
        vm_uuid: the VM's UUID (in hook calls and the registry).
        listen: the VM's control socket; QEMU connects here.
        swtpm_ctrl: swtpm's ``--ctrl type=unixio`` socket.
        daemon_socket: the daemon's link socket; the bridge keeps (re)connecting to it.
        runtime_dir: where the bridge registers itself (``<uuid>.json``) and its query socket
            (``<uuid>.sock``); None: no registry, no query socket.
        vm_name: the VM's name, for ``vtpm-host vm pcrs NAME``.
        hook_timeout: seconds a state-transfer hook waits for the daemon's verdict (QEMU is
            blocked meanwhile); then the transfer is vetoed.
        reconnect_interval: seconds between attempts to reach the daemon.
        swtpm_connect_timeout: seconds to wait for swtpm's control socket when QEMU connects.
        injection_timeout: default seconds an injected command may wait and run.
        response_spin: seconds to busy-poll for swtpm's response to a guest command before
            sleeping in epoll (0 = never spin). Trades CPU for one wake-up per command.
        listen_mode, listen_uid, listen_gid: owner and mode of ``listen`` (QEMU under system
            libvirtd runs as ``libvirt-qemu``).
        allow_unhooked_state_transfer: with no ``daemon_socket``, let state transfers pass
            without any hook (tests, benchmarks). Off: a bridge without a daemon refuses them.
        exit_when_qemu_leaves: stop after the first QEMU session instead of waiting for the next.
    """

    vm_uuid: str
    listen: Path
    swtpm_ctrl: Path
    daemon_socket: Path | None = None
    runtime_dir: Path | None = None
    vm_name: str = ""
    hook_timeout: float = 10.0
    reconnect_interval: float = 0.2
    swtpm_connect_timeout: float = 5.0
    injection_timeout: float = 30.0
    response_spin: float = 0.0
    listen_mode: int = 0o600
    listen_uid: int | None = None
    listen_gid: int | None = None
    allow_unhooked_state_transfer: bool = False
    exit_when_qemu_leaves: bool = False

    def __post_init__(self) -> None:
        if not self.vm_uuid:
            raise ValueError("BridgeConfig.vm_uuid is required")
        if self.hook_timeout <= 0 or self.reconnect_interval <= 0:
            raise ValueError("hook_timeout and reconnect_interval must be positive")


class BridgeRunState(enum.Enum):
    CREATED = "created"
    LISTENING = "listening"  # no QEMU attached
    ATTACHED = "attached"  # a QEMU session is active
    CLOSED = "closed"


#: Kinds of relay errors a bridge counts (``BridgeStats.relay_errors``; the daemon exports
#: them as ``vtpm_bridge_relay_errors_total{vm,kind}``). Normal ends are not errors: QEMU closing
#: its sockets, swtpm exiting after CMD_SHUTDOWN or after its data channel was closed.
RELAY_ERROR_KINDS: dict[str, str] = {
    "swtpm_connect": "QEMU attached but swtpm's control socket could not be reached or probed",
    "swtpm_gone": "swtpm closed its control or data channel while QEMU was using it",
    "swtpm_io": "a read or write towards swtpm failed",
    "swtpm_malformed": "swtpm sent a control reply or TPM response that cannot be framed",
    "qemu_io": "a read or write towards QEMU failed",
    "qemu_malformed": "QEMU sent a control request or TPM command that cannot be framed",
    "injection_failed": "a TPM command the bridge injected failed or got no answer",
    "daemon_malformed": "the daemon link carried a malformed or unexpected frame",
}


@dataclass
class BridgeStats:
    """Counters a test or the daemon's status call can read (the loop thread writes them)."""

    sessions: int = 0
    ctrl_commands: collections.Counter[str] = field(default_factory=collections.Counter)
    guest_commands: int = 0
    injected_commands: int = 0
    injections_failed: int = 0
    held_guest_commands: int = 0
    max_injection_wait: float = 0.0
    max_guest_hold: float = 0.0
    hooks: int = 0
    vetoes: list[str] = field(default_factory=list)
    relay_errors: collections.Counter[str] = field(default_factory=collections.Counter)
    #: Set by :meth:`relay_error`, cleared once the bridge reported the counts to the daemon.
    relay_errors_unreported: bool = False

    def relay_error(self, kind: str) -> None:
        """Count one relay error of ``kind`` (a key of :data:`RELAY_ERROR_KINDS`)."""
        if kind not in RELAY_ERROR_KINDS:
            raise ValueError(f"relay error kind must be one of {sorted(RELAY_ERROR_KINDS)}")
        self.relay_errors[kind] += 1
        self.relay_errors_unreported = True

    def as_dict(self) -> dict[str, Any]:
        return {
            "sessions": self.sessions,
            "ctrl_commands": dict(self.ctrl_commands),
            "guest_commands": self.guest_commands,
            "injected_commands": self.injected_commands,
            "injections_failed": self.injections_failed,
            "held_guest_commands": self.held_guest_commands,
            "max_injection_wait_ms": round(self.max_injection_wait * 1000, 3),
            "max_guest_hold_ms": round(self.max_guest_hold * 1000, 3),
            "hooks": self.hooks,
            "vetoes": list(self.vetoes),
            "relay_errors": dict(self.relay_errors),
        }


@dataclass
class Injection:
    packet: bytes
    future: Future[bytes]
    queued_at: float
    deadline: float
    sent_at: float | None = None


@dataclass
class PendingHook:
    call: HookCall
    deadline: float
    done: Callable[[HookReply], None]
    sent: bool = False


class Poller:
    """The few ``selectors`` calls the loop needs, on ``select.epoll`` directly: the relay's hot
    path pays one ``epoll.poll`` per wake-up and no per-event key objects."""

    def __init__(self) -> None:
        self._ep = select.epoll()
        self._handlers: dict[int, tuple[socket.socket, Callable[[socket.socket], None]]] = {}

    def register(
        self, sock: socket.socket, _events: int, handler: Callable[[socket.socket], None]
    ) -> None:
        fd = sock.fileno()
        self._ep.register(fd, select.EPOLLIN)
        self._handlers[fd] = (sock, handler)

    def unregister(self, sock: socket.socket) -> None:
        fd = sock.fileno()
        if fd < 0 or fd not in self._handlers:
            raise KeyError(sock)
        del self._handlers[fd]
        self._ep.unregister(fd)

    def poll(self, timeout: float) -> list[tuple[socket.socket, Callable[[socket.socket], None]]]:
        out = []
        for fd, _ev in self._ep.poll(timeout):
            entry = self._handlers.get(fd)
            if entry is not None:
                out.append(entry)
        return out

    def close(self) -> None:
        self._ep.close()


class Session:
    """One QEMU connection and everything that hangs off it."""

    def __init__(self, qemu: socket.socket, swtpm: socket.socket, running: bool) -> None:
        self.qemu = qemu
        self.swtpm = swtpm
        self.requests = cc.RequestDecoder()
        self.replies = cc.ReplyDecoder()
        self.state = cc.TpmRunState(cc.RunState.RUNNING if running else cc.RunState.STOPPED)
        self.passed_fds: list[int] = []
        self.pending: cc.Request | None = None  # forwarded to swtpm, reply outstanding
        self.busy = False  # a request is being handled (forwarded or hooked)
        self.on_reply: Callable[[cc.Request, cc.Reply], None] | None = None
        # data channel
        self.guest: socket.socket | None = None  # QEMU's socketpair end (the fd it passed)
        self.tpm: socket.socket | None = None  # our socketpair end towards swtpm
        self.guest_framer = cc.TpmPacketFramer(what="guest TPM command")
        self.tpm_framer = cc.TpmPacketFramer(what="swtpm TPM response")
        self.held: collections.deque[tuple[bytes, float]] = collections.deque()
        self.in_flight: str | Injection | None = None  # "guest" or an injection
        self.frozen = False  # state-changing injections refused (GET_STATEBLOB seen)
        self.data_closed = False  # the data channel was set up and has been closed since
        self.qemu_pid = _peer_pid(qemu)  # whose guest RAM the daemon hashes at a state transfer

    def close(self) -> None:
        for fd in self.passed_fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.passed_fds.clear()
        for sock in (self.qemu, self.swtpm, self.guest, self.tpm):
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.close()


def _peer_pid(sock: socket.socket) -> int | None:
    """The pid of the process on the other end of a unix socket (SO_PEERCRED), if known."""
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None
    pid = int(struct.unpack("3i", creds)[0])
    return pid if pid > 0 else None
