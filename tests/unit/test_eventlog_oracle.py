"""An independent oracle: Debian's ``tpm2_eventlog`` (tpm2-tools 5.4) replays the corpus logs too.

The product never shells out to parse (STYLE.md §3 Codecs); a test may, to compare with an
independent implementation. Known 5.4 deviations (``../shared/docs/protocols.md`` §6.1, fixed in
tpm2-tools 5.6): it extends ``EV_NO_ACTION`` digests and ignores StartupLocality and H-CRTM, so
PCR 0 of a log with an ``EV_NO_ACTION`` or ``EV_EFI_HCRTM_EVENT`` on PCR 0 is not compared.
"""

from __future__ import annotations

import functools
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from evidence.eventlog import EventType, RawEventLog, parse_tcg2_log, replay_pcrs
from tests.conftest import CORPUS

# Logs 5.4 cannot read at all; our own tests cover them (test_eventlog_corpus.py).
ORACLE_FAILS = {
    "option_rom_eventlog": "tpm2_eventlog 5.4 crashes (SIGSEGV) on its PCR 0xFFFFFFFF records",
    "short_no_action_eventlog": "tpm2_eventlog 5.4 takes any first EV_NO_ACTION for a SpecID",
}

LOGS = sorted(
    [
        *(CORPUS / "go-tpm-tools/internal/test/eventlogs").glob("*.bin"),
        *(CORPUS / "tpm2-tools/test/integration/fixtures").glob("*.bin"),
        *(CORPUS / "go-attestation/attest/testdata").glob("*_eventlog"),
    ]
)
CHECKED = [p for p in LOGS if p.name not in ORACLE_FAILS]


@functools.cache
def _oracle(path: Path) -> dict[str, dict[int, int]]:
    tool = shutil.which("tpm2_eventlog")
    if tool is None:
        pytest.fail("tpm2_eventlog not found: tpm2-tools is in deps/debian-packages.txt")
    run = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=60, check=False)
    assert run.returncode == 0, run.stderr
    pcrs = (yaml.safe_load(run.stdout) or {}).get("pcrs") or {}
    return {bank: {int(i): int(v) for i, v in values.items()} for bank, values in pcrs.items()}


def _pcr0_differs_in_5_4(log: RawEventLog) -> bool:
    later = log.events[1:] if log.format == "crypto-agile" else log.events
    return any(
        e.pcr == 0 and e.event_type in (EventType.EV_NO_ACTION, EventType.EV_EFI_HCRTM_EVENT)
        for e in later
    )


def _compare(path: Path) -> int:
    log = parse_tcg2_log(path.read_bytes())
    ours = {bank: values for bank, values in replay_pcrs(log).items() if values}
    theirs = _oracle(path)
    assert set(ours) == set(theirs)
    skip_pcr0 = _pcr0_differs_in_5_4(log)
    compared = 0
    for bank, values in theirs.items():
        assert set(values) == set(ours[bank])
        for pcr, value in values.items():
            if pcr == 0 and skip_pcr0:
                continue
            assert ours[bank][pcr] == value.to_bytes(len(ours[bank][pcr]), "big"), (bank, pcr)
            compared += 1
    return compared


@pytest.mark.parametrize("path", CHECKED, ids=lambda p: p.name)
def test_replay_matches_tpm2_eventlog(corpus: Path, path: Path) -> None:
    assert _compare(path) > 0 or path.name == "specid-vendordata.bin"


def test_oracle_coverage(corpus: Path) -> None:
    """Pin what the oracle covers, so a shrinking corpus or a new exclusion is noticed."""
    assert len(CHECKED) == 31
    assert sum(_compare(p) for p in CHECKED) == 589
