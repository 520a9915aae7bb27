"""Host admission, host side: register this host's TPM with the fleet registrar.

:func:`register_host` runs the protocol of ARCHITECTURE.md §3 "Host admission" against any
:class:`RegistrarEndpoint`: the HTTPS client :class:`HttpsRegistrar`, or any object with the same
three methods speaking the same API-v1 JSON bodies (``verifier/registrar/messages.py``), such as
the registrar service called in-process. ``vtpm-host init`` always goes over HTTPS: to the fleet
registrar, or to the embedded one it runs as a child process (``host_agent/admission.py``).

Steps:

1. read the EK certificates from NV and the matching EK public areas, and the AIK public area;
2. ``start``: the registrar checks them and answers with MakeCredential(EK, secret, Name(AIK));
3. TPM2_ActivateCredential(AIK, EK) recovers the secret, which only works in the TPM that holds
   both keys;
4. ``activate``: send the secret and a CSR for the host's mTLS key; receive the AIK certificate,
   the mTLS certificate and the fleet CA certificate;
5. check what came back before keeping it: both certificates are signed by the fleet CA this host
   trusts, the AIK certificate certifies this AIK's public key and carries its TPM Name, and the
   mTLS certificate certifies this host's mTLS key.
"""

from __future__ import annotations

import base64
import binascii
import http.client
import json
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from evidence.aik_cert import aik_name_from_certificate, aik_public_from_certificate
from evidence.errors import ChainError, ParseError, VtpmError
from evidence.tpm2 import TpmtPublic, public_key

__all__ = [
    "EK_CERT_KINDS",
    "HttpsRegistrar",
    "RegistrarEndpoint",
    "RegistrarRefused",
    "RegistrarUnreachable",
    "Registration",
    "RegistrationTpm",
    "register_host",
]

EK_CERT_KINDS: dict[int, Literal["rsa", "ecc"]] = {
    0x01C00002: "rsa",  # RSA 2048 EK certificate (TCG EK Credential Profile, low range)
    0x01C0000A: "ecc",  # ECC NIST P-256 EK certificate (low range)
    0x01C00012: "rsa",  # RSA 2048 (high range)
    0x01C00014: "ecc",  # ECC NIST P-256 (high range)
    0x01C00016: "ecc",  # ECC NIST P-384 (high range; swtpm_setup's ECC EK)
    0x01C00018: "ecc",  # ECC NIST P-521 (high range)
    0x01C0001C: "rsa",  # RSA 3072 (high range)
    0x01C0001E: "rsa",  # RSA 4096 (high range)
}
"""NV index of an EK certificate → the kind of EK it certifies."""


class RegistrarRefused(VtpmError):
    """The registrar refused this host; ``remote_id`` is the registrar's stable error id."""

    id = "host.registration.refused"

    def __init__(self, remote_id: str, message: str) -> None:
        self.remote_id = remote_id
        super().__init__(f"registrar refused [{remote_id}]: {message}")


class RegistrarUnreachable(VtpmError):
    """The registrar could not be reached, or answered something that is not the API."""

    id = "host.registration.transport"


class RegistrationTpm(Protocol):
    """What admission needs of the host TPM (a subset of ``host_agent.tpm.port.HostTpm``)."""

    def ek_certificates(self) -> list[tuple[int, bytes]]: ...

    def ek_public(self, kind: Literal["rsa", "ecc"] = "rsa") -> bytes: ...

    def aik_public(self) -> bytes: ...

    def aik_name(self) -> bytes: ...

    def activate_credential(
        self,
        credential_blob: bytes,
        encrypted_secret: bytes,
        ek_kind: Literal["rsa", "ecc"] = "rsa",
    ) -> bytes: ...


class RegistrarEndpoint(Protocol):
    """A registrar reached over HTTPS or called in-process (API v1 JSON bodies)."""

    def ca_certificate(self) -> bytes: ...

    def start(self, body: Any) -> Any: ...

    def activate(self, challenge_id: str, body: Any) -> Any: ...


@dataclass(frozen=True)
class Registration:
    """What admission gives the host (all PEM), checked by :func:`register_host`."""

    host_id: str
    aik_name: bytes
    aik_certificate: bytes
    tls_certificate: bytes
    ca_certificate: bytes


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _field(obj: Any, key: str) -> str:
    if not isinstance(obj, dict) or not isinstance(obj.get(key), str):
        raise RegistrarUnreachable(f"registrar answer: expected a string field {key!r}")
    return str(obj[key])


def _b64field(obj: Any, key: str) -> bytes:
    try:
        return base64.b64decode(_field(obj, key), validate=True)
    except (binascii.Error, ValueError) as err:
        raise RegistrarUnreachable(f"registrar answer: {key} is not base64") from err


class HttpsRegistrar:
    """The registrar's HTTPS API (``https://HOST:PORT``), trusting only the fleet CA.

    Args:
        url: base URL of the registrar.
        ca_pem: the fleet CA certificate, if the host already has it; otherwise
        ca_sha256: the SHA-256 fingerprint (hex, of the DER certificate) an operator gave the
            host: the CA is fetched from ``GET /v1/ca`` once and kept only if it matches.
        timeout: seconds per request.

    Raises:
        ValueError: neither ``ca_pem`` nor ``ca_sha256`` (a registrar is never trusted blindly).
    """

    def __init__(
        self,
        url: str,
        *,
        ca_pem: bytes | None = None,
        ca_sha256: str | None = None,
        timeout: float = 30.0,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme != "https" or not parts.hostname:
            raise ValueError(f"registrar URL must be https://HOST[:PORT], got {url!r}")
        if ca_pem is None and ca_sha256 is None:
            raise ValueError("give the fleet CA certificate or its SHA-256 fingerprint")
        self._host = parts.hostname
        self._port = parts.port or 443
        self._timeout = timeout
        if ca_pem is None:
            assert ca_sha256 is not None
            ca_pem = self._fetch_pinned_ca(ca_sha256.lower().replace(":", ""))
        self._ca_pem = ca_pem
        self._context = ssl.create_default_context(cadata=ca_pem.decode("ascii"))

    def _fetch_pinned_ca(self, fingerprint: str) -> bytes:
        unverified = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        unverified.check_hostname = False
        unverified.verify_mode = ssl.CERT_NONE
        status, body = self._request("GET", "/v1/ca", None, unverified)
        if status != 200:
            raise RegistrarUnreachable(f"GET /v1/ca: expected 200, got {status}")
        try:
            cert = x509.load_pem_x509_certificate(body)
        except ValueError as err:
            raise RegistrarUnreachable(f"GET /v1/ca: not a PEM certificate ({err})") from err
        got = cert.fingerprint(hashes.SHA256()).hex()
        if got != fingerprint:
            raise ChainError(
                f"fleet CA: expected SHA-256 fingerprint {fingerprint}, the registrar at "
                f"{self._host}:{self._port} served {got}"
            )
        return cert.public_bytes(serialization.Encoding.PEM)

    def _request(
        self, method: str, path: str, body: object, context: ssl.SSLContext
    ) -> tuple[int, bytes]:
        conn = http.client.HTTPSConnection(
            self._host, self._port, timeout=self._timeout, context=context
        )
        try:
            headers = {"Accept": "application/json"}
            data = None
            if body is not None:
                data = json.dumps(body).encode()
                headers["Content-Type"] = "application/json"
            conn.request(method, path, body=data, headers=headers)
            response = conn.getresponse()
            return response.status, response.read()
        except (OSError, http.client.HTTPException) as err:
            raise RegistrarUnreachable(
                f"registrar {self._host}:{self._port}: {method} {path} failed: {err}"
            ) from err
        finally:
            conn.close()

    def _call(self, method: str, path: str, body: object, expect: int) -> Any:
        status, raw = self._request(method, path, body, self._context)
        try:
            obj = json.loads(raw)
        except ValueError as err:
            raise RegistrarUnreachable(f"{method} {path}: answer is not JSON ({status})") from err
        if status != expect:
            error = obj.get("error") if isinstance(obj, dict) else None
            if isinstance(error, dict):
                raise RegistrarRefused(str(error.get("id")), str(error.get("message")))
            raise RegistrarUnreachable(f"{method} {path}: expected {expect}, got {status}")
        return obj

    def ca_certificate(self) -> bytes:
        return self._ca_pem

    def start(self, body: Any) -> Any:
        return self._call("POST", "/v1/registrations", body, 201)

    def activate(self, challenge_id: str, body: Any) -> Any:
        return self._call("POST", f"/v1/registrations/{challenge_id}/activation", body, 200)


def _csr(
    host_id: str,
    tls_key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey,
    dns_names: tuple[str, ...],
    ip_addresses: tuple[str, ...],
) -> bytes:
    import ipaddress

    names: list[x509.GeneralName] = [x509.DNSName(n) for n in (host_id, *dns_names)]
    names += [x509.IPAddress(ipaddress.ip_address(a)) for a in ip_addresses]
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host_id)]))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .sign(tls_key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM)


def _spki(key: object) -> bytes:
    assert isinstance(key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey)
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _issued_by(cert: x509.Certificate, ca: x509.Certificate, what: str) -> None:
    try:
        cert.verify_directly_issued_by(ca)
    except (InvalidSignature, ValueError, TypeError) as err:
        raise ChainError(
            f"{what}: expected a certificate issued by the fleet CA "
            f"{ca.subject.rfc4514_string()!r}, got one from {cert.issuer.rfc4514_string()!r} "
            "that does not verify"
        ) from err


def _aik_extension(read: Callable[[x509.Certificate], bytes], cert: x509.Certificate) -> bytes:
    try:
        return read(cert)
    except ParseError as err:
        raise ChainError(f"AIK certificate: {err}") from err


def register_host(
    tpm: RegistrationTpm,
    registrar: RegistrarEndpoint,
    host_id: str,
    tls_key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey,
    *,
    dns_names: tuple[str, ...] = (),
    ip_addresses: tuple[str, ...] = (),
) -> Registration:
    """Admit this host (steps in the module docstring) and return its checked certificates.

    Args:
        tpm: the host TPM (its EKs with certificates, its AIK).
        registrar: the registrar, over HTTPS or in-process.
        host_id: this host's name in the fleet (a lower-case DNS name).
        tls_key: the host's mTLS private key (the caller keeps it).
        dns_names: extra DNS names for the mTLS certificate (the host id is always included).
        ip_addresses: IP addresses for the mTLS certificate.

    Raises:
        RegistrarRefused: the registrar refused (HTTPS); in embedded mode the registrar's own
            ``RegistrationRefused`` subclasses arrive unchanged.
        RegistrarUnreachable: transport failure or an answer outside the API.
        ChainError: the certificates returned are not what this host asked for.
    """
    endorsement_keys = []
    seen: set[str] = set()
    for index, der in tpm.ek_certificates():
        kind = EK_CERT_KINDS.get(index)
        if kind is None or kind in seen:
            continue
        seen.add(kind)
        endorsement_keys.append(
            {
                "kind": kind,
                "nv_index": index,
                "public": _b64(tpm.ek_public(kind)),
                "certificate": _b64(der),
            }
        )
    if not endorsement_keys:
        raise RegistrarRefused(
            "host.no_ek_certificate",
            "this TPM has no EK certificate in NV at a TCG index "
            f"({', '.join(f'0x{i:08x}' for i in EK_CERT_KINDS)})",
        )
    aik_public = tpm.aik_public()
    challenge = registrar.start(
        {"host_id": host_id, "endorsement_keys": endorsement_keys, "aik_public": _b64(aik_public)}
    )
    ek_kind = _field(challenge, "ek_kind")
    if ek_kind not in ("rsa", "ecc"):
        raise RegistrarUnreachable(f"registrar answer: unknown ek_kind {ek_kind!r}")
    secret = tpm.activate_credential(
        _b64field(challenge, "credential_blob"),
        _b64field(challenge, "encrypted_secret"),
        "rsa" if ek_kind == "rsa" else "ecc",
    )
    csr = _csr(host_id, tls_key, dns_names, ip_addresses)
    answer = registrar.activate(
        _field(challenge, "challenge_id"), {"secret": _b64(secret), "csr": csr.decode("ascii")}
    )
    return _check_answer(answer, registrar.ca_certificate(), host_id, aik_public, tpm, tls_key)


def _check_answer(
    answer: Any,
    trusted_ca_pem: bytes,
    host_id: str,
    aik_public: bytes,
    tpm: RegistrationTpm,
    tls_key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey,
) -> Registration:
    try:
        ca = x509.load_pem_x509_certificate(trusted_ca_pem)
        aik_cert = x509.load_pem_x509_certificate(_field(answer, "aik_certificate").encode())
        tls_cert = x509.load_pem_x509_certificate(_field(answer, "tls_certificate").encode())
        sent_ca = x509.load_pem_x509_certificate(_field(answer, "ca_certificate").encode())
    except ValueError as err:
        raise RegistrarUnreachable(
            f"registrar answer: a certificate does not parse ({err})"
        ) from err
    if sent_ca != ca:
        raise ChainError(
            "registrar answer: expected the fleet CA this host trusts "
            f"(sha256 {ca.fingerprint(hashes.SHA256()).hex()}), got another "
            f"(sha256 {sent_ca.fingerprint(hashes.SHA256()).hex()})"
        )
    _issued_by(aik_cert, ca, "AIK certificate")
    _issued_by(tls_cert, ca, "mTLS certificate")
    aik_key = public_key(TpmtPublic.unmarshal(aik_public))
    if _spki(aik_cert.public_key()) != _spki(aik_key):
        raise ChainError("AIK certificate: expected it to certify this host's AIK, got another key")
    aik_name = tpm.aik_name()
    got_name = _aik_extension(aik_name_from_certificate, aik_cert)
    if got_name != aik_name:
        raise ChainError(
            f"AIK certificate: expected TPM Name {aik_name.hex()}, got {got_name.hex()}"
        )
    if _aik_extension(aik_public_from_certificate, aik_cert) != aik_public:
        raise ChainError("AIK certificate: expected this AIK's TPMT_PUBLIC in its extension")
    if _spki(tls_cert.public_key()) != _spki(tls_key.public_key()):
        raise ChainError("mTLS certificate: expected it to certify this host's mTLS key")
    return Registration(
        host_id=host_id,
        aik_name=aik_name,
        aik_certificate=aik_cert.public_bytes(serialization.Encoding.PEM),
        tls_certificate=tls_cert.public_bytes(serialization.Encoding.PEM),
        ca_certificate=ca.public_bytes(serialization.Encoding.PEM),
    )
