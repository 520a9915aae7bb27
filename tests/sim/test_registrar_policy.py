"""Fleet policy approvals (PolicyAuthorize) accepted by a real TPM.

The registrar's fleet policy key signs an approval of a host PCR0-8 policy; a swtpm loads the
fleet key's public part (as the host agent will), turns the approval into a verification ticket
with TPM2_VerifySignature, and TPM2_PolicyAuthorize accepts it while PCR0-8 hold the approved
values, and refuses it once PCR 8 changes.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from tpm2_pytss import ESAPI, TSS2_Exception
from tpm2_pytss.constants import ESYS_TR, TPM2_ALG, TPM2_SE
from tpm2_pytss.types import (
    TPM2B_PUBLIC,
    TPML_DIGEST_VALUES,
    TPML_PCR_SELECTION,
    TPMT_HA,
    TPMT_SIGNATURE,
    TPMT_SYM_DEF,
)

from evidence.tpm2_policy import (
    PolicyApproval,
    approval_digest,
    empty_digest,
    fleet_key_name,
    pcr_composite_digest,
    policy_authorize,
    policy_pcr,
)
from tests.helpers.swtpm import Swtpm
from tests.unit.test_registrar_ekcert import make_pki, pem
from verifier.registrar.service import RegistrarService
from verifier.registrar.state import init_state, open_service

PCRS = range(9)
POLICY_REF = b"vtpm-trust/vaik"


@pytest.fixture
def service(tmp_path: Path) -> Iterator[RegistrarService]:
    pki = make_pki()
    state = tmp_path / "registrar"
    init_state(
        state,
        ek_ca_pems=[pem(pki.root[0])],
        now=datetime.now(UTC),
        random_bytes=secrets.token_bytes,
    )
    svc, store = open_service(
        state, clock=lambda: datetime.now(UTC), random_bytes=secrets.token_bytes
    )
    yield svc
    store.close()


def _pcr_values(esys: ESAPI) -> list[bytes]:
    """PCR0-8 of the sha256 bank (PCR_Read returns at most 8 digests per call)."""
    values: list[bytes] = []
    for spec in ("sha256:0,1,2,3,4,5,6,7", "sha256:8"):
        _, _, digests = esys.pcr_read(TPML_PCR_SELECTION.parse(spec))
        values += [bytes(d) for d in digests]
    assert len(values) == 9
    return values


def _authorize(esys: ESAPI, service: RegistrarService, approval: PolicyApproval) -> bytes:
    """Run PolicyPCR(0-8) + PolicyAuthorize(fleet key) on the TPM; return the session digest."""
    tpmt = service._ca.policy_key_public()
    public, _ = TPM2B_PUBLIC.unmarshal(len(tpmt).to_bytes(2, "big") + tpmt)
    key = esys.load_external(public, None, ESYS_TR.OWNER)
    session = esys.start_auth_session(
        ESYS_TR.NONE,
        ESYS_TR.NONE,
        TPM2_SE.POLICY,
        TPMT_SYM_DEF(algorithm=TPM2_ALG.NULL),
        TPM2_ALG.SHA256,
    )
    try:
        assert bytes(esys.tr_get_name(key)) == fleet_key_name(service._ca.policy_key.public_key())
        r, s = decode_dss_signature(approval.signature)
        signature = TPMT_SIGNATURE(sigAlg=TPM2_ALG.ECDSA)
        signature.signature.ecdsa.hash = TPM2_ALG.SHA256
        signature.signature.ecdsa.signatureR = r.to_bytes(32, "big")
        signature.signature.ecdsa.signatureS = s.to_bytes(32, "big")
        ticket = esys.verify_signature(
            key, approval_digest(approval.approved_policy, approval.policy_ref), signature
        )
        esys.policy_pcr(session, None, TPML_PCR_SELECTION.parse("sha256:0,1,2,3,4,5,6,7,8"))
        esys.policy_authorize(
            session,
            approval.approved_policy,
            esys.tr_get_name(key),
            ticket,
            approval.policy_ref,
        )
        return bytes(esys.policy_get_digest(session))
    finally:
        esys.flush_context(session)
        esys.flush_context(key)


def test_approval_satisfies_policy_authorize_on_swtpm(
    swtpm_factory: Callable[..., Swtpm], service: RegistrarService
) -> None:
    esys = ESAPI(swtpm_factory("host").tcti)
    try:
        approved = policy_pcr(empty_digest(), PCRS, pcr_composite_digest(_pcr_values(esys)))
        approval = service.approve_platform_policy(approved, POLICY_REF)
        digest = _authorize(esys, service, approval)
        key_name = fleet_key_name(service._ca.policy_key.public_key())
        assert digest == policy_authorize(empty_digest(), key_name, POLICY_REF)
    finally:
        esys.close()


def test_approval_is_refused_after_a_pcr_changes(
    swtpm_factory: Callable[..., Swtpm], service: RegistrarService
) -> None:
    esys = ESAPI(swtpm_factory("host").tcti)
    try:
        approved = policy_pcr(empty_digest(), PCRS, pcr_composite_digest(_pcr_values(esys)))
        approval = service.approve_platform_policy(approved, POLICY_REF)
        esys.pcr_extend(ESYS_TR.PCR8, _digest_values())
        with pytest.raises(TSS2_Exception, match="value is out of range"):
            _authorize(esys, service, approval)
    finally:
        esys.close()


def _digest_values() -> TPML_DIGEST_VALUES:
    ha = TPMT_HA(hashAlg=TPM2_ALG.SHA256)
    ha.digest.sha256 = secrets.token_bytes(32)
    return TPML_DIGEST_VALUES([ha])
