"""Bytes ↔ tpm2-pytss structures at the port boundary, and the sealed-blob container.

Stored blobs come back from disk or the store, i.e. from outside: malformed input raises
:class:`KeyBlobError`, never a tpm2-pytss exception.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from tpm2_pytss.constants import TPM2_ALG
from tpm2_pytss.types import (
    TPM2B_PRIVATE,
    TPM2B_PUBLIC,
    TPMT_PUBLIC,
    TPMT_SYM_DEF_OBJECT,
    TPMU_SYM_KEY_BITS,
    TPMU_SYM_MODE,
)

from .errors import KeyBlobError
from .port import KeyPolicy

__all__ = ["SealedBlob", "private_from_bytes", "public_from_bytes", "sym_aes128cfb", "unmarshal"]


def unmarshal(cls: Any, data: bytes, what: str) -> Any:
    """``cls.unmarshal(data)``, whole input, or KeyBlobError."""
    try:
        obj, used = cls.unmarshal(data)
    except Exception as err:  # tpm2-pytss raises assorted errors for garbage
        raise KeyBlobError(f"{what} does not unmarshal: {err}") from err
    if used != len(data):
        raise KeyBlobError(f"{what}: {len(data) - used} trailing bytes")
    return obj


def public_from_bytes(data: bytes) -> TPM2B_PUBLIC:
    """Marshalled TPMT_PUBLIC → TPM2B_PUBLIC."""
    return TPM2B_PUBLIC(publicArea=unmarshal(TPMT_PUBLIC, data, "TPMT_PUBLIC"))


def private_from_bytes(data: bytes) -> TPM2B_PRIVATE:
    """Marshalled TPM2B_PRIVATE → TPM2B_PRIVATE."""
    return unmarshal(TPM2B_PRIVATE, data, "TPM2B_PRIVATE")


def sym_aes128cfb() -> TPMT_SYM_DEF_OBJECT:
    return TPMT_SYM_DEF_OBJECT(
        algorithm=TPM2_ALG.AES,
        keyBits=TPMU_SYM_KEY_BITS(aes=128),
        mode=TPMU_SYM_MODE(aes=TPM2_ALG.CFB),
    )


@dataclass(frozen=True)
class SealedBlob:
    """A sealed data object: TPMT_PUBLIC + TPM2B_PRIVATE under the SRK, and its PCR binding."""

    public: bytes
    private: bytes
    policy: KeyPolicy

    FORMAT = "vtpm-trust/sealed/1"

    def to_bytes(self) -> bytes:
        return json.dumps(
            {
                "format": self.FORMAT,
                "public": self.public.hex(),
                "private": self.private.hex(),
                "policy": self.policy.to_json(),
            }
        ).encode()

    @classmethod
    def from_bytes(cls, blob: bytes) -> SealedBlob:
        try:
            obj = json.loads(blob)
            if not isinstance(obj, dict) or obj.get("format") != cls.FORMAT:
                raise KeyBlobError(f"sealed blob: format is not {cls.FORMAT}")
            if set(obj) != {"format", "public", "private", "policy"}:
                raise KeyBlobError("sealed blob: expected format, public, private, policy")
            return cls(
                bytes.fromhex(obj["public"]),
                bytes.fromhex(obj["private"]),
                KeyPolicy.from_json(obj["policy"]),
            )
        except (TypeError, ValueError, UnicodeDecodeError) as err:
            raise KeyBlobError(f"sealed blob: {err}") from err
