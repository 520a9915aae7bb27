"""``TrustedStore.version``: what a reader may cache a decoded record by (enroll.py's bindings)."""

from __future__ import annotations

import secrets

from host_agent.store import StoreSettings, TrustedStore
from host_agent.tpm.adapter import PytssHostTpm
from tests.sim import conftest_store as _fx
from tests.sim.conftest_store import FaultyCounter

pg = _fx.pg
store_swtpm = _fx.store_swtpm
tpm = _fx.tpm
db = _fx.db
config = _fx.config
counter = _fx.counter
make_store = _fx.make_store
store = _fx.store


def test_the_version_changes_with_every_write_of_the_record(
    store: TrustedStore,
    config: StoreSettings,
    tpm: PytssHostTpm,
    counter: FaultyCounter,
) -> None:
    assert store.version("binding", "vm-1") is None
    store.put("binding", "vm-1", {"active": True})
    v1 = store.version("binding", "vm-1")
    assert v1 is not None
    assert store.version("binding", "vm-1") == v1  # reading changes nothing
    store.find("binding", "vm-1")
    assert store.version("binding", "vm-1") == v1
    store.put("binding", "vm-2", {"active": True})
    assert store.version("binding", "vm-1") == v1  # another record's write
    store.put("binding", "vm-1", {"active": True})  # the same payload: a new version
    v2 = store.version("binding", "vm-1")
    assert v2 not in (None, v1)
    with store.transaction() as tx:
        tx.put("binding", "vm-1", {"active": False})
        tx.put("vaik", "vm-1", b"key")
    v3 = store.version("binding", "vm-1")
    assert v3 not in (None, v1, v2)
    store.delete("binding", "vm-1")
    assert store.version("binding", "vm-1") is None
    store.put("binding", "vm-1", {"active": True})
    assert store.version("binding", "vm-1") not in (None, v1, v2, v3)

    reader = TrustedStore.open(
        config, sealer=tpm, counter=counter, random_bytes=secrets.token_bytes, read_only=True
    )
    try:
        assert reader.find("binding", "vm-1") is not None
        assert reader.version("binding", "vm-1") is None  # frozen manifest: never cache by it
    finally:
        reader.close()
