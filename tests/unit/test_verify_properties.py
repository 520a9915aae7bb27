"""Properties of verify_bundle: a mutated bundle never verifies, and fails only with our errors.

Software-signed factory bundles (tests/helpers/evidence_factory.py). Every binary field is
covered by a signature, a certificate chain, a comparison with the verifier's expectations or a
replay, except the firmware event log's event *data*: replay covers the digests, not the bytes
the firmware chose to log (evidence.eventlog keeps them as ``untrusted_``), so the event log is
mutated only in its digests here.
"""

from __future__ import annotations

import base64
import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from evidence.bundle import encode_bundle, parse_bundle
from evidence.errors import ParseError, VtpmError
from evidence.eventlog import parse_tcg2_log
from evidence.verify import verify_bundle
from tests.helpers.evidence_factory import default_world

NONCE = b"\x33" * 32
WORLD = default_world()
TEXT = encode_bundle(WORLD.bundle(NONCE))
OPTS = WORLD.options(NONCE)
SETTINGS = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow], max_examples=300)

FIELDS: list[tuple[str, ...]] = [
    ("vm_uuid",),
    ("nonce",),
    ("cert_user",),
    ("attestation", "message"),
    ("attestation", "signature"),
    ("vaik", "public"),
    ("vaik", "certification", "attest"),
    ("vaik", "certification", "signature"),
    ("authkey", "public"),
    ("authkey", "certification", "attest"),
    ("authkey", "certification", "signature"),
    ("aik_certificates", 0),  # type: ignore[list-item]
    ("ima_list", "data"),
]


def _get(obj: Any, path: tuple[Any, ...]) -> Any:
    for key in path:
        obj = obj[key]
    return obj


def _set(obj: Any, path: tuple[Any, ...], value: Any) -> None:
    _get(obj, path[:-1])[path[-1]] = value


def _must_fail(doc: dict[str, Any]) -> None:
    try:
        raw = parse_bundle(json.dumps(doc))
    except ParseError:
        return
    try:
        verify_bundle(raw, OPTS)
    except VtpmError:
        return
    raise AssertionError("a mutated bundle verified")


def test_the_unmutated_bundle_verifies() -> None:
    verify_bundle(parse_bundle(TEXT), OPTS)


@SETTINGS
@given(st.sampled_from(FIELDS), st.data())
def test_a_flipped_byte_in_any_covered_field_fails(
    path: tuple[Any, ...], data: st.DataObject
) -> None:
    doc = json.loads(TEXT)
    raw = bytearray(base64.b64decode(_get(doc, path)))
    at = data.draw(st.integers(0, len(raw) - 1))
    raw[at] ^= data.draw(st.integers(1, 255))
    _set(doc, path, base64.b64encode(bytes(raw)).decode())
    _must_fail(doc)


def _digest_spans() -> list[tuple[int, int]]:
    """(offset, length) of every digest in the event log, found by parsing it."""
    log_bytes = base64.b64decode(json.loads(TEXT)["event_log"])
    spans = []
    for event in parse_tcg2_log(log_bytes).events[1:]:
        for bank, digest in event.digests.items():
            if bank != "sha256":  # only the signed bank is covered
                continue
            at = log_bytes.index(digest, event.offset)
            spans.append((at, len(digest)))
    return spans


SPANS = _digest_spans()


@SETTINGS
@given(st.sampled_from(SPANS), st.data())
def test_a_flipped_event_digest_fails(span: tuple[int, int], data: st.DataObject) -> None:
    doc = json.loads(TEXT)
    raw = bytearray(base64.b64decode(doc["event_log"]))
    at = span[0] + data.draw(st.integers(0, span[1] - 1))
    raw[at] ^= data.draw(st.integers(1, 255))
    doc["event_log"] = base64.b64encode(bytes(raw)).decode()
    _must_fail(doc)


@SETTINGS
@given(st.sampled_from(FIELDS), st.binary(max_size=64))
def test_any_replaced_field_fails(path: tuple[Any, ...], value: bytes) -> None:
    doc = json.loads(TEXT)
    if base64.b64decode(_get(doc, path)) == value:
        return
    _set(doc, path, base64.b64encode(value).decode())
    _must_fail(doc)
