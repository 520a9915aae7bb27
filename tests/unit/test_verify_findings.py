"""Findings and verdicts: the shape, errors as findings, and docs/findings.md listing every id."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from evidence import policy, verify
from evidence.errors import (
    HashAlgorithmNotAllowed,
    NonceMismatch,
    ParseError,
    ReplayError,
    TruncatedError,
    UnsupportedError,
    VerificationError,
    VtpmError,
)
from evidence.verdict import Finding, Severity, Verdict, finding_from_error

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "findings.md"


def _documented() -> set[str]:
    return set(re.findall(r"^\| `([a-z0-9_.]+)` \|", DOC.read_text(), re.MULTILINE))


def _policy_ids() -> set[str]:
    source = (REPO / "evidence" / "policy.py").read_text()
    return set(re.findall(r'Finding\(\s*"([a-z0-9_.]+)"', source))


def _verify_ids() -> set[str]:
    classes = [getattr(verify, n) for n in verify.__all__]
    ids = {c.id for c in classes if isinstance(c, type) and issubclass(c, VerificationError)}
    # raised by verify_bundle / parse_bundle from the evidence.errors tree itself
    extra: list[type[VtpmError]] = [
        NonceMismatch,
        HashAlgorithmNotAllowed,
        ParseError,
        TruncatedError,
        UnsupportedError,
    ]
    return ids | {c.id for c in extra}


# The ids a host answers a tenant with (a refusal instead of a signature) are API too.
_ATTEST_SOURCES = sorted((REPO / "host_agent/service").glob("attest*.py"))
_HOST_SOURCES = (
    *(str(path.relative_to(REPO)) for path in _ATTEST_SOURCES),
    "host_agent/service/enroll.py",
    "verifier/commands/tenant.py",
)


def _host_ids() -> set[str]:
    text = "".join((REPO / p).read_text() for p in _HOST_SOURCES)
    return set(re.findall(r'"((?:attest|enroll)\.[a-z0-9_.]+)"', text))


def test_every_id_is_documented_and_every_documented_id_exists() -> None:
    produced = _policy_ids() | _verify_ids() | _host_ids()
    assert len(_policy_ids()) == 14
    assert produced == _documented()


def test_finding_ids_and_severities() -> None:
    with pytest.raises(ValueError):
        Finding("NotDotted", Severity.ERROR, "x")
    with pytest.raises(ValueError):
        Finding("ima.entry.unknown_file", "fatal", "x")  # type: ignore[arg-type]
    f = Finding("ima.entry.unknown_file", "error", "m", context={"path": "/x"})  # type: ignore[arg-type]
    assert f.severity is Severity.ERROR
    assert f.to_json() == {
        "id": "ima.entry.unknown_file",
        "severity": "error",
        "message": "m",
        "context": {"path": "/x"},
    }


def test_verdict_trust_follows_error_findings() -> None:
    warn = Finding("ima.list.truncated_tail", Severity.WARNING, "w")
    err = Finding("boot.pcr.mismatch", Severity.ERROR, "e", expected="aa", got="bb")
    assert Verdict().trusted
    assert Verdict((warn,)).trusted
    both = Verdict((warn,)) + Verdict((err,))
    assert not both.trusted
    assert both.ids == ("ima.list.truncated_tail", "boot.pcr.mismatch")
    assert both.to_json()["trusted"] is False
    assert both.to_json()["findings"][1]["expected"] == "aa"


def test_errors_become_findings() -> None:
    replay = verify.ImaReplayMismatch("does not replay", (10,))
    f = finding_from_error(replay)
    assert (f.id, f.severity, f.context["pcrs"]) == ("verify.replay.ima", Severity.ERROR, "10")
    assert isinstance(replay, ReplayError)

    parse = ParseError("$.nonce", 0, "base64", "junk", unit="path")
    f = finding_from_error(parse)
    assert (f.id, f.expected, f.got, f.context["what"]) == (
        "parse.malformed",
        "base64",
        "junk",
        "$.nonce",
    )

    mismatch = verify._detail(verify.VmUuidMismatch("other VM"), "a", "b")
    f = finding_from_error(mismatch)
    assert (f.id, f.expected, f.got) == ("verify.vm_uuid", "a", "b")
    with pytest.raises(TypeError):
        finding_from_error(ValueError("x"))  # type: ignore[arg-type]


def test_policy_module_exports_resolve() -> None:
    for module in (policy, verify):
        for name in module.__all__:
            assert hasattr(module, name), name
