"""The registrar's wire messages (API version 1): strict parsers for what hosts send.

Every request body is one JSON object; binary fields are standard base64 (padding required, no
whitespace); unknown keys, wrong types, oversized fields and bad encodings are
:class:`~evidence.errors.ParseError`, never a guess (STYLE.md: "Guessing at the trust boundary").

``POST /v1/registrations`` — :class:`RegistrationRequest`::

    {"host_id": "host-a.example",
     "endorsement_keys": [{"kind": "rsa"|"ecc", "nv_index": 29360130,
                           "public": <b64 TPMT_PUBLIC>, "certificate": <b64 DER>}, ...],
     "aik_public": <b64 TPMT_PUBLIC>}

    → 201 {"challenge_id": str, "ek_kind": "rsa"|"ecc", "credential_blob": <b64 TPM2B_ID_OBJECT>,
           "encrypted_secret": <b64 TPM2B_ENCRYPTED_SECRET>, "expires_at": ISO 8601}

``POST /v1/registrations/<challenge_id>/activation`` — :class:`ActivationRequest`::

    {"secret": <b64 credential from ActivateCredential>, "csr": <PEM PKCS#10 for the mTLS key>}

    → 200 {"host_id", "aik_name": hex, "aik_certificate": PEM, "tls_certificate": PEM,
           "ca_certificate": PEM}

Errors: 4xx/5xx ``{"error": {"id": <stable dotted id>, "message": str}}``.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from typing import Any, Literal

from evidence.errors import ParseError

__all__ = [
    "MAX_ENDORSEMENT_KEYS",
    "ActivationRequest",
    "EndorsementKey",
    "RegistrationRequest",
    "b64",
    "parse_activation_request",
    "parse_registration_request",
    "valid_host_id",
]

MAX_ENDORSEMENT_KEYS = 4
_MAX_PUBLIC = 1024
_MAX_CERTIFICATE = 8192
_MAX_CSR = 8192
_MAX_SECRET = 64
_HOST_ID = re.compile(
    r"^(?=.{1,253}$)[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*$"
)
_B64 = re.compile(r"^[A-Za-z0-9+/]*={0,2}$")


def valid_host_id(host_id: str) -> bool:
    """A host id is a lower-case DNS name (it becomes the certificates' CN and SAN)."""
    return bool(_HOST_ID.match(host_id))


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _fail(what: str, expected: str, got: str | None = None) -> ParseError:
    return ParseError(what, 0, expected, got, unit="field")


def _object(obj: object, what: str, keys: set[str]) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise _fail(what, "a JSON object", type(obj).__name__)
    unknown = set(obj) - keys
    missing = keys - set(obj)
    if unknown:
        raise _fail(
            what, f"only the keys {sorted(keys)}", f"unknown keys {sorted(map(str, unknown))}"
        )
    if missing:
        raise _fail(what, f"the keys {sorted(keys)}", f"missing {sorted(missing)}")
    return obj


def _bytes(obj: dict[str, Any], key: str, what: str, limit: int) -> bytes:
    value = obj[key]
    if not isinstance(value, str):
        raise _fail(f"{what}.{key}", "a base64 string", type(value).__name__)
    if len(value) > (limit + 2) // 3 * 4 or len(value) % 4 or not _B64.match(value):
        raise _fail(
            f"{what}.{key}",
            f"standard padded base64 of at most {limit} bytes",
            f"{len(value)} characters",
        )
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as err:
        raise _fail(f"{what}.{key}", "standard padded base64", str(err)) from err
    if not 1 <= len(data) <= limit:
        raise _fail(f"{what}.{key}", f"1 to {limit} bytes", f"{len(data)} bytes")
    return data


@dataclass(frozen=True)
class EndorsementKey:
    """One EK as the host presents it: its public area and the certificate from its NV index."""

    kind: Literal["rsa", "ecc"]
    nv_index: int
    public: bytes
    certificate: bytes

    def to_json(self) -> dict[str, object]:
        return {
            "kind": self.kind,
            "nv_index": self.nv_index,
            "public": b64(self.public),
            "certificate": b64(self.certificate),
        }


@dataclass(frozen=True)
class RegistrationRequest:
    """``POST /v1/registrations``: who the host is and which keys its TPM holds."""

    host_id: str
    endorsement_keys: tuple[EndorsementKey, ...]
    aik_public: bytes

    def to_json(self) -> dict[str, object]:
        return {
            "host_id": self.host_id,
            "endorsement_keys": [ek.to_json() for ek in self.endorsement_keys],
            "aik_public": b64(self.aik_public),
        }


@dataclass(frozen=True)
class ActivationRequest:
    """``POST /v1/registrations/<id>/activation``: the recovered secret and the mTLS CSR."""

    secret: bytes
    csr: bytes

    def to_json(self) -> dict[str, object]:
        return {"secret": b64(self.secret), "csr": self.csr.decode("ascii")}


def _endorsement_key(obj: object, what: str) -> EndorsementKey:
    o = _object(obj, what, {"kind", "nv_index", "public", "certificate"})
    kind = o["kind"]
    if kind not in ("rsa", "ecc"):
        raise _fail(f"{what}.kind", '"rsa" or "ecc"', repr(kind)[:40])
    index = o["nv_index"]
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index <= 0xFFFFFFFF:
        raise _fail(f"{what}.nv_index", "an NV index (0..2^32-1)", repr(index)[:40])
    return EndorsementKey(
        kind=kind,
        nv_index=index,
        public=_bytes(o, "public", what, _MAX_PUBLIC),
        certificate=_bytes(o, "certificate", what, _MAX_CERTIFICATE),
    )


def parse_registration_request(obj: object) -> RegistrationRequest:
    """Parse the JSON body of ``POST /v1/registrations`` (shape only, nothing trusted).

    Raises:
        ParseError: the body does not have exactly the documented shape.
    """
    what = "registration request"
    o = _object(obj, what, {"host_id", "endorsement_keys", "aik_public"})
    host_id = o["host_id"]
    if not isinstance(host_id, str) or not valid_host_id(host_id):
        raise _fail(f"{what}.host_id", "a lower-case DNS name", repr(host_id)[:80])
    eks = o["endorsement_keys"]
    if not isinstance(eks, list) or not 1 <= len(eks) <= MAX_ENDORSEMENT_KEYS:
        raise _fail(
            f"{what}.endorsement_keys",
            f"a list of 1 to {MAX_ENDORSEMENT_KEYS} endorsement keys",
            type(eks).__name__ if not isinstance(eks, list) else f"{len(eks)} entries",
        )
    parsed = tuple(_endorsement_key(e, f"{what}.endorsement_keys[{i}]") for i, e in enumerate(eks))
    return RegistrationRequest(
        host_id=host_id,
        endorsement_keys=parsed,
        aik_public=_bytes(o, "aik_public", what, _MAX_PUBLIC),
    )


def parse_activation_request(obj: object) -> ActivationRequest:
    """Parse the JSON body of ``POST /v1/registrations/<id>/activation``.

    Raises:
        ParseError: the body does not have exactly the documented shape.
    """
    what = "activation request"
    o = _object(obj, what, {"secret", "csr"})
    csr = o["csr"]
    if not isinstance(csr, str) or not csr.isascii() or not 0 < len(csr) <= _MAX_CSR:
        raise _fail(f"{what}.csr", f"a PEM string of at most {_MAX_CSR} characters")
    return ActivationRequest(secret=_bytes(o, "secret", what, _MAX_SECRET), csr=csr.encode("ascii"))
