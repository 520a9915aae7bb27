"""Protocol steps (3)/(4): the record the source signs with the vAIK at the VM's final stop.

The source sends, after the target imported the vAIK and before the commit point, a record of
what the target must find before the VM runs: the Merkle root of the guest memory *as the
migration stream carried it* (docs/NOTES.md: the source memfd can differ from the stream by a
few pages after a live migration; the destination always equals the stream), the vPCRs, and the
digests of the vTPM state blobs. The vAIK signs it (TPM2_Sign; the message starts with a
domain-separation prefix, never with TPM_GENERATED_VALUE). The target verifies the signature
with the public key of the vAIK it imported, then hands the record to its check (the restore
hook compares loaded memory and vPCRs before the VM runs); a veto makes the source abort, so it
keeps the VM and the vAIK.

Pure: encode/parse and verify take bytes and return values or raise.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Final

from evidence.errors import SignatureError, VtpmError
from evidence.tpm2 import TpmtPublic, TpmtSignature, verify_signature

from .errors import FrameError, MigrationError

__all__ = [
    "RECORD_PREFIX",
    "MigrationRecord",
    "RecordRefused",
    "encode_record",
    "parse_record",
    "verify_record",
]

RECORD_PREFIX: Final = b"vtpm-trust/migration-record/1\n"


class RecordRefused(MigrationError):
    """The target refuses the VM's state: bad signature, or loaded memory/vPCRs differ."""

    id: ClassVar[str] = "migration.record.refused"


@dataclass(frozen=True)
class MigrationRecord:
    """What the target must find before the VM runs.

    Attributes:
        migration_id, vm_uuid: which migration and VM (the signature covers both).
        memory_root: SHA-256 Merkle root of the memory the migration stream carried.
        vpcrs: sha256 vPCR index → value at the final stop.
        state_digests: vTPM state blob name (``permanent``, ``volatile``, ``savestate``) →
            SHA-256 of the blob the source handed QEMU.
    """

    migration_id: uuid.UUID
    vm_uuid: uuid.UUID
    memory_root: bytes
    vpcrs: Mapping[int, bytes] = field(default_factory=dict)
    state_digests: Mapping[str, bytes] = field(default_factory=dict)

    def differences(self, other: MigrationRecord) -> list[str]:
        """What differs from ``other`` (what the target found), as readable items."""
        out = []
        if self.memory_root != other.memory_root:
            out.append(f"memory root {self.memory_root.hex()} ≠ {other.memory_root.hex()}")
        for i in sorted(set(self.vpcrs) | set(other.vpcrs)):
            if self.vpcrs.get(i) != other.vpcrs.get(i):
                out.append(f"vPCR {i}")
        for name in sorted(set(self.state_digests) | set(other.state_digests)):
            if self.state_digests.get(name) != other.state_digests.get(name):
                out.append(f"vTPM state {name}")
        return out


def encode_record(record: MigrationRecord) -> bytes:
    """``RECORD_PREFIX ‖ canonical JSON`` (what the vAIK signs)."""
    body: dict[str, Any] = {
        "migration_id": str(record.migration_id),
        "vm_uuid": str(record.vm_uuid),
        "memory_root": record.memory_root.hex(),
        "vpcrs": {str(i): v.hex() for i, v in sorted(record.vpcrs.items())},
        "state_digests": {k: v.hex() for k, v in sorted(record.state_digests.items())},
    }
    return RECORD_PREFIX + json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def parse_record(data: bytes) -> MigrationRecord:
    """Inverse of :func:`encode_record`, strict (re-encoding must give the same bytes).

    Raises:
        FrameError: anything else.
    """
    if not data.startswith(RECORD_PREFIX):
        raise FrameError("migration record", 0, "the vtpm-trust/migration-record/1 prefix")
    try:
        obj = json.loads(data[len(RECORD_PREFIX) :].decode("utf-8"))
        record = MigrationRecord(
            uuid.UUID(obj["migration_id"]),
            uuid.UUID(obj["vm_uuid"]),
            bytes.fromhex(obj["memory_root"]),
            {int(i): bytes.fromhex(v) for i, v in obj["vpcrs"].items()},
            {str(k): bytes.fromhex(v) for k, v in obj["state_digests"].items()},
        )
    except (UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise FrameError("migration record", len(RECORD_PREFIX), "the record fields") from err
    if encode_record(record) != data:
        raise FrameError("migration record", len(RECORD_PREFIX), "canonical JSON")
    return record


def verify_record(
    data: bytes, signature: bytes, vaik_public: bytes, *, migration_id: uuid.UUID
) -> MigrationRecord:
    """Check the record's vAIK signature and that it is this migration's.

    The caller must already trust ``vaik_public`` (the key it imported from the duplication
    blob, whose Name the source journalled). Checks, in order: the record parses; it names
    ``migration_id``; the TPM2_Sign signature verifies under the vAIK.

    Raises:
        RecordRefused: any check failed.
    """
    try:
        record = parse_record(data)
    except FrameError as err:
        raise RecordRefused(f"the migration record does not parse: {err}") from err
    if record.migration_id != migration_id:
        raise RecordRefused(
            f"the record is for migration {record.migration_id}, not {migration_id}"
        )
    try:
        verify_signature(
            data, TpmtSignature.unmarshal(signature), TpmtPublic.unmarshal(vaik_public)
        )
    except (SignatureError, VtpmError) as err:
        raise RecordRefused(f"the record is not signed by the VM's vAIK: {err}") from err
    return record
