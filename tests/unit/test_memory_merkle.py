"""Merkle tree over pages: tree shape against a spec implementation, diffs, proofs, leaf files."""

from __future__ import annotations

import contextlib
import hashlib
import itertools
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from evidence.errors import ParseError
from host_agent.errors import LeafFileError, MemoryLayoutMismatch, MemoryMismatch
from host_agent.memory.merkle import (
    EMPTY_BLOCK_ROOT,
    FANOUT,
    PAGE_SIZE,
    ZERO_LEAF,
    BlockLeaves,
    LeafBuilder,
    LeafSet,
    block_root,
    diff,
    diff_blocks,
    encode_leaf_file,
    group_nodes,
    leaf_hash,
    parse_leaf_file,
    updated_block,
    verify_inclusion,
)


def _page(i: int) -> bytes:
    return hashlib.sha256(b"page%d" % i).digest() * (PAGE_SIZE // 32)


def _spec_root(leaves: list[bytes]) -> bytes:
    """The tree as the module docstring defines it, written recursively and independently."""
    if not leaves:
        return hashlib.sha256(b"\x01").digest()
    if len(leaves) == 1:
        return leaves[0]
    groups = [leaves[i : i + FANOUT] for i in range(0, len(leaves), FANOUT)]
    return _spec_root([hashlib.sha256(b"\x01" + b"".join(g)).digest() for g in groups])


def _set(**blocks: list[bytes]) -> LeafSet:
    return LeafSet.of(
        BlockLeaves(n.replace("_", "."), b"".join(leaf_hash(p) for p in pages))
        for n, pages in blocks.items()
    )


def test_zero_leaf_is_the_hash_of_a_zero_page() -> None:
    assert hashlib.sha256(bytes(PAGE_SIZE)).digest() == ZERO_LEAF
    assert ZERO_LEAF.hex() == "ad7facb2586fc6e966c004d7d1d16b024f5805ff7cb47c7a85dabd8b48892ca7"
    assert block_root(b"") == EMPTY_BLOCK_ROOT


@pytest.mark.parametrize("n", [1, 2, 63, 64, 65, 127, 4096, 4097, 64 * 64 + 3])
def test_block_root_matches_the_spec(n: int) -> None:
    leaves = [hashlib.sha256(b"%d" % i).digest() for i in range(n)]
    assert block_root(b"".join(leaves)) == _spec_root(leaves)


def test_root_binds_names_sizes_and_not_order() -> None:
    a = _set(pc_ram=[_page(1), _page(2)], pc_bios=[_page(3)])
    b = LeafSet.of(reversed(a.blocks))
    assert a.root() == b.root()
    renamed = a.rename({"pc.ram": "mem"})
    assert renamed.root() != a.root()
    # Moving a leaf from one block to the other keeps the leaf sequence but changes the root.
    moved = _set(pc_ram=[_page(1)], pc_bios=[_page(2), _page(3)])
    assert moved.root() != a.root()


def test_unsorted_or_duplicate_blocks_are_refused() -> None:
    x = BlockLeaves("b", ZERO_LEAF)
    with pytest.raises(ValueError):
        LeafSet((x, BlockLeaves("a", ZERO_LEAF)))
    with pytest.raises(ValueError):
        LeafSet((x, x))


def test_diff_names_page_ranges_across_blocks() -> None:
    pages = [_page(i) for i in range(200)]
    a = _set(a=pages, b=pages[:10])
    changed = list(pages)
    for i in (0, 5, 6, 7, 199):
        changed[i] = _page(1000 + i)
    b = _set(a=changed, b=[*pages[:9], bytes(PAGE_SIZE)])
    assert diff(a, a) == []
    assert diff(a, b) == [(0, 0), (5, 7), (199, 199), (209, 209)]
    assert diff_blocks(a, b) == {"a": [(0, 0), (5, 7), (199, 199)], "b": [(9, 9)]}
    assert a.locate(209) == ("b", 9)
    with pytest.raises(MemoryLayoutMismatch):
        diff(a, _set(a=pages))


@pytest.mark.parametrize("n", [1, 2, 64, 65, 300])
def test_inclusion_proofs_verify_and_catch_tampering(n: int) -> None:
    pages = [_page(i) for i in range(n)]
    ls = _set(pc_ram=pages, pc_rom=[_page(9999)])
    root = ls.root()
    for i in sorted({0, n // 2, n - 1}):
        proof = ls.prove("pc.ram", i)
        verify_inclusion(root, proof, pages[i])
        with pytest.raises(MemoryMismatch):
            verify_inclusion(root, proof, _page(-1))
        if n > 1:
            with pytest.raises(MemoryMismatch):
                verify_inclusion(root, proof, pages[(i + 1) % n])


def test_builder_defaults_to_zero_and_last_write_wins() -> None:
    b = LeafBuilder([("pc.ram", 4)])
    b.set_run("pc.ram", 1, leaf_hash(_page(1)) + leaf_hash(_page(2)))
    b.set_run("pc.ram", 2, leaf_hash(_page(3)))
    got = b.finish().block("pc.ram")
    assert got.leaves == ZERO_LEAF + leaf_hash(_page(1)) + leaf_hash(_page(3)) + ZERO_LEAF
    assert got.zero_pages() == 2
    with pytest.raises(IndexError):
        b.set_run("pc.ram", 4, ZERO_LEAF)


def test_leaf_file_round_trip() -> None:
    ls = _set(pc_ram=[_page(i) for i in range(70)], pc_bios=[bytes(PAGE_SIZE)])
    data = encode_leaf_file(ls)
    assert data[:8] == b"VTPMLEAF"
    back = parse_leaf_file(data)
    assert back == ls
    assert back.root() == ls.root()


def test_leaf_file_every_byte_flip_is_refused() -> None:
    data = encode_leaf_file(_set(a=[_page(1), _page(2)], b=[_page(3)]))
    for i in range(len(data)):
        bad = bytearray(data)
        bad[i] ^= 0x01
        with pytest.raises(ParseError):
            parse_leaf_file(bytes(bad))
    for cut in range(len(data)):
        with pytest.raises(ParseError):
            parse_leaf_file(data[:cut])
    with pytest.raises(LeafFileError):
        parse_leaf_file(data + b"\x00")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_leaf_file_garbage_raises_only_parse_errors(blob: bytes) -> None:
    for data in (blob, b"VTPMLEAF\x00\x01\x00\x00\x00\x00\x10\x00" + blob):
        with contextlib.suppress(ParseError):
            parse_leaf_file(data)


@pytest.mark.parametrize("pages", [1, 2, 64, 65, 1000])
def test_incremental_builder_root_equals_a_fresh_root(pages: int) -> None:
    base = LeafSet.of([BlockLeaves("pc.ram", b"".join(leaf_hash(_page(i)) for i in range(pages)))])
    base.root()  # fills the first-level cache the builder starts from
    b = LeafBuilder.from_leaves(base)
    for first, count in ((0, 1), (pages // 2, 3), (pages - 1, 1), (60, 10)):
        count = max(0, min(count, pages - first))
        if first < pages and count:
            b.set_run("pc.ram", first, b"".join(leaf_hash(_page(-first - i)) for i in range(count)))
    got = b.finish()
    fresh = LeafSet.of([BlockLeaves("pc.ram", got.blocks[0].leaves)])
    assert got.root() == fresh.root() == _top(fresh)
    assert got == fresh


def _top(ls: LeafSet) -> bytes:
    """Root recomputed from the spec implementation of the block tree."""
    import struct

    blk = ls.blocks[0]
    leaves = [blk.leaves[i : i + 32] for i in range(0, len(blk.leaves), 32)]
    h = hashlib.sha256(b"vtpm-trust/memory-root/v1\x00" + struct.pack(">I", 1))
    raw = blk.name.encode()
    h.update(struct.pack(">H", len(raw)) + raw + struct.pack(">Q", blk.pages) + _spec_root(leaves))
    return h.digest()


@st.composite
def _block_and_runs(draw: st.DrawFn) -> tuple[int, list[tuple[int, int]]]:
    """A block size (up to three tree levels) and sorted, disjoint runs ``(first, count)``."""
    pages = draw(
        st.one_of(
            st.integers(1, 200),
            st.sampled_from([63, 64, 65, 128, 4095, 4096, 4097]),
            st.integers(4097, 4300),
        )
    )
    cuts = sorted(draw(st.sets(st.integers(0, pages), max_size=24)))
    runs: list[tuple[int, int]] = []
    for a, b in itertools.pairwise([0, *cuts, pages]):
        if b > a and draw(st.booleans()):
            runs.append((a, b - a))
    return pages, runs


def _digests(seed: int, first: int, count: int) -> bytes:
    return b"".join(hashlib.sha256(b"%d/%d" % (seed, first + i)).digest() for i in range(count))


def _halves(leaves: bytes, groups: Sequence[int]) -> list[bytes]:
    """A different way to compute the nodes: two separate calls, as the threads do."""
    mid = len(groups) // 2
    return group_nodes(leaves, groups[:mid]) + group_nodes(leaves, groups[mid:])


@given(_block_and_runs(), st.integers(0, 3), st.booleans(), st.booleans())
@settings(max_examples=150, deadline=None)
def test_updated_block_equals_a_full_recompute(
    case: tuple[int, list[tuple[int, int]]], seed: int, cached: bool, split: bool
) -> None:
    pages, runs = case
    base = BlockLeaves("pc.ram", _digests(-1, 0, pages))
    if cached:
        base.root()  # the background pass has computed its first level
    new = [(first, _digests(seed, first, count)) for first, count in runs]
    expected = bytearray(base.leaves)
    for first, d in new:
        expected[first * 32 : first * 32 + len(d)] = d
    got = updated_block(base, new, _halves if split else group_nodes)
    fresh = BlockLeaves("pc.ram", bytes(expected))
    assert got == fresh
    assert got.root() == fresh.root() == block_root(bytes(expected))
    if pages <= 300:
        assert got.root() == _spec_root(
            [bytes(expected[i : i + 32]) for i in range(0, pages * 32, 32)]
        )
    assert got.level1() == BlockLeaves("x", bytes(expected)).level1()
    assert base.leaves == _digests(-1, 0, pages)  # the base is untouched


@pytest.mark.parametrize(
    "runs",
    [
        [(5, 1), (5, 1)],  # overlapping
        [(7, 1), (3, 1)],  # unsorted
        [(6, 2), (7, 1)],  # overlapping runs
        [(99, 2)],  # past the end
        [(100, 1)],  # past the end
        [(-1, 1)],  # before the start
        [(3, 0)],  # empty
    ],
)
def test_updated_block_refuses_bad_runs_and_changes_nothing(runs: list[tuple[int, int]]) -> None:
    base = BlockLeaves("pc.ram", _digests(-1, 0, 100))
    with pytest.raises(ValueError, match="sorted, disjoint"):
        updated_block(base, [(first, _digests(1, first, n)) for first, n in runs])
    with pytest.raises(ValueError, match="whole digests"):
        updated_block(base, [(3, b"\x00" * 31)])
    assert base == BlockLeaves("pc.ram", _digests(-1, 0, 100))
    assert updated_block(base, []) is base
