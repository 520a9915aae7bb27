"""The daemon with a real swtpm as host TPM, the SQLite store, a real bridge and swtpm per VM.

No QEMU here (tests/vm/test_save_restore*.py boot guests): the bridge's QEMU side is idle, which
is enough to show start, status, the registry, restart behaviour and refusals.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from host_agent.config import AgentConfig, TpmConfig
from host_agent.errors import StateError
from host_agent.memory.dirty import TrackerSupport
from host_agent.service.daemon import ControlClient, Daemon, DaemonError, DaemonRunState
from host_agent.store import StoreRolledBack
from host_agent.store.provision import ensure_store, open_store
from host_agent.tpm.adapter import PytssHostTpm
from host_agent.vtpm.bridge import Bridge, BridgeConfig
from tests.helpers.qemu import SwtpmUnix, start_swtpm_unix
from tests.helpers.swtpm import Swtpm
from tests.sim.test_bridge import QemuSide

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def host(swtpm_factory: Callable[..., Swtpm]) -> Iterator[AgentConfig]:
    """An agent state dir (short: sockets live under it) with a store on a fresh swtpm."""
    tpm = swtpm_factory("host")
    state = Path(tempfile.mkdtemp(prefix="vdm-", dir="/tmp"))
    config = AgentConfig(state_dir=state, tpm=TpmConfig(tcti=tpm.tcti, state_dir=state / "tpm"))
    port = PytssHostTpm(tpm.tcti, config.tpm.state_dir, root="software", connection="per-call")
    try:
        ensure_store(port, config)
    finally:
        port.close()
    yield config
    shutil.rmtree(state, ignore_errors=True)


def daemon_of(config: AgentConfig, **kw: Any) -> Daemon:
    return Daemon(config, runtime_dir=config.state_dir / "bridges", reap=True, **kw)


class VmBridge:
    """A VM's swtpm and bridge without a QEMU (the bridge listens for one)."""

    def __init__(self, config: AgentConfig, name: str) -> None:
        self.uuid = str(uuid.uuid4())
        d = config.state_dir / "vms" / self.uuid
        d.mkdir(parents=True)
        self.swtpm: SwtpmUnix = start_swtpm_unix(d / "tpm", ctrl_path=d / "swtpm.sock")
        self.bridge = Bridge(
            BridgeConfig(
                vm_uuid=self.uuid,
                vm_name=name,
                listen=d / "ctrl.sock",
                swtpm_ctrl=d / "swtpm.sock",
                daemon_socket=config.state_dir / "run" / "daemon.sock",
                runtime_dir=config.state_dir / "bridges",
                reconnect_interval=0.05,
            )
        ).start()

    def close(self) -> None:
        self.bridge.close()
        self.swtpm.stop()


def wait_for(pred: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def test_daemon_serves_status_sees_bridges_and_stops_leaving_them_running(
    host: AgentConfig,
) -> None:
    daemon = daemon_of(host).start()
    vm = VmBridge(host, "vm-a")
    try:
        assert daemon.run_state is DaemonRunState.RUNNING
        client = ControlClient(daemon.paths.control_socket)
        wait_for(lambda: any(v["bridge_connected"] for v in client.call("status")["vms"]))
        status = client.call("status")
        assert status["run_state"] == "running" and status["pid"] == os.getpid()
        [entry] = status["vms"]
        assert entry["uuid"] == vm.uuid and entry["name"] == "vm-a"
        assert daemon.hooks is not None and vm.uuid in daemon.hooks.bridges()
        with pytest.raises(DaemonError, match="unknown control op"):
            client.call("no-such-op")
        with pytest.raises(StateError):
            daemon.start()

        daemon.stop()
        assert daemon.run_state is DaemonRunState.STOPPED
        assert not daemon.paths.control_socket.exists()
        assert vm.bridge.run_state.value == "listening", "the bridge outlives the daemon"
        assert vm.swtpm.running
        wait_for(lambda: not vm.bridge.status()["daemon_connected"])

        again = daemon_of(host).start()  # a restarted daemon finds the bridge again
        try:
            assert again.registry.get(vm.uuid) is not None, "from the bridge registry at start"
            assert again.hooks is not None
            again.hooks.wait_for_bridge(vm.uuid, timeout=5)
            again.sync()
            entry2 = again.registry.get(vm.uuid)
            assert entry2 is not None and entry2.bridge_connected
        finally:
            again.stop()
    finally:
        daemon.stop()
        vm.close()


def test_daemon_refuses_to_start_on_a_rolled_back_store(host: AgentConfig) -> None:
    db = host.state_dir / "store.sqlite"
    old = host.state_dir / "old.sqlite"
    shutil.copy2(db, old)
    daemon = daemon_of(host).start()
    assert daemon.store is not None
    daemon.store.put("seal", "x", b"newer")
    daemon.stop()
    shutil.copy2(old, db)
    refused = daemon_of(host)
    with pytest.raises(StoreRolledBack):
        refused.start()
    assert refused.run_state is DaemonRunState.FAILED
    assert not refused.paths.hooks_socket.exists() and not refused.paths.control_socket.exists()


class Recorder:
    def __init__(self, name: str, log: list[str], *, fail: bool = False) -> None:
        self.name, self.log, self.fail = name, log, fail

    def start(self, daemon: Daemon) -> None:
        assert daemon.store is not None and daemon.hooks is not None
        if self.fail:
            raise DaemonError(f"{self.name} cannot start")
        self.log.append(f"start {self.name}")

    def stop(self) -> None:
        self.log.append(f"stop {self.name}")


def test_components_start_in_order_stop_in_reverse_and_a_failure_undoes_the_start(
    host: AgentConfig,
) -> None:
    log: list[str] = []
    daemon = daemon_of(host, components=[Recorder("a", log), Recorder("b", log)]).start()
    assert ControlClient(daemon.paths.control_socket).call("status")["components"] == [
        "Recorder",
        "Recorder",
    ]
    daemon.stop()
    assert log == ["start a", "start b", "stop b", "stop a"]

    log.clear()
    bad = daemon_of(host, components=[Recorder("a", log), Recorder("c", log, fail=True)])
    with pytest.raises(DaemonError, match="c cannot start"):
        bad.start()
    assert log == ["start a", "stop a"] and bad.run_state is DaemonRunState.FAILED
    with open_store(host, PytssHostTpm(host.tpm.tcti or "", host.tpm.state_dir,
                                       connection="per-call")) as store:  # fmt: skip
        assert store.generation >= 1, "the writer lock was released"


def test_sigterm_stops_the_daemon_process_and_leaves_bridges_and_swtpms_running(
    host: AgentConfig,
) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "VTPM_TPM_TCTI": host.tpm.tcti or ""}
    log = host.state_dir / "daemon.log"
    cmd = [sys.executable, "-m", "host_agent.cli", "daemon", "--state-dir", str(host.state_dir),
           "--runtime-dir", str(host.state_dir / "bridges")]  # fmt: skip
    vm = VmBridge(host, "vm-b")
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    try:
        wait_for(lambda: vm.bridge.status()["daemon_connected"], timeout=20)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0, log.read_text()[-2000:]
        assert "bridges and swtpms left running" in log.read_text()
        assert vm.bridge.run_state.value == "listening" and vm.swtpm.running
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        vm.close()


def _running_vtpm(vm: VmBridge) -> QemuSide:
    """Attach a QEMU side to the VM's bridge and start its vTPM (the bridge's status then says
    "tpm": "running" with this process as QEMU)."""
    q = QemuSide(vm.bridge.config.listen)
    q.boot()
    return q


@pytest.mark.parametrize("available", [True, False])
def test_daemon_keeps_a_background_pass_over_running_vms_where_soft_dirty_works(
    host: AgentConfig, available: bool
) -> None:
    """Every save path gets the background pass, not only `vtpm-host vm save`: the daemon starts
    one for each VM whose vTPM runs, once per QEMU. Where soft-dirty is missing none starts
    (each save announces its full hash at the stop instead). This QEMU side is the test process,
    which has no guest-RAM memfd: the pass fails in its thread and the stop will hash in full
    saying why; what is shown here is that the daemon starts it, and only once."""
    support = TrackerSupport(available, "" if available else "forced off by the test")
    daemon = daemon_of(host, soft_dirty_probe=lambda: support).start()
    vm = VmBridge(host, "vm-bg")
    q: QemuSide | None = None
    try:
        assert daemon.hooks is not None and daemon.sealer is not None
        daemon.hooks.wait_for_bridge(vm.uuid, timeout=5)
        daemon.poll_bridges()
        assert daemon.sealer.tracking() == {}, "no pass before a QEMU runs the vTPM"
        q = _running_vtpm(vm)
        daemon.poll_bridges()
        expected = {vm.uuid: os.getpid()} if available else {}
        assert daemon.sealer.tracking() == expected
        if available:
            [entry] = daemon.sealer._tracking.values()
            daemon.poll_bridges()  # a second poll keeps the same pass
            assert daemon.sealer._tracking[vm.uuid] is entry
    finally:
        if q is not None:
            q.close()
        daemon.stop()
        vm.close()


def test_no_background_pass_when_the_daemon_is_told_not_to(host: AgentConfig) -> None:
    support = TrackerSupport(True, "")
    daemon = daemon_of(host, soft_dirty_probe=lambda: support, background_pass=False).start()
    vm = VmBridge(host, "vm-nobg")
    q: QemuSide | None = None
    try:
        assert daemon.hooks is not None and daemon.sealer is not None
        daemon.hooks.wait_for_bridge(vm.uuid, timeout=5)
        q = _running_vtpm(vm)
        daemon.poll_bridges()
        assert daemon.sealer.tracking() == {}
    finally:
        if q is not None:
            q.close()
        daemon.stop()
        vm.close()
