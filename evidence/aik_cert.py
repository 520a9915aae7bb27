"""The fleet's AIK certificate profile: its OIDs, its extensions, and its verification.

One leaf module shared by the registrar that issues AIK certificates
(``verifier/registrar/ca.py``), the host that receives and keeps one
(``host_agent/registration.py``, ``host_agent/admission.py``) and every verifier that walks
fleet CA → AIK certificate → CertAuthKey (ARCHITECTURE.md §2). Pure: bytes, certificates and
``now`` in; a :class:`~evidence.tpm2.TpmtPublic` out, or a typed error.

The profile (what the registrar issues)::

    subject            CN=<host id>
    subjectPublicKey   the AIK's public key (ECC P-256)
    BasicConstraints   CA=FALSE (critical)
    KeyUsage           digitalSignature (critical)
    ExtendedKeyUsage   tcg-kp-AIKCertificate 2.23.133.8.3
    TPM_OBJECT_NAME_OID  OCTET STRING: the AIK's TPM Name, nameAlg ‖ H(TPMT_PUBLIC)
    TPM_PUBLIC_OID       OCTET STRING: the AIK's marshalled TPMT_PUBLIC

The last two let a verifier holding only the certificate check TPM2_Certify signatures against
the exact public area the registrar admitted (``evidence.tpm2.verify_attest_signature``).

Errors (``ChainError`` subclasses carry ``expected`` and ``got`` for findings)::

    ParseError                       the certificate or an extension is not well-formed DER
    HashAlgorithmNotAllowed          a certificate is signed with SHA-1 (opt-in) or MD5
    ChainError
    ├── AikNotFleetIssued            verify.chain.aik_issuer
    ├── CertificateNotValidNow       verify.chain.validity
    ├── CaConstraintViolation        verify.chain.ca_constraints
    └── AikCertificateMismatch       verify.chain.aik_certificate
"""

from __future__ import annotations

import hmac
from collections.abc import Sequence
from datetime import datetime
from typing import ClassVar, Final

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtensionOID

from evidence.errors import ChainError, HashAlgorithmNotAllowed, ParseError, TruncatedError
from evidence.tpm2 import TpmtPublic, object_name, public_key

__all__ = [
    "TCG_KP_AIK_CERTIFICATE",
    "TPM_OBJECT_NAME_OID",
    "TPM_PUBLIC_OID",
    "VTPM_TRUST_OID_ARC",
    "AikCertificateMismatch",
    "AikNotFleetIssued",
    "CaConstraintViolation",
    "CertificateNotValidNow",
    "aik_name_from_certificate",
    "aik_public_from_certificate",
    "decode_octet_string",
    "encode_octet_string",
    "verify_aik_certificate",
]

VTPM_TRUST_OID_ARC: Final = "2.25.122233000154448759152583983886733378126"
"""vtpm-trust's OID arc: under the UUID arc 2.25 (ITU-T X.667), minted without registration from
UUID 5bf53832-653f-4040-a5d2-d8c9fb0b824e."""

TPM_OBJECT_NAME_OID: Final = x509.ObjectIdentifier(f"{VTPM_TRUST_OID_ARC}.1")
"""AIK certificate extension: the AIK's TPM Name (``nameAlg ‖ H(TPMT_PUBLIC)``), OCTET STRING."""

TPM_PUBLIC_OID: Final = x509.ObjectIdentifier(f"{VTPM_TRUST_OID_ARC}.2")
"""AIK certificate extension: the AIK's marshalled TPMT_PUBLIC, OCTET STRING."""

TCG_KP_AIK_CERTIFICATE: Final = x509.ObjectIdentifier("2.23.133.8.3")
"""tcg-kp-AIKCertificate (TCG EK Credential Profile): the EKU of every AIK certificate."""

_MAX_OCTETS: Final = 0xFFFF
_MAX_INTERMEDIATES: Final = 8
_HANDLED_CRITICAL: Final = frozenset(
    {ExtensionOID.BASIC_CONSTRAINTS, ExtensionOID.KEY_USAGE, ExtensionOID.EXTENDED_KEY_USAGE}
)
_WEAK_HASHES: Final = frozenset({"md5", "sha1"})
_SPKI: Final = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


# --------------------------------------------------------------------------------------------
# Errors


class _Detailed(ChainError):
    """A chain error that names what the check wanted and what the certificate held."""

    def __init__(self, message: str, expected: str, got: str) -> None:
        self.expected: str | None = expected
        self.got: str | None = got
        super().__init__(message)


class AikNotFleetIssued(_Detailed):
    """No fleet CA certificate (through the given intermediates) issued the AIK certificate."""

    id: ClassVar[str] = "verify.chain.aik_issuer"


class CertificateNotValidNow(_Detailed):
    """A certificate of the chain is expired or not yet valid at ``now``."""

    id: ClassVar[str] = "verify.chain.validity"


class CaConstraintViolation(_Detailed):
    """An issuing certificate is not a CA allowed to issue here (basic constraints, key usage)."""

    id: ClassVar[str] = "verify.chain.ca_constraints"


class AikCertificateMismatch(_Detailed):
    """The certificate is not an AIK certificate of the fleet's profile (EKU, key, Name)."""

    id: ClassVar[str] = "verify.chain.aik_certificate"


# --------------------------------------------------------------------------------------------
# Extensions


def encode_octet_string(data: bytes) -> bytes:
    """DER OCTET STRING (tag 0x04, minimal definite length) of up to 65535 bytes.

    Raises:
        ValueError: ``data`` longer than 65535 bytes (an AIK Name or TPMT_PUBLIC never is).
    """
    n = len(data)
    if n < 0x80:
        return bytes([0x04, n]) + data
    if n <= 0xFF:
        return bytes([0x04, 0x81, n]) + data
    if n <= _MAX_OCTETS:
        return bytes([0x04, 0x82, n >> 8, n & 0xFF]) + data
    raise ValueError(f"octet string of {n} bytes: at most {_MAX_OCTETS}")


def decode_octet_string(value: bytes, what: str = "OCTET STRING") -> bytes:
    """The content of a DER OCTET STRING as :func:`encode_octet_string` writes it.

    Only the minimal definite length form up to 65535 bytes is accepted, and nothing may follow.

    Raises:
        TruncatedError: ``value`` ends inside the header or the content.
        ParseError: another tag, a non-minimal or indefinite length, or trailing bytes.
    """
    if len(value) < 2:
        raise TruncatedError(what, len(value), "a DER OCTET STRING header (2 bytes or more)")
    if value[0] != 0x04:
        raise ParseError(what, 0, "tag 0x04 (OCTET STRING)", f"0x{value[0]:02x}")
    first = value[1]
    if first < 0x80:
        n, head = first, 2
    elif first == 0x81:
        if len(value) < 3:
            raise TruncatedError(what, len(value), "a one-byte length")
        n, head = value[2], 3
        if n < 0x80:
            raise ParseError(what, 1, "a minimal DER length", f"0x81 {n:#04x}")
    elif first == 0x82:
        if len(value) < 4:
            raise TruncatedError(what, len(value), "a two-byte length")
        n, head = value[2] << 8 | value[3], 4
        if n <= 0xFF:
            raise ParseError(what, 1, "a minimal DER length", f"0x82 {n:#06x}")
    else:
        raise ParseError(what, 1, "a definite DER length of at most 65535", f"0x{first:02x}")
    if len(value) - head < n:
        raise TruncatedError(what, len(value), f"{n} content bytes", f"{len(value) - head}")
    if len(value) - head > n:
        raise ParseError(what, head + n, "the end of the OCTET STRING", "trailing bytes")
    return value[head:]


def _extension_octets(cert: x509.Certificate, oid: x509.ObjectIdentifier, what: str) -> bytes:
    try:
        ext = cert.extensions.get_extension_for_oid(oid).value
    except x509.ExtensionNotFound:
        raise AikCertificateMismatch(
            f"AIK certificate ({_describe(cert)}): it has no {what} extension",
            f"extension {oid.dotted_string}",
            "none",
        ) from None
    except ValueError as err:  # another extension does not parse
        raise ParseError("AIK certificate extensions", 0, "DER extensions", str(err)) from err
    if not isinstance(ext, x509.UnrecognizedExtension):  # pragma: no cover - private OIDs
        raise ParseError(f"AIK certificate {what} extension", 0, "an OCTET STRING")
    return decode_octet_string(ext.value, f"AIK certificate {what} extension")


def aik_name_from_certificate(cert: x509.Certificate) -> bytes:
    """The TPM Name an AIK certificate carries (:data:`TPM_OBJECT_NAME_OID`), unverified.

    Raises:
        AikCertificateMismatch: the extension is missing.
        ParseError: it is not a DER OCTET STRING.
    """
    return _extension_octets(cert, TPM_OBJECT_NAME_OID, "TPM object Name")


def aik_public_from_certificate(cert: x509.Certificate) -> bytes:
    """The marshalled TPMT_PUBLIC an AIK certificate carries (:data:`TPM_PUBLIC_OID`), unverified.

    Raises:
        AikCertificateMismatch: the extension is missing.
        ParseError: it is not a DER OCTET STRING.
    """
    return _extension_octets(cert, TPM_PUBLIC_OID, "TPMT_PUBLIC")


# --------------------------------------------------------------------------------------------
# Verification


def _describe(cert: x509.Certificate) -> str:
    return f"subject {cert.subject.rfc4514_string()!r}, issuer {cert.issuer.rfc4514_string()!r}"


def _load(cert: x509.Certificate | bytes, what: str) -> x509.Certificate:
    if isinstance(cert, x509.Certificate):
        return cert
    if not isinstance(cert, bytes):
        raise TypeError(f"{what}: expected DER bytes or an x509.Certificate, got {type(cert)}")
    try:
        loaded = x509.load_der_x509_certificate(cert)
        loaded.extensions  # noqa: B018 - parsed lazily; malformed extensions show now
    except (ValueError, x509.InvalidVersion) as err:
        raise ParseError(what, 0, "a DER X.509 certificate", str(err)) from err
    return loaded


def _check_signature_hash(cert: x509.Certificate, role: str, allow_sha1: bool) -> None:
    try:
        algorithm = cert.signature_hash_algorithm
    except UnsupportedAlgorithm as err:
        raise ParseError(role, 0, "a known signature algorithm", str(err)) from err
    name = algorithm.name if algorithm is not None else "none"
    if name in _WEAK_HASHES and not (name == "sha1" and allow_sha1):
        hint = "allow_sha1=True accepts it" if name == "sha1" else "no option accepts it"
        raise HashAlgorithmNotAllowed(
            f"{role} ({_describe(cert)}) is signed with {name.upper()}; {hint}"
        )


def _check_validity(cert: x509.Certificate, now: datetime, role: str) -> None:
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    if not start <= now <= end:
        raise CertificateNotValidNow(
            f"{role} ({_describe(cert)}) is valid from {start.isoformat()} to "
            f"{end.isoformat()}, not at {now.isoformat()}",
            f"{start.isoformat()}..{end.isoformat()}",
            now.isoformat(),
        )


def _critical_unhandled(cert: x509.Certificate) -> list[str]:
    return [
        ext.oid.dotted_string
        for ext in cert.extensions
        if ext.critical and ext.oid not in _HANDLED_CRITICAL
    ]


def _check_ca(cert: x509.Certificate, intermediates_below: int, role: str) -> None:
    def fail(why: str) -> CaConstraintViolation:
        return CaConstraintViolation(
            f"{role} ({_describe(cert)}) may not issue this chain: {why}",
            "a CA certificate allowed to issue this chain",
            why,
        )

    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        raise fail("it has no BasicConstraints extension") from None
    if not bc.ca:
        raise fail("BasicConstraints CA is FALSE")
    if bc.path_length is not None and intermediates_below > bc.path_length:
        raise fail(
            f"pathLenConstraint {bc.path_length}, but {intermediates_below} intermediate(s) follow"
        )
    try:
        ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        ku = None
    if ku is not None and not ku.key_cert_sign:
        raise fail("its KeyUsage lacks keyCertSign")
    unhandled = _critical_unhandled(cert)
    if unhandled:
        raise fail(f"it has critical extensions this verifier does not process: {unhandled}")


def _issuer(
    cert: x509.Certificate, candidates: Sequence[x509.Certificate]
) -> x509.Certificate | None:
    for issuer in candidates:
        if issuer.subject != cert.issuer:
            continue
        try:
            cert.verify_directly_issued_by(issuer)
        except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
            continue
        return issuer
    return None


def _check_profile(cert: x509.Certificate) -> TpmtPublic:
    def fail(why: str, expected: str, got: str) -> AikCertificateMismatch:
        return AikCertificateMismatch(f"AIK certificate ({_describe(cert)}): {why}", expected, got)

    exts = cert.extensions
    try:
        if exts.get_extension_for_class(x509.BasicConstraints).value.ca:
            raise fail("it is a CA certificate", "BasicConstraints CA=FALSE", "CA=TRUE")
    except x509.ExtensionNotFound:
        pass
    try:
        if not exts.get_extension_for_class(x509.KeyUsage).value.digital_signature:
            raise fail(
                "its KeyUsage lacks digitalSignature", "KeyUsage digitalSignature", "without"
            )
    except x509.ExtensionNotFound:
        pass
    try:
        eku = exts.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        raise fail(
            "it has no ExtendedKeyUsage", f"EKU {TCG_KP_AIK_CERTIFICATE.dotted_string}", "none"
        ) from None
    if TCG_KP_AIK_CERTIFICATE not in eku:
        raise fail(
            "it is not an AIK certificate (e.g. a TLS certificate of the same CA)",
            f"EKU tcg-kp-AIKCertificate {TCG_KP_AIK_CERTIFICATE.dotted_string}",
            ", ".join(o.dotted_string for o in eku) or "none",
        )
    unhandled = _critical_unhandled(cert)
    if unhandled:
        raise fail("unprocessed critical extensions", "none", ", ".join(unhandled))

    public_bytes = aik_public_from_certificate(cert)
    try:
        aik = TpmtPublic.unmarshal(public_bytes)
        aik_name = object_name(aik)
        aik_key = public_key(aik).public_bytes(*_SPKI)
    except ParseError as err:
        raise fail(
            f"its TPMT_PUBLIC extension holds no usable key: {err}", "an AIK TPMT_PUBLIC", str(err)
        ) from err
    cert_name = aik_name_from_certificate(cert)
    if not hmac.compare_digest(cert_name, aik_name):
        raise fail(
            "its TPM object Name is not the Name of its TPMT_PUBLIC",
            aik_name.hex(),
            cert_name.hex(),
        )
    try:
        cert_key = cert.public_key().public_bytes(*_SPKI)
    except (ValueError, UnsupportedAlgorithm) as err:
        raise fail("its public key does not load", "an ECC or RSA key", str(err)) from err
    if not hmac.compare_digest(cert_key, aik_key):
        raise fail(
            "its subject public key is not the key of its TPMT_PUBLIC extension",
            "the key of the TPMT_PUBLIC extension",
            "another key",
        )
    return aik


def verify_aik_certificate(
    cert_der: bytes | x509.Certificate,
    fleet_ca_certs: Sequence[x509.Certificate | bytes],
    now: datetime,
    *,
    intermediates: Sequence[x509.Certificate | bytes] = (),
    allow_sha1: bool = False,
) -> TpmtPublic:
    """Verify an AIK certificate against the fleet CA; return the AIK it certifies.

    The caller must already trust ``fleet_ca_certs`` (configured, or pinned by fingerprint) and
    supply ``now``. Checks, in order:

    1. the certificate parses (DER X.509);
    2. it is valid at ``now``;
    3. its signature hash is not MD5, nor SHA-1 unless ``allow_sha1``;
    4. it is issued by a fleet CA certificate, directly or through ``intermediates``; every
       issuer is valid at ``now``, has BasicConstraints CA=TRUE with a path length that allows
       the chain, keyCertSign if it has a KeyUsage, and no critical extension left unprocessed;
    5. the AIK profile: not a CA, KeyUsage digitalSignature (if present), EKU
       tcg-kp-AIKCertificate, no unprocessed critical extension;
    6. the TPMT_PUBLIC extension parses and holds an ECC or RSA key whose Name equals the TPM
       object Name extension;
    7. the certificate's SubjectPublicKeyInfo is that key.

    Args:
        cert_der: the AIK certificate, DER (or already parsed).
        fleet_ca_certs: the fleet CA certificates (DER or parsed); at least one.
        now: timezone-aware time the chain must be valid at.
        intermediates: intermediate CA certificates that may sit between (fleets with one CA
            have none).
        allow_sha1: accept SHA-1-signed certificates.

    Returns:
        The AIK's TPMT_PUBLIC, as the registrar admitted it.

    Raises:
        ParseError: a certificate, or one of the AIK extensions, is not well-formed.
        HashAlgorithmNotAllowed: a certificate is signed with a weak hash.
        CertificateNotValidNow, AikNotFleetIssued, CaConstraintViolation, AikCertificateMismatch:
            the :class:`~evidence.errors.ChainError` of the check that failed.
        ValueError: ``now`` is naive, or no fleet CA certificate was given.
    """
    if not isinstance(now, datetime) or now.tzinfo is None:
        raise ValueError("now must be a timezone-aware datetime (datetime.now(UTC))")
    roots = [_load(c, f"fleet CA certificate {i}") for i, c in enumerate(fleet_ca_certs)]
    if not roots:
        raise ValueError("give at least one fleet CA certificate")
    if len(intermediates) > _MAX_INTERMEDIATES:
        raise ValueError(f"at most {_MAX_INTERMEDIATES} intermediate CA certificates")
    pool = [_load(c, f"intermediate CA certificate {i}") for i, c in enumerate(intermediates)]
    leaf = _load(cert_der, "AIK certificate")

    _check_validity(leaf, now, "AIK certificate")
    current, path_len, role = leaf, 0, "AIK certificate"
    for _ in range(len(pool) + 1):
        _check_signature_hash(current, role, allow_sha1)
        root = _issuer(current, roots)
        if root is not None:
            _check_validity(root, now, "fleet CA certificate")
            _check_ca(root, path_len, "fleet CA certificate")
            break
        intermediate = _issuer(current, pool)
        if intermediate is None:
            raise AikNotFleetIssued(
                f"the AIK certificate chain ends at a certificate ({_describe(current)}) that "
                "no fleet CA certificate issued; fleet CAs: "
                + "; ".join(repr(r.subject.rfc4514_string()) for r in roots),
                "issued by " + " or ".join(r.subject.rfc4514_string() for r in roots),
                current.issuer.rfc4514_string(),
            )
        pool.remove(intermediate)
        _check_validity(intermediate, now, "intermediate CA certificate")
        _check_ca(intermediate, path_len, "intermediate CA certificate")
        current, path_len, role = intermediate, path_len + 1, "intermediate CA certificate"
    else:  # pragma: no cover - each round consumes an intermediate, so the pool runs out first
        raise AikNotFleetIssued(
            "the AIK certificate chain does not end at a fleet CA",
            "a chain ending at a fleet CA",
            "intermediates only",
        )
    return _check_profile(leaf)
