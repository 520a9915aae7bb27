"""The hypervisor adapter: the one module of vtpm-trust that holds libvirt objects.

Everything above it sees our types only: :class:`DomainRef` (name + UUID), :class:`DomainInfo`,
:class:`DomainState`, :class:`LifecycleEvent`, and one error tree::

    VtpmError
    └── HypervisorError(code, domain, vm)   a libvirtError, wrapped once, here
        ├── DomainNotFound                   no domain of that name or UUID
        └── EmbeddedRootBusy                 the embedded driver's root is held elsewhere

``code`` and ``domain`` are libvirt's error code and error domain (``libvirtError``'s
``get_error_code()`` / ``get_error_domain()``), ``vm`` the name or UUID of the VM concerned.

Connections and events
----------------------
libvirt delivers events through an event loop the application provides. This module registers
libvirt's default implementation once per process (:func:`start_event_loop`) and runs
``virEventRunDefaultImpl()`` on one daemon thread. Every :class:`Hypervisor` registers a
domain-lifecycle callback and hands each event, as a :class:`LifecycleEvent`, to its
subscribers (on the event thread: subscribers must return quickly).

The embedded driver (``qemu:///embed?root=ROOT``, the default, see
:mod:`host_agent.lifecycle.embedded`) runs inside this process. libvirt 9.0 allows one embedded
root per process, for the life of the process (closing every connection does not release it),
and locks the root against other processes (``ROOT/run/qemu/driver.pid``): a CLI command cannot
open a root the daemon holds. Both cases raise :class:`EmbeddedRootBusy`. QEMU processes
outlive the process that started them; the next process to open the root reconnects to them.
"""

from __future__ import annotations

import enum
import logging
import re
import threading
import time
import uuid as uuid_mod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import libvirt

from evidence.errors import VtpmError

from .embedded import embedded_root_of

__all__ = [
    "DomainInfo",
    "DomainNotFound",
    "DomainRef",
    "DomainState",
    "EmbeddedRootBusy",
    "EventKind",
    "Hypervisor",
    "HypervisorError",
    "LifecycleEvent",
    "embedded_root_of",
    "start_event_loop",
]

log = logging.getLogger(__name__)

T = TypeVar("T")


# ---------------------------------------------------------------------------- errors


class HypervisorError(VtpmError):
    """libvirt refused or failed an operation.

    Args:
        message: what was attempted and libvirt's own words.
        code: libvirt's error code (``VIR_ERR_*``), None when the error is ours.
        domain: libvirt's error domain (``VIR_FROM_*``), None when the error is ours.
        vm: the VM (name or UUID) the operation concerned, if any.
    """

    id: ClassVar[str] = "hypervisor.error"

    def __init__(
        self,
        message: str,
        *,
        code: int | None = None,
        domain: int | None = None,
        vm: str | None = None,
    ) -> None:
        self.code = code
        self.domain = domain
        self.vm = vm
        super().__init__(message)


class DomainNotFound(HypervisorError):
    """No domain has that name or UUID."""

    id: ClassVar[str] = "hypervisor.domain_not_found"


class EmbeddedRootBusy(HypervisorError):
    """The embedded driver's root is held by another process, or this process holds another."""

    id: ClassVar[str] = "hypervisor.embedded_root_busy"


def _wrap(err: libvirt.libvirtError, what: str, vm: str | None) -> HypervisorError:
    code, domain = err.get_error_code(), err.get_error_domain()
    text = err.get_error_message() or str(err)
    where = f" ({vm})" if vm else ""
    message = f"{what}{where}: {text}"
    if code == libvirt.VIR_ERR_NO_DOMAIN:
        return DomainNotFound(message, code=code, domain=domain, vm=vm)
    if "already open with path" in text or ("driver.pid" in text and "acquire" in text):
        return EmbeddedRootBusy(
            f"{message} (libvirt's embedded driver takes one root per process and locks it "
            "against other processes: is the vtpm-host daemon running? Then ask it, or set "
            "libvirt.uri to a system libvirtd)",
            code=code,
            domain=domain,
            vm=vm,
        )
    return HypervisorError(message, code=code, domain=domain, vm=vm)


# ---------------------------------------------------------------------------- our types


@dataclass(frozen=True)
class DomainRef:
    """A domain by identity. The adapter looks the libvirt object up again on every call."""

    name: str
    uuid: str


class DomainState(enum.Enum):
    """``virDomainState`` under our names."""

    NOSTATE = "nostate"
    RUNNING = "running"
    BLOCKED = "blocked"
    PAUSED = "paused"
    SHUTDOWN = "shutting-down"
    SHUTOFF = "shutoff"
    CRASHED = "crashed"
    PMSUSPENDED = "pmsuspended"


_STATES = {
    libvirt.VIR_DOMAIN_NOSTATE: DomainState.NOSTATE,
    libvirt.VIR_DOMAIN_RUNNING: DomainState.RUNNING,
    libvirt.VIR_DOMAIN_BLOCKED: DomainState.BLOCKED,
    libvirt.VIR_DOMAIN_PAUSED: DomainState.PAUSED,
    libvirt.VIR_DOMAIN_SHUTDOWN: DomainState.SHUTDOWN,
    libvirt.VIR_DOMAIN_SHUTOFF: DomainState.SHUTOFF,
    libvirt.VIR_DOMAIN_CRASHED: DomainState.CRASHED,
    libvirt.VIR_DOMAIN_PMSUSPENDED: DomainState.PMSUSPENDED,
}


@dataclass(frozen=True)
class DomainInfo:
    """A domain's identity and run state at one moment."""

    name: str
    uuid: str
    state: DomainState
    active: bool
    persistent: bool

    @property
    def ref(self) -> DomainRef:
        return DomainRef(self.name, self.uuid)


class EventKind(enum.Enum):
    """``virDomainEventType``: the category of a lifecycle event."""

    DEFINED = "defined"
    UNDEFINED = "undefined"
    STARTED = "started"
    SUSPENDED = "suspended"
    RESUMED = "resumed"
    STOPPED = "stopped"
    SHUTDOWN = "shutdown"
    PMSUSPENDED = "pmsuspended"
    CRASHED = "crashed"


def _event_tables() -> tuple[dict[int, EventKind], dict[EventKind, dict[int, str]]]:
    """libvirt's event and detail constants, by name (``VIR_DOMAIN_EVENT_STOPPED_SAVED`` →
    STOPPED, ``"saved"``), so a libvirt that adds details needs no change here."""
    kinds: dict[int, EventKind] = {}
    details: dict[EventKind, dict[int, str]] = {}
    for kind in EventKind:
        kinds[int(getattr(libvirt, f"VIR_DOMAIN_EVENT_{kind.name}"))] = kind
        prefix = f"VIR_DOMAIN_EVENT_{kind.name}_"
        details[kind] = {
            int(value): name[len(prefix) :].lower()
            for name, value in vars(libvirt).items()
            if name.startswith(prefix) and not name.endswith("_LAST") and isinstance(value, int)
        }
    return kinds, details


_EVENT_KINDS, _EVENT_DETAILS = _event_tables()


@dataclass(frozen=True)
class LifecycleEvent:
    """One domain lifecycle event.

    Attributes:
        kind: the category (started, stopped, suspended …).
        detail: libvirt's detail in lower case: ``booted``, ``restored``, ``migrated``,
            ``from_snapshot``, ``wakeup`` (started); ``shutdown``, ``destroyed``, ``crashed``,
            ``migrated``, ``saved``, ``failed``, ``from_snapshot`` (stopped); ``paused``,
            ``restored``, ``migrated``, ``api_error`` … (suspended); ``added``, ``updated``
            (defined); ``removed`` (undefined); ``unknown-N`` for a detail libvirt added later.
        vm: the domain.
        at: monotonic time of delivery.
    """

    kind: EventKind
    detail: str
    vm: DomainRef
    at: float

    @property
    def name(self) -> str:
        """``kind.detail``, e.g. ``stopped.saved``: what tests and logs match on."""
        return f"{self.kind.value}.{self.detail}"


# ---------------------------------------------------------------------------- event loop

_loop_lock = threading.Lock()
_loop_thread: threading.Thread | None = None


def _quiet(_ctx: Any, _err: Any) -> None:
    """libvirt's error callback: errors reach us as ``libvirtError``; say nothing twice."""


def start_event_loop() -> None:
    """Register libvirt's default event loop implementation and run it on a daemon thread.

    Idempotent; must run before the first connection is opened (the embedded driver needs it,
    and callbacks registered on a connection opened earlier never fire).
    """
    global _loop_thread
    with _loop_lock:
        if _loop_thread is not None:
            return
        # libvirt prints every error to stderr unless a handler is registered; ours are raised.
        libvirt.registerErrorHandler(_quiet, None)
        if libvirt.virEventRegisterDefaultImpl() != 0:
            raise HypervisorError("cannot register libvirt's default event loop implementation")

        def run() -> None:
            while True:
                try:
                    libvirt.virEventRunDefaultImpl()
                except libvirt.libvirtError as err:  # pragma: no cover - logged, loop goes on
                    log.warning("libvirt event loop: %s", err)
                    time.sleep(0.1)

        _loop_thread = threading.Thread(target=run, name="libvirt-events", daemon=True)
        _loop_thread.start()


_UUID_RE = re.compile(r"^[0-9a-fA-F]{8}-?([0-9a-fA-F]{4}-?){3}[0-9a-fA-F]{12}$")


# ---------------------------------------------------------------------------- the adapter

Subscriber = Callable[[LifecycleEvent], None]


class Hypervisor:
    """One libvirt connection, its lifecycle events, and the domain operations we use.

    Args:
        uri: a libvirt URI; ``qemu:///embed?root=…`` for the embedded driver (prepare the root
            with :func:`host_agent.lifecycle.embedded.prepare_embedded_root` first).
        clock: monotonic clock stamped on events.

    Raises:
        EmbeddedRootBusy: the embedded root is held by another process (or this process holds
            another root).
        HypervisorError: any other failure to connect.
    """

    def __init__(self, uri: str, *, clock: Callable[[], float] = time.monotonic) -> None:
        start_event_loop()
        self.uri = uri
        self._clock = clock
        self._subscribers: list[Subscriber] = []
        self._sub_lock = threading.Lock()
        try:
            self._conn = libvirt.open(uri)
        except libvirt.libvirtError as err:
            raise _wrap(err, f"cannot connect to {uri}", None) from err
        try:
            self._callback_id: int | None = self._conn.domainEventRegisterAny(
                None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._on_lifecycle, None
            )
        except libvirt.libvirtError as err:
            self._conn.close()
            raise _wrap(err, "cannot register for lifecycle events", None) from err

    @property
    def embedded_root(self) -> Path | None:
        return embedded_root_of(self.uri)

    def close(self) -> None:
        """Deregister the event callback and close the connection. Idempotent."""
        conn = getattr(self, "_conn", None)
        if conn is None:
            return
        if self._callback_id is not None:
            try:
                conn.domainEventDeregisterAny(self._callback_id)
            except libvirt.libvirtError as err:
                log.debug("deregistering the lifecycle callback: %s", err)
            self._callback_id = None
        try:
            conn.close()
        except libvirt.libvirtError as err:
            log.debug("closing %s: %s", self.uri, err)
        self._conn = None

    def __enter__(self) -> Hypervisor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ events

    def subscribe(self, subscriber: Subscriber) -> Callable[[], None]:
        """Call ``subscriber`` with every lifecycle event of every domain on this connection.

        Subscribers run on the libvirt event thread, in subscription order; an exception in one
        is logged and does not reach the others.

        Returns:
            A function that unsubscribes.
        """
        with self._sub_lock:
            self._subscribers.append(subscriber)

        def unsubscribe() -> None:
            with self._sub_lock:
                if subscriber in self._subscribers:
                    self._subscribers.remove(subscriber)

        return unsubscribe

    def _on_lifecycle(
        self, _conn: Any, dom: libvirt.virDomain, event: int, detail: int, _opaque: Any
    ) -> None:
        kind = _EVENT_KINDS.get(event)
        if kind is None:
            log.debug("ignoring unknown lifecycle event %d", event)
            return
        try:
            ref = DomainRef(dom.name(), dom.UUIDString())
        except libvirt.libvirtError as err:  # pragma: no cover - the domain object carries both
            log.warning("lifecycle event for an unnamed domain: %s", err)
            return
        ev = LifecycleEvent(
            kind, _EVENT_DETAILS[kind].get(detail, f"unknown-{detail}"), ref, self._clock()
        )
        log.debug("libvirt event %s for %s", ev.name, ref.name)
        with self._sub_lock:
            subscribers = list(self._subscribers)
        for fn in subscribers:
            try:
                fn(ev)
            except Exception:
                log.exception("lifecycle subscriber %r failed on %s", fn, ev.name)

    # ------------------------------------------------------------------ plumbing

    def _c(self) -> libvirt.virConnect:
        if self._conn is None:
            raise HypervisorError(f"the connection to {self.uri} is closed")
        return self._conn

    def _call(self, what: str, vm: str | None, fn: Callable[..., T], *args: Any) -> T:
        try:
            return fn(*args)
        except libvirt.libvirtError as err:
            raise _wrap(err, what, vm) from err

    def _dom(self, vm: DomainRef | str) -> libvirt.virDomain:
        conn = self._c()
        if isinstance(vm, DomainRef):
            return self._call("lookup", vm.name, conn.lookupByUUIDString, vm.uuid)
        if _UUID_RE.match(vm):
            canonical = str(uuid_mod.UUID(vm))
            try:
                return conn.lookupByUUIDString(canonical)
            except libvirt.libvirtError as err:
                if err.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                    raise _wrap(err, "lookup", vm) from err
        return self._call("lookup", vm, conn.lookupByName, vm)

    @staticmethod
    def _ref(dom: libvirt.virDomain) -> DomainRef:
        return DomainRef(dom.name(), dom.UUIDString())

    # ------------------------------------------------------------------ queries

    def lookup(self, vm: DomainRef | str) -> DomainRef:
        """The domain named ``vm``, or with that UUID (a UUID is tried first).

        Raises:
            DomainNotFound: no such domain.
        """
        dom = self._dom(vm)
        return self._call("lookup", str(vm), self._ref, dom)

    def info(self, vm: DomainRef | str) -> DomainInfo:
        """Identity and run state of one domain.

        Raises:
            DomainNotFound, HypervisorError.
        """
        dom = self._dom(vm)
        return self._call("info", str(vm), self._info, dom)

    @staticmethod
    def _info(dom: libvirt.virDomain) -> DomainInfo:
        state = dom.state()[0]
        return DomainInfo(
            name=dom.name(),
            uuid=dom.UUIDString(),
            state=_STATES.get(state, DomainState.NOSTATE),
            active=bool(dom.isActive()),
            persistent=bool(dom.isPersistent()),
        )

    def domains(self) -> list[DomainInfo]:
        """Every domain (active and inactive), sorted by name."""
        doms = self._call("list domains", None, self._c().listAllDomains, 0)
        out: list[DomainInfo] = []
        for dom in doms:
            try:
                out.append(self._info(dom))
            except libvirt.libvirtError as err:
                if err.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:  # undefined meanwhile
                    raise _wrap(err, "list domains", None) from err
        return sorted(out, key=lambda d: d.name)

    def xml(self, vm: DomainRef | str, *, inactive: bool = False) -> str:
        """The domain's XML: live, or with ``inactive`` the persistent definition.

        Raises:
            DomainNotFound, HypervisorError.
        """
        dom = self._dom(vm)
        flags = libvirt.VIR_DOMAIN_XML_SECURE
        if inactive:
            flags |= libvirt.VIR_DOMAIN_XML_INACTIVE
        return str(self._call("get XML", str(vm), dom.XMLDesc, flags))

    def save_image_xml(self, path: Path) -> str:
        """The domain XML stored in a save image."""
        conn = self._c()
        return str(
            self._call(f"read save image {path}", None, conn.saveImageGetXMLDesc, str(path), 0)
        )

    # ------------------------------------------------------------------ operations

    def define(self, xml: str) -> DomainRef:
        """Define (or redefine) a persistent domain.

        Raises:
            HypervisorError: libvirt rejected the XML (code VIR_ERR_XML_ERROR …).
        """
        dom = self._call("define", None, self._c().defineXML, xml)
        return self._call("define", None, self._ref, dom)

    def undefine(self, vm: DomainRef | str, *, keep_tpm: bool = True) -> None:
        """Remove a persistent definition (a running domain becomes transient).

        ``keep_tpm`` keeps libvirt's own swtpm state (VIR_DOMAIN_UNDEFINE_KEEP_TPM). Snapshot and
        checkpoint *metadata* goes with the definition; their memory and disk files stay.
        """
        dom = self._dom(vm)
        flags = getattr(libvirt, "VIR_DOMAIN_UNDEFINE_KEEP_TPM", 0) if keep_tpm else 0
        flags |= (
            libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
            | libvirt.VIR_DOMAIN_UNDEFINE_NVRAM
            | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
            | libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA
        )
        self._call("undefine", str(vm), dom.undefineFlags, flags)

    def start(self, vm: DomainRef | str, *, paused: bool = False) -> None:
        """Boot a defined domain (``virDomainCreateWithFlags``)."""
        dom = self._dom(vm)
        flags = libvirt.VIR_DOMAIN_START_PAUSED if paused else 0
        self._call("start", str(vm), dom.createWithFlags, flags)

    def destroy(self, vm: DomainRef | str) -> None:
        """Stop a domain at once (power cut). A domain already stopped is not an error."""
        dom = self._dom(vm)
        try:
            dom.destroy()
        except libvirt.libvirtError as err:
            if err.get_error_code() == libvirt.VIR_ERR_OPERATION_INVALID and not dom.isActive():
                return
            raise _wrap(err, "destroy", str(vm)) from err

    def shutdown(self, vm: DomainRef | str) -> None:
        """Ask the guest to power off (ACPI); returns before it has."""
        dom = self._dom(vm)
        self._call("shutdown", str(vm), dom.shutdown)

    def suspend(self, vm: DomainRef | str) -> None:
        dom = self._dom(vm)
        self._call("suspend", str(vm), dom.suspend)

    def resume(self, vm: DomainRef | str) -> None:
        dom = self._dom(vm)
        self._call("resume", str(vm), dom.resume)

    def save(self, vm: DomainRef | str, path: Path, *, paused: bool = False) -> None:
        """Save the running domain's state to ``path``; the domain stops."""
        dom = self._dom(vm)
        flags = libvirt.VIR_DOMAIN_SAVE_PAUSED if paused else 0
        self._call("save", str(vm), dom.saveFlags, str(path), None, flags)

    def restore(self, path: Path, *, paused: bool = False, xml: str | None = None) -> DomainRef:
        """Start a domain from a save image.

        Returns:
            The restored domain.
        """
        conn = self._c()
        flags = libvirt.VIR_DOMAIN_SAVE_PAUSED if paused else 0
        image_xml = xml if xml is not None else self.save_image_xml(path)
        self._call(f"restore {path}", None, conn.restoreFlags, str(path), xml, flags)
        match = re.search(r"<uuid>\s*([0-9a-fA-F-]{32,36})\s*</uuid>", image_xml)
        if match is None:
            raise HypervisorError(f"restore {path}: the image's XML has no <uuid>")
        return self.lookup(match.group(1))

    def core_dump(self, vm: DomainRef | str, path: Path) -> None:
        """Guest memory as an ELF file (memory only, raw format); the domain keeps running."""
        dom = self._dom(vm)
        self._call(
            "core dump",
            str(vm),
            dom.coreDumpWithFormat,
            str(path),
            libvirt.VIR_DOMAIN_CORE_DUMP_FORMAT_RAW,
            libvirt.VIR_DUMP_MEMORY_ONLY,
        )

    def snapshot(self, vm: DomainRef | str, name: str, *, memory_file: Path) -> str:
        """An external-memory snapshot named ``name`` (the domain keeps running).

        libvirt 9.0 cannot revert to external snapshots (platform-notes §7).

        Returns:
            The snapshot's name.
        """
        if not re.fullmatch(r"[A-Za-z0-9._-]+", name):
            raise ValueError(f"snapshot name must be letters, digits and ._-, got {name!r}")
        dom = self._dom(vm)
        xml = (
            f"<domainsnapshot><name>{name}</name>"
            f"<memory snapshot='external' file='{memory_file}'/></domainsnapshot>"
        )
        snap = self._call("snapshot", str(vm), dom.snapshotCreateXML, xml, 0)
        return str(self._call("snapshot", str(vm), snap.getName))

    def snapshot_xml(self, vm: DomainRef | str, name: str) -> str:
        """The XML of snapshot ``name`` of a domain.

        Raises:
            HypervisorError: no such snapshot (code VIR_ERR_NO_DOMAIN_SNAPSHOT) or domain.
        """
        dom = self._dom(vm)
        snap = self._call(f"snapshot {name}", str(vm), dom.snapshotLookupByName, name, 0)
        return str(self._call(f"snapshot {name}", str(vm), snap.getXMLDesc, 0))

    def snapshot_memory_file(self, vm: DomainRef | str, name: str) -> Path | None:
        """The external memory file of snapshot ``name``; None for a snapshot without one."""
        import xml.etree.ElementTree as ET

        tree = ET.fromstring(self.snapshot_xml(vm, name))
        mem = tree.find("memory")
        if mem is None or mem.get("snapshot") != "external" or not mem.get("file"):
            return None
        return Path(str(mem.get("file")))

    def migrate(
        self,
        vm: DomainRef | str,
        dest_uri: str,
        *,
        migrate_uri: str | None = None,
        dest_xml: str | None = None,
        live: bool = True,
        persist: bool = True,
    ) -> None:
        """Peer-to-peer migration of a running domain to the libvirtd at ``dest_uri``.

        This daemon connects to the destination's libvirtd itself (``VIR_MIGRATE_PEER2PEER``);
        ``migrate_uri`` (e.g. ``tcp://10.0.0.2``) is where the destination QEMU listens for the
        stream, ``dest_xml`` an ABI-compatible definition for the destination. With ``persist``
        the domain is defined on the destination and undefined here. Returns when libvirt's
        migration ended.

        Raises:
            DomainNotFound; HypervisorError: libvirt failed the migration (the domain then
                runs here again, as libvirt leaves it).
        """
        dom = self._dom(vm)
        flags = libvirt.VIR_MIGRATE_PEER2PEER
        if live:
            flags |= libvirt.VIR_MIGRATE_LIVE
        if persist:
            flags |= libvirt.VIR_MIGRATE_PERSIST_DEST | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE
        params: dict[str, Any] = {}
        if migrate_uri:
            params[libvirt.VIR_MIGRATE_PARAM_URI] = migrate_uri
        if dest_xml:
            params[libvirt.VIR_MIGRATE_PARAM_DEST_XML] = dest_xml
        self._call(f"migrate to {dest_uri}", str(vm), dom.migrateToURI3, dest_uri, params, flags)

    def abort_job(self, vm: DomainRef | str) -> None:
        """Cancel the domain's running job (a migration); no job is not an error."""
        dom = self._dom(vm)
        try:
            dom.abortJob()
        except libvirt.libvirtError as err:
            if err.get_error_code() == libvirt.VIR_ERR_OPERATION_INVALID:
                return
            raise _wrap(err, "abort job", str(vm)) from err

    def pid(self, vm: DomainRef | str) -> int | None:
        """QEMU's pid from the embedded root's pid file (None when not running or not known)."""
        root = self.embedded_root
        if root is None:
            return None
        ref = self.lookup(vm)
        try:
            text = (root / "run" / "qemu" / f"{ref.name}.pid").read_text().strip()
        except OSError:
            return None
        return int(text) if text.isdigit() else None
