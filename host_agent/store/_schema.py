"""Database tables of the trusted store (SQLAlchemy Core), named under a configurable prefix.

Two tables; nothing else is written:

``<prefix>_head``
    exactly one row (``id = 1``): format name, store id, NV index of the rollback counter,
    generation, manifest digest, the TPM-sealed data key, and the HMAC over all of them.
``<prefix>_records``
    one row per record: ``record_type``, ``record_id`` (primary key together), the 12-byte AES-GCM
    ``nonce`` and the ``ciphertext`` (with its tag). Payloads are never stored in clear.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import BigInteger, Column, Integer, LargeBinary, MetaData, String, Table

__all__ = ["HEAD_ROW_ID", "RECORD_ID_MAX", "RECORD_TYPE_MAX", "StoreTables"]

HEAD_ROW_ID = 1
RECORD_TYPE_MAX = 32
RECORD_ID_MAX = 255


@dataclass(frozen=True)
class StoreTables:
    """The two tables under one prefix (e.g. ``vtpm_store`` → ``vtpm_store_head``)."""

    metadata: MetaData
    head: Table
    records: Table

    @classmethod
    def named(cls, prefix: str) -> StoreTables:
        metadata = MetaData()
        head = Table(
            f"{prefix}_head",
            metadata,
            Column("id", Integer, primary_key=True, autoincrement=False),
            Column("format", String(64), nullable=False),
            Column("store_id", LargeBinary, nullable=False),
            Column("counter_index", BigInteger, nullable=False),
            Column("generation", BigInteger, nullable=False),
            Column("manifest_digest", LargeBinary, nullable=False),
            Column("sealed_key", LargeBinary, nullable=False),
            Column("mac", LargeBinary, nullable=False),
        )
        records = Table(
            f"{prefix}_records",
            metadata,
            Column("record_type", String(RECORD_TYPE_MAX), primary_key=True),
            Column("record_id", String(RECORD_ID_MAX), primary_key=True),
            Column("nonce", LargeBinary, nullable=False),
            Column("ciphertext", LargeBinary, nullable=False),
        )
        return cls(metadata=metadata, head=head, records=records)
