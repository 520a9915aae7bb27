"""The fleet CA's certificates (verifier/registrar/ca.py): layout a verifier relies on."""

from __future__ import annotations

from datetime import timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from tests.unit.test_registrar_ekcert import NOW
from verifier.registrar.ca import (
    TCG_KP_AIK_CERTIFICATE,
    FleetCa,
    aik_name_from_certificate,
    aik_public_from_certificate,
    new_ca_certificate,
)


@pytest.fixture(scope="module")
def ca() -> FleetCa:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = new_ca_certificate(key, common_name="test fleet", now=NOW, serial=7)
    return FleetCa(key=key, certificate=cert, policy_key=ec.generate_private_key(ec.SECP256R1()))


@pytest.mark.parametrize("size", [1, 127, 128, 255, 256, 1000])
def test_tpm_extensions_round_trip_at_every_der_length_form(ca: FleetCa, size: int) -> None:
    aik = ec.generate_private_key(ec.SECP256R1()).public_key()
    public = bytes(range(256)) * 4
    cert = ca.issue_aik_certificate(
        "host-a",
        aik,
        b"\x00\x0b" + b"\x01" * 32,
        public[:size],
        now=NOW,
        lifetime=timedelta(days=1),
        serial=9,
    )
    assert aik_public_from_certificate(cert) == public[:size]
    assert aik_name_from_certificate(cert) == b"\x00\x0b" + b"\x01" * 32


def test_aik_certificate_layout(ca: FleetCa) -> None:
    aik = ec.generate_private_key(ec.SECP256R1()).public_key()
    cert = ca.issue_aik_certificate(
        "host-a",
        aik,
        b"\x00\x0b" + b"\x02" * 32,
        b"\x00\x23",
        now=NOW,
        lifetime=timedelta(days=10),
        serial=11,
    )
    cert.verify_directly_issued_by(ca.certificate)
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.digital_signature and not ku.key_cert_sign
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [TCG_KP_AIK_CERTIFICATE]
    assert cert.not_valid_after_utc == NOW + timedelta(days=10)


def test_certificates_never_outlive_the_ca(ca: FleetCa) -> None:
    aik = ec.generate_private_key(ec.SECP256R1()).public_key()
    cert = ca.issue_tls_certificate(
        "host-a",
        aik,
        dns_names=("host-a",),
        now=NOW,
        lifetime=timedelta(days=100 * 365),
        serial=12,
    )
    assert cert.not_valid_after_utc == ca.certificate.not_valid_after_utc


def test_missing_extension_is_reported(ca: FleetCa) -> None:
    with pytest.raises(ValueError, match="TPMT_PUBLIC"):
        aik_public_from_certificate(ca.certificate)
