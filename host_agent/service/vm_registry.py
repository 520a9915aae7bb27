"""The daemon's view of the VMs on this host: VM UUID → swtpm instance, bridge, adoption record.

Sources, merged (the daemon keeps no list of its own that could drift):

- bridges that are connected to the daemon's hooks server (their ``hello``), and bridges
  registered under the runtime directory (``<uuid>.json``, written by each bridge) whose process
  still runs — a restarted daemon sees a running VM there before its bridge reconnects;
- adoption records under ``<state_dir>/vms/<uuid>/adoption.json`` (written by
  ``vtpm-host vm adopt|create``): the VM's name and definition digest even while it is off;
- the VM's swtpm (:class:`~host_agent.vtpm.swtpm.SwtpmInstance`), taken over with ``adopt()``
  when one runs for it (invariant 6: a restarted daemon neither restarts nor stops it).

Thread-safe: the hooks server's worker threads and the daemon's loop both use it.
"""

from __future__ import annotations

import json
import logging
import threading
import uuid as uuid_mod
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from host_agent.vtpm.bridge_link import BridgeRecord, registered_bridges
from host_agent.vtpm.daemon_link import Hello
from host_agent.vtpm.swtpm import SwtpmInstance

__all__ = ["VmEntry", "VmRegistry", "adoption_record_path"]

log = logging.getLogger(__name__)


def adoption_record_path(state_dir: Path, vm_uuid: str) -> Path:
    """Where ``vtpm-host vm adopt`` keeps a VM's adoption record."""
    return Path(state_dir) / "vms" / vm_uuid / "adoption.json"


@dataclass(frozen=True)
class VmEntry:
    """What the daemon knows about one VM.

    Attributes:
        uuid: the VM's UUID (canonical, lower case).
        name: its name ("" when unknown).
        bridge_pid: pid of its bridge, if one runs.
        bridge_connected: that bridge is connected to the daemon's hooks server now.
        query_socket: the bridge's query socket ("" when unknown).
        adoption: the adoption record (JSON object) if the VM was adopted.
        swtpm: the VM's swtpm instance, when the daemon has one for it.
    """

    uuid: str
    name: str = ""
    bridge_pid: int | None = None
    bridge_connected: bool = False
    query_socket: str = ""
    adoption: dict[str, Any] | None = None
    swtpm: SwtpmInstance | None = field(default=None, compare=False)

    def as_json(self) -> dict[str, Any]:
        return {
            "uuid": self.uuid,
            "name": self.name,
            "bridge_pid": self.bridge_pid,
            "bridge_connected": self.bridge_connected,
            "adopted": self.adoption is not None,
            "swtpm": None if self.swtpm is None else self.swtpm.state.value,
            "swtpm_pid": None if self.swtpm is None else self.swtpm.pid,
        }


def _canonical(vm_uuid: str) -> str:
    return str(uuid_mod.UUID(vm_uuid))


class VmRegistry:
    """VM UUID → :class:`VmEntry`.

    Args:
        state_dir: the agent's state directory (adoption records).
        runtime_dir: where bridges register themselves.
        swtpm_factory: ``(uuid, name) -> SwtpmInstance`` for a VM's swtpm; None: the registry
            does not track swtpms (tests of the bridge link alone).
    """

    def __init__(
        self,
        state_dir: Path,
        runtime_dir: Path,
        *,
        swtpm_factory: Callable[[str, str], SwtpmInstance] | None = None,
    ) -> None:
        self.state_dir = Path(state_dir)
        self.runtime_dir = Path(runtime_dir)
        self._swtpm_factory = swtpm_factory
        self._entries: dict[str, VmEntry] = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ queries

    def get(self, vm_uuid: str) -> VmEntry | None:
        with self._lock:
            return self._entries.get(_canonical(vm_uuid))

    def entries(self) -> list[VmEntry]:
        with self._lock:
            return sorted(self._entries.values(), key=lambda e: (e.name, e.uuid))

    def uuids(self) -> set[str]:
        with self._lock:
            return set(self._entries)

    def name_of(self, vm_uuid: str) -> str:
        entry = self.get(vm_uuid)
        return entry.name if entry is not None else ""

    def find(self, domain: str) -> VmEntry | None:
        """The entry whose UUID (any spelling) or name is ``domain``."""
        try:
            by_uuid = self.get(domain)
        except ValueError:
            by_uuid = None
        if by_uuid is not None:
            return by_uuid
        named = [e for e in self.entries() if e.name == domain]
        return named[0] if len(named) == 1 else None

    # ------------------------------------------------------------------ updates

    def _update(self, vm_uuid: str, **changes: Any) -> VmEntry:
        key = _canonical(vm_uuid)
        with self._lock:
            entry = self._entries.get(key) or VmEntry(key)
            if not changes.get("name"):
                changes.pop("name", None)
            entry = replace(entry, **changes)
            self._entries[key] = entry
            return entry

    def load(self) -> None:
        """Read adoption records and the bridge registry (at daemon start)."""
        vms = self.state_dir / "vms"
        if vms.is_dir():
            for path in sorted(vms.glob("*/adoption.json")):
                try:
                    record = json.loads(path.read_text())
                    vm_uuid = _canonical(str(record.get("uuid") or path.parent.name))
                except (OSError, ValueError) as err:
                    log.warning("registry: skipping adoption record %s: %s", path, err)
                    continue
                self._update(vm_uuid, name=str(record.get("name", "")), adoption=record)
        for rec in registered_bridges(self.runtime_dir):
            self.bridge_registered(rec)

    def bridge_registered(self, rec: BridgeRecord) -> VmEntry:
        return self._update(
            rec.vm_uuid, name=rec.vm_name, bridge_pid=rec.pid, query_socket=rec.query_socket
        )

    def sync_bridges(self, connected: dict[str, Hello]) -> None:
        """Mark which bridges are connected now (from the hooks server)."""
        for vm_uuid, hello in connected.items():
            self._update(
                vm_uuid,
                name=hello.vm_name,
                bridge_pid=hello.pid,
                bridge_connected=True,
                query_socket=hello.query_socket,
            )
        now = {_canonical(u) for u in connected}
        with self._lock:
            for key, entry in list(self._entries.items()):
                if entry.bridge_connected and key not in now:
                    self._entries[key] = replace(entry, bridge_connected=False)

    def attach_swtpms(self, vm_uuids: Iterable[str]) -> list[str]:
        """Take over the running swtpm of each VM (``SwtpmInstance.adopt``), never starting or
        stopping one. Returns the UUIDs whose swtpm was found running."""
        found: list[str] = []
        if self._swtpm_factory is None:
            return found
        for vm_uuid in vm_uuids:
            entry = self.get(vm_uuid) or self._update(vm_uuid)
            inst = entry.swtpm or self._swtpm_factory(entry.uuid, entry.name or entry.uuid)
            if inst.state.value in ("new", "stopped", "failed") and inst.adopt():
                found.append(entry.uuid)
            self._update(entry.uuid, swtpm=inst)
        return found
