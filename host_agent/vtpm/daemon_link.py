"""Pure codec of the bridge ↔ daemon link (a local unix stream socket).

Frame (all integers big-endian)::

    u32 json_length | u32 binary_length | json (UTF-8 object) | binary

The JSON object's ``"type"`` names the message; the binary part carries a state blob where one
travels (a SET_STATEBLOB hook, a ``replace`` verdict) and is empty otherwise.

Who talks to whom: each bridge *connects* to the daemon's socket and says :class:`Hello`; it
reconnects on its own whenever the daemon restarts, so a restarted daemon finds every running
bridge within one reconnect interval. Over that connection the bridge sends :class:`HookCall`
(the daemon answers :class:`HookReply`) and the daemon sends :class:`Call` (``read_pcrs``,
``status``; the bridge answers :class:`Result`). Command-line tools reach a bridge directly on
its per-VM query socket with the same frames (:class:`Call` / :class:`Result` only).

Messages (``type``):

- ``hello``   bridge → daemon: ``version``, ``vm_uuid``, ``vm_name``, ``pid``, ``ctrl_socket``,
  ``query_socket``.
- ``hook``    bridge → daemon: ``id``, ``vm_uuid``, ``event`` (``get_stateblob`` on save /
  snapshot / outgoing migration, ``set_stateblob`` on restore / incoming migration),
  ``blob_type`` (1 permanent, 2 volatile, 3 savestate), ``state_flags``, ``result`` (swtpm's, for
  GET), ``length``, ``sha256`` (hex of the blob); binary = the blob (for SET what QEMU pushes,
  for GET what swtpm handed out: the daemon seals it), or empty from a peer that omits it.
- ``verdict`` daemon → bridge: ``id``, ``verdict`` (``allow`` | ``veto`` | ``replace``),
  ``reason`` (required for veto), ``state_flags`` (optional, with replace); binary = the
  replacement blob.
- ``report``  bridge → daemon: ``vm_uuid``, ``instance`` (changes when the bridge restarts),
  ``relay_errors`` (object: kind → count since this instance started). Sent after the counts
  changed, on (re)connecting, and as the bridge stops, so counts made just before a bridge
  exits reach the daemon; no answer.
- ``call``    → bridge: ``id``, ``op`` (``read_pcrs`` | ``status``), ``args`` (object).
- ``result``  bridge →: ``id``, ``ok``; ``value`` (object) when ok, else ``error_id`` and
  ``message``.

Nothing here does I/O.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass, field
from typing import Any, TypeAlias

from evidence.errors import ParseError, TruncatedError, UnsupportedError

__all__ = [
    "LINK_VERSION",
    "MAX_BINARY",
    "MAX_JSON",
    "Call",
    "FrameDecoder",
    "Hello",
    "HookCall",
    "HookEvent",
    "HookReply",
    "Message",
    "Report",
    "Result",
    "Verdict",
    "decode_message",
    "encode_message",
]

LINK_VERSION = 1
MAX_JSON = 64 * 1024
MAX_BINARY = 4 * 1024 * 1024
_HDR = struct.Struct(">II")


class HookEvent:
    """Values of ``hook.event``."""

    GET_STATEBLOB = "get_stateblob"
    SET_STATEBLOB = "set_stateblob"
    ALL = (GET_STATEBLOB, SET_STATEBLOB)


class Verdict:
    """Values of ``verdict.verdict``."""

    ALLOW = "allow"
    VETO = "veto"
    REPLACE = "replace"
    ALL = (ALLOW, VETO, REPLACE)


def _need_str(name: str, value: object) -> None:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be str, got {type(value).__name__}")


def _need_int(name: str, value: object, bits: int = 32) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < (1 << bits):
        raise ValueError(f"{name} must be an unsigned {bits}-bit int, got {value!r}")


@dataclass(frozen=True)
class Hello:
    vm_uuid: str
    vm_name: str
    pid: int
    ctrl_socket: str
    query_socket: str
    version: int = LINK_VERSION

    def __post_init__(self) -> None:
        for name in ("vm_uuid", "vm_name", "ctrl_socket", "query_socket"):
            _need_str(f"Hello.{name}", getattr(self, name))
        _need_int("Hello.pid", self.pid)
        _need_int("Hello.version", self.version)


@dataclass(frozen=True)
class HookCall:
    id: int
    vm_uuid: str
    event: str
    blob_type: int
    state_flags: int
    result: int
    length: int
    sha256: str
    blob: bytes = b""

    def __post_init__(self) -> None:
        _need_int("HookCall.id", self.id, 63)
        _need_str("HookCall.vm_uuid", self.vm_uuid)
        if self.event not in HookEvent.ALL:
            raise ValueError(f"HookCall.event must be one of {HookEvent.ALL}, got {self.event!r}")
        for name in ("blob_type", "state_flags", "result", "length"):
            _need_int(f"HookCall.{name}", getattr(self, name))
        _need_str("HookCall.sha256", self.sha256)
        if not isinstance(self.blob, bytes) or len(self.blob) > MAX_BINARY:
            raise ValueError("HookCall.blob must be bytes within MAX_BINARY")

    @classmethod
    def for_blob(
        cls,
        id: int,
        vm_uuid: str,
        event: str,
        blob_type: int,
        blob: bytes,
        *,
        state_flags: int = 0,
        result: int = 0,
        include_blob: bool,
    ) -> HookCall:
        """A hook call describing ``blob`` (its digest always; the bytes if ``include_blob``)."""
        return cls(
            id,
            vm_uuid,
            event,
            blob_type,
            state_flags,
            result,
            len(blob),
            hashlib.sha256(blob).hexdigest(),
            blob if include_blob else b"",
        )


@dataclass(frozen=True)
class HookReply:
    id: int
    verdict: str
    reason: str = ""
    blob: bytes = b""
    state_flags: int | None = None

    def __post_init__(self) -> None:
        _need_int("HookReply.id", self.id, 63)
        if self.verdict not in Verdict.ALL:
            raise ValueError(f"HookReply.verdict must be one of {Verdict.ALL}")
        _need_str("HookReply.reason", self.reason)
        if self.verdict == Verdict.VETO and not self.reason:
            raise ValueError("a veto needs a reason")
        if not isinstance(self.blob, bytes) or len(self.blob) > MAX_BINARY:
            raise ValueError("HookReply.blob must be bytes within MAX_BINARY")
        if self.verdict != Verdict.REPLACE and self.blob:
            raise ValueError("only a replace verdict carries a blob")
        if self.state_flags is not None:
            _need_int("HookReply.state_flags", self.state_flags)


@dataclass(frozen=True)
class Call:
    id: int
    op: str
    args: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _need_int("Call.id", self.id, 63)
        _need_str("Call.op", self.op)
        if not isinstance(self.args, dict):
            raise TypeError("Call.args must be a dict")


@dataclass(frozen=True)
class Result:
    id: int
    ok: bool
    value: dict[str, Any] = field(default_factory=dict)
    error_id: str = ""
    message: str = ""

    def __post_init__(self) -> None:
        _need_int("Result.id", self.id, 63)
        if not isinstance(self.ok, bool):
            raise TypeError("Result.ok must be bool")
        if not isinstance(self.value, dict):
            raise TypeError("Result.value must be a dict")
        _need_str("Result.error_id", self.error_id)
        _need_str("Result.message", self.message)
        if not self.ok and not self.error_id:
            raise ValueError("a failed Result needs an error_id")


@dataclass(frozen=True)
class Report:
    vm_uuid: str
    instance: str
    relay_errors: dict[str, int]

    def __post_init__(self) -> None:
        _need_str("Report.vm_uuid", self.vm_uuid)
        _need_str("Report.instance", self.instance)
        if not isinstance(self.relay_errors, dict):
            raise TypeError("Report.relay_errors must be a dict")
        for kind, n in self.relay_errors.items():
            if not isinstance(kind, str) or not kind:
                raise ValueError(f"Report.relay_errors kind must be a non-empty str, got {kind!r}")
            _need_int(f"Report.relay_errors[{kind!r}]", n, 63)


Message: TypeAlias = Hello | HookCall | HookReply | Call | Result | Report

_TYPES: dict[type, str] = {
    Hello: "hello",
    HookCall: "hook",
    HookReply: "verdict",
    Call: "call",
    Result: "result",
    Report: "report",
}
_FIELDS: dict[str, tuple[type, tuple[str, ...], tuple[str, ...]]] = {
    # type: (class, required JSON fields, optional JSON fields)
    "hello": (Hello, ("vm_uuid", "vm_name", "pid", "ctrl_socket", "query_socket", "version"), ()),
    "hook": (
        HookCall,
        ("id", "vm_uuid", "event", "blob_type", "state_flags", "result", "length", "sha256"),
        (),
    ),
    "verdict": (HookReply, ("id", "verdict"), ("reason", "state_flags")),
    "call": (Call, ("id", "op"), ("args",)),
    "result": (Result, ("id", "ok"), ("value", "error_id", "message")),
    "report": (Report, ("vm_uuid", "instance", "relay_errors"), ()),
}


def encode_message(msg: Message) -> bytes:
    """One frame for ``msg``."""
    kind = _TYPES[type(msg)]
    _cls, required, optional = _FIELDS[kind]
    obj: dict[str, Any] = {"type": kind}
    for name in required + optional:
        value = getattr(msg, name)
        if name in optional and value in (None, "", {}):
            continue
        obj[name] = value
    payload = json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()
    binary = getattr(msg, "blob", b"")
    if len(payload) > MAX_JSON:
        raise ValueError(f"link message JSON of {len(payload)} bytes exceeds {MAX_JSON}")
    return _HDR.pack(len(payload), len(binary)) + payload + binary


def _build(obj: dict[str, Any], binary: bytes, offset: int) -> Message:
    kind = obj.get("type")
    if kind not in _FIELDS:
        raise UnsupportedError("link message.type", offset, f"one of {sorted(_FIELDS)}", repr(kind))
    assert isinstance(kind, str)
    cls, required, optional = _FIELDS[kind]
    missing = [n for n in required if n not in obj]
    if missing:
        raise ParseError(f"link {kind}", offset, f"fields {missing}", "missing")
    extra = sorted(set(obj) - set(required) - set(optional) - {"type"})
    if extra:
        raise ParseError(f"link {kind}", offset, "no other fields", f"unknown {extra}")
    kwargs = {n: obj[n] for n in required + optional if n in obj}
    if kind in ("hook", "verdict"):
        kwargs["blob"] = binary
    elif binary:
        raise ParseError(f"link {kind}", offset, "no binary part", f"{len(binary)} bytes")
    try:
        msg: Message = cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise ParseError(f"link {kind}", offset, "valid field values", str(err)) from err
    if isinstance(msg, HookCall) and msg.blob and len(msg.blob) != msg.length:
        raise ParseError("link hook.length", offset, f"{len(msg.blob)}", str(msg.length))
    return msg


def _try_frame(buf: bytes | bytearray, offset: int) -> tuple[Message, int] | None:
    if len(buf) < 8:
        return None
    jlen, blen = _HDR.unpack_from(buf, 0)
    if jlen > MAX_JSON or jlen < 2:
        raise ParseError("link frame.json_length", offset, f"2..{MAX_JSON}", str(jlen))
    if blen > MAX_BINARY:
        raise ParseError("link frame.binary_length", offset + 4, f"at most {MAX_BINARY}", str(blen))
    if len(buf) < 8 + jlen + blen:
        return None
    try:
        obj = json.loads(bytes(buf[8 : 8 + jlen]).decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as err:
        raise ParseError("link frame.json", offset + 8, "a UTF-8 JSON object", str(err)) from err
    if not isinstance(obj, dict):
        raise ParseError("link frame.json", offset + 8, "a JSON object", type(obj).__name__)
    return _build(obj, bytes(buf[8 + jlen : 8 + jlen + blen]), offset), 8 + jlen + blen


def decode_message(data: bytes) -> Message:
    """Decode exactly one frame.

    Raises:
        TruncatedError: ``data`` ends inside the frame.
        UnsupportedError: unknown message type.
        ParseError: bad lengths, bad JSON, missing/unknown/invalid fields, trailing bytes.
    """
    got = _try_frame(data, 0)
    if got is None:
        raise TruncatedError("link frame", len(data), "a complete frame", f"{len(data)} bytes")
    msg, used = got
    if used != len(data):
        raise ParseError("link frame", used, "end of data", f"{len(data) - used} more bytes")
    return msg


class FrameDecoder:
    """Incremental: ``feed(bytes)`` then ``next_message()`` until None."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._offset = 0

    def feed(self, data: bytes) -> None:
        self._buf += data

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def next_message(self) -> Message | None:
        got = _try_frame(self._buf, self._offset)
        if got is None:
            return None
        msg, used = got
        del self._buf[:used]
        self._offset += used
        return msg
