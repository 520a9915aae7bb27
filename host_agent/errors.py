"""Host-side errors, all derived from the one tree in :mod:`evidence.errors`.

::

    VtpmError
    ├── ParseError
    │   └── LeafFileError             a saved leaf file is malformed (bad magic, root mismatch …)
    ├── VerificationError
    │   └── MemoryMismatch(pages)     two page sets differ; names the differing page ranges
    ├── MemoryLayoutMismatch          two leaf sets cover different RAM blocks or block sizes
    ├── MemorySourceError(source)     a page source cannot be found, opened or read (wraps OSError)
    ├── StateError(state, required)   a long-lived object (swtpm, bridge, migration) was asked to
    │                                 do something its run state does not allow
    └── SwtpmError(vm)                a VM's swtpm could not be provisioned, started or stopped
        └── SwtpmProvisionError       swtpm_setup failed (EK certificates, encrypted state)

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
    "StateError",
    "SwtpmError",
    "SwtpmProvisionError",
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


class StateError(VtpmError):
    """An operation was asked of a long-lived object in a run state that does not allow it.

    Args:
        state: the object's current run state (its enum value).
        required: the run states the operation needs.
        what: the object and operation (``"swtpm 1b4e…: start()"``).
    """

    id: ClassVar[str] = "state.invalid"

    def __init__(self, state: str, required: Iterable[str], what: str = "") -> None:
        self.state = state
        self.required = tuple(required)
        prefix = f"{what}: " if what else ""
        wanted = ", ".join(map(repr, self.required))
        super().__init__(f"{prefix}run state is {state!r}, this needs one of {wanted}")


class SwtpmError(VtpmError):
    """A VM's swtpm could not be provisioned, started or stopped (wraps ``OSError`` once).

    Args:
        vm: the VM's UUID.
        message: what failed, with swtpm's own words (log tail) where it gave any.
    """

    id: ClassVar[str] = "vtpm.swtpm"

    def __init__(self, vm: str, message: str) -> None:
        self.vm = vm
        super().__init__(f"swtpm of VM {vm}: {message}")


class SwtpmProvisionError(SwtpmError):
    """``swtpm_setup`` failed to manufacture the vTPM (EK, EK certificate, encrypted state)."""

    id: ClassVar[str] = "vtpm.swtpm.provision"
