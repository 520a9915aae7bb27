"""Invariant 2 under crashes: SIGKILL the source or the target at every journal step.

Each host runs as its own process. The crashing side runs this module as its program
(``python -m tests.sim.test_migration_crash --kill SIDE:STEP …``): the real ``migration serve``
with its journal wrapped by :class:`KillAtStep`, which SIGKILLs the process right after the
step's record (and that step's vAIK change) is durable, i.e. before the step's effect. Then:

1. at the crash: the vAIK may sign on at most one host (the dead host's store is read as it was
   left, the live host's as it is);
2. the dead side is restarted without the fault (its recovery runs at start);
3. until both journals are settled, every poll checks again that it signs on at most one host;
4. at the end it signs on exactly one host, the one the commit point says.

The steps come from the journal enums, so a new step is crash-tested without editing this file
(and fails ``test_every_step_has_an_expected_owner`` until its expected owner is written down).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from host_agent.migration.faults import JournalWrapper
from host_agent.migration.journal import (
    Changes,
    JournalEntry,
    SourceStep,
    StoreJournal,
    TargetStep,
)
from host_agent.migration.state import VaikState
from tests.sim.test_migration_hosts import (
    PY,
    VM,
    Fleet,
    HostProcess,
    Hosts,
    fresh_hosts,
    inspect_host,
    session_fleet,
)

#: Where the vAIK must end up after a crash at each step: "a" (the source) or "b" (the target).
#: The commit point decides: before the source's COMMITTED it stays on A, from it on it is B's.
EXPECTED_OWNER: dict[SourceStep | TargetStep, str] = {
    SourceStep.STARTED: "a",
    SourceStep.MOVING: "a",
    SourceStep.COMMITTED: "b",
    SourceStep.DONE: "b",
    SourceStep.ABORTED: "a",
    TargetStep.EXGKEY: "a",
    TargetStep.PENDING: "a",
    TargetStep.ACTIVE: "b",
    TargetStep.DISCARDED: "a",
}
#: Steps only a refused migration reaches (the source has no approval of the target's state).
REFUSED_ONLY = {SourceStep.ABORTED, TargetStep.DISCARDED}

CASES = [("source", s) for s in SourceStep] + [("target", s) for s in TargetStep]


class KillAtStep(JournalWrapper):
    """Fault-injecting wrapper round the real journal: SIGKILL right after ``step`` is durable."""

    def __init__(self, real: StoreJournal, side: str, step: str) -> None:
        super().__init__(real)
        self.side = side
        self.step = step

    def write(self, entry: JournalEntry, changes: Changes | None = None) -> JournalEntry:
        out = self.real.write(entry, changes)
        if entry.side == self.side and entry.step.value == self.step:
            os.kill(os.getpid(), signal.SIGKILL)
        return out


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Fleet:
    return session_fleet(tmp_path_factory)


@pytest.fixture
def hosts(fleet: Fleet, tmp_path: Path) -> Iterator[Hosts]:
    yield from fresh_hosts(fleet, tmp_path)


def test_every_step_has_an_expected_owner() -> None:
    assert set(EXPECTED_OWNER) == {s for _, s in CASES}


def _owners(hosts: Hosts) -> dict[str, VaikState]:
    return {"a": inspect_host(hosts.a).state, "b": inspect_host(hosts.b).state}


def _at_most_one(states: dict[str, VaikState], when: str) -> None:
    signing = [h for h, s in states.items() if s is VaikState.ACTIVE]
    assert len(signing) <= 1, f"{when}: the vAIK may sign on {signing} at once ({states})"


@pytest.mark.parametrize(("side", "step"), CASES, ids=lambda v: getattr(v, "value", v))
def test_inv2_vaik_on_one_host_after_crash(
    hosts: Hosts, side: str, step: SourceStep | TargetStep
) -> None:
    refused = step in REFUSED_ONLY
    killer = [PY, "-m", "tests.sim.test_migration_crash", "--kill", f"{side}:{step.value}"]
    approvals_a = hosts.no_approvals if refused else hosts.approvals
    a = HostProcess(hosts.a, approvals_a, killer if side == "source" else None).start()
    b = HostProcess(hosts.b, hosts.approvals, killer if side == "target" else None).start()
    crashing, crashing_name = (a, "a") if side == "source" else (b, "b")
    result: list[subprocess.CompletedProcess[str]] = []
    client = threading.Thread(target=lambda: result.append(a.migrate(VM, "host-b", b.address)))
    try:
        client.start()
        assert crashing.wait_dead(90) == -signal.SIGKILL, crashing.log_text()[-3000:]
        client.join(90)
        _at_most_one(_owners(hosts), f"right after the SIGKILL at {side} {step.value}")

        crashing.stop()
        approvals = approvals_a if side == "source" else hosts.approvals
        # A host comes back on its address (each side keeps the other's in its journal).
        restarted = HostProcess(crashing.state, approvals).start(listen=crashing.address)
        if crashing_name == "a":
            a = restarted
        else:
            b = restarted
        deadline = time.monotonic() + 60
        while True:
            va, vb = inspect_host(hosts.a), inspect_host(hosts.b)
            states = {"a": va.state, "b": vb.state}
            _at_most_one(states, f"during recovery after {side} {step.value}")
            if not va.open and not vb.open:
                break
            assert time.monotonic() < deadline, (
                f"recovery did not settle: a {va.open}, b {vb.open}\n"
                + a.log_text()[-2000:]
                + b.log_text()[-2000:]
            )
            time.sleep(0.3)
        owner = EXPECTED_OWNER[step]
        other = "b" if owner == "a" else "a"
        assert states[owner] is VaikState.ACTIVE, (states, a.log_text()[-2000:])
        assert states[other] is VaikState.ABSENT, states  # nothing left pending or moving
    finally:
        a.stop()
        b.stop()


def test_inv2_both_hosts_crash_around_the_commit_and_restart_together(hosts: Hosts) -> None:
    """The source dies right after COMMITTED, then the target (PENDING, asking a dead source)
    dies too; both come back at once and settle it between them: the vAIK ends on B."""
    killer = [PY, "-m", "tests.sim.test_migration_crash", "--kill", "source:committed"]
    a = HostProcess(hosts.a, hosts.approvals, killer).start()
    b = HostProcess(hosts.b, hosts.approvals).start()
    addresses = (a.address, b.address)
    try:
        client = threading.Thread(target=lambda: a.migrate(VM, "host-b", b.address))
        client.start()
        assert a.wait_dead(90) == -signal.SIGKILL
        client.join(90)
        assert b.proc is not None
        b.proc.send_signal(signal.SIGKILL)
        b.wait_dead(30)
        states = _owners(hosts)
        assert states == {"a": VaikState.ABSENT, "b": VaikState.PENDING}, states
        a.stop()
        b.stop()
        a = HostProcess(hosts.a, hosts.approvals)
        b = HostProcess(hosts.b, hosts.approvals)
        first = threading.Thread(target=a.start, kwargs={"listen": addresses[0]})
        first.start()
        b.start(listen=addresses[1])
        first.join(60)
        deadline = time.monotonic() + 60
        while (states := _owners(hosts)) != {"a": VaikState.ABSENT, "b": VaikState.ACTIVE}:
            _at_most_one(states, "after both restarted")
            assert time.monotonic() < deadline, (states, b.log_text()[-2000:])
            time.sleep(0.3)
    finally:
        a.stop()
        b.stop()


# ---------------------------------------------------------------- the crashing worker


def _main(argv: list[str]) -> int:
    from host_agent.config import AgentConfig, with_state_dir
    from host_agent.migration.cli import run_service

    p = argparse.ArgumentParser()
    p.add_argument("--kill", required=True, metavar="SIDE:STEP")
    p.add_argument("--state-dir", type=Path, required=True)
    p.add_argument("--listen", required=True)
    p.add_argument("--approvals", type=Path, required=True)
    p.add_argument("--resolve-interval", type=float, default=0.3)
    args = p.parse_args(argv)
    side, _, step = args.kill.partition(":")
    return run_service(
        with_state_dir(AgentConfig(), args.state_dir.resolve()),
        listen=args.listen,
        advertise="",
        approvals_path=args.approvals,
        resolve_interval=args.resolve_interval,
        journal=lambda store: KillAtStep(StoreJournal(store), side, step),
    )


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
