"""The store at the agent's edges: created by ``vtpm-host init``, opened when the agent starts.

This is where randomness enters the store (``secrets.token_bytes``) and where the agent
configuration is turned into :class:`~host_agent.store.store.StoreSettings`.

:func:`ensure_store` is an init step (``host_agent.tpm.provision.InitStep``): list
``"host_agent.store.provision:ensure_store"`` in ``host_agent.tpm.cli.INIT_STEPS`` and
``vtpm-host init`` creates the store once and, on every later run, opens it — so a rolled-back or
tampered store makes ``init`` fail with the store's typed error instead of saying "nothing to do".
:func:`open_store` is what the daemon calls at start: it returns the open store or raises, and the
daemon refuses to start with the error's message.
"""

from __future__ import annotations

import secrets
from pathlib import Path

from sqlalchemy.engine import make_url

from host_agent.config import AgentConfig
from host_agent.store.errors import StoreNotInitialised
from host_agent.store.ports import StoreTpm
from host_agent.store.settings import StoreSettings
from host_agent.store.store import TrustedStore

__all__ = ["ensure_store", "open_store", "store_settings"]


def store_settings(config: AgentConfig) -> StoreSettings:
    """The store settings of this agent configuration (default: SQLite in the state dir)."""
    return StoreSettings.from_config(config.store, config.state_dir)


def _prepare_sqlite_dir(settings: StoreSettings) -> None:
    url = make_url(settings.url)
    if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
        Path(url.database).parent.mkdir(parents=True, exist_ok=True, mode=0o700)


def open_store(config: AgentConfig, tpm: StoreTpm, *, read_only: bool = False) -> TrustedStore:
    """Open the agent's store, refusing a rolled-back, tampered or foreign one.

    Args:
        read_only: inspect without the writer lock (see :meth:`TrustedStore.open`).

    Raises:
        StoreBusy: another process has it open for writing (not with ``read_only``).
        StoreNotInitialised: no store yet (run ``vtpm-host init``).
        StoreRolledBack, StoreIntegrityError, StoreCounterMismatch, StoreKeyError,
        StoreFormatError, StoreBackendError: see :meth:`TrustedStore.open`.
    """
    return TrustedStore.open(
        store_settings(config),
        sealer=tpm,
        counter=tpm,
        random_bytes=secrets.token_bytes,
        read_only=read_only,
    )


def ensure_store(tpm: StoreTpm, config: AgentConfig, keys: object = None) -> str | None:
    """Init step: create the store if there is none, else open (and so verify) it.

    Args:
        tpm: the open host TPM port (sealer and counter).
        config: the agent configuration.
        keys: the host key report (unused; part of the init-step signature).

    Returns:
        One line saying what was created, or None when the store existed and verified.

    Raises:
        StoreError: the existing store is refused (rolled back, tampered …), or the counter
            exists without a database (see :class:`StoreAlreadyInitialised`).
    """
    settings = store_settings(config)
    try:
        # Read-only: verifying needs no lock, so init also works while the daemon runs.
        open_store(config, tpm, read_only=True).close()
        return None
    except StoreNotInitialised:
        pass
    _prepare_sqlite_dir(settings)
    store = TrustedStore.create(settings, sealer=tpm, counter=tpm, random_bytes=secrets.token_bytes)
    store.close()
    where = make_url(settings.url).render_as_string(hide_password=True)
    return (
        f"created the trusted store at {where} (data key sealed to this TPM, rollback counter "
        f"at NV index {settings.counter_index:#010x})"
    )
