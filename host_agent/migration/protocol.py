"""The migration protocol's messages: typed, checked on the way in (:func:`parse_message`).

One migration is one mTLS connection from the source to the target's migration listener;
an outcome query is a second, short connection from the target to the source (recovery)::

    source                                          target
      │ Offer(migration_id, vm_uuid, nonce)  ──────────►│  (1) create ExgKey, journal it
      │◄────────── ExgKeyOffer(public, policy, CertExgKey, AIK certificate)
      │  verify_exgkey_offer (nothing left yet)          │
      │  journal MOVING + vAIK state "moving"            │
      │ Transfer(duplication blob, binding)  ──────────►│  (2) import under ExgKey,
      │◄────────────────────────── Imported             │      journal PENDING (not signing)
      │ StateRecord(vAIK-signed record) ───────────────►│  (3)/(4) check signature, then
      │◄──────────────────── Verdict(ok | veto, reason)  │  loaded memory + vPCRs (hook)
      │  journal COMMITTED + delete vAIK  (commit point) │
      │ Decision(commit)  ─────────────────────────────►│  (5) journal ACTIVE, vAIK signs
      │◄────────────────────────── Done                 │
      │  journal removed                                 │

    on failure before COMMITTED: journal ABORTED + vAIK back to "active";
      Decision(abort) ──► target discards its pending copy ──► Done

    recovery: OutcomeQuery(migration_id) ──► source ──► Outcome(committed | aborted | undecided)

    pull (a plain ``virsh migrate``; the target's libvirt hook asks, :mod:`.hook`): the
    target connects to the source and sends Pull(vm_uuid, target_address); the source answers
    on the same connection with the Offer above (then the same exchange, roles unchanged) or
    with Error (``migration.pull.not_here``: no vAIK of the VM here; anything else: refused).

Any side may send ``Error(id, message)`` instead of the expected message; the other side ends
the exchange. Field types are strict; binary fields are frame blobs (TPM wire format).
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal

from .codec import Frame
from .errors import FrameError

__all__ = [
    "PROTOCOL_VERSION",
    "Decision",
    "Done",
    "ErrorMessage",
    "ExgKeyOffer",
    "Imported",
    "Message",
    "Offer",
    "Outcome",
    "OutcomeQuery",
    "Pull",
    "StateRecord",
    "Transfer",
    "Verdict",
    "parse_message",
]

PROTOCOL_VERSION: Final = 1
NONCE_BYTES: Final = 32
_ID = re.compile(r"^[a-z][a-z0-9_.]{0,63}$")


def _fail(what: str, expected: str, got: object = None) -> FrameError:
    return FrameError(f"migration message {what}", 0, expected, None if got is None else repr(got))


def _exact(frame: Frame, fields: set[str], blobs: set[str]) -> None:
    if set(frame.fields) != fields:
        raise _fail(f"{frame.type}.fields", str(sorted(fields)), sorted(frame.fields))
    if set(frame.blobs) != blobs:
        raise _fail(f"{frame.type}.blobs", str(sorted(blobs)), sorted(frame.blobs))


def _uuid(frame: Frame, name: str) -> uuid.UUID:
    value = frame.fields[name]
    if not isinstance(value, str) or len(value) != 36:
        raise _fail(f"{frame.type}.{name}", "a UUID string", value)
    try:
        parsed = uuid.UUID(value)
    except ValueError as err:
        raise _fail(f"{frame.type}.{name}", "a UUID string", value) from err
    if str(parsed) != value:
        raise _fail(f"{frame.type}.{name}", "a canonical lower-case UUID", value)
    return parsed


def _str(frame: Frame, name: str, limit: int = 256) -> str:
    value = frame.fields[name]
    if not isinstance(value, str) or not 1 <= len(value) <= limit:
        raise _fail(f"{frame.type}.{name}", f"a string of 1..{limit} characters", value)
    return value


def _blob(frame: Frame, name: str, lo: int = 1, hi: int = 1 << 16) -> bytes:
    value = frame.blobs[name]
    if not lo <= len(value) <= hi:
        raise _fail(f"{frame.type}.{name}", f"{lo}..{hi} bytes", len(value))
    return value


def _version(frame: Frame) -> None:
    if frame.fields.get("version") != PROTOCOL_VERSION:
        raise _fail(f"{frame.type}.version", str(PROTOCOL_VERSION), frame.fields.get("version"))


@dataclass(frozen=True)
class Offer:
    """(1) source → target: migrate ``vm_uuid``; certify an ExgKey over ``nonce``.

    ``source_address`` is where the source's migration listener takes outcome queries
    (``HOST:PORT``); the source's identity is its mTLS certificate, not anything in here.
    ``with_vm``: libvirt migrates the running VM too (steps 3/4: the target arms the VM for its
    incoming QEMU and requires the signed StateRecord before any commit). The field is sent
    only when true, so a vAIK-only Offer is the same frame as before.
    """

    migration_id: uuid.UUID
    vm_uuid: uuid.UUID
    nonce: bytes
    source_address: str
    with_vm: bool = False

    def to_frame(self) -> Frame:
        fields: dict[str, Any] = {
            "version": PROTOCOL_VERSION,
            "migration_id": str(self.migration_id),
            "vm_uuid": str(self.vm_uuid),
            "source_address": self.source_address,
        }
        if self.with_vm:
            fields["with_vm"] = True
        return Frame("offer", fields, {"nonce": self.nonce})


@dataclass(frozen=True)
class ExgKeyOffer:
    """(1) target → source: the ExgKey, its policy terms, CertExgKey and the AIK certificate.

    Attributes:
        exgkey_public: marshalled TPMT_PUBLIC of the ExgKey.
        pcr_digest: the PolicyPCR(sha256:0-8) digest its authPolicy claims to bind.
        locality: the PolicyLocality term, or None.
        certify_attest, certify_signature: TPM2_Certify(ExgKey by AIK, nonce).
        aik_certificate: DER.
    """

    migration_id: uuid.UUID
    exgkey_public: bytes
    pcr_digest: bytes
    locality: int | None
    certify_attest: bytes
    certify_signature: bytes
    aik_certificate: bytes

    def to_frame(self) -> Frame:
        return Frame(
            "exgkey",
            {"migration_id": str(self.migration_id), "locality": self.locality},
            {
                "exgkey_public": self.exgkey_public,
                "pcr_digest": self.pcr_digest,
                "certify_attest": self.certify_attest,
                "certify_signature": self.certify_signature,
                "aik_certificate": self.aik_certificate,
            },
        )


@dataclass(frozen=True)
class Transfer:
    """(2) source → target: the duplicated vAIK and the VM's binding (cert_user …).

    Attributes:
        duplication: :meth:`host_agent.tpm.DuplicationBlob.to_bytes` (its inner-wrapper key
            travels only inside this mTLS channel).
        binding: the binding record (JSON object: cert_user, generation, fingerprint …).
    """

    migration_id: uuid.UUID
    duplication: bytes
    binding: Mapping[str, Any]

    def to_frame(self) -> Frame:
        return Frame(
            "transfer",
            {"migration_id": str(self.migration_id), "binding": dict(self.binding)},
            {"duplication": self.duplication},
        )


@dataclass(frozen=True)
class Imported:
    """(2) target → source: imported and journalled as pending (not signing)."""

    migration_id: uuid.UUID

    def to_frame(self) -> Frame:
        return Frame("imported", {"migration_id": str(self.migration_id)})


@dataclass(frozen=True)
class StateRecord:
    """(3) source → target: the vAIK-signed migration record (:mod:`.record`)."""

    migration_id: uuid.UUID
    record: bytes
    signature: bytes

    def to_frame(self) -> Frame:
        return Frame(
            "state_record",
            {"migration_id": str(self.migration_id)},
            {"record": self.record, "signature": self.signature},
        )


@dataclass(frozen=True)
class Verdict:
    """(4) target → source: the VM's state checked (``ok``) or vetoed, with the reason."""

    migration_id: uuid.UUID
    ok: bool
    reason: str = ""

    def to_frame(self) -> Frame:
        fields = {"migration_id": str(self.migration_id), "ok": self.ok, "reason": self.reason}
        return Frame("verdict", fields)


@dataclass(frozen=True)
class Decision:
    """(5) source → target: ``commit`` (activate) or ``abort`` (discard), with a reason."""

    migration_id: uuid.UUID
    decision: Literal["commit", "abort"]
    reason: str = ""

    def to_frame(self) -> Frame:
        return Frame(
            "decision",
            {
                "migration_id": str(self.migration_id),
                "decision": self.decision,
                "reason": self.reason,
            },
        )


@dataclass(frozen=True)
class Done:
    """(5) target → source: the decision is applied and journalled."""

    migration_id: uuid.UUID

    def to_frame(self) -> Frame:
        return Frame("done", {"migration_id": str(self.migration_id)})


@dataclass(frozen=True)
class OutcomeQuery:
    """Recovery, target → source: what became of ``migration_id``?"""

    migration_id: uuid.UUID

    def to_frame(self) -> Frame:
        return Frame(
            "outcome_query", {"version": PROTOCOL_VERSION, "migration_id": str(self.migration_id)}
        )


@dataclass(frozen=True)
class Outcome:
    """Recovery, source → target: the source's journal says ``committed``, ``aborted`` (also
    for a migration it does not know: it never commits without keeping the record until the
    target acknowledged), or ``undecided`` (ask again later)."""

    migration_id: uuid.UUID
    outcome: Literal["committed", "aborted", "undecided"]

    def to_frame(self) -> Frame:
        return Frame("outcome", {"migration_id": str(self.migration_id), "outcome": self.outcome})


@dataclass(frozen=True)
class Pull:
    """Target → source: "libvirt is migrating ``vm_uuid`` to me; run the protocol with me".

    Only a request: the source answers with its own ``Offer`` (nonce, checks, everything as in
    a migration it starts) or refuses. ``target_address`` is where the target's migration
    listener takes the source's re-sent decisions (``HOST:PORT``), as ``Offer.source_address``
    is for the other direction; the target's identity is its mTLS certificate.
    """

    vm_uuid: uuid.UUID
    target_address: str

    def to_frame(self) -> Frame:
        return Frame(
            "pull",
            {
                "version": PROTOCOL_VERSION,
                "vm_uuid": str(self.vm_uuid),
                "target_address": self.target_address,
            },
        )


@dataclass(frozen=True)
class ErrorMessage:
    """Either side: the exchange ends; ``id`` is the sender's stable error id."""

    id: str
    message: str

    def to_frame(self) -> Frame:
        return Frame("error", {"id": self.id, "message": self.message[:2000]})


Message = (
    Offer
    | ExgKeyOffer
    | Transfer
    | Imported
    | StateRecord
    | Verdict
    | Decision
    | Done
    | OutcomeQuery
    | Outcome
    | Pull
    | ErrorMessage
)


def parse_message(frame: Frame) -> Message:
    """Check a frame against its message type's schema.

    Raises:
        FrameError: an unknown type, missing or extra fields or blobs, a wrong type or size.
    """
    t = frame.type
    if t == "offer":
        base = {"version", "migration_id", "vm_uuid", "source_address"}
        _exact(frame, base | ({"with_vm"} if "with_vm" in frame.fields else set()), {"nonce"})
        _version(frame)
        with_vm = frame.fields.get("with_vm", False)
        if with_vm is not True and "with_vm" in frame.fields:
            raise _fail("offer.with_vm", "true (or absent)", with_vm)
        return Offer(
            _uuid(frame, "migration_id"),
            _uuid(frame, "vm_uuid"),
            _blob(frame, "nonce", NONCE_BYTES, NONCE_BYTES),
            _str(frame, "source_address"),
            bool(with_vm),
        )
    if t == "exgkey":
        blobs = {"exgkey_public", "pcr_digest", "certify_attest", "certify_signature"}
        _exact(frame, {"migration_id", "locality"}, blobs | {"aik_certificate"})
        locality = frame.fields["locality"]
        if locality is not None and (type(locality) is not int or not 0 <= locality <= 4):
            raise _fail("exgkey.locality", "null or 0..4", locality)
        return ExgKeyOffer(
            _uuid(frame, "migration_id"),
            _blob(frame, "exgkey_public", 1, 1024),
            _blob(frame, "pcr_digest", 32, 32),
            locality,
            _blob(frame, "certify_attest", 1, 1024),
            _blob(frame, "certify_signature", 1, 1024),
            _blob(frame, "aik_certificate", 1, 16384),
        )
    if t == "transfer":
        _exact(frame, {"migration_id", "binding"}, {"duplication"})
        binding = frame.fields["binding"]
        if not isinstance(binding, dict):
            raise _fail("transfer.binding", "a JSON object", type(binding).__name__)
        return Transfer(
            _uuid(frame, "migration_id"), _blob(frame, "duplication", 1, 1 << 16), binding
        )
    if t == "state_record":
        _exact(frame, {"migration_id"}, {"record", "signature"})
        return StateRecord(
            _uuid(frame, "migration_id"),
            _blob(frame, "record", 1, 1 << 16),
            _blob(frame, "signature", 1, 1024),
        )
    if t == "verdict":
        _exact(frame, {"migration_id", "ok", "reason"}, set())
        ok, reason = frame.fields["ok"], frame.fields["reason"]
        if not isinstance(ok, bool):
            raise _fail("verdict.ok", "true or false", ok)
        if not isinstance(reason, str) or len(reason) > 2000:
            raise _fail("verdict.reason", "a string of at most 2000 characters", reason)
        return Verdict(_uuid(frame, "migration_id"), ok, reason)
    if t in ("imported", "done"):
        _exact(frame, {"migration_id"}, set())
        cls = Imported if t == "imported" else Done
        return cls(_uuid(frame, "migration_id"))
    if t == "decision":
        _exact(frame, {"migration_id", "decision", "reason"}, set())
        decision = frame.fields["decision"]
        reason = frame.fields["reason"]
        if decision not in ("commit", "abort"):
            raise _fail("decision.decision", "'commit' or 'abort'", decision)
        if not isinstance(reason, str) or len(reason) > 2000:
            raise _fail("decision.reason", "a string of at most 2000 characters", reason)
        return Decision(_uuid(frame, "migration_id"), decision, reason)
    if t == "outcome_query":
        _exact(frame, {"version", "migration_id"}, set())
        _version(frame)
        return OutcomeQuery(_uuid(frame, "migration_id"))
    if t == "outcome":
        _exact(frame, {"migration_id", "outcome"}, set())
        outcome = frame.fields["outcome"]
        if outcome not in ("committed", "aborted", "undecided"):
            raise _fail("outcome.outcome", "committed, aborted or undecided", outcome)
        return Outcome(_uuid(frame, "migration_id"), outcome)
    if t == "pull":
        _exact(frame, {"version", "vm_uuid", "target_address"}, set())
        _version(frame)
        return Pull(_uuid(frame, "vm_uuid"), _str(frame, "target_address"))
    if t == "error":
        _exact(frame, {"id", "message"}, set())
        eid = frame.fields["id"]
        if not isinstance(eid, str) or not _ID.match(eid):
            raise _fail("error.id", "a dotted lower-case id", eid)
        message = frame.fields["message"]
        if not isinstance(message, str) or len(message) > 2000:
            raise _fail("error.message", "a string of at most 2000 characters", message)
        return ErrorMessage(eid, message)
    raise _fail("type", "offer, exgkey, transfer, imported, decision, done, outcome, pull…", t)
