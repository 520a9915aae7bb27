"""Endorsement keys per the TCG EK Credential Profile (2.5): certificate indices, templates, policy.

The EK certificate in NV certifies the key the TPM derives from the standard template, so the EK
is re-created with ``TPM2_CreatePrimary`` from that template (tpm2-pytss ``create_ek_template``,
which also applies a template/nonce stored in NV). swtpm_setup provisions an RSA-2048 EK (low
range L-1, certificate at 0x01C00002) and an ECC NIST P-384 EK (high range H-3, 0x01C00016).

EK authorization (Profile §B.6): low-range EKs have authPolicy PolicyA = PolicySecret(TPM_RH_
ENDORSEMENT) in SHA-256; high-range EKs have PolicyOR{PolicyA, PolicyC} in their nameAlg, with
PolicyC = PolicyAuthorizeNV(0x01C07F01). A unit test checks the tables below against the
templates' authPolicy values.
"""

from __future__ import annotations

import hashlib

from tpm2_pytss import ESAPI
from tpm2_pytss.constants import ESYS_TR
from tpm2_pytss.types import TPM2B_DIGEST, TPML_DIGEST, TPMT_PUBLIC

__all__ = [
    "EK_CERT_INDICES",
    "EK_POLICY_A",
    "EK_POLICY_C",
    "apply_ek_policy",
    "der_length",
    "ek_hash_name",
    "ek_template_name",
]

#: NV indices of EK certificates: low range L-1/L-2, high range H-1..H-7.
EK_CERT_INDICES: tuple[int, ...] = (
    0x01C00002,
    0x01C0000A,
    0x01C00012,
    0x01C00014,
    0x01C00016,
    0x01C00018,
    0x01C0001A,
    0x01C0001C,
    0x01C0001E,
)
# certificate index → tpm2-pytss template name; preference order per kind.
_TEMPLATES: dict[int, str] = {
    0x01C00002: "EK-RSA2048",
    0x01C0000A: "EK-ECC256",
    0x01C00012: "EK-HIGH-RSA2048",
    0x01C00014: "EK-HIGH-ECC256",
    0x01C00016: "EK-HIGH-ECC384",
    0x01C00018: "EK-HIGH-ECC521",
    0x01C0001C: "EK-HIGH-RSA3072",
    0x01C0001E: "EK-HIGH-RSA4096",
}
_BY_KIND: dict[str, tuple[int, ...]] = {
    "rsa": (0x01C00002, 0x01C00012, 0x01C0001C, 0x01C0001E),
    "ecc": (0x01C0000A, 0x01C00014, 0x01C00016, 0x01C00018),
}
_DEFAULT = {"rsa": "EK-RSA2048", "ecc": "EK-ECC256"}
_HASH_NAMES = {0x000B: "sha256", 0x000C: "sha384", 0x000D: "sha512"}


def _policy_a(alg: str) -> bytes:
    size = hashlib.new(alg).digest_size
    first = hashlib.new(alg, bytes(size) + bytes.fromhex("00000151") + bytes.fromhex("4000000b"))
    return hashlib.new(alg, first.digest()).digest()


#: PolicyA = PolicySecret(TPM_RH_ENDORSEMENT), per hash.
EK_POLICY_A: dict[str, bytes] = {alg: _policy_a(alg) for alg in ("sha256", "sha384", "sha512")}
#: PolicyC = PolicyAuthorizeNV(0x01C07F01) (Profile 2.5, Table B.6), per hash.
EK_POLICY_C: dict[str, bytes] = {
    "sha256": bytes.fromhex("3767e2edd43ff45a3a7e1eaefcef78643dca964632e7aad82c673a30d8633fde"),
    "sha384": bytes.fromhex(
        "d6032ce61f2fb3c240eb3cf6a33237ef2b6a16f4293c22b455e261cffd217ad5"
        "b4947c2d73e63005eed2dc2b3593d165"
    ),
    "sha512": bytes.fromhex(
        "589ee1e146544716e8deafe6db247b01b81e9f9c7dd16b814aa159138749105f"
        "ba5388dd1dea702f35240c184933121e2c61b8f50d3ef91393a49a38c3f73fc8"
    ),
}


def ek_template_name(kind: str, present: set[int]) -> str:
    """The tpm2-pytss EK template matching the first EK certificate of ``kind`` present in NV.

    Raises:
        ValueError: ``kind`` is not ``"rsa"`` or ``"ecc"``.
    """
    if kind not in _BY_KIND:
        raise ValueError(f"ek kind must be 'rsa' or 'ecc', got {kind!r}")
    return next((_TEMPLATES[i] for i in _BY_KIND[kind] if i in present), _DEFAULT[kind])


def ek_hash_name(public: TPMT_PUBLIC) -> str:
    """The EK's nameAlg as a hashlib name (the policy session's hash)."""
    alg = int(public.nameAlg)
    if alg not in _HASH_NAMES:
        raise ValueError(f"EK nameAlg 0x{alg:04x} is not supported")
    return _HASH_NAMES[alg]


def apply_ek_policy(esys: ESAPI, session: ESYS_TR, public: TPMT_PUBLIC) -> None:
    """Satisfy the EK's authPolicy in ``session`` (a policy session in the EK's nameAlg)."""
    esys.policy_secret(ESYS_TR.ENDORSEMENT, session)
    if bytes(public.authPolicy) != EK_POLICY_A["sha256"]:
        alg = ek_hash_name(public)
        branches = TPML_DIGEST([TPM2B_DIGEST(EK_POLICY_A[alg]), TPM2B_DIGEST(EK_POLICY_C[alg])])
        esys.policy_or(session, branches)


def der_length(data: bytes) -> int:
    """Length of the DER SEQUENCE at the start of ``data`` (NV areas may be padded)."""
    if len(data) < 2 or data[0] != 0x30:
        return len(data)
    first = data[1]
    if first < 0x80:
        return min(len(data), 2 + first)
    n = first & 0x7F
    if n == 0 or n > 4 or len(data) < 2 + n:
        return len(data)
    return min(len(data), 2 + n + int.from_bytes(data[2 : 2 + n], "big"))
