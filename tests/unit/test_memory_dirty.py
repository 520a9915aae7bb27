"""Dirty-page selection from pagemap entries, and the kernel probe."""

from __future__ import annotations

import struct

from host_agent.memory.dirty import dirty_ranges, probe_soft_dirty

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


def test_probe_reports_a_reason() -> None:
    support = probe_soft_dirty()
    assert support.reason
    if not support.available:  # the development and CI kernel: CONFIG_MEM_SOFT_DIRTY unset
        assert "soft-dirty" in support.reason
