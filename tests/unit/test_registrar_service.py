"""The admission protocol end to end in one process, with a software "TPM".

A :class:`SoftwareHost` holds its EK private key and plays TPM2_ActivateCredential in software
(tests/unit/test_make_credential.py), so every refusal path and the clock-dependent ones
(expired, replayed challenges) run in milliseconds. The same protocol on real swtpms, over HTTPS
and embedded, is in tests/sim/test_registrar_admission.py.
"""

from __future__ import annotations

import base64
import dataclasses
import secrets
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Literal

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from evidence.errors import ParseError
from evidence.tpm2 import (
    TpmsEccParms,
    TpmsEccPoint,
    TpmtPublic,
    TpmtScheme,
    TpmtSymDefObject,
    object_name,
)
from evidence.tpm2_policy import verify_policy_approval
from host_agent.registration import register_host
from tests.unit.test_make_credential import activate_in_software
from tests.unit.test_registrar_ekcert import NOW, Pki, make_ek_cert, make_pki, pem
from verifier.registrar.ca import TCG_KP_AIK_CERTIFICATE, aik_name_from_certificate
from verifier.registrar.credential import MadeCredential
from verifier.registrar.errors import (
    ActivationFailed,
    AikAttributesRejected,
    ChallengeRejected,
    CsrRejected,
    EkCertificateRejected,
    EkPublicMismatch,
    HostConflict,
    RegistrarStateError,
)
from verifier.registrar.service import RegistrarService
from verifier.registrar.state import RegistrarConfig, init_state, open_service
from verifier.registrar.store import RegistrarStore

AIK_ATTRIBUTES = 0x00050072  # fixedTPM|fixedParent|sensitiveDataOrigin|userWithAuth|restricted|sign
EK_ATTRIBUTES = 0x000300F2
NULL = 0x0010


def _point(key: ec.EllipticCurvePublicKey, size: int) -> TpmsEccPoint:
    n = key.public_numbers()
    return TpmsEccPoint(n.x.to_bytes(size, "big"), n.y.to_bytes(size, "big"))


def aik_public(key: ec.EllipticCurvePublicKey, **changes: object) -> TpmtPublic:
    public = TpmtPublic(
        name_alg=0x000B,
        object_attributes=AIK_ATTRIBUTES,
        auth_policy=b"",
        parameters=TpmsEccParms(
            symmetric=TpmtSymDefObject(NULL),
            scheme=TpmtScheme(0x0018, 0x000B),
            curve_id=0x0003,
            kdf=TpmtScheme(NULL),
        ),
        unique=_point(key, 32),
    )
    return dataclasses.replace(public, **changes)  # type: ignore[arg-type]


def ek_public(key: ec.EllipticCurvePublicKey) -> TpmtPublic:
    """swtpm_setup's high-range ECC P-384 EK template."""
    return TpmtPublic(
        name_alg=0x000C,
        object_attributes=EK_ATTRIBUTES,
        auth_policy=b"\x00" * 48,
        parameters=TpmsEccParms(
            symmetric=TpmtSymDefObject(0x0006, 256, 0x0043),
            scheme=TpmtScheme(NULL),
            curve_id=0x0004,
            kdf=TpmtScheme(NULL),
        ),
        unique=_point(key, 48),
    )


class SoftwareHost:
    """The admission subset of the HostTpm port, in software (one ECC P-384 EK)."""

    def __init__(self, pki: Pki, *, aik: TpmtPublic | None = None) -> None:
        self.ek_key = ec.generate_private_key(ec.SECP384R1())
        self.aik_key = ec.generate_private_key(ec.SECP256R1())
        self.ek = ek_public(self.ek_key.public_key())
        self.aik = aik or aik_public(self.aik_key.public_key())
        self.ek_cert = make_ek_cert(self.ek_key.public_key(), pki.intermediate)
        self.activations = 0

    def ek_certificates(self) -> list[tuple[int, bytes]]:
        return [(0x01C00016, self.ek_cert)]

    def ek_public(self, kind: Literal["rsa", "ecc"] = "rsa") -> bytes:
        assert kind == "ecc"
        return self.ek.marshal()

    def aik_public(self) -> bytes:
        return self.aik.marshal()

    def aik_name(self) -> bytes:
        return object_name(self.aik)

    def activate_credential(
        self, credential_blob: bytes, encrypted_secret: bytes, ek_kind: str = "rsa"
    ) -> bytes:
        self.activations += 1
        made = MadeCredential(credential_blob, encrypted_secret)
        return activate_in_software(self.ek_key, 0x000C, 256, self.aik_name(), made)


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture(scope="module")
def pki() -> Pki:
    return make_pki()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def registrar(tmp_path: Path, pki: Pki, clock: Clock) -> Iterator[RegistrarService]:
    state = tmp_path / "registrar"
    init_state(
        state,
        ek_ca_pems=[pem(pki.root[0], pki.intermediate[0])],
        now=NOW,
        random_bytes=secrets.token_bytes,
    )
    service, store = open_service(state, clock=clock, random_bytes=secrets.token_bytes)
    yield service
    store.close()


def tls_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _request(host: SoftwareHost, host_id: str = "host-a") -> dict[str, object]:
    return {
        "host_id": host_id,
        "endorsement_keys": [
            {
                "kind": "ecc",
                "nv_index": 0x01C00016,
                "public": _b64(host.ek.marshal()),
                "certificate": _b64(host.ek_cert),
            }
        ],
        "aik_public": _b64(host.aik.marshal()),
    }


def _csr(key: ec.EllipticCurvePrivateKey, cn: str = "host-a") -> str:
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def _answer(host: SoftwareHost, challenge: dict[str, str]) -> str:
    secret = host.activate_credential(
        base64.b64decode(challenge["credential_blob"]),
        base64.b64decode(challenge["encrypted_secret"]),
    )
    return _b64(secret)


def test_admission_issues_an_aik_certificate_from_the_fleet_ca(
    registrar: RegistrarService, pki: Pki
) -> None:
    host = SoftwareHost(pki)
    key = tls_key()
    reg = register_host(host, registrar, "host-a", key, ip_addresses=("10.77.0.1",))
    ca = x509.load_pem_x509_certificate(registrar.ca_certificate())
    aik_cert = x509.load_pem_x509_certificate(reg.aik_certificate)
    aik_cert.verify_directly_issued_by(ca)
    assert aik_cert.public_key() == host.aik_key.public_key()
    assert aik_name_from_certificate(aik_cert) == host.aik_name()
    assert aik_cert.subject.rfc4514_string() == "CN=host-a"
    eku = aik_cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [TCG_KP_AIK_CERTIFICATE]
    tls = x509.load_pem_x509_certificate(reg.tls_certificate)
    tls.verify_directly_issued_by(ca)
    san = tls.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["host-a"]
    assert [str(a) for a in san.get_values_for_type(x509.IPAddress)] == ["10.77.0.1"]
    [stored] = registrar.hosts()
    assert (stored.host_id, stored.aik_name) == ("host-a", host.aik_name().hex())


def test_re_registration_with_the_same_ek_replaces_the_aik(
    registrar: RegistrarService, pki: Pki
) -> None:
    host = SoftwareHost(pki)
    register_host(host, registrar, "host-a", tls_key())
    host.aik_key = ec.generate_private_key(ec.SECP256R1())
    host.aik = aik_public(host.aik_key.public_key())
    register_host(host, registrar, "host-a", tls_key())
    [stored] = registrar.hosts()
    assert stored.aik_name == host.aik_name().hex()


def _assert_nothing_stored(registrar: RegistrarService) -> None:
    assert registrar.hosts() == []


def test_unknown_ek_ca_is_refused(registrar: RegistrarService) -> None:
    host = SoftwareHost(make_pki("rogue"))
    with pytest.raises(EkCertificateRejected, match="rogue"):
        registrar.start(_request(host))
    assert host.activations == 0
    _assert_nothing_stored(registrar)


def test_ek_certificate_for_another_ek_is_refused(registrar: RegistrarService, pki: Pki) -> None:
    host, other = SoftwareHost(pki), SoftwareHost(pki)
    host.ek_cert = other.ek_cert
    with pytest.raises(EkPublicMismatch):
        registrar.start(_request(host))
    _assert_nothing_stored(registrar)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"object_attributes": AIK_ATTRIBUTES & ~0x2}, "missing FIXEDTPM"),
        ({"object_attributes": AIK_ATTRIBUTES & ~0x10000}, "missing RESTRICTED"),
        ({"object_attributes": AIK_ATTRIBUTES & ~0x20}, "missing SENSITIVEDATAORIGIN"),
        ({"object_attributes": AIK_ATTRIBUTES | 0x20000}, "decrypt"),
        ({"name_alg": 0x000C}, "nameAlg"),
    ],
)
def test_bad_aik_attributes_are_refused(
    registrar: RegistrarService, pki: Pki, change: dict[str, object], message: str
) -> None:
    host = SoftwareHost(pki)
    host.aik = aik_public(host.aik_key.public_key(), **change)
    with pytest.raises(AikAttributesRejected, match=message):
        registrar.start(_request(host))
    _assert_nothing_stored(registrar)


def test_aik_on_p384_is_refused(registrar: RegistrarService, pki: Pki) -> None:
    host = SoftwareHost(pki)
    k = ec.generate_private_key(ec.SECP384R1()).public_key()
    params = dataclasses.replace(host.aik.parameters, curve_id=0x0004)  # type: ignore[arg-type]
    host.aik = dataclasses.replace(host.aik, parameters=params, unique=_point(k, 48))
    with pytest.raises(AikAttributesRejected, match="P-256"):
        registrar.start(_request(host))


def test_wrong_secret_is_refused_and_nothing_stored(registrar: RegistrarService, pki: Pki) -> None:
    host = SoftwareHost(pki)
    challenge = registrar.start(_request(host))
    body = {"secret": _b64(secrets.token_bytes(32)), "csr": _csr(tls_key())}
    with pytest.raises(ActivationFailed, match="not in the same TPM"):
        registrar.activate(challenge["challenge_id"], body)
    _assert_nothing_stored(registrar)
    with pytest.raises(ChallengeRejected, match="already answered"):
        registrar.activate(challenge["challenge_id"], {**body, "secret": _answer(host, challenge)})


def test_replayed_challenge_is_refused(registrar: RegistrarService, pki: Pki) -> None:
    host = SoftwareHost(pki)
    challenge = registrar.start(_request(host))
    body = {"secret": _answer(host, challenge), "csr": _csr(tls_key())}
    registrar.activate(challenge["challenge_id"], body)
    with pytest.raises(ChallengeRejected, match="single-use"):
        registrar.activate(challenge["challenge_id"], body)


def test_expired_challenge_is_refused(registrar: RegistrarService, pki: Pki, clock: Clock) -> None:
    host = SoftwareHost(pki)
    challenge = registrar.start(_request(host))
    clock.now = NOW + RegistrarConfig().options().challenge_ttl + timedelta(seconds=1)
    body = {"secret": _answer(host, challenge), "csr": _csr(tls_key())}
    with pytest.raises(ChallengeRejected, match="expired"):
        registrar.activate(challenge["challenge_id"], body)
    _assert_nothing_stored(registrar)


@pytest.mark.parametrize("challenge_id", ["", "../etc", "A" * 32, "0" * 31])
def test_malformed_challenge_id_is_refused(registrar: RegistrarService, challenge_id: str) -> None:
    with pytest.raises(ChallengeRejected, match="hex"):
        registrar.activate(challenge_id, {"secret": "AAAA", "csr": "x"})


def test_bad_csr_is_refused_and_nothing_stored(registrar: RegistrarService, pki: Pki) -> None:
    host = SoftwareHost(pki)
    challenge = registrar.start(_request(host))
    body = {"secret": _answer(host, challenge), "csr": "-----BEGIN CERTIFICATE REQUEST-----\n"}
    with pytest.raises(CsrRejected):
        registrar.activate(challenge["challenge_id"], body)
    _assert_nothing_stored(registrar)


def test_host_id_taken_by_another_ek_is_refused(registrar: RegistrarService, pki: Pki) -> None:
    register_host(SoftwareHost(pki), registrar, "host-a", tls_key())
    with pytest.raises(HostConflict, match="another EK"):
        registrar.start(_request(SoftwareHost(pki), "host-a"))


def test_ek_admitted_under_another_host_id_is_refused(
    registrar: RegistrarService, pki: Pki
) -> None:
    host = SoftwareHost(pki)
    register_host(host, registrar, "host-a", tls_key())
    with pytest.raises(HostConflict, match="already admitted as host 'host-a'"):
        register_host(host, registrar, "host-b", tls_key())


def test_malformed_request_is_a_parse_error(registrar: RegistrarService) -> None:
    with pytest.raises(ParseError, match="host_id"):
        registrar.start({"host_id": "Not A DNS Name", "endorsement_keys": [], "aik_public": ""})


def test_policy_approval_verifies_with_the_fleet_policy_key(registrar: RegistrarService) -> None:
    approval = registrar.approve_platform_policy(b"\x11" * 32, b"vtpm-trust/vaik")
    key = registrar._ca.policy_key.public_key()
    verify_policy_approval(approval, key)
    assert registrar.policy_key()["name"].startswith("000b")


def test_challenges_do_not_accumulate(registrar: RegistrarService, pki: Pki, clock: Clock) -> None:
    host = SoftwareHost(pki)
    registrar.start(_request(host))
    clock.now = NOW + timedelta(hours=1)
    registrar.start(_request(host))
    store: RegistrarStore = registrar._store
    assert store.count_challenges() == 1


def test_init_is_idempotent_and_keys_are_private(tmp_path: Path, pki: Pki) -> None:
    state = tmp_path / "r"
    first = init_state(
        state, ek_ca_pems=[pem(pki.root[0])], now=NOW, random_bytes=secrets.token_bytes
    )
    assert "fleet-ca.key" in first.created
    second = init_state(state, now=NOW, random_bytes=secrets.token_bytes)
    assert second.created == ()
    assert second.ca_certificate == first.ca_certificate
    for name in ("fleet-ca.key", "fleet-policy.key", "server.key"):
        assert (state / name).stat().st_mode & 0o777 == 0o600
    assert state.stat().st_mode & 0o077 == 0


def test_init_without_an_ek_ca_is_refused(tmp_path: Path) -> None:
    with pytest.raises(RegistrarStateError, match="EK CA"):
        init_state(tmp_path / "r", now=NOW, random_bytes=secrets.token_bytes)


def test_a_new_start_supersedes_the_pending_challenge(
    registrar: RegistrarService, pki: Pki
) -> None:
    host = SoftwareHost(pki)
    first = registrar.start(_request(host))
    second = registrar.start(_request(host))
    with pytest.raises(ChallengeRejected, match="unknown or already answered"):
        registrar.activate(
            first["challenge_id"], {"secret": _answer(host, first), "csr": _csr(tls_key())}
        )
    registrar.activate(
        second["challenge_id"], {"secret": _answer(host, second), "csr": _csr(tls_key())}
    )


def test_a_removed_host_can_be_admitted_with_a_new_tpm(
    registrar: RegistrarService, pki: Pki
) -> None:
    register_host(SoftwareHost(pki), registrar, "host-a", tls_key())
    assert registrar.remove_host("host-a")
    assert not registrar.remove_host("host-a")
    register_host(SoftwareHost(pki), registrar, "host-a", tls_key())
    assert [h.host_id for h in registrar.hosts()] == ["host-a"]


def test_new_server_names_reissue_the_https_certificate(tmp_path: Path, pki: Pki) -> None:
    state = tmp_path / "r"
    init_state(state, ek_ca_pems=[pem(pki.root[0])], now=NOW, random_bytes=secrets.token_bytes)
    key_before = (state / "server.key").read_bytes()
    report = init_state(
        state,
        server_names=("registrar.fleet.example", "10.77.0.1"),
        now=NOW,
        random_bytes=secrets.token_bytes,
    )
    assert "server.pem" in report.created
    cert = x509.load_pem_x509_certificate((state / "server.pem").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["registrar.fleet.example"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["10.77.0.1"]
    assert (state / "server.key").read_bytes() == key_before
    again = init_state(
        state,
        server_names=("registrar.fleet.example", "10.77.0.1"),
        now=NOW,
        random_bytes=secrets.token_bytes,
    )
    assert again.created == ()


def test_ek_kind_must_match_its_public_area(registrar: RegistrarService, pki: Pki) -> None:
    request = _request(SoftwareHost(pki))
    [ek] = request["endorsement_keys"]
    ek["kind"] = "rsa"
    with pytest.raises(EkCertificateRejected, match="declared kind 'rsa'"):
        registrar.start(request)
