"""Processes a lab, a demo or a test started: find them by command line, stop one by its handle.

One copy for the demos (``scripts/demo.py``, ``scripts/demo_migration.py``), the lab
(:class:`~scripts.lab.hosts.NsAgent`, :class:`~scripts.lab.libvirtd_ns.NsLibvirtd`) and the
tests' leftover checks (``tests/helpers/procs.py``).
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import Any

__all__ = ["processes", "stop_process"]


def processes(marks: Iterable[str], names: Iterable[str] = ()) -> dict[int, str]:
    """Live (non-zombie) processes other than this one whose command line mentions one of
    ``marks`` and, when ``names`` are given, one of ``names`` too: pid → command line (its
    arguments joined by spaces)."""
    marks, names = tuple(marks), tuple(names)
    found: dict[int, str] = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if (
            state != "Z"
            and any(m in argv for m in marks)
            and (not names or any(n in argv for n in names))
        ):
            found[int(proc.name)] = argv
    return found


def stop_process(proc: subprocess.Popen[Any], grace: float) -> None:
    """Stop the child ``proc`` if it still runs: SIGTERM, ``grace`` seconds to exit, then
    SIGKILL (and 5 s to be reaped); close its stdout pipe, if it has one."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    if proc.stdout is not None:
        proc.stdout.close()
