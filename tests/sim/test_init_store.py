"""`vtpm-host init` creates the trusted store on a fresh host, and a second init only verifies it.

Real software root, real embedded registrar child process, real SQLite store sealed to the TPM.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO

HOST = [sys.executable, "-m", "host_agent.cli"]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VTPM_")}
    env["VTPM_HOST_ID"] = "host-store.example"
    return subprocess.run(
        [*HOST, *args], env=env, capture_output=True, text=True, cwd=REPO, timeout=300
    )


def test_init_creates_the_store_and_a_second_init_only_verifies_it(tmp_path: Path) -> None:
    state = tmp_path / "state"
    first = _run("init", "--state-dir", str(state))
    assert first.returncode == 0, first.stderr
    check = _run("store", "check", "--json", "--state-dir", str(state))
    assert check.returncode == 0, check.stderr
    report = json.loads(check.stdout)
    db_files = sorted(p.name for p in state.rglob("*") if p.is_file() and "store" in p.name)
    assert db_files, f"no store file under {state}: {sorted(state.rglob('*'))}"

    second = _run("init", "--state-dir", str(state))
    assert second.returncode == 0, second.stderr
    again = json.loads(_run("store", "check", "--json", "--state-dir", str(state)).stdout)
    # The same store (same identity, same generation): init verified it and changed nothing.
    assert again == report
