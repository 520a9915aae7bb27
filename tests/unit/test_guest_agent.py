"""vtpm-guest: port lookup, the quote exchange over a real tty pair, and the bundle it prints.

The bundle the guest agent prints must parse with ``evidence.bundle`` and validate against
``docs/evidence-bundle.schema.json``, and verify when the host's part is genuine (here the
evidence factory's software-signed world plays the host). The exchange runs over a pty set to raw
mode: one fd, read and written, polled like the virtio-serial port.
"""

from __future__ import annotations

import base64
import json
import os
import pty
import secrets
import threading
import tty
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from evidence.bundle import encode_bundle, parse_bundle
from evidence.verify import verify_bundle
from guest_agent import channel, cli
from guest_agent.quote import EVIDENCE_FIELDS, build_bundle, parse_nonce
from tests.helpers.evidence_factory import default_world

REPO = Path(__file__).resolve().parents[2]
SCHEMA = json.loads((REPO / "docs" / "evidence-bundle.schema.json").read_text())


def host_evidence(nonce: bytes) -> tuple[dict[str, Any], dict[str, Any]]:
    """What a genuine host answers (the evidence fields), and the whole factory bundle."""
    world = default_world()
    full = json.loads(encode_bundle(world.bundle(nonce)))
    return {k: full[k] for k in EVIDENCE_FIELDS}, full


def test_find_port_by_name_in_sysfs(tmp_path: Path) -> None:
    sys_class = tmp_path / "sys"
    for port, name in (
        ("vport0p1", "org.qemu.guest_agent.0"),
        ("vport0p2", "org.vtpm-trust.attest.0"),
    ):
        (sys_class / port).mkdir(parents=True)
        (sys_class / port / "name").write_text(name + "\n")
    dev = tmp_path / "dev"
    dev.mkdir()
    found = channel.find_port("org.vtpm-trust.attest.0", str(dev), str(sys_class))
    assert found == str(dev / "vport0p2")
    (dev / "vport0p2").touch()
    (dev / "virtio-ports").mkdir()
    (dev / "virtio-ports" / "org.vtpm-trust.attest.0").symlink_to(dev / "vport0p2")
    assert channel.find_port("org.vtpm-trust.attest.0", str(dev), str(sys_class)).endswith(
        "virtio-ports/org.vtpm-trust.attest.0"
    )


def test_no_port_is_exit_code_3(tmp_path: Path) -> None:
    with pytest.raises(channel.GuestAgentError) as info:
        channel.find_port("org.vtpm-trust.attest.0", str(tmp_path), str(tmp_path / "none"))
    assert info.value.exit_code == 3


@pytest.mark.parametrize("text", ["zz", "00" * 15, "00" * 65, ""])
def test_bad_nonces_are_usage_errors(text: str) -> None:
    with pytest.raises(channel.GuestAgentError) as info:
        parse_nonce(text)
    assert info.value.exit_code == 2


def test_bundle_parses_validates_and_verifies() -> None:
    nonce = secrets.token_bytes(32)
    evidence, full = host_evidence(nonce)
    event_log = base64.b64decode(full["event_log"])
    ima = base64.b64decode(full["ima_list"]["data"])
    text = build_bundle(evidence, nonce, event_log, ima)
    jsonschema.validate(json.loads(text), SCHEMA)
    raw = parse_bundle(text)
    assert encode_bundle(raw) == text  # the guest writes the canonical form
    verify_bundle(raw, default_world().options(nonce))


def test_bundle_without_lists_validates_with_nulls() -> None:
    nonce = secrets.token_bytes(16)
    evidence, _ = host_evidence(nonce)
    obj = json.loads(build_bundle(evidence, nonce, None, None))
    jsonschema.validate(obj, SCHEMA)
    assert obj["event_log"] is None and obj["ima_list"] is None
    parse_bundle(json.dumps(obj))


class FakeHost:
    """The host end of a raw pty: answers each quote request (or refuses, or stays silent)."""

    def __init__(self, master: int, answer: str = "ok", stale_first: bool = False) -> None:
        self.master = master
        self.answer = answer
        self.stale_first = stale_first
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        dec = channel.FrameDecoder()
        while (req := dec.next_frame()) is None:
            dec.feed(os.read(self.master, 4096))
        nonce = base64.b64decode(req["nonce"])
        if self.answer == "silent":
            return
        if self.stale_first:
            late = {
                "type": "quote",
                "version": 1,
                "id": "old",
                "ok": False,
                "error": {"id": "attest.not_enrolled", "message": "stale"},
            }
            os.write(self.master, channel.encode_frame(late))
        if self.answer == "ok":
            body: dict[str, Any] = {"ok": True, "evidence": host_evidence(nonce)[0]}
        else:
            body = {"ok": False, "error": {"id": "attest.reauth_required", "message": "rebooted"}}
        frame = channel.encode_frame({"type": "quote", "version": 1, "id": req["id"], **body})
        for i in range(0, len(frame), 1000):  # in pieces, as a port delivers them
            os.write(self.master, frame[i : i + 1000])


@pytest.fixture
def tty_port() -> Any:
    master, slave = pty.openpty()
    tty.setraw(master)
    tty.setraw(slave)
    path = os.ttyname(slave)
    yield master, path
    os.close(master)
    os.close(slave)


def run_cli(
    path: str, nonce: bytes, capsys: pytest.CaptureFixture[str], *extra: str
) -> tuple[int, str, str]:
    missing = "/nonexistent/vtpm"
    rc = cli.main(
        [
            "quote",
            "--nonce",
            nonce.hex(),
            "--device",
            path,
            "--event-log",
            missing,
            "--ima-list",
            missing,
            *extra,
        ]
    )
    out, err = capsys.readouterr()
    return rc, out, err


def test_quote_over_a_port_prints_a_bundle_that_parses(
    tty_port: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    master, path = tty_port
    host = FakeHost(master, stale_first=True)
    nonce = secrets.token_bytes(32)
    rc, out, err = run_cli(path, nonce, capsys)
    host.thread.join(5)
    assert rc == 0, err
    raw = parse_bundle(out.strip())
    assert raw.nonce == nonce and raw.event_log is None and raw.ima_list is None


def test_a_refusal_is_exit_code_1_with_its_id(
    tty_port: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    master, path = tty_port
    FakeHost(master, answer="refuse")
    rc, out, err = run_cli(path, secrets.token_bytes(32), capsys)
    assert rc == 1 and out == "" and "attest.reauth_required" in err


def test_no_answer_is_exit_code_3_after_the_timeout(
    tty_port: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    master, path = tty_port
    FakeHost(master, answer="silent")
    rc, _, err = run_cli(path, secrets.token_bytes(32), capsys, "--timeout", "0.5")
    assert rc == 3 and "did not answer" in err


def test_help_explains_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["quote", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "--nonce" in out and "exit status" in out


def test_bad_nonce_on_the_command_line_is_exit_code_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["quote", "--nonce", "abc", "--device", "/nonexistent"]) == 2
