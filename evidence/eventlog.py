"""TCG PC Client firmware event logs: parse, replay, verify.

The log is what ``/sys/kernel/security/tpm0/binary_bios_measurements`` exposes, in one of the two
formats of the TCG PC Client Platform Firmware Profile Specification (PFP) 1.05:

* **crypto-agile**: the first record is a SHA1-format ``TCG_PCR_EVENT`` (``EV_NO_ACTION``, PCR 0,
  zero digest) carrying ``TCG_EfiSpecIDEvent`` ("Spec ID Event03"); every later record is a
  ``TCG_PCR_EVENT2`` with one digest per algorithm of the SpecID table.
* **sha1** (TPM 1.2 style): every record is a ``TCG_PCR_EVENT`` with one SHA-1 digest.

Theory of operation (the rules of go-attestation ``attest/eventlog.go``):

1. :func:`parse_tcg2_log` checks *shape* only and returns a :class:`RawEventLog`. Nothing in it is
   trustworthy: any program on the measured machine could have written those bytes.
2. :func:`replay_pcrs` recomputes the PCR values the log claims (``PCR = H(PCR || digest)`` per
   bank, in log order, skipping ``EV_NO_ACTION``; PCR 0 starts at the StartupLocality or H-CRTM
   locality).
3. :func:`replay_eventlog` compares that replay with PCR values the caller already trusts (read
   from a signed quote) and is the only way to a :class:`VerifiedEventLog`. Even there, the parts
   replay does not cover (event type, event data, decoded payload) keep an ``untrusted_`` prefix:
   a digest covers whatever the firmware hashed, which is often not the event data.

Structural problems (sizes past the end, digest lists that do not match the SpecID table) raise
:class:`~evidence.errors.ParseError` with the byte offset; a payload that does not fit its event
type is content, not structure: the event keeps its bytes and records ``decode_problem``.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal

from cryptography.hazmat.primitives import hashes

from evidence._algorithms import HASH_ALGS
from evidence._eventlog_payloads import (
    DevicePath,
    EfiGptEvent,
    EfiHandoffTables,
    EfiImageLoad,
    EfiLoadOption,
    EfiSignature,
    EfiVariable,
    EventPayload,
    EventType,
    GptPartition,
    NoActionEvent,
    PlatformFirmwareBlob,
    SeparatorEvent,
    SpecIdAlgorithm,
    SpecIdEvent,
    StartupLocality,
    TextEvent,
    decode_payload,
    is_spec_id_event03,
)
from evidence._reader import Reader
from evidence.errors import ParseError, ReplayError, TruncatedError

__all__ = [
    "PARSE_QUIRKS",
    "DevicePath",
    "EfiGptEvent",
    "EfiHandoffTables",
    "EfiImageLoad",
    "EfiLoadOption",
    "EfiSignature",
    "EfiVariable",
    "EventPayload",
    "EventType",
    "GptPartition",
    "LogFormat",
    "NoActionEvent",
    "ParseQuirk",
    "PlatformFirmwareBlob",
    "RawEvent",
    "RawEventLog",
    "SeparatorEvent",
    "SpecIdAlgorithm",
    "SpecIdEvent",
    "StartupLocality",
    "TextEvent",
    "VerifiedEvent",
    "VerifiedEventLog",
    "encode_tcg2_log",
    "event_type_name",
    "parse_tcg2_log",
    "replay_eventlog",
    "replay_pcrs",
]

LogFormat = Literal["crypto-agile", "sha1"]

#: PCR indices replay compares (a TPM 2.0 has 24; 32 is the widest PCR bitmap any TPM uses).
_MAX_PCR = 31
_SHA1_DIGEST_SIZE = 20
_HEADER_SHA1 = "TCG_PCR_EVENT"
_HEADER_AGILE = "TCG_PCR_EVENT2"


# --- hash algorithms ----------------------------------------------------------------------
# Names and digest sizes come from the shared table in evidence/_algorithms.py.


def _sm3(data: bytes) -> bytes:
    # Not every OpenSSL build gives hashlib SM3; cryptography always has it.
    h = hashes.Hash(hashes.SM3())
    h.update(data)
    return h.finalize()


def _hashlib(name: str) -> Callable[[bytes], bytes]:
    def digest(data: bytes) -> bytes:
        return hashlib.new(name, data).digest()

    return digest


_HASH_FUNCTIONS: Mapping[str, Callable[[bytes], bytes]] = MappingProxyType(
    {
        alg.name: _sm3 if alg.name == "sm3_256" else _hashlib(alg.hashlib_name)
        for alg in HASH_ALGS.values()
    }
)
_DIGEST_SIZES = {alg.name: alg.digest_size for alg in HASH_ALGS.values()}


def _alg_name(alg_id: int) -> str:
    known = HASH_ALGS.get(alg_id)
    return known.name if known else f"alg_0x{alg_id:04x}"


# --- quirks ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParseQuirk:
    """A documented deviation from the specification that the parser accepts.

    Args:
        id: stable dotted id, listed in :attr:`RawEventLog.quirks` when it applied.
        description: what the deviation is and what the parser does with it.
        source: where it was seen and who else accepts it.
    """

    id: str
    description: str
    source: str


SPECID_SIZE_WITHOUT_VENDOR_INFO = ParseQuirk(
    id="specid.event_size_excludes_vendor_info",
    description=(
        "The SpecID event's EventSize stops after vendorInfoSize, and the vendorInfo bytes "
        "follow outside it. Accepted only in exactly that shape: the SpecID event is taken to "
        "end after vendorInfo (its structure decides), and parsing continues from there."
    ),
    source=(
        "tpm2-software/tpm2-tools test/integration/fixtures/specid-vendordata.bin @ bc25f714 "
        "(EventSize 37 for a 41-byte structure); tpm2-tools lib/tpm2_eventlog.c specid_event() "
        "frames the SpecID event by its structure, and the fixture's expected YAML decodes "
        "vendorInfo and has no further events"
    ),
)

#: Every parse-level quirk, as data (STYLE.md §4 item 3).
PARSE_QUIRKS: tuple[ParseQuirk, ...] = (SPECID_SIZE_WITHOUT_VENDOR_INFO,)


# --- data types ------------------------------------------------------------------------------


def event_type_name(event_type: int) -> str:
    """The specification's name of an event type (``EV_SEPARATOR``), or ``0x%08x``."""
    try:
        return EventType(event_type).name
    except ValueError:
        return f"0x{event_type:08x}"


def _event_type(value: int) -> EventType | int:
    try:
        return EventType(value)
    except ValueError:
        return value


@dataclass(frozen=True)
class RawEvent:
    """One parsed event, unverified.

    Attributes:
        index: position in the log (the SpecID record of a crypto-agile log is index 0).
        offset: byte offset of the record in the log.
        pcr: ``PCRIndex``.
        event_type: an :class:`EventType`, or the plain ``int`` for a value the spec does not name.
        digests: bank name (``"sha1"``, ``"sha256"``…) → digest, in the log's order.
        data: the ``Event`` bytes.
        payload: the decoded ``data``, or ``None`` (opaque type, or ``decode_problem``).
        decode_problem: why ``data`` did not decode as its type promises, if it did not.
    """

    index: int
    offset: int
    pcr: int
    event_type: EventType | int
    digests: Mapping[str, bytes]
    data: bytes
    payload: EventPayload | None = None
    decode_problem: str | None = None

    @property
    def type_name(self) -> str:
        return event_type_name(self.event_type)


@dataclass(frozen=True)
class RawEventLog:
    """A parsed firmware event log. Unverified: see :func:`replay_eventlog`.

    Attributes:
        format: ``"crypto-agile"`` or ``"sha1"``.
        spec_id: the SpecID table of a crypto-agile log (``None`` for SHA1 format).
        events: every record in log order, the SpecID record included.
        quirks: ids of the :data:`PARSE_QUIRKS` that had to apply.
    """

    format: LogFormat
    spec_id: SpecIdEvent | None
    events: tuple[RawEvent, ...]
    quirks: tuple[str, ...] = ()

    @property
    def banks(self) -> tuple[str, ...]:
        """Names of the digest banks every event carries, in SpecID order."""
        if self.spec_id is None:
            return ("sha1",)
        return tuple(a.name for a in self.spec_id.algorithms)


@dataclass(frozen=True)
class VerifiedEvent:
    """A measured event on a PCR whose replay matched trusted values.

    ``pcr``, ``index`` and ``digests`` are covered by replay (``digests`` holds only the banks
    verified for this PCR). Type, data and payload are not: a digest covers whatever the firmware
    hashed (an image, a variable), not necessarily these bytes.
    """

    index: int
    pcr: int
    digests: Mapping[str, bytes]
    untrusted_event_type: EventType | int
    untrusted_data: bytes
    untrusted_payload: EventPayload | None
    untrusted_decode_problem: str | None


@dataclass(frozen=True)
class VerifiedEventLog:
    """The result of :func:`replay_eventlog`.

    Attributes:
        format: the log's format.
        pcrs: the verified values, bank → PCR → value (exactly what the caller trusted).
        events: measured events on verified PCRs, in log order.
        untrusted_spec_id: the SpecID header (never extended, so replay cannot cover it).
    """

    format: LogFormat
    pcrs: Mapping[str, Mapping[int, bytes]]
    events: tuple[VerifiedEvent, ...]
    untrusted_spec_id: SpecIdEvent | None


# --- parsing ---------------------------------------------------------------------------------


def _read_spec_id(r: Reader) -> SpecIdEvent:
    """Read ``TCG_EfiSpecIDEvent`` from ``r`` (PFP 1.05)."""
    r.skip(16, "TCG_EfiSpecIDEvent.signature")
    platform_class = r.u32le("TCG_EfiSpecIDEvent.platformClass")
    minor = r.u8("TCG_EfiSpecIDEvent.specVersionMinor")
    major = r.u8("TCG_EfiSpecIDEvent.specVersionMajor")
    errata = r.u8("TCG_EfiSpecIDEvent.specErrata")
    uintn = r.u8("TCG_EfiSpecIDEvent.uintnSize")
    at = r.offset
    count = r.u32le("TCG_EfiSpecIDEvent.numberOfAlgorithms")
    if count == 0:
        raise ParseError("TCG_EfiSpecIDEvent.numberOfAlgorithms", at, "at least 1", "0")
    if count * 4 > r.remaining:
        raise TruncatedError(
            "TCG_EfiSpecIDEvent.digestSizes",
            r.offset,
            f"{count} algorithms ({count * 4} bytes)",
            f"{r.remaining} bytes",
        )
    algorithms: list[SpecIdAlgorithm] = []
    for _ in range(count):
        at = r.offset
        alg_id = r.u16le("TCG_EfiSpecIdEventAlgorithmSize.algorithmId")
        size = r.u16le("TCG_EfiSpecIdEventAlgorithmSize.digestSize")
        name = _alg_name(alg_id)
        if any(a.alg_id == alg_id for a in algorithms):
            raise ParseError("TCG_EfiSpecIDEvent.digestSizes", at, "each algorithm once", name)
        known = _DIGEST_SIZES.get(name)
        if (known is not None and size != known) or size == 0:
            expected = f"{known}" if known is not None else "a non-zero size"
            raise ParseError(f"TCG_EfiSpecIDEvent.digestSizes[{name}]", at + 2, expected, str(size))
        algorithms.append(SpecIdAlgorithm(alg_id, name, size))
    vendor_size = r.u8("TCG_EfiSpecIDEvent.vendorInfoSize")
    vendor = r.take(vendor_size, "TCG_EfiSpecIDEvent.vendorInfo")
    return SpecIdEvent(platform_class, minor, major, errata, uintn, tuple(algorithms), vendor)


def _read_pcr(r: Reader, what: str) -> int:
    # Any u32: Windows logs put informational EV_NO_ACTION records on PCR 0xFFFFFFFF
    # (go-attestation attest/testdata/option_rom_eventlog). Replay only compares PCRs 0..31.
    return r.u32le(f"{what}.PCRIndex")


def _make_event(
    index: int, offset: int, pcr: int, etype: int, digests: dict[str, bytes], data: bytes
) -> RawEvent:
    payload, problem = decode_payload(etype, data)
    return RawEvent(
        index=index,
        offset=offset,
        pcr=pcr,
        event_type=_event_type(etype),
        digests=MappingProxyType(digests),
        data=data,
        payload=payload,
        decode_problem=problem,
    )


def _read_sha1_event(r: Reader, index: int) -> RawEvent:
    offset = r.offset
    pcr = _read_pcr(r, _HEADER_SHA1)
    etype = r.u32le(f"{_HEADER_SHA1}.EventType")
    digest = r.take(_SHA1_DIGEST_SIZE, f"{_HEADER_SHA1}.Digest")
    size = r.u32le(f"{_HEADER_SHA1}.EventSize")
    data = r.take(size, f"{_HEADER_SHA1}.Event")
    return _make_event(index, offset, pcr, etype, {"sha1": digest}, data)


def _read_agile_event(r: Reader, index: int, table: Mapping[int, SpecIdAlgorithm]) -> RawEvent:
    offset = r.offset
    pcr = _read_pcr(r, _HEADER_AGILE)
    etype = r.u32le(f"{_HEADER_AGILE}.EventType")
    at = r.offset
    count = r.u32le(f"{_HEADER_AGILE}.digestCount")
    if count > len(table):
        raise ParseError(
            f"{_HEADER_AGILE}.digestCount",
            at,
            f"at most {len(table)} (one digest per SpecID algorithm)",
            str(count),
        )
    digests: dict[str, bytes] = {}
    for _ in range(count):
        at = r.offset
        alg_id = r.u16le("TPMT_HA.hashAlg")
        alg = table.get(alg_id)
        if alg is None:
            raise ParseError(
                "TPMT_HA.hashAlg",
                at,
                "an algorithm of the SpecID table ("
                + ", ".join(a.name for a in table.values())
                + ")",
                f"0x{alg_id:04x}",
            )
        if alg.name in digests:
            raise ParseError("TPMT_HA.hashAlg", at, "each algorithm once", alg.name)
        digests[alg.name] = r.take(alg.digest_size, f"TPMT_HA.digest[{alg.name}]")
    size = r.u32le(f"{_HEADER_AGILE}.EventSize")
    data = r.take(size, f"{_HEADER_AGILE}.Event")
    return _make_event(index, offset, pcr, etype, digests, data)


def _parse_agile(data: bytes, digest: bytes, size: int, size_at: int, data_at: int) -> RawEventLog:
    """Parse a crypto-agile log whose SpecID record's data starts at ``data_at``."""
    if any(digest):
        raise ParseError("TCG_EfiSpecIDEvent record", 8, "a zero SHA-1 digest", digest.hex())
    # The structure says where the SpecID event ends, and EventSize must agree, with the one
    # documented exception of SPECID_SIZE_WITHOUT_VENDOR_INFO.
    spec_reader = Reader(data, data_at)
    spec = _read_spec_id(spec_reader)
    end = spec_reader.pos
    quirks: tuple[str, ...] = ()
    if end - data_at != size:
        if spec.vendor_info and size == end - data_at - len(spec.vendor_info):
            quirks = (SPECID_SIZE_WITHOUT_VENDOR_INFO.id,)
        else:
            raise ParseError(
                f"{_HEADER_SHA1}.EventSize",
                size_at,
                f"{end - data_at} (the size of its TCG_EfiSpecIDEvent)",
                str(size),
            )
    events = [
        RawEvent(
            index=0,
            offset=0,
            pcr=0,
            event_type=EventType.EV_NO_ACTION,
            digests=MappingProxyType({"sha1": digest}),
            data=data[data_at:end],
            payload=spec,
        )
    ]
    table = {a.alg_id: a for a in spec.algorithms}
    r = Reader(data, end)
    while not r.at_end():
        events.append(_read_agile_event(r, len(events), table))
    return RawEventLog("crypto-agile", spec, tuple(events), quirks)


def parse_tcg2_log(data: bytes) -> RawEventLog:
    """Parse a TCG PC Client firmware event log (either format), checking shape only.

    The format is decided by the first record (PFP 1.05): an ``EV_NO_ACTION`` record
    whose data starts with ``"Spec ID Event03\\0"`` makes the log crypto-agile; anything else
    makes the whole log SHA1 format.

    Args:
        data: the whole log, e.g. the bytes of ``binary_bios_measurements``.

    Returns:
        The events, unverified.

    Raises:
        TruncatedError: a record or a size runs past the end (whatever size it claims).
        ParseError: the SpecID table is malformed (no algorithms, a known algorithm with the wrong
            size, an algorithm twice, an EventSize that disagrees with the structure); an event's
            digestCount exceeds the table, or it names an algorithm not in the table or one
            twice; an empty log. An event may carry fewer digests than the table has rows
            (tpm2-tools ``event-uefivar.bin``); such banks are simply not replayed.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise TypeError(f"parse_tcg2_log needs bytes, got {type(data).__name__}")
    data = bytes(data)
    r = Reader(data)
    r.u32le(f"{_HEADER_SHA1}.PCRIndex")
    etype = r.u32le(f"{_HEADER_SHA1}.EventType")
    digest = r.take(_SHA1_DIGEST_SIZE, f"{_HEADER_SHA1}.Digest")
    size_at = r.offset
    size = r.u32le(f"{_HEADER_SHA1}.EventSize")
    if etype == EventType.EV_NO_ACTION and is_spec_id_event03(data[r.pos : r.pos + 16]):
        pcr = int.from_bytes(data[:4], "little")
        if pcr != 0:
            raise ParseError("TCG_EfiSpecIDEvent record.PCRIndex", 0, "0", str(pcr))
        return _parse_agile(data, digest, size, size_at, r.pos)
    r = Reader(data)
    events: list[RawEvent] = []
    while not r.at_end():
        events.append(_read_sha1_event(r, len(events)))
    return RawEventLog("sha1", None, tuple(events))


# --- encoding ------------------------------------------------------------------------------


def encode_tcg2_log(log: RawEventLog) -> bytes:
    """Encode ``log`` back to its bytes: ``encode_tcg2_log(parse_tcg2_log(b)) == b``.

    Only ``format``, ``quirks`` and each event's ``pcr``, ``event_type``, ``digests`` (in order)
    and ``data`` are used; a crypto-agile log's first event is written as the SHA1-format SpecID
    record. Tests use it to build logs, hostile ones included.

    Raises:
        ValueError: an event whose digests do not fit its format (a SHA1-format event without
            exactly one 20-byte ``sha1`` digest, or an unknown bank name in a crypto-agile one).
    """
    out = bytearray()
    for i, event in enumerate(log.events):
        if log.format == "sha1" or i == 0:
            digest = event.digests.get("sha1", b"")
            if len(event.digests) != 1 or len(digest) != _SHA1_DIGEST_SIZE:
                raise ValueError(f"event {i}: a SHA1-format record needs one 20-byte sha1 digest")
            size = len(event.data)
            if i == 0 and SPECID_SIZE_WITHOUT_VENDOR_INFO.id in log.quirks and log.spec_id:
                size -= len(log.spec_id.vendor_info)
            out += event.pcr.to_bytes(4, "little") + int(event.event_type).to_bytes(4, "little")
            out += digest + size.to_bytes(4, "little") + event.data
            continue
        ids = {a.name: a.alg_id for a in log.spec_id.algorithms} if log.spec_id else {}
        out += event.pcr.to_bytes(4, "little") + int(event.event_type).to_bytes(4, "little")
        out += len(event.digests).to_bytes(4, "little")
        for name, value in event.digests.items():
            if name not in ids:
                raise ValueError(f"event {i}: bank {name!r} is not in the SpecID table")
            out += ids[name].to_bytes(2, "little") + value
        out += len(event.data).to_bytes(4, "little") + event.data
    return bytes(out)


# --- replay --------------------------------------------------------------------------------


def _pcr0_locality(log: RawEventLog) -> int:
    """PCR 0's initial locality: StartupLocality, else 4 for an H-CRTM log, else 0.

    StartupLocality: the first ``EV_NO_ACTION`` on PCR 0 whose data is ``"StartupLocality\\0"``
    + u8 (PFP 1.05). H-CRTM: the first measured PCR 0 event is ``EV_EFI_HCRTM_EVENT``
    (tpm2-software/tpm2-tss ``test/unit/fapi-eventlog.c`` @ 506c5e6d; TPM 2.0 Part 1 §34.3).
    """
    for event in log.events:
        if event.pcr == 0 and isinstance(event.payload, StartupLocality):
            return event.payload.locality
    for event in log.events:
        if event.pcr == 0 and event.event_type != EventType.EV_NO_ACTION:
            return 4 if event.event_type == EventType.EV_EFI_HCRTM_EVENT else 0
    return 0


def _initial(pcr: int, size: int, locality: int) -> bytes:
    if pcr == 0:
        return bytes(size - 1) + bytes([locality])
    return bytes(size)


def _reset_value(pcr: int, size: int, locality: int) -> bytes:
    """The value of a PCR the log never extends (PCR 17–22 reset to all ones on a PC client)."""
    if 17 <= pcr <= 22:
        return b"\xff" * size
    return _initial(pcr, size, locality)


def _replayable_banks(log: RawEventLog) -> tuple[str, ...]:
    measured = [e for e in log.events if e.event_type != EventType.EV_NO_ACTION]
    return tuple(
        bank
        for bank in log.banks
        if bank in _HASH_FUNCTIONS and all(bank in e.digests for e in measured)
    )


def replay_pcrs(log: RawEventLog) -> dict[str, dict[int, bytes]]:
    """Recompute the PCR values ``log`` claims, per bank.

    Rules (``../shared/docs/protocols.md`` §6.1): every PCR starts at zero, except PCR 0, whose
    last byte is the StartupLocality (or 4 for an H-CRTM log, see :func:`_pcr0_locality`); each
    event that is not ``EV_NO_ACTION`` extends ``PCR = H(PCR || digest)`` in every bank, in log
    order.

    Returns:
        bank name → PCR → value, for the PCRs the log extends only (sorted). A bank is left out
        when this module cannot hash it (an algorithm id it does not know) or when some
        measured event lacks its digest (then the log does not say what that bank holds).
    """
    locality = _pcr0_locality(log)
    out: dict[str, dict[int, bytes]] = {}
    for bank in _replayable_banks(log):
        h = _HASH_FUNCTIONS[bank]
        size = _DIGEST_SIZES[bank]
        values: dict[int, bytes] = {}
        for event in log.events:
            if event.event_type == EventType.EV_NO_ACTION:
                continue
            current = values.get(event.pcr)
            if current is None:
                current = _initial(event.pcr, size, locality)
            values[event.pcr] = h(current + event.digests[bank])
        out[bank] = dict(sorted(values.items()))
    return out


def _check_expected(expected: Mapping[str, Mapping[int, bytes]]) -> None:
    if not any(expected.values()):
        raise ValueError("replay_eventlog needs at least one expected PCR value")
    for bank, pcrs in expected.items():
        for pcr, value in pcrs.items():
            if not isinstance(pcr, int) or not 0 <= pcr <= _MAX_PCR:
                raise ValueError(f"expected {bank} PCR index must be 0..{_MAX_PCR}, got {pcr!r}")
            if not isinstance(value, bytes):
                raise TypeError(f"expected {bank} PCR {pcr} must be bytes, got {type(value)}")


def replay_eventlog(
    log: RawEventLog, expected: Mapping[str, Mapping[int, bytes]]
) -> VerifiedEventLog:
    """Verify ``log`` against PCR values the caller already trusts.

    The caller must already trust ``expected`` (bank name → PCR → value), e.g. because it came
    out of a quote whose signature, key chain and nonce were verified. Checks, in order:

    1. every bank in ``expected`` is a bank of the log that this module can hash;
    2. for every expected PCR, the replay of :func:`replay_pcrs` equals the expected value
       (constant-time compare). A PCR the log never extends must hold its reset value (zeros,
       PCR 0 with its locality, all ones for PCR 17–22).

    All mismatches are collected before raising, so the error names every failing PCR.

    Returns:
        A :class:`VerifiedEventLog` whose events are the measured events on the verified PCRs.

    Raises:
        ReplayError: any check failed; ``invalid_pcrs`` lists the PCR indices and the message
            gives bank, PCR, expected and computed value for each.
        ValueError, TypeError: ``expected`` is empty or not bank → int → bytes.
    """
    _check_expected(expected)
    computed = replay_pcrs(log)
    locality = _pcr0_locality(log)
    problems: list[str] = []
    invalid: set[int] = set()
    for bank, pcrs in expected.items():
        if bank not in computed:
            if bank not in log.banks:
                why = "not a bank of this log"
            elif bank not in _HASH_FUNCTIONS:
                why = "no hash implementation for it"
            else:
                why = "some measured events carry no digest for it"
            problems.append(f"{bank}: {why} (log banks: {', '.join(log.banks)})")
            invalid.update(pcrs)
            continue
        size = _DIGEST_SIZES[bank]
        for pcr, want in sorted(pcrs.items()):
            got = computed[bank].get(pcr, _reset_value(pcr, size, locality))
            if not hmac.compare_digest(got, want):
                problems.append(
                    f"{bank} PCR {pcr}: expected {want.hex() or '(empty)'}, computed {got.hex()}"
                )
                invalid.add(pcr)
    if problems:
        raise ReplayError(
            "event log does not replay to the expected PCRs: " + "; ".join(problems), invalid
        )
    verified_banks: dict[int, list[str]] = {}
    for bank, pcrs in expected.items():
        for pcr in pcrs:
            verified_banks.setdefault(pcr, []).append(bank)
    events = tuple(
        VerifiedEvent(
            index=e.index,
            pcr=e.pcr,
            digests=MappingProxyType({b: e.digests[b] for b in verified_banks[e.pcr]}),
            untrusted_event_type=e.event_type,
            untrusted_data=e.data,
            untrusted_payload=e.payload,
            untrusted_decode_problem=e.decode_problem,
        )
        for e in log.events
        if e.event_type != EventType.EV_NO_ACTION and e.pcr in verified_banks
    )
    pcrs_out = MappingProxyType(
        {bank: MappingProxyType(dict(sorted(p.items()))) for bank, p in expected.items()}
    )
    return VerifiedEventLog(log.format, pcrs_out, events, log.spec_id)
