"""``make demo-migration`` end to end: ``python scripts/demo_migration.py --json``, real everything.

Two namespace hosts (``demoA``/``demoB``, 10.80.0.x: never ``migA``/``migB``, ``crA``/``crB`` or
``hostA``/``hostB`` of the other suites), each with its own libvirtd, daemon, software-root TPM,
store and mTLS identity from one registrar; the test initramfs guest under TCG. Each act must
give its expected outcome (read from the JSON document), the run must fit in three minutes, and
nothing it started may outlive it: no namespace of its names, no process of its own, no state.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.helpers.demo_run import run_demo
from tests.helpers.procs import ours

pytestmark = pytest.mark.e2e

NAMESPACES = {"demoA", "demoB"}
AGENT_STATE = "/run/vtpm-demo-mig"


def _namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def test_migration_demo_gives_every_outcome_and_leaves_nothing_behind() -> None:
    if os.geteuid() != 0:
        pytest.fail("the e2e tier needs root for `ip netns` and libvirtd (platform-notes §7, §8)")
    assert not NAMESPACES & _namespaces(), "a demo's namespaces exist before the run"
    run = run_demo("demo_migration.py", acts=6, timeout=600)
    doc, acts, report, took = run.doc, run.acts, run.report, run.took
    d = {n: a["details"] for n, a in acts.items()}

    # 1. two hosts, each AIK certificate from the fleet CA, in the demo's own namespaces
    hosts = d[1]["hosts"]
    assert {h["namespace"] for h in hosts.values()} == NAMESPACES
    for name in ("host-a", "host-b"):
        assert hosts[name]["aik_subject"] == f"CN={name}"
        assert hosts[name]["aik_chains_to_fleet_ca"] is True
    assert hosts["host-a"]["aik_issuer"] == hosts["host-b"]["aik_issuer"]
    # 2. the protected VM runs on A (the test initramfs guest)
    assert d[2]["host"] == "host-a" and d[2]["domstate"] == "running"
    assert d[2]["guest"] == doc["guest"] == "initramfs"
    # 3. enrolled on A; trusted, nothing to report, chain through A's AIK
    assert d[3]["enrolled"] is True and d[3]["trusted"] is True and d[3]["findings"] == []
    assert d[3]["aik_subject"] == "CN=host-a" and d[3]["aik_chains_to_fleet_ca"] is True
    # 4. plain virsh migrate: the VM runs on B only, the vAIK moved, the vPCRs came along
    assert d[4]["virsh_exit"] == 0 and d[4]["running_on_b"] is True and d[4]["qemu_on_a"] == 0
    assert (d[4]["vaik_a"], d[4]["vaik_b"]) == ("absent", "active")
    assert d[4]["vpcrs_unchanged"] is True
    # 5. trusted on B with the same vAIK, chain through B's AIK and AuthKey; A: not enrolled
    assert d[5]["trusted"] is True and d[5]["findings"] == []
    assert d[5]["vaik_public_sha256"] == d[3]["vaik_public_sha256"] and d[5]["same_vaik"]
    assert d[5]["aik_subject"] == "CN=host-b" and d[5]["aik_chains_to_fleet_ca"] is True
    assert d[5]["authkey_public_sha256"] != d[3]["authkey_public_sha256"]
    assert d[5]["host_a_answer"] == {"ok": False, "error_id": "attest.not_enrolled"}
    # 6. memory changed in flight: A refuses, the VM keeps running on B with its vAIK, trusted
    assert d[6]["virsh_exit"] != 0 and "loaded memory root" in d[6]["refusal"]
    assert d[6]["running_on_b"] is True and d[6]["qemu_on_a"] == 0
    assert (d[6]["vaik_a"], d[6]["vaik_b"]) == ("absent", "active")
    assert d[6]["trusted"] is True and d[6]["same_vaik"] is True
    assert "REFUSED" in acts[6]["result"]

    print(f"\ndemo-migration: {doc['total_seconds']} s ({took:.1f} s with the interpreter)")
    assert doc["total_seconds"] <= 180, report
    state = Path(doc["state_dir"])
    assert not state.exists(), "the state directory is removed"
    assert not NAMESPACES & _namespaces(), "both namespaces are deleted"
    assert not Path(AGENT_STATE).exists(), "the agents' mount point is removed"
    assert ours(str(state), AGENT_STATE) == [], "every process the demo started is gone"
    veths = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    assert "vdemoA" not in veths and "vdemoB" not in veths
