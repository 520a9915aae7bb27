"""Discovery, the software root, ``vtpm-host init`` and ``vtpm-host tpm info`` on real swtpms."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from host_agent.cli import main
from host_agent.config import AgentConfig, TpmConfig
from host_agent.tpm.discovery import SOFTWARE_ROOT_WARNING, discover, find_tpmrm_devices
from host_agent.tpm.errors import TpmNotFound
from host_agent.tpm.port import HostKeyReport, HostTpm
from host_agent.tpm.provision import init_host
from host_agent.tpm.software_root import SoftwareRoot
from tests.fakes.udev import FakeDevice, FakeUdevContext
from tests.helpers.swtpm import Swtpm

NO_TPM = FakeUdevContext([FakeDevice("tpm", "/dev/tpm0")])  # a tpm but no tpmrm node


def _config(state: Path, tcti: str | None = None) -> AgentConfig:
    return AgentConfig(state_dir=state, tpm=TpmConfig(tcti=tcti, state_dir=state / "tpm"))


def _swtpm_pids(state: Path) -> list[str]:
    out = subprocess.run(["pgrep", "-f", f"swtpm socket.*{state}"], capture_output=True, text=True)
    return out.stdout.split()


# ---------------------------------------------------------------- discovery


def test_find_tpmrm_devices_uses_the_tpmrm_subsystem() -> None:
    udev = FakeUdevContext(
        [
            FakeDevice("tpm", "/dev/tpm0"),
            FakeDevice("tpmrm", "/dev/tpmrm1"),
            FakeDevice("tpmrm", "/dev/tpmrm0"),
            FakeDevice("tpmrm", None),
        ]
    )
    assert find_tpmrm_devices(udev) == ["/dev/tpmrm0", "/dev/tpmrm1"]
    assert udev.queries == [{"subsystem": "tpmrm"}]


def test_discovery_order(tmp_path: Path) -> None:
    with_rm = FakeUdevContext([FakeDevice("tpmrm", "/dev/tpmrm0")])
    configured = discover(TpmConfig(tcti="device:/dev/tpmrm7"), udev=with_rm)
    assert (configured.tcti, configured.root, configured.source) == (
        "device:/dev/tpmrm7",
        "hardware",
        "config",
    )
    assert discover(TpmConfig(tcti="swtpm:port=1"), udev=with_rm).root == "software"
    found = discover(TpmConfig(), udev=with_rm)
    assert (found.tcti, found.root, found.source) == ("device:/dev/tpmrm0", "hardware", "udev")
    fallback = discover(TpmConfig(), udev=NO_TPM)
    assert (fallback.tcti, fallback.root, fallback.source) == (None, "software", "software-root")
    with pytest.raises(TpmNotFound, match="allow_software_root"):
        discover(TpmConfig(allow_software_root=False), udev=NO_TPM)


def test_real_udev_query_runs() -> None:
    import pyudev

    assert all(n.startswith("/dev/tpmrm") for n in find_tpmrm_devices(pyudev.Context()))


# ---------------------------------------------------------------- init


def test_init_creates_software_root_then_is_idempotent(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = _config(tmp_path / "state")
    with caplog.at_level(logging.WARNING):
        first = init_host(config, udev=NO_TPM)
    assert SOFTWARE_ROOT_WARNING in caplog.text
    assert first.root == "software"
    assert first.keys.created == ("srk", "aik", "authkey")
    assert first.platform_state_approved
    assert (tmp_path / "state/tpm/swtpm/tpm2-00.permall").exists()
    assert _swtpm_pids(tmp_path / "state") == []  # started and stopped again
    second = init_host(config, udev=NO_TPM)
    assert not second.changed
    assert (second.keys.aik_name, second.keys.authkey_name) == (
        first.keys.aik_name,
        first.keys.authkey_name,
    )


def test_init_runs_extra_steps_after_the_keys(swtpm: Swtpm, tmp_path: Path) -> None:
    seen: list[bytes] = []

    def register(tpm: HostTpm, config: AgentConfig, keys: HostKeyReport) -> str | None:
        assert tpm.aik_name() == keys.aik_name
        if seen:
            return None
        seen.append(keys.aik_name)
        return "registered"

    config = _config(tmp_path, swtpm.tcti)
    assert init_host(config, steps=[register]).steps == ("registered",)
    again = init_host(config, steps=[register])
    assert again.steps == () and not again.changed


def test_cli_init_and_info_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = tmp_path / "s"
    env = dict(os.environ)
    cmd = [sys.executable, "-m", "host_agent.cli"]
    # A subprocess: udev is real here (no tpmrm on CI), so this takes the software-root path.
    first = subprocess.run(
        [*cmd, "init", "--state-dir", str(state)], env=env, capture_output=True, text=True
    )
    assert first.returncode == 0, first.stderr
    assert "created aik" in first.stdout and "DEVELOPMENT ONLY" in first.stderr
    second = subprocess.run(
        [*cmd, "init", "--state-dir", str(state)], env=env, capture_output=True, text=True
    )
    assert second.returncode == 0 and "nothing to do" in second.stdout

    def names(out: str) -> list[str]:
        return [line for line in out.splitlines() if line.startswith(("aik_name", "authkey"))]

    assert names(first.stdout) == names(second.stdout)
    assert main(["tpm", "info", "--json", "--state-dir", str(state)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["root"] == "software"
    assert info["tcti"].startswith("swtpm:path=")
    assert {c["nv_index"] for c in info["ek_certificates"]} == {"0x01c00002", "0x01c00016"}
    assert all(c["issuer"] == "CN=swtpm-localca" for c in info["ek_certificates"])
    assert f"aik_name {info['aik_name']}" in first.stdout
    assert len(bytes.fromhex(info["authkey_policy"])) == 32
    assert sorted(info["pcrs"]["sha256"], key=int) == [str(i) for i in range(9)]
    assert info["platform_state_approved"] is True
    assert _swtpm_pids(state) == []


def test_cli_help_explains_without_config(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["init", "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert ("software root" in out and "idempotent" not in out.lower()) or "nothing to do" in out


def test_info_before_init_reports_missing_keys(swtpm: Swtpm, tmp_path: Path) -> None:
    from host_agent.tpm.provision import tpm_info

    info = tpm_info(_config(tmp_path, swtpm.tcti))
    assert info["aik_name"] is None and info["root"] == "software"


# ---------------------------------------------------------------- software root


def test_software_root_attaches_to_a_running_instance(tmp_path: Path) -> None:
    first = SoftwareRoot(tmp_path / "swtpm")
    first.start()
    try:
        second = SoftwareRoot(tmp_path / "swtpm")
        second.start()
        assert second.state.value == "attached"
        second.stop()
        pids = _swtpm_pids(tmp_path)
        assert len(pids) == 1, f"{pids} {[Path(f'/proc/{p}/cmdline').read_bytes() for p in pids]}"
    finally:
        first.stop()
    pids = _swtpm_pids(tmp_path)
    assert pids == [], f"{pids} {[Path(f'/proc/{p}/cmdline').read_bytes() for p in pids]}"


def test_init_after_a_platform_change_says_authkey_is_unusable(
    swtpm_factory: Callable[..., Swtpm], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.sim.test_host_tpm import _extend

    sw = swtpm_factory("changed-platform", provision_ek=True)  # init also registers it
    argv = ["init", "--tcti", sw.tcti, "--state-dir", str(tmp_path)]
    assert main(argv) == 0
    _extend(sw, 0)
    assert main(argv) == 1
    captured = capsys.readouterr()
    assert "nothing to do" in captured.out
    assert "AuthKey is unusable" in captured.err
    assert main(["tpm", "info", "--json", "--tcti", sw.tcti, "--state-dir", str(tmp_path)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["platform_state_approved"] is False
    assert main([*argv, "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["changed"] is False and report["created"] == [] and report["steps"] == []
    assert report["platform_state_approved"] is False
    assert report["aik_name"] == info["aik_name"] and report["root"] == info["root"]
