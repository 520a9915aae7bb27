"""Record sealing of the trusted store, with a data key passed directly (no TPM, no database).

Covers the cryptographic half of issue 3's store refusals: a tampered, swapped, moved, retyped
or truncated record ciphertext, and a forged store head, each raise StoreIntegrityError naming
the record and what failed — and hypothesis checks that nothing else is ever raised.
"""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from host_agent.store.cipher import (
    NONCE_BYTES,
    TAG_BYTES,
    HeadFields,
    Manifest,
    PayloadKind,
    StoreCipher,
    canonical_json,
    decode_payload,
    encode_payload,
    manifest_digest,
    record_aad,
    row_digest,
)
from host_agent.store.errors import StoreIntegrityError

KEY = bytes(range(32))
STORE_ID = b"S" * 16
NONCE = b"\x01" * NONCE_BYTES
SECRET = b"vTPM state blob: do not leak 0123456789"


@pytest.fixture
def cipher() -> StoreCipher:
    return StoreCipher(KEY, STORE_ID)


def _sealed(cipher: StoreCipher, record_type: str = "seal", record_id: str = "vm-1") -> bytes:
    return cipher.encrypt(record_type, record_id, encode_payload(SECRET), NONCE)


def test_round_trip_bytes_and_json(cipher: StoreCipher) -> None:
    ct = _sealed(cipher)
    assert SECRET not in ct
    assert len(ct) == 1 + len(SECRET) + TAG_BYTES
    kind, body = decode_payload(cipher.decrypt("seal", "vm-1", NONCE, ct), "seal", "vm-1")
    assert (kind, body) == (PayloadKind.BYTES, SECRET)

    doc = {"uuid": "a", "n": 1, "nested": {"z": [1, 2], "a": None}}
    ct = cipher.encrypt("binding", "vm-1", encode_payload(doc), NONCE)
    kind, body = decode_payload(cipher.decrypt("binding", "vm-1", NONCE, ct), "binding", "vm-1")
    assert kind is PayloadKind.JSON
    assert body == b'{"n":1,"nested":{"a":null,"z":[1,2]},"uuid":"a"}'


def test_canonical_json_is_order_independent_and_strict() -> None:
    assert canonical_json({"b": 1, "a": "é"}) == canonical_json({"a": "é", "b": 1})
    assert canonical_json({"a": "é"}) == '{"a":"é"}'.encode()
    with pytest.raises(ValueError):
        canonical_json({"x": float("nan")})
    with pytest.raises(TypeError):
        canonical_json({1: "x"})  # type: ignore[dict-item]
    with pytest.raises(TypeError):
        encode_payload("text")  # type: ignore[arg-type]


def test_moved_record_is_refused(cipher: StoreCipher) -> None:
    ct = _sealed(cipher, "seal", "vm-1")
    with pytest.raises(StoreIntegrityError) as info:
        cipher.decrypt("seal", "vm-2", NONCE, ct)
    assert (info.value.record_type, info.value.record_id) == ("seal", "vm-2")
    assert "authentication failed" in info.value.what
    assert info.value.id == "store.integrity"


def test_retyped_record_is_refused(cipher: StoreCipher) -> None:
    ct = _sealed(cipher, "seal", "vm-1")
    with pytest.raises(StoreIntegrityError, match="store record vaik/vm-1"):
        cipher.decrypt("vaik", "vm-1", NONCE, ct)


def test_swapped_records_are_refused(cipher: StoreCipher) -> None:
    ct_a = _sealed(cipher, "binding", "vm-a")
    ct_b = _sealed(cipher, "binding", "vm-b")
    for record_id, ct in (("vm-a", ct_b), ("vm-b", ct_a)):
        with pytest.raises(StoreIntegrityError):
            cipher.decrypt("binding", record_id, NONCE, ct)


def test_record_from_another_store_is_refused(cipher: StoreCipher) -> None:
    other = StoreCipher(KEY, b"T" * 16)
    with pytest.raises(StoreIntegrityError):
        cipher.decrypt("seal", "vm-1", NONCE, _sealed(other))


def test_record_under_another_key_is_refused(cipher: StoreCipher) -> None:
    other = StoreCipher(b"\xff" * 32, STORE_ID)
    with pytest.raises(StoreIntegrityError):
        cipher.decrypt("seal", "vm-1", NONCE, _sealed(other))


@pytest.mark.parametrize("cut", [1, TAG_BYTES - 1, TAG_BYTES, 20])
def test_truncated_record_is_refused(cipher: StoreCipher, cut: int) -> None:
    ct = _sealed(cipher)
    with pytest.raises(StoreIntegrityError) as info:
        cipher.decrypt("seal", "vm-1", NONCE, ct[: len(ct) - cut])
    assert info.value.record_id == "vm-1"


def test_shorter_than_tag_says_truncated(cipher: StoreCipher) -> None:
    with pytest.raises(StoreIntegrityError, match="shorter than its 16-byte tag"):
        cipher.decrypt("seal", "vm-1", NONCE, b"\x00" * 5)


def test_bad_nonce_length_is_refused(cipher: StoreCipher) -> None:
    with pytest.raises(StoreIntegrityError, match="nonce is 11 bytes"):
        cipher.decrypt("seal", "vm-1", NONCE[:11], _sealed(cipher))


def test_aad_fields_are_length_prefixed() -> None:
    assert record_aad(STORE_ID, "ab", "c") != record_aad(STORE_ID, "a", "bc")
    assert row_digest("ab", "c", NONCE, b"x") != row_digest("a", "bc", NONCE, b"x")


def test_misuse_is_value_error() -> None:
    with pytest.raises(ValueError):
        StoreCipher(KEY[:16], STORE_ID)
    with pytest.raises(ValueError):
        StoreCipher(KEY, STORE_ID[:8])
    with pytest.raises(ValueError):
        StoreCipher(KEY, STORE_ID).encrypt("seal", "x", b"b", NONCE[:8])


def test_unknown_payload_kind_or_bad_json_is_integrity_error() -> None:
    with pytest.raises(StoreIntegrityError, match="unknown payload kind"):
        decode_payload(b"zdata", "seal", "x")
    with pytest.raises(StoreIntegrityError, match="does not parse"):
        decode_payload(b"j{not json", "seal", "x")
    with pytest.raises(StoreIntegrityError, match="not an object"):
        decode_payload(b"j[1,2]", "seal", "x")


HEAD = HeadFields(
    store_id=STORE_ID,
    counter_index=0x01805354,
    generation=7,
    manifest_digest=hashlib.sha256(b"m").digest(),
    sealed_key=b"sealed",
)


@pytest.mark.parametrize(
    "changed",
    [
        HeadFields(STORE_ID, 0x01805354, 6, HEAD.manifest_digest, b"sealed"),
        HeadFields(STORE_ID, 0x01805355, 7, HEAD.manifest_digest, b"sealed"),
        HeadFields(STORE_ID, 0x01805354, 7, b"\x00" * 32, b"sealed"),
        HeadFields(STORE_ID, 0x01805354, 7, HEAD.manifest_digest, b"other"),
        HeadFields(b"T" * 16, 0x01805354, 7, HEAD.manifest_digest, b"sealed"),
    ],
    ids=["generation", "counter_index", "manifest", "sealed_key", "store_id"],
)
def test_forged_head_is_refused(cipher: StoreCipher, changed: HeadFields) -> None:
    mac = cipher.head_mac(HEAD)
    cipher.verify_head(HEAD, mac)
    with pytest.raises(StoreIntegrityError, match="head authentication failed"):
        cipher.verify_head(changed, mac)


def test_manifest_digest_is_order_independent_and_covers_every_entry() -> None:
    a = {("seal", "1"): b"\x01" * 32, ("vaik", "1"): b"\x02" * 32}
    b = dict(reversed(list(a.items())))
    assert manifest_digest(a) == manifest_digest(b)
    assert manifest_digest(a) != manifest_digest({("seal", "1"): b"\x01" * 32})
    assert manifest_digest(a) != manifest_digest({**a, ("vaik", "1"): b"\x03" * 32})
    assert manifest_digest(a) != manifest_digest(
        {("seal", "1"): b"\x01" * 32, ("vaik", "2"): a[("vaik", "1")]}
    )


def test_manifest_tracks_ids_by_type() -> None:
    m = Manifest({("vaik", "b"): b"1" * 32, ("vaik", "a"): b"2" * 32, ("seal", "a"): b"3" * 32})
    assert m.ids("vaik") == ["a", "b"]
    assert ("seal", "a") in m and ("seal", "b") not in m
    m.apply({("vaik", "a"): None, ("seal", "a"): None, ("journal", "j"): b"4" * 32})
    assert m.ids("vaik") == ["b"] and m.ids("seal") == [] and len(m) == 2
    assert m.entries() == {("vaik", "b"): b"1" * 32, ("journal", "j"): b"4" * 32}


# --------------------------------------------------------------------------- properties

_mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(min_value=0), st.integers(min_value=1, max_value=255)),
    st.tuples(st.just("truncate"), st.integers(min_value=0), st.just(0)),
    st.tuples(st.just("extend"), st.binary(min_size=1, max_size=32), st.just(0)),
    st.tuples(st.just("replace"), st.binary(max_size=80), st.just(0)),
)


def _mutate(data: bytes, mutation: tuple[str, object, int]) -> bytes:
    op, arg, xor = mutation
    if op == "flip":
        assert isinstance(arg, int)
        if not data:
            return b"\x00"
        i = arg % len(data)
        return data[:i] + bytes([data[i] ^ xor]) + data[i + 1 :]
    if op == "truncate":
        assert isinstance(arg, int)
        return data[: arg % max(len(data), 1)]
    if op == "extend":
        assert isinstance(arg, bytes)
        return data + arg
    assert isinstance(arg, bytes)
    return arg


@given(
    payload=st.binary(max_size=200),
    target=st.sampled_from(["nonce", "ciphertext"]),
    mutation=_mutation,
)
def test_any_mutation_of_a_ciphertext_row_is_a_typed_refusal(
    payload: bytes, target: str, mutation: tuple[str, object, int]
) -> None:
    cipher = StoreCipher(KEY, STORE_ID)
    ct = cipher.encrypt("journal", "m-1", encode_payload(payload), NONCE)
    nonce = NONCE
    if target == "nonce":
        nonce = _mutate(NONCE, mutation)
    else:
        ct = _mutate(ct, mutation)
    if (nonce, ct) == (NONCE, cipher.encrypt("journal", "m-1", encode_payload(payload), NONCE)):
        return  # the "mutation" rebuilt the original bytes
    with pytest.raises(StoreIntegrityError) as info:
        cipher.decrypt("journal", "m-1", nonce, ct)
    assert (info.value.record_type, info.value.record_id) == ("journal", "m-1")


_ident = st.text(
    alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=20
)


@given(
    src=st.tuples(st.sampled_from(["vaik", "seal", "binding", "journal"]), _ident),
    dst=st.tuples(st.sampled_from(["vaik", "seal", "binding", "journal"]), _ident),
)
def test_a_ciphertext_opens_only_under_its_own_type_and_id(
    src: tuple[str, str], dst: tuple[str, str]
) -> None:
    cipher = StoreCipher(KEY, STORE_ID)
    ct = cipher.encrypt(*src, encode_payload(b"x"), NONCE)
    if src == dst:
        assert cipher.decrypt(*dst, NONCE, ct) == b"bx"
    else:
        with pytest.raises(StoreIntegrityError):
            cipher.decrypt(*dst, NONCE, ct)


_keys = st.tuples(st.sampled_from(["vaik", "seal", "binding", "journal"]), _ident)
_digests = st.binary(min_size=32, max_size=32)


@given(
    start=st.dictionaries(_keys, _digests, max_size=40),
    changes=st.dictionaries(_keys, st.none() | _digests, max_size=10),
)
def test_manifest_digest_with_changes_equals_digest_after_applying_them(
    start: dict[tuple[str, str], bytes], changes: dict[tuple[str, str], bytes | None]
) -> None:
    m = Manifest(start)
    before = m.digest()
    predicted = m.digest(changes)
    assert m.digest() == before  # predicting changes nothing
    m.apply(changes)
    assert m.digest() == predicted
    expected = {k: v for k, v in {**start, **changes}.items() if v is not None}
    assert m.entries() == expected
    assert predicted == Manifest(dict(reversed(list(expected.items())))).digest()
    assert (predicted == before) == (expected == start)
