"""Errors of the host TPM port (subclasses of :class:`evidence.errors.VtpmError`).

::

    VtpmError
    └── TpmError                         host_agent.tpm: anything the host TPM port reports
        ├── TpmCommandError(rc, command) a TPM/TSS command failed (wraps TSS2_Exception, once)
        │   └── TpmObjectMemoryFull      the TPM ran out of transient object slots
        ├── PlatformStateNotApproved     PCR0-8 differ from the approved values: a PCR-bound key
        │                                (AuthKey, ExgKey, a vAIK's approval) is unusable
        ├── PolicyNotApproved            a vAIK approval does not match this key or this state
        ├── KeyBlobError                 a stored wrapped key / sealed blob is malformed
        ├── HostKeysMissing              AIK/AuthKey not created yet (run `vtpm-host init`)
        ├── TpmNotFound                  discovery found no TPM and the software root is off
        └── SoftwareRootError            the embedded swtpm could not be set up or started

Only the adapter (``host_agent.tpm.adapter``) and the software root catch foreign exceptions
(``TSS2_Exception``, ``OSError``, ``subprocess`` errors) and raise these, with ``from``.
"""

from __future__ import annotations

from typing import ClassVar

from evidence.errors import VtpmError

__all__ = [
    "HostKeysMissing",
    "KeyBlobError",
    "PlatformStateNotApproved",
    "PolicyNotApproved",
    "SoftwareRootError",
    "TpmCommandError",
    "TpmError",
    "TpmNotFound",
    "TpmObjectMemoryFull",
]


class TpmError(VtpmError):
    """Something the host TPM port reports."""

    id: ClassVar[str] = "tpm.error"


class TpmCommandError(TpmError):
    """A TPM command failed.

    Args:
        rc: the TSS2 return code (layer bits included).
        command: our name for the operation and the TPM command (``"certify: TPM2_Certify"``).
        detail: the decoded return code text.
    """

    id: ClassVar[str] = "tpm.command"

    def __init__(self, rc: int, command: str, detail: str = "") -> None:
        self.rc = rc
        self.command = command
        self.detail = detail
        text = f"{command} failed with rc 0x{rc:08x}"
        if detail:
            text += f" ({detail})"
        super().__init__(text)


class TpmObjectMemoryFull(TpmCommandError):
    """The TPM has no free transient object slot (a bug in our load/flush discipline)."""

    id: ClassVar[str] = "tpm.object_memory"


class PlatformStateNotApproved(TpmError):
    """The host's PCRs are not at the approved values, so a PCR-bound key cannot be used.

    Args:
        key: which key (``"AuthKey"``, ``"ExgKey"``, ``"vAIK"``).
        expected: the approved PCR composite (or policy) digest.
        got: the digest of the current values.
        pcrs: the PCR indices involved.
    """

    id: ClassVar[str] = "tpm.platform_state_not_approved"

    def __init__(self, key: str, expected: bytes, got: bytes, pcrs: tuple[int, ...]) -> None:
        self.key = key
        self.expected = expected
        self.got = got
        self.pcrs = pcrs
        sel = ",".join(str(p) for p in pcrs)
        super().__init__(
            f"{key} is unusable: host PCRs sha256:{sel} are not at their approved values "
            f"(approved digest {expected.hex()}, current {got.hex()}); the platform changed "
            "since the key was created or approved: re-approve this platform state "
            "(or re-run `vtpm-host init` to re-create host keys after a planned firmware change)"
        )


class PolicyNotApproved(TpmError):
    """A fleet approval does not authorize this use (wrong key, policyRef or platform state)."""

    id: ClassVar[str] = "tpm.policy_not_approved"


class KeyBlobError(TpmError):
    """A stored wrapped key or sealed blob is malformed (truncated, wrong magic, trailing bytes)."""

    id: ClassVar[str] = "tpm.key_blob"


class HostKeysMissing(TpmError):
    """AIK/AuthKey do not exist yet: run ``vtpm-host init``."""

    id: ClassVar[str] = "tpm.host_keys_missing"


class TpmNotFound(TpmError):
    """No TPM was configured or found, and the software root was not allowed."""

    id: ClassVar[str] = "tpm.not_found"


class SoftwareRootError(TpmError):
    """The embedded swtpm software root could not be provisioned, started or stopped."""

    id: ClassVar[str] = "tpm.software_root"
