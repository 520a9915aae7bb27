"""The peer channel: mutual TLS between two admitted hosts, carrying protocol frames.

Trust: the fleet CA (``<state>/identity/ca.pem``) is the only trust anchor (no system CAs);
each side presents its mTLS certificate and key from ``<state>/identity`` (issued at admission).
A peer's identity is its certificate's host id (subject CN); host names and addresses are not
checked (hosts are reached by address, e.g. over the test namespaces' veth pair), so the client
compares the server's host id with the one it meant to reach, and the server hands the client's
host id to the protocol, which checks it against the AIK certificate in CertExgKey.

:class:`MtlsPeerChannel` is the one adapter of the :class:`PeerChannel` port; ``OSError`` and
``ssl.SSLError`` are wrapped once here as :class:`PeerUnavailable`.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

from cryptography import x509
from cryptography.x509.oid import NameOID

from .codec import FrameDecoder, encode_frame
from .errors import PeerAborted, PeerProtocolError, PeerUnavailable
from .protocol import ErrorMessage, Message, parse_message

__all__ = [
    "MtlsListener",
    "MtlsPeerChannel",
    "PeerChannel",
    "TlsIdentity",
    "parse_address",
]

M = TypeVar("M")


def parse_address(text: str, default_port: int) -> tuple[str, int]:
    """``HOST``, ``HOST:PORT`` or ``[V6]:PORT`` → (host, port)."""
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") else default_port
    if text.count(":") == 1:
        host, _, port = text.partition(":")
        return host, int(port)
    return text, default_port


@dataclass(frozen=True)
class TlsIdentity:
    """This host's mTLS identity and the fleet CA (paths, as admission stores them)."""

    certificate: Path
    key: Path
    ca: Path

    @classmethod
    def under(cls, state_dir: Path) -> TlsIdentity:
        d = Path(state_dir) / "identity"
        return cls(d / "tls.pem", d / "tls-key.pem", d / "ca.pem")

    def _context(self, purpose: ssl.Purpose) -> ssl.SSLContext:
        server = purpose is ssl.Purpose.CLIENT_AUTH
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.check_hostname = False  # identity = the certificate's host id, checked by callers
        ctx.verify_mode = ssl.CERT_REQUIRED
        try:
            ctx.load_verify_locations(cafile=str(self.ca))
            ctx.load_cert_chain(str(self.certificate), str(self.key))
        except (OSError, ssl.SSLError) as err:
            raise PeerUnavailable(
                f"cannot load this host's mTLS identity ({self.certificate}, {self.ca}): {err} "
                "(run `vtpm-host init`)"
            ) from err
        return ctx

    def host_id(self) -> str:
        """This host's id: the CN of its mTLS certificate (what peers authenticate)."""
        try:
            cert = x509.load_pem_x509_certificate(self.certificate.read_bytes())
        except (OSError, ValueError) as err:
            raise PeerUnavailable(f"cannot read {self.certificate}: {err}") from err
        names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        return str(names[0].value) if names else ""

    def client_context(self) -> ssl.SSLContext:
        return self._context(ssl.Purpose.SERVER_AUTH)

    def server_context(self) -> ssl.SSLContext:
        return self._context(ssl.Purpose.CLIENT_AUTH)


def _host_id(sock: ssl.SSLSocket) -> str:
    der = sock.getpeercert(binary_form=True)
    if der is None:
        raise PeerUnavailable("the peer presented no certificate")
    names = x509.load_der_x509_certificate(der).subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else ""


class PeerChannel(Protocol):
    """One protocol connection to an authenticated peer."""

    @property
    def peer_id(self) -> str: ...

    def send(self, message: Message) -> None: ...

    def receive(self, timeout: float | None = None) -> Message: ...

    def close(self) -> None: ...


class MtlsPeerChannel:
    """Frames over one TLS connection (see the module docstring)."""

    def __init__(self, sock: ssl.SSLSocket, peer_id: str, *, timeout: float = 60.0) -> None:
        self._sock = sock
        self._peer_id = peer_id
        self._decoder = FrameDecoder()
        self.timeout = timeout

    @classmethod
    def connect(
        cls,
        identity: TlsIdentity,
        address: tuple[str, int],
        expected_host: str,
        *,
        timeout: float = 60.0,
    ) -> MtlsPeerChannel:
        """Connect, handshake, and check the server is ``expected_host``.

        Raises:
            PeerUnavailable: connect or handshake failed, or the server is another host.
        """
        ctx = identity.client_context()
        try:
            raw = socket.create_connection(address, timeout=timeout)
        except OSError as err:
            raise PeerUnavailable(f"cannot connect to {expected_host} at {address}: {err}") from err
        try:
            sock = ctx.wrap_socket(raw)
        except (OSError, ssl.SSLError) as err:
            raw.close()
            raise PeerUnavailable(f"TLS with {expected_host} at {address} failed: {err}") from err
        peer = _host_id(sock)
        if peer != expected_host:
            sock.close()
            raise PeerUnavailable(
                f"the host at {address} is {peer!r}, not {expected_host!r} (its fleet certificate "
                "names another host)"
            )
        return cls(sock, peer, timeout=timeout)

    @property
    def peer_id(self) -> str:
        return self._peer_id

    @property
    def peer_host(self) -> str:
        """The peer's IP address as this connection sees it."""
        try:
            return str(self._sock.getpeername()[0])
        except OSError:
            return ""

    def send(self, message: Message) -> None:
        try:
            self._sock.sendall(encode_frame(message.to_frame()))
        except (OSError, ssl.SSLError) as err:
            raise PeerUnavailable(f"sending to {self._peer_id} failed: {err}") from err

    def receive(self, timeout: float | None = None) -> Message:
        """The next message; an ``Error`` from the peer raises :class:`PeerAborted`.

        Raises:
            PeerUnavailable: the connection closed or timed out.
            FrameError: the peer sent a malformed frame.
            PeerAborted: the peer sent an error frame.
        """
        self._sock.settimeout(self.timeout if timeout is None else timeout)
        while (frame := self._decoder.next_frame()) is None:
            try:
                data = self._sock.recv(65536)
            except (OSError, ssl.SSLError) as err:
                raise PeerUnavailable(f"receiving from {self._peer_id} failed: {err}") from err
            if not data:
                raise PeerUnavailable(f"{self._peer_id} closed the connection")
            self._decoder.feed(data)
        message = parse_message(frame)
        if isinstance(message, ErrorMessage):
            raise PeerAborted(message.id, message.message)
        return message

    def expect(self, kind: type[M], timeout: float | None = None) -> M:
        """:meth:`receive` one message of type ``kind``.

        Raises:
            PeerProtocolError: another message type arrived.
        """
        message = self.receive(timeout)
        if not isinstance(message, kind):
            raise PeerProtocolError(
                f"{self._peer_id} sent {type(message).__name__}, expected {kind.__name__}"
            )
        return message

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.close()


class MtlsListener:
    """Accepts mTLS connections from admitted hosts; each becomes a :class:`MtlsPeerChannel`.

    Args:
        identity: this host's identity.
        address: where to listen (port 0 picks one, see :attr:`address`).
    """

    def __init__(self, identity: TlsIdentity, address: tuple[str, int]) -> None:
        self._ctx = identity.server_context()
        try:
            self._sock = socket.create_server(address, reuse_port=False)
        except OSError as err:
            raise PeerUnavailable(f"cannot listen on {address}: {err}") from err

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._sock.getsockname()[:2]
        return str(host), int(port)

    def serve(self, handle: Callable[[MtlsPeerChannel], None], *, timeout: float = 60.0) -> None:
        """Accept until :meth:`close`; each connection is handshaken and handed to ``handle`` on
        its own thread (a failed handshake is dropped)."""
        import threading

        while True:
            try:
                raw, _ = self._sock.accept()
            except OSError:
                return

            def run(raw: socket.socket = raw) -> None:
                raw.settimeout(timeout)
                try:
                    sock = self._ctx.wrap_socket(raw, server_side=True)
                    channel = MtlsPeerChannel(sock, _host_id(sock), timeout=timeout)
                except (OSError, ssl.SSLError, PeerUnavailable):
                    raw.close()
                    return
                try:
                    handle(channel)
                finally:
                    channel.close()

            threading.Thread(target=run, name="migration-peer", daemon=True).start()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            self._sock.close()
