"""Host-side errors, all derived from the one tree in :mod:`evidence.errors`.

::

    VtpmError
    ├── ParseError
    │   └── LeafFileError             a saved leaf file is malformed (bad magic, root mismatch …)
    ├── VerificationError
    │   └── MemoryMismatch(pages)     two page sets differ; names the differing page ranges
    ├── MemoryLayoutMismatch          two leaf sets cover different RAM blocks or block sizes
    └── MemorySourceError(source)     a page source cannot be found, opened or read (wraps OSError)

Foreign errors (``OSError``) are wrapped once, where they enter, with ``raise … from err``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import ClassVar

from evidence.errors import ParseError, VerificationError, VtpmError

__all__ = [
    "LeafFileError",
    "MemoryLayoutMismatch",
    "MemoryMismatch",
    "MemorySourceError",
]


class LeafFileError(ParseError):
    """A saved leaf file is malformed or its stored root does not match its leaves."""

    id: ClassVar[str] = "parse.memory.leaf_file"


class MemoryMismatch(VerificationError):
    """Guest memory differs from a reference.

    Args:
        message: what was compared, expected and computed roots.
        pages: inclusive ranges ``(first, last)`` of differing page numbers.
    """

    id: ClassVar[str] = "verify.memory.mismatch"

    def __init__(self, message: str, pages: Iterable[tuple[int, int]] = ()) -> None:
        self.pages = tuple((int(a), int(b)) for a, b in pages)
        super().__init__(message)


class MemoryLayoutMismatch(VtpmError):
    """Two leaf sets cannot be compared page by page: their RAM blocks or sizes differ."""

    id: ClassVar[str] = "memory.layout_mismatch"


class MemorySourceError(VtpmError):
    """A page source cannot be found, opened or read.

    Args:
        source: the source as the user named it (path, ``pid:N``).
        message: what went wrong.
    """

    id: ClassVar[str] = "memory.source"

    def __init__(self, source: str, message: str) -> None:
        self.source = source
        super().__init__(f"{source}: {message}")
