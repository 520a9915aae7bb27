"""Pure codec of swtpm's control channel (``--ctrl type=unixio``) and of the TPM data channel.

Theory of operation
-------------------
The control channel is a byte stream with no framing of its own (swtpm
``include/swtpm/tpm_ioctl.h``, ``src/swtpm/ctrlchannel.c``): a request is a 4-byte big-endian
command code followed by that command's ``req`` struct; a reply is the ``resp`` part of the union,
starting with a big-endian ``u32 tpm_result``. Every integer is big-endian. A client never
pipelines: it writes one request and reads its reply before the next one.

So a request's length follows from its code (and, for HASH_DATA / SET_STATEBLOB, from a length in
its header), while a reply's length follows from the request it answers, from its own result
field, and from whether the TPM is running: swtpm answers most errors with a bare 4-byte result,
but GET_STATEBLOB and GET_TPMESTABLISHED keep their full shape while the TPM is running. That is
why reply decoding takes the request and the run state (:class:`TpmRunState` tracks it from the
traffic itself).

The quirks of the two real producers are data, in :data:`QUIRKS`, each citing its source.

Layers, one per name:

- request dataclasses (:class:`Init`, :class:`GetStateBlob` …) with ``encode()``;
  :func:`decode_request` (one whole message) and :class:`RequestDecoder` (incremental);
- reply dataclasses with ``encode()``; :func:`decode_reply` and :class:`ReplyDecoder`;
  :func:`fault_reply` builds an error reply in the shape the client will read;
- :class:`TpmRunState`: running / stopped / terminated, locality, from requests and replies;
- :class:`TpmPacketFramer`: splits the data channel into TPM 2.0 command/response packets.

Nothing here does I/O: callers own the sockets and the file descriptors passed with
CMD_SET_DATAFD (which travel out of band, never in these bytes).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import Enum, IntEnum, IntFlag
from typing import ClassVar, TypeAlias

from evidence.errors import ParseError, TruncatedError, UnsupportedError

__all__ = [
    "MAX_HASH_DATA",
    "MAX_STATE_BLOB",
    "MAX_TPM_PACKET",
    "QUIRKS",
    "BlobType",
    "BufferSizeReply",
    "CancelTpmCmd",
    "CapabilityReply",
    "ConfigReply",
    "CtrlCmd",
    "EstablishedReply",
    "GetCapability",
    "GetConfig",
    "GetInfo",
    "GetStateBlob",
    "GetTpmEstablished",
    "HashData",
    "HashEnd",
    "HashStart",
    "InfoReply",
    "Init",
    "LockStorage",
    "PtmCap",
    "PtmResult",
    "Quirk",
    "Reply",
    "ReplyDecoder",
    "ReplyKind",
    "Request",
    "RequestDecoder",
    "ResetTpmEstablished",
    "ResultReply",
    "RunState",
    "SetBufferSize",
    "SetDataFd",
    "SetLocality",
    "SetStateBlob",
    "Shutdown",
    "StateBlobReply",
    "Stop",
    "StoreVolatile",
    "TpmPacketFramer",
    "TpmRunState",
    "decode_reply",
    "decode_request",
    "fault_reply",
    "reply_kind",
]

#: Largest state blob the codec accepts in either direction. swtpm itself refuses blobs above
#: 512 KiB on SET_STATEBLOB (protocols.md §1.3); the bound keeps a hostile length from making us
#: buffer gigabytes.
MAX_STATE_BLOB = 4 * 1024 * 1024
#: ``ptm_hdata.u.req.data`` is 4096 bytes (tpm_ioctl.h).
MAX_HASH_DATA = 4096
#: GET_INFO's ``resp.buffer`` is 4096 bytes (tpm_ioctl.h ``ptm_getinfo``).
MAX_INFO_DATA = 4096
#: Largest TPM 2.0 packet on the data channel (swtpm's maximum buffer size, SET_BUFFERSIZE max).
MAX_TPM_PACKET = 4096

_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")


class CtrlCmd(IntEnum):
    """Command codes (``enum`` in tpm_ioctl.h); the ioctl numbers are ``_IO*('P', code-1)``."""

    CMD_GET_CAPABILITY = 0x01
    CMD_INIT = 0x02
    CMD_SHUTDOWN = 0x03
    CMD_GET_TPMESTABLISHED = 0x04
    CMD_SET_LOCALITY = 0x05
    CMD_HASH_START = 0x06
    CMD_HASH_DATA = 0x07
    CMD_HASH_END = 0x08
    CMD_CANCEL_TPM_CMD = 0x09
    CMD_STORE_VOLATILE = 0x0A
    CMD_RESET_TPMESTABLISHED = 0x0B
    CMD_GET_STATEBLOB = 0x0C
    CMD_SET_STATEBLOB = 0x0D
    CMD_STOP = 0x0E
    CMD_GET_CONFIG = 0x0F
    CMD_SET_DATAFD = 0x10
    CMD_SET_BUFFERSIZE = 0x11
    CMD_GET_INFO = 0x12
    CMD_LOCK_STORAGE = 0x13


class BlobType(IntEnum):
    """``PTM_BLOB_TYPE_*``: which state file a GET/SET_STATEBLOB moves."""

    PERMANENT = 1
    VOLATILE = 2
    SAVESTATE = 3


class PtmResult(IntEnum):
    """TPM 1.2 result codes swtpm uses on the control channel (``ctrlchannel.c`` ``err_*``)."""

    TPM_SUCCESS = 0x00
    TPM_BAD_PARAMETER = 0x03
    TPM_FAIL = 0x09
    TPM_BAD_ORDINAL = 0x0A
    TPM_SIZE = 0x17
    TPM_IOERROR = 0x1F
    TPM_BAD_LOCALITY = 0x3D
    #: TPM_NON_FATAL + 0: SAVESTATE blob absent. QEMU tolerates results with bit 0x800 set.
    TPM_RETRY = 0x800


class PtmCap(IntFlag):
    """Capability bits of CMD_GET_CAPABILITY (``PTM_CAP_*``)."""

    INIT = 1 << 0
    SHUTDOWN = 1 << 1
    GET_TPMESTABLISHED = 1 << 2
    SET_LOCALITY = 1 << 3
    HASHING = 1 << 4
    CANCEL_TPM_CMD = 1 << 5
    STORE_VOLATILE = 1 << 6
    RESET_TPMESTABLISHED = 1 << 7
    GET_STATEBLOB = 1 << 8
    SET_STATEBLOB = 1 << 9
    STOP = 1 << 10
    GET_CONFIG = 1 << 11
    SET_DATAFD = 1 << 12
    SET_BUFFERSIZE = 1 << 13
    GET_INFO = 1 << 14
    SEND_COMMAND_HEADER = 1 << 15
    LOCK_STORAGE = 1 << 16


#: ``PTM_INIT_FLAG_DELETE_VOLATILE``: QEMU sets it on the INIT after an incoming migration.
INIT_FLAG_DELETE_VOLATILE = 1
#: ``PTM_STATE_FLAG_DECRYPTED`` (request) / ``PTM_STATE_FLAG_ENCRYPTED`` (reply, SET request).
STATE_FLAG_DECRYPTED = 1
STATE_FLAG_ENCRYPTED = 2


@dataclass(frozen=True)
class Quirk:
    """One producer quirk the codec accounts for, with where it comes from."""

    id: str
    description: str
    source: str


QUIRKS: tuple[Quirk, ...] = (
    Quirk(
        "qemu.ctrl.padded_locality",
        "QEMU sends SET_LOCALITY and RESET_TPMESTABLISHED with the whole 4-byte union "
        "(u8 loc + 3 zero bytes); swtpm accepts any body of at least one byte. The codec keeps "
        "up to 3 padding bytes so re-encoding gives QEMU's exact bytes.",
        "qemu backends/tpm/tpm_emulator.c tpm_emulator_set_locality / "
        "tpm_emulator_reset_tpm_established_flag (sizeof(ptm_loc), sizeof(ptm_reset_est)); "
        "swtpm src/swtpm/ctrlchannel.c `n < sizeof(pl->u.req.loc)`",
    ),
    Quirk(
        "qemu.ctrl.capability_be64",
        "GET_CAPABILITY's reply is one big-endian u64 of capability bits, which QEMU reads with "
        "be64_to_cpu; its upper half is where other replies keep tpm_result (always 0).",
        "swtpm ctrlchannel.c `*ptm_caps = htobe64(...)`; qemu tpm_emulator_probe_caps",
    ),
    Quirk(
        "swtpm.ctrl.bare_error_reply",
        "Errors are a bare 4-byte result, except GET_STATEBLOB and GET_TPMESTABLISHED while the "
        "TPM is running, which keep their full reply shape; SET_BUFFERSIZE and GET_INFO are "
        "full-size only on success.",
        "swtpm ctrlchannel.c err_not_running / err_bad_input / ctrlchannel_return_state",
    ),
    Quirk(
        "swtpm.ctrl.stateblob_one_reply",
        "Over a socket GET_STATEBLOB answers a 16-byte header (result, flags, totlength, length) "
        "followed by the whole blob from `offset`; the body follows only when result is 0. "
        "The 3 KiB chunking of PTM_STATE_BLOB_SIZE is a CUSE artefact.",
        "swtpm ctrlchannel.c ctrlchannel_return_state (writev of header + blob)",
    ),
    Quirk(
        "qemu.ctrl.setstateblob_split",
        "QEMU writes SET_STATEBLOB's 16-byte header and the blob body as separate writes and "
        "reads one 4-byte result after the body.",
        "qemu tpm_emulator_set_state_blob",
    ),
    Quirk(
        "qemu.ctrl.savestate_0x800",
        "GET_STATEBLOB(SAVESTATE) on a TPM 2 answers result 0x800 (TPM_RETRY, no such blob) with "
        "an empty header; QEMU accepts results with bit 0x800 set.",
        "platform-notes 'control-channel bridge'; qemu tpm_emulator_get_state_blob "
        "`(res & 0x800) == 0`",
    ),
)


def _u32(value: int) -> bytes:
    return _U32.pack(value)


def _check_u(owner: str, name: str, value: object, bits: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < (1 << bits):
        raise ValueError(f"{owner}.{name} must be an unsigned {bits}-bit int, got {value!r}")


def _check_bytes(owner: str, name: str, value: object, limit: int) -> None:
    if not isinstance(value, bytes) or len(value) > limit:
        raise ValueError(f"{owner}.{name} must be bytes of at most {limit}, got {value!r:.40}")


# ----------------------------------------------------------------------------- requests


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


def _cmd_name(code: int) -> str:
    try:
        return CtrlCmd(code).name
    except ValueError:
        return f"0x{code:08x}"


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


# ----------------------------------------------------------------------------- replies


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


# ----------------------------------------------------------------------------- run state


class RunState(Enum):
    """The emulated TPM's state as the control traffic shows it."""

    STOPPED = "stopped"  # fresh swtpm without not-need-init, after STOP or a failed INIT
    RUNNING = "running"  # after a successful INIT
    TERMINATED = "terminated"  # after SHUTDOWN: the swtpm process exits


@dataclass
class TpmRunState:
    """Follows INIT/STOP/SHUTDOWN/SET_LOCALITY and their replies (the codec's only state).

    Attributes:
        state: running, stopped or terminated.
        locality: the last locality swtpm accepted (None before any SET_LOCALITY).
        saw_get_stateblob: a GET_STATEBLOB was answered since the last INIT.
    """

    state: RunState = RunState.STOPPED
    locality: int | None = None
    saw_get_stateblob: bool = False
    buffersize: int | None = None

    @property
    def running(self) -> bool:
        return self.state is RunState.RUNNING

    def apply(self, request: Request, reply: Reply) -> None:
        """Update from one request and swtpm's reply to it."""
        result = reply.result
        if isinstance(request, Init):
            self.state = RunState.RUNNING if result == 0 else RunState.STOPPED
            self.saw_get_stateblob = False
        elif isinstance(request, Stop):
            if result == 0:
                self.state = RunState.STOPPED
        elif isinstance(request, Shutdown):
            self.state = RunState.TERMINATED
        elif isinstance(request, SetLocality):
            if result == 0:
                self.locality = request.locality
        elif isinstance(request, GetStateBlob):
            self.saw_get_stateblob = True
        elif isinstance(request, SetBufferSize) and isinstance(reply, BufferSizeReply):
            self.buffersize = reply.buffersize


# ----------------------------------------------------------------------------- data channel

#: TPM 2.0 response/command header: ``u16 tag, u32 size, u32 code`` (Part 1 §18).
TPM_HEADER_SIZE = 10


class TpmPacketFramer:
    """Splits one direction of the data channel into whole TPM packets by their size field.

    The bytes of every packet are returned unchanged. A size below the 10-byte header or above
    ``max_size`` cannot be framed and raises ParseError (the stream is then unusable).
    """

    def __init__(self, max_size: int = MAX_TPM_PACKET, what: str = "TPM packet") -> None:
        self._buf = bytearray()
        self._max = max_size
        self._what = what
        self._offset = 0

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes) -> None:
        self._buf += data

    def next_packet(self) -> bytes | None:
        if len(self._buf) < 6:
            return None
        size = _U32.unpack_from(self._buf, 2)[0]
        if not TPM_HEADER_SIZE <= size <= self._max:
            raise ParseError(
                f"{self._what}.size", self._offset + 2, f"{TPM_HEADER_SIZE}..{self._max}", str(size)
            )
        if len(self._buf) < size:
            return None
        packet = bytes(self._buf[:size])
        del self._buf[:size]
        self._offset += size
        return packet
