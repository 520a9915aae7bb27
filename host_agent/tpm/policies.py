"""Policy sessions: the same policies built in TPM trial sessions and replayed in real ones.

Each builder runs a sequence of ``TPM2_Policy*`` commands on a session; with a TRIAL session it
yields the policy digest a key's ``authPolicy`` is set to, with a POLICY session it satisfies
that ``authPolicy`` for one command. The pure twins in :mod:`evidence.tpm2_policy` compute the same
digests without a TPM (a sim test checks trial == pure).

Runs on the adapter's TPM thread only (it is handed the ESAPI context).
"""

from __future__ import annotations

from collections.abc import Sequence

from tpm2_pytss import ESAPI
from tpm2_pytss.constants import (
    ESYS_TR,
    TPM2_ALG,
    TPM2_CC,
    TPM2_RH,
    TPM2_SE,
    TPM2_ST,
    TPMA_LOCALITY,
)
from tpm2_pytss.types import (
    TPM2B_DIGEST,
    TPML_DIGEST,
    TPML_PCR_SELECTION,
    TPMT_SYM_DEF,
    TPMT_TK_VERIFIED,
)

from .port import KeyPolicy

__all__ = [
    "apply_pcr_policy",
    "apply_vaik_branch_duplicate",
    "apply_vaik_sign",
    "apply_vaik_sign_approved",
    "approved_sign_policy",
    "pcr_selection",
    "start_session",
    "vaik_branches",
    "vaik_policy",
]


def pcr_selection(pcrs: Sequence[int]) -> TPML_PCR_SELECTION:
    return TPML_PCR_SELECTION.parse("sha256:" + ",".join(str(p) for p in sorted(pcrs)))


def start_session(esys: ESAPI, *, trial: bool) -> ESYS_TR:
    """An unbound, unsalted SHA-256 policy (or trial) session."""
    return esys.start_auth_session(
        ESYS_TR.NONE,
        ESYS_TR.NONE,
        TPM2_SE.TRIAL if trial else TPM2_SE.POLICY,
        TPMT_SYM_DEF(algorithm=TPM2_ALG.NULL),
        TPM2_ALG.SHA256,
    )


def apply_pcr_policy(esys: ESAPI, session: ESYS_TR, policy: KeyPolicy, *, trial: bool) -> None:
    """PolicyPCR(sha256:policy.pcrs) [+ PolicyLocality(policy.locality)].

    In a trial session the approved ``pcr_digest`` is used; in a real one the TPM uses the current
    PCR values (an empty pcrDigest), so a changed platform shows as a different session digest
    instead of an opaque TPM_RC_VALUE, and the caller can say which values differ.
    """
    if policy.pcrs:
        digest = policy.pcr_digest if trial else None
        esys.policy_pcr(session, TPM2B_DIGEST(digest or b""), pcr_selection(policy.pcrs))
    if policy.locality is not None:
        esys.policy_locality(session, TPMA_LOCALITY(1 << policy.locality))


def vaik_branches(esys: ESAPI, fleet_key_name: bytes, policy_ref: bytes) -> tuple[bytes, bytes]:
    """Trial digests of the vAIK's two PolicyOR branches: (PolicyAuthorize, CommandCode(Dup))."""
    s = start_session(esys, trial=True)
    try:
        # A trial session checks neither approvedPolicy nor the ticket; it must still unmarshal.
        ticket = TPMT_TK_VERIFIED(tag=TPM2_ST.VERIFIED, hierarchy=TPM2_RH.NULL)
        esys.policy_authorize(s, TPM2B_DIGEST(), fleet_key_name, ticket, policy_ref)
        branch_a = bytes(esys.policy_get_digest(s))
    finally:
        esys.flush_context(s)
    s = start_session(esys, trial=True)
    try:
        esys.policy_command_code(s, TPM2_CC.Duplicate)
        branch_b = bytes(esys.policy_get_digest(s))
    finally:
        esys.flush_context(s)
    return branch_a, branch_b


def _or(esys: ESAPI, session: ESYS_TR, branches: tuple[bytes, bytes]) -> None:
    esys.policy_or(session, TPML_DIGEST([TPM2B_DIGEST(b) for b in branches]))


def vaik_policy(esys: ESAPI, fleet_key_name: bytes, policy_ref: bytes) -> bytes:
    """Trial digest of the vAIK authPolicy: PolicyOR{branch A, branch B}."""
    branches = vaik_branches(esys, fleet_key_name, policy_ref)
    s = start_session(esys, trial=True)
    try:
        _or(esys, s, branches)
        return bytes(esys.policy_get_digest(s))
    finally:
        esys.flush_context(s)


def approved_sign_policy(esys: ESAPI, pcrs: Sequence[int], pcr_digest: bytes) -> bytes:
    """Trial digest of a fleet-approvable policy: PolicyPCR(pcrs, digest) + CommandCode(Sign)."""
    s = start_session(esys, trial=True)
    try:
        esys.policy_pcr(s, TPM2B_DIGEST(pcr_digest), pcr_selection(pcrs))
        esys.policy_command_code(s, TPM2_CC.Sign)
        return bytes(esys.policy_get_digest(s))
    finally:
        esys.flush_context(s)


def apply_vaik_sign(
    esys: ESAPI,
    session: ESYS_TR,
    pcrs: Sequence[int],
    branches: tuple[bytes, bytes],
    approved_policy: bytes,
    policy_ref: bytes,
    fleet_key_name: bytes,
    ticket: TPMT_TK_VERIFIED,
) -> bytes:
    """PolicyPCR(current) + CommandCode(Sign) → PolicyAuthorize(ticket) → PolicyOR.

    Returns the session digest after the first two terms (to compare with the approval before the
    TPM refuses PolicyAuthorize with an opaque TPM_RC_VALUE).
    """
    esys.policy_pcr(session, TPM2B_DIGEST(b""), pcr_selection(pcrs))
    esys.policy_command_code(session, TPM2_CC.Sign)
    reached = bytes(esys.policy_get_digest(session))
    if reached != approved_policy:
        return reached
    esys.policy_authorize(session, approved_policy, fleet_key_name, ticket, policy_ref)
    _or(esys, session, branches)
    return reached


def apply_vaik_sign_approved(
    esys: ESAPI,
    session: ESYS_TR,
    pcrs: Sequence[int],
    branches: tuple[bytes, bytes],
    approved_policy: bytes,
    policy_ref: bytes,
    fleet_key_name: bytes,
    ticket: TPMT_TK_VERIFIED,
) -> None:
    """:func:`apply_vaik_sign` without reading the session digest back (one command less): if
    the platform moved, PolicyAuthorize fails and the caller works out why afterwards."""
    esys.policy_pcr(session, TPM2B_DIGEST(b""), pcr_selection(pcrs))
    esys.policy_command_code(session, TPM2_CC.Sign)
    esys.policy_authorize(session, approved_policy, fleet_key_name, ticket, policy_ref)
    _or(esys, session, branches)


def apply_vaik_branch_duplicate(
    esys: ESAPI, session: ESYS_TR, branches: tuple[bytes, bytes]
) -> None:
    """PolicyCommandCode(Duplicate) → PolicyOR: the only way to move a vAIK."""
    esys.policy_command_code(session, TPM2_CC.Duplicate)
    _or(esys, session, branches)
