"""A reader that closes the pipe early (`| head`) is not an error of ours."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import CORPUS

LOG = CORPUS / "go-attestation/attest/testdata/option_rom_eventlog"


def test_closed_pipe_exits_quietly() -> None:
    cmd = [sys.executable, "-m", "verifier.cli", "eventlog", "show", str(LOG)]
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        proc.stdout.readline()
        proc.stdout.close()
        err = proc.stderr.read().decode()
        rc = proc.wait(30)
    assert rc == 0, err
    assert "Broken pipe" not in err and "Traceback" not in err
