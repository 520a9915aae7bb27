"""The registrar's HTTPS API: routes, error bodies and status codes, over real TLS.

Admission through it is in test_registrar_admission.py; this file covers what a host, a tenant
or a misbehaving client sees at the HTTP level.
"""

from __future__ import annotations

import base64
import http.client
import json
import secrets
import ssl
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from evidence.tpm2 import TpmtPublic, object_name
from tests.unit.test_registrar_ekcert import make_pki, pem
from verifier.registrar.server import MAX_BODY, make_server
from verifier.registrar.service import RegistrarService
from verifier.registrar.state import init_state, open_service, server_credentials


def _now() -> datetime:
    return datetime.now(UTC)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[RegistrarService, int]]:
    pki = make_pki()
    state = tmp_path / "registrar"
    init_state(state, ek_ca_pems=[pem(pki.root[0])], now=_now(), random_bytes=secrets.token_bytes)
    service, store = open_service(state, clock=_now, random_bytes=secrets.token_bytes)
    certfile, keyfile = server_credentials(state)
    server = make_server(service, "127.0.0.1", 0, certfile=certfile, keyfile=keyfile)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield service, server.server_address[1]
    server.shutdown()
    server.server_close()
    store.close()


def _call(
    served: tuple[RegistrarService, int],
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, str, bytes]:
    service, port = served
    context = ssl.create_default_context(cadata=service.ca_certificate().decode())
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.getheader("Content-Type", ""), response.read()
    finally:
        conn.close()


def _error(raw: bytes) -> str:
    return str(json.loads(raw)["error"]["id"])


def test_ca_is_served_as_pem(served: tuple[RegistrarService, int]) -> None:
    status, ctype, body = _call(served, "GET", "/v1/ca")
    assert (status, ctype) == (200, "application/x-pem-file")
    assert x509.load_pem_x509_certificate(body) == x509.load_pem_x509_certificate(
        served[0].ca_certificate()
    )


def test_policy_key_carries_its_tpm_name(served: tuple[RegistrarService, int]) -> None:
    status, _, body = _call(served, "GET", "/v1/policy-key")
    key = json.loads(body)
    public = TpmtPublic.unmarshal(base64.b64decode(key["tpmt_public"]))
    assert status == 200 and object_name(public).hex() == key["name"]
    spki = serialization.load_der_public_key(base64.b64decode(key["spki_der"]))
    assert spki == serialization.load_pem_public_key(key["pem"].encode())


def test_policy_approvals_are_listed(served: tuple[RegistrarService, int]) -> None:
    first = served[0].approve_platform_policy(b"\x22" * 32, b"ref")
    again = served[0].approve_platform_policy(b"\x22" * 32, b"ref")
    assert again == first  # the approval on record is kept
    status, _, body = _call(served, "GET", "/v1/policy-approvals")
    [approval] = json.loads(body)["approvals"]
    assert status == 200
    assert approval["approved_policy"] == "22" * 32
    assert base64.b64decode(approval["signature"]) == first.signature


def test_unknown_host_is_404(served: tuple[RegistrarService, int]) -> None:
    status, _, body = _call(served, "GET", "/v1/hosts/nobody")
    assert (status, _error(body)) == (404, "registrar.unknown_host")


def test_unknown_route_is_404(served: tuple[RegistrarService, int]) -> None:
    status, _, body = _call(served, "GET", "/v2/ca")
    assert (status, _error(body)) == (404, "http.not_found")


JSON = {"Content-Type": "application/json"}


@pytest.mark.parametrize(
    ("body", "headers", "status", "error_id"),
    [
        (b"{not json", JSON, 400, "parse.malformed"),
        (b"[]", JSON, 400, "parse.malformed"),
        (b'{"host_id": "a"}', JSON, 400, "parse.malformed"),
        (b"{}", {"Content-Type": "text/plain"}, 415, "http.content_type"),
        (b"x" * (MAX_BODY + 1), JSON, 413, "http.too_large"),
    ],
)
def test_bad_registration_requests(
    served: tuple[RegistrarService, int],
    body: bytes,
    headers: dict[str, str],
    status: int,
    error_id: str,
) -> None:
    got_status, ctype, raw = _call(served, "POST", "/v1/registrations", body, headers)
    assert (got_status, ctype, _error(raw)) == (status, "application/json", error_id)


def test_unknown_challenge_is_403(served: tuple[RegistrarService, int]) -> None:
    body = json.dumps({"secret": base64.b64encode(b"x" * 32).decode(), "csr": "x"}).encode()
    status, _, raw = _call(served, "POST", f"/v1/registrations/{'0' * 32}/activation", body, JSON)
    assert (status, _error(raw)) == (403, "registrar.challenge")


def test_clients_that_do_not_trust_the_fleet_ca_are_refused(
    served: tuple[RegistrarService, int],
) -> None:
    conn = http.client.HTTPSConnection(
        "127.0.0.1", served[1], context=ssl.create_default_context(), timeout=10
    )
    with pytest.raises(ssl.SSLCertVerificationError):
        conn.request("GET", "/v1/ca")
    conn.close()
