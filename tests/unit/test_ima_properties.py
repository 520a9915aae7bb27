"""Properties of the IMA codec: round trips, garbage → ParseError only, truncated tails."""

from __future__ import annotations

import contextlib
import hashlib
import struct

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from evidence.errors import ParseError
from evidence.ima import (
    ImaEntry,
    encode_ascii,
    encode_binary,
    parse_ima_list,
    replay_ima_pcr10,
)

ALGOS = {"sha1": 20, "sha256": 32, "sha512": 64, "md5": 16, "sm3": 32}
# names as the kernel logs them: no space (replaced by "_"), no NUL, no newline
NAME_CHARS = st.binary(min_size=1, max_size=80).map(
    lambda b: b.replace(b" ", b"_").replace(b"\0", b"@").replace(b"\n", b"#")
)


@st.composite
def entries(draw: st.DrawFn) -> ImaEntry:
    template = draw(st.sampled_from(["ima", "ima-ng", "ima-sig", "ima-buf"]))
    pcr = draw(st.sampled_from([10, 10, 10, 11, 9, 0, 23]))
    name = draw(NAME_CHARS)
    violation = draw(st.integers(0, 9)) == 0
    if template == "ima":
        d = bytes(20) if violation else draw(st.binary(min_size=20, max_size=20))
        fields: tuple[bytes, ...] = (d, name + b"\0")
        data = d + fields[1].ljust(256, b"\0")
    else:
        algo = draw(st.sampled_from(sorted(ALGOS)))
        size = ALGOS[algo]
        digest = bytes(size) if violation else draw(st.binary(min_size=size, max_size=size))
        fields = (algo.encode() + b":\0" + digest, name + b"\0")
        if template != "ima-ng":
            fields += (draw(st.binary(max_size=40)),)
        data = b"".join(struct.pack("<I", len(f)) + f for f in fields)
    if violation:
        th = bytes(20)
    elif draw(st.integers(0, 9)) == 0:
        th = draw(st.binary(min_size=20, max_size=20).filter(any))  # a wrong one now and then
    else:
        th = hashlib.sha1(data).digest()
    return ImaEntry(pcr, th, template, fields)


LISTS = st.lists(entries(), max_size=8)


def _strip(es: tuple[ImaEntry, ...]) -> list[tuple[object, ...]]:
    return [(e.pcr, e.template_hash, e.template_name, e.fields) for e in es]


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])  # CI load
@given(LISTS)
def test_binary_round_trip(es: list[ImaEntry]) -> None:
    data = encode_binary(es)
    raw = parse_ima_list(data, "binary")
    assert _strip(raw.entries) == _strip(tuple(es)) and not raw.truncated_tail
    assert encode_binary(raw.entries) == data


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])  # CI load
@given(LISTS)
def test_ascii_round_trip(es: list[ImaEntry]) -> None:
    data = encode_ascii(es)
    raw = parse_ima_list(data)
    assert _strip(raw.entries) == _strip(tuple(es)) and not raw.truncated_tail
    assert encode_ascii(raw.entries) == data


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])  # CI load
@given(LISTS)
def test_ascii_and_binary_replay_alike(es: list[ImaEntry]) -> None:
    a = replay_ima_pcr10(parse_ima_list(encode_ascii(es)), "5.8")
    b = replay_ima_pcr10(parse_ima_list(encode_binary(es)), "5.8")
    assert a == b


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])  # CI load
@given(st.lists(entries(), min_size=1, max_size=6), st.data())
def test_truncated_final_entry_binary(es: list[ImaEntry], data: st.DataObject) -> None:
    head = encode_binary(es[:-1])
    last = encode_binary(es[-1:])
    cut = data.draw(st.integers(1, len(last) - 1))
    raw = parse_ima_list(head + last[:cut], "binary")
    assert raw.truncated_tail and raw.truncated_at == len(head)
    expected = replay_ima_pcr10(parse_ima_list(head, "binary"))
    got = replay_ima_pcr10(raw)
    assert got.pcr10 == expected.pcr10 and got.entries == len(es) - 1


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])  # CI load
@given(st.lists(entries(), min_size=1, max_size=6), st.data())
def test_truncated_final_entry_ascii(es: list[ImaEntry], data: st.DataObject) -> None:
    head = encode_ascii(es[:-1])
    last = encode_ascii(es[-1:])
    cut = data.draw(st.integers(1, len(last) - 1))
    raw = parse_ima_list(head + last[:cut], "ascii")
    assert raw.truncated_tail and raw.truncated_at == len(es)
    expected = replay_ima_pcr10(parse_ima_list(head, "ascii"))
    assert replay_ima_pcr10(raw).pcr10 == expected.pcr10


def _parse_only_parse_errors(data: bytes, fmt: str) -> None:
    try:
        raw = parse_ima_list(data, fmt)  # type: ignore[arg-type]
    except ParseError:
        return
    with contextlib.suppress(ParseError):  # UnsupportedError for an unknown template
        replay_ima_pcr10(raw)


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])  # CI load
@given(st.binary(max_size=400), st.sampled_from(["auto", "ascii", "binary"]))
def test_random_bytes_raise_only_parse_errors(data: bytes, fmt: str) -> None:
    _parse_only_parse_errors(data, fmt)


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])  # CI load
@given(LISTS, st.sampled_from(["ascii", "binary"]), st.data())
def test_mutated_lists_raise_only_parse_errors(
    es: list[ImaEntry], fmt: str, data: st.DataObject
) -> None:
    blob = bytearray(encode_binary(es) if fmt == "binary" else encode_ascii(es))
    assume(blob)
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(blob) - 1))
        op = data.draw(st.sampled_from(["flip", "insert", "delete", "byte"]))
        if op == "flip":
            blob[pos] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "insert":
            blob[pos:pos] = data.draw(st.binary(min_size=1, max_size=8))
        elif op == "delete" and len(blob) > 1:
            del blob[pos]
        else:
            blob[pos] = data.draw(st.sampled_from([0, 0x20, 0x0A, 0xFF, 0x3A, 0x30]))
    _parse_only_parse_errors(bytes(blob), fmt)
