"""The source side: move a VM's vAIK to a target host (protocol steps 1, 2 and 5).

The source is authoritative until the commit point; see :mod:`host_agent.migration` for the
whole design (commit point, recovery per journal state). A :class:`SourceMigration` is one
attempt, with a run-state and ``require`` guards; :func:`migrate_vaik` runs one.
"""

from __future__ import annotations

import enum
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from evidence.errors import VtpmError
from host_agent.errors import StateError
from host_agent.tpm.port import WrappedKey

from .channel import PeerChannel
from .errors import (
    MigrationError,
    MigrationInDoubt,
    PeerProtocolError,
    PeerUnavailable,
    VaikNotMovable,
)
from .host import MigrationHost, approved_sign_policies
from .journal import JournalEntry, SourceStep
from .protocol import (
    Decision,
    Done,
    ErrorMessage,
    ExgKeyOffer,
    Imported,
    Offer,
    StateRecord,
    Transfer,
    Verdict,
)
from .record import MigrationRecord, RecordRefused, encode_record
from .state import VaikState, vaik_state
from .verify import VerifiedExgKey, verify_exgkey_offer

__all__ = [
    "MigrationResult",
    "SourceMigration",
    "SourceRunState",
    "abort_source",
    "commit_source",
    "migrate_vaik",
    "send_decision",
]

log = logging.getLogger("host_agent.migration.source")

Connect = Callable[[str, str], PeerChannel]
"""(target host id, ``HOST:PORT``) → an authenticated channel to it."""


class SourceRunState(enum.Enum):
    CREATED = "created"
    OFFERED = "offered"
    VERIFIED = "verified"
    TRANSFERRED = "transferred"
    COMMITTED = "committed"
    DONE = "done"
    ABORTED = "aborted"


@dataclass(frozen=True)
class MigrationResult:
    """What a source-side migration ended with.

    Attributes:
        migration_id, vm_uuid, target: what moved where.
        outcome: ``"committed"`` (the target acknowledged, or will be told by recovery).
        acknowledged: whether the target confirmed activation already.
        exgkey_name: the certified ExgKey's Name (hex).
    """

    migration_id: uuid.UUID
    vm_uuid: uuid.UUID
    target: str
    outcome: str
    acknowledged: bool
    exgkey_name: str

    def to_json(self) -> dict[str, Any]:
        return {
            "migration_id": str(self.migration_id),
            "vm_uuid": str(self.vm_uuid),
            "target": self.target,
            "outcome": self.outcome,
            "acknowledged": self.acknowledged,
            "exgkey_name": self.exgkey_name,
        }


def _vaik_record(host: MigrationHost, vm_uuid: uuid.UUID) -> dict[str, Any]:
    record = host.store.find("vaik", str(vm_uuid))
    if record is None:
        raise VaikNotMovable(f"this host holds no vAIK for VM {vm_uuid}")
    value: dict[str, Any] = record.json()
    return value


def abort_source(host: MigrationHost, entry: JournalEntry, reason: str) -> JournalEntry:
    """Journal ABORTED and give the vAIK back its ``active`` state (one transaction).

    Only from STARTED or MOVING (never after COMMITTED). Idempotent.
    """
    with host.lock:
        current = host.j.get(entry.migration_id, "source") or entry
        if current.step in (SourceStep.ABORTED, SourceStep.DONE):
            return current
        if current.step is SourceStep.COMMITTED:
            raise StateError("committed", ["started", "moving"], "abort a committed migration")
        vm = str(current.vm_uuid)

        def restore(tx: Any) -> None:
            record = tx.find("vaik", vm)
            if record is None:
                return
            value = record.json()
            if value.get("migration_id") == str(current.migration_id):
                value.pop("state", None)
                value.pop("migration_id", None)
                tx.put("vaik", vm, value)

        log.warning("migration %s of VM %s aborted: %s", entry.migration_id, vm, reason)
        return host.j.write(current.at(SourceStep.ABORTED, reason=reason[:500]), restore)


def commit_source(host: MigrationHost, entry: JournalEntry) -> JournalEntry:
    """The commit point: journal COMMITTED and delete the vAIK and binding here, in one
    transaction. Only from MOVING (the target imported, or the vAIK never left); idempotent.

    Raises:
        StateError: the entry is STARTED (nothing was duplicated) or ABORTED.
    """
    with host.lock:
        current = host.j.get(entry.migration_id, "source") or entry
        if current.step in (SourceStep.COMMITTED, SourceStep.DONE):
            return current
        if current.step is not SourceStep.MOVING:
            raise StateError(current.step.value, ["moving"], "commit a migration")
        vm = str(current.vm_uuid)

        def forget(tx: Any) -> None:
            tx.delete("vaik", vm, missing_ok=True)
            tx.delete("binding", vm, missing_ok=True)

        return host.j.write(current.at(SourceStep.COMMITTED), forget)


def send_decision(
    host: MigrationHost, entry: JournalEntry, channel: PeerChannel | None, connect: Connect
) -> bool:
    """Tell the target the decision of ``entry`` (COMMITTED → commit, ABORTED → abort) and, on
    its Done, journal DONE (after a commit). Returns whether the target acknowledged."""
    decision: Literal["commit", "abort"] = (
        "commit" if entry.step in (SourceStep.COMMITTED, SourceStep.DONE) else "abort"
    )
    owned = channel is None
    try:
        if channel is None:
            channel = connect(entry.peer, entry.peer_address)
        channel.send(Decision(entry.migration_id, decision, str(entry.data.get("reason", ""))))
        _expect(channel, Done, host.timeout)
    except VtpmError as err:
        log.info(
            "migration %s: the target did not acknowledge %s: %s",
            entry.migration_id,
            decision,
            err,
        )
        return False
    finally:
        if owned and channel is not None:
            channel.close()
    if entry.step is SourceStep.COMMITTED:
        with host.lock:
            host.j.write(entry.at(SourceStep.DONE))
    return True


class SourceMigration:
    """One attempt to move ``vm_uuid``'s vAIK to ``target`` (run-state guarded).

    Args:
        host: this host.
        vm_uuid: the VM.
        target: the target's host id (its certificates' CN).
        address: ``HOST:PORT`` of the target's migration listener.
        connect: opens the peer channel (default: mTLS with this host's identity).
        between: called after the target imported and before the commit (protocol steps 3/4:
            the VM's own migration and the sealed record); raising aborts.
        record_source: this migration's ``record_source`` (default: the host's); given, the
            Offer says ``with_vm`` (libvirt moves the running VM: the target arms it).
        on_verified: called once the target's ExgKey passed every check and before the vAIK
            leaves (a VM migration starts libvirt's pre-copy here, overlapping steps 2);
            raising aborts.
    """

    def __init__(
        self,
        host: MigrationHost,
        vm_uuid: uuid.UUID,
        target: str,
        address: str,
        *,
        connect: Connect,
        between: Callable[[PeerChannel, JournalEntry], None] | None = None,
        record_source: Callable[[uuid.UUID, uuid.UUID], MigrationRecord] | None = None,
        on_verified: Callable[[], None] | None = None,
    ) -> None:
        self.host = host
        self.record_source = record_source
        self.on_verified = on_verified
        self.with_vm = record_source is not None
        self.vm_uuid = vm_uuid
        self.target = target
        self.address = address
        self.connect = connect
        self.between = between
        self.run_state = SourceRunState.CREATED
        self.entry: JournalEntry | None = None
        self.exgkey: VerifiedExgKey | None = None
        #: The target checked the VM's signed record and let its QEMU run (a VM migration):
        #: from here on libvirt may finish the move whatever happens to this session.
        self.state_accepted = False

    def _require(self, what: str, *states: SourceRunState) -> None:
        if self.run_state not in states:
            raise StateError(self.run_state.value, [s.value for s in states], f"source: {what}")

    def run(self) -> MigrationResult:
        """Steps 1, 2, (3/4 via ``between``), 5. Raises after aborting on any failure before
        the commit point; after it, returns (recovery completes an unacknowledged commit).

        Raises:
            VaikNotMovable: no active vAIK here for the VM, or a migration of it is open.
            TargetRefused: a check of the target failed (nothing left this host).
            PeerUnavailable, PeerAborted, PeerProtocolError, FrameError: the exchange failed
                before the commit point (the vAIK is active here again).
            MigrationInDoubt: a VM migration failed after the target accepted the VM's state
                and libvirt cannot say yet whether the VM moved: the journal stays MOVING and
                recovery settles it (``_placement_after``). When libvirt says the VM moved, the
                move commits and ``run`` returns as for a success.
        """
        self._require("run()", SourceRunState.CREATED)
        host = self.host
        with host.lock:
            state = vaik_state(host.store, self.vm_uuid)
            if state is not VaikState.ACTIVE:
                raise VaikNotMovable(
                    f"VM {self.vm_uuid}: its vAIK is {state.value} here, only an active one moves"
                )
            busy = [e for e in host.j.open_entries() if e.vm_uuid == self.vm_uuid]
            if busy:
                raise VaikNotMovable(
                    f"VM {self.vm_uuid}: migration {busy[0].migration_id} is still open "
                    f"({busy[0].side}, {busy[0].step.value})"
                )
            migration_id = uuid.UUID(bytes=host.random_bytes(16), version=4)
            nonce = host.random_bytes(32)
            host.live.add(migration_id)
            try:
                self.entry = host.j.write(
                    JournalEntry(
                        migration_id,
                        "source",
                        SourceStep.STARTED,
                        self.vm_uuid,
                        self.target,
                        self.address,
                        {"nonce": nonce.hex(), "with_vm": self.with_vm},
                    )
                )
            except BaseException:
                host.live.discard(migration_id)
                raise
        channel: PeerChannel | None = None
        try:
            try:
                channel = self.connect(self.target, self.address)
                channel.send(
                    Offer(migration_id, self.vm_uuid, nonce, host.advertise or "-", self.with_vm)
                )
                self.run_state = SourceRunState.OFFERED
                offer = _expect(channel, ExgKeyOffer, host.timeout)
                self.exgkey = self._verify(offer, nonce, channel.peer_id)
                self.run_state = SourceRunState.VERIFIED
                if self.on_verified is not None:
                    self.on_verified()
                self._move(channel)
                self.run_state = SourceRunState.TRANSFERRED
                if (self.record_source or host.record_source) is not None:
                    self._send_record(channel)
                    self.state_accepted = True
                if self.between is not None:
                    assert self.entry is not None
                    self.between(channel, self.entry)
            except BaseException as err:
                where = self._placement_after(err)
                if where == "moved":
                    assert channel is not None  # the target accepted the state over it
                    return self._commit(channel)
                if where == "unknown":
                    if not isinstance(err, Exception):
                        raise  # being stopped: the journal stays MOVING, recovery decides
                    raise MigrationInDoubt(
                        f"VM {self.vm_uuid}: the migration failed after {self.target} accepted "
                        f"the VM's state ({type(err).__name__}: {err}) and this host's libvirt "
                        "cannot say yet whether the VM moved; the vAIK signs on neither host "
                        "until recovery asks libvirt again"
                    ) from err
                self._abort(channel, err)
                raise
            return self._commit(channel)
        finally:
            host.live.discard(migration_id)
            if channel is not None:
                channel.close()

    def _verify(self, offer: ExgKeyOffer, nonce: bytes, peer: str) -> VerifiedExgKey:
        host = self.host
        if offer.migration_id != self._entry.migration_id:
            raise MigrationError("the target answered for another migration")
        key = WrappedKey.from_bytes(bytes.fromhex(_vaik_record(host, self.vm_uuid)["key"]))
        approved = approved_sign_policies(host.approvals(), key.policy)
        return verify_exgkey_offer(
            offer,
            nonce=nonce,
            peer_host_id=peer,
            fleet_ca_certs=host.fleet_ca,
            approved_sign_policies=approved,
            now=host.now(),
        )

    @property
    def _entry(self) -> JournalEntry:
        assert self.entry is not None
        return self.entry

    def _move(self, channel: PeerChannel) -> None:
        """Step 2: journal MOVING with the vAIK ``moving`` (it stops signing), then duplicate."""
        host = self.host
        assert self.exgkey is not None
        vm = str(self.vm_uuid)
        mid = str(self._entry.migration_id)
        with host.lock:
            record = _vaik_record(host, self.vm_uuid)
            if record.get("state", "active") != "active":
                raise VaikNotMovable(f"VM {vm}: its vAIK became {record['state']} meanwhile")
            binding_record = host.store.find("binding", vm)
            binding = binding_record.json() if binding_record is not None else {}

            def mark(tx: Any) -> None:
                tx.put("vaik", vm, {**record, "state": "moving", "migration_id": mid})

            self.entry = host.j.write(
                self._entry.at(SourceStep.MOVING, exgkey_name=self.exgkey.name.hex()), mark
            )
        key = WrappedKey.from_bytes(bytes.fromhex(record["key"]))
        blob = host.tpm.duplicate(key, self.exgkey.public)
        binding = {**binding, "generation": record.get("generation", binding.get("generation"))}
        channel.send(Transfer(self._entry.migration_id, blob.to_bytes(), binding))
        _expect(channel, Imported, host.timeout)

    def _send_record(self, channel: PeerChannel) -> None:
        """Steps (3)/(4): the vAIK signs the record of the VM's final state; the target checks
        it before the VM runs and answers with a Verdict (a veto aborts: we keep everything)."""
        host = self.host
        record_source = self.record_source or host.record_source
        assert record_source is not None
        mid = self._entry.migration_id
        record = record_source(mid, self.vm_uuid)
        if record.migration_id != mid or record.vm_uuid != self.vm_uuid:
            raise ValueError("record_source returned a record of another migration or VM")
        key = WrappedKey.from_bytes(bytes.fromhex(_vaik_record(host, self.vm_uuid)["key"]))
        current = host.tpm.approved_sign_policy()
        approval = next(
            (
                a
                for a in host.approvals()
                if a.approved_policy == current and a.policy_ref == key.policy.policy_ref
            ),
            None,
        )
        if approval is None:
            raise MigrationError(
                "the fleet has not approved this host's platform state: the vAIK cannot sign the "
                f"migration record (sign policy {current.hex()})"
            )
        data = encode_record(record)
        channel.send(StateRecord(mid, data, host.tpm.sign(key, data, approval)))
        verdict = _expect(channel, Verdict, host.timeout)
        if not verdict.ok:
            raise RecordRefused(f"the target refused the VM's state: {verdict.reason}")

    def _placement_after(self, err: BaseException) -> str:
        """After a failure: ``"here"`` (abort, the usual case), or, once the target accepted the
        VM's state, where this host's libvirt says the VM is. libvirt may have finished the
        move although this session failed (a broken channel, a timeout): the VM then runs on
        the target, which checked the vAIK-signed record before its QEMU ran, so the move
        commits (``"moved"``); an answer libvirt cannot give yet (``"unknown"``: its job still
        runs, or it is unreachable) leaves the journal MOVING for recovery (vAIK ``moving``
        here, ``pending`` there: it signs nowhere meanwhile). A process being killed
        (``KeyboardInterrupt``, ``SystemExit``) is no answer either way: recovery decides."""
        if not (self.with_vm and self.state_accepted):
            return "here"
        placement = self.host.vm_placement
        if placement is None or not isinstance(err, Exception):
            return "unknown"  # (a source without libvirt: recovery aborts, as it always did)
        where, why = placement(self.vm_uuid)
        log.warning(
            "migration %s failed after the target accepted the VM (%s: %s); libvirt: %s → %s",
            self._entry.migration_id,
            type(err).__name__,
            err,
            why,
            where,
        )
        return where

    def _abort(self, channel: PeerChannel | None, err: BaseException) -> None:
        host = self.host
        reason = f"{type(err).__name__}: {err}"
        entry = abort_source(host, self._entry, reason)
        self.entry = entry
        self.run_state = SourceRunState.ABORTED
        if channel is not None and not isinstance(err, PeerUnavailable):
            eid = err.id if isinstance(err, VtpmError) else "migration.source.failed"
            try:
                if self._entry.data.get("exgkey_name") is None:
                    channel.send(ErrorMessage(eid, reason[:2000]))
                else:
                    send_decision(host, entry, channel, self.connect)
            except VtpmError:
                pass  # the target asks for the outcome itself

    def _commit(self, channel: PeerChannel) -> MigrationResult:
        """The commit point (:func:`commit_source`), then the Decision to the target."""
        host = self.host
        self.entry = commit_source(host, self._entry)
        self.run_state = SourceRunState.COMMITTED
        acknowledged = send_decision(host, self._entry, channel, self.connect)
        if acknowledged:
            self.run_state = SourceRunState.DONE
        assert self.exgkey is not None
        return MigrationResult(
            self._entry.migration_id,
            self.vm_uuid,
            self.target,
            "committed",
            acknowledged,
            self.exgkey.name.hex(),
        )


def _expect(channel: PeerChannel, kind: type[Any], timeout: float) -> Any:
    message = channel.receive(timeout)
    if not isinstance(message, kind):
        raise PeerProtocolError(
            f"{channel.peer_id} sent {type(message).__name__}, expected {kind.__name__}"
        )
    return message


def migrate_vaik(
    host: MigrationHost,
    vm_uuid: uuid.UUID,
    target: str,
    address: str,
    *,
    connect: Connect,
    between: Callable[[PeerChannel, JournalEntry], None] | None = None,
    record_source: Callable[[uuid.UUID, uuid.UUID], MigrationRecord] | None = None,
    on_verified: Callable[[], None] | None = None,
) -> MigrationResult:
    """Run one :class:`SourceMigration` (see :meth:`SourceMigration.run`)."""
    return SourceMigration(
        host, vm_uuid, target, address, connect=connect, between=between,
        record_source=record_source, on_verified=on_verified,
    ).run()  # fmt: skip
