"""``vtpm-verify eventlog replay|show``: output shapes scripts rely on, and errors as one line."""

from __future__ import annotations

import hashlib
import io
import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from verifier.cli import main

FIXTURES = "tpm2-tools/test/integration/fixtures"
ARCH = f"{FIXTURES}/event-arch-linux.bin"


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _tiny_log(action: bytes) -> bytes:
    """A crypto-agile log with one SHA-256 bank and one EV_EFI_ACTION event."""
    spec = (
        b"Spec ID Event03\x00"
        + struct.pack("<IBBBBI", 0, 0, 2, 0, 2, 1)
        + struct.pack("<HH", 0x0B, 32)
        + b"\x00"
    )
    record = struct.pack("<II", 0, 3) + bytes(20) + struct.pack("<I", len(spec)) + spec
    event = struct.pack("<IIIH", 5, 0x80000007, 1, 0x0B) + hashlib.sha256(action).digest()
    return record + event + struct.pack("<I", len(action)) + action


def test_replay_json_shape_and_values(corpus: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _run(capsys, "eventlog", "replay", str(corpus / ARCH), "--json")
    assert (code, err) == (0, "")
    doc = json.loads(out)
    assert set(doc) == {"format", "events", "banks"}
    assert doc["format"] == "crypto-agile" and doc["events"] == 25
    expected = yaml.safe_load(
        (corpus / FIXTURES / "event-raw/event-arch-linux.bin.yaml").read_text()
    )["pcrs"]
    sizes = {"sha1": 20, "sha256": 32}
    assert doc["banks"] == {
        bank: {str(pcr): int(v).to_bytes(sizes[bank], "big").hex() for pcr, v in values.items()}
        for bank, values in expected.items()
    }


def test_replay_json_sha1_log(corpus: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = corpus / "go-tpm-tools/internal/test/eventlogs/debian-10.bin"
    code, out, _ = _run(capsys, "eventlog", "replay", str(path), "--json")
    doc = json.loads(out)
    assert code == 0 and doc["format"] == "sha1" and list(doc["banks"]) == ["sha1"]
    expected = json.loads((corpus / "go-tpm-tools/extracted/expected_pcrs.json").read_text())
    assert doc["banks"]["sha1"] == expected["logs"]["Debian10GCE"]["pcrs"]["SHA1"]


def test_replay_table(corpus: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(capsys, "eventlog", "replay", str(corpus / ARCH))
    lines = out.splitlines()
    assert code == 0
    assert lines[0] == "format: crypto-agile  events: 25  banks: sha1, sha256"
    assert "sha256     7  3b4a4db44b7a872524055364e62e897ae678e0d47ab0809f65c3a4ed77f66ab9" in lines
    assert len(lines) == 2 + 18


def test_show_table(corpus: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(capsys, "eventlog", "show", str(corpus / ARCH))
    lines = out.splitlines()
    assert code == 0 and len(lines) == 2 + 25
    row = next(line for line in lines if line.lstrip().startswith("22 "))
    assert "EV_EFI_BOOT_SERVICES_APPLICATION" in row and "sha256:d51e9d20" in row
    assert row.endswith("\\EFI\\SYSTEMD\\SYSTEMD-BOOTX64.EFI (96725 bytes)")


def test_show_json(corpus: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(capsys, "eventlog", "show", "--json", str(corpus / ARCH))
    doc = json.loads(out)
    assert code == 0 and doc["format"] == "crypto-agile" and doc["quirks"] == []
    assert doc["spec_id"]["kind"] == "SpecIdEvent"
    assert len(doc["events"]) == 25
    sb = doc["events"][3]
    assert sb["type"] == "EV_EFI_VARIABLE_DRIVER_CONFIG" and sb["type_value"] == 0x80000001
    assert sb["payload"]["kind"] == "EfiVariable" and sb["payload"]["name"] == "SecureBoot"
    assert sb["payload"]["guid"] == "8be4df61-93ca-11d2-aa0d-00e098032b8c"
    assert set(sb["digests"]) == {"sha1", "sha256"} and sb["decode_problem"] is None


def test_show_names_the_quirk(corpus: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(
        capsys, "eventlog", "show", str(corpus / FIXTURES / "specid-vendordata.bin")
    )
    assert code == 0 and "quirks: specid.event_size_excludes_vendor_info" in out.splitlines()[0]


def test_show_escapes_terminal_sequences(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "log.bin"
    path.write_bytes(_tiny_log(b"\x1b]0;owned\x07\x1b[2J"))
    code, out, _ = _run(capsys, "eventlog", "show", str(path))
    assert code == 0 and "\x1b" not in out and "\x07" not in out
    assert "'\\x1b]0;owned\\x07\\x1b[2J'" in out


def test_standard_input(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(_tiny_log(b"hello"))))
    code, out, _ = _run(capsys, "eventlog", "replay", "-", "--json")
    want = hashlib.sha256(bytes(32) + hashlib.sha256(b"hello").digest()).hexdigest()
    assert code == 0 and json.loads(out)["banks"] == {"sha256": {"5": want}}


@pytest.mark.parametrize("command", ["replay", "show"])
def test_malformed_input_is_one_line_naming_the_offset(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    path = tmp_path / "truncated.bin"
    path.write_bytes(_tiny_log(b"hello")[:-3])
    code, out, err = _run(capsys, "eventlog", command, str(path), "--json")
    assert (code, out) == (2, "")
    assert err.count("\n") == 1
    assert "[parse.truncated]" in err and "TCG_PCR_EVENT2.Event at offset" in err


def test_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _run(capsys, "eventlog", "replay", str(tmp_path / "absent"))
    assert code == 2 and err.count("\n") == 1 and "absent" in err


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["eventlog", "--help"], ["binary_bios_measurements", "crypto-agile", "replay", "show"]),
        (
            ["eventlog", "replay", "--help"],
            ["StartupLocality", "EV_NO_ACTION", "JSON shape", "--json"],
        ),
        (["eventlog", "show", "--help"], ["payload", "--json"]),
    ],
)
def test_help(capsys: pytest.CaptureFixture[str], argv: list[str], words: list[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    out = capsys.readouterr().out
    assert info.value.code == 0
    for word in words:
        assert word in out


def test_installed_entry_point_exit_code_and_one_stderr_line(tmp_path: Path) -> None:
    """Once through the real console script, as scripts call it."""
    script = Path(sys.executable).parent / "vtpm-verify"
    assert script.is_file(), "install the project into the virtualenv (make venv)"
    path = tmp_path / "bad.bin"
    path.write_bytes(_tiny_log(b"hello")[:60])
    run = subprocess.run(
        [str(script), "eventlog", "replay", str(path), "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert run.returncode == 2
    assert run.stdout == ""
    assert len(run.stderr.splitlines()) == 1
    assert "offset" in run.stderr and run.stderr.startswith("vtpm-verify: error [parse.")
