"""TPM 2.0 constants: algorithm IDs, structure tags, curves, object attributes, TPM2B size caps.

Part of :mod:`evidence.tpm2`; import from there. The vocabulary of TPM 2.0 Library Part 2 §6 and
§8.3 as enums, and the sets of algorithms and tags each structure admits (its TPMI_* interface
type), so that the structure codecs and the signature checks read one table. Nothing here parses,
hashes or calls ``cryptography``.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import IntEnum, IntFlag
from types import MappingProxyType
from typing import Final

from evidence._algorithms import HASH_ALGS

__all__ = [
    "TPM2B_MAX_SIZES",
    "TPM_GENERATED_VALUE",
    "TpmAlgId",
    "TpmEccCurve",
    "TpmSt",
    "TpmaObject",
]


# --------------------------------------------------------------------------------------------
# Constants (Part 2 §6)


class TpmAlgId(IntEnum):
    """TPM_ALG_ID (Part 2 §6.3, TCG Algorithm Registry)."""

    TPM_ALG_ERROR = 0x0000
    TPM_ALG_RSA = 0x0001
    TPM_ALG_TDES = 0x0003
    TPM_ALG_SHA1 = 0x0004
    TPM_ALG_HMAC = 0x0005
    TPM_ALG_AES = 0x0006
    TPM_ALG_MGF1 = 0x0007
    TPM_ALG_KEYEDHASH = 0x0008
    TPM_ALG_XOR = 0x000A
    TPM_ALG_SHA256 = 0x000B
    TPM_ALG_SHA384 = 0x000C
    TPM_ALG_SHA512 = 0x000D
    TPM_ALG_NULL = 0x0010
    TPM_ALG_SM3_256 = 0x0012
    TPM_ALG_SM4 = 0x0013
    TPM_ALG_RSASSA = 0x0014
    TPM_ALG_RSAES = 0x0015
    TPM_ALG_RSAPSS = 0x0016
    TPM_ALG_OAEP = 0x0017
    TPM_ALG_ECDSA = 0x0018
    TPM_ALG_ECDH = 0x0019
    TPM_ALG_ECDAA = 0x001A
    TPM_ALG_SM2 = 0x001B
    TPM_ALG_ECSCHNORR = 0x001C
    TPM_ALG_ECMQV = 0x001D
    TPM_ALG_KDF1_SP800_56A = 0x0020
    TPM_ALG_KDF2 = 0x0021
    TPM_ALG_KDF1_SP800_108 = 0x0022
    TPM_ALG_ECC = 0x0023
    TPM_ALG_SYMCIPHER = 0x0025
    TPM_ALG_CAMELLIA = 0x0026
    TPM_ALG_SHA3_256 = 0x0027
    TPM_ALG_SHA3_384 = 0x0028
    TPM_ALG_SHA3_512 = 0x0029
    TPM_ALG_CMAC = 0x003F
    TPM_ALG_CTR = 0x0040
    TPM_ALG_OFB = 0x0041
    TPM_ALG_CBC = 0x0042
    TPM_ALG_CFB = 0x0043
    TPM_ALG_ECB = 0x0044


class TpmSt(IntEnum):
    """TPM_ST structure tags (Part 2 §6.9); the TPM_ST_ATTEST_* values are TPMI_ST_ATTEST."""

    TPM_ST_RSP_COMMAND = 0x00C4
    TPM_ST_NULL = 0x8000
    TPM_ST_NO_SESSIONS = 0x8001
    TPM_ST_SESSIONS = 0x8002
    TPM_ST_ATTEST_NV = 0x8014
    TPM_ST_ATTEST_COMMAND_AUDIT = 0x8015
    TPM_ST_ATTEST_SESSION_AUDIT = 0x8016
    TPM_ST_ATTEST_CERTIFY = 0x8017
    TPM_ST_ATTEST_QUOTE = 0x8018
    TPM_ST_ATTEST_TIME = 0x8019
    TPM_ST_ATTEST_CREATION = 0x801A
    TPM_ST_ATTEST_NV_DIGEST = 0x801C
    TPM_ST_CREATION = 0x8021
    TPM_ST_VERIFIED = 0x8022
    TPM_ST_AUTH_SECRET = 0x8023
    TPM_ST_HASHCHECK = 0x8024
    TPM_ST_AUTH_SIGNED = 0x8025
    TPM_ST_FU_MANIFEST = 0x8029


class TpmEccCurve(IntEnum):
    """TPM_ECC_CURVE (Part 2 §6.4, TCG Algorithm Registry)."""

    TPM_ECC_NONE = 0x0000
    TPM_ECC_NIST_P192 = 0x0001
    TPM_ECC_NIST_P224 = 0x0002
    TPM_ECC_NIST_P256 = 0x0003
    TPM_ECC_NIST_P384 = 0x0004
    TPM_ECC_NIST_P521 = 0x0005
    TPM_ECC_BN_P256 = 0x0010
    TPM_ECC_BN_P638 = 0x0011
    TPM_ECC_SM2_P256 = 0x0020


class TpmaObject(IntFlag):
    """TPMA_OBJECT bits (Part 2 §8.3), spelled as the TSS headers spell them."""

    FIXEDTPM = 0x00000002
    STCLEAR = 0x00000004
    FIXEDPARENT = 0x00000010
    SENSITIVEDATAORIGIN = 0x00000020
    USERWITHAUTH = 0x00000040
    ADMINWITHPOLICY = 0x00000080
    NODA = 0x00000400
    ENCRYPTEDDUPLICATION = 0x00000800
    RESTRICTED = 0x00010000
    DECRYPT = 0x00020000
    SIGN_ENCRYPT = 0x00040000
    X509SIGN = 0x00080000


TPM_GENERATED_VALUE: Final = 0xFF544347
"""TPM_GENERATED (Part 2 §6.2): the magic that opens every TPMS_ATTEST the TPM signs."""

TPM2B_MAX_SIZES: Final[Mapping[str, int]] = MappingProxyType(
    {
        "TPM2B_DIGEST": 64,  # sizeof(TPMU_HA)
        "TPM2B_DATA": 66,  # sizeof(TPMT_HA)
        "TPM2B_NAME": 66,  # sizeof(TPMU_NAME)
        "TPM2B_ECC_PARAMETER": 128,  # MAX_ECC_KEY_BYTES, generously (P-521 needs 66)
        "TPM2B_PUBLIC_KEY_RSA": 512,  # MAX_RSA_KEY_BYTES (RSA-4096)
        "TPM2B_PUBLIC": 0xFFFF,  # bounded by the bytes that remain
        "TPM2B_ATTEST": 0xFFFF,  # bounded by the bytes that remain
    }
)
"""Largest ``size`` accepted for each TPM2B type (Part 2 buffer bounds of each structure)."""


def _algs(names: str) -> frozenset[TpmAlgId]:
    return frozenset(TpmAlgId[f"TPM_ALG_{name}"] for name in names.split())


def _sts(names: str) -> frozenset[TpmSt]:
    return frozenset(TpmSt[f"TPM_ST_ATTEST_{name}"] for name in names.split())


_NULL: Final = TpmAlgId.TPM_ALG_NULL
_HASH_ALGS: Final = frozenset(HASH_ALGS)
_SYM_OBJECT_ALGS: Final = _algs("AES SM4 CAMELLIA")  # TPMI_ALG_SYM_OBJECT
_SYM_MODES: Final = _algs("CTR OFB CBC CFB ECB NULL")  # TPMI_ALG_SYM_MODE+
_RSA_SCHEMES: Final = _algs("RSASSA RSAPSS RSAES OAEP NULL")  # TPMI_ALG_RSA_SCHEME+
_ECC_SCHEMES: Final = _algs("ECDSA ECDAA SM2 ECSCHNORR ECDH ECMQV NULL")  # TPMI_ALG_ECC_SCHEME+
_KDF_SCHEMES: Final = _algs("MGF1 KDF1_SP800_56A KDF2 KDF1_SP800_108 NULL")  # TPMI_ALG_KDF+
_SIG_SCHEMES: Final = _algs("RSASSA RSAPSS ECDSA")  # the TPMI_ALG_SIG_SCHEME we verify
_RSA_SIG_SCHEMES: Final = _algs("RSASSA RSAPSS")
_RSA_KEY_BITS: Final = frozenset({1024, 2048, 3072, 4096})  # TPMI_RSA_KEY_BITS
_ATTEST_TYPES: Final = _sts("CERTIFY QUOTE")
_OTHER_ATTEST_TYPES: Final = _sts("NV COMMAND_AUDIT SESSION_AUDIT TIME CREATION NV_DIGEST")
_PCR_SELECT_MAX: Final = 32  # PCR_SELECT_MAX: 256 PCRs is far beyond any TPM
_HASH_COUNT_MAX: Final = 16  # HASH_COUNT: banks in one TPML_PCR_SELECTION
