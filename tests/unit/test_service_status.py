"""host_agent.service.status: the document, the board, the endpoint, the table, the fallback."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from host_agent.service.status import (
    STATUS_FORMAT,
    StatusBoard,
    StatusComponent,
    StatusParseError,
    VmStatus,
    collect_local,
    parse_status,
    query_daemon,
    render_table,
)

NOW = datetime(2026, 11, 27, 8, 0, tzinfo=UTC)
U1 = "11111111-2222-3333-4444-555555555555"


def _adopt(state_dir: Path, vm_uuid: str, name: str) -> None:
    d = state_dir / "vms" / vm_uuid
    d.mkdir(parents=True)
    (d / "adoption.json").write_text(json.dumps({"uuid": vm_uuid, "name": name}))


def test_collect_local_reads_adoption_records_and_live_bridges(tmp_path: Path) -> None:
    _adopt(tmp_path, U1, "web")
    (tmp_path / "vms" / "junk").mkdir()
    (tmp_path / "vms" / "junk" / "adoption.json").write_text("{not json")
    run = tmp_path / "bridges"
    run.mkdir()
    rec = {"format": "vtpm-trust/bridge/1", "vm_uuid": U1, "vm_name": "web", "pid": os.getpid()}
    (run / f"{U1}.json").write_text(json.dumps(rec))
    dead = {**rec, "vm_uuid": "dead", "pid": 2**22 + 7}
    (run / "dead.json").write_text(json.dumps(dead))
    (vm,) = collect_local(tmp_path, run)
    assert vm == VmStatus(
        uuid=U1, name="web", adopted=True, bridge="running", bridge_pid=os.getpid()
    )


def test_board_fills_events_and_unknown_vms_have_no_vaik() -> None:
    board = StatusBoard()
    board.vaik(U1.upper(), "bound")
    board.sealed(U1, NOW - timedelta(minutes=5))
    board.attested(U1, NOW, "attest.nonce_reused")
    board.relay_error(U1)
    vm = board.apply(VmStatus(uuid=U1, name="web", adopted=True))
    assert (vm.vaik, vm.last_seal, vm.last_attestation_result, vm.relay_errors) == (
        "bound",
        "2026-11-27T07:55:00+00:00",
        "attest.nonce_reused",
        1,
    )
    other = board.apply(VmStatus(uuid="x", name="x", adopted=False))
    assert other.vaik == "none" and other.relay_errors == 0
    with pytest.raises(ValueError):
        board.vaik(U1, "stolen")
    with pytest.raises(ValueError):
        board.sealed(U1, datetime(2026, 1, 1))


def test_component_answers_on_its_socket_and_round_trips(tmp_path: Path) -> None:
    _adopt(tmp_path, U1, "web")
    board = StatusBoard()
    board.vaik(U1, "bound")
    comp = StatusComponent(tmp_path, tmp_path / "bridges", board=board, clock=lambda: NOW)
    comp.start(None)
    try:
        assert comp.socket_path.stat().st_mode & 0o777 == 0o600
        status = query_daemon(comp.socket_path)
    finally:
        comp.stop()
    assert status is not None
    assert status.source == "daemon" and status.daemon_running
    assert status.vms[0].vaik == "bound" and status.vms[0].name == "web"
    assert parse_status(json.dumps(status.to_json())) == status
    assert not comp.socket_path.exists()
    assert query_daemon(comp.socket_path) is None


def test_component_merges_the_daemon_registry_and_store(tmp_path: Path) -> None:
    class Entry:
        uuid, name, bridge_connected, bridge_pid, adoption = U1, "db", True, 42, {}

    class Registry:
        @staticmethod
        def entries() -> list[Entry]:
            return [Entry()]

    class Record:
        def __init__(self, record_id: str, payload: dict[str, object]) -> None:
            self.record_id, self._payload = record_id, payload

        def json(self) -> dict[str, object]:
            return self._payload

    class Store:
        @staticmethod
        def list_records(record_type: str) -> list[Record]:
            return {
                "vaik": [Record(U1, {})],
                "binding": [Record(U1, {"active": False})],
                "seal": [
                    Record(f"{U1}.1", {"sealed_at": "2026-11-27T07:00:00+00:00"}),
                    Record(f"{U1}.2", {"sealed_at": "2026-11-27T07:30:00+00:00"}),
                ],
            }[record_type]

    class Daemon:
        registry = Registry()
        store = Store()

    comp = StatusComponent(tmp_path, tmp_path, clock=lambda: NOW)
    comp._daemon = Daemon()
    (vm,) = comp.snapshot().vms
    assert (vm.name, vm.bridge, vm.bridge_pid, vm.adopted) == ("db", "connected", 42, True)
    assert (vm.vaik, vm.last_seal) == ("awaiting-tenant", "2026-11-27T07:30:00+00:00")


@pytest.mark.parametrize(
    "mutate, what",
    [
        (lambda d: d.update(format="other"), "status.format"),
        (lambda d: d.pop("vms"), "status"),
        (lambda d: d["vms"][0].update(vaik="stolen"), "status.vms[0].vaik"),
        (lambda d: d["vms"][0].update(adopted="yes"), "status.vms[0].adopted"),
        (lambda d: d["vms"][0].update(bridge_pid=True), "status.vms[0].bridge_pid"),
        (lambda d: d["daemon"].update(running=1), "status.daemon.running"),
    ],
)
def test_parse_status_rejects_malformed_documents(mutate, what) -> None:  # type: ignore[no-untyped-def]
    doc = {
        "format": STATUS_FORMAT,
        "source": "daemon",
        "generated_at": NOW.isoformat(),
        "state_dir": "/s",
        "daemon": {"running": True, "pid": 1},
        "vms": [
            {
                "uuid": U1, "name": "a", "adopted": True, "vaik": "none", "last_seal": None,
                "last_attestation": None, "last_attestation_result": None, "bridge": "down",
                "bridge_pid": None, "relay_errors": 0,
            }
        ],
    }  # fmt: skip
    parse_status(json.dumps(doc))
    mutate(doc)
    with pytest.raises(StatusParseError) as err:
        parse_status(json.dumps(doc))
    assert err.value.what.startswith(what)
    with pytest.raises(StatusParseError):
        parse_status("[]")


def test_render_table() -> None:
    from host_agent.service.status import HostStatus

    vm = VmStatus(
        uuid=U1,
        name="web",
        adopted=True,
        vaik="bound",
        last_seal=(NOW - timedelta(hours=3)).isoformat(),
        last_attestation=(NOW - timedelta(seconds=30)).isoformat(),
        last_attestation_result="attest.refused",
        bridge="connected",
        bridge_pid=9,
        relay_errors=2,
    )
    text = render_table(HostStatus("daemon", NOW.isoformat(), "/s", True, 5, (vm,)), NOW)
    lines = text.splitlines()
    assert lines[0] == "daemon: running (pid 5)"
    assert lines[3].split() == [
        "VM",
        "UUID",
        "ADOPTED",
        "vAIK",
        "LAST",
        "SEAL",
        "LAST",
        "ATTESTATION",
        "BRIDGE",
    ]
    assert "3h ago" in lines[4] and "30s ago (attest.refused)" in lines[4]
    assert lines[4].endswith("connected (pid 9), 2 relay errors")
    empty = render_table(HostStatus("local", NOW.isoformat(), "/s", False, None, ()), NOW)
    assert "NOT RUNNING" in empty and "no VMs adopted" in empty
