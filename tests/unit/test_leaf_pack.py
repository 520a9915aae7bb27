"""The packing of sealed memory leaves (zero-page runs → (offset, count)): lossless for any
bytes, and a damaged packing gives a typed error, never a traceback or wrong leaves."""

from __future__ import annotations

import os
import struct
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from host_agent.lifecycle.seal import (
    LEAF_PACK_MAGIC,
    ZERO_RUN_MIN,
    SealRecordError,
    pack_leaves,
    unpack_leaves,
)
from host_agent.memory.merkle import ZERO_LEAF, BlockLeaves, LeafSet, encode_leaf_file

pieces = st.lists(
    st.one_of(
        st.binary(max_size=80),
        st.integers(1, 40).map(lambda n: ZERO_LEAF * n),
        st.integers(0, 31).map(lambda k: ZERO_LEAF[k:] + ZERO_LEAF * ZERO_RUN_MIN),
    ),
    max_size=12,
)


@settings(max_examples=400, deadline=None)
@given(pieces)
def test_round_trip_of_any_bytes(parts: list[bytes]) -> None:
    data = b"".join(parts)
    packed = pack_leaves(data)
    assert unpack_leaves(packed) == data
    if ZERO_LEAF * ZERO_RUN_MIN in data:
        assert len(packed) < len(data)


@settings(max_examples=400, deadline=None)
@given(pieces, st.data())
def test_damaged_packings_raise_a_typed_error_or_give_other_bytes_of_the_stated_size(
    parts: list[bytes], data: st.DataObject
) -> None:
    packed = bytearray(pack_leaves(b"".join(parts)))
    how = data.draw(st.sampled_from(["cut", "flip", "append"]))
    if how == "cut":
        del packed[data.draw(st.integers(0, len(packed) - 1)) :]
    elif how == "flip":
        at = data.draw(st.integers(0, len(packed) - 1))
        packed[at] ^= data.draw(st.integers(1, 255))
    else:
        packed += data.draw(st.binary(min_size=1, max_size=40))
    try:
        out = unpack_leaves(bytes(packed))
    except SealRecordError as err:
        assert err.id == "parse.seal_record"
        return
    (total,) = struct.unpack_from(">Q", packed, 5)
    assert len(out) == total


def test_a_1_gib_guest_packs_to_its_nonzero_leaves() -> None:
    pages = 262144
    raw = bytearray(ZERO_LEAF * pages)
    raw[: 100000 * 32] = os.urandom(100000 * 32)
    data = encode_leaf_file(LeafSet.of([BlockLeaves("pc.ram", bytes(raw))]))
    packed = pack_leaves(data)
    assert len(packed) < 100000 * 32 + 4096
    assert len(packed) <= len(zlib.compress(data, 1)) * 1.01
    assert unpack_leaves(packed) == data


def test_refusals_say_what_was_expected() -> None:
    with pytest.raises(SealRecordError, match="magic"):
        unpack_leaves(b"\x78\x9c" + b"x" * 30)
    huge = struct.pack(">5sQI", LEAF_PACK_MAGIC, 1 << 40, 0)
    with pytest.raises(SealRecordError, match="at most"):
        unpack_leaves(huge)
    overlapping = struct.pack(">5sQI", LEAF_PACK_MAGIC, 128, 2) + struct.pack(">QIQI", 0, 2, 32, 1)
    with pytest.raises(SealRecordError, match="ordered zero runs"):
        unpack_leaves(overlapping)
