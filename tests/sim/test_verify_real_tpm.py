"""verify_bundle on evidence a real TPM made: the host agent's PytssHostTpm on swtpm.

CertAuthKey (AuthKey certified by the AIK), CertvAIK (vAIK certified by AuthKey) and the
attestation signature (TPM2_Hash + TPM2_Sign by the vAIK under a fleet approval) all come from
swtpm through ``host_agent.tpm.adapter.PytssHostTpm``; the fleet CA and the AIK certificate come
from the registrar's FleetCa. The measurement lists are the factory's synthetic boot (the host
signs whatever vPCRs it reads; which values they hold does not matter to the chain).
"""

from __future__ import annotations

import secrets
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from evidence import tpm2_policy
from evidence.bundle import RawBundle, encode_bundle, parse_bundle
from evidence.errors import NonceMismatch, VerificationError
from evidence.ima import encode_binary
from evidence.policy import evaluate_reference_values, learn_reference_values
from evidence.tpm2 import TpmtPublic, public_key
from evidence.tpm2_policy import PolicyApproval
from evidence.verify import (
    VAIK_POLICY_REF,
    AikNotFleetIssued,
    AttestationSignatureInvalid,
    CertUserMismatch,
    CertVaikSignatureInvalid,
    EventLogReplayMismatch,
    ImaReplayMismatch,
    VaikNotEnrolled,
    VerifyOptions,
    VmUuidMismatch,
    authkey_policy_digests,
    verify_bundle,
)
from host_agent.tpm import AUTHKEY_PCRS, WrappedKey
from host_agent.tpm.adapter import PytssHostTpm
from tests.helpers.evidence_factory import (
    DEFAULT_FILES,
    NOW,
    Boot,
    Tenant,
    assemble_bundle,
    ima_ng_entry,
    make_boot,
    make_fleet,
)
from tests.helpers.swtpm import Swtpm, start_swtpm
from verifier.registrar.ca import FleetCa

FLEET = make_fleet(0x51A1)
FLEET_POLICY_DER = FLEET.policy_key.public_key().public_bytes(
    serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
)
VM = uuid.UUID("5b0f3c55-9d7e-4c52-8e0e-2f4a61c1d3a7")
TENANT = Tenant.make("tenant-sim", 0x7E5)
OTHER_TENANT = Tenant.make("tenant-other", 0x7E6)


@dataclass
class TpmHost:
    """One host: a real TPM with host keys, its AIK certificate and its approved platform state."""

    tpm: PytssHostTpm
    aik_certificates: tuple[bytes, ...]
    authkey_policies: frozenset[bytes]

    def vaik(self) -> WrappedKey:
        return self.tpm.create_vaik(FLEET_POLICY_DER)

    def approval(self) -> PolicyApproval:
        return FLEET.approve_platform_policy(self.tpm.approved_sign_policy(), VAIK_POLICY_REF)


def _admit(tpm: PytssHostTpm, name: str, ca: FleetCa = FLEET) -> tuple[bytes, ...]:
    aik_public = tpm.aik_public()
    key = public_key(TpmtPublic.unmarshal(aik_public))
    assert isinstance(key, ec.EllipticCurvePublicKey)
    cert = ca.issue_aik_certificate(
        name,
        key,
        tpm.aik_name(),
        aik_public,
        now=NOW - timedelta(days=1),
        lifetime=timedelta(days=365),
        serial=secrets.randbits(63),
    )
    return (cert.public_bytes(serialization.Encoding.DER),)


def _host(sw: Swtpm, key_dir: Path, name: str) -> TpmHost:
    tpm = PytssHostTpm(sw.tcti, key_dir)
    report = tpm.ensure_host_keys()
    values = tpm.pcr_values(AUTHKEY_PCRS)
    composite = tpm2_policy.pcr_composite_digest([values[i] for i in AUTHKEY_PCRS])
    policies = authkey_policy_digests(composite)
    assert report.authkey_policy in policies  # the verifier's derivation matches the host's
    return TpmHost(tpm, _admit(tpm, name), policies)


@pytest.fixture(scope="module")
def host_a(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TpmHost]:
    sw = start_swtpm(tmp_path_factory.mktemp("verify-swtpm-a"))
    host = _host(sw, tmp_path_factory.mktemp("verify-keys-a"), "host-a.sim")
    yield host
    host.tpm.close()
    sw.stop()


@pytest.fixture(scope="module")
def host_b(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TpmHost]:
    sw = start_swtpm(tmp_path_factory.mktemp("verify-swtpm-b"))
    host = _host(sw, tmp_path_factory.mktemp("verify-keys-b"), "host-b.sim")
    yield host
    host.tpm.close()
    sw.stop()


@pytest.fixture(scope="module")
def vaik(host_a: TpmHost) -> WrappedKey:
    return host_a.vaik()


@pytest.fixture(scope="module")
def approval(host_a: TpmHost) -> PolicyApproval:
    return host_a.approval()


@pytest.fixture(scope="module")
def boot() -> Boot:
    return make_boot()


def tpm_bundle(
    host: TpmHost,
    vaik: WrappedKey,
    approval: PolicyApproval,
    nonce: bytes,
    boot: Boot,
    *,
    tenant: Tenant = TENANT,
    vm_uuid: uuid.UUID = VM,
    signer: WrappedKey | None = None,
    cert_vaik_host: TpmHost | None = None,
    cert_vaik_key: WrappedKey | None = None,
    aik_certificates: tuple[bytes, ...] | None = None,
    event_log: bytes | None = None,
    ima_list: bytes | None = None,
) -> RawBundle:
    """TPM-signed: the host's TPM certifies AuthKey and the vAIK and signs the vPCR message."""

    def certify_authkey(qd: bytes) -> tuple[bytes, bytes]:
        c = host.tpm.certify("authkey", "aik", qd)
        return c.attest, c.signature

    def certify_vaik(qd: bytes) -> tuple[bytes, bytes]:
        certifier = cert_vaik_host or host
        c = certifier.tpm.certify(cert_vaik_key or vaik, "authkey", qd)
        return c.attest, c.signature

    return assemble_bundle(
        vm_uuid=vm_uuid,
        nonce=nonce,
        cert_user=tenant.cert_user,
        vpcrs=boot.vpcrs,
        aik_certificates=aik_certificates or host.aik_certificates,
        authkey_public=host.tpm.host_key_public("authkey"),
        vaik_public=vaik.public,
        certify_authkey=certify_authkey,
        certify_vaik=certify_vaik,
        sign=lambda message: host.tpm.sign(signer or vaik, message, approval),
        event_log=boot.event_log if event_log is None else event_log,
        ima_list=boot.ima_list if ima_list is None else ima_list,
    )


def options(host: TpmHost, nonce: bytes, vaik: WrappedKey | None, **over: object) -> VerifyOptions:
    args: dict[str, object] = {
        "nonce": nonce,
        "now": NOW,
        "fleet_ca_certs": (FLEET.certificate,),
        "cert_user": TENANT.cert_user,
        "vm_uuid": VM,
        "authkey_policies": host.authkey_policies,
        "fleet_policy_key_name": tpm2_policy.fleet_key_name(FLEET.policy_key.public_key()),
        "vaik_public": None if vaik is None else vaik.public,
    }
    args.update(over)
    return VerifyOptions(**args)  # type: ignore[arg-type]


def _wire(bundle: RawBundle) -> RawBundle:
    return parse_bundle(encode_bundle(bundle))


def test_tpm_made_evidence_verifies(
    host_a: TpmHost, vaik: WrappedKey, approval: PolicyApproval, boot: Boot
) -> None:
    nonce = secrets.token_bytes(32)
    bundle = _wire(tpm_bundle(host_a, vaik, approval, nonce, boot))
    vm = verify_bundle(bundle, options(host_a, nonce, vaik))
    assert vm.host.subject == "CN=host-a.sim"
    assert vm.vaik_name == vaik.name
    assert vm.host.aik_name == host_a.tpm.aik_name()
    # the first attestation after enrolment, before the tenant stored the vAIK
    verify_bundle(bundle, options(host_a, nonce, None))
    verdict = evaluate_reference_values(vm, learn_reference_values(vm))
    assert verdict.trusted


def test_inv3_verifier_requires_chain_cert_user_fresh_nonce_and_replay(
    host_a: TpmHost,
    host_b: TpmHost,
    vaik: WrappedKey,
    approval: PolicyApproval,
    boot: Boot,
) -> None:
    """Invariant 3 on TPM-made evidence: each of issue 7's rejections with its own id."""
    nonce = secrets.token_bytes(32)
    opts = options(host_a, nonce, vaik)
    verify_bundle(_wire(tpm_bundle(host_a, vaik, approval, nonce, boot)), opts)

    clone_vaik = host_a.vaik()
    edited = list(make_boot().ima_entries)
    edited[3] = ima_ng_entry(b"/usr/bin/python3.11", b"python with a patch")
    rogue = make_fleet(0xBAD1, "vtpm-trust fleet CA")
    cases: list[tuple[str, RawBundle, type[VerificationError], str]] = [
        (
            "replayed nonce",
            tpm_bundle(host_a, vaik, approval, secrets.token_bytes(32), boot),
            NonceMismatch,
            "verify.nonce",
        ),
        (
            "another tenant's cert_user",
            tpm_bundle(host_a, vaik, approval, nonce, boot, tenant=OTHER_TENANT),
            CertUserMismatch,
            "verify.cert_user",
        ),
        (
            "clone VM: another UUID",
            tpm_bundle(
                host_a, clone_vaik, approval, nonce, boot, vm_uuid=uuid.UUID(int=VM.int + 1)
            ),
            VmUuidMismatch,
            "verify.vm_uuid",
        ),
        (
            "clone VM: a vAIK not the enrolled one",
            tpm_bundle(host_a, clone_vaik, approval, nonce, boot),
            VaikNotEnrolled,
            "verify.chain.vaik_not_enrolled",
        ),
        (
            "event log from another boot",
            tpm_bundle(
                host_a, vaik, approval, nonce, boot, event_log=make_boot(boot_id=7).event_log
            ),
            EventLogReplayMismatch,
            "verify.replay.eventlog",
        ),
        (
            "one edited IMA entry",
            tpm_bundle(
                host_a,
                vaik,
                approval,
                nonce,
                boot,
                ima_list=encode_binary(edited),
            ),
            ImaReplayMismatch,
            "verify.replay.ima",
        ),
        (
            "forged attestation signature (another vAIK of the same TPM)",
            tpm_bundle(host_a, vaik, approval, nonce, boot, signer=clone_vaik),
            AttestationSignatureInvalid,
            "verify.signature.attestation",
        ),
        (
            "AIK certificate not issued by the fleet CA",
            tpm_bundle(
                host_a, vaik, approval, nonce, boot, aik_certificates=_admit(host_a.tpm, "x", rogue)
            ),
            AikNotFleetIssued,
            "verify.chain.aik_issuer",
        ),
        (
            "CertvAIK signed by another host's AuthKey",
            tpm_bundle(
                host_a,
                vaik,
                approval,
                nonce,
                boot,
                cert_vaik_host=host_b,
                cert_vaik_key=host_b.vaik(),
            ),
            CertVaikSignatureInvalid,
            "verify.signature.cert_vaik",
        ),
    ]
    for label, bundle, error, finding_id in cases:
        with pytest.raises(error) as info:
            verify_bundle(_wire(bundle), opts)
        assert type(info.value) is error, label
        assert info.value.id == finding_id, label


def test_ima_entry_not_in_the_allowlist(
    host_a: TpmHost, vaik: WrappedKey, approval: PolicyApproval, boot: Boot
) -> None:
    nonce = secrets.token_bytes(32)
    good = verify_bundle(
        tpm_bundle(host_a, vaik, approval, nonce, boot), options(host_a, nonce, vaik)
    )
    refs = learn_reference_values(good)
    more = make_boot(files=(*DEFAULT_FILES, (b"/usr/local/bin/miner", b"xmrig")))
    nonce = secrets.token_bytes(32)
    vm = verify_bundle(
        tpm_bundle(host_a, vaik, approval, nonce, more), options(host_a, nonce, vaik)
    )
    verdict = evaluate_reference_values(vm, refs)
    assert not verdict.trusted and verdict.ids == ("ima.entry.unknown_file",)
