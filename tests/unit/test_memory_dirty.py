"""Dirty-page selection from pagemap entries, the kernel probe, and incremental passes over a
base that must equal a full re-hash."""

from __future__ import annotations

import itertools
import os
import random
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from host_agent.errors import MemorySourceError
from host_agent.memory.dirty import dirty_ranges, probe_soft_dirty, rehash_dirty
from host_agent.memory.hasher import hash_extents, rehash_runs
from host_agent.memory.merkle import PAGE_SIZE, BlockLeaves, Extent, LeafSet, diff, leaf_hash
from host_agent.memory.sources import hash_source

PRESENT = 1 << 63
SOFT_DIRTY = 1 << 55


def _pagemap(entries: list[int]) -> bytes:
    return b"".join(struct.pack("<Q", e) for e in entries)


def test_dirty_means_soft_dirty_or_not_present() -> None:
    pfn = 0x1234
    entries = [PRESENT | pfn] * 10
    entries[2] |= SOFT_DIRTY
    entries[3] |= SOFT_DIRTY
    entries[7] = 0  # not present: re-hashed, conservatively
    entries[9] = PRESENT | SOFT_DIRTY
    assert list(dirty_ranges(_pagemap(entries))) == [(2, 2), (7, 1), (9, 1)]
    assert list(dirty_ranges(_pagemap([PRESENT] * 5))) == []
    assert list(dirty_ranges(b"")) == []


@given(st.lists(st.sampled_from([0, PRESENT, PRESENT | SOFT_DIRTY, SOFT_DIRTY, PRESENT | 0x55])))
@settings(max_examples=300, deadline=None)
def test_dirty_ranges_match_entry_by_entry(entries: list[int]) -> None:
    want = [i for i, e in enumerate(entries) if e & SOFT_DIRTY or not e & PRESENT]
    got = list(dirty_ranges(_pagemap(entries)))
    assert [p for first, n in got for p in range(first, first + n)] == want
    assert all(n > 0 for _, n in got)
    assert all(a + n < b for (a, n), (b, _) in itertools.pairwise(got))  # maximal ranges


def test_probe_reports_a_reason() -> None:
    support = probe_soft_dirty()
    assert support.reason
    if not support.available:  # the development and CI kernel: CONFIG_MEM_SOFT_DIRTY unset
        assert "soft-dirty" in support.reason


_PAGES = 700  # more than CHUNK_PAGES, so a long run is cut into reads of at most 1 MiB


@pytest.fixture(scope="module")
def ram_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A file of mixed random, zero and almost-zero pages."""
    path = tmp_path_factory.mktemp("dirty") / "ram.raw"
    out = bytearray(_PAGES * PAGE_SIZE)
    for i in range(_PAGES):
        if i % 3 == 0:
            out[i * PAGE_SIZE : (i + 1) * PAGE_SIZE] = os.urandom(PAGE_SIZE)
        elif i % 7 == 1:
            out[(i + 1) * PAGE_SIZE - 1] = 1
    path.write_bytes(out)
    return path


@given(
    dirty=st.sets(st.integers(0, _PAGES - 1), max_size=80),
    long_run=st.one_of(st.none(), st.tuples(st.integers(0, _PAGES - 1), st.integers(1, _PAGES))),
    absent=st.sets(st.integers(0, _PAGES - 1), max_size=10),
    workers=st.sampled_from([1, 2, 3]),
)
@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_incremental_pass_equals_a_full_rehash(
    ram_file: Path,
    dirty: set[int],
    long_run: tuple[int, int] | None,
    absent: set[int],
    workers: int,
) -> None:
    """Write to random pages, mark them soft-dirty (or not present) in pagemap entries, and the
    incremental pass over the old leaves equals a full hash of the file now, leaves and root."""
    if long_run is not None:
        first, count = long_run
        dirty |= set(range(first, min(_PAGES, first + count)))
    fd = os.open(ram_file, os.O_RDWR)
    try:
        base = hash_source(str(ram_file)).leaves
        base.root()
        for p in dirty:  # zero pages, random ones, and zero ones but for a byte in the middle
            page = bytearray(PAGE_SIZE) if p % 4 < 2 else bytearray(os.urandom(PAGE_SIZE))
            page[PAGE_SIZE // 2] = p % 4
            os.pwrite(fd, page, p * PAGE_SIZE)
        entries = [PRESENT | (SOFT_DIRTY if p in dirty else 0) for p in range(_PAGES)]
        for p in absent:
            entries[p] = 0
        leaves, ranges = rehash_dirty(
            fd, base, "pc.ram", _pagemap(entries), source="test", workers=workers
        )
    finally:
        os.close(fd)
    full = hash_source(str(ram_file)).leaves
    assert leaves == full
    assert (
        leaves.root()
        == full.root()
        == LeafSet.of([BlockLeaves("pc.ram", full.blocks[0].leaves)]).root()
    )
    assert {p for first, n in ranges for p in range(first, first + n)} == dirty | absent
    assert diff(base, leaves) == diff(base, full)


@pytest.mark.parametrize("workers", [1, 2])
def test_incremental_pass_over_a_large_block_equals_a_full_rehash(
    tmp_path: Path, workers: int
) -> None:
    """5000 pages (a three-level tree), a page dirty in every group of 64 and a long dirty run:
    enough work that the pages and the first-level groups are hashed on several threads."""
    pages = 5000
    path = tmp_path / "ram.raw"
    with open(path, "wb") as f:
        for i in range(pages):
            f.write(os.urandom(PAGE_SIZE) if i % 2 else bytes(PAGE_SIZE))
    base = hash_source(str(path)).leaves
    base.root()
    rng = random.Random(workers)
    dirty = {g * 64 + rng.randrange(64) for g in range(pages // 64)} | {0, pages - 1}
    dirty |= set(range(4000, 4200))  # a run across groups and across the 4096-page boundary
    fd = os.open(path, os.O_RDWR)
    try:
        for p in dirty:
            os.pwrite(fd, os.urandom(8) if p % 3 else bytes(PAGE_SIZE), p * PAGE_SIZE)
        entries = [PRESENT | (SOFT_DIRTY if p in dirty else 0) for p in range(pages)]
        leaves, ranges = rehash_dirty(fd, base, "pc.ram", _pagemap(entries), workers=workers)
    finally:
        os.close(fd)
    full = hash_source(str(path)).leaves
    assert leaves == full
    assert leaves.root() == LeafSet.of([BlockLeaves("pc.ram", full.blocks[0].leaves)]).root()
    assert sum(n for _, n in ranges) == len(dirty)


def test_incremental_pass_reads_only_the_dirty_pages(tmp_path: Path) -> None:
    """Pages outside the dirty runs keep the base's leaves even if the file changed there (which
    a tracker never sees: it is the proof that only dirty pages are read)."""
    path = tmp_path / "ram.raw"
    path.write_bytes(os.urandom(300 * PAGE_SIZE))
    base = hash_source(str(path)).leaves
    fd = os.open(path, os.O_RDWR)
    try:
        os.pwrite(fd, bytes(PAGE_SIZE), 10 * PAGE_SIZE)  # random pages become zero pages
        os.pwrite(fd, bytes(PAGE_SIZE), 20 * PAGE_SIZE)
        entries = [PRESENT] * 300
        entries[20] |= SOFT_DIRTY
        leaves, ranges = rehash_dirty(fd, base, "pc.ram", _pagemap(entries), workers=2)
    finally:
        os.close(fd)
    assert ranges == ((20, 1),)
    assert diff(base, leaves) == [(20, 20)]
    assert diff(leaves, hash_source(str(path)).leaves) == [(10, 10)]


def test_incremental_pass_refuses_bad_input_and_reports_short_reads(tmp_path: Path) -> None:
    path = tmp_path / "ram.raw"
    path.write_bytes(os.urandom(100 * PAGE_SIZE))
    base = hash_source(str(path)).leaves
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(ValueError, match="inside the block"):  # pagemap longer than the block
            rehash_dirty(fd, base, "pc.ram", _pagemap([PRESENT | SOFT_DIRTY] * 101))
        with pytest.raises(ValueError, match="no block 'other'"):
            rehash_runs(fd, base, {"other": [(0, 1, 0)]})
        with pytest.raises(ValueError, match="8 bytes"):
            rehash_dirty(fd, base, "pc.ram", b"\x00" * 12)
        for workers in (1, 2):  # the file is shorter than the offsets say
            with pytest.raises(MemorySourceError, match="short read at 409600: expected 4096"):
                rehash_runs(fd, base, {"pc.ram": [(5, 1, 100 * PAGE_SIZE)]}, workers=workers)
    finally:
        os.close(fd)
    assert base == hash_source(str(path)).leaves


def _apply_in_order(leaves: bytes, extents: list[Extent], data: bytes) -> bytes:
    out = bytearray(leaves)
    for e in extents:
        for i in range(e.pages):
            if e.file_offset is None:
                page = bytes(PAGE_SIZE)
            else:
                at = e.file_offset + i * PAGE_SIZE
                page = data[at : at + PAGE_SIZE]
            at = (e.first_page + i) * 32
            out[at : at + 32] = leaf_hash(page)
    return bytes(out)


def test_extents_over_a_base_in_any_order(tmp_path: Path) -> None:
    """Sorted extents take the incremental path, unsorted ones the general one; both give what
    applying the extents one after the other gives."""
    path = tmp_path / "ram.raw"
    data = os.urandom(400 * PAGE_SIZE)
    path.write_bytes(data)
    base = hash_source(str(path)).leaves
    disjoint = [
        Extent("pc.ram", 0, 2, 390 * PAGE_SIZE),  # pages 0-1 get the content of pages 390-391
        Extent("pc.ram", 10, 290, None),  # a hole: pages 10-299 are zero
        Extent("pc.ram", 300, 1, 0),
        Extent("pc.ram", 301, 99, PAGE_SIZE),
    ]
    unsorted = [disjoint[2], disjoint[0], disjoint[3], disjoint[1]]
    fd = os.open(path, os.O_RDONLY)
    try:
        for extents in (disjoint, unsorted):
            for workers in (1, 2):
                got = hash_extents(fd, base.layout, extents, base=base, workers=workers)
                want = _apply_in_order(base.blocks[0].leaves, extents, data)
                assert got.blocks[0].leaves == want
                assert got.root() == LeafSet.of([BlockLeaves("pc.ram", want)]).root()
    finally:
        os.close(fd)
