"""Dirty-page tracking for a running QEMU, so that hashing is mostly done before the VM stops.

Soft-dirty bits (Linux ``Documentation/admin-guide/mm/soft-dirty.rst``): writing ``4`` to
``/proc/PID/clear_refs`` clears the soft-dirty bit of every page of the process and
write-protects its page-table entries; the next write to a page faults and sets the bit again,
which ``/proc/PID/pagemap`` reports as bit 55 (bit 63: page present).

The tracker works on a :class:`TrackedRegion`: for a VM, QEMU's own mapping of the guest-RAM
memfd (pages read from the memfd); for tests, any process's memory (read via ``/proc/PID/mem``):

1. :meth:`SoftDirtyTracker.start` (VM running): **clear first, then hash** every page (the
   background pass).
2. :meth:`SoftDirtyTracker.finish` (VM stopped): read the pagemap of the mapping and re-hash only
   the pages that are soft-dirty **or not present**, then recompute the root. The bits are
   never cleared again, so ``finish`` may run any number of times, each covering every write
   since ``start`` (clearing while the writer runs would lose writes between read and clear).

Why this is as trustworthy as a full hash at the stop: a page that is present and clean at the
stop has not been written through QEMU's mapping since the clear (every write after the clear sets
the bit), and the clear happened before the background pass read that page, so the leaf computed
in step 1 is the hash of the page's content at the stop. A page written while step 1 was reading
it is dirty and is re-hashed. Pages that are not present are re-hashed too (a page reclaimed after a
write loses its page-table entry and with it the bit), which makes the rule conservative; and the
tracker is used only when the kernel can be shown to keep the bits (:func:`probe_soft_dirty`).
Writes that bypass QEMU's page tables are not seen: other processes mapping the same memfd
(vhost-user back-ends) or ``write()`` to the memfd. For such VMs, and whenever soft-dirty is
unavailable (``CONFIG_MEM_SOFT_DIRTY`` unset, as on our development and CI kernel), the tracker
falls back to a full hash at the stop and says so in :attr:`PassResult.mode` and ``reason``.
"""

from __future__ import annotations

import mmap
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from host_agent.errors import MemorySourceError
from host_agent.memory.hasher import Progress, hash_extents, rehash_runs
from host_agent.memory.merkle import PAGE_SIZE, Extent, LeafSet
from host_agent.memory.sources import file_extents, find_qemu_memfd

__all__ = [
    "PassResult",
    "SoftDirtyTracker",
    "TrackedRegion",
    "TrackerSupport",
    "dirty_ranges",
    "probe_soft_dirty",
    "rehash_dirty",
]

_SOFT_DIRTY_BYTE = 6  # bit 55 = bit 7 of byte 6 of a little-endian pagemap entry
_PRESENT_BYTE = 7  # bit 63 = bit 7 of byte 7
_HIGH_BIT = bytes(0x01 if i & 0x80 else 0x00 for i in range(256))
_NOT_HIGH_BIT = bytes(0x00 if i & 0x80 else 0x01 for i in range(256))


@dataclass(frozen=True)
class TrackerSupport:
    available: bool
    reason: str


_PROBE_NAME = "vtpm-trust-soft-dirty-probe"


def probe_soft_dirty() -> TrackerSupport:
    """Check on a page of our own that the kernel clears and sets soft-dirty bits.

    The probe page is a shared memfd mapping, like QEMU's guest RAM, found by its name in
    ``/proc/self/maps``. (Clearing our own soft-dirty bits is harmless: nothing else in this
    process uses them.)
    """
    try:
        fd = os.memfd_create(_PROBE_NAME)
    except (OSError, AttributeError) as err:
        return TrackerSupport(False, f"cannot create a probe memfd: {err}")
    try:
        os.ftruncate(fd, PAGE_SIZE)
        buf = mmap.mmap(fd, PAGE_SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        try:
            buf[0] = 1
            addr = _address_of(_PROBE_NAME)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("4")
            clean = _pagemap_entry(os.getpid(), addr)
            buf[0] = 2
            dirty = _pagemap_entry(os.getpid(), addr)
        finally:
            buf.close()
    except OSError as err:
        return TrackerSupport(False, f"soft-dirty interface not usable: {err}")
    finally:
        os.close(fd)
    if not dirty >> 55 & 1:
        return TrackerSupport(
            False, "the kernel does not set soft-dirty bits (CONFIG_MEM_SOFT_DIRTY is not set)"
        )
    if clean >> 55 & 1:
        return TrackerSupport(False, "clear_refs 4 did not clear the soft-dirty bit")
    return TrackerSupport(True, "soft-dirty bits work")


def _address_of(name: str) -> int:
    with open("/proc/self/maps") as f:
        for line in f:
            if f"/memfd:{name}" in line:
                return int(line.split("-", 1)[0], 16)
    raise OSError(f"probe mapping {name} not in /proc/self/maps")


def _pagemap_entry(pid: int, addr: int) -> int:
    fd = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY)
    try:
        return int.from_bytes(os.pread(fd, 8, addr // PAGE_SIZE * 8), "little")
    finally:
        os.close(fd)


def dirty_ranges(pagemap: bytes) -> Iterator[tuple[int, int]]:
    """Page ranges ``(first, count)`` whose pagemap entries are soft-dirty or not present.

    ``pagemap`` is the raw little-endian 64-bit entries of consecutive pages.
    """
    if len(pagemap) % 8:
        raise ValueError("pagemap entries are 8 bytes")
    sd = pagemap[_SOFT_DIRTY_BYTE::8].translate(_HIGH_BIT)
    absent = pagemap[_PRESENT_BYTE::8].translate(_NOT_HIGH_BIT)
    n = len(sd)
    if 1 not in absent:  # the usual case at the stop: every page present (a memchr)
        either = sd
    else:
        either = (int.from_bytes(sd, "big") | int.from_bytes(absent, "big")).to_bytes(n, "big")
    pos = either.find(1)
    while pos >= 0:
        end = either.find(0, pos)
        if end < 0:
            end = n
        yield pos, end - pos
        pos = either.find(1, end)


def rehash_dirty(
    fd: int,
    base: LeafSet,
    block: str,
    pagemap: bytes,
    read_offset: int = 0,
    *,
    source: str = "file",
    workers: int | None = None,
) -> tuple[LeafSet, tuple[tuple[int, int], ...]]:
    """The incremental pass at the stop, from the pagemap entries of ``block``'s pages.

    Pages whose entries are soft-dirty or not present (:func:`dirty_ranges`) are read from
    ``fd`` at ``read_offset + page * 4096`` and re-hashed over ``base``
    (:func:`~host_agent.memory.hasher.rehash_runs`). Returns the new leaves and the re-hashed
    ``(first, count)`` ranges.

    Raises:
        MemorySourceError: a read fails or comes back short.
        ValueError: ``pagemap`` is not whole entries, or covers more pages than ``block``.
    """
    ranges = tuple(dirty_ranges(pagemap))
    runs = [(first, n, read_offset + first * PAGE_SIZE) for first, n in ranges]
    leaves = rehash_runs(fd, base, {block: runs} if runs else {}, source=source, workers=workers)
    return leaves, ranges


@dataclass(frozen=True)
class PassResult:
    """One hashing pass: leaves, how it was done, and why.

    ``dirty`` lists the page ranges ``(first, count)`` that were re-hashed by an incremental pass
    (empty for a full pass).
    """

    leaves: LeafSet
    mode: str  # "full", "soft-dirty"
    reason: str
    rehashed_pages: int
    seconds: float
    dirty: tuple[tuple[int, int], ...] = ()


@dataclass(frozen=True)
class TrackedRegion:
    """A region of a process's address space to track, and the file its pages are read from.

    Args:
        pid: the process whose page tables record the writes (QEMU, or any writer).
        address: start of the region in that process (page-aligned).
        size: bytes (a multiple of 4096).
        read_path: file to ``pread`` the pages from: QEMU's memfd, or ``/proc/PID/mem``.
        read_offset: offset in ``read_path`` of the region's first byte.
        block: the RAM block name the leaves carry.
        sparse: ``read_path`` reports holes with SEEK_DATA/SEEK_HOLE (a memfd does).
    """

    pid: int
    address: int
    size: int
    read_path: str
    read_offset: int
    block: str
    sparse: bool

    @classmethod
    def qemu_ram(cls, pid: int) -> TrackedRegion:
        """QEMU's guest-RAM memfd and QEMU's own mapping of it.

        Raises:
            MemorySourceError: no memfd, or not exactly one mapping of it.
        """
        path, block, size = find_qemu_memfd(pid)
        return cls(pid, _find_mapping(pid, size), size, path, 0, block, True)

    @classmethod
    def process_memory(
        cls, pid: int, address: int, size: int, block: str = "region"
    ) -> TrackedRegion:
        """Memory of any process, read through ``/proc/PID/mem`` (needs ptrace access)."""
        if address % PAGE_SIZE or size % PAGE_SIZE or size <= 0:
            raise ValueError("address and size must be page-aligned and size > 0")
        return cls(pid, address, size, f"/proc/{pid}/mem", address, block, False)


def _find_mapping(pid: int, size: int) -> int:
    """Start address of QEMU's mapping of its guest-RAM memfd (matched by size)."""
    found = []
    try:
        with open(f"/proc/{pid}/maps") as f:
            for line in f:
                if "/memfd:memory-backend-memfd" not in line:
                    continue
                span, _perms, off, *_ = line.split()
                lo, hi = (int(x, 16) for x in span.split("-"))
                if hi - lo == size and int(off, 16) == 0:
                    found.append(lo)
    except OSError as err:
        raise MemorySourceError(f"pid:{pid}", f"cannot read maps: {err}") from err
    if len(found) != 1:
        raise MemorySourceError(f"pid:{pid}", f"{len(found)} guest-RAM mappings of {size} bytes")
    return found[0]


class SoftDirtyTracker:
    """Background full pass with soft-dirty tracking, then incremental passes.

    :meth:`start` clears the bits and hashes everything; each :meth:`finish` re-hashes the pages
    dirtied since :meth:`start` (the bits accumulate, they are never cleared again: clearing
    while the writer runs would lose writes made between reading and clearing them).

    Args:
        region: what to track (:meth:`TrackedRegion.qemu_ram` for a VM).
        probe: how to learn whether soft-dirty works (a parameter so tests can force the
            fallback on a kernel that has it).
        announce: called with one line whenever the tracker falls back to full hashes.
    """

    def __init__(
        self,
        region: TrackedRegion,
        *,
        workers: int | None = None,
        progress: Progress | None = None,
        probe: Callable[[], TrackerSupport] = probe_soft_dirty,
        announce: Callable[[str], None] | None = None,
    ) -> None:
        self.region = region
        self._workers = workers
        self._progress = progress
        self._announce = announce
        self.support = probe()
        self._base: LeafSet | None = None
        if not self.support.available:
            self._say(f"soft-dirty tracking unavailable ({self.support.reason}): full hashes")

    @classmethod
    def for_qemu(cls, pid: int, **kwargs: Any) -> SoftDirtyTracker:
        """Track a QEMU's guest RAM (falls back to full hashes where soft-dirty is missing)."""
        try:
            region = TrackedRegion.qemu_ram(pid)
        except MemorySourceError:
            path, block, size = find_qemu_memfd(pid)
            region = TrackedRegion(pid, 0, size, path, 0, block, True)
            kwargs["probe"] = lambda: TrackerSupport(False, "QEMU's RAM mapping not found")
        return cls(region, **kwargs)

    @property
    def block(self) -> str:
        return self.region.block

    def _say(self, text: str) -> None:
        if self._announce is not None:
            self._announce(text)

    def _hash(self, extents: Callable[[int], Iterable[Extent]], base: LeafSet | None) -> LeafSet:
        r = self.region
        try:
            fd = os.open(r.read_path, os.O_RDONLY)
        except OSError as err:
            raise MemorySourceError(f"pid:{r.pid}", f"cannot open {r.read_path}: {err}") from err
        try:
            return hash_extents(
                fd,
                [(r.block, r.size // PAGE_SIZE)],
                extents(fd),
                source=f"pid:{r.pid}",
                workers=self._workers,
                progress=self._progress,
                base=base,
            )
        finally:
            os.close(fd)

    def full_hash(self) -> LeafSet:
        """A full hash of the region now (what an incremental pass must equal)."""
        r = self.region
        if r.sparse:
            return self._hash(lambda fd: file_extents(fd, r.block, r.read_offset, r.size), None)
        return self._hash(
            lambda _fd: [Extent(r.block, 0, r.size // PAGE_SIZE, r.read_offset)], None
        )

    def start(self) -> PassResult:
        """The background pass (the writer may run): clear soft-dirty bits, then hash all."""
        t0 = time.perf_counter()
        if self.support.available:
            try:
                with open(f"/proc/{self.region.pid}/clear_refs", "w") as f:
                    f.write("4")
            except OSError as err:
                raise MemorySourceError(
                    f"pid:{self.region.pid}", f"clear_refs failed: {err}"
                ) from err
        self._base = self.full_hash()
        self._base.root()  # computes the node cache the stop pass starts from
        mode = "soft-dirty" if self.support.available else "full"
        pages = self._base.pages
        return PassResult(self._base, mode, self.support.reason, pages, time.perf_counter() - t0)

    def finish(self) -> PassResult:
        """The pass at the stop: re-hash pages dirtied since :meth:`start`, or all on fallback."""
        t0 = time.perf_counter()
        if self._base is None:
            raise RuntimeError("finish() before start()")
        if not self.support.available:
            leaves = self.full_hash()
            self._say("full hash at the stop (no dirty-page tracking)")
            return PassResult(
                leaves, "full", self.support.reason, leaves.pages, time.perf_counter() - t0
            )
        r = self.region
        pages = r.size // PAGE_SIZE
        try:
            fd = os.open(f"/proc/{r.pid}/pagemap", os.O_RDONLY)
            try:
                raw = os.pread(fd, pages * 8, r.address // PAGE_SIZE * 8)
            finally:
                os.close(fd)
        except OSError as err:
            raise MemorySourceError(f"pid:{r.pid}", f"pagemap read failed: {err}") from err
        if len(raw) != pages * 8:
            raise MemorySourceError(f"pid:{r.pid}", "short pagemap read")
        try:
            fd = os.open(r.read_path, os.O_RDONLY)
        except OSError as err:
            raise MemorySourceError(f"pid:{r.pid}", f"cannot open {r.read_path}: {err}") from err
        try:
            leaves, ranges = rehash_dirty(
                fd,
                self._base,
                r.block,
                raw,
                r.read_offset,
                source=f"pid:{r.pid}",
                workers=self._workers,
            )
        finally:
            os.close(fd)
        if self._progress is not None:
            self._progress(pages, pages)
        count = sum(n for _, n in ranges)
        return PassResult(
            leaves, "soft-dirty", "incremental", count, time.perf_counter() - t0, ranges
        )
