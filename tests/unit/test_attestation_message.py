"""evidence.attestation: the canonical vPCR message (pure; golden bytes by hand, round trips)."""

from __future__ import annotations

import contextlib
import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

from evidence._algorithms import HASH_ALGS
from evidence.attestation import (
    MAGIC,
    AttestationMessage,
    encode_attestation_message,
    parse_attestation_message,
)
from evidence.errors import ParseError, TruncatedError, UnsupportedError
from evidence.tpm2 import TPM_GENERATED_VALUE

VM = uuid.UUID("6c1b5d3e-1c1f-4a8e-9d3c-0f2b3a4c5d6e")


def _message(**kw: object) -> AttestationMessage:
    args: dict[str, object] = {
        "vm_uuid": VM,
        "nonce": b"\x01" * 32,
        "hash_alg": 0x000B,
        "pcrs": {0: b"\xaa" * 32, 10: b"\xbb" * 32},
    }
    args.update(kw)
    return AttestationMessage(**args)  # type: ignore[arg-type]


def test_layout_by_hand() -> None:
    data = encode_attestation_message(_message())
    assert data == (
        b"VTPMVPCR"
        + b"\x00\x01"
        + VM.bytes
        + b"\x00\x20"
        + b"\x01" * 32
        + b"\x00\x0b"
        + b"\x03"
        + bytes([0x01, 0x04, 0x00])
        + b"\xaa" * 32
        + b"\xbb" * 32
    )
    assert parse_attestation_message(data) == _message()


def test_magic_never_starts_with_tpm_generated_value() -> None:
    assert MAGIC[:4] != TPM_GENERATED_VALUE.to_bytes(4, "big")
    assert MAGIC[0] != 0xFF


def test_values_come_out_in_index_order() -> None:
    msg = _message(pcrs={7: b"\x07" * 32, 0: b"\x00" * 32, 3: b"\x03" * 32})
    assert list(msg.pcrs) == [0, 3, 7]
    assert parse_attestation_message(encode_attestation_message(msg)).pcrs == msg.pcrs


@pytest.mark.parametrize(
    ("kw", "what"),
    [
        ({"nonce": b""}, "nonce"),
        ({"nonce": b"x" * 65}, "nonce"),
        ({"hash_alg": 0x0099}, "hash_alg"),
        ({"pcrs": {}}, "at least one"),
        ({"pcrs": {24: b"\0" * 32}}, "PCR index"),
        ({"pcrs": {0: b"\0" * 20}}, "32-byte"),
    ],
)
def test_constructor_rejects_misuse(kw: dict[str, object], what: str) -> None:
    with pytest.raises(ValueError, match=what):
        _message(**kw)


def _good() -> bytes:
    return encode_attestation_message(_message())


@pytest.mark.parametrize(
    ("data", "error", "what"),
    [
        (b"\xffTCG" + _good()[4:], ParseError, "magic"),
        (_good()[:8] + b"\x00\x02" + _good()[10:], UnsupportedError, "version"),
        (_good()[:26] + b"\x00\x00" + _good()[28:], ParseError, "nonce_size"),
        (_good()[:26] + b"\x00\x41" + _good()[28:], ParseError, "nonce_size"),
        (_good()[:60] + b"\x00\x99" + _good()[62:], UnsupportedError, "hash_alg"),
        (_good()[:62] + b"\x04" + _good()[63:], ParseError, "sizeof_select"),
        (_good()[:63] + b"\x00\x00\x00" + _good()[66:], ParseError, "pcr_select"),
        (_good()[:-1], TruncatedError, "pcr_values"),
        (_good() + b"\x00", ParseError, "vPCR message"),
        (b"", TruncatedError, "magic"),
    ],
    ids=[
        "quote-magic",
        "version-2",
        "empty-nonce",
        "nonce-65",
        "unknown-bank",
        "bitmap-size",
        "no-pcr",
        "short-value",
        "trailing",
        "empty",
    ],
)
def test_hostile_messages(data: bytes, error: type[ParseError], what: str) -> None:
    with pytest.raises(error) as info:
        parse_attestation_message(data)
    assert type(info.value) is error
    assert what in info.value.what


_BANKS = sorted(HASH_ALGS)


@st.composite
def messages(draw: st.DrawFn) -> AttestationMessage:
    hash_alg = draw(st.sampled_from(_BANKS))
    size = HASH_ALGS[hash_alg].digest_size
    indices = draw(st.sets(st.integers(0, 23), min_size=1))
    return AttestationMessage(
        vm_uuid=uuid.UUID(bytes=draw(st.binary(min_size=16, max_size=16))),
        nonce=draw(st.binary(min_size=1, max_size=64)),
        hash_alg=hash_alg,
        pcrs={i: draw(st.binary(min_size=size, max_size=size)) for i in indices},
    )


@given(messages())
def test_round_trip(msg: AttestationMessage) -> None:
    data = encode_attestation_message(msg)
    again = parse_attestation_message(data)
    assert again == msg
    assert encode_attestation_message(again) == data


@given(messages(), st.data())
def test_mutated_messages_never_decode_to_the_same_message(
    msg: AttestationMessage, data: st.DataObject
) -> None:
    """Flip one byte: the result is a ParseError or a different message (encoding is unique)."""
    raw = bytearray(encode_attestation_message(msg))
    at = data.draw(st.integers(0, len(raw) - 1))
    raw[at] ^= data.draw(st.integers(1, 255))
    with contextlib.suppress(ParseError):
        assert parse_attestation_message(bytes(raw)) != msg


@given(st.binary(max_size=200))
def test_garbage_raises_only_parse_errors(data: bytes) -> None:
    with contextlib.suppress(ParseError):
        parse_attestation_message(MAGIC + data)
