"""The tenant's side of a VM that runs under a namespace host's libvirtd (tests/e2e).

The guest's SSH port is a QEMU ``hostfwd`` on 127.0.0.1 of the namespace its QEMU runs in, so
these functions run inside that namespace (``NetnsPair.call_function``); arguments and results
are JSON.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

from tests.helpers.qemu import GuestSsh

REPO = Path(__file__).resolve().parents[2]
AGENT_DIR = "/tmp/vtpm"
#: How ``vtpm-verify attest --guest-command`` runs the agent :func:`install_guest_agent` put there.
GUEST_COMMAND = f"PYTHONPATH={AGENT_DIR} python3 -m guest_agent.cli"


def install_guest_agent(port: int, key_path: str, host_key: str, timeout: float = 60.0) -> int:
    """Copy ``guest_agent/*.py`` into the guest (tar over SSH: dropbear has no SFTP); return
    how many files went in."""
    buf = io.BytesIO()
    files = sorted((REPO / "guest_agent").glob("*.py"))
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for path in files:
            tar.add(path, arcname=f"guest_agent/{path.name}")
    ssh = GuestSsh(port, Path(key_path), host_key)
    ssh.connect(timeout=timeout)
    try:
        done = ssh.run(f"mkdir -p {AGENT_DIR} && tar -x -C {AGENT_DIR}", stdin=buf.getvalue())
        if done.status != 0:
            raise RuntimeError(f"installing the guest agent: {done.stderr.decode()[-500:]}")
    finally:
        ssh.client.close()
    return len(files)
