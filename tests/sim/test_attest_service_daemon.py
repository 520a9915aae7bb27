"""AttestService as a component of the real daemon: everything read from the daemon's state dir.

The daemon owns the host TPM (a swtpm), the store and the hooks server; AttestService takes its
identity, fleet policy key, approvals and owner policy from files, finds the VM's channel socket
in its adoption record, and serves enrollment over HTTPS and quotes on the channel.
"""

from __future__ import annotations

import base64
import json
import secrets
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from evidence.verify import VAIK_POLICY_REF
from guest_agent.quote import build_bundle
from host_agent.config import AgentConfig, TpmConfig
from host_agent.service.attest import AttestService
from host_agent.service.daemon import Daemon
from host_agent.service.enroll import fingerprint
from host_agent.service.metrics import MetricsComponent, MetricsConfig
from host_agent.store.provision import ensure_store
from host_agent.tpm.adapter import PytssHostTpm
from tests.helpers.evidence_factory import NOW
from tests.helpers.swtpm import Swtpm
from tests.sim.test_attest_service import FLEET, TENANT, GuestEnd, _aik_certificate
from tests.sim.test_bridge import QemuSide
from tests.sim.test_daemon import VmBridge, wait_for
from tests.sim.test_enroll import _tls_identity
from verifier.commands.tenant import assess_bundle, enroll


def prepare_attest_state(root: Path, tcti: str, listen: str = "127.0.0.1:0") -> AgentConfig:
    """An agent state dir with a store, host keys, identity and the attest files (no owners)."""
    config = AgentConfig(state_dir=root, tpm=TpmConfig(tcti=tcti, state_dir=root / "tpm"))
    port = PytssHostTpm(tcti, config.tpm.state_dir, root="software", connection="per-call")
    try:
        port.ensure_host_keys()
        ensure_store(port, config)
        ident = root / "identity"
        ident.mkdir(exist_ok=True)
        (ident / "aik.pem").write_bytes(_pem(_aik_certificate(port)))
        (ident / "ca.pem").write_bytes(FLEET.certificate_pem)
        certfile, keyfile = _tls_identity(root)
        certfile.rename(ident / "tls.pem")
        keyfile.rename(ident / "tls-key.pem")
        approval = FLEET.approve_platform_policy(port.approved_sign_policy(), VAIK_POLICY_REF)
    finally:
        port.close()
    (root / "attest").mkdir()
    (root / "attest" / "fleet-policy-key.pem").write_bytes(
        FLEET.policy_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    (root / "attest" / "settings.json").write_text(json.dumps({"listen": listen}))
    (root / "migration").mkdir()
    (root / "migration" / "policy-approvals.json").write_text(
        json.dumps(
            {
                "approvals": [
                    {
                        "approved_policy": approval.approved_policy.hex(),
                        "policy_ref": approval.policy_ref.hex(),
                        "signature": base64.b64encode(approval.signature).decode(),
                    }
                ]
            }
        )
    )
    return config


def write_owners(config: AgentConfig, owners: dict[str, list[str]]) -> None:
    (config.state_dir / "attest" / "owners.json").write_text(
        json.dumps({"format": "vtpm-trust/owners/1", "vms": owners})
    )


@pytest.fixture
def state(swtpm_factory: Callable[..., Swtpm]) -> Iterator[AgentConfig]:
    tpm = swtpm_factory("host")
    root = Path(tempfile.mkdtemp(prefix="vad-", dir="/tmp"))
    yield prepare_attest_state(root, tpm.tcti)
    shutil.rmtree(root, ignore_errors=True)


def _pem(der: bytes) -> bytes:
    from cryptography import x509

    return x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM)


def test_daemon_component_enrolls_and_attests(state: AgentConfig) -> None:
    vm = VmBridge(state, "vm-attest")
    vm_dir = state.state_dir / "vms" / vm.uuid
    guest = GuestEnd(vm_dir / "attest.sock")
    write_owners(state, {vm.uuid: [fingerprint(TENANT.cert_user)]})
    service = AttestService(sync_interval=0.1)
    metrics = MetricsComponent(config=MetricsConfig(port=0))  # no fixed port: tests run in parallel
    daemon = Daemon(
        state,
        runtime_dir=state.state_dir / "bridges",
        reap=False,
        components=[service, metrics],
        now=lambda: NOW,
    )
    daemon.start()
    # adopted after the daemon started: the component still finds its channel
    (vm_dir / "adoption.json").write_text(
        json.dumps({"uuid": vm.uuid, "name": "vm-attest", "channel_socket": str(guest.path)})
    )
    qemu = QemuSide(vm_dir / "ctrl.sock")
    try:
        qemu.boot()
        wait_for(lambda: vm.uuid in daemon.hooks.bridges())
        guest.accept()  # the component found the channel socket in the adoption record
        enrollment = enroll(
            service.server.url,
            uuid.UUID(vm.uuid),
            TENANT.cert_user,
            TENANT.key,
            [FLEET.certificate],
            now=NOW,
        )
        nonce = secrets.token_bytes(32)
        answer = guest.request(nonce)
        assert answer["ok"] is True, answer
        verdict, _ = assess_bundle(
            build_bundle(answer["evidence"], nonce, None, None),
            nonce,
            enrollment,
            now=NOW,
            allow_missing_eventlog=True,
            allow_missing_ima=True,
        )
        assert verdict.trusted, verdict.ids
        # the daemon's metrics count it (fed by the component, looked up per answer)
        assert 'vtpm_attestations_total{result="ok"} 1' in metrics.metrics.exposition()
    finally:
        qemu.close()
        guest.close()
        daemon.stop()
        vm.close()


def test_a_reboot_just_before_a_save_is_recorded_by_the_save(state: AgentConfig) -> None:
    from host_agent.vtpm import ctrl_codec as cc
    from tests.sim.test_bridge import STARTUP_CLEAR

    vm = VmBridge(state, "vm-save")
    vm_dir = state.state_dir / "vms" / vm.uuid
    guest = GuestEnd(vm_dir / "attest.sock")
    write_owners(state, {vm.uuid: [fingerprint(TENANT.cert_user)]})
    (vm_dir / "adoption.json").write_text(
        json.dumps({"uuid": vm.uuid, "name": "vm-save", "channel_socket": str(guest.path)})
    )
    # no boot poll during the test: only the save can notice the reboot
    service = AttestService(sync_interval=0.1, boot_poll_interval=3600)
    daemon = Daemon(
        state, runtime_dir=state.state_dir / "bridges", reap=False, components=[service],
        now=lambda: NOW,
    )  # fmt: skip
    daemon.start()
    qemu = QemuSide(vm_dir / "ctrl.sock")
    try:
        qemu.boot()
        wait_for(lambda: vm.uuid in daemon.hooks.bridges())
        guest.accept()
        enroll(service.server.url, uuid.UUID(vm.uuid), TENANT.cert_user, TENANT.key,
               [FLEET.certificate], now=NOW)  # fmt: skip
        assert guest.request(secrets.token_bytes(32))["ok"] is True
        # the guest reboots, and is saved before anything attests or polls
        assert qemu.request(cc.Stop()).result == 0
        assert qemu.request(cc.SetBufferSize(0xF80)).result == 0
        assert qemu.request(cc.Init(0)).result == 0
        qemu.tpm(STARTUP_CLEAR)
        qemu.request(cc.GetStateBlob(cc.BlobType.PERMANENT))  # sealed or vetoed: either way
        binding = daemon.store.find("binding", vm.uuid)
        assert binding is not None and binding.json()["active"] is False
        answer = guest.request(secrets.token_bytes(32))
        assert answer["ok"] is False and answer["error"]["id"] == "attest.reauth_required"
    finally:
        qemu.close()
        guest.close()
        daemon.stop()
        vm.close()


def test_a_missing_fleet_policy_key_stops_the_daemon_with_attest_config(
    state: AgentConfig,
) -> None:
    from host_agent.service.attest import AttestConfigError

    (state.state_dir / "attest" / "fleet-policy-key.pem").unlink()
    daemon = Daemon(
        state, runtime_dir=state.state_dir / "bridges", reap=False, components=[AttestService()]
    )
    with pytest.raises(AttestConfigError, match="fleet policy key") as info:
        daemon.start()
    assert info.value.id == "attest.config"
