"""Admission checks on the two TPM keys a host presents: its EK and its AIK.

Both arrive as marshalled TPMT_PUBLIC (TPM 2.0 Part 2 §12.2.4) and are parsed with
:mod:`evidence.tpm2`. The EK only has to be a key MakeCredential can target; the AIK has to be the
attestation key ARCHITECTURE.md §2 describes, because the certificate the registrar issues for it
is what every later attestation chain starts from.
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric import ec, rsa

from evidence.tpm2 import (
    TpmAlgId,
    TpmaObject,
    TpmEccCurve,
    TpmsEccParms,
    TpmtPublic,
    object_name,
    public_key,
)
from verifier.registrar.credential import CredentialProtector
from verifier.registrar.errors import AikAttributesRejected, EkCertificateRejected

__all__ = [
    "AIK_REQUIRED_ATTRIBUTES",
    "CheckedAik",
    "CheckedEk",
    "check_aik_public",
    "check_ek_public",
]

AIK_REQUIRED_ATTRIBUTES = (
    TpmaObject.FIXEDTPM
    | TpmaObject.FIXEDPARENT
    | TpmaObject.SENSITIVEDATAORIGIN
    | TpmaObject.RESTRICTED
    | TpmaObject.SIGN_ENCRYPT
)
"""TPMA_OBJECT bits an AIK must have: it never leaves its TPM, was generated there, and signs only
TPM-generated structures (restricted)."""

_AIK_FORBIDDEN_ATTRIBUTES = TpmaObject.DECRYPT
_EK_REQUIRED_ATTRIBUTES = (
    TpmaObject.FIXEDTPM | TpmaObject.FIXEDPARENT | TpmaObject.RESTRICTED | TpmaObject.DECRYPT
)


@dataclass(frozen=True)
class CheckedEk:
    """An EK public area MakeCredential can target (not yet trusted: see ekcert)."""

    public: TpmtPublic
    key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey
    protector: CredentialProtector


@dataclass(frozen=True)
class CheckedAik:
    """An AIK public area with the attributes of an attestation key, and its TPM Name."""

    public: TpmtPublic
    key: ec.EllipticCurvePublicKey
    name: bytes


def _flags(value: int) -> str:
    names = [f.name for f in TpmaObject if f.name and value & f]
    return "|".join(names) or "0"


def check_ek_public(ek_public: bytes) -> CheckedEk:
    """Parse the EK's TPMT_PUBLIC and check it is a storage key MakeCredential can target.

    Checks: RSA or ECC (NIST curves), a hash nameAlg, restricted|decrypt|fixedTPM|fixedParent,
    an AES-CFB symmetric definition (it sets the credential's AES key size).

    Raises:
        ParseError: the bytes are not a TPMT_PUBLIC.
        EkCertificateRejected: the key is not an endorsement-style storage key.
    """
    public = TpmtPublic.unmarshal(ek_public)
    missing = _EK_REQUIRED_ATTRIBUTES & ~public.object_attributes
    if missing:
        raise EkCertificateRejected(
            f"EK public: expected attributes {_flags(_EK_REQUIRED_ATTRIBUTES)}, "
            f"missing {_flags(missing)} (got {_flags(public.object_attributes)})"
        )
    sym = public.parameters.symmetric
    if sym.algorithm != TpmAlgId.TPM_ALG_AES or sym.mode != TpmAlgId.TPM_ALG_CFB:
        raise EkCertificateRejected(
            f"EK public: expected an AES-CFB symmetric definition, got algorithm "
            f"0x{sym.algorithm:04x} mode {sym.mode}"
        )
    key = public_key(public)
    assert sym.key_bits is not None
    try:
        protector = CredentialProtector(public.name_alg, key, sym.key_bits)
    except ValueError as err:
        raise EkCertificateRejected(f"EK public: {err}") from err
    return CheckedEk(public=public, key=key, protector=protector)


def check_aik_public(aik_public: bytes) -> CheckedAik:
    """Parse the AIK's TPMT_PUBLIC and check it is an attestation key (ARCHITECTURE.md §2).

    Checks, in order: ECC on NIST P-256; nameAlg SHA-256; attributes include
    fixedTPM|fixedParent|sensitiveDataOrigin|restricted|sign and exclude decrypt; signing scheme
    ECDSA with SHA-256; symmetric and KDF NULL.

    Returns:
        the parsed key and its TPM Name (``0x000B ‖ SHA-256(TPMT_PUBLIC)``), which MakeCredential
        binds the challenge to.

    Raises:
        ParseError: the bytes are not a TPMT_PUBLIC.
        AikAttributesRejected: any check fails; the message names expected and got.
    """
    public = TpmtPublic.unmarshal(aik_public)
    params = public.parameters
    if not isinstance(params, TpmsEccParms) or params.curve_id != TpmEccCurve.TPM_ECC_NIST_P256:
        got = (
            f"ECC curve 0x{params.curve_id:04x}"
            if isinstance(params, TpmsEccParms)
            else f"RSA-{params.key_bits}"
        )
        raise AikAttributesRejected(f"AIK: expected an ECC NIST P-256 key, got {got}")
    if public.name_alg != TpmAlgId.TPM_ALG_SHA256:
        raise AikAttributesRejected(
            f"AIK: expected nameAlg TPM_ALG_SHA256, got 0x{public.name_alg:04x}"
        )
    attrs = public.object_attributes
    missing = AIK_REQUIRED_ATTRIBUTES & ~attrs
    if missing:
        raise AikAttributesRejected(
            f"AIK: expected attributes {_flags(AIK_REQUIRED_ATTRIBUTES)}, missing "
            f"{_flags(missing)} (got {_flags(attrs)})"
        )
    if attrs & _AIK_FORBIDDEN_ATTRIBUTES:
        raise AikAttributesRejected(
            f"AIK: expected a signing-only key, got decrypt set ({_flags(attrs)})"
        )
    if params.scheme.scheme != TpmAlgId.TPM_ALG_ECDSA or (
        params.scheme.hash_alg != TpmAlgId.TPM_ALG_SHA256
    ):
        raise AikAttributesRejected(
            f"AIK: expected signing scheme ECDSA/SHA-256, got scheme 0x{params.scheme.scheme:04x} "
            f"hash {params.scheme.hash_alg}"
        )
    if params.symmetric.algorithm != TpmAlgId.TPM_ALG_NULL or (
        params.kdf.scheme != TpmAlgId.TPM_ALG_NULL
    ):
        raise AikAttributesRejected("AIK: expected symmetric and KDF TPM_ALG_NULL")
    key = public_key(public)
    assert isinstance(key, ec.EllipticCurvePublicKey)
    return CheckedAik(public=public, key=key, name=object_name(public))
