"""The one error tree of vtpm-trust.

Every error we raise derives from :class:`VtpmError`; each class has a stable dotted ``id`` that
tests, operators and scripts match on (never the message text)::

    VtpmError                          every error we raise derives from it
    ├── ParseError(what, offset)       malformed input: never a traceback, never a partial result
    │   ├── TruncatedError             input ended inside a structure
    │   └── UnsupportedError           well-formed, but a variant we do not handle (not guessed)
    └── VerificationError
        ├── ChainError                 fleet CA → AIK cert → CertAuthKey → CertvAIK does not hold
        │                              (subclasses with their own ids: evidence/aik_cert.py,
        │                              evidence/verify.py)
        ├── SignatureError             wraps cryptography's InvalidSignature (per-certificate
        │                              subclasses in evidence/verify.py)
        ├── NonceMismatch
        ├── PcrDigestMismatch
        ├── HashAlgorithmNotAllowed
        └── ReplayError(invalid_pcrs)  a measurement list does not replay to the expected PCRs
                                       (EventLogReplayMismatch, ImaReplayMismatch in verify.py)

Subclasses outside evidence/, each in its package's ``errors`` module or beside its adapter:
host_agent/errors.py (StateError, SwtpmError, MemoryMismatch, LeafFileError …),
host_agent/tpm/errors.py (TpmError and TpmCommandError wrapping TSS2_Exception),
host_agent/store/errors.py (StoreError: integrity, rollback, busy),
host_agent/vtpm/bridge_errors.py (BridgeTransportError, SwtpmCtrlError …),
host_agent/lifecycle/ (HypervisorError wrapping libvirtError, RestoreRefused, SealError …),
verifier/registrar/errors.py (RegistrationRefused …). The dotted ids of what a tenant sees are
listed in docs/findings.md.

``host_agent/`` and ``verifier/`` add subclasses in their own ``errors`` modules. Misuse of our
API (wrong type, empty nonce) is ``TypeError``/``ValueError``; ``VtpmError`` is for bad input from
outside.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import ClassVar

__all__ = [
    "ChainError",
    "HashAlgorithmNotAllowed",
    "NonceMismatch",
    "ParseError",
    "PcrDigestMismatch",
    "ReplayError",
    "SignatureError",
    "TruncatedError",
    "UnsupportedError",
    "VerificationError",
    "VtpmError",
]


class VtpmError(Exception):
    """Root of every error vtpm-trust raises for bad input from outside."""

    id: ClassVar[str] = "vtpm.error"

    @property
    def message(self) -> str:
        return str(self)


class ParseError(VtpmError):
    """Malformed input.

    Args:
        what: the structure being parsed (``"TCG_PCR_EVENT2.digests"``).
        offset: byte offset in the input where the problem was found (line number for text formats,
            see ``unit``).
        expected: what the parser needed there.
        got: what it found, if that says more than the offset alone.
        unit: ``"offset"`` for binary input, ``"line"`` for line-oriented text.
    """

    id: ClassVar[str] = "parse.malformed"

    def __init__(
        self,
        what: str,
        offset: int,
        expected: str,
        got: str | None = None,
        *,
        unit: str = "offset",
    ) -> None:
        self.what = what
        self.offset = offset
        self.expected = expected
        self.got = got
        self.unit = unit
        text = f"{what} at {unit} {offset}: expected {expected}"
        if got is not None:
            text += f", got {got}"
        super().__init__(text)


class TruncatedError(ParseError):
    """The input ended inside a structure."""

    id: ClassVar[str] = "parse.truncated"


class UnsupportedError(ParseError):
    """Well-formed input of a variant we do not handle; reported, never guessed."""

    id: ClassVar[str] = "parse.unsupported"


class VerificationError(VtpmError):
    """Evidence is well-formed but does not prove what it claims."""

    id: ClassVar[str] = "verify.failed"


class ChainError(VerificationError):
    """The certificate chain fleet CA → AIK certificate → CertAuthKey → CertvAIK does not hold."""

    id: ClassVar[str] = "verify.chain"


class SignatureError(VerificationError):
    """A signature does not verify under the key it claims."""

    id: ClassVar[str] = "verify.signature"


class NonceMismatch(VerificationError):
    """The evidence answers another nonce than the one the verifier sent."""

    id: ClassVar[str] = "verify.nonce"


class PcrDigestMismatch(VerificationError):
    """A PCR digest (e.g. in a quote) differs from the one computed from the reported values."""

    id: ClassVar[str] = "verify.pcr_digest"


class HashAlgorithmNotAllowed(VerificationError):
    """A weak hash algorithm was needed, and the options do not allow it."""

    id: ClassVar[str] = "verify.hash_not_allowed"


class ReplayError(VerificationError):
    """A measurement list does not replay to the expected PCR values.

    Args:
        message: what failed, naming expected and computed values.
        invalid_pcrs: the PCR indices whose replay differs.
    """

    id: ClassVar[str] = "verify.replay"

    def __init__(self, message: str, invalid_pcrs: Iterable[int] = ()) -> None:
        self.invalid_pcrs = tuple(sorted(set(invalid_pcrs)))
        super().__init__(message)
