"""TPM 2.0 structures: TPMT_PUBLIC, TPMS_ATTEST, TPMT_SIGNATURE, TPML_PCR_SELECTION, TPM2B_*.

Everything here follows TPM 2.0 Library Part 2 ("Structures"), big-endian as the TPM marshals it.

Rules this module lives by:

* ``X.unmarshal(data)`` takes the whole structure and nothing else: trailing bytes are an error. It
  returns a frozen dataclass or raises a :class:`~evidence.errors.ParseError` subclass carrying the
  byte offset and what was expected there (invariant 4: never a traceback, never a partial result).
* ``x.marshal()`` gives back exactly the bytes that were parsed, so signatures and Names can be
  recomputed from the dataclasses. Constructors validate shape and raise ``ValueError`` on misuse.
* Variants we do not handle (another attestation type, an HMAC signature, a KEYEDHASH object) raise
  :class:`~evidence.errors.UnsupportedError`: they are reported, never guessed at.
* A size field is checked against its spec maximum and against the bytes that remain before any
  allocation, so a TPM2B claiming 65535 bytes in a 40-byte input is a short error, not a read.
* Parsing checks shape, never truth: :func:`verify_attest_signature` and :func:`verify_signature`
  are the only functions here that say a signature holds.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from enum import IntEnum, IntFlag
from types import MappingProxyType
from typing import Final, TypeVar

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, encode_dss_signature

from evidence._algorithms import HASH_ALGS
from evidence._reader import Reader
from evidence.errors import ParseError, SignatureError, UnsupportedError

__all__ = [
    "TPM2B_MAX_SIZES",
    "TPM_GENERATED_VALUE",
    "TpmAlgId",
    "TpmEccCurve",
    "TpmSt",
    "TpmaObject",
    "TpmlPcrSelection",
    "TpmsAttest",
    "TpmsCertifyInfo",
    "TpmsClockInfo",
    "TpmsEccParms",
    "TpmsEccPoint",
    "TpmsPcrSelection",
    "TpmsQuoteInfo",
    "TpmsRsaParms",
    "TpmsSignatureEcc",
    "TpmsSignatureRsa",
    "TpmtPublic",
    "TpmtScheme",
    "TpmtSignature",
    "TpmtSymDefObject",
    "marshal_tpm2b",
    "marshal_tpm2b_attest",
    "marshal_tpm2b_public",
    "object_name",
    "public_key",
    "quote_pcr_digest",
    "unmarshal_tpm2b",
    "unmarshal_tpm2b_attest",
    "unmarshal_tpm2b_public",
    "verify_attest_signature",
    "verify_signature",
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
_EC_CURVES: Final[dict[int, Callable[[], ec.EllipticCurve]]] = {
    TpmEccCurve.TPM_ECC_NIST_P256: ec.SECP256R1,
    TpmEccCurve.TPM_ECC_NIST_P384: ec.SECP384R1,
    TpmEccCurve.TPM_ECC_NIST_P521: ec.SECP521R1,
}
_CRYPTO_HASHES: Final[dict[int, Callable[[], hashes.HashAlgorithm]]] = {
    TpmAlgId.TPM_ALG_SHA1: hashes.SHA1,
    TpmAlgId.TPM_ALG_SHA256: hashes.SHA256,
    TpmAlgId.TPM_ALG_SHA384: hashes.SHA384,
    TpmAlgId.TPM_ALG_SHA512: hashes.SHA512,
    TpmAlgId.TPM_ALG_SM3_256: hashes.SM3,
}


# --------------------------------------------------------------------------------------------
# Primitive helpers


def _alg_name(value: int) -> str:
    try:
        return f"{TpmAlgId(value).name} (0x{value:04x})"
    except ValueError:
        return f"unknown algorithm 0x{value:04x}"


def _st_name(value: int) -> str:
    try:
        return f"{TpmSt(value).name} (0x{value:04x})"
    except ValueError:
        return f"unknown tag 0x{value:04x}"


def _read_alg(r: Reader, what: str, allowed: Collection[int]) -> int:
    """Read a TPM_ALG_ID that must be one of ``allowed``.

    A known algorithm in the wrong place raises UnsupportedError; an unknown value, ParseError.
    """
    offset = r.offset
    value = r.u16be(what)
    if value in allowed:
        return value
    expected = "one of " + ", ".join(TpmAlgId(a).name for a in sorted(allowed))
    if value in TpmAlgId._value2member_map_:
        raise UnsupportedError(what, offset, expected, _alg_name(value))
    raise ParseError(what, offset, expected, _alg_name(value))


def _read_tpm2b(r: Reader, what: str, kind: str) -> Reader:
    """Read a TPM2B ``size`` and return a reader over exactly that many bytes."""
    offset = r.offset
    size = r.u16be(f"{what}.size")
    limit = TPM2B_MAX_SIZES[kind]
    if size > limit:
        raise ParseError(f"{what}.size", offset, f"a {kind} of at most {limit} bytes", str(size))
    return r.sub(size, f"{what}.buffer")


def _read_tpm2b_bytes(r: Reader, what: str, kind: str) -> bytes:
    return _read_tpm2b(r, what, kind).rest()


def _u8(value: int) -> bytes:
    return value.to_bytes(1, "big")


def _u16(value: int) -> bytes:
    return value.to_bytes(2, "big")


def _u32(value: int) -> bytes:
    return value.to_bytes(4, "big")


def _u64(value: int) -> bytes:
    return value.to_bytes(8, "big")


def _check_uint(owner: str, name: str, value: object, bits: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < (1 << bits):
        raise ValueError(f"{owner}.{name} must be an unsigned {bits}-bit integer, got {value!r}")


def _check_tpm2b(owner: str, name: str, value: object, kind: str) -> None:
    limit = TPM2B_MAX_SIZES[kind]
    if not isinstance(value, bytes) or len(value) > limit:
        raise ValueError(f"{owner}.{name} must be bytes of at most {limit} ({kind})")


def _tpm2b(payload: bytes) -> bytes:
    return _u16(len(payload)) + payload


_T = TypeVar("_T")


def _exact(data: bytes, what: str, read: Callable[[Reader], _T]) -> _T:
    r = Reader(data)
    value = read(r)
    r.expect_end(what)
    return value


# --------------------------------------------------------------------------------------------
# TPM2B_* wrappers


def unmarshal_tpm2b(data: bytes, kind: str) -> bytes:
    """Unwrap one TPM2B structure that must fill ``data`` exactly.

    Args:
        data: ``size`` (UINT16) then ``size`` bytes, e.g. a TPM2B_DIGEST, TPM2B_DATA, TPM2B_NAME.
        kind: the TPM2B type name, a key of :data:`TPM2B_MAX_SIZES`; it sets the size cap.

    Returns:
        The ``buffer`` bytes.

    Raises:
        TruncatedError: ``size`` runs past the end of ``data``.
        ParseError: ``size`` exceeds the cap for ``kind``, or bytes follow the buffer.
    """
    if kind not in TPM2B_MAX_SIZES:
        raise ValueError(f"unknown TPM2B kind {kind!r}; known: {sorted(TPM2B_MAX_SIZES)}")
    return _exact(data, kind, lambda r: _read_tpm2b_bytes(r, kind, kind))


def marshal_tpm2b(payload: bytes, kind: str) -> bytes:
    """Wrap ``payload`` as the TPM2B ``kind`` (``size`` then bytes).

    Raises:
        ValueError: ``payload`` is longer than ``kind`` allows.
    """
    if kind not in TPM2B_MAX_SIZES:
        raise ValueError(f"unknown TPM2B kind {kind!r}; known: {sorted(TPM2B_MAX_SIZES)}")
    _check_tpm2b(kind, "buffer", payload, kind)
    return _tpm2b(payload)


# --------------------------------------------------------------------------------------------
# TPMT_PUBLIC and its parts (Part 2 §12.2)


@dataclass(frozen=True)
class TpmtSymDefObject:
    """TPMT_SYM_DEF_OBJECT (Part 2 §11.1.7): ``algorithm``, and for non-NULL keyBits and mode."""

    algorithm: int
    key_bits: int | None = None
    mode: int | None = None

    def __post_init__(self) -> None:
        _check_uint("TPMT_SYM_DEF_OBJECT", "algorithm", self.algorithm, 16)
        if self.algorithm == _NULL:
            if self.key_bits is not None or self.mode is not None:
                raise ValueError("TPMT_SYM_DEF_OBJECT with TPM_ALG_NULL has no keyBits or mode")
        else:
            _check_uint("TPMT_SYM_DEF_OBJECT", "keyBits", self.key_bits, 16)
            _check_uint("TPMT_SYM_DEF_OBJECT", "mode", self.mode, 16)

    @classmethod
    def _read(cls, r: Reader) -> TpmtSymDefObject:
        algorithm = _read_alg(r, "TPMT_SYM_DEF_OBJECT.algorithm", _SYM_OBJECT_ALGS | {_NULL})
        if algorithm == _NULL:
            return cls(algorithm)
        key_bits = r.u16be("TPMT_SYM_DEF_OBJECT.keyBits")
        mode = _read_alg(r, "TPMT_SYM_DEF_OBJECT.mode", _SYM_MODES)
        return cls(algorithm, key_bits, mode)

    def marshal(self) -> bytes:
        """Marshal as TPMT_SYM_DEF_OBJECT."""
        if self.key_bits is None or self.mode is None:
            return _u16(self.algorithm)
        return _u16(self.algorithm) + _u16(self.key_bits) + _u16(self.mode)


@dataclass(frozen=True)
class TpmtScheme:
    """TPMT_RSA_SCHEME, TPMT_ECC_SCHEME or TPMT_KDF_SCHEME (Part 2 §11.2).

    ``hash_alg`` is the details' hashAlg (absent for TPM_ALG_NULL and TPM_ALG_RSAES); ``count`` is
    present only for TPM_ALG_ECDAA (TPMS_SCHEME_ECDAA).
    """

    scheme: int
    hash_alg: int | None = None
    count: int | None = None

    def __post_init__(self) -> None:
        _check_uint("TPMT_SCHEME", "scheme", self.scheme, 16)
        has_hash = self.scheme not in (_NULL, TpmAlgId.TPM_ALG_RSAES)
        has_count = self.scheme == TpmAlgId.TPM_ALG_ECDAA
        if has_hash:
            _check_uint("TPMT_SCHEME", "hashAlg", self.hash_alg, 16)
        elif self.hash_alg is not None:
            raise ValueError(f"scheme {_alg_name(self.scheme)} has no hashAlg")
        if has_count:
            _check_uint("TPMT_SCHEME", "count", self.count, 16)
        elif self.count is not None:
            raise ValueError(f"scheme {_alg_name(self.scheme)} has no count")

    @classmethod
    def _read(cls, r: Reader, what: str, allowed: Collection[int]) -> TpmtScheme:
        scheme = _read_alg(r, f"{what}.scheme", allowed)
        if scheme in (_NULL, TpmAlgId.TPM_ALG_RSAES):
            return cls(scheme)
        hash_alg = _read_alg(r, f"{what}.details.hashAlg", _HASH_ALGS)
        if scheme == TpmAlgId.TPM_ALG_ECDAA:
            return cls(scheme, hash_alg, r.u16be(f"{what}.details.count"))
        return cls(scheme, hash_alg)

    def marshal(self) -> bytes:
        """Marshal as the TPMT_*_SCHEME it came from."""
        out = _u16(self.scheme)
        if self.hash_alg is not None:
            out += _u16(self.hash_alg)
        if self.count is not None:
            out += _u16(self.count)
        return out


@dataclass(frozen=True)
class TpmsRsaParms:
    """TPMS_RSA_PARMS (Part 2 §12.2.3.5). ``exponent`` 0 means the default 65537."""

    symmetric: TpmtSymDefObject
    scheme: TpmtScheme
    key_bits: int
    exponent: int = 0

    def __post_init__(self) -> None:
        _check_uint("TPMS_RSA_PARMS", "keyBits", self.key_bits, 16)
        _check_uint("TPMS_RSA_PARMS", "exponent", self.exponent, 32)

    @classmethod
    def _read(cls, r: Reader) -> TpmsRsaParms:
        symmetric = TpmtSymDefObject._read(r)
        scheme = TpmtScheme._read(r, "TPMS_RSA_PARMS.scheme", _RSA_SCHEMES)
        offset = r.offset
        key_bits = r.u16be("TPMS_RSA_PARMS.keyBits")
        if key_bits not in _RSA_KEY_BITS:
            raise UnsupportedError(
                "TPMS_RSA_PARMS.keyBits", offset, f"one of {sorted(_RSA_KEY_BITS)}", str(key_bits)
            )
        return cls(symmetric, scheme, key_bits, r.u32be("TPMS_RSA_PARMS.exponent"))

    def marshal(self) -> bytes:
        """Marshal as TPMS_RSA_PARMS."""
        return (
            self.symmetric.marshal()
            + self.scheme.marshal()
            + _u16(self.key_bits)
            + _u32(self.exponent)
        )


@dataclass(frozen=True)
class TpmsEccParms:
    """TPMS_ECC_PARMS (Part 2 §12.2.3.6)."""

    symmetric: TpmtSymDefObject
    scheme: TpmtScheme
    curve_id: int
    kdf: TpmtScheme

    def __post_init__(self) -> None:
        _check_uint("TPMS_ECC_PARMS", "curveID", self.curve_id, 16)

    @classmethod
    def _read(cls, r: Reader) -> TpmsEccParms:
        symmetric = TpmtSymDefObject._read(r)
        scheme = TpmtScheme._read(r, "TPMS_ECC_PARMS.scheme", _ECC_SCHEMES)
        offset = r.offset
        curve_id = r.u16be("TPMS_ECC_PARMS.curveID")
        if curve_id not in TpmEccCurve._value2member_map_ or curve_id == TpmEccCurve.TPM_ECC_NONE:
            raise ParseError(
                "TPMS_ECC_PARMS.curveID", offset, "a TPM_ECC_CURVE", f"0x{curve_id:04x}"
            )
        kdf = TpmtScheme._read(r, "TPMS_ECC_PARMS.kdf", _KDF_SCHEMES)
        return cls(symmetric, scheme, curve_id, kdf)

    def marshal(self) -> bytes:
        """Marshal as TPMS_ECC_PARMS."""
        return (
            self.symmetric.marshal()
            + self.scheme.marshal()
            + _u16(self.curve_id)
            + self.kdf.marshal()
        )


@dataclass(frozen=True)
class TpmsEccPoint:
    """TPMS_ECC_POINT (Part 2 §11.2.5.2): two TPM2B_ECC_PARAMETER coordinates."""

    x: bytes
    y: bytes

    def __post_init__(self) -> None:
        _check_tpm2b("TPMS_ECC_POINT", "x", self.x, "TPM2B_ECC_PARAMETER")
        _check_tpm2b("TPMS_ECC_POINT", "y", self.y, "TPM2B_ECC_PARAMETER")

    @classmethod
    def _read(cls, r: Reader, what: str) -> TpmsEccPoint:
        x = _read_tpm2b_bytes(r, f"{what}.x", "TPM2B_ECC_PARAMETER")
        y = _read_tpm2b_bytes(r, f"{what}.y", "TPM2B_ECC_PARAMETER")
        return cls(x, y)

    def marshal(self) -> bytes:
        """Marshal as TPMS_ECC_POINT."""
        return _tpm2b(self.x) + _tpm2b(self.y)


@dataclass(frozen=True)
class TpmtPublic:
    """TPMT_PUBLIC (Part 2 §12.2.4) of an RSA or ECC object.

    ``type`` follows from ``parameters``: TPMS_RSA_PARMS with a TPM2B_PUBLIC_KEY_RSA ``unique``
    (the modulus), or TPMS_ECC_PARMS with a TPMS_ECC_POINT ``unique``.
    """

    name_alg: int
    object_attributes: int
    auth_policy: bytes
    parameters: TpmsRsaParms | TpmsEccParms
    unique: bytes | TpmsEccPoint

    def __post_init__(self) -> None:
        _check_uint("TPMT_PUBLIC", "nameAlg", self.name_alg, 16)
        _check_uint("TPMT_PUBLIC", "objectAttributes", self.object_attributes, 32)
        _check_tpm2b("TPMT_PUBLIC", "authPolicy", self.auth_policy, "TPM2B_DIGEST")
        if isinstance(self.parameters, TpmsRsaParms):
            _check_tpm2b("TPMT_PUBLIC", "unique", self.unique, "TPM2B_PUBLIC_KEY_RSA")
        elif isinstance(self.parameters, TpmsEccParms):
            if not isinstance(self.unique, TpmsEccPoint):
                raise ValueError("TPMT_PUBLIC of an ECC key needs a TpmsEccPoint unique")
        else:
            raise ValueError("TPMT_PUBLIC.parameters must be TpmsRsaParms or TpmsEccParms")

    @property
    def type(self) -> TpmAlgId:
        """TPMI_ALG_PUBLIC: TPM_ALG_RSA or TPM_ALG_ECC."""
        if isinstance(self.parameters, TpmsRsaParms):
            return TpmAlgId.TPM_ALG_RSA
        return TpmAlgId.TPM_ALG_ECC

    @property
    def attributes(self) -> TpmaObject:
        """``object_attributes`` as TPMA_OBJECT flags (reserved bits are kept)."""
        return TpmaObject(self.object_attributes)

    @classmethod
    def _read(cls, r: Reader) -> TpmtPublic:
        kind = _read_alg(r, "TPMT_PUBLIC.type", {TpmAlgId.TPM_ALG_RSA, TpmAlgId.TPM_ALG_ECC})
        name_alg = _read_alg(r, "TPMT_PUBLIC.nameAlg", _HASH_ALGS | {_NULL})
        attributes = r.u32be("TPMT_PUBLIC.objectAttributes")
        auth_policy = _read_tpm2b_bytes(r, "TPMT_PUBLIC.authPolicy", "TPM2B_DIGEST")
        if kind == TpmAlgId.TPM_ALG_RSA:
            rsa_parms = TpmsRsaParms._read(r)
            modulus = _read_tpm2b_bytes(r, "TPMT_PUBLIC.unique.rsa", "TPM2B_PUBLIC_KEY_RSA")
            return cls(name_alg, attributes, auth_policy, rsa_parms, modulus)
        ecc_parms = TpmsEccParms._read(r)
        point = TpmsEccPoint._read(r, "TPMT_PUBLIC.unique.ecc")
        return cls(name_alg, attributes, auth_policy, ecc_parms, point)

    @classmethod
    def unmarshal(cls, data: bytes) -> TpmtPublic:
        """Parse a TPMT_PUBLIC that fills ``data`` exactly.

        Args:
            data: a marshalled TPMT_PUBLIC without the TPM2B_PUBLIC size (for that, see
                :func:`unmarshal_tpm2b_public`).

        Returns:
            The public area.

        Raises:
            UnsupportedError: a known but unhandled variant (KEYEDHASH or SYMCIPHER object, RSA
                key size outside 1024/2048/3072/4096, a known algorithm where we do not handle it).
            TruncatedError: ``data`` ends inside the structure.
            ParseError: any other malformation, including trailing bytes.
        """
        return _exact(data, "TPMT_PUBLIC", cls._read)

    def marshal(self) -> bytes:
        """Marshal as TPMT_PUBLIC (the bytes a Name is computed over)."""
        unique = (
            self.unique.marshal() if isinstance(self.unique, TpmsEccPoint) else _tpm2b(self.unique)
        )
        return (
            _u16(self.type)
            + _u16(self.name_alg)
            + _u32(self.object_attributes)
            + _tpm2b(self.auth_policy)
            + self.parameters.marshal()
            + unique
        )


def unmarshal_tpm2b_public(data: bytes) -> TpmtPublic:
    """Parse a TPM2B_PUBLIC (Part 2 §12.2.5): ``size`` then exactly one TPMT_PUBLIC.

    This is the format ``tpm2_readpublic -f tss`` and ``tpm2_create -u`` write.

    Raises:
        ParseError: as :meth:`TpmtPublic.unmarshal`; also when ``size`` disagrees with the
            TPMT_PUBLIC inside it or bytes follow it.
    """

    def read(r: Reader) -> TpmtPublic:
        inner = _read_tpm2b(r, "TPM2B_PUBLIC", "TPM2B_PUBLIC")
        public = TpmtPublic._read(inner)
        inner.expect_end("TPM2B_PUBLIC.publicArea")
        return public

    return _exact(data, "TPM2B_PUBLIC", read)


def marshal_tpm2b_public(public: TpmtPublic) -> bytes:
    """Marshal ``public`` as TPM2B_PUBLIC (Part 2 §12.2.5)."""
    return _tpm2b(public.marshal())


# --------------------------------------------------------------------------------------------
# TPML_PCR_SELECTION (Part 2 §10.6, §10.9.7)


@dataclass(frozen=True)
class TpmsPcrSelection:
    """TPMS_PCR_SELECTION: a bank (``hash_alg``) and a bitmap, bit n of byte n//8 = PCR n."""

    hash_alg: int
    pcr_select: bytes

    def __post_init__(self) -> None:
        _check_uint("TPMS_PCR_SELECTION", "hash", self.hash_alg, 16)
        if not isinstance(self.pcr_select, bytes) or len(self.pcr_select) > _PCR_SELECT_MAX:
            raise ValueError(f"TPMS_PCR_SELECTION.pcrSelect must be ≤ {_PCR_SELECT_MAX} bytes")

    @classmethod
    def from_pcrs(cls, hash_alg: int, pcrs: Collection[int], size: int = 3) -> TpmsPcrSelection:
        """Build a selection of ``pcrs`` in a bitmap of ``size`` bytes (3 covers PCR 0-23)."""
        bitmap = bytearray(size)
        for pcr in pcrs:
            if not 0 <= pcr < 8 * size:
                raise ValueError(f"PCR {pcr} does not fit a {size}-byte pcrSelect")
            bitmap[pcr // 8] |= 1 << (pcr % 8)
        return cls(hash_alg, bytes(bitmap))

    @property
    def pcrs(self) -> tuple[int, ...]:
        """Selected PCR indices, ascending (the order a quote digests them in)."""
        return tuple(
            8 * i + bit
            for i, byte in enumerate(self.pcr_select)
            for bit in range(8)
            if byte >> bit & 1
        )

    @classmethod
    def _read(cls, r: Reader) -> TpmsPcrSelection:
        hash_alg = _read_alg(r, "TPMS_PCR_SELECTION.hash", _HASH_ALGS)
        offset = r.offset
        size = r.u8("TPMS_PCR_SELECTION.sizeofSelect")
        if size > _PCR_SELECT_MAX:
            raise ParseError(
                "TPMS_PCR_SELECTION.sizeofSelect", offset, f"at most {_PCR_SELECT_MAX}", str(size)
            )
        return cls(hash_alg, r.take(size, "TPMS_PCR_SELECTION.pcrSelect"))

    def marshal(self) -> bytes:
        """Marshal as TPMS_PCR_SELECTION."""
        return _u16(self.hash_alg) + _u8(len(self.pcr_select)) + self.pcr_select


@dataclass(frozen=True)
class TpmlPcrSelection:
    """TPML_PCR_SELECTION: the banks and PCRs a quote covers, in digest order."""

    selections: tuple[TpmsPcrSelection, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.selections, tuple) or len(self.selections) > _HASH_COUNT_MAX:
            raise ValueError(f"TPML_PCR_SELECTION holds a tuple of ≤ {_HASH_COUNT_MAX} selections")

    @property
    def pcrs(self) -> tuple[tuple[int, int], ...]:
        """``(hash_alg, pcr)`` pairs in the order TPM2_Quote concatenates the PCR values."""
        return tuple((sel.hash_alg, pcr) for sel in self.selections for pcr in sel.pcrs)

    @classmethod
    def _read(cls, r: Reader) -> TpmlPcrSelection:
        offset = r.offset
        count = r.u32be("TPML_PCR_SELECTION.count")
        if count > _HASH_COUNT_MAX:
            raise ParseError(
                "TPML_PCR_SELECTION.count", offset, f"at most {_HASH_COUNT_MAX}", str(count)
            )
        return cls(tuple(TpmsPcrSelection._read(r) for _ in range(count)))

    @classmethod
    def unmarshal(cls, data: bytes) -> TpmlPcrSelection:
        """Parse a TPML_PCR_SELECTION that fills ``data`` exactly.

        Raises:
            UnsupportedError: a bank whose hash we do not know.
            TruncatedError: ``data`` ends inside the list.
            ParseError: count above 16, sizeofSelect above 32, or trailing bytes.
        """
        return _exact(data, "TPML_PCR_SELECTION", cls._read)

    def marshal(self) -> bytes:
        """Marshal as TPML_PCR_SELECTION."""
        return _u32(len(self.selections)) + b"".join(s.marshal() for s in self.selections)


# --------------------------------------------------------------------------------------------
# TPMS_ATTEST (Part 2 §10.12)


@dataclass(frozen=True)
class TpmsClockInfo:
    """TPMS_CLOCK_INFO (Part 2 §10.11.1)."""

    clock: int
    reset_count: int
    restart_count: int
    safe: bool

    def __post_init__(self) -> None:
        _check_uint("TPMS_CLOCK_INFO", "clock", self.clock, 64)
        _check_uint("TPMS_CLOCK_INFO", "resetCount", self.reset_count, 32)
        _check_uint("TPMS_CLOCK_INFO", "restartCount", self.restart_count, 32)
        if not isinstance(self.safe, bool):
            raise ValueError("TPMS_CLOCK_INFO.safe must be a bool")

    @classmethod
    def _read(cls, r: Reader) -> TpmsClockInfo:
        clock = r.u64be("TPMS_CLOCK_INFO.clock")
        reset_count = r.u32be("TPMS_CLOCK_INFO.resetCount")
        restart_count = r.u32be("TPMS_CLOCK_INFO.restartCount")
        offset = r.offset
        safe = r.u8("TPMS_CLOCK_INFO.safe")
        if safe > 1:
            raise ParseError("TPMS_CLOCK_INFO.safe", offset, "TPMI_YES_NO 0 or 1", str(safe))
        return cls(clock, reset_count, restart_count, safe == 1)

    def marshal(self) -> bytes:
        """Marshal as TPMS_CLOCK_INFO."""
        return (
            _u64(self.clock)
            + _u32(self.reset_count)
            + _u32(self.restart_count)
            + _u8(int(self.safe))
        )


@dataclass(frozen=True)
class TpmsCertifyInfo:
    """TPMS_CERTIFY_INFO (Part 2 §10.12.3): the certified object's Name and qualified Name."""

    name: bytes
    qualified_name: bytes

    def __post_init__(self) -> None:
        _check_tpm2b("TPMS_CERTIFY_INFO", "name", self.name, "TPM2B_NAME")
        _check_tpm2b("TPMS_CERTIFY_INFO", "qualifiedName", self.qualified_name, "TPM2B_NAME")

    @classmethod
    def _read(cls, r: Reader) -> TpmsCertifyInfo:
        name = _read_tpm2b_bytes(r, "TPMS_CERTIFY_INFO.name", "TPM2B_NAME")
        qualified = _read_tpm2b_bytes(r, "TPMS_CERTIFY_INFO.qualifiedName", "TPM2B_NAME")
        return cls(name, qualified)

    def marshal(self) -> bytes:
        """Marshal as TPMS_CERTIFY_INFO."""
        return _tpm2b(self.name) + _tpm2b(self.qualified_name)


@dataclass(frozen=True)
class TpmsQuoteInfo:
    """TPMS_QUOTE_INFO (Part 2 §10.12.4): the PCRs quoted and the digest of their values."""

    pcr_select: TpmlPcrSelection
    pcr_digest: bytes

    def __post_init__(self) -> None:
        _check_tpm2b("TPMS_QUOTE_INFO", "pcrDigest", self.pcr_digest, "TPM2B_DIGEST")

    @classmethod
    def _read(cls, r: Reader) -> TpmsQuoteInfo:
        selection = TpmlPcrSelection._read(r)
        return cls(selection, _read_tpm2b_bytes(r, "TPMS_QUOTE_INFO.pcrDigest", "TPM2B_DIGEST"))

    def marshal(self) -> bytes:
        """Marshal as TPMS_QUOTE_INFO."""
        return self.pcr_select.marshal() + _tpm2b(self.pcr_digest)


@dataclass(frozen=True)
class TpmsAttest:
    """TPMS_ATTEST (Part 2 §10.12.12) of type TPM_ST_ATTEST_CERTIFY or TPM_ST_ATTEST_QUOTE.

    ``magic`` is always TPM_GENERATED_VALUE and is not stored; ``type`` follows from ``attested``.
    Nothing here is trusted until :func:`verify_attest_signature` accepted the bytes.
    """

    qualified_signer: bytes
    extra_data: bytes
    clock_info: TpmsClockInfo
    firmware_version: int
    attested: TpmsCertifyInfo | TpmsQuoteInfo

    def __post_init__(self) -> None:
        _check_tpm2b("TPMS_ATTEST", "qualifiedSigner", self.qualified_signer, "TPM2B_NAME")
        _check_tpm2b("TPMS_ATTEST", "extraData", self.extra_data, "TPM2B_DATA")
        _check_uint("TPMS_ATTEST", "firmwareVersion", self.firmware_version, 64)
        if not isinstance(self.attested, TpmsCertifyInfo | TpmsQuoteInfo):
            raise ValueError("TPMS_ATTEST.attested must be TpmsCertifyInfo or TpmsQuoteInfo")

    @property
    def type(self) -> TpmSt:
        """TPMI_ST_ATTEST: TPM_ST_ATTEST_CERTIFY or TPM_ST_ATTEST_QUOTE."""
        if isinstance(self.attested, TpmsCertifyInfo):
            return TpmSt.TPM_ST_ATTEST_CERTIFY
        return TpmSt.TPM_ST_ATTEST_QUOTE

    @classmethod
    def _read(cls, r: Reader) -> TpmsAttest:
        offset = r.offset
        magic = r.u32be("TPMS_ATTEST.magic")
        if magic != TPM_GENERATED_VALUE:
            raise ParseError(
                "TPMS_ATTEST.magic",
                offset,
                f"TPM_GENERATED_VALUE 0x{TPM_GENERATED_VALUE:08x}",
                f"0x{magic:08x}",
            )
        offset = r.offset
        kind = r.u16be("TPMS_ATTEST.type")
        if kind not in _ATTEST_TYPES:
            expected = "TPM_ST_ATTEST_CERTIFY (0x8017) or TPM_ST_ATTEST_QUOTE (0x8018)"
            error = UnsupportedError if kind in _OTHER_ATTEST_TYPES else ParseError
            raise error("TPMS_ATTEST.type", offset, expected, _st_name(kind))
        qualified_signer = _read_tpm2b_bytes(r, "TPMS_ATTEST.qualifiedSigner", "TPM2B_NAME")
        extra_data = _read_tpm2b_bytes(r, "TPMS_ATTEST.extraData", "TPM2B_DATA")
        clock_info = TpmsClockInfo._read(r)
        firmware_version = r.u64be("TPMS_ATTEST.firmwareVersion")
        attested: TpmsCertifyInfo | TpmsQuoteInfo
        if kind == TpmSt.TPM_ST_ATTEST_CERTIFY:
            attested = TpmsCertifyInfo._read(r)
        else:
            attested = TpmsQuoteInfo._read(r)
        return cls(qualified_signer, extra_data, clock_info, firmware_version, attested)

    @classmethod
    def unmarshal(cls, data: bytes) -> TpmsAttest:
        """Parse a TPMS_ATTEST that fills ``data`` exactly (what ``tpm2_quote -m`` writes).

        Args:
            data: the attestation bytes, as signed by the TPM.

        Returns:
            The attestation, unverified.

        Raises:
            UnsupportedError: another TPMI_ST_ATTEST (NV, audit, time, creation), or a PCR bank
                whose hash we do not know.
            TruncatedError: ``data`` ends inside the structure.
            ParseError: wrong magic, an unknown type, an oversized TPM2B, trailing bytes.
        """
        return _exact(data, "TPMS_ATTEST", cls._read)

    def marshal(self) -> bytes:
        """Marshal as TPMS_ATTEST (the bytes the TPM signed)."""
        return (
            _u32(TPM_GENERATED_VALUE)
            + _u16(self.type)
            + _tpm2b(self.qualified_signer)
            + _tpm2b(self.extra_data)
            + self.clock_info.marshal()
            + _u64(self.firmware_version)
            + self.attested.marshal()
        )


def unmarshal_tpm2b_attest(data: bytes) -> TpmsAttest:
    """Parse a TPM2B_ATTEST (Part 2 §10.12.13): ``size`` then exactly one TPMS_ATTEST.

    Raises:
        ParseError: as :meth:`TpmsAttest.unmarshal`; also when ``size`` disagrees with the
            TPMS_ATTEST inside it or bytes follow it.
    """

    def read(r: Reader) -> TpmsAttest:
        inner = _read_tpm2b(r, "TPM2B_ATTEST", "TPM2B_ATTEST")
        attest = TpmsAttest._read(inner)
        inner.expect_end("TPM2B_ATTEST.attestationData")
        return attest

    return _exact(data, "TPM2B_ATTEST", read)


def marshal_tpm2b_attest(attest: TpmsAttest) -> bytes:
    """Marshal ``attest`` as TPM2B_ATTEST (Part 2 §10.12.13)."""
    return _tpm2b(attest.marshal())


# --------------------------------------------------------------------------------------------
# TPMT_SIGNATURE (Part 2 §11.3.4)


@dataclass(frozen=True)
class TpmsSignatureRsa:
    """TPMS_SIGNATURE_RSA.sig (TPM2B_PUBLIC_KEY_RSA); the hash lives in TpmtSignature."""

    sig: bytes

    def __post_init__(self) -> None:
        _check_tpm2b("TPMS_SIGNATURE_RSA", "sig", self.sig, "TPM2B_PUBLIC_KEY_RSA")


@dataclass(frozen=True)
class TpmsSignatureEcc:
    """TPMS_SIGNATURE_ECC r and s (TPM2B_ECC_PARAMETER); the hash lives in TpmtSignature."""

    signature_r: bytes
    signature_s: bytes

    def __post_init__(self) -> None:
        _check_tpm2b("TPMS_SIGNATURE_ECC", "signatureR", self.signature_r, "TPM2B_ECC_PARAMETER")
        _check_tpm2b("TPMS_SIGNATURE_ECC", "signatureS", self.signature_s, "TPM2B_ECC_PARAMETER")


@dataclass(frozen=True)
class TpmtSignature:
    """TPMT_SIGNATURE with sigAlg TPM_ALG_ECDSA, TPM_ALG_RSASSA or TPM_ALG_RSAPSS.

    ``hash_alg`` is the ``hash`` of the TPMU_SIGNATURE member: the digest the TPM signed.
    """

    sig_alg: int
    hash_alg: int
    signature: TpmsSignatureRsa | TpmsSignatureEcc

    def __post_init__(self) -> None:
        _check_uint("TPMT_SIGNATURE", "sigAlg", self.sig_alg, 16)
        _check_uint("TPMT_SIGNATURE", "hash", self.hash_alg, 16)
        if self.sig_alg in _RSA_SIG_SCHEMES:
            if not isinstance(self.signature, TpmsSignatureRsa):
                raise ValueError(f"{_alg_name(self.sig_alg)} needs a TpmsSignatureRsa")
        elif self.sig_alg == TpmAlgId.TPM_ALG_ECDSA:
            if not isinstance(self.signature, TpmsSignatureEcc):
                raise ValueError("TPM_ALG_ECDSA needs a TpmsSignatureEcc")
        else:
            raise ValueError(f"sigAlg {_alg_name(self.sig_alg)} is not ECDSA, RSASSA or RSAPSS")

    @classmethod
    def _read(cls, r: Reader) -> TpmtSignature:
        sig_alg = _read_alg(r, "TPMT_SIGNATURE.sigAlg", _SIG_SCHEMES)
        hash_alg = _read_alg(r, "TPMT_SIGNATURE.signature.hash", _HASH_ALGS)
        body: TpmsSignatureRsa | TpmsSignatureEcc
        if sig_alg == TpmAlgId.TPM_ALG_ECDSA:
            r_value = _read_tpm2b_bytes(r, "TPMS_SIGNATURE_ECC.signatureR", "TPM2B_ECC_PARAMETER")
            s_value = _read_tpm2b_bytes(r, "TPMS_SIGNATURE_ECC.signatureS", "TPM2B_ECC_PARAMETER")
            body = TpmsSignatureEcc(r_value, s_value)
        else:
            body = TpmsSignatureRsa(
                _read_tpm2b_bytes(r, "TPMS_SIGNATURE_RSA.sig", "TPM2B_PUBLIC_KEY_RSA")
            )
        return cls(sig_alg, hash_alg, body)

    @classmethod
    def unmarshal(cls, data: bytes) -> TpmtSignature:
        """Parse a TPMT_SIGNATURE that fills ``data`` exactly (``tpm2_sign``/``tpm2_quote -s``).

        Raises:
            UnsupportedError: another known sigAlg (HMAC, ECDAA, SM2, ECSCHNORR, NULL) or hash.
            TruncatedError: ``data`` ends inside the structure.
            ParseError: an unknown algorithm, an oversized TPM2B, trailing bytes.
        """
        return _exact(data, "TPMT_SIGNATURE", cls._read)

    def marshal(self) -> bytes:
        """Marshal as TPMT_SIGNATURE."""
        head = _u16(self.sig_alg) + _u16(self.hash_alg)
        if isinstance(self.signature, TpmsSignatureEcc):
            return head + _tpm2b(self.signature.signature_r) + _tpm2b(self.signature.signature_s)
        return head + _tpm2b(self.signature.sig)


# --------------------------------------------------------------------------------------------
# Names, keys, digests, signatures


def _digest(hash_alg: int, data: bytes, what: str) -> bytes:
    alg = HASH_ALGS.get(hash_alg)
    if alg is None:
        raise UnsupportedError(what, 0, "a hash in HASH_ALGS", _alg_name(hash_alg))
    try:
        return hashlib.new(alg.hashlib_name, data).digest()
    except ValueError as err:
        raise UnsupportedError(what, 0, f"{alg.name} available in hashlib", "missing") from err


def object_name(public: TpmtPublic) -> bytes:
    """The Name of an object (Part 1 §16): nameAlg ‖ H_nameAlg(marshalled TPMT_PUBLIC).

    Args:
        public: the object's public area.

    Returns:
        The Name, as TPM2B_NAME.name carries it and ``tpm2_readpublic -n`` writes it.

    Raises:
        UnsupportedError: nameAlg is TPM_ALG_NULL (such objects have no digest Name).
    """
    if public.name_alg == _NULL:
        raise UnsupportedError("TPMT_PUBLIC.nameAlg", 2, "a hash algorithm", "TPM_ALG_NULL")
    return _u16(public.name_alg) + _digest(public.name_alg, public.marshal(), "TPMT_PUBLIC.nameAlg")


def public_key(public: TpmtPublic) -> ec.EllipticCurvePublicKey | rsa.RSAPublicKey:
    """Convert a TPMT_PUBLIC into a ``cryptography`` public key.

    Args:
        public: an ECC key on NIST P-256/P-384/P-521, or an RSA key.

    Returns:
        ``EllipticCurvePublicKey`` from TPMS_ECC_POINT, or ``RSAPublicKey`` from the modulus in
        TPM2B_PUBLIC_KEY_RSA and TPMS_RSA_PARMS.exponent (0 meaning 65537).

    Raises:
        UnsupportedError: another curve (BN, SM2, P-192/224).
        ParseError: the point is not on the curve, or the modulus does not match keyBits.
    """
    unique_offset = len(public.marshal()) - (
        len(public.unique.marshal())
        if isinstance(public.unique, TpmsEccPoint)
        else 2 + len(public.unique)
    )
    if isinstance(public.parameters, TpmsEccParms):
        assert isinstance(public.unique, TpmsEccPoint)
        curve_id = public.parameters.curve_id
        curve = _EC_CURVES.get(curve_id)
        if curve is None:
            raise UnsupportedError(
                "TPMS_ECC_PARMS.curveID",
                unique_offset,
                "TPM_ECC_NIST_P256, TPM_ECC_NIST_P384 or TPM_ECC_NIST_P521",
                f"0x{curve_id:04x}",
            )
        x = int.from_bytes(public.unique.x, "big")
        y = int.from_bytes(public.unique.y, "big")
        try:
            return ec.EllipticCurvePublicNumbers(x, y, curve()).public_key()
        except ValueError as err:
            raise ParseError(
                "TPMT_PUBLIC.unique.ecc", unique_offset, f"a point on {curve().name}", str(err)
            ) from err
    assert isinstance(public.unique, bytes)
    key_bits = public.parameters.key_bits
    if len(public.unique) * 8 != key_bits:
        raise ParseError(
            "TPMT_PUBLIC.unique.rsa",
            unique_offset,
            f"a {key_bits // 8}-byte modulus (keyBits {key_bits})",
            f"{len(public.unique)} bytes",
        )
    exponent = public.parameters.exponent or 65537
    try:
        return rsa.RSAPublicNumbers(exponent, int.from_bytes(public.unique, "big")).public_key()
    except ValueError as err:
        raise ParseError(
            "TPMT_PUBLIC.unique.rsa", unique_offset, "a valid RSA public key", str(err)
        ) from err


def quote_pcr_digest(pcr_values: Sequence[bytes], hash_alg: int) -> bytes:
    """The TPMS_QUOTE_INFO.pcrDigest for these PCR values (Part 3 §18.4 TPM2_Quote).

    Args:
        pcr_values: the selected PCR values in selection order (see
            :attr:`TpmlPcrSelection.pcrs`): bank by bank, ascending PCR index within a bank.
        hash_alg: the TPM_ALG_ID of the digest: the signing scheme's hash, not the banks'.

    Returns:
        H_hashAlg(value_1 ‖ … ‖ value_n).

    Raises:
        UnsupportedError: ``hash_alg`` is not in ``HASH_ALGS``.
    """
    return _digest(hash_alg, b"".join(pcr_values), "TPMS_QUOTE_INFO.pcrDigest")


def _scheme_name(sig_alg: int, hash_alg: int | None) -> str:
    alg = HASH_ALGS.get(hash_alg) if hash_alg is not None else None
    hash_name = alg.name if alg is not None else str(hash_alg)
    return f"{TpmAlgId(sig_alg).name}/{hash_name}"


def _verify_digest(data: bytes, signature: TpmtSignature, signer: TpmtPublic, what: str) -> None:
    """Check ``signature`` over H_sig.hash(data) under ``signer``; the common core."""
    if not signer.object_attributes & TpmaObject.SIGN_ENCRYPT:
        raise SignatureError(
            f"{what}: the signer key lacks the TPMA_OBJECT sign attribute, so it cannot have "
            f"signed; got objectAttributes 0x{signer.object_attributes:08x}"
        )
    expected_type = (
        TpmAlgId.TPM_ALG_ECC
        if signature.sig_alg == TpmAlgId.TPM_ALG_ECDSA
        else TpmAlgId.TPM_ALG_RSA
    )
    if signer.type != expected_type:
        raise SignatureError(
            f"{what}: a {TpmAlgId(signature.sig_alg).name} signature needs a "
            f"{expected_type.name} key, the signer is {signer.type.name}"
        )
    key_scheme = signer.parameters.scheme
    if key_scheme.scheme != _NULL and (
        key_scheme.scheme != signature.sig_alg or key_scheme.hash_alg != signature.hash_alg
    ):
        raise SignatureError(
            f"{what}: the signer key is fixed to scheme "
            f"{_scheme_name(key_scheme.scheme, key_scheme.hash_alg)}, the signature uses "
            f"{_scheme_name(signature.sig_alg, signature.hash_alg)}"
        )
    digest = _digest(signature.hash_alg, data, "TPMT_SIGNATURE.signature.hash")
    prehashed = Prehashed(_CRYPTO_HASHES[signature.hash_alg]())
    key = public_key(signer)
    body = signature.signature
    try:
        if isinstance(body, TpmsSignatureEcc):
            assert isinstance(key, ec.EllipticCurvePublicKey)
            der = encode_dss_signature(
                int.from_bytes(body.signature_r, "big"), int.from_bytes(body.signature_s, "big")
            )
            key.verify(der, digest, ec.ECDSA(prehashed))
        else:
            assert isinstance(key, rsa.RSAPublicKey)
            pad: padding.AsymmetricPadding
            if signature.sig_alg == TpmAlgId.TPM_ALG_RSAPSS:
                pad = padding.PSS(
                    mgf=padding.MGF1(_CRYPTO_HASHES[signature.hash_alg]()),
                    salt_length=padding.PSS.AUTO,
                )
            else:
                pad = padding.PKCS1v15()
            key.verify(body.sig, digest, pad, prehashed)
    except InvalidSignature as err:
        raise SignatureError(
            f"{what}: expected a valid {_scheme_name(signature.sig_alg, signature.hash_alg)} "
            f"signature by the key with Name {_name_hex(signer)} over "
            f"{HASH_ALGS[signature.hash_alg].name}:{digest.hex()}, got one that does not verify"
        ) from err
    except UnsupportedAlgorithm as err:
        raise SignatureError(
            f"{what}: cannot verify {_scheme_name(signature.sig_alg, signature.hash_alg)}: "
            f"this cryptography backend does not support it ({err})"
        ) from err


def _name_hex(public: TpmtPublic) -> str:
    try:
        return object_name(public).hex()
    except UnsupportedError:
        return "(none)"


def verify_attest_signature(
    attest_bytes: bytes,
    signature: TpmtSignature,
    signer: TpmtPublic,
    *,
    allow_unrestricted_signer: bool = False,
) -> None:
    """Verify the TPM's signature over a TPMS_ATTEST (TPM2_Certify, TPM2_Quote).

    Checks, in order:

    1. the signer is a restricted key (TPMA_OBJECT ``restricted``): only then does the TPM
       refuse to sign outside data that starts with TPM_GENERATED_VALUE, so only then is a
       signed TPMS_ATTEST proof that the TPM produced it (TPM2_Sign with a restricted key
       needs a TPM2_Hash ticket, which the TPM withholds for such data);
    2. the signer has the ``sign`` attribute;
    3. the signature algorithm fits the key type (ECDSA ↔ ECC, RSASSA/RSAPSS ↔ RSA);
    4. if the key fixes a scheme, the signature uses exactly that scheme and hash;
    5. the signature verifies over H_hash(attest_bytes), hash being TPMT_SIGNATURE's.

    The caller must already trust ``signer`` (e.g. through its certificate chain) and parses
    ``attest_bytes`` with :meth:`TpmsAttest.unmarshal` to read what was attested.

    Args:
        attest_bytes: the exact TPMS_ATTEST bytes the TPM returned (not a TPM2B_ATTEST).
        signature: the parsed TPMT_SIGNATURE.
        signer: the public area of the signing key.
        allow_unrestricted_signer: skip check 1, for keys whose holder could also have signed a
            forged TPMS_ATTEST with TPM2_Sign.

    Raises:
        SignatureError: any check fails; wraps cryptography's InvalidSignature.
        UnsupportedError: hash not available here.
        ParseError: ``signer`` does not convert into a public key (see :func:`public_key`).
    """
    if not isinstance(attest_bytes, bytes):
        raise TypeError(f"attest_bytes must be bytes, got {type(attest_bytes).__name__}")
    if not allow_unrestricted_signer and not signer.object_attributes & TpmaObject.RESTRICTED:
        raise SignatureError(
            "TPMS_ATTEST signature: expected a restricted signing key, whose attestations only "
            f"the TPM can produce; got objectAttributes 0x{signer.object_attributes:08x} without "
            "restricted (allow_unrestricted_signer=True accepts it)"
        )
    _verify_digest(attest_bytes, signature, signer, "TPMS_ATTEST signature")


def verify_signature(message: bytes, signature: TpmtSignature, signer: TpmtPublic) -> None:
    """Verify a TPM2_Sign signature over H_hash(message) by a TPM key.

    Checks, in order:

    1. ``message`` does not start with TPM_GENERATED_VALUE: a restricted key signs such bytes
       only as a TPMS_ATTEST, so they must go through :func:`verify_attest_signature`;
    2. then the checks of :func:`verify_attest_signature` over ``message``.

    Args:
        message: the signed message (the TPM signed its digest under the signature's hash).
        signature: the parsed TPMT_SIGNATURE.
        signer: the public area of the signing key, already trusted by the caller.

    Raises:
        SignatureError: any check fails; wraps cryptography's InvalidSignature.
        UnsupportedError: hash not available here.
        ParseError: ``signer`` does not convert into a public key.
    """
    if not isinstance(message, bytes):
        raise TypeError(f"message must be bytes, got {type(message).__name__}")
    if message[:4] == _u32(TPM_GENERATED_VALUE):
        raise SignatureError(
            "TPM2_Sign message: expected a message that does not start with TPM_GENERATED_VALUE "
            "0xff544347, got one that does (verify it as a TPMS_ATTEST instead)"
        )
    _verify_digest(message, signature, signer, "TPM2_Sign signature")
