"""The Ansible roles, linted and applied for real to this machine (issue 9).

``site.yml`` runs against ``localhost`` with ``ansible_connection=local`` into a throwaway prefix
(every path of both roles under one temporary directory: virtualenv, configuration, state,
libvirt's embedded root, logs, pid files). The registrar's PostgreSQL is the suite's throwaway
server (tests/helpers/postgres.py), reached over TCP as the ``postgres`` superuser, as an
operator's would be over the local socket. The Debian packages are already installed (``make
test`` installs them), so the apt task must report no change.

What the first run must leave behind: a registrar serving HTTPS on PostgreSQL, a host admitted by
it (AIK certificate under the state directory), the listed VM adopted, and the agent running
under the fallback supervisor (PID 1 is not systemd here), answering ``vtpm-host status --json``.
The second run must change nothing (PLAY RECAP ``changed=0``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from xml.sax.saxutils import escape

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.helpers import postgres
from vm_images.build import GuestImage, build_image

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
ANSIBLE_DIR = REPO / "ansible"
BIN = Path(sys.executable).parent
VM_NAME = "vm-ansible"
VM_UUID = "6b1d3a52-7c36-4e0e-9a31-0a9c2f4f7e11"
SOURCE_PARTS = ("pyproject.toml", "README.md", "evidence", "host_agent", "guest_agent",
                "verifier", "scripts", "deps")  # fmt: skip


def _tool(name: str) -> str:
    path = BIN / name
    if not path.exists():
        pytest.fail(f"{name} is not installed in {BIN}: pip install -e '.[dev]'")
    return str(path)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_ansible_lint_is_clean() -> None:
    proc = subprocess.run(
        [_tool("ansible-lint"), "--offline", "--nocolor"],
        cwd=ANSIBLE_DIR,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "ANSIBLE_HOME": tempfile.mkdtemp(prefix="ansible-home-")},
    )
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-3000:]


def _snapshot_source(dest: Path) -> None:
    """A copy of the checkout, so edits made meanwhile cannot change what the runs install."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".mypy_cache")
    dest.mkdir(parents=True)
    for part in SOURCE_PARTS:
        src = REPO / part
        if src.is_dir():
            shutil.copytree(src, dest / part, ignore=ignore)
        else:
            shutil.copy2(src, dest / part)


GUEST_AGENT = "PYTHONPATH=/mnt/repo python3 -m guest_agent.cli"
IMA = 'ima_policy=tcb ima_hash=sha256 vtpm.ima_policy="measure func=BPRM_CHECK"'


def _define_domain(prefix: Path, image: GuestImage, ssh_port: int) -> None:
    """A plain libvirt domain booting the test guest (no TPM, no attestation channel yet: the
    role's adoption adds them), with the checkout shared read-only at /mnt/repo for the guest
    agent and the guest's SSH forwarded to ``ssh_port``."""
    from host_agent.lifecycle.embedded import embedded_uri, prepare_embedded_root

    root = prefix / "var/lib/vtpm-trust/libvirt"
    prepare_embedded_root(root)
    console = prefix / "console.log"
    xml = f"""<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>{VM_NAME}</name><uuid>{VM_UUID}</uuid>
  <memory unit='MiB'>256</memory><vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type><kernel>{image.kernel}</kernel>
      <initrd>{image.initramfs}</initrd><cmdline>{escape(f"{image.cmdline} {IMA}")}</cmdline></os>
  <features><acpi/><apic/></features>
  <on_reboot>destroy</on_reboot>
  <devices>
    <serial type='file'><source path='{console}' append='on'/><target port='0'/></serial>
    <filesystem type='mount' accessmode='passthrough'>
      <source dir='{prefix / "src"}'/><target dir='repo'/><readonly/>
    </filesystem>
    <memballoon model='none'/>
  </devices>
  <qemu:commandline>
    <qemu:arg value='-netdev'/>
    <qemu:arg value='user,id=n0,hostfwd=tcp:127.0.0.1:{ssh_port}-:22'/>
    <qemu:arg value='-device'/><qemu:arg value='virtio-net-pci,netdev=n0,addr=0x10'/>
  </qemu:commandline>
</domain>"""
    xml_file = prefix / "domain.xml"
    xml_file.write_text(xml)
    subprocess.run(
        ["virsh", "-q", "-c", embedded_uri(root), "define", str(xml_file)],
        check=True,
        capture_output=True,
        timeout=120,
    )


def _tenant(directory: Path) -> tuple[Path, Path, str]:
    """A tenant certificate (self-signed P-256) and key; returns their paths and fingerprint."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tenant-ansible")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(hours=1))
        .not_valid_after(now + timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    der = cert.public_bytes(serialization.Encoding.DER)
    cert_path, key_path = directory / "tenant.der", directory / "tenant.key"
    cert_path.write_bytes(der)
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path, "sha256:" + hashlib.sha256(der).hexdigest()


def _wait_ready(console: Path, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        text = console.read_text(errors="replace") if console.exists() else ""
        if "VTPM-GUEST-READY" in text:
            return
        assert time.monotonic() < deadline, f"guest not ready:\n{text[-3000:]}"
        time.sleep(0.2)


def _inventory(
    prefix: Path,
    pg: postgres.Postgres,
    ports: dict[str, int],
    owner: str,
) -> Path:
    host = {
        "ansible_connection": "local",
        "ansible_python_interpreter": "/usr/bin/python3",
        "vtpm_become": False,
        "vtpm_src": str(prefix / "src"),
        "vtpm_prefix": str(prefix),
        # registrar
        "vtpm_registrar_listen_host": "127.0.0.1",
        "vtpm_registrar_port": ports["registrar"],
        "vtpm_registrar_public_name": "localhost",
        "vtpm_registrar_trust_swtpm_localca": True,
        "vtpm_registrar_db_password": "not a 'secret': \\x",  # quoting, pgpass escapes
        "vtpm_registrar_db_port": pg.port,
        "vtpm_registrar_pg_admin_host": "127.0.0.1",
        "vtpm_registrar_pg_become_user": "",
        "vtpm_registrar_pg_manage_service": False,
        # host
        "vtpm_host_allow_software_root": True,
        "vtpm_host_vms": [VM_NAME],
        "vtpm_host_approve_platform": True,
        "vtpm_host_enroll_listen": f"127.0.0.1:{ports['enroll']}",
        "vtpm_host_metrics_listen": f"127.0.0.1:{ports['metrics']}",
        "vtpm_host_vm_owners": {VM_UUID: [owner]},
    }
    inventory = {
        "all": {
            "children": {
                "vtpm_registrars": {"hosts": {"localhost": host}},
                "vtpm_hosts": {"hosts": {"localhost": None}},
            }
        }
    }
    path = prefix / "inventory.json"
    path.write_text(json.dumps(inventory, indent=1))
    return path


def _run_playbook(inventory: Path, log: Path) -> tuple[subprocess.CompletedProcess[str], float]:
    env = {
        **os.environ,
        "ANSIBLE_CONFIG": str(ANSIBLE_DIR / "ansible.cfg"),
        "ANSIBLE_HOME": str(inventory.parent / "ansible-home"),
        "ANSIBLE_LOCAL_TEMP": str(inventory.parent / "ansible-tmp"),
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_LOG_PATH": os.environ.get("VTPM_ANSIBLE_LOG", str(log.with_suffix(".timed.log"))),
        "ANSIBLE_FORCE_COLOR": "0",
        "PATH": f"{BIN}:{os.environ.get('PATH', '')}",
    }
    began = time.monotonic()
    proc = subprocess.run(
        [_tool("ansible-playbook"), "-i", str(inventory), str(ANSIBLE_DIR / "site.yml")],
        cwd=ANSIBLE_DIR,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    with log.open("a") as f:
        f.write(proc.stdout + proc.stderr)
    return proc, time.monotonic() - began


def _recap(stdout: str) -> dict[str, int]:
    m = re.search(r"PLAY RECAP \*+\s*\n\s*localhost\s*:\s*(.*)", stdout)
    assert m, stdout[-3000:]
    return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", m.group(1))}


def _changed_tasks(stdout: str) -> list[str]:
    out, task = [], ""
    for line in stdout.splitlines():
        if line.startswith(("TASK [", "RUNNING HANDLER [")):
            task = line
        elif line.startswith("changed:"):
            out.append(f"{task} {line}")
    return out


def _stop_leftovers(prefix: Path) -> None:
    """Stop the supervisors (and so the agent and registrar), then any process still running
    from the prefix (the software root's swtpm): each by its pid."""
    supervise = prefix / "opt/vtpm-trust/venv/bin/vtpm-supervise"
    for pidfile in sorted((prefix / "run/vtpm-trust").glob("*.pid")):
        if supervise.exists():
            subprocess.run(
                [sys.executable, str(supervise), "stop", "--pidfile", str(pidfile)],
                capture_output=True,
                timeout=60,
                check=False,
            )
    marker = str(prefix).encode()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if marker in cmdline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(proc.name), signal.SIGTERM)


@pytest.fixture
def prefix() -> Iterator[Path]:
    # Short: libvirt's embedded root lives under it, and unix socket paths end at 107 bytes.
    path = Path(tempfile.mkdtemp(prefix="va-", dir="/tmp"))
    try:
        yield path
    finally:
        _stop_leftovers(path)
        time.sleep(0.5)
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def pg() -> Iterator[postgres.Postgres]:
    server = postgres.acquire()
    try:
        yield server
    finally:
        with contextlib.suppress(RuntimeError):
            server.drop_database("vtpm_registrar")
        with contextlib.suppress(RuntimeError):
            server.psql("DROP ROLE IF EXISTS vtpm_registrar")
        postgres.release()


def test_site_yml_deploys_registrar_and_host_then_changes_nothing(
    prefix: Path, pg: postgres.Postgres
) -> None:
    if os.geteuid() != 0:
        pytest.fail("the roles install system users and services: run the e2e tier as root")
    image = build_image()
    _snapshot_source(prefix / "src")
    ssh_port = _free_port()
    _define_domain(prefix, image, ssh_port)
    cert, key, owner = _tenant(prefix)
    ports = {"registrar": _free_port(), "enroll": _free_port(), "metrics": _free_port()}
    enroll_port = ports["enroll"]
    inventory = _inventory(prefix, pg, ports, owner)
    log = prefix / "ansible.log"

    first, first_s = _run_playbook(inventory, log)
    agent_log = prefix / "var/log/vtpm-trust/vtpm-host.log"
    detail = (
        first.stdout[-6000:]
        + first.stderr[-2000:]
        + (agent_log.read_text(errors="replace")[-3000:] if agent_log.exists() else "")
    )
    assert first.returncode == 0, detail
    recap = _recap(first.stdout)
    assert recap["failed"] == 0 and recap["changed"] > 0, recap

    # The registrar runs on PostgreSQL and admitted this host.
    venv = prefix / "opt/vtpm-trust/venv"
    hosts = subprocess.run(
        [str(venv / "bin/vtpm-verify"), "registrar", "hosts", "--json",
         "--state-dir", str(prefix / "var/lib/vtpm-registrar")],
        capture_output=True, text=True, timeout=60,
        env={**os.environ, "PGPASSFILE": str(prefix / "var/lib/vtpm-registrar/pgpass")},
    )  # fmt: skip
    assert hosts.returncode == 0, hosts.stderr
    assert len(json.loads(hosts.stdout)["hosts"]) == 1
    assert pg.psql("SELECT 1 FROM pg_database WHERE datname = 'vtpm_registrar'").strip() == "1"
    has_password = "SELECT rolpassword IS NOT NULL FROM pg_authid WHERE rolname = 'vtpm_registrar'"
    assert pg.psql(has_password).strip() == "t"
    pgpass = prefix / "var/lib/vtpm-registrar/pgpass"
    assert pgpass.stat().st_mode & 0o777 == 0o600
    expected = f"127.0.0.1:{pg.port}:vtpm_registrar:vtpm_registrar:not a 'secret'\\: \\\\x"
    assert pgpass.read_text().strip() == expected
    assert (prefix / "var/lib/vtpm-trust/identity/aik.pem").exists()

    # The agent runs under the supervisor and answers with the adopted VM.
    status = subprocess.run(
        [str(venv / "bin/vtpm-host"), "status", "--json",
         "--config", str(prefix / "etc/vtpm-trust/agent.toml"),
         "--runtime-dir", str(prefix / "run/vtpm-trust/bridges")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert status.returncode == 0, status.stderr
    doc = json.loads(status.stdout)
    assert doc["source"] == "daemon" and doc["daemon"]["running"], doc
    (vm,) = doc["vms"]
    assert (vm["name"], vm["uuid"], vm["adopted"]) == (VM_NAME, VM_UUID, True)
    sup = subprocess.run(
        [str(venv / "bin/python"), str(venv / "bin/vtpm-supervise"), "status", "--json",
         "--pidfile", str(prefix / "run/vtpm-trust/vtpm-host.pid")],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert sup.returncode == 0 and json.loads(sup.stdout)["child_pid"] == doc["daemon"]["pid"]

    # Metrics on loopback, at the configured port; the agent logs JSON lines.
    import urllib.request

    url = f"http://127.0.0.1:{ports['metrics']}/metrics"
    with urllib.request.urlopen(url, timeout=10) as resp:
        scraped = resp.read().decode()
    assert 'vtpm_vms{bridge="down"} 1' in scraped
    assert "# TYPE vtpm_bridge_relay_errors_total counter" in scraped
    json_lines = [
        json.loads(line)
        for line in agent_log.read_text(errors="replace").splitlines()
        if line.startswith("{")
    ]
    assert any(doc.get("logger", "").startswith("host_agent") for doc in json_lines)
    # [logging] format = "json" from agent.toml: the daemon's own start-up lines are JSON too.
    assert any(doc.get("message", "").startswith("daemon running") for doc in json_lines)

    # The adopted VM boots on the agent's bridge, the tenant enrolls it and it attests trusted.
    config = ["--config", str(prefix / "etc/vtpm-trust/agent.toml")]
    runtime = ["--runtime-dir", str(prefix / "run/vtpm-trust/bridges")]
    start = subprocess.run(
        [str(venv / "bin/vtpm-host"), "vm", "start", VM_NAME, *config, *runtime],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert start.returncode == 0, start.stderr[-3000:]
    try:
        _wait_ready(prefix / "console.log")
        tenant_state = prefix / "tenant"
        enroll = subprocess.run(
            [str(venv / "bin/vtpm-verify"), "enroll", "--host", f"https://127.0.0.1:{enroll_port}",
             "--vm", VM_UUID, "--cert", str(cert), "--key", str(key),
             "--fleet-ca", str(prefix / "var/lib/vtpm-trust/identity/ca.pem"),
             "--state-dir", str(tenant_state), "--json"],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert enroll.returncode == 0, enroll.stdout[-2000:] + enroll.stderr[-3000:]
        attest = subprocess.run(
            [str(venv / "bin/vtpm-verify"), "attest", "--ssh", f"root@127.0.0.1:{ssh_port}",
             "--identity", str(image.ssh_private_key), "--host-key", image.ssh_host_public_key,
             "--state-dir", str(tenant_state), "--vm", VM_UUID, "--guest-command", GUEST_AGENT,
             "--json"],
            capture_output=True, text=True, timeout=180,
        )  # fmt: skip
        assert attest.returncode == 0, attest.stdout[-3000:] + attest.stderr[-3000:]
        report = json.loads(attest.stdout)
        assert report["trusted"] is True, report
        after = subprocess.run(
            [str(venv / "bin/vtpm-host"), "status", "--json", *config, *runtime],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        (vm,) = json.loads(after.stdout)["vms"]
        assert vm["vaik"] == "bound" and vm["bridge"] == "connected", vm
        assert vm["relay_errors"] == 0, vm
    finally:
        subprocess.run(
            [str(venv / "bin/vtpm-host"), "vm", "stop", VM_NAME, *config, *runtime],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip

    second, second_s = _run_playbook(inventory, log)
    assert second.returncode == 0, second.stdout[-6000:] + second.stderr[-2000:]
    recap = _recap(second.stdout)
    assert recap["changed"] == 0, _changed_tasks(second.stdout)
    assert recap["failed"] == 0
    print(f"first run {first_s:.1f} s, second run {second_s:.1f} s")
