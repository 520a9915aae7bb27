"""Find and kill the processes a test or benchmark started under its state directory.

The scan itself is the lab's (:func:`scripts.lab.procs.processes`, which the demos use too).
"""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path

from scripts.lab.procs import processes

__all__ = ["kill_leftovers", "ours", "pids_under"]


def pids_under(state: Path, *names: str) -> list[int]:
    """Pids of live (non-zombie) processes whose command line mentions ``state`` and one of
    ``names`` (e.g. "swtpm", "host_agent.vtpm.bridge", "qemu-system")."""
    return list(processes([str(state)], names)) if names else []


def ours(*marks: str | Path) -> list[str]:
    """``PID: COMMAND LINE`` (its first 200 characters) of each live process whose command line
    mentions one of ``marks``: what a test that must leave nothing behind reports."""
    found = processes(str(m) for m in marks)
    return [f"{pid}: {argv[:200]}" for pid, argv in found.items()]


def kill_leftovers(state: Path) -> None:
    """SIGKILL every swtpm, bridge and QEMU started under ``state``."""
    for pid in pids_under(state, "swtpm", "host_agent.vtpm.bridge", "qemu-system"):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
