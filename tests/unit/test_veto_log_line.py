"""A veto leaves one line in the stderr of the QEMU it concerns (libvirt quotes that log's tail).

Real processes stand in for QEMU: what matters is where their fd 2 points."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

from host_agent.vtpm.daemon_link import HookEvent
from host_agent.vtpm.hooks_server import VETO_LINE_MAX, note_in_qemu_log, veto_log_line


def test_line_names_the_event_vm_and_reason_with_a_qemu_style_timestamp() -> None:
    line = veto_log_line(HookEvent.SET_STATEBLOB, "sr", "memory differs in 1 page(s): 12", 0.25)
    assert line == (
        "1970-01-01T00:00:00.250000Z vtpm-trust: restore of VM sr refused: "
        "memory differs in 1 page(s): 12\n"
    )
    assert "save of VM sr refused" in veto_log_line(HookEvent.GET_STATEBLOB, "sr", "x", 0.0)


def test_line_stays_one_short_line_whatever_the_reason() -> None:
    line = veto_log_line(HookEvent.SET_STATEBLOB, "sr", "a\nb\r\n" + "é" * 2000)
    assert line.endswith("...\n") and line.count("\n") == 1
    assert len(line.encode()) <= VETO_LINE_MAX
    assert "refused: a b " in line


def test_appends_to_a_log_file_behind_what_the_process_wrote(tmp_path: Path) -> None:
    log = tmp_path / "dom.log"
    log.write_text("started\n")
    with open(log, "ab") as err:
        proc = subprocess.Popen(
            ["sh", "-c", "echo before >&2; read x; echo after >&2"],
            stdin=subprocess.PIPE, stderr=err,
        )  # fmt: skip
    try:
        assert proc.stdin is not None
        for _ in range(200):
            if "before" in log.read_text():
                break
            subprocess.run(["sleep", "0.01"], check=True)
        assert note_in_qemu_log(proc.pid, "vtpm-trust: refused\n")
        proc.stdin.write(b"go\n")
        proc.stdin.close()
        assert proc.wait(10) == 0
    finally:
        proc.kill()
    assert log.read_text() == "started\nbefore\nvtpm-trust: refused\nafter\n"


def test_a_pipe_gets_the_line_too() -> None:
    proc = subprocess.Popen(["sh", "-c", "read x"], stdin=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert note_in_qemu_log(proc.pid, "vtpm-trust: refused\n")
        assert proc.stdin is not None and proc.stderr is not None
        proc.stdin.close()
        assert proc.stderr.read() == b"vtpm-trust: refused\n"
    finally:
        proc.kill()
        proc.wait(10)


def test_a_socket_or_a_missing_process_is_left_alone() -> None:
    a, b = socket.socketpair()
    with a, b:
        proc = subprocess.Popen(["sh", "-c", "read x"], stdin=subprocess.PIPE, stderr=a)
        try:
            assert note_in_qemu_log(proc.pid, "x\n") is False
        finally:
            proc.kill()
            proc.wait(10)
    assert note_in_qemu_log(proc.pid, "x\n") is False  # gone
