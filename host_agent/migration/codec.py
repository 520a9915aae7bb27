"""The peer protocol's frame codec (pure: bytes in, :class:`Frame` out, or :class:`FrameError`).

A frame carries one message: a small JSON header plus named binary blobs, so TPM structures
travel as raw bytes (no base64 inside JSON)::

    frame   = u32 body_length (big-endian, 8..MAX_FRAME) ‖ body
    body    = u32 header_length (big-endian) ‖ header ‖ blob_1 ‖ … ‖ blob_n
    header  = UTF-8 JSON object, canonical (sorted keys, no spaces):
              {"type": str, "fields": {str: JSON}, "blobs": [[name, length], …]}

Blob names are unique, 1..32 ASCII characters; their lengths add up to the rest of the body
exactly. :func:`encode_frame` ∘ :func:`FrameDecoder` is the identity, and decoding is strict:
anything else is a :class:`FrameError` naming the offset (``tests/unit/test_migration_codec.py``
checks both with hypothesis). Transports feed bytes into :class:`FrameDecoder` and take whole
frames; the codec never reads a socket.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from .errors import FrameError

__all__ = ["MAX_FRAME", "Frame", "FrameDecoder", "decode_frame", "encode_frame"]

MAX_FRAME: Final = 1 << 20
"""Largest frame body either side accepts (a duplication blob is ~1 KiB; 1 MiB is generous)."""

_U32: Final = struct.Struct(">I")
_MAX_NAME: Final = 32
_MAX_TYPE: Final = 64


@dataclass(frozen=True)
class Frame:
    """One decoded frame.

    Attributes:
        type: the message type (``"offer"``, ``"exgkey"`` …).
        fields: JSON values of the header.
        blobs: named binary values.
    """

    type: str
    fields: Mapping[str, Any] = field(default_factory=dict)
    blobs: Mapping[str, bytes] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.type, str) or not 1 <= len(self.type) <= _MAX_TYPE:
            raise ValueError(f"frame type must be 1..{_MAX_TYPE} characters")
        for name, value in self.blobs.items():
            if not isinstance(name, str) or not 1 <= len(name) <= _MAX_NAME or not name.isascii():
                raise ValueError(f"blob name must be 1..{_MAX_NAME} ASCII characters: {name!r}")
            if not isinstance(value, bytes):
                raise TypeError(f"blob {name!r} must be bytes")


def _header(frame: Frame) -> bytes:
    obj = {
        "type": frame.type,
        "fields": dict(frame.fields),
        "blobs": [[name, len(value)] for name, value in frame.blobs.items()],
    }
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def encode_frame(frame: Frame) -> bytes:
    """``u32 length ‖ u32 header length ‖ header ‖ blobs`` (see the module docstring).

    Raises:
        ValueError: the frame would exceed :data:`MAX_FRAME`, or a field is not JSON.
    """
    try:
        header = _header(frame)
    except (TypeError, ValueError) as err:
        raise ValueError(f"frame {frame.type!r}: fields are not JSON: {err}") from err
    body = _U32.pack(len(header)) + header + b"".join(frame.blobs.values())
    if len(body) > MAX_FRAME:
        raise ValueError(f"frame {frame.type!r} of {len(body)} bytes exceeds {MAX_FRAME}")
    return _U32.pack(len(body)) + body


def decode_frame(body: bytes, offset: int = 0) -> Frame:
    """Decode one frame body (without its outer length).

    Args:
        body: the body bytes.
        offset: stream offset of ``body`` (for error messages).

    Raises:
        FrameError: anything but a well-formed body.
    """
    if len(body) < 4:
        raise FrameError("migration frame.header_length", offset, "4 bytes", f"{len(body)}")
    (hlen,) = _U32.unpack_from(body)
    if hlen > len(body) - 4:
        raise FrameError(
            "migration frame.header_length", offset, f"at most {len(body) - 4}", str(hlen)
        )
    raw = body[4 : 4 + hlen]
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise FrameError("migration frame.header", offset + 4, "UTF-8 JSON", str(err)[:80]) from err
    if not isinstance(obj, dict) or set(obj) != {"type", "fields", "blobs"}:
        got = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
        raise FrameError("migration frame.header", offset + 4, "type, fields, blobs", str(got))
    kind, fields, table = obj["type"], obj["fields"], obj["blobs"]
    if not isinstance(kind, str) or not 1 <= len(kind) <= _MAX_TYPE:
        raise FrameError("migration frame.type", offset + 4, f"1..{_MAX_TYPE} characters")
    if not isinstance(fields, dict):
        raise FrameError("migration frame.fields", offset + 4, "a JSON object")
    if not isinstance(table, list):
        raise FrameError("migration frame.blobs", offset + 4, "a JSON list")
    blobs: dict[str, bytes] = {}
    pos = 4 + hlen
    for entry in table:
        if (
            not isinstance(entry, list)
            or len(entry) != 2
            or not isinstance(entry[0], str)
            or not 1 <= len(entry[0]) <= _MAX_NAME
            or not entry[0].isascii()
            or type(entry[1]) is not int
            or entry[1] < 0
        ):
            raise FrameError(
                "migration frame.blobs", offset + 4, "[name (1..32 ASCII), length ≥ 0]", repr(entry)
            )
        name, size = entry
        if name in blobs:
            raise FrameError("migration frame.blobs", offset + 4, "unique names", repr(name))
        if size > len(body) - pos:
            raise FrameError(
                f"migration frame.blob {name}", offset + pos, f"{size} bytes", str(len(body) - pos)
            )
        blobs[name] = bytes(body[pos : pos + size])
        pos += size
    if pos != len(body):
        raise FrameError("migration frame", offset + pos, "no trailing bytes", str(len(body) - pos))
    frame = Frame(kind, fields, blobs)
    if _header(frame) != raw:
        raise FrameError("migration frame.header", offset + 4, "canonical JSON", "another encoding")
    return frame


class FrameDecoder:
    """Feed bytes, take whole frames (``None`` until one is complete).

    Raises (from :meth:`next_frame`):
        FrameError: a length outside 8..MAX_FRAME or a malformed body; the stream is then
            unusable (the caller drops the connection).
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._offset = 0

    def feed(self, data: bytes) -> None:
        self._buf += data

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def next_frame(self) -> Frame | None:
        if len(self._buf) < 4:
            return None
        (size,) = _U32.unpack_from(self._buf)
        if not 8 <= size <= MAX_FRAME:
            raise FrameError("migration frame.length", self._offset, f"8..{MAX_FRAME}", str(size))
        if len(self._buf) < 4 + size:
            return None
        body = bytes(self._buf[4 : 4 + size])
        del self._buf[: 4 + size]
        offset, self._offset = self._offset + 4, self._offset + 4 + size
        return decode_frame(body, offset)
