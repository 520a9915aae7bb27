"""MakeCredential in pure Python: the registrar's half of credential activation.

The registrar proves that an attestation key (AIK) lives in the same TPM as an endorsement key (EK)
by encrypting a secret so that only that TPM can recover it, and only through
``TPM2_ActivateCredential`` naming that AIK. This module builds the challenge exactly as
``TPM2_MakeCredential`` would (TPM 2.0 Part 1 §24 "Credential Protection", Part 3 §12.6
TPM2_MakeCredential, Part 1 §11.4.10 KDFa/KDFe), without a TPM:

1. ``seed``: ``nameAlg``-digest-sized random bytes, protected by the EK:

   - RSA EK: ``RSAES-OAEP(seed)``, hash and MGF1 hash = the EK's ``nameAlg``,
     label ``"IDENTITY\\0"``.
   - ECC EK: an ephemeral key pair on the EK's curve; ``Z = x(ephemeral_private · EK_public)``;
     ``seed = KDFe(nameAlg, Z, "IDENTITY", x(ephemeral), x(EK), digest bits)``; the encrypted
     secret is the ephemeral public point (``TPMS_ECC_POINT``).

2. ``symKey = KDFa(nameAlg, seed, "STORAGE", Name(AIK), "", EK symmetric key bits)``;
   ``encIdentity = AES-CFB(symKey, IV = 0, TPM2B_DIGEST(credential))``.
3. ``HMACkey = KDFa(nameAlg, seed, "INTEGRITY", "", "", digest bits)``;
   ``outerHMAC = HMAC(nameAlg, HMACkey, encIdentity ‖ Name(AIK))``.
4. ``credentialBlob = TPM2B_ID_OBJECT(TPM2B_DIGEST(outerHMAC) ‖ encIdentity)``,
   ``secret = TPM2B_ENCRYPTED_SECRET(...)``.

The EK's symmetric definition sets the AES key size (AES-128 for the RSA-2048 EK template, AES-256
for the ECC P-384 EK that swtpm_setup creates); the EK's ``nameAlg`` sets every hash.

Randomness is a parameter (``random_bytes``) so that the construction can be replayed in tests; the
caller supplies :func:`secrets.token_bytes`. No I/O, no clock, no TPM library.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from collections.abc import Callable
from dataclasses import dataclass

from cryptography.hazmat.decrepit.ciphers.modes import CFB
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from evidence._algorithms import HASH_ALGS

__all__ = [
    "MAX_CREDENTIAL_SIZE",
    "CredentialProtector",
    "MadeCredential",
    "kdfa",
    "kdfe",
    "make_credential",
]

MAX_CREDENTIAL_SIZE = 64
"""Largest credential a TPM accepts (``sizeof(TPMU_HA)`` with SHA-512)."""

_CURVE_BY_NAME: dict[str, int] = {"secp256r1": 32, "secp384r1": 48, "secp521r1": 66}
_CRYPTOGRAPHY_HASH: dict[str, Callable[[], hashes.HashAlgorithm]] = {
    "sha1": hashes.SHA1,
    "sha256": hashes.SHA256,
    "sha384": hashes.SHA384,
    "sha512": hashes.SHA512,
}


@dataclass(frozen=True)
class CredentialProtector:
    """What MakeCredential needs from the EK's ``TPMT_PUBLIC``.

    Attributes:
        name_alg: the EK's ``nameAlg`` (TPM_ALG_ID, e.g. ``0x000B`` for SHA-256).
        public_key: the EK's public key.
        symmetric_key_bits: key size of the EK's ``parameters.symmetric`` (must be AES in CFB mode,
            which the caller checks when it decodes the EK).
    """

    name_alg: int
    public_key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey
    symmetric_key_bits: int

    def __post_init__(self) -> None:
        alg = HASH_ALGS.get(self.name_alg)
        if alg is None or alg.name not in _CRYPTOGRAPHY_HASH:
            raise ValueError(f"unsupported EK nameAlg 0x{self.name_alg:04x}")
        if self.symmetric_key_bits not in (128, 192, 256):
            raise ValueError(f"unsupported AES key size {self.symmetric_key_bits}")
        if isinstance(self.public_key, ec.EllipticCurvePublicKey):
            if self.public_key.curve.name not in _CURVE_BY_NAME:
                raise ValueError(f"unsupported EK curve {self.public_key.curve.name}")
        elif not isinstance(self.public_key, rsa.RSAPublicKey):
            raise TypeError(f"EK key must be RSA or ECC, got {type(self.public_key).__name__}")


@dataclass(frozen=True)
class MadeCredential:
    """The output of MakeCredential, each field a marshalled TPM2B (2-byte big-endian size first).

    Attributes:
        credential_blob: ``TPM2B_ID_OBJECT``.
        encrypted_secret: ``TPM2B_ENCRYPTED_SECRET``.
    """

    credential_blob: bytes
    encrypted_secret: bytes


def _tpm2b(data: bytes) -> bytes:
    return struct.pack(">H", len(data)) + data


def _hash_name(name_alg: int) -> str:
    return HASH_ALGS[name_alg].hashlib_name


def kdfa(
    name_alg: int, key: bytes, label: str, context_u: bytes, context_v: bytes, bits: int
) -> bytes:
    """KDFa: SP 800-108 counter-mode HMAC KDF as TPM 2.0 Part 1 §11.4.10.2 specifies it.

    Each block is ``HMAC(key, counter ‖ label ‖ 0x00 ‖ contextU ‖ contextV ‖ bits)`` with 32-bit
    big-endian counter (from 1) and bits; the output is cut to ``bits`` (high bits of the first
    byte cleared when ``bits`` is not a multiple of 8).
    """
    if bits <= 0:
        raise ValueError("KDFa needs a positive number of bits")
    hname = _hash_name(name_alg)
    out = bytearray()
    counter = 0
    tail = label.encode("ascii") + b"\x00" + context_u + context_v + struct.pack(">I", bits)
    while len(out) * 8 < bits:
        counter += 1
        out += hmac.new(key, struct.pack(">I", counter) + tail, hname).digest()
    size = (bits + 7) // 8
    result = bytearray(out[:size])
    if bits % 8:
        result[0] &= (1 << (bits % 8)) - 1
    return bytes(result)


def kdfe(name_alg: int, z: bytes, label: str, party_u: bytes, party_v: bytes, bits: int) -> bytes:
    """KDFe: SP 800-56A concatenation KDF as TPM 2.0 Part 1 §11.4.10.3 specifies it.

    Each block is ``H(counter ‖ Z ‖ label ‖ 0x00 ‖ partyUInfo ‖ partyVInfo)`` with a 32-bit
    big-endian counter from 1; the output is cut to ``bits``.
    """
    if bits <= 0:
        raise ValueError("KDFe needs a positive number of bits")
    hname = _hash_name(name_alg)
    out = bytearray()
    counter = 0
    tail = z + label.encode("ascii") + b"\x00" + party_u + party_v
    while len(out) * 8 < bits:
        counter += 1
        out += hashlib.new(hname, struct.pack(">I", counter) + tail).digest()
    size = (bits + 7) // 8
    result = bytearray(out[:size])
    if bits % 8:
        result[0] &= (1 << (bits % 8)) - 1
    return bytes(result)


def _check_name(name: bytes) -> None:
    if len(name) < 2:
        raise ValueError("object Name must start with a 2-byte hash algorithm id")
    alg = HASH_ALGS.get(struct.unpack(">H", name[:2])[0])
    if alg is None or len(name) != 2 + alg.digest_size:
        raise ValueError(f"not a TPM object Name (nameAlg ‖ digest): {name.hex()}")


def _protect_seed_rsa(
    ek: CredentialProtector, key: rsa.RSAPublicKey, random_bytes: Callable[[int], bytes]
) -> tuple[bytes, bytes]:
    size = HASH_ALGS[ek.name_alg].digest_size
    seed = random_bytes(size)
    if len(seed) != size:
        raise ValueError("random_bytes returned the wrong number of bytes")
    halg = _CRYPTOGRAPHY_HASH[HASH_ALGS[ek.name_alg].name]
    encrypted = key.encrypt(
        seed,
        padding.OAEP(mgf=padding.MGF1(algorithm=halg()), algorithm=halg(), label=b"IDENTITY\x00"),
    )
    return seed, _tpm2b(encrypted)


def _protect_seed_ecc(
    ek: CredentialProtector,
    key: ec.EllipticCurvePublicKey,
    random_bytes: Callable[[int], bytes],
) -> tuple[bytes, bytes]:
    curve = key.curve
    coord = _CURVE_BY_NAME[curve.name]
    order = _CURVE_ORDERS[curve.name]
    # Reduce 64 extra bits modulo (n - 1): bias below 2^-64, never zero (FIPS 186-5 A.2.1).
    scalar = int.from_bytes(random_bytes(coord + 8), "big") % (order - 1) + 1
    ephemeral = ec.derive_private_key(scalar, curve)
    z = ephemeral.exchange(ec.ECDH(), key)
    eph = ephemeral.public_key().public_numbers()
    ek_x = key.public_numbers().x.to_bytes(coord, "big")
    eph_x = eph.x.to_bytes(coord, "big")
    eph_y = eph.y.to_bytes(coord, "big")
    digest_bits = HASH_ALGS[ek.name_alg].digest_size * 8
    seed = kdfe(ek.name_alg, z, "IDENTITY", eph_x, ek_x, digest_bits)
    point = _tpm2b(eph_x) + _tpm2b(eph_y)  # TPMS_ECC_POINT
    return seed, _tpm2b(point)


_CURVE_ORDERS: dict[str, int] = {
    "secp256r1": 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551,
    "secp384r1": int(
        "FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFC7634D81F4372DDF581A0DB248B0A77AECEC196ACCC52973",
        16,
    ),
    "secp521r1": int(
        "01FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFA"
        "51868783BF2F966B7FCC0148F709A5D03BB5C9B8899C47AEBB6FB71E91386409",
        16,
    ),
}


def make_credential(
    ek: CredentialProtector,
    credential: bytes,
    object_name: bytes,
    *,
    random_bytes: Callable[[int], bytes],
) -> MadeCredential:
    """Encrypt ``credential`` for the TPM holding ``ek``, releasable only to ``object_name``.

    Args:
        ek: the endorsement key that protects the seed.
        credential: the secret (1 to 64 bytes) the TPM will return from ActivateCredential.
        object_name: the TPM Name (``nameAlg ‖ H(TPMT_PUBLIC)``) of the key that must be loaded
            in the same TPM for ActivateCredential to succeed (the AIK).
        random_bytes: a source of random bytes, e.g. :func:`secrets.token_bytes`.

    Returns:
        the ``TPM2B_ID_OBJECT`` and ``TPM2B_ENCRYPTED_SECRET`` to pass to TPM2_ActivateCredential.

    Raises:
        ValueError: an empty or oversized credential, or a malformed Name.
    """
    if not isinstance(credential, bytes) or not 1 <= len(credential) <= MAX_CREDENTIAL_SIZE:
        raise ValueError(f"credential must be 1 to {MAX_CREDENTIAL_SIZE} bytes")
    _check_name(object_name)
    key = ek.public_key
    if isinstance(key, rsa.RSAPublicKey):
        seed, encrypted_secret = _protect_seed_rsa(ek, key, random_bytes)
    else:
        seed, encrypted_secret = _protect_seed_ecc(ek, key, random_bytes)
    sym_key = kdfa(ek.name_alg, seed, "STORAGE", object_name, b"", ek.symmetric_key_bits)
    encryptor = Cipher(algorithms.AES(sym_key), CFB(b"\x00" * 16)).encryptor()
    enc_identity = encryptor.update(_tpm2b(credential)) + encryptor.finalize()
    digest_size = HASH_ALGS[ek.name_alg].digest_size
    hmac_key = kdfa(ek.name_alg, seed, "INTEGRITY", b"", b"", digest_size * 8)
    outer_hmac = hmac.new(hmac_key, enc_identity + object_name, _hash_name(ek.name_alg)).digest()
    blob = _tpm2b(_tpm2b(outer_hmac) + enc_identity)
    return MadeCredential(credential_blob=blob, encrypted_secret=encrypted_secret)
