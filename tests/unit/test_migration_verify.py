"""verify_exgkey_offer on hostile input, and the signing-state query, without a TPM."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

from host_agent.migration import (
    TargetNotAdmitted,
    TargetRefused,
    VaikNotSignable,
    VaikState,
    require_signing_allowed,
    signing_allowed,
    vaik_state,
)
from host_agent.migration.protocol import ExgKeyOffer
from host_agent.migration.verify import exgkey_policy_digest, verify_exgkey_offer

NOW = datetime(2026, 6, 1, tzinfo=UTC)


def _ca() -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fleet CA")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(datetime(2026, 1, 1, tzinfo=UTC))
        .not_valid_after(datetime(2027, 1, 1, tzinfo=UTC))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.DER)


CA = _ca()


def _offer(**fields: Any) -> ExgKeyOffer:
    base: dict[str, Any] = {
        "migration_id": uuid.uuid4(),
        "exgkey_public": b"\x00\x23\x00\x0b",
        "pcr_digest": bytes(32),
        "locality": 0,
        "certify_attest": b"\xffTCG",
        "certify_signature": b"\x00\x18",
        "aik_certificate": b"0\x82",
    }
    return ExgKeyOffer(**{**base, **fields})


@settings(max_examples=200)
@given(
    st.binary(max_size=300),
    st.binary(max_size=300),
    st.binary(max_size=300),
    st.binary(max_size=300),
)
def test_any_garbage_offer_is_a_typed_refusal(
    pub: bytes, att: bytes, sig: bytes, cert: bytes
) -> None:
    offer = _offer(
        exgkey_public=pub, certify_attest=att, certify_signature=sig, aik_certificate=cert
    )
    with pytest.raises(TargetRefused):
        verify_exgkey_offer(
            offer,
            nonce=bytes(32),
            peer_host_id="host-b",
            fleet_ca_certs=[CA],
            approved_sign_policies=(),
            now=NOW,
        )


def test_a_certificate_from_another_ca_is_not_admitted() -> None:
    with pytest.raises(TargetNotAdmitted) as info:
        verify_exgkey_offer(
            _offer(aik_certificate=_ca()),
            nonce=bytes(32),
            peer_host_id="host-b",
            fleet_ca_certs=[CA],
            approved_sign_policies=(),
            now=NOW,
        )
    assert info.value.id == "migration.target.not_admitted"


def test_exgkey_policy_digest_matches_the_host_state_policy() -> None:
    from evidence.tpm2_policy import HOST_PCRS, host_state_policy, pcr_composite_digest

    values = [bytes([i]) * 32 for i in HOST_PCRS]
    digest = pcr_composite_digest(values)
    assert exgkey_policy_digest(digest, 0) == host_state_policy(values, locality=0)
    assert exgkey_policy_digest(digest, None) == host_state_policy(values, locality=None)


class _Record:
    def __init__(self, value: dict[str, Any]) -> None:
        self.value = value

    def json(self) -> dict[str, Any]:
        return dict(self.value)


class _Store:
    def __init__(self, **records: dict[str, Any]) -> None:
        self.records = records

    def find(self, record_type: str, record_id: str) -> _Record | None:
        assert record_type == "vaik"
        value = self.records.get(record_id)
        return None if value is None else _Record(value)


@pytest.mark.parametrize(
    ("record", "state"),
    [
        ({"generation": 1, "key": "00"}, VaikState.ACTIVE),  # as enrollment writes it
        ({"generation": 1, "key": "00", "state": "moving"}, VaikState.MOVING),
        ({"generation": 1, "key": "00", "state": "pending"}, VaikState.PENDING),
        ({"generation": 1, "key": "00", "state": "bogus"}, VaikState.MOVING),  # never signs
        (None, VaikState.ABSENT),
    ],
)
def test_only_an_active_vaik_may_sign(record: dict[str, Any] | None, state: VaikState) -> None:
    vm = uuid.uuid4()
    store = _Store(**({str(vm): record} if record is not None else {}))
    assert vaik_state(store, vm) is state
    assert signing_allowed(store, vm) is (state is VaikState.ACTIVE)
    if state is VaikState.ACTIVE:
        require_signing_allowed(store, vm)
    else:
        with pytest.raises(VaikNotSignable) as info:
            require_signing_allowed(store, vm)
        assert info.value.id == "attest.vaik_not_signable"
