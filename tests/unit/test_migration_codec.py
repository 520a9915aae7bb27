"""Migration frame codec and message schemas: round trips; garbage raises only ParseError."""

from __future__ import annotations

import contextlib
import struct
import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from evidence.errors import ParseError
from host_agent.migration.codec import MAX_FRAME, Frame, FrameDecoder, decode_frame, encode_frame
from host_agent.migration.errors import FrameError
from host_agent.migration.protocol import (
    Decision,
    Done,
    ErrorMessage,
    ExgKeyOffer,
    Imported,
    Offer,
    Outcome,
    OutcomeQuery,
    StateRecord,
    Transfer,
    Verdict,
    parse_message,
)
from host_agent.migration.record import (
    RECORD_PREFIX,
    MigrationRecord,
    encode_record,
    parse_record,
)

_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
_names = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=32)
frames = st.builds(
    Frame,
    st.text(min_size=1, max_size=64),
    st.dictionaries(st.text(max_size=10), _json, max_size=5),
    st.dictionaries(_names, st.binary(max_size=300), max_size=4),
)


@given(frames)
def test_frames_round_trip(frame: Frame) -> None:
    data = encode_frame(frame)
    decoder = FrameDecoder()
    for i in range(0, len(data), 7):  # arrives in pieces
        decoder.feed(data[i : i + 7])
    got = decoder.next_frame()
    assert got == frame
    assert encode_frame(got) == data
    assert decoder.next_frame() is None


@settings(max_examples=300)
@given(st.binary(max_size=400))
def test_garbage_raises_only_parse_errors(data: bytes) -> None:
    decoder = FrameDecoder()
    decoder.feed(struct.pack(">I", len(data)) + data)
    try:
        frame = decoder.next_frame()
        if frame is not None:
            parse_message(frame)
    except ParseError as err:
        assert isinstance(err, FrameError)


@settings(max_examples=300)
@given(frames, st.integers(0, 50), st.binary(min_size=1, max_size=3))
def test_mutated_frames_never_raise_anything_but_parse_errors(
    frame: Frame, where: int, junk: bytes
) -> None:
    data = bytearray(encode_frame(frame))
    pos = 4 + where % max(1, len(data) - 4)
    data[pos : pos + len(junk)] = junk
    with contextlib.suppress(FrameError):
        decode_frame(bytes(data[4:]))


def _body(header: bytes, rest: bytes = b"") -> bytes:
    return struct.pack(">I", len(header)) + header + rest


@pytest.mark.parametrize(
    ("body", "what"),
    [
        (b"\x00\x00\x00\x10{}", "header_length"),
        (_body(b"{}"), "header"),
        (_body(b"[1,2]"), "header"),
        (_body(b'{"blobs":[["a",5]],"fields":{},"type":"x"}', b"ab"), "blob a"),
        (_body(b'{"blobs":[["a",1],["a",1]],"fields":{},"type":"x"}', b"ab"), "unique"),
        (_body(b'{"blobs":[],"fields":{},"type":"x"}', b"zz"), "no trailing bytes"),
        (_body(b'{"blobs": [],"fields":{},"type":"x"}'), "canonical"),
        (_body(b'{"blobs":[],"fields":[],"type":"x"}'), "fields"),
        (_body(b'{"blobs":[["a",-1]],"fields":{},"type":"x"}'), "length"),
        (_body(b'{"blobs":[],"fields":{},"type":""}'), "type"),
        (_body(b"\xff\xfe"), "UTF-8"),
    ],
)
def test_named_hostile_bodies(body: bytes, what: str) -> None:
    with pytest.raises(FrameError) as info:
        decode_frame(body)
    assert what in str(info.value)


def test_a_frame_claiming_more_than_max_frame_is_refused_before_buffering() -> None:
    decoder = FrameDecoder()
    decoder.feed(struct.pack(">I", MAX_FRAME + 1))
    with pytest.raises(FrameError, match=r"8\.\.1048576"):
        decoder.next_frame()


M = uuid.UUID("1a1b1c1d-2222-4333-8444-55555555555f")
MESSAGES = [
    Offer(M, M, b"n" * 32, "10.77.0.1:7787"),
    Offer(M, M, b"n" * 32, "10.77.0.1:7787", with_vm=True),
    ExgKeyOffer(M, b"pub", b"d" * 32, 0, b"att", b"sig", b"cert"),
    ExgKeyOffer(M, b"pub", b"d" * 32, None, b"att", b"sig", b"cert"),
    Transfer(M, b"dup", {"cert_user": "AAAA", "generation": 1}),
    Imported(M),
    Decision(M, "commit"),
    Decision(M, "abort", "the target refused the VM"),
    Done(M),
    OutcomeQuery(M),
    Outcome(M, "undecided"),
    StateRecord(M, b"record", b"sig"),
    Verdict(M, False, "memory root differs"),
    ErrorMessage("migration.target.nonce", "CertExgKey over another nonce"),
]


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: type(m).__name__)
def test_messages_round_trip(message: object) -> None:
    frame = message.to_frame()  # type: ignore[attr-defined]
    assert parse_message(decode_frame(encode_frame(frame)[4:])) == message


def test_a_vaik_only_offer_is_the_frame_it_was_before_with_vm() -> None:
    assert "with_vm" not in Offer(M, M, b"n" * 32, "x").to_frame().fields
    assert Offer(M, M, b"n" * 32, "x", True).to_frame().fields["with_vm"] is True


def _offer(version: int, nonce: bytes) -> Frame:
    fields = {"version": version, "migration_id": str(M), "vm_uuid": str(M), "source_address": "x"}
    return Frame("offer", fields, {"nonce": nonce})


@pytest.mark.parametrize(
    ("frame", "what"),
    [
        (_offer(1, b"short"), "offer.nonce"),
        (_offer(2, b"n" * 32), "offer.version"),
        (
            Frame("offer", {**_offer(1, b"n" * 32).fields, "with_vm": False}, {"nonce": b"n" * 32}),
            "offer.with_vm",
        ),
        (
            Frame("offer", {**_offer(1, b"n" * 32).fields, "with_vm": 1}, {"nonce": b"n" * 32}),
            "offer.with_vm",
        ),
        (
            Frame("decision", {"migration_id": str(M), "decision": "maybe", "reason": ""}),
            "decision",
        ),
        (Frame("imported", {"migration_id": str(M).upper()}), "canonical"),
        (Frame("done", {"migration_id": str(M), "extra": 1}), "done.fields"),
        (Frame("exgkey", {"migration_id": str(M), "locality": 7}, {}), "exgkey.blobs"),
        (Frame("error", {"id": "Not An Id", "message": ""}), "error.id"),
        (Frame("hello", {}), "migration message type"),
    ],
)
def test_schema_violations_are_frame_errors(frame: Frame, what: str) -> None:
    with pytest.raises(FrameError) as info:
        parse_message(frame)
    assert what in str(info.value)


def test_migration_records_round_trip_and_refuse_other_encodings() -> None:
    record = MigrationRecord(
        M, M, b"r" * 32, {0: b"z" * 32, 10: b"y" * 32}, {"permanent": b"p" * 32}
    )
    data = encode_record(record)
    assert data.startswith(RECORD_PREFIX) and data[:4] != b"\xffTCG"
    assert parse_record(data) == record
    for bad in (data[len(RECORD_PREFIX) :], data.replace(b'":"', b'": "', 1), data[:-1]):
        with pytest.raises(FrameError):
            parse_record(bad)
    other = MigrationRecord(M, M, b"s" * 32, {0: b"z" * 32}, {})
    assert record.differences(other) == [
        f"memory root {(b'r' * 32).hex()} ≠ {(b's' * 32).hex()}",
        "vPCR 10",
        "vTPM state permanent",
    ]
