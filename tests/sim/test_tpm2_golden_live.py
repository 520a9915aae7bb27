"""The TPM 2.0 codec against today's producer: the golden-vector checks on structures made live.

``tests/vectors/capture_tpm2.py`` (the script that made the committed vectors) runs against the
session swtpm into a temporary directory, and every check of ``tests/vectors/test_tpm2_vectors.py``
runs on its output: decode → the tools' fields, encode → the same bytes, Names, signatures, and
one-byte changes that must fail. PCR 16 (resettable) is extended and reset afterwards, so the
shared swtpm keeps its PCRs for other tests.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from evidence.errors import ParseError
from evidence.tpm2 import TpmsAttest, TpmtSignature, unmarshal_tpm2b_public
from tests.helpers.swtpm import Swtpm
from tests.vectors.capture_tpm2 import CERTIFIES, KEYS, QUOTES, SIGNS, capture
from tests.vectors.test_tpm2_vectors import check_certify, check_key, check_quote, check_sign

LIVE_PCR = 16
# Extends and resets PCR 16 and briefly makes an owner-hierarchy key persistent at 0x81000a01.
pytestmark = pytest.mark.destructive


def _tpm_state(tpm: Swtpm) -> tuple[str, ...]:
    """What other tests could notice: loaded and persistent objects, and the live PCR."""
    outputs = []
    for args in (
        ["tpm2_getcap", "handles-transient"],
        ["tpm2_getcap", "handles-persistent"],
        ["tpm2_pcrread", f"sha256:{LIVE_PCR}+sha1:{LIVE_PCR}"],
    ):
        proc = subprocess.run(args, env=tpm.tools_env(), capture_output=True, text=True, check=True)
        outputs.append(proc.stdout)
    return tuple(outputs)


@pytest.fixture(scope="module")
def live(
    swtpm: Swtpm, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Path, dict[str, Any]]]:
    out = tmp_path_factory.mktemp("tpm2-live")
    before = _tpm_state(swtpm)
    try:
        expected = capture(swtpm, out, pcr=LIVE_PCR)
    finally:
        subprocess.run(
            ["tpm2_pcrreset", str(LIVE_PCR)], env=swtpm.tools_env(), capture_output=True, check=True
        )
    expected["state_unchanged"] = _tpm_state(swtpm) == before
    yield out, expected


def test_live_capture_leaves_the_shared_swtpm_as_it_was(live: tuple[Path, dict[str, Any]]) -> None:
    _, expected = live
    assert expected["state_unchanged"]


@pytest.mark.parametrize("key", ["primary", *KEYS])
def test_live_key(live: tuple[Path, dict[str, Any]], key: str) -> None:
    out, expected = live
    check_key(out, expected["keys"][key])


@pytest.mark.parametrize("name", sorted(QUOTES))
def test_live_quote(live: tuple[Path, dict[str, Any]], name: str) -> None:
    out, expected = live
    check_quote(out, expected["quotes"][name], expected)


@pytest.mark.parametrize("name", [*sorted(CERTIFIES), "certify_qd_ecc"])
def test_live_certify(live: tuple[Path, dict[str, Any]], name: str) -> None:
    out, expected = live
    check_certify(out, expected["certifies"][name], expected)


@pytest.mark.parametrize("name", sorted(SIGNS))
def test_live_sign(live: tuple[Path, dict[str, Any]], name: str) -> None:
    out, expected = live
    check_sign(out, expected["signs"][name], expected)


def test_live_structures_reject_trailing_bytes(live: tuple[Path, dict[str, Any]]) -> None:
    out, _ = live
    for suffix, parse in (
        ("pub", unmarshal_tpm2b_public),
        ("attest", TpmsAttest.unmarshal),
        ("sig", TpmtSignature.unmarshal),
    ):
        for path in sorted(out.glob(f"*.{suffix}")):
            with pytest.raises(ParseError, match="trailing"):
                parse(path.read_bytes() + b"\x00")
