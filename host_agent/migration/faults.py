"""Test-only fault injection: the daemon SIGKILLs itself right after a journal step is durable.

``<state_dir>/migration/settings.json`` ``{"test_kill_at": "source:moving"}`` (``SIDE:STEP``, the
values of :class:`~host_agent.migration.journal.SourceStep` / ``TargetStep``) makes the
migration service kill its own process with SIGKILL right after that step's journal record, and
the vAIK change made in the same transaction, are durable: before the step's effect (the message
it precedes). It is the point ``KillAtStep`` of ``tests/sim/test_migration_crash.py`` uses, here
inside the real daemon, so ``tests/e2e/test_migration_crash_vm.py`` crashes a host in the middle
of a live migration of a real VM.

A few crash points are not journal steps (:data:`POINTS`, ``SIDE:NAME``); the service calls
:meth:`FaultJournal.point` there. ``source:vm-moved``: the source, after the target's Verdict and
libvirt's end of the VM's migration, before its COMMITTED (no journal write lies between).

The setting is re-read before every journal write (tests switch it on and off without a restart;
a journal write is a few per migration), so a test replaces the file in one step (write a
temporary file, rename it). A bad value is a :class:`FaultSettingError` raised *before* the
write, so it changes nothing; a daemon whose setting is bad at start does not start. No setting
(no file, no key, ``null``): no fault.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from .errors import MigrationError
from .journal import Changes, Journal, JournalEntry, Side, SourceStep, TargetStep, parse_side_step

__all__ = [
    "POINTS",
    "FaultJournal",
    "FaultSettingError",
    "JournalWrapper",
    "KillAt",
    "read_kill_at",
]

log = logging.getLogger("host_agent.migration.faults")

SETTING = "test_kill_at"

#: The crash points that are not journal steps (``SIDE:NAME`` → where the service stops).
POINTS: dict[str, str] = {
    "source:vm-moved": (
        "the source, after the target's Verdict and libvirt's end of the VM's migration, "
        "before COMMITTED"
    ),
}


class FaultSettingError(MigrationError):
    """``settings.json`` ``test_kill_at`` is not ``SIDE:STEP`` (or the file is not a JSON object).

    Attributes:
        expected, got: what the setting must be and what the file holds.
    """

    id: ClassVar[str] = "migration.fault_setting"

    def __init__(self, path: Path, expected: str, got: str) -> None:
        self.path = path
        self.expected = expected
        self.got = got
        super().__init__(f"{path}: {SETTING}: expected {expected}, got {got}")


@dataclass(frozen=True)
class KillAt:
    """SIGKILL right after ``side``'s journal reached ``step``, or at the point named ``step``
    (a name in :data:`POINTS`)."""

    side: Side
    step: SourceStep | TargetStep | str

    def matches(self, entry: JournalEntry) -> bool:
        return entry.side == self.side and entry.step is self.step

    def __str__(self) -> str:
        return f"{self.side}:{self.step if isinstance(self.step, str) else self.step.value}"


def read_kill_at(settings_path: Path) -> KillAt | None:
    """The fault ``settings_path`` asks for, None for none.

    Raises:
        FaultSettingError: the file is not a JSON object, or ``test_kill_at`` is neither absent,
            null, ``SIDE:STEP`` nor one of :data:`POINTS`.
    """
    try:
        text = Path(settings_path).read_text()
    except FileNotFoundError:
        return None
    except OSError as err:
        raise FaultSettingError(settings_path, "a readable settings file", str(err)) from err
    try:
        doc = json.loads(text)
    except ValueError as err:
        raise FaultSettingError(settings_path, "a JSON object", f"invalid JSON ({err})") from err
    if not isinstance(doc, dict):
        raise FaultSettingError(settings_path, "a JSON object", type(doc).__name__)
    value = doc.get(SETTING)
    if value is None:
        return None
    if value in POINTS:
        side, _, name = str(value).partition(":")
        return KillAt("source" if side == "source" else "target", name)
    try:
        side, step = parse_side_step(value)
    except ValueError as err:
        expected = f"SIDE:STEP or a point ({', '.join(POINTS)})"
        raise FaultSettingError(settings_path, expected, str(err)) from err
    return KillAt(side, step)


def _die(where: str) -> None:
    log.critical("TEST HOOK %s: SIGKILL of this process (pid %d) %s", SETTING, os.getpid(), where)
    for handler in logging.getLogger().handlers:
        handler.flush()
    os.kill(os.getpid(), signal.SIGKILL)


class JournalWrapper:
    """The journal port round a real journal, passing every call on to it; a wrapper that
    injects a fault overrides the call it changes (:class:`FaultJournal`, the tests' crashes)."""

    def __init__(self, real: Journal) -> None:
        self.real = real

    def write(self, entry: JournalEntry, changes: Changes | None = None) -> JournalEntry:
        return self.real.write(entry, changes)

    def get(self, migration_id: uuid.UUID, side: Side) -> JournalEntry | None:
        return self.real.get(migration_id, side)

    def entries(self) -> list[JournalEntry]:
        return self.real.entries()

    def open_entries(self) -> list[JournalEntry]:
        return self.real.open_entries()


class FaultJournal(JournalWrapper):
    """The journal port round a real journal, killing this process at ``settings.json``'s
    ``test_kill_at`` (see the module docstring)."""

    def __init__(self, real: Journal, settings_path: Path) -> None:
        super().__init__(real)
        self.settings_path = Path(settings_path)
        read_kill_at(self.settings_path)  # a bad setting stops the daemon at start, not later

    def write(self, entry: JournalEntry, changes: Changes | None = None) -> JournalEntry:
        kill_at = read_kill_at(self.settings_path)  # a bad setting fails before anything changes
        out = self.real.write(entry, changes)
        if kill_at is not None and kill_at.matches(entry):
            _die(f"after migration {entry.migration_id} reached {kill_at}")
        return out

    def point(self, name: str) -> None:
        """The crash point ``name`` (a key of :data:`POINTS`): SIGKILL if the setting names it.

        Raises:
            FaultSettingError: the setting is bad (nothing was done).
        """
        assert name in POINTS, name
        kill_at = read_kill_at(self.settings_path)
        if kill_at is not None and str(kill_at) == name:
            _die(f"at {name}")
