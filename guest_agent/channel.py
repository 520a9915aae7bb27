"""The guest side of the attestation channel: frame codec and the virtio-serial port.

Frame (both directions)::

    u32 length (big-endian, 2..MAX_FRAME) | UTF-8 JSON object of that many bytes

The host keeps its own copy of this codec (``host_agent/service/attest_wire.py``: the guest agent
imports nothing of ours); ``tests/unit/test_guest_channel_codec.py`` runs both against the same
vectors. Requests and answers are documented in ``guest_agent/quote.py``.

Port behaviour (docs platform-notes §5): there is no udev, so the port is found by name in
``/sys/class/virtio-ports/*/name`` (``/dev/virtio-ports/<name>`` when ``/init`` linked it);
``read()`` returns EOF while no host client is connected, and closing the port discards input
the host already sent, so :class:`Port` keeps the fd open and polls until its deadline.
"""

from __future__ import annotations

import json
import os
import select
import struct
import time
from typing import Any

__all__ = ["DEFAULT_PORT_NAME", "MAX_FRAME", "FrameDecoder", "GuestAgentError", "Port"]

DEFAULT_PORT_NAME = "org.vtpm-trust.attest.0"
MAX_FRAME = 1 << 20
_LEN = struct.Struct(">I")


class GuestAgentError(Exception):
    """Every error the guest agent reports; ``exit_code`` is the process status (cli.py)."""

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code


# -- codec (keep identical in meaning to host_agent/service/attest_wire.py) ---------------


def encode_frame(obj: dict[str, Any]) -> bytes:
    body = json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
    if len(body) > MAX_FRAME:
        raise ValueError(f"frame of {len(body)} bytes exceeds {MAX_FRAME}")
    return _LEN.pack(len(body)) + body


class FrameDecoder:
    """Feed bytes, take whole frames (dicts); a malformed frame raises GuestAgentError."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> None:
        self._buf += data

    def next_frame(self) -> dict[str, Any] | None:
        if len(self._buf) < 4:
            return None
        (size,) = _LEN.unpack_from(self._buf)
        if not 2 <= size <= MAX_FRAME:
            raise GuestAgentError(f"channel: frame length {size} is not 2..{MAX_FRAME}")
        if len(self._buf) < 4 + size:
            return None
        body, self._buf = bytes(self._buf[4 : 4 + size]), self._buf[4 + size :]
        try:
            obj = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as err:
            raise GuestAgentError(f"channel: frame is not UTF-8 JSON ({err})") from err
        if not isinstance(obj, dict):
            raise GuestAgentError("channel: frame is not a JSON object")
        return obj


# -- the port ----------------------------------------------------------------------------


def find_port(name: str, dev: str = "/dev", sys_class: str = "/sys/class/virtio-ports") -> str:
    """The device path of the virtio-serial port called ``name``.

    Raises:
        GuestAgentError: no such port (exit code 3).
    """
    link = os.path.join(dev, "virtio-ports", name)
    if os.path.exists(link):
        return link
    try:
        entries = sorted(os.listdir(sys_class))
    except OSError:
        entries = []
    for entry in entries:
        try:
            with open(os.path.join(sys_class, entry, "name"), encoding="utf-8") as f:
                if f.read().strip() == name:
                    return os.path.join(dev, entry)
        except OSError:
            continue
    raise GuestAgentError(
        f"no virtio-serial port named {name!r} (looked in {link} and {sys_class}/*/name): "
        "is the VM adopted with its attestation channel?",
        3,
    )


class Port:
    """One open virtio-serial port (kept open: closing it discards what the host sent)."""

    def __init__(self, path: str, *, poll_interval: float = 0.02) -> None:
        self.path = path
        self.poll_interval = poll_interval
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_NONBLOCK)
        except OSError as err:
            raise GuestAgentError(f"cannot open {path}: {err.strerror}", 3) from err
        self.decoder = FrameDecoder()

    def close(self) -> None:
        os.close(self.fd)

    def _wait(self, events: int, deadline: float) -> int:
        left = deadline - time.monotonic()
        if left <= 0:
            raise GuestAgentError(f"{self.path}: the host did not answer in time", 3)
        p = select.poll()
        p.register(self.fd, events)
        got = p.poll(min(left, 0.5) * 1000)
        return got[0][1] if got else 0

    def send(self, frame: bytes, deadline: float) -> None:
        """Write ``frame`` whole, waiting (up to ``deadline``) for a connected host."""
        view = memoryview(frame)
        while view:
            ev = self._wait(select.POLLOUT, deadline)
            if ev & select.POLLHUP or not ev & select.POLLOUT:
                time.sleep(self.poll_interval)  # no host client connected yet
                continue
            try:
                view = view[os.write(self.fd, view) :]
            except (BlockingIOError, InterruptedError):
                continue
            except OSError as err:
                raise GuestAgentError(f"{self.path}: write failed: {err.strerror}", 3) from err

    def receive(self, deadline: float) -> dict[str, Any] | None:
        """The next frame, or None when the host disconnected (EOF): the caller resends."""
        while (frame := self.decoder.next_frame()) is None:
            ev = self._wait(select.POLLIN, deadline)
            if not ev & select.POLLIN:
                if ev & select.POLLHUP:
                    self.decoder = FrameDecoder()  # a half frame from a lost host is void
                    return None
                continue
            try:
                data = os.read(self.fd, 65536)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError as err:
                raise GuestAgentError(f"{self.path}: read failed: {err.strerror}", 3) from err
            if not data:
                self.decoder = FrameDecoder()
                return None
            self.decoder.feed(data)
        return frame
