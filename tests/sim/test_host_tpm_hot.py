"""The attestation hot path of the host TPM port on real swtpms: ``attest()`` in one call, keys
kept loaded (context-saved when slots run out), the fleet approval's ticket cached, the shared
connection of the software root (a lease other agent processes can take), reconnection."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from evidence import tpm2
from evidence.tpm2_policy import PolicyApproval, name_of_public
from host_agent.tpm import AUTHKEY_PCRS, PlatformStateNotApproved, PolicyNotApproved, WrappedKey
from host_agent.tpm.adapter import PytssHostTpm
from host_agent.tpm.software_root import SoftwareRoot
from tests.helpers.swtpm import Swtpm
from tests.sim.test_host_tpm import _extend
from tests.sim.test_host_tpm_keys import FLEET_DER, approve

QD = b"q" * 32
MESSAGE = b"VTPMVPCR" + bytes(800)


def _verify(public: bytes, message: bytes, signature: bytes) -> None:
    sig, key = tpm2.TpmtSignature.unmarshal(signature), tpm2.TpmtPublic.unmarshal(public)
    if message[:4] == b"\xffTCG":
        tpm2.verify_attest_signature(message, sig, key)
    else:
        tpm2.verify_signature(message, sig, key)


def _certified_name(attest: bytes) -> bytes:
    info = tpm2.TpmsAttest.unmarshal(attest).attested
    assert isinstance(info, tpm2.TpmsCertifyInfo)
    return info.name


@pytest.fixture
def hot(swtpm_factory: Callable[..., Swtpm], tmp_path: Path) -> Iterator[PytssHostTpm]:
    tpm = PytssHostTpm(swtpm_factory("hot").tcti, tmp_path / "keys")
    tpm.ensure_host_keys()
    yield tpm
    tpm.close()


def _approval(tpm: PytssHostTpm, vaik: WrappedKey) -> PolicyApproval:
    return approve(tpm.approved_sign_policy(), vaik.policy.policy_ref)


def test_attest_certifies_both_keys_and_signs_in_one_call(hot: PytssHostTpm) -> None:
    vaik = hot.create_vaik(FLEET_DER)
    done = hot.attest(vaik, QD, MESSAGE, _approval(hot, vaik))
    aik, authkey = hot.host_key_public("aik"), hot.host_key_public("authkey")
    _verify(aik, done.cert_authkey.attest, done.cert_authkey.signature)
    _verify(authkey, done.cert_vaik.attest, done.cert_vaik.signature)
    _verify(vaik.public, MESSAGE, done.signature)
    assert done.message == MESSAGE
    for cert, key in ((done.cert_authkey, authkey), (done.cert_vaik, vaik.public)):
        info = tpm2.TpmsAttest.unmarshal(cert.attest)
        assert info.extra_data == QD
        assert _certified_name(cert.attest) == name_of_public(key)


def test_attest_signs_a_message_that_arrives_after_the_certifications(hot: PytssHostTpm) -> None:
    vaik = hot.create_vaik(FLEET_DER)
    approval = _approval(hot, vaik)
    late: Future[bytes] = Future()
    threading.Timer(0.2, lambda: late.set_result(MESSAGE)).start()
    done = hot.attest(vaik, QD, late, approval, message_timeout=5)
    _verify(vaik.public, MESSAGE, done.signature)
    ready: Future[bytes] = Future()
    ready.set_result(b"already there")
    assert hot.attest(vaik, QD, ready, approval).message == b"already there"


def test_attest_signs_nothing_when_the_message_fails_or_is_forged(hot: PytssHostTpm) -> None:
    vaik = hot.create_vaik(FLEET_DER)
    approval = _approval(hot, vaik)
    failed: Future[bytes] = Future()
    failed.set_exception(LookupError("the bridge is gone"))
    with pytest.raises(LookupError, match="bridge is gone"):
        hot.attest(vaik, QD, failed, approval)
    forged: Future[bytes] = Future()
    forged.set_result(b"\xffTCG\x80\x18 a quote")
    with pytest.raises(ValueError, match="TPM_GENERATED_VALUE"):
        hot.attest(vaik, QD, forged, approval)
    for _ in range(5):  # each waited with a prepared session: none of them is left behind
        never: Future[bytes] = Future()
        with pytest.raises(TimeoutError):
            hot.attest(vaik, QD, never, approval, message_timeout=0.05)
    _verify(vaik.public, MESSAGE, hot.attest(vaik, QD, MESSAGE, approval).signature)
    with pytest.raises(ValueError, match="needs a vAIK"):
        hot.attest(hot.create_exgkey(), QD, MESSAGE, approval)  # type: ignore[arg-type]


def test_ten_vaiks_in_turn_are_unwrapped_once_and_then_context_loaded(
    hot: PytssHostTpm,
) -> None:
    vaiks = [hot.create_vaik(FLEET_DER) for _ in range(10)]
    approval = _approval(hot, vaiks[0])
    before = hot.stats()
    for _ in range(3):
        for vaik in vaiks:
            _verify(vaik.public, MESSAGE, hot.attest(vaik, QD, MESSAGE, approval).signature)
    after = hot.stats()
    # AIK + AuthKey + 10 vAIKs: each TPM2_Load'ed once, after that only TPM2_ContextLoad
    assert after["loads"] - before["loads"] <= 12
    assert after["context_loads"] - before["context_loads"] >= 20


def test_a_cached_approval_ticket_does_not_outlive_the_platform_state(
    swtpm_factory: Callable[..., Swtpm], tmp_path: Path
) -> None:
    sw = swtpm_factory("ticket")
    with PytssHostTpm(sw.tcti, tmp_path) as tpm:
        tpm.ensure_host_keys()
        vaik = tpm.create_vaik(FLEET_DER)
        approval = _approval(tpm, vaik)
        for _ in range(2):  # the second one uses the cached ticket and the kept session
            _verify(vaik.public, b"m", tpm.sign(vaik, b"m", approval))
        _extend(sw, 4)
        with pytest.raises(PlatformStateNotApproved) as err:
            tpm.attest(vaik, QD, MESSAGE, approval)
        assert err.value.key == "AuthKey"  # CertvAIK's signer refuses first
        with pytest.raises(PlatformStateNotApproved) as err:
            tpm.sign(vaik, b"m", approval)
        assert err.value.key == "vAIK"
        assert list(err.value.pcrs) == list(AUTHKEY_PCRS)
        rogue = ec.derive_private_key(0xBAD, ec.SECP256R1())
        forged = approve(approval.approved_policy, approval.policy_ref, rogue)
        with pytest.raises(PolicyNotApproved, match="does not verify"):
            tpm.sign(vaik, b"m", forged)  # a ticket cached for another approval is not reused


def test_close_leaves_nothing_loaded_in_the_tpm(
    swtpm_factory: Callable[..., Swtpm], tmp_path: Path
) -> None:
    from tpm2_pytss import ESAPI
    from tpm2_pytss.constants import TPM2_CAP, TPM2_HC

    sw = swtpm_factory("clean")
    with PytssHostTpm(sw.tcti, tmp_path) as tpm:
        tpm.ensure_host_keys()
        vaik = tpm.create_vaik(FLEET_DER)
        tpm.attest(vaik, QD, MESSAGE, _approval(tpm, vaik))
    esys = ESAPI(sw.tcti)
    try:
        left = []
        for first in (TPM2_HC.TRANSIENT_FIRST, TPM2_HC.LOADED_SESSION_FIRST):
            _, data = esys.get_capability(TPM2_CAP.HANDLES, first, 16)
            left += list(data.data.handles)
    finally:
        esys.close()
    assert left == []


# ---------------------------------------------------------------- the shared connection


def test_a_shared_holder_gives_the_tpm_to_a_waiting_process_and_both_progress(
    swtpm_factory: Callable[..., Swtpm], tmp_path: Path
) -> None:
    """Daemon (shared: keeps the connection and its loaded keys) and CLI (per call) on one
    swtpm without a resource manager: the daemon yields when the CLI waits, no slot fights."""
    sw = swtpm_factory("lease")
    errors: list[BaseException] = []
    with PytssHostTpm(sw.tcti, tmp_path, connection="shared") as daemon:
        daemon.ensure_host_keys()
        vaiks = [daemon.create_vaik(FLEET_DER) for _ in range(3)]
        approval = _approval(daemon, vaiks[0])
        daemon.attest(vaiks[0], QD, MESSAGE, approval)  # holds the lease now, keys loaded
        with PytssHostTpm(sw.tcti, tmp_path, connection="per-call") as cli:
            t0 = time.monotonic()
            assert cli.unseal(cli.seal(b"idle holder")) == b"idle holder"
            assert time.monotonic() - t0 < 2.0  # the idle daemon let go quickly

            def daemon_work() -> None:
                try:
                    for i in range(30):
                        vaik = vaiks[i % 3]
                        done = daemon.attest(vaik, QD, MESSAGE, approval)
                        _verify(vaik.public, MESSAGE, done.signature)
                except BaseException as err:  # re-raised below
                    errors.append(err)

            def cli_work() -> None:
                try:
                    for i in range(10):
                        data = f"{i}".encode()
                        assert cli.unseal(cli.seal(data)) == data
                        cli.certify("authkey", "aik", data)
                except BaseException as err:  # re-raised below
                    errors.append(err)

            threads = [threading.Thread(target=f) for f in (daemon_work, cli_work)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(120)
        assert not errors, errors
        assert daemon.stats()["lease_yields"] >= 1


def test_the_shared_connection_reconnects_after_the_software_root_restarts(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = SoftwareRoot(tmp_path / "swtpm")
    root.start()
    try:
        with PytssHostTpm(root.tcti, tmp_path, root="software", connection="shared") as tpm:
            tpm.ensure_host_keys()
            vaik = tpm.create_vaik(FLEET_DER)
            approval = _approval(tpm, vaik)
            tpm.attest(vaik, QD, MESSAGE, approval)
            root.stop()
            root.start()  # same state, same socket: a new TPM boot (contexts are void)
            with caplog.at_level(logging.WARNING):
                done = tpm.attest(vaik, QD, MESSAGE, approval)
            _verify(vaik.public, MESSAGE, done.signature)
            assert tpm.stats()["reconnects"] >= 1
            assert "reconnecting" in caplog.text
    finally:
        root.stop()


class _WrappersOnly:
    """A TCTI seen only through tpm2-pytss's ``transmit``/``receive`` methods."""

    def __init__(self, tcti: object) -> None:
        self.tcti = tcti

    def transmit(self, command: bytes) -> None:
        self.tcti.transmit(command)  # type: ignore[attr-defined]

    def receive(self, size: int, timeout: int) -> bytes:
        return bytes(self.tcti.receive(size, timeout))  # type: ignore[attr-defined]


def test_raw_commands_on_the_tctis_entry_points_answer_as_through_its_wrappers(
    swtpm_factory: Callable[..., Swtpm],
) -> None:
    import hashlib

    from tpm2_pytss import ESAPI

    from host_agent.tpm._raw import RawTpm, RawTpmError

    sw = swtpm_factory("raw")
    esys = ESAPI(sw.tcti)
    try:
        native, wrapped = RawTpm(esys.tcti), RawTpm(_WrappersOnly(esys.tcti))
        for data in (b"", b"abc", bytes(range(256)) * 4):
            digest, ticket = native.hash(data)
            assert (digest, ticket) == wrapped.hash(data)
            assert digest == hashlib.sha256(data).digest()
        assert native.commands == wrapped.commands == 3
        sw.stop()
        with pytest.raises(RawTpmError) as lost:
            native.hash(b"abc")
        assert lost.value.link
    finally:
        esys.close()


def test_a_duplicated_vaik_leaves_no_loaded_copy_or_saved_context_behind(
    hot: PytssHostTpm,
) -> None:
    """After TPM2_Duplicate towards an ExgKey the source keeps nothing of the vAIK that could
    sign without unwrapping the stored blob again: the next use is a full TPM2_Load, not a
    TPM2_ContextLoad of a context kept from before the move."""
    vaik = hot.create_vaik(FLEET_DER)
    approval = _approval(hot, vaik)
    hot.attest(vaik, QD, MESSAGE, approval)
    hot.attest(vaik, QD, MESSAGE, approval)  # the vAIK is resident or context-saved now
    hot.duplicate(vaik, hot.create_exgkey().public)
    before = hot.stats()
    _verify(vaik.public, MESSAGE, hot.sign(vaik, MESSAGE, approval))  # an abort takes it back
    after = hot.stats()
    assert after["loads"] - before["loads"] == 1
    assert after["context_loads"] == before["context_loads"]
