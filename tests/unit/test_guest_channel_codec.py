"""The guest channel's frame codec: the guest's copy and the host's, against the same vectors.

The guest agent cannot import host code (standard library only, test_import_direction), so
``guest_agent/channel.py`` and ``host_agent/service/attest_wire.py`` each hold the codec; these
vectors pin both to one wire format.
"""

from __future__ import annotations

import json
import struct
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from evidence.errors import ParseError
from guest_agent import channel as guest
from host_agent.service import attest as host

# (object, exact bytes on the wire)
VECTORS: list[tuple[dict[str, Any], bytes]] = [
    ({"a": 1}, bytes.fromhex("00000007") + b'{"a":1}'),
    (
        {"type": "quote", "version": 1, "id": "r1", "nonce": "AAECAwQFBgcICQoLDA0ODw=="},
        bytes.fromhex("00000049")
        + b'{"id":"r1","nonce":"AAECAwQFBgcICQoLDA0ODw==","type":"quote","version":1}',
    ),
    (
        {"z": [], "b": {"y": None, "x": True}},
        bytes.fromhex("00000020") + b'{"b":{"x":true,"y":null},"z":[]}',
    ),
    ({"s": "\u00e9"}, bytes.fromhex("0000000e") + b'{"s":"\\u00e9"}'),
]

# bytes that must be refused, whole (each a complete, wrong frame)
BAD: list[tuple[str, bytes]] = [
    ("length 0", bytes.fromhex("00000000")),
    ("length 1", bytes.fromhex("00000001") + b"{"),
    ("length over the bound", struct.pack(">I", (1 << 20) + 1)),
    ("not JSON", bytes.fromhex("00000003") + b"abc"),
    ("not UTF-8", bytes.fromhex("00000004") + b'"\xff"\x00'),
    ("an array", bytes.fromhex("00000002") + b"[]"),
    ("a string", bytes.fromhex("00000004") + b'"ab"'),
]


def _decoders() -> list[Any]:
    return [guest.FrameDecoder(), host.FrameDecoder()]


@pytest.mark.parametrize(("obj", "wire"), VECTORS)
def test_both_sides_encode_the_vector_bytes(obj: dict[str, Any], wire: bytes) -> None:
    assert len(wire) - 4 == struct.unpack(">I", wire[:4])[0]
    assert guest.encode_frame(obj) == wire
    assert host.encode_frame(obj) == wire


@pytest.mark.parametrize(("obj", "wire"), VECTORS)
def test_both_sides_decode_the_vector_byte_by_byte(obj: dict[str, Any], wire: bytes) -> None:
    for dec in _decoders():
        for i, b in enumerate(wire):
            assert dec.next_frame() is None, f"frame complete after {i} bytes"
            dec.feed(bytes([b]))
        assert dec.next_frame() == obj
        assert dec.next_frame() is None


def test_several_frames_in_one_read_come_out_in_order() -> None:
    wire = b"".join(w for _, w in VECTORS)
    for dec in _decoders():
        dec.feed(wire)
        assert [dec.next_frame() for _ in VECTORS] == [o for o, _ in VECTORS]


@pytest.mark.parametrize(("case", "wire"), BAD, ids=[c for c, _ in BAD])
def test_both_sides_refuse_the_bad_frame(case: str, wire: bytes) -> None:
    g, h = guest.FrameDecoder(), host.FrameDecoder()
    g.feed(wire)
    h.feed(wire)
    with pytest.raises(guest.GuestAgentError):
        g.next_frame()
    with pytest.raises(ParseError):
        h.next_frame()


def test_oversized_objects_are_not_encoded() -> None:
    big = {"x": "a" * (1 << 20)}
    with pytest.raises(ValueError):
        guest.encode_frame(big)
    with pytest.raises(ValueError):
        host.encode_frame(big)


_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)


@given(st.dictionaries(st.text(max_size=8), _json, max_size=6))
def test_round_trip_and_same_bytes_on_both_sides(obj: dict[str, Any]) -> None:
    wire = guest.encode_frame(obj)
    assert host.encode_frame(obj) == wire
    for dec in _decoders():
        dec.feed(wire)
        assert dec.next_frame() == json.loads(json.dumps(obj))


@given(st.binary(max_size=64))
def test_garbage_raises_only_the_typed_errors(data: bytes) -> None:
    g, h = guest.FrameDecoder(), host.FrameDecoder()
    g.feed(data)
    h.feed(data)
    try:
        while g.next_frame() is not None:
            pass
    except guest.GuestAgentError:
        pass
    try:
        while h.next_frame() is not None:
            pass
    except ParseError:
        pass


def test_host_parses_exactly_the_requests_the_guest_sends() -> None:
    req = host.parse_quote_request(VECTORS[1][0])
    assert req.id == "r1" and req.nonce == bytes(range(16))
    for bad in (
        {**VECTORS[1][0], "extra": 1},
        {**VECTORS[1][0], "version": 2},
        {**VECTORS[1][0], "nonce": "AAEC"},  # 3 bytes
        {**VECTORS[1][0], "nonce": "AAECAwQFBgcICQoLDA0ODw"},  # missing padding
        {**VECTORS[1][0], "id": ""},
    ):
        with pytest.raises(ParseError):
            host.parse_quote_request(bad)
