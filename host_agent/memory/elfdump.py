"""ELF64 core dumps from QEMU ``dump-guest-memory`` (libvirt core dump with MEMORY_ONLY).

Layout (QEMU ``dump/dump.c``, protocols.md §5): ``Elf64_Ehdr`` (ET_CORE), one ``PT_NOTE``, one
``PT_LOAD`` per guest-physical RAM range (``p_paddr`` = guest-physical address, ``p_offset`` =
where its bytes are in the file, ``p_filesz == p_memsz`` unless filtered); with more than 0xfffe
program headers ``e_phnum`` is ``PN_XNUM`` and section header 0's ``sh_info`` holds the count.

**From guest-physical addresses to page identity.** A migration stream and a memfd name pages
``(RAM block, offset)``; an ELF dump names guest-physical addresses (GPAs). On x86 ``pc``/``q35``
the main RAM block (``pc.ram``, or the memory backend's id) is mapped at GPA
``[0, below_4g)`` with block offset == GPA, and its remainder at GPA ``[4 GiB, 4 GiB + above_4g)``
with block offset ``below_4g + (GPA - 4 GiB)`` (QEMU ``hw/i386/pc_piix.c``/``pc_q35.c``:
``below_4g`` is the whole RAM when it fits under the PCI hole, otherwise 3 GiB on ``pc`` and
2 GiB on ``q35``). :func:`main_ram_extents` applies that mapping: ``below_4g`` is taken from the
caller or inferred as the end of the highest RAM range below 0xe0000000, ``above_4g`` as the RAM
at or above 4 GiB. Ranges elsewhere (BIOS ROM at 0xfffc0000, the TPM CRB buffer) belong to other
RAM blocks and are reported as unmapped.

Caveats, both fail-safe (they make roots differ, never agree wrongly): a block page that no
``PT_LOAD`` covers (e.g. behind a VGA window at 0xa0000) is counted as uncovered and taken as
zero; and GPA 0xc0000-0xfffff shows whatever the PAM registers map there, which is ROM, not
``pc.ram``, until the firmware shadows it (i.e. in a VM paused before its first instruction).
"""

from __future__ import annotations

import itertools
import struct
from dataclasses import dataclass

from evidence.errors import ParseError, TruncatedError, UnsupportedError
from host_agent.memory.merkle import PAGE_SIZE, Extent

__all__ = [
    "ELF_MAGIC",
    "ElfCore",
    "LoadSegment",
    "MainRamMap",
    "elf_headers_size",
    "main_ram_extents",
    "parse_elf_core",
]

ELF_MAGIC = b"\x7fELF"
_EHDR_SIZE = 64
_PHDR_SIZE = 56
_SHDR_SIZE = 64
_PT_LOAD = 1
_PT_NOTE = 4
_ET_CORE = 4
_EM_386 = 3  # QEMU writes EM_386 when the guest CPU is not in long mode
_EM_X86_64 = 62
_PN_XNUM = 0xFFFF
_MAX_PHDRS = 1 << 20
_FOUR_GIB = 1 << 32
_LOW_RAM_LIMIT = 0xE0000000


@dataclass(frozen=True)
class LoadSegment:
    paddr: int
    vaddr: int
    offset: int
    filesz: int
    memsz: int


@dataclass(frozen=True)
class ElfCore:
    """The program headers of a guest-memory ELF core (untrusted)."""

    little_endian: bool
    machine: int
    loads: tuple[LoadSegment, ...]
    notes: tuple[tuple[int, int], ...]


def _ehdr(data: bytes) -> tuple[str, tuple[int, ...]]:
    if len(data) < _EHDR_SIZE:
        raise TruncatedError("ELF header", 0, f"{_EHDR_SIZE} bytes", f"{len(data)} bytes")
    if data[:4] != ELF_MAGIC:
        raise ParseError("ELF magic", 0, "7f 45 4c 46", data[:4].hex(" "))
    if data[4] != 2:
        raise UnsupportedError("ELF class", 4, "ELFCLASS64 (2)", str(data[4]))
    if data[5] not in (1, 2):
        raise ParseError("ELF data encoding", 5, "1 (LSB) or 2 (MSB)", str(data[5]))
    if data[6] != 1:
        raise ParseError("ELF version", 6, "1", str(data[6]))
    end = "<" if data[5] == 1 else ">"
    # e_type e_machine e_version e_entry e_phoff e_shoff e_flags e_ehsize e_phentsize e_phnum
    # e_shentsize e_shnum e_shstrndx
    fields = struct.unpack_from(end + "HHIQQQIHHHHHH", data, 16)
    return end, fields


def elf_headers_size(head: bytes) -> int:
    """How many bytes from the start of the file :func:`parse_elf_core` needs.

    Args:
        head: at least the first 64 bytes.
    """
    _end, f = _ehdr(head)
    e_phoff, e_shoff, e_phnum = f[4], f[5], f[9]
    need = _EHDR_SIZE
    if e_phnum == _PN_XNUM:
        need = max(need, e_shoff + _SHDR_SIZE)
        return min(need, 1 << 40)
    return max(need, e_phoff + e_phnum * _PHDR_SIZE)


def parse_elf_core(data: bytes, *, file_size: int | None = None) -> ElfCore:
    """Parse the ELF header and program headers of a guest-memory core.

    Args:
        data: the start of the file, at least :func:`elf_headers_size` bytes (with ``PN_XNUM``,
            at least up to the end of the program headers too).
        file_size: the file's size, to check that segments lie inside it.

    Raises:
        TruncatedError: headers beyond ``data``; a segment beyond ``file_size``.
        UnsupportedError: not ELFCLASS64, not ET_CORE, a segment with p_filesz != p_memsz.
        ParseError: any other malformation, with its offset.
    """
    end, f = _ehdr(data)
    e_type, machine, _ver, _entry, e_phoff, e_shoff = f[:6]
    e_phentsize, e_phnum, e_shentsize = f[8], f[9], f[10]
    if e_type != _ET_CORE:
        raise UnsupportedError("ELF e_type", 16, "ET_CORE (4)", str(e_type))
    if e_phentsize != _PHDR_SIZE:
        raise ParseError("ELF e_phentsize", 54, str(_PHDR_SIZE), str(e_phentsize))
    if e_phnum == _PN_XNUM:
        if e_shentsize != _SHDR_SIZE:
            raise ParseError("ELF e_shentsize", 58, str(_SHDR_SIZE), str(e_shentsize))
        if e_shoff + _SHDR_SIZE > len(data):
            raise TruncatedError("ELF section header 0", e_shoff, f"{_SHDR_SIZE} bytes", "less")
        e_phnum = struct.unpack_from(end + "I", data, e_shoff + 44)[0]
        if e_phnum > _MAX_PHDRS:
            raise ParseError("ELF sh_info (phnum)", e_shoff + 44, f"<= {_MAX_PHDRS}", str(e_phnum))
    if e_phoff + e_phnum * _PHDR_SIZE > len(data):
        raise TruncatedError(
            "ELF program headers", e_phoff, f"{e_phnum * _PHDR_SIZE} bytes", "fewer"
        )
    loads: list[LoadSegment] = []
    notes: list[tuple[int, int]] = []
    for i in range(e_phnum):
        at = e_phoff + i * _PHDR_SIZE
        p_type, _flags, off, vaddr, paddr, filesz, memsz, _align = struct.unpack_from(
            end + "IIQQQQQQ", data, at
        )
        if p_type not in (_PT_LOAD, _PT_NOTE):
            continue
        if filesz and file_size is not None and off + filesz > file_size:
            raise TruncatedError(
                "ELF segment", at, f"{filesz} bytes at {off}", f"a file of {file_size} bytes"
            )
        if p_type == _PT_NOTE:
            notes.append((off, filesz))
            continue
        if filesz != memsz:
            raise UnsupportedError(
                "ELF PT_LOAD",
                at,
                "p_filesz == p_memsz (an unfiltered dump)",
                f"filesz {filesz}, memsz {memsz}",
            )
        if paddr + memsz > 1 << 52:
            raise ParseError("ELF PT_LOAD p_paddr", at, "a guest-physical address", hex(paddr))
        loads.append(LoadSegment(paddr, vaddr, off, filesz, memsz))
    spans = sorted((s.paddr, s.paddr + s.memsz) for s in loads if s.memsz)
    for (_a0, a1), (b0, _b1) in itertools.pairwise(spans):
        if b0 < a1:
            raise ParseError("ELF PT_LOAD", e_phoff, "non-overlapping segments", hex(b0))
    return ElfCore(end == "<", machine, tuple(loads), tuple(notes))


@dataclass(frozen=True)
class MainRamMap:
    """Where the main RAM block's pages are in an ELF core."""

    block: str
    below_4g: int
    above_4g: int
    extents: tuple[Extent, ...]
    uncovered_pages: int
    unmapped: tuple[tuple[int, int], ...]

    @property
    def pages(self) -> int:
        return (self.below_4g + self.above_4g) // PAGE_SIZE


def main_ram_extents(
    core: ElfCore,
    block: str = "pc.ram",
    *,
    below_4g: int | None = None,
    ram_size: int | None = None,
) -> MainRamMap:
    """Map an x86 ``pc``/``q35`` core's RAM segments to pages of the main RAM block.

    Args:
        core: the parsed core.
        block: the main RAM block's name (``pc.ram`` under libvirt; the memory backend id).
        below_4g: RAM size mapped below 4 GiB; inferred when ``None`` (module docstring).
        ram_size: the block's size; inferred when ``None``.

    Raises:
        UnsupportedError: a RAM segment that is not page-aligned.
    """
    if core.machine not in (_EM_386, _EM_X86_64):
        raise UnsupportedError(
            "ELF e_machine", 18, "EM_386 or EM_X86_64 (x86 pc/q35)", str(core.machine)
        )
    low_spans = [s for s in core.loads if s.paddr < _LOW_RAM_LIMIT and s.memsz]
    high_spans = [s for s in core.loads if s.paddr >= _FOUR_GIB and s.memsz]
    if below_4g is None:
        below_4g = max((min(s.paddr + s.memsz, _LOW_RAM_LIMIT) for s in low_spans), default=0)
        if ram_size is not None:
            below_4g = min(below_4g, ram_size)
    if ram_size is None:
        ram_size = below_4g + max((s.paddr + s.memsz - _FOUR_GIB for s in high_spans), default=0)
    above_4g = ram_size - below_4g
    if below_4g % PAGE_SIZE or above_4g % PAGE_SIZE or above_4g < 0:
        raise UnsupportedError("ELF RAM layout", 0, "page-aligned RAM sizes", hex(ram_size))
    windows = [(0, below_4g, 0)]
    if above_4g:
        windows.append((_FOUR_GIB, above_4g, below_4g))
    extents: list[Extent] = []
    unmapped: list[tuple[int, int]] = []
    covered = 0
    for seg in sorted(core.loads, key=lambda s: s.paddr):
        if not seg.memsz:
            continue
        start, stop = seg.paddr, seg.paddr + seg.memsz
        mapped = 0
        for gpa0, length, base in windows:
            lo, hi = max(start, gpa0), min(stop, gpa0 + length)
            if lo >= hi:
                continue
            if lo % PAGE_SIZE or hi % PAGE_SIZE:
                raise UnsupportedError("ELF PT_LOAD", 0, "page-aligned RAM", f"{lo:#x}-{hi:#x}")
            pages = (hi - lo) // PAGE_SIZE
            extents.append(
                Extent(block, (base + lo - gpa0) // PAGE_SIZE, pages, seg.offset + lo - start)
            )
            covered += pages
            mapped += hi - lo
        if mapped < seg.memsz:
            unmapped.append((start, seg.memsz))
    return MainRamMap(
        block, below_4g, above_4g, tuple(extents), ram_size // PAGE_SIZE - covered, tuple(unmapped)
    )
