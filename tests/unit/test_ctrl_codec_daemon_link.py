"""The bridge ↔ daemon link codec (host_agent.vtpm.daemon_link) and the PCR_Read helpers."""

from __future__ import annotations

import contextlib
import hashlib
import json
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from evidence.errors import ParseError, TruncatedError, UnsupportedError
from host_agent.vtpm.bridge_pcr import (
    parse_pcr_read_response,
    pcr_read_command,
    read_pcr_bank,
)
from host_agent.vtpm.daemon_link import (
    MAX_BINARY,
    Call,
    FrameDecoder,
    Hello,
    HookCall,
    HookReply,
    Report,
    Result,
    decode_message,
    encode_message,
)

text = st.text(max_size=40)
ids = st.integers(0, 2**63 - 1)
u32 = st.integers(0, 2**32 - 1)
json_values = st.dictionaries(text, st.one_of(st.integers(-(2**53), 2**53), text, st.booleans()))
messages = st.one_of(
    st.builds(Hello, text, text, u32, text, text),
    st.builds(
        HookCall.for_blob,
        ids,
        text,
        st.sampled_from(["get_stateblob", "set_stateblob"]),
        st.integers(1, 3),
        st.binary(max_size=300),
        state_flags=u32,
        result=u32,
        include_blob=st.booleans(),
    ),
    st.builds(HookReply, ids, st.just("allow")),
    st.builds(HookReply, ids, st.just("veto"), st.text(min_size=1, max_size=40)),
    st.builds(
        HookReply,
        ids,
        st.just("replace"),
        st.just(""),
        st.binary(max_size=300),
        st.one_of(st.none(), u32),
    ),
    st.builds(Call, ids, text, json_values),
    st.builds(Result, ids, st.just(True), json_values),
    st.builds(Result, ids, st.just(False), st.just({}), st.text(min_size=1), text),
    st.builds(Report, text, text, st.dictionaries(st.text(min_size=1, max_size=20), ids)),
)


@given(messages)
def test_round_trip(msg: object) -> None:
    frame = encode_message(msg)  # type: ignore[arg-type]
    assert decode_message(frame) == msg
    dec = FrameDecoder()
    for i in range(0, len(frame), 7):
        dec.feed(frame[i : i + 7])
    assert dec.next_message() == msg and dec.buffered == 0


@settings(max_examples=300)
@given(st.binary(max_size=80))
def test_garbage_raises_only_parse_errors(data: bytes) -> None:
    with contextlib.suppress(ParseError):
        decode_message(data)


def _frame(obj: object, binary: bytes = b"") -> bytes:
    payload = json.dumps(obj).encode()
    return struct.pack(">II", len(payload), len(binary)) + payload + binary


def test_named_hostile_frames() -> None:
    with pytest.raises(ParseError, match="binary_length"):
        decode_message(struct.pack(">II", 10, MAX_BINARY + 1))
    with pytest.raises(TruncatedError):
        decode_message(_frame({"type": "call", "id": 1, "op": "status"})[:-1])
    with pytest.raises(UnsupportedError):
        decode_message(_frame({"type": "reboot"}))
    with pytest.raises(ParseError, match="unknown"):
        decode_message(_frame({"type": "call", "id": 1, "op": "x", "evil": 1}))
    with pytest.raises(ParseError, match="missing"):
        decode_message(_frame({"type": "verdict", "verdict": "allow"}))
    with pytest.raises(ParseError, match="reason"):
        decode_message(_frame({"type": "verdict", "id": 1, "verdict": "veto"}))
    with pytest.raises(ParseError, match="binary"):
        decode_message(_frame({"type": "call", "id": 1, "op": "status"}, b"x"))
    with pytest.raises(ParseError, match="JSON"):
        decode_message(struct.pack(">II", 3, 0) + b"{]}")
    hook = {
        "type": "hook", "id": 1, "vm_uuid": "u", "event": "set_stateblob", "blob_type": 1,
        "state_flags": 0, "result": 0, "length": 5, "sha256": "00",
    }  # fmt: skip
    with pytest.raises(ParseError, match="length"):
        decode_message(_frame(hook, b"abc"))


@pytest.mark.parametrize(
    ("counts", "error"),
    [
        ({"swtpm_gone": -1}, "unsigned"),
        ({"swtpm_gone": True}, "unsigned"),
        ({"swtpm_gone": 1.5}, "unsigned"),
        ({"": 1}, "non-empty"),
        ([1], "dict"),
    ],
)
def test_a_report_with_bad_counts_is_refused_with_what_arrived(counts: object, error: str) -> None:
    frame = _frame({"type": "report", "vm_uuid": "u", "instance": "i", "relay_errors": counts})
    with pytest.raises(ParseError, match=error):
        decode_message(frame)


def test_hook_call_carries_digest_and_blob_only_for_set() -> None:
    blob = b"state"
    get = HookCall.for_blob(1, "u", "get_stateblob", 2, blob, include_blob=False)
    assert get.sha256 == hashlib.sha256(blob).hexdigest() and get.blob == b"" and get.length == 5
    assert len(encode_message(get)) < 300


# ------------------------------------------------------------------ TPM2_PCR_Read


def _response(counter: int, pcrs: list[int], fill: int = 0xAB) -> bytes:
    bitmap = bytearray(3)
    for p in pcrs:
        bitmap[p // 8] |= 1 << (p % 8)
    body = (
        struct.pack(">IIHB", counter, 1, 0x000B, 3) + bytes(bitmap) + struct.pack(">I", len(pcrs))
    )
    for p in pcrs:
        body += struct.pack(">H", 32) + bytes([fill ^ p]) * 32
    return struct.pack(">HII", 0x8001, 10 + len(body), 0) + body


def test_pcr_read_command_bytes() -> None:
    assert pcr_read_command(0x000B, [0, 1, 23]).hex() == (
        "80010000001400000" + "17e" + "00000001000b03030080"
    )


def test_read_pcr_bank_asks_for_the_rest_and_restarts_when_the_counter_moves() -> None:
    counters = iter([7, 7, 8, 8, 8, 8])
    sent: list[bytes] = []

    def transact(cmd: bytes) -> bytes:
        sent.append(cmd)
        todo = [8 * i + b for i, byte in enumerate(cmd[-3:]) for b in range(8) if byte >> b & 1]
        return _response(next(counters), todo[:8])

    values = read_pcr_bank(transact)
    assert sorted(values) == list(range(24)) and values[5] == bytes([0xAB ^ 5]) * 32
    assert len(sent) == 6, "3 commands, the 3rd saw the counter move: start over"


def test_pcr_read_response_digest_count_mismatch() -> None:
    bad = bytearray(_response(1, [0, 1]))
    struct.pack_into(">I", bad, 10 + 4 + 4 + 2 + 1 + 3, 1)
    with pytest.raises(ParseError):
        parse_pcr_read_response(bytes(bad))
