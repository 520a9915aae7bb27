"""Templates of the host TPM keys (ARCHITECTURE.md §2), in tpm2-pytss types (stays in this package).

* SRK: ECC P-256 storage (aes128cfb), persistent at 0x81000001; fixedTPM fixedParent
  sensitiveDataOrigin userWithAuth restricted decrypt noDA; no policy.
* AIK: ECC P-256 ECDSA-SHA256, fixedTPM fixedParent sdo userWithAuth restricted sign; no policy.
* AuthKey: ECC P-256 ECDSA-SHA256, fixedTPM fixedParent sdo restricted sign, *no* userWithAuth;
  authPolicy = PolicyPCR(sha256:0-8 approved) [+ PolicyLocality(0)].
* vAIK: ECC P-256 ECDSA-SHA256, sdo restricted sign, *not* fixedTPM/fixedParent, no
  userWithAuth; authPolicy = PolicyOR{PolicyAuthorize(fleet key, policyRef),
  PolicyCommandCode(TPM2_Duplicate)}.
* ExgKey: ECC P-256 storage (aes128cfb), fixedTPM fixedParent sdo restricted decrypt noDA, no
  userWithAuth; authPolicy like AuthKey.
* sealed data: keyedhash, fixedTPM fixedParent noDA; userWithAuth, or PolicyPCR when bound.

``adminWithPolicy`` is clear on every key, so the ADMIN role (the object of TPM2_Certify) uses the
(empty) authValue; the USER role (signing, loading children, unsealing) needs the policy wherever
``userWithAuth`` is clear. Signing schemes are fixed in the key, so a restricted key never signs
with a scheme the verifier does not expect.
"""

from __future__ import annotations

from tpm2_pytss.constants import TPM2_ALG, TPMA_OBJECT
from tpm2_pytss.types import TPM2B_PUBLIC

__all__ = [
    "SRK_HANDLE",
    "aik_template",
    "authkey_template",
    "exgkey_template",
    "sealed_template",
    "srk_template",
    "vaik_template",
]

#: Persistent handle of the SRK (TCG "Provisioning Guidance": 0x81000001 = storage primary).
SRK_HANDLE = 0x81000001

_A = TPMA_OBJECT
_SIGNER = _A.SENSITIVEDATAORIGIN | _A.RESTRICTED | _A.SIGN_ENCRYPT


def _ecc_signer(attributes: int, policy: bytes = b"") -> TPM2B_PUBLIC:
    t = TPM2B_PUBLIC.parse(
        "ecc256:ecdsa-sha256", objectAttributes=attributes, authPolicy=policy or None
    )
    # parse() gives restricted keys an aes128cfb symmetric → TPM_RC_SYMMETRIC for a signer.
    t.publicArea.parameters.eccDetail.symmetric.algorithm = TPM2_ALG.NULL
    return t


def _ecc_storage(attributes: int, policy: bytes = b"") -> TPM2B_PUBLIC:
    return TPM2B_PUBLIC.parse(
        "ecc256:aes128cfb", objectAttributes=attributes, authPolicy=policy or None
    )


def srk_template() -> TPM2B_PUBLIC:
    return _ecc_storage(
        _A.FIXEDTPM
        | _A.FIXEDPARENT
        | _A.SENSITIVEDATAORIGIN
        | _A.USERWITHAUTH
        | _A.RESTRICTED
        | _A.DECRYPT
        | _A.NODA
    )


def aik_template() -> TPM2B_PUBLIC:
    return _ecc_signer(_A.FIXEDTPM | _A.FIXEDPARENT | _A.USERWITHAUTH | _SIGNER)


def authkey_template(policy: bytes) -> TPM2B_PUBLIC:
    return _ecc_signer(_A.FIXEDTPM | _A.FIXEDPARENT | _SIGNER, policy)


def vaik_template(policy: bytes) -> TPM2B_PUBLIC:
    return _ecc_signer(_SIGNER, policy)


def exgkey_template(policy: bytes) -> TPM2B_PUBLIC:
    return _ecc_storage(
        _A.FIXEDTPM
        | _A.FIXEDPARENT
        | _A.SENSITIVEDATAORIGIN
        | _A.RESTRICTED
        | _A.DECRYPT
        | _A.NODA,
        policy,
    )


def sealed_template(policy: bytes | None) -> TPM2B_PUBLIC:
    attributes = _A.FIXEDTPM | _A.FIXEDPARENT | _A.NODA
    if not policy:
        attributes |= _A.USERWITHAUTH
    return TPM2B_PUBLIC.parse("keyedhash", objectAttributes=attributes, authPolicy=policy or None)
