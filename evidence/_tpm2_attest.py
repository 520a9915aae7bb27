"""TPMS_ATTEST (Part 2 §10.12) and TPMT_SIGNATURE (Part 2 §11.3.4): what the TPM signs, and how.

Part of :mod:`evidence.tpm2`; import from there. The attestation a TPM2_Certify or TPM2_Quote
returns, its TPM2B_ATTEST wrapper, and the signature over it (or over a TPM2_Sign message).
Parsing checks shape, never truth: whether a signature holds is decided in
:mod:`evidence._tpm2_crypto`.
"""

from __future__ import annotations

from dataclasses import dataclass

from evidence._reader import Reader
from evidence._tpm2_constants import (
    _ATTEST_TYPES,
    _HASH_ALGS,
    _OTHER_ATTEST_TYPES,
    _RSA_SIG_SCHEMES,
    _SIG_SCHEMES,
    TPM_GENERATED_VALUE,
    TpmAlgId,
    TpmSt,
)
from evidence._tpm2_marshal import (
    _alg_name,
    _check_tpm2b,
    _check_uint,
    _exact,
    _exact_sized,
    _read_alg,
    _read_tpm2b_bytes,
    _st_name,
    _tpm2b,
    _u8,
    _u16,
    _u32,
    _u64,
)
from evidence._tpm2_pcr import TpmlPcrSelection
from evidence.errors import ParseError, UnsupportedError

__all__ = [
    "TpmsAttest",
    "TpmsCertifyInfo",
    "TpmsClockInfo",
    "TpmsQuoteInfo",
    "TpmsSignatureEcc",
    "TpmsSignatureRsa",
    "TpmtSignature",
    "marshal_tpm2b_attest",
    "unmarshal_tpm2b_attest",
]


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
    return _exact_sized(data, "TPM2B_ATTEST", "attestationData", TpmsAttest._read)


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
