#!/usr/bin/env python3
"""Act 0 of ``make demo`` (``scripts/demo.py``): replay every real firmware event log in the
shared corpus and check it. Runs on its own too: ``python scripts/demo_corpus.py [--json]``.

What it does, honestly: parses each TCG event log under ``../shared/corpus`` with
``evidence.eventlog``, replays it, and verifies the replay with ``replay_eventlog`` against the
expected PCR values that ship with the corpus (``../shared/corpus/SOURCES.md``):

* go-tpm-tools logs: ``extracted/expected_pcrs.json``;
* tpm2-tools logs: the ``pcrs:`` block of the expected ``tpm2_eventlog`` YAML;
* go-attestation JSON dumps: the TPM's real PCR values (``Log.PCRs``) for the PCRs the log extends;
* go-attestation raw logs come without expected values: parsed and replayed only.

Exit status: 0 when every expected value matches, 1 when any mismatches or a log fails to parse.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CORPUS = REPO.parent / "shared" / "corpus"
sys.path.insert(0, str(REPO))

from evidence.errors import ParseError, ReplayError  # noqa: E402
from evidence.eventlog import RawEventLog, parse_tcg2_log, replay_eventlog, replay_pcrs  # noqa: E402

Banks = dict[str, dict[int, bytes]]

GO_TPM_TOOLS = CORPUS / "go-tpm-tools"
TPM2_TOOLS = CORPUS / "tpm2-tools" / "test" / "integration" / "fixtures"
GO_ATTESTATION = CORPUS / "go-attestation" / "attest" / "testdata"


@dataclass
class Row:
    log: str
    format: str = "-"
    events: int = 0
    banks: list[str] = field(default_factory=list)
    has_expected: bool = False
    checked: int = 0
    result: str = ""
    invalid_pcrs: list[int] = field(default_factory=list)
    ok: bool = True


# --- where the logs and their expected values are ----------------------------------------------


def _go_tpm_tools() -> Iterator[tuple[str, bytes, Banks | None]]:
    table = json.loads((GO_TPM_TOOLS / "extracted" / "expected_pcrs.json").read_text())["logs"]
    by_file = {entry["file"]: entry["pcrs"] for entry in table.values()}
    for path in sorted((GO_TPM_TOOLS / "internal" / "test" / "eventlogs").glob("*.bin")):
        pcrs = by_file.get(str(path.relative_to(GO_TPM_TOOLS)))
        expected = (
            {b.lower(): {int(i): bytes.fromhex(v) for i, v in p.items()} for b, p in pcrs.items()}
            if pcrs
            else None
        )
        yield f"go-tpm-tools/{path.name}", path.read_bytes(), expected


def _tpm2_tools() -> Iterator[tuple[str, bytes, Banks | None]]:
    try:
        import yaml
    except ImportError:  # PyYAML comes with the dev extras that `make demo` installs
        yaml = None
    for path in sorted(TPM2_TOOLS.glob("*.bin")):
        data = path.read_bytes()
        candidates = [
            TPM2_TOOLS / "event-raw" / f"{path.name}.yaml",
            TPM2_TOOLS / f"{path.name}.yaml",
        ]
        source = next((c for c in candidates if c.is_file()), None)
        expected = None
        if source is not None and yaml is not None:
            pcrs = yaml.safe_load(source.read_text()).get("pcrs") or {}
            sizes = {"sha1": 20, "sha256": 32, "sha384": 48, "sha512": 64, "sm3_256": 32}
            expected = {
                bank: {int(i): int(v).to_bytes(sizes[bank], "big") for i, v in values.items()}
                for bank, values in pcrs.items()
            }
        yield f"tpm2-tools/{path.name}", data, expected


def _go_attestation() -> Iterator[tuple[str, bytes, Banks | None]]:
    for path in sorted(GO_ATTESTATION.glob("*_eventlog")):
        yield f"go-attestation/{path.name}", path.read_bytes(), None
    for path in sorted(GO_ATTESTATION.glob("*.json")):
        doc = json.loads(path.read_text())
        data = base64.b64decode(doc["Log"]["Raw"])
        pcrs = {p["Index"]: base64.b64decode(p["Digest"]) for p in doc["Log"]["PCRs"]}
        # The real PCR values of the machine; the firmware log explains those it extends.
        extended = set(replay_pcrs(parse_tcg2_log(data)).get("sha1", {}))
        yield f"go-attestation/{path.name}", data, {"sha1": {i: pcrs[i] for i in sorted(extended)}}


# --- checking -----------------------------------------------------------------------------------


def check(name: str, data: bytes, expected: Banks | None) -> Row:
    row = Row(name)
    try:
        log: RawEventLog = parse_tcg2_log(data)
    except ParseError as err:
        row.result, row.ok = f"ERROR {err}", False
        return row
    row.format, row.events = log.format, len(log.events)
    row.banks = [bank for bank, values in replay_pcrs(log).items() if values]
    if log.quirks:
        row.result = f"quirk {', '.join(log.quirks)}; "
    if expected is None:
        row.result += "parsed (no expected values shipped)"
        return row
    row.has_expected = True
    row.checked = sum(len(values) for values in expected.values())
    if row.checked == 0:
        row.result += "match (expected: no PCR extended)"
        if any(replay_pcrs(log).values()):
            row.result, row.ok = "MISMATCH (log extends PCRs the expected output lacks)", False
        return row
    try:
        replay_eventlog(log, expected)
    except ReplayError as err:
        row.invalid_pcrs = list(err.invalid_pcrs)
        row.result += f"MISMATCH on PCR {', '.join(map(str, err.invalid_pcrs))}"
        row.ok = False
        return row
    row.result += "match"
    return row


def run_all() -> list[Row]:
    """Check every log of the corpus (which must exist: see :data:`CORPUS`)."""
    return [
        check(*case)
        for source in (_go_tpm_tools, _tpm2_tools, _go_attestation)
        for case in source()
    ]


def summary() -> tuple[bool, str]:
    """One line for the demo's act 0: (every expected value reproduced, what happened)."""
    if not (CORPUS / "SOURCES.md").is_file():
        return False, f"shared corpus not found at {CORPUS}"
    rows = run_all()
    failed = [r for r in rows if not r.ok]
    checked = sum(r.checked for r in rows if r.ok)
    if failed:
        names = ", ".join(r.log for r in failed[:3])
        return False, f"{len(failed)} of {len(rows)} logs did not reproduce their values ({names})"
    return True, (
        f"{len(rows)} real firmware event logs parsed and replayed; {checked} expected PCR "
        "values reproduced exactly, 0 mismatches"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--json", action="store_true", help="print one JSON document instead of a table"
    )
    args = parser.parse_args(argv)
    if not (CORPUS / "SOURCES.md").is_file():
        print(f"demo: shared corpus not found at {CORPUS}", file=sys.stderr)
        return 2

    rows = run_all()
    checked = sum(r.checked for r in rows if r.ok)
    failed = [r for r in rows if not r.ok]
    with_expected = sum(1 for r in rows if r.has_expected)

    if args.json:
        doc = {
            "logs": [asdict(r) for r in rows],
            "values_matched": checked,
            "failures": len(failed),
            "ok": not failed,
        }
        print(json.dumps(doc, indent=2))
        return 1 if failed else 0

    width = max(len(r.log) for r in rows)
    bwidth = max(len(",".join(r.banks)) for r in rows)
    print(f"Firmware event logs in {CORPUS}\n")
    print(
        f"{'log':<{width}}  {'format':<12} {'events':>6}  {'banks':<{bwidth}}  {'PCRs':>4}  result"
    )
    for r in rows:
        banks = ",".join(r.banks) or "-"
        head = f"{r.log:<{width}}  {r.format:<12} {r.events:>6}  {banks:<{bwidth}}  {r.checked:>4}"
        print(f"{head}  {r.result}")
    print()
    if failed:
        print(f"FAIL: {len(failed)} of {len(rows)} logs did not reproduce their expected values.")
        return 1
    print(
        f"OK: {len(rows)} logs parsed and replayed; {checked} expected PCR values in "
        f"{with_expected} logs reproduced exactly, 0 mismatches."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
