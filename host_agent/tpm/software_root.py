"""The embedded *software root*: a swtpm the agent provisions, starts and stops itself.

For development and single-machine trials only: a software TPM's keys live in files on this very
host, so it proves nothing about the host to anyone. Discovery announces it loudly.

Layout under ``directory`` (the agent's ``<tpm state_dir>/swtpm``)::

    tpm2-00.permall     swtpm state (made by swtpm_setup: RSA-2048 + ECC P-384 EKs with EK
                        certificates from swtpm-localca, a platform certificate, sha256 bank)
    swtpm.sock(.ctrl)   server and control unix sockets (TCTI ``swtpm:path=…/swtpm.sock``)
    swtpm.pid           pid file     swtpm.log    log

swtpm_setup's local CA (/var/lib/swtpm-localca) must stay owned by ``tss``: running swtpm_setup as
root leaves root-owned files there and later breaks libvirt's own swtpm_setup (platform-notes §3),
so after provisioning as root the ownership is handed back (:mod:`host_agent.swtpm_localca`, as
for every VM's vTPM).

Lifetime: the process that starts the swtpm stops it when its port closes; a process that finds
it running (pid file names a live swtpm on this state) attaches and leaves it running. So the
daemon should be the first to start it; a CLI command run meanwhile attaches.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import os
import shutil
import signal
import socket
import struct
import subprocess
import time
from pathlib import Path

from host_agent.swtpm_localca import LOCALCA_DIR, restore_localca_owner

from .errors import SoftwareRootError

__all__ = ["LOCALCA_DIR", "RunState", "SoftwareRoot"]

log = logging.getLogger(__name__)

#: TPM2_Shutdown(TPM_SU_STATE): tag TPM_ST_NO_SESSIONS, size 12, TPM_CC_Shutdown.
_SHUTDOWN_STATE = struct.pack(">HIIH", 0x8001, 12, 0x0145, 0x0001)


class RunState(enum.Enum):
    STOPPED = "stopped"
    RUNNING = "running"  # started by us
    ATTACHED = "attached"  # already running (another agent process started it); not ours to stop


class SoftwareRoot:
    """One embedded swtpm.

    Args:
        directory: state directory (created if missing).
        start_timeout: seconds to wait for the sockets.
    """

    def __init__(self, directory: Path, *, start_timeout: float = 10.0) -> None:
        self.directory = Path(directory)
        self.start_timeout = start_timeout
        self.state = RunState.STOPPED
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def socket_path(self) -> Path:
        return self.directory / "swtpm.sock"

    @property
    def ctrl_path(self) -> Path:
        return self.directory / "swtpm.sock.ctrl"

    @property
    def pid_path(self) -> Path:
        return self.directory / "swtpm.pid"

    @property
    def log_path(self) -> Path:
        return self.directory / "swtpm.log"

    @property
    def tcti(self) -> str:
        return f"swtpm:path={self.socket_path}"

    @property
    def provisioned(self) -> bool:
        return (self.directory / "tpm2-00.permall").exists()

    def provision(self) -> bool:
        """Run swtpm_setup once (EK certs by swtpm-localca). Returns True if it ran."""
        if self.provisioned:
            return False
        self._require("swtpm_setup")
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        localca_existed = LOCALCA_DIR.exists()
        cmd = [
            "swtpm_setup",
            "--tpm2",
            "--tpmstate",
            str(self.directory),
            "--create-ek-cert",
            "--create-platform-cert",
            "--lock-nvram",
            "--pcr-banks",
            "sha256",
            "--ecc",
            "--not-overwrite",
        ]
        try:
            subprocess.run(cmd, check=True, capture_output=True, timeout=60)
        except subprocess.CalledProcessError as err:
            out = (err.stdout or b"").decode(errors="replace") + (err.stderr or b"").decode(
                errors="replace"
            )
            raise SoftwareRootError(
                f"swtpm_setup failed with status {err.returncode}: {out.strip()[-800:]}"
            ) from err
        except (OSError, subprocess.TimeoutExpired) as err:
            raise SoftwareRootError(f"swtpm_setup could not run: {err}") from err
        restore_localca_owner(LOCALCA_DIR, created=not localca_existed)
        log.info("software root provisioned in %s", self.directory)
        return True

    @staticmethod
    def _require(binary: str) -> None:
        if shutil.which(binary) is None:
            raise SoftwareRootError(
                f"{binary} is not installed; install swtpm and swtpm-tools, or configure a TPM "
                "(tpm.tcti) instead of the software root"
            )

    def _running_pid(self) -> int | None:
        try:
            pid = int(self.pid_path.read_text().strip())
        except (OSError, ValueError):
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            return pid
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return None
        return pid if b"swtpm" in cmdline and str(self.directory).encode() in cmdline else None

    def start(self) -> None:
        """Provision if needed and start swtpm (or attach to the one already running here)."""
        if self.state is not RunState.STOPPED:
            return
        self.provision()
        if self._running_pid() is not None and self.ctrl_path.exists():
            self.state = RunState.ATTACHED
            log.info("software root already running (pid file %s): attached", self.pid_path)
            return
        self._require("swtpm")
        for stale in (self.socket_path, self.ctrl_path, self.pid_path):
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()
        cmd = [
            "swtpm",
            "socket",
            "--tpm2",
            "--tpmstate",
            f"dir={self.directory},mode=0600",
            "--server",
            f"type=unixio,path={self.socket_path},mode=0600",
            "--ctrl",
            f"type=unixio,path={self.ctrl_path},mode=0600",
            "--flags",
            "not-need-init,startup-clear",
            "--pid",
            f"file={self.pid_path}",
            "--log",
            f"file={self.log_path},level=1",
        ]
        try:
            self._proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
        except OSError as err:
            raise SoftwareRootError(f"swtpm could not start: {err}") from err
        try:
            self._wait_ready()
        except SoftwareRootError:
            self._kill()
            raise
        self.state = RunState.RUNNING

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        assert self._proc is not None
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise SoftwareRootError(
                    f"swtpm exited with status {self._proc.returncode} at start; "
                    f"see {self.log_path}"
                )
            # A socket file exists from bind(); only a connect proves listen() (swtpm opens
            # ctrl before the server socket, so both are probed).
            # The pid file is what a second agent process attaches by: wait for it too.
            if (
                all(self._accepts(p) for p in (self.ctrl_path, self.socket_path))
                and self._running_pid() == self._proc.pid
            ):
                return
            time.sleep(0.01)
        raise SoftwareRootError(f"swtpm did not open {self.ctrl_path} in {self.start_timeout} s")

    @staticmethod
    def _accepts(path: Path) -> bool:
        if not path.exists():
            return False
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(0.5)
            try:
                s.connect(str(path))
            except OSError:
                return False
        return True

    def _orderly_shutdown(self) -> None:
        """Send TPM2_Shutdown(STATE) before the process ends, as an OS does at power-off.

        A TPM that stops without it counts one dictionary-attack failure at its next start-up
        once a DA-protected key (the AIK, the AuthKey) has been used since the last orderly
        shutdown. swtpm's defaults (3 tries, 1,000 s recovery) then lock the software root out
        of every certification after three agent restarts (TPM_RC_LOCKOUT, 0x921). Best effort:
        a TPM that does not answer within two seconds is stopped anyway.
        """
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(2.0)
                s.connect(str(self.socket_path))
                s.sendall(_SHUTDOWN_STATE)
                answer = s.recv(64)
        except OSError as err:
            log.warning("software root: TPM2_Shutdown not sent (%s); stopping it anyway", err)
            return
        rc = struct.unpack(">I", answer[6:10])[0] if len(answer) >= 10 else None
        if rc != 0:
            log.warning("software root: TPM2_Shutdown answered %r; stopping it anyway", rc)

    def _kill(self) -> None:
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._orderly_shutdown()
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(5)
        self._proc = None

    def stop(self) -> None:
        """Stop the swtpm if this object started it (an attached one keeps running)."""
        if self.state is RunState.RUNNING:
            self._kill()
            for path in (self.socket_path, self.ctrl_path, self.pid_path):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
        self.state = RunState.STOPPED
