"""`vtpm-verify registrar approve`: its default policyRef is the one vAIKs bind, and bad input
is refused with exit 2, one line saying what was expected and what arrived, and no record."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from evidence.tpm2_policy import approval_digest
from evidence.verify import VAIK_POLICY_REF
from verifier.cli import main
from verifier.registrar.state import open_service


def _approvals(state: Path) -> list[tuple[bytes, bytes, bytes, datetime]]:
    _, store = open_service(state, clock=lambda: datetime.now(UTC), random_bytes=bytes)
    try:
        return store.approvals()
    finally:
        store.close()


@pytest.fixture(scope="module")
def state(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("registrar")
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test EK CA")])
    now = datetime.now(UTC)
    ca = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    ek_ca = base / "ek-ca.pem"
    ek_ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    root = base / "state"
    assert (
        main(["registrar", "init", "--state-dir", str(root), "--ek-ca", str(ek_ca), "--json"]) == 0
    )
    return root


def _approve(state: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(["registrar", "approve", "--state-dir", str(state), "--json", *extra])
    out, err = capsys.readouterr()
    return code, out, err


def test_approve_defaults_to_the_vaik_policy_ref(
    state: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    digest = bytes(range(32))
    code, out, _ = _approve(state, capsys, "--pcr-policy", digest.hex())
    assert code == 0
    answer = json.loads(out)
    assert bytes.fromhex(answer["policy_ref"]) == VAIK_POLICY_REF
    assert answer["approved_policy"] == digest.hex()
    approval_digest(digest, VAIK_POLICY_REF)  # the pair the vAIK policy checks is well formed
    assert (digest, VAIK_POLICY_REF) in [(a[0], a[1]) for a in _approvals(state)]


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--pcr-policy", "abcd"], "expected 64 hex digits, got 'abcd'"),
        (["--pcr-policy", "zz" * 32], "expected 64 hex digits"),
        (["--pcr-policy", "00" * 32, "--policy-ref", "x" * 33], "at most 32 bytes, got 33"),
    ],
)
def test_approve_refuses_bad_input_and_records_nothing(
    state: Path, capsys: pytest.CaptureFixture[str], args: list[str], needle: str
) -> None:
    before = _approvals(state)
    code, out, err = _approve(state, capsys, *args)
    assert code == 2
    assert out == ""
    assert needle in err and len(err.strip().splitlines()) == 1
    assert _approvals(state) == before
