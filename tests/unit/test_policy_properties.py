"""Reference-value readers on random and mutated JSON raise ParseError and nothing else."""

from __future__ import annotations

import contextlib
import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from evidence.errors import ParseError
from evidence.policy import (
    encode_reference_values,
    import_keylime_runtime_policy,
    learn_reference_values,
    parse_reference_values,
)
from evidence.verify import verify_bundle
from tests.helpers.evidence_factory import default_world
from tests.unit.test_policy import keylime_policy

SETTINGS = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow], max_examples=200)
NONCE = b"\x44" * 32
_WORLD = default_world()
REFS_TEXT = encode_reference_values(
    learn_reference_values(verify_bundle(_WORLD.bundle(NONCE), _WORLD.options(NONCE)))
)
KEYLIME_TEXT = json.dumps(keylime_policy())

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=20,
)


def _paths(obj: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(obj, dict):
        for key, value in obj.items():
            out += _paths(value, (*prefix, key))
    elif isinstance(obj, list):
        for i, value in enumerate(obj):
            out += _paths(value, (*prefix, i))
    return out


def _replace(text: str, path: tuple[Any, ...], value: object) -> str:
    doc = json.loads(text)
    if not path:
        return json.dumps(value)
    target = doc
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return json.dumps(doc)


@SETTINGS
@given(json_values)
def test_random_json(value: object) -> None:
    for reader in (parse_reference_values, import_keylime_runtime_policy):
        with contextlib.suppress(ParseError):
            reader(json.dumps(value))


@SETTINGS
@given(st.sampled_from(_paths(json.loads(REFS_TEXT))), json_values)
def test_mutated_reference_values(path: tuple[Any, ...], value: object) -> None:
    with contextlib.suppress(ParseError):
        parse_reference_values(_replace(REFS_TEXT, path, value))


@SETTINGS
@given(st.sampled_from(_paths(json.loads(KEYLIME_TEXT))), json_values)
def test_mutated_keylime_policies(path: tuple[Any, ...], value: object) -> None:
    with contextlib.suppress(ParseError):
        import_keylime_runtime_policy(_replace(KEYLIME_TEXT, path, value))


@SETTINGS
@given(st.binary(max_size=200))
def test_random_bytes(data: bytes) -> None:
    for reader in (parse_reference_values, import_keylime_runtime_policy):
        with contextlib.suppress(ParseError):
            reader(data)


@SETTINGS
@given(st.sampled_from(["pcrs", "events"]), st.text(max_size=4))
def test_any_pcr_key(section: str, key: str) -> None:
    doc = json.loads(REFS_TEXT)
    doc[section] = {key: ["00" * 32]}
    with contextlib.suppress(ParseError):
        refs = parse_reference_values(json.dumps(doc))
        assert list(getattr(refs, section)) == [int(key)] and key.isascii()
