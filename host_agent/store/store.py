"""The trusted store: encrypted, authenticated records that cannot be rolled back unnoticed.

Threat: an attacker with access to the database (the SQLite file, or the PostgreSQL server) but
not to the host TPM or to this process's memory. They can read every byte, change any row, and put
back an older copy of the whole database or of single rows. The store must neither leak a payload
nor accept anything but the latest state it wrote itself.

Confidentiality and integrity of records (:mod:`host_agent.store.cipher`). A 256-bit data key is
drawn once at creation, sealed by the host TPM (:class:`~host_agent.store.ports.DataKeySealer`),
and only the sealed blob is written (in the head row). At open it is unsealed into this process's
memory and nowhere else. Each record is AES-GCM encrypted under a key derived from it, with the
format, the store id, the record type and the record id as associated data: a ciphertext that is
tampered with, truncated, moved to another id, swapped with another record or retyped fails
authentication and raises :class:`StoreIntegrityError` naming the record and what failed.

Freshness of records. AES-GCM cannot tell a record's current ciphertext from an older genuine one,
so the head carries a *manifest digest* over ``(type, id, SHA-256 of the row)`` of every record,
authenticated by the head MAC together with the generation. The process keeps the manifest in
memory: a row that differs from it (an older version put back, a row deleted or inserted behind
the store's back) is refused at read time, and the whole record set is checked against the digest
at open.

Rollback of the whole database — the protocol
---------------------------------------------
The head holds an authenticated ``generation``; a TPM NV monotonic counter
(:class:`~host_agent.store.ports.RollbackCounter`) holds the generation the TPM vouches for.

*Creation.* Refuse a counter that exists already (unless
``StoreSettings.allow_existing_counter``): it means this TPM had a store whose database is gone.
Seal the fresh data key (and check it unseals), then define the counter, increment it to ``c``
(TPM 2.0 starts a new counter at the highest value any counter on the TPM had, not at 0) and write
the head with ``generation = c``. The increment matters when a counter is adopted: the database of
the store that was lost sits at the counter's old value, below ``c``, so it is refused as a
rollback if it is ever put back.

*Every change* (put, delete, or a transaction of several) is two steps:

1. one database transaction writes the record rows *and* the head with ``generation + 1`` and the
   new manifest digest and MAC. The head update is a compare-and-swap on the previous generation
   and MAC, so a second writer or a database swapped under a running store is refused. SQLite runs
   with ``synchronous=FULL`` and PostgreSQL with ``synchronous_commit=on``: once the commit
   returns, the new generation is durable;
2. then the counter is incremented; it must land on the new generation.

The database always leads the counter, never the reverse, and by at most one: step 2 of a change
always completes (in this process, or at the next open, see below) before step 1 of the next
change may run.

*One writer.* Finishing someone else's pending increment is only safe if that someone is dead.
A store opened for writing therefore holds a writer lock until it closes (``flock`` on
``<database>.<prefix>.lock`` for SQLite, a session advisory lock for PostgreSQL; see ``_lock``);
a second writer gets :class:`StoreBusy`. ``open(read_only=True)`` takes no lock, never touches
the counter and refuses writes: that is how ``vtpm-host store check`` and ``vtpm-host init`` look
at a store the agent may have open.

*Open* (for writing) takes the writer lock, unseals the key, checks the head MAC, reads the
counter value ``c`` and compares:

- ``generation == c``: the latest state. Open.
- ``generation == c + 1``: the process stopped between steps 1 and 2 (crash, power loss, TPM
  error). The database holds the latest committed change; finish it by incrementing the counter,
  then open. This cannot let an old copy in: a database at ``c + 1`` while the counter says ``c``
  can only be the state committed last, because any later change would first have completed the
  increment (the counter would then be past ``c``). Each generation value is committed at most
  once, so there is exactly one such state.
- ``generation < c``: an older copy was put back. Refuse with :class:`StoreRolledBack`
  (``expected_generation = c``, ``found_generation``), changing nothing — not even the counter.
- ``generation > c + 1``: the counter cannot belong to this database (another TPM, a counter
  redefined at another index). Refuse with :class:`StoreCounterMismatch`.

Then every row is authenticated and the record set compared with the manifest digest; only after
all checks pass is an interrupted increment finished. A failed open writes nothing.

If step 2 fails while the process runs, the change stays committed (the caller is told with
:class:`StoreCounterMismatch` or the TPM error wrapped in :class:`StoreBackendError`), and the
increment is retried before the next change. If step 1's commit fails ambiguously (the connection
dropped during COMMIT), the store goes ``BROKEN`` and must be reopened, which settles the outcome.

Limits. An attacker who can also increment the counter can only make the store refuse to start
(denial of service), never accept old data. One store belongs to one host and its TPM; a second
writer is kept out by the writer lock and, should the lock be lost (PostgreSQL session dropped),
by the head compare-and-swap.
"""

from __future__ import annotations

import enum
import json
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from types import TracebackType
from typing import Any

from sqlalchemy import Connection, Engine, delete, insert, select
from sqlalchemy import update as sql_update
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from evidence.errors import VtpmError
from host_agent.store._lock import WriterLock, acquire_writer_lock
from host_agent.store._rows import (
    MAX_GENERATION,
    blob,
    check_id,
    check_type,
    head_values,
    make_engine,
    read_head,
    refuse_existing_store,
    scan_records,
    sqlite_file_missing,
)
from host_agent.store._schema import HEAD_ROW_ID, StoreTables
from host_agent.store.cipher import (
    DATA_KEY_BYTES,
    NONCE_BYTES,
    STORE_ID_BYTES,
    HeadFields,
    Key,
    Manifest,
    PayloadKind,
    StoreCipher,
    decode_payload,
    encode_payload,
    row_digest,
)
from host_agent.store.errors import (
    RecordNotFound,
    StoreAlreadyInitialised,
    StoreBackendError,
    StoreCounterMismatch,
    StoreIntegrityError,
    StoreKeyError,
    StoreNotInitialised,
    StoreRolledBack,
    StoreStateError,
)
from host_agent.store.ports import DataKeySealer, RandomBytes, RollbackCounter
from host_agent.store.settings import StoreSettings

__all__ = ["Record", "StoreRunState", "StoreTransaction", "TrustedStore"]

_OPEN_ATTEMPTS = 5


class StoreRunState(enum.Enum):
    """Run state of a :class:`TrustedStore`."""

    OPEN = "open"
    BROKEN = "broken"  # a commit's outcome is unknown or the head moved: reopen to settle it
    CLOSED = "closed"


@dataclass(frozen=True)
class Record:
    """One decrypted, authenticated record.

    Attributes:
        record_type: e.g. ``"vaik"``, ``"seal"``, ``"binding"``, ``"journal"``.
        record_id: the id within the type.
        kind: whether the payload was stored as raw bytes or as canonical JSON.
        payload: the raw bytes, or the canonical JSON text (UTF-8).
    """

    record_type: str
    record_id: str
    kind: PayloadKind
    payload: bytes

    def json(self) -> dict[str, Any]:
        """The payload as a JSON object.

        Raises:
            ValueError: the record was stored as raw bytes.
        """
        if self.kind is not PayloadKind.JSON:
            raise ValueError(f"record {self.record_type}/{self.record_id} holds bytes, not JSON")
        value = json.loads(self.payload.decode("utf-8"))
        if not isinstance(value, dict):  # checked when the record was authenticated
            raise ValueError(f"record {self.record_type}/{self.record_id} is not a JSON object")
        return value


@dataclass(frozen=True)
class _Staged:
    """A put waiting in a transaction: the record and its sealed row."""

    record: Record
    nonce: bytes
    ciphertext: bytes


def _read_counter(counter: RollbackCounter, index: int) -> int:
    try:
        value = counter.counter_read(index)
    except VtpmError as err:
        raise StoreCounterMismatch(
            f"cannot read the rollback counter at NV index {index:#010x}: {err}"
        ) from err
    if not isinstance(value, int) or not 0 <= value <= MAX_GENERATION:
        raise StoreCounterMismatch(f"rollback counter at {index:#010x} reads {value!r}")
    return value


class TrustedStore:
    """Encrypted, authenticated, rollback-protected records (see the module docstring).

    Build with :meth:`create` (once, at ``vtpm-host init``) or :meth:`open` (every start).
    All methods are thread-safe; a change is one database transaction plus one counter increment.
    """

    def __init__(
        self,
        *,
        engine: Engine,
        tables: StoreTables,
        settings: StoreSettings,
        cipher: StoreCipher,
        head: HeadFields,
        head_mac: bytes,
        manifest: Manifest,
        counter: RollbackCounter,
        random_bytes: RandomBytes,
        increment_pending: bool = False,
        lock: WriterLock | None = None,
    ) -> None:
        """Private: use :meth:`create` or :meth:`open`, which check everything first.

        ``lock`` None means read-only: no writes, and the counter is never touched.
        """
        self._engine = engine
        self._tables = tables
        self._settings = settings
        self._cipher = cipher
        self._head = head
        self._head_mac = head_mac
        self._manifest = manifest
        self._counter = counter
        self._random_bytes = random_bytes
        self._increment_pending = increment_pending
        self._state = StoreRunState.OPEN
        self._lock = threading.RLock()
        self._in_transaction = False
        self._lock_handle = lock

    # ---------------------------------------------------------------- creation and opening

    @classmethod
    def create(
        cls,
        settings: StoreSettings,
        *,
        sealer: DataKeySealer,
        counter: RollbackCounter,
        random_bytes: RandomBytes,
    ) -> TrustedStore:
        """Create an empty store: define the counter, seal a fresh data key, write the head.

        Args:
            settings: where the store lives and its counter.
            sealer: seals the data key to the host TPM.
            counter: the TPM NV counter (usually the same ``HostTpm`` object as ``sealer``).
            random_bytes: the random source (``secrets.token_bytes`` at the daemon edge).

        Raises:
            StoreAlreadyInitialised: a store exists in the database, or the counter exists and
                ``settings.allow_existing_counter`` is off.
            StoreKeyError: the sealed key does not unseal to the key just sealed.
            StoreBackendError: the database failed.
        """
        tables = StoreTables.named(settings.table_prefix)
        engine = make_engine(settings.url)
        lock: WriterLock | None = None
        try:
            lock = acquire_writer_lock(engine, settings.table_prefix)
            # A missing SQLite file holds no store; connecting would create it, and a refused
            # create must leave nothing behind.
            if not sqlite_file_missing(settings.url):
                refuse_existing_store(engine, tables)

            index = settings.counter_index
            try:
                existing: int | None = counter.counter_read(index)
            except VtpmError:
                existing = None
            if existing is not None and not settings.allow_existing_counter:
                raise StoreAlreadyInitialised(
                    f"the rollback counter at NV index {index:#010x} exists already (value "
                    f"{existing}): a store was created on this TPM before and its database is "
                    "missing. Put that database back, or set allow_existing_counter to start "
                    "an empty store"
                )
            # Seal first: it leaves nothing behind if it fails, while a defined counter does.
            data_key = _random(random_bytes, DATA_KEY_BYTES)
            store_id = _random(random_bytes, STORE_ID_BYTES)
            try:
                sealed = sealer.seal(data_key)
                unsealed = sealer.unseal(sealed)
            except VtpmError as err:
                raise StoreKeyError(f"cannot seal the store data key to the TPM: {err}") from err
            if unsealed != data_key:
                raise StoreKeyError("the sealed data key does not unseal to the key sealed")
            if existing is None:
                try:
                    counter.counter_define(index)
                except VtpmError as err:
                    raise StoreCounterMismatch(
                        f"cannot define the rollback counter at NV index {index:#010x}: {err}"
                    ) from err
            # Start one step past anything the counter vouched for: with an adopted counter, the
            # lost store's last database (at the counter's value) must not open as current.
            try:
                generation = counter.counter_increment(index)
            except VtpmError as err:
                raise StoreCounterMismatch(
                    f"cannot increment the rollback counter at NV index {index:#010x}: {err}"
                ) from err
            if generation != _read_counter(counter, index):
                raise StoreCounterMismatch(
                    f"the rollback counter at NV index {index:#010x} moved while the store was "
                    "being created: another user of the counter"
                )
            cipher = StoreCipher(data_key, store_id)
            head = HeadFields(store_id, index, generation, Manifest().digest(), sealed)
            mac = cipher.head_mac(head)
            try:
                with engine.begin() as conn:
                    tables.metadata.create_all(conn)
                    conn.execute(insert(tables.head).values(head_values(head, mac)))
            except IntegrityError as err:
                raise StoreAlreadyInitialised(
                    f"a store was created concurrently in {tables.head.name}"
                ) from err
            except SQLAlchemyError as err:
                raise StoreBackendError(f"cannot write the new store: {err}") from err
            return cls(
                engine=engine,
                tables=tables,
                settings=settings,
                cipher=cipher,
                head=head,
                head_mac=mac,
                manifest=Manifest(),
                counter=counter,
                random_bytes=random_bytes,
                lock=lock,
            )
        except BaseException:
            if lock is not None:
                lock.release()
            engine.dispose()
            raise

    @classmethod
    def open(
        cls,
        settings: StoreSettings,
        *,
        sealer: DataKeySealer,
        counter: RollbackCounter,
        random_bytes: RandomBytes,
        read_only: bool = False,
    ) -> TrustedStore:
        """Open an existing store, refusing a rolled-back or tampered database.

        Takes the store's writer lock first (unless ``read_only``). Checks, in order: the head
        exists and has our format; the data key unseals; the head MAC holds; the generation
        against the TPM counter (module docstring); every record row authenticates under its
        own type and id; the record set matches the manifest digest. Only then is an interrupted
        counter increment finished. A refusal changes nothing.

        Args:
            read_only: verify and read without the writer lock; writes are refused and the
                counter is never touched (an interrupted increment is reported by
                :attr:`increment_pending`, and left for the writer). For inspection while the
                agent runs; the view is the state at open, so rows the writer changes later
                read as integrity errors: reopen rather than keep a read-only store.

        Raises:
            StoreBusy: another writer has the store open (not with ``read_only``).
            StoreNotInitialised: no store at ``settings.url``.
            StoreFormatError: a store of another format version.
            StoreKeyError: the data key does not unseal (another TPM, policy not satisfied).
            StoreIntegrityError: the head or a record failed authentication, or the record set
                differs from the authenticated manifest.
            StoreRolledBack: the database is older than the counter.
            StoreCounterMismatch: the counter cannot belong to this database.
            StoreBackendError: the database failed.
        """
        if sqlite_file_missing(settings.url):
            raise StoreNotInitialised(f"no store database at {settings.url} (run vtpm-host init)")
        tables = StoreTables.named(settings.table_prefix)
        engine = make_engine(settings.url)
        lock: WriterLock | None = None
        try:
            if not read_only:
                lock = acquire_writer_lock(engine, settings.table_prefix)
            return cls._open(engine, tables, settings, sealer, counter, random_bytes, lock)
        except BaseException:
            if lock is not None:
                lock.release()
            engine.dispose()
            raise

    @classmethod
    def _open(
        cls,
        engine: Engine,
        tables: StoreTables,
        settings: StoreSettings,
        sealer: DataKeySealer,
        counter: RollbackCounter,
        random_bytes: RandomBytes,
        lock: WriterLock | None,
    ) -> TrustedStore:
        # A consistent view without a lock (read-only opens run beside the writer): read the
        # head, the counter, the head again; compare; scan; read the head a third time. The
        # generation only grows, so an unchanged head means no commit happened in between, and
        # the counter value read in that window belongs to this head (equal, or one behind).
        where = engine.url.render_as_string(hide_password=True)
        unsealed: dict[bytes, StoreCipher] = {}
        try:
            for _attempt in range(_OPEN_ATTEMPTS):
                with engine.connect() as conn:
                    head, mac = read_head(conn, tables, where)
                    if head.counter_index != settings.counter_index:
                        raise StoreCounterMismatch(
                            f"the store is tied to the counter at NV index "
                            f"{head.counter_index:#010x}, the configuration names "
                            f"{settings.counter_index:#010x}"
                        )
                    cipher = unsealed.get(head.sealed_key) or _unseal(sealer, head)
                    unsealed[head.sealed_key] = cipher
                    cipher.verify_head(head, mac)
                    value = _read_counter(counter, head.counter_index)
                    if read_head(conn, tables, where) != (head, mac):
                        continue
                    if head.generation < value:
                        raise StoreRolledBack(value, head.generation, head.counter_index)
                    if head.generation > value + 1:
                        raise StoreCounterMismatch(
                            f"the store database is at generation {head.generation} but the "
                            f"rollback counter at NV index {head.counter_index:#010x} reads "
                            f"{value}: more than one change ahead, so this counter (or TPM) is "
                            "not the one this store was created with"
                        )
                    manifest = scan_records(conn, tables, cipher)
                    if read_head(conn, tables, where) == (head, mac):
                        break
            else:
                raise StoreBackendError(
                    f"the store at {where} changed during each of {_OPEN_ATTEMPTS} attempts to "
                    "read it consistently; try again"
                )
        except SQLAlchemyError as err:
            raise StoreBackendError(f"cannot read the store database: {err}") from err
        if manifest.digest() != head.manifest_digest:
            raise StoreIntegrityError(
                "the record set differs from the authenticated manifest: a record was deleted, "
                "inserted, or put back from an older copy of the database"
            )
        store = cls(
            engine=engine,
            tables=tables,
            settings=settings,
            cipher=cipher,
            head=head,
            head_mac=mac,
            manifest=manifest,
            counter=counter,
            random_bytes=random_bytes,
            increment_pending=head.generation == value + 1,
            lock=lock,
        )
        if store._increment_pending and not store.read_only:
            store._advance_counter()
        return store

    # ---------------------------------------------------------------- state

    @property
    def state(self) -> StoreRunState:
        return self._state

    @property
    def read_only(self) -> bool:
        """Opened without the writer lock: writes are refused, the counter is left alone."""
        return self._lock_handle is None

    @property
    def increment_pending(self) -> bool:
        """The last change is committed but the TPM counter not yet incremented to it."""
        return self._increment_pending

    @property
    def generation(self) -> int:
        """The generation of the last committed change (the counter's value once settled)."""
        return self._head.generation

    @property
    def store_id(self) -> bytes:
        return self._head.store_id

    def _require_writable(self) -> None:
        if self.read_only:
            raise StoreStateError(
                "open read-only", "open for writing", "reopen without read_only to change it"
            )

    def _require(self, required: StoreRunState) -> None:
        if self._state is not required:
            detail = "reopen the store" if self._state is StoreRunState.BROKEN else ""
            raise StoreStateError(self._state.value, required.value, detail)

    def close(self) -> None:
        """Release the database connections; every later call is refused. Safe to call twice."""
        with self._lock:
            if self._state is not StoreRunState.CLOSED:
                self._state = StoreRunState.CLOSED
                self._manifest = Manifest()
                if self._lock_handle is not None:
                    self._lock_handle.release()
                self._engine.dispose()

    def __enter__(self) -> TrustedStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # ---------------------------------------------------------------- reads

    def get(self, record_type: str, record_id: str) -> Record:
        """The record of that type and id, authenticated and current.

        Raises:
            RecordNotFound: no such record.
            StoreIntegrityError: its row was tampered with, truncated, moved, swapped, deleted
                or replaced by an older version.
        """
        found = self.find(record_type, record_id)
        if found is None:
            raise RecordNotFound(record_type, record_id)
        return found

    def find(self, record_type: str, record_id: str) -> Record | None:
        """Like :meth:`get`, but ``None`` when the record does not exist."""
        check_type(record_type)
        check_id(record_id)
        with self._lock:
            self._require(StoreRunState.OPEN)
            key = (record_type, record_id)
            records = self._tables.records
            try:
                with self._engine.connect() as conn:
                    row = conn.execute(
                        select(records.c.nonce, records.c.ciphertext).where(
                            records.c.record_type == record_type,
                            records.c.record_id == record_id,
                        )
                    ).first()
            except SQLAlchemyError as err:
                raise StoreBackendError(f"cannot read the store database: {err}") from err
            expected = self._manifest.get(key)
            if row is None:
                if expected is None:
                    return None
                raise StoreIntegrityError(
                    "the record's row is missing (deleted behind the store's back)", *key
                )
            return self._check_row(key, row.nonce, row.ciphertext, expected)

    def version(self, record_type: str, record_id: str) -> bytes | None:
        """An opaque version of the record, without a database read: the digest of its current
        row in the authenticated manifest (random nonce and ciphertext included), so it changes
        with every put or delete of the record, and equal versions mean the same plaintext.
        ``None`` when the record does not exist, and always on a read-only store (whose
        manifest stays as it was at open while the writer goes on): nothing to cache by then.
        """
        check_type(record_type)
        check_id(record_id)
        with self._lock:
            self._require(StoreRunState.OPEN)
            if self.read_only:
                return None
            return self._manifest.get((record_type, record_id))

    def list_records(self, record_type: str) -> list[Record]:
        """Every record of one type, sorted by id, each authenticated and current.

        Raises:
            StoreIntegrityError: a row is bad (see :meth:`get`), missing, or not in the manifest.
        """
        check_type(record_type)
        with self._lock:
            self._require(StoreRunState.OPEN)
            records = self._tables.records
            try:
                with self._engine.connect() as conn:
                    rows = conn.execute(
                        select(records.c.record_id, records.c.nonce, records.c.ciphertext).where(
                            records.c.record_type == record_type
                        )
                    ).all()
            except SQLAlchemyError as err:
                raise StoreBackendError(f"cannot read the store database: {err}") from err
            out: list[Record] = []
            seen: set[str] = set()
            for row in rows:
                if not isinstance(row.record_id, str):
                    raise StoreIntegrityError(
                        f"a row of type {record_type} has a non-text record id {row.record_id!r}"
                    )
                key = (record_type, row.record_id)
                seen.add(row.record_id)
                out.append(self._check_row(key, row.nonce, row.ciphertext, self._manifest.get(key)))
            for missing in sorted(self.record_ids(record_type)):
                if missing not in seen:
                    raise StoreIntegrityError(
                        "the record's row is missing (deleted behind the store's back)",
                        record_type,
                        missing,
                    )
            return sorted(out, key=lambda r: r.record_id)

    def _has(self, key: Key) -> bool:
        with self._lock:
            self._require(StoreRunState.OPEN)
            return key in self._manifest

    def record_ids(self, record_type: str) -> list[str]:
        """Ids of one type's records, from the authenticated manifest held in memory."""
        check_type(record_type)
        with self._lock:
            self._require(StoreRunState.OPEN)
            return self._manifest.ids(record_type)

    def record_counts(self) -> dict[str, int]:
        """Number of records of each type, from the authenticated manifest held in memory."""
        with self._lock:
            self._require(StoreRunState.OPEN)
            return self._manifest.counts()

    @property
    def counter_index(self) -> int:
        """NV index of the TPM rollback counter guarding this store."""
        return self._head.counter_index

    def _check_row(
        self, key: Key, nonce: object, ciphertext: object, expected: bytes | None
    ) -> Record:
        nonce_b = blob(nonce, "nonce", key)
        ct = blob(ciphertext, "ciphertext", key)
        if expected is None:
            # Authenticate first: a genuine row copied from elsewhere says "moved", junk says so.
            self._cipher.decrypt(*key, nonce_b, ct)
            raise StoreIntegrityError(
                "the row is not in the authenticated manifest (inserted behind the store's back)",
                *key,
            )
        plaintext = self._cipher.decrypt(*key, nonce_b, ct)
        if row_digest(*key, nonce_b, ct) != expected:
            raise StoreIntegrityError(
                "the row authenticates but is not the current version: an older copy of this "
                "record was put back",
                *key,
            )
        kind, payload = decode_payload(plaintext, *key)
        return Record(key[0], key[1], kind, payload)

    # ---------------------------------------------------------------- writes

    def put(self, record_type: str, record_id: str, payload: bytes | Mapping[str, Any]) -> None:
        """Create or replace one record (one transaction, one generation).

        Args:
            payload: raw bytes, or a mapping stored as canonical JSON.

        Raises:
            StoreIntegrityError: the database changed behind the store's back.
            StoreBackendError: the database failed; nothing was written.
        """
        with self.transaction() as tx:
            tx.put(record_type, record_id, payload)

    def delete(self, record_type: str, record_id: str, *, missing_ok: bool = False) -> None:
        """Delete one record (one transaction, one generation).

        Raises:
            RecordNotFound: no such record and ``missing_ok`` is off.
        """
        with self.transaction() as tx:
            tx.delete(record_type, record_id, missing_ok=missing_ok)

    @contextmanager
    def transaction(self) -> Iterator[StoreTransaction]:
        """Stage several puts and deletes and commit them as one change, or none on error.

        The store's lock is held for the whole block, so reads through the transaction see a
        stable store; keep blocks short. Write through ``tx`` only: a store write inside the
        block (or a nested transaction) is refused with ``ValueError``.
        """
        with self._lock:
            self._require(StoreRunState.OPEN)
            self._require_writable()
            if self._in_transaction:
                raise ValueError("a store transaction is already open in this thread; use its tx")
            tx = StoreTransaction(self)
            self._in_transaction = True
            try:
                yield tx
            finally:
                self._in_transaction = False
                tx._done = True
            # A delete of a record that never existed is no change, so no new generation.
            changes = {
                key: item
                for key, item in tx._staged.items()
                if item is not None or key in self._manifest
            }
            if changes:
                self._write_generation(changes)
                self._advance_counter()

    def _seal(
        self, record_type: str, record_id: str, payload: bytes | Mapping[str, Any]
    ) -> _Staged:
        check_type(record_type)
        check_id(record_id)
        plaintext = encode_payload(payload)
        nonce = _random(self._random_bytes, NONCE_BYTES)
        ciphertext = self._cipher.encrypt(record_type, record_id, plaintext, nonce)
        kind = PayloadKind(plaintext[:1])
        return _Staged(Record(record_type, record_id, kind, plaintext[1:]), nonce, ciphertext)

    def _write_generation(self, staged: Mapping[Key, _Staged | None]) -> int:
        """Step 1 of a change: commit the rows and the head at generation + 1.

        Returns the new generation. The counter is not touched (see :meth:`_advance_counter`).
        """
        with self._lock:
            self._require(StoreRunState.OPEN)
            self._require_writable()
            if self._increment_pending:
                self._advance_counter()
            old_head, old_mac = self._head, self._head_mac
            row_changes = {
                key: None if item is None else row_digest(*key, item.nonce, item.ciphertext)
                for key, item in staged.items()
            }
            if old_head.generation >= MAX_GENERATION:
                raise StoreCounterMismatch("the store generation would overflow")
            head = replace(
                old_head,
                generation=old_head.generation + 1,
                manifest_digest=self._manifest.digest(row_changes),
            )
            mac = self._cipher.head_mac(head)
            tables = self._tables
            try:
                with self._engine.connect() as conn:
                    trans = conn.begin()
                    try:
                        swapped = conn.execute(
                            sql_update(tables.head)
                            .where(
                                tables.head.c.id == HEAD_ROW_ID,
                                tables.head.c.generation == old_head.generation,
                                tables.head.c.mac == old_mac,
                            )
                            .values(
                                generation=head.generation,
                                manifest_digest=head.manifest_digest,
                                mac=mac,
                            )
                        )
                        if swapped.rowcount != 1:
                            self._state = StoreRunState.BROKEN
                            raise StoreIntegrityError(
                                f"the store head is no longer at generation {old_head.generation}"
                                ": another process wrote to the database, or it was replaced "
                                "while open; reopen the store"
                            )
                        for key, item in staged.items():
                            self._write_row(conn, key, item)
                    except BaseException:
                        trans.rollback()
                        raise
                    try:
                        trans.commit()
                    except SQLAlchemyError as err:
                        self._state = StoreRunState.BROKEN
                        raise StoreBackendError(
                            f"the commit of generation {head.generation} failed and its outcome "
                            f"is unknown: {err}; reopen the store to settle it"
                        ) from err
            except SQLAlchemyError as err:
                raise StoreBackendError(f"cannot write to the store database: {err}") from err
            self._head, self._head_mac = head, mac
            self._manifest.apply(row_changes)
            self._increment_pending = True
            return head.generation

    def _write_row(self, conn: Connection, key: Key, item: _Staged | None) -> None:
        records = self._tables.records
        where = (records.c.record_type == key[0], records.c.record_id == key[1])
        exists = key in self._manifest
        if item is None:
            if not exists:
                return
            result = conn.execute(delete(records).where(*where))
        elif exists:
            result = conn.execute(
                sql_update(records)
                .where(*where)
                .values(nonce=item.nonce, ciphertext=item.ciphertext)
            )
        else:
            try:
                conn.execute(
                    insert(records).values(
                        record_type=key[0],
                        record_id=key[1],
                        nonce=item.nonce,
                        ciphertext=item.ciphertext,
                    )
                )
            except IntegrityError:
                raise StoreIntegrityError(
                    "a row exists already that is not in the authenticated manifest (inserted "
                    "behind the store's back)",
                    *key,
                ) from None
            return
        if result.rowcount != 1:
            raise StoreIntegrityError(
                "the record's row is missing (deleted behind the store's back)", *key
            )

    def _advance_counter(self) -> None:
        """Step 2 of a change: bring the TPM counter up to the committed generation."""
        with self._lock:
            self._require_writable()
            if not self._increment_pending:
                return
            index = self._head.counter_index
            try:
                value = self._counter.counter_increment(index)
            except VtpmError as err:
                raise StoreBackendError(
                    f"generation {self._head.generation} is committed but the rollback counter "
                    f"at NV index {index:#010x} could not be incremented: {err}; it will be "
                    "retried before the next change and at the next open"
                ) from err
            if value != self._head.generation:
                self._state = StoreRunState.BROKEN
                raise StoreCounterMismatch(
                    f"the rollback counter at NV index {index:#010x} went to {value}, expected "
                    f"{self._head.generation}: another user of the counter; reopen the store"
                )
            self._increment_pending = False


class StoreTransaction:
    """Staged puts and deletes of one :meth:`TrustedStore.transaction` block."""

    def __init__(self, store: TrustedStore) -> None:
        self._store = store
        self._staged: dict[Key, _Staged | None] = {}
        self._done = False

    def _require_open(self) -> None:
        if self._done:
            raise ValueError("this store transaction has ended")

    def put(self, record_type: str, record_id: str, payload: bytes | Mapping[str, Any]) -> None:
        """Stage a create-or-replace. See :meth:`TrustedStore.put`."""
        self._require_open()
        item = self._store._seal(record_type, record_id, payload)
        self._staged[(record_type, record_id)] = item

    def delete(self, record_type: str, record_id: str, *, missing_ok: bool = False) -> None:
        """Stage a delete.

        Raises:
            RecordNotFound: no such record (staged or stored) and ``missing_ok`` is off.
        """
        self._require_open()
        check_type(record_type)
        check_id(record_id)
        key = (record_type, record_id)
        exists = self._staged[key] is not None if key in self._staged else self._store._has(key)
        if not exists and not missing_ok:
            raise RecordNotFound(record_type, record_id)
        self._staged[key] = None

    def get(self, record_type: str, record_id: str) -> Record:
        """The record as this transaction would leave it. See :meth:`TrustedStore.get`."""
        found = self.find(record_type, record_id)
        if found is None:
            raise RecordNotFound(record_type, record_id)
        return found

    def find(self, record_type: str, record_id: str) -> Record | None:
        """Like :meth:`get`, but ``None`` when the record does not exist (or is staged deleted)."""
        self._require_open()
        key = (record_type, record_id)
        if key in self._staged:
            item = self._staged[key]
            return None if item is None else item.record
        return self._store.find(record_type, record_id)


def _random(random_bytes: RandomBytes, n: int) -> bytes:
    value = random_bytes(n)
    if not isinstance(value, bytes) or len(value) != n:
        raise ValueError(f"random_bytes({n}) returned {len(value)} bytes")
    return value


def _unseal(sealer: DataKeySealer, head: HeadFields) -> StoreCipher:
    try:
        data_key = sealer.unseal(head.sealed_key)
    except VtpmError as err:
        raise StoreKeyError(
            f"cannot unseal the store data key: {err} (another TPM, or the host platform state "
            "no longer satisfies the sealing policy)"
        ) from err
    if len(data_key) != DATA_KEY_BYTES:
        raise StoreKeyError(
            f"the unsealed data key is {len(data_key)} bytes, expected {DATA_KEY_BYTES}"
        )
    return StoreCipher(data_key, head.store_id)
