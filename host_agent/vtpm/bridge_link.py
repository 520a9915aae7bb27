"""Link plumbing of the bridge: framed peers, the per-VM registry, and a blocking link client.

- :class:`LinkPeer`: one connected link socket inside the bridge's event loop (the daemon
  connection, or a query client), with its frame decoder.
- Registry: a running bridge writes ``<runtime_dir>/<vm_uuid>.json`` (its UUID, name, pid, control
  socket and query socket ``<runtime_dir>/<vm_uuid>.sock``) and removes it when it stops;
  :func:`registered_bridges` lists them, skipping entries whose process is gone.
- :class:`LinkClient`: a blocking client of a bridge's query socket (``vtpm-host vm pcrs``).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evidence.errors import ParseError
from host_agent.vtpm.bridge_errors import BridgeNotFound, BridgeTransportError, LinkCallError
from host_agent.vtpm.daemon_link import Call, FrameDecoder, Message, Result, encode_message

__all__ = [
    "REGISTRY_FORMAT",
    "BridgeRecord",
    "LinkClient",
    "LinkPeer",
    "find_bridge",
    "registered_bridges",
    "remove_registration",
    "write_registration",
]

REGISTRY_FORMAT = "vtpm-trust/bridge/1"


class LinkPeer:
    """One link connection in the bridge's loop. ``kind`` is ``"daemon"`` or ``"query"``."""

    def __init__(self, sock: socket.socket, kind: str, name: str) -> None:
        self.sock = sock
        self.kind = kind
        self.name = name
        self.decoder = FrameDecoder()
        self.closed = False

    def send(self, msg: Message) -> bool:
        """Send one frame; False (and the peer is closed) if the socket broke."""
        if self.closed:
            return False
        try:
            self.sock.sendall(encode_message(msg))
            return True
        except OSError:
            self.close()
            return False

    def receive(self) -> list[Message] | None:
        """Read what is available; the complete messages, or None at EOF/error.

        Raises:
            ParseError: the peer sent a malformed frame (the caller closes the peer).
        """
        try:
            data = self.sock.recv(1 << 20)
        except OSError:
            data = b""
        if not data:
            return None
        self.decoder.feed(data)
        out: list[Message] = []
        while (msg := self.decoder.next_message()) is not None:
            out.append(msg)
        return out

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            with contextlib.suppress(OSError):
                self.sock.close()


@dataclass(frozen=True)
class BridgeRecord:
    """A bridge's registration under the runtime directory."""

    vm_uuid: str
    vm_name: str
    pid: int
    ctrl_socket: str
    query_socket: str

    def to_json(self) -> str:
        return json.dumps({"format": REGISTRY_FORMAT, **self.__dict__}, indent=1) + "\n"


def registration_path(runtime_dir: Path, vm_uuid: str) -> Path:
    return runtime_dir / f"{vm_uuid}.json"


def query_socket_path(runtime_dir: Path, vm_uuid: str) -> Path:
    return runtime_dir / f"{vm_uuid}.sock"


def write_registration(runtime_dir: Path, record: BridgeRecord) -> Path:
    """Write the record atomically (rename), readable by the owner only."""
    runtime_dir.mkdir(parents=True, exist_ok=True)
    path = registration_path(runtime_dir, record.vm_uuid)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(record.to_json())
    tmp.chmod(0o600)
    tmp.replace(path)
    return path


def remove_registration(runtime_dir: Path, vm_uuid: str, pid: int) -> None:
    """Remove the record if it is still ours (a newer bridge may have replaced it)."""
    path = registration_path(runtime_dir, vm_uuid)
    try:
        if json.loads(path.read_text()).get("pid") == pid:
            path.unlink()
    except (OSError, ValueError):
        pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def registered_bridges(runtime_dir: Path) -> Iterator[BridgeRecord]:
    """Records of bridges whose process still runs (malformed or stale records are skipped)."""
    if not runtime_dir.is_dir():
        return
    for path in sorted(runtime_dir.glob("*.json")):
        try:
            obj: dict[str, Any] = json.loads(path.read_text())
            if obj.pop("format", None) != REGISTRY_FORMAT:
                continue
            record = BridgeRecord(**obj)
        except (OSError, ValueError, TypeError):
            continue
        if _alive(record.pid):
            yield record


def find_bridge(runtime_dir: Path, domain: str) -> BridgeRecord:
    """The running bridge whose VM UUID (case-insensitive) or name is ``domain``.

    Raises:
        BridgeNotFound: none, or the name is ambiguous.
    """
    records = list(registered_bridges(runtime_dir))
    by_uuid = [r for r in records if r.vm_uuid.lower() == domain.lower()]
    if by_uuid:
        return by_uuid[0]
    by_name = [r for r in records if r.vm_name and r.vm_name == domain]
    if len(by_name) == 1:
        return by_name[0]
    raise BridgeNotFound(domain, str(runtime_dir))


class LinkClient:
    """Blocking client of a bridge's query socket: one call at a time."""

    def __init__(self, path: Path, *, timeout: float = 30.0) -> None:
        self.path = path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        try:
            self._sock.connect(str(path))
        except OSError as err:
            self._sock.close()
            raise BridgeTransportError(f"bridge query socket {path}", str(err)) from err
        self._decoder = FrameDecoder()
        self._next = 0

    def call(self, op: str, **args: Any) -> dict[str, Any]:
        """Run ``op`` on the bridge and return its value.

        Raises:
            LinkCallError: the bridge answered with an error (its id kept in ``error_id``).
            BridgeTransportError: the socket broke, timed out, or the answer was malformed.
        """
        self._next += 1
        what = f"bridge query socket {self.path}"
        try:
            self._sock.sendall(encode_message(Call(self._next, op, dict(args))))
            deadline = time.monotonic() + (self._sock.gettimeout() or 30.0)
            while True:
                msg = self._decoder.next_message()
                if msg is not None:
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError("no answer")
                data = self._sock.recv(1 << 20)
                if not data:
                    raise EOFError("bridge closed the connection")
                self._decoder.feed(data)
        except ParseError as err:
            raise BridgeTransportError(what, f"malformed answer: {err}") from err
        except (OSError, EOFError) as err:
            raise BridgeTransportError(what, str(err) or type(err).__name__) from err
        if not isinstance(msg, Result) or msg.id != self._next:
            raise BridgeTransportError(what, f"unexpected answer {type(msg).__name__}")
        if not msg.ok:
            raise LinkCallError(msg.error_id, msg.message)
        return msg.value

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> LinkClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
