"""evidence.bundle: the strict reader and canonical writer of vtpm-trust/evidence/1.

Bundles come from tests/helpers/evidence_factory.py (software-signed keys; see its docstring).
"""

from __future__ import annotations

import base64
import copy
import json
import secrets
from pathlib import Path
from typing import Any

import jsonschema  # type: ignore[import-untyped]
import pytest

from evidence.bundle import FORMAT, encode_bundle, parse_bundle
from evidence.errors import ParseError, TruncatedError, UnsupportedError
from tests.helpers.evidence_factory import default_world

SCHEMA_PATH = Path(__file__).resolve().parents[2] / "docs" / "evidence-bundle.schema.json"
NONCE = bytes(range(32))


@pytest.fixture(scope="module")
def text() -> str:
    return encode_bundle(default_world().bundle(NONCE))


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(SCHEMA_PATH.read_text())
    jsonschema.Draft202012Validator.check_schema(loaded)
    return loaded


def _obj(text: str) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(text)
    return loaded


def _parse_error(doc: object) -> ParseError:
    data = doc if isinstance(doc, str | bytes) else json.dumps(doc)
    with pytest.raises(ParseError) as info:
        parse_bundle(data)
    return info.value


# ---------------------------------------------------------------- round trips and schema


def test_factory_bundle_round_trips(text: str) -> None:
    raw = parse_bundle(text)
    assert encode_bundle(raw) == text
    assert parse_bundle(text.encode()) == raw
    assert raw.nonce == NONCE
    assert raw.message.nonce == NONCE
    assert raw.ima_format == "binary"
    assert raw.event_log is not None and raw.ima_list is not None


def test_canonical_text_is_sorted_compact_ascii(text: str) -> None:
    assert text == json.dumps(_obj(text), sort_keys=True, separators=(",", ":"))
    assert text.isascii()


def test_factory_bundles_match_the_json_schema(text: str, schema: dict[str, Any]) -> None:
    jsonschema.validate(_obj(text), schema)
    world = default_world()
    without_lists = encode_bundle(world.bundle(NONCE, event_log=None, ima_list=None))
    jsonschema.validate(_obj(without_lists), schema)


def test_schema_rejects_what_the_parser_rejects(text: str, schema: dict[str, Any]) -> None:
    validator = jsonschema.Draft202012Validator(schema)
    for mutate in (_unknown_field, _missing_field, _urlsafe_b64, _unpadded_b64, _other_format):
        doc = mutate(_obj(text))
        assert not validator.is_valid(doc), mutate.__name__
        with pytest.raises(ParseError):
            parse_bundle(json.dumps(doc))


def _unknown_field(doc: dict[str, Any]) -> dict[str, Any]:
    doc["vpcrs"] = {}
    return doc


def _missing_field(doc: dict[str, Any]) -> dict[str, Any]:
    del doc["vaik"]["certification"]
    return doc


def _urlsafe_b64(doc: dict[str, Any]) -> dict[str, Any]:
    doc["nonce"] = base64.urlsafe_b64encode(b"\xfb\xff" * 16).decode()
    return doc


def _unpadded_b64(doc: dict[str, Any]) -> dict[str, Any]:
    doc["vm_uuid"] = doc["vm_uuid"].rstrip("=")
    return doc


def _other_format(doc: dict[str, Any]) -> dict[str, Any]:
    doc["format"] = "vtpm-trust/evidence/2"
    return doc


# ---------------------------------------------------------------- format and shape errors


@pytest.mark.parametrize("fmt", ["vtpm-trust/evidence/2", "keylime/1", ""])
def test_unknown_format_is_a_clear_unsupported_error(text: str, fmt: str) -> None:
    doc = _obj(text)
    doc["format"] = fmt
    doc["added_in_v2"] = True  # a newer format's fields must not mask the format error
    err = _parse_error(doc)
    assert type(err) is UnsupportedError
    assert err.what == "$.format"
    assert FORMAT in str(err) and "newer" in str(err)


def test_missing_format() -> None:
    err = _parse_error({"vm_uuid": ""})
    assert err.what == "$.format"


@pytest.mark.parametrize(
    ("path", "expected_what"),
    [
        (("nonce",), "$.nonce"),
        (("attestation", "signature"), "$.attestation.signature"),
        (("authkey", "certification", "attest"), "$.authkey.certification.attest"),
        (("ima_list", "format"), "$.ima_list.format"),
    ],
)
def test_missing_field_names_its_json_path(
    text: str, path: tuple[str, ...], expected_what: str
) -> None:
    doc = _obj(text)
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    del parent[path[-1]]
    err = _parse_error(doc)
    assert err.what == expected_what
    assert "missing" in str(err)


@pytest.mark.parametrize("where", [(), ("vaik",), ("attestation",), ("ima_list",)])
def test_unknown_field_names_its_json_path(text: str, where: tuple[str, ...]) -> None:
    doc = _obj(text)
    parent = doc
    for key in where:
        parent = parent[key]
    parent["extra"] = "AA=="
    err = _parse_error(doc)
    assert err.what == "$" + "".join(f".{k}" for k in where) + ".extra"


@pytest.mark.parametrize(
    ("field", "value", "why"),
    [
        ("nonce", 42, "a base64 string"),
        ("nonce", "", "1..64 bytes"),
        ("nonce", base64.b64encode(b"x" * 65).decode(), "1..64 bytes"),
        ("vm_uuid", base64.b64encode(b"x" * 15).decode(), "16..16 bytes"),
        ("vm_uuid", " " + base64.b64encode(b"x" * 16).decode(), "base64"),
        ("vm_uuid", base64.b64encode(b"x" * 16).decode() + "\n", "base64"),
        ("nonce", "QR==", "canonical"),  # stray bits: b64decode would accept it as "A"
        ("nonce", "QQ", "base64"),
        ("nonce", "-_-_", "base64"),
        ("cert_user", "AAAA", "DER X.509"),
        ("aik_certificates", [], "1..8 certificates"),
        ("aik_certificates", "AAAA", "an array"),
        ("event_log", {}, "a base64 string"),
        ("ima_list", [], "a JSON object"),
        ("attestation", None, "a JSON object"),
    ],
)
def test_bad_values(text: str, field: str, value: object, why: str) -> None:
    doc = _obj(text)
    doc[field] = value
    err = _parse_error(doc)
    assert err.what.startswith(f"$.{field}")
    assert why in str(err)


def test_ima_format_must_be_declared_exactly(text: str) -> None:
    doc = _obj(text)
    doc["ima_list"]["format"] = "auto"
    assert _parse_error(doc).what == "$.ima_list.format"


def test_binary_fields_are_parsed_and_errors_carry_the_path(text: str) -> None:
    doc = _obj(text)
    sig = base64.b64decode(doc["attestation"]["signature"])
    doc["attestation"]["signature"] = base64.b64encode(sig[:-3]).decode()
    err = _parse_error(doc)
    assert type(err) is TruncatedError
    assert err.what.startswith("$.attestation.signature: TPMS_SIGNATURE_ECC")

    doc = _obj(text)
    doc["vaik"]["public"] = base64.b64encode(b"\x00\x08" + bytes(20)).decode()  # KEYEDHASH
    err = _parse_error(doc)
    assert type(err) is ParseError or type(err) is UnsupportedError
    assert err.what.startswith("$.vaik.public: TPMT_PUBLIC.type")

    doc = _obj(text)
    message = base64.b64decode(doc["attestation"]["message"])
    doc["attestation"]["message"] = base64.b64encode(b"\xffTCG" + message[4:]).decode()
    assert _parse_error(doc).what == "$.attestation.message: vPCR message.magic"

    doc = _obj(text)
    doc["event_log"] = base64.b64encode(b"\x00" * 10).decode()
    assert _parse_error(doc).what.startswith("$.event_log: ")

    doc = _obj(text)
    bad_entry = b"\x0a\x00\x00\x00" + bytes(20) + b"\xc8\x00\x00\x00" + b"x" * 200
    doc["ima_list"]["data"] = base64.b64encode(bad_entry).decode()  # a 200-byte template name
    assert _parse_error(doc).what.startswith("$.ima_list.data: ")


@pytest.mark.parametrize(
    "data",
    [
        b"\xff\xfe{}",
        "",
        "[]",
        "null",
        '{"format": "vtpm-trust/evidence/1", "format": "vtpm-trust/evidence/1"}',
        '{"format": NaN}',
        "[" * 100_000 + "]" * 100_000,
        '{"format": 1' + "0" * 5000 + "}",
    ],
    ids=["not-utf8", "empty", "array", "null", "duplicate-key", "nan", "deep", "huge-int"],
)
def test_hostile_json(data: str | bytes) -> None:
    _parse_error(data)


def test_oversized_input_is_refused_before_reading() -> None:
    err = _parse_error(b" " * (64 * 1024 * 1024 + 1))
    assert err.what == "$"


def test_parse_bundle_rejects_other_types() -> None:
    with pytest.raises(TypeError):
        parse_bundle(42)  # type: ignore[arg-type]


def test_every_field_copy_is_independent(text: str) -> None:
    """Two parses of the same text are equal; a changed byte anywhere changes the parse."""
    doc = copy.deepcopy(_obj(text))
    doc["nonce"] = base64.b64encode(secrets.token_bytes(32)).decode()
    assert parse_bundle(json.dumps(doc)) != parse_bundle(text)


def test_certificate_with_an_invalid_version_is_a_parse_error(text: str) -> None:
    """cryptography raises x509.InvalidVersion (not a ValueError) for version 4: found by
    tests/unit/test_verify_properties.py."""
    doc = _obj(text)
    der = bytearray(base64.b64decode(doc["cert_user"]))
    at = der.index(b"\xa0\x03\x02\x01\x02") + 4  # [0] EXPLICIT Version ::= INTEGER v3 (2)
    der[at] = 3
    doc["cert_user"] = base64.b64encode(bytes(der)).decode()
    err = _parse_error(doc)
    assert err.what == "$.cert_user" and "X509 version" in str(err)


def test_certificate_fields_cryptography_reads_lazily_are_checked_at_parse(text: str) -> None:
    """A subject with a wrong ASN.1 tag parses as a certificate but fails on first use: found by
    tests/unit/test_verify_properties.py; it must be a ParseError of parse_bundle."""
    doc = _obj(text)
    der = bytearray(base64.b64decode(doc["cert_user"]))
    at = der.index(b"\x06\x03\x55\x04\x03") + 5  # CN attribute: the string tag after the OID
    der[at] = 0x0D  # RELATIVE-OID instead of UTF8String
    doc["cert_user"] = base64.b64encode(bytes(der)).decode()
    assert _parse_error(doc).what == "$.cert_user"


def test_certificate_serial_must_be_positive(text: str) -> None:
    """RFC 5280 §4.1.2.2; cryptography 50 only warns about it. Found by the property tests."""
    doc = _obj(text)
    der = bytearray(base64.b64decode(doc["cert_user"]))
    at = der.index(b"\xa0\x03\x02\x01\x02") + 5  # the serialNumber INTEGER follows the version
    assert der[at] == 0x02
    der[at + 2] |= 0x80  # sign bit: a negative serial
    doc["cert_user"] = base64.b64encode(bytes(der)).decode()
    with pytest.warns(Warning):
        err = _parse_error(doc)
    assert err.what == "$.cert_user" and "positive serial" in str(err)
