"""The tenant's and a stand-in's side of a VM on a namespace host.

:func:`install_guest_agent` runs inside the namespace whose QEMU forwards the guest's SSH port
(``NetnsPair.call_function``: arguments and result are JSON). :func:`ask_channel` plays a QEMU
that still holds the VM's attestation channel (a stale or replayed copy of the VM): it binds the
channel socket, lets the host's daemon connect and asks it for a quote, as the guest agent does.
"""

from __future__ import annotations

import base64
import io
import secrets
import socket
import tarfile
import time
from pathlib import Path
from typing import Any

from guest_agent import channel as guest_channel

__all__ = ["AGENT_DIR", "GUEST_COMMAND", "ask_channel", "install_guest_agent"]

REPO = Path(__file__).resolve().parents[2]
AGENT_DIR = "/tmp/vtpm"
#: How ``vtpm-verify attest --guest-command`` runs the agent :func:`install_guest_agent` put there.
GUEST_COMMAND = f"PYTHONPATH={AGENT_DIR} python3 -m guest_agent.cli"


def install_guest_agent(port: int, key_path: str, host_key: str, timeout: float = 60.0) -> int:
    """Copy ``guest_agent/*.py`` into the guest at ``127.0.0.1:port`` as root (tar over SSH,
    the guest's host key pinned); return how many files went in."""
    buf = io.BytesIO()
    files = sorted((REPO / "guest_agent").glob("*.py"))
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for path in files:
            tar.add(path, arcname=f"guest_agent/{path.name}")
    client = _ssh(port, key_path, host_key, timeout)
    try:
        command = f"mkdir -p {AGENT_DIR} && tar -x -C {AGENT_DIR}"
        chan_in, chan_out, chan_err = client.exec_command(command, timeout=60)
        chan_in.write(buf.getvalue())
        chan_in.channel.shutdown_write()
        chan_out.read()
        stderr = chan_err.read().decode(errors="replace")
        if chan_out.channel.recv_exit_status() != 0:
            raise RuntimeError(f"installing the guest agent: {stderr[-500:]}")
    finally:
        client.close()
    return len(files)


def ask_channel(path: Path, timeout: float = 30.0) -> dict[str, Any]:
    """Bind the VM's channel socket ``path`` (QEMU's end), wait for the daemon to connect, ask
    for a quote over a fresh nonce; return the daemon's answer. The socket is removed after."""
    path.unlink(missing_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn: socket.socket | None = None
    try:
        listener.bind(str(path))
        listener.listen(1)
        listener.settimeout(timeout)
        conn, _ = listener.accept()
        conn.settimeout(timeout)
        nonce = base64.b64encode(secrets.token_bytes(32)).decode()
        conn.sendall(guest_channel.encode_frame(
            {"type": "quote", "version": 1, "id": "stand-in", "nonce": nonce}
        ))  # fmt: skip
        decoder = guest_channel.FrameDecoder()
        while (frame := decoder.next_frame()) is None:
            data = conn.recv(65536)
            if not data:
                raise RuntimeError("the daemon closed the channel without an answer")
            decoder.feed(data)
        return frame
    finally:
        if conn is not None:
            conn.close()
        listener.close()
        path.unlink(missing_ok=True)


def run_in_guest(
    port: int, key_path: str, host_key: str, command: str, timeout: float = 60.0
) -> str:
    """Run ``command`` as root in the guest at ``127.0.0.1:port`` over SSH (its host key
    pinned); return its stdout. Raises RuntimeError when it exits non-zero."""
    client = _ssh(port, key_path, host_key, timeout)
    try:
        _in, out, err = client.exec_command(command, timeout=timeout)
        stdout = out.read().decode(errors="replace")
        if out.channel.recv_exit_status() != 0:
            raise RuntimeError(f"{command!r} in the guest: {err.read().decode(errors='replace')}")
        return str(stdout)
    finally:
        client.close()


def _ssh(port: int, key_path: str, host_key: str, timeout: float) -> Any:
    """An SSH client logged in as root at ``127.0.0.1:port``, the guest's ``host_key`` pinned;
    connection attempts are retried until ``timeout`` (the guest may still be booting)."""
    import paramiko  # type: ignore[import-untyped]

    kind, b64 = host_key.split()[:2]
    client = paramiko.SSHClient()
    client.get_host_keys().add(
        f"[127.0.0.1]:{port}", kind, paramiko.PKey.from_type_string(kind, base64.b64decode(b64))
    )
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    deadline = time.monotonic() + timeout
    while True:
        try:
            client.connect("127.0.0.1", port=port, username="root", key_filename=key_path,
                           look_for_keys=False, allow_agent=False, timeout=5,
                           banner_timeout=10, auth_timeout=10)  # fmt: skip
            return client
        except (OSError, paramiko.SSHException) as err:
            if isinstance(err, paramiko.BadHostKeyException) or time.monotonic() > deadline:
                raise RuntimeError(f"SSH to 127.0.0.1:{port} failed: {err!r}") from err
            time.sleep(0.5)
