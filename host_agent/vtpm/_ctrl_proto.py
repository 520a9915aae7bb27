"""The control channel's vocabulary: bounds, command codes, result codes, flags and quirks.

Part of :mod:`host_agent.vtpm.ctrl_codec`, whose docstring has the theory of operation; import
from there. This module holds what the request and reply codecs share: the size bounds, the
``tpm_ioctl.h`` enums and flags, the producer :data:`QUIRKS`, and the small integer and field
checks every message validates itself with. It imports no other part, so both directions build
on it without a cycle.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum, IntFlag

__all__ = [
    "INIT_FLAG_DELETE_VOLATILE",
    "MAX_HASH_DATA",
    "MAX_INFO_DATA",
    "MAX_STATE_BLOB",
    "QUIRKS",
    "STATE_FLAG_DECRYPTED",
    "STATE_FLAG_ENCRYPTED",
    "BlobType",
    "CtrlCmd",
    "PtmCap",
    "PtmResult",
    "Quirk",
]

#: Largest state blob the codec accepts in either direction. swtpm itself refuses blobs above
#: 512 KiB on SET_STATEBLOB (protocols.md §1.3); the bound keeps a hostile length from making us
#: buffer gigabytes.
MAX_STATE_BLOB = 4 * 1024 * 1024
#: ``ptm_hdata.u.req.data`` is 4096 bytes (tpm_ioctl.h).
MAX_HASH_DATA = 4096
#: GET_INFO's ``resp.buffer`` is 4096 bytes (tpm_ioctl.h ``ptm_getinfo``).
MAX_INFO_DATA = 4096

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


def _cmd_name(code: int) -> str:
    try:
        return CtrlCmd(code).name
    except ValueError:
        return f"0x{code:08x}"
