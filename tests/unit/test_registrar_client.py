"""The host side of admission (host_agent/registration.py) against a misbehaving registrar.

What comes back from a registrar is untrusted input to the host: garbage answers raise only
our errors, and well-formed answers that certify the wrong thing raise ChainError.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import HealthCheck, given, settings

from evidence.errors import ChainError, VtpmError
from host_agent.registration import HttpsRegistrar, RegistrarUnreachable, register_host
from tests.unit.test_registrar_ekcert import NOW, Pki, make_pki, pem
from tests.unit.test_registrar_messages import json_values
from tests.unit.test_registrar_service import SoftwareHost
from verifier.registrar.service import RegistrarService
from verifier.registrar.state import init_state, open_service


@pytest.fixture(scope="module")
def pki() -> Pki:
    return make_pki()


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[RegistrarService]:
    state = tmp_path_factory.mktemp("client") / "registrar"
    init_state(
        state,
        ek_ca_pems=[pem(pki.root[0], pki.intermediate[0])],
        now=NOW,
        random_bytes=secrets.token_bytes,
    )
    svc, store = open_service(state, clock=lambda: NOW, random_bytes=secrets.token_bytes)
    yield svc
    store.close()


class Tampering:
    """The real registrar, with a hook that rewrites its answers."""

    def __init__(
        self,
        service: RegistrarService,
        start: Callable[[Any], Any] = lambda a: a,
        activate: Callable[[Any], Any] = lambda a: a,
    ) -> None:
        self.service, self._start, self._activate = service, start, activate

    def ca_certificate(self) -> bytes:
        return self.service.ca_certificate()

    def start(self, body: Any) -> Any:
        return self._start(self.service.start(body))

    def activate(self, challenge_id: str, body: Any) -> Any:
        return self._activate(self.service.activate(challenge_id, body))


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(json_values)
def test_garbage_challenge_raises_only_our_errors(
    service: RegistrarService, pki: Pki, garbage: Any
) -> None:
    with pytest.raises(VtpmError):
        register_host(SoftwareHost(pki), Tampering(service, start=lambda _: garbage), "h", _key())


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(json_values)
def test_garbage_certificates_raise_only_our_errors(
    service: RegistrarService, pki: Pki, garbage: Any
) -> None:
    tampering = Tampering(service, activate=lambda _: garbage)
    with pytest.raises(VtpmError):
        register_host(SoftwareHost(pki), tampering, f"h{secrets.token_hex(4)}", _key())


def test_aik_certificate_for_another_key_is_refused(service: RegistrarService, pki: Pki) -> None:
    other = SoftwareHost(pki)
    other_answer = register_host(other, service, "other", _key())

    def swap(answer: dict[str, str]) -> dict[str, str]:
        return {**answer, "aik_certificate": other_answer.aik_certificate.decode()}

    with pytest.raises(ChainError, match="this host's AIK"):
        register_host(SoftwareHost(pki), Tampering(service, activate=swap), "mine", _key())


def test_certificates_from_another_ca_are_refused(
    service: RegistrarService, pki: Pki, tmp_path: Path
) -> None:
    state = tmp_path / "rogue"
    init_state(
        state,
        ek_ca_pems=[pem(pki.root[0], pki.intermediate[0])],
        now=NOW,
        random_bytes=secrets.token_bytes,
    )
    rogue, store = open_service(state, clock=lambda: NOW, random_bytes=secrets.token_bytes)
    try:

        class Impostor(Tampering):
            def ca_certificate(self) -> bytes:
                return service.ca_certificate()  # the CA this host trusts

        with pytest.raises(ChainError, match="fleet CA this host trusts"):
            register_host(SoftwareHost(pki), Impostor(rogue), "host-x", _key())
    finally:
        store.close()


def test_mtls_certificate_for_another_key_is_refused(service: RegistrarService, pki: Pki) -> None:
    stolen = x509.load_pem_x509_certificate(
        register_host(SoftwareHost(pki), service, "victim", _key()).tls_certificate
    )

    def swap(answer: dict[str, str]) -> dict[str, str]:
        pem_text = stolen.public_bytes(serialization.Encoding.PEM).decode()
        return {**answer, "tls_certificate": pem_text}

    with pytest.raises(ChainError, match="mTLS"):
        register_host(SoftwareHost(pki), Tampering(service, activate=swap), "thief", _key())


def test_https_registrar_needs_a_trust_anchor() -> None:
    with pytest.raises(ValueError, match="fingerprint"):
        HttpsRegistrar("https://127.0.0.1:1")
    with pytest.raises(ValueError, match="https"):
        HttpsRegistrar("http://127.0.0.1:1", ca_sha256="00" * 32)


def test_unreachable_registrar_is_a_transport_error() -> None:
    with pytest.raises(RegistrarUnreachable, match="failed"):
        HttpsRegistrar("https://127.0.0.1:1", ca_sha256="00" * 32, timeout=2)
