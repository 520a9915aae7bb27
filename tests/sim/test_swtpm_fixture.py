"""The sim-tier fixture gives a working TPM 2.0, checked with tpm2-tools (not our code)."""

from __future__ import annotations

import subprocess

from tests.helpers.swtpm import Swtpm


def test_swtpm_answers_pcr_read(swtpm: Swtpm) -> None:
    out = subprocess.run(
        ["tpm2_pcrread", "sha256:0"], env=swtpm.tools_env(), capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert "0x0000000000000000000000000000000000000000000000000000000000000000" in out.stdout


def test_factory_provisions_ek_certificates(swtpm_factory) -> None:  # type: ignore[no-untyped-def]
    tpm = swtpm_factory("ek", provision_ek=True)
    out = subprocess.run(["tpm2_nvreadpublic"], env=tpm.tools_env(), capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "0x1c00002" in out.stdout  # RSA EK certificate index
