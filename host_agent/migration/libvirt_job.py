"""The source's view of a libvirt migration someone else started (a plain ``virsh migrate``).

A pull (:mod:`.hook`) joins a migration that libvirt runs already; the source cannot wait for
``migrateToURI3`` to return as it does when it starts libvirt itself, so it polls the domain on
its own libvirt: while the domain has an outgoing migration job the migration runs; when the
job is gone, the domain gone or shut off with reason *migrated* is a migration that finished,
and a domain that runs (or is paused, crashed …) here again is one that failed.

The same reading tells a source's recovery where a VM migration it journalled as MOVING left
the VM (:func:`vm_placement`): moved (commit), here (abort), or not known yet (ask again).

Only query calls (``virDomainGetJobStats``, ``virDomainGetState``): libvirt allows them while
its migration job holds the domain, so the poll never waits on the migration it watches.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Literal

import libvirt

from .errors import MigrationError

__all__ = ["LibvirtJobFailed", "migration_job_active", "vm_placement", "wait_migration_job"]


class LibvirtJobFailed(MigrationError):
    """libvirt's migration of the VM ended without moving it (it stays on the source)."""

    id = "migration.libvirt_failed"


def _open(uri: str) -> libvirt.virConnect:
    try:
        return libvirt.open(uri)
    except libvirt.libvirtError as err:
        raise MigrationError(f"cannot open libvirt at {uri}: {err}") from err


def _job(dom: libvirt.virDomain) -> tuple[bool, int | None]:
    """(an outgoing migration job is running, the job's operation)."""
    stats = dom.jobStats()
    running = stats.get("type", libvirt.VIR_DOMAIN_JOB_NONE) in (
        libvirt.VIR_DOMAIN_JOB_BOUNDED,
        libvirt.VIR_DOMAIN_JOB_UNBOUNDED,
    )
    operation = stats.get("operation")
    return running and operation == libvirt.VIR_DOMAIN_JOB_OPERATION_MIGRATION_OUT, operation


def migration_job_active(uri: str, vm_uuid: uuid.UUID) -> bool | None:
    """Whether libvirt at ``uri`` migrates the domain ``vm_uuid`` out right now; None when
    libvirt there has no such domain.

    Raises:
        MigrationError: libvirt cannot be reached, or refused the query.
    """
    conn = _open(uri)
    try:
        try:
            dom = conn.lookupByUUIDString(str(vm_uuid))
        except libvirt.libvirtError as err:
            if err.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return None
            raise
        return _job(dom)[0]
    except libvirt.libvirtError as err:
        raise MigrationError(f"libvirt at {uri}: cannot read VM {vm_uuid}'s job: {err}") from err
    finally:
        conn.close()


_STATE_NAMES = {
    libvirt.VIR_DOMAIN_RUNNING: "running",
    libvirt.VIR_DOMAIN_PAUSED: "paused",
    libvirt.VIR_DOMAIN_SHUTOFF: "shut off",
    libvirt.VIR_DOMAIN_CRASHED: "crashed",
}


def wait_migration_job(
    uri: str,
    vm_uuid: uuid.UUID,
    *,
    timeout: float,
    poll: float = 0.2,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """Until libvirt's outgoing migration of ``vm_uuid`` ended; returns if it moved the VM.

    Raises:
        LibvirtJobFailed: the job ended and the VM is still here (running, paused …), or did
            not end within ``timeout`` seconds.
        MigrationError: libvirt cannot be reached.
    """
    deadline = clock() + timeout
    conn = _open(uri)
    try:
        while True:
            try:
                dom = conn.lookupByUUIDString(str(vm_uuid))
                # The job first, then the state: once the job ended, the state is final. Job
                # stats are asked of an active domain only (libvirt refuses an inactive one).
                running = bool(dom.isActive()) and _job(dom)[0]
                if not running:
                    state, reason = dom.state()
            except libvirt.libvirtError as err:
                code = err.get_error_code()
                if code == libvirt.VIR_ERR_NO_DOMAIN:
                    return  # a transient domain leaves the source when it migrated
                if code == libvirt.VIR_ERR_OPERATION_INVALID and clock() < deadline:
                    sleep(poll)  # it stopped between two calls: look again
                    continue
                raise MigrationError(f"libvirt at {uri}: VM {vm_uuid}: {err}") from err
            if not running:
                if state == libvirt.VIR_DOMAIN_SHUTOFF and (
                    reason == libvirt.VIR_DOMAIN_SHUTOFF_MIGRATED
                ):
                    return
                name = _STATE_NAMES.get(state, f"state {state}")
                raise LibvirtJobFailed(
                    f"libvirt's migration of VM {vm_uuid} ended and the VM is {name} here "
                    f"(reason {reason}): it did not move"
                )
            if clock() > deadline:
                raise LibvirtJobFailed(
                    f"libvirt's migration of VM {vm_uuid} did not end within {timeout:g} s"
                )
            sleep(poll)
    finally:
        conn.close()


Placement = Literal["moved", "here", "unknown"]


def vm_placement(uri: str, vm_uuid: uuid.UUID) -> tuple[Placement, str]:
    """Where libvirt at ``uri`` (the source's) says ``vm_uuid`` is, and why; never raises.

    ``moved``: libvirt's outgoing migration of it completed (the domain is gone, as a migrated
    transient or ``--undefinesource`` domain is, or shut off with reason *migrated*); ``here``:
    no migration job and the domain is still here (running, paused, crashed, shut off for
    another reason): it did not move; ``unknown``: an outgoing migration job still runs, or
    libvirt cannot be reached or refused the query (ask again later, never guess).
    """
    try:
        conn = libvirt.open(uri)
    except libvirt.libvirtError as err:
        return "unknown", f"libvirt at {uri} cannot be reached: {err}"
    try:
        try:
            dom = conn.lookupByUUIDString(str(vm_uuid))
            running = bool(dom.isActive()) and _job(dom)[0]
            state, reason = (0, 0) if running else dom.state()
        except libvirt.libvirtError as err:
            if err.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return "moved", f"libvirt at {uri} has no domain {vm_uuid} any more"
            return "unknown", f"libvirt at {uri}: VM {vm_uuid}: {err}"
        if running:
            return "unknown", f"libvirt at {uri} still migrates VM {vm_uuid} out"
        name = _STATE_NAMES.get(state, f"state {state}")
        if state == libvirt.VIR_DOMAIN_SHUTOFF and reason == libvirt.VIR_DOMAIN_SHUTOFF_MIGRATED:
            return "moved", f"VM {vm_uuid} is {name} (migrated) at {uri}"
        return "here", f"VM {vm_uuid} is {name} (reason {reason}) at {uri}, no migration job"
    finally:
        conn.close()
