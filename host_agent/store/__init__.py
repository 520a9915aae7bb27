"""The trusted store: records encrypted under a TPM-sealed key, rollback-guarded by a TPM counter.

See :mod:`host_agent.store.store` for the protocol and :mod:`host_agent.store.cipher` for the
record format. The store speaks to the TPM only through the ports in
:mod:`host_agent.store.ports`.
"""

from __future__ import annotations

from host_agent.store.cipher import PayloadKind
from host_agent.store.errors import (
    RecordNotFound,
    StoreAlreadyInitialised,
    StoreBackendError,
    StoreBusy,
    StoreCounterMismatch,
    StoreError,
    StoreFormatError,
    StoreIntegrityError,
    StoreKeyError,
    StoreNotInitialised,
    StoreRolledBack,
    StoreStateError,
)
from host_agent.store.ports import DataKeySealer, RandomBytes, RollbackCounter
from host_agent.store.settings import DEFAULT_COUNTER_INDEX, StoreSettings
from host_agent.store.store import Record, StoreRunState, StoreTransaction, TrustedStore

__all__ = [
    "DEFAULT_COUNTER_INDEX",
    "DataKeySealer",
    "PayloadKind",
    "RandomBytes",
    "Record",
    "RecordNotFound",
    "RollbackCounter",
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
    "StoreRunState",
    "StoreSettings",
    "StoreStateError",
    "StoreTransaction",
    "TrustedStore",
]
