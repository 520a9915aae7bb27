"""Host-to-host migration of a VM's vAIK (patent 1-3 / 2-2; ARCHITECTURE.md §3, invariant 2).

Layers: :mod:`.codec` (pure frames) → :mod:`.protocol` (typed messages) → :mod:`.channel`
(mTLS, the fleet CA as only trust anchor) → :mod:`.verify` (pure checks of CertExgKey) →
:mod:`.journal` (steps as store records) → :mod:`.source` / :mod:`.target` (the two state
machines) → :mod:`.recovery` → :mod:`.service` (listener, recovery loop, control socket; a
daemon component) → :mod:`.cli`. :mod:`.state` is the query the attestation service asks
before every signature (:func:`signing_allowed`).

Commit point and why a vAIK signs on at most one host, and ends up on exactly one
---------------------------------------------------------------------------------
**The source decides, and is authoritative until it commits.** The commit point is the store
transaction on the source that writes its journal step COMMITTED *and* deletes its vAIK and
binding records. Before it, the outcome is "abort" whenever anything goes wrong; after it, the
outcome is "commit" forever (the store is rollback-protected, so the step cannot be undone by
putting an old database back).

Signing states (``vaik/<uuid>`` record ``state``, changed in the same transaction as the journal
step that implies it):

* source: ``active`` until MOVING; ``moving`` (does not sign) from MOVING, which is durable
  *before* TPM2_Duplicate runs; back to ``active`` only with ABORTED; gone with COMMITTED.
* target: ``pending`` (does not sign) from PENDING (durable before it tells the source it
  imported); ``active`` only with ACTIVE, which it writes only on the source's commit.

So the vAIK signs on the source only before MOVING or after ABORTED, and on the target only
after the source's COMMITTED. ABORTED and COMMITTED exclude each other in the source's journal
(:func:`~host_agent.migration.source.abort_source` refuses a committed entry), hence never on
two hosts at once, whatever crashes where.

How each side learns the outcome: live, the source sends ``Decision`` on the migration
connection and the target answers ``Done``. After a crash or a broken connection, the source's
recovery re-sends the decision of a COMMITTED entry until the target answers ``Done`` (then
DONE); the target's recovery asks the source (``OutcomeQuery``) about a PENDING entry. The
source answers from its journal: ``committed`` (COMMITTED, DONE), ``aborted`` (ABORTED, or no
record: a source keeps a COMMITTED record until the target acknowledged, so no record never
hides a commit), ``undecided`` (a live session still runs it; ask again). The source aborts
instead of waiting whenever it is unsure *before* the commit point: a restart in STARTED or
MOVING aborts (recovery table in :mod:`.recovery`), except a VM migration left MOVING, whose
recovery first asks this host's libvirt: the VM moved (the target checked the vAIK-signed record
before its QEMU ran) → commit; still here → abort; libvirt busy or unreachable → ask again. A
live session that fails once the target accepted the VM's state asks libvirt the same way
before it aborts (``SourceMigration._placement_after``), and leaves an answer libvirt cannot
give yet to recovery (``MigrationInDoubt``).

Exactly one after recovery: a source entry ends ABORTED (vAIK active on the source; the target
then discards its copy, told or asking) or DONE (the target acknowledged ACTIVE). A target
entry in EXGKEY is discarded at once (the source cannot have committed: it commits only after
``Imported``, sent only after PENDING is durable). While the source is unreachable a PENDING
target waits, and a committed source keeps telling the target: the vAIK then signs nowhere
for that while, which invariant 2 allows ("at most one at any moment"); it is lost by neither.

Steps (3)/(4) (:mod:`.record`): after ``Imported`` and before the commit point the source sends
a record signed by the vAIK (memory root of the stream, vPCRs, state digests; from
``MigrationHost.record_source``) and the target checks the signature with the imported vAIK's
public key, then the loaded VM (``MigrationHost.record_check``); a veto aborts, so the source
keeps the VM and the vAIK.

A running VM (:mod:`.vm`): with ``vtpm-host vm migrate DOMAIN --to HOST --libvirt-uri URI``
the Offer says ``with_vm``; the target arms the VM (swtpm for incoming state, a bridge on the
domain's TPM socket) and routes its SET_STATEBLOBs to the check; the source routes its
GET_STATEBLOBs to the capture, and once the target's ExgKey passed its checks starts libvirt's
peer-to-peer live migration (pre-copy overlaps the vAIK's duplication and import): at the final
stop the source hashes the guest memfd, reads the vPCRs and keeps the
state blobs' digests; the vAIK signs that record; the target's hooks, before the VM runs,
compare the loaded memory's root and the blobs' digests with it and veto on a difference (the
incoming QEMU fails, libvirt resumes the source VM, the source aborts and keeps the vAIK). The
commit waits for libvirt's migration to end; then the target writes the VM's adoption record
(from the domain XML libvirt brought), so its attestation component serves the VM's channel
(a target restarted after ACTIVE writes it at start if missing). The target lets the armed VM
go only with a decision: a session cut off while PENDING keeps it armed until the source's
decision arrives (:func:`.target.settle`), since libvirt may run it there already.
tests/e2e/test_migration_libvirt.py runs it between two namespace hosts, each with its own
libvirtd: the tenant enrolled on the source attests on the target with the same enrollment
(same vAIK public key, the target's AuthKey and AIK certificate), and the source refuses the
VM (``attest.not_enrolled``).

Plain ``virsh migrate`` (:mod:`.hook`): libvirt's qemu hook on the target asks its daemon to
expect the VM; the daemon *pulls* it from the peer holding its vAIK (``Pull`` on the peer
channel), and that source runs the protocol above on the same connection, every check included,
with "wait for the libvirt job someone else started to end" (:mod:`.libvirt_job`) in place of
starting libvirt. The hook lets libvirt go on once the VM is armed and its vAIK pending here; a
refusal fails the hook, so libvirt fails the migration before the target's QEMU starts.

Not built yet (issue 8, what is missing and where it goes):

* the root of the migration *stream* (a tee of the stream into ``host_agent.memory``,
  docs/NOTES.md: the source memfd can differ from the stream by a few pages for a busy guest);
  the record carries the source memfd's root at the final stop, which equals the stream for an
  idle guest;
* the fleet-approved ``PolicyDuplicationSelect(Name(ExgKey))`` of docs/NOTES.md: it changes the
  vAIK policy in ``host_agent/tpm`` and ``evidence.tpm2_policy.vaik_policy`` and needs an
  online registrar approval per migration, so it is not contained in this package; the
  source's checks here (:func:`~host_agent.migration.verify.verify_exgkey_offer`) are what
  stands between the vAIK and a parent of an attacker's choice until then;
* journal records stay after they are terminal (a source may forget DONE/ABORTED records at
  will, answering "aborted" stays right; a target must keep ACTIVE ones until its source is
  DONE, or the source's re-sent commit finds nothing to acknowledge).
"""

from __future__ import annotations

from .errors import (
    CertExgKeyInvalid,
    CertExgKeyNonce,
    ExgKeyAttributes,
    ExgKeyPolicy,
    FrameError,
    MigrationError,
    MigrationInDoubt,
    PeerAborted,
    PeerProtocolError,
    PeerUnavailable,
    TargetIdentityMismatch,
    TargetNotAdmitted,
    TargetRefused,
    VaikNotMovable,
    VaikRefused,
)
from .journal import JournalEntry, SourceStep, StoreJournal, TargetStep
from .record import MigrationRecord, RecordRefused
from .state import (
    VaikNotSignable,
    VaikState,
    require_signing_allowed,
    signing_allowed,
    vaik_state,
)

__all__ = [
    "CertExgKeyInvalid",
    "CertExgKeyNonce",
    "ExgKeyAttributes",
    "ExgKeyPolicy",
    "FrameError",
    "JournalEntry",
    "MigrationError",
    "MigrationInDoubt",
    "MigrationRecord",
    "PeerAborted",
    "PeerProtocolError",
    "PeerUnavailable",
    "RecordRefused",
    "SourceStep",
    "StoreJournal",
    "TargetIdentityMismatch",
    "TargetNotAdmitted",
    "TargetRefused",
    "TargetStep",
    "VaikNotMovable",
    "VaikNotSignable",
    "VaikRefused",
    "VaikState",
    "require_signing_allowed",
    "signing_allowed",
    "vaik_state",
]
