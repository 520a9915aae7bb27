"""Retention of sealed records: which ``seal/<id>`` records (and their leaves) may go.

Every save seals a record (:mod:`host_agent.lifecycle.seal`); without pruning they pile up. The
rule, per VM, keeps a record when any of these holds:

1. it is one of the ``keep`` newest records of its VM (``keep`` >= 1, so the record the VM was
   last saved into, the one an armed VM waits to be restored from, always stays);
2. a state file libvirt knows still holds its vTPM state: a managed save image
   (``<libvirt>/qemu/save/*.save``) or the memory file of an external snapshot
   (``<libvirt>/qemu/snapshot/<domain>/*.xml`` → ``<memory file=…>``), or a file the operator
   names (``--keep-image``). A file refers to a record when the PERMANENT and VOLATILE digests of
   its ``tpm-emulator`` section equal the record's (the restore's own matching);
3. it is pinned: a restore in flight uses it (:class:`~host_agent.lifecycle.restore.Restorer`).

Images saved with ``virsh save`` to an arbitrary path are not found by a scan; ``keep`` (and
``--keep-image``) is what protects them. A state file that cannot be read is not guessed at:
the pass keeps every record of that file's VM (or of every VM, when the file's VM is unknown)
and says so in ``unreadable``. Records that do not parse are left alone and reported.

Deleting a record and its leaves is one store transaction: a prune either happens as planned
or not at all.
"""

from __future__ import annotations

import hashlib
import logging
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from evidence.errors import UnsupportedError, VtpmError
from host_agent.lifecycle.embedded import embedded_root_of
from host_agent.lifecycle.seal import (
    LEAVES_RECORD,
    PERMANENT,
    SEAL_RECORD,
    VOLATILE,
    SealedState,
    SealRecordError,
)
from host_agent.memory.migstream import find_tpm_emulator_state
from host_agent.store import TrustedStore

__all__ = [
    "DEFAULT_KEEP",
    "AutoPrune",
    "InvalidRetention",
    "PrunePlan",
    "StateFile",
    "apply_plan",
    "libvirt_qemu_dir",
    "plan_prune",
    "prune",
    "prune_request",
    "read_records",
    "state_files",
    "tpm_digests_of",
]

log = logging.getLogger(__name__)

#: Records kept per VM besides those a state file still needs.
DEFAULT_KEEP = 3
#: The device state (with the ``tpm-emulator`` section) sits at the end of an uncompressed image.
TAIL_BYTES = 8 << 20


class InvalidRetention(VtpmError):
    """A retention setting outside its range (nothing was deleted)."""

    id: ClassVar[str] = "lifecycle.retention.invalid"


@dataclass(frozen=True)
class StateFile:
    """A file that may hold a saved vTPM state: why it is known, and for which domain."""

    path: Path
    kind: str  # "managed-save" | "snapshot" | "operator"
    domain: str | None = None


@dataclass
class PrunePlan:
    """What a prune keeps (record → reasons) and deletes, per the module's rule."""

    keep: dict[str, list[str]] = field(default_factory=dict)
    delete: list[str] = field(default_factory=list)
    vm_of: dict[str, str] = field(default_factory=dict)
    unreadable: list[dict[str, str]] = field(default_factory=list)
    malformed: list[str] = field(default_factory=list)

    def as_json(self, *, dry_run: bool) -> dict[str, Any]:
        return {
            "dry_run": dry_run,
            "deleted" if not dry_run else "would_delete": [
                {"record_id": r, "vm_uuid": self.vm_of.get(r)} for r in self.delete
            ],
            "kept": [
                {"record_id": r, "vm_uuid": self.vm_of.get(r), "why": why}
                for r, why in self.keep.items()
            ],
            "unreadable": self.unreadable,
            "malformed": self.malformed,
        }


def libvirt_qemu_dir(uri: str) -> Path | None:
    """Where libvirt keeps managed saves and snapshot metadata for ``uri`` (None: not known)."""
    root = embedded_root_of(uri)
    if root is not None:
        return root / "lib" / "qemu"
    if uri.split("?", 1)[0] in ("qemu:///system", "qemu+unix:///system"):
        return Path("/var/lib/libvirt/qemu")
    return None


def state_files(qemu_dir: Path | None, extra: Iterable[Path] = ()) -> list[StateFile]:
    """Managed save images and external snapshot memory files libvirt knows, plus ``extra``.

    A snapshot metadata file that does not parse is skipped with a warning (libvirt's own file;
    its memory file, if any, is then protected only by ``keep``)."""
    found = [StateFile(Path(p), "operator") for p in extra]
    if qemu_dir is None:
        return found
    save_dir = qemu_dir / "save"
    if save_dir.is_dir():
        found += [
            StateFile(p, "managed-save", p.name.removesuffix(".save"))
            for p in sorted(save_dir.glob("*.save"))
        ]
    snap_dir = qemu_dir / "snapshot"
    if snap_dir.is_dir():
        for meta in sorted(snap_dir.glob("*/*.xml")):
            try:
                tree = ET.parse(meta)
            except (ET.ParseError, OSError) as err:
                log.warning("retention: snapshot metadata %s unreadable: %s", meta, err)
                continue
            for mem in tree.iter("memory"):
                if mem.get("snapshot") == "external" and mem.get("file"):
                    found.append(
                        StateFile(Path(str(mem.get("file"))), "snapshot", meta.parent.name)
                    )
    return found


def tpm_digests_of(path: Path) -> tuple[str, str] | None:
    """The SHA-256 of the PERMANENT and VOLATILE blobs of ``path``'s ``tpm-emulator`` section.

    Reads only the file's tail when the section is there (uncompressed images); otherwise parses
    the whole file as the restore would (compressed formats), if it is a libvirt save image or a
    migration stream at all. None: the file has no vTPM state.

    Raises:
        OSError: the file cannot be read; UnsupportedError: neither a save image nor a stream;
        VtpmError (ParseError, MemorySourceError): a stream we cannot parse.
    """
    with open(path, "rb") as f:
        size = f.seek(0, 2)
        start = max(0, size - TAIL_BYTES)
        f.seek(start)
        tail = f.read()
        f.seek(0)
        head = f.read(16)
    state = find_tpm_emulator_state(tail, base=start)
    if state is None:
        from host_agent.memory.sources import detect_kind, hash_source

        if detect_kind(head) not in ("save-image", "stream"):
            raise UnsupportedError(
                str(path), 0, "a libvirt save image or a QEMU migration stream", "other bytes"
            )
        state = hash_source(str(path)).tpm_state
    if state is None:
        return None
    return hashlib.sha256(state.permanent).hexdigest(), hashlib.sha256(state.volatile).hexdigest()


def plan_prune(
    records: Sequence[SealedState],
    *,
    keep: int = DEFAULT_KEEP,
    files: Sequence[StateFile] = (),
    pinned: Iterable[str] = (),
    vm_uuid: str | None = None,
    vm_names: dict[str, str] | None = None,
    malformed: Sequence[str] = (),
) -> PrunePlan:
    """Decide per the module's rule (no store access except reading ``files``' tails).

    Args:
        records: the sealed records (any order).
        keep: newest records kept per VM, >= 1.
        files: state files to protect (see :func:`state_files`).
        pinned: record ids that must stay (a restore in flight).
        vm_uuid: consider only this VM's records.
        vm_names: VM UUID → domain name, to tie an unreadable file to its VM.
        malformed: ids of records that did not parse (always kept, reported).

    Raises:
        InvalidRetention: ``keep`` < 1.
    """
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        raise InvalidRetention(
            f"keep must be an integer >= 1 (the newest record of a VM always stays), got {keep!r}"
        )
    plan = PrunePlan(malformed=list(malformed))
    mine = [r for r in records if vm_uuid is None or r.vm_uuid == vm_uuid]
    plan.vm_of = {r.record_id: r.vm_uuid for r in mine}
    by_vm: dict[str, list[SealedState]] = {}
    for r in mine:
        by_vm.setdefault(r.vm_uuid, []).append(r)
    reasons: dict[str, list[str]] = {r.record_id: [] for r in mine}
    for recs in by_vm.values():
        recs.sort(key=lambda r: r.sealed_at, reverse=True)
        for r in recs[:keep]:
            reasons[r.record_id].append(f"one of the {keep} newest of its VM")
    for rid in pinned:
        if rid in reasons:
            reasons[rid].append("a restore in flight uses it")
    names = vm_names or {}
    by_digest: dict[tuple[str, str], list[SealedState]] = {}
    for r in mine:
        key = (r.blob(PERMANENT).sha256, r.blob(VOLATILE).sha256)
        by_digest.setdefault(key, []).append(r)
    for f in files:
        try:
            digests = tpm_digests_of(f.path)
        except FileNotFoundError:
            continue  # a snapshot whose memory file is gone needs nothing
        except (OSError, VtpmError) as err:
            owners = [u for u, n in names.items() if f.domain is not None and n == f.domain]
            plan.unreadable.append({"file": str(f.path), "kind": f.kind, "error": str(err)})
            for r in mine:
                if not owners or r.vm_uuid in owners:
                    reasons[r.record_id].append(f"{f.kind} {f.path} could not be read")
            continue
        for r in by_digest.get(digests, []) if digests else []:
            reasons[r.record_id].append(f"{f.kind} {f.path} holds its state")
    for r in sorted(mine, key=lambda r: (r.vm_uuid, r.sealed_at), reverse=True):
        if reasons[r.record_id]:
            plan.keep[r.record_id] = reasons[r.record_id]
        else:
            plan.delete.append(r.record_id)
    return plan


def read_records(store: TrustedStore) -> tuple[list[SealedState], list[str]]:
    """Every sealed record, and the ids of those that do not parse."""
    good, bad = [], []
    for rec in store.list_records(SEAL_RECORD):
        try:
            good.append(SealedState.from_json(rec.json()))
        except (SealRecordError, VtpmError, ValueError):
            bad.append(rec.record_id)
    return good, bad


def apply_plan(store: TrustedStore, plan: PrunePlan) -> None:
    """Delete the plan's records and their leaves in one store transaction."""
    if not plan.delete:
        return
    with store.transaction() as tx:
        for rid in plan.delete:
            tx.delete(SEAL_RECORD, rid)
            tx.delete(LEAVES_RECORD, rid, missing_ok=True)


def prune(
    store: TrustedStore,
    *,
    keep: int = DEFAULT_KEEP,
    files: Sequence[StateFile] = (),
    pinned: Iterable[str] = (),
    vm_uuid: str | None = None,
    vm_names: dict[str, str] | None = None,
    dry_run: bool = False,
) -> PrunePlan:
    """Plan and (unless ``dry_run``) apply a prune; see :func:`plan_prune` for the arguments."""
    records, malformed = read_records(store)
    plan = plan_prune(
        records,
        keep=keep,
        files=files,
        pinned=pinned,
        vm_uuid=vm_uuid,
        vm_names=vm_names,
        malformed=malformed,
    )
    if not dry_run:
        apply_plan(store, plan)
        if plan.delete:
            log.info("pruned %d sealed record(s): %s", len(plan.delete), ", ".join(plan.delete))
    return plan


class AutoPrune:
    """The daemon's prune after a verified restore or revert (``Restorer(after_restore=…)``).

    Prunes only the restored VM's records with :data:`DEFAULT_KEEP` (or ``keep``), keeping the
    record it was restored from and those of restores in flight, and protecting the VM's managed
    save and snapshot memory files. A failure is logged; it never touches the restore.
    """

    def __init__(
        self,
        store: TrustedStore,
        uri: str,
        *,
        keep: int = DEFAULT_KEEP,
        vm_name: Callable[[str], str | None] = lambda _u: None,
    ) -> None:
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise InvalidRetention(f"keep must be an integer >= 1, got {keep!r}")
        self.store = store
        self.qemu_dir = libvirt_qemu_dir(uri)
        self.keep = keep
        self.vm_name = vm_name
        self.last: PrunePlan | None = None

    def __call__(self, vm_uuid: str, record_id: str, pinned: frozenset[str]) -> PrunePlan:
        name = self.vm_name(vm_uuid) or None
        files = [
            f
            for f in state_files(self.qemu_dir)
            if name is None or f.domain is None or f.domain == name
        ]
        plan = prune(
            self.store,
            keep=self.keep,
            files=files,
            pinned=pinned | {record_id},
            vm_uuid=vm_uuid,
            vm_names={vm_uuid: name} if name else None,
        )
        self.last = plan
        log.info(
            "VM %s restored from %s: pruned %d old sealed record(s), kept %d",
            vm_uuid,
            record_id,
            len(plan.delete),
            len(plan.keep),
        )
        return plan


def prune_request(
    store: TrustedStore,
    uri: str,
    args: Mapping[str, Any],
    *,
    pinned: Iterable[str] = (),
    vm_names: dict[str, str] | None = None,
) -> dict[str, Any]:
    """The daemon's ``prune`` control op (and ``vtpm-host store prune`` without a daemon):
    ``{"keep": N, "dry_run": bool, "vm_uuid": str|None, "keep_images": [path, …]}``.

    Raises:
        InvalidRetention: a malformed argument (nothing deleted).
    """
    keep = args.get("keep", DEFAULT_KEEP)
    dry_run = args.get("dry_run", False)
    vm_uuid = args.get("vm_uuid")
    images = args.get("keep_images", [])
    if not isinstance(dry_run, bool):
        raise InvalidRetention(f"dry_run must be true or false, got {dry_run!r}")
    if vm_uuid is not None and (not isinstance(vm_uuid, str) or not vm_uuid):
        raise InvalidRetention(f"vm_uuid must be a VM UUID, got {vm_uuid!r}")
    if not isinstance(images, list) or not all(isinstance(p, str) and p for p in images):
        raise InvalidRetention(f"keep_images must be a list of paths, got {images!r}")
    plan = prune(
        store,
        keep=keep,
        files=state_files(libvirt_qemu_dir(uri), [Path(p) for p in images]),
        pinned=pinned,
        vm_uuid=vm_uuid,
        vm_names=vm_names,
        dry_run=dry_run,
    )
    return plan.as_json(dry_run=dry_run)
