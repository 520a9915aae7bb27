"""The tenant's SSH collection (verifier/ssh.py) against a real SSH server (paramiko's, in-process).

What matters at this edge: the guest's host key must be the pinned one or be in known_hosts
(never accepted blindly), the command's stdout/stderr/exit status come back whole, a command
that does not finish is cut at its timeout, and every failure is one TransportError.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import paramiko  # type: ignore[import-untyped]
import pytest

from verifier.ssh import SshTarget, TransportError, run_remote


class _Server(paramiko.ServerInterface):  # type: ignore[misc]
    def __init__(self, client_key: paramiko.PKey) -> None:
        self.client_key = client_key
        self.command: bytes | None = None
        self.ready = threading.Event()

    def check_auth_publickey(self, username: str, key: paramiko.PKey) -> int:
        ok = username == "root" and key.get_base64() == self.client_key.get_base64()
        return paramiko.AUTH_SUCCESSFUL if ok else paramiko.AUTH_FAILED

    def get_allowed_auths(self, username: str) -> str:
        return "publickey"

    def check_channel_request(self, kind: str, chanid: int) -> int:
        return (
            paramiko.OPEN_SUCCEEDED
            if kind == "session"
            else paramiko.OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED
        )

    def check_channel_exec_request(self, channel: paramiko.Channel, command: bytes) -> bool:
        self.command = command
        self.ready.set()
        return True


class Guest:
    """One SSH server thread: ``echo X`` prints X, ``fail`` exits 3 with stderr, ``hang`` hangs."""

    def __init__(self, host_key: paramiko.PKey, client_key: paramiko.PKey) -> None:
        self.host_key = host_key
        self.client_key = client_key
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(8)
        self.port = self.listener.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._session, args=(conn,), daemon=True).start()

    def _session(self, conn: socket.socket) -> None:
        transport = paramiko.Transport(conn)
        transport.add_server_key(self.host_key)
        server = _Server(self.client_key)
        try:
            transport.start_server(server=server)
            chan = transport.accept(10)
            if chan is None or not server.ready.wait(10):
                return
            cmd = (server.command or b"").decode()
            if cmd.startswith("echo "):
                chan.sendall(cmd[5:].encode() * 1000)
                chan.send_exit_status(0)
            elif cmd == "fail":
                chan.sendall_stderr(b"host refused\n")
                chan.send_exit_status(3)
            elif cmd == "hang":
                time.sleep(5)
            chan.close()
        except (paramiko.SSHException, OSError, EOFError):
            pass
        finally:
            transport.close()

    def close(self) -> None:
        self.listener.close()


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[paramiko.PKey, paramiko.PKey, Path]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    d = tmp_path_factory.mktemp("ssh")
    host = paramiko.RSAKey.generate(2048)
    client_private = ed25519.Ed25519PrivateKey.generate()
    path = d / "id_ed25519"
    path.write_bytes(
        client_private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
    )
    client = paramiko.PKey.from_path(str(path))
    return host, client, path


@pytest.fixture(scope="module")
def guest(keys: tuple[paramiko.PKey, paramiko.PKey, Path]) -> Iterator[Guest]:
    g = Guest(keys[0], keys[1])
    yield g
    g.close()


def _pin(key: paramiko.PKey) -> str:
    return f"{key.get_name()} {key.get_base64()}"


def test_pinned_host_key_runs_the_command_and_returns_everything(
    guest: Guest, keys: tuple[paramiko.PKey, paramiko.PKey, Path]
) -> None:
    target = SshTarget("root", "127.0.0.1", guest.port)
    result = run_remote(target, keys[2], "echo bundle", host_key=_pin(keys[0]))
    assert result.exit_status == 0 and result.stdout == b"bundle" * 1000
    result = run_remote(target, keys[2], "fail", host_key=_pin(keys[0]))
    assert result.exit_status == 3 and result.stderr == b"host refused\n"


def test_another_host_key_is_refused(
    guest: Guest, keys: tuple[paramiko.PKey, paramiko.PKey, Path]
) -> None:
    other = paramiko.RSAKey.generate(2048)
    with pytest.raises(TransportError):
        run_remote(
            SshTarget("root", "127.0.0.1", guest.port), keys[2], "echo x", host_key=_pin(other)
        )


def test_known_hosts_is_used_and_an_unknown_host_refused(
    guest: Guest, keys: tuple[paramiko.PKey, paramiko.PKey, Path], tmp_path: Path
) -> None:
    target = SshTarget("root", "127.0.0.1", guest.port)
    known = tmp_path / "known_hosts"
    known.write_text(f"[127.0.0.1]:{guest.port} {_pin(keys[0])}\n")
    assert run_remote(target, keys[2], "echo ok", known_hosts=known).exit_status == 0
    known.write_text("")
    with pytest.raises(TransportError, match=r"ssh root@127\.0\.0\.1"):
        run_remote(target, keys[2], "echo ok", known_hosts=known)
    with pytest.raises(TransportError, match="known_hosts"):
        run_remote(target, keys[2], "echo ok", known_hosts=tmp_path / "missing")


def test_a_command_that_hangs_is_cut_at_its_timeout(
    guest: Guest, keys: tuple[paramiko.PKey, paramiko.PKey, Path]
) -> None:
    t0 = time.monotonic()
    with pytest.raises(TransportError, match="did not finish"):
        run_remote(
            SshTarget("root", "127.0.0.1", guest.port), keys[2], "hang",
            host_key=_pin(keys[0]), command_timeout=0.5,
        )  # fmt: skip
    assert time.monotonic() - t0 < 4


def test_nobody_listening_and_a_bad_identity_are_transport_errors(
    keys: tuple[paramiko.PKey, paramiko.PKey, Path], tmp_path: Path
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(TransportError):
        run_remote(SshTarget("root", "127.0.0.1", port), keys[2], "echo", host_key=_pin(keys[0]))
    bad = tmp_path / "id"
    bad.write_text("not a key")
    with pytest.raises(TransportError, match="identity"):
        run_remote(SshTarget("root", "127.0.0.1", port), bad, "echo", host_key=_pin(keys[0]))
