"""Offline checks of save images and snapshot memory files against their sealed records.

- :func:`verify_image` (``vtpm-host image verify FILE --json``): parse the file with
  :mod:`host_agent.memory` (a migration stream, a libvirt save image or a snapshot memory file),
  take its ``tpm-emulator`` blobs, find the sealed record by their digests, and compare the
  memory root. Prints ``{"verdict": "match"|"mismatch"|"no-record", "differing_pages":
  [[first, last], …], "record": <id or null>, "reason": …}``. Nothing is changed.
- :func:`adopt_image_state` (``vtpm-host vm adopt-state DOMAIN FILE``, run by the daemon, which
  holds the store): the operator's explicit path for a state made without the agent — seal a
  record (origin ``"adopted"``) for the image's memory and vTPM state, so that a restore of it
  then passes the usual verification.

Which memory is compared: the sealed record names its RAM blocks (the VM's main RAM, the
memfd the agent hashes at save and restore); the same blocks are taken from the file. A file
without a ``tpm-emulator`` section cannot be matched to a record (``no-record``).
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, ClassVar

from evidence.errors import VtpmError
from host_agent.lifecycle.restore import compare_memory
from host_agent.lifecycle.seal import (
    PERMANENT,
    SAVESTATE,
    VOLATILE,
    SealedBlob,
    SealedState,
    list_sealed,
    load_leaves,
    put_sealed,
)
from host_agent.memory.merkle import LeafSet
from host_agent.memory.migstream import TpmEmulatorState
from host_agent.memory.sources import HashResult, hash_source
from host_agent.store import TrustedStore

__all__ = ["ImageVerdict", "NoTpmState", "adopt_image_state", "main_ram", "verify_image"]


class NoTpmState(VtpmError):
    """The file carries no ``tpm-emulator`` section (not a save of a VM with a vTPM)."""

    id: ClassVar[str] = "lifecycle.image.no_tpm_state"


@dataclass(frozen=True)
class ImageVerdict:
    verdict: str  # "match" | "mismatch" | "no-record"
    differing_pages: tuple[tuple[int, int], ...]
    record: str | None
    reason: str
    vm_uuid: str | None = None

    def as_json(self) -> dict[str, Any]:
        return {
            "verdict": self.verdict,
            "differing_pages": [[a, b] for a, b in self.differing_pages],
            "record": self.record,
            "reason": self.reason,
            "vm_uuid": self.vm_uuid,
        }


def main_ram(leaves: LeafSet) -> LeafSet:
    """The largest RAM block of a stream (guest RAM, beside ROMs and ACPI tables)."""
    if not leaves.blocks:
        return leaves
    biggest = max(leaves.blocks, key=lambda b: b.pages)
    return leaves.select([biggest.name])


def _tpm_of(result: HashResult, path: Path) -> TpmEmulatorState:
    if result.tpm_state is None:
        raise NoTpmState(f"{path}: no tpm-emulator section (a VM without a vTPM?)")
    return result.tpm_state


def verify_image(
    store: TrustedStore, path: Path, *, host_id: str, workers: int | None = None
) -> ImageVerdict:
    """Check one image against the sealed records of this host (see the module docstring).

    Raises:
        MemorySourceError, ParseError: the file cannot be read or parsed.
    """
    result = hash_source(str(path), workers=workers)
    tpm = result.tpm_state
    if tpm is None:
        return ImageVerdict("no-record", (), None, f"{path}: no tpm-emulator section")
    perm = hashlib.sha256(tpm.permanent).hexdigest()
    vol = hashlib.sha256(tpm.volatile).hexdigest()
    found = [
        s for s in list_sealed(store) if s.blob(PERMANENT).sha256 == perm and s.host_id == host_id
    ]
    if not found:
        return ImageVerdict(
            "no-record", (), None, f"no sealed record on host {host_id!r} holds this vTPM state"
        )
    best: tuple[SealedState, Any] | None = None
    for sealed in sorted(found, key=lambda s: s.blob(VOLATILE).sha256 != vol):
        verdict = compare_memory(
            result.leaves, sealed, functools.partial(load_leaves, store, sealed.record_id)
        )
        state_ok = sealed.blob(VOLATILE).sha256 == vol
        if verdict.match and state_ok:
            return ImageVerdict("match", (), sealed.record_id, "memory and vTPM state match",
                                sealed.vm_uuid)  # fmt: skip
        if best is None:
            reason = verdict.reason if not verdict.match else (
                f"the VOLATILE vTPM state differs from record {sealed.record_id}"
            )  # fmt: skip
            best = (sealed, (verdict.differing_pages, reason))
    assert best is not None
    sealed, (pages, reason) = best
    return ImageVerdict("mismatch", tuple(pages), sealed.record_id, reason, sealed.vm_uuid)


def adopt_image_state(
    store: TrustedStore,
    path: Path,
    *,
    vm_uuid: str,
    vm_name: str,
    host_id: str,
    now: datetime,
    workers: int | None = None,
) -> SealedState:
    """Seal a record for an image made without the agent (the operator's decision).

    Raises:
        NoTpmState: the file has no vTPM state.
        MemorySourceError, ParseError: the file cannot be read or parsed.
    """
    result = hash_source(str(path), workers=workers)
    tpm = _tpm_of(result, path)
    leaves = main_ram(result.leaves)
    sealed = SealedState(
        record_id=f"{vm_uuid}.{int(now.timestamp() * 1e9)}",
        vm_uuid=vm_uuid,
        vm_name=vm_name,
        host_id=host_id,
        sealed_at=now.isoformat(),
        origin="adopted",
        memory_root=leaves.root(),
        layout=leaves.layout,
        hash_mode="image",
        blobs={
            PERMANENT: SealedBlob(PERMANENT, tpm.permanent, tpm.permanent_flags),
            VOLATILE: SealedBlob(VOLATILE, tpm.volatile, tpm.volatile_flags),
            SAVESTATE: SealedBlob(SAVESTATE, tpm.savestate, tpm.savestate_flags),
        },
        extra={"adopted_from": str(path)},
    )
    put_sealed(store, sealed, leaves)
    return sealed
