"""evidence.aik_cert: the AIK certificate profile, its extensions and verify_aik_certificate."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from evidence import aik_cert
from evidence.aik_cert import (
    TCG_KP_AIK_CERTIFICATE,
    TPM_OBJECT_NAME_OID,
    TPM_PUBLIC_OID,
    AikCertificateMismatch,
    AikNotFleetIssued,
    CaConstraintViolation,
    CertificateNotValidNow,
    decode_octet_string,
    encode_octet_string,
    verify_aik_certificate,
)
from evidence.errors import ChainError, HashAlgorithmNotAllowed, ParseError, TruncatedError
from evidence.verdict import finding_from_error
from tests.helpers.evidence_factory import AIK_ATTRIBUTES, NOW, Host, SoftKey, make_fleet
from verifier.registrar.ca import FleetCa

FLEET = make_fleet(101)
OTHER_FLEET = make_fleet(202, "another fleet")
AIK = SoftKey.make(303, AIK_ATTRIBUTES)
DER = Encoding.DER


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _issue(
    fleet: FleetCa | tuple[ec.EllipticCurvePrivateKey, x509.Certificate] = FLEET,
    *,
    key: ec.EllipticCurvePublicKey | None = None,
    name_ext: bytes | None = None,
    public_ext: bytes | None = None,
    eku: x509.ObjectIdentifier | None = TCG_KP_AIK_CERTIFICATE,
    ca: bool = False,
    not_before: datetime = NOW - timedelta(days=1),
    not_after: datetime = NOW + timedelta(days=1),
    extra: x509.ExtensionType | None = None,
) -> bytes:
    """An AIK certificate built by hand, the registrar's profile unless an argument changes it."""
    ca_key, ca_cert = (fleet.key, fleet.certificate) if isinstance(fleet, FleetCa) else fleet
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name("host-a"))
        .issuer_name(ca_cert.subject)
        .public_key(key or AIK.private.public_key())
        .serial_number(5)
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if eku is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
    for oid, value in (
        (TPM_OBJECT_NAME_OID, encode_octet_string(AIK.name) if name_ext is None else name_ext),
        (
            TPM_PUBLIC_OID,
            encode_octet_string(AIK.public_bytes) if public_ext is None else public_ext,
        ),
    ):
        if value:
            builder = builder.add_extension(x509.UnrecognizedExtension(oid, value), critical=False)
    if extra is not None:
        builder = builder.add_extension(extra, critical=True)
    return builder.sign(ca_key, hashes.SHA256()).public_bytes(DER)


def _registrar_issued(fleet: FleetCa = FLEET) -> bytes:
    return Host.make(fleet, "host-a", 303).aik_certificates[0]


def _ca(
    cn: str,
    *,
    issuer: tuple[ec.EllipticCurvePrivateKey, x509.Certificate] | None = None,
    ca: bool = True,
    path_length: int | None = None,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.derive_private_key(len(cn) * 7919 + 17, ec.SECP256R1())
    signer_key, issuer_name = (key, _name(cn)) if issuer is None else (issuer[0], issuer[1].subject)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(3)
        .not_valid_before(NOW - timedelta(days=10))
        .not_valid_after(NOW + timedelta(days=10))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=path_length), critical=True)
        .sign(signer_key, hashes.SHA256())
    )
    return key, cert


# ---------------------------------------------------------------- the profile


def test_the_oids_are_the_ones_every_party_uses() -> None:
    from evidence import verify
    from verifier.registrar import ca

    assert aik_cert.VTPM_TRUST_OID_ARC == ca.VTPM_TRUST_OID_ARC
    for name in ("TPM_OBJECT_NAME_OID", "TPM_PUBLIC_OID", "TCG_KP_AIK_CERTIFICATE"):
        assert getattr(aik_cert, name) == getattr(ca, name) == getattr(verify, name)
    assert ca.TPM_PUBLIC_OID is aik_cert.TPM_PUBLIC_OID  # re-exported, not repeated


def test_a_registrar_issued_certificate_verifies_to_its_aik() -> None:
    der = _registrar_issued()
    aik = verify_aik_certificate(der, [FLEET.certificate], NOW)
    assert aik == AIK.public
    parsed = x509.load_der_x509_certificate(der)
    assert verify_aik_certificate(parsed, [FLEET.certificate.public_bytes(DER)], NOW) == aik
    assert aik_cert.aik_name_from_certificate(parsed) == AIK.name
    assert aik_cert.aik_public_from_certificate(parsed) == AIK.public_bytes


def test_any_of_several_fleet_cas_may_have_issued_it() -> None:
    roots = [OTHER_FLEET.certificate, FLEET.certificate]
    assert verify_aik_certificate(_registrar_issued(), roots, NOW) == AIK.public


def test_misuse_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        verify_aik_certificate(_registrar_issued(), [FLEET.certificate], NOW.replace(tzinfo=None))
    with pytest.raises(ValueError, match="at least one"):
        verify_aik_certificate(_registrar_issued(), [], NOW)


# ---------------------------------------------------------------- the chain


@pytest.mark.parametrize("now", [NOW - timedelta(days=2), NOW + timedelta(days=2)])
def test_a_certificate_outside_its_validity_is_refused(now: datetime) -> None:
    with pytest.raises(CertificateNotValidNow, match="AIK certificate") as info:
        verify_aik_certificate(_issue(), [FLEET.certificate], now)
    assert info.value.got == now.isoformat()
    assert info.value.id == "verify.chain.validity"


def test_an_expired_fleet_ca_is_refused() -> None:
    later = FLEET.certificate.not_valid_after_utc + timedelta(days=1)
    cert = _issue(not_after=later + timedelta(days=1))
    with pytest.raises(CertificateNotValidNow, match="fleet CA certificate"):
        verify_aik_certificate(cert, [FLEET.certificate], later)


def test_another_fleets_certificate_is_refused() -> None:
    with pytest.raises(AikNotFleetIssued) as info:
        verify_aik_certificate(_registrar_issued(OTHER_FLEET), [FLEET.certificate], NOW)
    assert info.value.got == OTHER_FLEET.certificate.subject.rfc4514_string()
    finding = finding_from_error(info.value)
    assert (finding.id, finding.got) == ("verify.chain.aik_issuer", info.value.got)


def test_a_forged_issuer_name_is_refused() -> None:
    """Same issuer name as the fleet CA, signed by another key."""
    forger = (OTHER_FLEET.key, FLEET.certificate)
    with pytest.raises(AikNotFleetIssued):
        verify_aik_certificate(_issue(forger), [FLEET.certificate], NOW)


def test_an_intermediate_ca_is_followed_within_path_length() -> None:
    root = _ca("root", path_length=1)
    mid = _ca("intermediate", issuer=root, path_length=0)
    cert = _issue(mid)
    assert verify_aik_certificate(cert, [root[1]], NOW, intermediates=[mid[1]]) == AIK.public
    with pytest.raises(AikNotFleetIssued):
        verify_aik_certificate(cert, [root[1]], NOW)


def test_an_intermediate_beyond_the_roots_path_length_is_refused() -> None:
    """The registrar's own fleet CA has pathLen 0: it may not delegate."""
    mid = _ca("intermediate", issuer=(FLEET.key, FLEET.certificate))
    with pytest.raises(CaConstraintViolation, match="pathLenConstraint 0"):
        verify_aik_certificate(_issue(mid), [FLEET.certificate], NOW, intermediates=[mid[1]])


def test_a_non_ca_issuer_is_refused() -> None:
    root = _ca("root")
    not_ca = _ca("leafy", issuer=root, ca=False)
    with pytest.raises(CaConstraintViolation, match="CA is FALSE"):
        verify_aik_certificate(_issue(not_ca), [root[1]], NOW, intermediates=[not_ca[1]])


def test_sha1_needs_an_opt_in() -> None:
    """cryptography can no longer sign with SHA-1: test_verify.py's OpenSSL-made vector."""
    from tests.unit.test_verify import SHA1_CERT

    cert = x509.load_pem_x509_certificate(SHA1_CERT)
    with pytest.raises(HashAlgorithmNotAllowed, match="allow_sha1"):
        verify_aik_certificate(cert, [cert], NOW)
    with pytest.raises(ChainError) as info:  # allowed, the rest is still checked
        verify_aik_certificate(cert, [cert], NOW, allow_sha1=True)
    assert not isinstance(info.value, HashAlgorithmNotAllowed)


# ---------------------------------------------------------------- the AIK profile


def test_a_tls_certificate_of_the_same_ca_is_not_an_aik_certificate() -> None:
    cert = FLEET.issue_tls_certificate(
        "host-a",
        AIK.private.public_key(),
        dns_names=("host-a",),
        now=NOW,
        lifetime=timedelta(days=1),
        serial=8,
    ).public_bytes(DER)
    with pytest.raises(AikCertificateMismatch, match="not an AIK certificate") as info:
        verify_aik_certificate(cert, [FLEET.certificate], NOW)
    assert info.value.got == ExtendedKeyUsageOID.SERVER_AUTH.dotted_string + ", " + (
        ExtendedKeyUsageOID.CLIENT_AUTH.dotted_string
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"eku": None}, "no ExtendedKeyUsage"),
        ({"ca": True}, "is a CA certificate"),
        ({"public_ext": b""}, "no TPMT_PUBLIC extension"),
        ({"name_ext": b""}, "no TPM object Name extension"),
        ({"name_ext": encode_octet_string(b"\x00\x0b" + bytes(32))}, "Name is not the Name"),
        ({"public_ext": encode_octet_string(b"\x00\x23garbage")}, "holds no usable key"),
        (
            {"key": ec.derive_private_key(9, ec.SECP256R1()).public_key()},
            "subject public key is not the key",
        ),
        ({"extra": x509.OCSPNoCheck()}, "unprocessed critical extensions"),
    ],
)
def test_profile_violations_are_refused(kwargs: dict[str, object], message: str) -> None:
    cert = _issue(**kwargs)  # type: ignore[arg-type]
    with pytest.raises(AikCertificateMismatch, match=message) as info:
        verify_aik_certificate(cert, [FLEET.certificate], NOW)
    assert info.value.id == "verify.chain.aik_certificate"
    assert info.value.expected and info.value.got


def test_another_aiks_tpmt_public_with_its_name_is_refused() -> None:
    """Consistent extensions for AIK B on a certificate for AIK A's key."""
    other = SoftKey.make(404, AIK_ATTRIBUTES)
    cert = _issue(
        name_ext=encode_octet_string(other.name),
        public_ext=encode_octet_string(other.public_bytes),
    )
    with pytest.raises(AikCertificateMismatch, match="subject public key"):
        verify_aik_certificate(cert, [FLEET.certificate], NOW)


def test_a_malformed_extension_is_a_parse_error() -> None:
    cert = _issue(public_ext=b"\x04\x81\x05hello")  # non-minimal length
    with pytest.raises(ParseError, match="minimal"):
        verify_aik_certificate(cert, [FLEET.certificate], NOW)


def test_not_a_certificate_is_a_parse_error() -> None:
    with pytest.raises(ParseError, match="AIK certificate"):
        verify_aik_certificate(b"\x30\x03\x02\x01\x01", [FLEET.certificate], NOW)


# ---------------------------------------------------------------- OCTET STRING coding


@pytest.mark.parametrize(
    ("size", "header"),
    [(0, "0400"), (127, "047f"), (128, "048180"), (255, "0481ff"), (256, "04820100")],
)
def test_octet_string_uses_the_minimal_length_form(size: int, header: str) -> None:
    data = bytes(range(256))[:size]
    encoded = encode_octet_string(data)
    assert encoded.hex().startswith(header) and encoded[len(header) // 2 :] == data
    assert decode_octet_string(encoded) == data


def test_octet_string_limits() -> None:
    assert decode_octet_string(encode_octet_string(bytes(0xFFFF))) == bytes(0xFFFF)
    with pytest.raises(ValueError, match="65535"):
        encode_octet_string(bytes(0x10000))


@pytest.mark.parametrize(
    ("value", "error", "message"),
    [
        (b"", TruncatedError, "header"),
        (b"\x04", TruncatedError, "header"),
        (b"\x05\x00", ParseError, "tag 0x04"),
        (b"\x04\x03ab", TruncatedError, "3 content bytes"),
        (b"\x04\x01ab", ParseError, "trailing"),
        (b"\x04\x80", ParseError, "definite"),
        (b"\x04\x83\x00\x00\x01a", ParseError, "definite"),
        (b"\x04\x81", TruncatedError, "one-byte length"),
        (b"\x04\x82\x01", TruncatedError, "two-byte length"),
        (b"\x04\x81\x01a", ParseError, "minimal"),
        (b"\x04\x82\x00\xffa", ParseError, "minimal"),
    ],
)
def test_hostile_octet_strings(value: bytes, error: type[ParseError], message: str) -> None:
    with pytest.raises(error, match=message) as info:
        decode_octet_string(value, "TPMT_PUBLIC extension")
    assert type(info.value) is error and info.value.what == "TPMT_PUBLIC extension"


@given(st.binary(max_size=600))
def test_octet_string_round_trips(data: bytes) -> None:
    assert decode_octet_string(encode_octet_string(data)) == data


@given(st.binary(max_size=300))
def test_garbage_octet_strings_raise_only_parse_error(value: bytes) -> None:
    try:
        content = decode_octet_string(value)
    except ParseError:
        return
    assert encode_octet_string(content) == value  # accepted means canonical


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    name_ext=st.one_of(st.binary(min_size=1, max_size=80), st.just(encode_octet_string(AIK.name))),
    public_ext=st.one_of(
        st.binary(min_size=1, max_size=200),
        st.binary(max_size=200).map(encode_octet_string),
        st.just(encode_octet_string(AIK.public_bytes)),
    ),
)
def test_garbage_extensions_raise_only_parse_or_chain_errors(
    name_ext: bytes, public_ext: bytes
) -> None:
    cert = _issue(name_ext=name_ext, public_ext=public_ext)
    try:
        aik = verify_aik_certificate(cert, [FLEET.certificate], NOW)
    except (ParseError, ChainError):
        return
    assert aik == AIK.public
    assert name_ext == encode_octet_string(AIK.name)
