"""Errors of the trusted store, all derived from the one tree in :mod:`evidence.errors`.

::

    VtpmError
    └── StoreError                            store.error
        ├── StoreIntegrityError(what, type, id)
        │                                     store.integrity: tampered, truncated, moved, swapped,
        │                                     stale, missing or foreign row, or a forged head
        ├── StoreRolledBack(expected, found)  store.rolled_back: an older database was put back
        ├── StoreCounterMismatch              store.counter_mismatch: the counter is not this
        │                                     database's (other TPM, other NV index)
        ├── StoreKeyError                     store.key: the data key cannot be unsealed
        ├── StoreFormatError                  store.format: a store of another format version
        ├── StoreNotInitialised               store.not_initialised: no store at that URL
        ├── StoreAlreadyInitialised           store.already_initialised
        ├── StoreStateError(state, required)  store.state: closed, read-only, or broken (reopen)
        ├── StoreBusy                         store.busy: another process has it open for writing
        ├── StoreBackendError                 store.backend: wraps SQLAlchemy / driver / TPM errors
        └── RecordNotFound(type, id)          store.record_not_found

Each detection of bad data changes nothing: the operation that raised it wrote nothing. Foreign
errors (``sqlalchemy.exc.SQLAlchemyError``) are wrapped once, where they enter, with ``from``.
"""

from __future__ import annotations

from typing import ClassVar

from evidence.errors import VtpmError

__all__ = [
    "RecordNotFound",
    "StoreAlreadyInitialised",
    "StoreBackendError",
    "StoreBusy",
    "StoreCounterMismatch",
    "StoreError",
    "StoreFormatError",
    "StoreIntegrityError",
    "StoreKeyError",
    "StoreNotInitialised",
    "StoreRolledBack",
    "StoreStateError",
]


class StoreError(VtpmError):
    """Root of the trusted store's errors."""

    id: ClassVar[str] = "store.error"


class StoreIntegrityError(StoreError):
    """Stored data failed authentication or does not match the authenticated store state.

    Args:
        what: what failed (``"authentication tag mismatch: tampered, truncated, moved or
            swapped ciphertext"``, ``"an older version of this record was put back"`` …).
        record_type: type of the record concerned, ``None`` for the store head or the record set.
        record_id: id of the record concerned, ``None`` likewise.
    """

    id: ClassVar[str] = "store.integrity"

    def __init__(
        self, what: str, record_type: str | None = None, record_id: str | None = None
    ) -> None:
        self.what = what
        self.record_type = record_type
        self.record_id = record_id
        where = "store" if record_type is None else f"store record {record_type}/{record_id}"
        super().__init__(f"{where}: {what}; nothing was changed")


class StoreRolledBack(StoreError):
    """The database is older than the TPM rollback counter says it must be.

    Args:
        expected_generation: the generation the counter vouches for (its current value).
        found_generation: the authenticated generation found in the database.
        counter_index: the NV index of the counter, for the message.
    """

    id: ClassVar[str] = "store.rolled_back"

    def __init__(
        self, expected_generation: int, found_generation: int, counter_index: int | None = None
    ) -> None:
        self.expected_generation = expected_generation
        self.found_generation = found_generation
        self.counter_index = counter_index
        counter = "the TPM rollback counter"
        if counter_index is not None:
            counter += f" at NV index {counter_index:#010x}"
        super().__init__(
            f"the store database was rolled back: {counter} expects generation "
            f"{expected_generation}, the database is at generation {found_generation}, so an "
            "older copy of the database was put back; refusing to start. Put back the latest "
            "copy; starting over means deleting the database and creating the store again with "
            "allow_existing_counter, which loses every record"
        )


class StoreCounterMismatch(StoreError):
    """The rollback counter cannot belong to this database.

    Raised when the database is ahead of the counter by more than one interrupted increment (the
    counter was redefined, or belongs to another TPM), when the database names another NV index
    than the configuration, or when an increment does not land on the expected value.
    """

    id: ClassVar[str] = "store.counter_mismatch"


class StoreKeyError(StoreError):
    """The store's data key cannot be unsealed (another TPM, or the sealing policy fails)."""

    id: ClassVar[str] = "store.key"


class StoreFormatError(StoreError):
    """The database holds a store of a format version this code does not handle."""

    id: ClassVar[str] = "store.format"


class StoreNotInitialised(StoreError):
    """No store exists at the configured database (run ``vtpm-host init``)."""

    id: ClassVar[str] = "store.not_initialised"


class StoreAlreadyInitialised(StoreError):
    """Creating a store where one exists already, or whose rollback counter exists already."""

    id: ClassVar[str] = "store.already_initialised"


class StoreStateError(StoreError):
    """The store is not in a state that allows the operation.

    Args:
        state: the current run state.
        required: the state the operation needs.
    """

    id: ClassVar[str] = "store.state"

    def __init__(self, state: str, required: str, detail: str = "") -> None:
        self.state = state
        self.required = required
        text = f"store is {state}, the operation needs it {required}"
        super().__init__(f"{text}: {detail}" if detail else text)


class StoreBusy(StoreError):
    """Another process (or another store object) has this store open for writing.

    One writer per store keeps the counter protocol sound: a second opener would finish the
    first writer's pending counter increment, and the first writer would then increment again.
    """

    id: ClassVar[str] = "store.busy"


class StoreBackendError(StoreError):
    """The database backend failed (connection, disk, driver); wraps the SQLAlchemy error."""

    id: ClassVar[str] = "store.backend"


class RecordNotFound(StoreError):
    """No record of that type and id exists in the store.

    Args:
        record_type: the type asked for.
        record_id: the id asked for.
    """

    id: ClassVar[str] = "store.record_not_found"

    def __init__(self, record_type: str, record_id: str) -> None:
        self.record_type = record_type
        self.record_id = record_id
        super().__init__(f"no store record {record_type}/{record_id}")
