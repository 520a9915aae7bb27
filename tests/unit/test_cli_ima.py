"""``vtpm-verify ima replay|show``: the JSON shape scripts rely on, readable output, exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from evidence.ima import ImaEntry, encode_ascii, encode_binary
from tests.unit.test_ima import ALL, NG, VIOLATION
from verifier.cli import main

VECTORS = Path(__file__).resolve().parents[1] / "vectors" / "ima"
STEM = "linux-6.1-ima-ng-sha256"


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize("ext", ["ascii", "bin"])
def test_replay_json_shape_matches_the_kernels_tpm(
    ext: str, capsys: pytest.CaptureFixture[str]
) -> None:
    rc, out, err = _run(["ima", "replay", str(VECTORS / f"{STEM}.{ext}"), "--json"], capsys)
    assert rc == 0 and err == ""
    doc = json.loads(out)
    tpm = json.loads((VECTORS / f"{STEM}.json").read_text())["pcr10"]
    assert doc == {
        "entries": 10,
        "violations": 2,
        "template_hash_mismatches": 0,
        "truncated_tail": False,
        "pcr10": {"sha1": tpm["sha1"], "sha256": tpm["sha256"]},
    }


def test_replay_options(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "list"
    path.write_bytes(encode_binary(ALL))
    base = ["ima", "replay", str(path), "--json"]
    new = json.loads(_run(base, capsys)[1])
    explicit = json.loads(_run([*base, "--format", "binary", "--kernel-rule", "5.8"], capsys)[1])
    old = json.loads(_run([*base, "--kernel-rule", "pre-5.8"], capsys)[1])
    assert new == explicit
    assert old["pcr10"]["sha1"] == new["pcr10"]["sha1"]
    assert old["pcr10"]["sha256"] != new["pcr10"]["sha256"]
    rc, _, err = _run([*base, "--format", "ascii"], capsys)
    assert rc == 2 and err.count("\n") == 1 and "line 1" in err


def test_replay_readable_output(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = _run(["ima", "replay", str(VECTORS / f"{STEM}.bin")], capsys)
    assert rc == 0
    assert "violations:               2" in out
    assert "truncated tail:           no" in out
    assert "PCR 10 sha256:" in out and "f6baf848b100ee52628ccec9526bc308d90e8d1f" in out


def test_replay_truncated_tail(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "cut"
    path.write_bytes(encode_ascii([NG, VIOLATION])[:-3])
    doc = json.loads(_run(["ima", "replay", str(path), "--json"], capsys)[1])
    assert doc["truncated_tail"] is True and doc["entries"] == 1 and doc["violations"] == 0
    rc, out, _ = _run(["ima", "replay", str(path)], capsys)
    assert rc == 0 and "yes, line 2 left out" in out


def test_template_hash_mismatch_is_counted(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    forged = ImaEntry(10, b"\x01" * 20, "ima-ng", NG.fields)
    path = tmp_path / "forged"
    path.write_bytes(encode_binary([NG, forged]))
    doc = json.loads(_run(["ima", "replay", str(path), "--json"], capsys)[1])
    assert doc["template_hash_mismatches"] == 1
    out = _run(["ima", "show", str(path)], capsys)[1]
    assert "BAD-HASH" in out


@pytest.mark.parametrize(
    ("data", "where"),
    [
        (b"10 zz ima-ng sha256:00 /x\n", "line 1"),
        (encode_binary([NG]) + b"\x0a\x00\x00\x00" + bytes(20) + b"\x00\x00\x00\xc0", "offset"),
        (encode_ascii([NG]) + b"10 " + b"ab" * 20 + b" ima-sig sha256:00 /x zz\n", "line 2"),
    ],
)
def test_malformed_input_exits_2_with_one_line(
    data: bytes, where: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "bad"
    path.write_bytes(data)
    for cmd in (["ima", "replay", str(path), "--json"], ["ima", "show", str(path)]):
        rc, out, err = _run(cmd, capsys)
        assert rc == 2 and out == ""
        assert err.count("\n") == 1 and where in err and err.startswith("vtpm-verify: error")


def test_unsupported_template_exits_2_on_replay_but_shows(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "ngv2"
    path.write_bytes(encode_ascii([NG]) + b"10 " + b"ab" * 20 + b" ima-ngv2 ima:sha256:00 /x\n")
    rc, _, err = _run(["ima", "replay", str(path), "--json"], capsys)
    assert rc == 2 and "ima-ngv2" in err and "line 2" in err and "parse.unsupported" in err
    rc, out, _ = _run(["ima", "show", str(path)], capsys)
    assert rc == 0 and "unsupported" in out


def test_show_json(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = _run(
        ["ima", "show", str(VECTORS / "linux-6.1-ima-sig-sha256.bin"), "--json"], capsys
    )
    doc = json.loads(out)
    assert rc == 0 and doc["format"] == "binary" and doc["truncated_tail"] is False
    first, buf = doc["entries"][0], doc["entries"][1]
    assert first["name"] == "boot_aggregate" and first["sig"] == "" and first["template_hash_ok"]
    assert buf["template"] == "ima-buf" and bytes.fromhex(buf["buf"]) == b"6.1.0-56-amd64"
    assert [e["violation"] for e in doc["entries"]].count(True) == 2


def test_show_table(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = _run(["ima", "show", str(VECTORS / f"{STEM}.ascii")], capsys)
    assert rc == 0
    assert out.splitlines()[0].split()[:4] == ["#", "line", "pcr", "template"]
    assert "/work/with_space" in out and out.count("violation") == 2
    assert out.rstrip().endswith("10 entries (ascii)")


def test_reads_standard_input(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import io
    import sys

    data = (VECTORS / f"{STEM}.bin").read_bytes()
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data)))
    rc, out, _ = _run(["ima", "replay", "-", "--json"], capsys)
    assert rc == 0 and json.loads(out)["entries"] == 10
