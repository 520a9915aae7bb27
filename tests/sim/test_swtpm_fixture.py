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


def test_a_port_taken_before_swtpm_binds_is_retried_on_a_new_pair(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """CI once lost a test to a port taken between choosing it and swtpm's bind: swtpm exited
    and the test met `connection refused`. The helper now retries on a fresh pair."""
    import socket

    from tests.helpers import swtpm as helper

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    busy = taken.getsockname()[1]
    real = helper.free_port_pair
    calls: list[int] = []

    def first_busy() -> int:
        calls.append(1)
        return busy if len(calls) == 1 else real()

    monkeypatch.setattr(helper, "free_port_pair", first_busy)
    try:
        tpm = helper.start_swtpm(tmp_path / "retry")
        try:
            assert len(calls) == 2
            assert tpm.port != busy
            out = subprocess.run(
                ["tpm2_pcrread", "sha256:0"], env=tpm.tools_env(), capture_output=True, text=True
            )
            assert out.returncode == 0, out.stderr
        finally:
            tpm.stop()
    finally:
        taken.close()


def test_free_port_pair_avoids_the_ephemeral_range() -> None:
    from tests.helpers.ports import _ephemeral_range, free_port_pair

    low, high = _ephemeral_range()
    port = free_port_pair()
    assert not (low <= port <= high) or low <= 10002
