"""Golden IMA lists from a real Linux 6.1 kernel and its TPM (tests/vectors/README.md, "IMA").

The expected PCR 10 values are what the kernel's TPM reported after writing these lists, so the
replay is checked against the producer, not against our own encoder.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from evidence.ima import encode_ascii, encode_binary, parse_ima_list, replay_ima, replay_ima_pcr10

VECTORS = Path(__file__).resolve().parents[1] / "vectors" / "ima"
STEMS = sorted(p.stem for p in VECTORS.glob("*.json"))


def _meta(stem: str) -> dict[str, object]:
    return json.loads((VECTORS / f"{stem}.json").read_text())  # type: ignore[no-any-return]


def _pcr10(stem: str) -> dict[str, bytes]:
    values = _meta(stem)["pcr10"]
    assert isinstance(values, dict)
    return {bank: bytes.fromhex(v) for bank, v in values.items()}


def test_vectors_are_present() -> None:
    assert STEMS == [
        "linux-6.1-ima-ng-sha256",
        "linux-6.1-ima-sha1",
        "linux-6.1-ima-sig-sha256",
    ]


@pytest.mark.parametrize("ext", ["ascii", "bin"])
@pytest.mark.parametrize("stem", STEMS)
def test_replay_equals_the_pcr10_the_kernels_tpm_reported(stem: str, ext: str) -> None:
    raw = parse_ima_list((VECTORS / f"{stem}.{ext}").read_bytes())
    assert raw.format == ("ascii" if ext == "ascii" else "binary")
    assert not raw.truncated_tail
    tpm = _pcr10(stem)
    result = replay_ima_pcr10(raw, "5.8")
    assert result.pcr10["sha1"] == tpm["sha1"]
    assert result.pcr10["sha256"] == tpm["sha256"]
    assert result.entries == _meta(stem)["entries"] == 10
    assert result.violations == 2
    assert result.template_hash_mismatches == 0
    verified = replay_ima(raw, {"sha1": tpm["sha1"], "sha256": tpm["sha256"]}, "5.8")
    assert verified.entries[0].name == b"boot_aggregate"
    assert verified.entries[1].untrusted_template_name == "ima-buf"
    assert verified.entries[1].extra == b"6.1.0-56-amd64"


@pytest.mark.parametrize("stem", STEMS)
def test_sha384_sha512_banks_match_with_the_hashless_bank_quirk(stem: str) -> None:
    """Debian's 6.1 has CONFIG_CRYPTO_SHA512=m: no sha384/sha512 tfm when IMA started."""
    raw = parse_ima_list((VECTORS / f"{stem}.bin").read_bytes())
    tpm = _pcr10(stem)
    big = ("sha384", "sha512")
    quirk = replay_ima_pcr10(raw, "5.8", big, kernel_hashless_banks=big)
    assert dict(quirk.pcr10) == {b: tpm[b] for b in big}
    plain = replay_ima_pcr10(raw, "5.8", big)
    assert all(plain.pcr10[b] != tpm[b] for b in big)


@pytest.mark.parametrize("stem", STEMS)
def test_pre_5_8_rule_does_not_match_a_6_1_kernel_on_sha256(stem: str) -> None:
    raw = parse_ima_list((VECTORS / f"{stem}.bin").read_bytes())
    tpm = _pcr10(stem)
    old = replay_ima_pcr10(raw, "pre-5.8")
    assert old.pcr10["sha1"] == tpm["sha1"]  # the rules agree on the SHA-1 bank
    assert old.pcr10["sha256"] != tpm["sha256"]


@pytest.mark.parametrize("stem", STEMS)
def test_ascii_and_binary_lists_decode_to_the_same_entries(stem: str) -> None:
    a = parse_ima_list((VECTORS / f"{stem}.ascii").read_bytes())
    b = parse_ima_list((VECTORS / f"{stem}.bin").read_bytes())
    strip = [(e.pcr, e.template_hash, e.template_name, e.fields) for e in a.entries]
    assert strip == [(e.pcr, e.template_hash, e.template_name, e.fields) for e in b.entries]


@pytest.mark.parametrize("stem", STEMS)
def test_encoders_give_the_kernels_bytes_back(stem: str) -> None:
    ascii_bytes = (VECTORS / f"{stem}.ascii").read_bytes()
    binary_bytes = (VECTORS / f"{stem}.bin").read_bytes()
    entries = parse_ima_list(binary_bytes).entries
    assert encode_binary(entries) == binary_bytes
    assert encode_ascii(entries) == ascii_bytes


def test_kernel_replaced_the_space_in_a_file_name() -> None:
    raw = parse_ima_list((VECTORS / "linux-6.1-ima-ng-sha256.bin").read_bytes())
    assert b"/work/with_space" in [e.name for e in raw.entries]
