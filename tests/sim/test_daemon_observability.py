"""What an operator sees of a running daemon: relay errors, JSON logs, the metrics endpoint.

Real parts: the daemon on a swtpm host TPM with the SQLite store, a real bridge and swtpm per VM,
and a client that speaks QEMU's side of the bridge (tests/sim/test_bridge.py's ``QemuSide``).
Relay errors are provoked for real: an unknown control command from the QEMU side, then the VM's
swtpm killed under a booted TPM; they must show in the scraped ``/metrics`` text and in
``vtpm-host status --json``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from host_agent.config import AgentConfig
from host_agent.service.metrics import MetricsComponent, MetricsConfig
from host_agent.service.status import StatusComponent
from host_agent.vtpm.bridge import Bridge
from tests.helpers.ports import free_port
from tests.sim.test_bridge import QemuSide, get_random, rc_of
from tests.sim.test_daemon import REPO, VmBridge, daemon_of, host, wait_for

__all__ = ["host"]  # the fixture, shared with test_daemon.py


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return str(resp.read().decode())


def _relay_lines(text: str, vm_uuid: str) -> dict[str, int]:
    out = {}
    prefix = f'vtpm_bridge_relay_errors_total{{vm="{vm_uuid}",kind="'
    for line in text.splitlines():
        if line.startswith(prefix):
            kind, _, value = line[len(prefix) :].partition('"} ')
            out[kind] = int(value)
    return out


def _status_json(config: AgentConfig) -> dict[str, object]:
    proc = subprocess.run(
        [sys.executable, "-m", "host_agent.cli", "status", "--json",
         "--state-dir", str(config.state_dir), "--runtime-dir", str(config.state_dir / "bridges")],
        capture_output=True, text=True, timeout=60, cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return dict(json.loads(proc.stdout))


def test_relay_errors_of_a_bridge_reach_metrics_and_status(host: AgentConfig) -> None:
    metrics = MetricsComponent(config=MetricsConfig(port=0))
    daemon = daemon_of(host, components=[StatusComponent(), metrics]).start()
    vm = VmBridge(host, "vm-relay")
    q: QemuSide | None = None
    try:
        assert daemon.hooks is not None
        daemon.hooks.wait_for_bridge(vm.uuid, timeout=10)
        assert metrics.port is not None
        assert _relay_lines(_scrape(metrics.port), vm.uuid) == {}

        q = QemuSide(vm.bridge.config.listen)
        q.boot()
        assert rc_of(q.tpm(get_random(8))) == 0
        q.ctrl.sendall(b"\0\0\0\x77")  # no such control command: a malformed request
        assert q.ctrl.recv(16) == b"\0\0\0\x0a"  # TPM_BAD_ORDINAL, and the session goes on
        assert rc_of(q.tpm(get_random(8))) == 0
        assert _relay_lines(_scrape(metrics.port), vm.uuid) == {"qemu_malformed": 1}

        os.kill(vm.swtpm.proc.pid, signal.SIGKILL)  # swtpm dies under a running guest TPM
        vm.swtpm.proc.wait(10)
        assert q.data is not None
        q.data.settimeout(10)
        try:  # the bridge may have closed QEMU's end already (broken pipe), or closes it now
            q.data.sendall(get_random(8))
            got = q.data.recv(4096)
        except ConnectionError:
            got = b""
        assert got == b"", "the bridge closes QEMU's data channel when swtpm is gone"
        wait_for(lambda: vm.bridge.status()["stats"]["relay_errors"].get("swtpm_gone") == 1)

        text = _scrape(metrics.port)
        assert _relay_lines(text, vm.uuid) == {"qemu_malformed": 1, "swtpm_gone": 1}
        assert "# TYPE vtpm_bridge_relay_errors_total counter" in text
        daemon.sync()  # what Daemon.run() does every 0.5 s: the registry learns the bridge
        doc = _status_json(host)
        (entry,) = doc["vms"]  # type: ignore[misc]
        assert entry["uuid"] == vm.uuid and entry["relay_errors"] == 2, entry
        table = subprocess.run(
            [sys.executable, "-m", "host_agent.cli", "status", "--state-dir",
             str(host.state_dir), "--runtime-dir", str(host.state_dir / "bridges")],
            capture_output=True, text=True, timeout=60, cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )  # fmt: skip
        assert "2 relay errors" in table.stdout, table.stdout

        # A bridge restarted for the VM starts counting at zero; the daemon's totals do not.
        vm.bridge.close()
        wait_for(lambda: vm.uuid not in daemon.hooks.bridges())  # type: ignore[union-attr]
        vm.bridge = Bridge(vm.bridge.config).start()
        daemon.hooks.wait_for_bridge(vm.uuid, timeout=10)  # type: ignore[union-attr]
        assert vm.bridge.status()["stats"]["relay_errors"] == {}
        assert _relay_lines(_scrape(metrics.port), vm.uuid) == {
            "qemu_malformed": 1,
            "swtpm_gone": 1,
        }
    finally:
        if q is not None:
            q.close()
        daemon.stop()
        vm.close()


def test_daemon_configured_for_json_logs_and_a_metrics_address(host: AgentConfig) -> None:
    port = free_port()
    conf = host.state_dir / "agent.toml"
    conf.write_text(
        f'state_dir = "{host.state_dir}"\n'
        f'[tpm]\ntcti = "{host.tpm.tcti}"\nstate_dir = "{host.tpm.state_dir}"\n'
        f'[logging]\nformat = "json"\nlevel = "info"\n'
        f'[metrics]\nlisten = "127.0.0.1:{port}"\n'
    )
    log = host.state_dir / "daemon.log"
    cmd = [sys.executable, "-m", "host_agent.cli", "daemon", "--config", str(conf),
           "--runtime-dir", str(host.state_dir / "bridges")]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=out, env=env, cwd=REPO)
    try:
        deadline = time.monotonic() + 60
        text = ""
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                text = _scrape(port)
                break
            except OSError:
                time.sleep(0.2)
        assert "vtpm_attestations_total" in text, log.read_text()[-3000:]
        assert 'vtpm_vms{bridge="down"} 0' in text
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    lines = [line for line in log.read_text().splitlines() if line.strip()]
    docs = [json.loads(line) for line in lines]  # every line is one JSON object
    messages = [d["message"] for d in docs]
    assert any(m.startswith("daemon running") for m in messages), messages
    assert any(m.startswith("metrics endpoint on http://127.0.0.1:") for m in messages)
    assert all({"ts", "level", "logger", "message"} <= set(d) for d in docs)
    assert {d["level"] for d in docs} <= {"info", "warning", "error"}, "level info: no debug"


def test_daemon_command_line_overrides_the_file_and_bad_values_fail_clearly(
    host: AgentConfig,
) -> None:
    conf = host.state_dir / "agent.toml"
    conf.write_text('[logging]\nformat = "json"\n[metrics]\nlisten = "off"\n')
    cmd = [sys.executable, "-m", "host_agent.cli", "daemon", "--config", str(conf),
           "--state-dir", str(host.state_dir), "--metrics-listen", "10.1.2.3:9477"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env, cwd=REPO)
    assert proc.returncode == 2
    assert "error [config.invalid]" in proc.stderr
    assert "expected a loopback address" in proc.stderr and "'10.1.2.3:9477'" in proc.stderr
    assert not (host.state_dir / "run" / "control.sock").exists(), "nothing was started"


def test_relay_errors_reach_the_daemon_without_a_poll_even_when_the_bridge_exits_at_once(
    host: AgentConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The bridge pushes its counts (a ``report`` on the daemon link) when they change and as
    it stops: errors counted just before a bridge exits are not lost between two polls."""
    daemon = daemon_of(host).start()
    polls: list[int] = []
    monkeypatch.setattr(daemon, "poll_bridges", lambda: polls.append(1) or {})
    vm = VmBridge(host, "vm-push")
    q: QemuSide | None = None
    try:
        assert daemon.hooks is not None
        daemon.hooks.wait_for_bridge(vm.uuid, timeout=10)
        q = QemuSide(vm.bridge.config.listen)
        q.boot()
        q.ctrl.sendall(b"\0\0\0\x77")  # no such control command: a malformed request
        assert q.ctrl.recv(16) == b"\0\0\0\x0a"
        wait_for(lambda: daemon.relay_errors.counts() == {(vm.uuid, "qemu_malformed"): 1})

        q.ctrl.sendall(b"\0\0\0\x78")  # a second one, and the bridge stops right after it
        assert q.ctrl.recv(16) == b"\0\0\0\x0a"
        vm.bridge.close()
        assert vm.bridge.wait_closed(10)
        wait_for(lambda: vm.uuid not in daemon.hooks.bridges())  # type: ignore[union-attr]
        assert daemon.relay_errors.counts() == {(vm.uuid, "qemu_malformed"): 2}
        assert polls == [], "counted from the bridge's own reports, not from a status poll"
    finally:
        if q is not None:
            q.close()
        daemon.stop()
        vm.close()


def test_the_hooks_server_takes_a_report_only_for_the_reporting_bridges_own_vm(
    tmp_path: Path,
) -> None:
    from host_agent.vtpm.daemon_link import Hello, Report, encode_message
    from host_agent.vtpm.hooks_server import HooksServer

    taken: list[Report] = []
    server = HooksServer(tmp_path / "hooks.sock", on_report=taken.append).start()
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        client.connect(str(tmp_path / "hooks.sock"))
        client.sendall(
            encode_message(Report("vm-a", "i1", {"swtpm_io": 1}))  # before its hello: ignored
            + encode_message(Hello("vm-a", "a", os.getpid(), "/c", "/q"))
            + encode_message(Report("vm-b", "i1", {"swtpm_io": 5}))  # another VM's: ignored
            + encode_message(Report("vm-a", "i1", {"swtpm_io": 2}))
        )
        wait_for(lambda: len(taken) == 1)
        time.sleep(0.2)
        assert taken == [Report("vm-a", "i1", {"swtpm_io": 2})]
        assert "vm-a" in server.bridges()  # the link stays up
    finally:
        client.close()
        server.close()
