#!/usr/bin/env python3
"""A small process supervisor: the documented fallback when systemd is not PID 1.

The ``vtpm_host`` and ``vtpm_registrar`` Ansible roles run their service under systemd when
``/proc/1/comm`` is ``systemd``; in containers and on the CI machine (PID 1 is no init system)
they install this script instead. Standard library only, so it runs with any Python 3.11.

::

    supervise.py start   --pidfile P --logfile L [--name N] [--env K=V]... -- COMMAND [ARG...]
    supervise.py stop    --pidfile P [--timeout S]
    supervise.py restart --pidfile P --logfile L [...] -- COMMAND [ARG...]
    supervise.py status  --pidfile P [--json]

``start`` detaches a supervisor process (double fork, own session, stdin from /dev/null) that
runs COMMAND, appends its stdout and stderr to the log file, and restarts it whenever it exits,
waiting 1 s, then twice as long after each quick failure up to ``--backoff-max`` (reset once the
command has run for 60 s). It writes its own pid to P, the command's pid to ``P.child`` and a
JSON state (``pid``, ``child_pid``, ``restarts``, ``last_exit``, ``started_at``) to ``P.state``.
``start`` is idempotent: when P names a live supervisor it prints ``unchanged`` and exits 0, so
configuration management can tell "already running" from "started".

SIGTERM or SIGINT to the supervisor (what ``stop`` sends) forwards SIGTERM to the command, waits
``--timeout`` seconds, then SIGKILLs it, removes the pid files and exits. SIGHUP restarts the
command at once (no back-off).

Exit status: 0 success; 1 failure (``start``: the supervisor did not come up; ``stop``: it would
not stop); 3 ``status`` of a supervisor that is not running (the LSB convention).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

STABLE_AFTER = 60.0  # a command that ran this long resets the back-off


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _read_pid(path: Path) -> int | None:
    try:
        pid = int(path.read_text().strip())
    except (OSError, ValueError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        return pid
    # A recycled pid is not our supervisor: check its command line names this pid file.
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return pid if str(path).encode() in cmdline else None


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _log_line(log: int, message: str) -> None:
    os.write(log, f"{_now()} supervise: {message}\n".encode())


class _Supervisor:
    def __init__(self, args: argparse.Namespace) -> None:
        self.pidfile = Path(args.pidfile).absolute()
        self.childfile = self.pidfile.with_name(self.pidfile.name + ".child")
        self.statefile = self.pidfile.with_name(self.pidfile.name + ".state")
        self.command: list[str] = args.command
        self.timeout: float = args.timeout
        self.backoff_max: float = args.backoff_max
        self.env = dict(os.environ)
        for item in args.env:
            key, _, value = item.partition("=")
            self.env[key] = value
        self.log = os.open(args.logfile, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
        self.child: subprocess.Popen[bytes] | None = None
        self.stopping = False
        self.restart_now = False
        self.restarts = 0
        self.last_exit: int | None = None
        self.started_at = _now()

    def _state(self) -> None:
        state = {
            "pid": os.getpid(),
            "child_pid": self.child.pid if self.child else None,
            "command": self.command,
            "restarts": self.restarts,
            "last_exit": self.last_exit,
            "started_at": self.started_at,
        }
        _write_atomic(self.statefile, json.dumps(state) + "\n")

    def _on_term(self, signum: int, frame: object) -> None:
        del frame
        self.stopping = True
        if self.child is not None and self.child.poll() is None:
            self.child.send_signal(signal.SIGTERM)

    def _on_hup(self, signum: int, frame: object) -> None:
        del signum, frame
        self.restart_now = True
        if self.child is not None and self.child.poll() is None:
            self.child.send_signal(signal.SIGTERM)

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_term)
        signal.signal(signal.SIGINT, self._on_term)
        signal.signal(signal.SIGHUP, self._on_hup)
        _write_atomic(self.pidfile, f"{os.getpid()}\n")
        _log_line(self.log, f"supervising {' '.join(self.command)} (pid {os.getpid()})")
        delay = 1.0
        try:
            while not self.stopping:
                began = time.monotonic()
                try:
                    self.child = subprocess.Popen(
                        self.command,
                        stdin=subprocess.DEVNULL,
                        stdout=self.log,
                        stderr=self.log,
                        env=self.env,
                        start_new_session=True,
                    )
                except OSError as err:
                    _log_line(self.log, f"cannot start {self.command[0]}: {err}")
                    self.child = None
                else:
                    _write_atomic(self.childfile, f"{self.child.pid}\n")
                    self._state()
                    self._wait_child()
                if self.stopping:
                    break
                self.restarts += 1
                ran = time.monotonic() - began
                if self.restart_now or ran >= STABLE_AFTER:
                    delay = 1.0
                wait = 0.0 if self.restart_now else delay
                self.restart_now = False
                _log_line(
                    self.log, f"command exited ({self.last_exit}); restarting in {wait:.0f} s"
                )
                self._state()
                self._sleep(wait)
                delay = min(delay * 2, self.backoff_max)
        finally:
            self._stop_child()
            for path in (self.childfile, self.statefile, self.pidfile):
                with contextlib.suppress(OSError):
                    path.unlink()
            _log_line(self.log, "stopped")
        return 0

    def _wait_child(self) -> None:
        assert self.child is not None
        while True:
            try:
                self.last_exit = self.child.wait()
                return
            except InterruptedError:  # pragma: no cover - PEP 475 retries for us
                continue

    def _sleep(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while not self.stopping and not self.restart_now and time.monotonic() < end:
            time.sleep(min(0.2, end - time.monotonic()))

    def _stop_child(self) -> None:
        child = self.child
        if child is None or child.poll() is not None:
            return
        child.send_signal(signal.SIGTERM)
        try:
            child.wait(self.timeout)
        except subprocess.TimeoutExpired:
            _log_line(self.log, f"command did not stop in {self.timeout:.0f} s: SIGKILL")
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGKILL)
            child.wait()


def _start(args: argparse.Namespace) -> int:
    pidfile = Path(args.pidfile).absolute()
    running = _read_pid(pidfile)
    if running is not None:
        print(f"unchanged: {args.name} running (supervisor pid {running})")
        return 0
    if not args.command or not args.logfile:
        print("supervise.py: start needs --logfile and a command after --", file=sys.stderr)
        return 1
    pidfile.parent.mkdir(parents=True, exist_ok=True)
    Path(args.logfile).parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(OSError):
        pidfile.unlink()
    first = os.fork()
    if first == 0:
        os.setsid()
        if os.fork() != 0:
            os._exit(0)
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        os.chdir(args.cwd)
        os.umask(0o022)
        code = 1
        try:
            code = _Supervisor(args).run()
        finally:
            os._exit(code)
    os.waitpid(first, 0)
    deadline = time.monotonic() + 10.0
    while time.monotonic() < deadline:
        pid = _read_pid(pidfile)
        if pid is not None:
            print(f"started: {args.name} (supervisor pid {pid}, log {args.logfile})")
            return 0
        time.sleep(0.05)
    print(f"supervise.py: {args.name} did not start; see {args.logfile}", file=sys.stderr)
    return 1


def _stop(args: argparse.Namespace) -> int:
    pidfile = Path(args.pidfile).absolute()
    pid = _read_pid(pidfile)
    if pid is None:
        print(f"unchanged: {args.name} not running")
        return 0
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + args.timeout + 5.0
    while time.monotonic() < deadline:
        if _read_pid(pidfile) is None:
            print(f"stopped: {args.name} (supervisor pid {pid})")
            return 0
        time.sleep(0.05)
    print(f"supervise.py: {args.name} (pid {pid}) did not stop", file=sys.stderr)
    return 1


def _status(args: argparse.Namespace) -> int:
    pidfile = Path(args.pidfile).absolute()
    pid = _read_pid(pidfile)
    state: dict[str, object] = {"name": args.name, "running": pid is not None}
    if pid is not None:
        try:
            state.update(json.loads(pidfile.with_name(pidfile.name + ".state").read_text()))
        except (OSError, ValueError):
            state["pid"] = pid
    if args.json:
        print(json.dumps(state, sort_keys=True))
    elif pid is None:
        print(f"{args.name}: not running")
    else:
        print(
            f"{args.name}: running (supervisor pid {pid}, command pid {state.get('child_pid')}, "
            f"restarts {state.get('restarts', 0)})"
        )
    return 0 if pid is not None else 3


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="supervise.py",
        description="Run a command in the background and restart it when it exits.",
    )
    sub = parser.add_subparsers(dest="action", required=True)
    for action in ("start", "stop", "restart", "status"):
        p = sub.add_parser(action)
        p.add_argument("--pidfile", required=True, help="the supervisor's pid file")
        p.add_argument("--name", default="service", help="name used in messages")
        p.add_argument("--timeout", type=float, default=20.0, help="seconds to wait on stop")
        p.add_argument("--json", action="store_true", help="status: one JSON object")
        # Every action takes the start options, so one argument list serves start, stop,
        # restart and status (what the Ansible roles do); only start and restart use them.
        p.add_argument("--logfile", help="command output is appended here (start, restart)")
        p.add_argument("--cwd", default="/", help="working directory of the command")
        p.add_argument("--env", action="append", default=[], metavar="K=V")
        p.add_argument("--backoff-max", type=float, default=30.0, metavar="SECONDS")
        p.add_argument("command", nargs=argparse.REMAINDER)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if getattr(args, "command", None) and args.command[0] == "--":
        args.command = args.command[1:]
    if args.action == "start":
        return _start(args)
    if args.action == "stop":
        return _stop(args)
    if args.action == "restart":
        code = _stop(args)
        return code if code != 0 else _start(args)
    return _status(args)


if __name__ == "__main__":
    sys.exit(main())
