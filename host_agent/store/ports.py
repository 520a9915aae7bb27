"""What the store needs from the host TPM, as ports the ``HostTpm`` adapter satisfies.

The store never sees tpm2-pytss: it hands raw bytes to a :class:`DataKeySealer` and asks a
:class:`RollbackCounter` about one NV monotonic counter. ``host_agent.tpm``'s adapter satisfies
both structurally (the same object is passed twice); a test may wrap it to inject faults.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, runtime_checkable

__all__ = ["DataKeySealer", "RandomBytes", "RollbackCounter", "StoreTpm"]

RandomBytes = Callable[[int], bytes]
"""``n -> n`` random bytes; the daemon edge passes ``secrets.token_bytes``."""


@runtime_checkable
class DataKeySealer(Protocol):
    """Seals the store's data key to the host TPM and unseals it into this process only."""

    def seal(self, data: bytes) -> bytes:
        """Seal ``data`` (at most 128 bytes) and return an opaque blob safe to write to disk.

        Raises:
            VtpmError: the TPM refused (wrapped by the adapter).
        """
        ...

    def unseal(self, blob: bytes) -> bytes:
        """Return the data sealed in ``blob``.

        Raises:
            VtpmError: the blob is not from this TPM, or the sealing policy is not satisfied.
        """
        ...


@runtime_checkable
class RollbackCounter(Protocol):
    """A TPM NV monotonic counter (``TPM_NT_COUNTER``) at an NV index.

    A counter starts at an arbitrary value (TPM 2.0 initialises a new counter to the highest
    value any counter on that TPM ever had), so the store records the value it found rather than
    assuming zero.
    """

    def counter_define(self, index: int) -> int:
        """Define the counter at ``index`` if missing, make it readable, return its value.

        Raises:
            VtpmError: the index holds something else, or the TPM refused.
        """
        ...

    def counter_read(self, index: int) -> int:
        """Current value of the counter at ``index``.

        Raises:
            VtpmError: no counter is defined there (or it was never incremented).
        """
        ...

    def counter_increment(self, index: int) -> int:
        """Increment the counter at ``index`` and return its new value.

        Raises:
            VtpmError: the TPM refused.
        """
        ...


@runtime_checkable
class StoreTpm(DataKeySealer, RollbackCounter, Protocol):
    """Both ports in one object, as the ``HostTpm`` adapter provides them."""
