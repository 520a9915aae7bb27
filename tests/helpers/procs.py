"""Find and kill the processes a test or benchmark started under its state directory."""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path

__all__ = ["kill_leftovers", "pids_under"]


def pids_under(state: Path, *names: str) -> list[int]:
    """Pids of live (non-zombie) processes whose command line mentions ``state`` and one of
    ``names`` (e.g. "swtpm", "host_agent.vtpm.bridge", "qemu-system")."""
    out = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            status = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if status != "Z" and str(state) in argv and any(n in argv for n in names):
            out.append(int(proc.name))
    return out


def kill_leftovers(state: Path) -> None:
    """SIGKILL every swtpm, bridge and QEMU started under ``state``."""
    for pid in pids_under(state, "swtpm", "host_agent.vtpm.bridge", "qemu-system"):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
