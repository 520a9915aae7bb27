"""Errors of the migration protocol (host-to-host move of a vAIK).

Every refusal *before any key leaves* the source is a :class:`TargetRefused` subclass, raised by
:func:`host_agent.migration.verify.verify_exgkey_offer`; each names what was expected and what
the target sent::

    VtpmError
    ├── ParseError
    │   └── FrameError                 migration.frame: a peer frame is malformed
    └── MigrationError                 migration.failed
        ├── TargetRefused              migration.target (refused before anything left)
        │   ├── TargetNotAdmitted      .not_admitted       AIK cert not from the fleet CA
        │   ├── TargetIdentityMismatch .identity           AIK cert names another mTLS peer
        │   ├── CertExgKeyInvalid      .certify            signature/type/Name wrong
        │   │   └── CertExgKeyNonce    .nonce              CertExgKey over another nonce
        │   ├── ExgKeyAttributes       .exgkey_attributes  not a fixed restricted storage key
        │   └── ExgKeyPolicy           .exgkey_policy      not an approved host state
        ├── PeerProtocolError          migration.peer.protocol  (the peer broke the protocol)
        ├── PeerUnavailable            migration.peer.unavailable (connect/TLS/IO failed)
        ├── PeerAborted                migration.peer.aborted   (the peer said no, with its reason)
        ├── VaikNotMovable             migration.vaik.not_movable (no active vAIK for this VM here)
        ├── VaikRefused                migration.vaik.refused (the target: not a vAIK)
        ├── RecordRefused              migration.record.refused (record.py: VM state vetoed)
        ├── PullNotHere                migration.pull.not_here (a pulled peer has no such vAIK)
        ├── PullRefused                migration.pull.refused (the source will not join)
        └── MigrationInDoubt           migration.in_doubt (the outcome is not known yet)
"""

from __future__ import annotations

from typing import ClassVar

from evidence.errors import ParseError, VtpmError

__all__ = [
    "CertExgKeyInvalid",
    "CertExgKeyNonce",
    "ExgKeyAttributes",
    "ExgKeyPolicy",
    "FrameError",
    "MigrationError",
    "MigrationInDoubt",
    "PeerAborted",
    "PeerProtocolError",
    "PeerUnavailable",
    "PullNotHere",
    "PullRefused",
    "TargetIdentityMismatch",
    "TargetNotAdmitted",
    "TargetRefused",
    "VaikNotMovable",
    "VaikRefused",
]


class FrameError(ParseError):
    """A peer frame does not parse (length, header JSON, blob table)."""

    id: ClassVar[str] = "migration.frame"


class MigrationError(VtpmError):
    """A migration failed or was refused."""

    id: ClassVar[str] = "migration.failed"


class TargetRefused(MigrationError):
    """The source refuses the target before any key left (a check of CertExgKey failed).

    Attributes:
        expected, got: what the check needed and what the target sent.
    """

    id: ClassVar[str] = "migration.target"

    def __init__(self, message: str, expected: str = "", got: str = "") -> None:
        self.expected = expected
        self.got = got
        text = message
        if expected or got:
            text += f" (expected {expected}, got {got})"
        super().__init__(text)


class TargetNotAdmitted(TargetRefused):
    """The target's AIK certificate does not chain to the fleet CA."""

    id: ClassVar[str] = "migration.target.not_admitted"


class TargetIdentityMismatch(TargetRefused):
    """The AIK certificate names another host than the authenticated mTLS peer."""

    id: ClassVar[str] = "migration.target.identity"


class CertExgKeyInvalid(TargetRefused):
    """CertExgKey is not a TPM2_Certify by the target's AIK over the offered ExgKey."""

    id: ClassVar[str] = "migration.target.certify"


class CertExgKeyNonce(CertExgKeyInvalid):
    """CertExgKey was made over another nonce than the one this source sent (a replay)."""

    id: ClassVar[str] = "migration.target.nonce"


class ExgKeyAttributes(TargetRefused):
    """The ExgKey is not a fixedTPM, fixedParent, restricted decrypt storage key."""

    id: ClassVar[str] = "migration.target.exgkey_attributes"


class ExgKeyPolicy(TargetRefused):
    """The ExgKey's authPolicy does not bind it to a fleet-approved host platform state."""

    id: ClassVar[str] = "migration.target.exgkey_policy"


class PeerProtocolError(MigrationError):
    """The peer sent something the protocol does not allow at this point."""

    id: ClassVar[str] = "migration.peer.protocol"


class PeerUnavailable(MigrationError):
    """The peer could not be reached, the TLS handshake failed, or the connection broke."""

    id: ClassVar[str] = "migration.peer.unavailable"


class PeerAborted(MigrationError):
    """The peer ended the migration with an error frame (its id and message are kept)."""

    id: ClassVar[str] = "migration.peer.aborted"

    def __init__(self, remote_id: str, message: str) -> None:
        self.remote_id = remote_id
        super().__init__(f"the peer refused [{remote_id}]: {message}")


class VaikRefused(MigrationError):
    """The target refuses what arrived as a vAIK: not a restricted, movable signing key whose
    authPolicy is the vAIK policy its duplication blob claims."""

    id: ClassVar[str] = "migration.vaik.refused"


class VaikNotMovable(MigrationError):
    """There is no vAIK this host may move for that VM (none, or already moving/pending)."""

    id: ClassVar[str] = "migration.vaik.not_movable"


class PullNotHere(MigrationError):
    """A pulled-from host holds no vAIK of the VM (or no such VM): ask the next peer."""

    id: ClassVar[str] = "migration.pull.not_here"


class PullRefused(MigrationError):
    """A source refused a target's pull (no libvirt migration of the VM under way here, no
    daemon to move a running VM, the VM being moved already)."""

    id: ClassVar[str] = "migration.pull.refused"


class MigrationInDoubt(MigrationError):
    """The outcome is not known yet (the peer is unreachable in a state only it can settle)."""

    id: ClassVar[str] = "migration.in_doubt"
