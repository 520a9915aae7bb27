"""MakeCredential in pure Python (verifier/registrar/credential.py), without a TPM.

Independent checks here: KDFa against cryptography's SP 800-108 KBKDF, KDFe against its SP
800-56A ConcatKDF, and a software ActivateCredential written from TPM 2.0 Part 1 §24 (the
inverse, holding the EK private key) that opens what the maker produces. The same inverse opens
``tpm2_makecredential -T none`` output in tests/sim/test_registrar_credential.py, and real
TPM2_ActivateCredential on swtpm opens ours there too.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import struct

import pytest
from cryptography.hazmat.decrepit.ciphers.modes import CFB
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.concatkdf import ConcatKDFHash
from cryptography.hazmat.primitives.kdf.kbkdf import KBKDFHMAC, CounterLocation, Mode

from verifier.registrar.credential import (
    CredentialProtector,
    MadeCredential,
    kdfa,
    kdfe,
    make_credential,
)

SHA256, SHA384 = 0x000B, 0x000C
_HASHES = {SHA256: hashes.SHA256, SHA384: hashes.SHA384}
_NAMES = {SHA256: "sha256", SHA384: "sha384"}


class SoftwareActivationError(Exception):
    pass


def _take_tpm2b(data: bytes) -> tuple[bytes, bytes]:
    (size,) = struct.unpack(">H", data[:2])
    if len(data) < 2 + size:
        raise SoftwareActivationError("truncated TPM2B")
    return data[2 : 2 + size], data[2 + size :]


def activate_in_software(
    ek_private: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey,
    name_alg: int,
    symmetric_bits: int,
    object_name: bytes,
    made: MadeCredential,
) -> bytes:
    """TPM2_ActivateCredential done by hand (Part 1 §24.4-24.6, Part 3 §12.5), for tests."""
    digest_size = hashlib.new(_NAMES[name_alg]).digest_size
    secret, rest = _take_tpm2b(made.encrypted_secret)
    assert rest == b""
    if isinstance(ek_private, rsa.RSAPrivateKey):
        h = _HASHES[name_alg]
        seed = ek_private.decrypt(
            secret, padding.OAEP(mgf=padding.MGF1(h()), algorithm=h(), label=b"IDENTITY\x00")
        )
    else:
        x, rest = _take_tpm2b(secret)
        y, rest = _take_tpm2b(rest)
        assert rest == b""
        point = ec.EllipticCurvePublicNumbers(
            int.from_bytes(x, "big"), int.from_bytes(y, "big"), ek_private.curve
        ).public_key()
        z = ek_private.exchange(ec.ECDH(), point)
        coord = (ek_private.curve.key_size + 7) // 8
        ek_x = ek_private.public_key().public_numbers().x.to_bytes(coord, "big")
        seed = kdfe(name_alg, z, "IDENTITY", x, ek_x, digest_size * 8)
    blob, rest = _take_tpm2b(made.credential_blob)
    assert rest == b""
    outer_hmac, enc_identity = _take_tpm2b(blob)
    hmac_key = kdfa(name_alg, seed, "INTEGRITY", b"", b"", digest_size * 8)
    expected = hmac.new(hmac_key, enc_identity + object_name, _NAMES[name_alg]).digest()
    if not hmac.compare_digest(outer_hmac, expected):
        raise SoftwareActivationError("integrity HMAC mismatch (wrong Name or wrong EK)")
    sym_key = kdfa(name_alg, seed, "STORAGE", object_name, b"", symmetric_bits)
    dec = Cipher(algorithms.AES(sym_key), CFB(b"\x00" * 16)).decryptor()
    credential, rest = _take_tpm2b(dec.update(enc_identity) + dec.finalize())
    assert rest == b""
    return credential


def _name(alg: int = SHA256) -> bytes:
    return struct.pack(">H", alg) + secrets.token_bytes(hashlib.new(_NAMES[alg]).digest_size)


@pytest.mark.parametrize("name_alg", [SHA256, SHA384])
@pytest.mark.parametrize(("label", "ctx_u", "ctx_v"), [("STORAGE", b"\x00\x0b" + b"n" * 32, b"")])
@pytest.mark.parametrize("bits", [128, 256, 384, 512, 1024])
def test_kdfa_equals_sp800_108_counter_kdf(
    name_alg: int, label: str, ctx_u: bytes, ctx_v: bytes, bits: int
) -> None:
    key = secrets.token_bytes(32)
    oracle = KBKDFHMAC(
        algorithm=_HASHES[name_alg](),
        mode=Mode.CounterMode,
        length=bits // 8,
        rlen=4,
        llen=4,
        location=CounterLocation.BeforeFixed,
        label=label.encode(),
        context=ctx_u + ctx_v,
        fixed=None,
    ).derive(key)
    assert kdfa(name_alg, key, label, ctx_u, ctx_v, bits) == oracle


def test_kdfa_masks_partial_bytes() -> None:
    out = kdfa(SHA256, b"k" * 32, "X", b"", b"", 12)
    assert len(out) == 2 and out[0] < 16


@pytest.mark.parametrize("name_alg", [SHA256, SHA384])
@pytest.mark.parametrize("bits", [256, 384, 768])
def test_kdfe_equals_sp800_56a_concat_kdf(name_alg: int, bits: int) -> None:
    z = secrets.token_bytes(48)
    party_u, party_v = secrets.token_bytes(48), secrets.token_bytes(48)
    oracle = ConcatKDFHash(
        algorithm=_HASHES[name_alg](),
        length=bits // 8,
        otherinfo=b"IDENTITY\x00" + party_u + party_v,
    ).derive(z)
    assert kdfe(name_alg, z, "IDENTITY", party_u, party_v, bits) == oracle


_KEYS: list[tuple[str, int, int]] = [
    ("rsa2048", SHA256, 128),  # TCG low-range RSA EK (swtpm 0x81010001)
    ("p384", SHA384, 256),  # TCG high-range ECC P-384 EK (swtpm 0x81010016)
    ("p256", SHA256, 128),  # TCG low-range ECC P-256 EK
]


def _private(kind: str) -> rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey:
    if kind == "rsa2048":
        return rsa.generate_private_key(65537, 2048)
    return ec.generate_private_key(ec.SECP384R1() if kind == "p384" else ec.SECP256R1())


@pytest.mark.parametrize(("kind", "name_alg", "sym_bits"), _KEYS)
def test_software_activation_recovers_the_credential(
    kind: str, name_alg: int, sym_bits: int
) -> None:
    private = _private(kind)
    ek = CredentialProtector(name_alg, private.public_key(), sym_bits)
    name, credential = _name(), secrets.token_bytes(32)
    made = make_credential(ek, credential, name, random_bytes=secrets.token_bytes)
    assert activate_in_software(private, name_alg, sym_bits, name, made) == credential


@pytest.mark.parametrize(("kind", "name_alg", "sym_bits"), _KEYS)
def test_another_name_cannot_activate(kind: str, name_alg: int, sym_bits: int) -> None:
    private = _private(kind)
    ek = CredentialProtector(name_alg, private.public_key(), sym_bits)
    made = make_credential(ek, b"s" * 32, _name(), random_bytes=secrets.token_bytes)
    with pytest.raises(SoftwareActivationError, match="HMAC"):
        activate_in_software(private, name_alg, sym_bits, _name(), made)


def test_another_ek_cannot_activate() -> None:
    mine, other = _private("p384"), _private("p384")
    assert isinstance(mine, ec.EllipticCurvePrivateKey)
    ek = CredentialProtector(SHA384, mine.public_key(), 256)
    name = _name()
    made = make_credential(ek, b"s" * 32, name, random_bytes=secrets.token_bytes)
    with pytest.raises(SoftwareActivationError):
        activate_in_software(other, SHA384, 256, name, made)


def test_layout_of_ecc_p384_challenge() -> None:
    """Sizes match TPM2_MakeCredential's (and tpm2_makecredential's 196-byte file body)."""
    private = _private("p384")
    ek = CredentialProtector(SHA384, private.public_key(), 256)
    made = make_credential(ek, b"s" * 32, _name(), random_bytes=secrets.token_bytes)
    assert len(made.credential_blob) == 2 + (2 + 48) + (2 + 32)
    assert len(made.encrypted_secret) == 2 + (2 + 48) * 2


def test_same_randomness_gives_the_same_challenge() -> None:
    private = _private("p256")
    ek = CredentialProtector(SHA256, private.public_key(), 128)
    name = _name()

    def fixed(n: int) -> bytes:
        return bytes(range(n))

    first = make_credential(ek, b"c" * 16, name, random_bytes=fixed)
    assert make_credential(ek, b"c" * 16, name, random_bytes=fixed) == first


@pytest.mark.parametrize("credential", [b"", b"x" * 65])
def test_credential_size_is_checked(credential: bytes) -> None:
    ek = CredentialProtector(SHA256, _private("p256").public_key(), 128)
    with pytest.raises(ValueError, match="credential"):
        make_credential(ek, credential, _name(), random_bytes=secrets.token_bytes)


@pytest.mark.parametrize("name", [b"", b"\x00\x0b" + b"x" * 31, b"\x00\x99" + b"x" * 32])
def test_malformed_name_is_refused(name: bytes) -> None:
    ek = CredentialProtector(SHA256, _private("p256").public_key(), 128)
    with pytest.raises(ValueError, match="Name"):
        make_credential(ek, b"c", name, random_bytes=secrets.token_bytes)


def test_protector_refuses_unsupported_parameters() -> None:
    key = _private("p256").public_key()
    with pytest.raises(ValueError, match="nameAlg"):
        CredentialProtector(0x0010, key, 128)
    with pytest.raises(ValueError, match="AES"):
        CredentialProtector(SHA256, key, 64)
