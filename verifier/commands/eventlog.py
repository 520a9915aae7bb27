"""``vtpm-verify eventlog``: replay and show TCG PC Client firmware event logs.

``vtpm-verify eventlog replay FILE [--json]`` prints the PCR values the log claims, one entry per
PCR it extends, per bank; the ``--json`` shape is relied on by scripts::

    {"format": "crypto-agile"|"sha1", "events": N,
     "banks": {"sha1": {"0": "<hex>", ...}, "sha256": {...}}}

``vtpm-verify eventlog show FILE [--json]`` lists the events with their decoded payloads.
Malformed input exits 2 with one line on stderr naming the offset and the problem (``cli.main``
turns the ``ParseError`` into that line).
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import uuid
from collections.abc import Mapping
from typing import Any

from evidence.eventlog import RawEvent, RawEventLog, parse_tcg2_log, replay_pcrs
from verifier._cli import emit_json, read_input

__all__ = ["register"]

_RULES = (
    "Replay rules: every PCR starts at zero; PCR 0 starts at the StartupLocality the log "
    "records (EV_NO_ACTION 'StartupLocality'), or at locality 4 when its first measured event is "
    "EV_EFI_HCRTM_EVENT; every event except EV_NO_ACTION extends PCR = H(PCR || digest) in each "
    "bank, in log order. The values are what the log claims: they mean something only once "
    "compared with PCR values from a verified quote."
)


def register(subparsers: Any) -> None:
    """Add ``eventlog replay`` and ``eventlog show`` to ``vtpm-verify``."""
    eventlog = subparsers.add_parser(
        "eventlog",
        help="TCG firmware event logs (binary_bios_measurements)",
        description=(
            "Replay or show a TCG PC Client firmware event log, as found in "
            "/sys/kernel/security/tpm0/binary_bios_measurements. Both formats are read: "
            "crypto-agile (TPM 2.0, first record 'Spec ID Event03') and SHA1 (TPM 1.2 style)."
        ),
    )
    sub = eventlog.add_subparsers(dest="eventlog_command", metavar="ACTION", required=True)

    replay = sub.add_parser(
        "replay",
        help="compute the PCR values a log claims",
        description="Compute, per bank, the value of every PCR the log extends. " + _RULES,
        epilog=(
            'JSON shape: {"format": "crypto-agile"|"sha1", "events": N, "banks": {"sha256": '
            '{"0": "<hex>", ...}, ...}}; "events" counts every record, the SpecID one included. '
            "A bank is left out when some measured event carries no digest for it."
        ),
    )
    _common(replay)
    replay.set_defaults(func=_replay)

    show = sub.add_parser(
        "show",
        help="list the events and their decoded payloads",
        description=(
            "List every event: index, PCR, type, digests (abbreviated in the table) and a "
            "summary of the decoded payload (UEFI variables, images with their device paths, "
            "GPT, separators, action strings...). Payloads that do not decode are flagged with "
            "'!' and kept as bytes; they do not stop the listing."
        ),
    )
    _common(show)
    show.set_defaults(func=_show)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", metavar="FILE", help="the binary event log ('-' for standard input)")
    p.add_argument("--json", action="store_true", help="print JSON for scripts")


def _parse(args: argparse.Namespace) -> RawEventLog:
    return parse_tcg2_log(read_input(args.file))


# --- replay ------------------------------------------------------------------------------------


def replay_document(log: RawEventLog) -> dict[str, Any]:
    """The ``replay --json`` document for ``log``."""
    banks = {
        bank: {str(pcr): value.hex() for pcr, value in values.items()}
        for bank, values in replay_pcrs(log).items()
    }
    return {"format": log.format, "events": len(log.events), "banks": banks}


def _replay(args: argparse.Namespace) -> int:
    log = _parse(args)
    doc = replay_document(log)
    if args.json:
        emit_json(doc)
        return 0
    print(_header(log))
    print(f"{'bank':<8} {'PCR':>3}  value")
    for bank, values in doc["banks"].items():
        for pcr, value in values.items():
            print(f"{bank:<8} {pcr:>3}  {value}")
        if not values:
            print(f"{bank:<8}   -  (no measured events)")
    return 0


def _header(log: RawEventLog) -> str:
    text = f"format: {log.format}  events: {len(log.events)}  banks: {', '.join(log.banks)}"
    if log.quirks:
        text += f"  quirks: {', '.join(log.quirks)}"
    return text


# --- show --------------------------------------------------------------------------------------


def _summary(event: RawEvent) -> str:
    if event.decode_problem is not None:
        return f"! {event.decode_problem}"
    if event.payload is not None:
        return event.payload.summary()
    return f"({len(event.data)} bytes)"


def _jsonable(value: Any) -> Any:
    """Payload dataclasses → JSON: bytes as hex, GUIDs as strings, enums by name."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out = {"kind": type(value).__name__}
        out.update({f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)})
        return out
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, enum.Enum):
        return value.name
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    return value


def show_document(log: RawEventLog) -> dict[str, Any]:
    """The ``show --json`` document for ``log``."""
    events = [
        {
            "index": e.index,
            "offset": e.offset,
            "pcr": e.pcr,
            "type": e.type_name,
            "type_value": int(e.event_type),
            "digests": {bank: d.hex() for bank, d in e.digests.items()},
            "data": e.data.hex(),
            "summary": _summary(e),
            "payload": _jsonable(e.payload),
            "decode_problem": e.decode_problem,
        }
        for e in log.events
    ]
    return {
        "format": log.format,
        "spec_id": _jsonable(log.spec_id),
        "quirks": list(log.quirks),
        "events": events,
    }


def _show(args: argparse.Namespace) -> int:
    log = _parse(args)
    if args.json:
        emit_json(show_document(log))
        return 0
    print(_header(log))
    rows = [
        (e, " ".join(f"{bank}:{d.hex()[:8]}" for bank, d in e.digests.items())) for e in log.events
    ]
    width = max(len(e.type_name) for e in log.events)
    dwidth = max(len(d) for _, d in rows)
    print(f"{'#':>4} {'PCR':>3}  {'type':<{width}}  {'digests':<{dwidth}}  payload")
    for e, digests in rows:
        head = f"{e.index:>4} {e.pcr:>3}  {e.type_name:<{width}}  {digests:<{dwidth}}"
        print(f"{head}  {_summary(e)}")
    return 0
