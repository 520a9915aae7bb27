"""Benchmark: guarded save + restore beside libvirt's own, for a 1 GiB guest (not a test).

Two domains on libvirt's embedded driver, booted from the vm_images test guest with the same
definition (memfd RAM, 1 GiB, 1 vCPU, TCG), each filling part of its RAM with random data first
(``--fill-mib``, default 400) so that the save image is not mostly zero pages:

  * **guarded**: made by ``VmManager.create`` (adopted: external vTPM through the bridge, the
    agent's encrypted swtpm) with ``vtpm-host daemon`` running: the daemon hashes all guest
    memory and seals a record before QEMU gets the last vTPM blob (save), and hashes the loaded
    memory and compares it before QEMU may run the VM (restore). Restore includes arming the VM
    (swtpm restarted for incoming state, bridge started), as ``vtpm-host vm restore`` does;
  * **baseline**: the same definition with ``<backend type='emulator'>`` (libvirt's own swtpm)
    and no agent.

Each round saves (``virDomainSaveFlags``) and restores (``virDomainRestoreFlags``) each domain
once, alternating. Printed: median save, restore and save+restore seconds per domain, the ratio
guarded / baseline of the save+restore medians (goal: <= 1.25), and the pause the agent adds at
the stop (from the daemon's seal log: PERMANENT hook to record committed) and at the restore
(hash + compare before the VM runs).

Usage: ``python bench/save_restore.py [--rounds 3] [--memory-mib 1024] [--fill-mib 400] [--json]``
(root; needs qemu-system-x86_64, swtpm, libvirt).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from host_agent.config import AgentConfig, TpmConfig  # noqa: E402
from host_agent.lifecycle.adoption import VmManager, daemon_socket_of, load_image_spec  # noqa: E402
from host_agent.lifecycle.embedded import prepare_embedded_root  # noqa: E402
from host_agent.lifecycle.libvirt_adapter import Hypervisor  # noqa: E402
from host_agent.lifecycle.save_cli import _arm  # noqa: E402
from host_agent.service.daemon import ControlClient  # noqa: E402
from host_agent.store.provision import ensure_store  # noqa: E402
from host_agent.tpm.adapter import PytssHostTpm  # noqa: E402
from tests.helpers.procs import kill_leftovers  # noqa: E402
from tests.helpers.swtpm import start_swtpm  # noqa: E402
from vm_images.build import build_image  # noqa: E402

FILL = "dd if=/dev/urandom of=/tmp/fill bs=1M count={mib} 2>/dev/null; sync; echo FILLED"


def _wait_console(path: Path, marker: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while marker not in (path.read_text(errors="replace") if path.exists() else ""):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{marker!r} not on {path} within {timeout} s")
        time.sleep(0.2)


def _baseline_xml(xml: str, guarded_uuid: str, name: str, new_uuid: str) -> str:
    xml = xml.replace(guarded_uuid, new_uuid)
    xml = re.sub(r"<name>[^<]*</name>", f"<name>{name}</name>", xml, count=1)
    xml = re.sub(
        r"<tpm\b.*?</tpm>",
        "<tpm model='tpm-crb'><backend type='emulator' version='2.0'/></tpm>",
        xml,
        flags=re.S,
    )
    return xml


def run(args: argparse.Namespace) -> dict[str, Any]:
    image = build_image()
    spec = load_image_spec(image.directory)
    state = Path(tempfile.mkdtemp(prefix="vbsr-", dir="/tmp"))
    work = Path(tempfile.mkdtemp(prefix="vbsr-img-", dir=args.image_dir))
    host_tpm = start_swtpm(state / "hosttpm")
    config = AgentConfig(
        state_dir=state, tpm=TpmConfig(tcti=host_tpm.tcti, state_dir=state / "tpm")
    )
    port = PytssHostTpm(host_tpm.tcti, config.tpm.state_dir, root="software", connection="per-call")
    env = {**os.environ, "PYTHONPATH": str(REPO), "VTPM_TPM_TCTI": host_tpm.tcti}
    daemon: subprocess.Popen[bytes] | None = None
    log = state / "daemon.log"
    try:
        ensure_store(port, config)
        with open(log, "wb") as out:
            daemon = subprocess.Popen(
                [sys.executable, "-m", "host_agent.cli", "daemon", "--state-dir", str(state),
                 "--runtime-dir", str(state / "run" / "bridges")],
                stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO,
            )  # fmt: skip
        control = ControlClient(state / "run" / "control.sock")
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(Exception):
                if control.call("status")["run_state"] == "running":
                    break
            if time.monotonic() > deadline or daemon.poll() is not None:
                raise RuntimeError(log.read_text()[-2000:])
            time.sleep(0.1)

        root = state / "libvirt"
        prepare_embedded_root(root)
        with Hypervisor(f"qemu:///embed?root={root}") as hv:
            m = VmManager(
                hypervisor=hv,
                state_dir=state,
                sealer=lambda: port,
                runtime_dir=state / "run" / "bridges",
                daemon_socket=daemon_socket_of(state),
            )
            script = base64.b64encode(FILL.format(mib=args.fill_mib).encode()).decode()
            extra = f"vtpm.run_b64={script} vtpm.poweroff=0 vtpm.ssh=0"
            g_uuid = str(uuid.uuid4())
            m.create("bench-guarded", spec, memory_mib=args.memory_mib, now=datetime.now(UTC),
                     vm_uuid=g_uuid, cmdline_extra=extra)  # fmt: skip
            b_uuid = str(uuid.uuid4())
            (state / "vms" / b_uuid).mkdir(parents=True)
            b_xml = _baseline_xml(hv.xml("bench-guarded", inactive=True), g_uuid,
                                  "bench-baseline", b_uuid)  # fmt: skip
            hv.define(b_xml)
            m.start("bench-guarded")
            hv.start("bench-baseline")
            for u in (g_uuid, b_uuid):
                _wait_console(state / "vms" / u / "console.log", "FILLED", 300)
            guarded, baseline = hv.lookup("bench-guarded"), hv.lookup("bench-baseline")
            times: dict[str, dict[str, list[float]]] = {
                "guarded": {"save": [], "restore": [], "arm": []},
                "baseline": {"save": [], "restore": []},
            }
            sizes: dict[str, int] = {}
            for r in range(args.rounds):
                for label, ref in (("baseline", baseline), ("guarded", guarded)):
                    path = work / f"{label}-{r}.save"
                    if label == "guarded":
                        control.call("prepare_save", vm_uuid=ref.uuid)
                    t0 = time.perf_counter()
                    hv.save(ref, path)
                    times[label]["save"].append(time.perf_counter() - t0)
                    sizes[label] = path.stat().st_size
                    t0 = time.perf_counter()
                    if label == "guarded":
                        _arm(m, ref)
                        times[label]["arm"].append(time.perf_counter() - t0)
                    hv.restore(path)
                    times[label]["restore"].append(time.perf_counter() - t0)
                    if not hv.info(ref).active:
                        raise RuntimeError(f"{label} did not come back")
                    path.unlink()
            for ref in (guarded, baseline):
                hv.destroy(ref)
            m.cleanup(guarded)
    finally:
        if daemon is not None and daemon.poll() is None:
            daemon.terminate()
            daemon.wait(10)
        kill_leftovers(state)
        port.close()
        host_tpm.stop()
    text = log.read_text(errors="replace")
    pauses = [float(x) for x in re.findall(r"pause ([0-9.]+) s\)", text)]
    parts = re.findall(r"hash ([0-9.]+) s, vPCRs ([0-9.]+) s, record ([0-9.]+) s", text)
    verifies = [float(x) for x in re.findall(r"sealed record \S+ \(([0-9.]+) s\)", text)]
    shutil.rmtree(state, ignore_errors=True)
    shutil.rmtree(work, ignore_errors=True)

    def med(xs: list[float]) -> float:
        return statistics.median(xs) if xs else float("nan")

    g, b = times["guarded"], times["baseline"]
    g_total = med([s + r for s, r in zip(g["save"], g["restore"], strict=True)])
    b_total = med([s + r for s, r in zip(b["save"], b["restore"], strict=True)])
    return {
        "memory_mib": args.memory_mib,
        "fill_mib": args.fill_mib,
        "rounds": args.rounds,
        "image_bytes": sizes,
        "guarded": {k: round(med(v), 3) for k, v in g.items()},
        "baseline": {k: round(med(v), 3) for k, v in b.items()},
        "guarded_save_restore_s": round(g_total, 3),
        "baseline_save_restore_s": round(b_total, 3),
        "ratio": round(g_total / b_total, 3),
        "added_pause_at_stop_s": round(med(pauses), 3),
        "pause_parts_s": {
            "hash": round(med([float(a) for a, _, _ in parts]), 3),
            "vpcrs": round(med([float(b) for _, b, _ in parts]), 3),
            "record": round(med([float(c) for _, _, c in parts]), 3),
        },
        "verify_before_run_s": round(med(verifies), 3),
        "hash_mode": "full (soft-dirty unavailable on this kernel)"
        if "dirty-page tracking unavailable" in text
        else "see daemon log",
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--memory-mib", type=int, default=1024)
    p.add_argument("--fill-mib", type=int, default=400)
    p.add_argument("--image-dir", default="/tmp", help="where save images go")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    res = run(args)
    if args.json:
        print(json.dumps(res, indent=1))
        return 0
    print(f"{res['memory_mib']} MiB guest ({res['fill_mib']} MiB random), {res['rounds']} rounds, "
          f"images {res['image_bytes']}")  # fmt: skip
    for label in ("baseline", "guarded"):
        t = res[label]
        print(f"  {label:9s} save {t['save']:.3f} s  restore {t['restore']:.3f} s"
              + (f" (arming {t['arm']:.3f} s)" if "arm" in t else ""))  # fmt: skip
    g, b, ratio = res["guarded_save_restore_s"], res["baseline_save_restore_s"], res["ratio"]
    print(
        f"  save+restore: guarded {g:.3f} s / baseline {b:.3f} s = ratio {ratio:.3f} (goal <= 1.25)"
    )
    pause, verify = res["added_pause_at_stop_s"], res["verify_before_run_s"]
    print(f"  added pause at the stop: {pause:.3f} s ({res['pause_parts_s']}); "
          f"verify before the VM runs: {verify:.3f} s; {res['hash_mode']}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
