"""Hash algorithms by TPM_ALG_ID: the one table every codec shares.

TPM 2.0 Part 2 §6.3 (TPM_ALG_ID) and the TCG Algorithm Registry give the ids and digest sizes.
The TPM structure codec, the TCG2 event log and the IMA list all look algorithms up here.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import NamedTuple

__all__ = ["HASH_ALGS", "HASH_ALG_IDS", "HashAlg"]


class HashAlg(NamedTuple):
    """One hash algorithm.

    Attributes:
        name: the TCG registry name in lower case (``"sha256"``, ``"sm3_256"``).
        digest_size: digest length in bytes.
        hashlib_name: the name ``hashlib.new`` takes.
    """

    name: str
    digest_size: int
    hashlib_name: str


HASH_ALGS: MappingProxyType[int, HashAlg] = MappingProxyType(
    {
        0x0004: HashAlg("sha1", 20, "sha1"),  # TPM_ALG_SHA1
        0x000B: HashAlg("sha256", 32, "sha256"),  # TPM_ALG_SHA256
        0x000C: HashAlg("sha384", 48, "sha384"),  # TPM_ALG_SHA384
        0x000D: HashAlg("sha512", 64, "sha512"),  # TPM_ALG_SHA512
        0x0012: HashAlg("sm3_256", 32, "sm3"),  # TPM_ALG_SM3_256
    }
)
"""TPM_ALG_ID → hash algorithm."""

HASH_ALG_IDS: MappingProxyType[str, int] = MappingProxyType(
    {alg.name: alg_id for alg_id, alg in HASH_ALGS.items()}
)
"""Registry name (``"sha256"``) → TPM_ALG_ID."""
