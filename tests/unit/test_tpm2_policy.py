"""evidence.tpm2_policy: policy digests against known values; approvals (pure, no TPM).

Known values: PolicyCommandCode(TPM2_Duplicate) from a swtpm trial session (platform-notes §3);
PolicySecret(TPM_RH_ENDORSEMENT) is the TCG EK Credential Profile's PolicyA (the low-range EK
template's authPolicy). tests/sim/test_host_tpm_keys.py compares every policy with trial sessions.
"""

from __future__ import annotations

import hashlib
import struct

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given
from hypothesis import strategies as st

from evidence import tpm2
from evidence import tpm2_policy as p
from evidence.errors import SignatureError

ZERO = p.empty_digest()


def test_policy_command_code_duplicate_known_value() -> None:
    assert (
        p.policy_command_code(ZERO, p.TPM_CC_DUPLICATE).hex()
        == "bef56b8c1cc84e11edd717528d2cd99356bd2bbf8f015209c3f84aeeaba8e8a2"
    )


def test_policy_secret_endorsement_is_ek_policy_a() -> None:
    assert (
        p.policy_secret(ZERO, struct.pack(">I", 0x4000000B)).hex()
        == "837197674484b3f81a90cc8d46a5d724fd52d76e06520b64f2a1da1b331469aa"
    )


def test_pcr_selection_encoding() -> None:
    assert p.pcr_selection(range(9)).hex() == "00000001000b03ff0100"
    assert p.pcr_selection([7, 0]).hex() == "00000001000b0381" + "0000"
    with pytest.raises(ValueError):
        p.pcr_selection([24])
    with pytest.raises(ValueError):
        p.pcr_selection([])


def test_policy_pcr_by_hand() -> None:
    values = [bytes([i]) * 32 for i in range(9)]
    composite = p.pcr_composite_digest(values)
    assert composite == hashlib.sha256(b"".join(values)).digest()
    expected = hashlib.sha256(
        ZERO + bytes.fromhex("0000017f") + bytes.fromhex("00000001000b03ff0100") + composite
    ).digest()
    assert p.policy_pcr(ZERO, range(9), composite) == expected


def test_policy_locality_encodes_bitmap() -> None:
    assert p.policy_locality(ZERO, 0) == hashlib.sha256(ZERO + bytes.fromhex("0000016f01")).digest()
    assert p.policy_locality(ZERO, 3) == hashlib.sha256(ZERO + bytes.fromhex("0000016f08")).digest()
    with pytest.raises(ValueError):
        p.policy_locality(ZERO, 5)


def test_policy_or_and_authorize_reset_the_digest() -> None:
    a, b = b"\x01" * 32, b"\x02" * 32
    assert p.policy_or(ZERO, [a, b]) == p.policy_or(b"\x09" * 32, [a, b])
    assert (
        p.policy_or(ZERO, [a, b])
        == hashlib.sha256(ZERO + bytes.fromhex("00000171") + a + b).digest()
    )
    name = b"\x00\x0b" + b"\x07" * 32
    first = hashlib.sha256(ZERO + bytes.fromhex("0000016a") + name).digest()
    assert p.policy_authorize(b"\x05" * 32, name, b"ref") == hashlib.sha256(first + b"ref").digest()
    with pytest.raises(ValueError):
        p.policy_or(ZERO, [a])


def test_digest_arguments_are_checked() -> None:
    with pytest.raises(ValueError):
        p.policy_command_code(b"short", 1)
    with pytest.raises(TypeError):
        p.policy_command_code("0" * 32, 1)  # type: ignore[arg-type]


def _fleet() -> ec.EllipticCurvePrivateKey:
    return ec.derive_private_key(0x1234567890ABCDEF, ec.SECP256R1())


def test_fleet_key_public_parses_as_tpmt_public_with_same_key() -> None:
    key = _fleet().public_key()
    public = tpm2.TpmtPublic.unmarshal(p.fleet_key_public(key))
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    assert tpm2.public_key(public).public_bytes(*spki) == key.public_bytes(*spki)
    assert tpm2.object_name(public) == p.fleet_key_name(key)


def test_fleet_key_must_be_p256() -> None:
    with pytest.raises(ValueError):
        p.fleet_key_public(ec.generate_private_key(ec.SECP384R1()).public_key())


def test_approval_round_trip_and_tamper() -> None:
    fleet = _fleet()
    policy = hashlib.sha256(b"approved platform").digest()
    sig = fleet.sign(policy + b"ref", ec.ECDSA(hashes.SHA256()))
    approval = p.PolicyApproval(policy, b"ref", sig)
    p.verify_policy_approval(approval, fleet.public_key())
    assert p.approval_digest(policy, b"ref") == hashlib.sha256(policy + b"ref").digest()
    with pytest.raises(SignatureError):
        p.verify_policy_approval(p.PolicyApproval(policy, b"other", sig), fleet.public_key())
    other = ec.derive_private_key(7, ec.SECP256R1()).public_key()
    with pytest.raises(SignatureError) as err:
        p.verify_policy_approval(approval, other)
    assert err.value.id == "verify.signature"


def test_approval_fields_are_checked() -> None:
    with pytest.raises(ValueError):
        p.PolicyApproval(b"x" * 31, b"", b"sig")
    with pytest.raises(ValueError):
        p.PolicyApproval(ZERO, b"r" * 33, b"sig")
    with pytest.raises(ValueError):
        p.PolicyApproval(ZERO, b"", b"")


@given(st.lists(st.integers(0, 23), min_size=1, max_size=24))
def test_pcr_selection_bitmap_matches_indices(pcrs: list[int]) -> None:
    sel = tpm2.TpmlPcrSelection.unmarshal(p.pcr_selection(pcrs))
    assert [s.pcrs for s in sel.selections] == [tuple(sorted(set(pcrs)))]


def test_composite_policies_by_their_parts() -> None:
    values = [bytes([i]) * 32 for i in range(9)]
    pcr = p.policy_pcr(ZERO, range(9), p.pcr_composite_digest(values))
    assert p.host_state_policy(values) == p.policy_locality(pcr, 0)
    assert p.host_state_policy(values, locality=None) == pcr
    assert p.vaik_sign_policy(values) == p.policy_command_code(pcr, p.TPM_CC_SIGN)
    key = _fleet().public_key()
    assert p.vaik_policy(key, b"r") == p.policy_or(
        ZERO,
        [
            p.policy_authorize(ZERO, p.fleet_key_name(key), b"r"),
            p.policy_command_code(ZERO, p.TPM_CC_DUPLICATE),
        ],
    )
    with pytest.raises(ValueError, match="PCR0-8"):
        p.host_state_policy(values[:8])
    with pytest.raises(ValueError, match="PCR0-8"):
        p.vaik_sign_policy(values + values[:1])
