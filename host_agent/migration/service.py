"""The migration service: the peer listener, the recovery loop and the local control socket.

It runs inside whatever process owns the host's store (the store admits one writer): the
daemon, as the component :class:`MigrationComponent`, or standalone with
``vtpm-host migration serve`` (what the sim and e2e tests run as each host's process, so a
SIGKILL of it is a real crash). ``vtpm-host vm migrate`` asks it over
``<state_dir>/run/migration.sock`` (one JSON line each way).

Start order: listener (outcome queries are answered from the journal at once: an entry left
open by a crash reads ``undecided`` until recovery settled it) → one recovery pass
(:func:`~host_agent.migration.recovery.resolve_open_entries`) → the arrivals a crash left
without an adoption record (:meth:`MigrationService.record_arrivals`) → the recovery loop
(every ``resolve_interval`` seconds, for peers that were unreachable) → the control socket.
"""

from __future__ import annotations

import base64
import contextlib
import enum
import json
import logging
import os
import socket
import threading
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar

from evidence.errors import VtpmError
from evidence.tpm2_policy import PolicyApproval
from host_agent._jsonline import call_json_line
from host_agent.errors import StateError

from .channel import MtlsListener, MtlsPeerChannel, PeerChannel, TlsIdentity, parse_address
from .errors import MigrationError, PullNotHere, PullRefused
from .faults import FaultJournal
from .host import MigrationHost
from .journal import StoreJournal, TargetStep
from .libvirt_job import migration_job_active, vm_placement, wait_migration_job
from .protocol import Pull
from .recovery import resolve_open_entries
from .source import MigrationResult, migrate_vaik
from .state import VaikState, vaik_state
from .target import pull_source, run_incoming, serve_peer
from .vm import VmMoves

__all__ = [
    "DEFAULT_PORT",
    "MigrationComponent",
    "MigrationService",
    "ServiceRunState",
    "control_call",
    "load_approvals",
    "load_peers",
]

log = logging.getLogger("host_agent.migration.service")

DEFAULT_PORT = 7787


def load_approvals(path: Path) -> list[PolicyApproval]:
    """Fleet approvals from a file in the registrar's ``GET /v1/policy-approvals`` format
    (signatures are checked per migration against each vAIK's own fleet key). A missing file
    is no approval: every target is then refused."""
    try:
        doc = json.loads(Path(path).read_text())
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as err:
        raise MigrationError(f"fleet approvals {path}: {err}") from err
    out = []
    for item in doc.get("approvals", []) if isinstance(doc, dict) else []:
        try:
            signature = base64.b64decode(item["signature"], validate=True)
            out.append(
                PolicyApproval(
                    bytes.fromhex(item["approved_policy"]),
                    bytes.fromhex(item["policy_ref"]),
                    signature,
                )
            )
        except (KeyError, TypeError, ValueError):
            log.warning("fleet approvals %s: skipping a malformed entry", path)
    return out


def load_peers(settings_path: Path) -> dict[str, str]:
    """``"peers"`` of the component's ``settings.json``: host id → ``HOST:PORT`` of each host a
    pull may ask (a missing file or key is no peer).

    Raises:
        MigrationError: the file is not JSON, or ``peers`` is not an object of non-empty
            strings (what was expected and what is there).
    """
    try:
        doc = json.loads(Path(settings_path).read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as err:
        raise MigrationError(f"{settings_path}: not readable JSON: {err}") from err
    peers = doc.get("peers", {}) if isinstance(doc, dict) else {}
    if not isinstance(peers, dict) or not all(
        isinstance(k, str) and k and isinstance(v, str) and v for k, v in peers.items()
    ):
        raise MigrationError(
            f'{settings_path}: "peers" must be an object of host id → "HOST:PORT", '
            f"got {json.dumps(peers)[:200]}"
        )
    for host_id, address in peers.items():
        try:
            parse_address(address, DEFAULT_PORT)
        except (ValueError, VtpmError) as err:
            raise MigrationError(
                f'{settings_path}: peer {host_id}: "HOST:PORT" expected, got {address!r}'
            ) from err
    return dict(peers)


class ServiceRunState(enum.Enum):
    CREATED = "created"
    RUNNING = "running"
    STOPPED = "stopped"


class MigrationService:
    """See the module docstring.

    Args:
        host: this host's migration context.
        listen: where the peer listener binds (port 0 picks one; :attr:`address`).
        control_socket: the local control socket path, or None for none.
        resolve_interval: seconds between recovery passes.
        moves: the VM side (bridge hooks, arming; :class:`~host_agent.migration.vm.VmMoves`),
            present when the service runs inside the daemon; without it only vAIKs move.
        libvirt_uri: this host's libvirt (the source of a VM migration).
        peers: the hosts a pull asks (host id → ``HOST:PORT``), read per pull.
        fault_point: test hook (:meth:`.faults.FaultJournal.point`): called with the name of
            each crash point of :data:`.faults.POINTS` the service passes.
    """

    def __init__(
        self,
        host: MigrationHost,
        *,
        listen: tuple[str, int] = ("0.0.0.0", DEFAULT_PORT),
        control_socket: Path | None = None,
        resolve_interval: float = 2.0,
        moves: VmMoves | None = None,
        libvirt_uri: str | None = None,
        peers: Callable[[], Mapping[str, str]] = dict,
        fault_point: Callable[[str], None] = lambda _point: None,
    ) -> None:
        self.host = host
        self._peers = peers
        self.fault_point = fault_point
        if moves is not None:
            host.pull_handler = self.on_pull
        if moves is not None and libvirt_uri is not None:
            uri = libvirt_uri
            host.vm_placement = lambda vm: vm_placement(uri, vm)
        self.moves = moves
        self.libvirt_uri = libvirt_uri
        self.listen = listen
        self.control_socket = control_socket
        self.resolve_interval = resolve_interval
        self.run_state = ServiceRunState.CREATED
        self._listener: MtlsListener | None = None
        self._control: socket.socket | None = None
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def _require(self, what: str, *states: ServiceRunState) -> None:
        if self.run_state not in states:
            raise StateError(self.run_state.value, [s.value for s in states], f"migration: {what}")

    @property
    def address(self) -> tuple[str, int]:
        assert self._listener is not None
        return self._listener.address

    def connect(self, peer: str, address: str) -> MtlsPeerChannel:
        return MtlsPeerChannel.connect(
            self.host.identity,
            parse_address(address, DEFAULT_PORT),
            peer,
            timeout=self.host.timeout,
        )

    def _thread(self, target: Any, name: str) -> None:
        t = threading.Thread(target=target, name=name, daemon=True)
        t.start()
        self._threads.append(t)

    def start(self, daemon: Any = None) -> MigrationService:
        """Listener, one recovery pass, recovery loop, control socket (see the module docstring)."""
        del daemon
        self._require("start()", ServiceRunState.CREATED)
        self._listener = MtlsListener(self.host.identity, self.listen)
        try:
            if not self.host.advertise:
                host, port = self._listener.address
                self.host.advertise = f"{host}:{port}"
            listener = self._listener
            self._thread(
                lambda: listener.serve(lambda ch: serve_peer(self.host, ch)), "migration-listen"
            )
            self.recover()
            self.record_arrivals()
            self._thread(self._resolve_loop, "migration-recovery")
            if self.control_socket is not None:
                self._start_control(self.control_socket)
        except BaseException:
            self._listener.close()
            raise
        self.run_state = ServiceRunState.RUNNING
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._listener is not None:
            self._listener.close()
        if self._control is not None:
            with contextlib.suppress(OSError):
                self._control.shutdown(socket.SHUT_RDWR)  # wakes the accept() thread
            with contextlib.suppress(OSError):
                self._control.close()
            if self.control_socket is not None:
                with contextlib.suppress(OSError):
                    self.control_socket.unlink()
        for t in self._threads:
            t.join(2)
        self.run_state = ServiceRunState.STOPPED

    def recover(self) -> list[str]:
        """One recovery pass (also run at start)."""
        return resolve_open_entries(self.host, self.connect)

    def record_arrivals(self) -> list[str]:
        """At start: each VM that arrived here by a migration (target journal ACTIVE, with the
        VM), whose vAIK is active here, gets its adoption record if it has none and libvirt
        runs it here (a crash between ACTIVE and the record leaves it without one, and the
        attestation component serves a VM's channel from that record). Returns the VMs asked."""
        if self.moves is None:
            return []
        vms = {
            e.vm_uuid
            for e in self.host.j.entries()
            if e.side == "target" and e.step is TargetStep.ACTIVE and e.data.get("with_vm")
        }
        asked = []
        for vm in sorted(vms, key=str):
            if vaik_state(self.host.store, vm) is VaikState.ACTIVE:
                self.moves.record_arrival(vm)
                asked.append(str(vm))
        return asked

    def _resolve_loop(self) -> None:
        while not self._stop.wait(self.resolve_interval):
            try:
                self.recover()
            except Exception:  # the loop must survive one bad pass; logged
                log.exception("migration recovery pass failed")

    def migrate(
        self,
        vm_uuid: uuid.UUID,
        to: str,
        address: str,
        *,
        libvirt_dest: str | None = None,
        migrate_uri: str | None = None,
    ) -> MigrationResult:
        """Move ``vm_uuid``'s vAIK to host ``to`` at ``address`` (see ``SourceMigration.run``);
        with ``libvirt_dest`` (the target's libvirt URI) libvirt live-migrates the running VM
        within the protocol (steps 3/4, :mod:`.vm`), its stream to ``migrate_uri``.

        Raises:
            MigrationError: a VM migration without the daemon's bridge hooks here; as
                ``SourceMigration.run``; LibvirtMigrationFailed: libvirt failed (aborted: the
                VM runs here again with its vAIK).
        """
        self._require("migrate()", ServiceRunState.RUNNING, ServiceRunState.CREATED)
        if libvirt_dest is None:
            return migrate_vaik(self.host, vm_uuid, to, address, connect=self.connect)
        source_uri = self._vm_moves_here()

        def run_libvirt() -> None:
            from host_agent.lifecycle.libvirt_adapter import Hypervisor

            with Hypervisor(source_uri) as hv:
                hv.migrate(str(vm_uuid), libvirt_dest, migrate_uri=migrate_uri)

        return self._migrate_vm(vm_uuid, to, address, run_libvirt, self.connect)

    def _vm_moves_here(self) -> str:
        """This host's libvirt URI, if this service moves running VMs (the daemon's component).

        Raises:
            MigrationError: it does not (``migration serve``: no bridge hooks here).
        """
        if self.moves is None or self.libvirt_uri is None:
            raise MigrationError(
                "a VM migration needs the daemon (its bridge hooks): run the migration service "
                "as the daemon's component, not `migration serve`"
            )
        return self.libvirt_uri

    def _migrate_vm(
        self,
        vm_uuid: uuid.UUID,
        to: str,
        address: str,
        run_libvirt: Callable[[], None],
        connect: Callable[[str, str], PeerChannel],
    ) -> MigrationResult:
        """The source's protocol around a libvirt migration: ``run_libvirt`` starts it (or, for
        a pull, waits for the one libvirt runs already) once the target's ExgKey passed."""
        source_uri = self._vm_moves_here()
        assert self.moves is not None

        def cancel_libvirt() -> None:
            from host_agent.lifecycle.libvirt_adapter import Hypervisor

            with Hypervisor(source_uri) as hv:
                hv.abort_job(str(vm_uuid))

        moves = self.moves
        move = moves.begin_outgoing(vm_uuid, run_libvirt)
        timeout = self.host.timeout * 5

        def libvirt_done(_channel: PeerChannel, _entry: object) -> None:
            move.wait(timeout)
            self.fault_point("source:vm-moved")  # test hook: the VM runs on the target now

        try:
            return migrate_vaik(
                self.host,
                vm_uuid,
                to,
                address,
                connect=connect,
                between=libvirt_done,
                record_source=moves.record_source,
                on_verified=move.start,  # pre-copy overlaps the vAIK's duplication and import
            )
        except BaseException:
            # Aborted: the VM must stay here. A veto already fails libvirt's migration; any
            # other abort cancels the job (a job that ended meanwhile is no error).
            if move.started and not move.finished:
                with contextlib.suppress(Exception):
                    cancel_libvirt()
            raise
        finally:
            # Failed or not, answer only once libvirt is done (the VM runs on one side).
            if move.started:
                with contextlib.suppress(MigrationError):
                    move.wait(timeout)
            moves.end_outgoing(vm_uuid)

    # ---------------------------------------------------------------- plain virsh migrate

    def on_pull(self, channel: PeerChannel, pull: Pull) -> None:
        """Source: a target's libvirt hook asks for ``pull.vm_uuid`` (a plain ``virsh migrate``
        runs). Joins only a migration libvirt runs here right now, then runs the ordinary
        source-driven protocol on ``channel`` (every check of a push), with "wait for libvirt's
        job to end" in place of starting libvirt.

        Raises:
            PullNotHere: no vAIK, or no such domain, here (the target asks its next peer).
            PullRefused: no daemon here, or no outgoing libvirt migration of the VM.
            MigrationError: as :meth:`migrate` (sent to the target as an Error).
        """
        vm_uuid = pull.vm_uuid
        if self.moves is None or self.libvirt_uri is None:
            raise PullRefused(
                f"{self.host.host_id}'s migration service runs without the daemon's bridge "
                "hooks: it cannot move a running VM"
            )
        source_uri = self.libvirt_uri
        if vaik_state(self.host.store, vm_uuid) is VaikState.ABSENT:
            raise PullNotHere(f"{self.host.host_id} holds no vAIK for VM {vm_uuid}")
        job = migration_job_active(source_uri, vm_uuid)
        if job is None:
            raise PullNotHere(f"{self.host.host_id}'s libvirt has no domain {vm_uuid}")
        if not job:
            raise PullRefused(
                f"{self.host.host_id} does not migrate VM {vm_uuid} now (no outgoing libvirt "
                "migration job): a pull only joins a migration libvirt runs"
            )
        first = [channel]

        def connect(peer: str, address: str) -> PeerChannel:
            return first.pop() if first else self.connect(peer, address)

        def wait_libvirt() -> None:
            wait_migration_job(source_uri, vm_uuid, timeout=self.host.timeout * 5)

        log.info("VM %s: %s pulls it (a libvirt migration runs)", vm_uuid, channel.peer_id)
        self._migrate_vm(vm_uuid, channel.peer_id, pull.target_address, wait_libvirt, connect)

    def peers(self) -> dict[str, str]:
        """The hosts a pull asks (host id → ``HOST:PORT``), re-read per pull."""
        return dict(self._peers())

    def expect_incoming(self, vm_uuid: uuid.UUID, tpm_socket: str | None) -> dict[str, Any]:
        """Target (the libvirt hook): make this host ready for the incoming ``vm_uuid``.

        Returns at once when a migration this host was offered armed it already (``vm
        migrate``); else pulls it from the peer that holds it (:func:`pull_source`) and returns
        once the VM is armed and its vAIK imported here as pending, the rest of the exchange
        (record check, decision) going on on a thread.

        Raises:
            MigrationError: no daemon here; the domain's TPM socket is not where this host arms
                it; PullNotHere (no peer holds it), PeerAborted (the source refused, with its
                reason), or the target's own failure.
        """
        self._vm_moves_here()
        assert self.moves is not None
        if vm_uuid in self.moves.incoming:
            return {"vm_uuid": str(vm_uuid), "armed": "offer"}
        if tpm_socket is not None:
            from host_agent.lifecycle.adoption import VmLayout

            ours = VmLayout.of(Path(self.moves.daemon.paths.state_dir), str(vm_uuid)).bridge_socket
            if Path(tpm_socket) != ours:
                raise MigrationError(
                    f"VM {vm_uuid}: its TPM socket is {tpm_socket}, but this host arms "
                    f"{ours} (the state directory differs between the hosts)"
                )
        peers = self.peers()
        if not peers:
            raise PullNotHere(
                f'VM {vm_uuid}: no peers configured to pull it from ("peers" in '
                "<state>/migration/settings.json)"
            )
        channel, offer = pull_source(self.host, peers, vm_uuid, self.connect)
        ready = threading.Event()
        failed: list[BaseException] = []

        def run() -> None:
            try:
                run_incoming(self.host, channel, offer, on_imported=ready.set)
            except BaseException as err:  # reported to the hook, or logged after it returned
                failed.append(err)
                log.warning("incoming VM %s (pulled): %s", vm_uuid, err)
            finally:
                channel.close()
                ready.set()

        threading.Thread(target=run, name=f"pull-{vm_uuid}", daemon=True).start()
        if not ready.wait(self.host.timeout * 2):
            raise MigrationError(f"VM {vm_uuid}: not armed within {self.host.timeout * 2:g} s")
        if failed:
            err = failed[0]
            if isinstance(err, VtpmError):
                raise err
            raise MigrationError(f"VM {vm_uuid}: {err}")
        return {
            "vm_uuid": str(vm_uuid),
            "armed": "pull",
            "source": channel.peer_id,
            "migration_id": str(offer.migration_id),
        }

    # ---------------------------------------------------------------- control socket

    def _start_control(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o711)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(path))
        os.chmod(path, 0o600)
        sock.listen(8)
        self._control = sock

        def accept() -> None:
            while not self._stop.is_set():
                try:
                    conn, _ = sock.accept()
                except OSError:
                    return
                threading.Thread(target=self._serve_control, args=(conn,), daemon=True).start()

        self._thread(accept, "migration-control")

    def _serve_control(self, conn: socket.socket) -> None:
        with conn:
            try:
                buf = b""
                while b"\n" not in buf:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    buf += chunk
                req = json.loads(buf.split(b"\n", 1)[0])
                reply = {"ok": True, "value": self._control_op(req)}
            except VtpmError as err:
                reply = {"ok": False, "error_id": err.id, "message": str(err)}
            except (ValueError, TypeError, KeyError) as err:
                reply = {"ok": False, "error_id": "migration.bad_request", "message": str(err)}
            with contextlib.suppress(OSError):
                conn.sendall(json.dumps(reply).encode() + b"\n")

    def _control_op(self, req: dict[str, Any]) -> dict[str, Any]:
        op = req.get("op")
        if op == "migrate":
            dest = req.get("libvirt_dest")
            result = self.migrate(
                uuid.UUID(req["vm_uuid"]),
                str(req["to"]),
                str(req["address"]),
                libvirt_dest=None if dest is None else str(dest),
                migrate_uri=None if req.get("migrate_uri") is None else str(req["migrate_uri"]),
            )
            moved = result.to_json()
            if dest is not None and self.moves is not None:
                moved["vm"] = {"libvirt_dest": dest, **self.moves.last}
            return moved
        if op == "expect":
            socket_path = req.get("tpm_socket")
            return self.expect_incoming(
                uuid.UUID(str(req["vm_uuid"])), None if socket_path is None else str(socket_path)
            )
        if op == "recover":
            return {"done": self.recover()}
        if op == "journal":
            journal: dict[str, Any] = {"entries": [e.to_json() for e in self.host.j.entries()]}
            if req.get("vm_uuid") is not None:
                vm = uuid.UUID(str(req["vm_uuid"]))
                journal["vaik_state"] = vaik_state(self.host.store, vm).value
            return journal
        raise ValueError(f"unknown op {op!r}")


class RemoteMigrationError(MigrationError):
    """The migration service refused a control request; ``remote_id`` is its error id."""

    id: ClassVar[str] = "migration.failed"

    def __init__(self, remote_id: str, message: str) -> None:
        self.remote_id = remote_id
        self.remote_message = message
        super().__init__(f"[{remote_id}] {message}")


def control_call(path: Path, request: dict[str, Any], timeout: float = 300.0) -> dict[str, Any]:
    """One request to a migration service's control socket.

    Raises:
        MigrationError: the service is not running, or the request failed (its error id kept).
    """
    try:
        reply = call_json_line(path, request, timeout, "the migration service")
    except (OSError, EOFError) as err:
        raise MigrationError(
            f"cannot reach the migration service at {path}: {err} (is it running?)"
        ) from err
    if not reply.get("ok"):
        raise RemoteMigrationError(str(reply.get("error_id")), str(reply.get("message")))
    value = reply.get("value")
    return value if isinstance(value, dict) else {}


class MigrationComponent:
    """The service as a daemon component.

    ``vtpm-host daemon --component host_agent.migration.service:MigrationComponent``.

    Settings come from ``<state_dir>/migration/settings.json`` when present:
    ``{"listen": "HOST:PORT", "advertise": "HOST:PORT", "approvals": "PATH", "peers": {HOST_ID:
    "HOST:PORT", …}}``; defaults: listen on ``0.0.0.0:7787``, approvals from
    ``<state_dir>/migration/policy-approvals.json``, no peers. ``peers`` are the hosts this one
    asks for an incoming plain ``virsh migrate`` (:mod:`.hook`), re-read per migration.
    ``"test_tamper": "memory" | "state"`` is a test hook only (:mod:`.vm`): an incoming VM's
    memory or vTPM state is changed before it is checked (re-read per incoming migration);
    ``"test_kill_at": "SIDE:STEP"`` likewise (:mod:`.faults`): SIGKILL after that journal step
    (or at one of the crash points ``faults.POINTS``).

    Inside the daemon the service also moves running VMs (:mod:`.vm`): the daemon's bridge
    hooks capture the final stop on the source and check the incoming VM on the target.
    """

    name: ClassVar[str] = "migration"

    def __init__(self) -> None:
        self.service: MigrationService | None = None

    def start(self, daemon: Any) -> None:
        from .host import load_identity_certificates

        state_dir = Path(daemon.paths.state_dir)
        settings_path = state_dir / "migration" / "settings.json"
        settings: dict[str, Any] = {}
        if settings_path.is_file():
            settings = json.loads(settings_path.read_text())
        approvals_path = Path(
            settings.get("approvals", state_dir / "migration" / "policy-approvals.json")
        )
        fleet_ca, aik_cert = load_identity_certificates(state_dir)
        journal = FaultJournal(StoreJournal(daemon.store), settings_path)  # test_kill_at
        host = MigrationHost(
            tpm=daemon.tpm,
            store=daemon.store,
            identity=TlsIdentity.under(state_dir),
            host_id=TlsIdentity.under(state_dir).host_id(),
            fleet_ca=fleet_ca,
            aik_certificate=aik_cert,
            approvals=lambda: load_approvals(approvals_path),
            advertise=str(settings.get("advertise", "")),
            now=daemon.now,
            journal=journal,
        )

        def tamper() -> str | None:
            """The test hook, re-read per incoming migration (tests switch it on and off)."""
            try:
                value = json.loads(settings_path.read_text()).get("test_tamper")
            except (OSError, ValueError, AttributeError):
                return None
            if value not in (None, "memory", "state"):
                raise MigrationError(
                    f"{settings_path}: test_tamper must be memory or state, got {value!r}"
                )
            return str(value) if value else None

        moves = VmMoves(daemon, tamper=tamper)
        host.prepare_incoming = moves.prepare_incoming
        host.record_check = moves.record_check
        host.end_incoming = moves.end_incoming
        self.service = MigrationService(
            host,
            listen=parse_address(
                str(settings.get("listen", f"0.0.0.0:{DEFAULT_PORT}")), DEFAULT_PORT
            ),
            control_socket=state_dir / "run" / "migration.sock",
            moves=moves,
            libvirt_uri=daemon.config.libvirt.uri_for(state_dir),
            peers=lambda: load_peers(settings_path),
            fault_point=journal.point,
        ).start()
        daemon.migration = self.service

    def stop(self) -> None:
        if self.service is not None:
            self.service.stop()
