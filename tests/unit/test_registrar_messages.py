"""The registrar's request parsers (verifier/registrar/messages.py) on hostile JSON.

Whatever a client sends, a parser returns a request of exactly the documented shape or raises
ParseError (invariant 4): hypothesis feeds arbitrary JSON values and mutated valid requests.
"""

from __future__ import annotations

import base64
import contextlib
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from evidence.errors import ParseError
from verifier.registrar.messages import (
    ActivationRequest,
    EndorsementKey,
    RegistrationRequest,
    parse_activation_request,
    parse_registration_request,
    valid_host_id,
)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=5)
    ),
    max_leaves=20,
)
labels = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True)
host_ids = st.lists(labels, min_size=1, max_size=3).map(".".join)
blobs = st.binary(min_size=1, max_size=300)
endorsement_keys = st.builds(
    EndorsementKey,
    kind=st.sampled_from(["rsa", "ecc"]),
    nv_index=st.integers(0, 0xFFFFFFFF),
    public=blobs,
    certificate=blobs,
)
requests = st.builds(
    RegistrationRequest,
    host_id=host_ids,
    endorsement_keys=st.lists(endorsement_keys, min_size=1, max_size=4).map(tuple),
    aik_public=blobs,
)


@given(requests)
def test_registration_request_round_trips(request: RegistrationRequest) -> None:
    wire = json.loads(json.dumps(request.to_json()))
    assert parse_registration_request(wire) == request


@given(st.binary(min_size=1, max_size=64), st.text(alphabet="ABCDEF-\n", min_size=1, max_size=50))
def test_activation_request_round_trips(secret: bytes, csr: str) -> None:
    request = ActivationRequest(secret=secret, csr=csr.encode())
    assert parse_activation_request(json.loads(json.dumps(request.to_json()))) == request


@settings(max_examples=300)
@given(json_values)
def test_arbitrary_json_is_parsed_or_refused_with_parse_error(value: Any) -> None:
    for parse in (parse_registration_request, parse_activation_request):
        with contextlib.suppress(ParseError):
            parse(value)


def _mutations(obj: Any) -> st.SearchStrategy[Any]:
    """Replace one leaf or one key of ``obj`` with an arbitrary JSON value, or drop one key."""
    paths: list[tuple[Any, ...]] = []

    def walk(node: Any, path: tuple[Any, ...]) -> None:
        paths.append(path)
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, (*path, k))
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, (*path, i))

    walk(obj, ())

    def apply(path: tuple[Any, ...], value: Any, drop: bool) -> Any:
        copy = json.loads(json.dumps(obj))
        if not path:
            return value
        parent = copy
        for step in path[:-1]:
            parent = parent[step]
        if drop and isinstance(parent, dict):
            del parent[path[-1]]
        else:
            parent[path[-1]] = value
        return copy

    return st.builds(apply, st.sampled_from(paths), json_values, st.booleans())


_VALID = RegistrationRequest(
    host_id="host-a",
    endorsement_keys=(EndorsementKey("ecc", 0x01C00016, b"\x00\x23" * 10, b"\x30\x82" * 10),),
    aik_public=b"\x00\x23" * 10,
).to_json()


@settings(max_examples=300)
@given(_mutations(_VALID))
def test_mutated_requests_parse_to_the_documented_shape_or_fail(value: Any) -> None:
    try:
        request = parse_registration_request(value)
    except ParseError:
        return
    assert valid_host_id(request.host_id)
    assert 1 <= len(request.endorsement_keys) <= 4
    assert all(ek.kind in ("rsa", "ecc") for ek in request.endorsement_keys)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"host_id": "Host_A"}, "host_id"),
        ({"host_id": "a" * 254}, "host_id"),
        ({"aik_public": "AAA"}, "aik_public"),  # unpadded
        ({"aik_public": "AA AA=="}, "aik_public"),  # whitespace
        ({"aik_public": ""}, "aik_public"),
        ({"aik_public": base64.b64encode(b"x" * 1025).decode()}, "aik_public"),
        ({"endorsement_keys": []}, "endorsement_keys"),
        ({"endorsement_keys": [_VALID["endorsement_keys"][0]] * 5}, "endorsement_keys"),
        ({"extra": 1}, "unknown keys"),
    ],
)
def test_named_hostile_requests(change: dict[str, Any], field: str) -> None:
    with pytest.raises(ParseError, match=field):
        parse_registration_request({**_VALID, **change})


@pytest.mark.parametrize(
    "ek",
    [
        {"kind": "dsa"},
        {"nv_index": -1},
        {"nv_index": True},
        {"nv_index": 2**32},
        {"certificate": None},
    ],
)
def test_named_hostile_endorsement_keys(ek: dict[str, Any]) -> None:
    good = _VALID["endorsement_keys"][0]
    with pytest.raises(ParseError, match="endorsement_keys"):
        parse_registration_request({**_VALID, "endorsement_keys": [{**good, **ek}]})
