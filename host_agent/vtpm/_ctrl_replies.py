"""Control-channel replies: one dataclass per reply shape, their decoders and fault replies.

Part of :mod:`host_agent.vtpm.ctrl_codec`, whose docstring has the theory of operation; import
from there. A reply carries no code of its own: its shape (:class:`ReplyKind`) follows from the
request it answers and from whether the TPM is running (quirk ``swtpm.ctrl.bare_error_reply``),
which is why :func:`decode_reply`, :class:`ReplyDecoder` and :func:`fault_reply` take both.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import Enum
from typing import TypeAlias

from evidence.errors import ParseError, TruncatedError
from host_agent.vtpm._ctrl_proto import (
    _U32,
    _U64,
    MAX_INFO_DATA,
    MAX_STATE_BLOB,
    PtmResult,
    _check_bytes,
    _check_u,
    _cmd_name,
    _u32,
)
from host_agent.vtpm._ctrl_requests import (
    GetCapability,
    GetConfig,
    GetInfo,
    GetStateBlob,
    GetTpmEstablished,
    Request,
    SetBufferSize,
)

__all__ = [
    "BufferSizeReply",
    "CapabilityReply",
    "ConfigReply",
    "EstablishedReply",
    "InfoReply",
    "Reply",
    "ReplyDecoder",
    "ReplyKind",
    "ResultReply",
    "StateBlobReply",
    "decode_reply",
    "fault_reply",
    "reply_kind",
]


@dataclass(frozen=True)
class ResultReply:
    """A reply that is only ``u32 tpm_result`` (and every bare error reply)."""

    result: int

    def __post_init__(self) -> None:
        _check_u("ResultReply", "result", self.result, 32)

    def encode(self) -> bytes:
        return _u32(self.result)


@dataclass(frozen=True)
class CapabilityReply:
    """GET_CAPABILITY: one big-endian u64 of :class:`PtmCap` bits (quirk capability_be64)."""

    caps: int

    def __post_init__(self) -> None:
        _check_u("CapabilityReply", "caps", self.caps, 64)

    @property
    def result(self) -> int:
        return self.caps >> 32

    def encode(self) -> bytes:
        return _U64.pack(self.caps)


@dataclass(frozen=True)
class EstablishedReply:
    """GET_TPMESTABLISHED: ``u32 result, u8 bit, u8 pad[3]``."""

    result: int
    bit: int
    padding: bytes = b"\0\0\0"

    def __post_init__(self) -> None:
        _check_u("EstablishedReply", "result", self.result, 32)
        _check_u("EstablishedReply", "bit", self.bit, 8)
        if not isinstance(self.padding, bytes) or len(self.padding) != 3:
            raise ValueError("EstablishedReply.padding must be 3 bytes")

    def encode(self) -> bytes:
        return _u32(self.result) + bytes([self.bit]) + self.padding


@dataclass(frozen=True)
class StateBlobReply:
    """GET_STATEBLOB: ``u32 result, u32 state_flags, u32 totlength, u32 length`` + blob.

    The blob follows only when ``result`` is 0, and then has ``length`` bytes.
    """

    result: int
    state_flags: int
    totlength: int
    length: int
    data: bytes = b""

    def __post_init__(self) -> None:
        for name in ("result", "state_flags", "totlength", "length"):
            _check_u("StateBlobReply", name, getattr(self, name), 32)
        _check_bytes("StateBlobReply", "data", self.data, MAX_STATE_BLOB)
        expected = self.length if self.result == 0 else 0
        if len(self.data) != expected:
            raise ValueError(
                f"StateBlobReply with result {self.result:#x} carries {expected} bytes, "
                f"got {len(self.data)}"
            )

    @classmethod
    def of(cls, data: bytes, state_flags: int = 0) -> StateBlobReply:
        """A successful reply carrying ``data``."""
        return cls(0, state_flags, len(data), len(data), data)

    def encode(self) -> bytes:
        return (
            struct.pack(">IIII", self.result, self.state_flags, self.totlength, self.length)
            + self.data
        )


@dataclass(frozen=True)
class ConfigReply:
    """GET_CONFIG: ``u32 result, u32 flags`` (0x1 file key, 0x2 migration key)."""

    result: int
    flags: int

    def __post_init__(self) -> None:
        _check_u("ConfigReply", "result", self.result, 32)
        _check_u("ConfigReply", "flags", self.flags, 32)

    def encode(self) -> bytes:
        return _u32(self.result) + _u32(self.flags)


@dataclass(frozen=True)
class BufferSizeReply:
    """SET_BUFFERSIZE (success): ``u32 result, u32 buffersize, u32 minsize, u32 maxsize``."""

    result: int
    buffersize: int
    minsize: int
    maxsize: int

    def __post_init__(self) -> None:
        for name in ("result", "buffersize", "minsize", "maxsize"):
            _check_u("BufferSizeReply", name, getattr(self, name), 32)

    def encode(self) -> bytes:
        return struct.pack(">IIII", self.result, self.buffersize, self.minsize, self.maxsize)


@dataclass(frozen=True)
class InfoReply:
    """GET_INFO (success): ``u32 result, u32 totlength, u32 length, char buffer[length]``."""

    result: int
    totlength: int
    data: bytes

    def __post_init__(self) -> None:
        _check_u("InfoReply", "result", self.result, 32)
        _check_u("InfoReply", "totlength", self.totlength, 32)
        _check_bytes("InfoReply", "data", self.data, MAX_INFO_DATA)

    def encode(self) -> bytes:
        return _u32(self.result) + _u32(self.totlength) + _u32(len(self.data)) + self.data


Reply: TypeAlias = (
    ResultReply
    | CapabilityReply
    | EstablishedReply
    | StateBlobReply
    | ConfigReply
    | BufferSizeReply
    | InfoReply
)


class ReplyKind(Enum):
    """The shape a reply takes, before its result is known."""

    RESULT = "result"  # always 4 bytes
    CAPABILITY = "capability"  # always 8 bytes
    ESTABLISHED = "established"  # 8 bytes, whatever the result
    STATEBLOB = "stateblob"  # 16-byte header (+ blob when result is 0)
    CONFIG = "config"  # 8 bytes on success, 4 on error
    BUFFERSIZE = "buffersize"  # 16 bytes on success, 4 on error
    INFO = "info"  # 12 + length on success, 4 on error


def reply_kind(request: Request, tpm_running: bool) -> ReplyKind:
    """The shape of swtpm's reply to a well-formed ``request`` (quirk bare_error_reply)."""
    if isinstance(request, GetCapability):
        return ReplyKind.CAPABILITY
    if isinstance(request, GetTpmEstablished):
        return ReplyKind.ESTABLISHED if tpm_running else ReplyKind.RESULT
    if isinstance(request, GetStateBlob):
        return ReplyKind.STATEBLOB if tpm_running else ReplyKind.RESULT
    if isinstance(request, GetConfig):
        return ReplyKind.CONFIG
    if isinstance(request, SetBufferSize):
        return ReplyKind.BUFFERSIZE
    if isinstance(request, GetInfo):
        return ReplyKind.INFO
    return ReplyKind.RESULT


def _try_reply(buf: bytes | bytearray, kind: ReplyKind, *, final: bool) -> tuple[Reply, int] | None:
    what = f"ctrl reply ({kind.value})"

    def need(n: int) -> bool:
        if len(buf) >= n:
            return True
        if final:
            raise TruncatedError(what, len(buf), f"{n} bytes", f"{len(buf)}")
        return False

    if not need(4):
        return None
    result = _U32.unpack_from(buf, 0)[0]
    if kind is ReplyKind.CAPABILITY:
        if not need(8):
            return None
        return CapabilityReply(_U64.unpack_from(buf, 0)[0]), 8
    if kind is ReplyKind.RESULT or (
        result != 0 and kind in (ReplyKind.CONFIG, ReplyKind.BUFFERSIZE, ReplyKind.INFO)
    ):
        return ResultReply(result), 4
    if kind is ReplyKind.ESTABLISHED:
        if not need(8):
            return None
        return EstablishedReply(result, buf[4], bytes(buf[5:8])), 8
    if kind is ReplyKind.CONFIG:
        if not need(8):
            return None
        return ConfigReply(result, _U32.unpack_from(buf, 4)[0]), 8
    if kind is ReplyKind.BUFFERSIZE:
        if not need(16):
            return None
        _, size, lo, hi = struct.unpack_from(">IIII", buf, 0)
        return BufferSizeReply(result, size, lo, hi), 16
    if kind is ReplyKind.INFO:
        if not need(12):
            return None
        tot, length = struct.unpack_from(">II", buf, 4)
        if length > MAX_INFO_DATA:
            raise ParseError(f"{what}.length", 8, f"at most {MAX_INFO_DATA}", str(length))
        if not need(12 + length):
            return None
        return InfoReply(result, tot, bytes(buf[12 : 12 + length])), 12 + length
    # STATEBLOB
    if not need(16):
        return None
    _, flags, tot, length = struct.unpack_from(">IIII", buf, 0)
    body = length if result == 0 else 0
    if body > MAX_STATE_BLOB:
        raise ParseError(f"{what}.length", 12, f"at most {MAX_STATE_BLOB}", str(length))
    if not need(16 + body):
        return None
    return StateBlobReply(result, flags, tot, length, bytes(buf[16 : 16 + body])), 16 + body


def decode_reply(data: bytes, request: Request, tpm_running: bool) -> Reply:
    """Decode exactly one reply to ``request`` that fills ``data``.

    Args:
        data: the reply bytes.
        request: the request it answers.
        tpm_running: whether the TPM was running when swtpm answered (see :class:`TpmRunState`).

    Raises:
        TruncatedError: ``data`` ends inside the reply.
        ParseError: a length above its bound, or bytes left over.
    """
    got = _try_reply(data, reply_kind(request, tpm_running), final=True)
    assert got is not None
    reply, used = got
    if used != len(data):
        raise ParseError(
            f"ctrl reply to {_cmd_name(request.code)}",
            used,
            "end of reply",
            f"{len(data) - used} more bytes",
        )
    return reply


class ReplyDecoder:
    """Incremental decoder of the reply stream: ``expect(request, running)`` before each reply.

    Bytes that arrive with no request outstanding are an error from the server's side.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._kind: ReplyKind | None = None

    @property
    def expecting(self) -> bool:
        return self._kind is not None

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def expect(self, request: Request, tpm_running: bool) -> None:
        if self._kind is not None:
            raise ValueError("a reply is already expected: a ctrl client never pipelines")
        self._kind = reply_kind(request, tpm_running)

    def feed(self, data: bytes) -> None:
        self._buf += data

    def next_reply(self) -> Reply | None:
        """The complete reply, or None when more bytes are needed.

        Raises:
            ParseError: bytes arrived with no request outstanding, or a bad length.
        """
        if self._kind is None:
            if self._buf:
                raise ParseError(
                    "ctrl reply",
                    0,
                    "no bytes while no request is outstanding",
                    f"{len(self._buf)} bytes",
                )
            return None
        got = _try_reply(self._buf, self._kind, final=False)
        if got is None:
            return None
        reply, used = got
        del self._buf[:used]
        self._kind = None
        return reply


def fault_reply(request: Request, tpm_running: bool, result: int = PtmResult.TPM_FAIL) -> Reply:
    """An error reply to ``request`` in the shape the client reads (e.g. to refuse a transfer).

    GET_STATEBLOB while running gets the 16-byte header with ``result`` and no blob, so QEMU
    reports "Getting the stateblob … failed" instead of waiting for bytes that never come.
    """
    if result == 0:
        raise ValueError("a fault reply needs a non-zero result")
    kind = reply_kind(request, tpm_running)
    if kind is ReplyKind.STATEBLOB:
        return StateBlobReply(result, 0, 0, 0, b"")
    if kind is ReplyKind.ESTABLISHED:
        return EstablishedReply(result, 0)
    if kind is ReplyKind.CAPABILITY:
        return CapabilityReply((result << 32) & 0xFFFF_FFFF_0000_0000)
    return ResultReply(result)
