"""Migration stream, libvirt save image and ELF core codecs on hand-built and hostile inputs.

The streams here are built by :class:`StreamBuilder` following protocols.md §4 (a hand-made
stand-in for QEMU's writer; the real QEMU streams are exercised in tests/vm/test_memory_qemu.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from evidence.errors import ParseError, TruncatedError, UnsupportedError
from host_agent.memory import elfdump, saveimage
from host_agent.memory.hasher import hash_stream_events
from host_agent.memory.merkle import ZERO_LEAF, leaf_hash
from host_agent.memory.migstream import (
    DeviceStateStart,
    PageRun,
    RamBlocks,
    TpmEmulatorState,
    iter_migration_stream,
)

PAGE = 4096


def _page(i: int) -> bytes:
    return hashlib.sha256(b"p%d" % i).digest() * (PAGE // 32)


class StreamBuilder:
    """Writes a QEVM stream: header, configuration, one ram section, device sections, EOF."""

    def __init__(self, blocks: list[tuple[str, int]], *, config: bytes | None = None) -> None:
        self.out = bytearray(struct.pack(">II", 0x5145564D, 3))
        if config is None:
            config = b"\x07" + struct.pack(">I", 17) + b"pc-i440fx-7.2-xyz"
        self.out += config
        self.blocks = blocks
        self.last: str | None = None

    def start_ram(self, section_id: int = 2) -> StreamBuilder:
        self.out += b"\x01" + struct.pack(">I", section_id) + b"\x03ram" + struct.pack(">II", 0, 4)
        total = sum(n for _, n in self.blocks)
        self.out += struct.pack(">Q", total | 0x04)
        for name, used in self.blocks:
            self.out += bytes([len(name)]) + name.encode() + struct.pack(">Q", used)
        return self.eos(section_id)

    def part(self, section_id: int = 2, kind: int = 0x02) -> StreamBuilder:
        self.out += bytes([kind]) + struct.pack(">I", section_id)
        return self

    def record(self, block: str, offset: int, flags: int, payload: bytes) -> StreamBuilder:
        cont = block == self.last
        self.out += struct.pack(">Q", offset | flags | (0x20 if cont else 0))
        if not cont:
            self.out += bytes([len(block)]) + block.encode()
        self.out += payload
        self.last = block
        return self

    def page(self, block: str, index: int, data: bytes) -> StreamBuilder:
        return self.record(block, index * PAGE, 0x08, data)

    def zero(self, block: str, index: int, fill: int = 0) -> StreamBuilder:
        return self.record(block, index * PAGE, 0x02, bytes([fill]))

    def eos(self, section_id: int = 2) -> StreamBuilder:
        self.out += struct.pack(">Q", 0x10) + b"\x7e" + struct.pack(">I", section_id)
        return self

    def tpm(self, blobs: tuple[bytes, bytes, bytes], section_id: int = 9) -> StreamBuilder:
        self.out += b"\x04" + struct.pack(">I", 7) + b"\x05timer" + struct.pack(">II", 0, 2)
        self.out += bytes(24) + b"\x7e" + struct.pack(">I", 7)
        self.out += b"\x04" + struct.pack(">I", section_id) + b"\x0ctpm-emulator"
        self.out += struct.pack(">II", 0, 0)
        for i, b in enumerate(blobs):
            self.out += struct.pack(">II", i, len(b)) + b
        self.out += b"\x7e" + struct.pack(">I", section_id)
        return self

    def end(self) -> bytes:
        self.out += b"\x00"
        return bytes(self.out)


def _sample() -> bytes:
    s = StreamBuilder([("pc.ram", 8 * PAGE), ("pc.bios", 2 * PAGE)]).start_ram()
    s.part()
    for i in range(4):
        s.page("pc.ram", i, _page(i))
    s.zero("pc.ram", 4).page("pc.bios", 1, _page(100)).zero("pc.ram", 5, fill=0xAB)
    s.eos().part()
    s.page("pc.ram", 2, _page(22))  # re-sent page: the later copy wins
    s.eos()
    s.part(kind=0x03).eos()
    return s.tpm((b"perm", b"volatile", b"")).end()


def test_stream_events_and_last_record_wins() -> None:
    data = _sample()
    events = list(iter_migration_stream(data))
    assert isinstance(events[0], RamBlocks)
    assert [b.name for b in events[0].blocks] == ["pc.ram", "pc.bios"]
    runs = [e for e in events if isinstance(e, PageRun)]
    assert runs[0].block == "pc.ram" and runs[0].first == 0 and len(runs[0].pages) == 5
    assert runs[0].pages[4] is None
    assert isinstance(events[-2], DeviceStateStart) and events[-2].idstr == "timer"
    tpm = events[-1]
    assert isinstance(tpm, TpmEmulatorState)
    assert (tpm.permanent, tpm.volatile, tpm.savestate) == (b"perm", b"volatile", b"")
    leaves, tpm2 = hash_stream_events(iter_migration_stream(io.BytesIO(data)), workers=2)
    assert tpm2 == tpm
    ram = leaves.block("pc.ram")
    assert ram.leaf(2) == leaf_hash(_page(22))
    assert ram.leaf(4) == ZERO_LEAF and ram.leaf(7) == ZERO_LEAF
    assert ram.leaf(5) == leaf_hash(b"\xab" * PAGE)
    assert leaves.block("pc.bios").leaf(1) == leaf_hash(_page(100))


def test_stream_read_in_small_chunks_gives_the_same_events() -> None:
    data = _sample()

    class Trickle(io.RawIOBase):
        def __init__(self) -> None:
            self.pos = 0

        def read(self, n: int = -1) -> bytes:
            chunk = data[self.pos : self.pos + min(n, 7)]
            self.pos += len(chunk)
            return chunk

    a = hash_stream_events(iter_migration_stream(data))
    b = hash_stream_events(iter_migration_stream(Trickle()))
    assert a == b


@pytest.mark.parametrize(
    ("flag", "payload"),
    [(0x40, b"\x01\x00\x04abcd"), (0x100, b"\x00\x00\x00\x01x"), (0x80, b""), (0x01, b"")],
)
def test_unsupported_page_encodings_are_refused_with_offset(flag: int, payload: bytes) -> None:
    s = StreamBuilder([("pc.ram", PAGE)]).start_ram().part()
    at = len(s.out)
    data = s.record("pc.ram", 0, flag, payload).eos().end()
    with pytest.raises(UnsupportedError) as err:
        list(iter_migration_stream(data))
    assert err.value.offset == at


def test_block_migration_section_is_refused() -> None:
    s = StreamBuilder([("pc.ram", PAGE)]).start_ram()
    at = len(s.out)
    s.out += b"\x01" + struct.pack(">I", 3) + b"\x05block" + struct.pack(">II", 0, 1)
    with pytest.raises(UnsupportedError) as err:
        list(iter_migration_stream(s.end()))
    assert err.value.offset == at and "block" in str(err.value)


def test_capabilities_in_configuration_are_refused() -> None:
    cfg = b"\x07" + struct.pack(">I", 2) + b"pc" + b"\x05\x1aconfiguration/capabilities"
    cfg += struct.pack(">II", 1, 1) + b"\x0fx-ignore-shared"
    data = StreamBuilder([("pc.ram", PAGE)], config=cfg).start_ram().end()
    with pytest.raises(UnsupportedError, match="x-ignore-shared"):
        list(iter_migration_stream(data))


def test_every_truncation_raises_a_parse_error() -> None:
    data = _sample()
    device_state = data.index(b"\x04\x00\x00\x00\x07\x05timer")
    for cut in [*range(0, device_state, 13), len(data) - 1]:
        with pytest.raises(ParseError):
            list(iter_migration_stream(data[:cut]))
    # The cut inside the RAM section is reported as truncation, at the end of the input.
    with pytest.raises(TruncatedError) as err:
        list(iter_migration_stream(data[:200]))
    assert err.value.offset <= 200


def test_ambiguous_tpm_section_is_refused() -> None:
    data = _sample()
    tail_start = data.index(b"\x04\x00\x00\x00\x09\x0ctpm-emulator")
    section = data[tail_start:-1]
    with pytest.raises(UnsupportedError, match="candidates"):
        list(iter_migration_stream(data[:-1] + section + b"\x00"))


def _consume(data: bytes) -> None:
    with contextlib.suppress(ParseError):
        hash_stream_events(iter_migration_stream(data), workers=1)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_stream_mutations_raise_only_parse_errors(draw: st.DataObject) -> None:
    data = bytearray(_sample())
    for _ in range(draw.draw(st.integers(1, 4))):
        i = draw.draw(st.integers(0, len(data) - 1))
        data[i] = draw.draw(st.integers(0, 255))
    _consume(bytes(data))


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_stream_garbage_raises_only_parse_errors(blob: bytes) -> None:
    _consume(blob)
    _consume(b"QEVM\x00\x00\x00\x03" + blob)


# --- libvirt save image header ------------------------------------------------------------


def test_save_image_header_round_trip_and_both_byte_orders() -> None:
    img = saveimage.encode_save_image_header(
        "<domain/>", format=saveimage.SaveFormat.XZ, cookie="<cookie/>", padding=100
    )
    hdr = saveimage.parse_save_image_header(img)
    assert hdr.xml == "<domain/>" and hdr.cookie == "<cookie/>"
    assert hdr.format is saveimage.SaveFormat.XZ and hdr.little_endian
    assert hdr.stream_offset == len(img)
    be = img[:16] + struct.pack(">5I", *struct.unpack_from("<5I", img, 16)) + img[36:]
    hdr_be = saveimage.parse_save_image_header(be)
    assert not hdr_be.little_endian and hdr_be.xml == "<domain/>"


def test_save_image_lzop_and_partial_are_refused_clearly() -> None:
    lzop = saveimage.encode_save_image_header("<d/>", format=saveimage.SaveFormat.LZOP)
    with pytest.raises(UnsupportedError, match="lzop"):
        saveimage.parse_save_image_header(lzop)
    part = b"LibvirtQemudPart" + saveimage.encode_save_image_header("<d/>")[16:]
    with pytest.raises(UnsupportedError):
        saveimage.parse_save_image_header(part)
    assert saveimage.parse_save_image_header(part, allow_partial=True).partial


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.integers(0, 200))
def test_save_image_garbage_raises_only_parse_errors(blob: bytes, at: int) -> None:
    good = bytearray(saveimage.encode_save_image_header("<domain/>", cookie="<c/>"))
    for data in (blob, bytes(good[: at % len(good)]) + blob):
        with contextlib.suppress(ParseError):
            saveimage.parse_save_image_header(data)


# --- ELF cores ----------------------------------------------------------------------------


def _elf(segments: list[tuple[int, int]], machine: int = 62) -> bytes:
    """An ELF64 core like dump-guest-memory's: PT_NOTE, then one PT_LOAD per (gpa, size)."""
    phnum = 1 + len(segments)
    off = 64 + phnum * 56
    eh = b"\x7fELF\x02\x01\x01" + bytes(9)
    eh += struct.pack("<HHIQQQIHHHHHH", 4, machine, 1, 0, 64, 0, 0, 64, 56, phnum, 0, 0, 0)
    ph = struct.pack("<IIQQQQQQ", 4, 0, off, 0, 0, 8, 8, 0)
    data_off = off + 8
    body = b""
    for gpa, size in segments:
        ph += struct.pack("<IIQQQQQQ", 1, 0, data_off + len(body), gpa, gpa, size, size, 0)
        body += bytes([gpa >> 20 & 0xFF]) * size
    return eh + ph + bytes(8) + body


def test_elf_core_maps_low_and_high_ram_to_block_offsets() -> None:
    four_g = 1 << 32
    data = _elf([(0, 0xA000), (0xB000, 0x1000), (four_g, 0x2000), (0xFFFC0000, 0x1000)])
    core = elfdump.parse_elf_core(data[: elfdump.elf_headers_size(data)], file_size=len(data))
    assert len(core.loads) == 4
    ram = elfdump.main_ram_extents(core, "pc.ram", below_4g=0xC000)
    assert ram.pages == 0xE
    assert ram.uncovered_pages == 1  # GPA 0xa000 is not in the dump
    assert [(e.first_page, e.pages) for e in ram.extents] == [(0, 10), (11, 1), (12, 2)]
    assert ram.extents[2].file_offset == core.loads[2].offset
    assert ram.unmapped == ((0xFFFC0000, 0x1000),)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_elf_mutations_raise_only_parse_errors(draw: st.DataObject) -> None:
    data = bytearray(_elf([(0, 0x3000), (1 << 32, 0x1000)]))
    for _ in range(draw.draw(st.integers(1, 3))):
        i = draw.draw(st.integers(0, 64 + 3 * 56))
        data[i] = draw.draw(st.integers(0, 255))
    raw = bytes(data)
    try:
        core = elfdump.parse_elf_core(raw[: elfdump.elf_headers_size(raw)], file_size=len(raw))
        elfdump.main_ram_extents(core)
    except ParseError:
        pass


def test_block_name_with_nul_is_a_parse_error() -> None:
    """Found by hypothesis: a NUL in a block name reached the leaf builder as a ValueError."""
    data = bytearray(_sample())
    data[data.index(b"pc.ram")] = 0
    with pytest.raises(ParseError, match="without NUL"):
        hash_stream_events(iter_migration_stream(bytes(data)))
