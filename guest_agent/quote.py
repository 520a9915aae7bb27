"""``vtpm-guest quote``: ask the host for a signed vPCR attestation, add the measurement lists.

Request (guest → host), one frame (guest_agent/channel.py)::

    {"type": "quote", "version": 1, "id": "<16 hex>", "nonce": "<base64, 16..64 bytes>"}

Answer (host → guest), one frame with the same ``id``::

    {"type": "quote", "version": 1, "id": ..., "ok": true,
     "evidence": {"vm_uuid", "cert_user", "attestation", "vaik", "authkey", "aik_certificates"}}
    {"type": "quote", "version": 1, "id": ..., "ok": false,
     "error": {"id": "attest.not_enrolled" | ..., "message": "..."}}

``evidence`` holds exactly those bundle fields, already in the bundle's encoding (base64), so the
guest copies them: the bundle is ``{"format": "vtpm-trust/evidence/1", "nonce", **evidence,
"event_log", "ima_list"}`` (ARCHITECTURE.md §4; parsed by ``evidence.bundle``). Answers with
another id (a late answer to an earlier, abandoned request) are skipped; when the host goes
away before answering, the request is sent again after it reconnects, until the deadline.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import time
from typing import Any

from guest_agent.channel import GuestAgentError, Port, encode_frame

__all__ = [
    "BUNDLE_FORMAT",
    "EVENT_LOG_PATH",
    "EVIDENCE_FIELDS",
    "IMA_LIST_PATH",
    "build_bundle",
    "parse_nonce",
    "request_quote",
]

BUNDLE_FORMAT = "vtpm-trust/evidence/1"
EVENT_LOG_PATH = "/sys/kernel/security/tpm0/binary_bios_measurements"
IMA_LIST_PATH = "/sys/kernel/security/ima/binary_runtime_measurements"
EVIDENCE_FIELDS = frozenset(
    {"vm_uuid", "cert_user", "attestation", "vaik", "authkey", "aik_certificates"}
)
PROTOCOL_VERSION = 1


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def parse_nonce(text: str) -> bytes:
    """``--nonce HEX`` → 16..64 bytes (exit code 2 otherwise)."""
    try:
        nonce = bytes.fromhex(text)
    except ValueError as err:
        raise GuestAgentError(f"--nonce must be hexadecimal, got {text[:20]!r}") from err
    if not 16 <= len(nonce) <= 64:
        raise GuestAgentError(f"--nonce must be 16..64 bytes, got {len(nonce)}")
    return nonce


def read_optional(path: str) -> bytes | None:
    """A measurement list, or None when the kernel does not offer it (no TPM log, no IMA)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return None
    except OSError as err:
        raise GuestAgentError(f"cannot read {path}: {err.strerror} (run as root?)") from err
    return data or None


def request_quote(port: Port, nonce: bytes, *, timeout: float = 10.0) -> dict[str, Any]:
    """Send a quote request on ``port`` and return the host's ``evidence`` object.

    Raises:
        GuestAgentError: the host refused (exit code 1), did not answer in time or answered
            malformed (3).
    """
    request_id = os.urandom(8).hex()
    frame = encode_frame(
        {"type": "quote", "version": PROTOCOL_VERSION, "id": request_id, "nonce": _b64(nonce)}
    )
    deadline = time.monotonic() + timeout
    while True:
        port.send(frame, deadline)
        while (answer := port.receive(deadline)) is not None:
            if answer.get("id") == request_id:
                return _evidence(answer)
        # the host went away before answering: send again once it is back


def _evidence(answer: dict[str, Any]) -> dict[str, Any]:
    if answer.get("type") != "quote" or answer.get("version") != PROTOCOL_VERSION:
        raise GuestAgentError("channel: the host answered another protocol version", 3)
    if answer.get("ok") is not True:
        err = answer.get("error")
        if not isinstance(err, dict):
            raise GuestAgentError("channel: a refusal without an error object", 3)
        raise GuestAgentError(f"host refused [{err.get('id')}]: {err.get('message')}", 1)
    evidence = answer.get("evidence")
    if not isinstance(evidence, dict) or set(evidence) != EVIDENCE_FIELDS:
        raise GuestAgentError(f"channel: evidence must hold exactly {sorted(EVIDENCE_FIELDS)}", 3)
    return evidence


def build_bundle(
    evidence: dict[str, Any], nonce: bytes, event_log: bytes | None, ima_list: bytes | None
) -> str:
    """The evidence bundle text (canonical JSON: sorted keys, no spaces, ASCII)."""
    try:
        base64.b64decode(evidence["vm_uuid"], validate=True)
    except (TypeError, binascii.Error) as err:
        raise GuestAgentError("channel: evidence.vm_uuid is not base64", 3) from err
    bundle = {
        "format": BUNDLE_FORMAT,
        "nonce": _b64(nonce),
        **evidence,
        "event_log": None if event_log is None else _b64(event_log),
        "ima_list": None if ima_list is None else {"format": "binary", "data": _b64(ima_list)},
    }
    return json.dumps(bundle, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
