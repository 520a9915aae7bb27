"""The per-VM swtpm state-encryption key (ARCHITECTURE.md §5, invariant 5).

Each VM gets one random 256-bit AES key, generated the first time its swtpm starts. The key
itself is never written anywhere: the host TPM seals it (``HostTpm.seal``) and only the sealed
blob is kept (today a file in the VM's directory, ``statekey.sealed``; later a store record,
behind the same :class:`SealedKeyStore` port). At every start the blob is unsealed in this
process and the key is written into a pipe whose read end swtpm inherits::

    swtpm socket … --key fd=N,mode=aes-256-cbc,format=binary          (swtpm 0.7.1)
    swtpm_setup  … --keyfile-fd N --cipher aes-256-cbc   (64 hex digits; it passes
                                                          ``--key fd=N,mode=aes-256-cbc`` on)

so the key exists only in this process (briefly, in a ``bytearray`` wiped after use), in the
kernel's pipe buffer, and in swtpm. swtpm encrypts ``tpm2-00.permall`` and the other state
files with it (blob header flags ``ENCRYPTED | ENCRYPTED_256BIT_KEY``).

This does *not* cover the state blobs QEMU pulls over the control channel on save, snapshot and
migration: QEMU asks with ``PTM_STATE_FLAG_DECRYPTED``, so those blobs are plaintext unless swtpm
also gets a ``--migration-key`` (docs/NOTES.md, "swtpm state key").
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol, runtime_checkable

from host_agent.errors import SwtpmError

__all__ = [
    "SEALED_KEY_NAME",
    "STATE_KEY_BYTES",
    "STATE_KEY_CIPHER",
    "FileSealedKeyStore",
    "SealedKeyStore",
    "StateKeySealer",
    "hex_key",
    "key_pipe",
    "load_or_create_state_key",
    "wipe",
]

#: Size of a VM's state key: AES-256.
STATE_KEY_BYTES = 32
#: swtpm's name for the cipher (``--key …,mode=``, ``swtpm_setup --cipher``).
STATE_KEY_CIPHER = "aes-256-cbc"
#: File name of the sealed key in a VM's directory.
SEALED_KEY_NAME = "statekey.sealed"

_HEX = tuple(f"{b:02x}".encode() for b in range(256))


@runtime_checkable
class StateKeySealer(Protocol):
    """Seals a VM's state key to the host TPM (``HostTpm`` satisfies it structurally)."""

    def seal(self, data: bytes) -> bytes:
        """Seal ``data`` and return an opaque blob safe to write to disk.

        Raises:
            VtpmError: the TPM refused (wrapped by the adapter).
        """
        ...

    def unseal(self, blob: bytes) -> bytes:
        """Return the data sealed in ``blob``.

        Raises:
            VtpmError: the blob is not from this TPM, or its policy is not satisfied.
        """
        ...


class SealedKeyStore(Protocol):
    """Where the sealed state keys of the VMs are kept (the blobs are safe at rest)."""

    def load(self, vm: str) -> bytes | None:
        """The sealed key of VM ``vm``, or None if it has none yet.

        Raises:
            SwtpmError: it exists but cannot be read.
        """
        ...

    def save(self, vm: str, blob: bytes) -> None:
        """Keep ``blob`` as the sealed key of VM ``vm``, durably, replacing any earlier one.

        Raises:
            SwtpmError: it cannot be written.
        """
        ...

    def delete(self, vm: str) -> None:
        """Forget the sealed key of VM ``vm`` (no error if it has none).

        Raises:
            SwtpmError: it cannot be removed.
        """
        ...


class FileSealedKeyStore:
    """Sealed keys as ``<vtpm_dir>/<uuid>/statekey.sealed`` (mode 0600, written atomically).

    Args:
        vtpm_dir: the directory holding one directory per VM UUID.
    """

    def __init__(self, vtpm_dir: Path) -> None:
        self.vtpm_dir = Path(vtpm_dir)

    def path(self, vm: str) -> Path:
        return self.vtpm_dir / vm / SEALED_KEY_NAME

    def load(self, vm: str) -> bytes | None:
        try:
            return self.path(vm).read_bytes()
        except FileNotFoundError:
            return None
        except OSError as err:
            raise SwtpmError(
                vm, f"cannot read the sealed state key {self.path(vm)}: {err}"
            ) from err

    def save(self, vm: str, blob: bytes) -> None:
        path = self.path(vm)
        tmp = path.with_name(path.name + ".tmp")
        try:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                _write_all(fd, blob)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
            dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as err:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise SwtpmError(vm, f"cannot write the sealed state key {path}: {err}") from err

    def delete(self, vm: str) -> None:
        path = self.path(vm)
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        except OSError as err:
            raise SwtpmError(vm, f"cannot remove the sealed state key {path}: {err}") from err


def load_or_create_state_key(
    vm: str,
    sealer: StateKeySealer,
    store: SealedKeyStore,
    random_bytes: Callable[[int], bytes],
    *,
    may_create: bool,
) -> bytearray:
    """Unseal VM ``vm``'s state key, or make, seal and keep a new one.

    Args:
        vm: the VM's UUID.
        sealer: the host TPM.
        store: where the sealed key lives.
        random_bytes: ``n -> n`` random bytes (the daemon edge passes ``secrets.token_bytes``).
        may_create: False when a state already exists on disk: a new key could not read it.

    Returns:
        The key, in a ``bytearray`` the caller wipes (:func:`wipe`) once swtpm has it.

    Raises:
        SwtpmError: no key but a state exists, a key of the wrong size, or the store failed.
        VtpmError: the host TPM refused to seal or unseal (from the TPM adapter).
    """
    blob = store.load(vm)
    if blob is None:
        if not may_create:
            raise SwtpmError(
                vm,
                "the VM has an encrypted vTPM state but no sealed state key; the state cannot be "
                "read without it (restore the key, or remove the state to start a new vTPM)",
            )
        key = bytearray(random_bytes(STATE_KEY_BYTES))
        if len(key) != STATE_KEY_BYTES:
            raise ValueError(f"random_bytes({STATE_KEY_BYTES}) returned {len(key)} bytes")
        store.save(vm, sealer.seal(bytes(key)))
        return key
    key = bytearray(sealer.unseal(blob))
    if len(key) != STATE_KEY_BYTES:
        got = len(key)
        wipe(key)
        raise SwtpmError(
            vm, f"the sealed state key holds {got} bytes, expected {STATE_KEY_BYTES} (AES-256)"
        )
    return key


def wipe(buf: bytearray) -> None:
    """Overwrite a key buffer with zeros (best effort: Python may hold other copies)."""
    buf[:] = bytes(len(buf))


def hex_key(key: bytearray) -> bytearray:
    """The key as lower-case hex digits, built in a ``bytearray`` the caller wipes."""
    out = bytearray(2 * len(key))
    for i, b in enumerate(key):
        out[2 * i : 2 * i + 2] = _HEX[b]
    return out


@contextlib.contextmanager
def key_pipe(data: bytearray) -> Iterator[int]:
    """A pipe holding ``data``; yields the read end for a child's ``pass_fds``.

    The write end is closed before the child starts, so the child reads ``data`` then EOF.
    The read end is closed in this process when the block ends.

    Raises:
        OSError: the pipe cannot be made or written (the caller wraps it).
    """
    r, w = os.pipe()
    try:
        try:
            _write_all(w, data)
        finally:
            os.close(w)
        yield r
    finally:
        os.close(r)


def _write_all(fd: int, data: bytes | bytearray) -> None:
    with memoryview(data) as view:
        done = 0
        while done < len(view):
            done += os.write(fd, view[done:])
