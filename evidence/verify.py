"""Verify an evidence bundle: fleet CA → AIK → AuthKey → vAIK → signed vPCRs → measurement lists.

:func:`verify_bundle` is the only code that builds an :class:`AttestedVm`; it returns one or
raises, never returns ``False``. Everything it needs to trust comes in :class:`VerifyOptions`
(no clock, no randomness, no I/O: the caller supplies ``now`` and the nonce it sent).

Errors (each a subclass of the :mod:`evidence.errors` tree with its own stable ``id``, listed in
``docs/findings.md``; :func:`evidence.verdict.finding_from_error` turns any into a finding).
Check 1, the AIK certificate, is :func:`evidence.aik_cert.verify_aik_certificate`, shared with
the registrar and the host; its errors are re-exported here::

    VerificationError
    ├── CertUserMismatch                verify.cert_user
    ├── VmUuidMismatch                  verify.vm_uuid
    ├── EventLogMissing                 verify.eventlog.missing
    ├── ImaListMissing                  verify.ima.missing
    ├── NonceMismatch                   verify.nonce            (errors.py)
    │   └── QualifyingDataMismatch      verify.nonce.qualifying_data
    ├── HashAlgorithmNotAllowed         verify.hash_not_allowed (errors.py)
    ├── ChainError                      verify.chain            (errors.py)
    │   ├── AikNotFleetIssued           verify.chain.aik_issuer        (aik_cert.py)
    │   ├── CertificateNotValidNow      verify.chain.validity          (aik_cert.py)
    │   ├── CaConstraintViolation       verify.chain.ca_constraints    (aik_cert.py)
    │   ├── AikCertificateMismatch      verify.chain.aik_certificate   (aik_cert.py)
    │   ├── CertifyTypeMismatch         verify.chain.certify_type
    │   ├── CertifiedNameMismatch       verify.chain.certified_name
    │   ├── KeyAttributesMismatch       verify.chain.key_attributes
    │   ├── AuthKeyPolicyNotApproved    verify.chain.authkey_policy
    │   ├── VaikPolicyMismatch          verify.chain.vaik_policy
    │   └── VaikNotEnrolled             verify.chain.vaik_not_enrolled
    ├── SignatureError                  verify.signature        (errors.py)
    │   ├── CertAuthKeySignatureInvalid verify.signature.cert_authkey
    │   ├── CertVaikSignatureInvalid    verify.signature.cert_vaik
    │   └── AttestationSignatureInvalid verify.signature.attestation
    └── ReplayError                     verify.replay           (errors.py)
        ├── EventLogReplayMismatch      verify.replay.eventlog
        └── ImaReplayMismatch           verify.replay.ima
"""

from __future__ import annotations

import hashlib
import hmac
import uuid
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import ClassVar, Final, TypeVar

from cryptography import x509

from evidence import tpm2_policy
from evidence.aik_cert import (
    TCG_KP_AIK_CERTIFICATE,
    TPM_OBJECT_NAME_OID,
    TPM_PUBLIC_OID,
    AikCertificateMismatch,
    AikNotFleetIssued,
    CaConstraintViolation,
    CertificateNotValidNow,
    verify_aik_certificate,
)
from evidence.bundle import RawBundle, RawCertification
from evidence.errors import (
    ChainError,
    HashAlgorithmNotAllowed,
    NonceMismatch,
    ReplayError,
    SignatureError,
    VerificationError,
)
from evidence.eventlog import VerifiedEventLog, replay_eventlog, replay_pcrs
from evidence.ima import BANKS as IMA_BANKS
from evidence.ima import IMA_PCR, KernelRule, VerifiedImaList, replay_ima, signed_prefix
from evidence.tpm2 import (
    TpmAlgId,
    TpmaObject,
    TpmsCertifyInfo,
    TpmSt,
    TpmtPublic,
    object_name,
    verify_attest_signature,
    verify_signature,
)

__all__ = [
    "TCG_KP_AIK_CERTIFICATE",
    "TPM_OBJECT_NAME_OID",
    "TPM_PUBLIC_OID",
    "VAIK_POLICY_REF",
    "AikCertificateMismatch",
    "AikNotFleetIssued",
    "AttestationSignatureInvalid",
    "AttestedVm",
    "AuthKeyPolicyNotApproved",
    "CaConstraintViolation",
    "CertAuthKeySignatureInvalid",
    "CertUserMismatch",
    "CertVaikSignatureInvalid",
    "CertificateNotValidNow",
    "CertifiedNameMismatch",
    "CertifyTypeMismatch",
    "EventLogMissing",
    "EventLogReplayMismatch",
    "HostIdentity",
    "ImaListMissing",
    "ImaReplayMismatch",
    "KeyAttributesMismatch",
    "QualifyingDataMismatch",
    "VaikNotEnrolled",
    "VaikPolicyMismatch",
    "VerifyOptions",
    "VmUuidMismatch",
    "authkey_policy_digests",
    "expected_vaik_policy",
    "qualifying_data",
    "verify_bundle",
]

VAIK_POLICY_REF: Final = b"vtpm-trust/vaik-sign/1"
"""The policyRef host agents bind into a vAIK's PolicyAuthorize branch by default."""

_SHA1: Final = TpmAlgId.TPM_ALG_SHA1
_A = TpmaObject


# --------------------------------------------------------------------------------------------
# Errors


class _Detailed:
    """Mixin: what the check wanted and what the evidence held, for findings."""

    expected: str | None = None
    got: str | None = None


_E = TypeVar("_E", bound=VerificationError)


def _detail(err: _E, expected: str | None, got: str | None) -> _E:
    if isinstance(err, _Detailed):
        err.expected, err.got = expected, got
    return err


class CertUserMismatch(_Detailed, VerificationError):
    """The evidence names (or was certified for) another tenant certificate than ours."""

    id: ClassVar[str] = "verify.cert_user"


class VmUuidMismatch(_Detailed, VerificationError):
    """The evidence is about another VM (e.g. a clone, which has another UUID)."""

    id: ClassVar[str] = "verify.vm_uuid"


class EventLogMissing(VerificationError):
    """The bundle carries no firmware event log and the options require one."""

    id: ClassVar[str] = "verify.eventlog.missing"


class ImaListMissing(VerificationError):
    """The bundle carries no IMA list and the options require one."""

    id: ClassVar[str] = "verify.ima.missing"


class QualifyingDataMismatch(_Detailed, NonceMismatch):
    """A certification's qualifying data is not SHA-256(cert_user ‖ nonce) of this request."""

    id: ClassVar[str] = "verify.nonce.qualifying_data"


class CertifyTypeMismatch(_Detailed, ChainError):
    """A certification is not a TPM_ST_ATTEST_CERTIFY attestation."""

    id: ClassVar[str] = "verify.chain.certify_type"


class CertifiedNameMismatch(_Detailed, ChainError):
    """A certification certifies another object than the key the bundle presents."""

    id: ClassVar[str] = "verify.chain.certified_name"


class KeyAttributesMismatch(_Detailed, ChainError):
    """A key's TPMA_OBJECT attributes are not those its role requires."""

    id: ClassVar[str] = "verify.chain.key_attributes"


class AuthKeyPolicyNotApproved(_Detailed, ChainError):
    """AuthKey's authPolicy is none of the approved host platform policies."""

    id: ClassVar[str] = "verify.chain.authkey_policy"


class VaikPolicyMismatch(_Detailed, ChainError):
    """The vAIK's authPolicy is not PolicyOR{PolicyAuthorize(fleet key), CommandCode(Duplicate)}."""

    id: ClassVar[str] = "verify.chain.vaik_policy"


class VaikNotEnrolled(_Detailed, ChainError):
    """The vAIK is not the one enrolled for this VM (a clone, or a replaced key)."""

    id: ClassVar[str] = "verify.chain.vaik_not_enrolled"


class CertAuthKeySignatureInvalid(SignatureError):
    """CertAuthKey is not signed by the AIK of the AIK certificate."""

    id: ClassVar[str] = "verify.signature.cert_authkey"


class CertVaikSignatureInvalid(SignatureError):
    """CertvAIK is not signed by the bundle's AuthKey (e.g. another host's AuthKey signed it)."""

    id: ClassVar[str] = "verify.signature.cert_vaik"


class AttestationSignatureInvalid(SignatureError):
    """The vPCR message is not signed by the certified vAIK."""

    id: ClassVar[str] = "verify.signature.attestation"


class EventLogReplayMismatch(ReplayError):
    """The firmware event log does not replay to the signed vPCRs (e.g. a log of another boot)."""

    id: ClassVar[str] = "verify.replay.eventlog"


class ImaReplayMismatch(ReplayError):
    """The IMA list does not replay to the signed vPCR 10 (e.g. an edited entry)."""

    id: ClassVar[str] = "verify.replay.ima"


# --------------------------------------------------------------------------------------------
# Options and results


def _certificate(value: x509.Certificate | bytes, what: str) -> x509.Certificate:
    if isinstance(value, x509.Certificate):
        return value
    if isinstance(value, bytes | bytearray):
        try:
            return x509.load_der_x509_certificate(bytes(value))
        except (ValueError, x509.InvalidVersion) as err:
            raise ValueError(f"{what} is not a DER X.509 certificate: {err}") from err
    raise TypeError(f"{what} must be an x509.Certificate or DER bytes, got {type(value).__name__}")


def authkey_policy_digests(pcr_composite: bytes) -> frozenset[bytes]:
    """The AuthKey authPolicy digests an approved host platform state allows.

    A host agent binds AuthKey to ``PolicyPCR(sha256:0-8 = the state)``, followed by
    ``PolicyLocality(0)`` where its TPM path allows it (host_agent/tpm/adapter.py); both forms
    are returned.

    Args:
        pcr_composite: :func:`evidence.tpm2_policy.pcr_composite_digest` of the approved host
            PCR 0-8 values (sha256 bank).
    """
    pcr = tpm2_policy.policy_pcr(tpm2_policy.empty_digest(), range(9), pcr_composite)
    return frozenset({pcr, tpm2_policy.policy_locality(pcr, 0)})


def expected_vaik_policy(fleet_key_name: bytes, policy_ref: bytes = VAIK_POLICY_REF) -> bytes:
    """``PolicyOR{PolicyAuthorize(fleet key Name, policyRef), PolicyCommandCode(TPM2_Duplicate)}``.

    The authPolicy every vAIK has (ARCHITECTURE.md §2): signing needs a fleet approval,
    duplication goes only through TPM2_Duplicate.
    """
    zero = tpm2_policy.empty_digest()
    branches = [
        tpm2_policy.policy_authorize(zero, fleet_key_name, policy_ref),
        tpm2_policy.policy_command_code(zero, tpm2_policy.TPM_CC_DUPLICATE),
    ]
    return tpm2_policy.policy_or(zero, branches)


def qualifying_data(cert_user: bytes, nonce: bytes) -> bytes:
    """``SHA-256(cert_user ‖ nonce)``: the qualifyingData of CertAuthKey and CertvAIK."""
    return hashlib.sha256(cert_user + nonce).digest()


@dataclass(frozen=True)
class VerifyOptions:
    """What the verifier trusts and expects; secure by default (``allow_*`` weakens a check).

    Attributes:
        nonce: the fresh nonce this verifier sent (16..64 bytes).
        now: the time certificates must be valid at (timezone-aware).
        fleet_ca_certs: the fleet CA certificates (``x509.Certificate`` or DER); kept as a
            tuple of ``x509.Certificate``.
        cert_user: the tenant's own certificate, DER (what it enrolled with).
        vm_uuid: the VM the tenant rents.
        authkey_policies: approved AuthKey authPolicy digests (see
            :func:`authkey_policy_digests` to derive them from approved host PCR states).
        fleet_policy_key_name: TPM Name of the fleet policy key
            (:func:`evidence.tpm2_policy.fleet_key_name`), bound into every vAIK's policy.
        vaik_policy_ref: the policyRef of the vAIK's PolicyAuthorize branch.
        vaik_public: the enrolled vAIK's TPMT_PUBLIC (marshalled); ``None`` only at the first
            attestation after enrolment, when there is nothing to compare with yet.
        ima_kernel_rule: how the guest kernel extended PCR 10 (``"5.8"`` for Linux >= 5.8).
        eventlog_pcrs: PCRs the firmware log must account for whenever they are signed, even if
            the log never extends them (then they must hold their reset value); every other
            signed PCR the log extends is checked too. PCR 10 belongs to IMA.
        allow_sha1: accept a vPCR bank, or an IMA binding, that rests on SHA-1.
        allow_missing_eventlog: accept a bundle without a firmware event log.
        allow_missing_ima: accept a bundle without an IMA list.
    """

    nonce: bytes
    now: datetime
    fleet_ca_certs: Sequence[x509.Certificate | bytes]
    cert_user: bytes
    vm_uuid: uuid.UUID
    authkey_policies: Collection[bytes]
    fleet_policy_key_name: bytes
    vaik_policy_ref: bytes = VAIK_POLICY_REF
    vaik_public: bytes | None = None
    ima_kernel_rule: KernelRule | str = KernelRule.V5_8
    eventlog_pcrs: Collection[int] = field(default_factory=lambda: frozenset(range(8)))
    allow_sha1: bool = False
    allow_missing_eventlog: bool = False
    allow_missing_ima: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.nonce, bytes) or not 16 <= len(self.nonce) <= 64:
            raise ValueError("nonce must be 16..64 fresh random bytes (secrets.token_bytes(32))")
        if not isinstance(self.now, datetime) or self.now.tzinfo is None:
            raise ValueError("now must be a timezone-aware datetime (datetime.now(UTC))")
        cas = tuple(
            _certificate(c, f"fleet_ca_certs[{i}]") for i, c in enumerate(self.fleet_ca_certs)
        )
        if not cas:
            raise ValueError("fleet_ca_certs must hold at least one fleet CA certificate")
        object.__setattr__(self, "fleet_ca_certs", cas)
        if not isinstance(self.cert_user, bytes):
            raise TypeError("cert_user must be the DER bytes of the tenant certificate")
        _certificate(self.cert_user, "cert_user")
        if not isinstance(self.vm_uuid, uuid.UUID):
            raise TypeError("vm_uuid must be a uuid.UUID")
        policies = frozenset(self.authkey_policies)
        if not policies or any(
            not isinstance(p, bytes) or len(p) != tpm2_policy.DIGEST_SIZE for p in policies
        ):
            raise ValueError("authkey_policies must hold at least one 32-byte policy digest")
        object.__setattr__(self, "authkey_policies", policies)
        name = self.fleet_policy_key_name
        if not isinstance(name, bytes) or len(name) != 34 or name[:2] != b"\x00\x0b":
            raise ValueError("fleet_policy_key_name must be a SHA-256 TPM Name (34 bytes)")
        if not isinstance(self.vaik_policy_ref, bytes) or len(self.vaik_policy_ref) > 32:
            raise ValueError("vaik_policy_ref must be bytes of at most 32")
        if self.vaik_public is not None:
            TpmtPublic.unmarshal(self.vaik_public)  # misuse shows now, not mid-verification
        object.__setattr__(self, "ima_kernel_rule", KernelRule(self.ima_kernel_rule))
        pcrs = frozenset(self.eventlog_pcrs)
        if any(not isinstance(p, int) or not 0 <= p < 24 for p in pcrs):
            raise ValueError("eventlog_pcrs must be PCR indices 0..23")
        object.__setattr__(self, "eventlog_pcrs", pcrs)

    @property
    def fleet_cas(self) -> tuple[x509.Certificate, ...]:
        """``fleet_ca_certs`` as parsed certificates."""
        return tuple(_certificate(c, "fleet_ca_certs") for c in self.fleet_ca_certs)


@dataclass(frozen=True)
class HostIdentity:
    """The host whose TPM vouched for the VM, as far as the chain proves it.

    Attributes:
        aik_certificate: the fleet-issued AIK certificate.
        aik_name, authkey_name: TPM Names of the host's AIK and AuthKey.
        authkey_policy: AuthKey's authPolicy (one of the approved platform policies).
    """

    aik_certificate: x509.Certificate
    aik_name: bytes
    authkey_name: bytes
    authkey_policy: bytes

    @property
    def subject(self) -> str:
        """The AIK certificate's subject (``CN=<host id>``)."""
        return self.aik_certificate.subject.rfc4514_string()


@dataclass(frozen=True)
class AttestedVm:
    """A VM whose evidence passed every check of :func:`verify_bundle` (built only there).

    Attributes:
        vm_uuid, nonce, cert_user: what the evidence was checked to answer.
        host: the attesting host.
        vaik_public, vaik_name: the VM's vAIK (compare with the enrolled one next time).
        pcr_bank: the signed vPCR bank (``"sha256"``); ``vpcrs`` its signed values.
        eventlog: the firmware events replayed to the signed vPCRs, or None (allowed missing).
        ima: the IMA entries replayed to the signed vPCR 10, or None (allowed missing).
        ima_unverified_tail: entries after those, appended by IMA after the vPCRs were read
            (not verified, not in ``ima``).
    """

    vm_uuid: uuid.UUID
    nonce: bytes
    cert_user: bytes
    host: HostIdentity
    vaik_public: TpmtPublic
    vaik_name: bytes
    pcr_bank: str
    vpcrs: Mapping[int, bytes]
    eventlog: VerifiedEventLog | None
    ima: VerifiedImaList | None
    ima_unverified_tail: int = 0


# --------------------------------------------------------------------------------------------
# The checks


def _same(a: bytes, b: bytes) -> bool:
    return hmac.compare_digest(a, b)


def _describe(cert: x509.Certificate) -> str:
    return f"subject {cert.subject.rfc4514_string()!r}, issuer {cert.issuer.rfc4514_string()!r}"


def _check_attributes(
    public: TpmtPublic, role: str, *, required: TpmaObject, forbidden: TpmaObject
) -> None:
    attrs = public.object_attributes
    missing = [f.name for f in TpmaObject if f & required and not attrs & f]
    present = [f.name for f in TpmaObject if f & forbidden and attrs & f]
    if missing or present:
        why = "; ".join(
            part
            for part in (
                f"lacks {', '.join(str(m) for m in missing)}" if missing else "",
                f"has {', '.join(str(p) for p in present)}" if present else "",
            )
            if part
        )
        raise _detail(
            KeyAttributesMismatch(
                f"{role} objectAttributes 0x{attrs:08x} {why}: a {role} must be "
                f"{_flags(required)} and not {_flags(forbidden)}"
            ),
            f"{_flags(required)}; not {_flags(forbidden)}",
            f"0x{attrs:08x}",
        )


def _flags(value: TpmaObject) -> str:
    return "|".join(str(f.name).lower() for f in TpmaObject if f & value)


def _verify_certification(
    cert: RawCertification,
    *,
    signer: TpmtPublic,
    certified: TpmtPublic,
    expected_data: bytes,
    label: str,
    signer_label: str,
    signature_error: type[SignatureError],
) -> None:
    """Signature, type, qualifying data and certified Name of one TPM2_Certify result."""
    try:
        verify_attest_signature(cert.attest_bytes, cert.signature, signer)
    except SignatureError as err:
        raise signature_error(
            f"{label} is not signed by the {signer_label} the chain vouches for: {err}"
        ) from err
    if cert.attest.type != TpmSt.TPM_ST_ATTEST_CERTIFY or not isinstance(
        cert.attest.attested, TpmsCertifyInfo
    ):
        raise _detail(
            CertifyTypeMismatch(f"{label} is a {cert.attest.type.name}, not a TPM2_Certify result"),
            "TPM_ST_ATTEST_CERTIFY",
            cert.attest.type.name,
        )
    if not _same(cert.attest.extra_data, expected_data):
        raise _detail(
            QualifyingDataMismatch(
                f"{label} was made for other qualifying data: expected SHA-256(cert_user ‖ nonce) "
                f"= {expected_data.hex()}, got {cert.attest.extra_data.hex()} (another tenant's "
                "certificate, or an old nonce)"
            ),
            expected_data.hex(),
            cert.attest.extra_data.hex(),
        )
    name = object_name(certified)
    if not _same(cert.attest.attested.name, name):
        raise _detail(
            CertifiedNameMismatch(
                f"{label} certifies the object with Name {cert.attest.attested.name.hex()}, not "
                f"the key in the bundle (Name {name.hex()})"
            ),
            name.hex(),
            cert.attest.attested.name.hex(),
        )


def _verify_eventlog(raw: RawBundle, opts: VerifyOptions) -> VerifiedEventLog | None:
    log = raw.event_log
    if log is None:
        if opts.allow_missing_eventlog:
            return None
        raise EventLogMissing(
            "the bundle carries no firmware event log, so the signed boot PCRs cannot be "
            "explained (allow_missing_eventlog=True accepts that)"
        )
    bank, signed = raw.message.bank, raw.message.pcrs
    extended = replay_pcrs(log).get(bank, {})
    wanted = {
        p: v
        for p, v in signed.items()
        if p != IMA_PCR and (p in opts.eventlog_pcrs or p in extended)
    }
    if not wanted:
        raise EventLogReplayMismatch(
            f"the event log accounts for none of the signed {bank} PCRs {sorted(signed)}", ()
        )
    try:
        return replay_eventlog(log, {bank: wanted})
    except ReplayError as err:
        raise EventLogReplayMismatch(
            f"the firmware event log does not replay to the signed vPCRs (a log of another boot "
            f"or another VM?): {err}",
            err.invalid_pcrs,
        ) from err


def _verify_ima(raw: RawBundle, opts: VerifyOptions) -> tuple[VerifiedImaList | None, int]:
    """Check 5b; returns the verified list and the number of unverified trailing entries."""
    ima = raw.ima_list
    if ima is None:
        if opts.allow_missing_ima:
            return None, 0
        raise ImaListMissing(
            "the bundle carries no IMA measurement list (allow_missing_ima=True accepts that)"
        )
    bank, signed = raw.message.bank, raw.message.pcrs
    if IMA_PCR not in signed:
        raise ImaReplayMismatch(
            f"the IMA list cannot be checked: PCR {IMA_PCR} is not among the signed PCRs "
            f"{sorted(signed)}",
            (IMA_PCR,),
        )
    if bank not in IMA_BANKS:
        raise ImaReplayMismatch(
            f"the IMA list cannot be replayed in the signed bank {bank} (supported: "
            f"{', '.join(IMA_BANKS)})",
            (IMA_PCR,),
        )
    rule = KernelRule(opts.ima_kernel_rule)
    want = {bank: signed[IMA_PCR]}
    try:
        return replay_ima(ima, want, rule, allow_sha1=opts.allow_sha1), 0
    except HashAlgorithmNotAllowed:
        raise
    except ReplayError as err:
        covered = signed_prefix(ima, bank, rule, signed[IMA_PCR])
        if covered is None or covered == len(ima):
            raise ImaReplayMismatch(
                f"the IMA list does not replay to the signed vPCR {IMA_PCR}, nor does any prefix "
                f"of it (an edited, inserted or removed entry?): {err}",
                err.invalid_pcrs,
            ) from err
    prefix = ima.prefix(covered)
    try:
        verified = replay_ima(prefix, want, rule, allow_sha1=opts.allow_sha1)
    except HashAlgorithmNotAllowed:
        raise
    except ReplayError as err:
        raise ImaReplayMismatch(
            f"the first {covered} IMA entries replay to the signed vPCR {IMA_PCR} but do not "
            f"verify: {err}",
            err.invalid_pcrs,
        ) from err
    return verified, len(ima) - covered


def verify_bundle(raw: RawBundle, opts: VerifyOptions) -> AttestedVm:
    """Verify a parsed evidence bundle against what the verifier trusts and expects.

    The caller must already trust everything in ``opts``: the fleet CA certificates, the approved
    AuthKey policies and the fleet policy key Name (from the registrar over an authenticated
    channel), its own ``cert_user`` and ``vm_uuid``, the enrolled vAIK, and must have sent
    ``opts.nonce`` freshly. Checks, in order (the first failure raises):

    0. The request: the bundle's nonce, cert_user and VM UUID are the expected ones
       (NonceMismatch, CertUserMismatch, VmUuidMismatch). These are claims; checks 2-4 prove them.
    1. AIK certificate (:func:`evidence.aik_cert.verify_aik_certificate`): no certificate of
       the path is signed with MD5, nor SHA-1 unless ``allow_sha1`` (HashAlgorithmNotAllowed);
       it chains to a fleet CA certificate, through the bundle's intermediates
       (AikNotFleetIssued); every certificate is valid at ``opts.now``
       (CertificateNotValidNow); each issuer is a CA whose constraints allow the chain
       (CaConstraintViolation); it is an AIK certificate (EKU tcg-kp-AIKCertificate, not a CA)
       whose TPMT_PUBLIC extension parses, whose TPM object Name extension is that public
       area's Name and whose subject key is that public area's key (AikCertificateMismatch).
       The AIK is restricted, sign, fixedTPM, fixedParent (KeyAttributesMismatch).
    2. CertAuthKey (TPM2_Certify of AuthKey by the AIK): signed by the AIK
       (CertAuthKeySignatureInvalid); a certify attestation (CertifyTypeMismatch); its
       qualifying data is SHA-256(cert_user ‖ nonce) (QualifyingDataMismatch); it certifies the
       Name of the bundle's AuthKey TPMT_PUBLIC (CertifiedNameMismatch). AuthKey is restricted,
       sign, fixedTPM, fixedParent, not decrypt, not userWithAuth (KeyAttributesMismatch), and its
       authPolicy is an approved one (AuthKeyPolicyNotApproved).
    3. CertvAIK (TPM2_Certify of the vAIK by AuthKey): the same four checks with AuthKey as signer
       (CertVaikSignatureInvalid, …). The vAIK is restricted and sign, and not fixedTPM,
       fixedParent, decrypt or userWithAuth (KeyAttributesMismatch); its authPolicy is
       :func:`expected_vaik_policy` of the fleet policy key (VaikPolicyMismatch); it is the
       enrolled vAIK when ``opts.vaik_public`` is given (VaikNotEnrolled).
    4. Attestation: the vPCR message is signed by the vAIK through TPM2_Sign
       (AttestationSignatureInvalid); its nonce is ours (NonceMismatch) and its VM UUID the
       expected one (VmUuidMismatch); its bank is not SHA-1 unless ``allow_sha1``
       (HashAlgorithmNotAllowed).
    5. Measurement lists: the firmware event log replays to the signed vPCRs it accounts for
       (EventLogReplayMismatch; EventLogMissing without a log); the IMA list replays to the
       signed vPCR 10 under ``opts.ima_kernel_rule``, or a prefix of it does (entries appended
       after the vPCRs were read stay unverified and are counted in ``ima_unverified_tail``)
       (ImaReplayMismatch; ImaListMissing without a list; HashAlgorithmNotAllowed when only
       SHA-1 binds it).

    Reference values (which firmware, which files) are not checked here: pass the result to
    :func:`evidence.policy.evaluate_reference_values`.

    Args:
        raw: from :func:`evidence.bundle.parse_bundle`.
        opts: see :class:`VerifyOptions`.

    Returns:
        The attested VM.

    Raises:
        VerificationError: one of the subclasses named above (each with its stable ``id``).
        ParseError: an AIK certificate extension is not well-formed DER, a key in the bundle does
            not convert into a public key, or a list holds an entry of a template that cannot be
            replayed (UnsupportedError).
    """
    if not isinstance(raw, RawBundle):
        raise TypeError(f"verify_bundle takes a RawBundle, got {type(raw).__name__}")
    if not isinstance(opts, VerifyOptions):
        raise TypeError(f"opts must be VerifyOptions, got {type(opts).__name__}")

    # 0. the request
    if not _same(raw.nonce, opts.nonce):
        raise NonceMismatch(
            f"the evidence answers nonce {raw.nonce.hex()}, not the nonce {opts.nonce.hex()} this "
            "verifier sent (a replayed bundle?)"
        )
    if raw.cert_user != opts.cert_user:
        got_subject = raw.cert_user_certificate.subject.rfc4514_string()
        raise _detail(
            CertUserMismatch(
                f"the evidence was made for the tenant certificate {got_subject!r}, not ours"
            ),
            hashlib.sha256(opts.cert_user).hexdigest(),
            hashlib.sha256(raw.cert_user).hexdigest(),
        )
    if raw.vm_uuid != opts.vm_uuid:
        raise _detail(
            VmUuidMismatch(f"the evidence is about VM {raw.vm_uuid}, not VM {opts.vm_uuid}"),
            str(opts.vm_uuid),
            str(raw.vm_uuid),
        )

    # 1. the AIK certificate
    aik_cert = raw.aik_certificates[0]
    aik_public = verify_aik_certificate(
        aik_cert,
        opts.fleet_cas,
        opts.now,
        intermediates=raw.aik_certificates[1:],
        allow_sha1=opts.allow_sha1,
    )
    _check_attributes(
        aik_public,
        "AIK",
        required=_A.RESTRICTED | _A.SIGN_ENCRYPT | _A.FIXEDTPM | _A.FIXEDPARENT,
        forbidden=_A.DECRYPT,
    )
    expected_data = qualifying_data(opts.cert_user, opts.nonce)

    # 2. CertAuthKey
    _verify_certification(
        raw.cert_authkey,
        signer=aik_public,
        certified=raw.authkey_public,
        expected_data=expected_data,
        label="CertAuthKey",
        signer_label="AIK",
        signature_error=CertAuthKeySignatureInvalid,
    )
    _check_attributes(
        raw.authkey_public,
        "AuthKey",
        required=_A.RESTRICTED | _A.SIGN_ENCRYPT | _A.FIXEDTPM | _A.FIXEDPARENT,
        forbidden=_A.DECRYPT | _A.USERWITHAUTH,
    )
    authkey_policy = raw.authkey_public.auth_policy
    if authkey_policy not in opts.authkey_policies:
        raise _detail(
            AuthKeyPolicyNotApproved(
                f"AuthKey's authPolicy {authkey_policy.hex() or '(empty)'} is none of the "
                f"{len(opts.authkey_policies)} approved host platform policies: the host's "
                "PCR 0-8 state was not approved"
            ),
            ", ".join(sorted(p.hex() for p in opts.authkey_policies)),
            authkey_policy.hex(),
        )

    # 3. CertvAIK
    _verify_certification(
        raw.cert_vaik,
        signer=raw.authkey_public,
        certified=raw.vaik_public,
        expected_data=expected_data,
        label="CertvAIK",
        signer_label="AuthKey",
        signature_error=CertVaikSignatureInvalid,
    )
    _check_attributes(
        raw.vaik_public,
        "vAIK",
        required=_A.RESTRICTED | _A.SIGN_ENCRYPT,
        forbidden=_A.FIXEDTPM | _A.FIXEDPARENT | _A.DECRYPT | _A.USERWITHAUTH,
    )
    want_policy = expected_vaik_policy(opts.fleet_policy_key_name, opts.vaik_policy_ref)
    if not _same(raw.vaik_public.auth_policy, want_policy):
        raise _detail(
            VaikPolicyMismatch(
                "the vAIK's authPolicy is not PolicyOR{PolicyAuthorize(fleet policy key), "
                "PolicyCommandCode(TPM2_Duplicate)}: it could sign without a fleet approval or "
                "move without TPM2_Duplicate"
            ),
            want_policy.hex(),
            raw.vaik_public.auth_policy.hex(),
        )
    vaik_bytes = raw.vaik_public.marshal()
    vaik_name = object_name(raw.vaik_public)
    if opts.vaik_public is not None and vaik_bytes != opts.vaik_public:
        enrolled = object_name(TpmtPublic.unmarshal(opts.vaik_public))
        raise _detail(
            VaikNotEnrolled(
                f"the evidence is signed by the vAIK with Name {vaik_name.hex()}, not by the vAIK "
                f"enrolled for VM {opts.vm_uuid} (Name {enrolled.hex()}): a clone or a replaced key"
            ),
            enrolled.hex(),
            vaik_name.hex(),
        )

    # 4. the attestation
    try:
        verify_signature(raw.message_bytes, raw.message_signature, raw.vaik_public)
    except SignatureError as err:
        raise AttestationSignatureInvalid(
            f"the vPCR message is not signed by the certified vAIK: {err}"
        ) from err
    message = raw.message
    if not _same(message.nonce, opts.nonce):
        raise NonceMismatch(
            f"the signed vPCR message answers nonce {message.nonce.hex()}, not "
            f"{opts.nonce.hex()} (a replayed signature under a fresh bundle nonce)"
        )
    if message.vm_uuid != opts.vm_uuid:
        raise _detail(
            VmUuidMismatch(
                f"the signed vPCR message is about VM {message.vm_uuid}, not VM {opts.vm_uuid}"
            ),
            str(opts.vm_uuid),
            str(message.vm_uuid),
        )
    if message.hash_alg == _SHA1 and not opts.allow_sha1:
        raise HashAlgorithmNotAllowed(
            "the vPCRs are signed from the SHA-1 bank only; allow_sha1=True accepts that"
        )

    # 5. measurement lists
    eventlog = _verify_eventlog(raw, opts)
    ima, ima_tail = _verify_ima(raw, opts)

    return AttestedVm(
        vm_uuid=message.vm_uuid,
        nonce=message.nonce,
        cert_user=raw.cert_user,
        host=HostIdentity(
            aik_certificate=aik_cert,
            aik_name=object_name(aik_public),
            authkey_name=object_name(raw.authkey_public),
            authkey_policy=authkey_policy,
        ),
        vaik_public=raw.vaik_public,
        vaik_name=vaik_name,
        pcr_bank=message.bank,
        vpcrs=message.pcrs,
        eventlog=eventlog,
        ima=ima,
        ima_unverified_tail=ima_tail,
    )
