"""Merkle tree over guest memory pages: leaves, roots, diffs, inclusion proofs, the leaf file.

Theory of operation
-------------------
*Page identity* is ``(RAM block name, page index)`` where the page index is the byte offset inside
the RAM block divided by :data:`PAGE_SIZE` (4096). A :class:`LeafSet` covers a set of named blocks;
blocks are always kept **sorted by the UTF-8 bytes of their names**, so the root does not depend
on the order in which a source happened to present them.

*Leaf*: ``SHA-256(page)`` over exactly the 4096 bytes of the page. A page of zeroes has the
constant leaf :data:`ZERO_LEAF`, the SHA-256 of 4096 zero bytes,
``ad7facb2586fc6e966c004d7d1d16b024f5805ff7cb47c7a85dabd8b48892ca7``: sources that know a page is
zero (a ZERO record in a migration stream, a hole in a memfd) use the constant without hashing,
and it is the same value a hash of the zero page gives, so a root never depends on whether a
source recognised a zero page.

*Inner node*: ``SHA-256(0x01 || child_0 || … || child_{m-1})`` for ``1 <= m <= FANOUT`` (64)
children. A level is cut into consecutive groups of 64 nodes (the last group may be shorter), each
group hashed into one node of the next level, until one node is left: that is the block root. A
block of one page has its leaf as block root; a block of zero pages has ``SHA-256(0x01)``.

*Domain separation* (the RFC 6962 property that no leaf can pose as a node): every leaf preimage is
exactly 4096 bytes, every node preimage ``1 + 32·m <= 2049`` bytes and starts with ``0x01``, so a
node can never be the hash of a page, nor a page the children of a node, without a SHA-256
collision. RFC 6962 separates with a ``0x00`` prefix on leaves instead; we separate by length
because a prefix costs a copy or an extra hash call per page, on the hot path of hashing inside a
VM's save pause. The 64-way fan-out (instead of RFC 6962's binary tree) makes the tree above the
leaves 1/64 of the leaf bytes, so recomputing every node costs about 5 ms per GiB of guest (an
incremental pass keeps the first level and rehashes only the 2 KiB groups holding a changed leaf),
and a proof is at most ``63·32`` bytes per level (3 levels per GiB).

*Root* of a leaf set: ``SHA-256("vtpm-trust/memory-root/v1" || 0x00 || be32 block_count ||
for each block in name order: be16 len(name) || name || be64 pages || block_root)``. It binds the
block names and sizes, so leaves cannot move between blocks or be cut off at the end.

*Leaf file* (:func:`encode_leaf_file` / :func:`parse_leaf_file`), all integers big-endian::

    magic     8 bytes  "VTPMLEAF"
    version   be16     1
    flags     be16     0
    page_size be32     4096
    blocks    be32     number of blocks (1 … 65535)
    per block be16 name_len, name (UTF-8, 1 … 255 bytes, no NUL), be64 pages
    root      32 bytes the root as defined above
    leaves    32 bytes per page, block after block in the order listed

Names must be listed in sorted order and be unique; the file must end right after the last leaf;
the stored root must equal the root recomputed from the leaves.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NoReturn

from evidence._reader import Reader
from evidence.errors import TruncatedError
from host_agent.errors import LeafFileError, MemoryLayoutMismatch, MemoryMismatch

__all__ = [
    "DIGEST_SIZE",
    "EMPTY_BLOCK_ROOT",
    "FANOUT",
    "LEAF_FILE_MAGIC",
    "PAGE_SIZE",
    "ZERO_LEAF",
    "ZERO_PAGE",
    "BlockLeaves",
    "Extent",
    "InclusionProof",
    "LeafBuilder",
    "LeafSet",
    "block_root",
    "diff",
    "diff_blocks",
    "encode_leaf_file",
    "group_nodes",
    "leaf_hash",
    "parse_leaf_file",
    "updated_block",
    "verify_inclusion",
]

PAGE_SIZE = 4096
DIGEST_SIZE = 32
FANOUT = 64
ZERO_PAGE = bytes(PAGE_SIZE)
ZERO_LEAF = hashlib.sha256(ZERO_PAGE).digest()
EMPTY_BLOCK_ROOT = hashlib.sha256(b"\x01").digest()
LEAF_FILE_MAGIC = b"VTPMLEAF"
LEAF_FILE_VERSION = 1
_ROOT_TAG = b"vtpm-trust/memory-root/v1\x00"
_MAX_NAME = 255
_MAX_BLOCKS = 65535
_HDR = struct.Struct(">8sHHII")


def leaf_hash(page: bytes | bytearray | memoryview) -> bytes:
    """The leaf of one 4096-byte page.

    Raises:
        ValueError: ``page`` is not exactly :data:`PAGE_SIZE` bytes.
    """
    if len(page) != PAGE_SIZE:
        raise ValueError(f"a page is {PAGE_SIZE} bytes, got {len(page)}")
    return hashlib.sha256(page).digest()


def _check_name(name: str) -> bytes:
    if not isinstance(name, str):
        raise TypeError(f"a block name is a str, got {type(name).__name__}")
    raw = name.encode("utf-8")
    if not 1 <= len(raw) <= _MAX_NAME or b"\x00" in raw:
        raise ValueError(f"a block name is 1..{_MAX_NAME} UTF-8 bytes without NUL, got {name!r}")
    return raw


def _level_up(level: bytes) -> bytes:
    """Hash consecutive groups of FANOUT nodes of one level into the next level."""
    group = FANOUT * DIGEST_SIZE
    sha = hashlib.sha256
    return b"".join(
        [
            sha(b"\x01" + level[start : start + group]).digest()
            for start in range(0, len(level), group)
        ]
    )


def block_root(leaves: bytes) -> bytes:
    """The root of one block's leaves (see the module docstring for the tree shape)."""
    if len(leaves) % DIGEST_SIZE:
        raise ValueError("leaves are a multiple of 32 bytes")
    if not leaves:
        return EMPTY_BLOCK_ROOT
    level = bytes(leaves)
    while len(level) > DIGEST_SIZE:
        level = _level_up(level)
    return level


@dataclass(frozen=True)
class Extent:
    """``pages`` consecutive pages of ``block`` from ``first_page`` on, stored in a file at
    ``file_offset`` (``None``: a hole, all zeroes, nothing to read)."""

    block: str
    first_page: int
    pages: int
    file_offset: int | None


@dataclass(frozen=True)
class BlockLeaves:
    """The leaves of one RAM block: ``leaves[32*i : 32*i+32]`` is the leaf of page ``i``.

    The first level of nodes above the leaves is computed once and cached (``_level1`` is filled
    in only by this module: by :meth:`level1`, or after an incremental pass by
    :func:`updated_block` or :class:`LeafBuilder`, which recompute just the groups whose leaves
    changed).
    """

    name: str
    leaves: bytes
    _level1: bytes | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        _check_name(self.name)
        if not isinstance(self.leaves, bytes):
            raise TypeError("leaves must be bytes")
        if len(self.leaves) % DIGEST_SIZE:
            raise ValueError(f"leaves of {self.name!r} are not a multiple of {DIGEST_SIZE} bytes")

    def level1(self) -> bytes:
        """The nodes one level above the leaves (one per group of 64 pages)."""
        if self._level1 is None:
            object.__setattr__(self, "_level1", _level_up(self.leaves))
        assert self._level1 is not None
        return self._level1

    @property
    def pages(self) -> int:
        return len(self.leaves) // DIGEST_SIZE

    @property
    def size(self) -> int:
        """Block size in bytes."""
        return self.pages * PAGE_SIZE

    def leaf(self, page: int) -> bytes:
        if not 0 <= page < self.pages:
            raise IndexError(f"page {page} outside block {self.name!r} of {self.pages} pages")
        return self.leaves[page * DIGEST_SIZE : (page + 1) * DIGEST_SIZE]

    def root(self) -> bytes:
        if len(self.leaves) <= DIGEST_SIZE:
            return block_root(self.leaves)
        level = self.level1()
        while len(level) > DIGEST_SIZE:
            level = _level_up(level)
        return level

    def zero_pages(self) -> int:
        """How many leaves equal :data:`ZERO_LEAF`."""
        leaves, zl = self.leaves, ZERO_LEAF
        return sum(
            [leaves[off : off + DIGEST_SIZE] == zl for off in range(0, len(leaves), DIGEST_SIZE)]
        )


def _top_root(entries: Iterable[tuple[str, int, bytes]]) -> bytes:
    items = list(entries)
    h = hashlib.sha256(_ROOT_TAG)
    h.update(struct.pack(">I", len(items)))
    for name, pages, root in items:
        raw = name.encode("utf-8")
        h.update(struct.pack(">H", len(raw)) + raw + struct.pack(">Q", pages) + root)
    return h.digest()


@dataclass(frozen=True)
class LeafSet:
    """The leaves of a set of named RAM blocks, kept sorted by name."""

    blocks: tuple[BlockLeaves, ...]

    def __post_init__(self) -> None:
        names = [_check_name(b.name) for b in self.blocks]
        if names != sorted(names) or len(set(names)) != len(names):
            raise ValueError("blocks must be unique and sorted by the UTF-8 bytes of their names")
        if len(self.blocks) > _MAX_BLOCKS:
            raise ValueError(f"at most {_MAX_BLOCKS} blocks")

    @classmethod
    def of(cls, blocks: Iterable[BlockLeaves]) -> LeafSet:
        """Build a set from blocks in any order."""
        return cls(tuple(sorted(blocks, key=lambda b: b.name.encode("utf-8"))))

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(b.name for b in self.blocks)

    @property
    def pages(self) -> int:
        return sum(b.pages for b in self.blocks)

    @property
    def size(self) -> int:
        return self.pages * PAGE_SIZE

    @property
    def layout(self) -> tuple[tuple[str, int], ...]:
        """``(name, pages)`` for each block, in order."""
        return tuple((b.name, b.pages) for b in self.blocks)

    def block(self, name: str) -> BlockLeaves:
        for b in self.blocks:
            if b.name == name:
                return b
        raise KeyError(name)

    def select(self, names: Iterable[str]) -> LeafSet:
        """The subset of the named blocks.

        Raises:
            MemoryLayoutMismatch: a named block is not in this set.
        """
        wanted = set(names)
        missing = wanted - set(self.names)
        if missing:
            raise MemoryLayoutMismatch(
                f"no RAM block {sorted(missing)} here; blocks are {list(self.names)}"
            )
        return LeafSet(tuple(b for b in self.blocks if b.name in wanted))

    def rename(self, mapping: Mapping[str, str]) -> LeafSet:
        """The same leaves with blocks renamed (``{"mem": "pc.ram"}``)."""
        return LeafSet.of(BlockLeaves(mapping.get(b.name, b.name), b.leaves) for b in self.blocks)

    def block_roots(self) -> tuple[bytes, ...]:
        return tuple(b.root() for b in self.blocks)

    def root(self) -> bytes:
        return _top_root(
            (b.name, b.pages, r) for b, r in zip(self.blocks, self.block_roots(), strict=True)
        )

    def zero_pages(self) -> int:
        return sum(b.zero_pages() for b in self.blocks)

    def locate(self, page: int) -> tuple[str, int]:
        """Map a page number of the whole set (blocks concatenated in order) to (block, index)."""
        if page >= 0:
            for b in self.blocks:
                if page < b.pages:
                    return b.name, page
                page -= b.pages
        raise IndexError("page outside the leaf set")

    def prove(self, name: str, page: int) -> InclusionProof:
        """An inclusion proof for page ``page`` of block ``name``."""
        blk = self.block(name)
        blk.leaf(page)  # bounds check
        levels: list[tuple[bytes, ...]] = []
        level = blk.leaves
        index = page
        while len(level) > DIGEST_SIZE:
            start = (index // FANOUT) * FANOUT
            stop = min(start + FANOUT, len(level) // DIGEST_SIZE)
            sib = tuple(
                level[i * DIGEST_SIZE : (i + 1) * DIGEST_SIZE]
                for i in range(start, stop)
                if i != index
            )
            levels.append(sib)
            level = _level_up(level)
            index //= FANOUT
        others = tuple((b.name, b.pages, b.root()) for b in self.blocks if b.name != name)
        return InclusionProof(name, page, blk.pages, tuple(levels), others)


@dataclass(frozen=True)
class InclusionProof:
    """Proof that one page's leaf is part of a root.

    ``levels[i]`` holds the other members of the page's group at level ``i`` (leaves at level 0),
    in order; ``other_blocks`` holds ``(name, pages, block_root)`` of every other block.
    """

    block: str
    page: int
    block_pages: int
    levels: tuple[tuple[bytes, ...], ...]
    other_blocks: tuple[tuple[str, int, bytes], ...]


def verify_inclusion(root: bytes, proof: InclusionProof, page: bytes) -> None:
    """Check that ``page`` is page ``proof.page`` of block ``proof.block`` under ``root``.

    Checks, in order: the page is 4096 bytes; at each level the group holds exactly as many
    members as a block of ``block_pages`` pages has there; the recomputed block root, with the
    other blocks, gives ``root``.

    Raises:
        MemoryMismatch: the proof does not lead to ``root``.
        ValueError: ``page`` is not 4096 bytes.
    """
    node = leaf_hash(page)
    index = proof.page
    count = proof.block_pages
    if not 0 <= index < count:
        raise MemoryMismatch(f"page {index} outside a block of {count} pages")
    for sib in proof.levels:
        if count <= 1:
            raise MemoryMismatch("proof has more levels than the block's tree")
        start = (index // FANOUT) * FANOUT
        size = min(start + FANOUT, count) - start
        if len(sib) != size - 1 or any(len(s) != DIGEST_SIZE for s in sib):
            raise MemoryMismatch(f"proof group at page {index} has the wrong size")
        members = list(sib)
        members.insert(index - start, node)
        node = hashlib.sha256(b"\x01" + b"".join(members)).digest()
        index //= FANOUT
        count = (count + FANOUT - 1) // FANOUT
    if count != 1:
        raise MemoryMismatch("proof has fewer levels than the block's tree")
    entries = sorted(
        [(proof.block, proof.block_pages, node), *proof.other_blocks],
        key=lambda e: e[0].encode("utf-8"),
    )
    got = _top_root(entries)
    if got != root:
        raise MemoryMismatch(
            f"page {proof.page} of {proof.block!r} does not prove root {root.hex()}: "
            f"computed {got.hex()}",
            [(proof.page, proof.page)],
        )


def _ranges(indices: Iterator[int]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for i in indices:
        if out and out[-1][1] == i - 1:
            out[-1] = (out[-1][0], i)
        else:
            out.append((i, i))
    return out


def _diff_leaves(a: bytes, b: bytes) -> Iterator[int]:
    if a == b:
        return
    va, vb = memoryview(a), memoryview(b)
    group = FANOUT * DIGEST_SIZE
    for g in range(0, len(a), group):
        if va[g : g + group] == vb[g : g + group]:
            continue
        for off in range(g, min(g + group, len(a)), DIGEST_SIZE):
            if va[off : off + DIGEST_SIZE] != vb[off : off + DIGEST_SIZE]:
                yield off // DIGEST_SIZE


def _check_same_layout(a: LeafSet, b: LeafSet) -> None:
    if a.layout != b.layout:
        raise MemoryLayoutMismatch(
            f"cannot compare page by page: blocks {list(a.layout)} vs {list(b.layout)} "
            "(select the same blocks on both sides)"
        )


def diff_blocks(a: LeafSet, b: LeafSet) -> dict[str, list[tuple[int, int]]]:
    """Differing page ranges per block (page indices inside each block).

    Raises:
        MemoryLayoutMismatch: the two sets cover different blocks or block sizes.
    """
    _check_same_layout(a, b)
    return {
        ba.name: _ranges(_diff_leaves(ba.leaves, bb.leaves))
        for ba, bb in zip(a.blocks, b.blocks, strict=True)
    }


def diff(a: LeafSet, b: LeafSet) -> list[tuple[int, int]]:
    """Differing page ranges ``[(first, last), …]`` (inclusive), numbering pages across the
    blocks concatenated in order (see :meth:`LeafSet.locate`).

    Raises:
        MemoryLayoutMismatch: the two sets cover different blocks or block sizes.
    """
    _check_same_layout(a, b)

    def indices() -> Iterator[int]:
        base = 0
        for ba, bb in zip(a.blocks, b.blocks, strict=True):
            for i in _diff_leaves(ba.leaves, bb.leaves):
                yield base + i
            base += ba.pages

    return _ranges(indices())


def group_nodes(leaves: bytes, groups: Sequence[int]) -> list[bytes]:
    """The first-level nodes of the given groups of 64 leaves, in that order."""
    view = memoryview(leaves)
    span = FANOUT * DIGEST_SIZE
    prefix = hashlib.sha256(b"\x01")
    out: list[bytes] = []
    append = out.append
    for g in groups:
        h = prefix.copy()
        h.update(view[g * span : (g + 1) * span])  # 2 KiB: hashlib releases the GIL
        append(h.digest())
    return out


NodesFn = Callable[[bytes, Sequence[int]], list[bytes]]
"""How :func:`updated_block` computes first-level nodes (:func:`group_nodes`, or a parallel
version of it with the same result)."""


def updated_block(
    base: BlockLeaves, runs: Sequence[tuple[int, bytes]], nodes: NodesFn = group_nodes
) -> BlockLeaves:
    """``base`` with the leaves of pages ``first, first+1, …`` replaced by ``digests`` for each
    ``(first, digests)`` of ``runs`` (sorted by ``first``, not overlapping).

    The work is proportional to the changed pages, not to the block: the new leaves are one copy
    of the old ones with the runs spliced in, and the first tree level is the old one (computed
    once by :meth:`BlockLeaves.level1`) with only the groups that hold a changed page rehashed,
    so the root (:meth:`BlockLeaves.root`) is the one a full recompute gives.

    Raises:
        ValueError: a run is empty, outside the block, not a whole number of digests, or the runs
            are not sorted and disjoint.
    """
    old = base.leaves
    view = memoryview(old)
    pieces: list[bytes | memoryview] = []
    append = pieces.append
    groups: list[int] = []
    add_group = groups.append
    prev = 0  # byte offset in ``old`` up to which ``pieces`` cover the new leaves
    last = -1  # the last group holding a changed leaf so far
    for first, digests in runs:  # one pass, kept lean: it runs once per dirty range
        start = first * DIGEST_SIZE
        size = len(digests)
        if start < prev or size % DIGEST_SIZE or not size:
            _bad_run(base, first, size)
        append(view[prev:start])
        append(digests)
        prev = start + size
        if size == DIGEST_SIZE:
            g = first // FANOUT
            if g != last:
                add_group(g)
                last = g
        else:
            g0 = first // FANOUT
            if g0 == last:
                g0 += 1
            last = (first + size // DIGEST_SIZE - 1) // FANOUT
            groups.extend(range(g0, last + 1))
    if not pieces:
        return base
    if prev > len(old):
        _bad_run(base, runs[-1][0], len(runs[-1][1]))
    append(view[prev:])
    leaves = b"".join(pieces)
    if len(leaves) <= DIGEST_SIZE:
        return BlockLeaves(base.name, leaves)
    level1 = bytearray(base.level1())
    for g, node in zip(groups, nodes(leaves, groups), strict=True):
        level1[g * DIGEST_SIZE : (g + 1) * DIGEST_SIZE] = node
    return BlockLeaves(base.name, leaves, bytes(level1))


def _bad_run(base: BlockLeaves, first: int, size: int) -> NoReturn:
    raise ValueError(
        f"runs of {base.name!r} ({base.pages} pages) must be sorted, disjoint, whole digests and "
        f"inside the block; got {size} bytes of digests for page {first}"
    )


class LeafBuilder:
    """Collects leaves for a known block layout; pages never set keep :data:`ZERO_LEAF`.

    (A page a migration stream never sends is zero on the destination, which starts from fresh
    memory; a memfd hole reads as zeroes.) Not thread-safe: one thread writes.
    """

    def __init__(self, layout: Sequence[tuple[str, int]]) -> None:
        self._base_level1: dict[str, bytes] = {}
        self._touched: dict[str, set[int]] = {}
        self._blocks: dict[str, bytearray] = {}
        for name, pages in layout:
            _check_name(name)
            if name in self._blocks:
                raise ValueError(f"block {name!r} listed twice")
            if pages < 0:
                raise ValueError("pages must be >= 0")
            self._blocks[name] = bytearray(ZERO_LEAF * pages)

    @classmethod
    def from_leaves(cls, leaves: LeafSet) -> LeafBuilder:
        """A builder that starts from existing leaves (for an incremental pass): the finished
        set recomputes only the first-level nodes of groups whose leaves were set."""
        b = cls([])
        b._blocks = {blk.name: bytearray(blk.leaves) for blk in leaves.blocks}
        b._base_level1 = {blk.name: blk.level1() for blk in leaves.blocks if blk.pages > 1}
        b._touched = {name: set() for name in b._base_level1}
        return b

    def has(self, name: str) -> bool:
        return name in self._blocks

    def pages(self, name: str) -> int:
        return len(self._blocks[name]) // DIGEST_SIZE

    def set_run(self, name: str, first: int, digests: bytes) -> None:
        """Set the leaves of pages ``first, first+1, …`` from concatenated digests."""
        buf = self._blocks[name]
        start = first * DIGEST_SIZE
        if first < 0 or start + len(digests) > len(buf) or len(digests) % DIGEST_SIZE:
            raise IndexError(f"pages {first}+{len(digests) // DIGEST_SIZE} outside {name!r}")
        buf[start : start + len(digests)] = digests
        touched = self._touched.get(name)
        if touched is not None and digests:
            last = first + len(digests) // DIGEST_SIZE - 1
            touched.update(range(first // FANOUT, last // FANOUT + 1))

    def finish(self) -> LeafSet:
        out = []
        group = FANOUT * DIGEST_SIZE
        sha = hashlib.sha256
        for name, buf in self._blocks.items():
            leaves = bytes(buf)
            base = self._base_level1.get(name)
            level1: bytes | None = None
            if base is not None:
                lv = bytearray(base)
                for g in self._touched[name]:
                    node = sha(b"\x01" + leaves[g * group : (g + 1) * group]).digest()
                    lv[g * DIGEST_SIZE : (g + 1) * DIGEST_SIZE] = node
                level1 = bytes(lv)
            out.append(BlockLeaves(name, leaves, level1))
        return LeafSet.of(out)


def encode_leaf_file(leaves: LeafSet) -> bytes:
    """Encode a leaf set in the leaf file format (module docstring)."""
    if not leaves.blocks:
        raise ValueError("a leaf file holds at least one block")
    out = bytearray(_HDR.pack(LEAF_FILE_MAGIC, LEAF_FILE_VERSION, 0, PAGE_SIZE, len(leaves.blocks)))
    for b in leaves.blocks:
        raw = b.name.encode("utf-8")
        out += struct.pack(">H", len(raw)) + raw + struct.pack(">Q", b.pages)
    out += leaves.root()
    for b in leaves.blocks:
        out += b.leaves
    return bytes(out)


def parse_leaf_file(data: bytes) -> LeafSet:
    """Parse a leaf file strictly.

    Raises:
        LeafFileError: wrong magic, version, flags, page size, names, order, trailing bytes, or a
            stored root that does not match the leaves.
        TruncatedError: the file ends early.
    """
    r = Reader(data)
    magic = r.take(8, "leaf file magic")
    if magic != LEAF_FILE_MAGIC:
        raise LeafFileError("leaf file magic", 0, repr(LEAF_FILE_MAGIC), repr(magic))
    version = r.u16be("leaf file version")
    if version != LEAF_FILE_VERSION:
        raise LeafFileError("leaf file version", 8, str(LEAF_FILE_VERSION), str(version))
    flags = r.u16be("leaf file flags")
    if flags:
        raise LeafFileError("leaf file flags", 10, "0", hex(flags))
    page_size = r.u32be("leaf file page size")
    if page_size != PAGE_SIZE:
        raise LeafFileError("leaf file page size", 12, str(PAGE_SIZE), str(page_size))
    count = r.u32be("leaf file block count")
    if not 1 <= count <= _MAX_BLOCKS:
        raise LeafFileError("leaf file block count", 16, f"1..{_MAX_BLOCKS}", str(count))
    layout: list[tuple[str, int]] = []
    prev: bytes | None = None
    total = 0
    for _ in range(count):
        at = r.offset
        n = r.u16be("leaf file block name length")
        if not 1 <= n <= _MAX_NAME:
            raise LeafFileError("leaf file block name length", at, f"1..{_MAX_NAME}", str(n))
        raw = r.take(n, "leaf file block name")
        try:
            name = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise LeafFileError("leaf file block name", at + 2, "UTF-8", repr(raw)) from err
        if b"\x00" in raw:
            raise LeafFileError("leaf file block name", at + 2, "no NUL byte", repr(raw))
        if prev is not None and raw <= prev:
            raise LeafFileError("leaf file block order", at, f"a name after {prev!r}", repr(raw))
        prev = raw
        pages = r.u64be("leaf file block pages")
        total += pages
        if total * DIGEST_SIZE > r.remaining:
            raise TruncatedError(
                "leaf file leaves", r.offset, f"{total * DIGEST_SIZE} bytes of leaves", "fewer"
            )
        layout.append((name, pages))
    root_at = r.offset
    stored = r.take(DIGEST_SIZE, "leaf file root")
    blocks = []
    for name, pages in layout:
        blocks.append(BlockLeaves(name, r.take(pages * DIGEST_SIZE, f"leaves of {name!r}")))
    if not r.at_end():
        raise LeafFileError("leaf file", r.offset, "end of file", f"{r.remaining} trailing bytes")
    leaf_set = LeafSet(tuple(blocks))
    got = leaf_set.root()
    if got != stored:
        raise LeafFileError(
            "leaf file root", root_at, f"the root of the leaves {got.hex()}", stored.hex()
        )
    return leaf_set
