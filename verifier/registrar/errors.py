"""Errors the registrar raises, under the one tree of :mod:`evidence.errors`.

::

    VtpmError
    ├── ParseError                       a malformed registration request (field, expected, got)
    ├── RegistrarStateError              the state directory is missing, uninitialised or broken
    └── VerificationError
        └── RegistrationRefused          a host is not admitted; nothing is stored
            ├── EkCertificateRejected    EK certificate unparsable, expired, or from an unknown CA
            ├── EkPublicMismatch         the EK certificate certifies another key than the EK
            ├── AikAttributesRejected    the AIK is not a restricted, fixed, P-256 signing key
            ├── ActivationFailed         wrong secret returned (AIK not in the EK's TPM)
            ├── ChallengeRejected        unknown, already used, or expired challenge
            ├── CsrRejected              the mTLS certificate request is malformed or badly signed
            └── HostConflict             the host id or the EK is already admitted with another TPM

Each class has a stable dotted ``id``; the HTTPS API returns it as ``error.id``.
"""

from __future__ import annotations

from typing import ClassVar

from evidence.errors import VerificationError, VtpmError

__all__ = [
    "ActivationFailed",
    "AikAttributesRejected",
    "ChallengeRejected",
    "CsrRejected",
    "EkCertificateRejected",
    "EkPublicMismatch",
    "HostConflict",
    "RegistrarStateError",
    "RegistrationRefused",
]


class RegistrarStateError(VtpmError):
    """The registrar's state directory is missing, not initialised, or unreadable."""

    id: ClassVar[str] = "registrar.state"


class RegistrationRefused(VerificationError):
    """A host was not admitted. Nothing about it was stored."""

    id: ClassVar[str] = "registrar.refused"


class EkCertificateRejected(RegistrationRefused):
    """No EK certificate the host sent chains to the configured EK CA bundle."""

    id: ClassVar[str] = "registrar.ek_certificate"


class EkPublicMismatch(RegistrationRefused):
    """The EK certificate's public key is not the EK public area the host presented."""

    id: ClassVar[str] = "registrar.ek_mismatch"


class AikAttributesRejected(RegistrationRefused):
    """The AIK's TPMT_PUBLIC is not what an attestation key must be."""

    id: ClassVar[str] = "registrar.aik_attributes"


class ActivationFailed(RegistrationRefused):
    """The host did not recover the credential: its AIK is not in the TPM that holds the EK."""

    id: ClassVar[str] = "registrar.activation"


class ChallengeRejected(RegistrationRefused):
    """The challenge is unknown, was already answered, or has expired."""

    id: ClassVar[str] = "registrar.challenge"


class CsrRejected(RegistrationRefused):
    """The host's certificate signing request is malformed or its signature does not verify."""

    id: ClassVar[str] = "registrar.csr"


class HostConflict(RegistrationRefused):
    """The host id is admitted with another EK, or the EK is admitted under another host id."""

    id: ClassVar[str] = "registrar.host_conflict"
