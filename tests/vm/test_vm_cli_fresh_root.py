"""The vm CLI works on a state directory it has never seen (a fresh embedded libvirt root).

Regression: libvirt opened <root>/log/libvirt.log as its module loaded, before anything created
<root>/log, so `import libvirt` failed on every fresh host (the Ansible role hit it first).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.conftest import REPO


def test_vm_list_on_a_fresh_state_dir() -> None:
    # Short path: the embedded root holds QEMU's monitor sockets (unix path limit).
    with tempfile.TemporaryDirectory(prefix="vfr-", dir="/tmp") as tmp:
        state = Path(tmp) / "s"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("VTPM_", "LIBVIRT_"))}
        cmd = [sys.executable, "-m", "host_agent.cli", "vm", "list", "--json"]
        cmd += ["--state-dir", str(state), "--runtime-dir", str(Path(tmp) / "run")]
        done = subprocess.run(
            cmd,
            env=env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        listing = json.loads(done.stdout)
        assert listing == [] or listing.get("vms", None) == [], listing
        assert (state / "libvirt" / "log").is_dir()
