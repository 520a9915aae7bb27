"""Dirty-page tracking for a running QEMU, so that hashing is mostly done before the VM stops.

Soft-dirty bits (Linux ``Documentation/admin-guide/mm/soft-dirty.rst``): writing ``4`` to
``/proc/PID/clear_refs`` clears the soft-dirty bit of every page of the process and
write-protects its page-table entries; the next write to a page faults and sets the bit again,
which ``/proc/PID/pagemap`` reports as bit 55 (bit 63: page present).

The tracker works on QEMU's own mapping of the guest-RAM memfd:

1. :meth:`SoftDirtyTracker.start` (VM running): **clear first, then hash** every page from the
   memfd (the background pass).
2. :meth:`SoftDirtyTracker.finish` (VM stopped): read the pagemap of the mapping and re-hash only
   the pages that are soft-dirty **or not present**, then recompute the root.

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

from host_agent.errors import MemorySourceError
from host_agent.memory.hasher import Progress, hash_extents
from host_agent.memory.merkle import PAGE_SIZE, Extent, LeafSet
from host_agent.memory.sources import file_extents, find_qemu_memfd

__all__ = [
    "PassResult",
    "SoftDirtyTracker",
    "TrackerSupport",
    "dirty_ranges",
    "probe_soft_dirty",
]

_SOFT_DIRTY_BYTE = 6  # bit 55 = bit 7 of byte 6 of a little-endian pagemap entry
_PRESENT_BYTE = 7  # bit 63 = bit 7 of byte 7
_HIGH_BIT = bytes(0x01 if i & 0x80 else 0x00 for i in range(256))
_NOT_HIGH_BIT = bytes(0x00 if i & 0x80 else 0x01 for i in range(256))


@dataclass(frozen=True)
class TrackerSupport:
    available: bool
    reason: str


def probe_soft_dirty() -> TrackerSupport:
    """Check on a page of our own that the kernel sets and clears soft-dirty bits.

    (Clearing our own soft-dirty bits is harmless: nothing else in this process uses them.)
    """
    try:
        buf = mmap.mmap(-1, PAGE_SIZE)
    except OSError as err:  # pragma: no cover
        return TrackerSupport(False, f"cannot map a probe page: {err}")
    try:
        buf[0] = 1
        addr = _address_of(buf)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("4")
        clean = _pagemap_entry(os.getpid(), addr)
        buf[0] = 2
        dirty = _pagemap_entry(os.getpid(), addr)
    except OSError as err:
        return TrackerSupport(False, f"soft-dirty interface not usable: {err}")
    finally:
        buf.close()
    if not dirty >> 55 & 1:
        return TrackerSupport(
            False, "the kernel does not set soft-dirty bits (CONFIG_MEM_SOFT_DIRTY is not set)"
        )
    if clean >> 55 & 1:
        return TrackerSupport(False, "clear_refs 4 did not clear the soft-dirty bit")
    return TrackerSupport(True, "soft-dirty bits work")


def _address_of(buf: mmap.mmap) -> int:
    import ctypes

    return ctypes.addressof(ctypes.c_char.from_buffer(buf))


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
    either = (int.from_bytes(sd, "big") | int.from_bytes(absent, "big")).to_bytes(n, "big")
    pos = either.find(1)
    while pos >= 0:
        end = either.find(0, pos)
        if end < 0:
            end = n
        yield pos, end - pos
        pos = either.find(1, end)


@dataclass(frozen=True)
class PassResult:
    """One hashing pass: leaves, how it was done, and why."""

    leaves: LeafSet
    mode: str  # "full", "soft-dirty"
    reason: str
    rehashed_pages: int
    seconds: float


def _find_mapping(pid: int, size: int) -> int:
    """Start address of QEMU's mapping of its guest-RAM memfd (matched by size)."""
    found = []
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            if "/memfd:memory-backend-memfd" not in line:
                continue
            span, _perms, off, *_ = line.split()
            lo, hi = (int(x, 16) for x in span.split("-"))
            if hi - lo == size and int(off, 16) == 0:
                found.append(lo)
    if len(found) != 1:
        raise MemorySourceError(f"pid:{pid}", f"{len(found)} guest-RAM mappings of {size} bytes")
    return found[0]


class SoftDirtyTracker:
    """Background full pass with soft-dirty tracking, then an incremental pass at the stop.

    Args:
        pid: the QEMU process.
        probe: how to learn whether soft-dirty works (a parameter so tests can force the
            fallback on a kernel that has it).
        announce: called with one line whenever the tracker falls back to full hashes.
    """

    def __init__(
        self,
        pid: int,
        *,
        workers: int | None = None,
        progress: Progress | None = None,
        probe: Callable[[], TrackerSupport] = probe_soft_dirty,
        announce: Callable[[str], None] | None = None,
    ) -> None:
        self.pid = pid
        self._workers = workers
        self._progress = progress
        self._announce = announce
        self._path, self.block, self._size = find_qemu_memfd(pid)
        self.support = probe()
        self._addr: int | None = None
        self._base: LeafSet | None = None
        if not self.support.available:
            self._say(f"soft-dirty tracking unavailable ({self.support.reason}): full hashes")

    def _say(self, text: str) -> None:
        if self._announce is not None:
            self._announce(text)

    def _hash(self, extents: Callable[[int], Iterable[Extent]], base: LeafSet | None) -> LeafSet:
        try:
            fd = os.open(self._path, os.O_RDONLY)
        except OSError as err:
            raise MemorySourceError(f"pid:{self.pid}", f"cannot open memfd: {err}") from err
        try:
            return hash_extents(
                fd,
                [(self.block, self._size // PAGE_SIZE)],
                extents(fd),
                source=f"pid:{self.pid}",
                workers=self._workers,
                progress=self._progress,
                base=base,
            )
        finally:
            os.close(fd)

    def _full(self) -> LeafSet:
        return self._hash(lambda fd: file_extents(fd, self.block, 0, self._size), None)

    def start(self) -> PassResult:
        """The background pass (VM may run): clear soft-dirty bits, then hash every page."""
        t0 = time.perf_counter()
        if self.support.available:
            try:
                self._addr = _find_mapping(self.pid, self._size)
                with open(f"/proc/{self.pid}/clear_refs", "w") as f:
                    f.write("4")
            except OSError as err:
                raise MemorySourceError(f"pid:{self.pid}", f"clear_refs failed: {err}") from err
        self._base = self._full()
        mode = "soft-dirty" if self.support.available else "full"
        pages = self._base.pages
        return PassResult(self._base, mode, self.support.reason, pages, time.perf_counter() - t0)

    def finish(self) -> PassResult:
        """The pass at the stop (VM paused): re-hash dirty pages, or everything on fallback."""
        t0 = time.perf_counter()
        if self._base is None:
            raise RuntimeError("finish() before start()")
        if not self.support.available or self._addr is None:
            leaves = self._full()
            self._say("full hash at the stop (no dirty-page tracking)")
            return PassResult(
                leaves, "full", self.support.reason, leaves.pages, time.perf_counter() - t0
            )
        pages = self._size // PAGE_SIZE
        try:
            fd = os.open(f"/proc/{self.pid}/pagemap", os.O_RDONLY)
            try:
                raw = os.pread(fd, pages * 8, self._addr // PAGE_SIZE * 8)
            finally:
                os.close(fd)
        except OSError as err:
            raise MemorySourceError(f"pid:{self.pid}", f"pagemap read failed: {err}") from err
        if len(raw) != pages * 8:
            raise MemorySourceError(f"pid:{self.pid}", "short pagemap read")
        ranges = list(dirty_ranges(raw))
        block = self.block
        extents = [Extent(block, first, n, first * PAGE_SIZE) for first, n in ranges]
        leaves = self._hash(lambda _fd: extents, self._base)
        count = sum(n for _, n in ranges)
        return PassResult(leaves, "soft-dirty", "incremental", count, time.perf_counter() - t0)
