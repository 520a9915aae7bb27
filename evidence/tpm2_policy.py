"""TPM 2.0 policy digests, computed without a TPM (TPM 2.0 Part 1 §19.7, Part 3 §23).

A verifier that sees a key's ``authPolicy`` in its TPMT_PUBLIC (e.g. AuthKey's, inside CertAuthKey)
recomputes it here and compares: the policy is what makes AuthKey usable only on an approved host
platform state, and a vAIK signable only with a fleet approval. The host agent builds the same
digests with TPM trial sessions; a test checks both agree.

Every ``policy_*`` function takes the running digest (start from :func:`empty_digest`) and returns
the next one (``PolicyUpdate`` / ``policyDigest_new = H(policyDigest_old ‖ TPM_CC ‖ args)``); only
SHA-256 policy sessions are supported.

Fleet approvals (PolicyAuthorize): the fleet key signs ``aHash = SHA-256(approvedPolicy ‖
policyRef)`` (Part 3 §23.16); :func:`approval_digest` computes it, :func:`verify_policy_approval`
checks an approval against the fleet key, and :func:`fleet_key_name` gives the TPM Name the agent
binds into a vAIK's policy when it loads that key with ``TPM2_LoadExternal``.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from evidence.errors import SignatureError

__all__ = [
    "DIGEST_SIZE",
    "HOST_PCRS",
    "TPM_CC_CERTIFY",
    "TPM_CC_DUPLICATE",
    "TPM_CC_SIGN",
    "PolicyApproval",
    "approval_digest",
    "empty_digest",
    "fleet_key_name",
    "fleet_key_public",
    "host_state_policy",
    "name_of_public",
    "pcr_composite_digest",
    "pcr_selection",
    "policy_authorize",
    "policy_command_code",
    "policy_locality",
    "policy_or",
    "policy_pcr",
    "policy_secret",
    "vaik_policy",
    "vaik_sign_policy",
    "verify_policy_approval",
]

DIGEST_SIZE = 32

# TPM_CC values (Part 2 §6.5.2).
_TPM_CC_POLICY_SECRET = 0x00000151
_TPM_CC_POLICY_AUTHORIZE = 0x0000016A
_TPM_CC_POLICY_COMMAND_CODE = 0x0000016C
_TPM_CC_POLICY_LOCALITY = 0x0000016F
_TPM_CC_POLICY_OR = 0x00000171
_TPM_CC_POLICY_PCR = 0x0000017F
TPM_CC_DUPLICATE = 0x0000014B
TPM_CC_CERTIFY = 0x00000148
TPM_CC_SIGN = 0x0000015D

_TPM_ALG_SHA256 = 0x000B
_TPM_ALG_ECC = 0x0023
_TPM_ALG_ECDSA = 0x0018
_TPM_ALG_NULL = 0x0010
_TPM_ECC_NIST_P256 = 0x0003
# TPMA_OBJECT of the fleet key as loaded with LoadExternal: userWithAuth | sign.
_FLEET_KEY_ATTRIBUTES = 0x00000040 | 0x00040000


def _sha256(*parts: bytes) -> bytes:
    h = hashlib.sha256()
    for part in parts:
        h.update(part)
    return h.digest()


def _check_digest(value: bytes, what: str) -> None:
    if not isinstance(value, bytes):
        raise TypeError(f"{what} must be bytes, got {type(value).__name__}")
    if len(value) != DIGEST_SIZE:
        raise ValueError(f"{what} must be {DIGEST_SIZE} bytes (SHA-256), got {len(value)}")


def _tpm2b(data: bytes) -> bytes:
    return struct.pack(">H", len(data)) + data


def empty_digest() -> bytes:
    """The digest a policy session starts from: 32 zero bytes."""
    return bytes(DIGEST_SIZE)


def pcr_selection(pcrs: Iterable[int], *, hash_alg: int = _TPM_ALG_SHA256) -> bytes:
    """Marshalled TPML_PCR_SELECTION with one bank (``hash_alg``) selecting ``pcrs``.

    Raises:
        ValueError: a PCR index outside 0..23, or no PCR at all.
    """
    indices = sorted(set(pcrs))
    if not indices:
        raise ValueError("a PCR selection needs at least one PCR")
    bitmap = bytearray(3)
    for i in indices:
        if not 0 <= i < 24:
            raise ValueError(f"PCR index must be in 0..23, got {i}")
        bitmap[i // 8] |= 1 << (i % 8)
    return struct.pack(">IHB", 1, hash_alg, 3) + bytes(bitmap)


def pcr_composite_digest(values: Sequence[bytes]) -> bytes:
    """SHA-256 over the PCR values, lowest index first: PolicyPCR's pcrDigest."""
    for v in values:
        _check_digest(v, "PCR value")
    return _sha256(*values)


def policy_pcr(digest: bytes, pcrs: Iterable[int], pcr_digest: bytes) -> bytes:
    """TPM2_PolicyPCR: ``H(old ‖ TPM_CC_PolicyPCR ‖ TPML_PCR_SELECTION ‖ pcrDigest)`` (sha256 bank).

    Args:
        digest: the running policy digest.
        pcrs: PCR indices of the sha256 bank.
        pcr_digest: :func:`pcr_composite_digest` of their approved values.
    """
    _check_digest(digest, "policy digest")
    _check_digest(pcr_digest, "pcr_digest")
    return _sha256(digest, struct.pack(">I", _TPM_CC_POLICY_PCR), pcr_selection(pcrs), pcr_digest)


def policy_locality(digest: bytes, locality: int) -> bytes:
    """TPM2_PolicyLocality: ``H(old ‖ TPM_CC_PolicyLocality ‖ TPMA_LOCALITY)``.

    Args:
        locality: localities 0..4 are given by number and encoded as the bitmap TPM_LOC_ZERO..FOUR
            (locality 0 → 0x01); 32..255 are extended localities, encoded as themselves.
    """
    _check_digest(digest, "policy digest")
    if 0 <= locality <= 4:
        encoded = 1 << locality
    elif 32 <= locality <= 255:
        encoded = locality
    else:
        raise ValueError(f"locality must be 0..4 or 32..255, got {locality}")
    return _sha256(digest, struct.pack(">IB", _TPM_CC_POLICY_LOCALITY, encoded))


def policy_command_code(digest: bytes, command_code: int) -> bytes:
    """TPM2_PolicyCommandCode: ``H(old ‖ TPM_CC_PolicyCommandCode ‖ code)``."""
    _check_digest(digest, "policy digest")
    return _sha256(digest, struct.pack(">II", _TPM_CC_POLICY_COMMAND_CODE, command_code))


def _policy_update(digest: bytes, command_code: int, name: bytes, policy_ref: bytes) -> bytes:
    first = _sha256(digest, struct.pack(">I", command_code), name)
    return _sha256(first, policy_ref)


def policy_secret(digest: bytes, auth_object_name: bytes, policy_ref: bytes = b"") -> bytes:
    """TPM2_PolicySecret (PolicyUpdate with the authorizing object's Name and policyRef).

    For a hierarchy (e.g. TPM_RH_ENDORSEMENT) the Name is its 4-byte handle.
    """
    _check_digest(digest, "policy digest")
    return _policy_update(digest, _TPM_CC_POLICY_SECRET, auth_object_name, policy_ref)


def policy_authorize(digest: bytes, key_sign_name: bytes, policy_ref: bytes = b"") -> bytes:
    """TPM2_PolicyAuthorize: ``PolicyUpdate(TPM_CC_PolicyAuthorize, keySign Name, policyRef)``.

    PolicyAuthorize first resets the session digest to zero, so the result does not depend on
    ``digest`` (it is accepted only for a uniform call shape and must be a valid digest).
    """
    _check_digest(digest, "policy digest")
    return _policy_update(empty_digest(), _TPM_CC_POLICY_AUTHORIZE, key_sign_name, policy_ref)


def policy_or(digest: bytes, branches: Sequence[bytes]) -> bytes:
    """TPM2_PolicyOR: ``H(0…0 ‖ TPM_CC_PolicyOR ‖ digest_1 ‖ … ‖ digest_n)`` for 2..8 branches.

    As with PolicyAuthorize the running digest is replaced, not extended.
    """
    _check_digest(digest, "policy digest")
    if not 2 <= len(branches) <= 8:
        raise ValueError(f"PolicyOR takes 2..8 branches, got {len(branches)}")
    for b in branches:
        _check_digest(b, "PolicyOR branch")
    return _sha256(empty_digest(), struct.pack(">I", _TPM_CC_POLICY_OR), *branches)


def approval_digest(approved_policy: bytes, policy_ref: bytes) -> bytes:
    """``aHash = SHA-256(approvedPolicy ‖ policyRef)``: what the fleet key signs (Part 3 §23.16)."""
    _check_digest(approved_policy, "approved_policy")
    if len(policy_ref) > DIGEST_SIZE:
        raise ValueError(f"policy_ref is at most {DIGEST_SIZE} bytes, got {len(policy_ref)}")
    return _sha256(approved_policy, policy_ref)


def _ecc_p256(key: ec.EllipticCurvePublicKey) -> tuple[bytes, bytes]:
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise ValueError("the fleet key must be an ECC NIST P-256 public key")
    numbers = key.public_numbers()
    return numbers.x.to_bytes(32, "big"), numbers.y.to_bytes(32, "big")


def fleet_key_public(key: ec.EllipticCurvePublicKey) -> bytes:
    """Marshalled TPMT_PUBLIC the agent loads the fleet key with (LoadExternal, public only).

    ECC P-256, nameAlg SHA-256, attributes userWithAuth|sign, empty authPolicy, symmetric NULL,
    scheme ECDSA-SHA256, kdf NULL. The vAIK policy binds this structure's Name.
    """
    x, y = _ecc_p256(key)
    return (
        struct.pack(">HHI", _TPM_ALG_ECC, _TPM_ALG_SHA256, _FLEET_KEY_ATTRIBUTES)
        + _tpm2b(b"")
        + struct.pack(
            ">HHHHH",
            _TPM_ALG_NULL,
            _TPM_ALG_ECDSA,
            _TPM_ALG_SHA256,
            _TPM_ECC_NIST_P256,
            _TPM_ALG_NULL,
        )
        + _tpm2b(x)
        + _tpm2b(y)
    )


def name_of_public(tpmt_public: bytes) -> bytes:
    """TPM Name of an object whose nameAlg is SHA-256: ``0x000B ‖ SHA-256(TPMT_PUBLIC)``."""
    if len(tpmt_public) < 4 or tpmt_public[2:4] != struct.pack(">H", _TPM_ALG_SHA256):
        raise ValueError("name_of_public supports TPMT_PUBLIC with nameAlg SHA-256 only")
    return struct.pack(">H", _TPM_ALG_SHA256) + _sha256(tpmt_public)


def fleet_key_name(key: ec.EllipticCurvePublicKey) -> bytes:
    """TPM Name of the fleet key (:func:`fleet_key_public`), as bound in PolicyAuthorize."""
    return name_of_public(fleet_key_public(key))


HOST_PCRS: tuple[int, ...] = tuple(range(9))


def host_state_policy(pcr_values: Sequence[bytes], *, locality: int | None = 0) -> bytes:
    """AuthKey's / ExgKey's authPolicy: PolicyPCR(sha256:0-8 = values) [+ PolicyLocality].

    Args:
        pcr_values: the approved sha256 values of PCR0..PCR8, in order.
        locality: the PolicyLocality term (None: the TPM path did not allow one).
    """
    if len(pcr_values) != len(HOST_PCRS):
        raise ValueError(f"need the {len(HOST_PCRS)} values of PCR0-8, got {len(pcr_values)}")
    d = policy_pcr(empty_digest(), HOST_PCRS, pcr_composite_digest(pcr_values))
    return d if locality is None else policy_locality(d, locality)


def vaik_sign_policy(pcr_values: Sequence[bytes]) -> bytes:
    """What a fleet approval for vAIK signing covers: PolicyPCR(sha256:0-8) + CommandCode(Sign).

    The fleet signs this digest (with the vAIK's policyRef, see :func:`approval_digest`) once per
    approved host platform state.
    """
    if len(pcr_values) != len(HOST_PCRS):
        raise ValueError(f"need the {len(HOST_PCRS)} values of PCR0-8, got {len(pcr_values)}")
    d = policy_pcr(empty_digest(), HOST_PCRS, pcr_composite_digest(pcr_values))
    return policy_command_code(d, TPM_CC_SIGN)


def vaik_policy(fleet_key: ec.EllipticCurvePublicKey, policy_ref: bytes) -> bytes:
    """A vAIK's authPolicy: PolicyOR{PolicyAuthorize(fleet key, policyRef), CommandCode(Dup)}.

    A verifier compares this with the authPolicy in the vAIK's TPMT_PUBLIC (from CertvAIK) to
    know the key signs only under fleet-approved host states and moves only by TPM2_Duplicate.
    """
    return policy_or(
        empty_digest(),
        [
            policy_authorize(empty_digest(), fleet_key_name(fleet_key), policy_ref),
            policy_command_code(empty_digest(), TPM_CC_DUPLICATE),
        ],
    )


@dataclass(frozen=True)
class PolicyApproval:
    """The fleet key's approval of one policy (e.g. "sign on host platform state X").

    Attributes:
        approved_policy: the SHA-256 policy digest the fleet approves.
        policy_ref: the policyRef bound into the vAIK's PolicyAuthorize branch (≤ 32 bytes).
        signature: DER ECDSA signature by the fleet key over :func:`approval_digest` (i.e. the
            ECDSA-SHA256 signature of ``approved_policy ‖ policy_ref``).
    """

    approved_policy: bytes
    policy_ref: bytes
    signature: bytes

    def __post_init__(self) -> None:
        _check_digest(self.approved_policy, "approved_policy")
        if not isinstance(self.policy_ref, bytes) or len(self.policy_ref) > DIGEST_SIZE:
            raise ValueError(f"policy_ref must be bytes of at most {DIGEST_SIZE}")
        if not isinstance(self.signature, bytes) or not self.signature:
            raise ValueError("signature must be non-empty bytes")


def verify_policy_approval(
    approval: PolicyApproval, fleet_public_key: ec.EllipticCurvePublicKey
) -> None:
    """Check that the fleet key signed ``approval`` (what PolicyAuthorize will require).

    Checks, in order: the key is ECC P-256; the signature is a valid ECDSA-SHA256 signature over
    ``approved_policy ‖ policy_ref`` (whose SHA-256 is :func:`approval_digest`).

    Raises:
        SignatureError: the signature does not verify under ``fleet_public_key``.
        ValueError: the key is not ECC P-256.
    """
    _ecc_p256(fleet_public_key)
    try:
        fleet_public_key.verify(
            approval.signature,
            approval.approved_policy + approval.policy_ref,
            ec.ECDSA(hashes.SHA256()),
        )
    except InvalidSignature as err:
        raise SignatureError(
            "policy approval: the signature does not verify under the fleet key "
            f"(approved_policy {approval.approved_policy.hex()}, "
            f"policy_ref {approval.policy_ref.hex()})"
        ) from err
