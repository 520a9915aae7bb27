"""Process plumbing for the per-VM swtpm: pids, the control socket, bounded termination.

Everything here works by pid and path, so it serves both a swtpm this process started (a
``Popen``, which must be reaped) and one a previous daemon started (found by its pid file). A pid
is only ever signalled after ``/proc/<pid>/cmdline`` shows it is a swtpm serving the expected
state directory, so a recycled pid is never hit.

Foreign errors stay ``OSError`` here; :mod:`host_agent.vtpm.swtpm` wraps them once.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from evidence.errors import ParseError

from .ctrl_codec import ResultReply, Shutdown, decode_reply

__all__ = [
    "ctrl_accepts",
    "ctrl_shutdown",
    "end_process",
    "is_swtpm_for",
    "pid_alive",
    "read_pid_file",
    "wait_gone",
]

_POLL = 0.01


def pid_alive(pid: int, proc: subprocess.Popen[bytes] | None = None) -> bool:
    """Whether ``pid`` is a live process (a zombie counts as gone; our own child is reaped)."""
    if proc is not None and proc.pid == pid:
        return proc.poll() is None
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    except OSError:
        return True  # exists but unreadable: assume alive, never assume gone
    # "pid (comm) S …": the state follows the last ')' (comm may contain spaces and parens).
    state = stat[stat.rfind(")") + 2 : stat.rfind(")") + 3]
    return state not in ("Z", "X", "x")


def is_swtpm_for(pid: int, state_dir: Path) -> bool:
    """Whether ``pid`` runs swtpm with ``--tpmstate dir=<state_dir>[,…]``."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    argv = [a.decode(errors="replace") for a in raw.split(b"\0") if a]
    if not argv or os.path.basename(argv[0]) != "swtpm":
        return False
    want = f"dir={state_dir}"
    return any(a == want or a.startswith(want + ",") for a in argv[1:])


def read_pid_file(path: Path) -> int | None:
    """The pid in swtpm's pid file, or None if the file is missing or not a pid."""
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() and int(text) > 0 else None


def ctrl_accepts(path: Path) -> bool:
    """Whether something listens on the unix socket ``path`` (connect succeeds)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        try:
            s.connect(str(path))
        except OSError:
            return False
        return True


def ctrl_shutdown(path: Path, timeout: float) -> bool:
    """Send CMD_SHUTDOWN (:mod:`host_agent.vtpm.ctrl_codec`) and read its 4-byte result.

    Returns True when swtpm answered 0 (it exits right after). False when it cannot be reached in
    ``timeout`` seconds, e.g. because QEMU or the bridge holds the one control connection swtpm
    serves (our request then waits in the listen backlog), or when it answered anything else.
    """
    request = Shutdown()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect(str(path))
            s.sendall(request.encode())
            reply = b""
            while len(reply) < 4:
                chunk = s.recv(4 - len(reply))
                if not chunk:
                    return False
                reply += chunk
        except OSError:
            return False
    try:
        decoded = decode_reply(reply, request, True)
    except ParseError:
        return False
    return isinstance(decoded, ResultReply) and decoded.result == 0


def wait_gone(
    pid: int,
    proc: subprocess.Popen[bytes] | None,
    timeout: float,
    clock: Callable[[], float] = time.monotonic,
) -> bool:
    """Wait up to ``timeout`` seconds for ``pid`` to exit; True if it did."""
    deadline = clock() + timeout
    while pid_alive(pid, proc):
        if clock() >= deadline:
            return False
        time.sleep(_POLL)
    return True


def end_process(
    pid: int,
    proc: subprocess.Popen[bytes] | None,
    *,
    term_timeout: float,
    kill_timeout: float,
    clock: Callable[[], float] = time.monotonic,
) -> bool:
    """SIGTERM, wait ``term_timeout``; then SIGKILL, wait ``kill_timeout``. True if it is gone.

    The caller has checked that ``pid`` is its swtpm (own child, or :func:`is_swtpm_for`).
    """
    for sig, bound in ((signal.SIGTERM, term_timeout), (signal.SIGKILL, kill_timeout)):
        if not pid_alive(pid, proc):
            return True
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        if wait_gone(pid, proc, bound, clock):
            return True
    return not pid_alive(pid, proc)
