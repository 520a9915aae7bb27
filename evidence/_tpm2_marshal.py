"""Marshalling primitives every TPM 2.0 structure shares, and the TPM2B_* wrappers.

Part of :mod:`evidence.tpm2`; import from there. Reading an algorithm ID that must be one of a
set, or a TPM2B whose ``size`` is checked against its cap and the bytes that remain; writing
big-endian integers and TPM2Bs; checking a constructor's fields; and ``_exact``, through which every
``unmarshal`` refuses trailing bytes. The structure modules build on these.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import TypeVar

from evidence._reader import Reader
from evidence._tpm2_constants import TPM2B_MAX_SIZES, TpmAlgId, TpmSt
from evidence.errors import ParseError, UnsupportedError

__all__ = ["marshal_tpm2b", "unmarshal_tpm2b"]


# --------------------------------------------------------------------------------------------
# Primitive helpers


def _alg_name(value: int) -> str:
    try:
        return f"{TpmAlgId(value).name} (0x{value:04x})"
    except ValueError:
        return f"unknown algorithm 0x{value:04x}"


def _st_name(value: int) -> str:
    try:
        return f"{TpmSt(value).name} (0x{value:04x})"
    except ValueError:
        return f"unknown tag 0x{value:04x}"


def _read_alg(r: Reader, what: str, allowed: Collection[int]) -> int:
    """Read a TPM_ALG_ID that must be one of ``allowed``.

    A known algorithm in the wrong place raises UnsupportedError; an unknown value, ParseError.
    """
    offset = r.offset
    value = r.u16be(what)
    if value in allowed:
        return value
    expected = "one of " + ", ".join(TpmAlgId(a).name for a in sorted(allowed))
    if value in TpmAlgId._value2member_map_:
        raise UnsupportedError(what, offset, expected, _alg_name(value))
    raise ParseError(what, offset, expected, _alg_name(value))


def _read_tpm2b(r: Reader, what: str, kind: str) -> Reader:
    """Read a TPM2B ``size`` and return a reader over exactly that many bytes."""
    offset = r.offset
    size = r.u16be(f"{what}.size")
    limit = TPM2B_MAX_SIZES[kind]
    if size > limit:
        raise ParseError(f"{what}.size", offset, f"a {kind} of at most {limit} bytes", str(size))
    return r.sub(size, f"{what}.buffer")


def _read_tpm2b_bytes(r: Reader, what: str, kind: str) -> bytes:
    return _read_tpm2b(r, what, kind).rest()


def _u8(value: int) -> bytes:
    return value.to_bytes(1, "big")


def _u16(value: int) -> bytes:
    return value.to_bytes(2, "big")


def _u32(value: int) -> bytes:
    return value.to_bytes(4, "big")


def _u64(value: int) -> bytes:
    return value.to_bytes(8, "big")


def _check_uint(owner: str, name: str, value: object, bits: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < (1 << bits):
        raise ValueError(f"{owner}.{name} must be an unsigned {bits}-bit integer, got {value!r}")


def _check_tpm2b(owner: str, name: str, value: object, kind: str) -> None:
    limit = TPM2B_MAX_SIZES[kind]
    if not isinstance(value, bytes) or len(value) > limit:
        raise ValueError(f"{owner}.{name} must be bytes of at most {limit} ({kind})")


def _tpm2b(payload: bytes) -> bytes:
    return _u16(len(payload)) + payload


_T = TypeVar("_T")


def _exact(data: bytes, what: str, read: Callable[[Reader], _T]) -> _T:
    r = Reader(data)
    value = read(r)
    r.expect_end(what)
    return value


def _exact_sized(data: bytes, kind: str, field: str, read: Callable[[Reader], _T]) -> _T:
    """``data`` as the TPM2B ``kind`` that wraps one structure (its ``field``): ``size``, then
    the structure ``read`` parses, which must fill ``size`` exactly; nothing may follow."""

    def sized(r: Reader) -> _T:
        inner = _read_tpm2b(r, kind, kind)
        value = read(inner)
        inner.expect_end(f"{kind}.{field}")
        return value

    return _exact(data, kind, sized)


# --------------------------------------------------------------------------------------------
# TPM2B_* wrappers


def unmarshal_tpm2b(data: bytes, kind: str) -> bytes:
    """Unwrap one TPM2B structure that must fill ``data`` exactly.

    Args:
        data: ``size`` (UINT16) then ``size`` bytes, e.g. a TPM2B_DIGEST, TPM2B_DATA, TPM2B_NAME.
        kind: the TPM2B type name, a key of :data:`TPM2B_MAX_SIZES`; it sets the size cap.

    Returns:
        The ``buffer`` bytes.

    Raises:
        TruncatedError: ``size`` runs past the end of ``data``.
        ParseError: ``size`` exceeds the cap for ``kind``, or bytes follow the buffer.
    """
    if kind not in TPM2B_MAX_SIZES:
        raise ValueError(f"unknown TPM2B kind {kind!r}; known: {sorted(TPM2B_MAX_SIZES)}")
    return _exact(data, kind, lambda r: _read_tpm2b_bytes(r, kind, kind))


def marshal_tpm2b(payload: bytes, kind: str) -> bytes:
    """Wrap ``payload`` as the TPM2B ``kind`` (``size`` then bytes).

    Raises:
        ValueError: ``payload`` is longer than ``kind`` allows.
    """
    if kind not in TPM2B_MAX_SIZES:
        raise ValueError(f"unknown TPM2B kind {kind!r}; known: {sorted(TPM2B_MAX_SIZES)}")
    _check_tpm2b(kind, "buffer", payload, kind)
    return _tpm2b(payload)
