"""MakeCredential against real TPMs and an independent implementation.

- our challenges open with TPM2_ActivateCredential on swtpm, for the RSA-2048 EK and the
  ECC P-384 (SHA-384, AES-256) EK that swtpm_setup creates, and only for the Name they name;
- ``tpm2_makecredential -T none`` (tpm2-tools' OpenSSL implementation) is the oracle: its
  output opens on the same swtpm, and on a software EK it opens with the same software
  ActivateCredential that opens ours (tests/unit/test_make_credential.py).
"""

from __future__ import annotations

import dataclasses
import secrets
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from tpm2_pytss import TSS2_Exception

from evidence.tpm2 import TpmsEccPoint, TpmtPublic, marshal_tpm2b_public
from tests.helpers.swtpm import Swtpm
from tests.sim.test_registrar_support import EsapiHostTpm
from tests.unit.test_make_credential import activate_in_software
from verifier.registrar.credential import MadeCredential, make_credential
from verifier.registrar.keys import check_ek_public


@pytest.fixture
def host(swtpm_factory: Callable[..., Swtpm]) -> EsapiHostTpm:
    return EsapiHostTpm(swtpm_factory("host", provision_ek=True))


def _tools_makecredential(
    tmp_path: Path, ek_public: TpmtPublic, secret: bytes, name: bytes
) -> MadeCredential:
    pub = tmp_path / "ek.pub"
    pub.write_bytes(marshal_tpm2b_public(ek_public))
    (tmp_path / "secret").write_bytes(secret)
    out = tmp_path / "cred.out"
    subprocess.run(
        [
            *("tpm2_makecredential", "-T", "none", "-u", str(pub)),
            *("-s", str(tmp_path / "secret"), "-n", name.hex(), "-o", str(out)),
        ],
        check=True,
        capture_output=True,
    )
    data = out.read_bytes()
    magic, version = struct.unpack(">II", data[:8])
    assert (magic, version) == (0xBADCC0DE, 1)
    (blob_size,) = struct.unpack(">H", data[8:10])
    blob = data[8 : 10 + blob_size]
    return MadeCredential(credential_blob=blob, encrypted_secret=data[10 + blob_size :])


@pytest.mark.parametrize("kind", ["rsa", "ecc"])
def test_our_challenge_activates_on_swtpm(host: EsapiHostTpm, kind: str) -> None:
    ek = check_ek_public(host.ek_public(kind))
    secret = secrets.token_bytes(32)
    made = make_credential(ek.protector, secret, host.aik_name(), random_bytes=secrets.token_bytes)
    got = host.activate_credential(made.credential_blob, made.encrypted_secret, kind)
    assert got == secret


@pytest.mark.parametrize("kind", ["rsa", "ecc"])
def test_challenge_for_another_name_fails_on_swtpm(host: EsapiHostTpm, kind: str) -> None:
    ek = check_ek_public(host.ek_public(kind))
    other = b"\x00\x0b" + secrets.token_bytes(32)
    made = make_credential(ek.protector, b"s" * 32, other, random_bytes=secrets.token_bytes)
    with pytest.raises(TSS2_Exception, match="integrity"):
        host.activate_credential(made.credential_blob, made.encrypted_secret, kind)


@pytest.mark.parametrize("kind", ["rsa", "ecc"])
def test_tpm2_tools_challenge_activates_on_swtpm(
    host: EsapiHostTpm, kind: str, tmp_path: Path
) -> None:
    """The oracle itself works against this TPM (so its agreement below means something)."""
    ek = check_ek_public(host.ek_public(kind))
    secret = secrets.token_bytes(32)
    made = _tools_makecredential(tmp_path, ek.public, secret, host.aik_name())
    ours = make_credential(ek.protector, secret, host.aik_name(), random_bytes=secrets.token_bytes)
    assert len(made.credential_blob) == len(ours.credential_blob)
    assert len(made.encrypted_secret) == len(ours.encrypted_secret)
    assert host.activate_credential(made.credential_blob, made.encrypted_secret, kind) == secret


@pytest.mark.parametrize("kind", ["rsa", "ecc"])
def test_tpm2_tools_and_ours_open_alike_on_a_software_ek(
    host: EsapiHostTpm, kind: str, tmp_path: Path
) -> None:
    """Same EK template as swtpm's, a software key: both outputs open the same way."""
    template = check_ek_public(host.ek_public(kind)).public
    private: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
    if kind == "rsa":
        private = rsa.generate_private_key(65537, 2048)
        unique: bytes | TpmsEccPoint = private.public_key().public_numbers().n.to_bytes(256, "big")
    else:
        private = ec.generate_private_key(ec.SECP384R1())
        nums = private.public_key().public_numbers()
        unique = TpmsEccPoint(nums.x.to_bytes(48, "big"), nums.y.to_bytes(48, "big"))
    software_ek = dataclasses.replace(template, unique=unique)
    checked = check_ek_public(software_ek.marshal())
    bits = checked.protector.symmetric_key_bits
    name = b"\x00\x0b" + secrets.token_bytes(32)
    secret = secrets.token_bytes(32)
    tools = _tools_makecredential(tmp_path, software_ek, secret, name)
    ours = make_credential(checked.protector, secret, name, random_bytes=secrets.token_bytes)
    for made in (tools, ours):
        assert activate_in_software(private, software_ek.name_alg, bits, name, made) == secret
