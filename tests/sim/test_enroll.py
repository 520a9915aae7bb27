"""Enrollment over HTTPS with the tenant's own client, then attestation, then every rejection.

Real parts: the host TPM (swtpm) through PytssHostTpm, the trusted store (SQLite), the hooks
server and a bridge per VM in front of its swtpm, the guest channel service, the enrollment
HTTPS server with a TLS certificate from the fleet CA, and ``verifier.commands.tenant`` (the
code behind ``vtpm-verify enroll`` / ``attest``) — only SSH and QEMU are left out (tests/vm).
"""

from __future__ import annotations

import base64
import dataclasses
import json
import secrets
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from evidence import tpm2_policy
from evidence.bundle import encode_bundle, parse_bundle
from evidence.errors import VtpmError
from evidence.tpm2 import TpmtSignature
from host_agent.service.enroll import (
    OWNER_NS,
    BootMarker,
    EnrollmentError,
    EnrollmentServer,
    PolicyFileOwners,
    boot_transition,
    enrollment_message,
    fingerprint,
    owners_from_domain_xml,
)
from tests.helpers.evidence_factory import NOW, Tenant
from tests.sim.test_attest_service import (
    FLEET,
    OTHER,
    TENANT,
    Host,
    attest,
    bundle_of,
    close_host,
    make_host,
)
from verifier.commands.tenant import (
    Enrollment,
    EnrollmentRefused,
    assess_bundle,
    enroll,
    load_enrollment,
    save_enrollment,
)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


LENIENT = {"allow_missing_eventlog": True, "allow_missing_ima": True}


def _tls_identity(root: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "host-attest.sim")]))
        .issuer_name(FLEET.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - timedelta(days=1))
        .not_valid_after(NOW + timedelta(days=3650))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("host-attest.sim")]), False)
        .sign(FLEET.key, hashes.SHA256())
    )
    certfile, keyfile = root / "tls.pem", root / "tls-key.pem"
    certfile.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    keyfile.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return certfile, keyfile


@pytest.fixture(scope="module")
def site() -> Iterator[tuple[Host, EnrollmentServer]]:
    root = Path(tempfile.mkdtemp(prefix="ve-", dir="/tmp"))
    host = make_host(root)
    server = EnrollmentServer(host.enroll, ("127.0.0.1", 0), *_tls_identity(root)).start()
    yield host, server
    server.stop()
    close_host(host)
    shutil.rmtree(root, ignore_errors=True)


def tenant_enroll(
    server: EnrollmentServer, vm_uuid: uuid.UUID, tenant: Tenant = TENANT
) -> Enrollment:
    return enroll(server.url, vm_uuid, tenant.cert_user, tenant.key, [FLEET.certificate], now=NOW)


def verdict_ids(host: Host, vm: Any, enrollment: Enrollment, **over: Any) -> tuple[str, ...]:
    nonce, answer = attest(host, vm)
    verdict, _ = assess_bundle(bundle_of(nonce, answer), nonce, enrollment, now=NOW, **LENIENT)
    return verdict.ids


# --------------------------------------------------------------------------------------------


def test_enroll_over_https_then_attest_is_trusted(
    site: tuple[Host, EnrollmentServer], tmp_path: Path
) -> None:
    host, server = site
    vm = host.add_vm()
    enrollment = tenant_enroll(server, vm.uuid)
    save_enrollment(tmp_path, enrollment)
    kept = load_enrollment(tmp_path, None)
    assert kept == enrollment
    nonce, answer = attest(host, vm)
    verdict, attested = assess_bundle(bundle_of(nonce, answer), nonce, kept, now=NOW, **LENIENT)
    assert verdict.trusted, verdict.ids
    assert attested is not None and attested.vm_uuid == vm.uuid


def test_reboot_untrusted_until_the_tenant_enrolls_again(
    site: tuple[Host, EnrollmentServer],
) -> None:
    host, server = site
    vm = host.add_vm()
    enrollment = tenant_enroll(server, vm.uuid)
    assert verdict_ids(host, vm, enrollment) == ()
    vm.reboot()
    _, answer = attest(host, vm)
    assert answer["error"]["id"] == "attest.reauth_required"
    again = tenant_enroll(server, vm.uuid)
    assert again.vaik_public == enrollment.vaik_public
    assert verdict_ids(host, vm, again) == ()


def test_restore_keeps_the_binding_and_a_reboot_after_it_does_not(
    site: tuple[Host, EnrollmentServer],
) -> None:
    host, server = site
    vm = host.add_vm()
    enrollment = tenant_enroll(server, vm.uuid)
    before = host.hooks.read_pcrs(str(vm.uuid))
    vm.save_and_restore()
    assert host.hooks.read_pcrs(str(vm.uuid)) == before
    assert verdict_ids(host, vm, enrollment) == ()  # restore -> trusted, no re-enrollment
    assert verdict_ids(host, vm, enrollment) == ()
    vm.reboot()
    _, answer = attest(host, vm)
    assert answer["error"]["id"] == "attest.reauth_required"


def test_replayed_bundle_is_rejected_as_a_nonce_mismatch(
    site: tuple[Host, EnrollmentServer],
) -> None:
    host, server = site
    vm = host.add_vm()
    enrollment = tenant_enroll(server, vm.uuid)
    old_nonce, answer = attest(host, vm)
    old = bundle_of(old_nonce, answer)
    fresh = secrets.token_bytes(32)
    verdict, _ = assess_bundle(old, fresh, enrollment, now=NOW, **LENIENT)
    assert verdict.ids == ("verify.nonce",) and not verdict.trusted


def test_another_tenants_evidence_is_rejected_as_cert_user(
    site: tuple[Host, EnrollmentServer],
) -> None:
    host, server = site
    vm = host.add_vm(owner=None)
    host.owners.table[vm.uuid] = frozenset(
        {fingerprint(TENANT.cert_user), fingerprint(OTHER.cert_user)}
    )
    mine = tenant_enroll(server, vm.uuid, TENANT)
    theirs = tenant_enroll(server, vm.uuid, OTHER)  # ownership moved: a new vAIK generation
    assert theirs.generation == mine.generation + 1 and theirs.vaik_public != mine.vaik_public
    nonce, answer = attest(host, vm)
    verdict, _ = assess_bundle(bundle_of(nonce, answer), nonce, mine, now=NOW, **LENIENT)
    assert verdict.ids == ("verify.cert_user",)


def test_a_clone_gets_no_vaik_and_its_evidence_is_rejected(
    site: tuple[Host, EnrollmentServer],
) -> None:
    host, server = site
    vm = host.add_vm()
    enrollment = tenant_enroll(server, vm.uuid)
    clone = host.add_vm()  # another UUID, same owner in the policy: it still has no binding
    _, answer = attest(host, clone)
    assert answer["ok"] is False and answer["error"]["id"] == "attest.not_enrolled"
    # the clone's owner enrolls it: its evidence is about another VM with another vAIK
    tenant_enroll(server, clone.uuid)
    nonce, answer = attest(host, clone)
    verdict, _ = assess_bundle(bundle_of(nonce, answer), nonce, enrollment, now=NOW, **LENIENT)
    assert verdict.ids == ("verify.vm_uuid",)


def test_forged_attestation_signature_is_rejected(site: tuple[Host, EnrollmentServer]) -> None:
    host, server = site
    vm = host.add_vm()
    enrollment = tenant_enroll(server, vm.uuid)
    nonce, answer = attest(host, vm)
    raw = parse_bundle(bundle_of(nonce, answer))
    forger = ec.generate_private_key(ec.SECP256R1())
    from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

    r, s = decode_dss_signature(forger.sign(raw.message_bytes, ec.ECDSA(hashes.SHA256())))
    forged = TpmtSignature.unmarshal(
        bytes.fromhex("0018000b0020")
        + r.to_bytes(32, "big")
        + bytes.fromhex("0020")
        + s.to_bytes(32, "big")
    )
    import dataclasses

    text = encode_bundle(dataclasses.replace(raw, message_signature=forged))
    verdict, _ = assess_bundle(text, nonce, enrollment, now=NOW, **LENIENT)
    assert verdict.ids == ("verify.signature.attestation",)


def test_every_store_change_of_a_binding_is_seen_by_the_next_attestation(
    site: tuple[Host, EnrollmentServer],
) -> None:
    """The decoded binding is kept by store version: a write of either record, by any code
    (here straight to the store, as the migration's commit and abort do), is seen at once."""
    host, server = site
    vm = host.add_vm()
    enrollment = tenant_enroll(server, vm.uuid)
    assert verdict_ids(host, vm, enrollment) == ()
    assert verdict_ids(host, vm, enrollment) == ()  # from the kept binding
    key = host.store.get("vaik", str(vm.uuid)).json()
    host.store.put("vaik", str(vm.uuid), {**key, "state": "moving", "migration_id": "m-1"})
    _, answer = attest(host, vm)
    assert answer["error"]["id"] == "attest.vaik_migrating"
    host.store.put("vaik", str(vm.uuid), key)  # aborted: the same record as before
    assert verdict_ids(host, vm, enrollment) == ()
    binding = host.store.get("binding", str(vm.uuid)).json()
    host.store.put("binding", str(vm.uuid), {**binding, "active": False})
    _, answer = attest(host, vm)
    assert answer["error"]["id"] == "attest.reauth_required"
    host.store.put("binding", str(vm.uuid), binding)
    assert verdict_ids(host, vm, enrollment) == ()
    host.store.put("binding", str(vm.uuid), {**binding, "cert_user": _b64(OTHER.cert_user)})
    _, answer = attest(host, vm)
    assert base64.b64decode(answer["evidence"]["cert_user"]) == OTHER.cert_user
    host.store.delete("binding", str(vm.uuid))
    _, answer = attest(host, vm)
    assert answer["error"]["id"] == "attest.not_enrolled"


def test_refusals_have_their_own_ids(site: tuple[Host, EnrollmentServer]) -> None:
    host, server = site
    vm = host.add_vm(owner=None)
    with pytest.raises(EnrollmentRefused, match=r"enroll\.not_owner"):
        tenant_enroll(server, vm.uuid)
    host.owners.table[vm.uuid] = frozenset({fingerprint(TENANT.cert_user)})
    nonce = secrets.token_bytes(32)
    challenge = host.enroll.challenge(vm.uuid)
    bad = OTHER.key.sign(enrollment_message(nonce, vm.uuid, challenge), ec.ECDSA(hashes.SHA256()))
    with pytest.raises(EnrollmentError) as info:
        host.enroll.enroll(vm.uuid, TENANT.cert_user, nonce, challenge, bad)
    assert info.value.error_id == "enroll.possession"
    good = TENANT.key.sign(enrollment_message(nonce, vm.uuid, challenge), ec.ECDSA(hashes.SHA256()))
    with pytest.raises(EnrollmentError) as info:  # the challenge was used up
        host.enroll.enroll(vm.uuid, TENANT.cert_user, nonce, challenge, good)
    assert info.value.error_id == "enroll.challenge"
    other_vm = host.add_vm()
    challenge = host.enroll.challenge(other_vm.uuid)
    sig = TENANT.key.sign(enrollment_message(nonce, vm.uuid, challenge), ec.ECDSA(hashes.SHA256()))
    with pytest.raises(EnrollmentError) as info:  # a challenge for another VM
        host.enroll.enroll(vm.uuid, TENANT.cert_user, nonce, challenge, sig)
    assert info.value.error_id == "enroll.challenge"


# --------------------------------------------------------------------------------------------
# owner policies and the boot rules (pure)


def test_owner_fingerprints_from_domain_metadata() -> None:
    fp = fingerprint(TENANT.cert_user)
    xml = f"""<domain type='kvm'><name>vm</name><metadata>
      <vtpm:owner xmlns:vtpm="{OWNER_NS}" fingerprint="{fp.upper().replace("SHA256", "sha256")}"/>
      <other:thing xmlns:other="urn:x" fingerprint="sha256:{"0" * 64}"/>
      <vtpm:owner xmlns:vtpm="{OWNER_NS}" fingerprint="md5:abc"/>
    </metadata></domain>"""
    assert owners_from_domain_xml(xml) == frozenset({fp})
    with pytest.raises(EnrollmentError):
        owners_from_domain_xml("<domain>")


def test_owner_policy_file(tmp_path: Path) -> None:
    import json

    vm = uuid.uuid4()
    path = tmp_path / "owners.json"
    path.write_text(
        json.dumps({"format": "vtpm-trust/owners/1", "vms": {str(vm): ["sha256:" + "a" * 64]}})
    )
    owners = PolicyFileOwners(path)
    assert owners.owners(vm) == frozenset({"sha256:" + "a" * 64})
    assert owners.owners(uuid.uuid4()) == frozenset()
    path.write_text("{}")
    with pytest.raises(EnrollmentError):
        PolicyFileOwners(path).owners(vm)


@pytest.mark.parametrize(
    ("then", "now", "expected"),
    [
        ((7, 1, 1, 0), (7, 1, 1, 0), "same"),
        ((7, 1, 1, 0), (7, 1, 2, 0), "reset"),  # guest reboot: another INIT, same QEMU
        ((7, 1, 1, 0), (7, 2, 2, 0), "reset"),  # cold boot in a new QEMU, same bridge
        ((7, 1, 1, 0), (7, 2, 2, 3), "restored"),  # a restore into a new QEMU
        ((7, 1, 1, 0), (7, 3, 3, 6), "reset"),  # several sessions: cannot tell
        ((7, 1, 1, 0), (9, 1, 1, 3), "restored"),  # a new bridge whose QEMU was restored
        ((7, 1, 1, 0), (9, 1, 1, 0), "reset"),  # a new bridge, cold boot
        ((7, 1, 1, 0), (9, 1, 2, 3), "reset"),  # restored, then rebooted
        ((7, 1, 1, 0), (7, 2, 1, 0, False), "starting"),  # an incoming QEMU, INIT not yet
        ((7, 1, 1, 0), (7, 2, 1, 2, False), "starting"),  # state pushed, INIT not yet
        ((7, 1, 1, 0), (9, 0, 0, 0, False), "starting"),  # a new bridge, no QEMU yet
    ],
)
def test_boot_transitions(then: tuple[Any, ...], now: tuple[Any, ...], expected: str) -> None:
    assert boot_transition(BootMarker(*then), BootMarker(*now)) == expected


# --------------------------------------------------------------------------------------------
# the tenant CLI's edges


def test_a_silent_client_does_not_block_enrollment(site: tuple[Host, EnrollmentServer]) -> None:
    import socket

    host, server = site
    silent = socket.create_connection(server.address)  # connects, never says a word
    try:
        vm = host.add_vm()
        assert tenant_enroll(server, vm.uuid).vm_uuid == vm.uuid
    finally:
        silent.close()


def test_ssh_targets_parse_strictly() -> None:
    from verifier.ssh import SshTarget, parse_target

    assert parse_target("root@10.0.0.5") == SshTarget("root", "10.0.0.5", 22)
    assert parse_target("me@host.example:2222") == SshTarget("me", "host.example", 2222)
    assert parse_target("me@[::1]:22") == SshTarget("me", "::1", 22)
    for bad in ("host", "me@", "me@host:0", "me@host:99999", "me@host:x"):
        with pytest.raises(ValueError):
            parse_target(bad)


def test_attest_without_an_enrollment_or_reachable_guest_is_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from verifier import cli

    key = tmp_path / "id"
    key.write_text("not a key")
    argv = ["attest", "--ssh", "root@127.0.0.1:9", "--identity", str(key)]
    assert cli.main([*argv, "--state-dir", str(tmp_path)]) == 2
    assert "enroll" in capsys.readouterr().err
    enrollment = Enrollment(
        vm_uuid=uuid.uuid4(),
        host="https://h",
        cert_user=TENANT.cert_user,
        fleet_ca=(FLEET.certificate.public_bytes(serialization.Encoding.DER),),
        vaik_public=b"",
        authkey_policies=frozenset({bytes(32)}),
        fleet_policy_key_name=b"\x00\x0b" + bytes(32),
    )
    save_enrollment(tmp_path, enrollment)
    assert cli.main([*argv, "--state-dir", str(tmp_path), "--host-key", "ssh-ed25519 AAAA"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "vtpm-verify: error" in err
    assert cli.main(["attest", "--ssh", "nonsense", "--identity", str(key),
                     "--state-dir", str(tmp_path)]) == 2  # fmt: skip


def test_policy_learn_refuses_a_bundle_that_does_not_verify(
    site: tuple[Host, EnrollmentServer], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from verifier import cli

    host, server = site
    vm = host.add_vm()
    save_enrollment(tmp_path, tenant_enroll(server, vm.uuid))
    nonce, answer = attest(host, vm)
    good = tmp_path / "good.json"
    good.write_text(bundle_of(nonce, answer))
    out = tmp_path / "refs.json"
    argv = ["policy", "learn", "--state-dir", str(tmp_path), "--allow-missing-eventlog",
            "--allow-missing-ima"]  # fmt: skip
    assert cli.main([*argv, str(good), "-o", str(out)]) == 0
    assert '"format":"vtpm-trust/reference-values/1"' in out.read_text().replace(" ", "")
    raw = parse_bundle(good.read_text())
    other = tmp_path / "other.json"
    other.write_text(encode_bundle(dataclasses.replace(raw, vm_uuid=uuid.uuid4())))
    assert cli.main([*argv, "--vm", str(vm.uuid), str(other)]) == 1
    assert "refusing to learn" in capsys.readouterr().err
    # --json: the refusal's findings, and nothing written over a policy file that exists.
    before = out.read_bytes()
    assert cli.main([*argv, "--json", "--vm", str(vm.uuid), str(other), "-o", str(out)]) == 1
    refused = json.loads(capsys.readouterr().out)
    assert refused["trusted"] is False and refused["findings"]
    assert out.read_bytes() == before
    # --json on success: the reference values in the document, and the same ones in the file.
    out.unlink()
    assert cli.main([*argv, "--json", str(good), "-o", str(out)]) == 0
    learnt = json.loads(capsys.readouterr().out)
    assert learnt["trusted"] is True and learnt["vm"] == str(vm.uuid)
    assert learnt["output"] == str(out)
    assert learnt["reference_values"] == json.loads(out.read_text())
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_enrollment_pins_the_fleet_policy_key_when_given(
    site: tuple[Host, EnrollmentServer],
) -> None:
    host, server = site
    vm = host.add_vm()
    ok = enroll(
        server.url, vm.uuid, TENANT.cert_user, TENANT.key, [FLEET.certificate], now=NOW,
        fleet_policy_key=FLEET.policy_key.public_key(),
    )  # fmt: skip
    assert ok.fleet_policy_key_name == tpm2_policy.fleet_key_name(FLEET.policy_key.public_key())
    other_fleet = ec.generate_private_key(ec.SECP256R1()).public_key()
    with pytest.raises(EnrollmentRefused, match="fleet policy key"):
        enroll(
            server.url, vm.uuid, TENANT.cert_user, TENANT.key, [FLEET.certificate], now=NOW,
            fleet_policy_key=other_fleet,
        )  # fmt: skip


def test_an_aik_certificate_from_another_ca_is_rejected(
    site: tuple[Host, EnrollmentServer],
) -> None:
    from tests.helpers.evidence_factory import make_fleet

    host, server = site
    vm = host.add_vm()
    enrollment = tenant_enroll(server, vm.uuid)
    nonce, answer = attest(host, vm)
    text = bundle_of(nonce, answer)
    rogue_fleet = make_fleet(0xBAD0, "some other fleet CA")
    # the tenant trusts only its fleet's CA: evidence from a host admitted elsewhere fails
    theirs = dataclasses.replace(
        enrollment,
        fleet_ca=(rogue_fleet.certificate.public_bytes(serialization.Encoding.DER),),
    )
    verdict, _ = assess_bundle(text, nonce, theirs, now=NOW, **LENIENT)
    assert verdict.ids == ("verify.chain.aik_issuer",)
    with pytest.raises(VtpmError):  # enrolling against it fails too (TLS, then the AIK chain)
        enroll(
            server.url, vm.uuid, TENANT.cert_user, TENANT.key, [rogue_fleet.certificate], now=NOW
        )
