"""Issue 8: a VM migration's source that dies after the target checked the VM and before its
COMMITTED: recovery asks the source's libvirt where the VM is, and decides only on an answer.

Two real hosts in this process (software-root swtpms, stores, mTLS on loopback:
``test_migration_protocol.pair_factory``); the VM side is the protocol's own ports
(``record_source``, ``prepare_incoming``, ``record_check``, ``end_incoming``), its calls
recorded. libvirt is libvirt's own test driver (``test:///FILE``: a node described by a file,
the VM running, shut off, or not there) or a socket nobody listens on.

The crash: the source's journal raises (a ``BaseException``, as a SIGKILL leaves no handler
running) right before it would write COMMITTED, so the source's entry stays MOVING, its vAIK
``moving``; the connection closes, the target's session is cut off with its entry PENDING.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from host_agent.migration import SourceStep, TargetStep, VaikState, vaik_state
from host_agent.migration.faults import JournalWrapper
from host_agent.migration.journal import Changes, Journal, JournalEntry
from host_agent.migration.libvirt_job import vm_placement
from host_agent.migration.source import migrate_vaik
from tests.sim.test_migration_hosts import VM
from tests.sim.test_migration_protocol import (  # noqa: F401 (fixtures)
    Pair,
    _record,
    fleet,
    hosts,
    pair_factory,
)


class _Crash(BaseException):
    """The source 'dies' here (nothing of it catches a BaseException before the commit)."""


class CrashBefore(JournalWrapper):
    """The real journal, raising :class:`_Crash` instead of writing ``step``."""

    def __init__(self, real: Journal, step: SourceStep) -> None:
        super().__init__(real)
        self.step = step

    def write(self, entry: JournalEntry, changes: Changes | None = None) -> JournalEntry:
        if entry.step is self.step:
            raise _Crash(f"crash before {self.step.value}")
        return super().write(entry, changes)


def _libvirt_node(path: Path, state: str | None) -> str:
    """A ``test:///`` URI whose node holds the VM ``running``, ``shut off``, or not (None)."""
    runstate = {"running": 1, "shut off": 5}
    domain = (
        ""
        if state is None
        else f"""<domain type='test' xmlns:test='http://libvirt.org/schemas/domain/test/1.0'>
          <name>vm</name><uuid>{VM}</uuid><memory>1024</memory><os><type>hvm</type></os>
          <test:runstate>{runstate[state]}</test:runstate></domain>"""
    )
    path.write_text(f"<node>{domain}</node>")
    return f"test://{path}"


def _states(pair: Pair) -> dict[str, VaikState]:
    return {
        "a": vaik_state(pair.source.host.store, VM),
        "b": vaik_state(pair.target.host.store, VM),
    }


def _steps(pair: Pair) -> tuple[list[SourceStep | TargetStep], list[SourceStep | TargetStep]]:
    return (
        [e.step for e in pair.source.host.j.entries()],
        [e.step for e in pair.target.host.j.entries()],
    )


def _crashed_after_the_verdict(pair: Pair, calls: list[tuple[Any, ...]]) -> None:
    """Run a VM migration whose source dies right before COMMITTED (after the Verdict)."""
    source, target = pair.source.host, pair.target.host
    target.prepare_incoming = lambda vm: calls.append(("prepare", vm))
    target.record_check = lambda record: calls.append(("check", record.vm_uuid))
    target.end_incoming = lambda vm, outcome: calls.append(("end", vm, outcome))
    real = source.j
    source.journal = CrashBefore(real, SourceStep.COMMITTED)
    host, port = pair.target.address
    with pytest.raises(_Crash):
        migrate_vaik(
            source, VM, target.host_id, f"{host}:{port}", connect=pair.source.connect,
            record_source=_record,
        )  # fmt: skip
    source.journal = real  # "restarted"
    deadline = time.monotonic() + 20
    while target.live:  # the target's session sees the connection close
        assert time.monotonic() < deadline, "the target's session did not end"
        time.sleep(0.05)


@pytest.mark.parametrize(("where", "owner"), [(None, "b"), ("shut off", "a")])
def test_source_dead_after_the_verdict_recovery_asks_its_libvirt(
    pair_factory: Callable[..., Pair],  # noqa: F811
    tmp_path: Path,
    where: str | None,
    owner: str,
) -> None:
    """libvirt unreachable, or refusing the query → nothing decided, nothing signs, the VM
    stays armed on the target; the VM gone from the source's libvirt (it migrated) → commit,
    the target activates and keeps the VM; the VM still here, no job → abort, the target
    discards and releases it."""
    pair = pair_factory()
    calls: list[tuple[Any, ...]] = []
    _crashed_after_the_verdict(pair, calls)
    # Cut off undecided: the target keeps the VM armed (no end_incoming), nothing signs.
    assert _steps(pair) == ([SourceStep.MOVING], [TargetStep.PENDING])
    assert _states(pair) == {"a": VaikState.MOVING, "b": VaikState.PENDING}
    assert calls == [("prepare", VM), ("check", VM)]
    [entry] = pair.source.host.j.entries()
    assert entry.data["with_vm"] is True

    unknown = {
        "unreachable": "qemu+unix:///system?socket=/nonexistent/libvirt-sock",
        # libvirt's test driver has no job statistics: a running VM's job cannot be read
        "query refused": _libvirt_node(tmp_path / "running.xml", "running"),
    }
    for why, uri in unknown.items():
        pair.source.host.vm_placement = lambda vm, uri=uri: vm_placement(uri, vm)
        assert pair.source.recover() == [], why
        assert pair.target.recover() == [], why  # the source answers "undecided"
        assert _steps(pair) == ([SourceStep.MOVING], [TargetStep.PENDING]), why
        assert _states(pair) == {"a": VaikState.MOVING, "b": VaikState.PENDING}, why
        assert calls == [("prepare", VM), ("check", VM)], why

    uri = _libvirt_node(tmp_path / "node.xml", where)
    pair.source.host.vm_placement = lambda vm: vm_placement(uri, vm)
    done = pair.source.recover()
    said = "source committed (libvirt moved the VM" if owner == "b" else "source aborted"
    assert any(said in line for line in done), done
    other = "a" if owner == "b" else "b"
    assert _states(pair) == {owner: VaikState.ACTIVE, other: VaikState.ABSENT}
    if owner == "b":
        assert _steps(pair) == ([SourceStep.DONE], [TargetStep.ACTIVE])
        assert calls[2:] == [("end", VM, "commit")]  # kept, its adoption record written
    else:
        assert _steps(pair) == ([SourceStep.ABORTED], [TargetStep.DISCARDED])
        assert calls[2:] == [("end", VM, "abort")]  # released
    assert pair.source.recover() == [] and pair.target.recover() == []


class _LibvirtLost(Exception):
    """What ``between`` raises: the session lost track of libvirt's job (a timeout, a broken
    connection) after the target had accepted the VM's state."""


@pytest.mark.parametrize(("where", "owner"), [(None, "b"), ("shut off", "a"), ("running", None)])
def test_a_live_session_failing_after_the_verdict_asks_libvirt_before_it_aborts(
    pair_factory: Callable[..., Pair],  # noqa: F811
    tmp_path: Path,
    where: str | None,
    owner: str | None,
) -> None:
    """The source's session fails after the target accepted the VM's state (libvirt may have
    finished the move anyway). The VM gone from the source's libvirt → the move commits and
    ``migrate_vaik`` returns; the VM still here, no job → abort, as before; libvirt cannot say
    (here: the test driver cannot report a running VM's job) → ``MigrationInDoubt``, the
    journal stays MOVING, the vAIK signs on neither host, and recovery settles it later."""
    from host_agent.migration.errors import MigrationInDoubt

    pair = pair_factory()
    source, target = pair.source.host, pair.target.host
    calls: list[tuple[Any, ...]] = []
    target.prepare_incoming = lambda vm: calls.append(("prepare", vm))
    target.record_check = lambda record: calls.append(("check", record.vm_uuid))
    target.end_incoming = lambda vm, outcome: calls.append(("end", vm, outcome))
    uri = _libvirt_node(tmp_path / "node.xml", where)
    source.vm_placement = lambda vm: vm_placement(uri, vm)

    def between(_channel: Any, _entry: Any) -> None:
        raise _LibvirtLost("no answer from libvirt's job within the timeout")

    host, port = pair.target.address
    run = lambda: migrate_vaik(  # noqa: E731
        source, VM, target.host_id, f"{host}:{port}", connect=pair.source.connect,
        record_source=_record, between=between,
    )  # fmt: skip
    if owner == "b":
        result = run()
        assert result.outcome == "committed"
    elif owner == "a":
        with pytest.raises(_LibvirtLost):
            run()
    else:
        with pytest.raises(MigrationInDoubt, match="cannot say yet whether the VM moved"):
            run()
    deadline = time.monotonic() + 20
    while target.live or (owner is not None and target.j.open_entries()):
        assert time.monotonic() < deadline, "the target did not settle"
        time.sleep(0.05)
    if owner is None:
        assert _steps(pair) == ([SourceStep.MOVING], [TargetStep.PENDING])
        assert _states(pair) == {"a": VaikState.MOVING, "b": VaikState.PENDING}
        assert calls == [("prepare", VM), ("check", VM)]  # still armed on the target
        # libvirt answers later: the VM moved → recovery commits.
        gone = _libvirt_node(tmp_path / "gone.xml", None)
        source.vm_placement = lambda vm: vm_placement(gone, vm)
        assert any("source committed" in line for line in pair.source.recover())
        owner = "b"
    other = "a" if owner == "b" else "b"
    assert _states(pair) == {owner: VaikState.ACTIVE, other: VaikState.ABSENT}
    if owner == "b":
        assert _steps(pair) == ([SourceStep.DONE], [TargetStep.ACTIVE])
        assert calls[2:] == [("end", VM, "commit")]
    else:
        assert _steps(pair) == ([SourceStep.ABORTED], [TargetStep.DISCARDED])
        assert calls[2:] == [("end", VM, "abort")]
