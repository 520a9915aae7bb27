"""QEMU (TCG) guests for the vm tier, driven from Python (STYLE.md §3 "Testing tiers").

Layers, one per class, smallest first:

- :class:`QmpClient` — QMP over a unix socket: greeting, ``qmp_capabilities``, ``execute``, events;
  plus the few commands tests need (stop/cont, migrate to a file, dump-guest-memory, status).
- :class:`GuestSsh` — paramiko to the guest's dropbear through the hostfwd port, with the image's
  test key and its pinned host key; ``run`` returns status, stdout and stderr as bytes.
- :class:`Guest` — one QEMU process: builds the command line from a :class:`GuestConfig`, waits
  for the ``VTPM-GUEST-READY`` marker on the serial log, and always stops the process by pid.
- :class:`SwtpmUnix` / :func:`start_swtpm_unix` — a swtpm whose control channel is a unix socket,
  the shape QEMU's ``-tpmdev emulator`` wants (platform-notes §5: no ``--server``, no ``--flags``).

Unix socket paths are limited to 107 bytes, so sockets live in a short directory under /tmp
(``sock_dir``), not in pytest's long ``tmp_path``. Every process started here is also recorded in a
module registry that an ``atexit`` hook kills, so an interrupted run leaks nothing.
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import paramiko

from scripts.lab.procs import stop_process
from tests.helpers.ports import free_port

__all__ = [
    "READY_MARKER",
    "Guest",
    "GuestConfig",
    "GuestFactory",
    "GuestSsh",
    "QemuError",
    "QmpClient",
    "QmpError",
    "SshResult",
    "SwtpmUnix",
    "free_port",
    "require_binaries",
    "running_guest",
    "start_guest",
    "start_swtpm_unix",
]

READY_MARKER = "VTPM-GUEST-READY"
QEMU = "qemu-system-x86_64"

_LIVE: dict[int, subprocess.Popen[bytes]] = {}


def _kill_leftovers() -> None:
    for proc in list(_LIVE.values()):
        _terminate(proc, grace=1.0)


atexit.register(_kill_leftovers)


def _terminate(proc: subprocess.Popen[bytes], grace: float = 5.0) -> None:
    """SIGTERM, then SIGKILL after ``grace`` seconds (the lab's ``stop_process``); always
    forgets the pid."""
    try:
        stop_process(proc, grace)
    finally:
        _LIVE.pop(proc.pid, None)


def _spawn(args: list[str], *, stdout: Any, stderr: Any) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr)
    _LIVE[proc.pid] = proc
    return proc


class QemuError(RuntimeError):
    """QEMU, swtpm or the guest did not do what a test asked; the message carries the evidence."""


def require_binaries(*names: str) -> None:
    """Fail (never skip) when a program the vm tier needs is missing: CI installs them all."""
    missing = [n for n in names if shutil.which(n) is None]
    if missing:
        raise QemuError(f"missing programs {missing}; `make test` installs them (deps/)")


def _short_dir(prefix: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


def _tail(path: Path, limit: int = 3000) -> str:
    try:
        data = path.read_bytes()
    except OSError:
        return "(missing)"
    return data[-limit:].decode(errors="replace")


# ----------------------------------------------------------------------------- swtpm


@dataclass
class SwtpmUnix:
    """A swtpm whose control channel is ``ctrl_path``; QEMU connects there (one client only)."""

    state_dir: Path
    ctrl_path: Path
    log: Path
    proc: subprocess.Popen[bytes]
    _own_dir: Path | None = None

    def log_text(self) -> str:
        return _tail(self.log, 8000)

    @property
    def running(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        _terminate(self.proc)
        if self._own_dir is not None:
            shutil.rmtree(self._own_dir, ignore_errors=True)


def start_swtpm_unix(
    state_dir: Path, *, ctrl_path: Path | None = None, timeout: float = 10.0
) -> SwtpmUnix:
    """Start ``swtpm socket --tpm2`` with a unix control socket for one QEMU guest.

    Args:
        state_dir: ``--tpmstate`` directory (created; an existing state is reused, an empty one
            gives a fresh TPM, as a restore into a new swtpm wants).
        ctrl_path: the control socket (default: a new short directory under /tmp).
        timeout: seconds to wait until the socket exists.

    Raises:
        QemuError: swtpm is missing, exits early, or never creates its socket.
    """
    require_binaries("swtpm")
    state_dir.mkdir(parents=True, exist_ok=True)
    own_dir = None
    if ctrl_path is None:
        own_dir = _short_dir("vtpm-swtpm-")
        ctrl_path = own_dir / "ctrl.sock"
    log = state_dir / "swtpm.log"
    proc = _spawn(
        [
            "swtpm",
            "socket",
            "--tpm2",
            "--tpmstate",
            f"dir={state_dir}",
            "--ctrl",
            f"type=unixio,path={ctrl_path}",
            "--log",
            f"file={log},level=1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    tpm = SwtpmUnix(state_dir=state_dir, ctrl_path=ctrl_path, log=log, proc=proc, _own_dir=own_dir)
    deadline = time.monotonic() + timeout
    # Wait for the socket file without connecting: swtpm serves one control client at a time.
    while not ctrl_path.is_socket():
        if proc.poll() is not None:
            tpm.stop()
            raise QemuError(f"swtpm exited with {proc.returncode} before listening:\n{_tail(log)}")
        if time.monotonic() > deadline:
            tpm.stop()
            raise QemuError(f"swtpm made no socket at {ctrl_path} within {timeout} s")
        time.sleep(0.01)
    time.sleep(0.02)  # bind() happened; give listen() a moment
    return tpm


# ----------------------------------------------------------------------------- QMP


class QmpError(QemuError):
    """A QMP command failed: carries what was sent and what came back."""

    def __init__(self, command: str, arguments: dict[str, Any] | None, reply: dict[str, Any]):
        self.command = command
        self.arguments = arguments
        self.reply = reply
        err = reply.get("error", {})
        self.error_class = err.get("class", "")
        super().__init__(
            f"QMP {command} {json.dumps(arguments or {})} failed: "
            f"{self.error_class}: {err.get('desc', reply)}"
        )


class QmpTimeout(QemuError):
    """No QMP message arrived in time (the connection itself is still fine)."""


class QmpClient:
    """A blocking QMP client over a unix socket (one command in flight at a time).

    Events that arrive while waiting for a reply are kept in :attr:`events`, oldest first.
    """

    def __init__(self, path: Path, *, timeout: float = 30.0) -> None:
        self.path = path
        self.timeout = timeout
        self.events: list[dict[str, Any]] = []
        self.greeting: dict[str, Any] = {}
        self._sock: socket.socket | None = None
        self._buf = bytearray()
        self._next_id = 0

    # -- transport
    def connect(self, *, deadline: float, alive: Any = None) -> None:
        """Connect (retrying until ``deadline``), read the greeting, leave negotiation mode.

        ``alive`` is an optional callable; connecting stops early when it returns False.
        """
        last: OSError | None = None
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(str(self.path))
                break
            except OSError as err:
                sock.close()
                last = err
            if alive is not None and not alive():
                raise QemuError(f"QEMU exited before its QMP socket {self.path} accepted")
            if time.monotonic() > deadline:
                raise QemuError(f"QMP socket {self.path} did not accept: {last}")
            time.sleep(0.02)
        sock.settimeout(max(0.1, deadline - time.monotonic()))
        self._sock = sock
        self.greeting = self._read_message()
        if "QMP" not in self.greeting:
            raise QemuError(f"not a QMP greeting: {self.greeting}")
        self.execute("qmp_capabilities")

    def close(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None

    def _read_message(self, timeout: float | None = None) -> dict[str, Any]:
        assert self._sock is not None, "QMP client is not connected"
        self._sock.settimeout(self.timeout if timeout is None else timeout)
        while b"\n" not in self._buf:
            try:
                chunk = self._sock.recv(65536)
            except TimeoutError as err:
                raise QmpTimeout(f"no QMP message within {self._sock.gettimeout()} s") from err
            if not chunk:
                raise QemuError("QMP connection closed by QEMU")
            self._buf += chunk
        line, _, rest = bytes(self._buf).partition(b"\n")
        self._buf = bytearray(rest)
        msg: dict[str, Any] = json.loads(line)
        return msg

    # -- protocol
    def execute(
        self, command: str, arguments: dict[str, Any] | None = None, *, timeout: float | None = None
    ) -> Any:
        """Run one command and return its ``return`` value.

        Raises:
            QmpError: QEMU answered with an error.
            QemuError: the connection broke or no reply came within the timeout.
        """
        if self._sock is None:
            raise QemuError(f"QMP {command}: not connected")
        self._next_id += 1
        msg_id = f"t{self._next_id}"
        msg: dict[str, Any] = {"execute": command, "id": msg_id}
        if arguments:
            msg["arguments"] = arguments
        self._sock.sendall(json.dumps(msg).encode() + b"\n")
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            reply = self._read_message(max(0.05, deadline - time.monotonic()))
            if "event" in reply:
                self.events.append(reply)
                continue
            if reply.get("id") != msg_id:
                continue
            if "error" in reply:
                raise QmpError(command, arguments, reply)
            return reply.get("return")

    def wait_event(self, name: str, *, timeout: float = 30.0) -> dict[str, Any]:
        """Return (and remove) the first event called ``name``, waiting up to ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            for i, ev in enumerate(self.events):
                if ev.get("event") == name:
                    return self.events.pop(i)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                seen = [e.get("event") for e in self.events]
                raise QemuError(f"no QMP event {name} within {timeout} s (queued: {seen})")
            with contextlib.suppress(QmpTimeout):
                self.events.append(self._read_message(remaining))

    # -- helpers
    def query_status(self) -> str:
        """The run state: ``running``, ``paused``, ``inmigrate``, ``postmigrate``, ..."""
        return str(self.execute("query-status")["status"])

    def stop(self) -> None:
        self.execute("stop")

    def cont(self) -> None:
        self.execute("cont")

    def migrate_to_file(self, path: Path, *, timeout: float = 120.0) -> dict[str, Any]:
        """Save the VM state to ``path`` (``migrate exec:cat > path``); returns query-migrate.

        Sets ``max-bandwidth`` high first: QEMU's default cap is 32 MiB/s (platform-notes §6).
        The guest is left as migration leaves it (``postmigrate`` if it ran, else ``paused``).
        """
        self.execute("migrate-set-parameters", {"max-bandwidth": 100 * 1024**3})
        self.execute("migrate", {"uri": f"exec:cat > {_shell_quote(str(path))}"})
        deadline = time.monotonic() + timeout
        while True:
            info: dict[str, Any] = self.execute("query-migrate")
            status = info.get("status")
            if status == "completed":
                return info
            if status in ("failed", "cancelled"):
                raise QemuError(f"migration to {path} {status}: {info.get('error-desc', info)}")
            if time.monotonic() > deadline:
                raise QemuError(f"migration to {path} still {status} after {timeout} s")
            time.sleep(0.02)

    def dump_guest_memory(self, path: Path, *, fmt: str = "elf", paging: bool = False) -> None:
        """Write guest memory to ``path`` (``elf``, ``kdump-zlib``, ...); blocks until done."""
        args: dict[str, Any] = {"paging": paging, "protocol": f"file:{path}"}
        if fmt != "elf":
            args["format"] = fmt
        self.execute("dump-guest-memory", args, timeout=300)

    def quit(self) -> None:
        with contextlib.suppress(QemuError):
            self.execute("quit", timeout=5)


def _shell_quote(s: str) -> str:
    return "'" + s.replace("'", "'\\''") + "'"


# ----------------------------------------------------------------------------- SSH


@dataclass(frozen=True)
class SshResult:
    status: int
    stdout: bytes
    stderr: bytes

    @property
    def text(self) -> str:
        return self.stdout.decode(errors="replace")


class GuestSsh:
    """paramiko to the guest's dropbear: exec only (dropbear has no SFTP; use ``cat``)."""

    def __init__(
        self, port: int, key_path: Path, host_key: str | None, *, host: str = "127.0.0.1"
    ) -> None:
        self.host = host
        self.port = port
        self.key = paramiko.Ed25519Key.from_private_key_file(str(key_path))
        self.client = paramiko.SSHClient()
        if host_key:
            kind, b64 = host_key.split()[:2]
            entry = f"[{host}]:{port}" if port != 22 else host
            self.client.get_host_keys().add(
                entry, kind, paramiko.PKey.from_type_string(kind, base64.b64decode(b64))
            )
            self.client.set_missing_host_key_policy(paramiko.RejectPolicy())
        else:
            self.client.set_missing_host_key_policy(paramiko.AutoAddPolicy())

    def connect(self, *, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.client.connect(
                    self.host,
                    port=self.port,
                    username="root",
                    pkey=self.key,
                    look_for_keys=False,
                    allow_agent=False,
                    timeout=5,
                    banner_timeout=10,
                    auth_timeout=10,
                )
                return
            except (OSError, paramiko.SSHException) as err:
                if isinstance(err, paramiko.BadHostKeyException) or time.monotonic() > deadline:
                    raise QemuError(f"SSH to {self.host}:{self.port} failed: {err!r}") from err
                time.sleep(0.2)

    def run(self, command: str, *, timeout: float = 60.0, stdin: bytes | None = None) -> SshResult:
        """Run ``command`` with the guest's /bin/sh; return status, stdout and stderr."""
        transport = self.client.get_transport()
        if transport is None or not transport.is_active():
            raise QemuError("SSH session is not connected")
        chan = transport.open_session(timeout=timeout)
        chan.settimeout(timeout)
        try:
            chan.exec_command(command)
            if stdin is not None:
                chan.sendall(stdin)
            chan.shutdown_write()
            out, err = bytearray(), bytearray()
            deadline = time.monotonic() + timeout
            while not (
                chan.exit_status_ready() and not chan.recv_ready() and not chan.recv_stderr_ready()
            ):
                if time.monotonic() > deadline:
                    raise QemuError(f"guest command {command!r} still running after {timeout} s")
                progressed = False
                if chan.recv_ready():
                    out += chan.recv(65536)
                    progressed = True
                if chan.recv_stderr_ready():
                    err += chan.recv_stderr(65536)
                    progressed = True
                if not progressed:
                    time.sleep(0.005)
            return SshResult(chan.recv_exit_status(), bytes(out), bytes(err))
        finally:
            chan.close()

    def check(self, command: str, *, timeout: float = 60.0, stdin: bytes | None = None) -> bytes:
        """Like :meth:`run` but raise unless the status is 0; return stdout."""
        res = self.run(command, timeout=timeout, stdin=stdin)
        if res.status != 0:
            raise QemuError(
                f"guest command {command!r} exited {res.status}:\n"
                f"{res.stderr.decode(errors='replace')[-2000:]}"
            )
        return res.stdout

    def read_file(self, path: str) -> bytes:
        return self.check(f"cat {_shell_quote(path)}")

    def close(self) -> None:
        self.client.close()


# ----------------------------------------------------------------------------- the guest


@dataclass(frozen=True)
class GuestConfig:
    """What to boot and which devices to give it. Paths must be absolute.

    ``tpm_socket`` is the control socket of whatever serves the TPM (a swtpm now, the bridge
    later); ``None`` boots without a TPM. ``vports`` are virtio-serial port names, each on its
    own unix socket (:meth:`Guest.vport_path`). ``incoming`` is passed to ``-incoming``
    (``"defer"`` or ``"exec:cat FILE"``); such a guest is not waited for (no READY marker).
    """

    kernel: Path
    initramfs: Path
    ssh_key: Path | None = None
    ssh_host_key: str | None = None
    memory_mib: int = 256
    smp: int = 1
    memfd: bool = False
    tpm_socket: Path | None = None
    tpm_model: str = "tpm-crb"
    vports: tuple[str, ...] = ()
    net: bool = True
    repo_share: Path | None = None
    cmdline: str = "console=ttyS0 panic=-1 quiet loglevel=3"
    append: str = ""
    incoming: str | None = None
    paused: bool = False
    extra_args: tuple[str, ...] = ()

    def with_(self, **changes: Any) -> GuestConfig:
        return replace(self, **changes)


@dataclass
class Guest:
    """One QEMU process. Use :func:`start_guest`; always call :meth:`shutdown` (or ``with``)."""

    config: GuestConfig
    workdir: Path
    sock_dir: Path = field(default_factory=lambda: _short_dir("vtpm-qemu-"))
    ssh_port: int | None = None
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    ready_seconds: float | None = None
    swtpm: SwtpmUnix | None = None
    _qmp: QmpClient | None = None
    _ssh: GuestSsh | None = None

    @property
    def console_log(self) -> Path:
        return self.workdir / "console.log"

    @property
    def stderr_log(self) -> Path:
        return self.workdir / "qemu.stderr"

    @property
    def qmp_path(self) -> Path:
        return self.sock_dir / "qmp.sock"

    def vport_path(self, name: str) -> Path:
        """Host end (unix socket, QEMU is the server) of the virtio-serial port ``name``."""
        return self.sock_dir / f"vport{self.config.vports.index(name)}.sock"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def qemu_args(self) -> list[str]:
        c = self.config
        machine = "pc,accel=tcg"
        args = [QEMU]
        if c.memfd:
            machine += ",memory-backend=mem"
        args += ["-machine", machine, "-m", str(c.memory_mib), "-smp", str(c.smp)]
        if c.memfd:
            args += ["-object", f"memory-backend-memfd,id=mem,size={c.memory_mib}M,share=on"]
        args += [
            "-nographic",
            "-no-reboot",
            "-nodefaults",
            "-serial",
            f"file:{self.console_log}",
            "-kernel",
            str(c.kernel),
            "-initrd",
            str(c.initramfs),
            "-append",
            f"{c.cmdline} {c.append}".strip(),
            "-qmp",
            f"unix:{self.qmp_path},server=on,wait=off",
        ]
        if c.tpm_socket is not None:
            args += [
                "-chardev",
                f"socket,id=chrtpm,path={c.tpm_socket}",
                "-tpmdev",
                "emulator,id=tpm0,chardev=chrtpm",
                "-device",
                f"{c.tpm_model},tpmdev=tpm0",
            ]
        if c.net:
            assert self.ssh_port is not None
            args += [
                "-netdev",
                f"user,id=n0,hostfwd=tcp:127.0.0.1:{self.ssh_port}-:22",
                "-device",
                "virtio-net-pci,netdev=n0",
            ]
        if c.vports:
            args += ["-device", "virtio-serial"]
            for i, name in enumerate(c.vports):
                args += [
                    "-chardev",
                    f"socket,id=vs{i},path={self.vport_path(name)},server=on,wait=off",
                    "-device",
                    f"virtserialport,chardev=vs{i},name={name}",
                ]
        if c.repo_share is not None:
            args += [
                "-virtfs",
                f"local,path={c.repo_share},mount_tag=repo,security_model=none,readonly=on",
            ]
        if c.incoming is not None:
            args += ["-incoming", c.incoming]
        if c.paused:
            args.append("-S")
        args += list(c.extra_args)
        return args

    def start(self, *, timeout: float = 30.0) -> None:
        """Start QEMU and connect QMP (which answers only once QEMU finished initialising)."""
        require_binaries(QEMU)
        self.workdir.mkdir(parents=True, exist_ok=True)
        for attempt in range(3):
            self.ssh_port = free_port() if self.config.net else None
            with open(self.stderr_log, "wb") as err:
                self.started_at = time.monotonic()
                self.proc = _spawn(self.qemu_args(), stdout=subprocess.DEVNULL, stderr=err)
            self._qmp = QmpClient(self.qmp_path)
            try:
                self._qmp.connect(deadline=time.monotonic() + timeout, alive=self.alive)
                return
            except QemuError as exc:
                self._qmp.close()
                self._qmp = None
                _terminate(self.proc)
                stderr = _tail(self.stderr_log)
                if "forwarding" in stderr and attempt < 2:
                    continue  # the hostfwd port was taken in between: try another
                raise QemuError(f"QEMU did not start: {exc}\nstderr:\n{stderr}") from exc

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def qmp(self) -> QmpClient:
        if self._qmp is None:
            raise QemuError("QEMU is not running")
        return self._qmp

    def console_text(self) -> str:
        try:
            return self.console_log.read_text(errors="replace")
        except OSError:
            return ""

    def diagnostics(self) -> str:
        """Console tail and QEMU's stderr, for failure messages."""
        return (
            f"--- console tail ({self.console_log}) ---\n{_tail(self.console_log)}\n"
            f"--- qemu stderr ---\n{_tail(self.stderr_log)}"
        )

    def wait_for_console(self, needle: str, *, timeout: float = 60.0, start: int = 0) -> str:
        """Wait until a whole line containing ``needle`` is in the serial log (from ``start``).

        Returns that line, stripped. Raises :class:`QemuError` with the console tail on
        timeout or when QEMU exits first.
        """
        deadline = time.monotonic() + timeout
        while True:
            text = self.console_text()
            pos = text.find(needle, start)
            # The UART delivers a line byte by byte: return it only once it is complete.
            end = text.find("\n", pos) if pos >= 0 else -1
            if end >= 0:
                line_start = text.rfind("\n", 0, pos) + 1
                return text[line_start:end].strip()
            if not self.alive():
                raise QemuError(
                    f"QEMU exited ({self.proc.returncode if self.proc else '?'}) before "
                    f"{needle!r} appeared\n{self.diagnostics()}"
                )
            if time.monotonic() > deadline:
                raise QemuError(
                    f"{needle!r} not on the console after {timeout} s\n{self.diagnostics()}"
                )
            time.sleep(0.05)

    def wait_ready(self, *, timeout: float = 90.0) -> float:
        """Wait for ``VTPM-GUEST-READY``; return seconds since QEMU started (also kept)."""
        self.wait_for_console(READY_MARKER, timeout=timeout)
        self.ready_seconds = time.monotonic() - self.started_at
        return self.ready_seconds

    def ssh(self) -> GuestSsh:
        """A connected SSH session to the guest (made once, reused)."""
        if self._ssh is None:
            if self.ssh_port is None or self.config.ssh_key is None:
                raise QemuError("guest has no SSH: needs net=True and ssh_key")
            ssh = GuestSsh(self.ssh_port, self.config.ssh_key, self.config.ssh_host_key)
            ssh.connect()
            self._ssh = ssh
        return self._ssh

    def run(self, command: str, **kw: Any) -> SshResult:
        return self.ssh().run(command, **kw)

    def check(self, command: str, **kw: Any) -> bytes:
        return self.ssh().check(command, **kw)

    def vport_connect(self, name: str, *, timeout: float = 5.0) -> socket.socket:
        """Connect to the host end of the virtio-serial port ``name``."""
        path = self.vport_path(name)
        deadline = time.monotonic() + timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(str(path))
                return sock
            except OSError as err:
                sock.close()
                if time.monotonic() > deadline:
                    raise QemuError(f"virtio-serial socket {path}: {err}") from err
                time.sleep(0.02)

    def memfd_path(self) -> Path:
        """``/proc/<pid>/fd/N`` of the memfd holding guest RAM (needs ``memfd=True``)."""
        fd_dir = Path(f"/proc/{self.pid}/fd")
        for fd in sorted(fd_dir.iterdir(), key=lambda p: int(p.name)):
            with contextlib.suppress(OSError):
                if os.readlink(fd).startswith("/memfd:memory-backend-memfd"):
                    return fd
        raise QemuError(f"no memory-backend-memfd among QEMU {self.pid}'s descriptors")

    def shutdown(self, *, timeout: float = 10.0) -> None:
        """Stop QEMU (QMP ``quit``, then SIGTERM/SIGKILL by pid), then its swtpm. Idempotent."""
        if self._ssh is not None:
            self._ssh.close()
            self._ssh = None
        if self._qmp is not None:
            if self.alive():
                self._qmp.quit()
            self._qmp.close()
            self._qmp = None
        if self.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout)
            _terminate(self.proc)
        if self.swtpm is not None:
            self.swtpm.stop()
        shutil.rmtree(self.sock_dir, ignore_errors=True)

    def __enter__(self) -> Guest:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


def start_guest(
    config: GuestConfig,
    workdir: Path,
    *,
    wait: bool | None = None,
    swtpm: SwtpmUnix | None = None,
) -> Guest:
    """Start a guest; wait for its READY marker unless it is paused or incoming.

    ``swtpm`` (the TPM behind ``config.tpm_socket``) is then owned by the guest and stopped
    with it. On failure everything started here is stopped again.

    Raises:
        QemuError: QEMU failed to start or the guest never got ready (console tail included).
    """
    guest = Guest(config=config, workdir=workdir, swtpm=swtpm)
    try:
        guest.start()
        if wait if wait is not None else not (config.paused or config.incoming):
            guest.wait_ready()
    except BaseException:
        guest.shutdown()
        raise
    return guest


class GuestFactory:
    """Boots guests under ``root``; each gets its own swtpm unless told otherwise."""

    def __init__(self, base: GuestConfig, root: Path, *, repo: Path | None = None) -> None:
        self.base = base
        self.root = root
        self.repo = repo
        self.guests: list[Guest] = []

    def __call__(
        self,
        name: str | None = None,
        *,
        tpm: bool = True,
        tpm_state: Path | None = None,
        repo: bool = False,
        wait: bool | None = None,
        **config: Any,
    ) -> Guest:
        """Boot a guest and wait for READY (not for ``paused``/``incoming`` guests).

        Args:
            name: directory name under the factory root (default ``guest<N>``).
            tpm: give it a fresh swtpm (ignored when ``tpm_socket`` is passed).
            tpm_state: swtpm ``--tpmstate`` directory (default ``<name>/tpm``, empty).
            repo: share the factory's ``repo`` directory read-only over 9p (/mnt/repo).
            wait: override whether to wait for the READY marker.
            **config: any :class:`GuestConfig` field (``memfd``, ``vports``, ``append``, ...).
        """
        name = name or f"guest{len(self.guests)}"
        workdir = self.root / name
        swtpm = None
        if tpm and "tpm_socket" not in config:
            swtpm = start_swtpm_unix(tpm_state or workdir / "tpm")
            config["tpm_socket"] = swtpm.ctrl_path
        if repo:
            if self.repo is None:
                raise ValueError("repo=True needs a factory made with repo=<path>")
            config["repo_share"] = self.repo
        try:
            guest = start_guest(self.base.with_(**config), workdir, wait=wait, swtpm=swtpm)
        except BaseException:
            if swtpm is not None:
                swtpm.stop()
            raise
        self.guests.append(guest)
        return guest

    def close(self) -> None:
        for guest in reversed(self.guests):
            guest.shutdown()


@contextlib.contextmanager
def running_guest(config: GuestConfig, workdir: Path) -> Iterator[Guest]:
    guest = start_guest(config, workdir)
    try:
        yield guest
    finally:
        guest.shutdown()
