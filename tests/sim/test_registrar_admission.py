"""Host admission on real swtpms, over real HTTPS on 127.0.0.1 and in embedded mode.

The registrar trusts swtpm-localca (the CA swtpm_setup signs EK certificates with, in
/var/lib/swtpm-localca): root CA → swtpm-localca → EK certificate. The host side is the real
host TPM port (``PytssHostTpm``) where the test is about success, and the tpm2-pytss stand-in of
test_registrar_support.py where a test needs a host that misbehaves in a precise way.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from tpm2_pytss import TSS2_Exception
from tpm2_pytss.constants import ESYS_TR
from tpm2_pytss.types import TPM2B_PUBLIC

from evidence.errors import SignatureError
from evidence.tpm2 import (
    TpmsAttest,
    TpmsCertifyInfo,
    TpmtPublic,
    TpmtSignature,
    object_name,
    public_key,
    verify_attest_signature,
)
from host_agent.registration import HttpsRegistrar, RegistrarRefused, register_host
from host_agent.tpm.adapter import PytssHostTpm
from tests.helpers.swtpm import Swtpm
from tests.sim.test_registrar_support import EsapiHostTpm, aik_template
from tests.unit.test_registrar_ekcert import make_pki, pem
from verifier.registrar.ca import aik_name_from_certificate, aik_public_from_certificate
from verifier.registrar.ekcert import EkTrustBundle, verify_ek_certificate
from verifier.registrar.embedded import EmbeddedRegistrar
from verifier.registrar.errors import ActivationFailed, AikAttributesRejected, EkCertificateRejected
from verifier.registrar.keys import check_ek_public
from verifier.registrar.server import make_server
from verifier.registrar.service import RegistrarService
from verifier.registrar.state import (
    init_state,
    open_service,
    server_credentials,
    swtpm_localca_certificates,
)

REPO = Path(__file__).resolve().parents[2]


def _now() -> datetime:
    return datetime.now(UTC)


def _init(state: Path, ek_ca_pems: list[bytes]) -> Path:
    init_state(state, ek_ca_pems=ek_ca_pems, now=_now(), random_bytes=secrets.token_bytes)
    return state


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return _init(tmp_path / "registrar", swtpm_localca_certificates())


@pytest.fixture
def service(state_dir: Path) -> Iterator[RegistrarService]:
    svc, store = open_service(state_dir, clock=_now, random_bytes=secrets.token_bytes)
    yield svc
    store.close()


@pytest.fixture
def https_url(service: RegistrarService, state_dir: Path) -> Iterator[str]:
    certfile, keyfile = server_credentials(state_dir)
    server = make_server(service, "127.0.0.1", 0, certfile=certfile, keyfile=keyfile)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"https://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join(5)


@pytest.fixture
def host_tpm(swtpm_factory: Callable[..., Swtpm], tmp_path: Path) -> Iterator[PytssHostTpm]:
    tpm = swtpm_factory("host", provision_ek=True)
    host = PytssHostTpm(tpm.tcti, tmp_path / "host-keys", root="software")
    host.ensure_host_keys()
    yield host
    host.close()


def _fingerprint(pem_bytes: bytes) -> str:
    return x509.load_pem_x509_certificate(pem_bytes).fingerprint(hashes.SHA256()).hex()


def _assert_aik_certificate(aik_pem: bytes, ca_pem: bytes, aik_public: bytes, host_id: str) -> None:
    ca = x509.load_pem_x509_certificate(ca_pem)
    cert = x509.load_pem_x509_certificate(aik_pem)
    cert.verify_directly_issued_by(ca)
    public = TpmtPublic.unmarshal(aik_public)
    assert cert.public_key() == public_key(public)
    assert aik_name_from_certificate(cert) == object_name(public)
    assert cert.subject.rfc4514_string() == f"CN={host_id}"


def test_real_swtpm_ek_certificates_chain_to_swtpm_localca(
    host_tpm: PytssHostTpm,
) -> None:
    bundle = EkTrustBundle.from_pem(b"".join(swtpm_localca_certificates()))
    certs = dict(host_tpm.ek_certificates())
    for index, kind in ((0x01C00002, "rsa"), (0x01C00016, "ecc")):
        ek = check_ek_public(host_tpm.ek_public(kind))  # type: ignore[arg-type]
        verified = verify_ek_certificate(certs[index], ek.key, bundle, now=_now())
        assert verified.issuer_path == ("CN=swtpm-localca", "CN=swtpm-localca-rootca")


def test_registration_over_https_issues_an_aik_certificate(
    host_tpm: PytssHostTpm, service: RegistrarService, https_url: str
) -> None:
    registrar = HttpsRegistrar(https_url, ca_sha256=_fingerprint(service.ca_certificate()))
    key = ec.generate_private_key(ec.SECP256R1())
    reg = register_host(host_tpm, registrar, "host-a", key, ip_addresses=("127.0.0.1",))
    _assert_aik_certificate(
        reg.aik_certificate, service.ca_certificate(), host_tpm.aik_public(), "host-a"
    )
    tls = x509.load_pem_x509_certificate(reg.tls_certificate)
    tls.verify_directly_issued_by(x509.load_pem_x509_certificate(service.ca_certificate()))
    assert tls.public_key() == key.public_key()
    [stored] = service.hosts()
    assert stored.host_id == "host-a" and bytes.fromhex(stored.aik_name) == host_tpm.aik_name()


def test_registration_embedded_issues_an_aik_certificate(
    host_tpm: PytssHostTpm, tmp_path: Path
) -> None:
    """Single-host setup: the registrar runs in the host agent's process; re-opening is a no-op."""
    state = tmp_path / "embedded-registrar"
    with EmbeddedRegistrar(state, ek_ca_pems=swtpm_localca_certificates()) as registrar:
        key = ec.generate_private_key(ec.SECP256R1())
        reg = register_host(host_tpm, registrar, "single-host", key)
        _assert_aik_certificate(
            reg.aik_certificate, registrar.ca_certificate(), host_tpm.aik_public(), "single-host"
        )
        ca = registrar.ca_certificate()
    before = {p.name: p.read_bytes() for p in state.iterdir() if p.suffix != ".db"}
    with EmbeddedRegistrar(state) as again:
        assert again.ca_certificate() == ca
        assert [h.host_id for h in again.hosts()] == ["single-host"]
    assert {p.name: p.read_bytes() for p in state.iterdir() if p.suffix != ".db"} == before


class OnlyEccEk:
    """The host TPM port, presenting only its ECC P-384 EK certificate (NV 0x01c00016)."""

    def __init__(self, tpm: PytssHostTpm) -> None:
        self.tpm = tpm

    def __getattr__(self, name: str) -> object:
        return getattr(self.tpm, name)

    def ek_certificates(self) -> list[tuple[int, bytes]]:
        return [(i, der) for i, der in self.tpm.ek_certificates() if i == 0x01C00016]


def test_registration_with_the_ecc_p384_ek(
    host_tpm: PytssHostTpm, service: RegistrarService
) -> None:
    """The high-range ECC EK (SHA-384, AES-256, PolicyOR) carries admission end to end too."""
    challenge_kinds: list[str] = []

    class Recording:
        def ca_certificate(self) -> bytes:
            return service.ca_certificate()

        def start(self, body: object) -> dict[str, str]:
            answer = service.start(body)
            challenge_kinds.append(answer["ek_kind"])
            return answer

        def activate(self, challenge_id: str, body: object) -> dict[str, str]:
            return service.activate(challenge_id, body)

    key = ec.generate_private_key(ec.SECP256R1())
    reg = register_host(OnlyEccEk(host_tpm), Recording(), "host-ecc", key)  # type: ignore[arg-type]
    assert challenge_kinds == ["ecc"]
    _assert_aik_certificate(
        reg.aik_certificate, service.ca_certificate(), host_tpm.aik_public(), "host-ecc"
    )
    [stored] = service.hosts()
    assert stored.ek_kind == "ecc"


def test_pinned_fingerprint_mismatch_is_refused(service: RegistrarService, https_url: str) -> None:
    from evidence.errors import ChainError

    with pytest.raises(ChainError, match="fingerprint"):
        HttpsRegistrar(https_url, ca_sha256="00" * 32)


def test_ek_certificate_from_an_unknown_ca_is_refused(
    swtpm_factory: Callable[..., Swtpm], tmp_path: Path
) -> None:
    """The registrar trusts only a second, self-made CA: swtpm's EK certificates are refused."""
    other = make_pki("other-ek-ca")
    state = _init(tmp_path / "strict", [pem(other.root[0], other.intermediate[0])])
    svc, store = open_service(state, clock=_now, random_bytes=secrets.token_bytes)
    certfile, keyfile = server_credentials(state)
    server = make_server(svc, "127.0.0.1", 0, certfile=certfile, keyfile=keyfile)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    host = EsapiHostTpm(swtpm_factory("host", provision_ek=True))
    try:
        registrar = HttpsRegistrar(
            f"https://127.0.0.1:{server.server_address[1]}", ca_pem=svc.ca_certificate()
        )
        with pytest.raises(RegistrarRefused, match="swtpm-localca") as info:
            register_host(host, registrar, "host-a", ec.generate_private_key(ec.SECP256R1()))
        assert info.value.remote_id == "registrar.ek_certificate"
        with pytest.raises(EkCertificateRejected, match="other-ek-ca"):
            register_host(host, svc, "host-a", ec.generate_private_key(ec.SECP256R1()))
        assert svc.hosts() == []
        assert store.count_challenges() == 0
    finally:
        host.close()
        server.shutdown()
        server.server_close()
        store.close()


class AikFromAnotherTpm:
    """A host presenting TPM A's EK (and certificate) with TPM B's AIK."""

    def __init__(self, a: EsapiHostTpm, b: EsapiHostTpm) -> None:
        self.a, self.b = a, b
        self.tpm_errors: list[str] = []

    def ek_certificates(self) -> list[tuple[int, bytes]]:
        return self.a.ek_certificates()

    def ek_public(self, kind: Literal["rsa", "ecc"] = "rsa") -> bytes:
        return self.a.ek_public(kind)

    def aik_public(self) -> bytes:
        return self.b.aik_public()

    def aik_name(self) -> bytes:
        return self.b.aik_name()

    def activate_credential(
        self,
        credential_blob: bytes,
        encrypted_secret: bytes,
        ek_kind: Literal["rsa", "ecc"] = "rsa",
    ) -> bytes:
        # B holds the AIK but not the EK the seed is sealed to.
        try:
            return self.b.activate_credential(credential_blob, encrypted_secret, ek_kind)
        except TSS2_Exception as err:
            self.tpm_errors.append(f"B: {err}")
        # A holds the EK; B's AIK can only be brought there as a public-only external object.
        aik = self.b.aik_public()
        pub, _ = TPM2B_PUBLIC.unmarshal(len(aik).to_bytes(2, "big") + aik)
        try:
            external = self.a.esys.load_external(pub, None, ESYS_TR.NULL)
        except TSS2_Exception as err:
            self.tpm_errors.append(f"A LoadExternal: {err}")
        else:
            try:
                return self.a.activate_credential(
                    credential_blob, encrypted_secret, ek_kind, activate_handle=external
                )
            except TSS2_Exception as err:
                self.tpm_errors.append(f"A ActivateCredential: {err}")
            finally:
                self.a.esys.flush_context(external)
        return secrets.token_bytes(32)  # all that is left: a guess


def test_aik_from_another_tpm_is_refused(
    swtpm_factory: Callable[..., Swtpm], service: RegistrarService, https_url: str
) -> None:
    a = EsapiHostTpm(swtpm_factory("a", provision_ek=True))
    b = EsapiHostTpm(swtpm_factory("b", provision_ek=True))
    host = AikFromAnotherTpm(a, b)
    try:
        registrar = HttpsRegistrar(https_url, ca_pem=service.ca_certificate())
        with pytest.raises(RegistrarRefused, match="not in the same TPM") as info:
            register_host(host, registrar, "host-a", ec.generate_private_key(ec.SECP256R1()))
        assert info.value.remote_id == ActivationFailed.id
        assert len(host.tpm_errors) == 2, host.tpm_errors  # neither TPM would activate it
        assert service.hosts() == []
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize(
    ("spec", "attributes", "message"),
    [
        ("ecc256:ecdsa-sha256", 0x00040060, "missing FIXEDTPM|FIXEDPARENT|RESTRICTED"),
        ("rsa2048:rsassa-sha256", 0x00050072, "expected an ECC NIST P-256 key"),
        ("ecc384:ecdsa-sha384", 0x00050072, "P-256"),
    ],
)
def test_bad_aik_attributes_are_refused(
    swtpm_factory: Callable[..., Swtpm],
    service: RegistrarService,
    spec: str,
    attributes: int,
    message: str,
) -> None:
    host = EsapiHostTpm(swtpm_factory("host", provision_ek=True), aik_template(spec, attributes))
    try:
        with pytest.raises(AikAttributesRejected, match=message):
            register_host(host, service, "host-a", ec.generate_private_key(ec.SECP256R1()))
        assert service.hosts() == []
    finally:
        host.close()


def test_cli_serve_init_and_hosts(host_tpm: PytssHostTpm, tmp_path: Path) -> None:
    """`vtpm-verify registrar init|serve|hosts` as an operator runs them."""
    cli = [sys.executable, "-m", "verifier.cli", "registrar"]
    state = str(tmp_path / "cli-registrar")
    init = subprocess.run(
        [*cli, "init", "--state-dir", state, "--swtpm-localca", "--json"],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
    )
    fingerprint = json.loads(init.stdout)["ca_sha256"]
    serve = subprocess.Popen(
        [*cli, "serve", "--state-dir", state, "--listen", "127.0.0.1:0", "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    try:
        assert serve.stdout is not None
        banner = json.loads(serve.stdout.readline())
        assert banner["ca_sha256"] == fingerprint
        registrar = HttpsRegistrar(banner["url"], ca_sha256=fingerprint)
        register_host(host_tpm, registrar, "host-cli", ec.generate_private_key(ec.SECP256R1()))
    finally:
        serve.send_signal(signal.SIGTERM)
        assert serve.wait(10) == 0
    hosts = subprocess.run(
        [*cli, "hosts", "--state-dir", state, "--json"],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
    )
    [entry] = json.loads(hosts.stdout)["hosts"]
    assert entry["host_id"] == "host-cli"
    assert bytes.fromhex(entry["aik_name"]) == host_tpm.aik_name()
    removed = subprocess.run(
        [*cli, "remove", "--state-dir", state, "--host-id", "host-cli", "--json"],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert removed.returncode == 0 and json.loads(removed.stdout)["removed"] is True


def test_certauthkey_verifies_in_evidence_against_the_aik_certificate(
    host_tpm: PytssHostTpm, service: RegistrarService
) -> None:
    """Issue 3 "done when": a CertAuthKey-style TPM2_Certify verifies from the AIK certificate.

    The verifier holds only the fleet CA and the AIK certificate: it checks the chain, reads the
    AIK's TPMT_PUBLIC from the certificate (and that it certifies the same key), then checks the
    TPM's signature over TPMS_ATTEST purely in evidence/.
    """
    reg = register_host(host_tpm, service, "host-a", ec.generate_private_key(ec.SECP256R1()))
    nonce = hashlib.sha256(b"cert_user" + secrets.token_bytes(32)).digest()
    certification = host_tpm.certify("authkey", "aik", nonce)

    ca = x509.load_pem_x509_certificate(service.ca_certificate())
    aik_cert = x509.load_pem_x509_certificate(reg.aik_certificate)
    aik_cert.verify_directly_issued_by(ca)
    aik = TpmtPublic.unmarshal(aik_public_from_certificate(aik_cert))
    assert aik_cert.public_key() == public_key(aik)
    assert aik_name_from_certificate(aik_cert) == object_name(aik)
    verify_attest_signature(
        certification.attest, TpmtSignature.unmarshal(certification.signature), aik
    )
    attest = TpmsAttest.unmarshal(certification.attest)
    assert attest.extra_data == nonce
    assert isinstance(attest.attested, TpmsCertifyInfo)
    authkey = TpmtPublic.unmarshal(host_tpm.host_key_public("authkey"))
    assert attest.attested.name == object_name(authkey)

    tampered = certification.attest[:-1] + bytes([certification.attest[-1] ^ 1])
    with pytest.raises(SignatureError):
        verify_attest_signature(tampered, TpmtSignature.unmarshal(certification.signature), aik)
