"""The tenant's side of a VM that runs under a namespace host's libvirtd (tests/e2e).

The code lives in ``scripts/lab/guest.py``, shared with the migration demo; this module keeps
the names the e2e tests import and call by ``"tests.helpers.guest_tenant:…"`` strings.
"""

from __future__ import annotations

from scripts.lab.guest import AGENT_DIR, GUEST_COMMAND, install_guest_agent, run_in_guest

__all__ = ["AGENT_DIR", "GUEST_COMMAND", "install_guest_agent", "run_in_guest"]
