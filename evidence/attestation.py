"""The canonical vPCR attestation message: what a VM's vAIK signs (patent TCM_Sign(vPCR, nonce)).

The host daemon reads the VM's vPCRs through the bridge, encodes them with the VM UUID and the
verifier's nonce as below, and has the host TPM sign the message with the VM's vAIK
(``TPM2_Hash`` for the ticket, then ``TPM2_Sign``). The verifier checks that signature with
:func:`evidence.tpm2.verify_signature` and decodes the message with
:func:`parse_attestation_message`. Both directions are pure and exact: encoding a parsed message
gives the same bytes back, and there is exactly one encoding of each message.

Layout (version 1; every integer big-endian, as TPM structures are)::

    offset  size      field
    0       8         magic          b"VTPMVPCR" (0x5654504d56504352)
    8       2         version        1
    10      16        vm_uuid        the VM's UUID, RFC 4122 byte order (uuid.UUID.bytes)
    26      2         nonce_size     1..64
    28      n         nonce          the verifier's nonce
    28+n    2         hash_alg       TPM_ALG_ID of the vPCR bank (0x000B sha256, 0x0004 sha1,
                                     0x000C sha384, 0x000D sha512, 0x0012 sm3_256)
    30+n    1         sizeof_select  3 (PCR 0-23, as TPMS_PCR_SELECTION)
    31+n    3         pcr_select     bitmap, bit i of byte i//8 = PCR i; at least one bit set
    34+n    k*d       pcr_values     the selected PCRs' values, ascending index, d = digest size

Why a magic of our own: a restricted key (the vAIK) signs through ``TPM2_Sign`` only digests
that carry a ``TPM2_Hash`` ticket, and the TPM refuses that ticket for data starting with
TPM_GENERATED_VALUE (0xff544347). Our magic starts with ``V`` (0x56), so a signed vPCR message
can never be mistaken for, or be turned into, a TPM-made TPMS_ATTEST (a quote or a certify), and
:func:`evidence.tpm2.verify_signature` refuses any message that starts with that value.

The message binds the VM (UUID), freshness (nonce) and state (vPCRs). The tenant (``cert_user``)
is bound by CertvAIK and CertAuthKey, whose qualifying data is ``SHA-256(cert_user ‖ nonce)`` over
the same nonce (ARCHITECTURE.md §2).
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final

from evidence._algorithms import HASH_ALGS
from evidence._reader import Reader
from evidence.errors import ParseError, UnsupportedError

__all__ = [
    "MAGIC",
    "MAX_NONCE_SIZE",
    "PCR_SELECT_SIZE",
    "VERSION",
    "AttestationMessage",
    "encode_attestation_message",
    "parse_attestation_message",
]

MAGIC: Final = b"VTPMVPCR"
"""The first 8 bytes of every message (never TPM_GENERATED_VALUE, see the module docstring)."""
VERSION: Final = 1
"""The only message version this module reads and writes."""
MAX_NONCE_SIZE: Final = 64
"""Largest nonce a message carries (the size of TPM2B_DATA's buffer)."""
PCR_SELECT_SIZE: Final = 3
"""Bytes of the PCR bitmap: 24 PCRs, as a PC Client TPM has."""

_NUM_PCRS: Final = 8 * PCR_SELECT_SIZE


@dataclass(frozen=True)
class AttestationMessage:
    """A decoded vPCR message. Untrusted until its vAIK signature is verified.

    Attributes:
        vm_uuid: the VM the host says it read the vPCRs of.
        nonce: the verifier's nonce (1..64 bytes).
        hash_alg: TPM_ALG_ID of the vPCR bank (a key of ``evidence._algorithms.HASH_ALGS``).
        pcrs: PCR index (0..23) → value, ascending; each value has the bank's digest size.
    """

    vm_uuid: uuid.UUID
    nonce: bytes
    hash_alg: int
    pcrs: Mapping[int, bytes]

    def __post_init__(self) -> None:
        if not isinstance(self.vm_uuid, uuid.UUID):
            raise TypeError(f"vm_uuid must be a uuid.UUID, got {type(self.vm_uuid).__name__}")
        if not isinstance(self.nonce, bytes) or not 1 <= len(self.nonce) <= MAX_NONCE_SIZE:
            raise ValueError(f"nonce must be 1..{MAX_NONCE_SIZE} bytes")
        alg = HASH_ALGS.get(self.hash_alg)
        if alg is None:
            raise ValueError(f"hash_alg 0x{self.hash_alg:04x} is not a known hash TPM_ALG_ID")
        if not self.pcrs:
            raise ValueError("a message carries at least one PCR")
        for index, value in self.pcrs.items():
            if not isinstance(index, int) or not 0 <= index < _NUM_PCRS:
                raise ValueError(f"PCR index must be 0..{_NUM_PCRS - 1}, got {index!r}")
            if not isinstance(value, bytes) or len(value) != alg.digest_size:
                raise ValueError(f"PCR {index} must be a {alg.digest_size}-byte {alg.name} value")
        object.__setattr__(self, "pcrs", MappingProxyType(dict(sorted(self.pcrs.items()))))

    @property
    def bank(self) -> str:
        """The bank name, ``"sha256"`` etc."""
        return HASH_ALGS[self.hash_alg].name


def encode_attestation_message(message: AttestationMessage) -> bytes:
    """Encode ``message`` in the canonical layout of the module docstring."""
    bitmap = bytearray(PCR_SELECT_SIZE)
    for index in message.pcrs:
        bitmap[index // 8] |= 1 << (index % 8)
    return b"".join(
        [
            MAGIC,
            VERSION.to_bytes(2, "big"),
            message.vm_uuid.bytes,
            len(message.nonce).to_bytes(2, "big"),
            message.nonce,
            message.hash_alg.to_bytes(2, "big"),
            bytes([PCR_SELECT_SIZE]),
            bytes(bitmap),
            *message.pcrs.values(),
        ]
    )


def parse_attestation_message(data: bytes) -> AttestationMessage:
    """Decode a vPCR message that fills ``data`` exactly.

    Args:
        data: the signed message bytes.

    Returns:
        The message, unverified.

    Raises:
        UnsupportedError: another version, or a bank hash we do not know by TPM_ALG_ID.
        TruncatedError: ``data`` ends inside the message.
        ParseError: wrong magic, a nonce of 0 or more than 64 bytes, another bitmap size, an
            empty selection, trailing bytes.
    """
    if not isinstance(data, bytes):
        raise TypeError(f"data must be bytes, got {type(data).__name__}")
    r = Reader(data)
    offset = r.offset
    magic = r.take(len(MAGIC), "vPCR message.magic")
    if magic != MAGIC:
        raise ParseError("vPCR message.magic", offset, f"{MAGIC!r}", repr(magic))
    offset = r.offset
    version = r.u16be("vPCR message.version")
    if version != VERSION:
        raise UnsupportedError("vPCR message.version", offset, f"version {VERSION}", str(version))
    vm_uuid = uuid.UUID(bytes=r.take(16, "vPCR message.vm_uuid"))
    offset = r.offset
    nonce_size = r.u16be("vPCR message.nonce_size")
    if not 1 <= nonce_size <= MAX_NONCE_SIZE:
        raise ParseError("vPCR message.nonce_size", offset, f"1..{MAX_NONCE_SIZE}", str(nonce_size))
    nonce = r.take(nonce_size, "vPCR message.nonce")
    offset = r.offset
    hash_alg = r.u16be("vPCR message.hash_alg")
    alg = HASH_ALGS.get(hash_alg)
    if alg is None:
        raise UnsupportedError(
            "vPCR message.hash_alg",
            offset,
            "sha1, sha256, sha384, sha512 or sm3_256 (TPM_ALG_ID)",
            f"0x{hash_alg:04x}",
        )
    offset = r.offset
    size = r.u8("vPCR message.sizeof_select")
    if size != PCR_SELECT_SIZE:
        raise ParseError("vPCR message.sizeof_select", offset, str(PCR_SELECT_SIZE), str(size))
    offset = r.offset
    bitmap = r.take(PCR_SELECT_SIZE, "vPCR message.pcr_select")
    indices = [i for i in range(_NUM_PCRS) if bitmap[i // 8] >> (i % 8) & 1]
    if not indices:
        raise ParseError("vPCR message.pcr_select", offset, "at least one PCR selected", "none")
    pcrs = {i: r.take(alg.digest_size, f"vPCR message.pcr_values[{i}]") for i in indices}
    r.expect_end("vPCR message")
    return AttestationMessage(vm_uuid, nonce, hash_alg, pcrs)
