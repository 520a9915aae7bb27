"""Parallel page hashing with bounded memory.

Work is cut into tasks of at most :data:`CHUNK_PAGES` pages (1 MiB) and run on a thread pool
with one thread per core: ``hashlib`` releases the GIL while it hashes a buffer of 2 KiB or more,
so the SHA-256 of different pages runs on different cores while the Python loop of one thread
waits for the GIL. A task of a file extent ``pread``s its own bytes in the worker (the read also
runs without the GIL). At most ``2 × workers`` tasks are in flight, and their results are applied
**in submission order** (so for a migration stream the last record of a page still wins), which
bounds memory to a few MiB whatever the guest size; the only state that grows with the guest is
the leaf array, 32 bytes per 4 KiB page (1/128 of the guest).

A page of zeroes is recognised before hashing (a memcmp, about 25 times cheaper than SHA-256)
and gets :data:`~host_agent.memory.merkle.ZERO_LEAF`, which is what hashing it would give.
"""

from __future__ import annotations

import hashlib
import os
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import NoReturn

from evidence.errors import ParseError
from host_agent.errors import MemorySourceError
from host_agent.memory.merkle import (
    DIGEST_SIZE,
    PAGE_SIZE,
    ZERO_LEAF,
    ZERO_PAGE,
    BlockLeaves,
    Extent,
    LeafBuilder,
    LeafSet,
    group_nodes,
    updated_block,
)
from host_agent.memory.migstream import (
    PageRun,
    RamBlocks,
    StreamEvent,
    TpmEmulatorState,
)

__all__ = [
    "CHUNK_PAGES",
    "INLINE_PAGES",
    "Extent",
    "Progress",
    "default_workers",
    "hash_extents",
    "hash_page_buffer",
    "hash_stream_events",
    "rehash_runs",
]

CHUNK_PAGES = 256
INLINE_PAGES = 16384
"""A pass over at most this many pages (64 MiB), given as a sequence, runs in the caller."""
_ZERO_CHUNK = bytes(CHUNK_PAGES * PAGE_SIZE)

Progress = Callable[[int, int], None]
"""``progress(done_pages, total_pages)``; called from the caller's thread."""


def default_workers() -> int:
    """One worker per core this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


def hash_page_buffer(buf: bytes, pages: int) -> bytes:
    """Leaves of ``pages`` consecutive pages held in ``buf`` (concatenated 32-byte digests).

    One list comprehension per buffer (measured fastest: the per-page work that holds the GIL is
    a few C calls; a page is compared with zeroes only if its first and last bytes are zero).
    """
    if len(buf) == len(_ZERO_CHUNK) and buf == _ZERO_CHUNK:
        return ZERO_LEAF * pages
    view = memoryview(buf)
    sha = hashlib.sha256
    zero = ZERO_PAGE
    zl = ZERO_LEAF
    last = PAGE_SIZE - 1
    return b"".join(
        [
            zl
            if buf[o] == 0 and buf[o + last] == 0 and buf[o : o + PAGE_SIZE] == zero
            else sha(view[o : o + PAGE_SIZE]).digest()
            for o in range(0, pages * PAGE_SIZE, PAGE_SIZE)
        ]
    )


_Result = list[tuple[str, int, bytes]]


class _Window:
    """Futures applied in submission order, at most ``limit`` in flight.

    A task returns ``[(block, first_page, digests), …]``.
    """

    def __init__(
        self,
        pool: ThreadPoolExecutor,
        builder_ref: list[LeafBuilder | None],
        limit: int,
        progress: Progress | None,
        total: list[int],
    ) -> None:
        self._pool = pool
        self._q: deque[Future[_Result]] = deque()
        self._limit = limit
        self._builder = builder_ref
        self._progress = progress
        self._total = total
        self.done = 0

    def submit(self, fn: Callable[..., _Result], *args: object) -> None:
        while len(self._q) >= self._limit:
            self._apply_one()
        self._q.append(self._pool.submit(fn, *args))

    def _apply_one(self) -> None:
        results = self._q.popleft().result()
        builder = self._builder[0]
        assert builder is not None
        for block, first, digests in results:
            builder.set_run(block, first, digests)
            self.done += len(digests) // DIGEST_SIZE
        if self._progress is not None:
            self._progress(self.done, self._total[0])

    def drain(self) -> None:
        while self._q:
            self._apply_one()


def _read_exact(fd: int, want: int, offset: int, source: str) -> bytes:
    """``want`` bytes of ``fd`` at ``offset``; a failed or short read is a MemorySourceError."""
    try:
        buf = os.pread(fd, want, offset)
    except OSError as err:
        raise MemorySourceError(source, f"read of {want} bytes at {offset} failed: {err}") from err
    if len(buf) != want:
        raise MemorySourceError(
            source, f"short read at {offset}: expected {want} bytes, got {len(buf)}"
        )
    return buf


def _read_and_hash(fd: int, batch: list[tuple[str, int, int, int]], source: str) -> _Result:
    """Read and hash ``(block, first_page, pages, file_offset)`` pieces."""
    out: _Result = []
    for block, first, pages, offset in batch:
        buf = _read_exact(fd, pages * PAGE_SIZE, offset, source)
        out.append((block, first, hash_page_buffer(buf, pages)))
    return out


def _hash_run(block: str, first: int, pages: Sequence[memoryview | None]) -> _Result:
    sha = hashlib.sha256
    zero = ZERO_PAGE
    out: list[bytes] = []
    append = out.append
    for page in pages:
        if page is None or (page[0] == 0 and page[-1] == 0 and page.tobytes() == zero):
            append(ZERO_LEAF)
        else:
            append(sha(page).digest())
    return [(block, first, b"".join(out))]


Run = tuple[int, int, int | None]
"""``(first_page, pages, file_offset)`` of one block; ``file_offset`` ``None`` is a hole."""

_INLINE_WEIGHT = 256
"""An incremental pass lighter than this (pages + runs) runs in the caller, without threads."""


def _hash_runs(fd: int, runs: Sequence[Run], source: str) -> list[bytes]:
    """The digests of each run, in order (one ``pread`` per run of at most CHUNK_PAGES)."""
    sha = hashlib.sha256
    read = _read_exact
    zero = ZERO_PAGE
    zl = ZERO_LEAF
    out: list[bytes] = []
    append = out.append
    for _first, pages, offset in runs:
        if offset is None:
            append(zl * pages)
            continue
        buf = read(fd, pages * PAGE_SIZE, offset, source)
        if pages == 1:
            append(zl if buf[0] == 0 and buf[-1] == 0 and buf == zero else sha(buf).digest())
        else:
            append(hash_page_buffer(buf, pages))
    return out


def _split(items: Sequence[Run], parts: int) -> list[Sequence[Run]]:
    """Cut ``items`` into at most ``parts`` consecutive slices of about equal weight (pages + 1
    per run: a run costs a read and some Python besides its pages)."""
    total = sum(pages + 1 for _, pages, _ in items)
    out: list[Sequence[Run]] = []
    start = 0
    acc = 0
    for i, (_, pages, _) in enumerate(items):
        acc += pages + 1
        if acc * parts >= total * (len(out) + 1) and len(out) < parts - 1:
            out.append(items[start : i + 1])
            start = i + 1
    out.append(items[start:])
    return [part for part in out if part]


def rehash_runs(
    fd: int,
    base: LeafSet,
    runs: Mapping[str, Sequence[Run]],
    *,
    source: str = "file",
    workers: int | None = None,
) -> LeafSet:
    """An incremental pass: ``base`` with the pages of ``runs`` re-read from ``fd`` and re-hashed.

    ``runs[block]`` lists ``(first_page, pages, file_offset)`` sorted by page and disjoint. The
    cost is proportional to the runs, not to the guest: the pages are read and hashed on
    ``workers`` threads (``pread`` and SHA-256 of a page run without the GIL), and the tree is
    updated by :func:`~host_agent.memory.merkle.updated_block` (one copy of the leaves, and only
    the first-level groups holding a changed page rehashed, on the same threads). The result
    equals a full pass over the same bytes, root and leaves.

    Raises:
        MemorySourceError: a read fails or comes back short.
        ValueError: a block is not in ``base``; runs are unsorted, overlapping or outside it.
    """
    known = {b.name: b for b in base.blocks}
    todo: list[tuple[BlockLeaves, list[Run]]] = []
    for name, block_runs in runs.items():
        blk = known.get(name)
        if blk is None:
            raise ValueError(f"no block {name!r} in the base; blocks are {list(known)}")
        cut: list[Run] = []
        add = cut.append
        end = 0
        for run in block_runs:  # checked before anything is read
            first, pages, offset = run
            if first < end or pages <= 0:
                _bad_runs(blk, first, pages)
            end = first + pages
            if pages <= CHUNK_PAGES:
                add(run)
            else:  # bounded reads, and work to share out
                for k in range(0, pages, CHUNK_PAGES):
                    at = None if offset is None else offset + k * PAGE_SIZE
                    add((first + k, min(CHUNK_PAGES, pages - k), at))
        if end > blk.pages:
            _bad_runs(blk, block_runs[-1][0], block_runs[-1][1])
        if cut:
            todo.append((blk, cut))
    flat = todo[0][1] if len(todo) == 1 else [run for _, cut in todo for run in cut]
    n = workers or default_workers()
    if n == 1 or sum(pages + 1 for _, pages, _ in flat) < _INLINE_WEIGHT:
        return _apply(base, todo, _hash_runs(fd, flat, source), group_nodes)
    with ThreadPoolExecutor(n, thread_name_prefix="memhash") as pool:
        parts = _split(flat, n)
        digests = [
            d
            for ds in pool.map(_hash_runs, [fd] * len(parts), parts, [source] * len(parts))
            for d in ds
        ]

        def nodes(leaves: bytes, groups: Sequence[int]) -> list[bytes]:
            if len(groups) < 64:
                return group_nodes(leaves, groups)
            step = -(-len(groups) // n)
            cuts = [groups[i : i + step] for i in range(0, len(groups), step)]
            return [
                node for part in pool.map(group_nodes, [leaves] * len(cuts), cuts) for node in part
            ]

        return _apply(base, todo, digests, nodes)


def _bad_runs(blk: BlockLeaves, first: int, pages: int) -> NoReturn:
    raise ValueError(
        f"runs of {blk.name!r} ({blk.pages} pages) must be sorted, disjoint, non-empty and inside "
        f"the block; got {pages} pages at page {first}"
    )


def _apply(
    base: LeafSet,
    todo: Sequence[tuple[BlockLeaves, Sequence[Run]]],
    digests: Sequence[bytes],
    nodes: Callable[[bytes, Sequence[int]], list[bytes]],
) -> LeafSet:
    new: dict[str, BlockLeaves] = {}
    at = 0
    for blk, cut in todo:
        mine = digests[at : at + len(cut)]
        at += len(cut)
        new[blk.name] = updated_block(
            blk, [(r[0], d) for r, d in zip(cut, mine, strict=True)], nodes
        )
    return LeafSet(tuple(new.get(b.name, b) for b in base.blocks))


def _runs_of(extents: Sequence[Extent], base: LeafSet) -> dict[str, list[Run]] | None:
    """Extents as :func:`rehash_runs` takes them, or ``None`` if they are not sorted and disjoint
    per block, name an unknown block or leave it (the general path handles and reports those)."""
    sizes = dict(base.layout)
    runs: dict[str, list[Run]] = {}
    ends: dict[str, int] = {}
    for e in extents:
        if e.block not in sizes or e.pages <= 0 or e.first_page < ends.get(e.block, 0):
            return None
        if e.first_page + e.pages > sizes[e.block]:
            return None
        runs.setdefault(e.block, []).append((e.first_page, e.pages, e.file_offset))
        ends[e.block] = e.first_page + e.pages
    return runs


def hash_extents(
    fd: int,
    layout: Sequence[tuple[str, int]],
    extents: Iterable[Extent],
    *,
    source: str = "file",
    workers: int | None = None,
    progress: Progress | None = None,
    base: LeafSet | None = None,
) -> LeafSet:
    """Hash file extents (raw file, memfd, ELF segments) into the leaves of ``layout``.

    Pages no extent covers keep the zero leaf, or with ``base`` (an incremental pass: ``layout``
    must be ``base.layout``) their leaf in ``base``; extents over a base given as a sequence
    sorted by page and disjoint per block go to :func:`rehash_runs` (work proportional to the
    extents), others are applied in order. Small extents are batched into tasks of about
    :data:`CHUNK_PAGES` pages, so scattered pages cost one task per 1 MiB, not one per page.

    Raises:
        MemorySourceError: a read fails or comes back short.
    """
    if base is not None:
        if tuple(layout) != base.layout:
            raise ValueError("an incremental pass keeps the layout of its base")
        runs = _runs_of(extents, base) if isinstance(extents, Sequence) else None
        if runs is not None:
            leaves = rehash_runs(fd, base, runs, source=source, workers=workers)
            if progress is not None:
                total_pages = base.pages
                progress(total_pages, total_pages)
            return leaves
        builder = LeafBuilder.from_leaves(base)
    else:
        builder = LeafBuilder(layout)
    n = workers or default_workers()
    total = [sum(p for _, p in layout)]
    if isinstance(extents, Sequence) and sum(e.pages for e in extents) <= INLINE_PAGES:
        # A small (incremental) pass: handing scattered pages to threads costs more than it saves.
        pieces = [(e.block, e.first_page, e.pages, e.file_offset) for e in extents]
        for blk, first, cnt, off in pieces:
            if off is None:
                builder.set_run(blk, first, ZERO_LEAF * cnt)
        data = [(b, f, c, o) for b, f, c, o in pieces if o is not None]
        for blk, first, digests in _read_and_hash(fd, data, source):
            builder.set_run(blk, first, digests)
        if progress is not None:
            progress(total[0], total[0])
        return builder.finish()
    with ThreadPoolExecutor(n, thread_name_prefix="memhash") as pool:
        win = _Window(pool, [builder], 2 * n, progress, total)
        batch: list[tuple[str, int, int, int]] = []
        batch_pages = 0
        for ext in extents:
            if ext.file_offset is None:
                builder.set_run(ext.block, ext.first_page, ZERO_LEAF * ext.pages)
                win.done += ext.pages
                continue
            for k in range(0, ext.pages, CHUNK_PAGES):
                cnt = min(CHUNK_PAGES, ext.pages - k)
                batch.append((ext.block, ext.first_page + k, cnt, ext.file_offset + k * PAGE_SIZE))
                batch_pages += cnt
                if batch_pages >= CHUNK_PAGES:
                    win.submit(_read_and_hash, fd, batch, source)
                    batch, batch_pages = [], 0
        if batch:
            win.submit(_read_and_hash, fd, batch, source)
        win.drain()
    if progress is not None:
        progress(total[0], total[0])
    return builder.finish()


def hash_stream_events(
    events: Iterable[StreamEvent],
    *,
    workers: int | None = None,
    progress: Progress | None = None,
) -> tuple[LeafSet, TpmEmulatorState | None]:
    """Hash the pages of a decoded migration stream (last record of a page wins).

    Returns the leaves of every RAM block the stream announced, and the vTPM state blobs if the
    stream carried them.
    """
    builder_ref: list[LeafBuilder | None] = [None]
    tpm: TpmEmulatorState | None = None
    n = workers or default_workers()
    total = [0]
    first_layout: list[tuple[str, int]] = []
    with ThreadPoolExecutor(n, thread_name_prefix="memhash") as pool:
        win = _Window(pool, builder_ref, 2 * n, progress, total)
        for ev in events:
            if isinstance(ev, PageRun):
                win.submit(_hash_run, ev.block, ev.first, ev.pages)
            elif isinstance(ev, RamBlocks):
                win.drain()
                layout = [(b.name, b.pages) for b in ev.blocks]
                if builder_ref[0] is None:
                    builder_ref[0] = LeafBuilder(layout)
                    first_layout = layout
                    total[0] = sum(p for _, p in layout)
                elif layout != first_layout:
                    raise ParseError(
                        "ram block list", ev.offset, "the blocks of the first list", str(layout)
                    )
            elif isinstance(ev, TpmEmulatorState):
                tpm = ev
        win.drain()
    builder = builder_ref[0]
    if builder is None:
        builder = LeafBuilder([])
    if progress is not None:
        progress(total[0], total[0])
    return builder.finish(), tpm
