"""The guest attestation channel: each VM's virtio-serial socket, served by the daemon.

Theory of operation
-------------------
libvirt's ``<channel type='unix'><source mode='bind' path=P/>`` makes QEMU *listen* on ``P`` (as
``-chardev socket,server=on,wait=off`` does in the tests), so the daemon is the client: it
connects to every VM's channel socket and keeps reconnecting (QEMU not started yet, restarted,
restored). The guest agent (``vtpm-guest quote``) writes a request frame on its port; the daemon
answers on the same connection with the vAIK signature over the canonical vPCR message
(:mod:`evidence.attestation`: VM UUID, nonce, the vPCRs read through the VM's bridge),
CertAuthKey and CertvAIK over ``SHA-256(cert_user ‖ nonce)``, the AIK certificate chain, both
keys' TPMT_PUBLIC and cert_user — every field already in the evidence bundle's encoding, so the
guest only copies them (protocol in ``guest_agent/quote.py``).

The VM UUID is never taken from the guest: it is the UUID of the channel socket the request
arrived on. The guest is untrusted: frames are bounded (:data:`MAX_FRAME`), malformed ones drop
the connection (the daemon reconnects), and each VM has at most :data:`MAX_PENDING` requests in
flight. A VM without an active binding (not enrolled, or rebooted since the tenant last
authenticated, see :mod:`host_agent.service.enroll`) gets a refusal with a stable error id.

Layers: the frame codec (pure, duplicated in ``guest_agent/channel.py`` and tested against the
same vectors), :class:`Attestor` (TPM + bridge work for one request, no sockets) and
:class:`GuestChannelService` (one selector thread for all VMs' sockets, a small worker pool).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import selectors
import socket
import struct
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Final, Protocol

from evidence.attestation import AttestationMessage, encode_attestation_message
from evidence.errors import ParseError, VtpmError
from evidence.tpm2_policy import PolicyApproval
from host_agent.tpm.port import Attestation, HostTpm, WrappedKey

__all__ = [
    "MAX_FRAME",
    "MAX_PENDING",
    "ActiveBinding",
    "AttestConfigError",
    "AttestRefused",
    "AttestService",
    "Attestor",
    "BindingSource",
    "FrameDecoder",
    "GuestChannelService",
    "PcrReader",
    "QuoteRequest",
    "encode_frame",
    "parse_quote_request",
    "quote_answer",
    "refusal",
]

log = logging.getLogger("host_agent.service.attest")

MAX_FRAME: Final = 1 << 20
"""Largest frame either side accepts (a request is ~150 bytes, an answer ~6 KiB)."""
MAX_PENDING: Final = 4
"""Requests one VM may have in flight; more are refused (``attest.busy``)."""
SEND_TIMEOUT: Final = 2.0
"""Seconds an answer may take to leave; a guest that does not read is disconnected."""
PROTOCOL_VERSION: Final = 1
SHA256: Final = 0x000B
_LEN: Final = struct.Struct(">I")


# --------------------------------------------------------------------------------------------
# Frame codec (pure; the guest's copy is guest_agent/channel.py)


def encode_frame(obj: Mapping[str, Any]) -> bytes:
    """``u32 length (BE) ‖ canonical JSON object``."""
    body = json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
    if len(body) > MAX_FRAME:
        raise ValueError(f"frame of {len(body)} bytes exceeds {MAX_FRAME}")
    return _LEN.pack(len(body)) + body


class FrameDecoder:
    """Feed bytes, take whole frames.

    Raises (from :meth:`next_frame`):
        ParseError: a length outside 2..MAX_FRAME, a body that is not a UTF-8 JSON object.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._offset = 0  # stream offset of _buf[0], for error messages

    def feed(self, data: bytes) -> None:
        self._buf += data

    def next_frame(self) -> dict[str, Any] | None:
        if len(self._buf) < 4:
            return None
        (size,) = _LEN.unpack_from(self._buf)
        if not 2 <= size <= MAX_FRAME:
            raise ParseError("guest frame.length", self._offset, f"2..{MAX_FRAME}", str(size))
        if len(self._buf) < 4 + size:
            return None
        body = bytes(self._buf[4 : 4 + size])
        del self._buf[: 4 + size]
        offset, self._offset = self._offset + 4, self._offset + 4 + size
        try:
            obj = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as err:
            raise ParseError("guest frame.body", offset, "UTF-8 JSON", str(err)) from err
        if not isinstance(obj, dict):
            raise ParseError("guest frame.body", offset, "a JSON object", type(obj).__name__)
        return obj


@dataclass(frozen=True)
class QuoteRequest:
    """A guest's request: its correlation id and the verifier's nonce (16..64 bytes)."""

    id: str
    nonce: bytes


def parse_quote_request(obj: Mapping[str, Any]) -> QuoteRequest:
    """Check a request frame strictly (protocol in ``guest_agent/quote.py``).

    Raises:
        ParseError: another type or version, unknown fields, a bad id or nonce.
    """
    fields = {"type", "version", "id", "nonce"}
    if set(obj) != fields:
        raise ParseError("quote request", 0, f"fields {sorted(fields)}", str(sorted(obj)))
    if obj["type"] != "quote" or obj["version"] != PROTOCOL_VERSION:
        got = f"{obj['type']!r} v{obj['version']!r}"
        raise ParseError("quote request.type", 0, f"'quote' v{PROTOCOL_VERSION}", got)
    rid = obj["id"]
    if not isinstance(rid, str) or not 1 <= len(rid) <= 64 or not rid.isascii():
        raise ParseError("quote request.id", 0, "1..64 ASCII characters", repr(rid)[:80])
    raw = obj["nonce"]
    try:
        nonce = base64.b64decode(raw, validate=True) if isinstance(raw, str) else b""
    except ValueError:
        nonce = b""
    if not 16 <= len(nonce) <= 64 or base64.b64encode(nonce).decode() != raw:
        raise ParseError("quote request.nonce", 0, "canonical base64 of 16..64 bytes", "other")
    return QuoteRequest(rid, nonce)


def quote_answer(request_id: str, evidence: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "type": "quote",
        "version": PROTOCOL_VERSION,
        "id": request_id,
        "ok": True,
        "evidence": dict(evidence),
    }


def refusal(request_id: str, error_id: str, message: str) -> dict[str, Any]:
    return {
        "type": "quote",
        "version": PROTOCOL_VERSION,
        "id": request_id,
        "ok": False,
        "error": {"id": error_id, "message": message},
    }


# --------------------------------------------------------------------------------------------
# Ports and the attestation itself


class AttestRefused(VtpmError):
    """The host will not attest this VM now (no binding, a reboot since enrollment, …).

    ``id`` is what the guest and the tenant see (``attest.not_enrolled``, …).
    """

    id: ClassVar[str] = "attest.refused"

    def __init__(self, message: str, error_id: str = "attest.refused") -> None:
        super().__init__(message)
        self.error_id = error_id


class AttestConfigError(VtpmError):
    """The attestation component lacks a file it needs (identity, fleet key) or one is bad."""

    id: ClassVar[str] = "attest.config"


@dataclass(frozen=True)
class ActiveBinding:
    """What attesting one VM needs from its enrollment: the vAIK and the tenant certificate."""

    vm_uuid: uuid.UUID
    vaik: WrappedKey
    cert_user: bytes
    generation: int


class BindingSource(Protocol):
    """The enrollment side (:class:`host_agent.service.enroll.EnrollmentService`)."""

    def active_binding(self, vm_uuid: uuid.UUID) -> ActiveBinding:
        """The binding to attest with now (the store's record, and the VM's bridge confirms the
        vTPM has not been reset since).

        Raises:
            AttestRefused: none (``attest.not_enrolled``) or not now (``attest.reauth_required``).
        """
        ...

    def stored_binding(self, vm_uuid: uuid.UUID) -> ActiveBinding:
        """The binding as the store holds it, without asking the bridge: enough to start the
        TPM's work, never enough to sign (:meth:`active_binding` must confirm it after the vPCRs
        were read).

        Raises:
            AttestRefused: as :meth:`active_binding`, for what the store alone shows.
        """
        ...


class PcrReader(Protocol):
    """Reads a running VM's vPCRs through its bridge (``HooksServer`` satisfies it)."""

    def read_pcrs(
        self, vm_uuid: str, bank: str = "sha256", timeout: float = 30.0
    ) -> dict[int, bytes]: ...


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


class _BindingChanged(Exception):
    """The binding an attestation started with is not the VM's binding any more."""

    def __init__(self, binding: ActiveBinding) -> None:
        super().__init__(f"the binding of VM {binding.vm_uuid} changed")
        self.binding = binding


class Attestor:
    """Answers one quote request: vPCRs through the bridge, signature and certificates by the TPM.

    Args:
        tpm: the host TPM (AIK and AuthKey exist).
        pcrs: reads the VM's vPCRs.
        bindings: the enrollment side.
        approval: the fleet's current approval of this host's platform state for vAIK signing
            (``PolicyApproval`` from the registrar); called per request, so cache it there.
        aik_certificates: DER, the AIK certificate first.
        pcr_timeout: seconds to wait for the bridge.
    """

    def __init__(
        self,
        tpm: HostTpm,
        pcrs: PcrReader,
        bindings: BindingSource,
        approval: Callable[[], PolicyApproval],
        aik_certificates: Sequence[bytes],
        *,
        pcr_timeout: float = 5.0,
    ) -> None:
        if not aik_certificates:
            raise ValueError("aik_certificates must hold the AIK certificate")
        self.tpm = tpm
        self.pcrs = pcrs
        self.bindings = bindings
        self.approval = approval
        self.aik_certificates = [_b64(bytes(c)) for c in aik_certificates]
        self.pcr_timeout = pcr_timeout
        self._authkey_public = _b64(tpm.host_key_public("authkey"))
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="attest-pcr")
        self._last: dict[uuid.UUID, ActiveBinding] = {}  # per VM, confirmed at every use

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def quote(self, vm_uuid: uuid.UUID, nonce: bytes) -> dict[str, Any]:
        """The ``evidence`` object of an answer (bundle fields, base64).

        Raises:
            AttestRefused: no active binding; the bridge could not read the vPCRs.
            VtpmError: the TPM refused (e.g. the host's platform state is not approved).
        """
        if not isinstance(nonce, bytes) or not 16 <= len(nonce) <= 64:
            raise ValueError("nonce must be 16..64 bytes")
        approval = self.approval()
        # The binding this VM was last attested with (or the store's) is enough to start: the
        # certifications sign nothing the VM said, and nothing is signed before the binding is
        # confirmed as it is now (store and bridge) after the vPCRs were read.
        binding = self._last.get(vm_uuid) or self.bindings.stored_binding(vm_uuid)
        for attempt in (1, 2):
            try:
                done = self._attest(vm_uuid, nonce, binding, approval)
            except _BindingChanged as changed:  # enrolled again since: start over with it
                self._last[vm_uuid] = binding = changed.binding
                if attempt == 2:
                    raise AttestRefused(
                        f"VM {vm_uuid} was enrolled again meanwhile", "attest.retry"
                    ) from None
                continue
            except AttestRefused:
                self._last.pop(vm_uuid, None)
                raise
            self._last[vm_uuid] = binding
            break
        cert_authkey, cert_vaik = done.cert_authkey, done.cert_vaik
        message_bytes, signature = done.message, done.signature
        return {
            "vm_uuid": _b64(vm_uuid.bytes),
            "cert_user": _b64(binding.cert_user),
            "attestation": {"message": _b64(message_bytes), "signature": _b64(signature)},
            "vaik": {
                "public": _b64(binding.vaik.public),
                "certification": {
                    "attest": _b64(cert_vaik.attest),
                    "signature": _b64(cert_vaik.signature),
                },
            },
            "authkey": {
                "public": self._authkey_public,
                "certification": {
                    "attest": _b64(cert_authkey.attest),
                    "signature": _b64(cert_authkey.signature),
                },
            },
            "aik_certificates": list(self.aik_certificates),
        }

    def _attest(
        self, vm_uuid: uuid.UUID, nonce: bytes, binding: ActiveBinding, approval: PolicyApproval
    ) -> Attestation:
        """The TPM's part (one port call) with the bridge's part overlapping it.

        Raises:
            _BindingChanged: the binding is not ``binding`` any more (nothing was signed).
        """

        # Read the vPCRs, then confirm the binding with the store and the bridge's counters (a
        # reset before or during the read shows there, the counters only grow), so the vPCRs
        # of another boot, or a vAIK that is moving away, are never signed.
        def read_and_confirm() -> bytes:
            try:
                values = self.pcrs.read_pcrs(str(vm_uuid), "sha256", self.pcr_timeout)
            except VtpmError as err:
                self.bindings.active_binding(vm_uuid)  # the precise refusal, if there is one
                raise AttestRefused(
                    f"cannot read the vPCRs of VM {vm_uuid} through its bridge: {err}",
                    "attest.vpcrs_unavailable",
                ) from err
            current = self.bindings.active_binding(vm_uuid)
            if current != binding:
                raise _BindingChanged(current)
            return encode_attestation_message(AttestationMessage(vm_uuid, nonce, SHA256, values))

        message = self._pool.submit(read_and_confirm)
        qualifying = hashlib.sha256(binding.cert_user + nonce).digest()
        try:
            return self.tpm.attest(
                binding.vaik, qualifying, message, approval, message_timeout=self.pcr_timeout + 5
            )
        except TimeoutError as err:
            raise AttestRefused(
                f"the bridge of VM {vm_uuid} did not answer", "attest.vpcrs_unavailable"
            ) from err
        finally:
            if not message.done():
                message.cancel()

    def answer(self, vm_uuid: uuid.UUID, frame: Mapping[str, Any]) -> dict[str, Any]:
        """The answer frame to one request frame (a refusal for anything that goes wrong)."""
        try:
            request = parse_quote_request(frame)
        except ParseError as err:
            rid = frame.get("id")
            return refusal(rid if isinstance(rid, str) else "", "attest.bad_request", str(err))
        try:
            return quote_answer(request.id, self.quote(vm_uuid, request.nonce))
        except AttestRefused as err:
            return refusal(request.id, err.error_id, str(err))
        except VtpmError as err:
            log.warning("attest: VM %s: %s", vm_uuid, err)
            return refusal(request.id, err.id, f"the host could not attest: {err}")


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


# --------------------------------------------------------------------------------------------
# The daemon component


DEFAULT_LISTEN: Final = ("0.0.0.0", 7788)


def _pem_der(path: Path) -> list[bytes]:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    try:
        certs = x509.load_pem_x509_certificates(path.read_bytes())
    except (OSError, ValueError) as err:
        raise AttestConfigError(f"{path}: {err}") from err
    return [c.public_bytes(serialization.Encoding.DER) for c in certs]


class AttestService:
    """The daemon component (``vtpm-host daemon --component
    host_agent.service.attest:AttestService``): enrollment API + guest channel server.

    What it reads under the daemon's ``state_dir`` (what ``vtpm-host init`` and the operator
    put there)::

        identity/aik.pem, identity/tls.pem, identity/tls-key.pem    the host's identity
        attest/fleet-policy-key.pem    the fleet policy key (registrar ``GET /v1/policy-key``),
                                       bound into every vAIK
        migration/policy-approvals.json  the fleet's approvals (``GET /v1/policy-approvals``
                                       format, shared with migration): the one for this host's
                                       current platform state authorises vAIK signing
        attest/owners.json             owner policy (``enroll.PolicyFileOwners``)
        attest/settings.json           optional ``{"listen": "HOST:PORT"}`` (default 0.0.0.0:7788)

    With ``[libvirt] uri`` configured, owners also come from each domain's ``vtpm:owner``
    metadata. Channel sockets come from the VM registry (adoption records' ``channel_socket``),
    re-read every ``sync_interval`` seconds.
    """

    def __init__(
        self,
        *,
        listen: tuple[str, int] | None = None,
        sync_interval: float = 2.0,
        boot_poll_interval: float = 1.0,
    ) -> None:
        self.listen = listen
        self.sync_interval = sync_interval
        self.boot_poll_interval = boot_poll_interval
        self._hooks: tuple[Any, Any, Any] | None = None
        self.enroll: Any = None
        self.server: Any = None
        self.attestor: Attestor | None = None
        self.channels: GuestChannelService | None = None
        self._stop = threading.Event()
        self._sync: threading.Thread | None = None
        self._approval: tuple[float, PolicyApproval] | None = None
        self._approvals_path: Path | None = None

    def _current_approval(self, tpm: HostTpm) -> PolicyApproval:
        assert self._approvals_path is not None
        path = self._approvals_path
        try:
            mtime = path.stat().st_mtime
        except OSError as err:
            raise AttestRefused(f"no fleet approvals at {path}", "attest.no_approval") from err
        if self._approval is not None and self._approval[0] == mtime:
            return self._approval[1]
        from host_agent.migration.service import load_approvals

        wanted = tpm.approved_sign_policy()
        for approval in load_approvals(path):
            if approval.approved_policy == wanted:
                self._approval = (mtime, approval)
                return approval
        raise AttestRefused(
            f"the fleet has not approved this host's platform state for vAIK signing "
            f"(policy {wanted.hex()} not in {path})",
            "attest.no_approval",
        )

    def start(self, daemon: Any) -> None:
        from cryptography.hazmat.primitives import serialization

        from host_agent.service import enroll as en

        state = Path(daemon.config.state_dir)
        ident = state / "identity"
        aik = _pem_der(ident / "aik.pem")
        try:
            fleet_key = serialization.load_pem_public_key(
                (state / "attest" / "fleet-policy-key.pem").read_bytes()
            ).public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        except (OSError, ValueError) as err:
            raise AttestConfigError(f"fleet policy key: {err}") from err
        self._approvals_path = state / "migration" / "policy-approvals.json"
        owners: Any = en.PolicyFileOwners(state / "attest" / "owners.json")
        uri = getattr(getattr(daemon.config, "libvirt", None), "uri", None)
        if uri:
            owners = _UnionOwners(owners, en.DomainMetadataOwners(_LibvirtXml(uri)))
        listen = self.listen
        settings = state / "attest" / "settings.json"
        if listen is None and settings.exists():
            host, _, port = str(json.loads(settings.read_text()).get("listen", "")).rpartition(":")
            listen = (host or DEFAULT_LISTEN[0], int(port))
        tpm = daemon.tpm
        clock = getattr(daemon, "now", None)
        self.enroll = en.EnrollmentService(
            tpm,
            daemon.store,
            owners,
            en.BridgeBootMarkers(daemon.hooks),
            fleet_key,
            aik,
            **({"now": clock} if callable(clock) else {}),
        )
        self.attestor = Attestor(
            tpm, daemon.hooks, self.enroll, lambda: self._current_approval(tpm), aik
        )

        def observe(vm: uuid.UUID, answer: Mapping[str, Any]) -> None:
            """Feed the status and metrics components when they run (looked up per answer)."""
            error = answer.get("error") or {}
            result = "ok" if answer.get("ok") else str(error.get("id", "attest.refused"))
            board = getattr(daemon, "status_board", None)
            if board is not None:
                board.attested(str(vm), daemon.now(), result)
            metrics = getattr(daemon, "metrics", None)
            if metrics is not None:
                metrics.attestation(ok=result == "ok", reason=None if result == "ok" else result)

        self.channels = GuestChannelService(self.attestor, observer=observe).start()
        try:
            self.server = en.EnrollmentServer(
                self.enroll, listen or DEFAULT_LISTEN, ident / "tls.pem", ident / "tls-key.pem"
            ).start()
            self.enroll.start(interval=self.boot_poll_interval)
        except BaseException:
            self.channels.stop()
            raise
        self._watch_saves(daemon.hooks)
        registry = daemon.registry

        def channel_of(entry: Any) -> str | None:
            """The adoption record's channel socket; read from disk for a VM adopted after the
            daemon started (the registry loads adoption records at start only)."""
            record = entry.adoption
            if record is None:
                try:
                    record = json.loads((state / "vms" / entry.uuid / "adoption.json").read_text())
                except (OSError, ValueError):
                    return None
            path = record.get("channel_socket") if isinstance(record, dict) else None
            return str(path) if path else None

        def sync() -> None:
            known: dict[uuid.UUID, str] = {}
            while True:
                try:
                    for entry in registry.entries():
                        path = channel_of(entry)
                        vm = uuid.UUID(entry.uuid)
                        if path and known.get(vm) != path and self.channels is not None:
                            self.channels.add_vm(vm, Path(path))
                            known[vm] = path
                except Exception:  # the loop must survive one bad entry
                    log.exception("attest: channel sync failed")
                if self._stop.wait(self.sync_interval):
                    return

        self._sync = threading.Thread(target=sync, name="attest-sync", daemon=True)
        self._sync.start()
        log.info("attest: enrollment API on %s, guest channels served", self.server.url)

    def _watch_saves(self, hooks: Any) -> None:
        """Judge each VM's boot when a save (or snapshot, or outgoing migration) begins.

        The boot poll runs every ``boot_poll_interval``; a guest that reboots and is saved
        within one interval would otherwise leave its binding active in the saved state, and a
        restore into a new bridge (one per QEMU) could not tell. So the first GET_STATEBLOB
        (PERMANENT) of a save checks the binding first (a bridge status call; a reset
        deactivates it), then the daemon's own handler runs. Never vetoes: a refusal here only
        records what the counters show.
        """
        original = hooks.on_get_stateblob

        def on_get_stateblob(call: Any) -> Any:
            if call.blob_type == 1:
                try:
                    if self.enroll is not None:
                        self.enroll.active_binding(uuid.UUID(call.vm_uuid))
                except (VtpmError, ValueError):
                    pass  # not enrolled, reset (now recorded), migrating: the save goes on
            return original(call)

        hooks.on_get_stateblob = on_get_stateblob
        self._hooks = (hooks, original, on_get_stateblob)

    def stop(self) -> None:
        self._stop.set()
        if self._hooks is not None:
            hooks, original, ours = self._hooks
            if hooks.on_get_stateblob is ours:
                hooks.on_get_stateblob = original
        for part in (self.server, self.enroll, self.channels):
            if part is not None:
                with contextlib.suppress(Exception):
                    part.stop()
        if self.attestor is not None:
            self.attestor.close()
        if self._sync is not None:
            self._sync.join(5)


class _UnionOwners:
    def __init__(self, *policies: Any) -> None:
        self.policies = policies

    def owners(self, vm_uuid: uuid.UUID) -> frozenset[str]:
        out: frozenset[str] = frozenset()
        for p in self.policies:
            out |= p.owners(vm_uuid)
        return out


class _LibvirtXml:
    def __init__(self, uri: str) -> None:
        self.uri = uri

    def __call__(self, vm_uuid: uuid.UUID) -> str | None:
        from host_agent.lifecycle.libvirt_adapter import Hypervisor

        try:
            with Hypervisor(self.uri) as hv:
                return hv.xml(str(vm_uuid))
        except VtpmError:
            return None
