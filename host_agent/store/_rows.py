"""Database rows in and out of the store: engine, head and record rows, checked on the way in.

The database is untrusted input (invariant 4): every column value read is checked for type and
size before use, and a bad one is a :class:`StoreIntegrityError`, never a traceback.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event, inspect, select
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError

from host_agent.store._schema import HEAD_ROW_ID, RECORD_ID_MAX, StoreTables
from host_agent.store.cipher import (
    FORMAT,
    STORE_ID_BYTES,
    HeadFields,
    Key,
    Manifest,
    StoreCipher,
    decode_payload,
    row_digest,
)
from host_agent.store.errors import (
    StoreAlreadyInitialised,
    StoreBackendError,
    StoreFormatError,
    StoreIntegrityError,
    StoreNotInitialised,
)

__all__ = [
    "MAX_GENERATION",
    "RECORD_ID_RE",
    "RECORD_TYPE_RE",
    "blob",
    "check_id",
    "check_type",
    "has_rows",
    "head_row",
    "head_values",
    "integer",
    "make_engine",
    "parse_head",
    "read_head",
    "refuse_existing_store",
    "scan_records",
    "sqlite_file_missing",
]

RECORD_TYPE_RE = re.compile(r"[a-z][a-z0-9_.-]{0,31}")
RECORD_ID_RE = re.compile(rf"[\x21-\x7e]{{1,{RECORD_ID_MAX}}}")
MAX_GENERATION = 2**63 - 1


def check_type(record_type: str) -> None:
    if not isinstance(record_type, str) or not RECORD_TYPE_RE.fullmatch(record_type):
        raise ValueError(f"record_type {record_type!r} must match {RECORD_TYPE_RE.pattern}")


def check_id(record_id: str) -> None:
    if not isinstance(record_id, str) or not RECORD_ID_RE.fullmatch(record_id):
        raise ValueError(
            f"record_id {record_id!r} must be 1-{RECORD_ID_MAX} printable ASCII characters, "
            "no spaces"
        )


def blob(value: object, what: str, record: Key | None = None, size: int | None = None) -> bytes:
    """A BLOB/BYTEA column value, checked: SQLite keeps whatever type was written into it."""
    if not isinstance(value, bytes | bytearray | memoryview):
        raise StoreIntegrityError(
            f"{what} is a {type(value).__name__}, expected bytes", *(record or (None, None))
        )
    data = bytes(value)
    if size is not None and len(data) != size:
        raise StoreIntegrityError(
            f"{what} is {len(data)} bytes, expected {size}", *(record or (None, None))
        )
    return data


def integer(value: object, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_GENERATION:
        raise StoreIntegrityError(f"store head field {what} is malformed: {value!r}")
    return value


def make_engine(url: str) -> Engine:
    """Engine for ``url``; SQLite durable at every commit, PostgreSQL through psycopg 3."""
    try:
        parsed = make_url(url)
    except ArgumentError as err:
        raise ValueError(f"not a database URL: {url!r}") from err
    if parsed.drivername == "postgresql":
        parsed = parsed.set(drivername="postgresql+psycopg")
    backend = parsed.get_backend_name()
    if backend not in ("sqlite", "postgresql"):
        raise ValueError(f"store backend {backend!r} unsupported: use sqlite or postgresql")
    try:
        engine = create_engine(parsed)
    except (SQLAlchemyError, ImportError) as err:
        raise StoreBackendError(f"cannot create a database engine for {backend}: {err}") from err

    @event.listens_for(engine, "connect")
    def _durable(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        try:
            if backend == "sqlite":
                cursor.execute("PRAGMA synchronous=FULL")
            else:
                cursor.execute("SET synchronous_commit = on")
        finally:
            cursor.close()
        if backend == "postgresql":
            dbapi_connection.commit()

    return engine


def sqlite_file_missing(url: str) -> bool:
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return False
    database = parsed.database or ""
    return database not in ("", ":memory:") and not Path(database).exists()


def head_row(conn: Connection, tables: StoreTables) -> Any:
    if not inspect(conn).has_table(tables.head.name):
        return None
    return conn.execute(select(tables.head).where(tables.head.c.id == HEAD_ROW_ID)).first()


def refuse_existing_store(engine: Engine, tables: StoreTables) -> None:
    try:
        with engine.connect() as conn:
            if head_row(conn, tables) is not None:
                raise StoreAlreadyInitialised(
                    f"a store exists already in {tables.head.name} at "
                    f"{engine.url.render_as_string(hide_password=True)}"
                )
            if has_rows(conn, tables):
                raise StoreAlreadyInitialised(
                    f"{tables.records.name} holds records but there is no store head: "
                    "refusing to adopt records that cannot be authenticated"
                )
    except SQLAlchemyError as err:
        raise StoreBackendError(f"cannot read the store database: {err}") from err


def read_head(conn: Connection, tables: StoreTables, where: str) -> tuple[HeadFields, bytes]:
    row = head_row(conn, tables)
    if row is None:
        raise StoreNotInitialised(f"no store in {tables.head.name} at {where} (run vtpm-host init)")
    return parse_head(row)


def has_rows(conn: Connection, tables: StoreTables) -> bool:
    if not inspect(conn).has_table(tables.records.name):
        return False
    return conn.execute(select(tables.records.c.record_type).limit(1)).first() is not None


def head_values(head: HeadFields, mac: bytes) -> dict[str, object]:
    return {
        "id": HEAD_ROW_ID,
        "format": FORMAT,
        "store_id": head.store_id,
        "counter_index": head.counter_index,
        "generation": head.generation,
        "manifest_digest": head.manifest_digest,
        "sealed_key": head.sealed_key,
        "mac": mac,
    }


def parse_head(row: Any) -> tuple[HeadFields, bytes]:
    """The head row, every field checked (the database is untrusted input)."""
    if row.format != FORMAT:
        if isinstance(row.format, str) and row.format.startswith("vtpm-trust/store/"):
            raise StoreFormatError(f"the database holds a {row.format} store, expected {FORMAT}")
        raise StoreIntegrityError(f"store head format is {row.format!r}, expected {FORMAT}")
    head = HeadFields(
        store_id=blob(row.store_id, "store head field store_id", size=STORE_ID_BYTES),
        counter_index=integer(row.counter_index, "counter_index"),
        generation=integer(row.generation, "generation"),
        manifest_digest=blob(row.manifest_digest, "store head field manifest_digest", size=32),
        sealed_key=blob(row.sealed_key, "store head field sealed_key"),
    )
    return head, blob(row.mac, "store head field mac", size=32)


def scan_records(conn: Connection, tables: StoreTables, cipher: StoreCipher) -> Manifest:
    """Authenticate every record row; return the manifest ``(type, id) → row digest``."""
    records = tables.records
    manifest = Manifest()
    result = conn.execute(
        select(records.c.record_type, records.c.record_id, records.c.nonce, records.c.ciphertext)
    )
    for row in result:
        if not isinstance(row.record_type, str) or not isinstance(row.record_id, str):
            raise StoreIntegrityError(
                f"a row has a non-text type or id ({row.record_type!r}, {row.record_id!r})"
            )
        key = (row.record_type, row.record_id)
        nonce = blob(row.nonce, "nonce", key)
        ciphertext = blob(row.ciphertext, "ciphertext", key)
        decode_payload(cipher.decrypt(*key, nonce, ciphertext), *key)
        manifest.apply({key: row_digest(*key, nonce, ciphertext)})
    return manifest
