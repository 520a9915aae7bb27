"""Benchmark: a protected live migration beside the same migration with plain libvirt.

Not a test: it asserts nothing about time; it prints what it measured and the issue-8 goals.

**libvirt** (``--mode libvirt``): two namespace hosts, each with its own libvirtd and
``vtpm-host daemon`` (scripts/lab: the namespace hosts the e2e tests and the demo use), two
TCG guests of the same image and size booted on A: ``mig``, adopted (memfd RAM, external vTPM
behind the bridge, its vAIK), and ``plain``, a libvirt domain with libvirt's own swtpm
(``<backend type='emulator'>``) and nothing of ours. Each round migrates both live, A → B then
B → A, interleaved, so both see the same machine load: ``mig`` through the daemon's migration
socket, the request ``vtpm-host vm migrate --libvirt-uri`` sends (the whole protocol around
libvirt's peer-to-peer migration; the CLI's own Python start-up, ~0.5 s, is measured apart),
``plain`` with ``virsh migrate --live --p2p``; then ``mig`` again both ways with a plain
``virsh migrate --live --p2p`` (the operator's path: the target's libvirt qemu hook asks its
daemon, which pulls the vAIK from the source). The hosts are the bench's own (bmA/bmB,
scripts/lab). Printed: the median wall time of each, their ratios (goal ≤ 1.2),
and the added stop time: what the source's GET_STATEBLOB hook spends while the VM is stopped
(memory root of 256 MiB, vPCR read), and libvirt's own downtime of both (``domjobinfo
--completed`` on the destination).

**protocol** (``--mode protocol``): the part the protocol adds, on two real hosts (two
software-root swtpms, two stores, mTLS on loopback, identities from one registrar;
tests/sim/test_migration_hosts.py builds them):

* **move**: one whole vAIK move, A → B and back, repeated ``--runs`` times: nonce, ExgKey made
  and certified by the target's TPM, the source's checks, journal MOVING, TPM2_Duplicate,
  TPM2_Import, journal PENDING, the vAIK-signed record and its check, COMMITTED, Decision,
  ACTIVE, Done. Outside the VM's stop: libvirt's pre-copy runs meanwhile, so this adds to the
  migration's wall time only where it exceeds the pre-copy.
* **record (stop time)**: the part that must happen while the VM is stopped: the vAIK signing
  the record (TPM2_Hash + TPM2_Sign) and the target checking the signature. Hashing the
  stream's memory is not included (host_agent/memory benchmarks it: bench/memhash.py).

Usage: ``python bench/migrate.py [--mode both|libvirt|protocol] [--runs 10] [--json]`` (root:
the libvirt mode makes network namespaces and runs libvirtd).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from host_agent.config import AgentConfig, with_state_dir  # noqa: E402
from host_agent.migration.channel import TlsIdentity  # noqa: E402
from host_agent.migration.host import MigrationHost, load_identity_certificates  # noqa: E402
from host_agent.migration.record import MigrationRecord, encode_record, verify_record  # noqa: E402
from host_agent.migration.service import (  # noqa: E402
    DEFAULT_PORT,
    MigrationService,
    control_call,
    load_approvals,
)
from host_agent.store.provision import open_store  # noqa: E402
from host_agent.tpm.discovery import open_host_tpm  # noqa: E402
from host_agent.tpm.port import WrappedKey  # noqa: E402
from scripts.lab.fleet import VM, build_fleet, copy_hosts, stop_swtpm  # noqa: E402

#: The bench's own namespace hosts (never the tests' migA/migB or the demo's demoA/demoB).
NAMES = {"a": "bmA", "b": "bmB", "veth_a": "vbmA", "veth_b": "vbmB"}
ADDRS = {"addr_a": "10.81.0.1", "addr_b": "10.81.0.2"}


def _record(mid: uuid.UUID, vm: uuid.UUID) -> MigrationRecord:
    return MigrationRecord(
        mid,
        vm,
        b"\x5a" * 32,
        {i: bytes(32) for i in range(24)},
        {"permanent": b"p" * 32, "volatile": b"v" * 32},
    )


def _ms(values: list[float]) -> dict[str, float]:
    values = sorted(values)
    return {
        "p50_ms": round(statistics.median(values) * 1000, 1),
        "max_ms": round(values[-1] * 1000, 1),
        "n": len(values),
    }


def run(runs: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-migrate-") as tmp:
        root = Path(tmp)
        fleet = build_fleet(root / "fleet")
        hosts = copy_hosts(fleet, root)
        opened: list[Any] = []
        services: list[MigrationService] = []
        try:
            for state in (hosts.a, hosts.b):
                config = with_state_dir(AgentConfig(), state)
                tpm = open_host_tpm(config.tpm)
                store = open_store(config, tpm)
                opened += [store, tpm]
                fleet_ca, aik = load_identity_certificates(state)
                identity = TlsIdentity.under(state)
                host = MigrationHost(
                    tpm=tpm,
                    store=store,
                    identity=identity,
                    host_id=identity.host_id(),
                    fleet_ca=fleet_ca,
                    aik_certificate=aik,
                    approvals=lambda: load_approvals(hosts.approvals),
                    record_source=_record,
                )
                services.append(MigrationService(host, listen=("127.0.0.1", 0)).start())
            moves: list[float] = []
            for i in range(runs):
                src, dst = (services[0], services[1]) if i % 2 == 0 else (services[1], services[0])
                host, port = dst.address
                t0 = time.perf_counter()
                result = src.migrate(VM, dst.host.host_id, f"{host}:{port}")
                moves.append(time.perf_counter() - t0)
                assert result.acknowledged
            # the stop-time part alone, on whichever host holds the vAIK now
            holder = services[0] if runs % 2 == 0 else services[1]
            key = WrappedKey.from_bytes(
                bytes.fromhex(holder.host.store.find("vaik", str(VM)).json()["key"])
            )
            approval = next(
                a
                for a in holder.host.approvals()
                if a.approved_policy == holder.host.tpm.approved_sign_policy()
            )
            stops: list[float] = []
            for _ in range(runs):
                mid = uuid.uuid4()
                t0 = time.perf_counter()
                data = encode_record(_record(mid, VM))
                sig = holder.host.tpm.sign(key, data, approval)
                verify_record(data, sig, key.public, migration_id=mid)
                stops.append(time.perf_counter() - t0)
        finally:
            for service in services:
                service.stop()
            for thing in opened:
                thing.close()
            stop_swtpm(hosts.a)
            stop_swtpm(hosts.b)
    return {"move": _ms(moves), "record_stop_time": _ms(stops)}


def _downtime_ms(host: Any, name: str) -> float | None:
    """libvirt's "Total downtime" of the last completed migration job, as ``host`` saw it."""
    done = host.virsh("domjobinfo", name, "--completed", check=False)
    for line in done.stdout.splitlines():
        if line.startswith("Total downtime:"):
            return float(line.split(":", 1)[1].split()[0])
    return None


def run_libvirt(runs: int) -> dict[str, Any]:
    """See the module docstring (``--mode libvirt``)."""
    import os
    import shutil

    from scripts.lab.hosts import NsAgent, qemu_hook
    from scripts.lab.libvirtd_ns import libvirtd_pair
    from scripts.lab.netns import two_hosts
    from tests.e2e.test_migration_libvirt import plain_domain_xml, wait_console
    from vm_images.build import READY_MARKER, build_image

    if os.geteuid() != 0:
        raise SystemExit("--mode libvirt needs root (ip netns, libvirtd)")
    image = build_image(progress=None)
    root = Path(tempfile.mkdtemp(prefix="bm-", dir="/tmp"))
    state = "/run/vtpm-bench-mig"
    try:
        fleet = build_fleet(root / "fleet")
        hosts = copy_hosts(fleet, root / "agents")
        binds_a, binds_b = {state: hosts.a}, {state: hosts.b}
        with (
            two_hosts(**NAMES, **ADDRS) as net,
            libvirtd_pair(net, root / "lv", binds_a, binds_b, {"qemu": qemu_hook(state)}) as (
                lv_a,
                lv_b,
            ),
        ):
            peers_a = {"host-b": f"{lv_b.address}:{DEFAULT_PORT}"}
            peers_b = {"host-a": f"{lv_a.address}:{DEFAULT_PORT}"}

            def settled(owner: NsAgent, timeout: float = 60.0) -> None:
                """Until ``owner``'s vAIK is active (the target activates it once the source's
                commit reached it), so the next move starts from a settled host; not timed."""
                deadline = time.monotonic() + timeout
                while (seen := owner.journal(VM)[0]) != "active":
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"vAIK {seen} on {owner.host.ns} after {timeout:g} s")
                    time.sleep(0.2)

            a = NsAgent(lv_a, hosts.a, fleet.approvals, peers_a, agent_state=state).start()
            b = NsAgent(lv_b, hosts.b, fleet.approvals, peers_b, agent_state=state).start()
            try:
                a.vm("create", "mig", "--image", str(image.directory), "--uuid", str(VM),
                     "--memory", "256", "--json")  # fmt: skip
                a.vm("start", "mig")
                wait_console(hosts.a / "vms" / str(VM) / "console.log", READY_MARKER)
                console = root / "plain-console.log"
                xml = plain_domain_xml(image, "plain", str(uuid.uuid4()), console).replace(
                    "<memballoon",
                    "<tpm model='tpm-crb'><backend type='emulator' version='2.0'/></tpm>"
                    "<memballoon",
                )
                (root / "plain.xml").write_text(xml)
                lv_a.virsh("create", str(root / "plain.xml"))
                wait_console(console, READY_MARKER)
                cli: list[float] = []
                for _ in range(3):  # what `vtpm-host vm migrate` adds before it asks the daemon
                    t0 = time.perf_counter()
                    a.cli("vm", "migrate", "--help")
                    cli.append(time.perf_counter() - t0)
                protected: list[float] = []
                hooked: list[float] = []
                plain: list[float] = []
                stops: list[float] = []
                down_protected: list[float] = []
                down_plain: list[float] = []
                for _ in range(runs):
                    # Each round: A→B and B→A through the daemon, the same through plain virsh
                    # (B's qemu hook pulls the vAIK), and the unprotected VM both ways.
                    for src, dst, name in ((a, b, "host-b"), (b, a, "host-a")):
                        request = {
                            "op": "migrate",
                            "vm_uuid": str(VM),
                            "to": name,
                            "address": f"{dst.host.address}:{DEFAULT_PORT}",
                            "libvirt_dest": dst.host.uri,
                            "migrate_uri": f"tcp://{dst.host.address}",
                        }
                        t0 = time.perf_counter()
                        result = control_call(src.state / "run" / "migration.sock", request)
                        protected.append(time.perf_counter() - t0)
                        settled(dst)
                        stops.append(float(result["vm"]["stop_seconds"]))
                        t0 = time.perf_counter()
                        src.host.virsh("migrate", "--live", "--p2p", "plain", dst.host.uri,
                                       f"tcp://{dst.host.address}")  # fmt: skip
                        plain.append(time.perf_counter() - t0)
                        for host, dom, out in ((dst.host, "mig", down_protected),
                                               (dst.host, "plain", down_plain)):  # fmt: skip
                            ms = _downtime_ms(host, dom)
                            if ms is not None:
                                out.append(ms / 1000)
                    for src, dst in ((a, b), (b, a)):
                        t0 = time.perf_counter()
                        src.host.virsh("migrate", "--live", "--p2p", "mig", dst.host.uri,
                                       f"tcp://{dst.host.address}")  # fmt: skip
                        hooked.append(time.perf_counter() - t0)
                        settled(dst)
            finally:
                a.stop()
                b.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    ratio = statistics.median(protected) / statistics.median(plain)
    with_cli = (statistics.median(protected) + statistics.median(cli)) / statistics.median(plain)
    return {
        "protected": _ms(protected),
        "protected_plain_virsh": _ms(hooked),
        "plain": _ms(plain),
        "ratio": round(ratio, 2),
        "ratio_plain_virsh": round(statistics.median(hooked) / statistics.median(plain), 2),
        "cli_startup": _ms(cli),
        "ratio_with_cli_startup": round(with_cli, 2),
        "goal_ratio": 1.2,
        "added_stop_hook": _ms(stops),
        "downtime_protected": _ms(down_protected) if down_protected else None,
        "downtime_plain": _ms(down_plain) if down_plain else None,
        "guest": "vm_images initramfs, 256 MiB, TCG, idle",
    }


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="libvirt mode needs root; it prints the ratio protected/plain (goal <= 1.2)",
    )
    p.add_argument("--mode", choices=("both", "libvirt", "protocol"), default="both")
    p.add_argument("--runs", type=int, default=10, help="rounds (libvirt: A→B and B→A each)")
    p.add_argument("--json", action="store_true", help="print one JSON document")
    args = p.parse_args()
    out: dict[str, Any] = {}
    if args.mode in ("both", "protocol"):
        out["protocol"] = run(args.runs)
    if args.mode in ("both", "libvirt"):
        out["libvirt"] = run_libvirt(args.runs)
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    if "protocol" in out:
        print(f"vAIK move (A→B, B→A alternating): {out['protocol']['move']}")
        print(f"record sign + verify: {out['protocol']['record_stop_time']}")
    if "libvirt" in out:
        lv = out["libvirt"]
        print(f"protected live migration: {lv['protected']}")
        print(f"protected, plain virsh migrate (B's qemu hook pulls the vAIK): "
              f"{lv['protected_plain_virsh']}")  # fmt: skip
        print(f"plain libvirt live migration: {lv['plain']}")
        print(f"ratio protected (plain virsh, hook)/plain: {lv['ratio_plain_virsh']}")
        print(f"ratio protected/plain: {lv['ratio']} (goal <= {lv['goal_ratio']}); with the "
              f"vtpm-host CLI's start-up ({lv['cli_startup']['p50_ms']} ms): "
              f"{lv['ratio_with_cli_startup']}")  # fmt: skip
        print(f"added stop time (source hook at the final stop): {lv['added_stop_hook']}")
        print(f"libvirt downtime: protected {lv['downtime_protected']}, "
              f"plain {lv['downtime_plain']}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
