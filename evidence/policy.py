"""Reference values and their evaluation: is the attested VM running what its tenant expects?

:func:`evaluate_reference_values` is the second, pure step after
:func:`evidence.verify.verify_bundle` (go-tpm-tools ``EvaluatePolicy``): it only sees verified
state, never raises for a policy miss, and returns a :class:`~evidence.verdict.Verdict` whose
findings carry the stable ids of ``docs/findings.md``. The reference values are data:

* **boot**: allowed values of signed vPCRs (``pcrs``), and allowed digests of the firmware
  events measured into a PCR (``events``; e.g. the kernel on PCR 4), in one bank;
* **IMA** (:class:`ImaAllowlist`): file path → allowed digests, an exclude list of regular
  expressions (matched at the start of the path, as Keylime does), ``ima-buf`` and keyring
  digests by name, and keyrings to ignore.

Sources: our own JSON (``vtpm-trust/reference-values/1``, :func:`parse_reference_values` /
:func:`encode_reference_values`), a Keylime runtime policy (:func:`import_keylime_runtime_policy`,
the format of keylime ``keylime/ima/ima.py`` ``RUNTIME_POLICY_SCHEMA``, version 1), and
:func:`learn_reference_values` from a known-good attested VM (``vtpm-verify policy learn``).

IMA rules, in order, for each entry the replay of PCR 10 verified:

1. a path matching an exclude is skipped;
2. a violation (the kernel could not measure the file: open for write) is ``ima.entry.violation``;
3. ``boot_aggregate``: if the allowlist names it, its digest must be listed; otherwise it must be
   SHA-256 over the signed vPCRs 0-9 (Linux >= 5.8) or 0-7, else ``ima.boot_aggregate.mismatch``;
4. an ``ima-buf`` entry: its name in ``ima_buf`` or ``keyrings`` (unless an ignored keyring),
   else ``ima.buf.unknown``; a digest not listed is ``ima.buf.digest_mismatch``;
5. any other entry: a path not in ``digests`` is ``ima.entry.unknown_file``, a digest not listed
   for it ``ima.entry.digest_mismatch``.

Digests compare as bytes whatever their algorithm, as Keylime's hex comparison does.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import operator
import re
from collections.abc import Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final, NoReturn

from evidence.errors import ParseError, UnsupportedError
from evidence.ima import VerifiedImaColumns, VerifiedImaEntry
from evidence.verdict import Finding, Severity, Verdict
from evidence.verify import AttestedVm

__all__ = [
    "REFS_FORMAT",
    "ImaAllowlist",
    "ReferenceValues",
    "encode_reference_values",
    "evaluate_reference_values",
    "import_keylime_runtime_policy",
    "learn_reference_values",
    "parse_reference_values",
]

REFS_FORMAT: Final = "vtpm-trust/reference-values/1"
"""The ``format`` of our reference-value JSON."""

_BOOT_AGGREGATE: Final = "boot_aggregate"
_HEX: Final = re.compile(r"[0-9a-f]{40,128}")
_MAX_LISTED: Final = 4  # digests named in a finding's "expected"

Digests = Mapping[str, AbstractSet[bytes]]


def _freeze(mapping: Mapping[Any, Iterable[bytes]]) -> MappingProxyType[Any, frozenset[bytes]]:
    return MappingProxyType({k: frozenset(v) for k, v in sorted(mapping.items())})


@dataclass(frozen=True)
class ImaAllowlist:
    """What the IMA list may contain (see the module docstring for the rules).

    Attributes:
        digests: file path → allowed file digests.
        excludes: regular expressions; a path matching one (``re.match``) is not checked.
        ima_buf: ``ima-buf`` event name → allowed buffer digests.
        keyrings: keyring name → allowed digests of keys measured into it (``ima-buf``).
        ignored_keyrings: keyrings whose measured keys are not checked (``"*"``: all).
    """

    digests: Digests = field(default_factory=dict)
    excludes: tuple[str, ...] = ()
    ima_buf: Digests = field(default_factory=dict)
    keyrings: Digests = field(default_factory=dict)
    ignored_keyrings: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        object.__setattr__(self, "digests", _freeze(self.digests))
        object.__setattr__(self, "ima_buf", _freeze(self.ima_buf))
        object.__setattr__(self, "keyrings", _freeze(self.keyrings))
        object.__setattr__(self, "excludes", tuple(self.excludes))
        object.__setattr__(self, "ignored_keyrings", frozenset(self.ignored_keyrings))
        object.__setattr__(self, "_exclude", _compile_excludes(self.excludes, "excludes"))

    def excluded(self, path: str) -> bool:
        pattern: re.Pattern[str] | None = getattr(self, "_exclude")  # noqa: B009
        return pattern is not None and pattern.match(path) is not None


def _compile_excludes(excludes: tuple[str, ...], what: str) -> re.Pattern[str] | None:
    if not excludes:
        return None
    for i, ex in enumerate(excludes):
        if not isinstance(ex, str):
            raise ValueError(f"{what}[{i}] must be a string")
        try:
            re.compile(ex)
        except re.error as err:
            raise ValueError(f"{what}[{i}] is not a regular expression: {err}") from err
    return re.compile("(" + ")|(".join(excludes) + ")")


@dataclass(frozen=True)
class ReferenceValues:
    """The tenant's expectations of one VM image.

    Attributes:
        bank: the vPCR bank the boot values are in (``"sha256"``).
        pcrs: PCR index → allowed signed values.
        events: PCR index → allowed digests of every firmware event measured into it.
        ima: the IMA allowlist, or None to leave the IMA list unchecked.
    """

    bank: str = "sha256"
    pcrs: Mapping[int, AbstractSet[bytes]] = field(default_factory=dict)
    events: Mapping[int, AbstractSet[bytes]] = field(default_factory=dict)
    ima: ImaAllowlist | None = None

    def __post_init__(self) -> None:
        for name in ("pcrs", "events"):
            mapping = getattr(self, name)
            if any(not isinstance(p, int) or not 0 <= p < 24 for p in mapping):
                raise ValueError(f"{name} keys must be PCR indices 0..23")
            object.__setattr__(self, name, _freeze(mapping))


# --------------------------------------------------------------------------------------------
# Evaluation


def _hexes(values: Iterable[bytes]) -> str:
    listed = sorted(v.hex() for v in values)
    more = len(listed) - _MAX_LISTED
    return ", ".join(listed[:_MAX_LISTED]) + (f" (+{more} more)" if more > 0 else "")


def _path(name: bytes) -> str:
    return name.decode("utf-8", "surrogateescape")


def _boot_findings(vm: AttestedVm, refs: ReferenceValues) -> list[Finding]:
    out: list[Finding] = []
    same_bank = vm.pcr_bank == refs.bank
    for pcr, allowed in refs.pcrs.items():
        value = vm.vpcrs.get(pcr) if same_bank else None
        if value is None:
            out.append(
                Finding(
                    "boot.pcr.not_signed",
                    Severity.ERROR,
                    f"the reference values name {refs.bank} PCR {pcr}, which the evidence does "
                    f"not sign (signed: {vm.pcr_bank} PCRs {sorted(vm.vpcrs)})",
                    expected=f"{refs.bank}:{pcr}",
                    got=f"{vm.pcr_bank}:{','.join(map(str, sorted(vm.vpcrs)))}",
                    context={"pcr": str(pcr)},
                )
            )
        elif value not in allowed:
            out.append(
                Finding(
                    "boot.pcr.mismatch",
                    Severity.ERROR,
                    f"{refs.bank} PCR {pcr} is {value.hex()}, not an approved value",
                    expected=_hexes(allowed),
                    got=value.hex(),
                    context={"pcr": str(pcr)},
                )
            )
    if not refs.events:
        return out
    if vm.eventlog is None:
        out.append(
            Finding(
                "boot.eventlog.missing",
                Severity.ERROR,
                "the reference values name firmware events, but the evidence has no event log",
                context={"pcrs": ",".join(map(str, sorted(refs.events)))},
            )
        )
        return out
    verified = vm.eventlog.pcrs.get(refs.bank, {})
    for pcr, allowed in refs.events.items():
        if pcr not in verified:
            out.append(
                Finding(
                    "boot.event.pcr_not_verified",
                    Severity.ERROR,
                    f"the reference values name events of {refs.bank} PCR {pcr}, which the "
                    "event log replay did not verify",
                    expected=f"{refs.bank}:{pcr}",
                    got=",".join(map(str, sorted(verified))) or "none",
                    context={"pcr": str(pcr)},
                )
            )
            continue
        for event in vm.eventlog.events:
            if event.pcr != pcr:
                continue
            digest = event.digests[refs.bank]
            if digest not in allowed:
                out.append(
                    Finding(
                        "boot.event.unknown_digest",
                        Severity.ERROR,
                        f"firmware event {event.index} on PCR {pcr} (claimed type "
                        f"{event.untrusted_event_type!s}) measured {digest.hex()}, not an "
                        "approved digest",
                        expected=_hexes(allowed),
                        got=digest.hex(),
                        context={"pcr": str(pcr), "index": str(event.index)},
                    )
                )
    return out


def _boot_aggregates(vm: AttestedVm) -> set[bytes]:
    """SHA-256 over the signed vPCRs 0-9 (Linux >= 5.8) and 0-7 (older), when signed."""
    if vm.pcr_bank != "sha256":
        return set()
    out = set()
    for last in (9, 7):
        values = [vm.vpcrs.get(i) for i in range(last + 1)]
        if all(v is not None for v in values):
            out.add(hashlib.sha256(b"".join(v for v in values if v is not None)).digest())
    return out


def _ima_findings(vm: AttestedVm, allow: ImaAllowlist) -> list[Finding]:
    if vm.ima is None:
        return [
            Finding(
                "ima.list.missing",
                Severity.ERROR,
                "the reference values hold an IMA allowlist, but the evidence has no IMA list",
            )
        ]
    out: list[Finding] = []
    if vm.ima.truncated_tail:
        out.append(
            Finding(
                "ima.list.truncated_tail",
                Severity.WARNING,
                "the IMA list ended inside an entry, which was not verified",
            )
        )
    if vm.ima_unverified_tail:
        out.append(
            Finding(
                "ima.list.unverified_tail",
                Severity.WARNING,
                f"{vm.ima_unverified_tail} IMA entries were logged after the vPCRs were signed; "
                "they are not verified and were not checked (the next attestation covers them)",
                got=str(vm.ima_unverified_tail),
            )
        )
    checked: Iterable[int] = range(len(vm.ima))  # the general path: every entry
    if vm.ima.is_columnar:  # the fast path: only the entries that may give a finding
        checked = _ima_candidates(vm.ima.columns(), allow)
    aggregates: list[set[bytes]] = []  # computed once, when first needed
    for k in checked:
        out.extend(_ima_entry_findings(vm, allow, vm.ima.entry(k), aggregates))
    return out


def _paths(names: Sequence[bytes]) -> list[str]:
    """``[_path(n) for n in names]`` in one decode (names hold no NUL; UTF-8 never splits at
    one, so the surrogate escapes are the same)."""
    if not names:
        return []
    return b"\0".join(names).decode("utf-8", "surrogateescape").split("\0")


def _ima_candidates(columns: VerifiedImaColumns, allow: ImaAllowlist) -> list[int]:
    """Positions of the entries that may give a finding: every entry but those of a listed path
    with a listed digest that are no violation and no ``ima-buf``. Those give none in
    :func:`_ima_entry_findings` (rule 3 takes ``boot_aggregate`` only when it is not listed;
    an excluded path gives none either)."""
    paths = _paths(columns.names)
    allowed = map(allow.digests.get, paths, itertools.repeat(frozenset()))
    listed = map(operator.contains, allowed, columns.digests)
    todo = set(itertools.compress(itertools.count(), map(operator.not_, listed)))
    todo.update(columns.violations)
    templates = columns.templates
    if "ima-buf" in templates:
        todo.update(k for k, template in enumerate(templates) if template == "ima-buf")
    return sorted(todo)


def _ima_entry_findings(
    vm: AttestedVm, allow: ImaAllowlist, entry: VerifiedImaEntry, aggregates: list[set[bytes]]
) -> list[Finding]:
    """The findings of one verified IMA entry (rules 1-5 of the module docstring)."""
    path = _path(entry.name)
    ctx = {"path": path, "index": str(entry.index), "algo": entry.digest_algo}
    if allow.excluded(path):
        return []
    if entry.is_violation:
        return [
            Finding(
                "ima.entry.violation",
                Severity.ERROR,
                f"IMA could not measure {path!r} (a ToMToU or open-writers violation): its "
                "content is unknown",
                got="violation",
                context=ctx,
            )
        ]
    if path == _BOOT_AGGREGATE and _BOOT_AGGREGATE not in allow.digests:
        if not aggregates:
            aggregates.append(_boot_aggregates(vm))
        if aggregates[0] and entry.digest not in aggregates[0]:
            return [
                Finding(
                    "ima.boot_aggregate.mismatch",
                    Severity.ERROR,
                    "the IMA boot_aggregate is not SHA-256 over the signed vPCRs 0-9 or 0-7",
                    expected=_hexes(aggregates[0]),
                    got=entry.digest.hex(),
                    context=ctx,
                )
            ]
        return []
    if entry.untrusted_template_name == "ima-buf":
        return _buf_findings(allow, path, entry.digest, ctx)
    allowed = allow.digests.get(path)
    if allowed is None:
        return [
            Finding(
                "ima.entry.unknown_file",
                Severity.ERROR,
                f"{path!r} was measured but is not in the IMA allowlist",
                expected="a path in the allowlist",
                got=entry.digest.hex(),
                context=ctx,
            )
        ]
    if entry.digest not in allowed:
        return [
            Finding(
                "ima.entry.digest_mismatch",
                Severity.ERROR,
                f"{path!r} has digest {entry.digest.hex()}, not one the allowlist names",
                expected=_hexes(allowed),
                got=entry.digest.hex(),
                context=ctx,
            )
        ]
    return []


def _buf_findings(
    allow: ImaAllowlist, name: str, digest: bytes, ctx: Mapping[str, str]
) -> list[Finding]:
    if name in allow.ignored_keyrings or "*" in allow.ignored_keyrings:
        return []
    allowed = allow.ima_buf.get(name)
    if allowed is None:
        allowed = allow.keyrings.get(name)
    if allowed is None:
        return [
            Finding(
                "ima.buf.unknown",
                Severity.ERROR,
                f"an ima-buf event {name!r} was measured but the allowlist has no entry for it",
                expected="a name in ima-buf or keyrings",
                got=digest.hex(),
                context=ctx,
            )
        ]
    if digest not in allowed:
        return [
            Finding(
                "ima.buf.digest_mismatch",
                Severity.ERROR,
                f"ima-buf event {name!r} has digest {digest.hex()}, not one the allowlist names",
                expected=_hexes(allowed),
                got=digest.hex(),
                context=ctx,
            )
        ]
    return []


def evaluate_reference_values(vm: AttestedVm, refs: ReferenceValues) -> Verdict:
    """Compare a verified VM with reference values; never raises for a policy miss.

    Args:
        vm: from :func:`evidence.verify.verify_bundle` (only verified state is looked at).
        refs: the tenant's reference values.

    Returns:
        A verdict: boot findings (``boot.*``) then IMA findings (``ima.*``), in evidence order.
        ``trusted`` is False when any finding is an error.
    """
    if not isinstance(vm, AttestedVm):
        raise TypeError(f"evaluate_reference_values takes an AttestedVm, got {type(vm).__name__}")
    findings = _boot_findings(vm, refs)
    if refs.ima is not None:
        findings += _ima_findings(vm, refs.ima)
    return Verdict(tuple(findings))


def learn_reference_values(vm: AttestedVm, *, pin_pcrs: Iterable[int] = ()) -> ReferenceValues:
    """Reference values that accept exactly this known-good VM (``vtpm-verify policy learn``).

    Learns the digest of every verified firmware event per PCR, every verified IMA entry's digest
    by path (``ima-buf`` entries by name; violations are not learned, so they stay findings), and
    the signed values of ``pin_pcrs``. ``boot_aggregate`` is not learned: it is checked against
    the signed vPCRs of each boot instead.
    """
    events: dict[int, set[bytes]] = {}
    if vm.eventlog is not None:
        for event in vm.eventlog.events:
            events.setdefault(event.pcr, set()).add(event.digests[vm.pcr_bank])
    pcrs = {p: {vm.vpcrs[p]} for p in pin_pcrs if p in vm.vpcrs}
    ima: ImaAllowlist | None = None
    if vm.ima is not None:
        digests: dict[str, set[bytes]] = {}
        bufs: dict[str, set[bytes]] = {}
        for entry in vm.ima.entries:
            path = _path(entry.name)
            if entry.is_violation or path == _BOOT_AGGREGATE:
                continue
            target = bufs if entry.untrusted_template_name == "ima-buf" else digests
            target.setdefault(path, set()).add(entry.digest)
        ima = ImaAllowlist(digests=digests, ima_buf=bufs)
    return ReferenceValues(bank=vm.pcr_bank, pcrs=pcrs, events=events, ima=ima)


# --------------------------------------------------------------------------------------------
# JSON: our format and Keylime's runtime policy


def _fail(path: str, expected: str, got: str | None = None) -> NoReturn:
    err = ParseError(path, 0, expected, got, unit="path")
    err.args = (f"reference values {path}: expected {expected}" + (f", got {got}" if got else ""),)
    raise err


def _load(text: str | bytes, what: str) -> object:
    if isinstance(text, bytes | bytearray):
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError as err:
            raise ParseError(what, err.start, "UTF-8 text", "invalid UTF-8") from err
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ParseError(what, err.pos, "JSON text", err.msg) from err
    except (RecursionError, ValueError) as err:
        raise ParseError(what, 0, "JSON text", type(err).__name__) from err


def _obj(
    value: object, path: str, required: frozenset[str], optional: frozenset[str] = frozenset()
) -> dict[str, Any]:
    if not isinstance(value, dict):
        _fail(path, "a JSON object")
    for name in sorted(required - value.keys()):
        _fail(f"{path}.{name}", "this required field", "nothing (missing)")
    for name in sorted(value.keys() - required - optional):
        _fail(f"{path}.{name}", "no such field", "one")
    return value


def _digest_map(value: object, path: str, *, keys_are_pcrs: bool = False) -> dict[Any, set[bytes]]:
    if not isinstance(value, dict):
        _fail(path, "an object of name → [hex digest, …]")
    out: dict[Any, set[bytes]] = {}
    for key, digests in value.items():
        where = f"{path}[{json.dumps(key)}]"
        k: Any = key
        if keys_are_pcrs:
            if not (key.isascii() and key.isdigit()) or not 0 <= int(key) < 24:
                _fail(where, "a PCR index 0..23 as a string")
            k = int(key)
        if not isinstance(digests, list) or not digests:
            _fail(where, "a non-empty array of hex digests")
        for i, d in enumerate(digests):
            if not isinstance(d, str) or not _HEX.fullmatch(d):
                _fail(f"{where}[{i}]", "a lower-case hex digest of 20..64 bytes", repr(d)[:80])
        out[k] = {bytes.fromhex(d) for d in digests}
    return out


def _strings(value: object, path: str) -> list[str]:
    if not isinstance(value, list) or any(not isinstance(s, str) for s in value):
        _fail(path, "an array of strings")
    return list(value)


def _allowlist(
    *,
    digests: dict[str, set[bytes]],
    excludes: list[str],
    ima_buf: dict[str, set[bytes]],
    keyrings: dict[str, set[bytes]],
    ignored_keyrings: list[str],
    path: str,
) -> ImaAllowlist:
    try:
        _compile_excludes(tuple(excludes), f"{path}.excludes")
    except ValueError as err:
        _fail(f"{path}.excludes", "regular expressions", str(err))
    return ImaAllowlist(
        digests=digests,
        excludes=tuple(excludes),
        ima_buf=ima_buf,
        keyrings=keyrings,
        ignored_keyrings=frozenset(ignored_keyrings),
    )


_IMA_FIELDS: Final = frozenset({"digests", "excludes", "ima_buf", "keyrings", "ignored_keyrings"})


def parse_reference_values(text: str | bytes) -> ReferenceValues:
    """Parse our reference-value JSON strictly (the layout :func:`encode_reference_values` writes).

    Raises:
        UnsupportedError: another ``format``.
        ParseError: anything malformed; ``what`` is the JSON path.
    """
    obj = _load(text, "reference values")
    if not isinstance(obj, dict) or obj.get("format") != REFS_FORMAT:
        got = json.dumps(obj.get("format")) if isinstance(obj, dict) else "not an object"
        raise UnsupportedError("$.format", 0, f'"{REFS_FORMAT}"', got, unit="path")
    top = _obj(obj, "$", frozenset({"format", "bank", "pcrs", "events", "ima"}))
    if top["bank"] not in ("sha1", "sha256", "sha384", "sha512", "sm3_256"):
        _fail("$.bank", "a bank name such as sha256", json.dumps(top["bank"]))
    ima: ImaAllowlist | None = None
    if top["ima"] is not None:
        section = _obj(top["ima"], "$.ima", _IMA_FIELDS)
        ima = _allowlist(
            digests=_digest_map(section["digests"], "$.ima.digests"),
            excludes=_strings(section["excludes"], "$.ima.excludes"),
            ima_buf=_digest_map(section["ima_buf"], "$.ima.ima_buf"),
            keyrings=_digest_map(section["keyrings"], "$.ima.keyrings"),
            ignored_keyrings=_strings(section["ignored_keyrings"], "$.ima.ignored_keyrings"),
            path="$.ima",
        )
    return ReferenceValues(
        bank=top["bank"],
        pcrs=_digest_map(top["pcrs"], "$.pcrs", keys_are_pcrs=True),
        events=_digest_map(top["events"], "$.events", keys_are_pcrs=True),
        ima=ima,
    )


def _hex_map(mapping: Mapping[Any, AbstractSet[bytes]]) -> dict[str, list[str]]:
    return {str(k): sorted(d.hex() for d in v) for k, v in mapping.items()}


def encode_reference_values(refs: ReferenceValues) -> str:
    """Our reference-value JSON (sorted, indented: operators read and edit it)."""
    ima = refs.ima
    obj = {
        "format": REFS_FORMAT,
        "bank": refs.bank,
        "pcrs": _hex_map(refs.pcrs),
        "events": _hex_map(refs.events),
        "ima": None
        if ima is None
        else {
            "digests": _hex_map(ima.digests),
            "excludes": list(ima.excludes),
            "ima_buf": _hex_map(ima.ima_buf),
            "keyrings": _hex_map(ima.keyrings),
            "ignored_keyrings": sorted(ima.ignored_keyrings),
        },
    }
    return json.dumps(obj, sort_keys=True, indent=2) + "\n"


_KEYLIME_REQUIRED: Final = frozenset(
    {"meta", "release", "digests", "excludes", "keyrings", "ima", "ima-buf", "verification-keys"}
)


def import_keylime_runtime_policy(text: str | bytes) -> ImaAllowlist:
    """Read a Keylime runtime policy (keylime ``RUNTIME_POLICY_SCHEMA``, meta.version 1).

    ``digests`` → paths, ``excludes`` → excludes (Keylime matches them the same way),
    ``ima-buf`` → ima_buf, ``keyrings`` → keyrings, ``ima.ignored_keyrings`` → ignored keyrings.
    ``ima.log_hash_alg`` concerns Keylime's parser only; ``verification-keys`` (IMA signature
    keys) are not used, so a file Keylime would accept by its signature alone is reported here as
    unknown: the import is never more permissive than the policy.

    Raises:
        UnsupportedError: a DSSE-signed envelope (verify and unwrap it first), another
            meta.version, or a device-mapper policy (``ima.dm_policy``).
        ParseError: anything else malformed; ``what`` is the JSON path.
    """
    obj = _load(text, "Keylime runtime policy")
    if isinstance(obj, dict) and "payload" in obj:
        raise UnsupportedError(
            "$.payload", 0, "an unsigned runtime policy (verify and unwrap the DSSE envelope)",
            "a DSSE envelope", unit="path",
        )  # fmt: skip
    top = _obj(obj, "$", _KEYLIME_REQUIRED, frozenset({"timestamp"}))
    meta = _obj(
        top["meta"], "$.meta", frozenset({"version"}), frozenset({"generator", "timestamp"})
    )
    if type(meta["version"]) is not int or meta["version"] != 1:
        raise UnsupportedError("$.meta.version", 0, "1", json.dumps(meta["version"]), unit="path")
    if not isinstance(top["release"], int) or isinstance(top["release"], bool):
        _fail("$.release", "an integer")
    if not isinstance(top["verification-keys"], str):
        _fail("$.verification-keys", "a string")
    ima = _obj(top["ima"], "$.ima", frozenset({"ignored_keyrings", "log_hash_alg", "dm_policy"}))
    if ima["log_hash_alg"] not in ("sha1", "sha256", "sha384", "sha512"):
        _fail("$.ima.log_hash_alg", "sha1, sha256, sha384 or sha512", repr(ima["log_hash_alg"]))
    if ima["dm_policy"] is not None:
        raise UnsupportedError(
            "$.ima.dm_policy", 0, "null (device-mapper policies are not evaluated)", "a policy",
            unit="path",
        )  # fmt: skip
    return _allowlist(
        digests=_digest_map(top["digests"], "$.digests"),
        excludes=_strings(top["excludes"], "$.excludes"),
        ima_buf=_digest_map(top["ima-buf"], "$.ima-buf"),
        keyrings=_digest_map(top["keyrings"], "$.keyrings"),
        ignored_keyrings=_strings(ima["ignored_keyrings"], "$.ima.ignored_keyrings"),
        path="$",
    )
