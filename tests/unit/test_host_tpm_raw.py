"""The hot path's hand-marshalled TPM commands (host_agent/tpm/_raw.py): what goes on the wire,
and that any answer, however malformed, ends in RawTpmError/RawTpmRc or a whole result.

The wire side here is a recording transport (the TCTI's two calls); the same commands run
against a real swtpm in tests/sim/test_host_tpm_hot.py."""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from host_agent.tpm._raw import PASSWORD, RawTpm, RawTpmError, RawTpmRc, Session, pcr_select


class Wire:
    """Records what was transmitted and plays back prepared answers (or raises)."""

    def __init__(self, *answers: bytes | BaseException) -> None:
        self.answers = list(answers)
        self.sent: list[bytes] = []

    def transmit(self, command: bytes) -> None:
        self.sent.append(bytes(command))

    def receive(self, size: int, timeout: int) -> bytes:
        answer = self.answers.pop(0)
        if isinstance(answer, BaseException):
            raise answer
        return answer


def _answer(body: bytes, *, sessions: bool = False, rc: int = 0) -> bytes:
    tag = 0x8002 if sessions else 0x8001
    return struct.pack(">HII", tag, 10 + len(body), rc) + body


def _tpm2b(data: bytes) -> bytes:
    return struct.pack(">H", len(data)) + data


ECDSA_SIG = struct.pack(">HH", 0x0018, 0x000B) + _tpm2b(b"r" * 32) + _tpm2b(b"s" * 32)
PW_AUTH_RESPONSE = b"\x00\x00\x01\x00\x00"  # nonceTPM empty, attrs, hmac empty


def test_certify_marshals_both_sessions_and_parses_attest_and_signature() -> None:
    params = _tpm2b(b"ATTEST") + ECDSA_SIG
    wire = Wire(
        _answer(struct.pack(">I", len(params)) + params + PW_AUTH_RESPONSE * 2, sessions=True)
    )
    attest, sig = RawTpm(wire).certify(0x80000001, 0x80000002, Session(0x03000000), b"q" * 32)
    assert (attest, sig) == (b"ATTEST", ECDSA_SIG)
    (command,) = wire.sent
    tag, size, cc = struct.unpack_from(">HII", command)
    assert (tag, size, cc) == (0x8002, len(command), 0x148)
    assert command[10:18] == bytes.fromhex("8000000180000002")
    auth = PASSWORD.encode() + Session(0x03000000).encode()
    assert command[18:22] == struct.pack(">I", len(auth)) and command[22 : 22 + len(auth)] == auth
    assert command[22 + len(auth) :] == _tpm2b(b"q" * 32) + b"\x00\x10"


def test_hash_returns_digest_and_ticket_and_policy_pcr_selects_sha256() -> None:
    ticket = struct.pack(">HI", 0x8024, 0x40000001) + _tpm2b(b"h" * 32)
    wire = Wire(_answer(_tpm2b(b"d" * 32) + ticket), _answer(b""))
    rt = RawTpm(wire)
    assert rt.hash(b"message") == (b"d" * 32, ticket)
    rt.policy_pcr(0x03000001, range(9))
    assert wire.sent[1][-10:] == bytes.fromhex("00000001000b03ff0100")
    with pytest.raises(ValueError, match="outside"):
        pcr_select([24])


def test_tpm_errors_and_retry_warnings() -> None:
    retry = _answer(b"", rc=0x922)
    rt = RawTpm(Wire(retry, retry, _answer(b"")))
    rt.flush(0x80000001)  # TPM_RC_RETRY twice, then done
    assert rt.commands == 3
    with pytest.raises(RawTpmRc) as err:
        RawTpm(Wire(_answer(b"", rc=0x99D))).flush(0x80000001)
    assert err.value.rc == 0x99D and err.value.command == "TPM2_FlushContext"
    with pytest.raises(RawTpmError) as broken:
        RawTpm(Wire(OSError("connection reset"))).flush(0x80000001)
    assert broken.value.link


CALLS: list[Callable[[RawTpm], Any]] = [
    lambda rt: rt.certify(1, 2, PASSWORD, b"q"),
    lambda rt: rt.sign(1, PASSWORD, b"d" * 32, b"t"),
    lambda rt: rt.hash(b"m"),
    lambda rt: rt.context_save(1),
    lambda rt: rt.context_load(b"ctx"),
    lambda rt: rt.load(1, b"\x00\x00", b"pub"),
    lambda rt: rt.start_policy_session(),
    lambda rt: rt.policy_or(1, [b"a" * 32, b"b" * 32]),
]


@settings(max_examples=300, deadline=None)
@given(
    call=st.sampled_from(CALLS),
    answer=st.one_of(
        st.binary(max_size=200),
        st.builds(
            lambda tag, body: struct.pack(">HII", tag, 10 + len(body), 0) + body,
            st.sampled_from([0x8001, 0x8002, 0x1234]),
            st.binary(max_size=200),
        ),
    ),
)
def test_any_answer_is_a_result_or_a_typed_error(
    call: Callable[[RawTpm], Any], answer: bytes
) -> None:
    try:
        result = call(RawTpm(Wire(answer)))
    except (RawTpmError, RawTpmRc) as err:
        assert "TPM2_" in str(err)  # names the command
        return
    assert result is None or isinstance(result, bytes | int | tuple)
