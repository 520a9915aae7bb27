"""The host TPM port: what the rest of the host agent may ask of the host TPM.

Everything crossing this boundary is raw bytes in TPM wire format or a frozen dataclass of ours;
tpm2-pytss types never leave ``host_agent/tpm/``. The one real adapter is
:class:`host_agent.tpm.adapter.PytssHostTpm`; it runs every TPM call on one worker thread, so
every method here is synchronous and thread-safe.

HostTpm API (bytes are TPM 2.0 wire format unless said otherwise)::

    # identity and discovery
    root: Literal["hardware", "software"]      tcti: str
    close() -> None

    # data sealing and rollback protection (used by host_agent/store)
    seal(data: bytes, *, pcrs: Sequence[int] | None = None) -> bytes    # opaque sealed blob
    unseal(blob: bytes) -> bytes
    counter_define(index: int) -> int          # idempotent; returns the current value
    counter_read(index: int) -> int
    counter_increment(index: int) -> int       # returns the new value

    # endorsement and credential activation (used by host_agent/registration + registrar)
    ek_certificates() -> list[tuple[int, bytes]]          # (NV index, DER certificate)
    ek_public(kind: Literal["rsa", "ecc"] = "rsa") -> bytes           # marshalled TPMT_PUBLIC
    aik_public() -> bytes                                  # marshalled TPMT_PUBLIC
    aik_name() -> bytes                                    # TPM Name: 0x000b ‖ SHA-256(public)
    activate_credential(credential_blob: bytes, encrypted_secret: bytes,
                        ek_kind: Literal["rsa", "ecc"] = "rsa") -> bytes
        # credential_blob = marshalled TPM2B_ID_OBJECT, encrypted_secret = marshalled
        # TPM2B_ENCRYPTED_SECRET (as MakeCredential produces them); returns the credential
        # (the TPM2B_DIGEST's buffer, without its size prefix)

    # host keys (created by `vtpm-host init`)
    ensure_host_keys() -> HostKeyReport
    host_key_public(key: Literal["aik", "authkey"]) -> bytes            # TPMT_PUBLIC
    authkey_policy() -> bytes                                            # its authPolicy
    platform_state_approved() -> bool            # PCR0-8 still at AuthKey's approved values
    pcr_values(pcrs: Sequence[int] = range(9)) -> dict[int, bytes]       # sha256 bank

    # per-VM keys and operations (ARCHITECTURE.md §2)
    create_vaik(fleet_key: bytes, policy_ref: bytes = VAIK_POLICY_REF) -> WrappedKey
        # fleet_key = DER SubjectPublicKeyInfo of the fleet's ECC P-256 approval key
    create_exgkey() -> WrappedKey
    certify(obj: KeyRef, signer: KeyRef, qualifying_data: bytes) -> Certification
    sign(key: WrappedKey, message: bytes, approval: PolicyApproval) -> bytes   # TPMT_SIGNATURE
    attest(vaik: WrappedKey, qualifying_data: bytes, message: bytes | Future[bytes],
           approval: PolicyApproval, *, message_timeout: float | None = None) -> Attestation
        # CertAuthKey + CertvAIK over qualifying_data, then the vAIK's signature over message,
        # in one call (the message may still be in the making while the TPM certifies)
    approved_sign_policy(pcr_values: Mapping[int, bytes] | None = None) -> bytes
    duplicate(key: WrappedKey, new_parent_public: bytes) -> DuplicationBlob
    import_key(blob: DuplicationBlob, parent: WrappedKey) -> WrappedKey

``KeyRef`` is ``"aik"``, ``"authkey"`` or a :class:`WrappedKey`.

Errors (``host_agent.tpm.errors``): any failed TPM command is a ``TpmCommandError(rc, command)``
(``TpmObjectMemoryFull`` when slots run out); a PCR-bound key or sealed blob on a changed
platform is ``PlatformStateNotApproved``; a fleet approval that does not verify or fit is
``PolicyNotApproved``; host keys before ``init`` are ``HostKeysMissing``; a malformed stored blob
is ``KeyBlobError``. Misuse (wrong types, oversize data, a message starting with
TPM_GENERATED_VALUE, duplicating towards a non-ExgKey) is ``TypeError``/``ValueError``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

from evidence.tpm2_policy import PolicyApproval

from .errors import KeyBlobError

__all__ = [
    "AUTHKEY_PCRS",
    "VAIK_POLICY_REF",
    "Attestation",
    "Certification",
    "DuplicationBlob",
    "HostKeyReport",
    "HostTpm",
    "KeyPolicy",
    "KeyRef",
    "WrappedKey",
]

#: PCRs of the sha256 bank an AuthKey/ExgKey is bound to, and a vAIK approval covers.
AUTHKEY_PCRS: tuple[int, ...] = tuple(range(9))
#: Default policyRef of a vAIK's PolicyAuthorize branch (≤ 32 bytes).
VAIK_POLICY_REF = b"vtpm-trust/vaik-sign/1"

_KINDS = ("aik", "authkey", "vaik", "exgkey")


@dataclass(frozen=True)
class KeyPolicy:
    """How to satisfy a key's authPolicy (what the adapter replays in a policy session).

    Attributes:
        pcrs: sha256 PCR indices of a PolicyPCR term (empty: none).
        pcr_digest: approved composite digest of those PCRs.
        locality: PolicyLocality term (0..4), or None.
        fleet_key: vAIK only: marshalled TPMT_PUBLIC of the fleet key whose Name the
            PolicyAuthorize branch binds (:func:`evidence.tpm2_policy.fleet_key_public`).
        policy_ref: vAIK only: the PolicyAuthorize policyRef.
    """

    pcrs: tuple[int, ...] = ()
    pcr_digest: bytes | None = None
    locality: int | None = None
    fleet_key: bytes | None = None
    policy_ref: bytes = b""

    @property
    def fleet_key_name(self) -> bytes | None:
        from evidence.tpm2_policy import name_of_public

        return None if self.fleet_key is None else name_of_public(self.fleet_key)

    def to_json(self) -> dict[str, Any]:
        return {
            "pcrs": list(self.pcrs),
            "pcr_digest": None if self.pcr_digest is None else self.pcr_digest.hex(),
            "locality": self.locality,
            "fleet_key": None if self.fleet_key is None else self.fleet_key.hex(),
            "policy_ref": self.policy_ref.hex(),
        }

    @classmethod
    def from_json(cls, obj: Any) -> KeyPolicy:
        if not isinstance(obj, dict) or set(obj) != {
            "pcrs",
            "pcr_digest",
            "locality",
            "fleet_key",
            "policy_ref",
        }:
            raise KeyBlobError("key policy: expected the five fields of KeyPolicy")
        try:
            return cls(
                pcrs=tuple(int(p) for p in obj["pcrs"]),
                pcr_digest=None if obj["pcr_digest"] is None else bytes.fromhex(obj["pcr_digest"]),
                locality=None if obj["locality"] is None else int(obj["locality"]),
                fleet_key=None if obj["fleet_key"] is None else bytes.fromhex(obj["fleet_key"]),
                policy_ref=bytes.fromhex(obj["policy_ref"]),
            )
        except (TypeError, ValueError) as err:
            raise KeyBlobError(f"key policy: {err}") from err


@dataclass(frozen=True)
class WrappedKey:
    """A TPM key whose private part exists only wrapped by its parent (never in the clear).

    Attributes:
        kind: ``"aik"``, ``"authkey"``, ``"vaik"`` or ``"exgkey"``.
        public: marshalled TPMT_PUBLIC.
        private: marshalled TPM2B_PRIVATE (encrypted and integrity-protected by the parent).
        policy: how to satisfy the key's authPolicy.
        parent: the wrapping parent, or None for the SRK (an imported vAIK's parent is the
            ExgKey it was imported under).
    """

    kind: str
    public: bytes
    private: bytes
    policy: KeyPolicy = field(default_factory=KeyPolicy)
    parent: WrappedKey | None = None

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(f"kind must be one of {_KINDS}, got {self.kind!r}")

    @property
    def name(self) -> bytes:
        """TPM Name (nameAlg SHA-256)."""
        from evidence.tpm2_policy import name_of_public

        return name_of_public(self.public)

    def _to_obj(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "public": self.public.hex(),
            "private": self.private.hex(),
            "policy": self.policy.to_json(),
            "parent": None if self.parent is None else self.parent._to_obj(),
        }

    def to_bytes(self) -> bytes:
        """Serialized form for storage (JSON; binary fields hex)."""
        return json.dumps({"format": "vtpm-trust/wrapped-key/1", **self._to_obj()}).encode()

    @classmethod
    def _from_obj(cls, obj: Any, depth: int = 0) -> WrappedKey:
        if depth > 2:
            raise KeyBlobError("wrapped key: parent chain deeper than 2")
        if not isinstance(obj, dict) or set(obj) != {
            "kind",
            "public",
            "private",
            "policy",
            "parent",
        }:
            raise KeyBlobError("wrapped key: expected fields kind, public, private, policy, parent")
        try:
            return cls(
                kind=str(obj["kind"]),
                public=bytes.fromhex(obj["public"]),
                private=bytes.fromhex(obj["private"]),
                policy=KeyPolicy.from_json(obj["policy"]),
                parent=None if obj["parent"] is None else cls._from_obj(obj["parent"], depth + 1),
            )
        except (TypeError, ValueError) as err:
            raise KeyBlobError(f"wrapped key: {err}") from err

    @classmethod
    def from_bytes(cls, data: bytes) -> WrappedKey:
        """Parse :meth:`to_bytes` output.

        Raises:
            KeyBlobError: not a wrapped key of this format.
        """
        try:
            obj = json.loads(data)
        except (ValueError, UnicodeDecodeError) as err:
            raise KeyBlobError(f"wrapped key: not JSON ({err})") from err
        if not isinstance(obj, dict) or obj.pop("format", None) != "vtpm-trust/wrapped-key/1":
            raise KeyBlobError("wrapped key: format is not vtpm-trust/wrapped-key/1")
        return cls._from_obj(obj)


KeyRef = Literal["aik", "authkey"] | WrappedKey


@dataclass(frozen=True)
class Certification:
    """Result of TPM2_Certify: raw TPMS_ATTEST (the signed bytes) and marshalled TPMT_SIGNATURE."""

    attest: bytes
    signature: bytes


@dataclass(frozen=True)
class Attestation:
    """Result of :meth:`HostTpm.attest`: CertAuthKey (AuthKey by AIK), CertvAIK (vAIK by
    AuthKey), the message the vAIK signed and its marshalled TPMT_SIGNATURE."""

    cert_authkey: Certification
    cert_vaik: Certification
    message: bytes
    signature: bytes


@dataclass(frozen=True)
class DuplicationBlob:
    """TPM2_Duplicate output, everything TPM2_Import on the target needs.

    Attributes:
        public: marshalled TPMT_PUBLIC of the duplicated key.
        duplicate: marshalled TPM2B_PRIVATE (inner + outer wrapped).
        encrypted_seed: marshalled TPM2B_ENCRYPTED_SECRET (outer wrapper seed, to the new parent).
        encryption_key: the inner wrapper's AES-128 key (TPM-generated); send it only over the
            authenticated peer channel.
        policy: the key's :class:`KeyPolicy` (needed to use it after import).
    """

    public: bytes
    duplicate: bytes
    encrypted_seed: bytes
    encryption_key: bytes
    policy: KeyPolicy

    def to_bytes(self) -> bytes:
        return json.dumps(
            {
                "format": "vtpm-trust/duplication/1",
                "public": self.public.hex(),
                "duplicate": self.duplicate.hex(),
                "encrypted_seed": self.encrypted_seed.hex(),
                "encryption_key": self.encryption_key.hex(),
                "policy": self.policy.to_json(),
            }
        ).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> DuplicationBlob:
        try:
            obj = json.loads(data)
            if not isinstance(obj, dict) or obj.get("format") != "vtpm-trust/duplication/1":
                raise KeyBlobError("duplication blob: format is not vtpm-trust/duplication/1")
            return cls(
                public=bytes.fromhex(obj["public"]),
                duplicate=bytes.fromhex(obj["duplicate"]),
                encrypted_seed=bytes.fromhex(obj["encrypted_seed"]),
                encryption_key=bytes.fromhex(obj["encryption_key"]),
                policy=KeyPolicy.from_json(obj["policy"]),
            )
        except (KeyError, TypeError, ValueError, UnicodeDecodeError) as err:
            raise KeyBlobError(f"duplication blob: {err}") from err


@dataclass(frozen=True)
class HostKeyReport:
    """What :meth:`HostTpm.ensure_host_keys` found and did.

    Attributes:
        created: the keys created by this call (subset of ``("srk", "aik", "authkey")``).
        aik_name, authkey_name: TPM Names.
        authkey_policy: AuthKey's authPolicy digest.
        authkey_locality: whether AuthKey's policy includes PolicyLocality(0).
    """

    created: tuple[str, ...]
    aik_name: bytes
    authkey_name: bytes
    authkey_policy: bytes
    authkey_locality: bool


@runtime_checkable
class HostTpm(Protocol):
    """The host TPM (see the module docstring for the whole API at a glance)."""

    @property
    def root(self) -> Literal["hardware", "software"]: ...

    @property
    def tcti(self) -> str: ...

    def close(self) -> None: ...

    def seal(self, data: bytes, *, pcrs: Sequence[int] | None = None) -> bytes:
        """Seal ``data`` (≤ 128 bytes) under the SRK; with ``pcrs``, bound to their current values.

        Returns an opaque blob (TPM2B_PUBLIC + TPM2B_PRIVATE of a sealed data object plus the
        PCR binding); only this TPM can unseal it.
        """
        ...

    def unseal(self, blob: bytes) -> bytes:
        """Unseal a :meth:`seal` blob.

        Raises:
            KeyBlobError: malformed blob.
            PlatformStateNotApproved: the bound PCRs changed.
            TpmCommandError: another TPM (or a tampered blob).
        """
        ...

    def counter_define(self, index: int) -> int:
        """Define an NV counter at owner-range ``index`` (0x01800000..0x01BFFFFF) if missing."""
        ...

    def counter_read(self, index: int) -> int: ...

    def counter_increment(self, index: int) -> int: ...

    def ek_certificates(self) -> list[tuple[int, bytes]]:
        """EK certificates found in NV, as (index, DER), read in ≤ 1024-byte chunks."""
        ...

    def ek_public(self, kind: Literal["rsa", "ecc"] = "rsa") -> bytes:
        """TPMT_PUBLIC of the EK made from the standard TCG template matching the EK cert."""
        ...

    def aik_public(self) -> bytes: ...

    def aik_name(self) -> bytes: ...

    def activate_credential(
        self,
        credential_blob: bytes,
        encrypted_secret: bytes,
        ek_kind: Literal["rsa", "ecc"] = "rsa",
    ) -> bytes:
        """TPM2_ActivateCredential(AIK, EK); EK authorized by PolicySecret(endorsement)."""
        ...

    def ensure_host_keys(self) -> HostKeyReport: ...

    def host_key_public(self, key: Literal["aik", "authkey"]) -> bytes: ...

    def authkey_policy(self) -> bytes: ...

    def platform_state_approved(self) -> bool: ...

    def pcr_values(self, pcrs: Sequence[int] = AUTHKEY_PCRS) -> dict[int, bytes]: ...

    def create_vaik(self, fleet_key: bytes, policy_ref: bytes = VAIK_POLICY_REF) -> WrappedKey: ...

    def create_exgkey(self) -> WrappedKey: ...

    def certify(self, obj: KeyRef, signer: KeyRef, qualifying_data: bytes) -> Certification: ...

    def sign(self, key: WrappedKey, message: bytes, approval: PolicyApproval) -> bytes: ...

    def attest(
        self,
        key: WrappedKey,
        qualifying_data: bytes,
        message: bytes | Future[bytes],
        approval: PolicyApproval,
        *,
        message_timeout: float | None = None,
    ) -> Attestation: ...

    def approved_sign_policy(self, pcr_values: Mapping[int, bytes] | None = None) -> bytes: ...

    def duplicate(self, key: WrappedKey, new_parent_public: bytes) -> DuplicationBlob: ...

    def import_key(self, blob: DuplicationBlob, parent: WrappedKey) -> WrappedKey: ...
