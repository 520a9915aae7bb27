"""Real swtpm processes for the sim tier (STYLE.md §3 "Testing tiers").

A swtpm listens on a free TCP port and its control channel on the next one, keeps its state in a
temporary directory, and is stopped by pid. Its log is kept so a failing test can show it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.helpers.ports import free_port_pair

__all__ = ["Swtpm", "free_port_pair", "require_binaries", "start_swtpm"]


def require_binaries(*names: str) -> None:
    """Fail (not skip) when a binary the suite needs is missing: CI installs them all."""
    missing = [n for n in names if shutil.which(n) is None]
    if missing:
        raise RuntimeError(f"missing binaries {missing}; run `make test` so it installs them")


@dataclass
class Swtpm:
    """One running swtpm. ``tcti`` is the string tpm2-pytss and tpm2-tools take."""

    state_dir: Path
    port: int
    proc: subprocess.Popen[bytes]
    log: Path
    env: dict[str, str] = field(default_factory=dict)

    @property
    def ctrl_port(self) -> int:
        return self.port + 1

    @property
    def tcti(self) -> str:
        return f"swtpm:host=127.0.0.1,port={self.port}"

    def tools_env(self) -> dict[str, str]:
        """Environment for running tpm2-tools against this swtpm."""
        env = dict(os.environ)
        env["TPM2TOOLS_TCTI"] = self.tcti
        return env

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


class _ExitedEarly(RuntimeError):
    """swtpm exited before both of its ports accepted (e.g. one was taken meanwhile)."""


def _wait_accepting(port: int, proc: subprocess.Popen[bytes], deadline: float) -> None:
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise _ExitedEarly(f"swtpm exited with status {proc.returncode} before listening")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.02)
    raise RuntimeError(f"swtpm did not accept on port {port} within the deadline")


def start_swtpm(state_dir: Path, *, provision_ek: bool = False, timeout: float = 10.0) -> Swtpm:
    """Start a TPM 2.0 swtpm with its state in ``state_dir`` (created if missing).

    Args:
        state_dir: the ``--tpmstate`` directory; an existing state is reused.
        provision_ek: run ``swtpm_setup`` first (RSA and ECC EKs with certificates from
            swtpm-localca, platform certificate, sha256 bank), as the software root does.
        timeout: seconds to wait for both ports to accept.
    """
    require_binaries("swtpm", "swtpm_setup")
    state_dir.mkdir(parents=True, exist_ok=True)
    if provision_ek and not (state_dir / "tpm2-00.permall").exists():
        subprocess.run(
            [
                "swtpm_setup",
                "--tpm2",
                "--tpmstate",
                str(state_dir),
                "--create-ek-cert",
                "--create-platform-cert",
                "--lock-nvram",
                "--overwrite",
                "--pcr-banks",
                "sha256",
                "--ecc",
            ],
            check=True,
            capture_output=True,
        )
    log = state_dir / "swtpm.log"
    deadline = time.monotonic() + timeout
    # The pair is free when chosen but not reserved: an outgoing connection can take either
    # port before swtpm binds it, and swtpm then exits. Such a start is retried on a new pair.
    for attempt in range(3):
        port = free_port_pair()
        proc = subprocess.Popen(
            [
                "swtpm",
                "socket",
                "--tpm2",
                "--tpmstate",
                f"dir={state_dir}",
                "--server",
                f"type=tcp,port={port},bindaddr=127.0.0.1",
                "--ctrl",
                f"type=tcp,port={port + 1},bindaddr=127.0.0.1",
                "--flags",
                "not-need-init,startup-clear",
                "--log",
                f"file={log},level=1",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            # Both sockets: swtpm binds the control channel before the server port.
            _wait_accepting(port + 1, proc, deadline)
            _wait_accepting(port, proc, deadline)
            # A listener that is not swtpm's may hold the port; swtpm then exits at once.
            time.sleep(0.05)
            if proc.poll() is not None:
                raise _ExitedEarly(f"swtpm exited with status {proc.returncode} after binding")
            break
        except _ExitedEarly:
            proc.wait()
            if attempt == 2:
                tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
                raise RuntimeError(
                    f"swtpm exited with status {proc.returncode} before listening "
                    f"(3 attempts on fresh ports); its log ends:\n{tail}"
                ) from None
        except RuntimeError:
            proc.kill()
            proc.wait()
            raise
    tpm = Swtpm(state_dir=state_dir, port=port, proc=proc, log=log)
    # Leftover transient objects survive client disconnects (no resource manager): flush them.
    subprocess.run(["tpm2_flushcontext", "-t"], env=tpm.tools_env(), capture_output=True)
    return tpm
