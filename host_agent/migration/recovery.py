"""Recovery: settle every open journal entry (at start, then periodically).

What each side does with each open journal state (the reasoning is in
:mod:`host_agent.migration`):

=========  ==========  ===================================================================
side       step        recovery
=========  ==========  ===================================================================
source     STARTED     ABORTED (nothing left this host; the vAIK never stopped signing)
source     MOVING      ABORTED + vAIK ``active`` again, then tell the target (best effort);
                       a VM migration first asks this host's libvirt (below)
source     COMMITTED   tell the target "commit" until it answers Done, then DONE
target     EXGKEY      DISCARDED (no vAIK arrived: the source cannot have committed), and
                       the VM armed for it released (``end_incoming(vm, "abort")``)
target     PENDING     ask the source: committed → ACTIVE, aborted → DISCARDED, then the VM
                       armed for it kept (adoption record) or released (``target.settle``);
                       undecided or unreachable → ask again later (signs nowhere meanwhile;
                       the VM stays armed: libvirt may run it here already)
=========  ==========  ===================================================================

A source left MOVING by a VM migration (journal ``with_vm``) may have died after the target's
Verdict and libvirt's end of the migration: the VM then runs on the target, which checked the
vAIK-signed record before its QEMU ran. So recovery asks this host's libvirt first
(``MigrationHost.vm_placement``): the VM moved (libvirt's outgoing migration completed) →
COMMITTED (the commit point, as the live session would have reached it), then the Decision
to the target; the VM is still here with no migration job → abort as above; libvirt still
migrates it, or cannot be reached → nothing now, ask again on a later pass (the vAIK stays
``moving`` here and ``pending`` there: it signs nowhere meanwhile, never on two hosts).

Releasing: a target that crashed in EXGKEY leaves the VM armed (a swtpm waiting for incoming
state and a bridge on the domain's TPM socket, both outliving the daemon, invariant 6) with no
QEMU ever coming (libvirt starts only after the source checked the ExgKey); its live session
would have released it. Recovery settles an EXGKEY entry only while no session of this host is
live (a new incoming migration of the same VM arms the same swtpm and bridge), else on a later
pass, and releases nothing when the VM's vAIK is here (the VM arrived since by another
migration). (After PENDING the incoming QEMU has connected, and the bridge, started ``--once``,
ends with it.)
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from evidence.errors import VtpmError

from .channel import PeerChannel
from .host import MigrationHost
from .journal import JournalEntry, SourceStep, TargetStep
from .protocol import Outcome, OutcomeQuery
from .source import abort_source, commit_source, send_decision
from .state import VaikState, vaik_state
from .target import settle

__all__ = ["resolve_open_entries"]

log = logging.getLogger("host_agent.migration.recovery")

Connect = Callable[[str, str], PeerChannel]


def _ask_source(host: MigrationHost, entry: JournalEntry, connect: Connect) -> str:
    try:
        channel = connect(entry.peer, entry.peer_address)
    except VtpmError as err:
        log.info("migration %s: source %s unreachable: %s", entry.migration_id, entry.peer, err)
        return "undecided"
    try:
        channel.send(OutcomeQuery(entry.migration_id))
        answer = channel.receive(host.timeout)
    except VtpmError as err:
        log.info("migration %s: outcome query failed: %s", entry.migration_id, err)
        return "undecided"
    finally:
        channel.close()
    if not isinstance(answer, Outcome) or answer.migration_id != entry.migration_id:
        return "undecided"
    return answer.outcome


def _release(host: MigrationHost, entry: JournalEntry) -> None:
    """Stop what a target armed for ``entry``'s VM, unless the VM's vAIK is here (it arrived
    since, by another migration: what runs is its). Call with the lock, no session live."""
    if host.end_incoming is not None and vaik_state(host.store, entry.vm_uuid) is VaikState.ABSENT:
        host.end_incoming(entry.vm_uuid, "abort")  # never raises


def _placement(host: MigrationHost, entry: JournalEntry) -> str:
    """For a source entry MOVING in a VM migration: where this host's libvirt says the VM is
    (``moved``, ``here``, ``unknown``); ``here`` for any other entry (the usual recovery)."""
    if (
        entry.step is not SourceStep.MOVING
        or not entry.data.get("with_vm")
        or host.vm_placement is None
    ):
        return "here"
    where, why = host.vm_placement(entry.vm_uuid)
    log.info("migration %s (source, moving): %s → %s", entry.migration_id, why, where)
    return where


def resolve_open_entries(host: MigrationHost, connect: Connect) -> list[str]:
    """One pass over the open journal entries not run by a live session; returns what was done."""
    done: list[str] = []
    with host.lock:
        entries = [e for e in host.j.open_entries() if e.migration_id not in host.live]
    for entry in entries:
        mid = entry.migration_id
        if entry.side == "source":
            where = _placement(host, entry)
            if where == "unknown":
                continue  # libvirt may still move the VM, or cannot say: ask on a later pass
            if where == "moved":
                committed = commit_source(host, entry)
                done.append(f"{mid}: source committed (libvirt moved the VM to {entry.peer})")
                if send_decision(host, committed, None, connect):
                    done.append(f"{mid}: target acknowledged the commit")
            elif entry.step in (SourceStep.STARTED, SourceStep.MOVING):
                aborted = abort_source(host, entry, "the source restarted before the commit point")
                done.append(f"{mid}: source aborted (vAIK active here)")
                if entry.step is SourceStep.MOVING:
                    send_decision(host, aborted, None, connect)
            elif entry.step is SourceStep.COMMITTED and send_decision(host, entry, None, connect):
                done.append(f"{mid}: target acknowledged the commit")
        elif entry.step is TargetStep.EXGKEY:
            with host.lock:
                if host.live:
                    continue  # a session may be arming this VM again: settle it on a later pass
                _release(host, entry)
                host.j.write(entry.at(TargetStep.DISCARDED, reason="no vAIK arrived"))
            done.append(f"{mid}: target discarded its ExgKey and released the VM")
        elif entry.step is TargetStep.PENDING:
            outcome = _ask_source(host, entry, connect)
            if outcome == "committed":
                settle(host, mid, "commit")
                done.append(f"{mid}: target activated the vAIK (source committed)")
            elif outcome == "aborted":
                settle(host, mid, "abort")
                done.append(f"{mid}: target discarded the pending vAIK (source aborted)")
    for line in done:
        log.info("migration recovery: %s", line)
    return done
