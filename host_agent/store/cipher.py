"""Record encryption, associated data and the authenticated store head: pure, no I/O.

Everything the store writes besides the TPM-sealed data key passes through here. Nothing in this
module touches a database, a TPM, a clock or a random source: nonces come in as arguments.

Keys. The 256-bit data key is never used directly. HKDF-SHA256 (salt = the store id) derives
two keys from it, one per purpose:

- the *record key* (AES-256-GCM) encrypts and authenticates each record payload;
- the *head key* (HMAC-SHA256) authenticates the store head (generation, manifest digest).

Associated data of a record (``record_aad``): the format name ``vtpm-trust/store/1``, the store
id, the record type and the record id, each length-prefixed. A ciphertext therefore opens only
under its own id and type in its own store: moved to another id, swapped with another record,
retyped or copied into another store, it fails authentication.

Manifest. AES-GCM cannot tell the current version of a record from an older genuine version of
the same record. The head therefore carries a ``manifest_digest`` over ``(type, id, row_digest)``
of every record (:class:`Manifest`, a two-level hash tree so a change rehashes one bucket),
``row_digest`` being the SHA-256 of the stored row (type, id, nonce, ciphertext). The head MAC
covers the generation and that digest, so a row put back from an older copy, a deleted row and an
inserted row are all detected.

Plaintext layout: one kind byte (``b`` raw bytes, ``j`` canonical JSON) followed by the payload.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from host_agent.store.errors import StoreIntegrityError

__all__ = [
    "DATA_KEY_BYTES",
    "FORMAT",
    "MANIFEST_BUCKETS",
    "NONCE_BYTES",
    "STORE_ID_BYTES",
    "TAG_BYTES",
    "HeadFields",
    "Key",
    "Manifest",
    "PayloadKind",
    "StoreCipher",
    "canonical_json",
    "decode_payload",
    "encode_payload",
    "manifest_digest",
    "record_aad",
    "row_digest",
]

FORMAT = "vtpm-trust/store/1"
DATA_KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
STORE_ID_BYTES = 16


class PayloadKind(enum.Enum):
    """What a record's payload is; the first plaintext byte, authenticated with the rest."""

    BYTES = b"b"
    JSON = b"j"


def _lp(data: bytes) -> bytes:
    """Length-prefixed field: 4-byte big-endian length, then the bytes."""
    return struct.pack(">I", len(data)) + data


def record_aad(store_id: bytes, record_type: str, record_id: str) -> bytes:
    """Associated data binding a record ciphertext to its store, type and id."""
    return b"".join(
        (
            _lp(FORMAT.encode()),
            _lp(b"record"),
            _lp(store_id),
            _lp(record_type.encode()),
            _lp(record_id.encode()),
        )
    )


def row_digest(record_type: str, record_id: str, nonce: bytes, ciphertext: bytes) -> bytes:
    """SHA-256 of a stored row, as the manifest lists it."""
    return hashlib.sha256(
        b"".join((_lp(record_type.encode()), _lp(record_id.encode()), _lp(nonce), _lp(ciphertext)))
    ).digest()


Key = tuple[str, str]
"""``(record_type, record_id)``."""

MANIFEST_BUCKETS = 256


def _bucket_of(key: Key) -> int:
    return hashlib.sha256(_lp(key[0].encode()) + _lp(key[1].encode())).digest()[0]


def _bucket_digest(entries: Mapping[Key, bytes]) -> bytes:
    h = hashlib.sha256()
    for (record_type, record_id), digest in sorted(entries.items()):
        h.update(_lp(record_type.encode()) + _lp(record_id.encode()) + _lp(digest))
    return h.digest()


class Manifest:
    """The authenticated record set ``(type, id) → row digest``, with a cheap running digest.

    The digest is a two-level hash tree: entries fall into 256 buckets by the first byte of
    SHA-256 of their key; a bucket's digest is SHA-256 over its sorted, length-prefixed entries;
    the manifest digest is SHA-256 over the format, ``"manifest"`` and the 256 bucket digests in
    order. Equal record sets give equal digests whatever the insertion order, and a change costs
    one bucket (about n/256 entries) plus 8 KiB of hashing instead of the whole set.

    Args:
        entries: the initial entries.
    """

    def __init__(self, entries: Mapping[Key, bytes] | None = None) -> None:
        self._buckets: list[dict[Key, bytes]] = [{} for _ in range(MANIFEST_BUCKETS)]
        self._bucket_digests: list[bytes | None] = [None] * MANIFEST_BUCKETS
        self._by_type: dict[str, set[str]] = {}
        for key, digest in (entries or {}).items():
            self._set(key, digest)

    def __len__(self) -> int:
        return sum(len(b) for b in self._buckets)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, tuple) and len(key) == 2 and self.get(key) is not None

    def get(self, key: Key) -> bytes | None:
        """The row digest of ``key``, or ``None`` when it is not in the set."""
        return self._buckets[_bucket_of(key)].get(key)

    def ids(self, record_type: str) -> list[str]:
        """Sorted ids of one type."""
        return sorted(self._by_type.get(record_type, ()))

    def counts(self) -> dict[str, int]:
        """Number of records of each type present."""
        return {t: len(ids) for t, ids in sorted(self._by_type.items())}

    def entries(self) -> dict[Key, bytes]:
        """A copy of every entry."""
        out: dict[Key, bytes] = {}
        for bucket in self._buckets:
            out.update(bucket)
        return out

    def _set(self, key: Key, digest: bytes | None) -> None:
        b = _bucket_of(key)
        if digest is None:
            if self._buckets[b].pop(key, None) is not None:
                ids = self._by_type[key[0]]
                ids.discard(key[1])
                if not ids:
                    del self._by_type[key[0]]
        else:
            self._buckets[b][key] = bytes(digest)
            self._by_type.setdefault(key[0], set()).add(key[1])
        self._bucket_digests[b] = None

    def apply(self, changes: Mapping[Key, bytes | None]) -> None:
        """Set (digest) or remove (``None``) entries."""
        for key, digest in changes.items():
            self._set(key, digest)

    def _bucket(self, b: int) -> bytes:
        cached = self._bucket_digests[b]
        if cached is None:
            cached = self._bucket_digests[b] = _bucket_digest(self._buckets[b])
        return cached

    def digest(self, changes: Mapping[Key, bytes | None] | None = None) -> bytes:
        """The manifest digest, or the one it would have with ``changes`` applied (not applied).

        Args:
            changes: ``key → row digest`` to set, ``key → None`` to remove.
        """
        bucket_digests = [self._bucket(b) for b in range(MANIFEST_BUCKETS)]
        touched: dict[int, dict[Key, bytes]] = {}
        for key, digest in (changes or {}).items():
            b = _bucket_of(key)
            bucket = touched.setdefault(b, dict(self._buckets[b]))
            if digest is None:
                bucket.pop(key, None)
            else:
                bucket[key] = digest
        for b, bucket in touched.items():
            bucket_digests[b] = _bucket_digest(bucket)
        return hashlib.sha256(
            _lp(FORMAT.encode()) + _lp(b"manifest") + b"".join(bucket_digests)
        ).digest()


def manifest_digest(entries: Mapping[Key, bytes]) -> bytes:
    """The :class:`Manifest` digest of ``entries`` (``(type, id) → row_digest``)."""
    return Manifest(entries).digest()


def canonical_json(value: Mapping[str, Any]) -> bytes:
    """Canonical JSON: sorted keys, no whitespace, UTF-8, no NaN or infinities.

    Raises:
        TypeError: a key is not a string or a value is not JSON-serialisable.
        ValueError: a float is NaN or infinite.
    """
    if not isinstance(value, Mapping):
        raise TypeError(f"a JSON payload must be a mapping, got {type(value).__name__}")
    if any(not isinstance(k, str) for k in value):
        raise TypeError("JSON payload keys must be strings")
    text = json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )
    return text.encode("utf-8")


def encode_payload(payload: bytes | Mapping[str, Any]) -> bytes:
    """The plaintext of a record: kind byte, then raw bytes or canonical JSON.

    Raises:
        TypeError: the payload is neither bytes nor a mapping (or not JSON-serialisable).
    """
    if isinstance(payload, bytes | bytearray | memoryview):
        return PayloadKind.BYTES.value + bytes(payload)
    if isinstance(payload, Mapping):
        return PayloadKind.JSON.value + canonical_json(payload)
    raise TypeError(f"payload must be bytes or a mapping, got {type(payload).__name__}")


def decode_payload(plaintext: bytes, record_type: str, record_id: str) -> tuple[PayloadKind, bytes]:
    """Split an authenticated plaintext into its kind and payload bytes.

    Raises:
        StoreIntegrityError: the kind byte is unknown, or a JSON payload is not a JSON object.
    """
    kind_byte, body = plaintext[:1], plaintext[1:]
    try:
        kind = PayloadKind(kind_byte)
    except ValueError:
        raise StoreIntegrityError(
            f"unknown payload kind {kind_byte!r}", record_type, record_id
        ) from None
    if kind is PayloadKind.JSON:
        try:
            value = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise StoreIntegrityError(
                f"JSON payload does not parse: {err}", record_type, record_id
            ) from None
        if not isinstance(value, dict):
            raise StoreIntegrityError("JSON payload is not an object", record_type, record_id)
    return kind, body


@dataclass(frozen=True)
class HeadFields:
    """The authenticated fields of the store head.

    Attributes:
        store_id: random identity of this store, bound into every record's associated data.
        counter_index: NV index of the TPM rollback counter this store is tied to.
        generation: bumped by every committed change; compared with the counter at open.
        manifest_digest: :func:`manifest_digest` of the records at this generation.
        sealed_key: the TPM-sealed data key blob (its digest is authenticated).
    """

    store_id: bytes
    counter_index: int
    generation: int
    manifest_digest: bytes
    sealed_key: bytes

    def encode(self) -> bytes:
        """Canonical bytes the head MAC is computed over."""
        return b"".join(
            (
                _lp(FORMAT.encode()),
                _lp(b"head"),
                _lp(self.store_id),
                struct.pack(">QQ", self.counter_index, self.generation),
                _lp(self.manifest_digest),
                _lp(hashlib.sha256(self.sealed_key).digest()),
            )
        )


class StoreCipher:
    """AES-GCM record sealing and head authentication under one store's data key.

    Args:
        data_key: the 32-byte data key (unsealed from the TPM, held only in this process).
        store_id: the store's 16-byte identity.

    Raises:
        ValueError: a key or id of the wrong length (misuse of the API).
    """

    def __init__(self, data_key: bytes, store_id: bytes) -> None:
        if len(data_key) != DATA_KEY_BYTES:
            raise ValueError(f"data key must be {DATA_KEY_BYTES} bytes, got {len(data_key)}")
        if len(store_id) != STORE_ID_BYTES:
            raise ValueError(f"store id must be {STORE_ID_BYTES} bytes, got {len(store_id)}")
        self.store_id = bytes(store_id)
        self._aead = AESGCM(self._derive(data_key, b"records"))
        self._head_key = self._derive(data_key, b"head")

    def _derive(self, data_key: bytes, purpose: bytes) -> bytes:
        hkdf = HKDF(
            algorithm=hashes.SHA256(),
            length=32,
            salt=self.store_id,
            info=FORMAT.encode() + b" " + purpose,
        )
        return hkdf.derive(bytes(data_key))

    def encrypt(self, record_type: str, record_id: str, plaintext: bytes, nonce: bytes) -> bytes:
        """AES-GCM ciphertext (with its 16-byte tag) of a record plaintext.

        Args:
            nonce: 12 fresh random bytes; never reuse one under the same store.

        Raises:
            ValueError: the nonce is not 12 bytes.
        """
        if len(nonce) != NONCE_BYTES:
            raise ValueError(f"nonce must be {NONCE_BYTES} bytes, got {len(nonce)}")
        aad = record_aad(self.store_id, record_type, record_id)
        return self._aead.encrypt(bytes(nonce), bytes(plaintext), aad)

    def decrypt(self, record_type: str, record_id: str, nonce: bytes, ciphertext: bytes) -> bytes:
        """Authenticate and decrypt a stored record under its own type and id.

        Raises:
            StoreIntegrityError: a nonce of the wrong length, a ciphertext shorter than its tag,
                or an authentication failure (tampered, truncated, moved, swapped or retyped).
        """
        if len(nonce) != NONCE_BYTES:
            raise StoreIntegrityError(
                f"nonce is {len(nonce)} bytes, expected {NONCE_BYTES}", record_type, record_id
            )
        if len(ciphertext) < TAG_BYTES:
            raise StoreIntegrityError(
                f"ciphertext is {len(ciphertext)} bytes, shorter than its {TAG_BYTES}-byte tag "
                "(truncated)",
                record_type,
                record_id,
            )
        aad = record_aad(self.store_id, record_type, record_id)
        try:
            return self._aead.decrypt(bytes(nonce), bytes(ciphertext), aad)
        except InvalidTag:
            raise StoreIntegrityError(
                "authentication failed: the ciphertext was tampered with or truncated, or "
                "belongs to another record id, record type or store (moved or swapped)",
                record_type,
                record_id,
            ) from None

    def head_mac(self, head: HeadFields) -> bytes:
        """HMAC-SHA256 over the head's canonical encoding."""
        return hmac.new(self._head_key, head.encode(), hashlib.sha256).digest()

    def verify_head(self, head: HeadFields, mac: bytes) -> None:
        """Check the head MAC in constant time.

        Raises:
            StoreIntegrityError: the head (generation, manifest, counter index, sealed key or
                store id) was altered, or was written under another data key.
        """
        if not hmac.compare_digest(self.head_mac(head), bytes(mac)):
            raise StoreIntegrityError(
                "store head authentication failed: its generation, manifest, counter index or "
                "sealed key was altered, or it belongs to another store"
            )
