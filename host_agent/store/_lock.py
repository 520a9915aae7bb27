"""The single-writer lock of a store, held for as long as a store is open for writing.

Why: the rollback protocol lets an opener finish a counter increment that a writer left pending
(the writer crashed between its commit and its increment). If that writer is in fact alive and
about to increment, the counter would be incremented twice and land one past the database, and
the next open would take the store for a rolled-back one. So a store is open for writing in at
most one place: a writer holds this lock from before it reads the head until it closes.

- SQLite file: ``flock(LOCK_EX | LOCK_NB)`` on ``<database>.<table prefix>.lock`` beside it
  (same host only, which is all a SQLite file can serve).
- PostgreSQL: a session advisory lock (``pg_try_advisory_lock``) keyed by the table prefix, on a
  connection kept for the store's life. If that connection drops, the lock is gone while the
  store still runs; the head compare-and-swap still refuses a second writer's changes.

Read-only opens (``vtpm-host store check``) take no lock and never touch the counter.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
from pathlib import Path
from typing import Protocol

from sqlalchemy import Connection, Engine, text
from sqlalchemy.exc import SQLAlchemyError

from host_agent.store.errors import StoreBackendError, StoreBusy

__all__ = ["WriterLock", "acquire_writer_lock"]


class WriterLock(Protocol):
    def release(self) -> None: ...


class _NoLock:
    def release(self) -> None:
        return None


class _FileLock:
    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as err:
            raise StoreBackendError(f"cannot open the store lock file {path}: {err}") from err
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StoreBusy(
                f"the store is open for writing elsewhere (lock {path} is held: a running "
                "vtpm-host daemon?); stop it first, or open the store read-only "
                "(vtpm-host store check)"
            ) from None
        except OSError as err:
            os.close(fd)
            raise StoreBackendError(f"cannot lock {path}: {err}") from err
        self._fd: int | None = fd

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def advisory_key(table_prefix: str) -> int:
    """Signed 64-bit advisory lock key of a store's tables."""
    digest = hashlib.sha256(f"vtpm-trust/store/{table_prefix}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


class _AdvisoryLock:
    def __init__(self, engine: Engine, table_prefix: str) -> None:
        self._key = advisory_key(table_prefix)
        where = engine.url.render_as_string(hide_password=True)
        try:
            conn = engine.connect()
        except SQLAlchemyError as err:
            raise StoreBackendError(f"cannot read the store database: {err}") from err
        try:
            got = conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": self._key}).scalar()
            conn.commit()  # the session lock outlives the transaction; do not idle in one
        except SQLAlchemyError as err:
            conn.close()
            raise StoreBackendError(f"cannot lock the store at {where}: {err}") from err
        if not got:
            conn.close()
            raise StoreBusy(
                f"the store {table_prefix} at {where} is open for writing by another session "
                "(a running vtpm-host daemon?); stop it first, or open the store read-only "
                "(vtpm-host store check)"
            )
        self._conn: Connection | None = conn

    def release(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(SQLAlchemyError):
                self._conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": self._key})
                self._conn.commit()
            with contextlib.suppress(SQLAlchemyError):
                self._conn.close()
            self._conn = None


def acquire_writer_lock(engine: Engine, table_prefix: str) -> WriterLock:
    """Take the store's writer lock or raise :class:`StoreBusy` at once (never waits).

    Raises:
        StoreBusy: another writer holds it.
        StoreBackendError: the lock file or the database cannot be reached.
    """
    backend = engine.url.get_backend_name()
    if backend == "postgresql":
        return _AdvisoryLock(engine, table_prefix)
    database = engine.url.database or ""
    if backend == "sqlite" and database not in ("", ":memory:"):
        return _FileLock(Path(f"{database}.{table_prefix}.lock"))
    return _NoLock()
