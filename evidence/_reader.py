"""A bounds-checked cursor over untrusted bytes.

Every read names the structure being read, so a short input raises
:class:`~evidence.errors.TruncatedError` with the offset and what was expected there.
"""

from __future__ import annotations

import struct

from evidence.errors import ParseError, TruncatedError

__all__ = ["Reader"]

_U16BE = struct.Struct(">H")
_U32BE = struct.Struct(">I")
_U64BE = struct.Struct(">Q")
_U16LE = struct.Struct("<H")
_U32LE = struct.Struct("<I")
_U64LE = struct.Struct("<Q")


class Reader:
    """Cursor over ``data`` starting at ``offset``; ``base`` is added to offsets in errors."""

    __slots__ = ("_data", "_pos", "base")

    def __init__(self, data: bytes, offset: int = 0, *, base: int = 0) -> None:
        if not isinstance(data, bytes | bytearray | memoryview):
            raise TypeError(f"Reader needs bytes, got {type(data).__name__}")
        self._data = bytes(data)
        self._pos = offset
        self.base = base

    @property
    def offset(self) -> int:
        """Absolute offset of the next byte (including ``base``)."""
        return self.base + self._pos

    @property
    def pos(self) -> int:
        """Offset of the next byte inside this reader's data."""
        return self._pos

    @property
    def remaining(self) -> int:
        return len(self._data) - self._pos

    def at_end(self) -> bool:
        return self._pos >= len(self._data)

    def take(self, n: int, what: str) -> bytes:
        """Return the next ``n`` bytes or raise TruncatedError naming ``what``."""
        if n < 0:
            raise ParseError(what, self.offset, "a non-negative length", str(n))
        if n > self.remaining:
            raise TruncatedError(
                what, self.offset, f"{n} bytes", f"{self.remaining} bytes before the end"
            )
        out = self._data[self._pos : self._pos + n]
        self._pos += n
        return out

    def skip(self, n: int, what: str) -> None:
        self.take(n, what)

    def rest(self) -> bytes:
        out = self._data[self._pos :]
        self._pos = len(self._data)
        return out

    def sub(self, n: int, what: str) -> Reader:
        """A reader over the next ``n`` bytes (consumed here), keeping absolute offsets."""
        start = self.offset
        return Reader(self.take(n, what), base=start)

    def u8(self, what: str) -> int:
        return self.take(1, what)[0]

    def u16be(self, what: str) -> int:
        return int(_U16BE.unpack(self.take(2, what))[0])

    def u32be(self, what: str) -> int:
        return int(_U32BE.unpack(self.take(4, what))[0])

    def u64be(self, what: str) -> int:
        return int(_U64BE.unpack(self.take(8, what))[0])

    def u16le(self, what: str) -> int:
        return int(_U16LE.unpack(self.take(2, what))[0])

    def u32le(self, what: str) -> int:
        return int(_U32LE.unpack(self.take(4, what))[0])

    def u64le(self, what: str) -> int:
        return int(_U64LE.unpack(self.take(8, what))[0])

    def expect_end(self, what: str) -> None:
        """Raise ParseError if bytes are left over after a complete structure."""
        if not self.at_end():
            raise ParseError(what, self.offset, "end of data", f"{self.remaining} trailing bytes")
