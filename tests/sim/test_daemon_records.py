"""Sealed records in a real store (SQLite, swtpm host TPM): round trip, comparison, refusals.

The hooks themselves run under QEMU in tests/vm/test_save_restore*.py; here the record format,
the memory comparison and the checks of malformed records (invariant 4) run without a guest.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from host_agent.config import AgentConfig, TpmConfig
from host_agent.lifecycle.restore import compare_memory, format_ranges
from host_agent.lifecycle.seal import (
    PERMANENT,
    SAVESTATE,
    VOLATILE,
    RamHasher,
    SealedBlob,
    SealedState,
    SealRecordError,
    list_sealed,
    load_leaves,
    put_sealed,
)
from host_agent.memory.merkle import ZERO_LEAF, BlockLeaves, LeafSet
from host_agent.store import TrustedStore
from host_agent.store.provision import ensure_store, open_store
from host_agent.tpm.adapter import PytssHostTpm
from tests.helpers.swtpm import Swtpm

VM = "0b3f8a52-4d1c-4a61-9a4e-3f1f1c6e2a10"


@pytest.fixture
def store(tmp_path: Path, swtpm_factory: Callable[..., Swtpm]) -> Iterator[TrustedStore]:
    tpm = swtpm_factory("host")
    config = AgentConfig(
        state_dir=tmp_path, tpm=TpmConfig(tcti=tpm.tcti, state_dir=tmp_path / "tpm")
    )
    port = PytssHostTpm(tpm.tcti, config.tpm.state_dir, root="software", connection="per-call")
    ensure_store(port, config)
    s = open_store(config, port)
    yield s
    s.close()
    port.close()


def leaves(*changed: int, pages: int = 300) -> LeafSet:
    raw = bytearray(ZERO_LEAF * pages)
    for p in changed:
        raw[p * 32 : p * 32 + 32] = hashlib.sha256(b"page %d" % p).digest()
    return LeafSet.of([BlockLeaves("pc.ram", bytes(raw))])


def sealed_of(ls: LeafSet, when: datetime, *, vm: str = VM) -> SealedState:
    return SealedState(
        record_id=f"{vm}.{int(when.timestamp() * 1e9)}",
        vm_uuid=vm,
        vm_name="vm",
        host_id="hv01",
        sealed_at=when.isoformat(),
        origin="save",
        memory_root=ls.root(),
        layout=ls.layout,
        hash_mode="full",
        blobs={
            PERMANENT: SealedBlob(PERMANENT, b"perm" * 300),
            VOLATILE: SealedBlob(VOLATILE, b"vol" * 3000),
            SAVESTATE: SealedBlob(SAVESTATE, b"", 0, 0x800),
        },
        vpcrs={i: bytes([i]) * 32 for i in range(24)},
        domain_xml_sha256="ab" * 32,
    )


def test_records_round_trip_newest_first_and_blobs_stay_encrypted(store: TrustedStore) -> None:
    t1, t2 = datetime(2026, 11, 27, 7, 0, tzinfo=UTC), datetime(2026, 11, 27, 8, 0, tzinfo=UTC)
    a, b = leaves(3), leaves(3, 200)
    put_sealed(store, sealed_of(a, t1), a)
    put_sealed(store, sealed_of(b, t2), b)
    put_sealed(store, sealed_of(a, t1, vm="7c1e0000-0000-4000-8000-000000000001"), a)
    got = list_sealed(store, VM)
    assert [s.sealed_at for s in got] == [t2.isoformat(), t1.isoformat()]
    assert got[0] == sealed_of(b, t2)
    assert load_leaves(store, got[0].record_id) == b
    with pytest.raises(ValueError, match="do not give"):
        put_sealed(store, sealed_of(a, t1), b)


def test_compare_memory_names_the_differing_pages(store: TrustedStore) -> None:
    sealed_leaves = leaves(3)
    sealed = sealed_of(sealed_leaves, datetime(2026, 11, 27, tzinfo=UTC))
    assert compare_memory(sealed_leaves, sealed, lambda: sealed_leaves).match
    changed = leaves(3, 40, 41, 42, 299)
    verdict = compare_memory(changed, sealed, lambda: sealed_leaves)
    assert not verdict.match and verdict.differing_pages == ((40, 42), (299, 299))
    assert "4 page(s): 40-42, 299" in verdict.reason
    other_layout = LeafSet.of([BlockLeaves("pc.ram", ZERO_LEAF * 10)])
    assert "layout" in compare_memory(other_layout, sealed, lambda: sealed_leaves).reason
    assert format_ranges([(i, i) for i in range(10)], limit=2) == "0, 1 and 8 more ranges"


@pytest.mark.parametrize(
    "mutate",
    [
        lambda o: o.update(format="vtpm-trust/seal/0"),
        lambda o: o.pop("memory"),
        lambda o: o["state"]["volatile"].update(blob="not base64!"),
        lambda o: o["state"]["volatile"].update(sha256="00" * 32),
        lambda o: o["memory"].update(root="xyz"),
        lambda o: o["vpcrs"]["pcrs"].update({"0": 5}),
    ],
    ids=["format", "no-memory", "bad-base64", "digest-mismatch", "bad-root", "bad-pcr"],
)
def test_malformed_records_raise_a_typed_error(mutate: Callable[[dict], object]) -> None:  # type: ignore[type-arg]
    ls = leaves(1)
    obj = sealed_of(ls, datetime(2026, 11, 27, tzinfo=UTC)).as_json()
    mutate(obj)
    with pytest.raises(SealRecordError):
        SealedState.from_json(obj)


def test_ram_hasher_pool_equals_an_in_process_hash_of_a_memfd() -> None:
    """The process pool's stripes give the leaves one in-process pass gives (this process poses
    as QEMU: a memfd named like QEMU's guest RAM, 80 MiB, some pages random)."""
    from host_agent.lifecycle.seal import hash_qemu_ram

    fd = os.memfd_create("memory-backend-memfd")
    hasher = RamHasher(2).start()
    try:
        os.ftruncate(fd, 80 << 20)
        for page in range(0, 20480, 37):
            os.pwrite(fd, os.urandom(4096), page * 4096)
        pooled = hasher.hash(os.getpid())
        assert pooled == hash_qemu_ram(os.getpid(), workers=1)
        assert pooled.pages == 20480 and pooled.names == ("pc.ram",)
    finally:
        hasher.close()
        os.close(fd)


def test_a_delegate_takes_over_one_vms_hooks_until_given_back(store: TrustedStore) -> None:
    from host_agent.lifecycle.restore import Restorer
    from host_agent.lifecycle.seal import Sealer
    from host_agent.vtpm.daemon_link import HookCall
    from host_agent.vtpm.hooks_server import Allow, Veto

    class NoBridges:
        def call(self, vm_uuid: str, op: str, timeout: float = 30.0, **args: object) -> dict:  # type: ignore[type-arg]
            raise AssertionError("a delegated hook must not reach the bridge")

        def read_pcrs(self, vm_uuid: str, bank: str = "sha256", timeout: float = 30.0) -> dict:  # type: ignore[type-arg]
            raise AssertionError("a delegated hook must not reach the bridge")

    restorer = Restorer(store, NoBridges(), host_id="hv01")
    sealer = Sealer(store, NoBridges(), host_id="hv01", now=lambda: datetime.now(UTC))
    set_call = HookCall.for_blob(1, VM, "set_stateblob", 1, b"perm", include_blob=True)
    get_call = HookCall.for_blob(2, VM, "get_stateblob", 1, b"perm", include_blob=True)
    restorer.delegate(VM, lambda c: Veto("migration: the source's record is not signed"))
    sealer.delegate(VM, lambda c: Allow())
    assert restorer.on_set_stateblob(set_call) == Veto(
        "migration: the source's record is not signed"
    )
    assert restorer.last_veto[VM] == "migration: the source's record is not signed"
    assert sealer.on_get_stateblob(get_call) == Allow()
    restorer.delegate(VM, None)
    back = restorer.on_set_stateblob(set_call)
    assert isinstance(back, Veto) and "no sealed record" in back.reason
