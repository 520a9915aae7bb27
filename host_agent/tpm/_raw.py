"""The attestation hot path's TPM commands, marshalled by hand and sent on ESAPI's own TCTI.

Why not ESAPI: tss2-esys 3.2 with OpenSSL 3 makes every command that carries a policy session
draw its new nonceCaller from a freshly created OpenSSL library context (provider loading,
DRBG seeding): measured 3.5-4 ms of CPU per command on this machine, against 0.5-0.7 ms for
the TPM's own ECDSA signature (bench/attest.py prints both). The hot path needs two such
commands per attestation (Certify by AuthKey, Sign by the vAIK), so it speaks the TPM 2.0 wire
format itself, for a closed set of commands whose sessions carry no HMAC and no encryption:
policy sessions (unbound, unsalted, no PolicyAuthValue/PolicyPassword, so the HMAC field is
empty) and the empty password.

Everything here runs on the adapter's TPM thread, on the same TCTI as its ESAPI context, one
command at a time (ESAPI never has a command in flight then). Handles are TPM handles (ints);
none of them is known to ESAPI, and ESAPI's are never used here. Answers come from the TPM, which
the host trusts; they are still parsed strictly: anything malformed is a :class:`RawTpmError`.
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Sequence
from contextlib import suppress
from dataclasses import dataclass
from typing import Any

__all__ = [
    "RawTpm",
    "RawTpmError",
    "RawTpmRc",
    "swtpm_address",
]

_ST_NO_SESSIONS = 0x8001
_ST_SESSIONS = 0x8002
_RS_PW = 0x40000009
_RH_NULL = 0x40000007
_RH_OWNER = 0x40000001
_ALG_SHA256 = 0x000B
_ALG_NULL = 0x0010
_SE_POLICY = 0x01
_CONTINUE_SESSION = 0x01

CC_CERTIFY = 0x00000148
CC_CONTEXT_LOAD = 0x00000161
CC_CONTEXT_SAVE = 0x00000162
CC_FLUSH_CONTEXT = 0x00000165
CC_LOAD = 0x00000157
CC_SIGN = 0x0000015D
CC_HASH = 0x0000017D
CC_START_AUTH_SESSION = 0x00000176
CC_POLICY_PCR = 0x0000017F
CC_POLICY_LOCALITY = 0x0000016F
CC_POLICY_COMMAND_CODE = 0x0000016C
CC_POLICY_AUTHORIZE = 0x0000016A
CC_POLICY_OR = 0x00000171

_NAMES = {
    CC_CERTIFY: "TPM2_Certify",
    CC_CONTEXT_LOAD: "TPM2_ContextLoad",
    CC_CONTEXT_SAVE: "TPM2_ContextSave",
    CC_FLUSH_CONTEXT: "TPM2_FlushContext",
    CC_LOAD: "TPM2_Load",
    CC_SIGN: "TPM2_Sign",
    CC_HASH: "TPM2_Hash",
    CC_START_AUTH_SESSION: "TPM2_StartAuthSession",
    CC_POLICY_PCR: "TPM2_PolicyPCR",
    CC_POLICY_LOCALITY: "TPM2_PolicyLocality",
    CC_POLICY_COMMAND_CODE: "TPM2_PolicyCommandCode",
    CC_POLICY_AUTHORIZE: "TPM2_PolicyAuthorize",
    CC_POLICY_OR: "TPM2_PolicyOR",
}

_HDR = struct.Struct(">HII")
_RETRY = frozenset({0x908, 0x90A, 0x922})  # TPM_RC_YIELDED, TPM_RC_TESTING, TPM_RC_RETRY
_MAX_RETRIES = 10
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")


class RawTpmError(Exception):
    """A malformed or unexpected answer, or a transport failure (``link`` true)."""

    def __init__(self, command: str, message: str, *, link: bool = False) -> None:
        super().__init__(f"{command}: {message}")
        self.command = command
        self.link = link


class RawTpmRc(Exception):
    """The TPM answered with a non-zero response code."""

    def __init__(self, command: str, rc: int) -> None:
        super().__init__(f"{command} failed with TPM rc 0x{rc:08x}")
        self.command = command
        self.rc = rc


def _b(data: bytes) -> bytes:
    """TPM2B: u16 size ‖ data."""
    return _U16.pack(len(data)) + data


def pcr_select(pcrs: Sequence[int]) -> bytes:
    """TPML_PCR_SELECTION of one sha256 bank (3-byte select, as ESAPI sends it)."""
    bits = bytearray(3)
    for p in pcrs:
        if not 0 <= p < 24:
            raise ValueError(f"PCR index {p} outside 0..23")
        bits[p // 8] |= 1 << (p % 8)
    return _U32.pack(1) + _U16.pack(_ALG_SHA256) + bytes([3]) + bytes(bits)


class _Reader:
    def __init__(self, data: bytes, command: str) -> None:
        self.data = data
        self.pos = 0
        self.command = command

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise RawTpmError(self.command, f"answer truncated at byte {self.pos} (+{n})")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def u16(self) -> int:
        return int(_U16.unpack(self.take(2))[0])

    def u32(self) -> int:
        return int(_U32.unpack(self.take(4))[0])

    def tpm2b(self) -> bytes:
        return self.take(self.u16())

    def signature(self) -> bytes:
        """A marshalled TPMT_SIGNATURE (ECDSA/ECSCHNORR/SM2/ECDAA, RSA, HMAC), as bytes."""
        start = self.pos
        alg = self.u16()
        if alg in (0x0018, 0x001A, 0x001B, 0x001C):  # ECDSA, ECDAA, SM2, ECSCHNORR
            self.u16()
            self.tpm2b()
            self.tpm2b()
        elif alg in (0x0014, 0x0016):  # RSASSA, RSAPSS
            self.u16()
            self.tpm2b()
        else:
            raise RawTpmError(self.command, f"unexpected signature algorithm 0x{alg:04x}")
        return self.data[start : self.pos]

    def end(self) -> None:
        if self.pos != len(self.data):
            raise RawTpmError(self.command, f"{len(self.data) - self.pos} unexpected bytes")


@dataclass(frozen=True)
class Session:
    """An auth area entry: the empty password, or a policy session (no HMAC)."""

    handle: int

    def encode(self) -> bytes:
        # nonceCaller: empty is allowed and nothing here uses it (no HMAC, no encryption).
        return _U32.pack(self.handle) + _b(b"") + bytes([_CONTINUE_SESSION]) + _b(b"")


PASSWORD = Session(_RS_PW)


def _link(tcti: Any) -> tuple[Any, Any]:
    """``(send(command), receive() -> bytes)`` on ``tcti``.

    A native TCTI (what ESAPI was given: ``TCTILdr``, ``TCTI``) is driven through its C entry
    points with one receive buffer kept: tpm2-pytss's ``TCTI.transmit``/``receive`` wrappers
    spend more Python CPU per call than the rest of a command's marshalling (a regex renaming
    the method, an import, two ``ffi.new`` copies of 4 KiB), and the hot path sends ~13
    commands per attestation. The same calls on the same connection; a non-zero TSS2 rc is a
    link error as before. A Python TCTI (``PyTCTI``) or anything unfamiliar keeps the wrappers.
    """
    try:
        from tpm2_pytss._libtpm2_pytss import ffi
        from tpm2_pytss.TCTI import TCTI, PyTCTI
    except ImportError:  # pragma: no cover - tpm2-pytss is a host dependency
        ffi = None
    v1 = getattr(tcti, "_v1", None)
    ctx = getattr(tcti, "_ctx", None)
    if (
        ffi is None
        or not isinstance(tcti, TCTI)
        or isinstance(tcti, PyTCTI)
        or v1 is None
        or ctx is None
        or v1.version < 1
        or v1.transmit == ffi.NULL
        or v1.receive == ffi.NULL
    ):

        def send_wrapped(command: bytes) -> None:
            tcti.transmit(command)

        def receive_wrapped() -> bytes:
            return bytes(tcti.receive(4096, -1))

        return send_wrapped, receive_wrapped

    transmit, receive = v1.transmit, v1.receive
    buf = ffi.new("uint8_t[]", 4096)
    size = ffi.new("size_t *")
    from_buffer, buffer = ffi.from_buffer, ffi.buffer

    def send(command: bytes) -> None:
        rc = transmit(ctx, len(command), from_buffer("uint8_t[]", command))
        if rc:
            raise _TctiError(rc)

    def receive_native() -> bytes:
        size[0] = 4096
        rc = receive(ctx, size, buf, -1)
        if rc:
            raise _TctiError(rc)
        data: bytes = buffer(buf, size[0])[:]
        return data

    send.tcti = receive_native.tcti = tcti  # type: ignore[attr-defined]  # keeps ctx alive
    return send, receive_native


def swtpm_address(tcti: str) -> tuple[int, Any] | None:
    """The server socket of a ``swtpm`` TCTI string (``swtpm:path=…``, ``swtpm:host=…,port=…``,
    ``swtpm:port=…``, ``swtpm``), as ``(address family, address)``; None for any other TCTI.
    The defaults are tcti-swtpm's (localhost, port 2321)."""
    name, _, conf = tcti.partition(":")
    if name != "swtpm":
        return None
    opts: dict[str, str] = {}
    for part in conf.split(","):
        if not part:
            continue
        k, sep, v = part.partition("=")
        if not sep:
            return None
        opts[k.strip()] = v.strip()
    if "path" in opts:
        return socket.AF_UNIX, opts["path"]
    try:
        port = int(opts.get("port", "2321"))
    except ValueError:
        return None
    host = opts.get("host", "localhost")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return family, (host, port)


class _KeptSocket:
    """One connection to swtpm's server socket, kept open across commands.

    tcti-swtpm connects to swtpm for every command (swtpm serves one connection at a time, so a
    kept one would lock other clients out); measured here, a kept connection costs 36 instead
    of 62 µs of CPU and 74 instead of 95 µs per command. The adapter keeps one only while it
    holds the shared lease (no other agent process talks to the TPM then) and closes it before
    any ESAPI command (whose TCTI connects by itself and would wait behind it), before it gives
    the lease up, and when idle. Same bytes as the TCTI sends; locality stays what it is (0:
    tcti-swtpm sets 0 before each of its commands, and swtpm starts at 0).
    """

    def __init__(self, address: tuple[int, Any], timeout: float = 60.0) -> None:
        self._family, self._address = address
        self._timeout = timeout
        self._sock: socket.socket | None = None
        self.connects = 0
        self._buf = bytearray(4096)
        self._view = memoryview(self._buf)

    @property
    def connected(self) -> bool:
        return self._sock is not None

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            with suppress(OSError):
                sock.close()

    def send(self, command: bytes) -> None:
        sock = self._sock
        if sock is None:
            sock = socket.socket(self._family, socket.SOCK_STREAM)
            try:
                sock.settimeout(self._timeout)
                sock.connect(self._address)
            except BaseException:
                sock.close()
                raise
            self._sock = sock
            self.connects += 1
        try:
            sock.sendall(command)
        except BaseException:
            self.close()
            raise

    def receive(self) -> bytes:
        sock = self._sock
        if sock is None:
            raise ConnectionError("not connected")
        try:
            got = 0
            want = _HDR.size
            while got < want:
                n = sock.recv_into(self._view[got:], len(self._buf) - got)
                if n == 0:
                    raise ConnectionError("swtpm closed the connection")
                got += n
                if want == _HDR.size and got >= _HDR.size:
                    want = _HDR.unpack_from(self._buf)[1]
                    if not _HDR.size <= want <= len(self._buf):
                        raise ConnectionError(f"answer size {want}")
            if got != want:
                raise ConnectionError(f"{got - want} bytes beyond the answer")
            return bytes(self._view[:got])
        except BaseException:
            self.close()
            raise


class _TctiError(Exception):
    def __init__(self, rc: int) -> None:
        try:
            from tpm2_pytss import TSS2_Exception

            text = str(TSS2_Exception(rc))
        except Exception:  # only the message is at stake
            text = "TCTI error"
        super().__init__(f"{text} (rc 0x{rc:08x})")
        self.rc = rc


class RawTpm:
    """Send hand-marshalled commands on a tpm2-pytss TCTI (see the module docstring)."""

    def __init__(self, tcti: Any, *, kept: tuple[int, Any] | None = None) -> None:
        """``kept``: swtpm's server socket (:func:`swtpm_address`): commands go over one
        connection kept open until :meth:`release` instead of the TCTI's connect per command."""
        self._tcti = tcti
        self._kept = _KeptSocket(kept) if kept is not None else None
        if self._kept is not None:
            self._send, self._receive = self._kept.send, self._kept.receive
        else:
            self._send, self._receive = _link(tcti)
        self.commands = 0

    @property
    def holds_connection(self) -> bool:
        """Is a kept connection open (other clients of swtpm wait until it is released)?"""
        return self._kept is not None and self._kept.connected

    @property
    def connects(self) -> int:
        """Connections the kept link opened so far."""
        return self._kept.connects if self._kept is not None else 0

    def release(self) -> None:
        """Close the kept connection, if any (the next command opens a new one)."""
        if self._kept is not None:
            self._kept.close()

    def _run(
        self,
        cc: int,
        handles: Sequence[int] = (),
        params: bytes = b"",
        sessions: Sequence[Session] = (),
        out_handles: int = 0,
    ) -> tuple[list[int], _Reader]:
        name = _NAMES[cc]
        body = b"".join(_U32.pack(h) for h in handles)
        if sessions:
            auth = b"".join(s.encode() for s in sessions)
            body += _U32.pack(len(auth)) + auth
        body += params
        tag = _ST_SESSIONS if sessions else _ST_NO_SESSIONS
        command = _HDR.pack(tag, _HDR.size + len(body), cc) + body
        for _ in range(_MAX_RETRIES):
            try:
                self._send(command)
                answer = self._receive()
            except Exception as err:  # the TCTI's own errors (rc, TSS2_Exception): the link broke
                raise RawTpmError(name, f"transport: {err}", link=True) from err
            self.commands += 1
            if len(answer) < _HDR.size:
                raise RawTpmError(name, f"answer of {len(answer)} bytes")
            tag, size, rc = _HDR.unpack_from(answer)
            if rc not in _RETRY:
                break  # as ESAPI does, the warnings that mean "not now" are retried
        if size != len(answer):
            raise RawTpmError(name, f"answer says {size} bytes, got {len(answer)}")
        if rc != 0:
            raise RawTpmRc(name, rc)
        r = _Reader(answer, name)
        r.pos = _HDR.size
        out = [r.u32() for _ in range(out_handles)]
        if tag == _ST_SESSIONS:
            psize = r.u32()
            params_end = r.pos + psize
            if params_end > len(answer):
                raise RawTpmError(name, "parameterSize beyond the answer")
            r = _Reader(answer[:params_end], name)
            r.pos = params_end - psize
        elif tag != _ST_NO_SESSIONS:
            raise RawTpmError(name, f"answer tag 0x{tag:04x}")
        return out, r

    # ---------------------------------------------------------------- objects

    def context_load(self, context: bytes) -> int:
        """TPM2_ContextLoad of a marshalled TPMS_CONTEXT; returns the handle."""
        (h,), r = self._run(CC_CONTEXT_LOAD, params=context, out_handles=1)
        r.end()
        return h

    def context_save(self, handle: int) -> bytes:
        """TPM2_ContextSave; returns the marshalled TPMS_CONTEXT."""
        _, r = self._run(CC_CONTEXT_SAVE, (handle,))
        start = r.pos
        r.take(8 + 4 + 4)
        r.tpm2b()
        r.end()
        return r.data[start:]

    def flush(self, handle: int) -> None:
        _, r = self._run(CC_FLUSH_CONTEXT, params=_U32.pack(handle))
        r.end()

    def load(self, parent: int, private: bytes, public: bytes) -> int:
        """TPM2_Load under a parent authorised by the empty password (the SRK).

        ``private``: marshalled TPM2B_PRIVATE; ``public``: marshalled TPMT_PUBLIC.
        """
        (h,), r = self._run(CC_LOAD, (parent,), private + _b(public), (PASSWORD,), out_handles=1)
        r.tpm2b()  # name
        r.end()
        return h

    # ---------------------------------------------------------------- sessions

    def start_policy_session(self) -> int:
        """An unbound, unsalted SHA-256 policy session (continueSession on every use)."""
        params = (
            _b(os.urandom(32))  # nonceCaller (TPM_RC_SIZE under 16 bytes)
            + _b(b"")  # encryptedSalt
            + bytes([_SE_POLICY])
            + _U16.pack(_ALG_NULL)  # symmetric
            + _U16.pack(_ALG_SHA256)
        )
        (h,), r = self._run(CC_START_AUTH_SESSION, (_RH_NULL, _RH_NULL), params, out_handles=1)
        r.tpm2b()  # nonceTPM
        r.end()
        return h

    def policy_pcr(self, session: int, pcrs: Sequence[int]) -> None:
        """PolicyPCR over the current values (empty pcrDigest)."""
        _, r = self._run(CC_POLICY_PCR, (session,), _b(b"") + pcr_select(pcrs))
        r.end()

    def policy_locality(self, session: int, locality: int) -> None:
        _, r = self._run(CC_POLICY_LOCALITY, (session,), bytes([1 << locality]))
        r.end()

    def policy_command_code(self, session: int, cc: int) -> None:
        _, r = self._run(CC_POLICY_COMMAND_CODE, (session,), _U32.pack(cc))
        r.end()

    def policy_authorize(
        self, session: int, approved: bytes, policy_ref: bytes, key_name: bytes, ticket: bytes
    ) -> None:
        """``ticket``: marshalled TPMT_TK_VERIFIED."""
        params = _b(approved) + _b(policy_ref) + _b(key_name) + ticket
        _, r = self._run(CC_POLICY_AUTHORIZE, (session,), params)
        r.end()

    def policy_or(self, session: int, branches: Sequence[bytes]) -> None:
        params = _U32.pack(len(branches)) + b"".join(_b(d) for d in branches)
        _, r = self._run(CC_POLICY_OR, (session,), params)
        r.end()

    # ---------------------------------------------------------------- signing

    def hash(self, data: bytes) -> tuple[bytes, bytes]:
        """TPM2_Hash(SHA-256, owner): (digest, marshalled TPMT_TK_HASHCHECK)."""
        _, r = self._run(CC_HASH, params=_b(data) + _U16.pack(_ALG_SHA256) + _U32.pack(_RH_OWNER))
        digest = r.tpm2b()
        start = r.pos
        r.u16()
        r.u32()
        r.tpm2b()
        ticket = r.data[start : r.pos]
        r.end()
        return digest, ticket

    def certify(
        self, obj: int, signer: int, signer_session: Session, qualifying_data: bytes
    ) -> tuple[bytes, bytes]:
        """TPM2_Certify (the object's ADMIN role by the empty password): (TPMS_ATTEST bytes,
        marshalled TPMT_SIGNATURE)."""
        _, r = self._run(
            CC_CERTIFY,
            (obj, signer),
            _b(qualifying_data) + _U16.pack(_ALG_NULL),
            (PASSWORD, signer_session),
        )
        attest = r.tpm2b()
        sig = r.signature()
        r.end()
        return attest, sig

    def sign(self, key: int, session: Session, digest: bytes, ticket: bytes) -> bytes:
        """TPM2_Sign with the key's own scheme; ``ticket``: marshalled TPMT_TK_HASHCHECK."""
        _, r = self._run(CC_SIGN, (key,), _b(digest) + _U16.pack(_ALG_NULL) + ticket, (session,))
        sig = r.signature()
        r.end()
        return sig
