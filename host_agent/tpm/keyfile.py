"""The host keys' wrapped blobs on disk: ``<tpm state_dir>/host_keys.json``.

Only wrapped material is written (TPMT_PUBLIC, TPM2B_PRIVATE encrypted under the SRK, the key's
policy), so the file is no secret; it is still written atomically (temp file, fsync, rename) and
kept owner-only, since losing it means re-creating and re-registering the host keys.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

from .errors import KeyBlobError, TpmError
from .port import WrappedKey

__all__ = ["HOST_KEYS_FILE", "HostKeyFile"]

HOST_KEYS_FILE = "host_keys.json"


class HostKeyFile:
    """Read and write the ``{"aik": WrappedKey, "authkey": WrappedKey}`` map in ``directory``."""

    def __init__(self, directory: Path) -> None:
        self.path = Path(directory) / HOST_KEYS_FILE

    def read(self) -> dict[str, WrappedKey]:
        """All stored host keys (empty before ``init``).

        Raises:
            KeyBlobError: the file is not a host key map.
            TpmError: the file cannot be read.
        """
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return {}
        except OSError as err:
            raise TpmError(f"cannot read {self.path}: {err}") from err
        try:
            obj = json.loads(raw)
        except ValueError as err:
            raise KeyBlobError(f"{self.path}: not JSON ({err})") from err
        if not isinstance(obj, dict) or not set(obj) <= {"aik", "authkey"}:
            raise KeyBlobError(f"{self.path}: expected an object with keys aik, authkey")
        return {k: WrappedKey.from_bytes(json.dumps(v).encode()) for k, v in obj.items()}

    def write(self, host_keys: Mapping[str, WrappedKey]) -> None:
        obj = {k: json.loads(v.to_bytes()) for k, v in host_keys.items()}
        tmp = self.path.with_suffix(".tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump(obj, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except OSError as err:
            raise TpmError(f"cannot write {self.path}: {err}") from err
