"""Retention of sealed records in the real store (SQLite and PostgreSQL, swtpm counter).

State files are real files in libvirt's layout (``lib/qemu/save``, ``lib/qemu/snapshot``) whose
tail carries a ``tpm-emulator`` section as QEMU writes it; the full save/restore path with QEMU
runs in tests/vm/test_save_restore_libvirt.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys
import zlib
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from evidence.errors import VtpmError
from host_agent.config import AgentConfig, TpmConfig
from host_agent.lifecycle.retention import (
    AutoPrune,
    InvalidRetention,
    StateFile,
    plan_prune,
    prune,
    prune_request,
    read_records,
    state_files,
    tpm_digests_of,
)
from host_agent.lifecycle.seal import (
    LEAVES_RECORD,
    PERMANENT,
    SAVESTATE,
    SEAL_RECORD,
    VOLATILE,
    SealedBlob,
    SealedState,
    SealRecordError,
    load_leaves,
    put_sealed,
)
from host_agent.memory.merkle import ZERO_LEAF, BlockLeaves, LeafSet, encode_leaf_file
from host_agent.store import StoreSettings, TrustedStore
from host_agent.store.provision import ensure_store, open_store
from host_agent.tpm.adapter import PytssHostTpm
from tests.sim import conftest_store as _fx
from tests.sim.conftest_store import Db, capture_unchanged

# Fixtures used by name (pytest finds them as attributes of this module).
pg = _fx.pg
store_swtpm = _fx.store_swtpm
tpm = _fx.tpm
db = _fx.db
config = _fx.config
counter = _fx.counter
make_store = _fx.make_store
store = _fx.store

REPO = Path(__file__).resolve().parents[2]
VM_A = "0b3f8a52-4d1c-4a61-9a4e-3f1f1c6e2a10"
VM_B = "7c1e0000-0000-4000-8000-000000000001"
T0 = datetime(2026, 11, 27, 7, 0, tzinfo=UTC)


def leaves(seed: int) -> LeafSet:
    raw = bytearray(ZERO_LEAF * 64)
    raw[0:32] = hashlib.sha256(b"seed %d" % seed).digest()
    return LeafSet.of([BlockLeaves("pc.ram", bytes(raw))])


def sealed(vm: str, n: int) -> SealedState:
    """The n-th save of ``vm`` (n minutes after T0), with vTPM blobs of its own."""
    when = T0 + timedelta(minutes=n)
    ls = leaves(n)
    return SealedState(
        record_id=f"{vm}.{int(when.timestamp() * 1e9)}",
        vm_uuid=vm,
        vm_name="vm-a" if vm == VM_A else "vm-b",
        host_id="hv01",
        sealed_at=when.isoformat(),
        origin="save",
        memory_root=ls.root(),
        layout=ls.layout,
        hash_mode="full",
        blobs={
            PERMANENT: SealedBlob(PERMANENT, b"perm-%s-%d" % (vm.encode(), n)),
            VOLATILE: SealedBlob(VOLATILE, b"vol-%s-%d" % (vm.encode(), n)),
            SAVESTATE: SealedBlob(SAVESTATE, b"", 0, 0x800),
        },
    )


def tpm_section(state: SealedState, section_id: int = 7) -> bytes:
    """QEMU's ``tpm-emulator`` FULL section (type 0x04, idstr, instance, version 0, three
    blobs, footer 0x7e) for the record's blobs."""
    out = struct.pack(">BI", 0x04, section_id) + b"\x0ctpm-emulator" + struct.pack(">II", 0, 0)
    for t in (PERMANENT, VOLATILE, SAVESTATE):
        b = state.blob(t).blob
        out += struct.pack(">II", 0, len(b)) + b
    return out + struct.pack(">BI", 0x7E, section_id)


def image_of(path: Path, state: SealedState, *, ram: int = 3 << 20, after: int = 0) -> Path:
    """A file shaped like a save image: a large head, then device state with the vTPM
    (``after`` more bytes behind it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(
        os.urandom(64) + b"\0" * ram + tpm_section(state) + b"\x1f" + os.urandom(after)
    )
    return path


def fill(store: TrustedStore, *records: SealedState) -> None:
    for r in records:
        put_sealed(store, r, leaves(int(r.sealed_at[14:16])))


def ids(store: TrustedStore) -> set[str]:
    return set(store.record_ids(SEAL_RECORD))


def test_keeps_the_newest_per_vm_and_drops_the_rest_with_their_leaves(
    store: TrustedStore,
) -> None:
    a = [sealed(VM_A, n) for n in range(5)]
    b = [sealed(VM_B, n) for n in range(2)]
    fill(store, *a, *b)
    store.put("vaik", VM_A, b"other records are not touched")

    plan = prune(store, keep=2)

    assert sorted(plan.delete) == sorted(r.record_id for r in a[:3])
    assert ids(store) == {a[3].record_id, a[4].record_id, *(r.record_id for r in b)}
    assert set(store.record_ids(LEAVES_RECORD)) == ids(store)
    assert store.get("vaik", VM_A).payload == b"other records are not touched"
    assert plan.keep[a[4].record_id] == ["one of the 2 newest of its VM"]
    assert prune(store, keep=2).delete == [], "a second pass finds nothing more"


def test_a_state_file_keeps_an_old_record_and_pinned_records_stay(
    store: TrustedStore, tmp_path: Path
) -> None:
    a = [sealed(VM_A, n) for n in range(6)]
    fill(store, *a)
    qemu = tmp_path / "lib" / "qemu"
    image_of(qemu / "save" / "vm-a.save", a[0])  # a managed save of the oldest
    mem = image_of(tmp_path / "snaps" / "s1.mem", a[1])
    (qemu / "snapshot" / "vm-a").mkdir(parents=True)
    (qemu / "snapshot" / "vm-a" / "s1.xml").write_text(
        f"<domainsnapshot><name>s1</name><memory snapshot='external' file='{mem}'/>"
        "</domainsnapshot>"
    )
    (qemu / "snapshot" / "vm-a" / "gone.xml").write_text(
        f"<domainsnapshot><memory snapshot='external' file='{tmp_path / 'gone.mem'}'/>"
        "</domainsnapshot>"
    )
    operator = image_of(tmp_path / "elsewhere.save", a[2])
    files = state_files(qemu, [operator])
    assert {(f.kind, f.domain) for f in files} == {
        ("managed-save", "vm-a"),
        ("snapshot", "vm-a"),
        ("operator", None),
    } and len(files) == 4

    plan = prune(store, keep=1, files=files, pinned=[a[3].record_id])

    assert plan.delete == [a[4].record_id]
    assert ids(store) == {a[i].record_id for i in (0, 1, 2, 3, 5)}
    assert "managed-save" in plan.keep[a[0].record_id][0]
    assert "snapshot" in plan.keep[a[1].record_id][0]
    assert "operator" in plan.keep[a[2].record_id][0]
    assert plan.keep[a[3].record_id] == ["a restore in flight uses it"]


def test_tail_scan_finds_the_section_and_anything_else_is_parsed_in_full(tmp_path: Path) -> None:
    r = sealed(VM_A, 1)
    small = image_of(tmp_path / "small.save", r, ram=4096)
    far = image_of(tmp_path / "far.save", r, ram=4096, after=9 << 20)  # outside the tail
    want = (r.blob(PERMANENT).sha256, r.blob(VOLATILE).sha256)
    assert tpm_digests_of(small) == want
    with pytest.raises(VtpmError) as err:  # not a stream: the full parse refuses, typed
        tpm_digests_of(far)
    print(f"\n{err.value.id}: {err.value}")


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.binary(max_size=3000), cut=st.integers(0, 400))
def test_any_bytes_give_digests_none_or_a_typed_error(
    tmp_path: Path, data: bytes, cut: int
) -> None:
    """Untrusted file bytes (a damaged image, a section cut short): never a traceback."""
    r = sealed(VM_A, 1)
    section = tpm_section(r)
    for body in (data, data + section, data + section[: len(section) - cut], b"QEVM" + data):
        path = tmp_path / "f.save"
        path.write_bytes(body)
        try:
            got = tpm_digests_of(path)
        except VtpmError:
            continue
        assert (
            got is None
            or got == (r.blob(PERMANENT).sha256, r.blob(VOLATILE).sha256)
            or (len(got) == 2 and all(len(d) == 64 for d in got))
        )


def test_an_unreadable_state_file_keeps_every_record_of_its_vm(
    store: TrustedStore, tmp_path: Path
) -> None:
    a = [sealed(VM_A, n) for n in range(3)]
    b = [sealed(VM_B, n) for n in range(3)]
    fill(store, *a, *b)
    bad = tmp_path / "lib" / "qemu" / "save" / "vm-a.save"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"not a save image at all" * 10)
    plan = prune(
        store,
        keep=1,
        files=state_files(tmp_path / "lib" / "qemu"),
        vm_names={VM_A: "vm-a", VM_B: "vm-b"},
    )
    assert sorted(plan.delete) == sorted(r.record_id for r in b[:2]), "vm-b is pruned as usual"
    assert {r.record_id for r in a} <= ids(store)
    assert plan.unreadable and plan.unreadable[0]["file"] == str(bad)
    # A file of no known domain (an operator's) that cannot be read keeps every VM's records.
    more = [sealed(VM_B, n) for n in range(3, 5)]
    fill(store, *more)
    plan = prune(store, keep=1, files=[StateFile(tmp_path / "lib", "operator")])
    assert plan.delete == [] and len(plan.unreadable) == 1


def test_bad_settings_and_dry_runs_change_nothing(
    store: TrustedStore, db: Db, tpm: PytssHostTpm, config: StoreSettings
) -> None:
    fill(store, *(sealed(VM_A, n) for n in range(4)))
    unchanged = capture_unchanged(db, tpm, config)
    for keep in (0, -1, True, "2", 1.5):
        with pytest.raises(InvalidRetention, match="keep must be an integer >= 1"):
            prune(store, keep=keep)  # type: ignore[arg-type]
    for bad in ({"dry_run": "yes"}, {"vm_uuid": 5}, {"keep_images": "x"}, {"keep": None}):
        with pytest.raises(InvalidRetention, match="got"):
            prune_request(store, "qemu:///embed?root=/nonexistent", bad)
    dry = prune_request(store, "qemu:///embed?root=/nonexistent", {"keep": 1, "dry_run": True})
    assert len(dry["would_delete"]) == 3 and "deleted" not in dry
    unchanged()
    done = prune_request(store, "qemu:///embed?root=/nonexistent", {"keep": 1, "vm_uuid": VM_B})
    assert done["deleted"] == []
    unchanged()


def test_a_malformed_record_is_left_alone_and_reported(store: TrustedStore) -> None:
    fill(store, *(sealed(VM_A, n) for n in range(3)))
    obj = sealed(VM_A, 9).as_json()
    obj["format"] = "vtpm-trust/seal/0"
    store.put(SEAL_RECORD, "broken", obj)
    records, malformed = read_records(store)
    assert len(records) == 3 and malformed == ["broken"]
    plan = prune(store, keep=1)
    assert len(plan.delete) == 2 and plan.malformed == ["broken"]
    assert "broken" in ids(store)


def test_plan_ties_an_unreadable_managed_save_to_its_domain_only() -> None:
    recs = [sealed(VM_A, 0), sealed(VM_A, 1), sealed(VM_B, 0), sealed(VM_B, 1)]
    plan = plan_prune(
        recs,
        keep=1,
        files=[StateFile(Path("/"), "managed-save", "vm-b")],  # a directory: read fails
        vm_names={VM_A: "vm-a", VM_B: "vm-b"},
    )
    assert plan.delete == [recs[0].record_id]


def test_auto_prune_after_a_restore_touches_only_that_vm(
    store: TrustedStore, tmp_path: Path
) -> None:
    a = [sealed(VM_A, n) for n in range(6)]
    b = [sealed(VM_B, n) for n in range(6)]
    fill(store, *a, *b)
    auto = AutoPrune(store, f"qemu:///embed?root={tmp_path}", keep=2, vm_name={VM_A: "vm-a"}.get)
    plan = auto(VM_A, a[0].record_id, frozenset())  # restored from the oldest image
    assert sorted(plan.delete) == sorted(r.record_id for r in a[1:4])
    assert {r.record_id for r in b} <= ids(store)
    assert a[0].record_id in ids(store), "the record the VM came from stays"
    with pytest.raises(InvalidRetention):
        AutoPrune(store, "qemu:///system", keep=0)


def test_store_prune_command_without_a_daemon(tmp_path: Path, swtpm_factory) -> None:  # type: ignore[no-untyped-def]
    host = swtpm_factory("host")
    cfg = AgentConfig(state_dir=tmp_path, tpm=TpmConfig(tcti=host.tcti, state_dir=tmp_path / "tpm"))
    port = PytssHostTpm(host.tcti, cfg.tpm.state_dir, root="software", connection="per-call")
    try:
        ensure_store(port, cfg)
        s = open_store(cfg, port)
        try:
            fill(s, *(sealed(VM_A, n) for n in range(5)))
        finally:
            s.close()
    finally:
        port.close()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    base = [sys.executable, "-m", "host_agent.cli", "store", "prune", "--state-dir",
            str(tmp_path), "--tcti", host.tcti]  # fmt: skip

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*base, *args], capture_output=True, text=True, env=env, timeout=120)

    bad = run("--keep", "0", "--json")
    assert bad.returncode == 2 and "expected an integer >= 1, got '0'" in bad.stderr
    dry = run("--keep", "2", "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    out = json.loads(dry.stdout)
    assert out["via"] == "store" and len(out["would_delete"]) == 3 and len(out["kept"]) == 2
    text = run("--keep", "2")
    assert text.returncode == 0, text.stderr
    assert "3 record(s) deleted, 2 kept (via the store)" in text.stdout
    again = json.loads(run("--keep", "2", "--json").stdout)
    assert again["deleted"] == [] and len(again["kept"]) == 2


def test_leaves_sealed_before_the_packing_still_load(store: TrustedStore) -> None:
    """Records of an older agent keep their leaves zlib-compressed; they load as before, and
    new ones are packed (no zlib)."""
    old, new = sealed(VM_A, 1), sealed(VM_A, 2)
    fill(store, new)
    assert store.get(LEAVES_RECORD, new.record_id).payload.startswith(b"VTZR")
    store.put(SEAL_RECORD, old.record_id, old.as_json())
    store.put(LEAVES_RECORD, old.record_id, zlib.compress(encode_leaf_file(leaves(1)), 1))
    assert load_leaves(store, old.record_id) == leaves(1)
    assert load_leaves(store, new.record_id) == leaves(2)
    store.put(LEAVES_RECORD, old.record_id, b"neither packed nor zlib")
    with pytest.raises(SealRecordError, match="packed leaves or zlib data"):
        load_leaves(store, old.record_id)
