"""What one host brings to a migration: its TPM, store, journal, identity and fleet trust."""

from __future__ import annotations

import secrets
import threading
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from evidence.errors import SignatureError
from evidence.tpm2 import TpmtPublic, public_key
from evidence.tpm2_policy import PolicyApproval, verify_policy_approval
from host_agent.tpm.port import HostTpm, KeyPolicy

from .channel import TlsIdentity
from .journal import Journal, StoreJournal
from .record import MigrationRecord

__all__ = ["MigrationHost", "approved_sign_policies", "load_identity_certificates"]


def _pem_certs_to_der(path: Path) -> list[bytes]:
    certs = x509.load_pem_x509_certificates(path.read_bytes())
    return [c.public_bytes(serialization.Encoding.DER) for c in certs]


def load_identity_certificates(state_dir: Path) -> tuple[list[bytes], bytes]:
    """(fleet CA certificates, AIK certificate), DER, from ``<state_dir>/identity``."""
    d = Path(state_dir) / "identity"
    return _pem_certs_to_der(d / "ca.pem"), _pem_certs_to_der(d / "aik.pem")[0]


def approved_sign_policies(
    approvals: Sequence[PolicyApproval], policy: KeyPolicy
) -> frozenset[bytes]:
    """The sign policies in ``approvals`` that the vAIK's own fleet key signed for its policyRef.

    The fleet key is the one bound into the vAIK's authPolicy (``policy.fleet_key``), so an
    approval counts only if the TPM would accept it for this very key.
    """
    if policy.fleet_key is None:
        return frozenset()
    fleet = public_key(TpmtPublic.unmarshal(policy.fleet_key))
    out = set()
    for approval in approvals:
        if approval.policy_ref != policy.policy_ref:
            continue
        try:
            verify_policy_approval(approval, fleet)  # type: ignore[arg-type]
        except (SignatureError, ValueError):
            continue
        out.add(approval.approved_policy)
    return frozenset(out)


@dataclass
class MigrationHost:
    """One host's side of migrations.

    Attributes:
        tpm: the host TPM.
        store: the trusted store (``vaik``, ``binding`` and ``journal`` records).
        identity: the mTLS identity and fleet CA (``<state>/identity``).
        host_id: this host's id (its certificates' CN).
        fleet_ca: fleet CA certificates (DER), the trust anchor for targets' AIK certificates.
        aik_certificate: this host's AIK certificate (DER), sent as a target.
        approvals: the fleet's policy approvals (``GET /v1/policy-approvals``), read per
            migration; only those signed by a vAIK's own fleet key count.
        advertise: ``HOST:PORT`` where this host takes outcome queries (its listener).
        journal: the journal port (default: in ``store``).
        now, random_bytes: clock and randomness (the edge supplies the real ones).
        live: migrations a session of this process is running right now (the resolver leaves
            them alone).
        record_source: source, steps (3)/(4): ``(migration_id, vm_uuid) → MigrationRecord`` at
            the VM's final stop (the outgoing GET_STATEBLOB hook); None: no record is sent.
        record_check: target: raise ``RecordRefused`` unless the loaded VM matches the
            (signature-checked) record (the incoming SET_STATEBLOB hook); None: accept.
        prepare_incoming: target: get the VM ready for its incoming QEMU (arm its swtpm and
            bridge), called on the Offer before anything is created; raising refuses it.
        end_incoming: target: ``(vm_uuid, "commit" | "abort")`` when the incoming migration
            ended (release what ``prepare_incoming`` made after an abort); must not raise.
        vm_placement: source: VM → where this host's libvirt says it is (``"moved"``,
            ``"here"`` or ``"unknown"``, and why; ``libvirt_job.vm_placement``), asked by
            recovery about a VM migration left MOVING; None: such an entry is aborted.
        pull_handler: source: ``(channel, Pull)`` runs the migration a target asked for (a
            plain ``virsh migrate``) on that connection, or raises to refuse it; None: every
            pull is refused (only the daemon's component moves running VMs).
    """

    tpm: HostTpm
    store: Any
    identity: TlsIdentity
    host_id: str
    fleet_ca: list[bytes]
    aik_certificate: bytes
    approvals: Callable[[], Sequence[PolicyApproval]]
    advertise: str = ""
    journal: Journal | None = None
    now: Callable[[], datetime] = field(default=lambda: datetime.now(UTC))
    random_bytes: Callable[[int], bytes] = secrets.token_bytes
    live: set[uuid.UUID] = field(default_factory=set)
    lock: threading.RLock = field(default_factory=threading.RLock)
    timeout: float = 60.0
    record_source: Callable[[uuid.UUID, uuid.UUID], MigrationRecord] | None = None
    record_check: Callable[[MigrationRecord], None] | None = None
    prepare_incoming: Callable[[uuid.UUID], None] | None = None
    end_incoming: Callable[[uuid.UUID, str], None] | None = None
    vm_placement: Callable[[uuid.UUID], tuple[str, str]] | None = None
    pull_handler: Callable[[Any, Any], None] | None = None

    def __post_init__(self) -> None:
        if self.journal is None:
            self.journal = StoreJournal(self.store)

    @property
    def j(self) -> Journal:
        assert self.journal is not None
        return self.journal
