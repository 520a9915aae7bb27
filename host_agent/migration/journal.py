"""The migration journal: every protocol step is a store record written BEFORE its effect.

One record per migration and side, ``journal/<migration id>-<side>``, rewritten at each step in
the same store transaction as that step's change to the vAIK records (so a crash leaves either
the old step with the old records or the new step with the new ones; the store is
rollback-protected, so neither side can be put back to an earlier step).

The steps are enums, in protocol order; crash tests iterate over them
(``tests/sim/test_migration_crash.py``). What each step's record is written before:

=================  =================================================================  ========
step               written before (its effect), in the same transaction as             terminal
=================  =================================================================  ========
SourceStep
  STARTED          the Offer (nonce) is sent                                          no
  MOVING           TPM2_Duplicate + Transfer; vAIK record → ``moving`` (stops signing) no
  COMMITTED        Decision(commit) is sent; vAIK and binding records deleted          no
  ABORTED          Decision(abort) is sent; vAIK record → ``active`` again             yes
  DONE             (after the target's Done) nothing left to do                        yes
TargetStep
  EXGKEY           ExgKeyOffer is sent (the ExgKey's wrapped blob is in the record)     no
  PENDING          Imported is sent; vAIK record written ``pending`` + binding          no
  ACTIVE           Done is sent; vAIK record → ``active`` (signs here from now on)      yes
  DISCARDED        Done is sent; pending vAIK and binding records deleted               yes
=================  =================================================================  ========

:class:`StoreJournal` is the one real adapter of the :class:`Journal` port; tests wrap it (a
wrapper that SIGKILLs its own process right after step N is durable: ``KillAtStep`` in the sim
tier, :class:`~host_agent.migration.faults.FaultJournal` inside the daemon, switched on by
``settings.json`` ``test_kill_at``). :func:`parse_side_step` reads a ``SIDE:STEP`` name.
"""

from __future__ import annotations

import enum
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Protocol

__all__ = [
    "TERMINAL",
    "Journal",
    "JournalEntry",
    "SourceStep",
    "StoreJournal",
    "TargetStep",
    "parse_side_step",
]


class SourceStep(enum.Enum):
    STARTED = "started"
    MOVING = "moving"
    COMMITTED = "committed"
    ABORTED = "aborted"
    DONE = "done"


class TargetStep(enum.Enum):
    EXGKEY = "exgkey"
    PENDING = "pending"
    ACTIVE = "active"
    DISCARDED = "discarded"


TERMINAL: frozenset[SourceStep | TargetStep] = frozenset(
    {SourceStep.ABORTED, SourceStep.DONE, TargetStep.ACTIVE, TargetStep.DISCARDED}
)

Side = Literal["source", "target"]


def parse_side_step(text: object) -> tuple[Side, SourceStep | TargetStep]:
    """``"source:moving"`` → ``("source", SourceStep.MOVING)``.

    Raises:
        ValueError: not a string ``SIDE:STEP`` with a side and one of that side's steps (the
            message names what was expected and what arrived).
    """
    if not isinstance(text, str):
        raise ValueError(f"expected a string SIDE:STEP, got {type(text).__name__} {text!r}")
    side, sep, step = text.partition(":")
    if not sep or side not in ("source", "target"):
        raise ValueError(f"expected SIDE:STEP with SIDE source or target, got {text!r}")
    steps: type[SourceStep] | type[TargetStep] = SourceStep if side == "source" else TargetStep
    try:
        found = steps(step)
    except ValueError:
        names = ", ".join(s.value for s in steps)
        raise ValueError(f"expected a {side} step ({names}), got {step!r}") from None
    return ("source" if side == "source" else "target"), found


@dataclass(frozen=True)
class JournalEntry:
    """One side's journal of one migration.

    Attributes:
        migration_id: chosen by the source.
        side: ``"source"`` or ``"target"``.
        step: the last step made durable.
        vm_uuid: the VM whose vAIK moves.
        peer: the other host's id (and ``peer_address`` how to reach it, source only).
        data: step data (the nonce, the ExgKey blob, the reason of an abort …).
    """

    migration_id: uuid.UUID
    side: Side
    step: SourceStep | TargetStep
    vm_uuid: uuid.UUID
    peer: str
    peer_address: str = ""
    data: Mapping[str, Any] = field(default_factory=dict)

    @property
    def record_id(self) -> str:
        return f"{self.migration_id}-{self.side}"

    @property
    def terminal(self) -> bool:
        return self.step in TERMINAL

    def at(self, step: SourceStep | TargetStep, **data: Any) -> JournalEntry:
        """This entry at ``step``, with ``data`` merged in."""
        expected = SourceStep if self.side == "source" else TargetStep
        if not isinstance(step, expected):
            raise TypeError(f"a {self.side} journal takes {expected.__name__}, not {step!r}")
        return replace(self, step=step, data={**self.data, **data})

    def to_json(self) -> dict[str, Any]:
        return {
            "migration_id": str(self.migration_id),
            "side": self.side,
            "step": self.step.value,
            "vm_uuid": str(self.vm_uuid),
            "peer": self.peer,
            "peer_address": self.peer_address,
            "data": dict(self.data),
        }

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> JournalEntry:
        side = obj["side"]
        steps = SourceStep if side == "source" else TargetStep
        return cls(
            migration_id=uuid.UUID(obj["migration_id"]),
            side=side,
            step=steps(obj["step"]),
            vm_uuid=uuid.UUID(obj["vm_uuid"]),
            peer=str(obj["peer"]),
            peer_address=str(obj.get("peer_address", "")),
            data=dict(obj.get("data", {})),
        )


Changes = Callable[[Any], None]
"""Extra store changes made in the journal step's transaction (given the transaction)."""


class Journal(Protocol):
    """The migration journal port."""

    def write(self, entry: JournalEntry, changes: Changes | None = None) -> JournalEntry:
        """Make ``entry`` (and ``changes``) durable in one transaction; return ``entry``."""
        ...

    def get(self, migration_id: uuid.UUID, side: Side) -> JournalEntry | None: ...

    def entries(self) -> list[JournalEntry]: ...

    def open_entries(self) -> list[JournalEntry]:
        """Entries not in a terminal step (what recovery must settle)."""
        ...


class _Store(Protocol):
    def find(self, record_type: str, record_id: str) -> Any: ...

    def record_ids(self, record_type: str) -> list[str]: ...

    def transaction(self) -> Any: ...


class StoreJournal:
    """The journal in the trusted store (record type ``journal``)."""

    RECORD_TYPE = "journal"

    def __init__(self, store: _Store) -> None:
        self.store = store

    def write(self, entry: JournalEntry, changes: Changes | None = None) -> JournalEntry:
        with self.store.transaction() as tx:
            tx.put(self.RECORD_TYPE, entry.record_id, entry.to_json())
            if changes is not None:
                changes(tx)
        return entry

    def get(self, migration_id: uuid.UUID, side: Side) -> JournalEntry | None:
        record = self.store.find(self.RECORD_TYPE, f"{migration_id}-{side}")
        return None if record is None else JournalEntry.from_json(record.json())

    def entries(self) -> list[JournalEntry]:
        out = []
        for rid in self.store.record_ids(self.RECORD_TYPE):
            record = self.store.find(self.RECORD_TYPE, rid)
            if record is not None:
                out.append(JournalEntry.from_json(record.json()))
        return out

    def open_entries(self) -> list[JournalEntry]:
        return [e for e in self.entries() if not e.terminal]
