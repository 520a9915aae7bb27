"""``make demo`` end to end: ``python scripts/demo.py --json`` with real everything.

The embedded defaults only (software root, embedded registrar, SQLite store, libvirt's embedded
driver, the Debian disk image through its cache): each act must give its expected outcome, the run
must fit in five minutes once the image is cached, and nothing it started may outlive it. A
second run (the test initramfs guest) is interrupted with SIGTERM while its VM runs, and must
clean up all the same.
"""

from __future__ import annotations

import json
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.helpers.demo_run import run_demo
from tests.helpers.procs import ours

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
DEMO = [sys.executable, str(REPO / "scripts" / "demo.py")]


def test_demo_runs_every_act_for_real_and_leaves_nothing_behind() -> None:
    run = run_demo("demo.py", acts=8, timeout=900)
    doc, acts, report, took = run.doc, run.acts, run.report, run.took

    assert "DEVELOPMENT ONLY" in acts[1]["details"]["development_only_notice"]
    assert acts[2]["details"]["vm_uuid"] and acts[2]["details"]["image"]["kind"] == "disk"
    # attest over SSH: trusted, nothing to report, firmware log and IMA list replayed
    for n in (4, 7):
        assert acts[n]["details"]["trusted"] is True and acts[n]["details"]["findings"] == []
        vpcrs = acts[n]["details"]["vpcrs"]
        # the disk image's IMA policy measures its root file system: a real list
        assert vpcrs["eventlog_events"] > 0 and vpcrs["ima_entries"] > 20
    # the same boot: firmware vPCRs equal; IMA (vPCR 10) only grew with what the guest ran since
    # (the demo itself checks the restored vPCRs equal those at the save)
    before, after = acts[4]["details"]["vpcrs"], acts[7]["details"]["vpcrs"]
    assert {i: before["pcrs"][str(i)] for i in range(8)} == {
        i: after["pcrs"][str(i)] for i in range(8)
    }
    assert after["ima_entries"] >= before["ima_entries"]
    # save: sealed, and the genuine image matches its record
    assert acts[5]["details"]["record"] and acts[5]["details"]["verify"]["verdict"] == "match"
    # tamper: one page named, the restore refused (exit 2), the VM not running
    tamper = acts[6]["details"]
    assert len(tamper["differing_pages"]) == 1 and tamper["restore_exit"] == 2
    assert tamper["vm_state"].replace(" ", "") == "shutoff"
    assert "REFUSED" in acts[6]["result"]
    # restore: verified, then trusted again
    assert "verified restore" in acts[7]["result"] and "TRUSTED" in acts[7]["result"]

    print(f"\ndemo: {doc['total_seconds']} s ({took:.1f} s with the interpreter)")
    assert doc["total_seconds"] <= 300, report
    state = Path(doc["state_dir"])
    assert not state.exists(), "the state directory is removed"
    assert ours(state) == [], "every process the demo started is gone"


def test_demo_interrupted_while_its_vm_runs_cleans_up() -> None:
    state = Path(tempfile.mkdtemp(prefix="vtpm-demo-int-", dir="/tmp")) / "s"
    proc = subprocess.Popen(
        [*DEMO, "--json", "--state-dir", str(state), "--guest", "initramfs"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    assert proc.stderr is not None and proc.stdout is not None
    seen = ""
    try:
        deadline = time.monotonic() + 300
        while "guest ready" not in seen:
            assert proc.poll() is None, seen[-3000:]
            assert time.monotonic() < deadline, seen[-3000:]
            ready, _, _ = select.select([proc.stderr], [], [], 1)
            if ready:
                seen += proc.stderr.readline()
        assert any("qemu-system" in p for p in ours(state)), "the VM runs"
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 1, err[-3000:]
    assert "interrupted: cleaning up" in seen + err
    doc = json.loads(out)
    assert doc["ok"] is False
    assert not state.exists(), "the state directory is removed"
    assert ours(state) == [], "every process the demo started is gone"
    shutil.rmtree(state.parent, ignore_errors=True)
