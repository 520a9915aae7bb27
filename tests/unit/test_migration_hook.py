"""libvirt's qemu hook (plain ``virsh migrate``, host_agent/migration/hook.py) and the Pull message.

The hook's XML parsing: an adopted domain is protected, any other passes untouched, anything
that is not a readable domain is a typed error (exit 2, the reason on stderr, stdout empty, no
daemon asked). The shipped shell script runs the agent for ``migrate`` only. The Pull message
round-trips and its decoder is strict.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from host_agent.lifecycle.domain_xml import ADOPTION_NS
from host_agent.migration.codec import Frame, FrameDecoder, encode_frame
from host_agent.migration.errors import FrameError, MigrationError
from host_agent.migration.hook import (
    HookXmlError,
    hook_script,
    parse_hook_domain,
    run_qemu_hook,
)
from host_agent.migration.protocol import Pull, parse_message
from host_agent.migration.service import load_peers

REPO = Path(__file__).resolve().parents[2]
VM = uuid.UUID("6f1c3a52-8d0e-4b7a-9c11-2f4e5d6a7b80")
SOCK = "/var/lib/vtpm-trust/vms/6f1c3a52-8d0e-4b7a-9c11-2f4e5d6a7b80/tpm.sock"


def domain(*, adopted: bool = True, uuid_text: str = str(VM)) -> str:
    meta = (
        f"<metadata><vtpm:adopted xmlns:vtpm='{ADOPTION_NS}' bridge='{SOCK}' "
        "channel='/x/attest.sock'/></metadata>"
        if adopted
        else ""
    )
    tpm = (
        f"<tpm model='tpm-crb'><backend type='external'><source type='unix' mode='connect' "
        f"path='{SOCK}'/></backend></tpm>"
        if adopted
        else ""
    )
    return (
        f"<domain type='qemu'><name>mig</name><uuid>{uuid_text}</uuid>{meta}"
        f"<memory unit='MiB'>256</memory><devices>{tpm}</devices></domain>"
    )


class Listener:
    """A Unix socket where the migration service would be; counts connections."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(4)
        self.sock.settimeout(0.2)

    def accepted(self) -> int:
        n = 0
        while True:
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                return n
            conn.close()
            n += 1

    def close(self) -> None:
        self.sock.close()


# ------------------------------------------------------------------------------ XML


def test_an_adopted_domain_is_protected_with_its_tpm_socket() -> None:
    got = parse_hook_domain(domain())
    assert (got.name, got.uuid, got.protected, got.tpm_socket) == ("mig", VM, True, SOCK)


def test_a_domain_without_adoption_metadata_is_not_protected() -> None:
    got = parse_hook_domain(domain(adopted=False))
    assert got.protected is False and got.tpm_socket is None and got.uuid == VM


@pytest.mark.parametrize(
    ("xml", "expected"),
    [
        ("", "got nothing"),
        ("   \n", "got nothing"),
        ("<domain><name>x</name", "well-formed XML"),
        ("<network><name>x</name></network>", "domain"),
        ("<domain><name>x</name></domain>", "expected a <uuid>"),
        ("<domain><name>x</name><uuid>not-a-uuid</uuid></domain>", "'not-a-uuid'"),
    ],
)
def test_unreadable_xml_is_a_typed_error_naming_what_was_expected(xml: str, expected: str) -> None:
    with pytest.raises(HookXmlError) as info:
        parse_hook_domain(xml)
    assert info.value.id == "migration.hook.xml"
    assert expected in str(info.value)


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(
        st.text(max_size=300),
        st.builds(
            lambda cut, junk: domain()[:cut] + junk,
            st.integers(0, len(domain())),
            st.text(max_size=20),
        ),
    )
)
def test_any_input_gives_a_domain_or_a_hook_xml_error(xml: str) -> None:
    try:
        got = parse_hook_domain(xml)
    except HookXmlError:
        return
    assert isinstance(got.uuid, uuid.UUID) and got.name


# ------------------------------------------------------------------------------ the hook


def test_other_operations_are_ignored_without_reading_stdin(tmp_path: Path) -> None:
    class Unread:
        def read(self, *_: object) -> str:
            raise AssertionError("stdin read for an operation that is not a migration")

    for args in (["mig", "start", "begin", "-"], ["mig", "migrate", "end", "-"], []):
        got = run_qemu_hook(args, Unread(), tmp_path / "none.sock")  # type: ignore[arg-type]
        assert got["action"] == "ignored"


def test_an_unprotected_domain_passes_and_no_daemon_is_asked(tmp_path: Path) -> None:
    import io

    listener = Listener(tmp_path / "m.sock")
    try:
        got = run_qemu_hook(
            ["mig", "migrate", "begin", "-"], io.StringIO(domain(adopted=False)), listener.path
        )
        assert got == {"domain": "mig", "vm_uuid": str(VM), "action": "not-protected"}
        assert listener.accepted() == 0
    finally:
        listener.close()


def test_a_protected_domain_without_a_running_service_is_refused(tmp_path: Path) -> None:
    import io

    with pytest.raises(MigrationError) as info:
        run_qemu_hook(["mig", "migrate", "begin", "-"], io.StringIO(domain()), tmp_path / "x")
    assert "migration service does not answer" in str(info.value)
    assert str(VM) in str(info.value)


def _hook_cli(tmp_path: Path, stdin: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "host_agent.cli", "hook", "qemu", "--state-dir", str(tmp_path),
         *extra, "--", "mig", "migrate", "begin", "-"],
        input=stdin, capture_output=True, text=True, cwd=REPO, timeout=60,
        env={k: v for k, v in os.environ.items() if not k.startswith("VTPM_")},
    )  # fmt: skip


def test_cli_malformed_xml_exits_2_with_the_reason_and_asks_nobody(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    listener = Listener(tmp_path / "run" / "migration.sock")
    try:
        done = _hook_cli(tmp_path, "<domain><name>mig</name")
        assert done.returncode == 2
        assert done.stdout == "", "libvirt would take stdout as the new domain XML"
        assert done.stderr.startswith("vtpm-trust: [migration.hook.xml] ")
        assert "well-formed XML" in done.stderr
        as_json = _hook_cli(tmp_path, "", "--json")
        assert as_json.returncode == 2 and as_json.stdout == ""
        doc = json.loads(as_json.stderr)
        assert doc["ok"] is False and doc["error_id"] == "migration.hook.xml"
        assert listener.accepted() == 0
    finally:
        listener.close()
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["migration.sock", "run"]


def test_cli_a_service_that_refuses_fails_the_hook_with_its_reason(tmp_path: Path) -> None:
    """A stand-in service on the control socket answers the ``expect`` with a refusal."""
    (tmp_path / "run").mkdir()
    path = tmp_path / "run" / "migration.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)
    seen: list[dict[str, object]] = []

    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            buf = b""
            while b"\n" not in buf:
                buf += conn.recv(65536)
            seen.append(json.loads(buf))
            reply = {"ok": False, "error_id": "migration.pull.not_here", "message": "nobody"}
            conn.sendall(json.dumps(reply).encode() + b"\n")

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        done = _hook_cli(tmp_path, domain())
    finally:
        t.join(10)
        server.close()
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip() == "vtpm-trust: [migration.pull.not_here] nobody"
    assert seen == [{"op": "expect", "vm_uuid": str(VM), "tpm_socket": SOCK}]


def test_the_script_runs_the_agent_for_migrate_only(tmp_path: Path) -> None:
    out = tmp_path / "called"
    script = tmp_path / "qemu"
    script.write_text(hook_script(["sh", "-c", f'echo "$@" > {out}', "agent"]))
    script.chmod(0o755)
    for op in ("prepare", "start", "started", "stopped", "release", "restore", "reconnect"):
        done = subprocess.run([str(script), "mig", op, "begin", "-"], timeout=10)
        assert done.returncode == 0 and not out.exists(), op
    done = subprocess.run([str(script), "mig", "migrate", "begin", "-"], timeout=10)
    assert done.returncode == 0 and out.read_text() == "mig migrate begin -\n"


def test_hook_script_command_prints_the_script(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "host_agent.cli", "hook", "script", "--state-dir", str(tmp_path),
         "--json"], capture_output=True, text=True, cwd=REPO, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    script = json.loads(done.stdout)["script"]
    assert script.startswith("#!/bin/sh\n") and '[ "$2" = migrate ] || exit 0' in script
    assert f'hook qemu --state-dir {tmp_path} -- "$@"' in script


# ------------------------------------------------------------------------------ peers


def test_peers_setting(tmp_path: Path) -> None:
    path = tmp_path / "settings.json"
    assert load_peers(path) == {}
    path.write_text(json.dumps({"listen": "0.0.0.0:7787"}))
    assert load_peers(path) == {}
    path.write_text(json.dumps({"peers": {"hv2": "10.0.0.2:7787", "hv3": "[fd00::3]:7787"}}))
    assert load_peers(path) == {"hv2": "10.0.0.2:7787", "hv3": "[fd00::3]:7787"}
    for bad, expected in (
        ({"peers": ["hv2=10.0.0.2:7787"]}, "must be an object"),
        ({"peers": {"hv2": 7787}}, "must be an object"),
        ({"peers": {"": "10.0.0.2"}}, "must be an object"),
        ({"peers": {"hv2": "10.0.0.2:port"}}, "'10.0.0.2:port'"),
    ):
        path.write_text(json.dumps(bad))
        with pytest.raises(MigrationError) as info:
            load_peers(path)
        assert expected in str(info.value), bad
    path.write_text("{not json")
    with pytest.raises(MigrationError):
        load_peers(path)


# ------------------------------------------------------------------------------ Pull


def _decode(data: bytes) -> Frame:
    decoder = FrameDecoder()
    decoder.feed(data)
    frame = decoder.next_frame()
    assert frame is not None
    return frame


@given(st.uuids(), st.text(min_size=1, max_size=256))
def test_pull_round_trips(vm: uuid.UUID, address: str) -> None:
    message = Pull(vm, address)
    assert parse_message(_decode(encode_frame(message.to_frame()))) == message


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"version": 1, "vm_uuid": str(VM)}, "pull.fields"),
        ({"version": 2, "vm_uuid": str(VM), "target_address": "a:1"}, "pull.version"),
        ({"version": 1, "vm_uuid": str(VM).upper(), "target_address": "a:1"}, "canonical"),
        ({"version": 1, "vm_uuid": "x", "target_address": "a:1"}, "pull.vm_uuid"),
        ({"version": 1, "vm_uuid": str(VM), "target_address": ""}, "pull.target_address"),
        ({"version": 1, "vm_uuid": str(VM), "target_address": 7}, "pull.target_address"),
        ({"version": 1, "vm_uuid": str(VM), "target_address": "a", "x": 1}, "pull.fields"),
    ],
)
def test_malformed_pulls_are_frame_errors(fields: dict[str, object], expected: str) -> None:
    with pytest.raises(FrameError) as info:
        parse_message(Frame("pull", fields))
    assert expected in str(info.value)


def test_a_pull_with_blobs_is_refused() -> None:
    frame = Frame(
        "pull", {"version": 1, "vm_uuid": str(VM), "target_address": "a:1"}, {"nonce": b"x"}
    )
    with pytest.raises(FrameError):
        parse_message(frame)
