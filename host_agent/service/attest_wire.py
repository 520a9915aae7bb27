"""The guest attestation channel's wire format: frames and the quote messages (pure, no I/O).

A frame is ``u32 length (BE) ‖ canonical JSON object``; a guest sends a quote request
(:class:`QuoteRequest`, checked by :func:`parse_quote_request`) and gets back a quote answer or a
refusal with a stable error id. The guest agent holds its own copy of this codec
(``guest_agent/channel.py``); ``tests/unit/test_guest_channel_codec.py`` checks both against the
same vectors. Kept apart from the sockets (:mod:`host_agent.service.attest_channels`) and the
TPM work (:mod:`host_agent.service.attest_attestor`) so it can be read and tested alone.
"""

from __future__ import annotations

import base64
import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from evidence.errors import ParseError

__all__ = [
    "MAX_FRAME",
    "PROTOCOL_VERSION",
    "FrameDecoder",
    "QuoteRequest",
    "encode_frame",
    "parse_quote_request",
    "quote_answer",
    "refusal",
]

MAX_FRAME: Final = 1 << 20
"""Largest frame either side accepts (a request is ~150 bytes, an answer ~6 KiB)."""
PROTOCOL_VERSION: Final = 1
_LEN: Final = struct.Struct(">I")


# --------------------------------------------------------------------------------------------
# Frame codec (pure; the guest's copy is guest_agent/channel.py)


def encode_frame(obj: Mapping[str, Any]) -> bytes:
    """``u32 length (BE) ‖ canonical JSON object``."""
    body = json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
    if len(body) > MAX_FRAME:
        raise ValueError(f"frame of {len(body)} bytes exceeds {MAX_FRAME}")
    return _LEN.pack(len(body)) + body


class FrameDecoder:
    """Feed bytes, take whole frames.

    Raises (from :meth:`next_frame`):
        ParseError: a length outside 2..MAX_FRAME, a body that is not a UTF-8 JSON object.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._offset = 0  # stream offset of _buf[0], for error messages

    def feed(self, data: bytes) -> None:
        self._buf += data

    def next_frame(self) -> dict[str, Any] | None:
        if len(self._buf) < 4:
            return None
        (size,) = _LEN.unpack_from(self._buf)
        if not 2 <= size <= MAX_FRAME:
            raise ParseError("guest frame.length", self._offset, f"2..{MAX_FRAME}", str(size))
        if len(self._buf) < 4 + size:
            return None
        body = bytes(self._buf[4 : 4 + size])
        del self._buf[: 4 + size]
        offset, self._offset = self._offset + 4, self._offset + 4 + size
        try:
            obj = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as err:
            raise ParseError("guest frame.body", offset, "UTF-8 JSON", str(err)) from err
        if not isinstance(obj, dict):
            raise ParseError("guest frame.body", offset, "a JSON object", type(obj).__name__)
        return obj


@dataclass(frozen=True)
class QuoteRequest:
    """A guest's request: its correlation id and the verifier's nonce (16..64 bytes)."""

    id: str
    nonce: bytes


def parse_quote_request(obj: Mapping[str, Any]) -> QuoteRequest:
    """Check a request frame strictly (protocol in ``guest_agent/quote.py``).

    Raises:
        ParseError: another type or version, unknown fields, a bad id or nonce.
    """
    fields = {"type", "version", "id", "nonce"}
    if set(obj) != fields:
        raise ParseError("quote request", 0, f"fields {sorted(fields)}", str(sorted(obj)))
    if obj["type"] != "quote" or obj["version"] != PROTOCOL_VERSION:
        got = f"{obj['type']!r} v{obj['version']!r}"
        raise ParseError("quote request.type", 0, f"'quote' v{PROTOCOL_VERSION}", got)
    rid = obj["id"]
    if not isinstance(rid, str) or not 1 <= len(rid) <= 64 or not rid.isascii():
        raise ParseError("quote request.id", 0, "1..64 ASCII characters", repr(rid)[:80])
    raw = obj["nonce"]
    try:
        nonce = base64.b64decode(raw, validate=True) if isinstance(raw, str) else b""
    except ValueError:
        nonce = b""
    if not 16 <= len(nonce) <= 64 or base64.b64encode(nonce).decode() != raw:
        raise ParseError("quote request.nonce", 0, "canonical base64 of 16..64 bytes", "other")
    return QuoteRequest(rid, nonce)


def quote_answer(request_id: str, evidence: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "type": "quote",
        "version": PROTOCOL_VERSION,
        "id": request_id,
        "ok": True,
        "evidence": dict(evidence),
    }


def refusal(request_id: str, error_id: str, message: str) -> dict[str, Any]:
    return {
        "type": "quote",
        "version": PROTOCOL_VERSION,
        "id": request_id,
        "ok": False,
        "error": {"id": error_id, "message": message},
    }
