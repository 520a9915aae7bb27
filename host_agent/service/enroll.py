"""Tenant enrollment (patent 2-1): prove possession of cert_user, get the VM's vAIK bound to you.

Flow (HTTPS, :class:`EnrollmentServer`; JSON bodies, binary fields standard base64)::

    POST /v1/enroll/challenge  {"vm_uuid"}                      → {"challenge", "expires_in"}
    POST /v1/enroll            {"vm_uuid", "cert_user", "nonce", "challenge", "signature"}
                                                                 → the enrollment (below)

``signature`` is made with cert_user's private key over ``nonce ‖ VM UUID (16 bytes) ‖
challenge`` (ECDSA with SHA-256, RSA PKCS#1 v1.5 with SHA-256, or Ed25519), so it proves
possession now, for this VM, on this host. A challenge is single-use and expires.

What :meth:`EnrollmentService.enroll` then does, in order:

1. the challenge is one this host issued for this VM, unused and unexpired;
2. cert_user parses, is valid now, and the signature verifies with its key;
3. the operator's :class:`OwnerPolicy` lets this certificate (by SHA-256 fingerprint of its
   DER) own this VM — from the libvirt domain metadata
   (``<metadata><vtpm:owner xmlns:vtpm="https://vtpm-trust/ns/1" fingerprint="sha256:…"/>``)
   or a policy file (:class:`PolicyFileOwners`);
4. the VM runs (its bridge is connected): the binding records the vTPM boot it was made in;
5. the vAIK: the VM's existing one when the same tenant authenticates again (after a reboot),
   else a new one (first enrollment, or another tenant: a new generation, the old key is
   deleted). AuthKey is the host's, made once by ``vtpm-host init``;
6. one store transaction writes ``vaik/<uuid>`` (the wrapped key and its generation) and
   ``binding/<uuid>`` (cert_user, generation, the vAIK's Name, the boot marker, active);
7. answer: CertvAIK and CertAuthKey over ``SHA-256(cert_user ‖ nonce)``, the AIK certificate
   chain, both TPMT_PUBLIC, and the platform facts the tenant pins (AuthKey's policy, the
   fleet policy key Name).

Reboots. A binding is *active* only in the vTPM boot it was made in (ARCHITECTURE.md §3: after a
reboot the binding returns only when the tenant authenticates again). The bridge does not report
resets as events; what it offers is its ``status`` counters (``ctrl_commands`` per control
command, ``sessions``) and its pid. :func:`boot_transition` reads a reset from them: another
CMD_INIT in the same QEMU session is a guest reboot; a new session that starts without
SET_STATEBLOB is a cold boot; a new session that starts with SET_STATEBLOB and exactly one INIT
is a restore (the same boot continues, the daemon's restore path having checked the sealed
state). Nothing is judged while the vTPM is not running (QEMU gone, a restore half done).
:meth:`EnrollmentService.check_boots` (polled) and every attestation deactivate a binding whose
VM was reset, and so does the start of every save (``attest.AttestService`` checks the binding
on the first GET_STATEBLOB), so a reboot just before a save is recorded before the state leaves.
What the bridge could add so that no poll is needed: a ``boot`` event on every CMD_INIT not
preceded by SET_STATEBLOB, or a ``read_clock`` op (TPM2_ReadClock's resetCount, which a restore
brings back and a reboot increments).

Clones and rollback. Bindings are keyed by VM UUID, so a clone (another UUID) has none; they live
in the trusted store (rollback-protected), never in the swtpm state, so restoring an older VM
state cannot bring back an older vAIK or binding.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import http.server
import json
import logging
import secrets
import ssl
import threading
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar, Final, Literal, Protocol

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

from evidence.errors import VtpmError
from host_agent.service.attest import ActiveBinding, AttestRefused
from host_agent.tpm.port import HostTpm, WrappedKey

__all__ = [
    "OWNER_NS",
    "BootMarker",
    "BootMarkerSource",
    "BridgeBootMarkers",
    "DomainMetadataOwners",
    "EnrollmentError",
    "EnrollmentServer",
    "EnrollmentService",
    "OwnerPolicy",
    "PolicyFileOwners",
    "boot_transition",
    "enrollment_message",
    "fingerprint",
    "owners_from_domain_xml",
]

log = logging.getLogger("host_agent.service.enroll")

OWNER_NS: Final = "https://vtpm-trust/ns/1"
CHALLENGE_TTL: Final = 120.0
MAX_BODY: Final = 64 * 1024


class EnrollmentError(VtpmError):
    """An enrollment refused; ``error_id`` is stable API (HTTP ``{"error": {"id"}}``)."""

    id: ClassVar[str] = "enroll.refused"

    def __init__(self, message: str, error_id: str, status: int = 403) -> None:
        super().__init__(message)
        self.error_id = error_id
        self.status = status


def fingerprint(cert_der: bytes) -> str:
    """``sha256:<hex>`` of a certificate's DER (how owner policies name tenants)."""
    return "sha256:" + hashlib.sha256(cert_der).hexdigest()


def enrollment_message(nonce: bytes, vm_uuid: uuid.UUID, challenge: bytes) -> bytes:
    """What the tenant signs: ``nonce ‖ VM UUID (RFC 4122 bytes) ‖ host challenge``."""
    return nonce + vm_uuid.bytes + challenge


# --------------------------------------------------------------------------------------------
# Owner policy


class OwnerPolicy(Protocol):
    def owners(self, vm_uuid: uuid.UUID) -> frozenset[str]:
        """Fingerprints (``sha256:<hex>``) of the certificates that may own ``vm_uuid``."""
        ...


def owners_from_domain_xml(xml: str) -> frozenset[str]:
    """The ``vtpm:owner`` fingerprints in a libvirt domain's ``<metadata>``.

    Raises:
        EnrollmentError: the XML does not parse (``enroll.policy.bad_metadata``).
    """
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as err:
        raise EnrollmentError(f"domain XML: {err}", "enroll.policy.bad_metadata", 500) from err
    out = set()
    for meta in root.findall("metadata"):
        for owner in meta.iter(f"{{{OWNER_NS}}}owner"):
            fp = (owner.get("fingerprint") or "").strip().lower()
            if fp.startswith("sha256:") and len(fp) == 7 + 64:
                out.add(fp)
    return frozenset(out)


class DomainMetadataOwners:
    """Owners from libvirt domain metadata; ``domain_xml(uuid)`` returns the XML or None."""

    def __init__(self, domain_xml: Callable[[uuid.UUID], str | None]) -> None:
        self.domain_xml = domain_xml

    def owners(self, vm_uuid: uuid.UUID) -> frozenset[str]:
        xml = self.domain_xml(vm_uuid)
        return frozenset() if xml is None else owners_from_domain_xml(xml)


class PolicyFileOwners:
    """Owners from a JSON file, re-read when it changes::

    {"format": "vtpm-trust/owners/1", "vms": {"<uuid>": ["sha256:<hex>", ...]}}
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._cache: tuple[float, dict[uuid.UUID, frozenset[str]]] | None = None

    def _load(self) -> dict[uuid.UUID, frozenset[str]]:
        try:
            mtime = self.path.stat().st_mtime
            if self._cache is not None and self._cache[0] == mtime:
                return self._cache[1]
            obj = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise EnrollmentError(
                f"owner policy {self.path}: {err}", "enroll.policy.bad_file", 500
            ) from err
        if not isinstance(obj, dict) or obj.get("format") != "vtpm-trust/owners/1":
            raise EnrollmentError(
                f"owner policy {self.path}: format is not vtpm-trust/owners/1",
                "enroll.policy.bad_file",
                500,
            )
        table: dict[uuid.UUID, frozenset[str]] = {}
        try:
            for key, fps in dict(obj.get("vms", {})).items():
                table[uuid.UUID(key)] = frozenset(str(f).lower() for f in fps)
        except (TypeError, ValueError) as err:
            raise EnrollmentError(
                f"owner policy {self.path}: {err}", "enroll.policy.bad_file", 500
            ) from err
        self._cache = (mtime, table)
        return table

    def owners(self, vm_uuid: uuid.UUID) -> frozenset[str]:
        return self._load().get(vm_uuid, frozenset())


# --------------------------------------------------------------------------------------------
# Boots


@dataclass(frozen=True)
class BootMarker:
    """Where a VM's vTPM is in its life, as its bridge's counters show it.

    ``running``: the TPM is initialised and QEMU attached now (the bridge's ``status.tpm``); the
    counters are judged only then (a restore in progress has a new session but no INIT yet).
    """

    bridge_pid: int
    sessions: int
    inits: int
    set_stateblobs: int
    running: bool = True

    def to_json(self) -> dict[str, int]:
        return {
            "bridge_pid": self.bridge_pid,
            "sessions": self.sessions,
            "inits": self.inits,
            "set_stateblobs": self.set_stateblobs,
        }

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> BootMarker:
        return cls(
            int(obj["bridge_pid"]),
            int(obj["sessions"]),
            int(obj["inits"]),
            int(obj["set_stateblobs"]),
        )


def boot_transition(
    then: BootMarker, now: BootMarker
) -> Literal["same", "restored", "reset", "starting"]:
    """What happened to the vTPM between two markers (rules in the module docstring).

    ``restored``: the boot of ``then`` continues after a restore (or an incoming migration);
    ``reset``: a reboot, a cold boot, or anything these counters cannot tell from one;
    ``starting``: no judgement yet, the TPM is not running now (QEMU gone, or a restore or boot
    in progress): attest nothing, deactivate nothing.
    """
    if not now.running:
        return "starting"
    if now.bridge_pid == then.bridge_pid:
        new_sessions = now.sessions - then.sessions
        new_inits = now.inits - then.inits
        if new_sessions == 0:
            return "same" if new_inits == 0 else "reset"
        if new_sessions == 1 and new_inits == 1 and now.set_stateblobs > then.set_stateblobs:
            return "restored"
        return "reset"
    # another bridge (one per QEMU process): its whole life must be one restore
    if now.sessions == 1 and now.inits == 1 and now.set_stateblobs > 0:
        return "restored"
    return "reset"


class BootMarkerSource(Protocol):
    def boot_marker(self, vm_uuid: uuid.UUID) -> BootMarker | None:
        """The VM's marker now, or None when its bridge is not connected (VM not running)."""
        ...


class BridgeBootMarkers:
    """Boot markers from the bridges connected to a hooks server (``HooksServer``)."""

    def __init__(self, hooks: Any, timeout: float = 2.0) -> None:
        self.hooks = hooks
        self.timeout = timeout

    def boot_marker(self, vm_uuid: uuid.UUID) -> BootMarker | None:
        hello = self.hooks.bridges().get(str(vm_uuid))
        if hello is None:
            return None
        try:
            status = self.hooks.call(str(vm_uuid), "status", timeout=self.timeout)
        except VtpmError:
            return None
        stats = status.get("stats", {})
        ctrl = stats.get("ctrl_commands", {})
        return BootMarker(
            bridge_pid=int(hello.pid),
            sessions=int(stats.get("sessions", 0)),
            inits=int(ctrl.get("CMD_INIT", 0)),
            set_stateblobs=int(ctrl.get("CMD_SET_STATEBLOB", 0)),
            running=status.get("tpm") == "running" and bool(status.get("data_channel")),
        )


# --------------------------------------------------------------------------------------------
# The service


class RecordStore(Protocol):
    """What this module needs of ``host_agent.store.TrustedStore``."""

    def find(self, record_type: str, record_id: str) -> Any: ...

    def transaction(self) -> Any: ...

    def record_ids(self, record_type: str) -> list[str]: ...


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(value: object, what: str, lo: int = 1, hi: int = 1 << 16) -> bytes:
    if not isinstance(value, str):
        raise EnrollmentError(f"{what} must be a base64 string", "enroll.bad_request", 400)
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as err:
        raise EnrollmentError(f"{what} is not base64", "enroll.bad_request", 400) from err
    if not lo <= len(data) <= hi:
        raise EnrollmentError(f"{what} must be {lo}..{hi} bytes", "enroll.bad_request", 400)
    return data


def _verify_possession(cert: x509.Certificate, signature: bytes, message: bytes) -> None:
    key = cert.public_key()
    try:
        if isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(signature, message, ec.ECDSA(hashes.SHA256()))
        elif isinstance(key, rsa.RSAPublicKey):
            key.verify(signature, message, padding.PKCS1v15(), hashes.SHA256())
        elif isinstance(key, ed25519.Ed25519PublicKey):
            key.verify(signature, message)
        else:
            raise EnrollmentError(
                f"cert_user has a {type(key).__name__}; use EC, RSA or Ed25519",
                "enroll.cert_user.key_type",
                400,
            )
    except InvalidSignature as err:
        raise EnrollmentError(
            "the signature over nonce ‖ VM UUID ‖ challenge does not verify with cert_user's key",
            "enroll.possession",
        ) from err


class EnrollmentService:
    """Enrollment and the bindings it makes (also the attestation's :class:`BindingSource`).

    Args:
        tpm: the host TPM (host keys exist).
        store: the trusted store (records ``vaik/<uuid>`` and ``binding/<uuid>``).
        owners: the operator's owner policy.
        boots: boot markers of running VMs (the bridges).
        fleet_key: DER SubjectPublicKeyInfo of the fleet policy key (bound into every vAIK).
        aik_certificates: DER, the AIK certificate first.
        now: wall clock for certificate validity; ``monotonic`` for challenge expiry.
        random_bytes: challenge source.
    """

    def __init__(
        self,
        tpm: HostTpm,
        store: RecordStore,
        owners: OwnerPolicy,
        boots: BootMarkerSource,
        fleet_key: bytes,
        aik_certificates: Sequence[bytes],
        *,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
        monotonic: Callable[[], float] = time.monotonic,
        random_bytes: Callable[[int], bytes] = secrets.token_bytes,
    ) -> None:
        self.tpm = tpm
        self.store = store
        self.owners = owners
        self.boots = boots
        self.fleet_key = fleet_key
        self.aik_certificates = [bytes(c) for c in aik_certificates]
        self.now = now
        self.monotonic = monotonic
        self.random_bytes = random_bytes
        self._challenges: dict[bytes, tuple[uuid.UUID, float]] = {}
        self._lock = threading.RLock()  # challenges
        self._vm_locks: dict[uuid.UUID, threading.RLock] = {}
        # per VM: the binding decoded from the records at these store versions (see _load)
        self._loaded: dict[uuid.UUID, tuple[tuple[bytes, bytes], ActiveBinding, BootMarker]] = {}
        self._watch: threading.Thread | None = None
        self._stop = threading.Event()

    # ---------------------------------------------------------------- enrollment

    def challenge(self, vm_uuid: uuid.UUID) -> bytes:
        """A fresh single-use challenge for enrolling ``vm_uuid`` (valid CHALLENGE_TTL s)."""
        now = self.monotonic()
        value = self.random_bytes(32)
        with self._lock:
            for key in [k for k, (_, exp) in self._challenges.items() if exp < now]:
                del self._challenges[key]
            if len(self._challenges) > 10_000:
                raise EnrollmentError("too many open challenges", "enroll.busy", 503)
            self._challenges[value] = (vm_uuid, now + CHALLENGE_TTL)
        return value

    def enroll(
        self,
        vm_uuid: uuid.UUID,
        cert_user: bytes,
        nonce: bytes,
        challenge: bytes,
        signature: bytes,
    ) -> dict[str, Any]:
        """Run the checks of the module docstring and bind; returns the answer object.

        Raises:
            EnrollmentError: with ``error_id`` ``enroll.challenge``, ``enroll.cert_user``,
                ``enroll.cert_user.validity``, ``enroll.possession``, ``enroll.not_owner``,
                ``enroll.vm_not_running`` …
        """
        if not 16 <= len(nonce) <= 64:
            raise EnrollmentError("nonce must be 16..64 bytes", "enroll.bad_request", 400)
        with self._lock:
            entry = self._challenges.pop(challenge, None)
        if entry is None or entry[0] != vm_uuid or entry[1] < self.monotonic():
            raise EnrollmentError(
                "unknown, used or expired challenge for this VM: ask for a new one",
                "enroll.challenge",
            )
        try:
            cert = x509.load_der_x509_certificate(cert_user)
        except ValueError as err:
            raise EnrollmentError(
                f"cert_user is not DER X.509: {err}", "enroll.cert_user", 400
            ) from err
        now = self.now()
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            raise EnrollmentError(
                f"cert_user is valid {cert.not_valid_before_utc} .. {cert.not_valid_after_utc}, "
                f"not now ({now})",
                "enroll.cert_user.validity",
            )
        _verify_possession(cert, signature, enrollment_message(nonce, vm_uuid, challenge))
        fp = fingerprint(cert_user)
        if fp not in self.owners.owners(vm_uuid):
            raise EnrollmentError(
                f"the operator's policy does not let {cert.subject.rfc4514_string()} ({fp}) own "
                f"VM {vm_uuid}",
                "enroll.not_owner",
            )
        marker = self.boots.boot_marker(vm_uuid)
        if marker is None or not marker.running:
            raise EnrollmentError(
                f"VM {vm_uuid} is not running (no bridge, or its vTPM is not initialised): "
                "start it first",
                "enroll.vm_not_running",
                409,
            )
        with self._vm_lock(vm_uuid):
            vaik, generation = self._vaik_for(vm_uuid, cert_user)
            binding = {
                "vm_uuid": str(vm_uuid),
                "generation": generation,
                "cert_user": _b64(cert_user),
                "fingerprint": fp,
                "vaik_name": vaik.name.hex(),
                "boot": marker.to_json(),
                "active": True,
                "enrolled_at": now.isoformat(),
            }
            with self.store.transaction() as tx:
                tx.put(
                    "vaik", str(vm_uuid), {"generation": generation, "key": vaik.to_bytes().hex()}
                )
                tx.put("binding", str(vm_uuid), binding)
        qualifying = hashlib.sha256(cert_user + nonce).digest()
        cert_authkey = self.tpm.certify("authkey", "aik", qualifying)
        cert_vaik = self.tpm.certify(vaik, "authkey", qualifying)
        log.info("enroll: VM %s bound to %s (generation %d)", vm_uuid, fp, generation)
        return {
            "format": "vtpm-trust/enrollment/1",
            "vm_uuid": str(vm_uuid),
            "generation": generation,
            "nonce": _b64(nonce),
            "cert_user": _b64(cert_user),
            "vaik": {
                "public": _b64(vaik.public),
                "certification": {
                    "attest": _b64(cert_vaik.attest),
                    "signature": _b64(cert_vaik.signature),
                },
            },
            "authkey": {
                "public": _b64(self.tpm.host_key_public("authkey")),
                "certification": {
                    "attest": _b64(cert_authkey.attest),
                    "signature": _b64(cert_authkey.signature),
                },
            },
            "aik_certificates": [_b64(c) for c in self.aik_certificates],
            "platform": {
                "authkey_policy": self.tpm.authkey_policy().hex(),
                "fleet_policy_key_name": (vaik.policy.fleet_key_name or b"").hex(),
                "vaik_policy_ref": vaik.policy.policy_ref.hex(),
            },
        }

    def _vm_lock(self, vm_uuid: uuid.UUID) -> threading.RLock:
        """One lock per VM: VMs' binding checks (a bridge round trip each) do not queue."""
        with self._lock:
            return self._vm_locks.setdefault(vm_uuid, threading.RLock())

    def _vaik_for(self, vm_uuid: uuid.UUID, cert_user: bytes) -> tuple[WrappedKey, int]:
        """The same tenant keeps the VM's vAIK; anyone else (or nobody yet) gets a new one."""
        binding = self.store.find("binding", str(vm_uuid))
        key = self.store.find("vaik", str(vm_uuid))
        if key is not None and key.json().get("state"):
            raise EnrollmentError(
                f"the vAIK of VM {vm_uuid} is {key.json()['state']} in a migration: enroll on the "
                "host the VM runs on once it is over",
                "enroll.vaik_migrating",
                409,
            )
        if binding is not None and key is not None:
            b, k = binding.json(), key.json()
            if b.get("cert_user") == _b64(cert_user) and k.get("generation") == b.get("generation"):
                return WrappedKey.from_bytes(bytes.fromhex(k["key"])), int(k["generation"])
        generation = 1 if key is None else int(key.json().get("generation", 0)) + 1
        return self.tpm.create_vaik(self.fleet_key), generation

    # ---------------------------------------------------------------- bindings

    def _versions(self, vm_uuid: uuid.UUID) -> tuple[bytes, bytes] | None:
        """The store's versions of the VM's binding and vAIK records (``TrustedStore.version``:
        in memory, no database read), None when either is missing or the store has none."""
        version = getattr(self.store, "version", None)
        if version is None:
            return None
        b, k = version("binding", str(vm_uuid)), version("vaik", str(vm_uuid))
        if b is None or k is None:
            return None
        return b, k

    def _load(self, vm_uuid: uuid.UUID) -> tuple[ActiveBinding, BootMarker]:
        """The VM's binding as the store holds it now.

        Every binding change (enrollment, reset, restore, a migration's commit or abort, by any
        code) is a store write of the binding or the vAIK record, which changes that record's
        version; an accepted binding is kept with the two versions it was decoded at and reused
        only while both are the same, i.e. while the records are byte for byte those it was
        read from (migration changes them: each attestation still sees the current state). A
        refusal is never kept. Versions are read before the records, so a write in between
        can only make the kept entry miss later, never return an older binding.

        Raises:
            AttestRefused: none, inactive, or its vAIK is moving to or arriving from another host.
        """
        versions = self._versions(vm_uuid)
        if versions is not None:
            kept = self._loaded.get(vm_uuid)
            if kept is not None and kept[0] == versions:
                return kept[1], kept[2]
        loaded = self._read(vm_uuid)
        if versions is not None:
            self._loaded[vm_uuid] = (versions, *loaded)
        else:
            self._loaded.pop(vm_uuid, None)
        return loaded

    def _read(self, vm_uuid: uuid.UUID) -> tuple[ActiveBinding, BootMarker]:
        """:meth:`_load` from the store's records."""
        binding = self.store.find("binding", str(vm_uuid))
        key = self.store.find("vaik", str(vm_uuid))
        if binding is None or key is None:
            raise AttestRefused(
                f"VM {vm_uuid} has no enrollment on this host (a clone, or never enrolled): the "
                "tenant must enroll it",
                "attest.not_enrolled",
            )
        b, k = binding.json(), key.json()
        if k.get("state"):  # "moving" (source) / "pending" (target) during a migration
            raise AttestRefused(
                f"the vAIK of VM {vm_uuid} is {k['state']} (migration {k.get('migration_id')}): "
                "it signs on one host only, and not on this one now",
                "attest.vaik_migrating",
            )
        if not b.get("active") or b.get("generation") != k.get("generation") or "boot" not in b:
            raise AttestRefused(
                f"VM {vm_uuid} was reset since its tenant enrolled: the tenant must authenticate "
                "again (vtpm-verify enroll)",
                "attest.reauth_required",
            )
        vaik = WrappedKey.from_bytes(bytes.fromhex(k["key"]))
        cert_user = base64.b64decode(b["cert_user"])
        return (
            ActiveBinding(vm_uuid, vaik, cert_user, int(b["generation"])),
            BootMarker.from_json(b["boot"]),
        )

    def _update_binding(self, vm_uuid: uuid.UUID, **changes: Any) -> None:
        with self.store.transaction() as tx:
            record = tx.find("binding", str(vm_uuid))
            if record is not None:
                tx.put("binding", str(vm_uuid), {**record.json(), **changes})

    def active_binding(self, vm_uuid: uuid.UUID) -> ActiveBinding:
        """The binding to attest ``vm_uuid`` with (``attest.BindingSource``).

        Raises:
            AttestRefused: ``attest.not_enrolled`` (none: never enrolled, or a clone, which has
                another UUID), ``attest.reauth_required`` (the vTPM was reset since the tenant
                authenticated), ``attest.vaik_migrating``, ``attest.vm_not_running``.
        """
        with self._vm_lock(vm_uuid):
            binding, then = self._load(vm_uuid)
            now = self.boots.boot_marker(vm_uuid)
            if now is None:
                raise AttestRefused(f"VM {vm_uuid} is not running", "attest.vm_not_running")
            transition = boot_transition(then, now)
            if transition == "starting":
                raise AttestRefused(
                    f"the vTPM of VM {vm_uuid} is not running now (starting, restoring)",
                    "attest.vm_not_running",
                )
            if transition == "reset":
                self._update_binding(
                    vm_uuid, active=False, deactivated="vTPM reset (reboot) since enrollment"
                )
                log.info("enroll: VM %s was reset; its binding waits for the tenant", vm_uuid)
                raise AttestRefused(
                    f"VM {vm_uuid} rebooted since its tenant enrolled: the tenant must "
                    "authenticate again (vtpm-verify enroll)",
                    "attest.reauth_required",
                )
            if transition == "restored":  # the same boot goes on in another QEMU session
                self._update_binding(vm_uuid, boot=now.to_json())
            return binding

    def stored_binding(self, vm_uuid: uuid.UUID) -> ActiveBinding:
        """The binding as the store holds it, no bridge round trip (``attest.BindingSource``):
        the attestation starts the TPM's certifications with it and confirms it with
        :meth:`active_binding` after reading the vPCRs, before anything is signed.

        Raises:
            AttestRefused: ``attest.not_enrolled``, ``attest.reauth_required`` (already
                recorded), ``attest.vaik_migrating``.
        """
        with self._vm_lock(vm_uuid):
            return self._load(vm_uuid)[0]

    def check_boots(self) -> list[uuid.UUID]:
        """Deactivate the bindings of running VMs reset since enrollment; returns those VMs."""
        reset = []
        for record_id in self.store.record_ids("binding"):
            vm_uuid = uuid.UUID(record_id)
            try:
                self.active_binding(vm_uuid)
            except AttestRefused as err:
                if err.error_id == "attest.reauth_required":
                    reset.append(vm_uuid)
        return reset

    # ---------------------------------------------------------------- component

    def start(self, daemon: Any = None, *, interval: float = 1.0) -> EnrollmentService:
        """Poll the running VMs' boots every ``interval`` seconds (``daemon`` unused)."""

        def loop() -> None:
            while not self._stop.wait(interval):
                try:
                    self.check_boots()
                except VtpmError as err:
                    log.warning("enroll: boot check failed: %s", err)

        self._watch = threading.Thread(target=loop, name="enroll-boots", daemon=True)
        self._watch.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._watch is not None:
            self._watch.join(5)


# --------------------------------------------------------------------------------------------
# HTTPS


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _HttpServer
    protocol_version = "HTTP/1.1"
    timeout = 15  # per connection, TLS handshake included: a silent client holds one thread only

    def log_message(self, fmt: str, *args: Any) -> None:
        log.debug("enroll http: " + fmt, *args)

    def _reply(self, status: int, obj: Mapping[str, Any]) -> None:
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _error(self, status: int, error_id: str, message: str) -> None:
        self._reply(status, {"error": {"id": error_id, "message": message}})

    def do_POST(self) -> None:
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            length = -1
        if not 0 < length <= MAX_BODY:
            self._error(413 if length > MAX_BODY else 400, "http.body", "bad Content-Length")
            return
        try:
            body = json.loads(self.rfile.read(length))
            if not isinstance(body, dict):
                raise ValueError("not an object")
            vm_uuid = uuid.UUID(str(body.get("vm_uuid")))
        except ValueError as err:
            self._error(400, "enroll.bad_request", f"body: {err}")
            return
        service = self.server.service
        try:
            if self.path == "/v1/enroll/challenge":
                value = service.challenge(vm_uuid)
                self._reply(200, {"challenge": _b64(value), "expires_in": CHALLENGE_TTL})
            elif self.path == "/v1/enroll":
                answer = service.enroll(
                    vm_uuid,
                    _unb64(body.get("cert_user"), "cert_user"),
                    _unb64(body.get("nonce"), "nonce", 16, 64),
                    _unb64(body.get("challenge"), "challenge", 32, 32),
                    _unb64(body.get("signature"), "signature", 1, 1024),
                )
                self._reply(200, answer)
            else:
                self._error(404, "http.not_found", f"no route POST {self.path}")
        except EnrollmentError as err:
            self._reply(err.status, {"error": {"id": err.error_id, "message": str(err)}})
        except VtpmError as err:
            log.warning("enroll: %s", err)
            self._error(500, err.id, str(err))


class _HttpServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    service: EnrollmentService


class EnrollmentServer:
    """The HTTPS front of an :class:`EnrollmentService` (a daemon component).

    Args:
        service: the enrollment logic.
        listen: ``(host, port)``; port 0 picks one (see :attr:`address`).
        certfile, keyfile: the host's TLS identity (``<state>/identity/tls.pem``, issued by the
            fleet CA, so tenants verify the host against the fleet CA they trust).
    """

    def __init__(
        self,
        service: EnrollmentService,
        listen: tuple[str, int],
        certfile: Path,
        keyfile: Path,
    ) -> None:
        self.service = service
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(str(certfile), str(keyfile))
        self._httpd = _HttpServer(listen, _Handler)
        self._httpd.service = service
        # the handshake runs in the connection's own thread, not in the accept loop
        self._httpd.socket = ctx.wrap_socket(
            self._httpd.socket, server_side=True, do_handshake_on_connect=False
        )
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._httpd.server_address[:2]
        return str(host), int(port)

    @property
    def url(self) -> str:
        host, port = self.address
        return f"https://{host}:{port}"

    def start(self, daemon: Any = None) -> EnrollmentServer:
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, name="enroll-https", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(5)
