"""One JSON request line to a local unix socket, one JSON reply line back: how the ``vtpm-host``
commands talk to the daemon's and the migration service's control sockets."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

__all__ = ["call_json_line"]


def call_json_line(path: Path, request: dict[str, Any], timeout: float, peer: str) -> Any:
    """Send ``request`` as one line to the unix socket at ``path`` and return the decoded first
    reply line.

    Args:
        peer: what listens there, for the message when it hangs up early ("the daemon").

    Raises:
        OSError: the socket cannot be reached or fails (including ``timeout``).
        EOFError: the peer closed the connection before a whole reply line.
        ValueError: the reply line is not JSON.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(str(path))
        sock.sendall(json.dumps(request).encode() + b"\n")
        buf = b""
        while b"\n" not in buf:
            chunk = sock.recv(65536)
            if not chunk:
                raise EOFError(f"{peer} closed the connection")
            buf += chunk
    finally:
        sock.close()
    return json.loads(buf.split(b"\n", 1)[0])
