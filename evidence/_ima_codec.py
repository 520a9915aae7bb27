"""The general IMA list parser, entry by entry, and the encoders.

Part of :mod:`evidence.ima`; import from there. ``_parse_binary`` and ``_parse_ascii`` define the
result and the error for every input: they read one entry (or line) at a time and check each
length and field against the kernel's formats. :func:`encode_binary` and :func:`encode_ascii` are
their inverse. Kept apart from :mod:`evidence._ima_fastpath`, the column-wise parser that
:func:`~evidence.ima.parse_ima_list` runs: that one is an optimisation which only ever
reproduces what this module returns or raises, and hands it anything uncommon.
"""

from __future__ import annotations

import binascii
from collections.abc import Iterable

from evidence._ima_model import (
    _ALGO_RE,
    _FILE_DIGEST_SIZE_B,
    _IMA_NAME_PAD,
    _MAX_PCR,
    _MAX_TEMPLATE_DATA,
    _MAX_TEMPLATE_NAME,
    _TEMPLATE_HASH_SIZE,
    _TEMPLATE_NAME_RE,
    _U32,
    TEMPLATES,
    ImaEntry,
    RawImaList,
    _FieldError,
)
from evidence.errors import ParseError, TruncatedError

__all__ = ["encode_ascii", "encode_binary"]


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
