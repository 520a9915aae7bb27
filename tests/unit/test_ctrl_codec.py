"""The control-channel codec: shapes, quirks, hostile input and hypothesis round trips."""

from __future__ import annotations

import contextlib
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from evidence.errors import ParseError, TruncatedError, UnsupportedError
from host_agent.vtpm.ctrl_codec import (
    MAX_STATE_BLOB,
    QUIRKS,
    BufferSizeReply,
    CancelTpmCmd,
    CapabilityReply,
    ConfigReply,
    EstablishedReply,
    GetCapability,
    GetConfig,
    GetInfo,
    GetStateBlob,
    GetTpmEstablished,
    HashData,
    HashEnd,
    HashStart,
    InfoReply,
    Init,
    LockStorage,
    PtmResult,
    ReplyDecoder,
    ReplyKind,
    RequestDecoder,
    ResetTpmEstablished,
    ResultReply,
    RunState,
    SetBufferSize,
    SetDataFd,
    SetLocality,
    SetStateBlob,
    Shutdown,
    StateBlobReply,
    Stop,
    StoreVolatile,
    TpmPacketFramer,
    TpmRunState,
    decode_reply,
    decode_request,
    fault_reply,
    reply_kind,
)

u32 = st.integers(0, 2**32 - 1)
requests = st.one_of(
    st.sampled_from(
        [
            GetCapability(),
            Shutdown(),
            GetTpmEstablished(),
            HashStart(),
            HashEnd(),
            CancelTpmCmd(),
            StoreVolatile(),
            Stop(),
            GetConfig(),
            SetDataFd(),
        ]
    ),
    st.builds(Init, u32),
    st.builds(SetLocality, st.integers(0, 255), st.sampled_from([b"", b"\0\0\0", b"\1\2\3"])),
    st.builds(ResetTpmEstablished, st.integers(0, 255), st.sampled_from([b"", b"\0\0\0"])),
    st.builds(HashData, st.binary(max_size=4096)),
    st.builds(GetStateBlob, st.integers(1, 3), u32, u32),
    st.builds(SetStateBlob, u32, st.binary(max_size=3000), u32),
    st.builds(SetBufferSize, u32),
    st.builds(GetInfo, st.integers(0, 2**64 - 1), u32, u32),
    st.builds(LockStorage, u32),
)


@given(requests)
def test_request_round_trip(req: object) -> None:
    data = req.encode()  # type: ignore[attr-defined]
    assert decode_request(data) == req
    dec = RequestDecoder()
    # byte by byte except the padded commands, whose padding is taken from what is buffered
    if isinstance(req, SetLocality | ResetTpmEstablished):
        dec.feed(data)
    else:
        for i in range(len(data)):
            assert dec.next_request() is None
            dec.feed(data[i : i + 1])
    assert dec.next_request() == req
    assert dec.buffered == 0


@given(requests, st.booleans(), st.data())
def test_reply_round_trip(req: object, running: bool, data: st.DataObject) -> None:
    kind = reply_kind(req, running)  # type: ignore[arg-type]
    strategy = {
        ReplyKind.RESULT: st.builds(ResultReply, u32),
        ReplyKind.CAPABILITY: st.builds(CapabilityReply, st.integers(0, 2**64 - 1)),
        ReplyKind.ESTABLISHED: st.builds(EstablishedReply, u32, st.integers(0, 255)),
        ReplyKind.STATEBLOB: st.one_of(
            st.builds(StateBlobReply.of, st.binary(max_size=2000), u32),
            st.builds(StateBlobReply, st.integers(1, 2**32 - 1), u32, u32, u32),
        ),
        ReplyKind.CONFIG: st.one_of(
            st.builds(ConfigReply, st.just(0), u32), st.builds(ResultReply, st.integers(1, 99))
        ),
        ReplyKind.BUFFERSIZE: st.one_of(
            st.builds(BufferSizeReply, st.just(0), u32, u32, u32),
            st.builds(ResultReply, st.integers(1, 99)),
        ),
        ReplyKind.INFO: st.one_of(
            st.builds(InfoReply, st.just(0), u32, st.binary(max_size=200)),
            st.builds(ResultReply, st.integers(1, 99)),
        ),
    }[kind]
    reply = data.draw(strategy)
    raw = reply.encode()
    assert decode_reply(raw, req, running) == reply  # type: ignore[arg-type]
    dec = ReplyDecoder()
    dec.expect(req, running)  # type: ignore[arg-type]
    for i in range(len(raw)):
        assert dec.next_reply() is None
        dec.feed(raw[i : i + 1])
    assert dec.next_reply() == reply and not dec.expecting


@settings(max_examples=300)
@given(st.binary(max_size=64))
def test_garbage_request_raises_only_parse_errors(data: bytes) -> None:
    with contextlib.suppress(ParseError):
        decode_request(data)
    dec = RequestDecoder()
    dec.feed(data)
    try:
        while dec.next_request() is not None:
            pass
    except ParseError:
        pass


@settings(max_examples=300)
@given(requests, st.booleans(), st.binary(max_size=64))
def test_garbage_reply_raises_only_parse_errors(req: object, running: bool, data: bytes) -> None:
    with contextlib.suppress(ParseError):
        decode_reply(data, req, running)  # type: ignore[arg-type]


# ---------------------------------------------------------------- named hostile cases


def test_set_stateblob_claiming_3_gib_is_refused_before_buffering() -> None:
    dec = RequestDecoder()
    dec.feed(struct.pack(">IIII", 0x0D, 0, 1, 3 << 30))
    with pytest.raises(ParseError, match="at most"):
        dec.next_request()


def test_stateblob_reply_claiming_more_than_the_bound() -> None:
    raw = struct.pack(">IIII", 0, 0, MAX_STATE_BLOB + 1, MAX_STATE_BLOB + 1)
    with pytest.raises(ParseError) as err:
        decode_reply(raw, GetStateBlob(1), True)
    assert not isinstance(err.value, TruncatedError)


def test_reply_shorter_than_its_header_is_truncated() -> None:
    with pytest.raises(TruncatedError):
        decode_reply(b"\0\0\0\0\0\0", GetStateBlob(1), True)
    with pytest.raises(TruncatedError):
        decode_reply(b"\0\0", Stop(), True)


def test_hash_data_longer_than_4096() -> None:
    with pytest.raises(ParseError):
        decode_request(struct.pack(">II", 7, 4097) + bytes(4097))


def test_unknown_command_code_is_unsupported() -> None:
    with pytest.raises(UnsupportedError, match="0x00000099"):
        decode_request(b"\0\0\0\x99")


def test_trailing_bytes_after_a_request() -> None:
    with pytest.raises(ParseError, match="more bytes"):
        decode_request(Stop().encode() + b"\0")


def test_reply_bytes_with_no_request_outstanding() -> None:
    dec = ReplyDecoder()
    dec.feed(b"\0\0\0\0")
    with pytest.raises(ParseError, match="no request"):
        dec.next_reply()


def test_tpm_packet_with_size_below_header() -> None:
    framer = TpmPacketFramer()
    framer.feed(bytes.fromhex("80010000000500000000"))
    with pytest.raises(ParseError, match="size"):
        framer.next_packet()


# ---------------------------------------------------------------- shapes and state


def test_reply_shape_depends_on_run_state() -> None:
    assert reply_kind(GetStateBlob(1), True) is ReplyKind.STATEBLOB
    assert reply_kind(GetStateBlob(1), False) is ReplyKind.RESULT
    assert reply_kind(GetTpmEstablished(), True) is ReplyKind.ESTABLISHED
    assert reply_kind(GetTpmEstablished(), False) is ReplyKind.RESULT
    # SET_BUFFERSIZE: full reply only on success
    assert decode_reply(b"\0\0\0\x0a", SetBufferSize(4096), True) == ResultReply(10)


def test_fault_reply_keeps_the_shape_qemu_reads() -> None:
    veto = fault_reply(GetStateBlob(2), True)
    assert veto == StateBlobReply(PtmResult.TPM_FAIL, 0, 0, 0)
    assert len(veto.encode()) == 16
    assert fault_reply(SetStateBlob(1, b"x"), False).encode() == b"\0\0\0\x09"
    assert fault_reply(GetTpmEstablished(), True).encode() == bytes.fromhex("0000000900000000")
    with pytest.raises(ValueError):
        fault_reply(Stop(), True, 0)


def test_capability_reply_is_one_be64() -> None:
    reply = decode_reply(bytes.fromhex("000000000000ffff"), GetCapability(), False)
    assert reply == CapabilityReply(0xFFFF) and reply.result == 0


def test_set_stateblob_header_is_what_qemu_writes_first() -> None:
    req = SetStateBlob(2, b"abc", 0)
    assert req.header() == bytes.fromhex("0000000d000000000000000200000003")
    assert req.encode() == req.header() + b"abc"


def test_run_state_follows_init_stop_shutdown() -> None:
    state = TpmRunState()
    assert state.state is RunState.STOPPED
    state.apply(Init(0), ResultReply(0))
    assert state.running
    state.apply(SetLocality(0, b"\0\0\0"), ResultReply(0))
    assert state.locality == 0
    state.apply(GetStateBlob(1), StateBlobReply.of(b"x"))
    assert state.saw_get_stateblob
    state.apply(Stop(), ResultReply(0))
    assert state.state is RunState.STOPPED
    state.apply(Init(0), ResultReply(0x9))
    assert state.state is RunState.STOPPED
    state.apply(Shutdown(), ResultReply(0))
    assert state.state is RunState.TERMINATED


def test_packet_framer_returns_packets_unchanged() -> None:
    a = bytes.fromhex("80010000000c00000144") + b"\0\0"
    b = bytes.fromhex("8001000000160000017b") + bytes(12)
    framer = TpmPacketFramer()
    framer.feed(a + b[:5])
    assert framer.next_packet() == a
    assert framer.next_packet() is None
    framer.feed(b[5:])
    assert framer.next_packet() == b


def test_every_quirk_cites_a_source() -> None:
    assert len({q.id for q in QUIRKS}) == len(QUIRKS)
    assert all(q.source and q.description for q in QUIRKS)


def test_constructors_refuse_out_of_range_values() -> None:
    with pytest.raises(ValueError):
        SetLocality(256)
    with pytest.raises(ValueError):
        SetLocality(0, b"\0\0\0\0")
    with pytest.raises(ValueError):
        StateBlobReply(0, 0, 3, 3, b"ab")
