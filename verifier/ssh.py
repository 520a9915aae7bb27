"""Run one command in a guest over SSH (paramiko) and collect its output: the tenant's transport.

Host keys are never accepted blindly: the guest's key must be the pinned one (``host_key``, an
OpenSSH public key line such as ``ssh-ed25519 AAAA…``) or be listed for that host in the tenant's
``known_hosts`` (``[host]:port`` entries for non-22 ports, as OpenSSH writes them). The guest may
run dropbear, which has no SFTP: everything goes through ``exec`` and the command's stdout.

Every paramiko, socket or OS failure is wrapped once, here, in :class:`TransportError`; the
timeouts bound the connection, authentication and the command (platform notes §5: connect+auth
~160 ms, exec 20-70 ms on the test guest under TCG).
"""

from __future__ import annotations

import base64
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import paramiko

from evidence.errors import VtpmError

__all__ = ["RemoteResult", "SshTarget", "TransportError", "parse_target", "run_remote"]

_TARGET = re.compile(r"(?P<user>[^@\s]+)@(?P<host>\[[^\]]+\]|[^:\s]+)(?::(?P<port>\d{1,5}))?")
MAX_OUTPUT = 256 * 1024 * 1024


class TransportError(VtpmError):
    """The guest could not be reached, authenticated or did not finish in time."""

    id: ClassVar[str] = "transport.ssh"


@dataclass(frozen=True)
class SshTarget:
    user: str
    host: str
    port: int = 22

    def __str__(self) -> str:
        return f"{self.user}@{self.host}:{self.port}"


def parse_target(text: str) -> SshTarget:
    """``USER@HOST[:PORT]`` (IPv6 hosts in brackets).

    Raises:
        ValueError: another shape, or a port outside 1..65535.
    """
    m = _TARGET.fullmatch(text.strip())
    if m is None:
        raise ValueError(f"--ssh must be USER@HOST[:PORT], got {text!r}")
    port = int(m["port"] or 22)
    if not 1 <= port <= 65535:
        raise ValueError(f"port {port} is not 1..65535")
    return SshTarget(m["user"], m["host"].strip("[]"), port)


@dataclass(frozen=True)
class RemoteResult:
    exit_status: int
    stdout: bytes
    stderr: bytes


class _PinnedKey(paramiko.MissingHostKeyPolicy):  # type: ignore[misc]
    def __init__(self, key_type: str, key_b64: str) -> None:
        self.key_type = key_type
        self.key_b64 = key_b64

    def missing_host_key(
        self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey
    ) -> None:
        if key.get_name() != self.key_type or key.get_base64() != self.key_b64:
            raise paramiko.SSHException(
                f"host key of {hostname} is {key.get_name()} {key.get_fingerprint().hex()}, "
                "not the pinned key"
            )


def _load_identity(path: Path) -> paramiko.PKey:
    try:
        return paramiko.PKey.from_path(str(path))
    except (OSError, paramiko.SSHException, ValueError) as err:
        raise TransportError(f"cannot load the SSH identity {path}: {err}") from err


def run_remote(
    target: SshTarget,
    identity: Path,
    command: str,
    *,
    host_key: str | None = None,
    known_hosts: Path | None = None,
    connect_timeout: float = 15.0,
    command_timeout: float = 60.0,
) -> RemoteResult:
    """Run ``command`` on ``target`` and return its exit status and output.

    Args:
        identity: the private key to authenticate with.
        host_key: the guest's pinned public key line (wins over ``known_hosts``).
        known_hosts: OpenSSH known_hosts file (default ``~/.ssh/known_hosts``).

    Raises:
        TransportError: unreachable, unknown or wrong host key, authentication refused, or the
            command did not finish within ``command_timeout``.
    """
    client = paramiko.SSHClient()
    if host_key is not None:
        parts = host_key.split()
        if len(parts) < 2:
            raise ValueError("host_key must be an OpenSSH public key line: TYPE BASE64")
        base64.b64decode(parts[1], validate=True)
        client.set_missing_host_key_policy(_PinnedKey(parts[0], parts[1]))
    else:
        path = known_hosts or Path.home() / ".ssh" / "known_hosts"
        try:
            client.load_host_keys(str(path))
        except OSError as err:
            raise TransportError(f"cannot read known_hosts {path}: {err}") from err
        client.set_missing_host_key_policy(paramiko.RejectPolicy())
    pkey = _load_identity(identity)
    try:
        client.connect(
            target.host,
            port=target.port,
            username=target.user,
            pkey=pkey,
            timeout=connect_timeout,
            banner_timeout=connect_timeout,
            auth_timeout=connect_timeout,
            allow_agent=False,
            look_for_keys=False,
        )
        transport = client.get_transport()
        assert transport is not None
        chan = transport.open_session(timeout=connect_timeout)
        chan.settimeout(command_timeout)
        chan.exec_command(command)
        deadline = time.monotonic() + command_timeout
        out, errbuf = bytearray(), bytearray()
        while True:
            if chan.recv_ready():
                out += chan.recv(1 << 16)
            elif chan.recv_stderr_ready():
                errbuf += chan.recv_stderr(1 << 16)
            elif chan.exit_status_ready():
                while chan.recv_ready():
                    out += chan.recv(1 << 16)
                while chan.recv_stderr_ready():
                    errbuf += chan.recv_stderr(1 << 16)
                break
            else:
                if time.monotonic() > deadline:
                    raise TransportError(
                        f"{target}: {command.split()[0]!r} did not finish in {command_timeout} s"
                    )
                time.sleep(0.002)
            if len(out) + len(errbuf) > MAX_OUTPUT:
                raise TransportError(f"{target}: more than {MAX_OUTPUT} bytes of output")
        return RemoteResult(chan.recv_exit_status(), bytes(out), bytes(errbuf))
    except (TimeoutError, paramiko.SSHException, OSError, EOFError) as err:
        raise TransportError(f"ssh {target}: {err or type(err).__name__}") from err
    finally:
        client.close()
