"""Linux IMA runtime measurement lists: parse, encode, replay PCR 10.

Theory of operation (protocols.md §6.2; sources: torvalds/linux ``security/integrity/ima/``
``ima_fs.c`` (``ima_measurements_show``, ``ima_ascii_measurements_show``), ``ima_template.c``
(built-in templates), ``ima_template_lib.c`` (field formats), ``ima_crypto.c``
(``ima_calc_field_array_hash_tfm``), ``ima_queue.c`` and ``ima_api.c`` (PCR extension,
``ima_add_violation``); keylime ``keylime/ima/ast.py`` for the verifier rules):

* An entry is ``pcr, template hash, template name, template data``; the template data is a list of
  fields whose layout the template names. Supported templates (``TEMPLATES``): ``ima`` = ``d|n``,
  ``ima-ng`` = ``d-ng|n-ng``, ``ima-sig`` = ``d-ng|n-ng|sig``, ``ima-buf`` = ``d-ng|n-ng|buf``.
* Field data as the kernel holds it: ``d`` is a raw 20-byte digest, ``d-ng`` is
  ``b"<algo>:\\0" + digest``, ``n``/``n-ng`` is the name plus a terminating NUL (spaces already
  replaced by ``_``), ``sig``/``buf`` are raw bytes, possibly empty.
* The template hash (what :attr:`ImaEntry.hash_input` returns) is ``H(for each field:
  u32le(len) + data)``; for ``ima`` there is no length prefix and ``n`` is zero-padded to 256 bytes.
* The default files log the SHA-1 template hash. Linux >= 5.8 extends each PCR bank with
  ``H_bank(hash input)`` (rule ``"5.8"``); older kernels extended every bank with the SHA-1 template
  hash zero-padded to the bank size (rule ``"pre-5.8"``).
* A violation is logged with an all-zero template hash; the PCR was extended with ``0xFF`` bytes
  (bank size since 5.8; before, 20 bytes zero-padded like every digest), and the template hash
  check is skipped for it.
* Seen on a real kernel (tests/vectors/ima): a bank whose hash the kernel could not compute when
  IMA started (Debian 6.1: ``CONFIG_CRYPTO_SHA512=m``, so sha384/sha512) gets the padded SHA-1
  template hash even under the 5.8 rule; ``replay_ima_pcr10(kernel_hashless_banks=…)`` models it.

Decisions:

* Templates we do not decode (``ima-ngv2``, ``ima-sigv2``, ``ima-modsig``, ``evm-sig`` and unknown
  names) are kept as entries with ``supported=False`` and no fields, so ``ima show`` can list them;
  any replay of a list holding one raises :class:`~evidence.errors.UnsupportedError` naming the
  entry. A list with such an entry never yields a PCR value.
* A truncated final entry sets ``truncated_tail`` and is dropped; replay covers the complete
  entries only. "Truncated" means the input ends inside an entry whose length fields read so far are
  within the kernel's limits and agree with each other; a length past those limits or inconsistent
  with the data present is a :class:`~evidence.errors.ParseError`. In ASCII, a last line without
  its newline is the truncated entry.
* Only the default ``ascii_runtime_measurements`` / ``binary_runtime_measurements`` files (SHA-1
  template hash) are handled; the per-bank ``_<algo>`` files of Linux >= 6.10 are not.
* Speed (issue 7): :func:`parse_ima_list` keeps the entries as columns (template data, d-ng and
  name fields, …), matched in bulk by one regular expression for the common entries (d-ng
  templates, a known digest algorithm, an empty third field in binary); any other entry goes
  through the general entry parser, and a column check that fails hands the whole input to it,
  so entries and errors are the general parser's. :func:`replay_ima_pcr10`, :func:`replay_ima`
  and :func:`signed_prefix` work on the columns; ``entries`` of :class:`RawImaList` and
  :class:`VerifiedImaList` are built only when read. A list built from entries takes the general
  path everywhere; ``tests/unit/test_ima_fastpath.py`` compares the two.
"""

from __future__ import annotations

import binascii
import enum
import functools
import hashlib
import hmac
import itertools
import operator
import re
import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, cast

from evidence._algorithms import HASH_ALG_IDS, HASH_ALGS
from evidence.errors import (
    HashAlgorithmNotAllowed,
    ParseError,
    ReplayError,
    TruncatedError,
    UnsupportedError,
)

__all__ = [
    "BANKS",
    "IMA_PCR",
    "TEMPLATES",
    "ImaEntry",
    "ImaReplay",
    "KernelRule",
    "RawImaList",
    "VerifiedImaColumns",
    "VerifiedImaEntry",
    "VerifiedImaList",
    "encode_ascii",
    "encode_binary",
    "parse_ima_list",
    "replay_ima",
    "replay_ima_pcr10",
    "signed_prefix",
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


# --------------------------------------------------------------------------------------------
# Parsing


def parse_ima_list(data: bytes, format: Literal["auto", "ascii", "binary"] = "auto") -> RawImaList:
    """Parse an IMA runtime measurement list.

    Args:
        data: the contents of ``binary_runtime_measurements`` or ``ascii_runtime_measurements``.
        format: ``"auto"`` tells them apart by the first byte (ASCII lines start with a digit or
            the space of ``%2d``; a binary list starts with a little-endian PCR index below 24).

    Returns:
        The entries, not verified: only :func:`replay_ima` says they are what the TPM measured.

    Raises:
        ParseError: malformed input, naming the byte offset (binary) or the line (ASCII).
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise TypeError(f"parse_ima_list needs bytes, got {type(data).__name__}")
    data = bytes(data)
    if format == "auto":
        format = "ascii" if data[:1] and data[:1] in b" 0123456789" else "binary"
    if format == "ascii":
        return _parse_ascii_fast(data)
    if format == "binary":
        return _parse_binary_fast(data)
    raise ValueError(f"format must be 'auto', 'ascii' or 'binary', got {format!r}")


def _parse_binary(data: bytes) -> RawImaList:
    entries: list[ImaEntry] = []
    pos = 0
    while pos < len(data):
        start = pos
        try:
            entry, pos = _parse_binary_entry(data, pos)
        except TruncatedError:
            return RawImaList("binary", tuple(entries), truncated_tail=True, truncated_at=start)
        entries.append(entry)
    return RawImaList("binary", tuple(entries))


# The fast path (issue 7): the common entries (d-ng templates with a known digest algorithm and an
# empty third field) are matched in bulk by one regular expression and checked column-wise; an
# entry it does not match goes through _parse_binary_entry. Any column check that fails means the
# general parser would raise: the whole input is then parsed by _parse_binary, so results and
# errors are those of the general path by construction (tests/unit/test_ima_fastpath.py).
# the usual algorithms first: the regex engine tries the alternatives in this order
_FAST_ALGOS = sorted(
    ((a.encode(), n) for a, n in _FILE_DIGEST_SIZE.items()),
    key=lambda item: (_USUAL_ALGOS.get(item[0], len(_USUAL_ALGOS)), item[0]),
)
# the d-ng length, pinned by the algorithm that follows it; then the d-ng field
_FAST_DNG_LEN = b"|".join(
    re.escape(_U32.pack(len(a) + 2 + n)) + b"(?=" + re.escape(a) + b":\x00)" for a, n in _FAST_ALGOS
)
_FAST_DNG = b"|".join(re.escape(a) + b":\x00.{%d}" % n for a, n in _FAST_ALGOS)
_FAST_BINARY = re.compile(
    rb"([\x00-\x17])\x00\x00\x00"  # 1 pcr 0..23
    rb"(.{20})"  # 2 template hash
    rb"(?:\x06\x00\x00\x00ima-ng|\x07\x00\x00\x00ima-(sig|buf))"  # 3 b"" for ima-ng
    rb"(.{4})"  # 4 template data length
    rb"((?:" + _FAST_DNG_LEN + rb")(" + _FAST_DNG + rb")"  # 5 template data, 6 d-ng
    rb"(.{4})([^\x00\n]*\x00)"  # 7 n-ng length, 8 n-ng (NUL-terminated, no NUL or newline)
    rb"(?(3)\x00\x00\x00\x00))",  # an empty sig/buf field
    re.DOTALL,
)
_FAST_STEP = 1 + _FAST_BINARY.groups  # what one match adds to _FAST_BINARY.split()
_FAST_PROBE = 16  # entries matched one by one before the whole list is split
# ima-sig/ima-buf with a non-empty third field (a signed file): the regex reads up to that
# field's length, _third_field_entry slices the field by it. Violations go the general way.
_FAST_THIRD = re.compile(
    rb"([\x00-\x17])\x00\x00\x00"  # 1 pcr 0..23
    rb"((?!\x00{20}).{20})"  # 2 template hash, not a violation's
    rb"\x07\x00\x00\x00ima-(sig|buf)"  # 3
    rb"(.{4})"  # 4 template data length
    rb"(?:" + _FAST_DNG_LEN + rb")(" + _FAST_DNG + rb")"  # 5 d-ng
    rb"(.{4})([^\x00\n]*\x00)"  # 6 n-ng length, 7 n-ng
    rb"(.{4})",  # 8 length of the third field
    re.DOTALL,
)
_FAST_TEMPLATES = {None: "ima-ng", b"": "ima-ng", b"sig": "ima-sig", b"buf": "ima-buf"}
_Row = tuple[bytes | None, ...]


def _general_row(e: ImaEntry) -> _Row:
    """A column row for an entry the general parser built (consistent with the bulk checks)."""
    if e.supported:
        hi, d, n = e.hash_input, e.fields[0], e.fields[1]
    else:
        hi = d = n = b""
    return (bytes([e.pcr]), e.template_hash, b"", _U32.pack(len(hi)), hi, d, _U32.pack(len(n)), n)


def _third_field_entry(data: bytes, m: re.Match[bytes]) -> tuple[ImaEntry, _Row, int] | None:
    """The entry :data:`_FAST_THIRD` matched, its column row and the next offset; None when
    its lengths do not add up (the general parser then reads, or refuses, it)."""
    pcr_b, th, kind, td_len_b, d, n_len_b, n, x_len_b = m.groups()
    td_start = m.start(5) - 4
    (td_len,) = _U32.unpack(td_len_b)
    (n_len,) = _U32.unpack(n_len_b)
    (x_len,) = _U32.unpack(x_len_b)
    nxt = td_start + td_len
    if n_len != len(n) or m.end() + x_len != nxt or td_len > _MAX_TEMPLATE_DATA:
        return None
    if nxt > len(data):
        return None
    fields = (d, n, data[m.end() : nxt])
    entry = _unchecked_entry(pcr_b[0], th, _FAST_TEMPLATES[kind], fields, m.start())
    return entry, (pcr_b, th, kind, td_len_b, data[td_start:nxt], d, n_len_b, n), nxt


def _parse_binary_fast(data: bytes) -> RawImaList:
    """:func:`_parse_binary` with the same result and errors, column-wise (see above)."""
    # A list that is not all common would make split() try the regex at every byte of the
    # other entries: look at the first entries one by one first.
    match = _FAST_BINARY.match
    pos = 0
    for _ in range(_FAST_PROBE):
        m = match(data, pos)
        if m is None:
            break
        pos = m.end()
    if m is not None or pos == len(data):
        # split() returns the text between matches and every group of each match in one flat
        # list (no tuple per entry for the garbage collector to count): column c is parts[c::9]
        parts = _FAST_BINARY.split(data)
        if not b"".join(parts[::_FAST_STEP]):  # nothing before, between or after: all common
            columns = _fast_columns([parts[c::_FAST_STEP] for c in range(1, _FAST_STEP)], {}, {})
            if columns is None:
                return _parse_binary(data)
            return RawImaList._of_columns("binary", columns)
    # runs of common entries, and the others one by one
    rows: list[_Row] = []
    general: dict[int, ImaEntry] = {}
    general_sizes: dict[int, int] = {}
    truncated_at: int | None = None
    pos, end = 0, len(data)
    match_third = _FAST_THIRD.match
    while pos < end:
        m = match(data, pos)
        if m is not None:
            rows.append(m.groups())
            pos = m.end()
            continue
        m = match_third(data, pos)
        found = None if m is None else _third_field_entry(data, m)
        if found is not None:
            entry, row, nxt = found
            general[len(rows)] = entry
            general_sizes[len(rows)] = nxt - pos - 32 - len(entry.template_name)
            rows.append(row)
            pos = nxt
            continue
        try:
            entry, nxt = _parse_binary_entry(data, pos)
        except TruncatedError:
            truncated_at = pos
            break
        except ParseError:  # the general parser may stop earlier, at an entry of a run
            return _parse_binary(data)
        general[len(rows)] = entry
        general_sizes[len(rows)] = nxt - pos - 32 - len(entry.template_name)
        rows.append(_general_row(entry))
        pos = nxt
    columns = _fast_columns(list(zip(*rows, strict=True)), general, general_sizes)
    if columns is None:
        return _parse_binary(data)
    if truncated_at is not None:
        return RawImaList._of_columns("binary", columns, True, truncated_at)
    return RawImaList._of_columns("binary", columns)


def _fast_columns(
    columns: Sequence[Sequence[bytes | None]],
    general: dict[int, ImaEntry],
    general_sizes: dict[int, int],
) -> _Columns | None:
    """The columns of :data:`_FAST_BINARY`'s groups, or None when a length or a violation
    digest is not right (the general parser would raise)."""
    if not columns or not columns[0]:
        return _Columns((), (), (), (), (), (), general, ())
    pcr_b, hashes, kinds, td_lens, tds, ds, n_lens, ns = cast("list[Sequence[bytes]]", columns)
    pack = struct.Struct(f"<{len(pcr_b)}I").pack
    td_sizes = list(map(len, tds))
    if (
        b"".join(td_lens) != pack(*td_sizes)
        or b"".join(n_lens) != pack(*map(len, ns))
        or max(td_sizes) > _MAX_TEMPLATE_DATA
    ):
        return None
    if _ZERO_HASH in hashes:  # violations: the d-ng digest must be all zero
        for i, h in enumerate(hashes):
            if h == _ZERO_HASH and i not in general:
                digest = ds[i].partition(b":\0")[2]
                if digest.count(0) != len(digest):
                    return None
    templates = list(map(_FAST_TEMPLATES.__getitem__, kinds))
    for i, e in general.items():
        templates[i] = e.template_name
        td_sizes[i] = general_sizes[i]
    return _Columns(
        pcrs=list(map(ord, pcr_b)),
        hashes=hashes,
        templates=templates,
        inputs=tds,
        dfields=ds,
        names=ns,
        general=general,
        sizes=td_sizes,
    )


def _need(data: bytes, pos: int, n: int, what: str) -> None:
    if len(data) - pos < n:
        raise TruncatedError(what, pos, f"{n} bytes", f"{len(data) - pos} bytes before the end")


_KNOWN_NAMES = {name.encode(): name for name in TEMPLATES}


def _parse_binary_entry(data: bytes, pos: int) -> tuple[ImaEntry, int]:
    """One entry of ``ima_measurements_show`` at ``pos``; returns it and the next offset.

    TruncatedError means the input ran out inside the entry (every length so far plausible).
    """
    start = pos
    _need(data, pos, 4, "IMA entry pcr")
    (pcr,) = _U32.unpack_from(data, pos)
    if pcr > _MAX_PCR:
        raise ParseError("IMA entry pcr", pos, f"a PCR index 0..{_MAX_PCR}", str(pcr))
    pos += 4
    _need(data, pos, _TEMPLATE_HASH_SIZE, "IMA entry template hash")
    template_hash = data[pos : pos + _TEMPLATE_HASH_SIZE]
    pos += _TEMPLATE_HASH_SIZE
    _need(data, pos, 4, "IMA entry template name length")
    (name_len,) = _U32.unpack_from(data, pos)
    if not 1 <= name_len <= _MAX_TEMPLATE_NAME:
        raise ParseError(
            "IMA entry template name length", pos, f"1..{_MAX_TEMPLATE_NAME}", str(name_len)
        )
    pos += 4
    _need(data, pos, name_len, "IMA entry template name")
    raw_name = data[pos : pos + name_len]
    template = _KNOWN_NAMES.get(raw_name)
    if template is None:
        if not _TEMPLATE_NAME_RE.fullmatch(raw_name):
            raise ParseError("IMA entry template name", pos, "printable ASCII", _quote(raw_name))
        template = raw_name.decode("ascii")
    pos += name_len
    at = pos
    if template == "ima":
        _need(data, pos, _TEMPLATE_HASH_SIZE, "IMA 'ima' entry d field")
        d = data[pos : pos + _TEMPLATE_HASH_SIZE]
        pos += _TEMPLATE_HASH_SIZE
        _need(data, pos, 4, "IMA 'ima' entry name length")
        (n_len,) = _U32.unpack_from(data, pos)
        if n_len >= _IMA_NAME_PAD:
            raise ParseError("IMA 'ima' entry name length", pos, "at most 255", str(n_len))
        pos += 4
        _need(data, pos, n_len, "IMA 'ima' entry name")
        fields: tuple[bytes, ...] = (d, data[pos : pos + n_len] + b"\0")
        pos += n_len
    else:
        _need(data, pos, 4, "IMA entry template data length")
        (td_len,) = _U32.unpack_from(data, pos)
        if td_len > _MAX_TEMPLATE_DATA:
            raise ParseError(
                "IMA entry template data length", pos, f"at most {_MAX_TEMPLATE_DATA}", str(td_len)
            )
        pos += 4
        at = pos
        if td_len > len(data) - pos:
            if template in TEMPLATES:
                _check_partial_fields(data[pos:], td_len, template, pos)
            _need(data, pos, td_len, "IMA entry template data")
        td = data[pos : pos + td_len]
        pos += td_len
        if template not in TEMPLATES:
            return ImaEntry(pcr, template_hash, template, (), start), pos
        fields = _split_fields(td, template, at)
    try:
        return ImaEntry(pcr, template_hash, template, fields, start), pos
    except _FieldError as err:
        raise ParseError(f"IMA {template} entry template data", at, err.problem) from None


def _split_fields(td: bytes, template: str, at: int) -> tuple[bytes, ...]:
    """Split template data into its ``u32le len + data`` fields; they must fill it exactly."""
    out: list[bytes] = []
    pos = 0
    for fid in TEMPLATES[template]:
        if len(td) - pos < 4:
            raise ParseError(f"IMA {template} field {fid} length", at + pos, "4 bytes in the data")
        (flen,) = _U32.unpack_from(td, pos)
        if flen > len(td) - pos - 4:
            raise ParseError(
                f"IMA {template} field {fid}",
                at + pos,
                f"at most {len(td) - pos - 4} bytes (template data length)",
                str(flen),
            )
        out.append(td[pos + 4 : pos + 4 + flen])
        pos += 4 + flen
    if pos != len(td):
        raise ParseError(
            f"IMA {template} template data", at + pos, "end of template data", f"{len(td) - pos}"
        )
    return tuple(out)


def _check_partial_fields(present: bytes, td_len: int, template: str, at: int) -> None:
    """Template data cut by the end of input: the field lengths present must fit ``td_len``."""
    pos = 0
    for fid in TEMPLATES[template]:
        if len(present) - pos < 4:
            return
        (flen,) = _U32.unpack_from(present, pos)
        if pos + 4 + flen > td_len:
            raise ParseError(
                f"IMA {template} field {fid}",
                at + pos,
                f"at most {td_len - pos - 4} bytes (template data length)",
                str(flen),
            )
        pos += 4 + flen
    if pos != td_len:
        raise ParseError(
            "IMA entry template data length",
            at - 4,
            f"{pos} (the sum of its fields)",
            f"{td_len}, past the end of the input",
        )


def _parse_ascii(data: bytes) -> RawImaList:
    lines = data.split(b"\n")
    tail = lines.pop()  # b"" when the data ends with a newline
    entries = [_parse_ascii_line(line, no + 1) for no, line in enumerate(lines)]
    if tail:
        _check_ascii_prefix(tail, len(lines) + 1)
        return RawImaList("ascii", tuple(entries), truncated_tail=True, truncated_at=len(lines) + 1)
    return RawImaList("ascii", tuple(entries))


# ASCII lines of the common shape: the d-ng hex length is pinned by a lookahead on the algorithm.
_FAST_ASCII_ALGO = b"|".join(re.escape(a) + b"(?=:[0-9a-f]{%d} )" % (2 * n) for a, n in _FAST_ALGOS)
_FAST_ASCII_LINE = (
    rb" ?(2[0-3]|[01]?[0-9])"  # 1 pcr 0..23 ("%2d")
    rb" ([0-9a-f]{40})"  # 2 template hash
    rb" ima-(?:ng|(sig|buf))"  # 3 None for ima-ng
    rb" (" + _FAST_ASCII_ALGO + rb"):([0-9a-f]+)"  # 4 algorithm, 5 digest
    rb" ([^ \x00\n]+)"  # 6 name
    rb"(?(3) ((?:[0-9a-f]{2})*))"  # 7 sig/buf
)
_FAST_ASCII = re.compile(_FAST_ASCII_LINE)  # one line
_FAST_ASCII_LINES = re.compile(_FAST_ASCII_LINE + rb"\n")  # for split(): step 8, like binary
_EMPTY_THIRD = {None: b"", b"sig": b"\0\0\0\0", b"buf": b"\0\0\0\0"}  # u32le(0)


def _parse_ascii_bulk(data: bytes) -> RawImaList | None:
    """Columns of a list whose lines are all common, with an empty third field, and end with
    a newline; None for any other list (then :func:`_parse_ascii_fast` goes line by line)."""
    parts = _FAST_ASCII_LINES.split(data)
    step = 1 + _FAST_ASCII_LINES.groups
    if b"".join(parts[::step]):
        return None  # a line of another shape, or no final newline
    pcr_t, th_hex, kinds, algos, digest_hex, plain_names, extra_hex = (
        parts[c::step] for c in range(1, step)
    )
    if any(extra_hex):
        return None
    unhex, add, pack = binascii.unhexlify, operator.add, _U32.pack
    hashes = list(map(unhex, th_hex))
    digests = list(map(unhex, digest_hex))
    if _ZERO_HASH in hashes:  # violations: the d-ng digest must be all zero
        for h, digest in zip(hashes, digests, strict=True):
            if h == _ZERO_HASH and digest.strip(b"\0"):
                return None
    dfields = list(map(add, map(add, algos, itertools.repeat(b":\0")), digests))
    names = list(map(add, plain_names, itertools.repeat(b"\0")))
    inputs = list(
        map(
            add,
            map(
                b"".join,
                zip(
                    map(pack, map(len, dfields)),
                    dfields,
                    map(pack, map(len, names)),
                    names,
                    strict=True,
                ),
            ),
            map(_EMPTY_THIRD.__getitem__, kinds),
        )
    )
    templates = list(map(_FAST_TEMPLATES.__getitem__, kinds))
    columns = _Columns(list(map(int, pcr_t)), hashes, templates, inputs, dfields, names, {}, None)
    return RawImaList._of_columns("ascii", columns)


def _parse_ascii_fast(data: bytes) -> RawImaList:
    """:func:`_parse_ascii` with the same result and errors: in bulk when every line is
    common, else line by line: common lines are matched by :data:`_FAST_ASCII` and go into
    columns, any other line is parsed (or refused) by :func:`_parse_ascii_line`, in order, so
    the first error is the general parser's."""
    bulk = _parse_ascii_bulk(data)
    if bulk is not None:
        return bulk
    lines = data.split(b"\n")
    tail = lines.pop()  # b"" when the data ends with a newline
    pcrs: list[int] = []
    hashes: list[bytes] = []
    templates: list[str] = []
    inputs: list[bytes] = []
    dfields: list[bytes] = []
    names: list[bytes] = []
    general: dict[int, ImaEntry] = {}
    fullmatch, unhex, u32, zero = _FAST_ASCII.fullmatch, binascii.unhexlify, _U32.pack, _ZERO_HASH
    for index, line in enumerate(lines):
        m = fullmatch(line)
        if m is not None:
            pcr, th_hex, kind, algo, digest_hex, name, extra_hex = m.groups()
            th = unhex(th_hex)
            digest = unhex(digest_hex)
            if th != zero or not digest.strip(b"\0"):
                d = algo + b":\0" + digest
                n = name + b"\0"
                pcr_no = int(pcr)
                pcrs.append(pcr_no)
                hashes.append(th)
                dfields.append(d)
                names.append(n)
                if kind is None:
                    templates.append("ima-ng")
                    inputs.append(u32(len(d)) + d + u32(len(n)) + n)
                    continue
                x = unhex(extra_hex)
                template = _FAST_TEMPLATES[kind]
                templates.append(template)
                inputs.append(u32(len(d)) + d + u32(len(n)) + n + u32(len(x)) + x)
                if x:  # the columns have no third field: keep the entry whole
                    general[index] = _unchecked_entry(pcr_no, th, template, (d, n, x), index + 1)
                continue
        e = _parse_ascii_line(line, index + 1)
        general[index] = e
        pcrs.append(e.pcr)
        hashes.append(e.template_hash)
        templates.append(e.template_name)
        if e.supported:
            inputs.append(e.hash_input)
            dfields.append(e.fields[0])
            names.append(e.fields[1])
        else:
            inputs.append(b"")
            dfields.append(b"")
            names.append(b"")
    columns = _Columns(pcrs, hashes, templates, inputs, dfields, names, general, None)
    if tail:
        _check_ascii_prefix(tail, len(lines) + 1)
        return RawImaList._of_columns("ascii", columns, True, len(lines) + 1)
    return RawImaList._of_columns("ascii", columns)


def _quote(b: bytes) -> str:
    return repr(b[:80].decode("ascii", "backslashreplace"))


def _unhex(token: bytes, what: str, line: int) -> bytes:
    try:
        return binascii.unhexlify(token)
    except binascii.Error:
        raise ParseError(what, line, "hex digits", _quote(token), unit="line") from None


def _ascii_head(tokens: list[bytes], line: int) -> tuple[int, bytes, str]:
    if not tokens[0].isdigit() or len(tokens[0]) > 2 or int(tokens[0]) > _MAX_PCR:
        raise ParseError(
            "IMA line pcr", line, f"0..{_MAX_PCR}", _quote(tokens[0][:80]), unit="line"
        )
    if len(tokens[1]) != 2 * _TEMPLATE_HASH_SIZE:
        raise ParseError(
            "IMA line template hash", line, "40 hex digits", _quote(tokens[1][:80]), unit="line"
        )
    template_hash = _unhex(tokens[1], "IMA line template hash", line)
    template = _KNOWN_NAMES.get(tokens[2])
    if template is None:
        if not _TEMPLATE_NAME_RE.fullmatch(tokens[2]):
            raise ParseError(
                "IMA line template name", line, "a name", _quote(tokens[2][:80]), unit="line"
            )
        template = tokens[2].decode("ascii")
    return int(tokens[0]), template_hash, template


def _split_line(line: bytes, no: int) -> list[bytes]:
    if line.startswith(b" "):  # "%2d" pads PCRs below 10
        line = line[1:]
    tokens = line.split(b" ")
    if len(tokens) < 3:
        raise ParseError(
            "IMA line",
            no,
            "'<pcr> <template hash> <template> <fields>'",
            _quote(line[:80]),
            unit="line",
        )
    return tokens


def _parse_ascii_line(line: bytes, no: int) -> ImaEntry:
    """One line of ``ima_ascii_measurements_show``: each field follows one space."""
    tokens = _split_line(line, no)
    pcr, template_hash, template = _ascii_head(tokens, no)
    if template not in TEMPLATES:
        return ImaEntry(pcr, template_hash, template, (), no)
    layout = TEMPLATES[template]
    texts = tokens[3:]
    if len(texts) != len(layout):
        raise ParseError(
            f"IMA {template} line", no, f"{len(layout)} fields", str(len(texts)), unit="line"
        )
    fields = tuple(_ascii_field(fid, text, no) for fid, text in zip(layout, texts, strict=True))
    try:
        return ImaEntry(pcr, template_hash, template, fields, no)
    except _FieldError as err:
        raise ParseError(f"IMA {template} line", no, err.problem, unit="line") from None


def _ascii_field(fid: str, text: bytes, no: int) -> bytes:
    """Rebuild the kernel's field data from its text (``ima_show_template_data_ascii``)."""
    if fid == "d":
        return _unhex(text, "IMA line d field", no)
    if fid == "d-ng":
        algo, sep, hexdigest = text.partition(b":")
        if not sep or (algo not in _FILE_DIGEST_SIZE_B and not _ALGO_RE.fullmatch(algo)):
            raise ParseError(
                "IMA line d-ng field", no, "'<algo>:<hex>'", _quote(text[:80]), unit="line"
            )
        return algo + b":\0" + _unhex(hexdigest, "IMA line d-ng digest", no)
    if fid in ("n", "n-ng"):
        if not text:
            raise ParseError(f"IMA line {fid} field", no, "a name", "nothing", unit="line")
        return text + b"\0"
    return _unhex(text, f"IMA line {fid} field", no)  # sig, buf


def _check_ascii_prefix(tail: bytes, no: int) -> None:
    """A last line without its newline must be the start of a plausible line."""
    tokens = (tail[1:] if tail.startswith(b" ") else tail).split(b" ")
    complete = tokens[:-1]
    if complete and not (complete[0].isdigit() and int(complete[0]) <= _MAX_PCR):
        raise ParseError(
            "IMA line pcr", no, f"0..{_MAX_PCR}", _quote(complete[0][:80]), unit="line"
        )
    if len(complete) > 1 and len(complete[1]) != 2 * _TEMPLATE_HASH_SIZE:
        raise ParseError("IMA line template hash", no, "40 hex digits", unit="line")
    if len(complete) > 1:
        _unhex(complete[1], "IMA line template hash", no)


# --------------------------------------------------------------------------------------------
# Encoding


def encode_binary(entries: Iterable[ImaEntry]) -> bytes:
    """Marshal entries as ``binary_runtime_measurements`` (inverse of :func:`parse_ima_list`).

    Raises:
        ValueError: an entry of an unsupported template (its field data is not known).
    """
    out = bytearray()
    for e in entries:
        _require_encodable(e)
        name = e.template_name.encode("ascii")
        out += _U32.pack(e.pcr) + e.template_hash + _U32.pack(len(name)) + name
        if e.template_name == "ima":
            out += e.fields[0] + _U32.pack(len(e.fields[1]) - 1) + e.fields[1][:-1]
        else:
            td = b"".join(_U32.pack(len(f)) + f for f in e.fields)
            out += _U32.pack(len(td)) + td
    return bytes(out)


def encode_ascii(entries: Iterable[ImaEntry]) -> bytes:
    """Marshal entries as ``ascii_runtime_measurements`` (inverse of :func:`parse_ima_list`).

    Raises:
        ValueError: an entry of an unsupported template, or a name the text form cannot carry.
    """
    out = bytearray()
    for e in entries:
        _require_encodable(e)
        out += b"%2d %s %s" % (e.pcr, e.template_hash.hex().encode(), e.template_name.encode())
        for fid, data in zip(TEMPLATES[e.template_name], e.fields, strict=True):
            out += b" "
            if fid in ("n", "n-ng"):
                if b" " in data:
                    raise ValueError(f"a name with a space cannot be written as text: {data!r}")
                out += data[:-1]
            elif fid == "d-ng":
                sep = data.index(b":\0")
                out += data[: sep + 1] + data[sep + 2 :].hex().encode()
            else:
                out += data.hex().encode()
        out += b"\n"
    return bytes(out)


def _require_encodable(e: ImaEntry) -> None:
    if not e.supported:
        raise ValueError(f"cannot encode an entry of unsupported template {e.template_name}")


# --------------------------------------------------------------------------------------------
# Replay


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
            raise UnsupportedError(
                f"IMA entry {index} template",
                e.location,
                f"one of {', '.join(TEMPLATES)} (others are not replayed, not guessed)",
                e.template_name,
                unit=raw.unit,
            )
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


def _first_unsupported(raw: RawImaList, columns: _Columns) -> None:
    for index in sorted(columns.general):
        e = columns.general[index]
        if not e.supported:
            raise UnsupportedError(
                f"IMA entry {index} template",
                e.location,
                f"one of {', '.join(TEMPLATES)} (others are not replayed, not guessed)",
                e.template_name,
                unit=raw.unit,
            )


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
        return (
            VerifiedImaList,
            (
                self.entries,
                self.pcr10,
                self.rule,
                self.violations,
                self.truncated_tail,
                self.untrusted_other_pcr_entries,
            ),
        )

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
