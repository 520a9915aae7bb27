"""The software root's kept swtpm connection (shared mode): the hot path's commands go over one
connection while the daemon holds the lease; it is closed for ESAPI commands, for a process
waiting for the lease and when idle, and a broken one (swtpm killed) is reconnected."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

from tpm2_pytss import ESAPI
from tpm2_pytss.constants import ESYS_TR, TPM2_ALG
from tpm2_pytss.types import TPML_DIGEST_VALUES, TPMT_HA, TPMU_HA

from host_agent.tpm._raw import swtpm_address
from host_agent.tpm.adapter import PytssHostTpm
from host_agent.tpm.software_root import SoftwareRoot
from tests.helpers.swtpm import Swtpm
from tests.sim.test_host_tpm_hot import MESSAGE, QD, _approval, _verify
from tests.sim.test_host_tpm_keys import FLEET_DER


def test_swtpm_address_follows_the_tcti_string() -> None:
    import socket

    assert swtpm_address("swtpm:path=/run/s.sock") == (socket.AF_UNIX, "/run/s.sock")
    assert swtpm_address("swtpm:host=127.0.0.1,port=4000") == (
        socket.AF_INET,
        ("127.0.0.1", 4000),
    )
    assert swtpm_address("swtpm:port=2400") == (socket.AF_INET, ("localhost", 2400))
    assert swtpm_address("swtpm") == (socket.AF_INET, ("localhost", 2321))
    assert swtpm_address("device:/dev/tpmrm0") is None
    assert swtpm_address("mssim:port=2321") is None
    assert swtpm_address("swtpm:port=x") is None


def test_the_hot_path_keeps_one_connection_while_holding_the_lease(
    swtpm_factory: Callable[..., Swtpm], tmp_path: Path
) -> None:
    sw = swtpm_factory("kept")
    with PytssHostTpm(sw.tcti, tmp_path, connection="shared", lease_poll=30) as tpm:
        tpm.ensure_host_keys()
        vaiks = [tpm.create_vaik(FLEET_DER) for _ in range(4)]  # more than the 3 slots
        approval = _approval(tpm, vaiks[0])
        for vaik in vaiks:  # first uses: TPM2_Load, the ticket, the branches through ESAPI
            tpm.attest(vaik, QD, MESSAGE, approval)
        before = tpm.stats()["kept_connects"]
        for i in range(20):
            done = tpm.attest(vaiks[i % 4], QD, MESSAGE, approval)
            _verify(vaiks[i % 4].public, MESSAGE, done.signature)
        assert before >= 1
        assert tpm.stats()["kept_connects"] == before  # all 20 on the one left open
        # an ESAPI command closes it first (its TCTI connects by itself), the next attestation
        # opens it again
        assert tpm.unseal(tpm.seal(b"between")) == b"between"
        tpm.attest(vaiks[0], QD, MESSAGE, approval)
        assert tpm.stats()["kept_connects"] == before + 1


def test_the_per_call_and_persistent_modes_keep_no_connection(
    swtpm_factory: Callable[..., Swtpm], tmp_path: Path
) -> None:
    sw = swtpm_factory("notkept")
    with PytssHostTpm(sw.tcti, tmp_path) as tpm:
        tpm.ensure_host_keys()
        vaik = tpm.create_vaik(FLEET_DER)
        tpm.attest(vaik, QD, MESSAGE, _approval(tpm, vaik))
        assert tpm.stats()["kept_connects"] == 0


def _extend_pcr16(tcti: str) -> None:
    esys = ESAPI(tcti)
    try:
        digests = TPML_DIGEST_VALUES(
            [TPMT_HA(hashAlg=TPM2_ALG.SHA256, digest=TPMU_HA(sha256=b"\x42" * 32))]
        )
        esys.pcr_extend(ESYS_TR.PCR16, digests)
    finally:
        esys.close()


def test_an_idle_holder_lets_a_client_outside_the_lease_in(
    swtpm_factory: Callable[..., Swtpm], tmp_path: Path
) -> None:
    """tpm2-tools and the like take no lease: the kept connection goes after a poll idle."""
    sw = swtpm_factory("idle")
    with PytssHostTpm(sw.tcti, tmp_path, connection="shared") as tpm:
        tpm.ensure_host_keys()
        vaik = tpm.create_vaik(FLEET_DER)
        approval = _approval(tpm, vaik)
        tpm.attest(vaik, QD, MESSAGE, approval)
        outside = threading.Thread(target=_extend_pcr16, args=(sw.tcti,), daemon=True)
        t0 = time.monotonic()
        outside.start()
        outside.join(10)
        assert not outside.is_alive()
        assert time.monotonic() - t0 < 2.0
        done = tpm.attest(vaik, QD, MESSAGE, approval)
        _verify(vaik.public, MESSAGE, done.signature)


def test_the_kept_connection_is_closed_for_a_process_waiting_for_the_lease(
    swtpm_factory: Callable[..., Swtpm], tmp_path: Path
) -> None:
    sw = swtpm_factory("handover")
    errors: list[BaseException] = []
    with PytssHostTpm(sw.tcti, tmp_path, connection="shared") as daemon:
        daemon.ensure_host_keys()
        vaik = daemon.create_vaik(FLEET_DER)
        approval = _approval(daemon, vaik)
        stop = threading.Event()

        def busy() -> None:  # the daemon never idles, so only the handover frees swtpm
            try:
                while not stop.is_set():
                    done = daemon.attest(vaik, QD, MESSAGE, approval)
                    _verify(vaik.public, MESSAGE, done.signature)
            except BaseException as err:  # re-raised below
                errors.append(err)

        worker = threading.Thread(target=busy)
        worker.start()
        try:
            time.sleep(0.3)
            with PytssHostTpm(sw.tcti, tmp_path, connection="per-call") as cli:
                t0 = time.monotonic()
                for i in range(3):
                    assert cli.unseal(cli.seal(bytes([i]))) == bytes([i])
                    cli.certify("authkey", "aik", b"cli")
                assert time.monotonic() - t0 < 10.0
        finally:
            stop.set()
            worker.join(60)
        assert not errors, errors
        stats = daemon.stats()
        assert stats["lease_yields"] >= 1
        assert stats["kept_connects"] >= 2  # opened again after each handover


def test_a_killed_software_root_is_reconnected(tmp_path: Path) -> None:
    root = SoftwareRoot(tmp_path / "swtpm")
    root.start()
    try:
        with PytssHostTpm(
            root.tcti, tmp_path, root="software", connection="shared", lease_poll=30
        ) as tpm:
            tpm.ensure_host_keys()
            vaik = tpm.create_vaik(FLEET_DER)
            approval = _approval(tpm, vaik)
            tpm.attest(vaik, QD, MESSAGE, approval)
            tpm.attest(vaik, QD, MESSAGE, approval)  # the kept connection is open now
            before = tpm.stats()["kept_connects"]
            assert before >= 1
            pid = int(root.pid_path.read_text().strip())
            os.kill(pid, signal.SIGKILL)
            root.stop()  # reaps it, removes the sockets
            root.start()
            done = tpm.attest(vaik, QD, MESSAGE, approval)
            _verify(vaik.public, MESSAGE, done.signature)
            stats = tpm.stats()
            assert stats["reconnects"] >= 1
            assert stats["kept_connects"] > before
    finally:
        root.stop()
