"""Where a trusted store lives and which TPM counter guards it."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from host_agent.config import StoreConfig

__all__ = ["DEFAULT_COUNTER_INDEX", "StoreSettings"]

DEFAULT_COUNTER_INDEX = 0x0180_5354
"""In the owner NV range the host TPM adapter accepts (0x01800000–0x01BFFFFF); "ST" for store."""
_PREFIX_RE = re.compile(r"[a-z][a-z0-9_]{0,39}")


@dataclass(frozen=True)
class StoreSettings:
    """Where the store lives and which TPM counter guards it (resolved; see :meth:`from_config`).

    Attributes:
        url: SQLAlchemy URL: ``sqlite:////var/lib/vtpm-trust/store.db`` (default deployment) or
            ``postgresql://user@host/db`` (the psycopg 3 driver is used for ``postgresql://``).
        counter_index: NV index of the rollback counter (owner range).
        table_prefix: tables are ``<prefix>_head`` and ``<prefix>_records``, so several hosts'
            stores can share one PostgreSQL database.
        allow_existing_counter: let :meth:`TrustedStore.create` adopt a counter that exists
            already. Off by default: an existing counter means a store was created on this TPM
            before, and its database is missing; creating a fresh one would discard it silently.
    """

    url: str
    counter_index: int = DEFAULT_COUNTER_INDEX
    table_prefix: str = "vtpm_store"
    allow_existing_counter: bool = False

    def __post_init__(self) -> None:
        if not 0x0100_0000 <= self.counter_index <= 0x01FF_FFFF:
            raise ValueError(f"counter_index {self.counter_index:#x} is not an NV index")
        if not _PREFIX_RE.fullmatch(self.table_prefix):
            raise ValueError(f"table_prefix {self.table_prefix!r} must match {_PREFIX_RE.pattern}")

    @classmethod
    def from_config(cls, config: StoreConfig, state_dir: Path) -> StoreSettings:
        """Settings from the agent configuration's ``[store]`` slice.

        Args:
            config: ``AgentConfig.store``; ``url`` None means ``<state_dir>/store.sqlite``.
            state_dir: the agent's state directory.
        """
        url = config.url or f"sqlite:///{Path(state_dir) / 'store.sqlite'}"
        return cls(url=url)
