"""EK certificate chain checks (verifier/registrar/ekcert.py) on hand-made PKIs.

The builders here make swtpm-like certificates: root CA → intermediate → EK certificate with a
critical TCG directoryName SubjectAltName and the tcg-kp-EKCertificate EKU. Real swtpm EK
certificates are checked in tests/sim/test_registrar_admission.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from evidence.errors import ParseError
from verifier.registrar.ekcert import EkTrustBundle, merge_bundles, verify_ek_certificate
from verifier.registrar.errors import EkCertificateRejected, EkPublicMismatch

NOW = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_ca(
    cn: str,
    issuer: tuple[x509.Certificate, PrivateKey] | None = None,
    *,
    ca: bool = True,
    start: datetime = NOW - timedelta(days=1),
    end: datetime = NOW + timedelta(days=3650),
) -> tuple[x509.Certificate, PrivateKey]:
    key = rsa.generate_private_key(65537, 2048)
    issuer_name, issuer_key = (issuer[0].subject, issuer[1]) if issuer else (_name(cn), key)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .sign(issuer_key, hashes.SHA256())
    )
    return cert, key


def make_ek_cert(
    ek_public: rsa.RSAPublicKey | ec.EllipticCurvePublicKey,
    issuer: tuple[x509.Certificate, PrivateKey],
    *,
    start: datetime = NOW - timedelta(days=1),
    end: datetime = NOW + timedelta(days=3650),
) -> bytes:
    tcg = x509.Name(
        [
            x509.NameAttribute(x509.ObjectIdentifier("2.23.133.2.1"), "id:00001014"),
            x509.NameAttribute(x509.ObjectIdentifier("2.23.133.2.2"), "swtpm"),
            x509.NameAttribute(x509.ObjectIdentifier("2.23.133.2.3"), "id:20191023"),
        ]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(issuer[0].subject)
        .public_key(ek_public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.SubjectAlternativeName([x509.DirectoryName(tcg)]), critical=True)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([x509.ObjectIdentifier("2.23.133.8.1")]), critical=False
        )
        .sign(issuer[1], hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.DER)


def pem(*certs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


@dataclass
class Pki:
    root: tuple[x509.Certificate, PrivateKey]
    intermediate: tuple[x509.Certificate, PrivateKey]

    @property
    def bundle(self) -> EkTrustBundle:
        return EkTrustBundle.from_pem(pem(self.root[0], self.intermediate[0]))


def make_pki(prefix: str = "test-localca") -> Pki:
    root = make_ca(f"{prefix}-rootca")
    return Pki(root=root, intermediate=make_ca(prefix, root))


@pytest.fixture(scope="module")
def pki() -> Pki:
    return make_pki()


@pytest.fixture(scope="module")
def ek() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP384R1())


def test_swtpm_like_chain_verifies(pki: Pki, ek: ec.EllipticCurvePrivateKey) -> None:
    der = make_ek_cert(ek.public_key(), pki.intermediate)
    verified = verify_ek_certificate(der, ek.public_key(), pki.bundle, now=NOW)
    assert verified.issuer_path == ("CN=test-localca", "CN=test-localca-rootca")


def test_rsa_ek_verifies(pki: Pki) -> None:
    key = rsa.generate_private_key(65537, 2048)
    der = make_ek_cert(key.public_key(), pki.intermediate)
    verify_ek_certificate(der, key.public_key(), pki.bundle, now=NOW)


def test_unknown_ca_is_refused_naming_the_issuer(pki: Pki, ek: ec.EllipticCurvePrivateKey) -> None:
    other = make_pki("rogue-ca")
    der = make_ek_cert(ek.public_key(), other.intermediate)
    with pytest.raises(EkCertificateRejected, match="'CN=rogue-ca'") as info:
        verify_ek_certificate(der, ek.public_key(), pki.bundle, now=NOW)
    assert info.value.id == "registrar.ek_certificate"


def test_same_name_other_key_is_refused(pki: Pki, ek: ec.EllipticCurvePrivateKey) -> None:
    """A forger who copies the CA's name but not its key gets nowhere."""
    impostor = make_pki("test-localca")
    der = make_ek_cert(ek.public_key(), impostor.intermediate)
    with pytest.raises(EkCertificateRejected, match="does not verify"):
        verify_ek_certificate(der, ek.public_key(), pki.bundle, now=NOW)


def test_intermediate_alone_is_not_an_anchor(pki: Pki, ek: ec.EllipticCurvePrivateKey) -> None:
    der = make_ek_cert(ek.public_key(), pki.intermediate)
    only_intermediate = EkTrustBundle.from_pem(pem(pki.intermediate[0]))
    with pytest.raises(EkCertificateRejected, match="rootca"):
        verify_ek_certificate(der, ek.public_key(), only_intermediate, now=NOW)


def test_certificate_for_another_key_is_refused(pki: Pki, ek: ec.EllipticCurvePrivateKey) -> None:
    der = make_ek_cert(ek.public_key(), pki.intermediate)
    other = ec.generate_private_key(ec.SECP384R1()).public_key()
    with pytest.raises(EkPublicMismatch, match="another key"):
        verify_ek_certificate(der, other, pki.bundle, now=NOW)


def test_expired_ek_certificate_is_refused(pki: Pki, ek: ec.EllipticCurvePrivateKey) -> None:
    der = make_ek_cert(ek.public_key(), pki.intermediate, end=NOW - timedelta(seconds=1))
    with pytest.raises(EkCertificateRejected, match="validity"):
        verify_ek_certificate(der, ek.public_key(), pki.bundle, now=NOW)


def test_expired_intermediate_is_refused(pki: Pki, ek: ec.EllipticCurvePrivateKey) -> None:
    old = make_ca("test-localca", pki.root, end=NOW - timedelta(days=1))
    der = make_ek_cert(ek.public_key(), old)
    bundle = EkTrustBundle.from_pem(pem(pki.root[0], old[0]))
    with pytest.raises(EkCertificateRejected, match="not valid at"):
        verify_ek_certificate(der, ek.public_key(), bundle, now=NOW)


def test_issuer_that_is_not_a_ca_is_refused(pki: Pki, ek: ec.EllipticCurvePrivateKey) -> None:
    leaf_issuer = make_ca("not-a-ca", pki.root, ca=False)
    der = make_ek_cert(ek.public_key(), leaf_issuer)
    bundle = EkTrustBundle.from_pem(pem(pki.root[0], leaf_issuer[0]))
    with pytest.raises(EkCertificateRejected, match="not a CA"):
        verify_ek_certificate(der, ek.public_key(), bundle, now=NOW)


def test_a_ca_certificate_is_not_an_ek_certificate(pki: Pki) -> None:
    der = pki.intermediate[0].public_bytes(serialization.Encoding.DER)
    key = pki.intermediate[1].public_key()
    with pytest.raises(EkCertificateRejected, match="end-entity"):
        verify_ek_certificate(der, key, pki.bundle, now=NOW)


@pytest.mark.parametrize("garbage", [b"", b"\x30\x03\x02\x01\x00", b"not a certificate"])
def test_garbage_is_a_parse_error(pki: Pki, ek: ec.EllipticCurvePrivateKey, garbage: bytes) -> None:
    with pytest.raises(ParseError):
        verify_ek_certificate(garbage, ek.public_key(), pki.bundle, now=NOW)


def test_bundles_merge_without_duplicates(pki: Pki) -> None:
    other = make_pki("other")
    merged = merge_bundles([pem(pki.root[0]), pem(pki.root[0], other.root[0])])
    assert len(merged.certificates) == 2
    assert len(merged.anchors) == 2


def test_naive_time_is_misuse(pki: Pki, ek: ec.EllipticCurvePrivateKey) -> None:
    der = make_ek_cert(ek.public_key(), pki.intermediate)
    with pytest.raises(ValueError, match="timezone"):
        verify_ek_certificate(der, ek.public_key(), pki.bundle, now=NOW.replace(tzinfo=None))
