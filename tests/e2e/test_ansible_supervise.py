"""scripts/supervise.py, the roles' fallback when systemd is not PID 1: it detaches, restarts the
command when it dies, is idempotent to start, and stops the command with itself.

Real processes (a ``sleep`` stands in for the agent), each stopped by its pid.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

SUPERVISE = Path(__file__).resolve().parents[2] / "scripts" / "supervise.py"


def _sup(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SUPERVISE), *args], capture_output=True, text=True, timeout=60
    )


def _status(pidfile: Path) -> dict[str, object]:
    proc = _sup("status", "--json", "--pidfile", str(pidfile))
    return dict(json.loads(proc.stdout), rc=proc.returncode)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _wait(predicate: object, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.fixture
def paths(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    pidfile, logfile = tmp_path / "run" / "agent.pid", tmp_path / "log" / "agent.log"
    yield pidfile, logfile
    for path in (pidfile, pidfile.with_name("agent.pid.child")):
        with contextlib.suppress(OSError, ValueError, ProcessLookupError):
            os.kill(int(path.read_text()), signal.SIGKILL)


def test_supervisor_restarts_the_command_and_stops_with_it(paths: tuple[Path, Path]) -> None:
    pidfile, logfile = paths
    start = ["--pidfile", str(pidfile), "--logfile", str(logfile), "--name", "agent"]
    command = ["--", "sh", "-c", "echo started $$; exec sleep 300"]

    first = _sup("start", *start, *command)
    assert first.returncode == 0 and first.stdout.startswith("started:"), first.stderr
    again = _sup("start", *start, *command)
    assert again.returncode == 0 and again.stdout.startswith("unchanged:")

    _wait(lambda: _status(pidfile).get("child_pid") is not None)
    state = _status(pidfile)
    assert state["rc"] == 0 and state["running"] is True and state["restarts"] == 0
    child = int(str(state["child_pid"]))

    os.kill(child, signal.SIGKILL)  # the agent crashes: the supervisor starts it again
    _wait(lambda: _status(pidfile).get("child_pid") not in (None, child))
    state = _status(pidfile)
    assert state["restarts"] == 1 and state["last_exit"] == -signal.SIGKILL
    new_child = int(str(state["child_pid"]))
    assert _alive(new_child) and not _alive(child)

    stop = _sup("stop", *start)
    assert stop.returncode == 0 and stop.stdout.startswith("stopped:")
    _wait(lambda: not _alive(new_child))
    assert not pidfile.exists()
    assert _status(pidfile)["rc"] == 3
    assert _sup("stop", *start).stdout.startswith("unchanged:")
    log = logfile.read_text()
    assert log.count("\nstarted ") == 2 and "restarting in" in log and "supervise: stopped" in log


def test_a_stale_pid_file_is_not_a_running_supervisor(paths: tuple[Path, Path]) -> None:
    pidfile, logfile = paths
    pidfile.parent.mkdir(parents=True)
    pidfile.write_text(f"{os.getpid()}\n")  # alive, but not a supervisor of this pid file
    assert _status(pidfile)["rc"] == 3
    started = _sup("start", "--pidfile", str(pidfile), "--logfile", str(logfile), "--", "true")
    assert started.stdout.startswith("started:")
    assert _sup("stop", "--pidfile", str(pidfile)).returncode == 0


def test_start_needs_a_command_and_a_log_file(tmp_path: Path) -> None:
    proc = _sup("start", "--pidfile", str(tmp_path / "p.pid"))
    assert proc.returncode == 1 and "needs --logfile and a command" in proc.stderr
