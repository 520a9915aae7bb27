"""Control-channel requests: one dataclass per command, and their decoders.

Part of :mod:`host_agent.vtpm.ctrl_codec`, whose docstring has the theory of operation; import
from there. Each request dataclass validates its fields and ``encode()``s itself;
:func:`decode_request` reads one whole message and :class:`RequestDecoder` reads the client's
byte stream incrementally. A request's length follows from its code (and, for HASH_DATA /
SET_STATEBLOB, from a length in its header), so nothing here needs the run state.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import ClassVar, TypeAlias

from evidence.errors import ParseError, TruncatedError, UnsupportedError
from host_agent.vtpm._ctrl_proto import (
    _U32,
    _U64,
    MAX_HASH_DATA,
    MAX_STATE_BLOB,
    STATE_FLAG_DECRYPTED,
    CtrlCmd,
    _check_bytes,
    _check_u,
    _cmd_name,
    _u32,
)

__all__ = [
    "CancelTpmCmd",
    "GetCapability",
    "GetConfig",
    "GetInfo",
    "GetStateBlob",
    "GetTpmEstablished",
    "HashData",
    "HashEnd",
    "HashStart",
    "Init",
    "LockStorage",
    "Request",
    "RequestDecoder",
    "ResetTpmEstablished",
    "SetBufferSize",
    "SetDataFd",
    "SetLocality",
    "SetStateBlob",
    "Shutdown",
    "Stop",
    "StoreVolatile",
    "decode_request",
]


@dataclass(frozen=True)
class _NoBody:
    """A request that is only its command code."""

    code: ClassVar[CtrlCmd]

    def encode(self) -> bytes:
        return _u32(self.code)


@dataclass(frozen=True)
class GetCapability(_NoBody):
    code: ClassVar[CtrlCmd] = CtrlCmd.CMD_GET_CAPABILITY


@dataclass(frozen=True)
class Shutdown(_NoBody):
    code: ClassVar[CtrlCmd] = CtrlCmd.CMD_SHUTDOWN


@dataclass(frozen=True)
class GetTpmEstablished(_NoBody):
    code: ClassVar[CtrlCmd] = CtrlCmd.CMD_GET_TPMESTABLISHED


@dataclass(frozen=True)
class HashStart(_NoBody):
    code: ClassVar[CtrlCmd] = CtrlCmd.CMD_HASH_START


@dataclass(frozen=True)
class HashEnd(_NoBody):
    code: ClassVar[CtrlCmd] = CtrlCmd.CMD_HASH_END


@dataclass(frozen=True)
class CancelTpmCmd(_NoBody):
    code: ClassVar[CtrlCmd] = CtrlCmd.CMD_CANCEL_TPM_CMD


@dataclass(frozen=True)
class StoreVolatile(_NoBody):
    code: ClassVar[CtrlCmd] = CtrlCmd.CMD_STORE_VOLATILE


@dataclass(frozen=True)
class Stop(_NoBody):
    code: ClassVar[CtrlCmd] = CtrlCmd.CMD_STOP


@dataclass(frozen=True)
class GetConfig(_NoBody):
    code: ClassVar[CtrlCmd] = CtrlCmd.CMD_GET_CONFIG


@dataclass(frozen=True)
class SetDataFd(_NoBody):
    """CMD_SET_DATAFD. The fd itself travels as SCM_RIGHTS beside these 4 bytes."""

    code: ClassVar[CtrlCmd] = CtrlCmd.CMD_SET_DATAFD


@dataclass(frozen=True)
class Init:
    """CMD_INIT ``u32 init_flags`` (bit 0: delete the volatile state after reading it)."""

    code: ClassVar[CtrlCmd] = CtrlCmd.CMD_INIT
    flags: int = 0

    def __post_init__(self) -> None:
        _check_u("Init", "flags", self.flags, 32)

    def encode(self) -> bytes:
        return _u32(self.code) + _u32(self.flags)


@dataclass(frozen=True)
class SetLocality:
    """CMD_SET_LOCALITY ``u8 loc``; ``padding`` keeps QEMU's 3 zero bytes (quirk)."""

    code: ClassVar[CtrlCmd] = CtrlCmd.CMD_SET_LOCALITY
    locality: int
    padding: bytes = b""

    def __post_init__(self) -> None:
        _check_u("SetLocality", "locality", self.locality, 8)
        _check_bytes("SetLocality", "padding", self.padding, 3)

    def encode(self) -> bytes:
        return _u32(self.code) + bytes([self.locality]) + self.padding


@dataclass(frozen=True)
class ResetTpmEstablished:
    """CMD_RESET_TPMESTABLISHED ``u8 loc``; ``padding`` keeps QEMU's 3 zero bytes (quirk)."""

    code: ClassVar[CtrlCmd] = CtrlCmd.CMD_RESET_TPMESTABLISHED
    locality: int
    padding: bytes = b""

    def __post_init__(self) -> None:
        _check_u("ResetTpmEstablished", "locality", self.locality, 8)
        _check_bytes("ResetTpmEstablished", "padding", self.padding, 3)

    def encode(self) -> bytes:
        return _u32(self.code) + bytes([self.locality]) + self.padding


@dataclass(frozen=True)
class HashData:
    """CMD_HASH_DATA ``u32 length, data[length]`` (at most 4096 bytes)."""

    code: ClassVar[CtrlCmd] = CtrlCmd.CMD_HASH_DATA
    data: bytes

    def __post_init__(self) -> None:
        _check_bytes("HashData", "data", self.data, MAX_HASH_DATA)

    def encode(self) -> bytes:
        return _u32(self.code) + _u32(len(self.data)) + self.data


@dataclass(frozen=True)
class GetStateBlob:
    """CMD_GET_STATEBLOB ``u32 state_flags, u32 type, u32 offset``."""

    code: ClassVar[CtrlCmd] = CtrlCmd.CMD_GET_STATEBLOB
    blob_type: int
    state_flags: int = STATE_FLAG_DECRYPTED
    offset: int = 0

    def __post_init__(self) -> None:
        _check_u("GetStateBlob", "state_flags", self.state_flags, 32)
        _check_u("GetStateBlob", "blob_type", self.blob_type, 32)
        _check_u("GetStateBlob", "offset", self.offset, 32)

    def encode(self) -> bytes:
        return _u32(self.code) + _u32(self.state_flags) + _u32(self.blob_type) + _u32(self.offset)


@dataclass(frozen=True)
class SetStateBlob:
    """CMD_SET_STATEBLOB ``u32 state_flags, u32 type, u32 length`` then ``length`` body bytes.

    ``header()`` is what QEMU writes first; ``encode()`` is header and body together.
    """

    code: ClassVar[CtrlCmd] = CtrlCmd.CMD_SET_STATEBLOB
    blob_type: int
    data: bytes
    state_flags: int = 0

    def __post_init__(self) -> None:
        _check_u("SetStateBlob", "state_flags", self.state_flags, 32)
        _check_u("SetStateBlob", "blob_type", self.blob_type, 32)
        _check_bytes("SetStateBlob", "data", self.data, MAX_STATE_BLOB)

    def header(self) -> bytes:
        return (
            _u32(self.code) + _u32(self.state_flags) + _u32(self.blob_type) + _u32(len(self.data))
        )

    def encode(self) -> bytes:
        return self.header() + self.data


@dataclass(frozen=True)
class SetBufferSize:
    """CMD_SET_BUFFERSIZE ``u32 buffersize`` (0 = query)."""

    code: ClassVar[CtrlCmd] = CtrlCmd.CMD_SET_BUFFERSIZE
    buffersize: int = 0

    def __post_init__(self) -> None:
        _check_u("SetBufferSize", "buffersize", self.buffersize, 32)

    def encode(self) -> bytes:
        return _u32(self.code) + _u32(self.buffersize)


@dataclass(frozen=True)
class GetInfo:
    """CMD_GET_INFO ``u64 flags, u32 offset, u32 pad``."""

    code: ClassVar[CtrlCmd] = CtrlCmd.CMD_GET_INFO
    flags: int
    offset: int = 0
    pad: int = 0

    def __post_init__(self) -> None:
        _check_u("GetInfo", "flags", self.flags, 64)
        _check_u("GetInfo", "offset", self.offset, 32)
        _check_u("GetInfo", "pad", self.pad, 32)

    def encode(self) -> bytes:
        return _u32(self.code) + _U64.pack(self.flags) + _u32(self.offset) + _u32(self.pad)


@dataclass(frozen=True)
class LockStorage:
    """CMD_LOCK_STORAGE ``u32 retries`` (swtpm ≥ 0.8; 0.7.1 answers TPM_BAD_ORDINAL)."""

    code: ClassVar[CtrlCmd] = CtrlCmd.CMD_LOCK_STORAGE
    retries: int

    def __post_init__(self) -> None:
        _check_u("LockStorage", "retries", self.retries, 32)

    def encode(self) -> bytes:
        return _u32(self.code) + _u32(self.retries)


Request: TypeAlias = (
    GetCapability
    | Init
    | Shutdown
    | GetTpmEstablished
    | SetLocality
    | HashStart
    | HashData
    | HashEnd
    | CancelTpmCmd
    | StoreVolatile
    | ResetTpmEstablished
    | GetStateBlob
    | SetStateBlob
    | Stop
    | GetConfig
    | SetDataFd
    | SetBufferSize
    | GetInfo
    | LockStorage
)

_NO_BODY: dict[int, type[_NoBody]] = {
    c.code: c
    for c in (
        GetCapability,
        Shutdown,
        GetTpmEstablished,
        HashStart,
        HashEnd,
        CancelTpmCmd,
        StoreVolatile,
        Stop,
        GetConfig,
        SetDataFd,
    )
}
_FIXED_U32: dict[int, str] = {
    CtrlCmd.CMD_INIT: "ptm_init.flags",
    CtrlCmd.CMD_SET_BUFFERSIZE: "ptm_setbuffersize.buffersize",
    CtrlCmd.CMD_LOCK_STORAGE: "ptm_lockstorage.retries",
}


def _try_request(buf: bytes | bytearray, *, final: bool) -> tuple[Request, int] | None:
    """Decode one request from the front of ``buf``: (request, bytes used), or None for more.

    ``final`` says no further bytes will follow this request (whole-message decoding); it only
    matters for the optional padding of SET_LOCALITY / RESET_TPMESTABLISHED, which incremental
    decoding takes from what is buffered, as swtpm takes it from one read.
    """
    if len(buf) < 4:
        if final:
            raise TruncatedError("ctrl request", 0, "a 4-byte command code", f"{len(buf)} bytes")
        return None
    code = _U32.unpack_from(buf, 0)[0]
    avail = len(buf) - 4

    def need(n: int, what: str) -> bool:
        if avail >= n:
            return True
        if final:
            raise TruncatedError(
                f"ctrl {_cmd_name(code)}.{what}", 4 + avail, f"{n} body bytes", f"{avail}"
            )
        return False

    if code in _NO_BODY:
        return _NO_BODY[code](), 4  # type: ignore[return-value]
    if code in _FIXED_U32:
        if not need(4, _FIXED_U32[code]):
            return None
        value = _U32.unpack_from(buf, 4)[0]
        if code == CtrlCmd.CMD_INIT:
            return Init(value), 8
        if code == CtrlCmd.CMD_SET_BUFFERSIZE:
            return SetBufferSize(value), 8
        return LockStorage(value), 8
    if code in (CtrlCmd.CMD_SET_LOCALITY, CtrlCmd.CMD_RESET_TPMESTABLISHED):
        if not need(1, "loc"):
            return None
        body = min(avail, 4)
        loc = buf[4]
        pad = bytes(buf[5 : 4 + body])
        if code == CtrlCmd.CMD_SET_LOCALITY:
            return SetLocality(loc, pad), 4 + body
        return ResetTpmEstablished(loc, pad), 4 + body
    if code == CtrlCmd.CMD_HASH_DATA:
        if not need(4, "length"):
            return None
        length = _U32.unpack_from(buf, 4)[0]
        if length > MAX_HASH_DATA:
            raise ParseError(
                "ctrl CMD_HASH_DATA.length", 4, f"at most {MAX_HASH_DATA}", str(length)
            )
        if not need(4 + length, "data"):
            return None
        return HashData(bytes(buf[8 : 8 + length])), 8 + length
    if code == CtrlCmd.CMD_GET_STATEBLOB:
        if not need(12, "header"):
            return None
        flags, btype, offset = struct.unpack_from(">III", buf, 4)
        return GetStateBlob(btype, flags, offset), 16
    if code == CtrlCmd.CMD_SET_STATEBLOB:
        if not need(12, "header"):
            return None
        flags, btype, length = struct.unpack_from(">III", buf, 4)
        if length > MAX_STATE_BLOB:
            raise ParseError(
                "ctrl CMD_SET_STATEBLOB.length", 12, f"at most {MAX_STATE_BLOB}", str(length)
            )
        if not need(12 + length, "data"):
            return None
        return SetStateBlob(btype, bytes(buf[16 : 16 + length]), flags), 16 + length
    if code == CtrlCmd.CMD_GET_INFO:
        if not need(16, "req"):
            return None
        flags64 = _U64.unpack_from(buf, 4)[0]
        offset, pad = struct.unpack_from(">II", buf, 12)
        return GetInfo(flags64, offset, pad), 20
    raise UnsupportedError("ctrl request", 0, "a known command code", _cmd_name(code))


def decode_request(data: bytes) -> Request:
    """Decode exactly one request that fills ``data``.

    Raises:
        TruncatedError: ``data`` ends inside the request.
        UnsupportedError: unknown command code.
        ParseError: a length above its bound, or bytes left over.
    """
    got = _try_request(data, final=True)
    assert got is not None
    req, used = got
    if used != len(data):
        raise ParseError(
            f"ctrl {_cmd_name(req.code)}", used, "end of request", f"{len(data) - used} more bytes"
        )
    return req


class RequestDecoder:
    """Incremental request decoder: ``feed(bytes)``, then ``next_request()`` until None.

    A client waits for each reply, so at most one request is ever partial; padding of
    SET_LOCALITY / RESET_TPMESTABLISHED is taken from what is buffered (swtpm takes it from one
    read). After a ParseError the buffer is unchanged: the caller decides (``clear()``).
    """

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> None:
        self._buf += data

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def clear(self) -> bytes:
        out = bytes(self._buf)
        self._buf.clear()
        return out

    def next_request(self) -> Request | None:
        got = _try_request(self._buf, final=False)
        if got is None:
            return None
        req, used = got
        del self._buf[:used]
        return req
