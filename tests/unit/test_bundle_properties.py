"""parse_bundle on random and mutated input raises ParseError and nothing else (invariant 4).

Mutations start from a software-signed factory bundle (tests/helpers/evidence_factory.py).
"""

from __future__ import annotations

import base64
import contextlib
import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from evidence.bundle import encode_bundle, parse_bundle
from evidence.errors import ParseError
from tests.helpers.evidence_factory import default_world

NONCE = b"\x5a" * 32
TEXT = encode_bundle(default_world().bundle(NONCE))
SETTINGS = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow], max_examples=150)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=20,
)


def _only_parse_errors(data: str | bytes) -> None:
    with contextlib.suppress(ParseError):
        parse_bundle(data)


@SETTINGS
@given(json_values)
def test_random_json_raises_only_parse_errors(value: object) -> None:
    _only_parse_errors(json.dumps(value))


@SETTINGS
@given(st.binary(max_size=300))
def test_random_bytes_raise_only_parse_errors(data: bytes) -> None:
    _only_parse_errors(data)


def _paths(obj: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(obj, dict):
        for key, value in obj.items():
            out += _paths(value, (*prefix, key))
    elif isinstance(obj, list):
        for i, value in enumerate(obj):
            out += _paths(value, (*prefix, i))
    return out


def _get(obj: Any, path: tuple[Any, ...]) -> Any:
    for key in path:
        obj = obj[key]
    return obj


def _set(obj: Any, path: tuple[Any, ...], value: Any) -> None:
    _get(obj, path[:-1])[path[-1]] = value


ALL_PATHS = _paths(json.loads(TEXT))[1:]
STRING_PATHS = [p for p in ALL_PATHS if isinstance(_get(json.loads(TEXT), p), str)]
BINARY_PATHS = [p for p in STRING_PATHS if p not in (("format",), ("ima_list", "format"))]


@SETTINGS
@given(st.sampled_from(ALL_PATHS), json_values)
def test_a_field_replaced_by_any_json_raises_only_parse_errors(
    path: tuple[Any, ...], value: object
) -> None:
    doc = json.loads(TEXT)
    _set(doc, path, value)
    _only_parse_errors(json.dumps(doc))


@SETTINGS
@given(st.sampled_from(BINARY_PATHS), st.data())
def test_mutated_binary_fields_raise_only_parse_errors(
    path: tuple[Any, ...], data: st.DataObject
) -> None:
    """Flip, cut or extend the decoded bytes of one binary field, re-encode, parse."""
    doc = json.loads(TEXT)
    raw = bytearray(base64.b64decode(_get(doc, path)))
    action = data.draw(st.sampled_from(["flip", "cut", "extend"]))
    if action == "flip" and raw:
        at = data.draw(st.integers(0, len(raw) - 1))
        raw[at] ^= data.draw(st.integers(1, 255))
    elif action == "cut":
        del raw[data.draw(st.integers(0, len(raw))) :]
    else:
        raw += data.draw(st.binary(min_size=1, max_size=8))
    _set(doc, path, base64.b64encode(bytes(raw)).decode())
    _only_parse_errors(json.dumps(doc))


@SETTINGS
@given(st.data())
def test_mutated_text_raises_only_parse_errors(data: st.DataObject) -> None:
    text = bytearray(TEXT.encode())
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(text) - 1))
        text[at] = data.draw(st.integers(0, 255))
    _only_parse_errors(bytes(text))
