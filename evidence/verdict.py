"""Verdicts: what policy evaluation (and a failed verification) tells an operator.

``evaluate_*`` functions return a :class:`Verdict` of :class:`Finding` s instead of raising for a
policy miss (STYLE.md §3; keylime ``failure.py``). A finding's ``id`` is dotted, lower case and
stable: the ids are API, listed with their meaning in ``docs/findings.md``, never renamed, and
what tests, scripts and operators match on (never the message text).

Cryptographic failures are raised by ``verify_*`` as :class:`~evidence.errors.VerificationError`
(each class with its own stable ``id``); :func:`finding_from_error` turns one into a finding so a
CLI can report every outcome in the same shape.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from evidence.errors import ParseError, ReplayError, VtpmError

__all__ = ["Finding", "Severity", "Verdict", "finding_from_error"]

_ID = re.compile(r"[a-z0-9_]+(\.[a-z0-9_]+)+")


class Severity(enum.StrEnum):
    """How much a finding weighs: only ``error`` makes a verdict untrusted."""

    INFO = "info"
    """Worth knowing (e.g. an excluded path was measured); trust is unaffected."""
    WARNING = "warning"
    """Suspicious but not a policy violation (e.g. unverified trailing IMA entries)."""
    ERROR = "error"
    """A policy violation or failed verification: the VM is not trusted."""


@dataclass(frozen=True)
class Finding:
    """One observation about a VM's evidence.

    Attributes:
        id: dotted, lower-case, stable id (``ima.entry.unknown_file``); see ``docs/findings.md``.
        severity: :class:`Severity`.
        message: one human sentence naming what was expected and what arrived.
        expected: what the reference values (or the check) wanted, if one value says it.
        got: what the evidence held.
        context: further facts as strings (``{"path": "/usr/bin/x", "pcr": "4"}``).
    """

    id: str
    severity: Severity
    message: str
    expected: str | None = None
    got: str | None = None
    context: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not _ID.fullmatch(self.id):
            raise ValueError(f"finding id must be dotted lower case, got {self.id!r}")
        object.__setattr__(self, "severity", Severity(self.severity))
        object.__setattr__(self, "context", MappingProxyType(dict(self.context)))

    def to_json(self) -> dict[str, Any]:
        """``{"id", "severity", "message"}`` plus ``expected``/``got``/``context`` when set."""
        out: dict[str, Any] = {
            "id": self.id,
            "severity": str(self.severity),
            "message": self.message,
        }
        if self.expected is not None:
            out["expected"] = self.expected
        if self.got is not None:
            out["got"] = self.got
        if self.context:
            out["context"] = dict(self.context)
        return out


@dataclass(frozen=True)
class Verdict:
    """The findings about one VM. ``trusted`` unless a finding has severity ``error``."""

    findings: tuple[Finding, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "findings", tuple(self.findings))

    @property
    def trusted(self) -> bool:
        return not any(f.severity is Severity.ERROR for f in self.findings)

    @property
    def ids(self) -> tuple[str, ...]:
        """The finding ids, in order (with repeats)."""
        return tuple(f.id for f in self.findings)

    def __add__(self, other: Verdict) -> Verdict:
        return Verdict(self.findings + other.findings)

    @classmethod
    def of(cls, findings: Iterable[Finding]) -> Verdict:
        return cls(tuple(findings))

    def to_json(self) -> dict[str, Any]:
        """``{"trusted": bool, "findings": [...]}`` (the CLI adds ``"vm"``)."""
        return {"trusted": self.trusted, "findings": [f.to_json() for f in self.findings]}


def finding_from_error(err: VtpmError) -> Finding:
    """The finding that reports ``err``: its ``id``, severity ``error``, its message.

    ``expected``/``got`` are taken from the error when it carries them (ParseError and the
    verification errors of :mod:`evidence.verify` do); a ReplayError adds the PCRs that failed,
    a ParseError what and where.
    """
    if not isinstance(err, VtpmError):
        raise TypeError(f"finding_from_error takes a VtpmError, got {type(err).__name__}")
    context: dict[str, str] = {"error": type(err).__name__}
    if isinstance(err, ReplayError) and err.invalid_pcrs:
        context["pcrs"] = ",".join(str(p) for p in err.invalid_pcrs)
    if isinstance(err, ParseError):
        context["what"] = err.what
        context[err.unit] = str(err.offset)
    expected = getattr(err, "expected", None)
    got = getattr(err, "got", None)
    return Finding(
        id=err.id,
        severity=Severity.ERROR,
        message=str(err),
        expected=expected if isinstance(expected, str) else None,
        got=got if isinstance(got, str) else None,
        context=context,
    )
