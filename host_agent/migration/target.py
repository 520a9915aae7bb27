"""The target side: certify an ExgKey, import the vAIK as pending, activate on the commit.

:func:`serve_peer` handles one incoming connection: a migration (``Offer``), a source's
decision re-sent by its recovery (``Decision``), an outcome query from a target in recovery
(``OutcomeQuery``, answered from this host's *source* journal), or a target's ``Pull`` (this
host as the source: ``MigrationHost.pull_handler``). :func:`pull_source` is the target's end of
a pull: it finds the source among its peers and takes the Offer on that connection; then
:func:`run_incoming` is the same exchange as for an Offer that arrived at the listener. The
target never decides: it activates only on the source's commit, and discards on its abort (see
:mod:`host_agent.migration`).
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import Callable, Mapping
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
    Offer,
    Outcome,
    OutcomeQuery,
    Pull,
    StateRecord,
    Transfer,
    Verdict,
)
from .record import RecordRefused, verify_record
from .verify import check_vaik_public

__all__ = ["apply_decision", "outcome_of", "pull_source", "run_incoming", "serve_peer"]

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
            apply_decision(host, first.migration_id, first.decision)
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
    """Ask ``peers`` (host id → ``HOST:PORT``), one after the other, to move ``vm_uuid`` here;
    the first that holds it answers with its Offer on that connection (returned, open).

    Raises:
        PullNotHere: no peer holds the VM's vAIK (each peer's answer is in the message).
        PeerAborted: the peer that holds it refused (its reason: the source's checks).
        PeerProtocolError: it answered with something but an Offer of this VM with the VM.
    """
    tried: list[str] = []
    for peer, address in peers.items():
        try:
            channel = connect(peer, address)
        except VtpmError as err:
            tried.append(f"{peer} ({address}): unreachable: {err}")
            continue
        try:
            channel.send(Pull(vm_uuid, host.advertise or "-"))
            offer = channel.receive(host.timeout)
        except PeerAborted as err:
            channel.close()
            if err.remote_id == PullNotHere.id:
                tried.append(f"{peer}: {err}")
                continue
            raise
        except VtpmError as err:
            channel.close()
            tried.append(f"{peer}: {err}")
            continue
        if not isinstance(offer, Offer) or offer.vm_uuid != vm_uuid or not offer.with_vm:
            channel.close()
            raise PeerProtocolError(
                f"{peer} answered the pull of VM {vm_uuid} with {type(offer).__name__}, "
                "expected an Offer of that VM with the running VM"
            )
        return channel, offer
    raise PullNotHere(
        f"no peer moves VM {vm_uuid} here; asked: "
        + ("; ".join(tried) if tried else "nobody (no peers configured)")
    )


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
    outcome = "abort"
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
                    {"exgkey_name": exgkey.name.hex()},
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
        applied = apply_decision(host, mid, decision.decision)
        outcome = "commit" if applied.step is TargetStep.ACTIVE else "abort"
        channel.send(Done(mid))
    finally:
        host.live.discard(mid)
        if offer.with_vm and host.end_incoming is not None:
            try:
                host.end_incoming(offer.vm_uuid, outcome)
            except Exception:  # must not hide the migration's own outcome; logged
                log.exception("migration %s: releasing the incoming VM", mid)


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
