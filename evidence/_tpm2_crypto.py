"""Names, public keys, quote digests and signature checks over the parsed TPM 2.0 structures.

Part of :mod:`evidence.tpm2`; import from there. The only part that hashes or calls
``cryptography``: :func:`object_name` (Part 1 §16), :func:`public_key`, :func:`quote_pcr_digest`,
and :func:`verify_attest_signature` and :func:`verify_signature`, the only functions of
:mod:`evidence.tpm2` that say a signature holds.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import Final

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, encode_dss_signature

from evidence._algorithms import HASH_ALGS
from evidence._tpm2_attest import TpmsSignatureEcc, TpmtSignature
from evidence._tpm2_constants import _NULL, TPM_GENERATED_VALUE, TpmAlgId, TpmaObject, TpmEccCurve
from evidence._tpm2_marshal import _alg_name, _u16, _u32
from evidence._tpm2_public import TpmsEccParms, TpmsEccPoint, TpmtPublic
from evidence.errors import ParseError, SignatureError, UnsupportedError

__all__ = [
    "object_name",
    "public_key",
    "quote_pcr_digest",
    "verify_attest_signature",
    "verify_signature",
]


# --------------------------------------------------------------------------------------------
# Names, keys, digests, signatures

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
