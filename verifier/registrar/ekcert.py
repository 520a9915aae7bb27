"""EK certificate validation against the operator's EK CA bundle.

EK certificates are not web certificates: swtpm's (and many vendors') carry a critical
SubjectAltName holding only a TCG directoryName (TPM manufacturer, model, version), a
SubjectDirectoryAttributes extension, an empty subject, and the TCG EK EKU. A generic path
validator refuses them for reasons that say nothing about their trustworthiness, so the chain is
checked here explicitly, link by link. :func:`verify_ek_certificate` checks, in order:

1. the certificate parses as DER X.509;
2. it is valid at ``now`` (notBefore ≤ now ≤ notAfter) and is not a CA (BasicConstraints);
3. walking up from it, each issuer is a certificate of the bundle whose subject equals the
   child's issuer and whose key verifies the child's signature (RSA PKCS#1 v1.5 / PSS, ECDSA:
   ``Certificate.verify_directly_issued_by``), that is valid at ``now``, is a CA
   (BasicConstraints CA=TRUE) and, when it has KeyUsage, may sign certificates; the walk ends at
   a self-signed certificate of the bundle (a trust anchor) within :data:`MAX_CHAIN_DEPTH` links.
   Bundle certificates that are not self-signed are intermediates: trusted only through an anchor;
4. its public key equals the EK public key the host presented (SubjectPublicKeyInfo compared).

Deliberately not checked: revocation (swtpm-localca publishes no CRL; a production bundle with
CRLs is future work), the TCG SAN/SDA contents (returned for display only), name constraints and
policy OIDs (EK CAs do not use them).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from evidence.errors import ParseError
from verifier.registrar.errors import EkCertificateRejected, EkPublicMismatch

__all__ = [
    "MAX_CHAIN_DEPTH",
    "EkTrustBundle",
    "VerifiedEkCertificate",
    "merge_bundles",
    "verify_ek_certificate",
]

MAX_CHAIN_DEPTH = 5
"""Most CA certificates between an EK certificate and its anchor (inclusive)."""


@dataclass(frozen=True)
class EkTrustBundle:
    """The CA certificates an operator trusts to vouch for EKs.

    Attributes:
        certificates: every certificate of the bundle; the self-signed ones are anchors.
    """

    certificates: tuple[x509.Certificate, ...]

    @classmethod
    def from_pem(cls, data: bytes) -> EkTrustBundle:
        """Load a bundle of PEM certificates (one file, several ``BEGIN CERTIFICATE`` blocks).

        Raises:
            ParseError: no certificate, or one does not parse.
        """
        try:
            certs = x509.load_pem_x509_certificates(data)
        except ValueError as err:
            raise ParseError("EK CA bundle", 0, "PEM certificates", str(err)) from err
        return cls(tuple(certs))

    def to_pem(self) -> bytes:
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in self.certificates)

    @property
    def anchors(self) -> tuple[x509.Certificate, ...]:
        return tuple(c for c in self.certificates if _self_signed(c))


@dataclass(frozen=True)
class VerifiedEkCertificate:
    """An EK certificate that passed :func:`verify_ek_certificate`.

    Attributes:
        certificate: the EK certificate.
        chain: its issuers, nearest first, ending with the trust anchor.
    """

    certificate: x509.Certificate
    chain: tuple[x509.Certificate, ...]

    @property
    def issuer_path(self) -> tuple[str, ...]:
        """Subjects from the EK certificate's issuer up to the anchor (for logs and --json)."""
        return tuple(c.subject.rfc4514_string() for c in self.chain)


def _self_signed(cert: x509.Certificate) -> bool:
    if cert.issuer != cert.subject:
        return False
    try:
        cert.verify_directly_issued_by(cert)
    except (InvalidSignature, ValueError, TypeError, UnsupportedAlgorithm):
        return False
    return True


def _valid_at(cert: x509.Certificate, now: datetime) -> bool:
    return cert.not_valid_before_utc <= now <= cert.not_valid_after_utc


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except (x509.ExtensionNotFound, ValueError):
        return False
    if not bc.ca:
        return False
    try:
        ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return True
    except ValueError:
        return False
    return bool(ku.key_cert_sign)


def _claims_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except (x509.ExtensionNotFound, ValueError):
        return False


def _describe(cert: x509.Certificate) -> str:
    return f"subject {cert.subject.rfc4514_string()!r}, issuer {cert.issuer.rfc4514_string()!r}"


def _find_issuer(
    child: x509.Certificate, bundle: Sequence[x509.Certificate], now: datetime
) -> x509.Certificate:
    candidates = [c for c in bundle if c.subject == child.issuer]
    if not candidates:
        known = sorted({c.subject.rfc4514_string() for c in bundle})
        raise EkCertificateRejected(
            f"EK certificate chain: expected an issuer {child.issuer.rfc4514_string()!r} in the "
            f"EK CA bundle, got none (bundle subjects: {', '.join(known) or 'empty'}); add the "
            "EK manufacturer's CA to the bundle (`vtpm-verify registrar init --ek-ca FILE`)"
        )
    reasons = []
    for issuer in candidates:
        try:
            child.verify_directly_issued_by(issuer)
        except (InvalidSignature, ValueError, TypeError, UnsupportedAlgorithm) as err:
            reasons.append(f"signature does not verify ({type(err).__name__})")
            continue
        if not _valid_at(issuer, now):
            reasons.append(
                f"issuer not valid at {now.isoformat()} (valid "
                f"{issuer.not_valid_before_utc.isoformat()} to "
                f"{issuer.not_valid_after_utc.isoformat()})"
            )
            continue
        if not _is_ca(issuer):
            reasons.append("issuer is not a CA (BasicConstraints/KeyUsage)")
            continue
        return issuer
    raise EkCertificateRejected(
        f"EK certificate chain: {_describe(child)}: no certificate named "
        f"{child.issuer.rfc4514_string()!r} in the bundle issued it: {'; '.join(reasons)}"
    )


def _spki(key: object) -> bytes:
    if not isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
        raise TypeError(f"EK public key must be RSA or ECC, got {type(key).__name__}")
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def verify_ek_certificate(
    certificate_der: bytes,
    ek_public_key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey,
    bundle: EkTrustBundle,
    *,
    now: datetime,
) -> VerifiedEkCertificate:
    """Check that ``certificate_der`` is an EK certificate for ``ek_public_key`` from a trusted CA.

    The checks and their order are listed in the module docstring. The caller must already trust
    ``bundle`` (the operator configured it); ``now`` is timezone-aware UTC.

    Raises:
        ParseError: the certificate is not DER X.509.
        EkCertificateRejected: validity, CA flag, or the chain to an anchor fails.
        EkPublicMismatch: the certificate certifies another key.
    """
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    try:
        cert = x509.load_der_x509_certificate(certificate_der)
    except ValueError as err:
        raise ParseError("EK certificate", 0, "a DER X.509 certificate", str(err)) from err
    if not _valid_at(cert, now):
        raise EkCertificateRejected(
            f"EK certificate ({_describe(cert)}): expected validity covering {now.isoformat()}, "
            f"got {cert.not_valid_before_utc.isoformat()} to {cert.not_valid_after_utc.isoformat()}"
        )
    if _claims_ca(cert):
        raise EkCertificateRejected(
            f"EK certificate ({_describe(cert)}): expected an end-entity certificate, got a CA"
        )
    chain: list[x509.Certificate] = []
    anchors = bundle.anchors
    current = cert
    while True:
        if len(chain) >= MAX_CHAIN_DEPTH:
            raise EkCertificateRejected(
                f"EK certificate chain: no trust anchor within {MAX_CHAIN_DEPTH} links"
            )
        issuer = _find_issuer(current, bundle.certificates, now)
        chain.append(issuer)
        if issuer in anchors:
            break
        current = issuer
    try:
        cert_key = cert.public_key()
    except (ValueError, UnsupportedAlgorithm) as err:
        raise EkCertificateRejected(f"EK certificate: public key unreadable ({err})") from err
    if not isinstance(cert_key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
        raise EkPublicMismatch(
            f"EK certificate: expected an RSA or ECC key, got {type(cert_key).__name__}"
        )
    if _spki(cert_key) != _spki(ek_public_key):
        raise EkPublicMismatch(
            "EK certificate: expected it to certify the EK public key the host presented, "
            f"got a certificate for another key ({_key_text(cert_key)} versus "
            f"{_key_text(ek_public_key)})"
        )
    return VerifiedEkCertificate(certificate=cert, chain=tuple(chain))


def _key_text(key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey) -> str:
    if isinstance(key, rsa.RSAPublicKey):
        return f"RSA-{key.key_size} modulus …{key.public_numbers().n % (1 << 32):08x}"
    return f"ECC {key.curve.name} x …{key.public_numbers().x % (1 << 32):08x}"


def merge_bundles(pems: Iterable[bytes]) -> EkTrustBundle:
    """Merge several PEM blobs into one bundle (duplicates removed, order kept)."""
    seen: dict[bytes, x509.Certificate] = {}
    for data in pems:
        for cert in EkTrustBundle.from_pem(data).certificates:
            seen.setdefault(cert.fingerprint(hashes.SHA256()), cert)
    return EkTrustBundle(tuple(seen.values()))
