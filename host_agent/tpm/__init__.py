"""The host TPM: discovery, the software root, host keys and TPM operations.

The port (:class:`HostTpm`) and its data types speak bytes and our dataclasses; tpm2-pytss is
imported only by the adapter modules (``adapter`` and its bases ``_migration``, ``_hot``,
``_storage``, ``_objects`` and ``_connection``; ``keys``, ``policies``), which callers reach through
:func:`host_agent.tpm.discovery.open_host_tpm`.
"""

from __future__ import annotations

from .errors import (
    KeyBlobError,
    PlatformStateNotApproved,
    PolicyNotApproved,
    SoftwareRootError,
    TpmCommandError,
    TpmError,
    TpmNotFound,
    TpmObjectMemoryFull,
)
from .port import (
    AUTHKEY_PCRS,
    VAIK_POLICY_REF,
    Attestation,
    Certification,
    DuplicationBlob,
    HostKeyReport,
    HostTpm,
    KeyPolicy,
    KeyRef,
    WrappedKey,
)

__all__ = [
    "AUTHKEY_PCRS",
    "VAIK_POLICY_REF",
    "Attestation",
    "Certification",
    "DuplicationBlob",
    "HostKeyReport",
    "HostTpm",
    "KeyBlobError",
    "KeyPolicy",
    "KeyRef",
    "PlatformStateNotApproved",
    "PolicyNotApproved",
    "SoftwareRootError",
    "TpmCommandError",
    "TpmError",
    "TpmNotFound",
    "TpmObjectMemoryFull",
    "WrappedKey",
]
