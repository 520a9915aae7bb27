"""A bounds-checked, chunked cursor over bytes or a binary stream the caller opened.

Like :class:`evidence._reader.Reader`, but it never holds more than a chunk (plus one record)
of a stream in memory, and hands out page data as zero-copy ``memoryview`` slices: every refill
makes a new ``bytes`` object, so a slice stays valid after the cursor moves on.
"""

from __future__ import annotations

import struct
from typing import Protocol

from evidence.errors import ParseError, TruncatedError, UnsupportedError

__all__ = ["ChunkCursor", "ReadableStream"]

_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")


class ReadableStream(Protocol):
    """What the codecs need of a binary stream: ``read(n)`` returning at most ``n`` bytes."""

    def read(self, n: int = -1, /) -> bytes: ...


class ChunkCursor:
    """Cursor over ``src`` (bytes, or a stream read in ``chunk``-sized pieces).

    ``base`` is added to every offset reported in errors (the position of ``src`` in a file).
    """

    __slots__ = ("_base", "_buf", "_chunk", "_eof", "_pos", "_src")

    def __init__(
        self,
        src: bytes | bytearray | memoryview | ReadableStream,
        *,
        base: int = 0,
        chunk: int = 1 << 20,
    ) -> None:
        if isinstance(src, bytes | bytearray | memoryview):
            self._buf = bytes(src)
            self._src: ReadableStream | None = None
            self._eof = True
        else:
            if not callable(getattr(src, "read", None)):
                raise TypeError(f"need bytes or a binary stream, got {type(src).__name__}")
            self._buf = b""
            self._src = src
            self._eof = False
        self._pos = 0
        self._base = base
        self._chunk = chunk

    @property
    def offset(self) -> int:
        """Absolute offset of the next byte."""
        return self._base + self._pos

    def _fill(self, n: int, what: str) -> None:
        """Make at least ``n`` bytes available from the current position or raise."""
        have = len(self._buf) - self._pos
        if have >= n:
            return
        parts = [self._buf[self._pos :]]
        self._base += self._pos
        self._pos = 0
        while have < n and not self._eof:
            assert self._src is not None
            try:
                data = self._src.read(max(self._chunk, n - have))
            except (OSError, EOFError, ValueError) as err:
                # gzip/lzma/bz2 readers raise these for corrupt compressed data.
                raise ParseError(what, self._base + have, "readable data", str(err)) from err
            if not data:
                self._eof = True
                break
            parts.append(bytes(data))
            have += len(data)
        self._buf = b"".join(parts)
        if have < n:
            raise TruncatedError(what, self._base, f"{n} bytes", f"{have} bytes before the end")

    def at_end(self) -> bool:
        try:
            self._fill(1, "end")
        except TruncatedError:
            return True
        return False

    def peek_u8(self, what: str) -> int:
        self._fill(1, what)
        return self._buf[self._pos]

    def take(self, n: int, what: str) -> memoryview:
        """The next ``n`` bytes (zero-copy) or TruncatedError naming ``what``."""
        self._fill(n, what)
        start = self._pos
        self._pos += n
        return memoryview(self._buf)[start : start + n]

    def take_bytes(self, n: int, what: str) -> bytes:
        self._fill(n, what)
        start = self._pos
        self._pos += n
        return self._buf[start : start + n]

    def skip(self, n: int, what: str) -> None:
        while n > 0:
            step = min(n, self._chunk)
            self._fill(step, what)
            self._pos += step
            n -= step

    def u8(self, what: str) -> int:
        self._fill(1, what)
        self._pos += 1
        return self._buf[self._pos - 1]

    def u16be(self, what: str) -> int:
        self._fill(2, what)
        self._pos += 2
        return int(_U16.unpack_from(self._buf, self._pos - 2)[0])

    def u32be(self, what: str) -> int:
        self._fill(4, what)
        self._pos += 4
        return int(_U32.unpack_from(self._buf, self._pos - 4)[0])

    def u64be(self, what: str) -> int:
        self._fill(8, what)
        self._pos += 8
        return int(_U64.unpack_from(self._buf, self._pos - 8)[0])

    def read_rest(self, limit: int, what: str) -> bytes:
        """Everything up to the end, at most ``limit`` bytes (more raises UnsupportedError)."""
        parts = [self._buf[self._pos :]]
        have = len(parts[0])
        start = self.offset
        self._buf = b""
        while not self._eof:
            assert self._src is not None
            try:
                data = self._src.read(self._chunk)
            except (OSError, EOFError, ValueError) as err:
                raise ParseError(what, start + have, "readable data", str(err)) from err
            if not data:
                self._eof = True
                break
            parts.append(bytes(data))
            have += len(data)
            if have > limit:
                raise UnsupportedError(what, start, f"at most {limit} bytes", "more")
        self._base = start + have
        self._pos = 0
        return b"".join(parts)
