"""The evidence bundle ``vtpm-trust/evidence/1``: one JSON document per attestation.

The guest agent prints it, the verifier reads it (ARCHITECTURE.md §4). Its JSON Schema is
``docs/evidence-bundle.schema.json``; this module is the strict reader and the canonical writer.

Layout (every binary field is a base64 string, RFC 4648 §4 standard alphabet with padding)::

    {
      "format": "vtpm-trust/evidence/1",
      "vm_uuid": b64(16 bytes, RFC 4122 order),
      "nonce": b64(1..64 bytes),                  the verifier's nonce
      "cert_user": b64(DER X.509),               the tenant's certificate
      "attestation": {"message": b64,            the canonical vPCR message (evidence.attestation)
                      "signature": b64},         TPMT_SIGNATURE by the vAIK (TPM2_Sign)
      "vaik":    {"public": b64,                 TPMT_PUBLIC
                  "certification": {"attest": b64, "signature": b64}},   CertvAIK (by AuthKey)
      "authkey": {"public": b64,
                  "certification": {"attest": b64, "signature": b64}},   CertAuthKey (by the AIK)
      "aik_certificates": [b64, ...],           DER: the host's AIK certificate first (it
                                                 carries the AIK's TPMT_PUBLIC), then any
                                                 intermediates towards the fleet CA
      "event_log": b64 | null,                   binary_bios_measurements, as read
      "ima_list": {"format": "binary" | "ascii", "data": b64} | null
    }

The vPCR bank and values live inside the signed ``attestation.message``; they are not repeated,
so nothing a reader sees can differ from what was signed. ``vm_uuid`` and ``nonce`` are repeated
at the top for a readable document and a precise early error; :func:`evidence.verify.verify_bundle`
checks they equal the signed ones.

Strictness (STYLE.md: no guessing at the trust boundary): the text must be UTF-8 JSON with no
duplicate keys and no NaN/Infinity; every field listed is required (``null`` where shown) and no
other field is allowed; base64 must be exactly what ``base64.b64encode`` would produce (no
whitespace, no URL-safe alphabet, no missing padding, no stray bits). Every binary field is then
parsed by its own codec (TPM structures, X.509, event log, IMA list). Any problem raises a
:class:`~evidence.errors.ParseError` whose ``what`` is the JSON path (``$.aik_certificates[1]``);
a ``format`` other than ``vtpm-trust/evidence/1`` raises
:class:`~evidence.errors.UnsupportedError` before anything else is read.
"""

from __future__ import annotations

import base64
import binascii
import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal, NoReturn, cast

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm

from evidence.attestation import (
    MAX_NONCE_SIZE,
    AttestationMessage,
    parse_attestation_message,
)
from evidence.errors import ParseError, TruncatedError, UnsupportedError
from evidence.eventlog import RawEventLog, parse_tcg2_log
from evidence.ima import RawImaList, parse_ima_list
from evidence.tpm2 import TpmsAttest, TpmtPublic, TpmtSignature

__all__ = [
    "FORMAT",
    "MAX_AIK_CERTIFICATES",
    "MAX_BUNDLE_SIZE",
    "RawBundle",
    "RawCertification",
    "encode_bundle",
    "make_bundle",
    "parse_bundle",
]

FORMAT: Final = "vtpm-trust/evidence/1"
"""The one format this module reads and writes."""
MAX_BUNDLE_SIZE: Final = 64 * 1024 * 1024
"""Largest bundle text accepted (a 100,000-entry IMA list is about 15 MiB in base64)."""
MAX_AIK_CERTIFICATES: Final = 8
"""Longest AIK certificate chain accepted (the certificate plus intermediates)."""

ImaFormat = Literal["binary", "ascii"]

# What cryptography raises for a certificate it cannot read (load, extensions, signature hash).
_X509_ERRORS: Final = (
    ValueError,
    x509.InvalidVersion,
    x509.DuplicateExtension,
    UnsupportedAlgorithm,
)

_TOP: Final = frozenset(
    {
        "format",
        "vm_uuid",
        "nonce",
        "cert_user",
        "attestation",
        "vaik",
        "authkey",
        "aik_certificates",
        "event_log",
        "ima_list",
    }
)


@dataclass(frozen=True)
class RawCertification:
    """A TPM2_Certify result: the signed TPMS_ATTEST bytes, parsed, and the TPMT_SIGNATURE."""

    attest_bytes: bytes
    attest: TpmsAttest
    signature: TpmtSignature


@dataclass(frozen=True)
class RawBundle:
    """A parsed evidence bundle. Nothing here is trusted: see :func:`evidence.verify.verify_bundle`.

    Binary fields are kept as the exact bytes that arrived (signatures are checked over them)
    beside their parsed form.

    Attributes:
        vm_uuid: the VM the bundle claims to be about.
        nonce: the nonce the bundle claims to answer.
        cert_user: DER of the tenant certificate the bundle names (``cert_user_certificate``
            parsed).
        message_bytes: the signed vPCR message; ``message`` its decoding.
        message_signature: the vAIK's TPMT_SIGNATURE over ``message_bytes``.
        vaik_public, authkey_public: TPMT_PUBLIC of each key (the AIK's is inside its
            certificate, see :mod:`evidence.verify`).
        cert_vaik: CertvAIK (vAIK certified by AuthKey).
        cert_authkey: CertAuthKey (AuthKey certified by the AIK).
        aik_certificates: the AIK certificate, then intermediates (DER bytes and parsed).
        event_log_bytes, event_log: the firmware event log, or None.
        ima_format, ima_list_bytes, ima_list: the IMA measurement list, or None.
    """

    vm_uuid: uuid.UUID
    nonce: bytes
    cert_user: bytes
    cert_user_certificate: x509.Certificate
    message_bytes: bytes
    message: AttestationMessage
    message_signature: TpmtSignature
    vaik_public: TpmtPublic
    cert_vaik: RawCertification
    authkey_public: TpmtPublic
    cert_authkey: RawCertification
    aik_certificates_der: tuple[bytes, ...]
    aik_certificates: tuple[x509.Certificate, ...]
    event_log_bytes: bytes | None
    event_log: RawEventLog | None
    ima_format: ImaFormat | None
    ima_list_bytes: bytes | None
    ima_list: RawImaList | None


# --------------------------------------------------------------------------------------------
# Errors and JSON shape


def _fail(path: str, expected: str, got: str | None = None) -> NoReturn:
    err = ParseError(path, 0, expected, got, unit="path")
    err.args = (f"evidence bundle {path}: expected {expected}" + (f", got {got}" if got else ""),)
    raise err


def _kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _object(value: object, path: str, fields: frozenset[str]) -> dict[str, Any]:
    if not isinstance(value, dict):
        _fail(path, "a JSON object", _kind(value))
    for name in sorted(fields - value.keys()):
        _fail(f"{path}.{name}", "this required field", "nothing (missing)")
    for name in sorted(value.keys() - fields):
        _fail(f"{path}.{name}", f"no such field (known: {', '.join(sorted(fields))})", "one")
    return value


def _b64(value: object, path: str, *, min_size: int = 0, max_size: int | None = None) -> bytes:
    if not isinstance(value, str):
        _fail(path, "a base64 string", _kind(value))
    try:  # base64.b64decode(value, validate=True) without copying value to bytes first
        data = binascii.a2b_base64(value, strict_mode=True)
    except (UnicodeEncodeError, binascii.Error, ValueError):
        _fail(path, "standard padded base64 (RFC 4648 §4)", "other characters or bad padding")
    if not _canonical_b64(value, data):
        _fail(path, "canonical standard padded base64 (RFC 4648 §4)", "a non-canonical encoding")
    if len(data) < min_size or (max_size is not None and len(data) > max_size):
        bounds = f"{min_size}..{max_size}" if max_size is not None else f"at least {min_size}"
        _fail(path, f"{bounds} bytes", f"{len(data)} bytes")
    return data


def _canonical_b64(value: str, data: bytes) -> bool:
    """Whether ``value`` is ``base64.b64encode(data)``, given that ``data`` is its strict decoding.

    The strict decoder (``validate=True``) already refuses characters outside the alphabet and
    padding anywhere but at the end, so only the stray bits of the last quantum and the length
    are left to check: re-encoding that quantum costs nothing next to re-encoding a large IMA
    list (tests/unit/test_bundle_b64.py compares this with the full re-encoding).
    """
    if len(value) % 4:
        return False
    if not value:
        return not data
    tail = data[3 * (len(value) // 4 - 1) :]
    return base64.b64encode(tail).decode("ascii") == value[-4:]


def _nested(err: ParseError, path: str) -> NoReturn:
    """Re-raise a codec's ParseError (same class) with the JSON path in front of its ``what``."""
    cls = type(err) if type(err) in (ParseError, TruncatedError, UnsupportedError) else ParseError
    raise cls(f"{path}: {err.what}", err.offset, err.expected, err.got, unit=err.unit) from err


def _certificate(value: object, path: str) -> tuple[bytes, x509.Certificate]:
    der = _b64(value, path, min_size=1)
    try:
        cert = x509.load_der_x509_certificate(der)
        # cryptography parses these lazily: read each now, so a bad one is a ParseError here and
        # not an exception out of the verifier later.
        cert.subject.rfc4514_string()
        cert.issuer.rfc4514_string()
        _ = cert.not_valid_before_utc, cert.not_valid_after_utc, cert.serial_number
        _ = cert.extensions, cert.signature_hash_algorithm, cert.public_key()
    except _X509_ERRORS as err:
        _fail(path, "a DER X.509 certificate", f"one that does not parse ({err})")
    if cert.serial_number <= 0:  # RFC 5280 §4.1.2.2; cryptography only warns (for now)
        _fail(path, "a certificate with a positive serial number", str(cert.serial_number))
    return der, cert


def _certification(value: object, path: str) -> RawCertification:
    obj = _object(value, path, frozenset({"attest", "signature"}))
    attest_bytes = _b64(obj["attest"], f"{path}.attest", min_size=1)
    sig_bytes = _b64(obj["signature"], f"{path}.signature", min_size=1)
    try:
        attest = TpmsAttest.unmarshal(attest_bytes)
    except ParseError as err:
        _nested(err, f"{path}.attest")
    try:
        signature = TpmtSignature.unmarshal(sig_bytes)
    except ParseError as err:
        _nested(err, f"{path}.signature")
    return RawCertification(attest_bytes, attest, signature)


def _public(value: object, path: str) -> TpmtPublic:
    data = _b64(value, path, min_size=1)
    try:
        return TpmtPublic.unmarshal(data)
    except ParseError as err:
        _nested(err, path)


def _from_obj(obj: object) -> RawBundle:
    if not isinstance(obj, dict):
        _fail("$", "a JSON object", _kind(obj))
    if "format" not in obj:
        _fail("$.format", f'"{FORMAT}"', "nothing (missing)")
    fmt = obj["format"]
    if fmt != FORMAT:
        got = json.dumps(fmt) if isinstance(fmt, str) else _kind(fmt)
        err = UnsupportedError("$.format", 0, f'"{FORMAT}"', got, unit="path")
        err.args = (
            f"evidence bundle $.format: this verifier reads format {FORMAT}, got {got}; "
            "a newer format needs a newer vtpm-verify",
        )
        raise err
    top = _object(obj, "$", _TOP)
    vm_uuid = uuid.UUID(bytes=_b64(top["vm_uuid"], "$.vm_uuid", min_size=16, max_size=16))
    nonce = _b64(top["nonce"], "$.nonce", min_size=1, max_size=MAX_NONCE_SIZE)
    cert_user, cert_user_certificate = _certificate(top["cert_user"], "$.cert_user")

    att = _object(top["attestation"], "$.attestation", frozenset({"message", "signature"}))
    message_bytes = _b64(att["message"], "$.attestation.message", min_size=1)
    try:
        message = parse_attestation_message(message_bytes)
    except ParseError as err:
        _nested(err, "$.attestation.message")
    sig_bytes = _b64(att["signature"], "$.attestation.signature", min_size=1)
    try:
        message_signature = TpmtSignature.unmarshal(sig_bytes)
    except ParseError as err:
        _nested(err, "$.attestation.signature")

    keys: dict[str, tuple[TpmtPublic, RawCertification]] = {}
    for name in ("vaik", "authkey"):
        key = _object(top[name], f"$.{name}", frozenset({"public", "certification"}))
        keys[name] = (
            _public(key["public"], f"$.{name}.public"),
            _certification(key["certification"], f"$.{name}.certification"),
        )

    certs = top["aik_certificates"]
    if not isinstance(certs, list) or not 1 <= len(certs) <= MAX_AIK_CERTIFICATES:
        _fail(
            "$.aik_certificates",
            f"an array of 1..{MAX_AIK_CERTIFICATES} certificates",
            f"{len(certs)} entries" if isinstance(certs, list) else _kind(certs),
        )
    chain = [_certificate(c, f"$.aik_certificates[{i}]") for i, c in enumerate(certs)]

    event_log_bytes: bytes | None = None
    event_log: RawEventLog | None = None
    if top["event_log"] is not None:
        event_log_bytes = _b64(top["event_log"], "$.event_log", min_size=1)
        try:
            event_log = parse_tcg2_log(event_log_bytes)
        except ParseError as err:
            _nested(err, "$.event_log")

    ima_format: ImaFormat | None = None
    ima_bytes: bytes | None = None
    ima_list: RawImaList | None = None
    if top["ima_list"] is not None:
        ima = _object(top["ima_list"], "$.ima_list", frozenset({"format", "data"}))
        if ima["format"] not in ("binary", "ascii"):
            _fail("$.ima_list.format", '"binary" or "ascii"', json.dumps(ima["format"]))
        ima_format = cast(ImaFormat, ima["format"])
        ima_bytes = _b64(ima["data"], "$.ima_list.data")
        try:
            ima_list = parse_ima_list(ima_bytes, ima_format)
        except ParseError as err:
            _nested(err, "$.ima_list.data")

    return RawBundle(
        vm_uuid=vm_uuid,
        nonce=nonce,
        cert_user=cert_user,
        cert_user_certificate=cert_user_certificate,
        message_bytes=message_bytes,
        message=message,
        message_signature=message_signature,
        vaik_public=keys["vaik"][0],
        cert_vaik=keys["vaik"][1],
        authkey_public=keys["authkey"][0],
        cert_authkey=keys["authkey"][1],
        aik_certificates_der=tuple(der for der, _ in chain),
        aik_certificates=tuple(cert for _, cert in chain),
        event_log_bytes=event_log_bytes,
        event_log=event_log,
        ima_format=ima_format,
        ima_list_bytes=ima_bytes,
        ima_list=ima_list,
    )


# --------------------------------------------------------------------------------------------
# Public API


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


class _DuplicateKey(ValueError):
    def __init__(self, key: str) -> None:
        self.key = key
        super().__init__(key)


def _reject_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not JSON")


def parse_bundle(text: str | bytes) -> RawBundle:
    """Parse an evidence bundle strictly (rules in the module docstring). Checks shape, never truth.

    Args:
        text: the bundle as printed by ``vtpm-guest quote`` (str, or UTF-8 bytes).

    Returns:
        The bundle with every field decoded and parsed; unverified.

    Raises:
        UnsupportedError: ``$.format`` is not ``vtpm-trust/evidence/1``, or a codec met a variant
            it does not handle (``what`` starts with the JSON path).
        TruncatedError: a binary field ends inside its structure.
        ParseError: anything else malformed; ``what`` is the JSON path.
    """
    if isinstance(text, bytes | bytearray):
        if len(text) > MAX_BUNDLE_SIZE:
            _fail("$", f"at most {MAX_BUNDLE_SIZE} bytes", f"{len(text)} bytes")
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError as err:
            raise ParseError("evidence bundle", err.start, "UTF-8 text", "invalid UTF-8") from err
    elif not isinstance(text, str):
        raise TypeError(f"parse_bundle takes str or bytes, got {type(text).__name__}")
    if len(text) > MAX_BUNDLE_SIZE:
        _fail("$", f"at most {MAX_BUNDLE_SIZE} characters", f"{len(text)}")
    try:
        obj = json.loads(
            text, object_pairs_hook=_reject_duplicates, parse_constant=_reject_constant
        )
    except json.JSONDecodeError as err:
        raise ParseError("evidence bundle", err.pos, "JSON text", err.msg) from err
    except _DuplicateKey as err:
        _fail(f"key {json.dumps(err.key)}", "each key once per object", "a duplicate")
    except RecursionError as err:
        raise ParseError("evidence bundle", 0, "JSON nested a few levels deep", "deeper") from err
    except ValueError as err:  # NaN/Infinity, over-long integers
        raise ParseError("evidence bundle", 0, "JSON text", str(err)) from err
    return _from_obj(obj)


def _b64s(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _certification_obj(cert: RawCertification) -> dict[str, str]:
    return {"attest": _b64s(cert.attest_bytes), "signature": _b64s(cert.signature.marshal())}


def _to_obj(raw: RawBundle) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "vm_uuid": _b64s(raw.vm_uuid.bytes),
        "nonce": _b64s(raw.nonce),
        "cert_user": _b64s(raw.cert_user),
        "attestation": {
            "message": _b64s(raw.message_bytes),
            "signature": _b64s(raw.message_signature.marshal()),
        },
        "vaik": {
            "public": _b64s(raw.vaik_public.marshal()),
            "certification": _certification_obj(raw.cert_vaik),
        },
        "authkey": {
            "public": _b64s(raw.authkey_public.marshal()),
            "certification": _certification_obj(raw.cert_authkey),
        },
        "aik_certificates": [_b64s(der) for der in raw.aik_certificates_der],
        "event_log": None if raw.event_log_bytes is None else _b64s(raw.event_log_bytes),
        "ima_list": (
            None
            if raw.ima_list_bytes is None
            else {"format": raw.ima_format, "data": _b64s(raw.ima_list_bytes)}
        ),
    }


def encode_bundle(raw: RawBundle) -> str:
    """The canonical text of ``raw``: JSON, keys sorted, no insignificant whitespace, ASCII.

    ``parse_bundle(encode_bundle(b)) == b`` and ``encode_bundle(parse_bundle(t))`` is ``t`` for
    any canonical ``t``.
    """
    return json.dumps(_to_obj(raw), sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def make_bundle(
    *,
    vm_uuid: uuid.UUID,
    nonce: bytes,
    cert_user: bytes,
    attestation_message: bytes,
    attestation_signature: bytes,
    vaik_public: bytes,
    cert_vaik: tuple[bytes, bytes],
    authkey_public: bytes,
    cert_authkey: tuple[bytes, bytes],
    aik_certificates: Sequence[bytes],
    event_log: bytes | None,
    ima_list: bytes | None,
    ima_format: ImaFormat = "binary",
) -> RawBundle:
    """Build a bundle from its binary parts (what the host and guest produce), parsed as
    :func:`parse_bundle` would parse it.

    Args:
        cert_vaik, cert_authkey: ``(TPMS_ATTEST bytes, TPMT_SIGNATURE bytes)`` of TPM2_Certify.
        aik_certificates: DER, the AIK certificate first.
        Everything else: as in the module docstring; marshalled TPMT_PUBLIC for keys.

    Raises:
        ParseError: a part does not parse (``what`` names its JSON path).
    """
    obj = {
        "format": FORMAT,
        "vm_uuid": _b64s(vm_uuid.bytes),
        "nonce": _b64s(nonce),
        "cert_user": _b64s(cert_user),
        "attestation": {
            "message": _b64s(attestation_message),
            "signature": _b64s(attestation_signature),
        },
        "vaik": {
            "public": _b64s(vaik_public),
            "certification": {"attest": _b64s(cert_vaik[0]), "signature": _b64s(cert_vaik[1])},
        },
        "authkey": {
            "public": _b64s(authkey_public),
            "certification": {
                "attest": _b64s(cert_authkey[0]),
                "signature": _b64s(cert_authkey[1]),
            },
        },
        "aik_certificates": [_b64s(der) for der in aik_certificates],
        "event_log": None if event_log is None else _b64s(event_log),
        "ima_list": None if ima_list is None else {"format": ima_format, "data": _b64s(ima_list)},
    }
    return _from_obj(obj)
