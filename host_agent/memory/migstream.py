"""QEMU migration stream codec: RAM pages (and the vTPM state blobs) without device layouts.

Decodes the format written by ``migrate``, ``virsh save`` (after the libvirt header, see
:mod:`.saveimage`), snapshot memory files and libvirt's non-memory-only core dumps; the layout is
QEMU ``migration/savevm.c`` and ``migration/ram.c`` (7.2; wire format unchanged since ≈6.0),
summarised in docs protocols.md §4.1-§4.2. All integers are big-endian.

Walk: ``be32 "QEVM"``, ``be32 3``; the optional ``CONFIGURATION`` (0x07) record with its
subsections; then ``SECTION_START``/``PART``/``END`` sections, each of which must be the ``"ram"``
section (any other iterative section — ``block``, ``dirty-bitmap``, VFIO — has no length prefix
and cannot be skipped: :class:`UnsupportedError`); each ram section is a list of records ended by
``EOS``. RAM parsing stops at the first ``SECTION_FULL`` (all device state follows the iterative
sections). A page sent more than once (live pre-copy iterations) is reported each time: the
consumer keeps the last one.

RAM records: ``be64 offset|flags``; ``ZERO`` (0x02): [block id] ``u8 fill``; ``PAGE`` (0x08):
[block id] 4096 bytes; ``MEM_SIZE`` (0x04): the block list; ``EOS`` (0x10); ``CONTINUE`` (0x20)
means "same block as the previous record, no block id". ``XBZRLE`` (0x40), ``COMPRESS_PAGE``
(0x100), ``HOOK`` (0x80, RDMA) and the obsolete ``FULL`` (0x01) are refused with their offset,
as is any capability announced in the configuration (``x-ignore-shared`` changes the block list).

The vTPM state: after the RAM, the ``tpm-emulator`` device section (QEMU
``backends/tpm/tpm_emulator.c``, ``vmstate_tpm_emulator``, version 0) is
``{be32 flags, be32 size, size bytes}`` × (permanent, volatile, savestate) then the footer
``0x7e be32 section_id``. Device sections are not self-delimiting, so it is found by its
``SECTION_FULL`` header (type, section id, ``u8 12 "tpm-emulator"``, instance, version 0) and
accepted only if its body and footer parse exactly and no second candidate does (a guest cannot
smuggle a second, conflicting copy past us: that makes the stream ambiguous and refused).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass

from evidence.errors import ParseError, TruncatedError, UnsupportedError
from host_agent.memory._stream import ChunkCursor, ReadableStream

__all__ = [
    "QEVM_MAGIC",
    "DeviceStateStart",
    "PageRun",
    "RamBlock",
    "RamBlocks",
    "StreamEvent",
    "TpmEmulatorState",
    "find_tpm_emulator_state",
    "iter_migration_stream",
]

QEVM_MAGIC = 0x5145564D
QEVM_VERSION = 3
PAGE_SIZE = 4096
_PAGE_MASK = ~(PAGE_SIZE - 1)

# Section types (migration/savevm.c)
_EOF = 0x00
_START = 0x01
_PART = 0x02
_END = 0x03
_FULL = 0x04
_SUBSECTION = 0x05
_VMDESCRIPTION = 0x06
_CONFIGURATION = 0x07
_COMMAND = 0x08
_FOOTER = 0x7E

# RAM record flags (migration/ram.c)
F_FULL = 0x01
F_ZERO = 0x02
F_MEM_SIZE = 0x04
F_PAGE = 0x08
F_EOS = 0x10
F_CONTINUE = 0x20
F_XBZRLE = 0x40
F_HOOK = 0x80
F_COMPRESS_PAGE = 0x100
_UNSUPPORTED_FLAGS = {
    F_FULL: "the obsolete FULL page flag",
    F_XBZRLE: "XBZRLE-encoded pages (turn off the xbzrle capability)",
    F_HOOK: "RDMA hooks",
    F_COMPRESS_PAGE: "compressed pages (turn off the compress capability)",
}
_KNOWN_FLAGS = F_ZERO | F_MEM_SIZE | F_PAGE | F_EOS | F_CONTINUE
_RUN_MAX = 256
_MAX_DEVICE_STATE = 256 << 20


@dataclass(frozen=True)
class RamBlock:
    """One RAMBlock as the stream announces it: ``used_length`` bytes (a multiple of 4096)."""

    name: str
    used_length: int

    @property
    def pages(self) -> int:
        return self.used_length // PAGE_SIZE


@dataclass(frozen=True)
class RamBlocks:
    """The MEM_SIZE record: every RAM block of the VM, in stream order."""

    blocks: tuple[RamBlock, ...]
    offset: int


@dataclass(frozen=True)
class PageRun:
    """Consecutive pages ``first, first+1, …`` of one block, in stream order.

    ``pages[i]`` is the 4096 bytes of page ``first+i``, or ``None`` for a zero page. Views stay
    valid after the parser moves on.
    """

    block: str
    first: int
    pages: tuple[memoryview | None, ...]
    offset: int


@dataclass(frozen=True)
class DeviceStateStart:
    """The first SECTION_FULL: RAM is complete; device state follows from ``offset``."""

    idstr: str
    offset: int


@dataclass(frozen=True)
class TpmEmulatorState:
    """The three swtpm state blobs of QEMU's ``tpm-emulator`` section (untrusted bytes)."""

    permanent: bytes
    volatile: bytes
    savestate: bytes
    permanent_flags: int
    volatile_flags: int
    savestate_flags: int
    offset: int


StreamEvent = RamBlocks | PageRun | DeviceStateStart | TpmEmulatorState

_FILL_PAGES: dict[int, memoryview] = {}


def _fill_page(ch: int) -> memoryview | None:
    if ch == 0:
        return None
    page = _FILL_PAGES.get(ch)
    if page is None:
        page = memoryview(bytes([ch]) * PAGE_SIZE)
        _FILL_PAGES[ch] = page
    return page


def _name(cur: ChunkCursor, what: str) -> str:
    n = cur.u8(what + " length")
    at = cur.offset
    raw = cur.take_bytes(n, what)
    if not raw or b"\x00" in raw:
        raise ParseError(what, at, "a non-empty name without NUL", repr(raw))
    try:
        return raw.decode("ascii")
    except UnicodeDecodeError as err:
        raise ParseError(what, at, "an ASCII name", repr(raw)) from err


def _configuration(cur: ChunkCursor) -> None:
    """The CONFIGURATION record (type byte already consumed); refuses capabilities."""
    at = cur.offset
    n = cur.u32be("configuration machine name length")
    if n > 256:
        raise ParseError("configuration machine name length", at, "at most 256", str(n))
    cur.skip(n, "configuration machine name")
    while cur.peek_u8("configuration subsection") == _SUBSECTION:
        at = cur.offset
        cur.u8("subsection type")
        name = _name(cur, "configuration subsection name")
        cur.u32be("configuration subsection version")
        if name == "configuration/target-page-bits":
            bits = cur.u32be("target-page-bits")
            if bits != 12:
                raise UnsupportedError("target-page-bits", at, "12 (4 KiB pages)", str(bits))
        elif name == "configuration/uuid":
            cur.skip(16, "configuration uuid")
        elif name == "configuration/capabilities":
            count = cur.u32be("capabilities count")
            caps = [_name(cur, "capability") for _ in range(min(count, 64))]
            raise UnsupportedError(
                "migration capabilities",
                at,
                "no RAM-layout capability",
                ", ".join(caps) if count <= 64 else f"{count} capabilities",
            )
        else:
            raise UnsupportedError("configuration subsection", at, "a known subsection", name)


def _footer(cur: ChunkCursor, section_id: int) -> None:
    if cur.peek_u8("section footer") != _FOOTER:
        return  # machine types before 2.4 send no footer
    at = cur.offset
    cur.u8("section footer")
    got = cur.u32be("section footer id")
    if got != section_id:
        raise ParseError("section footer", at, f"section id {section_id}", str(got))


def _ram_records(
    cur: ChunkCursor, blocks: dict[str, RamBlock], state: list[str | None]
) -> Iterator[RamBlocks | PageRun]:
    """RAM records up to and including EOS. ``state[0]`` is the block of the previous record."""
    run_block: str | None = None
    run_first = 0
    run_pages: list[memoryview | None] = []
    run_at = 0
    last_block = state[0]
    while True:
        at = cur.offset
        v = cur.u64be("ram record header")
        flags = v & (PAGE_SIZE - 1)
        addr = v & _PAGE_MASK
        for bit, what in _UNSUPPORTED_FLAGS.items():
            if flags & bit:
                raise UnsupportedError("ram record", at, "ZERO, PAGE, MEM_SIZE or EOS", what)
        if flags & ~_KNOWN_FLAGS:
            raise UnsupportedError("ram record", at, "known flags", hex(flags))
        if flags & F_EOS:
            if flags != F_EOS:
                raise ParseError("ram record", at, "EOS alone", hex(flags))
            break
        if flags & F_MEM_SIZE:
            if flags != F_MEM_SIZE:
                raise ParseError("ram record", at, "MEM_SIZE alone", hex(flags))
            if run_pages:
                yield PageRun(run_block or "", run_first, tuple(run_pages), run_at)
                run_pages = []
            total = addr
            seen = 0
            listed: list[RamBlock] = []
            while seen < total:
                bat = cur.offset
                name = _name(cur, "ram block name")
                used = cur.u64be("ram block used_length")
                if used % PAGE_SIZE:
                    raise ParseError("ram block used_length", bat, "a multiple of 4096", str(used))
                if name in blocks and blocks[name].used_length != used:
                    raise ParseError("ram block", bat, f"{name} listed once", "a second size")
                seen += used
                listed.append(RamBlock(name, used))
            if seen != total:
                raise ParseError("ram block list", at, f"lengths summing to {total}", str(seen))
            for b in listed:
                blocks[b.name] = b
            yield RamBlocks(tuple(listed), at)
            continue
        kind = flags & (F_ZERO | F_PAGE)
        if kind not in (F_ZERO, F_PAGE):
            raise ParseError("ram record", at, "exactly one of ZERO or PAGE", hex(flags))
        if flags & F_CONTINUE:
            if last_block is None:
                raise ParseError("ram record", at, "a block id before CONTINUE", "CONTINUE")
            name = last_block
        else:
            nat = cur.offset
            name = _name(cur, "ram block id")
            if name not in blocks:
                raise ParseError("ram block id", nat, "a block from the MEM_SIZE list", name)
            last_block = name
        index = addr // PAGE_SIZE
        if addr >= blocks[name].used_length:
            raise ParseError(
                "ram record offset", at, f"below {blocks[name].used_length} in {name}", hex(addr)
            )
        data = (
            _fill_page(cur.u8("zero page fill")) if kind == F_ZERO else cur.take(PAGE_SIZE, "page")
        )
        if (
            run_pages
            and name == run_block
            and index == run_first + len(run_pages)
            and len(run_pages) < _RUN_MAX
        ):
            run_pages.append(data)
        else:
            if run_pages:
                yield PageRun(run_block or "", run_first, tuple(run_pages), run_at)
            run_block, run_first, run_pages, run_at = name, index, [data], at
    if run_pages:
        yield PageRun(run_block or "", run_first, tuple(run_pages), run_at)
    state[0] = last_block


def iter_migration_stream(
    src: bytes | bytearray | memoryview | ReadableStream,
    *,
    base: int = 0,
    device_state: bool = True,
) -> Iterator[StreamEvent]:
    """Decode a QEMU migration stream into RAM events (see the module docstring).

    Yields :class:`RamBlocks` (before any page), :class:`PageRun` in stream order (later runs
    override earlier ones for the same page), then :class:`DeviceStateStart` at the first
    device section and, if ``device_state``, one :class:`TpmEmulatorState` when the stream has a
    ``tpm-emulator`` section. Reading ``src`` stops at its end.

    Args:
        src: the stream as bytes or an object with ``read(n)`` (file, decompressor).
        base: offset of ``src`` in its file, added to offsets in errors.
        device_state: read the (small) device-state tail and look for the vTPM blobs.

    Raises:
        TruncatedError: the stream ends inside a record or before EOF.
        UnsupportedError: XBZRLE/compressed pages, capabilities, non-RAM iterative sections.
        ParseError: any other malformation, with its offset.
    """
    cur = ChunkCursor(src, base=base)
    magic = cur.u32be("QEVM magic")
    if magic != QEVM_MAGIC:
        raise ParseError("QEVM magic", base, "0x5145564d ('QEVM')", hex(magic))
    version = cur.u32be("QEVM version")
    if version != QEVM_VERSION:
        raise UnsupportedError("QEVM version", base + 4, str(QEVM_VERSION), str(version))
    if cur.peek_u8("section type") == _CONFIGURATION:
        cur.u8("configuration")
        _configuration(cur)
    blocks: dict[str, RamBlock] = {}
    ram_id: int | None = None
    state: list[str | None] = [None]
    saw_blocks = False
    while True:
        at = cur.offset
        kind = cur.u8("section type")
        if kind == _START:
            section_id = cur.u32be("section id")
            idstr = _name(cur, "section idstr")
            cur.u32be("section instance id")
            sversion = cur.u32be("section version")
            if idstr != "ram":
                raise UnsupportedError(
                    "iterative section", at, "only 'ram' (block migration off)", idstr
                )
            if sversion != 4:
                raise UnsupportedError("ram section version", at, "4", str(sversion))
            if ram_id is not None:
                raise ParseError("ram section", at, "one SECTION_START for ram", "a second")
            ram_id = section_id
        elif kind in (_PART, _END):
            section_id = cur.u32be("section id")
            if section_id != ram_id:
                raise UnsupportedError(
                    "iterative section", at, f"the ram section ({ram_id})", f"section {section_id}"
                )
        elif kind == _FULL:
            cur.u32be("section id")
            idstr = _name(cur, "section idstr")
            if not saw_blocks:
                raise ParseError("migration stream", at, "RAM before device state", idstr)
            yield DeviceStateStart(idstr, at)
            if device_state:
                tail = cur.read_rest(_MAX_DEVICE_STATE, "device state")
                _check_complete(tail, at)
                tpm = find_tpm_emulator_state(tail, base=at)
                if tpm is not None:
                    yield tpm
            return
        elif kind == _EOF:
            if not saw_blocks:
                raise ParseError("migration stream", at, "a ram section", "EOF")
            return
        elif kind == _COMMAND:
            cur.u16be("command")
            cur.skip(cur.u16be("command length"), "command data")
            continue
        else:
            raise ParseError("section type", at, "START, PART, END, FULL or EOF", hex(kind))
        for ev in _ram_records(cur, blocks, state):
            if isinstance(ev, RamBlocks):
                saw_blocks = True
            elif not saw_blocks:
                raise ParseError("ram record", ev.offset, "MEM_SIZE before pages", "a page")
            yield ev
        _footer(cur, section_id)


def _check_complete(tail: bytes, base: int) -> None:
    """The stream must end with EOF (0x00), optionally followed by the VMDESCRIPTION record
    (``0x06, be32 len, JSON``) that QEMU appends by default: a copy cut short is refused.
    (Without VMDESCRIPTION a cut landing right after a 0x00 byte cannot be told apart.)"""
    end = base + len(tail)
    pos = tail.rfind(b"\x00\x06")
    while pos >= 0:
        if pos + 6 <= len(tail):
            (n,) = struct.unpack_from(">I", tail, pos + 2)
            if pos + 6 + n == len(tail) and tail[pos + 6 : pos + 7] == b"{":
                return
        pos = tail.rfind(b"\x00\x06", 0, pos)
    if not tail.endswith(b"\x00"):
        raise TruncatedError(
            "migration stream end", end, "EOF (0x00) and an optional VMDESCRIPTION", "end of input"
        )


_TPM_HDR = b"\x0ctpm-emulator"
_U32 = struct.Struct(">I")


def _tpm_candidate(tail: bytes, pos: int) -> tuple[TpmEmulatorState, int] | None:
    """Parse a tpm-emulator FULL section whose idstr length byte is at ``tail[pos]``."""
    start = pos - 5
    if start < 0 or tail[start] != _FULL:
        return None
    (section_id,) = _U32.unpack_from(tail, start + 1)
    p = pos + len(_TPM_HDR)
    if p + 8 > len(tail):
        return None
    version = _U32.unpack_from(tail, p + 4)[0]
    if version != 0:
        return None
    p += 8
    blobs: list[tuple[int, bytes]] = []
    for _ in range(3):
        if p + 8 > len(tail):
            return None
        flags, size = struct.unpack_from(">II", tail, p)
        p += 8
        if p + size > len(tail):
            return None
        blobs.append((flags, tail[p : p + size]))
        p += size
    if p + 5 > len(tail) or tail[p] != _FOOTER or _U32.unpack_from(tail, p + 1)[0] != section_id:
        return None
    (pf, pb), (vf, vb), (sf, sb) = blobs
    return TpmEmulatorState(pb, vb, sb, pf, vf, sf, start), p + 5


def find_tpm_emulator_state(tail: bytes, *, base: int = 0) -> TpmEmulatorState | None:
    """Find the ``tpm-emulator`` section in the device-state tail of a stream.

    Returns ``None`` if there is none.

    Raises:
        UnsupportedError: more than one candidate parses (ambiguous).
    """
    found: list[TpmEmulatorState] = []
    pos = tail.find(_TPM_HDR)
    while pos >= 0:
        cand = _tpm_candidate(tail, pos)
        if cand is not None:
            st, _end = cand
            found.append(
                TpmEmulatorState(
                    st.permanent,
                    st.volatile,
                    st.savestate,
                    st.permanent_flags,
                    st.volatile_flags,
                    st.savestate_flags,
                    base + st.offset,
                )
            )
        pos = tail.find(_TPM_HDR, pos + 1)
    if len(found) > 1:
        raise UnsupportedError(
            "tpm-emulator section", found[1].offset, "exactly one", f"{len(found)} candidates"
        )
    return found[0] if found else None
