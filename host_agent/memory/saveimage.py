"""libvirt save image header codec (``virsh save``, managedsave, external memory snapshots).

``virQEMUSaveHeader`` from libvirt ``src/qemu/qemu_saveimage.h`` (protocols.md §4.3), 92 bytes in
the **native endianness of the host that wrote it** (a reader that sees a version above 2
byte-swaps, as ``qemuSaveImageBswapHeader`` does)::

    char     magic[16];     "LibvirtQemudSave" ("LibvirtQemudPart" while still being written)
    uint32_t version;       2
    uint32_t data_len;      bytes of domain XML + cookie + zero padding that follow the header
    uint32_t was_running;   1 if the domain was running
    uint32_t format;        0 raw, 1 gzip, 2 bzip2, 3 xz, 4 lzop, 5 zstd, 6 sparse (mapped-ram)
    uint32_t cookieOffset;  offset of the cookie inside data (0 = none)
    uint32_t unused[14];

The QEMU migration stream (compressed with ``format``) starts at ``92 + data_len``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

from evidence.errors import ParseError, TruncatedError, UnsupportedError

__all__ = [
    "HEADER_SIZE",
    "MAGIC_PARTIAL",
    "MAGIC_SAVE",
    "SaveFormat",
    "SaveImageHeader",
    "encode_save_image_header",
    "parse_save_image_header",
]

HEADER_SIZE = 92
MAGIC_SAVE = b"LibvirtQemudSave"
MAGIC_PARTIAL = b"LibvirtQemudPart"
_MAX_DATA_LEN = 64 << 20


class SaveFormat(IntEnum):
    """``virQEMUSaveFormat`` (libvirt ``qemu_saveimage_format.h``)."""

    RAW = 0
    GZIP = 1
    BZIP2 = 2
    XZ = 3
    LZOP = 4
    ZSTD = 5
    SPARSE = 6


@dataclass(frozen=True)
class SaveImageHeader:
    """A parsed header; ``xml`` and ``cookie`` are untrusted text from the image."""

    partial: bool
    version: int
    data_len: int
    was_running: bool
    format: SaveFormat
    cookie_offset: int
    little_endian: bool
    xml: str
    cookie: str | None

    @property
    def stream_offset(self) -> int:
        """Where the (possibly compressed) QEMU migration stream starts."""
        return HEADER_SIZE + self.data_len


def _cstr(data: bytes, start: int, what: str, base: int) -> str:
    end = data.find(b"\x00", start)
    if end < 0:
        raise ParseError(what, base + start, "a NUL-terminated string", "no NUL")
    raw = data[start:end]
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ParseError(what, base + start, "UTF-8 text", "undecodable bytes") from err


def parse_save_image_header(data: bytes, *, allow_partial: bool = False) -> SaveImageHeader:
    """Parse the header and its XML/cookie data.

    Args:
        data: at least the first ``92 + data_len`` bytes of the image (more is ignored).
        allow_partial: accept "LibvirtQemudPart" (an image still being written).

    Raises:
        TruncatedError: fewer than 92 + data_len bytes.
        UnsupportedError: a version other than 2, lzop or sparse format, or a partial image.
        ParseError: bad magic, a cookie offset outside the data, an XML that is not text.
    """
    if len(data) < HEADER_SIZE:
        raise TruncatedError("save image header", 0, f"{HEADER_SIZE} bytes", f"{len(data)} bytes")
    magic = data[:16]
    if magic not in (MAGIC_SAVE, MAGIC_PARTIAL):
        raise ParseError("save image magic", 0, repr(MAGIC_SAVE), repr(magic))
    if magic == MAGIC_PARTIAL and not allow_partial:
        raise UnsupportedError(
            "save image magic", 0, repr(MAGIC_SAVE), "an image still being written (Part)"
        )
    little = True
    fields = struct.unpack_from("<5I", data, 16)
    if fields[0] > 2:
        swapped = struct.unpack_from(">5I", data, 16)
        if swapped[0] <= 2:
            little, fields = False, swapped
    version, data_len, was_running, fmt, cookie_offset = fields
    if version != 2:
        raise UnsupportedError("save image version", 16, "2", str(version))
    if data_len > _MAX_DATA_LEN:
        raise ParseError("save image data_len", 20, f"at most {_MAX_DATA_LEN}", str(data_len))
    if was_running not in (0, 1):
        raise ParseError("save image was_running", 24, "0 or 1", str(was_running))
    try:
        format_ = SaveFormat(fmt)
    except ValueError as err:
        raise UnsupportedError("save image format", 28, "0..6", str(fmt)) from err
    if format_ is SaveFormat.LZOP:
        raise UnsupportedError(
            "save image format",
            28,
            "raw, gzip, bzip2, xz or zstd",
            "lzop (no Python decompressor; re-save with save_image_format=raw or xz)",
        )
    if format_ is SaveFormat.SPARSE:
        raise UnsupportedError(
            "save image format", 28, "raw, gzip, bzip2, xz or zstd", "sparse (mapped-ram)"
        )
    if len(data) < HEADER_SIZE + data_len:
        raise TruncatedError(
            "save image data", HEADER_SIZE, f"{data_len} bytes", f"{len(data) - HEADER_SIZE}"
        )
    body = data[HEADER_SIZE : HEADER_SIZE + data_len]
    if cookie_offset and cookie_offset >= data_len:
        raise ParseError("save image cookieOffset", 32, f"below {data_len}", str(cookie_offset))
    xml = _cstr(body, 0, "save image domain XML", HEADER_SIZE)
    if cookie_offset and cookie_offset <= len(xml.encode("utf-8")):
        raise ParseError("save image cookieOffset", 32, "after the domain XML", str(cookie_offset))
    cookie = _cstr(body, cookie_offset, "save image cookie", HEADER_SIZE) if cookie_offset else None
    return SaveImageHeader(
        partial=magic == MAGIC_PARTIAL,
        version=version,
        data_len=data_len,
        was_running=bool(was_running),
        format=format_,
        cookie_offset=cookie_offset,
        little_endian=little,
        xml=xml,
        cookie=cookie,
    )


def encode_save_image_header(
    xml: str,
    *,
    format: SaveFormat = SaveFormat.RAW,
    was_running: bool = False,
    cookie: str | None = None,
    padding: int = 0,
) -> bytes:
    """Header + data as libvirt writes them on a little-endian host (for tests and tooling)."""
    body = xml.encode("utf-8") + b"\x00"
    cookie_offset = 0
    if cookie is not None:
        cookie_offset = len(body)
        body += cookie.encode("utf-8") + b"\x00"
    body += bytes(padding)
    head = (
        MAGIC_SAVE
        + struct.pack("<5I", 2, len(body), int(was_running), int(format), cookie_offset)
        + bytes(56)
    )
    return head + body
