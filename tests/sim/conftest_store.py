"""Fixtures of the store's sim tests, imported by name into tests/sim/test_store*.py.

(Not a conftest.py: tests/sim/conftest.py belongs to the whole sim tier. The store test modules
import what they use from here; module-scoped fixtures are then per module, the PostgreSQL
server is per process, see tests/helpers/postgres.py.)

Each test's store gets a SQLite file or a fresh PostgreSQL database (``db`` is parametrised),
a counter NV index of its own on a swtpm of the module's own, and the real host TPM adapter.
"""

from __future__ import annotations

import itertools
import secrets
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from host_agent.store import (
    StoreSettings,
    TrustedStore,
)
from host_agent.store._schema import StoreTables
from host_agent.tpm.adapter import PytssHostTpm
from host_agent.tpm.errors import TpmCommandError
from tests.helpers import postgres
from tests.helpers.swtpm import Swtpm, start_swtpm

__all__ = [
    "SECRET",
    "TABLES",
    "Db",
    "FaultyCounter",
    "capture_unchanged",
    "config",
    "counter",
    "db",
    "make_store",
    "next_counter_index",
    "pg",
    "store",
    "store_swtpm",
    "tpm",
]

SECRET = b"PLAINTEXT-vTPM-STATE-" + b"7f3a9c" * 8  # never to be found in database bytes
TABLES = StoreTables.named("vtpm_store")
_indices = itertools.count(0x0180_1000)


def next_counter_index() -> int:
    """A counter NV index no other store test uses."""
    return next(_indices)


_names = itertools.count()


# --------------------------------------------------------------------------- TPM


@pytest.fixture(scope="module")
def store_swtpm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Swtpm]:
    """A swtpm of this module's own, so its NV counters do not meet other modules' tests."""
    tpm = start_swtpm(tmp_path_factory.mktemp("store-swtpm"))
    yield tpm
    tpm.stop()


@pytest.fixture(scope="module")
def tpm(store_swtpm: Swtpm, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PytssHostTpm]:
    host_tpm = PytssHostTpm(store_swtpm.tcti, tmp_path_factory.mktemp("host-keys"))
    yield host_tpm
    host_tpm.close()


class FaultyCounter:
    """The real counter, with increments that fail on demand (fault injection, not a fake)."""

    def __init__(self, tpm: PytssHostTpm) -> None:
        self._tpm = tpm
        self.fail_increments = 0
        self.read_offset = 0

    def counter_define(self, index: int) -> int:
        return self._tpm.counter_define(index)

    def counter_read(self, index: int) -> int:
        return self._tpm.counter_read(index) + self.read_offset

    def counter_increment(self, index: int) -> int:
        if self.fail_increments:
            self.fail_increments -= 1
            raise TpmCommandError(0x922, "counter_increment: TPM2_NV_Increment", "injected")
        return self._tpm.counter_increment(index)


# --------------------------------------------------------------------------- databases


@pytest.fixture(scope="module")
def pg() -> Iterator[postgres.Postgres]:
    server = postgres.acquire()
    yield server
    postgres.release()


@dataclass
class Db:
    """One store database as an attacker with disk access sees it."""

    url: str
    snapshot: Callable[[], Any]
    restore: Callable[[Any], None]
    raw_bytes: Callable[[], bytes]
    _engines: list[sa.Engine] = field(default_factory=list)

    def engine(self) -> sa.Engine:
        if not self._engines:
            self._engines.append(sa.create_engine(self.url))
        return self._engines[0]

    def dispose(self) -> None:
        for engine in self._engines:
            engine.dispose()
        self._engines.clear()

    def execute(self, stmt: Any) -> None:
        with self.engine().begin() as conn:
            conn.execute(stmt)

    def rows(self) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
        """Every row of both tables, as plain tuples, in a stable order."""
        with self.engine().connect() as conn:
            head = [tuple(r) for r in conn.execute(sa.select(TABLES.head))]
            records = sorted(
                tuple(r)
                for r in conn.execute(
                    sa.select(TABLES.records).order_by(
                        TABLES.records.c.record_type, TABLES.records.c.record_id
                    )
                )
            )
        return head, records

    def row(self, record_type: str, record_id: str) -> tuple[bytes, bytes]:
        with self.engine().connect() as conn:
            r = conn.execute(
                sa.select(TABLES.records.c.nonce, TABLES.records.c.ciphertext).where(
                    TABLES.records.c.record_type == record_type,
                    TABLES.records.c.record_id == record_id,
                )
            ).one()
        return bytes(r.nonce), bytes(r.ciphertext)

    def set_row(
        self, record_type: str, record_id: str, *, nonce: Any = None, ciphertext: Any = None
    ) -> None:
        values = {}
        if nonce is not None:
            values["nonce"] = nonce
        if ciphertext is not None:
            values["ciphertext"] = ciphertext
        self.execute(
            sa.update(TABLES.records)
            .where(
                TABLES.records.c.record_type == record_type,
                TABLES.records.c.record_id == record_id,
            )
            .values(**values)
        )


def _sqlite_db(tmp_path: Path) -> Db:
    path = tmp_path / "store.db"
    snaps = itertools.count()

    def snapshot() -> Path:
        copy = tmp_path / f"snapshot-{next(snaps)}.db"
        shutil.copy2(path, copy)
        return copy

    def restore(copy: Path) -> None:
        shutil.copy2(copy, path)

    def raw_bytes() -> bytes:
        return b"".join(p.read_bytes() for p in sorted(tmp_path.glob("store.db*")))

    return Db(f"sqlite:///{path}", snapshot, restore, raw_bytes)


def _postgres_db(server: postgres.Postgres) -> Db:
    name = f"store_{next(_names)}"
    server.create_database(name)
    snaps = itertools.count()

    def snapshot() -> str:
        copy = f"{name}_snap_{next(snaps)}"
        server.create_database(copy, template=name)
        return copy

    def restore(copy: str) -> None:
        server.drop_database(name)
        server.create_database(name, template=copy)

    def raw_bytes() -> bytes:
        server.checkpoint()
        files = [p for p in server.database_dir(name).rglob("*") if p.is_file()]
        files += [p for p in (server.data_dir / "pg_wal").glob("0*") if p.is_file()]
        return b"".join(p.read_bytes() for p in files)

    return Db(server.url(name), snapshot, restore, raw_bytes)


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Db]:
    if request.param == "sqlite":
        handle = _sqlite_db(tmp_path)
    else:
        handle = _postgres_db(request.getfixturevalue("pg"))
    yield handle
    handle.dispose()


@pytest.fixture
def config(db: Db) -> StoreSettings:
    """A fresh counter index per test: the module's swtpm keeps every counter it defined."""
    return StoreSettings(url=db.url, counter_index=next_counter_index())


@pytest.fixture
def counter(tpm: PytssHostTpm) -> FaultyCounter:
    return FaultyCounter(tpm)


@pytest.fixture
def make_store(
    config: StoreSettings, tpm: PytssHostTpm, counter: FaultyCounter
) -> Iterator[Callable[..., TrustedStore]]:
    """``make_store(create=False)`` opens (or creates) the test's store; all closed after."""
    opened: list[TrustedStore] = []

    def make(*, create: bool = False, cfg: StoreSettings | None = None) -> TrustedStore:
        method = TrustedStore.create if create else TrustedStore.open
        store = method(cfg or config, sealer=tpm, counter=counter, random_bytes=secrets.token_bytes)
        opened.append(store)
        return store

    yield make
    for store in opened:
        store.close()


@pytest.fixture
def store(make_store: Callable[..., TrustedStore]) -> TrustedStore:
    return make_store(create=True)


def capture_unchanged(db: Db, tpm: PytssHostTpm, config: StoreSettings) -> Callable[[], None]:
    """Capture the rows and the counter now; the returned check asserts they did not change."""
    before = (db.rows(), tpm.counter_read(config.counter_index))

    def check() -> None:
        assert (db.rows(), tpm.counter_read(config.counter_index)) == before

    return check
