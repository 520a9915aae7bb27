"""PCR 10 replay of a parsed IMA list, and the verified list it yields.

Part of :mod:`evidence.ima`; import from there. :func:`replay_ima_pcr10` and
:func:`signed_prefix` compute PCR 10 from a :class:`~evidence.ima.RawImaList` (from its columns
when it has them, else entry by entry); :func:`replay_ima` checks it against trusted values and
is the only code that builds a :class:`VerifiedImaList`. Separate from parsing and encoding: it
reads a parsed list, never bytes, and is where a list becomes trusted.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from evidence._ima_model import (
    _BANK_HASH,
    _BANK_SIZE,
    _TEMPLATE_HASH_SIZE,
    _ZERO_HASH,
    BANKS,
    IMA_PCR,
    TEMPLATES,
    ImaEntry,
    KernelRule,
    RawImaList,
    _Columns,
)
from evidence.errors import HashAlgorithmNotAllowed, ReplayError, UnsupportedError

__all__ = [
    "ImaReplay",
    "VerifiedImaColumns",
    "VerifiedImaEntry",
    "VerifiedImaList",
    "replay_ima",
    "replay_ima_pcr10",
    "signed_prefix",
]


@dataclass(frozen=True)
class ImaReplay:
    """PCR 10 as the complete entries of a list would have left it (not compared with anything).

    Attributes:
        pcr10: bank name → value.
        rule: the kernel rule used.
        entries: complete entries in the list (all PCRs).
        replayed: entries extended into PCR 10.
        violations: violation entries (all-zero template hash).
        template_hash_mismatches: entries whose logged template hash differs from the one
            recomputed from their data.
        mismatched: indices of those entries.
        truncated_tail: the list ended inside one more entry, which was not replayed.
    """

    pcr10: Mapping[str, bytes]
    rule: KernelRule
    entries: int
    replayed: int
    violations: int
    template_hash_mismatches: int
    mismatched: tuple[int, ...] = field(default=())
    truncated_tail: bool = False


_OWN_HASH, _SHA1_ITSELF, _SHA1_PADDED = 0, 1, 2


def _check_banks(banks: Iterable[str]) -> tuple[str, ...]:
    out = tuple(banks)
    for bank in out:
        if bank not in _BANK_SIZE:
            raise ValueError(f"unknown PCR bank {bank!r}; known: {', '.join(BANKS)}")
    if not out:
        raise ValueError("no PCR bank to replay")
    return out


def replay_ima_pcr10(
    raw: RawImaList,
    rule: KernelRule | str = KernelRule.V5_8,
    banks: Iterable[str] = ("sha1", "sha256"),
    *,
    kernel_hashless_banks: Iterable[str] = (),
) -> ImaReplay:
    """Replay PCR 10 from the complete entries of ``raw``.

    Each bank starts at zero. Per entry with ``pcr == 10``: rule ``"5.8"`` extends
    ``H_bank(hash input)``, and ``0xFF`` × bank size for a violation (``ima_init_digests``); rule
    ``"pre-5.8"`` extends the SHA-1 template hash zero-padded to the bank size, and for a
    violation 20 ``0xFF`` bytes zero-padded the same way (the kernel filled a 20-byte digest and
    copied it into zeroed per-bank buffers, ``ima_pcr_extend`` before 5.8). The extended
    digests are recomputed from the template data, never taken from the logged template hash; a
    logged hash that differs is counted in ``template_hash_mismatches``.

    Args:
        raw: a parsed list.
        rule: ``"5.8"`` (Linux >= 5.8, the default) or ``"pre-5.8"``.
        banks: the banks to compute (any of ``BANKS``).
        kernel_hashless_banks: banks whose hash the kernel could not compute when IMA started
            (e.g. sha384/sha512 when ``CONFIG_CRYPTO_SHA512=m`` and the module was not loaded, as
            in Debian's 6.1 kernel): under rule ``"5.8"`` the kernel extends them with the padded
            SHA-1 template hash (``ima_calc_field_array_hash`` falls back when a bank has no
            tfm); violations still extend ``0xFF`` × bank size.

    Returns:
        The values and the counts.

    Raises:
        UnsupportedError: the list holds an entry of a template we do not decode.
    """
    rule = KernelRule(rule)
    bank_list = _check_banks(banks)
    hashless = (
        frozenset(_check_banks(kernel_hashless_banks)) if kernel_hashless_banks else frozenset()
    )
    # Per bank: (hash, what a normal entry extends, what a violation extends).
    plan: list[tuple[Callable[[bytes], hashlib._Hash], int, bytes]] = []
    for bank in bank_list:
        size = _BANK_SIZE[bank]
        if bank == "sha1":
            mode = _SHA1_ITSELF
        elif rule is KernelRule.V5_8 and bank not in hashless:
            mode = _OWN_HASH
        else:
            mode = _SHA1_PADDED
        if rule is KernelRule.V5_8:
            ff = b"\xff" * size
        else:  # the 20 0xFF bytes of a SHA-1 digest, zero-padded like any other
            ff = (b"\xff" * _TEMPLATE_HASH_SIZE).ljust(size, b"\0")
        plan.append((_BANK_HASH[bank], mode, ff))
    values = [bytes(_BANK_SIZE[bank]) for bank in bank_list]
    pads = [bytes(_BANK_SIZE[bank] - _TEMPLATE_HASH_SIZE) for bank in bank_list]
    if raw._columns is not None:
        replayed, violations, mismatched = _replay_columns(raw, raw._columns, plan, pads, values)
    else:
        replayed, violations, mismatched = _replay_entries(raw, plan, pads, values)
    pcrs = dict(zip(bank_list, values, strict=True))
    return ImaReplay(
        pcr10=pcrs,
        rule=rule,
        entries=len(raw),
        replayed=replayed,
        violations=violations,
        template_hash_mismatches=len(mismatched),
        mismatched=tuple(mismatched),
        truncated_tail=raw.truncated_tail,
    )


_Plan = list[tuple[Callable[[bytes], "hashlib._Hash"], int, bytes]]


def _replay_entries(
    raw: RawImaList, plan: _Plan, pads: list[bytes], values: list[bytes]
) -> tuple[int, int, list[int]]:
    """The general replay, entry by entry: extends ``values``; returns the counts."""
    sha1_hash = _BANK_HASH["sha1"]
    violations = replayed = 0
    mismatched: list[int] = []
    for index, e in enumerate(raw.entries):
        if not e.supported:
            raise _unsupported(raw, index, e)
        if e.template_hash == _ZERO_HASH:
            violations += 1
            if e.pcr == IMA_PCR:
                replayed += 1
                for i, (h, _, ff) in enumerate(plan):
                    values[i] = h(values[i] + ff).digest()
            continue
        hash_input = e.hash_input
        sha1 = sha1_hash(hash_input).digest()
        if sha1 != e.template_hash:
            mismatched.append(index)
        if e.pcr != IMA_PCR:
            continue
        replayed += 1
        for i, (h, mode, _) in enumerate(plan):
            if mode == _OWN_HASH:
                digest = h(hash_input).digest()
            elif mode == _SHA1_ITSELF:
                digest = sha1
            else:
                digest = sha1 + pads[i]
            values[i] = h(values[i] + digest).digest()
    return replayed, violations, mismatched


def _unsupported(raw: RawImaList, index: int, e: ImaEntry) -> UnsupportedError:
    return UnsupportedError(
        f"IMA entry {index} template",
        e.location,
        f"one of {', '.join(TEMPLATES)} (others are not replayed, not guessed)",
        e.template_name,
        unit=raw.unit,
    )


def _first_unsupported(raw: RawImaList, columns: _Columns) -> None:
    for index in sorted(columns.general):
        e = columns.general[index]
        if not e.supported:
            raise _unsupported(raw, index, e)


def _replay_columns(
    raw: RawImaList, columns: _Columns, plan: _Plan, pads: list[bytes], values: list[bytes]
) -> tuple[int, int, list[int]]:
    """:func:`_replay_entries` on columns: the same values, counts and errors, in bulk."""
    _first_unsupported(raw, columns)
    hashes, inputs = columns.hashes, columns.inputs
    sha1 = _BANK_HASH["sha1"]
    sha1s = [sha1(x).digest() for x in inputs]
    zero = _ZERO_HASH
    violations = hashes.count(zero)
    mismatched: list[int] = []
    if sha1s != list(hashes):
        mismatched = [
            i for i, (a, b) in enumerate(zip(sha1s, hashes, strict=True)) if a != b and b != zero
        ]
    positions = _ima_positions(columns)
    if positions is not None:
        inputs = [inputs[i] for i in positions]
        sha1s = [sha1s[i] for i in positions]
        hashes = [hashes[i] for i in positions]
    ffs = [k for k, h in enumerate(hashes) if h == zero] if violations else []
    for b, (h, mode, ff) in enumerate(plan):
        value = values[b]
        if mode == _OWN_HASH and not ffs:
            for x in inputs:
                value = h(value + h(x).digest()).digest()
        else:
            if mode == _OWN_HASH:
                digests = [h(x).digest() for x in inputs]
            elif mode == _SHA1_ITSELF:
                digests = list(sha1s)
            else:
                pad = pads[b]
                digests = [d + pad for d in sha1s]
            for k in ffs:
                digests[k] = ff
            for d in digests:
                value = h(value + d).digest()
        values[b] = value
    return len(inputs), violations, mismatched


def _ima_positions(columns: _Columns) -> list[int] | None:
    """Indices of the PCR 10 entries, or None when every entry is one."""
    pcrs = columns.pcrs
    if pcrs.count(IMA_PCR) == len(pcrs):
        return None
    return [i for i, p in enumerate(pcrs) if p == IMA_PCR]


def signed_prefix(raw: RawImaList, bank: str, rule: KernelRule | str, want: bytes) -> int | None:
    """How many leading entries replay ``bank`` of PCR 10 to ``want`` (None: no prefix does).

    A list read after the PCRs were may run ahead of them: this finds the prefix they cover,
    which :func:`replay_ima` then verifies. Entries are extended as :func:`replay_ima_pcr10`
    extends them (no ``kernel_hashless_banks``); the search stops at the first entry of a
    template that is not decoded. The first prefix that matches is the answer.
    """
    rule = KernelRule(rule)
    (bank,) = _check_banks((bank,))
    h = _BANK_HASH[bank]
    size = _BANK_SIZE[bank]
    v58 = rule is KernelRule.V5_8
    ff = b"\xff" * size if v58 else (b"\xff" * _TEMPLATE_HASH_SIZE).ljust(size, b"\0")
    sha1 = _BANK_HASH["sha1"]
    value = bytes(size)
    columns = raw._columns
    if columns is None:
        for index, entry in enumerate(raw.entries):
            if not entry.supported:
                return None
            if entry.pcr != IMA_PCR:
                continue
            if entry.is_violation:
                digest = ff
            elif bank == "sha1":
                digest = sha1(entry.hash_input).digest()
            elif v58:
                digest = h(entry.hash_input).digest()
            else:
                digest = sha1(entry.hash_input).digest().ljust(size, b"\0")
            value = h(value + digest).digest()
            if hmac.compare_digest(value, want):
                return index + 1
        return None
    limit = min((i for i, e in columns.general.items() if not e.supported), default=None)
    pcrs, hashes, inputs = columns.pcrs, columns.hashes, columns.inputs
    own = v58 and bank != "sha1"
    pad = bytes(size - _TEMPLATE_HASH_SIZE)
    zero = _ZERO_HASH
    for index in range(len(pcrs) if limit is None else limit):
        if pcrs[index] != IMA_PCR:
            continue
        if hashes[index] == zero:
            digest = ff
        elif own:
            digest = h(inputs[index]).digest()
        else:
            digest = sha1(inputs[index]).digest() + pad
        value = h(value + digest).digest()
        if hmac.compare_digest(value, want):
            return index + 1
    return None


@dataclass(frozen=True)
class VerifiedImaEntry:
    """An entry whose data the replay of PCR 10 covers.

    ``untrusted_template_name`` is not covered: the template name is not hashed, and ima-sig and
    ima-buf have the same layout, so whether ``extra`` is a signature or a buffer is only a claim.
    """

    index: int
    template_hash: bytes
    is_violation: bool
    digest_algo: str
    digest: bytes
    name: bytes
    extra: bytes
    untrusted_template_name: str

    @classmethod
    def of(cls, index: int, entry: ImaEntry) -> VerifiedImaEntry:
        """``entry`` (at ``index`` in its list) once the replay covered it."""
        return cls(
            index=index,
            template_hash=entry.template_hash,
            is_violation=entry.is_violation,
            digest_algo=entry.digest_algo,
            digest=entry.digest,
            name=entry.name,
            extra=entry.extra,
            untrusted_template_name=entry.template_name,
        )


@dataclass(frozen=True, slots=True)
class VerifiedImaColumns:
    """The entries of a :class:`VerifiedImaList` as columns (what policy evaluation scans).

    Item ``k`` of each sequence belongs to ``entries[k]``.

    Attributes:
        indices: each entry's index in the list (:attr:`VerifiedImaEntry.index`).
        names: :attr:`VerifiedImaEntry.name` (without the NUL).
        digests: :attr:`VerifiedImaEntry.digest`.
        templates: :attr:`VerifiedImaEntry.untrusted_template_name`.
        violations: the positions ``k`` of violation entries.
    """

    indices: Sequence[int]
    names: Sequence[bytes]
    digests: Sequence[bytes]
    templates: Sequence[str]
    violations: Sequence[int]


class VerifiedImaList:
    """A measurement list whose PCR 10 entries replay to the expected PCR 10 values.

    Attributes:
        entries: the PCR 10 entries, in order (built on first use when :func:`replay_ima` verified
            a list from :func:`parse_ima_list`; :meth:`columns` and :meth:`entry` read them
            without building them all).
        pcr10: the bank values that were checked.
        rule: the kernel rule they replayed under.
        violations: violation entries among ``entries``.
        truncated_tail: the list ended inside one more entry, which is not covered.
        untrusted_other_pcr_entries: entries logged for other PCRs (not covered).

    Immutable and compared by value, like the frozen dataclass it replaces.
    """

    __slots__ = (
        "_entries",
        "_positions",
        "_source",
        "pcr10",
        "rule",
        "truncated_tail",
        "untrusted_other_pcr_entries",
        "violations",
    )
    pcr10: Mapping[str, bytes]
    rule: KernelRule
    violations: int
    truncated_tail: bool
    untrusted_other_pcr_entries: int
    _entries: tuple[VerifiedImaEntry, ...] | None
    _source: _Columns | None
    _positions: Sequence[int]

    def __init__(
        self,
        entries: Iterable[VerifiedImaEntry],
        pcr10: Mapping[str, bytes],
        rule: KernelRule,
        violations: int,
        truncated_tail: bool,
        untrusted_other_pcr_entries: int,
    ) -> None:
        entries = tuple(entries)
        self._init(entries, None, range(len(entries)))
        _set = object.__setattr__
        _set(self, "pcr10", pcr10)
        _set(self, "rule", rule)
        _set(self, "violations", violations)
        _set(self, "truncated_tail", truncated_tail)
        _set(self, "untrusted_other_pcr_entries", untrusted_other_pcr_entries)

    def _init(
        self,
        entries: tuple[VerifiedImaEntry, ...] | None,
        source: _Columns | None,
        positions: Sequence[int],
    ) -> None:
        _set = object.__setattr__
        _set(self, "_entries", entries)
        _set(self, "_source", source)
        _set(self, "_positions", positions)

    @classmethod
    def _of_columns(
        cls,
        source: _Columns,
        positions: Sequence[int],
        pcr10: Mapping[str, bytes],
        rule: KernelRule,
        violations: int,
        truncated_tail: bool,
    ) -> VerifiedImaList:
        out = object.__new__(cls)
        out._init(None, source, positions)
        _set = object.__setattr__
        _set(out, "pcr10", pcr10)
        _set(out, "rule", rule)
        _set(out, "violations", violations)
        _set(out, "truncated_tail", truncated_tail)
        _set(out, "untrusted_other_pcr_entries", len(source.pcrs) - len(positions))
        return out

    def __len__(self) -> int:
        """The number of entries (without building them)."""
        return len(self._positions)

    @property
    def entries(self) -> tuple[VerifiedImaEntry, ...]:
        """The PCR 10 entries, in order."""
        entries = self._entries
        if entries is None:
            entries = tuple(map(self.entry, range(len(self._positions))))
            object.__setattr__(self, "_entries", entries)
        return entries

    def entry(self, k: int) -> VerifiedImaEntry:
        """``entries[k]``, without building the others."""
        if self._entries is not None:
            return self._entries[k]
        assert self._source is not None
        index = self._positions[k]
        return VerifiedImaEntry.of(index, self._source.entry(index, 0))

    @property
    def is_columnar(self) -> bool:
        """Whether the list is kept as columns (verified by :func:`replay_ima` from a list of
        :func:`parse_ima_list`), so :meth:`columns` costs far less than :attr:`entries`."""
        return self._source is not None

    def columns(self) -> VerifiedImaColumns:
        """The entries as columns (built without building the entries when columnar)."""
        source = self._source
        if source is None:
            es = self.entries
            return VerifiedImaColumns(
                indices=[e.index for e in es],
                names=[e.name for e in es],
                digests=[e.digest for e in es],
                templates=[e.untrusted_template_name for e in es],
                violations=[k for k, e in enumerate(es) if e.is_violation],
            )
        positions = self._positions
        every = len(positions) == len(source.pcrs)
        hashes, templates = source.hashes, source.templates
        dfields, names = source.dfields, source.names
        if not every:
            hashes = [hashes[i] for i in positions]
            templates = [templates[i] for i in positions]
            dfields = [dfields[i] for i in positions]
            names = [names[i] for i in positions]
        plain_names = [n[:-1] for n in names]
        digests = [d.partition(b":\0")[2] for d in dfields]
        for k, index in enumerate(positions) if source.general else ():
            e = source.general.get(index)
            if e is not None:  # template "ima" has no "<algo>:\0" prefix
                plain_names[k], digests[k] = e.name, e.digest
        zero = _ZERO_HASH
        return VerifiedImaColumns(
            indices=positions,
            names=plain_names,
            digests=digests,
            templates=templates,
            violations=[k for k, h in enumerate(hashes) if h == zero] if zero in hashes else [],
        )

    def _key(self) -> tuple[object, ...]:
        """The constructor's arguments, in order: equality and pickling both use them."""
        return (
            self.entries,
            self.pcr10,
            self.rule,
            self.violations,
            self.truncated_tail,
            self.untrusted_other_pcr_entries,
        )

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        assert isinstance(other, VerifiedImaList)
        return self._key() == other._key()

    __hash__ = None  # type: ignore[assignment]  # pcr10 is a dict, as in the dataclass

    def __repr__(self) -> str:
        return (
            f"VerifiedImaList(entries={self.entries!r}, pcr10={self.pcr10!r}, rule={self.rule!r}, "
            f"violations={self.violations!r}, truncated_tail={self.truncated_tail!r}, "
            f"untrusted_other_pcr_entries={self.untrusted_other_pcr_entries!r})"
        )

    def __reduce__(self) -> tuple[object, ...]:  # copy and pickle, whatever the representation
        return (VerifiedImaList, self._key())  # the constructor's arguments, in order

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"VerifiedImaList is immutable: cannot set {name}")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"VerifiedImaList is immutable: cannot delete {name}")


def replay_ima(
    raw: RawImaList,
    expected_pcr10: Mapping[str, bytes],
    rule: KernelRule | str = KernelRule.V5_8,
    *,
    allow_sha1: bool = False,
) -> VerifiedImaList:
    """Verify a measurement list against PCR 10 values the caller already trusts (a quote).

    Checks, in order:

    1. every entry's template is one we decode (else UnsupportedError);
    2. for each bank in ``expected_pcr10``, the replay (:func:`replay_ima_pcr10`) equals the
       expected value, compared in constant time (else ReplayError naming each bank);
    3. every non-violation entry's logged template hash equals the one recomputed from its data
       (else ReplayError naming the first entry);
    4. the check does not rest on SHA-1 alone: a SHA-256-or-stronger bank was checked and the rule
       is ``"5.8"`` (under ``"pre-5.8"`` every bank only carries SHA-1 template hashes); otherwise
       HashAlgorithmNotAllowed, raised only when ``allow_sha1=True`` would have accepted the list.

    Args:
        raw: a parsed list.
        expected_pcr10: bank name → PCR 10 value the caller trusts.
        rule: the kernel rule, ``"5.8"`` or ``"pre-5.8"``.
        allow_sha1: accept a list whose binding to the TPM rests on SHA-1 only.

    Returns:
        The verified entries.

    Raises:
        UnsupportedError: an entry of a template we do not decode.
        ReplayError: a bank differs, or a logged template hash is wrong (``invalid_pcrs == (10,)``).
        HashAlgorithmNotAllowed: see check 4.
    """
    rule = KernelRule(rule)
    if not expected_pcr10:
        raise ValueError("expected_pcr10 names no bank")
    banks = _check_banks(expected_pcr10)
    for bank, value in expected_pcr10.items():
        if len(value) != _BANK_SIZE[bank]:
            raise ValueError(f"expected {bank} PCR 10 must be {_BANK_SIZE[bank]} bytes")
    result = replay_ima_pcr10(raw, rule, banks)
    bad = [
        f"{bank}: expected {expected_pcr10[bank].hex()}, replay gives {result.pcr10[bank].hex()}"
        for bank in banks
        if not hmac.compare_digest(result.pcr10[bank], expected_pcr10[bank])
    ]
    if bad:
        raise ReplayError(
            f"IMA list does not replay to PCR {IMA_PCR} (kernel rule {rule}, "
            f"{result.replayed} entries{', truncated tail dropped' if raw.truncated_tail else ''}; "
            f"the other rule may match): " + "; ".join(bad),
            invalid_pcrs=(IMA_PCR,),
        )
    if result.mismatched:
        first = raw.entry(result.mismatched[0])
        raise ReplayError(
            f"{result.template_hash_mismatches} IMA entries have a wrong template hash; first: "
            f"entry {result.mismatched[0]} at {raw.unit} {first.location}: logged "
            f"{first.template_hash.hex()}, data hashes to "
            f"{hashlib.sha1(first.hash_input).hexdigest()}",
            invalid_pcrs=(IMA_PCR,),
        )
    strong = any(bank != "sha1" for bank in banks)
    if not allow_sha1 and (rule is KernelRule.PRE_5_8 or not strong):
        raise HashAlgorithmNotAllowed(
            "the IMA list replays, but its binding to the TPM rests on SHA-1 only "
            f"(kernel rule {rule}, banks {', '.join(banks)}); pass allow_sha1=True to accept it"
        )
    columns = raw._columns
    if columns is not None:
        selected = _ima_positions(columns)
        hashes = columns.hashes
        positions: Sequence[int]
        if selected is None:
            positions = range(len(hashes))
            violations = hashes.count(_ZERO_HASH)
        else:
            positions = selected
            violations = sum(1 for i in positions if hashes[i] == _ZERO_HASH)
        return VerifiedImaList._of_columns(
            columns, positions, dict(result.pcr10), rule, violations, raw.truncated_tail
        )
    verified = tuple(
        VerifiedImaEntry.of(i, e) for i, e in enumerate(raw.entries) if e.pcr == IMA_PCR
    )
    return VerifiedImaList(
        entries=verified,
        pcr10=dict(result.pcr10),
        rule=rule,
        violations=sum(1 for v in verified if v.is_violation),
        truncated_tail=raw.truncated_tail,
        untrusted_other_pcr_entries=len(raw.entries) - len(verified),
    )
