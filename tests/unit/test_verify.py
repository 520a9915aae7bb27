"""evidence.verify: every check of verify_bundle, each failure with its own error id.

Software-signed evidence (tests/helpers/evidence_factory.py): AIK, AuthKey and vAIK are
``cryptography`` keys in TPMT_PUBLIC form with the production templates and policies; the
certificates come from the registrar's FleetCa. tests/sim/test_verify_real_tpm.py repeats the
main cases with CertAuthKey, CertvAIK and the attestation signature made by a real TPM (swtpm).
"""

from __future__ import annotations

import secrets
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any, TypeVar

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from evidence import verify as v
from evidence.bundle import RawBundle, encode_bundle, parse_bundle
from evidence.errors import (
    ChainError,
    HashAlgorithmNotAllowed,
    NonceMismatch,
    ReplayError,
    SignatureError,
    VerificationError,
)
from evidence.ima import encode_binary
from evidence.tpm2 import TpmAlgId
from evidence.verdict import finding_from_error
from evidence.verify import AttestedVm, VerifyOptions, verify_bundle
from tests.helpers.evidence_factory import (
    AIK_ATTRIBUTES,
    AUTHKEY_ATTRIBUTES,
    NOW,
    VAIK_ATTRIBUTES,
    Host,
    SoftKey,
    World,
    default_world,
    ima_ng_entry,
    make_boot,
)

DER = Encoding.DER


@pytest.fixture(scope="module")
def world() -> World:
    return default_world()


def fresh() -> bytes:
    return secrets.token_bytes(32)


E = TypeVar("E", bound=VerificationError)


def _raises(bundle: RawBundle, opts: VerifyOptions, error: type[E]) -> E:
    with pytest.raises(error) as info:
        verify_bundle(bundle, opts)
    assert type(info.value) is error
    return info.value


# ---------------------------------------------------------------- the happy path


def test_valid_bundle_verifies(world: World) -> None:
    nonce = fresh()
    vm = verify_bundle(parse_bundle(encode_bundle(world.bundle(nonce))), world.options(nonce))
    assert isinstance(vm, AttestedVm)
    assert vm.vm_uuid == world.vm_uuid and vm.nonce == nonce
    assert vm.cert_user == world.tenant_a.cert_user
    assert vm.host.subject == "CN=host-a.example"
    assert vm.host.aik_name == world.host_a.aik.name
    assert vm.host.authkey_name == world.host_a.authkey.name
    assert vm.vaik_name == world.vaik.name
    assert vm.pcr_bank == "sha256" and dict(vm.vpcrs) == dict(world.boot.vpcrs)
    assert vm.eventlog is not None and {e.pcr for e in vm.eventlog.events} == set(range(8))
    assert vm.ima is not None and vm.ima.entries[0].name == b"boot_aggregate"


def test_first_attestation_without_an_enrolled_vaik(world: World) -> None:
    nonce = fresh()
    verify_bundle(world.bundle(nonce), world.options(nonce, vaik_public=None))


def test_vm_on_the_other_approved_host_verifies(world: World) -> None:
    """A migrated VM: same vAIK, now certified by host B's AuthKey (an approved state)."""
    nonce = fresh()
    vm = verify_bundle(world.bundle(nonce, host=world.host_b), world.options(nonce))
    assert vm.host.subject == "CN=host-b.example"


def _ca_cert(
    key: ec.EllipticCurvePrivateKey,
    name: str,
    issuer: tuple[ec.EllipticCurvePrivateKey, x509.Certificate] | None,
    path_length: int | None,
) -> x509.Certificate:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    signer_key, issuer_name = (key, subject) if issuer is None else (issuer[0], issuer[1].subject)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(77)
        .not_valid_before(NOW - timedelta(days=2))
        .not_valid_after(NOW + timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .sign(signer_key, hashes.SHA256())
    )


def test_chain_through_an_intermediate_ca(world: World) -> None:
    root_key = ec.derive_private_key(0x1416, ec.SECP256R1())
    root = _ca_cert(root_key, "fleet root CA", None, None)
    inter_key = ec.derive_private_key(0x1417, ec.SECP256R1())
    inter = _ca_cert(inter_key, "fleet issuing CA", (root_key, root), 0)
    host = Host.make(replace(world.fleet, key=inter_key, certificate=inter), "host-c", 0xC0C0)
    chain = (*host.aik_certificates, inter.public_bytes(DER))
    nonce = fresh()
    policies = v.authkey_policy_digests(host.platform_composite)
    options = world.options(nonce, authkey_policies=policies, fleet_ca_certs=[root])
    verify_bundle(world.bundle(nonce, host=host, aik_certificates=chain), options)
    without = world.bundle(nonce, host=host, aik_certificates=host.aik_certificates)
    _raises(without, options, v.AikNotFleetIssued)


def test_ca_path_length_is_enforced(world: World) -> None:
    """The fleet CA has pathLen 0: an intermediate under it may not issue AIK certificates."""
    inter_key = ec.derive_private_key(0x1418, ec.SECP256R1())
    inter = _ca_cert(inter_key, "sneaky CA", (world.fleet.key, world.fleet.certificate), None)
    host = Host.make(replace(world.fleet, key=inter_key, certificate=inter), "host-d", 0xD0D0)
    chain = (*host.aik_certificates, inter.public_bytes(DER))
    nonce = fresh()
    policies = v.authkey_policy_digests(host.platform_composite)
    options = world.options(nonce, authkey_policies=policies)
    err = _raises(
        world.bundle(nonce, host=host, aik_certificates=chain), options, v.CaConstraintViolation
    )
    assert "pathLenConstraint 0" in str(err)


def test_a_leaf_certificate_cannot_issue(world: World) -> None:
    """host A's AIK certificate key used as a CA: not a CA certificate."""
    fake_issuer = replace(
        world.fleet,
        key=world.host_a.aik.private,
        certificate=x509.load_der_x509_certificate(world.host_a.aik_certificates[0]),
    )
    host = Host.make(fake_issuer, "host-e", 0xE0E0)
    chain = (*host.aik_certificates, world.host_a.aik_certificates[0])
    nonce = fresh()
    options = world.options(
        nonce, authkey_policies=v.authkey_policy_digests(host.platform_composite)
    )
    err = _raises(
        world.bundle(nonce, host=host, aik_certificates=chain), options, v.CaConstraintViolation
    )
    assert "CA is FALSE" in str(err)


# ---------------------------------------------------------------- invariant 3


@dataclass(frozen=True)
class Case:
    """One rejection of issue 7's list: how to build the evidence, and the id it must raise."""

    make: Callable[[World, bytes], tuple[RawBundle, dict[str, Any]]]
    error: type[VerificationError]
    finding_id: str


def _edited_ima(world: World, nonce: bytes) -> tuple[RawBundle, dict[str, Any]]:
    entries = list(world.boot.ima_entries)
    entries[2] = ima_ng_entry(b"/usr/sbin/sshd", b"openssh 9.2 with a backdoor")
    return world.bundle(nonce, ima_list=encode_binary(entries)), {}


def _rogue_aik_cert(world: World, nonce: bytes) -> tuple[RawBundle, dict[str, Any]]:
    rogue = Host.make(world.rogue_ca, "host-a.example", 0xA0A0)  # same keys, rogue issuer
    return world.bundle(nonce, host=rogue), {}


INV3_CASES = {
    "replayed-nonce": Case(
        lambda w, n: (w.bundle(b"\x01" * 32), {}), NonceMismatch, "verify.nonce"
    ),
    "replayed-signature-under-fresh-nonce": Case(
        lambda w, n: (w.bundle(n, message_nonce=b"\x01" * 32), {}),
        NonceMismatch,
        "verify.nonce",
    ),
    "another-tenants-cert-user": Case(
        lambda w, n: (w.bundle(n, tenant=w.tenant_b), {}),
        v.CertUserMismatch,
        "verify.cert_user",
    ),
    "certified-for-another-tenant": Case(
        lambda w, n: (w.bundle(n, qualifying_cert_user=w.tenant_b.cert_user), {}),
        v.QualifyingDataMismatch,
        "verify.nonce.qualifying_data",
    ),
    "clone-vm-uuid": Case(
        lambda w, n: (
            w.bundle(n, vm_uuid=uuid.UUID(int=w.vm_uuid.int ^ 1), vaik=w.vaik_for(0xC10E)),
            {},
        ),
        v.VmUuidMismatch,
        "verify.vm_uuid",
    ),
    "clone-vm-uuid-in-signed-message": Case(
        lambda w, n: (w.bundle(n, message_vm_uuid=uuid.UUID(int=w.vm_uuid.int ^ 1)), {}),
        v.VmUuidMismatch,
        "verify.vm_uuid",
    ),
    "clone-vm-vaik-not-enrolled": Case(
        lambda w, n: (w.bundle(n, vaik=w.vaik_for(0xC10E)), {}),
        v.VaikNotEnrolled,
        "verify.chain.vaik_not_enrolled",
    ),
    "event-log-from-another-boot": Case(
        lambda w, n: (w.bundle(n, event_log=make_boot(boot_id=1).event_log), {}),
        v.EventLogReplayMismatch,
        "verify.replay.eventlog",
    ),
    "one-edited-ima-entry": Case(_edited_ima, v.ImaReplayMismatch, "verify.replay.ima"),
    "forged-attestation-signature": Case(
        lambda w, n: (w.bundle(n, message_signer=w.vaik_for(0xF04D)), {}),
        v.AttestationSignatureInvalid,
        "verify.signature.attestation",
    ),
    "aik-certificate-not-from-fleet-ca": Case(
        _rogue_aik_cert, v.AikNotFleetIssued, "verify.chain.aik_issuer"
    ),
    "cert-vaik-by-another-hosts-authkey": Case(
        lambda w, n: (w.bundle(n, vaik_certifier=w.host_b.authkey), {}),
        v.CertVaikSignatureInvalid,
        "verify.signature.cert_vaik",
    ),
}


@pytest.mark.parametrize("case", list(INV3_CASES.values()), ids=list(INV3_CASES))
def test_inv3_verifier_requires_chain_cert_user_fresh_nonce_and_replay(
    world: World, case: Case
) -> None:
    """ARCHITECTURE.md §5 invariant 3: each forgery fails with its own id; valid evidence passes."""
    nonce = fresh()
    verify_bundle(world.bundle(nonce), world.options(nonce))  # never rejects valid evidence
    bundle, overrides = case.make(world, nonce)
    bundle = parse_bundle(encode_bundle(bundle))  # through the wire format, as a verifier sees it
    err = _raises(bundle, world.options(nonce, **overrides), case.error)
    assert err.id == case.finding_id
    finding = finding_from_error(err)
    assert finding.id == case.finding_id and finding.severity == "error"


def test_inv3_case_ids_are_distinct_per_rejection() -> None:
    """The issue's nine rejections (the IMA allowlist one is a policy finding) differ by id."""
    required = [
        "replayed-nonce",
        "another-tenants-cert-user",
        "clone-vm-uuid",
        "event-log-from-another-boot",
        "one-edited-ima-entry",
        "forged-attestation-signature",
        "aik-certificate-not-from-fleet-ca",
        "cert-vaik-by-another-hosts-authkey",
    ]
    ids = [INV3_CASES[name].finding_id for name in required]
    assert len(set(ids)) == len(ids)


# ---------------------------------------------------------------- chain details


def test_aik_certificate_expired_or_not_yet_valid(world: World) -> None:
    nonce = fresh()
    bundle = world.bundle(nonce)
    err = _raises(bundle, world.options(nonce, now=NOW + timedelta(days=400)),
                  v.CertificateNotValidNow)  # fmt: skip
    assert err.id == "verify.chain.validity"
    _raises(bundle, world.options(nonce, now=NOW - timedelta(days=2)), v.CertificateNotValidNow)


def test_a_tls_certificate_of_the_fleet_ca_is_not_an_aik_certificate(world: World) -> None:
    host = world.host_a
    tls = world.fleet.issue_tls_certificate(
        "host-a.example",
        host.aik.private.public_key(),
        dns_names=("host-a.example",),
        now=NOW - timedelta(days=1),
        lifetime=timedelta(days=30),
        serial=99,
    )
    nonce = fresh()
    bundle = world.bundle(nonce, aik_certificates=[tls.public_bytes(DER)])
    err = _raises(bundle, world.options(nonce), v.AikCertificateMismatch)
    assert "tcg-kp-AIKCertificate" in (err.expected or "")


def test_aik_certificate_for_another_key(world: World) -> None:
    """An AIK certificate whose extensions describe host A's AIK but whose key is host B's."""
    a, b = world.host_a, world.host_b
    cert = world.fleet.issue_aik_certificate(
        "host-a.example",
        b.aik.private.public_key(),
        a.aik.name,
        a.aik.public_bytes,
        now=NOW - timedelta(days=1),
        lifetime=timedelta(days=30),
        serial=5,
    )
    nonce = fresh()
    bundle = world.bundle(nonce, aik_certificates=[cert.public_bytes(DER)])
    err = _raises(bundle, world.options(nonce), v.AikCertificateMismatch)
    assert "subject public key" in str(err)


def test_aik_name_extension_must_match_its_public_area(world: World) -> None:
    a = world.host_a
    cert = world.fleet.issue_aik_certificate(
        "host-a.example",
        a.aik.private.public_key(),
        world.host_b.aik.name,
        a.aik.public_bytes,
        now=NOW - timedelta(days=1),
        lifetime=timedelta(days=30),
        serial=6,
    )
    nonce = fresh()
    bundle = world.bundle(nonce, aik_certificates=[cert.public_bytes(DER)])
    err = _raises(bundle, world.options(nonce), v.AikCertificateMismatch)
    assert "Name" in str(err)


def test_cert_authkey_signed_by_another_aik(world: World) -> None:
    nonce = fresh()
    bundle = world.bundle(nonce, authkey_signer=world.host_b.aik)
    err = _raises(bundle, world.options(nonce), v.CertAuthKeySignatureInvalid)
    assert isinstance(err, SignatureError) and err.id == "verify.signature.cert_authkey"


def test_cert_authkey_certifying_another_key(world: World) -> None:
    """Host A's AIK certified host B's AuthKey, but the bundle shows host A's AuthKey."""
    nonce = fresh()
    host = world.host_a
    swapped = replace(host, authkey=world.host_b.authkey)
    bundle = world.bundle(nonce, host=swapped)
    bundle = replace(
        bundle,
        cert_authkey=world.bundle(nonce, host=host).cert_authkey,
    )
    err = _raises(bundle, world.options(nonce), v.CertifiedNameMismatch)
    assert err.id == "verify.chain.certified_name"


def test_authkey_on_an_unapproved_platform_state(world: World) -> None:
    nonce = fresh()
    options = world.options(
        nonce, authkey_policies=v.authkey_policy_digests(world.host_b.platform_composite)
    )
    err = _raises(world.bundle(nonce), options, v.AuthKeyPolicyNotApproved)
    assert err.got == world.host_a.authkey.public.auth_policy.hex()


@pytest.mark.parametrize(
    ("role", "attributes"),
    [
        ("authkey", AUTHKEY_ATTRIBUTES | 0x40),  # userWithAuth: usable without the PCR policy
        ("authkey", AUTHKEY_ATTRIBUTES & ~0x2),  # not fixedTPM
        ("vaik", VAIK_ATTRIBUTES | 0x2),  # fixedTPM: could never migrate, not a vAIK
        ("vaik", VAIK_ATTRIBUTES | 0x40),  # userWithAuth: signs without a fleet approval
        ("aik", AIK_ATTRIBUTES & ~0x10),  # not fixedParent
    ],
)
def test_key_attributes(world: World, role: str, attributes: int) -> None:
    nonce = fresh()
    host = world.host_a
    if role == "vaik":
        key = SoftKey.make(0x5A1C, attributes, world.vaik.public.auth_policy)
        bundle = world.bundle(nonce, vaik=key)
        options = world.options(nonce, vaik_public=key.public_bytes)
    elif role == "authkey":
        key = SoftKey.make(0xA0A1, attributes, host.authkey.public.auth_policy)
        bundle = world.bundle(nonce, host=replace(host, authkey=key))
        options = world.options(nonce)
    else:
        aik = SoftKey.make(0xA0A0, attributes)
        cert = world.fleet.issue_aik_certificate(
            "host-a.example", aik.private.public_key(), aik.name, aik.public_bytes,
            now=NOW - timedelta(days=1), lifetime=timedelta(days=30), serial=8,
        )  # fmt: skip
        bundle = world.bundle(
            nonce, host=replace(host, aik=aik, aik_certificates=(cert.public_bytes(DER),))
        )
        options = world.options(nonce)
    err = _raises(bundle, options, v.KeyAttributesMismatch)
    assert err.id == "verify.chain.key_attributes"


def test_vaik_policy_must_require_fleet_approval(world: World) -> None:
    nonce = fresh()
    key = SoftKey.make(0x5A1D, VAIK_ATTRIBUTES, b"\x11" * 32)
    bundle = world.bundle(nonce, vaik=key)
    err = _raises(bundle, world.options(nonce, vaik_public=None), v.VaikPolicyMismatch)
    assert err.expected == v.expected_vaik_policy(world.fleet_policy_key_name).hex()
    other_ref = world.options(nonce, vaik_public=None, vaik_policy_ref=b"other")
    _raises(world.bundle(nonce), other_ref, v.VaikPolicyMismatch)


def test_certify_made_with_an_old_nonce(world: World) -> None:
    """CertvAIK/CertAuthKey replayed from an earlier attestation: qualifying data is old."""
    nonce = fresh()
    old = world.bundle(b"\x02" * 32)
    bundle = replace(world.bundle(nonce), cert_authkey=old.cert_authkey)
    err = _raises(bundle, world.options(nonce), v.QualifyingDataMismatch)
    assert isinstance(err, NonceMismatch)


# ---------------------------------------------------------------- attestation and lists


def test_sha1_bank_needs_allow_sha1(world: World) -> None:
    nonce = fresh()
    vpcrs = {i: bytes([i]) * 20 for i in range(8)}
    bundle = world.bundle(nonce, vpcrs=vpcrs, hash_alg=TpmAlgId.TPM_ALG_SHA1)
    opts = world.options(nonce, allow_missing_eventlog=True, allow_missing_ima=True)
    err = _raises(replace(bundle, event_log=None, ima_list=None), opts, HashAlgorithmNotAllowed)
    assert "allow_sha1" in str(err)
    relaxed = replace(opts, allow_sha1=True)
    verify_bundle(replace(bundle, event_log=None, ima_list=None), relaxed)


def test_missing_lists_need_an_explicit_allowance(world: World) -> None:
    nonce = fresh()
    no_log = world.bundle(nonce, event_log=None)
    assert _raises(no_log, world.options(nonce), v.EventLogMissing).id == "verify.eventlog.missing"
    vm = verify_bundle(no_log, world.options(nonce, allow_missing_eventlog=True))
    assert vm.eventlog is None
    no_ima = world.bundle(nonce, ima_list=None)
    assert _raises(no_ima, world.options(nonce), v.ImaListMissing).id == "verify.ima.missing"
    assert verify_bundle(no_ima, world.options(nonce, allow_missing_ima=True)).ima is None


def test_ima_needs_signed_pcr10(world: World) -> None:
    nonce = fresh()
    vpcrs = {i: val for i, val in world.boot.vpcrs.items() if i != 10}
    err = _raises(world.bundle(nonce, vpcrs=vpcrs), world.options(nonce), v.ImaReplayMismatch)
    assert err.invalid_pcrs == (10,)


def test_eventlog_must_account_for_firmware_pcrs(world: World) -> None:
    """A signed PCR 0-7 the log does not explain fails, naming that PCR."""
    nonce = fresh()
    vpcrs = dict(world.boot.vpcrs)
    vpcrs[6] = b"\x66" * 32
    err = _raises(world.bundle(nonce, vpcrs=vpcrs), world.options(nonce), v.EventLogReplayMismatch)
    assert isinstance(err, ReplayError) and err.invalid_pcrs == (6,)


def test_ima_list_read_after_the_quote_verifies_its_signed_prefix(world: World) -> None:
    """IMA appended entries after the host read vPCR 10: they stay unverified and are counted."""
    nonce = fresh()
    late = [ima_ng_entry(b"/usr/bin/late", b"x"), ima_ng_entry(b"/usr/bin/later", b"y")]
    ahead = encode_binary([*world.boot.ima_entries, *late])
    vm = verify_bundle(world.bundle(nonce, ima_list=ahead), world.options(nonce))
    assert vm.ima is not None and len(vm.ima.entries) == len(world.boot.ima_entries)
    assert vm.ima_unverified_tail == 2
    assert verify_bundle(world.bundle(nonce), world.options(nonce)).ima_unverified_tail == 0


def test_an_edited_entry_fails_even_with_a_tail(world: World) -> None:
    nonce = fresh()
    entries = list(world.boot.ima_entries)
    entries[1] = ima_ng_entry(b"/usr/bin/bash", b"evil bash")
    edited = encode_binary([*entries, ima_ng_entry(b"/usr/bin/late", b"x")])
    err = _raises(world.bundle(nonce, ima_list=edited), world.options(nonce), v.ImaReplayMismatch)
    assert "nor does any prefix" in str(err)
    shorter = encode_binary(world.boot.ima_entries[:-1])  # an entry removed: behind the PCR
    _raises(world.bundle(nonce, ima_list=shorter), world.options(nonce), v.ImaReplayMismatch)


# A self-signed P-256 certificate signed with ECDSA-SHA1, valid 2026-11-27T07:05Z..11-29, made
# once with `openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -sha1 -subj /CN=x
# -days 2` (OpenSSL 3.0, Debian 12): cryptography 50 can no longer sign one.
SHA1_CERT = b"""-----BEGIN CERTIFICATE-----
MIIBazCCARKgAwIBAgIUOjYEFDXMgY+geGvdMVkdXM0vsmMwCQYHKoZIzj0EATAM
MQowCAYDVQQDDAF4MB4XDTI2MTEyNzA3MDUyMVoXDTI2MTEyOTA3MDUyMVowDDEK
MAgGA1UEAwwBeDBZMBMGByqGSM49AgEGCCqGSM49AwEHA0IABMkrPS2m9ZztDPN5
QVwrDgn94QkvCuYFsdAaE/iFqS66UxhIpXsB+AT8nV4YfzBylnQ+K3J8TaZNHJst
XvBTCqSjUzBRMB0GA1UdDgQWBBQ8cxXhZgz2mB/knK07PTMxxDTxsDAfBgNVHSME
GDAWgBQ8cxXhZgz2mB/knK07PTMxxDTxsDAPBgNVHRMBAf8EBTADAQH/MAkGByqG
SM49BAEDSAAwRQIgSyRX/e6+voiUVBWBgpeK8yoXqJj4kjV4jGtjEC8rKe4CIQD4
mTyknivrD4SjhC57WJpLtXC9Z5gR3zJmxKPldSzNtw==
-----END CERTIFICATE-----
"""


def test_certificates_signed_with_sha1_are_refused(world: World) -> None:
    sha1_cert = x509.load_pem_x509_certificate(SHA1_CERT)
    nonce = fresh()
    bundle = world.bundle(nonce, aik_certificates=[sha1_cert.public_bytes(DER)])
    err = _raises(bundle, world.options(nonce), HashAlgorithmNotAllowed)
    assert "SHA1" in str(err) and "allow_sha1" in str(err)
    # allowed, it still has to chain to the fleet CA (and this one does not)
    _raises(bundle, world.options(nonce, allow_sha1=True), v.AikNotFleetIssued)


# ---------------------------------------------------------------- options and API


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"nonce": b"short"}, "nonce"),
        ({"now": NOW.replace(tzinfo=None)}, "timezone"),
        ({"fleet_ca_certs": ()}, "fleet_ca_certs"),
        ({"fleet_ca_certs": (b"junk",)}, "DER"),
        ({"authkey_policies": frozenset()}, "authkey_policies"),
        ({"authkey_policies": {b"x"}}, "authkey_policies"),
        ({"fleet_policy_key_name": b"\x00\x0b"}, "fleet_policy_key_name"),
        ({"cert_user": b"junk"}, "cert_user"),
        ({"eventlog_pcrs": {24}}, "eventlog_pcrs"),
    ],
)
def test_options_reject_misuse(world: World, override: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        world.options(override.pop("nonce", fresh()), **override)


def test_options_take_der_fleet_certificates_and_are_frozen(world: World) -> None:
    opts = world.options(fresh(), fleet_ca_certs=[world.fleet.certificate.public_bytes(DER)])
    assert opts.fleet_cas == (world.fleet.certificate,)
    with pytest.raises(AttributeError):
        opts.allow_sha1 = True  # type: ignore[misc]
    assert VerifyOptions.__dataclass_params__.frozen  # type: ignore[attr-defined]


def test_verify_bundle_never_returns_false(world: World) -> None:
    nonce = fresh()
    with pytest.raises(ChainError):
        verify_bundle(_rogue_aik_cert(world, nonce)[0], world.options(nonce))
    with pytest.raises(TypeError):
        verify_bundle("{}", world.options(nonce))  # type: ignore[arg-type]


def test_constants_match_the_registrar_and_the_host_agent() -> None:
    from host_agent.tpm.port import VAIK_POLICY_REF
    from verifier.registrar import ca

    assert v.TPM_OBJECT_NAME_OID == ca.TPM_OBJECT_NAME_OID
    assert v.TPM_PUBLIC_OID == ca.TPM_PUBLIC_OID
    assert v.TCG_KP_AIK_CERTIFICATE == ca.TCG_KP_AIK_CERTIFICATE
    assert v.VAIK_POLICY_REF == VAIK_POLICY_REF


def test_error_ids_are_unique_and_dotted() -> None:
    classes = [
        getattr(v, name)
        for name in v.__all__
        if isinstance(getattr(v, name), type) and issubclass(getattr(v, name), VerificationError)
    ]
    ids = [c.id for c in classes]
    assert len(ids) == len(set(ids)) == 20
    assert all(i.startswith("verify.") for i in ids)
