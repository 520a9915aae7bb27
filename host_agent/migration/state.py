"""Whether a VM's vAIK may sign on this host: the query the attestation service must ask.

A vAIK lives in the store as ``vaik/<vm uuid>`` (``{"generation", "key", …}``, written by
enrollment). Migration adds a ``state`` field; a record without one is ``active``::

    active    signs here (the only state that does)
    moving    source, between "duplicated to the target" and the commit/abort decision
    pending   target, imported under the ExgKey, waiting for the source's commit

Invariant 2 (a vAIK signs on at most one host at any moment) holds because every signer asks
:func:`signing_allowed` (or :func:`require_signing_allowed`) right before ``HostTpm.sign``, and
the migration journal moves the state in the same store transaction as each journal step.
"""

from __future__ import annotations

import enum
import uuid
from typing import Any, ClassVar, Protocol

from evidence.errors import VtpmError

__all__ = [
    "VaikNotSignable",
    "VaikState",
    "require_signing_allowed",
    "signing_allowed",
    "vaik_state",
]


class VaikState(enum.Enum):
    ACTIVE = "active"
    MOVING = "moving"
    PENDING = "pending"
    ABSENT = "absent"


class VaikNotSignable(VtpmError):
    """The VM's vAIK may not sign on this host now (moving away, pending arrival, or absent)."""

    id: ClassVar[str] = "attest.vaik_not_signable"

    def __init__(self, vm_uuid: uuid.UUID | str, state: VaikState) -> None:
        self.vm_uuid = str(vm_uuid)
        self.state = state
        why = {
            VaikState.MOVING: "it is being migrated away from this host",
            VaikState.PENDING: "it arrived by migration and the source has not committed yet",
            VaikState.ABSENT: "this host holds no vAIK for it",
            VaikState.ACTIVE: "",
        }[state]
        super().__init__(f"the vAIK of VM {vm_uuid} may not sign here: {why}")


class _Records(Protocol):
    def find(self, record_type: str, record_id: str) -> Any: ...


def vaik_state(store: _Records, vm_uuid: uuid.UUID | str) -> VaikState:
    """The migration state of ``vm_uuid``'s vAIK in ``store``."""
    record = store.find("vaik", str(vm_uuid))
    if record is None:
        return VaikState.ABSENT
    value = record.json().get("state", "active")
    try:
        return VaikState(value)
    except ValueError:
        return VaikState.MOVING  # unknown: never sign on a state we do not understand


def signing_allowed(store: _Records, vm_uuid: uuid.UUID | str) -> bool:
    """True only when the vAIK is present here and ``active``."""
    return vaik_state(store, vm_uuid) is VaikState.ACTIVE


def require_signing_allowed(store: _Records, vm_uuid: uuid.UUID | str) -> None:
    """Raise :class:`VaikNotSignable` unless :func:`signing_allowed`."""
    state = vaik_state(store, vm_uuid)
    if state is not VaikState.ACTIVE:
        raise VaikNotSignable(vm_uuid, state)
