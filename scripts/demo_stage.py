"""The stage the demos run on: what ``make demo`` (``scripts/demo.py``) is made of besides its acts.

- the outcomes an act can have (:class:`DemoFailure`, :class:`Skipped`) and its record
  (:class:`Act`);
- :class:`Narrator`: headings, one-line results and progress;
- :class:`Demo`: the one-host demo's context: its state directory, ports, the CLI commands it
  runs (``vtpm-host``, ``vtpm-verify``), the host daemon, SSH into the guest, and the cleanup
  that stops every process of the run;
- :func:`run_acts`: the act runner (signals, cleanup, summary table).

``scripts/demo_migration.py`` runs its own acts on the same runner, narrator and outcomes.
These lived in ``scripts/demo.py``, which holds the acts and still re-exports the public names.
Import it as ``scripts.demo_stage`` (the repository root on ``sys.path``, as both demos set it).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TextIO, TypeVar

from scripts.lab.procs import processes, stop_process

REPO = Path(__file__).resolve().parent.parent

VM_NAME = "demo"
GUEST_AGENT_DIR = "/tmp/vtpm"
GUEST_COMMAND = f"PYTHONPATH={GUEST_AGENT_DIR} python3 -m guest_agent.cli"
COMMAND_TIMEOUT = 300.0


class DemoFailure(Exception):
    """An act did not give its expected outcome (message: what was expected, what came)."""


class Skipped(Exception):
    """An act cannot run because a piece it needs is missing (message: what is missing)."""


@dataclass
class Act:
    number: int
    title: str
    expected: str
    result: str = "not run"
    ok: bool = False
    status: str = "not run"  # passed | failed | skipped | not run
    outcome: str = ""  # a few words for the summary table
    seconds: float = 0.0
    details: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# output


class Narrator:
    """Headings, one-line results and progress; to stdout, or to stderr under ``--json``."""

    def __init__(self, stream: TextIO) -> None:
        self.out = stream
        self.color = stream.isatty() and os.environ.get("NO_COLOR") is None

    def _c(self, code: str, text: str) -> str:
        return f"\033[{code}m{text}\033[0m" if self.color else text

    def heading(self, act: Act) -> None:
        self.out.write(f"\n{self._c('1', f'== Act {act.number}: {act.title} ==')}\n")
        self.out.flush()

    def step(self, text: str) -> None:
        self.out.write(f"   … {text}\n")
        self.out.flush()

    def info(self, text: str) -> None:
        self.out.write(f"     {text}\n")
        self.out.flush()

    def result(self, act: Act) -> None:
        mark = {"passed": self._c("32", "OK  "), "skipped": self._c("33", "SKIP")}.get(
            act.status, self._c("31", "FAIL")
        )
        self.out.write(f"   {mark} {act.result}  ({act.seconds:.1f} s)\n")
        self.out.flush()

    def notice(self, text: str) -> None:
        self.out.write(self._c("33;1", f"   !! {text}") + "\n")
        self.out.flush()


# --------------------------------------------------------------------------------------------
# processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pids_mentioning(text: str, *names: str) -> list[int]:
    """Live processes (not this one) whose command line mentions ``text`` and one of ``names``."""
    return list(processes([text], names))


class Demo:
    def __init__(self, state: Path, narrator: Narrator, guest: str = "disk") -> None:
        self.state = state
        self.say = narrator
        self.env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
        self.env.pop("VTPM_TPM_TCTI", None)  # the embedded default: no TPM configured
        self.runtime = state / "run" / "bridges"
        self.daemon: subprocess.Popen[bytes] | None = None
        self.daemon_log = state / "daemon.log"
        self.vm_uuid = str(uuid.uuid4())
        self.enroll_port = free_port()
        self.ssh_port = free_port()
        self.tenant = state / "tenant"
        self.image: dict[str, Any] = {}
        self.vm_created = False
        self.pcrs_before_save: dict[str, str] | None = None
        self.last_output = ""  # of the last command that failed
        self.guest = guest
        self.boot_manifest = Path()
        self.memory_mib = 256
        self.cmdline_extra = ""
        self.extra_qemu_args: list[str] = []
        self.guest_command = GUEST_COMMAND

    # ---- commands

    def run(
        self, argv: list[str], *, check: bool = True, timeout: float = COMMAND_TIMEOUT
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            argv, capture_output=True, text=True, timeout=timeout, cwd=REPO, env=self.env
        )
        if check and proc.returncode != 0:
            output = proc.stderr.strip() or proc.stdout.strip()
            self.last_output = output[-3000:]  # the whole story goes to --json
            last = output.splitlines()[-1] if output else "no output"
            raise DemoFailure(f"`{' '.join(argv[2:5])} …` exited {proc.returncode}: {last}")
        return proc

    def host(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.run(
            [sys.executable, "-m", "host_agent.cli", *args, "--state-dir", str(self.state)],
            check=check,
        )

    def vm(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.host("vm", *args, "--runtime-dir", str(self.runtime), check=check)

    def verify(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.run([sys.executable, "-m", "verifier.cli", *args], check=check)

    def vm_state(self) -> str:
        vms = json.loads(self.vm("list", "--json").stdout)
        for v in vms:
            if v.get("name") == VM_NAME:
                return str(v.get("state"))
        return "absent"

    def vm_off(self) -> bool:
        return self.vm_state().replace(" ", "") in ("shutoff", "absent")

    def vm_pcrs(self) -> dict[str, str]:
        out = self.run(
            [sys.executable, "-m", "host_agent.cli", "vm", "pcrs", VM_NAME, "--json",
             "--runtime-dir", str(self.runtime)]
        ).stdout  # fmt: skip
        pcrs: dict[str, str] = json.loads(out)["pcrs"]
        return pcrs

    # ---- the daemon

    def start_daemon(self) -> None:
        from host_agent.service.daemon import ControlClient

        with open(self.daemon_log, "ab") as log:
            self.daemon = subprocess.Popen(
                [sys.executable, "-m", "host_agent.cli", "daemon",
                 "--state-dir", str(self.state), "--runtime-dir", str(self.runtime),
                 "--component", "host_agent.service.attest:AttestService"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=self.env, cwd=REPO, start_new_session=True,
            )  # fmt: skip
        control = ControlClient(self.state / "run" / "control.sock")
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(Exception):
                if control.call("status")["run_state"] == "running":
                    break
            if self.daemon.poll() is not None:
                raise DemoFailure(f"the daemon exited {self.daemon.returncode}: {self.log_tail()}")
            if time.monotonic() > deadline:
                raise DemoFailure(f"the daemon did not come up in 60 s: {self.log_tail()}")
            time.sleep(0.2)
        # the enrollment API answers once the attestation component started
        deadline = time.monotonic() + 30
        while True:
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.enroll_port), timeout=1),
            ):
                return
            if time.monotonic() > deadline:
                raise DemoFailure(
                    f"the enrollment API is not listening on 127.0.0.1:{self.enroll_port}: "
                    f"{self.log_tail()}"
                )
            time.sleep(0.2)

    def log_tail(self, limit: int = 1500) -> str:
        try:
            return self.daemon_log.read_text(errors="replace")[-limit:]
        except OSError:
            return ""

    # ---- guest (operator side: deploy the agent, write a marker page)

    def guest_ssh(self, command: str, stdin: bytes | None = None, timeout: float = 60.0) -> str:
        import paramiko

        key_type, key_b64 = self.image["ssh_host_public_key"].split()[:2]

        class Pinned(paramiko.MissingHostKeyPolicy):  # type: ignore[misc]
            def missing_host_key(self, client: Any, hostname: str, key: Any) -> None:
                if key.get_name() != key_type or key.get_base64() != key_b64:
                    raise paramiko.SSHException(f"{hostname}: host key differs from the image's")

        client = paramiko.SSHClient()
        client.set_missing_host_key_policy(Pinned())
        try:
            client.connect(
                "127.0.0.1",
                port=self.ssh_port,
                username=self.image["ssh_user"],
                key_filename=self.image["ssh_private_key"],
                look_for_keys=False,
                allow_agent=False,
                timeout=15,
                banner_timeout=30,
                auth_timeout=30,
            )
            chan_in, chan_out, chan_err = client.exec_command(command, timeout=timeout)
            if stdin is not None:
                chan_in.write(stdin)
            chan_in.channel.shutdown_write()
            out: str = chan_out.read().decode(errors="replace")
            err = chan_err.read().decode(errors="replace")
            rc = chan_out.channel.recv_exit_status()
        finally:
            client.close()
        if rc != 0:
            raise DemoFailure(f"guest command {command!r} exited {rc}: {err.strip()[-500:]}")
        return out

    # ---- cleanup

    def cleanup(self) -> list[str]:
        """Stop everything this run started; return what was stopped (for the narrative)."""
        done: list[str] = []
        if self.vm_created and (self.state / "libvirt").exists():
            with contextlib.suppress(Exception):
                if not self.vm_off():
                    self.vm("stop", VM_NAME, check=False)
                    done.append(f"VM {VM_NAME}")
        if self.daemon is not None and self.daemon.poll() is None:
            stop_process(self.daemon, 20)
            done.append("daemon")
        # Anything of ours still alive (a QEMU, swtpm, bridge or registrar whose parent died):
        # processes are ours when their command line names this run's state directory.
        for pid in _pids_mentioning(
            str(self.state), "qemu-system", "swtpm", "host_agent", "verifier", "registrar"
        ):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
                done.append(f"pid {pid}")
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and _pids_mentioning(
            str(self.state), "qemu-system", "swtpm", "host_agent", "verifier", "registrar"
        ):
            time.sleep(0.1)
        for pid in _pids_mentioning(
            str(self.state), "qemu-system", "swtpm", "host_agent", "verifier", "registrar"
        ):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return done


# --------------------------------------------------------------------------------------------
# the act runner


def _summary_table(acts: list[Act], total: float, say: Narrator) -> None:
    say.out.write("\n" + say._c("1", "== Summary ==") + "\n")
    width = max(len(a.title) for a in acts)
    owidth = max(len(a.outcome) for a in acts)
    say.out.write(f"  #  {'step':<{width}}  {'':<4}  {'result':<{owidth}}  {'time':>8}\n")
    for a in acts:
        status = {"passed": "OK", "failed": "FAIL", "skipped": "SKIP"}.get(a.status, "-")
        say.out.write(
            f"  {a.number}  {a.title:<{width}}  {status:<4}  {a.outcome:<{owidth}}  "
            f"{a.seconds:6.1f} s\n"
        )
    ok = all(a.status == "passed" or (a.number == 0 and a.status == "skipped") for a in acts)
    verdict = "every act gave its expected outcome" if ok else "NOT every act gave its outcome"
    say.out.write(f"  total {total:.1f} s — {verdict}\n")
    say.out.flush()


@contextlib.contextmanager
def _signals_raise() -> Iterator[None]:
    """SIGTERM/SIGHUP end the run through the same ``finally`` as Ctrl-C."""

    def handler(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


class Stage(Protocol):
    """What :func:`run_acts` needs of a demo (:class:`Demo`, ``demo_migration.MigrationDemo``)."""

    last_output: str  # of the last command that failed

    def log_tail(self, limit: int = 1500) -> str: ...

    def cleanup(self) -> list[str]: ...


S = TypeVar("S", bound=Stage)


@dataclass
class Run:
    """How :func:`run_acts` ended: interrupted (Ctrl-C, SIGTERM, SIGHUP), what the cleanup
    stopped, the whole run's seconds."""

    interrupted: bool
    stopped: list[str]
    total: float


def run_acts(
    demo: S,
    steps: Sequence[tuple[Act, Callable[[S, Act], str], bool]],
    say: Narrator,
    state: Path,
    keep: bool,
) -> Run:
    """The acts of a demo, one after the other, then its cleanup and the summary table (the
    runner of ``make demo`` and ``make demo-migration``).

    ``steps``: each act, its function and whether the acts after it need it: once a needed act
    did not pass, the rest are reported as not run. An act's DemoFailure, Skipped or crash is
    its result (with the daemon log's tail and the last failed command's output in its
    details), never a traceback. Ctrl-C, SIGTERM or SIGHUP end the acts; whatever happens,
    ``demo.cleanup()`` runs (a second Ctrl-C or SIGTERM does not cut it short) and ``state`` is
    removed unless ``keep``."""
    started = time.monotonic()
    blocked: str | None = None
    interrupted = False
    stopped: list[str] = []
    try:
        with _signals_raise():
            for act, fn, needed in steps:
                say.heading(act)
                if blocked is not None:
                    act.result, act.outcome = f"not run: {blocked}", "not run"
                    say.out.write(f"   ---- {act.result}\n")
                    continue
                t0 = time.monotonic()
                try:
                    act.result = fn(demo, act)
                    act.status, act.ok = "passed", True
                except Skipped as err:
                    act.status, act.result = "skipped", f"SKIPPED: {err}"
                except DemoFailure as err:
                    act.status, act.result = "failed", f"FAILED: {err}"
                except Exception as err:  # a crash of a piece is a failed act, not a traceback
                    act.status, act.result = "failed", f"FAILED: {type(err).__name__}: {err}"
                act.seconds = time.monotonic() - t0
                if act.status != "passed":
                    act.outcome = act.result.split(":")[0]
                    act.details["daemon_log_tail"] = demo.log_tail(3000)
                    act.details["command_output"] = demo.last_output
                say.result(act)
                if act.status != "passed" and needed:
                    blocked = f"act {act.number} ({act.title}) did not succeed"
    except KeyboardInterrupt:
        interrupted = True
        say.out.write("\ninterrupted: cleaning up\n")
    finally:
        say.out.write("\n== Cleanup ==\n")
        # a second Ctrl-C or SIGTERM must not cut the cleanup short
        old = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            stopped = demo.cleanup()
        finally:
            for s, h in old.items():
                signal.signal(s, h)
        say.out.write(f"   stopped: {', '.join(stopped) or 'nothing left running'}\n")
        if keep:
            say.out.write(f"   kept {state} (--keep)\n")
        else:
            shutil.rmtree(state, ignore_errors=True)
            say.out.write(f"   removed {state}\n")
    total = time.monotonic() - started
    _summary_table([act for act, _, _ in steps], total, say)
    return Run(interrupted, stopped, total)
