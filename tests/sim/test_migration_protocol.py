"""Issue 8, protocol steps (1), (2), (5) between two real hosts, and the refusals of step (1).

Real: two software-root swtpms, two stores, identities issued by one registrar, mTLS on
loopback. The happy path runs each host as its own ``vtpm-host migration serve`` process and
drives it with ``vtpm-host vm migrate --json``; the refusals run both services in this process,
the target's TPM or identity wrapped so that it misbehaves in exactly one way (a fault-injecting
wrapper round the real adapter, never a fake TPM).
"""

from __future__ import annotations

import base64
import dataclasses
import json
import secrets
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from evidence.tpm2 import TpmtPublic, TpmtSignature, verify_signature
from evidence.tpm2_policy import pcr_composite_digest
from evidence.verify import VerifyOptions, authkey_policy_digests, verify_bundle
from host_agent.config import AgentConfig, with_state_dir
from host_agent.migration import (
    CertExgKeyNonce,
    ExgKeyAttributes,
    ExgKeyPolicy,
    PeerAborted,
    PeerUnavailable,
    SourceStep,
    TargetNotAdmitted,
    TargetRefused,
    TargetStep,
    VaikState,
    signing_allowed,
    vaik_state,
)
from host_agent.migration.channel import MtlsPeerChannel, TlsIdentity
from host_agent.migration.errors import PullNotHere
from host_agent.migration.host import MigrationHost, load_identity_certificates
from host_agent.migration.protocol import OutcomeQuery
from host_agent.migration.record import MigrationRecord, RecordRefused
from host_agent.migration.service import MigrationService, load_approvals
from host_agent.migration.target import pull_source
from host_agent.store.provision import open_store
from host_agent.tpm.discovery import open_host_tpm
from host_agent.tpm.port import Certification, KeyPolicy, WrappedKey
from tests.helpers.evidence_factory import assemble_bundle, tenant_certificate
from tests.sim.test_migration_hosts import (
    VM,
    Fleet,
    HostProcess,
    Hosts,
    fresh_hosts,
    inspect_host,
    session_fleet,
)


@pytest.fixture(scope="session")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Fleet:
    return session_fleet(tmp_path_factory)


@pytest.fixture
def hosts(fleet: Fleet, tmp_path: Path) -> Iterator[Hosts]:
    yield from fresh_hosts(fleet, tmp_path)


# ---------------------------------------------------------------- the happy path, two processes


def test_migrate_moves_the_vaik_and_the_target_signs_with_the_same_key(
    fleet: Fleet, hosts: Hosts
) -> None:
    a = HostProcess(hosts.a, hosts.approvals).start()
    b = HostProcess(hosts.b, hosts.approvals).start()
    try:
        done = a.migrate(VM, "host-b", b.address)
        assert done.returncode == 0, done.stderr + a.log_text()[-2000:]
        result = json.loads(done.stdout)
        assert result["outcome"] == "committed" and result["acknowledged"] is True
        assert result["target"] == "host-b" and result["vm_uuid"] == str(VM)
    finally:
        a.stop()
        b.stop()
    src, tgt = inspect_host(hosts.a), inspect_host(hosts.b)
    assert src.state is VaikState.ABSENT  # (5) the source deleted vAIK (and its binding)
    assert tgt.state is VaikState.ACTIVE
    assert [e.step for e in src.journal] == [SourceStep.DONE]
    assert [e.step for e in tgt.journal] == [TargetStep.ACTIVE]
    assert src.journal[0].data["exgkey_name"] == tgt.journal[0].data["exgkey_name"]

    # The target really holds the vAIK: its TPM signs with the same public key.
    config = with_state_dir(AgentConfig(), hosts.b)
    tpm = open_host_tpm(config.tpm)
    try:
        store = open_store(config, tpm, read_only=True)
        record = store.find("vaik", str(VM)).json()
        binding = store.find("binding", str(VM)).json()
        store.close()
        key = WrappedKey.from_bytes(bytes.fromhex(record["key"]))
        assert key.public == fleet.vaik_public and key.parent is not None
        assert key.parent.kind == "exgkey"
        assert binding["migrated_from"] == "host-a"
        message = b"vtpm-trust test message signed after migration"
        signature = tpm.sign(key, message, fleet.approval)
        attested = _attest(tpm, key, fleet, hosts.b)
    finally:
        tpm.close()
    verify_signature(message, TpmtSignature.unmarshal(signature), TpmtPublic.unmarshal(key.public))
    # A tenant's verifier trusts the attestation made on B: same vAIK, chain through B's AIK.
    assert attested.vm_uuid == VM
    assert attested.host.aik_certificate.subject.rfc4514_string() == "CN=host-b"
    # The source has nothing left to sign with.
    config_a = with_state_dir(AgentConfig(), hosts.a)
    tpm_a = open_host_tpm(config_a.tpm)
    try:
        store_a = open_store(config_a, tpm_a, read_only=True)
        assert store_a.find("vaik", str(VM)) is None
        assert store_a.find("binding", str(VM)) is None
        assert not signing_allowed(store_a, VM)
        store_a.close()
    finally:
        tpm_a.close()


def _attest(tpm: Any, vaik: WrappedKey, fleet: Fleet, state: Path) -> Any:
    """What the attestation service on ``state``'s host answers, verified as a tenant would
    (evidence.verify.verify_bundle; no VM here, so no measurement lists)."""
    tenant = ec.generate_private_key(ec.SECP256R1())
    cert_user = tenant_certificate(tenant, "tenant")
    nonce = secrets.token_bytes(32)
    aik_der = x509.load_pem_x509_certificate((state / "identity" / "aik.pem").read_bytes())
    ca_der = x509.load_pem_x509_certificate((state / "identity" / "ca.pem").read_bytes())

    def certify(obj: Any, signer: str) -> Callable[[bytes], tuple[bytes, bytes]]:
        def run(qd: bytes) -> tuple[bytes, bytes]:
            c = tpm.certify(obj, signer, qd)
            return c.attest, c.signature

        return run

    raw = assemble_bundle(
        vm_uuid=VM,
        nonce=nonce,
        cert_user=cert_user,
        vpcrs={i: bytes(32) for i in range(24)},
        aik_certificates=[aik_der.public_bytes(serialization.Encoding.DER)],
        authkey_public=tpm.host_key_public("authkey"),
        vaik_public=vaik.public,
        certify_authkey=certify("authkey", "aik"),
        certify_vaik=certify(vaik, "authkey"),
        sign=lambda m: tpm.sign(vaik, m, fleet.approval),
        event_log=None,
        ima_list=None,
    )
    assert vaik.policy.fleet_key_name is not None
    opts = VerifyOptions(
        nonce=nonce,
        now=datetime.now(UTC),
        fleet_ca_certs=[ca_der],
        cert_user=cert_user,
        vm_uuid=VM,
        authkey_policies=authkey_policy_digests(pcr_composite_digest([bytes(32)] * 9)),
        fleet_policy_key_name=vaik.policy.fleet_key_name,
        vaik_public=fleet.vaik_public,  # the vAIK the tenant enrolled on host A
        allow_missing_eventlog=True,
        allow_missing_ima=True,
    )
    return verify_bundle(raw, opts)


def test_a_second_migration_of_the_same_vm_is_refused_on_the_source(hosts: Hosts) -> None:
    a = HostProcess(hosts.a, hosts.approvals).start()
    b = HostProcess(hosts.b, hosts.approvals).start()
    try:
        assert a.migrate(VM, "host-b", b.address).returncode == 0
        again = a.migrate(VM, "host-b", b.address)
        assert again.returncode == 2
        assert "[migration.vaik.not_movable]" in again.stderr
        back = b.migrate(VM, "host-a", a.address)  # and it can move back
        assert back.returncode == 0, back.stderr + b.log_text()[-2000:]
    finally:
        a.stop()
        b.stop()
    assert inspect_host(hosts.a).state is VaikState.ACTIVE
    assert inspect_host(hosts.b).state is VaikState.ABSENT


# ---------------------------------------------------------------- refusals, in process


class _Tpm:
    """Delegates to the real adapter; tests override one method."""

    def __init__(self, real: Any) -> None:
        self._real = real

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


@dataclasses.dataclass
class Pair:
    source: MigrationService
    target: MigrationService
    hosts: Hosts

    def migrate(self) -> Any:
        host, port = self.target.address
        return self.source.migrate(VM, self.target.host.host_id, f"{host}:{port}")


def _host(state: Path, approvals: Path, tpm: Any, store: Any) -> MigrationHost:
    fleet_ca, aik = load_identity_certificates(state)
    identity = TlsIdentity.under(state)
    return MigrationHost(
        tpm=tpm,
        store=store,
        identity=identity,
        host_id=identity.host_id(),
        fleet_ca=fleet_ca,
        aik_certificate=aik,
        approvals=lambda: load_approvals(approvals),
        timeout=20,
    )


@pytest.fixture
def pair_factory(hosts: Hosts) -> Iterator[Callable[..., Pair]]:
    opened: list[Any] = []

    def make(
        *,
        target_tpm: Callable[[Any], Any] = lambda t: t,
        target_aik: bytes | None = None,
        approvals: Path | None = None,
        record_source: Any = None,
        record_check: Any = None,
    ) -> Pair:
        services = []
        for state, wrap, appr in (
            (hosts.a, lambda t: t, approvals or hosts.approvals),
            (hosts.b, target_tpm, hosts.approvals),
        ):
            config = with_state_dir(AgentConfig(), state)
            tpm = open_host_tpm(config.tpm)
            opened.append(tpm)
            store = open_store(config, tpm)
            opened.append(store)
            host = _host(state, appr, wrap(tpm), store)
            if state == hosts.b:
                host.record_check = record_check
                if target_aik is not None:
                    host.aik_certificate = target_aik
            else:
                host.record_source = record_source
            service = MigrationService(host, listen=("127.0.0.1", 0), resolve_interval=3600)
            opened.append(service)
            services.append(service.start())
        return Pair(services[0], services[1], hosts)

    yield make
    for thing in reversed(opened):
        if isinstance(thing, MigrationService):
            thing.stop()
    for thing in reversed(opened):
        if not isinstance(thing, MigrationService):
            thing.close()


def _nothing_left(pair: Pair) -> None:
    """The refusal came before any key left: the source never reached MOVING."""
    src_store, tgt_store = pair.source.host.store, pair.target.host.store
    assert signing_allowed(src_store, VM)
    [entry] = pair.source.host.j.entries()
    assert entry.step is SourceStep.ABORTED
    assert "exgkey_name" not in entry.data  # MOVING (and TPM2_Duplicate) never happened
    assert tgt_store.find("vaik", str(VM)) is None
    # The target's session learns of the refusal on its own thread: give it a moment.
    deadline = time.monotonic() + 10
    while [e.step for e in pair.target.host.j.entries()] == [TargetStep.EXGKEY]:
        assert time.monotonic() < deadline, "the target did not discard its ExgKey"
        time.sleep(0.05)
    assert [e.step for e in pair.target.host.j.entries()] in ([TargetStep.DISCARDED], [])


def _rogue_aik_certificate(state: Path) -> bytes:
    """The target's own AIK certificate, re-signed by a CA that is not the fleet's."""
    real = x509.load_pem_x509_certificate((state / "identity" / "aik.pem").read_bytes())
    rogue = ec.generate_private_key(ec.SECP256R1())
    builder = (
        x509.CertificateBuilder()
        .subject_name(real.subject)
        .issuer_name(real.issuer)  # claims the fleet CA's name
        .public_key(real.public_key())
        .serial_number(real.serial_number)
        .not_valid_before(real.not_valid_before_utc)
        .not_valid_after(real.not_valid_after_utc)
    )
    for ext in real.extensions:
        builder = builder.add_extension(ext.value, ext.critical)
    return builder.sign(rogue, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


def test_refused_a_target_whose_aik_certificate_is_not_from_the_fleet_ca(
    pair_factory: Callable[..., Pair], hosts: Hosts
) -> None:
    pair = pair_factory(target_aik=_rogue_aik_certificate(hosts.b))
    with pytest.raises(TargetNotAdmitted) as info:
        pair.migrate()
    assert info.value.id == "migration.target.not_admitted"
    assert "does not chain to the fleet CA" in str(info.value)
    _nothing_left(pair)


class _AikAsExgKey(_Tpm):
    """The target offers its AIK (a signing key) as the ExgKey; the TPM certifies it honestly."""

    def create_exgkey(self) -> WrappedKey:
        real = self._real.create_exgkey()
        aik = self._real._host_key("aik")
        return WrappedKey("exgkey", aik.public, aik.private, real.policy)


def test_refused_an_exgkey_with_wrong_attributes(pair_factory: Callable[..., Pair]) -> None:
    pair = pair_factory(target_tpm=_AikAsExgKey)
    with pytest.raises(ExgKeyAttributes) as info:
        pair.migrate()
    assert "SIGN_ENCRYPT" in str(info.value) and "DECRYPT" in str(info.value)
    _nothing_left(pair)


class _ClaimsAnotherState(_Tpm):
    """The ExgKey is genuine, but the target claims it is bound to another (approved?) state."""

    def create_exgkey(self) -> WrappedKey:
        real = self._real.create_exgkey()
        policy = dataclasses.replace(real.policy, pcr_digest=bytes(range(32)))
        return dataclasses.replace(real, policy=policy)


def test_refused_an_exgkey_whose_policy_is_not_the_claimed_host_state(
    pair_factory: Callable[..., Pair],
) -> None:
    pair = pair_factory(target_tpm=_ClaimsAnotherState)
    with pytest.raises(ExgKeyPolicy) as info:
        pair.migrate()
    assert "authPolicy is not PolicyPCR" in str(info.value)
    _nothing_left(pair)


def test_refused_an_exgkey_bound_to_a_host_state_the_fleet_did_not_approve(
    pair_factory: Callable[..., Pair], hosts: Hosts
) -> None:
    pair = pair_factory(approvals=hosts.no_approvals)
    with pytest.raises(ExgKeyPolicy) as info:
        pair.migrate()
    assert info.value.id == "migration.target.exgkey_policy"
    assert "not approved" in str(info.value)
    _nothing_left(pair)


class _OtherNonce(_Tpm):
    """CertExgKey made over another nonce (e.g. replayed from an earlier migration)."""

    def certify(self, obj: Any, signer: Any, qualifying_data: bytes) -> Certification:
        return self._real.certify(obj, signer, bytes(32))


def test_refused_a_certexgkey_over_another_nonce(pair_factory: Callable[..., Pair]) -> None:
    pair = pair_factory(target_tpm=_OtherNonce)
    with pytest.raises(CertExgKeyNonce) as info:
        pair.migrate()
    assert isinstance(info.value, TargetRefused)
    assert "another nonce" in str(info.value) and "0" * 64 in str(info.value)
    _nothing_left(pair)


def test_in_process_pair_migrates(pair_factory: Callable[..., Pair]) -> None:
    pair = pair_factory()
    result = pair.migrate()
    assert result.outcome == "committed" and result.acknowledged
    assert pair.source.host.store.find("vaik", str(VM)) is None
    assert signing_allowed(pair.target.host.store, VM)
    assert KeyPolicy  # the imported key keeps the vAIK's policy (checked in the process test)
    assert uuid.UUID(str(result.migration_id))


# ---------------------------------------------------------------- steps (3)/(4): the signed record

ROOT = bytes.fromhex("aa" * 32)


def _record(mid: uuid.UUID, vm: uuid.UUID) -> MigrationRecord:
    return MigrationRecord(
        mid, vm, ROOT, {0: bytes(32), 10: b"\x0a" * 32}, {"permanent": b"p" * 32}
    )


def test_the_target_checks_the_vaik_signed_record_before_the_commit(
    pair_factory: Callable[..., Pair],
) -> None:
    seen: list[MigrationRecord] = []
    pair = pair_factory(record_source=_record, record_check=seen.append)
    result = pair.migrate()
    assert result.acknowledged
    [record] = seen  # signature checked with the imported vAIK's public key first
    assert (record.memory_root, record.vm_uuid) == (ROOT, VM)
    assert signing_allowed(pair.target.host.store, VM)


def test_state_changed_in_flight_the_target_refuses_and_the_source_keeps_the_vaik(
    pair_factory: Callable[..., Pair],
) -> None:
    """Test hook: the target's loaded memory differs from the root the source signed."""

    def loaded_memory_differs(record: MigrationRecord) -> None:
        loaded = dataclasses.replace(record, memory_root=bytes(32), vpcrs={0: bytes(32)})
        raise RecordRefused("loaded VM differs: " + ", ".join(record.differences(loaded)))

    pair = pair_factory(record_source=_record, record_check=loaded_memory_differs)
    with pytest.raises(RecordRefused) as info:
        pair.migrate()
    assert "memory root" in str(info.value) and "vPCR 10" in str(info.value)
    assert signing_allowed(pair.source.host.store, VM)  # the source keeps it, vAIK included
    [entry] = pair.source.host.j.entries()
    assert entry.step is SourceStep.ABORTED and "exgkey_name" in entry.data  # after the move
    deadline = time.monotonic() + 10
    while pair.target.host.store.find("vaik", str(VM)) is not None:
        assert time.monotonic() < deadline, "the target kept its pending copy"
        time.sleep(0.05)
    assert [e.step for e in pair.target.host.j.entries()] == [TargetStep.DISCARDED]


def test_a_record_not_signed_by_the_vaik_is_refused(pair_factory: Callable[..., Pair]) -> None:
    class _ForgedSignature(_Tpm):
        def sign(self, key: WrappedKey, message: bytes, approval: Any) -> bytes:
            return self._real.sign(key, message.replace(b"aa", b"bb", 1), approval)

    pair = pair_factory(record_source=_record)
    pair.source.host.tpm = _ForgedSignature(pair.source.host.tpm)
    with pytest.raises(RecordRefused, match="not signed by the VM's vAIK"):
        pair.migrate()
    assert signing_allowed(pair.source.host.store, VM)


def test_the_target_refuses_a_key_that_is_not_the_vaik_its_blob_claims(
    pair_factory: Callable[..., Pair],
) -> None:
    class _OtherPolicyRef(_Tpm):
        def duplicate(self, key: WrappedKey, new_parent_public: bytes) -> Any:
            blob = self._real.duplicate(key, new_parent_public)
            policy = dataclasses.replace(blob.policy, policy_ref=b"another/ref")
            return dataclasses.replace(blob, policy=policy)

    pair = pair_factory()
    pair.source.host.tpm = _OtherPolicyRef(pair.source.host.tpm)
    with pytest.raises(PeerAborted) as info:
        pair.migrate()
    assert info.value.remote_id == "migration.vaik.refused"
    assert "is not the vAIK policy" in str(info.value)
    assert signing_allowed(pair.source.host.store, VM)
    assert pair.target.host.store.find("vaik", str(VM)) is None


# ---------------------------------------------------------------- the mTLS channel


def test_the_channel_trusts_only_the_fleet_ca_and_checks_the_peer_host_id(
    pair_factory: Callable[..., Pair], tmp_path: Path
) -> None:
    pair = pair_factory()
    address = pair.target.address
    # The right host id over the fleet's mTLS works …
    pair.source.connect("host-b", f"{address[0]}:{address[1]}").close()
    # … another host id at that address is refused by the client …
    with pytest.raises(PeerUnavailable, match="is 'host-b', not 'host-c'"):
        pair.source.connect("host-c", f"{address[0]}:{address[1]}")
    # … and a client whose certificate is not from the fleet CA never gets a channel.
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "host-a")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(7)
        .not_valid_before(datetime.now(UTC) - timedelta(days=1))
        .not_valid_after(datetime.now(UTC) + timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    rogue = tmp_path / "rogue"
    rogue.mkdir()
    (rogue / "tls.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (rogue / "tls-key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    identity = TlsIdentity(
        rogue / "tls.pem", rogue / "tls-key.pem", pair.hosts.a / "identity" / "ca.pem"
    )
    with pytest.raises(PeerUnavailable):
        channel = MtlsPeerChannel.connect(identity, address, "host-b", timeout=10)
        channel.send(OutcomeQuery(uuid.uuid4()))  # TLS 1.3: the server's refusal shows here
        channel.receive(10)


# ---------------------------------------------------------------- the target's pull (plain virsh)


def test_a_pull_asks_all_peers_at_once_so_a_hung_peer_does_not_hold_up_the_answer(
    pair_factory: Callable[..., Pair],
) -> None:
    """A peer that accepts TCP and never speaks (down behind a firewall that drops, or hung)
    must not delay the answer of the peer that holds the VM: libvirt's hook waits on the pull.
    Here that answer is the source's refusal (this in-process source has no daemon to move a
    running VM); with a bound of an hour per peer, only asking both at once answers in time."""
    pair = pair_factory()
    pair.target.host.timeout = 3600
    hung = socket.create_server(("127.0.0.1", 0))
    a_host, a_port = pair.source.address
    peers = {"host-hung": f"127.0.0.1:{hung.getsockname()[1]}", "host-a": f"{a_host}:{a_port}"}
    outcome: list[BaseException | tuple[object, ...]] = []

    def pull() -> None:
        try:
            outcome.append(pull_source(pair.target.host, peers, VM, pair.target.connect))
        except BaseException as err:
            outcome.append(err)

    worker = threading.Thread(target=pull, daemon=True)
    try:
        worker.start()
        worker.join(60)
        assert not worker.is_alive(), "the pull waited for the peer that never answers"
        [err] = outcome
        assert isinstance(err, PeerAborted) and err.remote_id != PullNotHere.id, err
        assert "without the daemon's bridge hooks" in str(err)
    finally:
        hung.close()


def test_a_pull_nobody_answers_names_each_peer_and_why(
    pair_factory: Callable[..., Pair],
) -> None:
    pair = pair_factory()
    closed = socket.create_server(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there any more: connection refused
    peers = {"host-gone": f"127.0.0.1:{port}", "host-c": "127.0.0.1:1"}
    with pytest.raises(PullNotHere) as caught:
        pull_source(pair.target.host, peers, VM, pair.target.connect)
    message = str(caught.value)
    assert f"host-gone (127.0.0.1:{port}): unreachable" in message
    assert "host-c (127.0.0.1:1): unreachable" in message


# ---------------------------------------------------------------- several VMs at once


def _give_vaik(pair: Pair, vm: uuid.UUID) -> None:
    """Host A gets a vAIK and binding for ``vm``, as enrollment writes them."""
    doc = json.loads(pair.hosts.approvals.read_text())
    fleet_key = base64.b64decode(doc["policy_key"]["spki_der"])
    host = pair.source.host
    vaik = host.tpm.create_vaik(fleet_key)
    with host.store.transaction() as tx:
        tx.put("vaik", str(vm), {"generation": 1, "key": vaik.to_bytes().hex()})
        tx.put("binding", str(vm), {
            "vm_uuid": str(vm), "generation": 1, "cert_user": "", "active": True,
            "fingerprint": "sha256:" + "0" * 64, "vaik_name": vaik.name.hex(),
            "boot": {"bridge_pid": 1, "sessions": 1, "inits": 1, "set_stateblobs": 0},
            "enrolled_at": "2026-01-01T00:00:00+00:00",
        })  # fmt: skip


def test_several_vms_move_to_the_same_target_at_once(pair_factory: Callable[..., Pair]) -> None:
    """An operator evacuating a host moves its VMs in parallel: four key moves A → B at once,
    sharing both hosts' TPMs, stores and journals, each commit on its own; afterwards every
    vAIK is on B only and signs there, and both journals hold one finished entry per VM."""
    pair = pair_factory()
    vms = [VM, *(uuid.uuid4() for _ in range(3))]
    for vm in vms[1:]:
        _give_vaik(pair, vm)
    host, port = pair.target.address
    results: dict[uuid.UUID, Any] = {}

    def move(vm: uuid.UUID) -> None:
        try:
            results[vm] = pair.source.migrate(vm, pair.target.host.host_id, f"{host}:{port}")
        except BaseException as err:
            results[vm] = err

    threads = [threading.Thread(target=move, args=(vm,)) for vm in vms]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not any(t.is_alive() for t in threads), "a migration did not finish"
    for vm in vms:
        result = results[vm]
        assert not isinstance(result, BaseException), f"{vm}: {result!r}"
        assert result.outcome == "committed" and result.acknowledged, (vm, result)
        assert vaik_state(pair.source.host.store, vm) is VaikState.ABSENT
        assert signing_allowed(pair.target.host.store, vm)
    source_steps = {e.vm_uuid: e.step for e in pair.source.host.j.entries()}
    target_steps = {e.vm_uuid: e.step for e in pair.target.host.j.entries()}
    assert source_steps == {vm: SourceStep.DONE for vm in vms}
    assert target_steps == {vm: TargetStep.ACTIVE for vm in vms}
