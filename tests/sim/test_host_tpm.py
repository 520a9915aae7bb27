"""Host TPM port on a real swtpm: sealing, NV counters, EK, AIK, activation, host keys."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from tpm2_pytss.types import TPM2B_NAME, TPM2B_PUBLIC, TPMT_PUBLIC
from tpm2_pytss.utils import make_credential

from evidence import tpm2
from host_agent.tpm import KeyBlobError, PlatformStateNotApproved, TpmCommandError
from host_agent.tpm.adapter import HostKeysMissing, PytssHostTpm
from tests.helpers.swtpm import Swtpm, start_swtpm

COUNTER = 0x01800100


@pytest.fixture(scope="module")
def ek_swtpm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Swtpm]:
    """A swtpm provisioned like the software root (RSA + ECC EKs with swtpm-localca certs)."""
    tpm = start_swtpm(tmp_path_factory.mktemp("ek-swtpm"), provision_ek=True)
    yield tpm
    tpm.stop()


@pytest.fixture(scope="module")
def host_tpm(ek_swtpm: Swtpm, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PytssHostTpm]:
    tpm = PytssHostTpm(ek_swtpm.tcti, tmp_path_factory.mktemp("keys"), root="software")
    tpm.ensure_host_keys()
    yield tpm
    tpm.close()


def _credential(tpm: PytssHostTpm, kind: str, secret: bytes, name: bytes) -> tuple[bytes, bytes]:
    ek = TPM2B_PUBLIC(publicArea=TPMT_PUBLIC.unmarshal(tpm.ek_public(kind))[0])  # type: ignore[arg-type]
    blob, seed = make_credential(ek, secret, TPM2B_NAME(name))
    return blob.marshal(), seed.marshal()


# ---------------------------------------------------------------- sealing


def test_seal_unseal_round_trip(host_tpm: PytssHostTpm) -> None:
    key = bytes(range(32))
    blob = host_tpm.seal(key)
    assert key not in blob
    assert host_tpm.unseal(blob) == key


def test_seal_bound_to_pcrs_refuses_after_they_change(
    swtpm_factory: Callable[..., Swtpm], tmp_path: Path
) -> None:
    sw = swtpm_factory("pcr-seal")
    with PytssHostTpm(sw.tcti, tmp_path) as tpm:
        blob = tpm.seal(b"data key", pcrs=[0, 7])
        assert tpm.unseal(blob) == b"data key"
        _extend(sw, 7)
        with pytest.raises(PlatformStateNotApproved) as err:
            tpm.unseal(blob)
        assert err.value.pcrs == (0, 7)
        assert "not at their approved values" in str(err.value)


def test_unseal_refuses_malformed_and_foreign_blobs(
    host_tpm: PytssHostTpm, swtpm_factory: Callable[..., Swtpm], tmp_path: Path
) -> None:
    with pytest.raises(KeyBlobError):
        host_tpm.unseal(b"not a blob")
    other = swtpm_factory("other")
    with PytssHostTpm(other.tcti, tmp_path) as tpm:
        foreign = tpm.seal(b"elsewhere")
    with pytest.raises(TpmCommandError) as err:
        host_tpm.unseal(foreign)
    assert err.value.command == "TPM2_Load"


def test_seal_size_limits(host_tpm: PytssHostTpm) -> None:
    with pytest.raises(ValueError):
        host_tpm.seal(b"")
    with pytest.raises(ValueError):
        host_tpm.seal(bytes(129))


# ---------------------------------------------------------------- NV counter


def test_counter_define_read_increment(host_tpm: PytssHostTpm) -> None:
    first = host_tpm.counter_define(COUNTER)
    assert host_tpm.counter_define(COUNTER) == first  # idempotent
    assert host_tpm.counter_read(COUNTER) == first
    assert host_tpm.counter_increment(COUNTER) == first + 1
    assert host_tpm.counter_read(COUNTER) == first + 1


def test_counter_index_must_be_owner_range(host_tpm: PytssHostTpm) -> None:
    with pytest.raises(ValueError, match="owner range"):
        host_tpm.counter_define(0x01C00002)


# ---------------------------------------------------------------- EK


def test_ek_certificates_read_in_chunks_and_parse(host_tpm: PytssHostTpm) -> None:
    certs = dict(host_tpm.ek_certificates())
    assert set(certs) == {0x01C00002, 0x01C00016}  # RSA 2048 (L-1), ECC P-384 (H-3)
    for der in certs.values():
        cert = x509.load_der_x509_certificate(der)
        assert "swtpm-localca" in cert.issuer.rfc4514_string()
    assert len(certs[0x01C00002]) > 1000  # more than one 1024-byte NV chunk is not needed here


@pytest.mark.parametrize(("kind", "index"), [("rsa", 0x01C00002), ("ecc", 0x01C00016)])
def test_ek_public_matches_ek_certificate(host_tpm: PytssHostTpm, kind: str, index: int) -> None:
    certs = dict(host_tpm.ek_certificates())
    cert_key = x509.load_der_x509_certificate(certs[index]).public_key()
    ek = tpm2.TpmtPublic.unmarshal(host_tpm.ek_public(kind))  # type: ignore[arg-type]
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    assert tpm2.public_key(ek).public_bytes(*spki) == cert_key.public_bytes(*spki)


# ---------------------------------------------------------------- AIK, activation


def test_aik_public_and_name(host_tpm: PytssHostTpm) -> None:
    pub = tpm2.TpmtPublic.unmarshal(host_tpm.aik_public())
    assert tpm2.object_name(pub) == host_tpm.aik_name()
    flags = tpm2.TpmaObject
    need = flags.FIXEDTPM | flags.FIXEDPARENT | flags.RESTRICTED | flags.SIGN_ENCRYPT
    assert pub.object_attributes & need == need


@pytest.mark.parametrize("kind", ["rsa", "ecc"])
def test_activate_credential(host_tpm: PytssHostTpm, kind: str) -> None:
    blob, seed = _credential(host_tpm, kind, b"fleet credential", host_tpm.aik_name())
    assert host_tpm.activate_credential(blob, seed, kind) == b"fleet credential"  # type: ignore[arg-type]


def test_activate_credential_for_another_key_fails(host_tpm: PytssHostTpm) -> None:
    other_name = b"\x00\x0b" + bytes(32)
    blob, seed = _credential(host_tpm, "rsa", b"fleet credential", other_name)
    with pytest.raises(TpmCommandError) as err:
        host_tpm.activate_credential(blob, seed)
    assert err.value.command == "TPM2_ActivateCredential"


# ---------------------------------------------------------------- host keys, plumbing


def test_host_keys_idempotent(ek_swtpm: Swtpm, tmp_path: Path) -> None:
    with PytssHostTpm(ek_swtpm.tcti, tmp_path) as tpm:
        first = tpm.ensure_host_keys()
        second = tpm.ensure_host_keys()
    assert {"aik", "authkey"} <= set(first.created)
    assert second.created == ()
    assert (second.aik_name, second.authkey_name) == (first.aik_name, first.authkey_name)
    with PytssHostTpm(ek_swtpm.tcti, tmp_path) as tpm:  # a new process sees the same keys
        assert tpm.aik_name() == first.aik_name


def test_aik_before_init_says_run_init(ek_swtpm: Swtpm, tmp_path: Path) -> None:
    with PytssHostTpm(ek_swtpm.tcti, tmp_path) as tpm, pytest.raises(HostKeysMissing) as err:
        tpm.aik_public()
    assert "vtpm-host init" in str(err.value)


def test_calls_from_many_threads_are_serialized(host_tpm: PytssHostTpm) -> None:
    errors: list[BaseException] = []
    names: list[bytes] = []

    def work() -> None:
        try:
            for _ in range(5):
                names.append(host_tpm.aik_name())
                assert host_tpm.unseal(host_tpm.seal(b"x")) == b"x"
        except BaseException as err:  # collected and re-raised below
            errors.append(err)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(set(names)) == 1


def test_leftover_transient_handle_from_a_crash_is_flushed_at_open(
    swtpm_factory: Callable[..., Swtpm], tmp_path: Path
) -> None:
    from tpm2_pytss import ESAPI
    from tpm2_pytss.constants import ESYS_TR, TPM2_ALG, TPM2_CAP, TPM2_HC, TPM2_SE
    from tpm2_pytss.types import TPMT_SYM_DEF

    sw = swtpm_factory("crash")
    crashed = ESAPI(sw.tcti)
    crashed.create_primary(None, "ecc256")
    crashed.create_primary(None, "ecc256")
    crashed.start_auth_session(
        ESYS_TR.NONE, ESYS_TR.NONE, TPM2_SE.POLICY, TPMT_SYM_DEF(algorithm=TPM2_ALG.NULL),
        TPM2_ALG.SHA256,
    )  # fmt: skip
    crashed.close()  # a process dying without flushing: all of it stays (no resource manager)

    def leftovers() -> list[int]:
        esys = ESAPI(sw.tcti)
        try:
            out = []
            for first in (TPM2_HC.TRANSIENT_FIRST, TPM2_HC.LOADED_SESSION_FIRST):
                _, data = esys.get_capability(TPM2_CAP.HANDLES, first, 16)
                out += list(data.data.handles)
            return out
        finally:
            esys.close()

    assert len(leftovers()) == 3
    with PytssHostTpm(sw.tcti, tmp_path) as tpm:
        tpm.ensure_host_keys()  # needs the slots
    assert leftovers() == []


def _extend(sw: Swtpm, *pcrs: int) -> None:
    from tpm2_pytss import ESAPI
    from tpm2_pytss.constants import ESYS_TR, TPM2_ALG
    from tpm2_pytss.types import TPML_DIGEST_VALUES, TPMT_HA, TPMU_HA

    esys = ESAPI(sw.tcti)
    try:
        for pcr in pcrs:
            digests = TPML_DIGEST_VALUES(
                [TPMT_HA(hashAlg=TPM2_ALG.SHA256, digest=TPMU_HA(sha256=b"\x42" * 32))]
            )
            esys.pcr_extend(ESYS_TR.PCR0 + pcr, digests)
    finally:
        esys.close()


# ---------------------------------------------------------------- port types, EK tables (no TPM)


def test_adapter_satisfies_the_port(host_tpm: PytssHostTpm) -> None:
    from host_agent.tpm import HostTpm

    port: HostTpm = host_tpm  # mypy checks the structure; isinstance checks the names
    assert isinstance(port, HostTpm)


def test_ek_policy_tables_match_the_tcg_templates() -> None:
    import hashlib

    from tpm2_pytss.internal.templates import template_policy

    from host_agent.tpm.ek import EK_POLICY_A, EK_POLICY_C

    assert EK_POLICY_A["sha256"] == template_policy.low
    for alg in ("sha256", "sha384", "sha512"):
        size = hashlib.new(alg).digest_size
        policy_or = hashlib.new(
            alg, bytes(size) + bytes.fromhex("00000171") + EK_POLICY_A[alg] + EK_POLICY_C[alg]
        ).digest()
        assert policy_or == getattr(template_policy, alg)


@pytest.mark.parametrize(
    "blob",
    [
        b"",
        b"{}",
        b'{"format": "vtpm-trust/wrapped-key/1"}',
        b'{"format": "vtpm-trust/wrapped-key/1", "kind": "aik", "public": "zz", "private": "",'
        b' "policy": null, "parent": null}',
        b"\xff\xfe",
    ],
)
def test_malformed_wrapped_keys_raise_key_blob_error(blob: bytes) -> None:
    from host_agent.tpm import WrappedKey

    with pytest.raises(KeyBlobError):
        WrappedKey.from_bytes(blob)


def test_wrapped_key_round_trip(host_tpm: PytssHostTpm) -> None:
    from host_agent.tpm import WrappedKey

    exg = host_tpm.create_exgkey()
    again = WrappedKey.from_bytes(exg.to_bytes())
    assert again == exg and again.name == exg.name
    with pytest.raises(KeyBlobError):
        host_tpm.unseal(exg.to_bytes())  # a wrapped key is not a sealed blob


def test_per_call_connections_let_two_agents_share_one_swtpm(
    swtpm_factory: Callable[..., Swtpm], tmp_path: Path
) -> None:
    """Daemon and CLI on the software root: swtpm interleaves connections and has no resource
    manager, so each call connects under a lock shared through the state directory."""
    sw = swtpm_factory("shared")
    errors: list[BaseException] = []
    with (
        PytssHostTpm(sw.tcti, tmp_path, connection="per-call") as daemon,
        PytssHostTpm(sw.tcti, tmp_path, connection="per-call") as cli,
    ):
        daemon.ensure_host_keys()

        def work(tpm: PytssHostTpm) -> None:
            try:
                for i in range(20):
                    data = f"{i}".encode()
                    assert tpm.unseal(tpm.seal(data)) == data
                    tpm.certify("authkey", "aik", data)
            except BaseException as err:  # re-raised below
                errors.append(err)

        threads = [threading.Thread(target=work, args=(t,)) for t in (daemon, cli)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert cli.aik_name() == daemon.aik_name()
    assert not errors, errors
