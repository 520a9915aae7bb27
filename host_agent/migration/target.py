"""The target side: certify an ExgKey, import the vAIK as pending, activate on the commit.

:func:`serve_peer` handles one incoming connection: a migration (``Offer``), a source's
decision re-sent by its recovery (``Decision``), an outcome query from a target in recovery
(``OutcomeQuery``, answered from this host's *source* journal), or a target's ``Pull`` (this
host as the source: ``MigrationHost.pull_handler``). :func:`pull_source` is the target's end of
a pull: it finds the source among its peers and takes the Offer on that connection; then
:func:`run_incoming` is the same exchange as for an Offer that arrived at the listener. The
target never decides: it activates only on the source's commit, and discards on its abort (see
:mod:`host_agent.migration`).

A VM migration (``Offer.with_vm``, kept as ``with_vm`` in the journal) arms the VM here for its
incoming QEMU. The VM is let go only with a decision: a live session ends it when its journal
entry is ACTIVE (``end_incoming(vm, "commit")``: kept, its adoption record written) or was never
imported or was discarded (``"abort"``: released). A session cut off while the entry is PENDING
(undecided: the source may have committed, and libvirt may run the VM here already) leaves the
VM armed; :func:`settle` ends it once the decision arrives (the source's re-sent Decision, or
recovery's outcome query).
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from evidence.errors import VtpmError
from host_agent.tpm.port import DuplicationBlob, WrappedKey

from .channel import PeerChannel
from .errors import MigrationError, PeerAborted, PeerProtocolError, PullNotHere
from .host import MigrationHost
from .journal import JournalEntry, SourceStep, TargetStep
from .protocol import (
    Decision,
    Done,
    ErrorMessage,
    ExgKeyOffer,
    Imported,
    Message,
    Offer,
    Outcome,
    OutcomeQuery,
    Pull,
    StateRecord,
    Transfer,
    Verdict,
)
from .record import RecordRefused, verify_record
from .state import VaikState, vaik_state
from .verify import check_vaik_public

__all__ = [
    "apply_decision",
    "end_vm",
    "outcome_of",
    "pull_source",
    "run_incoming",
    "serve_peer",
    "settle",
]

log = logging.getLogger("host_agent.migration.target")


def outcome_of(host: MigrationHost, migration_id: uuid.UUID) -> str:
    """This host's answer, as the source, to an outcome query.

    ``committed`` for COMMITTED/DONE; ``undecided`` while a session is still running it
    (STARTED/MOVING); ``aborted`` for ABORTED and for a migration it has no record of (a source
    keeps its COMMITTED record until the target acknowledged, so "unknown" never hides a commit).
    """
    entry = host.j.get(migration_id, "source")
    if entry is None or entry.step is SourceStep.ABORTED:
        return "aborted"
    if entry.step in (SourceStep.COMMITTED, SourceStep.DONE):
        return "committed"
    return "undecided"


def apply_decision(host: MigrationHost, migration_id: uuid.UUID, decision: str) -> JournalEntry:
    """Journal ACTIVE (vAIK signs here from now on) or DISCARDED (pending copy deleted).

    Idempotent; a decision for a terminal entry returns it unchanged.

    Raises:
        MigrationError: no target journal for ``migration_id``, or a commit of one that never
            reached PENDING (the source cannot have committed it).
    """
    with host.lock:
        entry = host.j.get(migration_id, "target")
        if entry is None:
            raise MigrationError(f"no incoming migration {migration_id} on this host")
        if entry.terminal:
            return entry
        vm = str(entry.vm_uuid)
        mid = str(migration_id)
        if decision == "commit":
            if entry.step is not TargetStep.PENDING:
                raise MigrationError(f"migration {mid}: commit before the vAIK was imported")

            def activate(tx: Any) -> None:
                record = tx.find("vaik", vm)
                if record is not None and record.json().get("migration_id") == mid:
                    value = record.json()
                    value.pop("state", None)
                    value.pop("migration_id", None)
                    tx.put("vaik", vm, value)

            log.info("migration %s: vAIK of VM %s active here", mid, vm)
            return host.j.write(entry.at(TargetStep.ACTIVE), activate)

        def discard(tx: Any) -> None:
            record = tx.find("vaik", vm)
            if record is not None and record.json().get("migration_id") == mid:
                tx.delete("vaik", vm)
                tx.delete("binding", vm, missing_ok=True)

        log.info("migration %s: pending vAIK of VM %s discarded", mid, vm)
        return host.j.write(entry.at(TargetStep.DISCARDED), discard)


def end_vm(host: MigrationHost, entry: JournalEntry) -> None:
    """End what this host armed for ``entry``'s VM, by the entry's step: ACTIVE → kept (its
    adoption record written), else released, unless the VM's vAIK is here (it arrived since by
    another migration: what runs is its). Nothing for a migration without the VM, or with no
    VM side here. Call with ``host.lock`` held and no session of ``entry`` live. Never raises
    (``end_incoming`` must not; a failure is logged)."""
    if not entry.data.get("with_vm") or host.end_incoming is None:
        return
    outcome = "commit" if entry.step is TargetStep.ACTIVE else "abort"
    if outcome == "abort" and vaik_state(host.store, entry.vm_uuid) is not VaikState.ABSENT:
        return
    try:
        host.end_incoming(entry.vm_uuid, outcome)
    except Exception:  # must not hide the decision, which is durable already; logged
        log.exception("migration %s: ending the incoming VM (%s)", entry.migration_id, outcome)


def settle(host: MigrationHost, migration_id: uuid.UUID, decision: str) -> JournalEntry:
    """:func:`apply_decision`, then, when that settled an open entry no session of this host
    runs (it was cut off undecided, or this process restarted), :func:`end_vm` with it.

    Raises:
        MigrationError: as :func:`apply_decision`.
    """
    with host.lock:
        before = host.j.get(migration_id, "target")
        entry = apply_decision(host, migration_id, decision)
        if before is not None and not before.terminal and migration_id not in host.live:
            end_vm(host, entry)
    return entry


def _refuse(channel: PeerChannel, error_id: str, message: str) -> None:
    with contextlib.suppress(VtpmError):
        channel.send(ErrorMessage(error_id, message))


def serve_peer(host: MigrationHost, channel: PeerChannel) -> None:
    """Handle one connection (see the module docstring). Never raises."""
    try:
        first = channel.receive(host.timeout)
        if isinstance(first, OutcomeQuery):
            channel.send(Outcome(first.migration_id, outcome_of(host, first.migration_id)))  # type: ignore[arg-type]
        elif isinstance(first, Decision):
            settle(host, first.migration_id, first.decision)
            channel.send(Done(first.migration_id))
        elif isinstance(first, Offer):
            _incoming(host, channel, first)
        elif isinstance(first, Pull):
            if host.pull_handler is None:
                raise MigrationError(
                    "this host's migration service runs without the daemon's bridge hooks: it "
                    "cannot move a running VM (run it as the daemon's component)"
                )
            host.pull_handler(channel, first)
        else:
            _refuse(channel, "migration.peer.protocol", f"unexpected {type(first).__name__}")
    except VtpmError as err:
        log.warning("migration peer %s: %s", channel.peer_id, err)
        _refuse(channel, err.id, str(err))


def run_incoming(
    host: MigrationHost,
    channel: PeerChannel,
    offer: Offer,
    on_imported: Callable[[], None] | None = None,
) -> None:
    """The target's exchange for ``offer`` (arm, ExgKey, import, record check, decision);
    ``on_imported`` is called once the vAIK is imported and journalled PENDING (a pull's hook
    then lets libvirt go on). A failure is sent to the source as an Error, then raised.

    Raises:
        VtpmError: the migration failed here (the source aborts; nothing is active here).
    """
    try:
        _incoming(host, channel, offer, on_imported)
    except VtpmError as err:
        log.warning("migration peer %s: %s", channel.peer_id, err)
        _refuse(channel, err.id, str(err))
        raise


def pull_source(
    host: MigrationHost,
    peers: Mapping[str, str],
    vm_uuid: uuid.UUID,
    connect: Callable[[str, str], PeerChannel],
) -> tuple[PeerChannel, Offer]:
    """Ask all ``peers`` (host id → ``HOST:PORT``) at once to move ``vm_uuid`` here; the one
    that holds it answers with its Offer on that connection (returned, open).

    The first decisive answer wins: an Offer, or a refusal from the peer that holds the VM. A
    peer that is down or hangs (each connect and answer is bounded by ``host.timeout``) delays
    only a pull that no peer answers decisively. Connections whose answers come later are
    closed (a source that offered on one aborts its side).

    Raises:
        PullNotHere: no peer holds the VM's vAIK (each peer's answer is in the message).
        PeerAborted: the peer that holds it refused (its reason: the source's checks).
        PeerProtocolError: it answered with something but an Offer of this VM with the VM.
    """
    answers: queue.SimpleQueue[_PullAnswer] = queue.SimpleQueue()
    lock = threading.Lock()
    decided = False

    def ask(peer: str, address: str) -> None:
        channel: PeerChannel | None = None
        try:
            channel = connect(peer, address)
            channel.send(Pull(vm_uuid, host.advertise or "-"))
            answer: Message | Exception = channel.receive(host.timeout)
        except Exception as err:  # judged (or re-raised) on the caller's thread
            answer = err
        with lock:
            if not decided:
                answers.put(_PullAnswer(peer, address, channel, answer))
                return
        if channel is not None:
            channel.close()  # the pull was decided without this peer

    for peer, address in peers.items():
        threading.Thread(target=ask, args=(peer, address), name=f"pull-{peer}", daemon=True).start()
    tried: list[str] = []
    try:
        for _ in peers:
            got = answers.get()
            if (
                isinstance(got.answer, Offer)
                and got.answer.vm_uuid == vm_uuid
                and got.answer.with_vm
            ):
                assert got.channel is not None
                return got.channel, got.answer
            if got.channel is not None:
                got.channel.close()
            if isinstance(got.answer, PeerAborted):
                if got.answer.remote_id != PullNotHere.id:
                    raise got.answer
                tried.append(f"{got.peer}: {got.answer}")
            elif isinstance(got.answer, VtpmError):
                what = "unreachable: " if got.channel is None else ""
                tried.append(f"{got.peer} ({got.address}): {what}{got.answer}")
            elif isinstance(got.answer, Exception):
                raise got.answer
            else:
                raise PeerProtocolError(
                    f"{got.peer} answered the pull of VM {vm_uuid} with "
                    f"{type(got.answer).__name__}, expected an Offer of that VM with the running VM"
                )
    finally:
        with lock:
            decided = True
        while True:
            try:
                late = answers.get_nowait()
            except queue.Empty:
                break
            if late.channel is not None:
                late.channel.close()
    raise PullNotHere(
        f"no peer moves VM {vm_uuid} here; asked: "
        + ("; ".join(tried) if tried else "nobody (no peers configured)")
    )


@dataclass(frozen=True)
class _PullAnswer:
    """One peer's answer to a pull: its Offer (or other message), or why there is none."""

    peer: str
    address: str
    channel: PeerChannel | None  # None: the connect failed
    answer: Message | Exception


def _incoming(
    host: MigrationHost,
    channel: PeerChannel,
    offer: Offer,
    on_imported: Callable[[], None] | None = None,
) -> None:
    vm = str(offer.vm_uuid)
    mid = offer.migration_id
    with host.lock:
        if host.store.find("vaik", vm) is not None:
            _refuse(channel, "migration.vaik.exists", f"this host already holds a vAIK for VM {vm}")
            return
        if host.j.get(mid, "target") is not None:
            _refuse(channel, "migration.duplicate", f"migration {mid} was offered before")
            return
        host.live.add(mid)
    try:
        if offer.with_vm:
            if host.prepare_incoming is None or host.record_check is None:
                raise MigrationError(
                    "this host cannot take a running VM (no daemon with bridge hooks serves "
                    "the migration here): only the vAIK can move to it"
                )
            host.prepare_incoming(offer.vm_uuid)
    except VtpmError:
        host.live.discard(mid)
        raise
    try:
        exgkey = host.tpm.create_exgkey()
        cert = host.tpm.certify(exgkey, "aik", offer.nonce)
        assert exgkey.policy.pcr_digest is not None
        with host.lock:
            entry = host.j.write(
                JournalEntry(
                    mid,
                    "target",
                    TargetStep.EXGKEY,
                    offer.vm_uuid,
                    channel.peer_id,
                    _reachable(offer.source_address, channel),
                    {"exgkey_name": exgkey.name.hex(), "with_vm": offer.with_vm},
                )
            )
        channel.send(
            ExgKeyOffer(
                mid,
                exgkey.public,
                exgkey.policy.pcr_digest,
                exgkey.policy.locality,
                cert.attest,
                cert.signature,
                host.aik_certificate,
            )
        )
        try:
            transfer = channel.receive(host.timeout)
            if not isinstance(transfer, Transfer) or transfer.migration_id != mid:
                raise PeerProtocolError(f"expected the Transfer of {mid}")
            blob = DuplicationBlob.from_bytes(transfer.duplication)
            check_vaik_public(blob.public, blob.policy.fleet_key, blob.policy.policy_ref)
            imported = host.tpm.import_key(blob, exgkey)
        except VtpmError:
            with host.lock:
                host.j.write(entry.at(TargetStep.DISCARDED, reason="no vAIK arrived"))
            raise
        _pending(host, entry, imported, transfer)
        channel.send(Imported(mid))
        if on_imported is not None:
            on_imported()
        decision = channel.receive(host.timeout)
        checked = False
        if isinstance(decision, StateRecord) and decision.migration_id == mid:
            verdict = _check_record(host, decision, blob.public)
            checked = verdict.ok
            channel.send(verdict)
            decision = channel.receive(host.timeout)
        if not isinstance(decision, Decision) or decision.migration_id != mid:
            raise PeerProtocolError(f"expected the Decision on {mid}")
        if offer.with_vm and decision.decision == "commit" and not checked:
            apply_decision(host, mid, "abort")
            raise PeerProtocolError(
                f"migration {mid}: a commit of a VM migration whose state record was not "
                "checked here (the vAIK stays pending nowhere: discarded)"
            )
        apply_decision(host, mid, decision.decision)
        channel.send(Done(mid))
    finally:
        with host.lock:
            host.live.discard(mid)
            _end_session(host, offer)


def _end_session(host: MigrationHost, offer: Offer) -> None:
    """The live session of ``offer`` ended: end the VM armed for it by its journal entry's step
    (see the module docstring); a PENDING entry (cut off undecided) keeps it armed."""
    if not offer.with_vm or host.end_incoming is None:
        return
    entry = host.j.get(offer.migration_id, "target")
    if entry is not None and entry.step is TargetStep.PENDING:
        log.warning(
            "migration %s: cut off undecided; VM %s stays armed until the source's decision",
            offer.migration_id,
            offer.vm_uuid,
        )
        return
    outcome = "commit" if entry is not None and entry.step is TargetStep.ACTIVE else "abort"
    try:
        host.end_incoming(offer.vm_uuid, outcome)
    except Exception:  # must not hide the migration's own outcome; logged
        log.exception("migration %s: ending the incoming VM (%s)", offer.migration_id, outcome)


def _check_record(host: MigrationHost, message: StateRecord, vaik_public: bytes) -> Verdict:
    """Steps (3)/(4) on the target: the vAIK signature, then the loaded VM (``record_check``)."""
    try:
        record = verify_record(
            message.record, message.signature, vaik_public, migration_id=message.migration_id
        )
        if host.record_check is not None:
            host.record_check(record)
    except RecordRefused as err:
        log.warning("migration %s: VM state refused: %s", message.migration_id, err)
        return Verdict(message.migration_id, False, str(err)[:2000])
    return Verdict(message.migration_id, True)


def _reachable(advertised: str, channel: PeerChannel) -> str:
    """The source's listener address, with a wildcard host replaced by the connection's peer."""
    host, sep, port = advertised.rpartition(":")
    seen = getattr(channel, "peer_host", "")
    if sep and seen and host.strip("[]") in ("0.0.0.0", "::", ""):
        return f"[{seen}]:{port}" if ":" in seen else f"{seen}:{port}"
    return advertised


def _pending(
    host: MigrationHost, entry: JournalEntry, imported: WrappedKey, transfer: Transfer
) -> JournalEntry:
    """Journal PENDING with the imported vAIK (state ``pending``: not signing) and the binding."""
    vm = str(entry.vm_uuid)
    mid = str(entry.migration_id)
    binding = dict(transfer.binding)
    generation = binding.get("generation", 1)

    def store(tx: Any) -> None:
        tx.put(
            "vaik",
            vm,
            {
                "generation": generation,
                "key": imported.to_bytes().hex(),
                "state": "pending",
                "migration_id": mid,
            },
        )
        if binding:
            tx.put(
                "binding",
                vm,
                {
                    **binding,
                    # A new bridge whose one session starts with SET_STATEBLOB reads as
                    # "restored" against this marker (host_agent.service.enroll.boot_transition).
                    "boot": {"bridge_pid": 0, "sessions": 0, "inits": 0, "set_stateblobs": 0},
                    "migrated_from": entry.peer,
                },
            )

    with host.lock:
        return host.j.write(entry.at(TargetStep.PENDING), store)
