"""``parse_ima_list`` and the column-wise fast paths it runs (issue 7).

Part of :mod:`evidence.ima`; import from there. The common entries (d-ng templates, a known
digest algorithm, an empty third field in binary) are matched in bulk by one regular expression
and kept as columns; any other entry is parsed, or refused, by the general parser of
:mod:`evidence._ima_codec`, and a column check that fails hands the whole input to it, so
entries and errors are the general parser's. Separate so that the general parser reads as the
definition and this module as a faster route to the same result, which
``tests/unit/test_ima_fastpath.py`` compares.
"""

from __future__ import annotations

import binascii
import itertools
import operator
import re
import struct
from collections.abc import Sequence
from typing import Literal, cast

from evidence._ima_codec import (
    _check_ascii_prefix,
    _parse_ascii_line,
    _parse_binary,
    _parse_binary_entry,
)
from evidence._ima_model import (
    _FILE_DIGEST_SIZE,
    _MAX_TEMPLATE_DATA,
    _U32,
    _USUAL_ALGOS,
    _ZERO_HASH,
    ImaEntry,
    RawImaList,
    _Columns,
    _unchecked_entry,
)
from evidence.errors import ParseError, TruncatedError

__all__ = ["parse_ima_list"]


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
