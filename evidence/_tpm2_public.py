"""TPMT_PUBLIC and its parts (Part 2 §12.2): the public area of an RSA or ECC object, TPM2B_PUBLIC.

Part of :mod:`evidence.tpm2`; import from there. Shape only: the key a public area holds and the
Name it has are computed in :mod:`evidence._tpm2_crypto`.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

from evidence._reader import Reader
from evidence._tpm2_constants import (
    _ECC_SCHEMES,
    _HASH_ALGS,
    _KDF_SCHEMES,
    _NULL,
    _RSA_KEY_BITS,
    _RSA_SCHEMES,
    _SYM_MODES,
    _SYM_OBJECT_ALGS,
    TpmAlgId,
    TpmaObject,
    TpmEccCurve,
)
from evidence._tpm2_marshal import (
    _alg_name,
    _check_tpm2b,
    _check_uint,
    _exact,
    _exact_sized,
    _read_alg,
    _read_tpm2b_bytes,
    _tpm2b,
    _u16,
    _u32,
)
from evidence.errors import ParseError, UnsupportedError

__all__ = [
    "TpmsEccParms",
    "TpmsEccPoint",
    "TpmsRsaParms",
    "TpmtPublic",
    "TpmtScheme",
    "TpmtSymDefObject",
    "marshal_tpm2b_public",
    "unmarshal_tpm2b_public",
]


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
    return _exact_sized(data, "TPM2B_PUBLIC", "publicArea", TpmtPublic._read)


def marshal_tpm2b_public(public: TpmtPublic) -> bytes:
    """Marshal ``public`` as TPM2B_PUBLIC (Part 2 §12.2.5)."""
    return _tpm2b(public.marshal())
