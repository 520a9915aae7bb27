"""Rollback of the whole store, the crash window of the counter protocol, and one writer.

The protocol is in host_agent/store/store.py's docstring. Old copies are put back as an
attacker would (a copied SQLite file, a copied PostgreSQL database, both tables by SQL), crashes
are staged by running the protocol's first step and stopping, TPM failures and races by thin
wrappers round the real counter.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from pathlib import Path

import pytest
import sqlalchemy as sa

from host_agent.store import (
    StoreBackendError,
    StoreBusy,
    StoreCounterMismatch,
    StoreIntegrityError,
    StoreRolledBack,
    StoreSettings,
    StoreStateError,
    TrustedStore,
)
from host_agent.tpm.adapter import PytssHostTpm
from tests.sim import conftest_store as _fx
from tests.sim.conftest_store import (
    SECRET,
    TABLES,
    Db,
    FaultyCounter,
    capture_unchanged,
)

# Fixtures used by name (pytest finds them as attributes of this module).
pg = _fx.pg
store_swtpm = _fx.store_swtpm
tpm = _fx.tpm
db = _fx.db
config = _fx.config
counter = _fx.counter
make_store = _fx.make_store
store = _fx.store


def test_second_writer_is_refused_while_the_first_is_open(
    store: TrustedStore,
    make_store: Callable[..., TrustedStore],
    config: StoreSettings,
    tpm: PytssHostTpm,
    counter: FaultyCounter,
) -> None:
    store.put("vaik", "a", b"1")
    with pytest.raises(StoreBusy, match="open for writing") as info:
        make_store()
    assert info.value.id == "store.busy"
    reader = TrustedStore.open(
        config, sealer=tpm, counter=counter, random_bytes=secrets.token_bytes, read_only=True
    )
    try:
        assert reader.read_only
        assert reader.get("vaik", "a").payload == b"1"
        with pytest.raises(StoreStateError, match="read-only"):
            reader.put("vaik", "b", b"2")
    finally:
        reader.close()
    store.put("vaik", "b", b"2")  # the reader changed nothing the writer relies on
    store.close()
    assert make_store().get("vaik", "b").payload == b"2"


class RacingCounter:
    """The real counter; the first read lets a writer commit a change first (a race, staged)."""

    def __init__(self, tpm: PytssHostTpm, race: Callable[[], None]) -> None:
        self._tpm = tpm
        self._race: Callable[[], None] | None = race

    def counter_define(self, index: int) -> int:
        return self._tpm.counter_define(index)

    def counter_read(self, index: int) -> int:
        if self._race is not None:
            race, self._race = self._race, None
            race()
        return self._tpm.counter_read(index)

    def counter_increment(self, index: int) -> int:
        return self._tpm.counter_increment(index)


def test_read_only_open_racing_a_writer_sees_one_consistent_state(
    store: TrustedStore, config: StoreSettings, tpm: PytssHostTpm
) -> None:
    """Head read, then the writer commits and increments, then the counter is read: without
    the re-read of the head this would look like a rollback (counter ahead of the head)."""
    store.put("vaik", "a", b"1")
    racing = RacingCounter(tpm, lambda: store.put("vaik", "b", b"2"))
    reader = TrustedStore.open(
        config, sealer=tpm, counter=racing, random_bytes=secrets.token_bytes, read_only=True
    )
    try:
        assert reader.generation == store.generation
        assert reader.get("vaik", "b").payload == b"2"
    finally:
        reader.close()


def test_read_only_open_leaves_an_interrupted_increment_to_the_writer(
    store: TrustedStore,
    make_store: Callable[..., TrustedStore],
    config: StoreSettings,
    tpm: PytssHostTpm,
) -> None:
    generation = store._write_generation({("vaik", "x"): store._seal("vaik", "x", b"1")})
    store.close()  # crash before the increment
    reader = TrustedStore.open(
        config, sealer=tpm, counter=tpm, random_bytes=secrets.token_bytes, read_only=True
    )
    assert reader.increment_pending
    assert reader.get("vaik", "x").payload == b"1"
    reader.close()
    assert tpm.counter_read(config.counter_index) == generation - 1
    writer = make_store()
    assert not writer.increment_pending
    assert tpm.counter_read(config.counter_index) == generation


# --------------------------------------------------------------------------- rollback


def test_rolled_back_database_is_refused_at_open(
    make_store: Callable[..., TrustedStore], db: Db, tpm: PytssHostTpm, config: StoreSettings
) -> None:
    store = make_store(create=True)
    store.put("vaik", "vm-1", b"vaik-of-vm-1")
    old_generation = store.generation
    store.close()
    old = db.snapshot()

    store = make_store()
    store.delete("vaik", "vm-1")  # e.g. vAIK migrated away: must never come back
    store.put("journal", "mig-1", {"step": "committed"})
    latest_generation = store.generation
    store.close()
    latest = db.snapshot()

    db.dispose()
    db.restore(old)
    unchanged = capture_unchanged(db, tpm, config)
    with pytest.raises(StoreRolledBack) as info:
        make_store()
    assert info.value.expected_generation == latest_generation
    assert info.value.found_generation == old_generation
    assert info.value.id == "store.rolled_back"
    assert "rolled back" in str(info.value) and "refusing to start" in str(info.value)
    unchanged()

    db.dispose()
    db.restore(latest)
    store = make_store()
    assert store.find("vaik", "vm-1") is None


def test_tables_rolled_back_under_a_running_store_are_refused(
    store: TrustedStore, make_store: Callable[..., TrustedStore], db: Db
) -> None:
    """The SQL-copy variant: both tables put back at an older generation while the store runs."""
    store.put("binding", "vm-1", {"cert_user": "old-tenant"})
    old_head, old_records = db.rows()
    store.put("binding", "vm-1", {"cert_user": "new-tenant"})
    store.put("vaik", "vm-1", b"k1")
    with db.engine().begin() as conn:
        conn.execute(sa.delete(TABLES.records))
        conn.execute(sa.delete(TABLES.head))
        conn.execute(
            sa.insert(TABLES.head), [dict(zip(TABLES.head.c.keys(), old_head[0], strict=True))]
        )
        conn.execute(
            sa.insert(TABLES.records),
            [dict(zip(TABLES.records.c.keys(), r, strict=True)) for r in old_records],
        )
    with pytest.raises(StoreIntegrityError, match="older copy of this record was put back"):
        store.get("binding", "vm-1")
    with pytest.raises(StoreIntegrityError, match="row is missing"):
        store.get("vaik", "vm-1")
    with pytest.raises(StoreIntegrityError, match="no longer at generation"):
        store.put("seal", "vm-1", SECRET)
    store.close()
    with pytest.raises(StoreRolledBack) as info:
        make_store()
    assert info.value.expected_generation == info.value.found_generation + 2


def test_lost_store_put_back_after_a_new_store_adopted_its_counter_is_refused(
    make_store: Callable[..., TrustedStore], config: StoreSettings, tmp_path: Path
) -> None:
    lost = make_store(create=True)
    lost.put("vaik", "vm-1", b"vaik-of-the-lost-store")
    lost.close()
    # The operator starts over on another database, adopting the counter, and writes nothing.
    fresh = StoreSettings(
        url=f"sqlite:///{tmp_path / 'fresh.db'}",
        counter_index=config.counter_index,
        allow_existing_counter=True,
    )
    make_store(create=True, cfg=fresh).close()
    with pytest.raises(StoreRolledBack):
        make_store()  # the lost store's database, back in place


def test_crash_between_commit_and_counter_increment_opens(
    store: TrustedStore,
    make_store: Callable[..., TrustedStore],
    tpm: PytssHostTpm,
    config: StoreSettings,
) -> None:
    store.put("vaik", "vm-1", b"k1")
    before = tpm.counter_read(config.counter_index)
    staged = {("vaik", "vm-2"): store._seal("vaik", "vm-2", b"k2")}
    generation = store._write_generation(staged)  # step 1: committed
    store.close()  # "crash": step 2 (counter increment) never runs
    assert tpm.counter_read(config.counter_index) == before == generation - 1

    reopened = make_store()
    assert reopened.generation == generation
    assert tpm.counter_read(config.counter_index) == generation  # increment finished at open
    assert reopened.get("vaik", "vm-2").payload == b"k2"
    reopened.put("vaik", "vm-3", b"k3")
    assert tpm.counter_read(config.counter_index) == reopened.generation == generation + 1


def test_copy_taken_during_the_crash_window_is_refused_once_newer_changes_exist(
    store: TrustedStore, make_store: Callable[..., TrustedStore], db: Db
) -> None:
    store.put("vaik", "vm-1", b"k1")
    store._write_generation({("vaik", "vm-2"): store._seal("vaik", "vm-2", b"k2")})
    store.close()
    crash_copy = db.snapshot()  # generation = counter + 1

    store = make_store()  # finishes the increment
    store.delete("vaik", "vm-2")
    store.close()
    db.dispose()
    db.restore(crash_copy)
    with pytest.raises(StoreRolledBack):
        make_store()


def test_failed_counter_increment_is_retried_before_the_next_change(
    store: TrustedStore,
    make_store: Callable[..., TrustedStore],
    counter: FaultyCounter,
    tpm: PytssHostTpm,
    config: StoreSettings,
) -> None:
    start = store.generation
    counter.fail_increments = 1
    with pytest.raises(StoreBackendError, match="is committed but the rollback counter"):
        store.put("vaik", "vm-1", b"k1")
    assert store.get("vaik", "vm-1").payload == b"k1"  # the change itself is durable
    assert tpm.counter_read(config.counter_index) == start
    store.put("vaik", "vm-2", b"k2")  # retries the pending increment first
    assert tpm.counter_read(config.counter_index) == store.generation == start + 2
    store.close()
    assert make_store().get("vaik", "vm-1").payload == b"k1"


def test_counter_behind_by_more_than_one_change_is_a_mismatch(
    store: TrustedStore,
    make_store: Callable[..., TrustedStore],
    counter: FaultyCounter,
    db: Db,
    tpm: PytssHostTpm,
    config: StoreSettings,
) -> None:
    store.put("vaik", "vm-1", b"k1")
    store.close()
    counter.read_offset = -2  # as if the counter were another, younger one
    unchanged = capture_unchanged(db, tpm, config)
    with pytest.raises(StoreCounterMismatch, match="more than one change ahead"):
        make_store()
    unchanged()


def test_counter_index_other_than_the_stores_is_a_mismatch(
    store: TrustedStore, make_store: Callable[..., TrustedStore], config: StoreSettings
) -> None:
    store.close()
    other = StoreSettings(url=config.url, counter_index=config.counter_index + 0x100)
    with pytest.raises(StoreCounterMismatch, match="configuration names"):
        make_store(cfg=other)


@pytest.mark.parametrize("crash_at", ["before_commit", "after_commit", "after_increment"])
def test_crash_at_every_step_of_a_change_reopens_and_old_copies_stay_refused(
    store: TrustedStore,
    make_store: Callable[..., TrustedStore],
    db: Db,
    tpm: PytssHostTpm,
    config: StoreSettings,
    crash_at: str,
) -> None:
    store.put("vaik", "vm-1", b"k1")
    start = store.generation
    if crash_at == "before_commit":
        with pytest.raises(RuntimeError), store.transaction() as tx:
            tx.put("vaik", "vm-2", b"k2")
            raise RuntimeError("process dies before the commit")
    elif crash_at == "after_commit":
        store._write_generation({("vaik", "vm-2"): store._seal("vaik", "vm-2", b"k2")})
    else:
        store.put("vaik", "vm-2", b"k2")
    store.close()
    at_crash = db.snapshot()
    committed = crash_at != "before_commit"

    reopened = make_store()
    assert reopened.generation == start + committed
    assert tpm.counter_read(config.counter_index) == reopened.generation
    assert (reopened.find("vaik", "vm-2") is not None) == committed
    reopened.put("journal", "after-recovery", {"ok": True})
    reopened.close()

    db.dispose()
    db.restore(at_crash)
    with pytest.raises(StoreRolledBack):
        make_store()
