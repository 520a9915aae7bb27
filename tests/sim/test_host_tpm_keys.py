"""Host keys and per-VM keys on real swtpms: certify, vAIK signing with fleet approvals, PCR
binding, 200 vAIKs within 3 transient slots, duplicate → import on a second TPM, trial == pure."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from evidence import tpm2
from evidence import tpm2_policy as pure
from evidence.errors import SignatureError
from evidence.tpm2_policy import PolicyApproval
from host_agent.tpm import (
    AUTHKEY_PCRS,
    PlatformStateNotApproved,
    PolicyNotApproved,
    TpmCommandError,
    WrappedKey,
)
from host_agent.tpm.adapter import PytssHostTpm
from tests.helpers.swtpm import Swtpm, start_swtpm
from tests.sim.test_host_tpm import _extend

FLEET = ec.derive_private_key(0xF1EE7, ec.SECP256R1())
FLEET_DER = FLEET.public_key().public_bytes(
    serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
)


def approve(policy: bytes, ref: bytes, key: ec.EllipticCurvePrivateKey = FLEET) -> PolicyApproval:
    """What the fleet does: sign aHash = SHA-256(approvedPolicy ‖ policyRef)."""
    return PolicyApproval(policy, ref, key.sign(policy + ref, ec.ECDSA(hashes.SHA256())))


@pytest.fixture(scope="module")
def own_swtpm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Swtpm]:
    """This module's own swtpm: no other test extends its PCRs under AuthKey's feet."""
    sw = start_swtpm(tmp_path_factory.mktemp("keys-swtpm"))
    yield sw
    sw.stop()


@pytest.fixture(scope="module")
def host(own_swtpm: Swtpm, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PytssHostTpm]:
    tpm = PytssHostTpm(own_swtpm.tcti, tmp_path_factory.mktemp("host-keys"))
    tpm.ensure_host_keys()
    yield tpm
    tpm.close()


@pytest.fixture(scope="module")
def vaik(host: PytssHostTpm) -> WrappedKey:
    return host.create_vaik(FLEET_DER)


@pytest.fixture(scope="module")
def approval(host: PytssHostTpm, vaik: WrappedKey) -> PolicyApproval:
    return approve(host.approved_sign_policy(), vaik.policy.policy_ref)


def _public(key: WrappedKey | bytes) -> tpm2.TpmtPublic:
    return tpm2.TpmtPublic.unmarshal(key.public if isinstance(key, WrappedKey) else key)


# ---------------------------------------------------------------- certify


def test_cert_authkey_by_aik_verifies(host: PytssHostTpm) -> None:
    qualifying = hashlib.sha256(b"cert_user" + b"nonce").digest()
    cert = host.certify("authkey", "aik", qualifying)
    aik = _public(host.aik_public())
    tpm2.verify_attest_signature(cert.attest, tpm2.TpmtSignature.unmarshal(cert.signature), aik)
    attest = tpm2.TpmsAttest.unmarshal(cert.attest)
    assert attest.extra_data == qualifying
    assert attest.attested.name == pure.name_of_public(host.host_key_public("authkey"))
    with pytest.raises(SignatureError):
        tpm2.verify_attest_signature(
            cert.attest[:-1] + b"\x00", tpm2.TpmtSignature.unmarshal(cert.signature), aik
        )


def test_cert_vaik_by_authkey_verifies(host: PytssHostTpm, vaik: WrappedKey) -> None:
    cert = host.certify(vaik, "authkey", b"q" * 32)
    authkey = _public(host.host_key_public("authkey"))
    sig = tpm2.TpmtSignature.unmarshal(cert.signature)
    tpm2.verify_attest_signature(cert.attest, sig, authkey)
    assert tpm2.TpmsAttest.unmarshal(cert.attest).attested.name == vaik.name


def test_host_key_attributes(host: PytssHostTpm, vaik: WrappedKey) -> None:
    a = tpm2.TpmaObject
    fixed = a.FIXEDTPM | a.FIXEDPARENT
    authkey = _public(host.host_key_public("authkey"))
    assert authkey.object_attributes & fixed == fixed
    assert not authkey.object_attributes & a.USERWITHAUTH
    v = _public(vaik)
    assert not v.object_attributes & (a.FIXEDTPM | a.FIXEDPARENT | a.USERWITHAUTH)
    assert v.object_attributes & a.RESTRICTED


# ---------------------------------------------------------------- vAIK signing


def test_vaik_sign_verifies_and_refuses_tpm_generated_value(
    host: PytssHostTpm, vaik: WrappedKey, approval: PolicyApproval
) -> None:
    for message in (b"vpcrs|nonce|uuid", bytes(5000)):  # TPM2_Hash and a hash sequence
        sig = host.sign(vaik, message, approval)
        tpm2.verify_signature(message, tpm2.TpmtSignature.unmarshal(sig), _public(vaik))
    with pytest.raises(ValueError, match="TPM_GENERATED_VALUE"):
        host.sign(vaik, b"\xffTCG\x80\x17 a forged quote", approval)


def test_vaik_sign_needs_the_fleet_keys_approval(
    host: PytssHostTpm, vaik: WrappedKey, approval: PolicyApproval
) -> None:
    rogue = ec.derive_private_key(0xBAD, ec.SECP256R1())
    with pytest.raises(PolicyNotApproved, match="does not verify"):
        host.sign(vaik, b"m", approve(approval.approved_policy, approval.policy_ref, rogue))
    with pytest.raises(PolicyNotApproved, match="policyRef"):
        host.sign(vaik, b"m", approve(approval.approved_policy, b"other ref"))


def test_vaik_sign_refuses_an_approval_for_another_platform_state(
    host: PytssHostTpm, vaik: WrappedKey
) -> None:
    other_state = {i: b"\x01" * 32 for i in AUTHKEY_PCRS}
    approval = approve(host.approved_sign_policy(other_state), vaik.policy.policy_ref)
    with pytest.raises(PlatformStateNotApproved) as err:
        host.sign(vaik, b"m", approval)
    assert err.value.key == "vAIK"


def test_200_vaiks_stored_wrapped_each_sign_in_turn(
    host: PytssHostTpm, approval: PolicyApproval, tmp_path: Path
) -> None:
    for i in range(200):
        (tmp_path / f"vaik-{i}.json").write_bytes(host.create_vaik(FLEET_DER).to_bytes())
    names = set()
    for i in range(200):
        key = WrappedKey.from_bytes((tmp_path / f"vaik-{i}.json").read_bytes())
        message = f"vm-{i}".encode()
        sig = host.sign(key, message, approval)
        tpm2.verify_signature(message, tpm2.TpmtSignature.unmarshal(sig), _public(key))
        names.add(key.name)
    assert len(names) == 200


# ---------------------------------------------------------------- PCR binding


@pytest.mark.parametrize("pcr", range(9))
def test_authkey_unusable_after_pcr_change(
    pcr: int, swtpm_factory: Callable[..., Swtpm], tmp_path: Path
) -> None:
    sw = swtpm_factory(f"pcr-change-{pcr}")
    with PytssHostTpm(sw.tcti, tmp_path) as tpm:
        tpm.ensure_host_keys()
        vaik = tpm.create_vaik(FLEET_DER)
        exg = tpm.create_exgkey()
        tpm.certify(vaik, "authkey", b"before")  # works on the approved state
        assert tpm.platform_state_approved()
        _extend(sw, pcr)
        assert not tpm.platform_state_approved()
        with pytest.raises(PlatformStateNotApproved) as err:
            tpm.certify(vaik, "authkey", b"after")
        assert err.value.key == "AuthKey"
        assert err.value.id == "tpm.platform_state_not_approved"
        assert "AuthKey is unusable" in str(err.value)
        assert "sha256:0,1,2,3,4,5,6,7,8" in str(err.value)
        # ExgKey is bound the same way: nothing can be imported under it any more.
        blob = tpm.duplicate(vaik, exg.public)
        with pytest.raises(PlatformStateNotApproved) as err:
            tpm.import_key(blob, exg)
        assert err.value.key == "ExgKey"
        tpm.certify("authkey", "aik", b"AIK is not PCR-bound")  # AIK still signs


def test_authkey_policy_includes_locality_zero_over_swtpm(host: PytssHostTpm) -> None:
    """Recorded result: PolicyLocality(0) holds over the swtpm TCTI, so AuthKey includes it."""
    values = host.pcr_values()
    d = pure.policy_pcr(
        pure.empty_digest(), AUTHKEY_PCRS, pure.pcr_composite_digest([values[i] for i in range(9)])
    )
    assert host.authkey_policy() == pure.policy_locality(d, 0)


# ---------------------------------------------------------------- trial == pure


def test_policy_digests_trial_equal_pure(
    host: PytssHostTpm, vaik: WrappedKey, approval: PolicyApproval
) -> None:
    values = host.pcr_values()
    composite = pure.pcr_composite_digest([values[i] for i in AUTHKEY_PCRS])
    pcr_policy = pure.policy_pcr(pure.empty_digest(), AUTHKEY_PCRS, composite)
    # AuthKey: authPolicy set from a trial session
    with_locality = pure.policy_locality(pcr_policy, 0)
    assert _public(host.host_key_public("authkey")).auth_policy == with_locality
    # ExgKey: same shape
    assert _public(host.create_exgkey()).auth_policy == with_locality
    # vAIK: PolicyOR{PolicyAuthorize(fleet), PolicyCommandCode(Duplicate)} from trial sessions
    fleet_name = pure.fleet_key_name(FLEET.public_key())
    expected_vaik = pure.policy_or(
        pure.empty_digest(),
        [
            pure.policy_authorize(pure.empty_digest(), fleet_name, vaik.policy.policy_ref),
            pure.policy_command_code(pure.empty_digest(), pure.TPM_CC_DUPLICATE),
        ],
    )
    assert _public(vaik).auth_policy == expected_vaik
    assert pure.vaik_policy(FLEET.public_key(), vaik.policy.policy_ref) == expected_vaik
    ordered = [values[i] for i in AUTHKEY_PCRS]
    assert pure.host_state_policy(ordered) == with_locality
    assert pure.host_state_policy(ordered, locality=None) == pcr_policy
    assert pure.vaik_sign_policy(ordered) == approval.approved_policy
    # The approvable signing policy: PolicyPCR + PolicyCommandCode(Sign)
    assert approval.approved_policy == pure.policy_command_code(pcr_policy, pure.TPM_CC_SIGN)


def test_fleet_key_name_matches_the_tpms(swtpm: Swtpm) -> None:
    from tpm2_pytss import ESAPI
    from tpm2_pytss.constants import ESYS_TR
    from tpm2_pytss.types import TPM2B_PUBLIC, TPMT_PUBLIC

    esys = ESAPI(swtpm.tcti)
    try:
        area = TPMT_PUBLIC.unmarshal(pure.fleet_key_public(FLEET.public_key()))[0]
        h = esys.load_external(TPM2B_PUBLIC(publicArea=area), None, ESYS_TR.OWNER)
        try:
            assert bytes(esys.tr_get_name(h)) == pure.fleet_key_name(FLEET.public_key())
        finally:
            esys.flush_context(h)
    finally:
        esys.close()


# ---------------------------------------------------------------- migration


def test_duplicate_import_sign_on_second_tpm(
    host: PytssHostTpm,
    vaik: WrappedKey,
    approval: PolicyApproval,
    swtpm_factory: Callable[..., Swtpm],
    tmp_path: Path,
) -> None:
    target_sw = swtpm_factory("target")
    with PytssHostTpm(target_sw.tcti, tmp_path / "target") as target:
        target.ensure_host_keys()
        exg = target.create_exgkey()
        cert = target.certify(exg, "aik", b"migration nonce")  # CertExgKey the source checks
        tpm2.verify_attest_signature(
            cert.attest, tpm2.TpmtSignature.unmarshal(cert.signature), _public(target.aik_public())
        )
        blob = host.duplicate(vaik, exg.public)
        imported = target.import_key(type(blob).from_bytes(blob.to_bytes()), exg)
        assert imported.name == vaik.name
        stored = WrappedKey.from_bytes(imported.to_bytes())
        sig = target.sign(stored, b"signed on the target", approval)
        tpm2.verify_signature(
            b"signed on the target", tpm2.TpmtSignature.unmarshal(sig), _public(vaik)
        )
        target.certify(stored, "authkey", b"CertvAIK on the target")


def test_duplicate_only_towards_an_exgkey(host: PytssHostTpm, vaik: WrappedKey) -> None:
    with pytest.raises(ValueError, match="ExgKey"):
        host.duplicate(vaik, host.aik_public())
    with pytest.raises(ValueError, match="vAIK"):
        host.duplicate(WrappedKey.from_bytes(host.create_exgkey().to_bytes()), b"")


def test_import_on_the_wrong_tpm_fails(
    host: PytssHostTpm, vaik: WrappedKey, swtpm_factory: Callable[..., Swtpm], tmp_path: Path
) -> None:
    a, b = swtpm_factory("a"), swtpm_factory("b")
    with PytssHostTpm(a.tcti, tmp_path / "a") as ta, PytssHostTpm(b.tcti, tmp_path / "b") as tb:
        exg_a, exg_b = ta.create_exgkey(), tb.create_exgkey()
        blob = host.duplicate(vaik, exg_a.public)
        with pytest.raises(TpmCommandError) as err:
            tb.import_key(blob, exg_b)
        assert err.value.command == "TPM2_Import"


def test_tpm_itself_refuses_vaik_and_authkey_without_their_policy(
    swtpm_factory: Callable[..., Swtpm], tmp_path: Path
) -> None:
    """Not our checks: the TPM refuses a password (userWithAuth is clear on both keys)."""
    from tpm2_pytss import ESAPI, TSS2_Exception
    from tpm2_pytss.constants import ESYS_TR, TPM2_ALG
    from tpm2_pytss.types import TPM2B_PRIVATE, TPM2B_PUBLIC, TPMT_PUBLIC, TPMT_SIG_SCHEME

    from host_agent.tpm.keyfile import HostKeyFile

    sw = swtpm_factory("no-policy")
    with PytssHostTpm(sw.tcti, tmp_path) as tpm:
        tpm.ensure_host_keys()
        vaik = tpm.create_vaik(FLEET_DER)
    authkey = HostKeyFile(tmp_path).read()["authkey"]
    esys = ESAPI(sw.tcti)
    try:
        srk = esys.tr_from_tpmpublic(0x81000001)
        digest, ticket = esys.hash(b"m", TPM2_ALG.SHA256, ESYS_TR.OWNER)
        for key in (vaik, authkey):
            h = esys.load(
                srk,
                TPM2B_PRIVATE.unmarshal(key.private)[0],
                TPM2B_PUBLIC(publicArea=TPMT_PUBLIC.unmarshal(key.public)[0]),
            )
            try:
                with pytest.raises(
                    TSS2_Exception, match="authValue or authPolicy is not available"
                ):
                    esys.sign(h, digest, TPMT_SIG_SCHEME(scheme=TPM2_ALG.NULL), ticket)
            finally:
                esys.flush_context(h)
    finally:
        esys.close()
