"""Attestation through ``vtpm-host daemon --component host_agent.service.attest:AttestService``.

The daemon runs as its own process, as in production, with the attestation component loaded by
name; everything it needs comes from its state directory. The VM's vTPM is a real encrypted
swtpm (SwtpmInstance) behind a bridge connected to that daemon, so saves are sealed and restores
verified by the daemon's own save/restore path (host_agent.lifecycle.seal / restore). The tenant
enrolls with ``vtpm-verify enroll`` over HTTPS and attests with ``vtpm-verify attest`` over SSH;
after a save and a verified restore, attestation stays trusted without enrolling again.
"""

from __future__ import annotations

import io
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from guest_agent.channel import DEFAULT_PORT_NAME
from host_agent.config import AgentConfig
from host_agent.service.daemon import ControlClient
from host_agent.service.enroll import fingerprint
from host_agent.tpm.adapter import PytssHostTpm
from host_agent.vtpm.bridge import Bridge, BridgeConfig
from host_agent.vtpm.swtpm import SwtpmInstance, SwtpmOptions, vtpm_dir_of
from tests.helpers.qemu import Guest, GuestFactory, free_port
from tests.helpers.swtpm import Swtpm, start_swtpm
from tests.sim.test_attest_service import FLEET, TENANT
from tests.sim.test_attest_service_daemon import prepare_attest_state, write_owners
from verifier import cli

REPO = Path(__file__).resolve().parents[2]
IMA = 'ima_policy=tcb ima_hash=sha256 vtpm.ima_policy="measure func=BPRM_CHECK"'
AGENT = "PYTHONPATH=/tmp/vtpm python3 -m guest_agent.cli"


@dataclass
class Site:
    dir: Path
    config: AgentConfig
    host_tpm: Swtpm
    port: int
    daemon: subprocess.Popen[bytes] | None = None
    logs: list[Path] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def start_daemon(self) -> None:
        log = self.dir / f"daemon{len(self.logs)}.log"
        self.logs.append(log)
        env = {**os.environ, "PYTHONPATH": str(REPO), "VTPM_TPM_TCTI": self.host_tpm.tcti}
        with open(log, "wb") as out:
            self.daemon = subprocess.Popen(
                [
                    sys.executable, "-m", "host_agent.cli", "daemon",
                    "--state-dir", str(self.dir), "--runtime-dir", str(self.dir / "bridges"),
                    "--component", "host_agent.service.attest:AttestService",
                ],
                stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO,
            )  # fmt: skip
        control = ControlClient(self.dir / "run" / "control.sock")
        deadline = time.monotonic() + 30
        while True:
            try:
                if control.call("status")["run_state"] == "running":
                    return
            except Exception:
                pass
            assert self.daemon.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "daemon did not come up"
            time.sleep(0.1)

    def log_text(self) -> str:
        return "".join(p.read_text(errors="replace") for p in self.logs if p.exists())


@pytest.fixture
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    d = Path(tempfile.mkdtemp(prefix="vad-", dir="/tmp"))
    tpm = start_swtpm(tmp_path_factory.mktemp("hosttpm"))
    port = free_port()
    config = prepare_attest_state(d, tpm.tcti, listen=f"127.0.0.1:{port}")
    (d / "fleet-ca.pem").write_bytes(FLEET.certificate_pem)
    (d / "tenant.der").write_bytes(TENANT.cert_user)
    (d / "tenant.key").write_bytes(
        TENANT.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    s = Site(d, config, tpm, port)
    yield s
    if s.daemon is not None and s.daemon.poll() is None:
        s.daemon.send_signal(signal.SIGTERM)
        s.daemon.wait(10)
    print(s.log_text()[-6000:])
    tpm.stop()
    shutil.rmtree(d, ignore_errors=True)


def vtpm_verify(*argv: str) -> tuple[int, str]:
    from contextlib import redirect_stdout

    out = io.StringIO()
    with redirect_stdout(out):
        rc = cli.main(list(argv))
    return rc, out.getvalue()


def install_agent(guest: Guest) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for path in sorted((REPO / "guest_agent").glob("*.py")):
            tar.add(path, arcname=f"guest_agent/{path.name}")
    guest.check("mkdir -p /tmp/vtpm && tar -x -C /tmp/vtpm", stdin=buf.getvalue())


def point_channel(link: Path, guest: Guest) -> None:
    """The adoption record names ``link``; make it lead to this QEMU's channel socket."""
    tmp = link.with_suffix(".new")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(guest.vport_path(DEFAULT_PORT_NAME))
    os.replace(tmp, link)


def attest(site: Site, guest: Guest, state: Path, vm_uuid: uuid.UUID) -> tuple[int, str]:
    assert guest.ssh_port is not None
    return vtpm_verify(
        "attest", "--ssh", f"root@127.0.0.1:{guest.ssh_port}",
        "--identity", str(guest.config.ssh_key), "--host-key", str(guest.config.ssh_host_key),
        "--state-dir", str(state), "--vm", str(vm_uuid), "--guest-command", AGENT, "--json",
    )  # fmt: skip


def test_daemon_component_attests_and_a_verified_restore_stays_trusted(
    site: Site, boot_guest: GuestFactory, tmp_path: Path
) -> None:
    vm_uuid = uuid.uuid4()
    vdir = site.dir / "vms" / str(vm_uuid)
    vdir.mkdir(parents=True)
    link = vdir / "attest.sock"
    (vdir / "adoption.json").write_text(
        f'{{"uuid": "{vm_uuid}", "name": "vm-att", "channel_socket": "{link}"}}'
    )
    write_owners(site.config, {str(vm_uuid): [fingerprint(TENANT.cert_user)]})
    site.start_daemon()

    port = PytssHostTpm(
        site.host_tpm.tcti, site.config.tpm.state_dir, root="software", connection="per-call"
    )
    inst = SwtpmInstance(
        vtpm_dir_of(site.dir), str(vm_uuid), "vm-att", port, options=SwtpmOptions(terminate=True)
    )
    inst.start()
    bridge = Bridge(
        BridgeConfig(
            vm_uuid=str(vm_uuid),
            vm_name="vm-att",
            listen=vdir / "ctrl.sock",
            swtpm_ctrl=inst.ctrl_socket,
            daemon_socket=site.dir / "run" / "daemon.sock",
            runtime_dir=site.dir / "bridges",
            reconnect_interval=0.1,
            hook_timeout=30.0,
        )
    ).start()
    guests: list[Guest] = []
    try:
        g = boot_guest(
            "vm-att",
            tpm_socket=vdir / "ctrl.sock",
            memfd=True,
            vports=(DEFAULT_PORT_NAME,),
            append=IMA,
        )
        guests.append(g)
        point_channel(link, g)
        install_agent(g)
        state = tmp_path / "tenant"
        rc, out = vtpm_verify(
            "enroll", "--host", site.url, "--vm", str(vm_uuid),
            "--cert", str(site.dir / "tenant.der"), "--key", str(site.dir / "tenant.key"),
            "--fleet-ca", str(site.dir / "fleet-ca.pem"), "--state-dir", str(state),
        )  # fmt: skip
        assert rc == 0, out + site.log_text()[-3000:]
        rc, out = attest(site, g, state, vm_uuid)
        assert rc == 0 and '"trusted": true' in out, out + site.log_text()[-3000:]

        # save (the daemon seals memory and vTPM state), restore (the daemon verifies both)
        image = tmp_path / "vm.save"
        g.qmp.stop()
        g.qmp.migrate_to_file(image)
        g.shutdown()
        inst.restart_for_incoming()
        r = boot_guest(
            "vm-att-r",
            tpm_socket=vdir / "ctrl.sock",
            memfd=True,
            vports=(DEFAULT_PORT_NAME,),
            append=IMA,
            incoming=f"exec:cat {image}",
            wait=False,
        )
        guests.append(r)
        deadline = time.monotonic() + 90
        while r.qmp.query_status() != "paused":
            assert r.proc is not None and r.proc.poll() is None, site.log_text()[-3000:]
            assert time.monotonic() < deadline, r.diagnostics()
            time.sleep(0.1)
        r.qmp.cont()
        point_channel(link, r)
        assert "matches sealed record" in site.log_text()

        rc, out = attest(site, r, state, vm_uuid)
        assert rc == 0 and '"trusted": true' in out, out + site.log_text()[-3000:]
    finally:
        for guest in reversed(guests):
            guest.shutdown()
        bridge.close()
        inst.stop()
        port.close()
