"""The IMA entry model: constants, :class:`ImaEntry`, :class:`RawImaList` and its columns.

Part of :mod:`evidence.ima`, whose docstring has the theory of operation; import from there.
This module holds what the other parts share: the templates, bank tables and kernel limits, the
field shape checks an entry validates itself with, and the two forms of a parsed list (its
entries, or the ``_Columns`` the fast paths and replay work on). It imports no other part, so
parsing, encoding and replay all build on it without a cycle.
"""

from __future__ import annotations

import enum
import functools
import hashlib
import hmac
import itertools
import operator
import re
import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from evidence._algorithms import HASH_ALG_IDS, HASH_ALGS

__all__ = [
    "BANKS",
    "IMA_PCR",
    "TEMPLATES",
    "ImaEntry",
    "KernelRule",
    "RawImaList",
]

IMA_PCR = 10
"""The PCR IMA extends by default (``CONFIG_IMA_MEASURE_PCR_IDX``)."""

TEMPLATES: Mapping[str, tuple[str, ...]] = {
    "ima": ("d", "n"),
    "ima-ng": ("d-ng", "n-ng"),
    "ima-sig": ("d-ng", "n-ng", "sig"),
    "ima-buf": ("d-ng", "n-ng", "buf"),
}
"""Templates we decode, with their field lists (``ima_template.c`` ``builtin_templates``)."""

# PCR banks IMA replay computes, with sizes and hashlib names from the shared algorithm table.
_BANK_ALGS = {
    name: HASH_ALGS[HASH_ALG_IDS[name]] for name in ("sha1", "sha256", "sha384", "sha512")
}
_BANK_HASH: Mapping[str, Callable[[bytes], hashlib._Hash]] = {
    name: getattr(hashlib, alg.hashlib_name, functools.partial(hashlib.new, alg.hashlib_name))
    for name, alg in _BANK_ALGS.items()
}
_BANK_SIZE: Mapping[str, int] = {name: alg.digest_size for name, alg in _BANK_ALGS.items()}
BANKS: tuple[str, ...] = tuple(_BANK_SIZE)
"""PCR banks :func:`replay_ima_pcr10` can compute."""

# Digest sizes of the kernel's hash_algo_name[] (crypto/hash_info.c), to check d-ng shape.
_FILE_DIGEST_SIZE: Mapping[str, int] = {
    "md4": 16, "md5": 16, "sha1": 20, "rmd160": 20, "rmd256": 32, "rmd320": 40, "sha256": 32,
    "sha384": 48, "sha512": 64, "sha224": 28, "rmd128": 16, "wp256": 32, "wp384": 48, "wp512": 64,
    "tgr128": 16, "tgr160": 20, "tgr192": 24, "sm3": 32, "streebog256": 32, "streebog512": 64,
    "sha3-256": 32, "sha3-384": 48, "sha3-512": 64,
}  # fmt: skip

_TEMPLATE_HASH_SIZE = 20  # SHA-1 in the default files
_ZERO_HASH = bytes(_TEMPLATE_HASH_SIZE)
_IMA_NAME_PAD = 256  # IMA_EVENT_NAME_LEN_MAX + 1
_MAX_PCR = 23  # PC Client TPMs have PCRs 0-23
_MAX_TEMPLATE_NAME = 15  # IMA_TEMPLATE_NAME_LEN_MAX
_MAX_TEMPLATE_DATA = 16 * 1024 * 1024  # far above anything the kernel writes (a few KiB)
_U32 = struct.Struct("<I")
_ALGO_RE = re.compile(rb"[a-z0-9][a-z0-9-]{0,31}")
_TEMPLATE_NAME_RE = re.compile(rb"[!-~]{1,15}")  # printable, no space
_FILE_DIGEST_SIZE_B = {k.encode(): v for k, v in _FILE_DIGEST_SIZE.items()}
_USUAL_ALGOS = {b"sha256": 0, b"sha1": 1, b"sha512": 2, b"sha384": 3}


class KernelRule(enum.StrEnum):
    """How the kernel extended PCR 10 (``ima_queue.c`` ``ima_pcr_extend``)."""

    PRE_5_8 = "pre-5.8"
    """Every bank extended with the SHA-1 template hash, zero-padded to the bank size."""
    V5_8 = "5.8"
    """Each bank extended with ``H_bank(template data)`` (Linux >= 5.8)."""


def _field_problem(template: str, fields: tuple[bytes, ...], violation: bool) -> str | None:
    """Why ``fields`` cannot be the field data of ``template`` (None when they can)."""
    layout = TEMPLATES[template]
    if len(fields) != len(layout):
        return f"{len(layout)} fields for template {template}, got {len(fields)}"
    if template == "ima":
        if len(fields[0]) != _TEMPLATE_HASH_SIZE:
            return f"a 20-byte d field, got {len(fields[0])} bytes"
        return _name_problem("n", fields[1])
    return _dng_problem(fields[0], violation) or _name_problem("n-ng", fields[1])


def _dng_problem(data: bytes, violation: bool) -> str | None:
    """``b"<algo>:\\0" + digest``: a known algorithm fixes the size, a violation zeroes it."""
    sep = data.find(b":\0")
    algo = data[:sep]
    known = _FILE_DIGEST_SIZE_B.get(algo)
    if sep < 0 or (known is None and not _ALGO_RE.fullmatch(algo)):
        return 'a d-ng field "<algo>:\\0<digest>"'
    digest_len = len(data) - sep - 2
    if violation:
        if digest_len > 64 or data.count(0, sep + 2) != digest_len:
            return "an all-zero d-ng digest in a violation entry"
    elif known is not None and digest_len != known:
        return f"a {known}-byte {algo.decode()} digest, got {digest_len} bytes"
    return None


def _name_problem(fid: str, data: bytes) -> str | None:
    """A name as the kernel stores it: NUL-terminated, no inner NUL, no newline."""
    if data[-1:] != b"\0" or data.find(0, 0, len(data) - 1) >= 0:
        return f"a NUL-terminated {fid} name without inner NUL"
    if b"\n" in data:
        return f"a {fid} name without a newline"
    if fid == "n" and len(data) > _IMA_NAME_PAD:
        return f"an n name of at most {_IMA_NAME_PAD - 1} bytes, got {len(data) - 1}"
    return None


class _FieldError(ValueError):
    """Field data that cannot belong to the template; the parser turns it into a ParseError."""

    def __init__(self, problem: str) -> None:
        self.problem = problem
        super().__init__(f"template data: expected {problem}")


@dataclass(frozen=True, slots=True)
class ImaEntry:
    """One measurement list entry, as logged (untrusted until :func:`replay_ima`).

    Attributes:
        pcr: the PCR the entry claims to extend.
        template_hash: the logged SHA-1 template hash (all zero for a violation).
        template_name: the template, e.g. ``"ima-ng"``.
        fields: the template's field data as the kernel holds it (empty if not ``supported``).
        location: byte offset of the entry (binary list) or 1-based line number (ASCII list).
    """

    pcr: int
    template_hash: bytes
    template_name: str
    fields: tuple[bytes, ...] = ()
    location: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.pcr <= _MAX_PCR:
            raise ValueError(f"pcr must be 0..{_MAX_PCR}, got {self.pcr}")
        if len(self.template_hash) != _TEMPLATE_HASH_SIZE:
            raise ValueError(f"template_hash must be 20 bytes, got {len(self.template_hash)}")
        if self.template_name not in TEMPLATES and not _TEMPLATE_NAME_RE.fullmatch(
            self.template_name.encode("ascii", "replace")
        ):
            raise ValueError(f"bad template name {self.template_name!r}")
        if self.supported:
            problem = _field_problem(self.template_name, self.fields, self.is_violation)
            if problem is not None:
                raise _FieldError(problem)
        elif self.fields:
            raise ValueError(f"fields given for unsupported template {self.template_name}")

    @property
    def supported(self) -> bool:
        """Whether the template is one of ``TEMPLATES`` (decoded and replayable)."""
        return self.template_name in TEMPLATES

    @property
    def is_violation(self) -> bool:
        """A ToMToU/open-writers violation: logged with an all-zero template hash."""
        return self.template_hash == _ZERO_HASH

    @property
    def digest_algo(self) -> str:
        """The file (or buffer) digest algorithm: ``"sha1"`` for template ``ima``."""
        self._require_supported()
        if self.template_name == "ima":
            return "sha1"
        return self.fields[0][: self.fields[0].index(b":\0")].decode("ascii")

    @property
    def digest(self) -> bytes:
        """The file (or buffer) digest."""
        self._require_supported()
        if self.template_name == "ima":
            return self.fields[0]
        return self.fields[0][self.fields[0].index(b":\0") + 2 :]

    @property
    def name(self) -> bytes:
        """The file path or event name (without the NUL)."""
        self._require_supported()
        return self.fields[1][:-1]

    @property
    def extra(self) -> bytes:
        """The third field (``sig`` of ima-sig, ``buf`` of ima-buf), else empty."""
        self._require_supported()
        return self.fields[2] if len(self.fields) > 2 else b""

    @property
    def hash_input(self) -> bytes:
        """The bytes the template hash covers (``ima_calc_field_array_hash_tfm``)."""
        self._require_supported()
        if self.template_name == "ima":
            return self.fields[0] + self.fields[1].ljust(_IMA_NAME_PAD, b"\0")
        return b"".join([_U32.pack(len(f)) + f for f in self.fields])

    def template_hash_ok(self) -> bool:
        """Whether the logged template hash matches the template data (True for violations)."""
        if self.is_violation:
            return True
        return hmac.compare_digest(hashlib.sha1(self.hash_input).digest(), self.template_hash)

    def _require_supported(self) -> None:
        if not self.supported:
            raise ValueError(f"template {self.template_name} is not decoded")


def _unchecked_entry(
    pcr: int, template_hash: bytes, template: str, fields: tuple[bytes, ...], location: int
) -> ImaEntry:
    """An ImaEntry whose parts the fast parser already checked (skips ``__post_init__``)."""
    e = object.__new__(ImaEntry)
    _set = object.__setattr__
    _set(e, "pcr", pcr)
    _set(e, "template_hash", template_hash)
    _set(e, "template_name", template)
    _set(e, "fields", fields)
    _set(e, "location", location)
    return e


@dataclass(frozen=True, slots=True)
class _Columns:
    """A parsed list as columns, one item per complete entry (what the fast paths work on).

    ``general`` holds the entries kept whole: those the fast parser left to the general one
    (template ``ima``, a signed ``ima-sig``, an unsupported template …) and ASCII ones with a
    non-empty third field; their column items are filled from them too (so the bulk checks
    hold), with ``inputs``/``dfields``/``names`` ``b""`` for an unsupported template.
    ``sizes`` are the binary entries' sizes less ``32 + len(template name)`` (pcr, template
    hash, two lengths, the name), None for ASCII (one entry per line).
    """

    pcrs: Sequence[int]
    hashes: Sequence[bytes]  # logged template hashes
    templates: Sequence[str]
    inputs: Sequence[bytes]  # template hash inputs (the template data for d-ng templates)
    dfields: Sequence[bytes]  # first field: d-ng data (or d)
    names: Sequence[bytes]  # second field, with its NUL
    general: Mapping[int, ImaEntry]
    sizes: Sequence[int] | None

    def size(self) -> int:
        """The bytes the entries take (binary)."""
        assert self.sizes is not None
        return 32 * len(self.sizes) + sum(map(len, self.templates)) + sum(self.sizes)

    def location(self, index: int) -> int:
        if self.sizes is None:
            return index + 1
        return 32 * index + sum(map(len, self.templates[:index])) + sum(self.sizes[:index])

    def entry(self, index: int, location: int | None = None) -> ImaEntry:
        e = self.general.get(index)
        if e is not None:
            return e
        template = self.templates[index]
        fields: tuple[bytes, ...] = (self.dfields[index], self.names[index])
        if template != "ima-ng":
            fields += (b"",)
        loc = self.location(index) if location is None else location
        return _unchecked_entry(self.pcrs[index], self.hashes[index], template, fields, loc)

    def entries(self) -> tuple[ImaEntry, ...]:
        if self.sizes is None:
            locations: Iterable[int] = range(1, len(self.pcrs) + 1)
        else:
            sizes = map(operator.add, map(len, self.templates), self.sizes)
            locations = itertools.accumulate((32 + s for s in sizes), initial=0)
        return tuple(map(self.entry, range(len(self.pcrs)), locations))

    def prefix(self, n: int) -> _Columns:
        return _Columns(
            self.pcrs[:n],
            self.hashes[:n],
            self.templates[:n],
            self.inputs[:n],
            self.dfields[:n],
            self.names[:n],
            {i: e for i, e in self.general.items() if i < n},
            None if self.sizes is None else self.sizes[:n],
        )


class RawImaList:
    """A parsed, unverified measurement list.

    Attributes:
        format: ``"ascii"`` or ``"binary"``.
        entries: the complete entries, in list order (built on first use when the list came
            from :func:`parse_ima_list`, whose fast path keeps columns instead).
        truncated_tail: the input ended inside one more entry, which was dropped.
        truncated_at: offset (binary) or line number (ASCII) of that entry, else None.

    Immutable and compared by value, like the frozen dataclass it replaces.
    """

    __slots__ = ("_columns", "_entries", "format", "truncated_at", "truncated_tail")
    format: Literal["ascii", "binary"]
    truncated_tail: bool
    truncated_at: int | None
    _entries: tuple[ImaEntry, ...] | None
    _columns: _Columns | None

    def __init__(
        self,
        format: Literal["ascii", "binary"],
        entries: Iterable[ImaEntry],
        truncated_tail: bool = False,
        truncated_at: int | None = None,
    ) -> None:
        self._init(format, tuple(entries), None, truncated_tail, truncated_at)

    def _init(
        self,
        format: Literal["ascii", "binary"],
        entries: tuple[ImaEntry, ...] | None,
        columns: _Columns | None,
        truncated_tail: bool,
        truncated_at: int | None,
    ) -> None:
        _set = object.__setattr__
        _set(self, "format", format)
        _set(self, "_entries", entries)
        _set(self, "_columns", columns)
        _set(self, "truncated_tail", truncated_tail)
        _set(self, "truncated_at", truncated_at)

    @classmethod
    def _of_columns(
        cls,
        format: Literal["ascii", "binary"],
        columns: _Columns,
        truncated_tail: bool = False,
        truncated_at: int | None = None,
    ) -> RawImaList:
        raw = object.__new__(cls)
        raw._init(format, None, columns, truncated_tail, truncated_at)
        return raw

    @property
    def entries(self) -> tuple[ImaEntry, ...]:
        """The complete entries, in list order."""
        entries = self._entries
        if entries is None:
            assert self._columns is not None
            entries = self._columns.entries()
            object.__setattr__(self, "_entries", entries)
        return entries

    def __len__(self) -> int:
        """The number of complete entries (without building them)."""
        if self._columns is not None:
            return len(self._columns.pcrs)
        assert self._entries is not None
        return len(self._entries)

    def entry(self, index: int) -> ImaEntry:
        """Entry ``index`` (without building the others)."""
        if self._entries is None and self._columns is not None:
            return self._columns.entry(index)
        return self.entries[index]

    def prefix(self, n: int) -> RawImaList:
        """The list of the first ``n`` complete entries (no truncated tail)."""
        if self._columns is not None:
            return RawImaList._of_columns(self.format, self._columns.prefix(n))
        return RawImaList(self.format, self.entries[:n])

    @property
    def unit(self) -> str:
        """``"offset"`` or ``"line"``: what :attr:`ImaEntry.location` counts."""
        return "line" if self.format == "ascii" else "offset"

    def _key(self) -> tuple[object, ...]:
        return (self.format, self.entries, self.truncated_tail, self.truncated_at)

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        assert isinstance(other, RawImaList)
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        return (
            f"RawImaList(format={self.format!r}, entries={self.entries!r}, "
            f"truncated_tail={self.truncated_tail!r}, truncated_at={self.truncated_at!r})"
        )

    def __reduce__(self) -> tuple[object, ...]:  # copy and pickle, whatever the representation
        return (RawImaList, (self.format, self.entries, self.truncated_tail, self.truncated_at))

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"RawImaList is immutable: cannot set {name}")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"RawImaList is immutable: cannot delete {name}")
