"""The store at the agent's edges: the ``vtpm-host init`` step and ``vtpm-host store check``.

Real swtpm (one per test, through the TPM port's own discovery with a configured TCTI) and the
default SQLite file in the agent's state directory.
"""

from __future__ import annotations

import argparse
import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from host_agent.config import AgentConfig, TpmConfig
from host_agent.store import (
    DEFAULT_COUNTER_INDEX,
    StoreAlreadyInitialised,
    StoreBusy,
    StoreIntegrityError,
    StoreNotInitialised,
    StoreRolledBack,
)
from host_agent.store import cli as store_cli
from host_agent.store._schema import StoreTables
from host_agent.store.provision import ensure_store, open_store
from host_agent.tpm.adapter import PytssHostTpm
from tests.helpers.swtpm import Swtpm


@pytest.fixture
def agent(tmp_path: Path, swtpm_factory: Callable[..., Swtpm]) -> AgentConfig:
    tpm = swtpm_factory("host")
    state = tmp_path / "state"
    return AgentConfig(state_dir=state, tpm=TpmConfig(tcti=tpm.tcti, state_dir=state / "tpm"))


@pytest.fixture
def tpm(agent: AgentConfig) -> Iterator[PytssHostTpm]:
    assert agent.tpm.tcti is not None
    host_tpm = PytssHostTpm(agent.tpm.tcti, agent.tpm.state_dir)
    yield host_tpm
    host_tpm.close()


def _db_file(agent: AgentConfig) -> Path:
    return agent.state_dir / "store.sqlite"


def test_init_step_creates_once_then_verifies(agent: AgentConfig, tpm: PytssHostTpm) -> None:
    with pytest.raises(StoreNotInitialised, match="vtpm-host init"):
        open_store(agent, tpm)
    message = ensure_store(tpm, agent)
    assert message is not None and "created the trusted store" in message
    assert f"{DEFAULT_COUNTER_INDEX:#010x}" in message
    assert _db_file(agent).is_file()
    assert _db_file(agent).parent.stat().st_mode & 0o077 == 0
    assert ensure_store(tpm, agent) is None  # second init: nothing to do
    with open_store(agent, tpm) as store:
        store.put("vaik", "vm-1", b"k")
        assert ensure_store(tpm, agent) is None  # also while the agent has it open
        with pytest.raises(StoreBusy):
            open_store(agent, tpm)


def test_init_step_refuses_a_rolled_back_store(agent: AgentConfig, tpm: PytssHostTpm) -> None:
    ensure_store(tpm, agent)
    old = agent.state_dir / "old.sqlite"
    shutil.copy2(_db_file(agent), old)
    with open_store(agent, tpm) as store:
        store.put("vaik", "vm-1", b"k")
    shutil.copy2(old, _db_file(agent))
    with pytest.raises(StoreRolledBack):
        ensure_store(tpm, agent)


def test_init_step_refuses_when_the_database_is_gone_but_the_counter_is_not(
    agent: AgentConfig, tpm: PytssHostTpm
) -> None:
    ensure_store(tpm, agent)
    _db_file(agent).unlink()
    with pytest.raises(StoreAlreadyInitialised, match="its database is missing"):
        ensure_store(tpm, agent)
    assert not _db_file(agent).exists()


def _run_check(agent: AgentConfig, *extra: str) -> None:
    parser = argparse.ArgumentParser(prog="vtpm-host")
    store_cli.register(parser.add_subparsers(dest="command"))
    assert agent.tpm.tcti is not None
    args = parser.parse_args(
        ["store", "check", "--state-dir", str(agent.state_dir), "--tcti", agent.tpm.tcti, *extra]
    )
    assert args.func(args) == 0


def test_store_check_reports_a_verified_store(
    agent: AgentConfig, capsys: pytest.CaptureFixture[str]
) -> None:
    assert agent.tpm.tcti is not None
    tpm = PytssHostTpm(agent.tpm.tcti, agent.tpm.state_dir)
    try:
        ensure_store(tpm, agent)
        with open_store(agent, tpm) as store:
            store.put("vaik", "vm-1", b"k")
            store.put("binding", "vm-1", {"cert_user": "x"})
            store.put("binding", "vm-2", {"cert_user": "y"})
    finally:
        tpm.close()  # swtpm serves one client at a time; check opens its own

    _run_check(agent, "--json")
    summary = json.loads(capsys.readouterr().out)
    assert summary["records"] == {"binding": 2, "vaik": 1}
    assert summary["generation"] == summary["counter"]
    assert summary["counter_index"] == f"{DEFAULT_COUNTER_INDEX:#010x}"
    _run_check(agent)
    assert "(verified)" in capsys.readouterr().out

    records = StoreTables.named("vtpm_store").records
    engine = sa.create_engine(f"sqlite:///{_db_file(agent)}")
    with engine.begin() as conn:
        conn.execute(
            sa.update(records).where(records.c.record_id == "vm-2").values(nonce=b"\x00" * 12)
        )
    engine.dispose()
    with pytest.raises(StoreIntegrityError, match="store record binding/vm-2"):
        _run_check(agent)
