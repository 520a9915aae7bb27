"""What the source checks about a target before any key leaves (protocol step 1).

Pure: the target's :class:`~host_agent.migration.protocol.ExgKeyOffer`, the nonce this source
sent, the fleet CA and the fleet's approved host states in; a :class:`VerifiedExgKey` out, or a
:class:`~host_agent.migration.errors.TargetRefused` subclass naming what was expected and what
arrived. No TPM, no I/O: the same function would run on an air-gapped machine.
"""

from __future__ import annotations

import hmac
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import datetime

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from evidence.aik_cert import verify_aik_certificate
from evidence.errors import ChainError, ParseError, SignatureError, VtpmError
from evidence.tpm2 import (
    TpmAlgId,
    TpmaObject,
    TpmsAttest,
    TpmsCertifyInfo,
    TpmtPublic,
    TpmtSignature,
    object_name,
    public_key,
    verify_attest_signature,
)
from evidence.tpm2_policy import (
    HOST_PCRS,
    TPM_CC_SIGN,
    empty_digest,
    policy_command_code,
    policy_locality,
    policy_pcr,
    vaik_policy,
)

from .errors import (
    CertExgKeyInvalid,
    CertExgKeyNonce,
    ExgKeyAttributes,
    ExgKeyPolicy,
    TargetIdentityMismatch,
    TargetNotAdmitted,
    VaikRefused,
)
from .protocol import ExgKeyOffer

__all__ = [
    "EXGKEY_REQUIRED",
    "VerifiedExgKey",
    "check_vaik_public",
    "exgkey_policy_digest",
    "sign_policy_of_state",
    "verify_exgkey_offer",
]

#: Attributes an ExgKey must have: a non-migratable storage (restricted decrypt) key made inside
#: this TPM, which can therefore never hand an imported vAIK on.
EXGKEY_REQUIRED = (
    TpmaObject.FIXEDTPM
    | TpmaObject.FIXEDPARENT
    | TpmaObject.SENSITIVEDATAORIGIN
    | TpmaObject.RESTRICTED
    | TpmaObject.DECRYPT
)
#: Attributes an ExgKey must not have: a signer, a key usable by password alone.
EXGKEY_FORBIDDEN = TpmaObject.SIGN_ENCRYPT | TpmaObject.USERWITHAUTH


@dataclass(frozen=True)
class VerifiedExgKey:
    """A target's ExgKey the source may duplicate a vAIK to.

    Attributes:
        public: its marshalled TPMT_PUBLIC (what ``HostTpm.duplicate`` takes).
        name: its TPM Name.
        host_id: the admitted host it lives in (the AIK certificate's CN).
        pcr_digest: the approved host platform state its policy binds.
    """

    public: bytes
    name: bytes
    host_id: str
    pcr_digest: bytes


def exgkey_policy_digest(pcr_digest: bytes, locality: int | None) -> bytes:
    """An ExgKey's authPolicy: PolicyPCR(sha256:0-8 = pcr_digest) [+ PolicyLocality]."""
    d = policy_pcr(empty_digest(), HOST_PCRS, pcr_digest)
    return d if locality is None else policy_locality(d, locality)


def sign_policy_of_state(pcr_digest: bytes) -> bytes:
    """The vAIK sign policy the fleet approves for a host state (``vaik_sign_policy``)."""
    return policy_command_code(policy_pcr(empty_digest(), HOST_PCRS, pcr_digest), TPM_CC_SIGN)


def check_vaik_public(public: bytes, fleet_key_public: bytes | None, policy_ref: bytes) -> None:
    """The target's check of what arrives as a vAIK, before TPM2_Import.

    Checks: the TPMT_PUBLIC parses; restricted, sign, sensitiveDataOrigin; not fixedTPM, not
    fixedParent (a vAIK moves), no userWithAuth (only its policy authorizes it); its authPolicy
    is :func:`evidence.tpm2_policy.vaik_policy` of the fleet key and policyRef the blob names.

    Raises:
        VaikRefused: a check failed.
    """
    try:
        pub = TpmtPublic.unmarshal(public)
        fleet = None if fleet_key_public is None else TpmtPublic.unmarshal(fleet_key_public)
    except VtpmError as err:
        raise VaikRefused(f"the vAIK public area does not parse: {err}") from err
    attrs = TpmaObject(pub.object_attributes)
    need = TpmaObject.RESTRICTED | TpmaObject.SIGN_ENCRYPT | TpmaObject.SENSITIVEDATAORIGIN
    never = TpmaObject.FIXEDTPM | TpmaObject.FIXEDPARENT | TpmaObject.USERWITHAUTH
    if need & ~attrs or attrs & never:
        raise VaikRefused(
            f"not a vAIK: objectAttributes 0x{pub.object_attributes:08x} (expected {need!r}, "
            f"none of {never!r})"
        )
    if fleet is None:
        raise VaikRefused("the duplication blob names no fleet key for the vAIK policy")
    key = public_key(fleet)
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise VaikRefused("the vAIK's fleet key is not an ECC key")
    try:
        expected = vaik_policy(key, policy_ref)
    except ValueError as err:
        raise VaikRefused(f"the vAIK's fleet key or policyRef is unusable: {err}") from err
    if not hmac.compare_digest(pub.auth_policy, expected):
        raise VaikRefused(
            f"the vAIK's authPolicy {pub.auth_policy.hex()} is not the vAIK policy of its fleet "
            f"key and policyRef ({expected.hex()})"
        )


def _cn(cert: x509.Certificate) -> str:
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else ""


def verify_exgkey_offer(
    offer: ExgKeyOffer,
    *,
    nonce: bytes,
    peer_host_id: str,
    fleet_ca_certs: Sequence[x509.Certificate | bytes],
    approved_sign_policies: Collection[bytes],
    now: datetime,
) -> VerifiedExgKey:
    """Check CertExgKey and the ExgKey before anything leaves the source.

    The caller must already trust ``fleet_ca_certs`` (the host's stored fleet CA), the
    ``peer_host_id`` (the host id in the peer's mTLS certificate, checked by the channel) and
    ``approved_sign_policies`` (fleet approvals whose signatures it verified). Checks, in order:

    1. the AIK certificate chains to the fleet CA (``evidence.aik_cert.verify_aik_certificate``);
    2. it names the authenticated peer (CN = ``peer_host_id``);
    3. the ExgKey TPMT_PUBLIC parses;
    4. CertExgKey: a TPMS_ATTEST of type CERTIFY whose signature verifies under that AIK (a
       restricted key: only its TPM makes such a structure), certifying the ExgKey (Name =
       Name(ExgKey public)); qualifiedSigner is the AIK's *qualified* Name (its hierarchy's
       too), which the source cannot recompute and does not need;
    5. its extraData is ``nonce`` (else a replay of another migration's CertExgKey);
    6. the ExgKey's attributes: fixedTPM, fixedParent, sensitiveDataOrigin, restricted, decrypt,
       a symmetric (storage) algorithm; no sign, no userWithAuth;
    7. its authPolicy is PolicyPCR(sha256:0-8 = the offered digest) [+ PolicyLocality], and the
       fleet approved that host state (its vAIK sign policy is among ``approved_sign_policies``).

    Raises:
        TargetNotAdmitted, TargetIdentityMismatch, CertExgKeyInvalid, CertExgKeyNonce,
        ExgKeyAttributes, ExgKeyPolicy: the check that failed (all ``TargetRefused``).
    """
    # 1. chain
    try:
        aik = verify_aik_certificate(offer.aik_certificate, fleet_ca_certs, now)
    except (ChainError, ParseError) as err:
        raise TargetNotAdmitted(
            f"the target's AIK certificate does not chain to the fleet CA: {err}",
            "an AIK certificate issued by the fleet CA",
            getattr(err, "got", "") or type(err).__name__,
        ) from err
    except VtpmError as err:
        raise TargetNotAdmitted(f"the target's AIK certificate is refused: {err}") from err
    # 2. identity
    host = _cn(x509.load_der_x509_certificate(offer.aik_certificate))
    if host != peer_host_id:
        raise TargetIdentityMismatch(
            "the AIK certificate names another host than the mTLS peer",
            f"CN={peer_host_id}",
            f"CN={host}",
        )
    # 3. ExgKey public
    try:
        exg = TpmtPublic.unmarshal(offer.exgkey_public)
        exg_name = object_name(exg)
    except VtpmError as err:
        raise CertExgKeyInvalid(f"the ExgKey TPMT_PUBLIC does not parse: {err}") from err
    # 4. CertExgKey
    try:
        attest = TpmsAttest.unmarshal(offer.certify_attest)
        signature = TpmtSignature.unmarshal(offer.certify_signature)
    except VtpmError as err:
        raise CertExgKeyInvalid(f"CertExgKey does not parse: {err}") from err
    if not isinstance(attest.attested, TpmsCertifyInfo):
        raise CertExgKeyInvalid(
            "CertExgKey is not a certification", "TPM_ST_ATTEST_CERTIFY", "a quote"
        )
    try:
        verify_attest_signature(offer.certify_attest, signature, aik)
    except (SignatureError, ParseError) as err:
        raise CertExgKeyInvalid(f"CertExgKey is not signed by the target's AIK: {err}") from err
    if not hmac.compare_digest(attest.attested.name, exg_name):
        raise CertExgKeyInvalid(
            "CertExgKey certifies another object than the offered ExgKey",
            exg_name.hex(),
            attest.attested.name.hex(),
        )
    # 5. nonce
    if not hmac.compare_digest(attest.extra_data, nonce):
        raise CertExgKeyNonce(
            "CertExgKey was made over another nonce than this migration's (a replay?)",
            nonce.hex(),
            attest.extra_data.hex(),
        )
    # 6. attributes
    attrs = TpmaObject(exg.object_attributes)
    missing = EXGKEY_REQUIRED & ~attrs
    extra = EXGKEY_FORBIDDEN & attrs
    symmetric = getattr(exg.parameters, "symmetric", None)
    storage = symmetric is not None and symmetric.algorithm != TpmAlgId.TPM_ALG_NULL
    if missing or extra or not storage:
        raise ExgKeyAttributes(
            "the ExgKey is not a non-migratable restricted decrypt storage key",
            f"{EXGKEY_REQUIRED!r} without {EXGKEY_FORBIDDEN!r}, symmetric storage algorithm",
            f"objectAttributes 0x{exg.object_attributes:08x}"
            + (f", missing {missing!r}" if missing else "")
            + (f", has {extra!r}" if extra else "")
            + ("" if storage else ", symmetric NULL (not a storage key)"),
        )
    # 7. policy
    expected = exgkey_policy_digest(offer.pcr_digest, offer.locality)
    if not hmac.compare_digest(exg.auth_policy, expected):
        raise ExgKeyPolicy(
            "the ExgKey's authPolicy is not PolicyPCR(sha256:0-8) of the host state it claims",
            expected.hex(),
            exg.auth_policy.hex() or "(empty policy)",
        )
    if sign_policy_of_state(offer.pcr_digest) not in set(approved_sign_policies):
        raise ExgKeyPolicy(
            "the ExgKey is bound to a host platform state the fleet has not approved",
            "one of the fleet-approved PCR0-8 states",
            f"PCR0-8 digest {offer.pcr_digest.hex()}",
        )
    return VerifiedExgKey(offer.exgkey_public, exg_name, host, offer.pcr_digest)
