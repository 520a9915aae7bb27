"""Page sources: the I/O around the pure codecs. Every source names pages ``(block, index)``.

=================  ======================================================================
source             how its pages are read
=================  ======================================================================
``pid:PID``        a live or paused QEMU's guest RAM memfd, found through ``/proc/PID/fd``
                   (``/memfd:memory-backend-memfd (deleted)``), read with ``pread`` and
                   ``SEEK_DATA``/``SEEK_HOLE`` (no ``mmap``: it would make every page of the
                   guest resident in our process, see platform-notes); block name = the
                   ``memory-backend=`` id on QEMU's command line (``pc.ram`` under libvirt)
migration stream   :mod:`.migstream` over the file (``QEVM`` magic)
libvirt save image :mod:`.saveimage` header, then the stream, decompressed on the fly for
                   gzip, bzip2, xz (standard library) and zstd (``zstandard``, if installed)
ELF core           :mod:`.elfdump`; the main RAM block mapped from guest-physical addresses
raw file           the whole file is one block; holes of a sparse file are zero pages
=================  ======================================================================
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import IO, Any

from evidence.errors import ParseError, UnsupportedError
from host_agent.errors import MemorySourceError
from host_agent.memory import elfdump, hasher, migstream, saveimage
from host_agent.memory.merkle import PAGE_SIZE, Extent, LeafSet
from host_agent.memory.migstream import TpmEmulatorState

__all__ = [
    "HashResult",
    "detect_kind",
    "file_extents",
    "find_qemu_memfd",
    "hash_source",
    "parse_qemu_memory_args",
]

DEFAULT_BLOCK = "pc.ram"
_MEMFD_LINK = "/memfd:memory-backend-memfd"


@dataclass(frozen=True)
class HashResult:
    """Leaves of a source plus what was learned on the way."""

    source: str
    kind: str
    leaves: LeafSet
    seconds: float
    notes: tuple[str, ...] = ()
    tpm_state: TpmEmulatorState | None = field(default=None, repr=False)


_REFUSED_MAGICS = {
    b"KDUMP   ": "a kdump-compressed dump (use dump-guest-memory format elf)",
    b"makedumpfile": "a flattened makedumpfile dump (use dump-guest-memory format elf)",
    b"PAGEDU64": "a Windows crash dump (use dump-guest-memory format elf)",
}


def detect_kind(head: bytes) -> str:
    """``save-image``, ``stream``, ``elf`` or ``raw`` from a file's first bytes.

    Raises:
        UnsupportedError: a dump format we do not read (kdump, flattened, Windows), which would
            otherwise pass for raw memory.
    """
    for magic, what in _REFUSED_MAGICS.items():
        if head.startswith(magic):
            raise UnsupportedError("memory source", 0, "save image, stream, ELF or raw", what)
    if head[:12] == b"LibvirtQemud":
        return "save-image"
    if head[:4] == b"QEVM":
        return "stream"
    if head[:4] == elfdump.ELF_MAGIC:
        return "elf"
    return "raw"


def file_extents(fd: int, block: str, start: int, length: int) -> Iterator[Extent]:
    """Extents of ``length`` bytes at ``start`` of ``fd``, holes found with SEEK_DATA/SEEK_HOLE.

    Hole boundaries are rounded to pages (a partial page is read, never assumed zero).
    """
    pos, end = start, start + length
    while pos < end:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as err:
            if err.errno == errno.ENXIO:  # only a hole up to EOF
                data = end
            elif err.errno == errno.EINVAL:  # no SEEK_DATA support: everything is data
                data = pos
            else:
                raise
        data = min(end, start + (data - start) // PAGE_SIZE * PAGE_SIZE)
        if data > pos:
            yield Extent(block, (pos - start) // PAGE_SIZE, (data - pos) // PAGE_SIZE, None)
            pos = data
        if pos >= end:
            break
        try:
            hole = os.lseek(fd, pos, os.SEEK_HOLE)
        except OSError:
            hole = end
        hole = min(end, start + -(-(hole - start) // PAGE_SIZE) * PAGE_SIZE)
        if hole <= pos:
            hole = min(end, pos + PAGE_SIZE)
        yield Extent(block, (pos - start) // PAGE_SIZE, (hole - pos) // PAGE_SIZE, pos)
        pos = hole


def _size_of(fd: int) -> int:
    return os.fstat(fd).st_size


def _qemu_backends(pid: int) -> tuple[str | None, dict[str, int]]:
    """The ``memory-backend=`` id and the sizes of memfd backends from QEMU's command line."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            args = [a.decode("utf-8", "replace") for a in f.read().split(b"\x00")]
    except OSError:
        return None, {}
    return parse_qemu_memory_args(args)


def parse_qemu_memory_args(args: Sequence[str]) -> tuple[str | None, dict[str, int]]:
    """From QEMU's arguments: the main ``memory-backend=`` id, and ``{id: size}`` of every
    ``memory-backend-memfd`` object, in QEMU's ``key=value,…`` form or libvirt's JSON form."""
    main: str | None = None
    sizes: dict[str, int] = {}
    for arg in args:
        m = re.search(r"(?:^|,)memory-backend=([^,]+)", arg)
        if m:
            main = m.group(1)
        opts: dict[str, Any] = {}
        if arg.startswith("{"):
            with contextlib.suppress(ValueError):
                loaded = json.loads(arg)
                opts = loaded if isinstance(loaded, dict) else {}
        elif arg.startswith("memory-backend-memfd,"):
            opts = dict(kv.split("=", 1) for kv in arg.split(",") if "=" in kv)
            opts["qom-type"] = "memory-backend-memfd"
        if opts.get("qom-type") == "memory-backend-memfd" and "id" in opts:
            sizes[str(opts["id"])] = _parse_size(opts.get("size"))
    return main, sizes


def _parse_size(v: object) -> int:
    if isinstance(v, int):
        return v
    s = str(v or "0").strip()
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    if s and s[-1].upper() in mult:
        return int(float(s[:-1]) * mult[s[-1].upper()])
    try:
        return int(s)
    except ValueError:
        return 0


def find_qemu_memfd(pid: int, *, size: int | None = None) -> tuple[str, str, int]:
    """Find the guest-RAM memfd of QEMU process ``pid``.

    Returns ``(path under /proc, block name, size)``. With several memfds the one whose size
    matches the main memory backend (or ``size``) is chosen.

    Raises:
        MemorySourceError: no such process, no memfd, or no unambiguous choice.
    """
    spec = f"pid:{pid}"
    fd_dir = f"/proc/{pid}/fd"
    try:
        names = os.listdir(fd_dir)
    except OSError as err:
        raise MemorySourceError(spec, f"cannot list {fd_dir}: {err.strerror}") from err
    found: list[tuple[str, int]] = []
    for n in names:
        path = f"{fd_dir}/{n}"
        try:
            if os.readlink(path).startswith(_MEMFD_LINK):
                found.append((path, os.stat(path).st_size))
        except OSError:
            continue
    if not found:
        raise MemorySourceError(
            spec,
            "no memfd-backed guest RAM (expected a /memfd:memory-backend-memfd fd; libvirt: "
            "<memoryBacking><source type='memfd'/><access mode='shared'/>)",
        )
    main, sizes = _qemu_backends(pid)
    want = size if size is not None else sizes.get(main or "")
    cands = [c for c in found if want is None or c[1] == want] if want else found
    if len(cands) != 1:
        raise MemorySourceError(
            spec,
            f"{len(found)} memfds of sizes {sorted(s for _, s in found)}; "
            "cannot tell which is the main RAM (give its size)",
        )
    return cands[0][0], main or DEFAULT_BLOCK, cands[0][1]


class _Opened:
    def __init__(self, spec: str, path: str) -> None:
        self.spec = spec
        try:
            self.file: IO[bytes] = open(path, "rb")  # noqa: SIM115 - closed by close()
        except OSError as err:
            raise MemorySourceError(spec, f"cannot open: {err.strerror}") from err

    def close(self) -> None:
        self.file.close()


class _Decompressed:
    """A decompressing reader whose codec errors become :class:`ParseError` (with the offset
    reached in the compressed file), so a corrupt image never escapes as a foreign exception."""

    def __init__(
        self, reader: Any, raw: IO[bytes], errors: tuple[type[BaseException], ...], name: str
    ) -> None:
        self._reader = reader
        self._raw = raw
        self._errors = errors
        self._name = name

    def read(self, n: int = -1) -> bytes:
        try:
            return bytes(self._reader.read(n))
        except self._errors as err:
            try:
                at = self._raw.tell()
            except OSError:
                at = 0
            raise ParseError(
                f"{self._name} data", at, f"a valid {self._name} stream", str(err) or repr(err)
            ) from err


def _decompressor(fmt: saveimage.SaveFormat, f: IO[bytes], spec: str) -> Any:
    if fmt is saveimage.SaveFormat.RAW:
        return f
    # Imported here: minimal Pythons (the test guest's) may lack the compression modules.
    base_errors: tuple[type[BaseException], ...] = (OSError, EOFError, ValueError)
    if fmt is saveimage.SaveFormat.GZIP:
        import gzip
        import zlib

        return _Decompressed(
            gzip.GzipFile(fileobj=f, mode="rb"), f, (*base_errors, zlib.error), "gzip"
        )
    if fmt is saveimage.SaveFormat.BZIP2:
        import bz2

        return _Decompressed(bz2.BZ2File(f, "rb"), f, base_errors, "bzip2")
    if fmt is saveimage.SaveFormat.XZ:
        import lzma

        return _Decompressed(lzma.LZMAFile(f, "rb"), f, (*base_errors, lzma.LZMAError), "xz")
    if fmt is saveimage.SaveFormat.ZSTD:
        try:
            import zstandard
        except ImportError as err:
            raise MemorySourceError(
                spec, "zstd-compressed save image: install the 'zstandard' package (host extra)"
            ) from err
        reader = zstandard.ZstdDecompressor().stream_reader(f, read_across_frames=True)
        return _Decompressed(reader, f, (*base_errors, zstandard.ZstdError), "zstd")
    raise UnsupportedError("save image format", 28, "raw, gzip, bzip2, xz or zstd", fmt.name)


def hash_source(
    spec: str,
    *,
    blocks: Sequence[str] | None = None,
    block_name: str | None = None,
    ram_size: int | None = None,
    workers: int | None = None,
    progress: hasher.Progress | None = None,
) -> HashResult:
    """Hash a source given as a path or ``pid:PID``.

    Args:
        spec: a file (kind detected from its magic) or ``pid:PID``.
        blocks: keep only these RAM blocks (all of the source's blocks when ``None``).
        block_name: name of the one block of a raw file, ELF core or memfd (default: the
            memory backend id for ``pid:``, ``pc.ram`` otherwise).
        ram_size: the main RAM size for an ELF core (inferred when ``None``).

    Raises:
        MemorySourceError: the source cannot be found or read.
        ParseError: the source is malformed (TruncatedError/UnsupportedError included).
        MemoryLayoutMismatch: a requested block is absent.
    """
    t0 = time.perf_counter()
    notes: list[str] = []
    tpm: TpmEmulatorState | None = None
    if spec == "-":
        import sys

        kind = "stream"
        leaves, tpm = _hash_qemu_stream(sys.stdin.buffer, spec, notes, workers, progress)
    elif spec.startswith("pid:"):
        try:
            pid = int(spec[4:])
        except ValueError as err:
            raise MemorySourceError(spec, "expected pid:<number>") from err
        path, name, size = find_qemu_memfd(pid)
        name = block_name or name
        kind = "memfd"
        src = _Opened(spec, path)
        try:
            fd = src.file.fileno()
            if size % PAGE_SIZE:
                raise MemorySourceError(spec, f"memfd size {size} is not a multiple of 4096")
            leaves = hasher.hash_extents(
                fd,
                [(name, size // PAGE_SIZE)],
                file_extents(fd, name, 0, size),
                source=spec,
                workers=workers,
                progress=progress,
            )
        finally:
            src.close()
    else:
        src = _Opened(spec, spec)
        try:
            f = src.file
            fd = f.fileno()
            head = f.read(4096)
            kind = detect_kind(head)
            if kind == "raw":
                size = _size_of(fd)
                if size % PAGE_SIZE:
                    raise UnsupportedError(
                        "raw memory file", size, "a multiple of 4096 bytes", f"{size} bytes"
                    )
                name = block_name or DEFAULT_BLOCK
                leaves = hasher.hash_extents(
                    fd,
                    [(name, size // PAGE_SIZE)],
                    file_extents(fd, name, 0, size),
                    source=spec,
                    workers=workers,
                    progress=progress,
                )
            elif kind == "elf":
                need = elfdump.elf_headers_size(head)
                if need > 64 << 20:
                    raise ParseError("ELF headers", 0, "at most 64 MiB of headers", str(need))
                f.seek(0)
                core = elfdump.parse_elf_core(f.read(need), file_size=_size_of(fd))
                ram = elfdump.main_ram_extents(core, block_name or DEFAULT_BLOCK, ram_size=ram_size)
                if ram.uncovered_pages:
                    notes.append(
                        f"{ram.uncovered_pages} pages of {ram.block} not in the dump "
                        "(taken as zero)"
                    )
                leaves = hasher.hash_extents(
                    fd,
                    [(ram.block, ram.pages)],
                    ram.extents,
                    source=spec,
                    workers=workers,
                    progress=progress,
                )
            else:
                f.seek(0)
                leaves, tpm = _hash_qemu_stream(f, spec, notes, workers, progress)
                if block_name is not None:
                    raise MemorySourceError(
                        spec, "--block-name applies to raw, ELF and pid sources"
                    )
        finally:
            src.close()
    if blocks:
        leaves = leaves.select(blocks)
    return HashResult(spec, kind, leaves, time.perf_counter() - t0, tuple(notes), tpm)


class _Prefixed:
    """``prefix`` then the rest of ``f``: lets a pipe be sniffed without seeking."""

    def __init__(self, prefix: bytes, f: Any) -> None:
        self._prefix = prefix
        self._f = f

    def read(self, n: int = -1) -> bytes:
        if self._prefix:
            if n < 0:
                out, self._prefix = self._prefix + self._f.read(), b""
                return bytes(out)
            out, self._prefix = self._prefix[:n], self._prefix[n:]
            return out
        return bytes(self._f.read(n))


def _read_exact(f: Any, n: int) -> bytes:
    parts, have = [], 0
    while have < n:
        chunk = f.read(n - have)
        if not chunk:
            break
        parts.append(chunk)
        have += len(chunk)
    return b"".join(parts)


def _hash_qemu_stream(
    f: Any,
    spec: str,
    notes: list[str],
    workers: int | None,
    progress: hasher.Progress | None,
) -> tuple[LeafSet, TpmEmulatorState | None]:
    """A migration stream or a libvirt save image read sequentially (a file or a pipe, e.g.
    ``migrate "exec:tee IMAGE | vtpm-host memory hash -"`` to hash while QEMU saves)."""
    head = _read_exact(f, saveimage.HEADER_SIZE)
    kind = detect_kind(head)
    base = 0
    stream: Any
    if kind == "save-image":
        data_len = min(_peek_data_len(head), 65 << 20)
        head += _read_exact(f, data_len)
        hdr = saveimage.parse_save_image_header(head)
        base = hdr.stream_offset
        notes.append(f"libvirt save image, format {hdr.format.name.lower()}")
        stream = _decompressor(hdr.format, f, spec)
        if hdr.format is not saveimage.SaveFormat.RAW:
            base = 0
            notes.append("error offsets are in the decompressed stream")
    elif kind == "stream":
        stream = _Prefixed(head, f)
    else:
        raise MemorySourceError(
            spec, f"a {kind} source must be a file (only streams and save images can be piped)"
        )
    events = migstream.iter_migration_stream(stream, base=base)
    return hasher.hash_stream_events(events, workers=workers, progress=progress)


def _peek_data_len(first: bytes) -> int:
    """data_len of a save image header, in whichever byte order the header is."""
    if len(first) < saveimage.HEADER_SIZE:
        return 0
    le = int.from_bytes(first[16:20], "little")
    if le <= 2:
        return int.from_bytes(first[20:24], "little")
    return int.from_bytes(first[20:24], "big")
