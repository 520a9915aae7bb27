"""evidence.eventlog: hand-built logs, named hostile inputs, replay rules, and property tests.

Logs are built byte by byte here (``spec_id_record``, ``agile_event``, ``sha1_event``) so a
test can lie in exactly one field; ``encode_tcg2_log`` is the product's own encoder and is
checked against the parser by round trips.
"""

from __future__ import annotations

import hashlib
import struct
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from evidence.errors import ParseError, ReplayError, TruncatedError
from evidence.eventlog import (
    EfiVariable,
    EventType,
    RawEvent,
    RawEventLog,
    SpecIdAlgorithm,
    SpecIdEvent,
    StartupLocality,
    VerifiedEventLog,
    encode_tcg2_log,
    parse_tcg2_log,
    replay_eventlog,
    replay_pcrs,
)
from tests.conftest import CORPUS

SHA1, SHA256, SHA384, SHA512 = 0x0004, 0x000B, 0x000C, 0x000D
SIZES = {SHA1: 20, SHA256: 32, SHA384: 48, SHA512: 64}
NAMES = {SHA1: "sha1", SHA256: "sha256", SHA384: "sha384", SHA512: "sha512"}
EV_NO_ACTION = EventType.EV_NO_ACTION
EV_SEPARATOR = EventType.EV_SEPARATOR
EV_POST_CODE = EventType.EV_POST_CODE
EV_EFI_HCRTM_EVENT = EventType.EV_EFI_HCRTM_EVENT
THREE_GB = 3 * 1024**3


# --- builder ----------------------------------------------------------------------------------


def spec_id_body(
    algs: tuple[tuple[int, int], ...] = ((SHA1, 20), (SHA256, 32)),
    vendor: bytes = b"",
    *,
    count: int | None = None,
) -> bytes:
    """``TCG_EfiSpecIDEvent`` with the given (algorithmId, digestSize) rows."""
    body = b"Spec ID Event03\x00" + struct.pack("<IBBBB", 0, 0, 2, 0, 2)
    body += struct.pack("<I", len(algs) if count is None else count)
    body += b"".join(struct.pack("<HH", alg, size) for alg, size in algs)
    return body + bytes([len(vendor)]) + vendor


def spec_id_record(
    body: bytes | None = None,
    *,
    size: int | None = None,
    pcr: int = 0,
    digest: bytes = bytes(20),
) -> bytes:
    """The first record of a crypto-agile log (SHA1-format ``TCG_PCR_EVENT``)."""
    body = spec_id_body() if body is None else body
    return (
        struct.pack("<II", pcr, EV_NO_ACTION)
        + digest
        + struct.pack("<I", len(body) if size is None else size)
        + body
    )


def agile_event(
    pcr: int,
    etype: int,
    digests: list[tuple[int, bytes]],
    data: bytes = b"",
    *,
    count: int | None = None,
    size: int | None = None,
) -> bytes:
    """A ``TCG_PCR_EVENT2``; ``count``/``size`` override the honest values."""
    out = struct.pack("<III", pcr, etype, len(digests) if count is None else count)
    out += b"".join(struct.pack("<H", alg) + d for alg, d in digests)
    return out + struct.pack("<I", len(data) if size is None else size) + data


def sha1_event(
    pcr: int, etype: int, digest: bytes, data: bytes = b"", *, size: int | None = None
) -> bytes:
    return (
        struct.pack("<II", pcr, etype)
        + digest
        + struct.pack("<I", len(data) if size is None else size)
        + data
    )


def measured(
    pcr: int, data: bytes, etype: int = EV_POST_CODE, algs: tuple[int, ...] = (SHA1, SHA256)
) -> bytes:
    """An honest event whose digests are the hashes of ``data``."""
    return agile_event(
        pcr, etype, [(alg, hashlib.new(NAMES[alg], data).digest()) for alg in algs], data
    )


def extend(bank: str, start: bytes, *digests: bytes) -> bytes:
    value = start
    for d in digests:
        value = hashlib.new(bank, value + d).digest()
    return value


STARTUP_LOCALITY_3 = agile_event(
    0, EV_NO_ACTION, [(SHA1, bytes(20)), (SHA256, bytes(32))], b"StartupLocality\x00\x03"
)


# --- parsing: the happy path ------------------------------------------------------------------


def test_crypto_agile_log_fields() -> None:
    data = (
        spec_id_record() + measured(0, b"firmware") + measured(7, b"\x00\x00\x00\x00", EV_SEPARATOR)
    )
    log = parse_tcg2_log(data)
    assert log.format == "crypto-agile"
    assert log.banks == ("sha1", "sha256")
    assert log.spec_id == SpecIdEvent(
        0,
        0,
        2,
        0,
        2,
        (SpecIdAlgorithm(SHA1, "sha1", 20), SpecIdAlgorithm(SHA256, "sha256", 32)),
        b"",
    )
    first, second, third = log.events
    assert (first.index, first.offset, first.type_name, first.payload) == (
        0,
        0,
        "EV_NO_ACTION",
        log.spec_id,
    )
    assert second.offset == len(spec_id_record())
    assert second.pcr == 0 and second.event_type is EventType.EV_POST_CODE
    assert dict(second.digests) == {
        "sha1": hashlib.sha1(b"firmware").digest(),
        "sha256": hashlib.sha256(b"firmware").digest(),
    }
    assert third.payload is not None and third.payload.summary() == "separator 0x00000000"
    assert encode_tcg2_log(log) == data


def test_sha1_log_fields() -> None:
    data = sha1_event(0, EV_POST_CODE, hashlib.sha1(b"a").digest(), b"a") + sha1_event(
        4, EV_SEPARATOR, bytes(20), bytes(4)
    )
    log = parse_tcg2_log(data)
    assert log.format == "sha1" and log.spec_id is None and log.banks == ("sha1",)
    assert [e.pcr for e in log.events] == [0, 4]
    assert log.events[1].offset == 32 + 1
    assert encode_tcg2_log(log) == data


def test_unknown_event_type_stays_an_int() -> None:
    log = parse_tcg2_log(spec_id_record() + measured(3, b"x", etype=0x1234_5678))
    event = log.events[1]
    assert event.event_type == 0x1234_5678 and not isinstance(event.event_type, EventType)
    assert event.type_name == "0x12345678"


def test_first_record_no_action_without_spec_id_means_sha1_format() -> None:
    log = parse_tcg2_log(sha1_event(0, EV_NO_ACTION, bytes(20), b"StartupLocality\x00\x04"))
    assert log.format == "sha1"
    assert log.events[0].payload == StartupLocality(4)


def test_parse_rejects_text() -> None:
    with pytest.raises(TypeError):
        parse_tcg2_log("not bytes")  # type: ignore[arg-type]


# --- named hostile inputs ------------------------------------------------------------------------


def _raises(data: bytes, error: type[ParseError], offset: int | None = None) -> ParseError:
    with pytest.raises(error) as info:
        parse_tcg2_log(data)
    if offset is not None:
        assert info.value.offset == offset, str(info.value)
    assert str(info.value.offset) in str(info.value)
    return info.value


def test_event_claiming_3_gb_is_truncated_without_allocating() -> None:
    head = spec_id_record() + measured(0, b"ok")
    bad = agile_event(
        1, EV_POST_CODE, [(SHA1, bytes(20)), (SHA256, bytes(32))], b"tiny", size=THREE_GB
    )
    started = time.monotonic()
    err = _raises(head + bad, TruncatedError, offset=len(head) + 12 + 22 + 34 + 4)
    assert time.monotonic() - started < 1
    assert "3221225472 bytes" in str(err)


def test_sha1_event_claiming_3_gb() -> None:
    _raises(sha1_event(0, EV_POST_CODE, bytes(20), b"x", size=THREE_GB), TruncatedError, offset=32)


def test_spec_id_claiming_3_gb() -> None:
    _raises(spec_id_record(size=THREE_GB), ParseError, offset=28)


def test_truncated_digest_list() -> None:
    full = spec_id_record() + measured(0, b"x")
    cut = full[: len(spec_id_record()) + 12 + 2 + 20 + 2 + 10]
    err = _raises(cut, TruncatedError, offset=len(spec_id_record()) + 12 + 22 + 2)
    assert err.what == "TPMT_HA.digest[sha256]"


@pytest.mark.parametrize("cut", range(1, 40))
def test_every_truncation_of_an_event_is_an_error(cut: int) -> None:
    full = spec_id_record() + measured(0, b"some data")
    with pytest.raises(TruncatedError):
        parse_tcg2_log(full[: len(full) - cut])


def test_unknown_algorithm_in_event() -> None:
    head = spec_id_record()
    event = agile_event(0, EV_POST_CODE, [(SHA1, bytes(20)), (0x0099, bytes(32))])
    err = _raises(head + event, ParseError, offset=len(head) + 12 + 22)
    assert "0x0099" in str(err) and "sha1, sha256" in str(err)


def test_algorithm_twice_in_event() -> None:
    event = agile_event(0, EV_POST_CODE, [(SHA1, bytes(20)), (SHA1, bytes(20))])
    _raises(spec_id_record() + event, ParseError, offset=len(spec_id_record()) + 12 + 22)


@pytest.mark.parametrize("count", [3, 0xFFFF_FFFF])
def test_digest_count_beyond_the_spec_id_table(count: int) -> None:
    event = agile_event(0, EV_POST_CODE, [(SHA1, bytes(20)), (SHA256, bytes(32))], count=count)
    err = _raises(spec_id_record() + event, ParseError, offset=len(spec_id_record()) + 8)
    assert err.what == "TCG_PCR_EVENT2.digestCount"


def test_fewer_digests_than_the_table_parse_but_that_bank_is_not_replayed() -> None:
    """tpm2-tools' event-uefivar.bin carries 2 digests under a 4-algorithm SpecID."""
    log = parse_tcg2_log(spec_id_record() + measured(0, b"a", algs=(SHA256,)))
    assert replay_pcrs(log) == {
        "sha256": {0: extend("sha256", bytes(32), hashlib.sha256(b"a").digest())}
    }
    with pytest.raises(ReplayError, match="sha1: some measured events carry no digest"):
        replay_eventlog(log, {"sha1": {0: bytes(20)}})


def test_spec_id_with_zero_algorithms() -> None:
    err = _raises(spec_id_record(spec_id_body(())), ParseError, offset=32 + 24)
    assert err.what == "TCG_EfiSpecIDEvent.numberOfAlgorithms"


def test_spec_id_claiming_4_billion_algorithms() -> None:
    _raises(spec_id_record(spec_id_body(count=0xFFFF_FFFF)), TruncatedError, offset=32 + 28)


def test_spec_id_known_algorithm_with_wrong_size() -> None:
    err = _raises(spec_id_record(spec_id_body(((SHA256, 20),))), ParseError, offset=32 + 30)
    assert "expected 32" in str(err)


def test_spec_id_algorithm_twice() -> None:
    _raises(spec_id_record(spec_id_body(((SHA1, 20), (SHA1, 20)))), ParseError, offset=32 + 32)


def test_spec_id_unknown_algorithm_parses_and_is_not_replayed() -> None:
    body = spec_id_body(((SHA256, 32), (0x0099, 16)))
    log = parse_tcg2_log(
        spec_id_record(body)
        + agile_event(0, EV_POST_CODE, [(SHA256, bytes(32)), (0x0099, bytes(16))])
    )
    assert log.banks == ("sha256", "alg_0x0099")
    assert set(replay_pcrs(log)) == {"sha256"}
    with pytest.raises(ReplayError, match="no hash implementation"):
        replay_eventlog(log, {"alg_0x0099": {0: bytes(16)}})


@pytest.mark.parametrize("delta", [1, -1, -5])
def test_spec_id_event_size_must_match_its_structure(delta: int) -> None:
    body = spec_id_body(vendor=b"\xde\xad\xbe\xef")
    _raises(spec_id_record(body, size=len(body) + delta) + b"\x00" * 8, ParseError, offset=28)


def test_spec_id_event_size_without_vendor_info_is_the_named_quirk() -> None:
    body = spec_id_body(vendor=b"\xde\xad\xbe\xef")
    data = spec_id_record(body, size=len(body) - 4) + measured(0, b"x")
    log = parse_tcg2_log(data)
    assert log.quirks == ("specid.event_size_excludes_vendor_info",)
    assert len(log.events) == 2
    assert encode_tcg2_log(log) == data


def test_spec_id_record_with_a_digest_or_pcr() -> None:
    _raises(spec_id_record(digest=b"\x01" * 20), ParseError, offset=8)
    _raises(spec_id_record(pcr=1), ParseError, offset=0)


@pytest.mark.parametrize("data", [b"", b"\x00", bytes(31)])
def test_empty_and_tiny_inputs(data: bytes) -> None:
    _raises(data, TruncatedError)


def test_trailing_garbage_after_the_last_event() -> None:
    head = spec_id_record() + measured(0, b"x")
    _raises(head + b"\x01\x02\x03", TruncatedError, offset=len(head))


def test_hostile_payload_sizes_are_content_not_structure() -> None:
    """A UEFI_VARIABLE_DATA claiming 2^63 name characters: the log parses, the event says why."""
    guid = bytes(16)
    payload = guid + struct.pack("<QQ", 2**63, 1) + b"S\x00"
    log = parse_tcg2_log(
        spec_id_record() + measured(7, payload, EventType.EV_EFI_VARIABLE_DRIVER_CONFIG)
    )
    event = log.events[1]
    assert event.payload is None and event.data == payload
    assert event.decode_problem is not None and "UnicodeName" in event.decode_problem


def test_device_path_node_of_length_zero_does_not_loop() -> None:
    image = struct.pack("<QQQQ", 0, 0, 0, 4) + b"\x04\x04\x00\x00"
    log = parse_tcg2_log(
        spec_id_record() + measured(4, image, EventType.EV_EFI_BOOT_SERVICES_APPLICATION)
    )
    problem = log.events[1].decode_problem
    assert problem is not None and "EFI_DEVICE_PATH_PROTOCOL.Length" in problem


# --- replay rules ------------------------------------------------------------------------------


def test_startup_locality_sets_pcr0_initial_value() -> None:
    log = parse_tcg2_log(
        spec_id_record() + STARTUP_LOCALITY_3 + measured(0, b"crtm") + measured(1, b"cfg")
    )
    pcrs = replay_pcrs(log)
    assert pcrs["sha256"][0] == extend(
        "sha256", bytes(31) + b"\x03", hashlib.sha256(b"crtm").digest()
    )
    assert pcrs["sha1"][0] == extend("sha1", bytes(19) + b"\x03", hashlib.sha1(b"crtm").digest())
    assert pcrs["sha256"][1] == extend("sha256", bytes(32), hashlib.sha256(b"cfg").digest())


def test_hcrtm_event_first_on_pcr0_means_locality_4() -> None:
    log = parse_tcg2_log(
        spec_id_record() + measured(0, b"HCRTM", EV_EFI_HCRTM_EVENT) + measured(0, b"fw")
    )
    digests = (hashlib.sha256(b"HCRTM").digest(), hashlib.sha256(b"fw").digest())
    assert replay_pcrs(log)["sha256"][0] == extend("sha256", bytes(31) + b"\x04", *digests)
    assert log.events[1].payload is not None and log.events[1].payload.summary() == "'HCRTM'"


def test_startup_locality_wins_over_hcrtm() -> None:
    log = parse_tcg2_log(
        spec_id_record() + STARTUP_LOCALITY_3 + measured(0, b"HCRTM", EV_EFI_HCRTM_EVENT)
    )
    want = extend("sha256", bytes(31) + b"\x03", hashlib.sha256(b"HCRTM").digest())
    assert replay_pcrs(log)["sha256"][0] == want


def test_hcrtm_event_not_first_on_pcr0_changes_nothing() -> None:
    log = parse_tcg2_log(
        spec_id_record() + measured(0, b"fw") + measured(0, b"HCRTM", EV_EFI_HCRTM_EVENT)
    )
    digests = (hashlib.sha256(b"fw").digest(), hashlib.sha256(b"HCRTM").digest())
    assert replay_pcrs(log)["sha256"][0] == extend("sha256", bytes(32), *digests)


def test_no_action_events_are_never_extended() -> None:
    noise = agile_event(5, EV_NO_ACTION, [(SHA1, b"\x11" * 20), (SHA256, b"\x22" * 32)], b"vendor")
    log = parse_tcg2_log(spec_id_record() + noise + measured(5, b"x"))
    assert replay_pcrs(log)["sha256"] == {
        5: extend("sha256", bytes(32), hashlib.sha256(b"x").digest())
    }


def test_only_extended_pcrs_are_reported() -> None:
    log = parse_tcg2_log(spec_id_record() + measured(4, b"a") + measured(9, b"b"))
    assert {bank: sorted(v) for bank, v in replay_pcrs(log).items()} == {
        "sha1": [4, 9],
        "sha256": [4, 9],
    }


def _two_pcr_log() -> tuple[RawEventLog, dict[str, dict[int, bytes]]]:
    log = parse_tcg2_log(
        spec_id_record() + measured(4, b"app") + measured(7, b"policy") + measured(4, b"app2")
    )
    return log, {bank: dict(values) for bank, values in replay_pcrs(log).items()}


def test_replay_eventlog_returns_verified_events_with_untrusted_fields() -> None:
    log, good = _two_pcr_log()
    verified = replay_eventlog(log, {"sha256": good["sha256"], "sha1": {4: good["sha1"][4]}})
    assert isinstance(verified, VerifiedEventLog)
    assert [(e.index, e.pcr) for e in verified.events] == [(1, 4), (2, 7), (3, 4)]
    assert set(verified.events[0].digests) == {"sha1", "sha256"}
    assert set(verified.events[1].digests) == {"sha256"}  # sha1 PCR 7 was not verified
    assert verified.events[0].untrusted_data == b"app"
    assert verified.events[0].untrusted_event_type is EV_POST_CODE
    assert verified.untrusted_spec_id == log.spec_id


def test_verified_events_only_cover_verified_pcrs() -> None:
    log, good = _two_pcr_log()
    verified = replay_eventlog(log, {"sha256": {7: good["sha256"][7]}})
    assert [e.pcr for e in verified.events] == [7]


def test_replay_error_names_every_failing_pcr() -> None:
    log, good = _two_pcr_log()
    expected = {
        "sha256": {4: b"\x00" * 32, 7: good["sha256"][7]},
        "sha1": {7: b"\xaa" * 20, 9: b"\xbb" * 20},
    }
    with pytest.raises(ReplayError) as info:
        replay_eventlog(log, expected)
    assert info.value.invalid_pcrs == (4, 7, 9)
    text = str(info.value)
    assert f"sha256 PCR 4: expected {'00' * 32}, computed {good['sha256'][4].hex()}" in text
    assert f"sha1 PCR 7: expected {'aa' * 20}, computed {good['sha1'][7].hex()}" in text
    assert f"sha1 PCR 9: expected {'bb' * 20}, computed {'00' * 20}" in text
    assert info.value.id == "verify.replay"


def test_replay_error_for_a_bank_the_log_lacks() -> None:
    log, _ = _two_pcr_log()
    with pytest.raises(ReplayError, match="sha384: not a bank of this log") as info:
        replay_eventlog(log, {"sha384": {4: bytes(48)}})
    assert info.value.invalid_pcrs == (4,)


def test_pcrs_without_events_must_hold_their_reset_value() -> None:
    log, _ = _two_pcr_log()
    replay_eventlog(
        log, {"sha1": {0: bytes(20), 10: bytes(20), 17: b"\xff" * 20, 22: b"\xff" * 20}}
    )
    with pytest.raises(ReplayError):
        replay_eventlog(log, {"sha1": {17: bytes(20)}})


def test_a_wrong_length_expected_value_is_a_mismatch() -> None:
    log, good = _two_pcr_log()
    with pytest.raises(ReplayError):
        replay_eventlog(log, {"sha256": {4: good["sha256"][4][:20]}})


@pytest.mark.parametrize(
    ("expected", "error"),
    [
        ({}, ValueError),
        ({"sha1": {}}, ValueError),
        ({"sha1": {32: bytes(20)}}, ValueError),
        ({"sha1": {0: "00"}}, TypeError),
    ],
)
def test_replay_eventlog_misuse(
    expected: dict[str, dict[int, bytes]], error: type[Exception]
) -> None:
    log, _ = _two_pcr_log()
    with pytest.raises(error):
        replay_eventlog(log, expected)


# --- property tests ----------------------------------------------------------------------------

_ALG_ROWS = st.lists(
    st.sampled_from([SHA1, SHA256, SHA384, SHA512]), min_size=1, max_size=4, unique=True
)
_TYPES = st.one_of(st.sampled_from(list(EventType)), st.integers(0, 2**32 - 1))


@st.composite
def agile_logs(draw: st.DrawFn) -> RawEventLog:
    algs = draw(_ALG_ROWS)
    vendor = draw(st.binary(max_size=8))
    body = spec_id_body(tuple((a, SIZES[a]) for a in algs), vendor)
    spec = parse_tcg2_log(spec_id_record(body)).spec_id
    events = [parse_tcg2_log(spec_id_record(body)).events[0]]
    for i in range(draw(st.integers(0, 12))):
        order = draw(st.permutations(algs))
        kept = order[: draw(st.integers(1, len(order)))]
        digests = {NAMES[a]: draw(st.binary(min_size=SIZES[a], max_size=SIZES[a])) for a in kept}
        events.append(
            RawEvent(
                index=i + 1,
                offset=0,
                pcr=draw(st.integers(0, 2**32 - 1)),
                event_type=draw(_TYPES),
                digests=digests,
                data=draw(st.binary(max_size=64)),
            )
        )
    return RawEventLog("crypto-agile", spec, tuple(events))


@st.composite
def sha1_logs(draw: st.DrawFn) -> RawEventLog:
    events = []
    for i in range(draw(st.integers(1, 12))):
        events.append(
            RawEvent(
                index=i,
                offset=0,
                pcr=draw(st.integers(0, 2**32 - 1)),
                event_type=draw(_TYPES),
                digests={"sha1": draw(st.binary(min_size=20, max_size=20))},
                data=draw(st.binary(max_size=64)),
            )
        )
    return RawEventLog("sha1", None, tuple(events))


def _same_events(a: RawEventLog, b: RawEventLog) -> None:
    assert a.format == b.format and a.spec_id == b.spec_id
    assert len(a.events) == len(b.events)
    for x, y in zip(a.events, b.events, strict=True):
        assert (x.pcr, int(x.event_type), dict(x.digests), x.data) == (
            y.pcr,
            int(y.event_type),
            dict(y.digests),
            y.data,
        )
        assert list(x.digests) == list(y.digests)


@settings(max_examples=200, deadline=None)
@given(agile_logs())
def test_round_trip_crypto_agile(log: RawEventLog) -> None:
    data = encode_tcg2_log(log)
    parsed = parse_tcg2_log(data)
    _same_events(log, parsed)
    assert encode_tcg2_log(parsed) == data
    replay_pcrs(parsed)


@settings(max_examples=200, deadline=None)
@given(sha1_logs())
def test_round_trip_sha1(log: RawEventLog) -> None:
    data = encode_tcg2_log(log)
    parsed = parse_tcg2_log(data)
    if parsed.format == "crypto-agile":  # a random first record that happens to be a SpecID
        return
    _same_events(log, parsed)
    assert encode_tcg2_log(parsed) == data


def _parse_whole_or_raise(data: bytes) -> None:
    """Only ParseError, and a success accounts for every byte (no partial result)."""
    try:
        log = parse_tcg2_log(data)
    except ParseError:
        return
    assert encode_tcg2_log(log) == data
    replay_pcrs(log)
    for event in log.events:
        if event.payload is not None:
            event.payload.summary()


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=512))
def test_random_bytes_raise_only_parse_error(data: bytes) -> None:
    _parse_whole_or_raise(data)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=256))
def test_random_bytes_after_a_spec_id_raise_only_parse_error(tail: bytes) -> None:
    _parse_whole_or_raise(spec_id_record() + tail)


_MUTATION_SOURCES = [
    "tpm2-tools/test/integration/fixtures/event-uefivar.bin",
    "tpm2-tools/test/integration/fixtures/event.bin",
    "tpm2-tools/test/integration/fixtures/event-sd-boot-fedora37.bin",
    "tpm2-tools/test/integration/fixtures/event-uefi-sha1-log.bin",
    "go-attestation/attest/testdata/sb_cert_eventlog",
    "go-attestation/attest/testdata/short_no_action_eventlog",
]


def _corpus_bytes() -> dict[str, bytes]:
    return {
        name: (CORPUS / name).read_bytes()
        for name in _MUTATION_SOURCES
        if (CORPUS / name).is_file()
    }


_SOURCES = _corpus_bytes()


@st.composite
def mutated_corpus_logs(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(sorted(_SOURCES.values()))))
    for _ in range(draw(st.integers(1, 4))):
        pos = draw(st.integers(0, len(data)))
        kind = draw(st.sampled_from(["flip", "truncate", "insert", "delete", "huge", "zero_u32"]))
        if kind == "flip" and pos < len(data):
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif kind == "truncate":
            del data[pos:]
        elif kind == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "delete":
            del data[pos : pos + draw(st.integers(1, 8))]
        elif kind == "huge":
            data[pos : pos + 4] = draw(
                st.sampled_from([THREE_GB, 0xFFFF_FFFF, 0x8000_0000])
            ).to_bytes(4, "little")
        elif kind == "zero_u32":
            data[pos : pos + 4] = bytes(4)
    return bytes(data)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_corpus_logs())
def test_mutated_corpus_logs_raise_only_parse_error(data: bytes) -> None:
    _parse_whole_or_raise(data)


def test_mutation_sources_present(corpus: Path) -> None:
    assert len(_SOURCES) == len(_MUTATION_SOURCES)


@settings(max_examples=500, deadline=None)
@given(st.sampled_from(list(EventType)), st.binary(max_size=200))
def test_payload_decoding_never_raises(etype: EventType, data: bytes) -> None:
    log = parse_tcg2_log(spec_id_record() + measured(1, data, etype))
    event = log.events[1]
    assert event.data == data
    assert (event.payload is None) or (event.decode_problem is None)
    if event.payload is not None:
        assert isinstance(event.payload.summary(), str)


@settings(max_examples=300, deadline=None)
@given(
    st.binary(max_size=16),
    st.binary(max_size=120),
    st.sampled_from([0x80000001, 0x80000002, 0x800000E0]),
)
def test_variable_payloads_never_raise(name: bytes, value: bytes, etype: int) -> None:
    from evidence._eventlog_payloads import EFI_GLOBAL_VARIABLE_GUID

    raw_name = name[: len(name) // 2 * 2]
    payload = (
        EFI_GLOBAL_VARIABLE_GUID.bytes_le
        + struct.pack("<QQ", len(raw_name) // 2, len(value))
        + raw_name
        + value
    )
    log = parse_tcg2_log(spec_id_record() + measured(7, payload, etype))
    event = log.events[1]
    assert event.payload is None or isinstance(event.payload, EfiVariable)


def test_results_are_immutable() -> None:
    log, good = _two_pcr_log()
    verified = replay_eventlog(log, {"sha256": good["sha256"]})
    with pytest.raises(AttributeError):
        log.events[1].pcr = 9  # type: ignore[misc]
    with pytest.raises(TypeError):
        log.events[1].digests["sha1"] = bytes(20)  # type: ignore[index]
    with pytest.raises(TypeError):
        verified.pcrs["sha256"][4] = bytes(32)  # type: ignore[index]


def test_public_names_resolve() -> None:
    import evidence.eventlog as module

    assert all(hasattr(module, name) for name in module.__all__)
