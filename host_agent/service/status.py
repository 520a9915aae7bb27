"""``vtpm-host status``: what the agent is doing, for operators (a table, or ``--json``).

Per VM: its name and UUID, whether it is adopted, its vAIK state, when its state was last sealed,
when it last attested (and how that ended), and its bridge's health. ``vtpm-host status`` asks,
in this order, and shows the first that answers (the document's ``source`` says which):

1. **the status component** inside the daemon (:class:`StatusComponent`, loaded with
   ``vtpm-host daemon --component host_agent.service.status:StatusComponent``), on
   ``<state_dir>/run/status.sock``: one request line (``{"op": "status"}``), one JSON line
   back. It merges the daemon's VM registry, its store (vAIK state from the ``vaik`` and
   ``binding`` records, last seal from the ``seal`` records) and a :class:`StatusBoard` that
   other components feed with what the store does not keep (attestations, relay errors);
2. **the daemon's control socket** (``<state_dir>/run/control.sock``, op ``status``) when the
   component is not loaded: VMs and bridges only, vAIK ``unknown``;
3. **local files**, read-only, when no daemon answers: the adoption records under
   ``<state_dir>/vms/`` and the bridges registered under the runtime directory.

Document (``"format": "vtpm-trust/status/1"``)::

    {"format": ..., "source": "daemon" | "local", "generated_at": ISO-8601 UTC,
     "state_dir": ..., "daemon": {"running": bool, "pid": int | null},
     "vms": [{"uuid", "name", "adopted", "vaik", "last_seal", "last_attestation",
              "last_attestation_result", "bridge", "bridge_pid", "relay_errors"}, ...]}

``vaik``: ``none`` (never enrolled), ``bound`` (enrolled, signs here), ``awaiting-tenant`` (bound,
but the VM rebooted and the tenant has not re-authenticated), ``migrating``, ``moved`` (signs on
another host now) or ``unknown`` (daemon not running). ``bridge``: ``connected`` (its bridge is
linked to the daemon), ``running`` (a bridge process runs, not linked), ``down`` (none runs).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import socket
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar

from evidence.errors import ParseError

__all__ = [
    "STATUS_FORMAT",
    "VAIK_STATES",
    "HostStatus",
    "StatusBoard",
    "StatusComponent",
    "StatusParseError",
    "VmStatus",
    "collect_local",
    "parse_status",
    "query_daemon",
    "register",
    "render_table",
    "status_socket_of",
]

log = logging.getLogger(__name__)

STATUS_FORMAT = "vtpm-trust/status/1"
VAIK_STATES = ("none", "bound", "awaiting-tenant", "migrating", "moved", "unknown")
BRIDGE_STATES = ("connected", "running", "down")
_MAX_DOCUMENT = 4 << 20


class StatusParseError(ParseError):
    """A status document (from the daemon's socket) is malformed."""

    id: ClassVar[str] = "parse.status"


def status_socket_of(state_dir: Path) -> Path:
    """The daemon's status socket under the agent's state directory."""
    return Path(state_dir) / "run" / "status.sock"


def _iso(at: datetime) -> str:
    if at.tzinfo is None:
        raise ValueError("timestamps must be timezone-aware")
    return at.astimezone(UTC).isoformat(timespec="seconds")


@dataclass(frozen=True)
class VmStatus:
    """One VM's line of ``vtpm-host status``."""

    uuid: str
    name: str
    adopted: bool
    vaik: str = "unknown"
    last_seal: str | None = None
    last_attestation: str | None = None
    last_attestation_result: str | None = None
    bridge: str = "down"
    bridge_pid: int | None = None
    relay_errors: int | None = None


@dataclass(frozen=True)
class HostStatus:
    """The whole status document."""

    source: str
    generated_at: str
    state_dir: str
    daemon_running: bool
    daemon_pid: int | None
    vms: tuple[VmStatus, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "format": STATUS_FORMAT,
            "source": self.source,
            "generated_at": self.generated_at,
            "state_dir": self.state_dir,
            "daemon": {"running": self.daemon_running, "pid": self.daemon_pid},
            "vms": [asdict(v) for v in self.vms],
        }


# ---------------------------------------------------------------------------- parsing


def _field(obj: Mapping[str, Any], key: str, types: tuple[type, ...], where: str) -> Any:
    if key not in obj:
        raise StatusParseError(where, 0, f"key {key!r}", "missing", unit="line")
    value = obj[key]
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
        names = " or ".join("null" if t is type(None) else t.__name__ for t in types)
        raise StatusParseError(f"{where}.{key}", 0, names, repr(value)[:80], unit="line")
    return value


def parse_status(text: str) -> HostStatus:
    """Parse a status document (strictly: every key, every type, known enum values).

    Raises:
        StatusParseError: not JSON, another format, a missing key or a wrong type.
    """
    try:
        obj = json.loads(text)
    except ValueError as err:
        raise StatusParseError("status", 0, "a JSON document", str(err), unit="line") from err
    if not isinstance(obj, dict):
        raise StatusParseError("status", 0, "a JSON object", type(obj).__name__, unit="line")
    fmt = obj.get("format")
    if fmt != STATUS_FORMAT:
        raise StatusParseError("status.format", 0, repr(STATUS_FORMAT), repr(fmt), unit="line")
    daemon = _field(obj, "daemon", (dict,), "status")
    vms_raw = _field(obj, "vms", (list,), "status")
    vms: list[VmStatus] = []
    opt_str = (str, type(None))
    opt_int = (int, type(None))
    for i, raw in enumerate(vms_raw):
        where = f"status.vms[{i}]"
        if not isinstance(raw, dict):
            raise StatusParseError(where, 0, "an object", type(raw).__name__, unit="line")
        vm = VmStatus(
            uuid=_field(raw, "uuid", (str,), where),
            name=_field(raw, "name", (str,), where),
            adopted=_field(raw, "adopted", (bool,), where),
            vaik=_field(raw, "vaik", (str,), where),
            last_seal=_field(raw, "last_seal", opt_str, where),
            last_attestation=_field(raw, "last_attestation", opt_str, where),
            last_attestation_result=_field(raw, "last_attestation_result", opt_str, where),
            bridge=_field(raw, "bridge", (str,), where),
            bridge_pid=_field(raw, "bridge_pid", opt_int, where),
            relay_errors=_field(raw, "relay_errors", opt_int, where),
        )
        if vm.vaik not in VAIK_STATES:
            raise StatusParseError(f"{where}.vaik", 0, "/".join(VAIK_STATES), vm.vaik, unit="line")
        if vm.bridge not in BRIDGE_STATES:
            raise StatusParseError(
                f"{where}.bridge", 0, "/".join(BRIDGE_STATES), vm.bridge, unit="line"
            )
        vms.append(vm)
    return HostStatus(
        source=_field(obj, "source", (str,), "status"),
        generated_at=_field(obj, "generated_at", (str,), "status"),
        state_dir=_field(obj, "state_dir", (str,), "status"),
        daemon_running=_field(daemon, "running", (bool,), "status.daemon"),
        daemon_pid=_field(daemon, "pid", opt_int, "status.daemon"),
        vms=tuple(vms),
    )


# ---------------------------------------------------------------------------- the board


@dataclass
class _Facts:
    vaik: str | None = None
    last_seal: str | None = None
    last_attestation: str | None = None
    last_attestation_result: str | None = None
    relay_errors: int = 0


class StatusBoard:
    """What the daemon has seen happen, per VM; thread-safe. The daemon's services feed it.

    Timestamps are passed in (the caller's clock), never read here.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._facts: dict[str, _Facts] = {}

    def _get(self, vm_uuid: str) -> _Facts:
        return self._facts.setdefault(vm_uuid.lower(), _Facts())

    def vaik(self, vm_uuid: str, state: str) -> None:
        if state not in VAIK_STATES:
            raise ValueError(f"vAIK state must be one of {VAIK_STATES}, got {state!r}")
        with self._lock:
            self._get(vm_uuid).vaik = state

    def sealed(self, vm_uuid: str, at: datetime) -> None:
        with self._lock:
            self._get(vm_uuid).last_seal = _iso(at)

    def attested(self, vm_uuid: str, at: datetime, result: str = "ok") -> None:
        """An attestation request ended: ``result`` is ``ok`` or the refusal's error id."""
        with self._lock:
            facts = self._get(vm_uuid)
            facts.last_attestation = _iso(at)
            facts.last_attestation_result = result

    def relay_error(self, vm_uuid: str) -> None:
        with self._lock:
            self._get(vm_uuid).relay_errors += 1

    def apply(self, vm: VmStatus) -> VmStatus:
        """``vm`` with what the board knows about it (a VM never seen: vAIK ``none``)."""
        with self._lock:
            facts = self._facts.get(vm.uuid.lower())
            if facts is None:
                return replace(vm, vaik="none", relay_errors=0)
            return replace(
                vm,
                vaik=facts.vaik or "none",
                last_seal=facts.last_seal,
                last_attestation=facts.last_attestation,
                last_attestation_result=facts.last_attestation_result,
                relay_errors=facts.relay_errors,
            )


# ---------------------------------------------------------------------------- collecting


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def collect_local(state_dir: Path, runtime_dir: Path) -> list[VmStatus]:
    """VMs as local files show them (read-only): adoption records and registered bridges.

    A malformed adoption record is logged and skipped (``vtpm-host vm list`` names it).
    """
    vms: dict[str, VmStatus] = {}
    for record in sorted((Path(state_dir) / "vms").glob("*/adoption.json")):
        try:
            obj = json.loads(record.read_text())
            vm_uuid, name = str(obj["uuid"]).lower(), str(obj["name"])
        except (OSError, ValueError, KeyError, TypeError) as err:
            log.warning("skipping unreadable adoption record %s: %s", record, err)
            continue
        vms[vm_uuid] = VmStatus(uuid=vm_uuid, name=name, adopted=True)
    for bridge in _bridges(runtime_dir):
        vm_uuid = bridge["vm_uuid"].lower()
        vm = vms.get(vm_uuid) or VmStatus(uuid=vm_uuid, name=bridge["vm_name"], adopted=False)
        vms[vm_uuid] = replace(vm, bridge="running", bridge_pid=bridge["pid"])
    return sorted(vms.values(), key=lambda v: (v.name, v.uuid))


def _bridges(runtime_dir: Path) -> Iterable[dict[str, Any]]:
    # The registry format is host_agent.vtpm.bridge_link's; read without importing the bridge.
    if not Path(runtime_dir).is_dir():
        return
    for path in sorted(Path(runtime_dir).glob("*.json")):
        try:
            obj = json.loads(path.read_text())
            pid, vm_uuid, name = int(obj["pid"]), str(obj["vm_uuid"]), str(obj["vm_name"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if obj.get("format") == "vtpm-trust/bridge/1" and _pid_alive(pid):
            yield {"pid": pid, "vm_uuid": vm_uuid, "vm_name": name}


def _from_registry(registry: Any) -> list[VmStatus] | None:
    """VMs from the daemon's :class:`~host_agent.service.vm_registry.VmRegistry`, if it has one."""
    entries = getattr(registry, "entries", None)
    if not callable(entries):
        return None
    out: list[VmStatus] = []
    for entry in entries():
        if entry.bridge_connected:
            bridge = "connected"
        elif entry.bridge_pid is not None:
            bridge = "running"
        else:
            bridge = "down"
        out.append(
            VmStatus(
                uuid=entry.uuid,
                name=entry.name,
                adopted=entry.adoption is not None,
                bridge=bridge,
                bridge_pid=entry.bridge_pid,
            )
        )
    return sorted(out, key=lambda v: (v.name, v.uuid))


# ---------------------------------------------------------------------------- the component


def _store_facts(store: Any) -> dict[str, dict[str, str]]:
    """vAIK state and last seal per VM from the daemon's store (records ``binding``, ``vaik``,
    ``seal``); empty when the store is not open or has none of them."""
    facts: dict[str, dict[str, str]] = {}
    if store is None:
        return facts
    try:
        for rec in store.list_records("vaik"):
            facts.setdefault(rec.record_id.lower(), {})["vaik"] = "bound"
        for rec in store.list_records("binding"):
            active = bool(rec.json().get("active"))
            facts.setdefault(rec.record_id.lower(), {})["vaik"] = (
                "bound" if active else "awaiting-tenant"
            )
        for rec in store.list_records("seal"):
            vm_uuid = rec.record_id.split(".", 1)[0].lower()
            sealed_at = str(rec.json().get("sealed_at", ""))
            entry = facts.setdefault(vm_uuid, {})
            if sealed_at and sealed_at > entry.get("last_seal", ""):
                entry["last_seal"] = sealed_at
    except Exception:  # the status view must not take the daemon down with it
        log.exception("status: reading the store failed")
    return facts


def _relay_totals(daemon: Any) -> dict[str, int]:
    """Relay errors per VM from the daemon's bridges (asking the connected ones now)."""
    poll = getattr(daemon, "poll_bridges", None)
    totals: dict[str, int] = {}
    if not callable(poll):
        return totals
    try:
        for (vm_uuid, _kind), n in poll().items():
            totals[vm_uuid.lower()] = totals.get(vm_uuid.lower(), 0) + n
    except Exception:  # the status view must not take the daemon down with it
        log.exception("status: reading the bridges' relay errors failed")
    return totals


class StatusComponent:
    """Daemon component: serves the status document on ``<state_dir>/run/status.sock`` (0600).

    Load it with ``vtpm-host daemon --component host_agent.service.status:StatusComponent``.
    On ``start(daemon)`` it takes the daemon's paths, clock, VM registry and store, and offers
    its :class:`StatusBoard` to the other components as ``daemon.status_board`` (for events the
    store does not keep: attestations, relay errors). Per request it merges the registry (VMs,
    bridges), the store (vAIK state from ``vaik``/``binding`` records, last seal from ``seal``
    records) and the board.

    Args (all optional; tests pass them, the daemon's loader passes none):
        state_dir, runtime_dir: used when started without a daemon.
        board: a board to share; default a new one.
        clock: the current time (aware); default the daemon's ``now``.
        socket_path: default :func:`status_socket_of` ``(state_dir)``.
    """

    def __init__(
        self,
        state_dir: Path | None = None,
        runtime_dir: Path | None = None,
        *,
        board: StatusBoard | None = None,
        clock: Callable[[], datetime] | None = None,
        socket_path: Path | None = None,
    ) -> None:
        self.state_dir = Path(state_dir) if state_dir is not None else None
        self.runtime_dir = Path(runtime_dir) if runtime_dir is not None else None
        self.board = board if board is not None else StatusBoard()
        self.clock = clock
        self.socket_path = socket_path
        self._daemon: Any = None
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    def snapshot(self) -> HostStatus:
        """The status document as of now."""
        daemon = self._daemon
        assert self.state_dir is not None and self.runtime_dir is not None
        registry = getattr(daemon, "registry", None) if daemon is not None else None
        vms = _from_registry(registry) if registry is not None else None
        if vms is None:
            vms = collect_local(self.state_dir, self.runtime_dir)
        facts = _store_facts(getattr(daemon, "store", None))
        relay = _relay_totals(daemon)
        merged: list[VmStatus] = []
        for vm in vms:
            vm = self.board.apply(vm)
            known = facts.get(vm.uuid.lower(), {})
            vaik = known.get("vaik", vm.vaik)
            merged.append(
                replace(
                    vm,
                    vaik=vaik,
                    last_seal=known.get("last_seal", vm.last_seal),
                    relay_errors=(vm.relay_errors or 0) + relay.get(vm.uuid.lower(), 0),
                )
            )
        clock = self.clock or getattr(daemon, "now", None) or (lambda: datetime.now(UTC))
        return HostStatus(
            source="daemon",
            generated_at=_iso(clock()),
            state_dir=str(self.state_dir),
            daemon_running=True,
            daemon_pid=os.getpid(),
            vms=tuple(merged),
        )

    def start(self, daemon: Any = None) -> None:
        self._daemon = daemon
        paths = getattr(daemon, "paths", None)
        if paths is not None:
            self.state_dir = Path(paths.state_dir)
            self.runtime_dir = Path(paths.runtime_dir)
        if self.state_dir is None or self.runtime_dir is None:
            raise ValueError("StatusComponent needs a daemon, or state_dir and runtime_dir")
        if daemon is not None and getattr(daemon, "status_board", None) is None:
            with contextlib.suppress(AttributeError):
                daemon.status_board = self.board
        path = self.socket_path or status_socket_of(self.state_dir)
        self.socket_path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            sock.bind(str(path))
        finally:
            os.umask(old)
        sock.listen(8)
        sock.settimeout(0.2)
        self._sock = sock
        self._stopping.clear()
        self._thread = threading.Thread(target=self._serve, name="status", daemon=True)
        self._thread.start()
        log.info("status endpoint listening on %s", path)

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(5.0)
            self._thread = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None
            if self.socket_path is not None:
                with contextlib.suppress(FileNotFoundError):
                    self.socket_path.unlink()

    def _serve(self) -> None:
        assert self._sock is not None
        while not self._stopping.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                try:
                    self._answer(conn)
                except Exception:  # one bad client must not stop the endpoint
                    log.exception("status request failed")

    def _answer(self, conn: socket.socket) -> None:
        conn.settimeout(2.0)
        request = b""
        with contextlib.suppress(TimeoutError, OSError):
            while b"\n" not in request and len(request) < 4096:
                chunk = conn.recv(4096)
                if not chunk:
                    break
                request += chunk
        try:
            op = json.loads(request.decode() or "{}").get("op", "status")
        except (ValueError, AttributeError):
            op = None
        if op != "status":
            reply: dict[str, Any] = {"error": {"id": "status.bad_request", "message": repr(op)}}
        else:
            reply = self.snapshot().to_json()
        conn.sendall(json.dumps(reply, sort_keys=True).encode() + b"\n")


def _from_daemon_control(path: Path, state_dir: Path, now: datetime) -> HostStatus | None:
    """The daemon's own ``status`` control op (``<state_dir>/run/control.sock``), when the
    status component is not loaded: VMs and bridges, vAIK and events unknown."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10.0)
    try:
        sock.connect(str(path))
        sock.sendall(b'{"op": "status", "args": {}}\n')
        buf = b""
        while b"\n" not in buf and len(buf) <= _MAX_DOCUMENT:
            chunk = sock.recv(65536)
            if not chunk:
                break
            buf += chunk
    except OSError:
        return None
    finally:
        sock.close()
    try:
        reply = json.loads(buf.split(b"\n", 1)[0])
        value = reply["value"] if reply.get("ok") else None
        if not isinstance(value, dict):
            return None
        vms = []
        for e in value.get("vms", []):
            bridge = "connected" if e.get("bridge_connected") else "down"
            if bridge == "down" and e.get("bridge_pid") is not None:
                bridge = "running"
            relay = e.get("relay_errors")
            vms.append(
                VmStatus(
                    uuid=str(e["uuid"]),
                    name=str(e.get("name", "")),
                    adopted=bool(e.get("adopted")),
                    bridge=bridge,
                    bridge_pid=e.get("bridge_pid"),
                    relay_errors=relay if isinstance(relay, int) else None,
                )
            )
        pid = value.get("pid")
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
    return HostStatus(
        source="daemon",
        generated_at=_iso(now),
        state_dir=str(state_dir),
        daemon_running=True,
        daemon_pid=pid if isinstance(pid, int) else None,
        vms=tuple(sorted(vms, key=lambda v: (v.name, v.uuid))),
    )


def query_daemon(socket_path: Path, timeout: float = 5.0) -> HostStatus | None:
    """Ask the daemon's status endpoint; None when nothing listens there.

    Raises:
        StatusParseError: something answered, but not with a status document.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(str(socket_path))
        except (FileNotFoundError, ConnectionRefusedError):
            return None
        except OSError as err:
            log.warning("status socket %s: %s", socket_path, err)
            return None
        sock.sendall(b'{"op": "status"}\n')
        data = b""
        while len(data) <= _MAX_DOCUMENT:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    finally:
        sock.close()
    return parse_status(data.decode(errors="replace"))


# ---------------------------------------------------------------------------- rendering


def _ago(ts: str | None, now: datetime) -> str:
    if ts is None:
        return "-"
    try:
        seconds = int((now - datetime.fromisoformat(ts)).total_seconds())
    except ValueError:
        return ts
    if seconds < 120:
        return f"{max(seconds, 0)}s ago"
    if seconds < 7200:
        return f"{seconds // 60}m ago"
    if seconds < 172800:
        return f"{seconds // 3600}h ago"
    return f"{seconds // 86400}d ago"


def render_table(status: HostStatus, now: datetime) -> str:
    """The human form of ``vtpm-host status`` (pure: ``now`` is passed in)."""
    if status.daemon_running:
        head = f"daemon: running (pid {status.daemon_pid})"
    else:
        head = "daemon: NOT RUNNING (local files only: vAIK, seals and attestations unknown)"
    lines = [head, f"state:  {status.state_dir}", ""]
    if not status.vms:
        lines.append("no VMs adopted")
        return "\n".join(lines) + "\n"
    rows = [("VM", "UUID", "ADOPTED", "vAIK", "LAST SEAL", "LAST ATTESTATION", "BRIDGE")]
    for vm in status.vms:
        attest = _ago(vm.last_attestation, now)
        if vm.last_attestation_result not in (None, "ok"):
            attest += f" ({vm.last_attestation_result})"
        bridge = vm.bridge if vm.bridge_pid is None else f"{vm.bridge} (pid {vm.bridge_pid})"
        if vm.relay_errors:
            bridge += f", {vm.relay_errors} relay errors"
        rows.append(
            (
                vm.name or "?",
                vm.uuid,
                "yes" if vm.adopted else "no",
                vm.vaik,
                _ago(vm.last_seal, now),
                attest,
                bridge,
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for r in rows:
        cells = [c.ljust(w) for c, w in zip(r[:-1], widths, strict=True)]
        lines.append("  ".join([*cells, r[-1]]).rstrip())
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------- CLI


def _local_status(state_dir: Path, runtime_dir: Path, now: datetime) -> HostStatus:
    return HostStatus(
        source="local",
        generated_at=_iso(now),
        state_dir=str(state_dir),
        daemon_running=False,
        daemon_pid=None,
        vms=tuple(collect_local(state_dir, runtime_dir)),
    )


def _cmd_status(args: argparse.Namespace) -> int:
    from host_agent.config import load_config, with_state_dir

    config = load_config(args.config, os.environ)
    if args.state_dir is not None:
        config = with_state_dir(config, args.state_dir.resolve())
    now = datetime.now(UTC)
    path = args.socket or status_socket_of(config.state_dir)
    status = query_daemon(path)
    if status is None:
        control = config.state_dir / "run" / "control.sock"
        status = _from_daemon_control(control, config.state_dir, now)
    if status is None:
        status = _local_status(config.state_dir, args.runtime_dir, now)
    if args.json:
        print(json.dumps(status.to_json(), indent=2, sort_keys=True))
    else:
        print(render_table(status, now), end="")
    return 0


def register(subparsers: Any) -> None:
    """Add ``status`` to the ``vtpm-host`` parser."""
    from host_agent.vtpm.cli import DEFAULT_RUNTIME_DIR

    p = subparsers.add_parser(
        "status",
        help="VMs, their vAIK state, last seal, last attestation and bridge health",
        description=(
            "Ask the running daemon (its status socket, <state-dir>/run/status.sock) what it "
            "knows; when no daemon answers, show what local files say (adoption records and "
            "running bridges) and mark the rest unknown. Exit status 0 either way; the document "
            "says which: source daemon or local."
        ),
    )
    p.add_argument("--json", action="store_true", help="one JSON document (vtpm-trust/status/1)")
    p.add_argument("--config", type=Path, metavar="FILE", help="agent configuration (TOML)")
    p.add_argument("--state-dir", type=Path, metavar="DIR", help="agent state directory")
    p.add_argument(
        "--runtime-dir",
        type=Path,
        default=DEFAULT_RUNTIME_DIR,
        help=f"where bridges register themselves (default {DEFAULT_RUNTIME_DIR})",
    )
    p.add_argument("--socket", type=Path, help="the daemon's status socket")
    p.set_defaults(func=_cmd_status)
