"""The trusted store on a real swtpm and real databases: the API, invariant 5, record attacks.

Every test runs twice: on a SQLite file and on a PostgreSQL database of a server the suite
starts (tests/helpers/postgres.py). Attacks are made the way an attacker with disk access would:
raw SQL on the rows, a copied SQLite file, a copied PostgreSQL database. Each refusal is checked
to change nothing: the rows of both tables and the TPM counter are compared before and after.
Rollback, crash and writer-exclusion tests are in test_store_rollback.py.
"""

from __future__ import annotations

import secrets
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from host_agent.store import (
    RecordNotFound,
    StoreAlreadyInitialised,
    StoreBackendError,
    StoreFormatError,
    StoreIntegrityError,
    StoreKeyError,
    StoreNotInitialised,
    StoreRunState,
    StoreSettings,
    StoreStateError,
    TrustedStore,
)
from host_agent.store._schema import StoreTables
from host_agent.tpm.adapter import PytssHostTpm
from host_agent.tpm.errors import TpmCommandError
from tests.helpers.swtpm import Swtpm
from tests.sim import conftest_store as _fx
from tests.sim.conftest_store import (
    SECRET,
    TABLES,
    Db,
    FaultyCounter,
    capture_unchanged,
    next_counter_index,
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


# --------------------------------------------------------------------------- API


def test_put_get_list_delete(store: TrustedStore) -> None:
    store.put("vaik", "vm-1", b"\x00wrapped-key")
    store.put("binding", "vm-1", {"uuid": "vm-1", "cert_user": "ab" * 8})
    store.put("seal", "vm-1", SECRET)
    store.put("journal", "mig-1", {"step": 1})
    store.put("journal", "mig-0", {"step": 0})

    assert store.get("vaik", "vm-1").payload == b"\x00wrapped-key"
    assert store.get("binding", "vm-1").json() == {"uuid": "vm-1", "cert_user": "ab" * 8}
    with pytest.raises(ValueError):
        store.get("seal", "vm-1").json()
    assert [r.json() for r in store.list_records("journal")] == [{"step": 0}, {"step": 1}]
    assert store.record_ids("journal") == ["mig-0", "mig-1"]
    assert store.list_records("exgkey") == []

    store.put("journal", "mig-1", {"step": 2})
    assert store.get("journal", "mig-1").json() == {"step": 2}
    store.delete("journal", "mig-1")
    assert store.find("journal", "mig-1") is None
    with pytest.raises(RecordNotFound) as info:
        store.get("journal", "mig-1")
    assert info.value.id == "store.record_not_found"
    with pytest.raises(RecordNotFound):
        store.delete("journal", "mig-1")
    generation = store.generation
    store.delete("journal", "mig-1", missing_ok=True)
    assert store.generation == generation  # nothing to do, no change

    with pytest.raises(ValueError):
        store.put("Bad Type", "x", b"")
    with pytest.raises(ValueError):
        store.put("vaik", "has space", b"")
    with pytest.raises(TypeError):
        store.put("vaik", "x", "text")  # type: ignore[arg-type]


def test_every_change_is_one_generation_and_one_counter_step(
    store: TrustedStore, tpm: PytssHostTpm, config: StoreSettings
) -> None:
    start = tpm.counter_read(config.counter_index)
    assert store.generation == start
    store.put("vaik", "a", b"1")
    with store.transaction() as tx:
        tx.put("vaik", "b", b"2")
        tx.put("binding", "b", {"x": 1})
        tx.delete("vaik", "a")
        assert tx.find("vaik", "a") is None
        assert tx.get("vaik", "b").payload == b"2"
    assert store.generation == start + 2
    assert tpm.counter_read(config.counter_index) == start + 2
    assert store.find("vaik", "a") is None


def test_transaction_misuse_is_value_error(store: TrustedStore) -> None:
    with store.transaction() as tx:
        tx.put("vaik", "a", b"1")
        with pytest.raises(ValueError, match="already open"):
            store.put("vaik", "b", b"2")
    with pytest.raises(ValueError, match="has ended"):
        tx.put("vaik", "c", b"3")
    assert store.record_ids("vaik") == ["a"]


def test_concurrent_writers_in_one_process_are_serialised(
    store: TrustedStore, tpm: PytssHostTpm, config: StoreSettings
) -> None:
    start = store.generation
    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            for i in range(5):
                store.put("journal", f"t{n}-{i}", {"n": n, "i": i})
        except BaseException as err:  # reported below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(store.record_ids("journal")) == 20
    assert store.generation == start + 20 == tpm.counter_read(config.counter_index)


def test_failed_transaction_writes_nothing(
    store: TrustedStore, db: Db, tpm: PytssHostTpm, config: StoreSettings
) -> None:
    store.put("vaik", "a", b"1")
    unchanged = capture_unchanged(db, tpm, config)
    with pytest.raises(RuntimeError), store.transaction() as tx:
        tx.put("vaik", "b", b"2")
        tx.delete("vaik", "a")
        raise RuntimeError("caller gave up")
    unchanged()
    assert store.get("vaik", "a").payload == b"1"
    assert store.find("vaik", "b") is None


def test_reopen_sees_the_same_records(
    make_store: Callable[..., TrustedStore], tpm: PytssHostTpm, config: StoreSettings
) -> None:
    store = make_store(create=True)
    store.put("seal", "vm-1", SECRET)
    store.put("binding", "vm-1", {"a": [1, 2, 3]})
    store.close()
    with pytest.raises(StoreStateError, match="store is closed"):
        store.get("seal", "vm-1")
    again = make_store()
    assert again.get("seal", "vm-1").payload == SECRET
    assert again.get("binding", "vm-1").json() == {"a": [1, 2, 3]}
    assert again.generation == tpm.counter_read(config.counter_index)


def test_create_refuses_an_existing_store_or_counter(
    make_store: Callable[..., TrustedStore], config: StoreSettings, tmp_path: Path
) -> None:
    store = make_store(create=True)
    store.close()
    with pytest.raises(StoreAlreadyInitialised, match="a store exists already"):
        make_store(create=True)
    # Same TPM counter, database gone (another URL): refused unless explicitly allowed.
    other = StoreSettings(
        url=f"sqlite:///{tmp_path / 'other.db'}", counter_index=config.counter_index
    )
    with pytest.raises(StoreAlreadyInitialised, match=r"counter at NV index .* exists already"):
        make_store(create=True, cfg=other)
    allowed = StoreSettings(
        url=other.url, counter_index=config.counter_index, allow_existing_counter=True
    )
    make_store(create=True, cfg=allowed).put("vaik", "x", b"1")


class FailingSealer:
    """The real sealer, whose seal fails (fault injection)."""

    def __init__(self, tpm: PytssHostTpm) -> None:
        self._tpm = tpm

    def seal(self, data: bytes) -> bytes:
        raise TpmCommandError(0x902, "seal: TPM2_Create", "injected")

    def unseal(self, blob: bytes) -> bytes:
        return self._tpm.unseal(blob)


def test_create_that_cannot_seal_leaves_no_counter_behind(
    config: StoreSettings, tpm: PytssHostTpm, counter: FaultyCounter, db: Db
) -> None:
    with pytest.raises(StoreKeyError, match="cannot seal the store data key"):
        TrustedStore.create(
            config, sealer=FailingSealer(tpm), counter=counter, random_bytes=secrets.token_bytes
        )
    with pytest.raises(TpmCommandError):
        tpm.counter_read(config.counter_index)  # not defined: a retried init is not blocked
    store = TrustedStore.create(
        config, sealer=tpm, counter=counter, random_bytes=secrets.token_bytes
    )
    store.close()


def test_unreachable_database_is_a_backend_error(tpm: PytssHostTpm) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again before the store connects
    config = StoreSettings(
        url=f"postgresql://postgres@127.0.0.1:{port}/x", counter_index=0x01800002
    )
    with pytest.raises(StoreBackendError, match="cannot read the store database") as info:
        TrustedStore.open(config, sealer=tpm, counter=tpm, random_bytes=secrets.token_bytes)
    assert info.value.id == "store.backend"


def test_open_without_a_store_is_not_initialised(
    make_store: Callable[..., TrustedStore], db: Db, tmp_path: Path
) -> None:
    with pytest.raises(StoreNotInitialised, match="vtpm-host init"):
        make_store()
    missing = tmp_path / "nowhere" / "store.db"
    with pytest.raises(StoreNotInitialised):
        make_store(cfg=StoreSettings(url=f"sqlite:///{missing}", counter_index=0x01800001))
    assert not missing.exists()


# --------------------------------------------------------------------------- invariant 5


def test_inv5_no_plaintext_payload_or_data_key_in_database_bytes(
    config: StoreSettings, tpm: PytssHostTpm, counter: FaultyCounter, db: Db
) -> None:
    drawn: list[bytes] = []

    def recording_random(n: int) -> bytes:
        value = secrets.token_bytes(n)
        drawn.append(value)
        return value

    store = TrustedStore.create(config, sealer=tpm, counter=counter, random_bytes=recording_random)
    data_key = drawn[0]
    assert len(data_key) == 32
    try:
        store.put("seal", "vm-1", SECRET)
        store.put("binding", "vm-1", {"state": SECRET.decode()})
        with store.transaction() as tx:
            tx.put("seal", "vm-2", SECRET)
            tx.put("seal", "vm-1", SECRET + b"-v2")
        store.delete("seal", "vm-2")
    finally:
        store.close()
    # Control: a value written in clear beside the store is found by the same scan.
    canary = b"CANARY-" + secrets.token_hex(16).encode()
    canary_table = sa.Table("canary", sa.MetaData(), sa.Column("v", sa.LargeBinary))
    with db.engine().begin() as conn:
        canary_table.create(conn)
        conn.execute(sa.insert(canary_table).values(v=canary))
    db.dispose()
    raw = db.raw_bytes()
    assert canary in raw
    assert SECRET not in raw
    assert SECRET[:24] not in raw
    assert data_key not in raw


# --------------------------------------------------------------------------- record attacks


def test_tampered_record_is_refused_and_nothing_changes(
    store: TrustedStore,
    make_store: Callable[..., TrustedStore],
    db: Db,
    tpm: PytssHostTpm,
    config: StoreSettings,
) -> None:
    store.put("vaik", "vm-1", b"key-1")
    store.put("vaik", "vm-2", b"key-2")
    _, ct = db.row("vaik", "vm-1")
    db.set_row("vaik", "vm-1", ciphertext=ct[:5] + bytes([ct[5] ^ 1]) + ct[6:])
    unchanged = capture_unchanged(db, tpm, config)

    with pytest.raises(StoreIntegrityError) as info:
        store.get("vaik", "vm-1")
    assert (info.value.record_type, info.value.record_id) == ("vaik", "vm-1")
    assert "authentication failed" in info.value.what
    assert "nothing was changed" in str(info.value)
    assert store.get("vaik", "vm-2").payload == b"key-2"
    with pytest.raises(StoreIntegrityError):
        store.list_records("vaik")
    store.close()
    with pytest.raises(StoreIntegrityError, match="store record vaik/vm-1: authentication failed"):
        make_store()
    unchanged()


def test_swapped_records_are_refused(
    store: TrustedStore,
    make_store: Callable[..., TrustedStore],
    db: Db,
    tpm: PytssHostTpm,
    config: StoreSettings,
) -> None:
    store.put("binding", "vm-a", {"owner": "alice"})
    store.put("binding", "vm-b", {"owner": "mallory"})
    row_a, row_b = db.row("binding", "vm-a"), db.row("binding", "vm-b")
    db.set_row("binding", "vm-a", nonce=row_b[0], ciphertext=row_b[1])
    db.set_row("binding", "vm-b", nonce=row_a[0], ciphertext=row_a[1])
    unchanged = capture_unchanged(db, tpm, config)
    for record_id in ("vm-a", "vm-b"):
        with pytest.raises(StoreIntegrityError) as info:
            store.get("binding", record_id)
        assert info.value.record_id == record_id
    store.close()
    with pytest.raises(StoreIntegrityError, match="authentication failed"):
        make_store()
    unchanged()


def test_moved_or_retyped_record_is_refused(
    store: TrustedStore, make_store: Callable[..., TrustedStore], db: Db
) -> None:
    store.put("vaik", "vm-1", b"key-1")
    db.execute(
        sa.update(TABLES.records)
        .where(TABLES.records.c.record_id == "vm-1")
        .values(record_type="seal", record_id="vm-9")
    )
    with pytest.raises(StoreIntegrityError, match="row is missing"):
        store.get("vaik", "vm-1")
    with pytest.raises(StoreIntegrityError, match="authentication failed") as info:
        store.get("seal", "vm-9")
    assert (info.value.record_type, info.value.record_id) == ("seal", "vm-9")
    with pytest.raises(StoreIntegrityError, match="row is missing"):
        store.list_records("vaik")
    store.close()
    with pytest.raises(StoreIntegrityError, match="store record seal/vm-9: authentication failed"):
        make_store()


@pytest.mark.parametrize("keep", [0, 10, 16, -1])
def test_truncated_record_is_refused(
    store: TrustedStore, make_store: Callable[..., TrustedStore], db: Db, keep: int
) -> None:
    store.put("seal", "vm-1", SECRET)
    _, ct = db.row("seal", "vm-1")
    db.set_row("seal", "vm-1", ciphertext=ct[:keep])
    with pytest.raises(StoreIntegrityError) as info:
        store.get("seal", "vm-1")
    assert info.value.record_id == "vm-1"
    store.close()
    with pytest.raises(StoreIntegrityError):
        make_store()


def test_older_version_of_one_record_is_refused(
    store: TrustedStore, make_store: Callable[..., TrustedStore], db: Db
) -> None:
    store.put("binding", "vm-1", {"cert_user": "old-tenant"})
    old = db.row("binding", "vm-1")
    store.put("binding", "vm-1", {"cert_user": "new-tenant"})
    db.set_row("binding", "vm-1", nonce=old[0], ciphertext=old[1])
    with pytest.raises(StoreIntegrityError, match="older copy of this record was put back"):
        store.get("binding", "vm-1")
    store.close()
    with pytest.raises(StoreIntegrityError, match="differs from the authenticated manifest"):
        make_store()


def test_deleted_or_inserted_row_is_refused(
    store: TrustedStore, make_store: Callable[..., TrustedStore], db: Db
) -> None:
    store.put("vaik", "vm-1", b"k1")
    store.put("vaik", "vm-2", b"k2")
    victim = db.row("vaik", "vm-2")
    store.delete("vaik", "vm-2")
    # Put a genuine, deleted record back: it authenticates but is not in the manifest.
    db.execute(
        sa.insert(TABLES.records).values(
            record_type="vaik", record_id="vm-2", nonce=victim[0], ciphertext=victim[1]
        )
    )
    with pytest.raises(StoreIntegrityError, match="not in the authenticated manifest"):
        store.get("vaik", "vm-2")
    with pytest.raises(StoreIntegrityError, match="not in the authenticated manifest"):
        store.list_records("vaik")
    with pytest.raises(StoreIntegrityError, match="inserted behind"):
        store.put("vaik", "vm-2", b"k2'")
    db.execute(sa.delete(TABLES.records).where(TABLES.records.c.record_id == "vm-1"))
    with pytest.raises(StoreIntegrityError, match="row is missing"):
        store.get("vaik", "vm-1")
    store.close()
    with pytest.raises(StoreIntegrityError, match="differs from the authenticated manifest"):
        make_store()


@pytest.mark.parametrize(
    ("column", "value"),
    [("generation", 10**6), ("manifest_digest", b"\x00" * 32), ("mac", b"\x01" * 32)],
)
def test_forged_head_is_refused(
    store: TrustedStore,
    make_store: Callable[..., TrustedStore],
    db: Db,
    column: str,
    value: Any,
) -> None:
    store.put("vaik", "vm-1", b"k1")
    store.close()
    db.execute(sa.update(TABLES.head).values({column: value}))
    with pytest.raises(StoreIntegrityError, match="head authentication failed"):
        make_store()


def test_inv4_malformed_head_field_is_a_typed_refusal(
    store: TrustedStore, make_store: Callable[..., TrustedStore], db: Db
) -> None:
    store.close()
    db.execute(sa.update(TABLES.head).values(mac=b"short"))
    with pytest.raises(StoreIntegrityError, match="mac is 5 bytes, expected 32"):
        make_store()


@pytest.mark.parametrize(
    ("value", "error", "message"),
    [
        ("vtpm-trust/store/2", StoreFormatError, "holds a vtpm-trust/store/2 store"),
        ("something else", StoreIntegrityError, "format is 'something else'"),
    ],
)
def test_head_of_another_format_is_refused(
    store: TrustedStore,
    make_store: Callable[..., TrustedStore],
    db: Db,
    value: str,
    error: type[Exception],
    message: str,
) -> None:
    store.close()
    db.execute(sa.update(TABLES.head).values(format=value))
    with pytest.raises(error, match=message):
        make_store()


def test_sealed_key_does_not_open_on_another_tpm(
    store: TrustedStore,
    db: Db,
    config: StoreSettings,
    swtpm_factory: Callable[..., Swtpm],
    tmp_path: Path,
) -> None:
    store.put("seal", "vm-1", SECRET)
    store.close()
    other = PytssHostTpm(swtpm_factory("other-host").tcti, tmp_path / "other-keys")
    try:
        other.counter_define(config.counter_index)
        with pytest.raises(StoreKeyError, match="cannot unseal the store data key"):
            TrustedStore.open(config, sealer=other, counter=other, random_bytes=secrets.token_bytes)
    finally:
        other.close()


def test_two_hosts_stores_share_one_database_under_their_own_prefixes(
    make_store: Callable[..., TrustedStore], config: StoreSettings, db: Db
) -> None:
    host_a = StoreSettings(
        url=config.url, counter_index=next_counter_index(), table_prefix="host_a"
    )
    host_b = StoreSettings(
        url=config.url, counter_index=next_counter_index(), table_prefix="host_b"
    )
    store_a = make_store(create=True, cfg=host_a)
    store_b = make_store(create=True, cfg=host_b)  # both open for writing at once
    store_a.put("vaik", "vm-1", b"a's vAIK")
    store_b.put("vaik", "vm-1", b"b's vAIK")
    assert store_a.get("vaik", "vm-1").payload == b"a's vAIK"
    assert store_b.get("vaik", "vm-1").payload == b"b's vAIK"
    # b's row copied over a's is another store's ciphertext: refused.
    records_a = StoreTables.named("host_a").records
    records_b = StoreTables.named("host_b").records
    with db.engine().begin() as conn:
        row = conn.execute(sa.select(records_b.c.nonce, records_b.c.ciphertext)).one()
        conn.execute(sa.update(records_a).values(nonce=row.nonce, ciphertext=row.ciphertext))
    with pytest.raises(StoreIntegrityError, match="authentication failed"):
        store_a.get("vaik", "vm-1")
    assert store_b.get("vaik", "vm-1").payload == b"b's vAIK"


# --------------------------------------------------------------------------- properties

_blob_mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 10_000), st.integers(1, 255)),
    st.tuples(st.just("truncate"), st.integers(0, 10_000), st.just(0)),
    st.tuples(st.just("extend"), st.binary(min_size=1, max_size=16), st.just(0)),
    st.tuples(st.just("replace"), st.binary(max_size=64), st.just(0)),
)


def _mutate(data: bytes, mutation: tuple[str, Any, int]) -> bytes:
    op, arg, xor = mutation
    if op == "flip":
        i = arg % len(data)
        return data[:i] + bytes([data[i] ^ xor]) + data[i + 1 :]
    if op == "truncate":
        return data[: arg % len(data)]
    if op == "extend":
        return bytes(data + arg)
    return bytes(arg)


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    column=st.sampled_from(["nonce", "ciphertext", "both"]),
    mutation=_blob_mutation,
    other=_blob_mutation,
)
def test_inv4_any_mutation_of_a_stored_row_is_a_typed_refusal(
    store: TrustedStore,
    db: Db,
    column: str,
    mutation: tuple[str, Any, int],
    other: tuple[str, Any, int],
) -> None:
    if not store.record_ids("seal"):
        store.put("seal", "vm-1", SECRET)
        store.put("seal", "vm-2", b"neighbour")
    nonce, ct = db.row("seal", "vm-1")
    new_nonce = _mutate(nonce, mutation) if column in ("nonce", "both") else nonce
    new_ct = _mutate(ct, other if column == "both" else mutation) if column != "nonce" else ct
    if (new_nonce, new_ct) == (nonce, ct):
        return
    db.set_row("seal", "vm-1", nonce=new_nonce, ciphertext=new_ct)
    try:
        with pytest.raises(StoreIntegrityError) as info:
            store.get("seal", "vm-1")
        assert info.value.record_id == "vm-1"
        with pytest.raises(StoreIntegrityError):
            store.list_records("seal")
        assert store.get("seal", "vm-2").payload == b"neighbour"
        assert store.state is StoreRunState.OPEN
    finally:
        db.set_row("seal", "vm-1", nonce=nonce, ciphertext=ct)
    assert store.get("seal", "vm-1").payload == SECRET


def _move(db: Db, src: tuple[str, str], dst: tuple[str, str]) -> None:
    db.execute(
        sa.update(TABLES.records)
        .where(TABLES.records.c.record_type == src[0], TABLES.records.c.record_id == src[1])
        .values(record_type=dst[0], record_id=dst[1])
    )


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    new_type=st.sampled_from(["vaik", "seal", "binding", "journal", "exgkey"]),
    new_id=st.text(
        alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=40
    ),
)
def test_inv4_a_row_moved_to_any_other_key_is_a_typed_refusal(
    store: TrustedStore, db: Db, new_type: str, new_id: str
) -> None:
    if not store.record_ids("seal"):
        store.put("seal", "vm-1", SECRET)
        store.put("seal", "vm-2", b"neighbour")
    if (new_type, new_id) in (("seal", "vm-1"), ("seal", "vm-2")):
        return
    _move(db, ("seal", "vm-1"), (new_type, new_id))
    try:
        with pytest.raises(StoreIntegrityError, match="row is missing"):
            store.get("seal", "vm-1")
        with pytest.raises(StoreIntegrityError, match="authentication failed") as info:
            store.get(new_type, new_id)
        assert (info.value.record_type, info.value.record_id) == (new_type, new_id)
        for record_type in {"seal", new_type}:
            with pytest.raises(StoreIntegrityError):
                store.list_records(record_type)
        assert store.state is StoreRunState.OPEN
    finally:
        _move(db, (new_type, new_id), ("seal", "vm-1"))
    assert store.get("seal", "vm-1").payload == SECRET


@pytest.mark.parametrize("db", ["sqlite"], indirect=True)
@pytest.mark.parametrize("value", ["text", 12345, 1.5])
def test_inv4_foreign_value_types_in_blob_columns_are_typed_refusals(
    store: TrustedStore, make_store: Callable[..., TrustedStore], db: Db, value: Any
) -> None:
    """SQLite keeps whatever type is written into a BLOB column (PostgreSQL's bytea refuses)."""
    store.put("seal", "vm-1", SECRET)
    with db.engine().begin() as conn:
        conn.execute(
            sa.text(f"UPDATE {TABLES.records.name} SET ciphertext = :v WHERE record_id = 'vm-1'"),
            {"v": value},
        )
    with pytest.raises(StoreIntegrityError, match=r"ciphertext is a .*, expected bytes"):
        store.get("seal", "vm-1")
    store.close()
    with pytest.raises(StoreIntegrityError, match="expected bytes"):
        make_store()
