"""The guest attestation channel: each VM's virtio-serial socket, served by the daemon.

Theory of operation
-------------------
libvirt's ``<channel type='unix'><source mode='bind' path=P/>`` makes QEMU *listen* on ``P`` (as
``-chardev socket,server=on,wait=off`` does in the tests), so the daemon is the client: it
connects to every VM's channel socket and keeps reconnecting (QEMU not started yet, restarted,
restored). The guest agent (``vtpm-guest quote``) writes a request frame on its port; the daemon
answers on the same connection with the vAIK signature over the canonical vPCR message
(:mod:`evidence.attestation`: VM UUID, nonce, the vPCRs read through the VM's bridge),
CertAuthKey and CertvAIK over ``SHA-256(cert_user ‖ nonce)``, the AIK certificate chain, both
keys' TPMT_PUBLIC and cert_user — every field already in the evidence bundle's encoding, so the
guest only copies them (protocol in ``guest_agent/quote.py``).

The VM UUID is never taken from the guest: it is the UUID of the channel socket the request
arrived on. The guest is untrusted: frames are bounded (:data:`MAX_FRAME`), malformed ones drop
the connection (the daemon reconnects), and each VM has at most :data:`MAX_PENDING` requests in
flight. A VM without an active binding (not enrolled, or rebooted since the tenant last
authenticated, see :mod:`host_agent.service.enroll`) gets a refusal with a stable error id.

Layers, one module each: the frame codec (:mod:`host_agent.service.attest_wire`, pure,
duplicated in ``guest_agent/channel.py`` and tested against the same vectors),
:class:`Attestor` (:mod:`host_agent.service.attest_attestor`: TPM + bridge work for one request,
no sockets) and :class:`GuestChannelService` (:mod:`host_agent.service.attest_channels`: one
selector thread for all VMs' sockets, a small worker pool). This module holds the daemon
component, :class:`AttestService`, that wires them together, and re-exports the layers' names so
``host_agent.service.attest`` stays the one import path.

The refusal ids a guest or tenant can get from these modules are documented in
``docs/findings.md`` (``tests/unit/test_verify_findings.py`` checks every quoted ``attest.*`` id
in ``attest*.py`` is); the enrollment side's are in :mod:`host_agent.service.enroll`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Final

from evidence.errors import VtpmError
from evidence.tpm2_policy import PolicyApproval
from host_agent.service.attest_attestor import (
    SHA256,
    ActiveBinding,
    Attestor,
    AttestRefused,
    BindingSource,
    PcrReader,
)
from host_agent.service.attest_channels import MAX_PENDING, SEND_TIMEOUT, GuestChannelService
from host_agent.service.attest_wire import (
    MAX_FRAME,
    PROTOCOL_VERSION,
    FrameDecoder,
    QuoteRequest,
    encode_frame,
    parse_quote_request,
    quote_answer,
    refusal,
)
from host_agent.tpm.port import HostTpm

__all__ = [
    "MAX_FRAME",
    "MAX_PENDING",
    "PROTOCOL_VERSION",
    "SEND_TIMEOUT",
    "SHA256",
    "ActiveBinding",
    "AttestConfigError",
    "AttestRefused",
    "AttestService",
    "Attestor",
    "BindingSource",
    "FrameDecoder",
    "GuestChannelService",
    "PcrReader",
    "QuoteRequest",
    "encode_frame",
    "parse_quote_request",
    "quote_answer",
    "refusal",
]

log = logging.getLogger("host_agent.service.attest")


class AttestConfigError(VtpmError):
    """The attestation component lacks a file it needs (identity, fleet key) or one is bad."""

    id: ClassVar[str] = "attest.config"


# --------------------------------------------------------------------------------------------
# The daemon component


DEFAULT_LISTEN: Final = ("0.0.0.0", 7788)


def _pem_der(path: Path) -> list[bytes]:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    try:
        certs = x509.load_pem_x509_certificates(path.read_bytes())
    except (OSError, ValueError) as err:
        raise AttestConfigError(f"{path}: {err}") from err
    return [c.public_bytes(serialization.Encoding.DER) for c in certs]


class AttestService:
    """The daemon component (``vtpm-host daemon --component
    host_agent.service.attest:AttestService``): enrollment API + guest channel server.

    What it reads under the daemon's ``state_dir`` (what ``vtpm-host init`` and the operator
    put there)::

        identity/aik.pem, identity/tls.pem, identity/tls-key.pem    the host's identity
        attest/fleet-policy-key.pem    the fleet policy key (registrar ``GET /v1/policy-key``),
                                       bound into every vAIK
        migration/policy-approvals.json  the fleet's approvals (``GET /v1/policy-approvals``
                                       format, shared with migration): the one for this host's
                                       current platform state authorises vAIK signing
        attest/owners.json             owner policy (``enroll.PolicyFileOwners``)
        attest/settings.json           optional ``{"listen": "HOST:PORT"}`` (default 0.0.0.0:7788)

    With ``[libvirt] uri`` configured, owners also come from each domain's ``vtpm:owner``
    metadata. Channel sockets come from the VM registry (adoption records' ``channel_socket``),
    re-read every ``sync_interval`` seconds.
    """

    def __init__(
        self,
        *,
        listen: tuple[str, int] | None = None,
        sync_interval: float = 2.0,
        boot_poll_interval: float = 1.0,
    ) -> None:
        self.listen = listen
        self.sync_interval = sync_interval
        self.boot_poll_interval = boot_poll_interval
        self._hooks: tuple[Any, Any, Any] | None = None
        self.enroll: Any = None
        self.server: Any = None
        self.attestor: Attestor | None = None
        self.channels: GuestChannelService | None = None
        self._stop = threading.Event()
        self._sync: threading.Thread | None = None
        self._approval: tuple[float, PolicyApproval] | None = None
        self._approvals_path: Path | None = None

    def _current_approval(self, tpm: HostTpm) -> PolicyApproval:
        assert self._approvals_path is not None
        path = self._approvals_path
        try:
            mtime = path.stat().st_mtime
        except OSError as err:
            raise AttestRefused(f"no fleet approvals at {path}", "attest.no_approval") from err
        if self._approval is not None and self._approval[0] == mtime:
            return self._approval[1]
        from host_agent.migration.service import load_approvals

        wanted = tpm.approved_sign_policy()
        for approval in load_approvals(path):
            if approval.approved_policy == wanted:
                self._approval = (mtime, approval)
                return approval
        raise AttestRefused(
            f"the fleet has not approved this host's platform state for vAIK signing "
            f"(policy {wanted.hex()} not in {path})",
            "attest.no_approval",
        )

    def start(self, daemon: Any) -> None:
        from cryptography.hazmat.primitives import serialization

        from host_agent.service import enroll as en

        state = Path(daemon.config.state_dir)
        ident = state / "identity"
        aik = _pem_der(ident / "aik.pem")
        try:
            fleet_key = serialization.load_pem_public_key(
                (state / "attest" / "fleet-policy-key.pem").read_bytes()
            ).public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        except (OSError, ValueError) as err:
            raise AttestConfigError(f"fleet policy key: {err}") from err
        self._approvals_path = state / "migration" / "policy-approvals.json"
        owners: Any = en.PolicyFileOwners(state / "attest" / "owners.json")
        uri = getattr(getattr(daemon.config, "libvirt", None), "uri", None)
        if uri:
            owners = _UnionOwners(owners, en.DomainMetadataOwners(_LibvirtXml(uri)))
        listen = self.listen
        settings = state / "attest" / "settings.json"
        if listen is None and settings.exists():
            host, _, port = str(json.loads(settings.read_text()).get("listen", "")).rpartition(":")
            listen = (host or DEFAULT_LISTEN[0], int(port))
        tpm = daemon.tpm
        clock = getattr(daemon, "now", None)
        self.enroll = en.EnrollmentService(
            tpm,
            daemon.store,
            owners,
            en.BridgeBootMarkers(daemon.hooks),
            fleet_key,
            aik,
            **({"now": clock} if callable(clock) else {}),
        )
        self.attestor = Attestor(
            tpm, daemon.hooks, self.enroll, lambda: self._current_approval(tpm), aik
        )

        def observe(vm: uuid.UUID, answer: Mapping[str, Any]) -> None:
            """Feed the status and metrics components when they run (looked up per answer)."""
            error = answer.get("error") or {}
            result = "ok" if answer.get("ok") else str(error.get("id", "attest.refused"))
            board = getattr(daemon, "status_board", None)
            if board is not None:
                board.attested(str(vm), daemon.now(), result)
            metrics = getattr(daemon, "metrics", None)
            if metrics is not None:
                metrics.attestation(ok=result == "ok", reason=None if result == "ok" else result)

        self.channels = GuestChannelService(self.attestor, observer=observe).start()
        try:
            self.server = en.EnrollmentServer(
                self.enroll, listen or DEFAULT_LISTEN, ident / "tls.pem", ident / "tls-key.pem"
            ).start()
            self.enroll.start(interval=self.boot_poll_interval)
        except BaseException:
            self.channels.stop()
            raise
        self._watch_saves(daemon.hooks)
        registry = daemon.registry

        def channel_of(entry: Any) -> str | None:
            """The adoption record's channel socket; read from disk for a VM adopted after the
            daemon started (the registry loads adoption records at start only)."""
            record = entry.adoption
            if record is None:
                try:
                    record = json.loads((state / "vms" / entry.uuid / "adoption.json").read_text())
                except (OSError, ValueError):
                    return None
            path = record.get("channel_socket") if isinstance(record, dict) else None
            return str(path) if path else None

        def sync() -> None:
            known: dict[uuid.UUID, str] = {}
            while True:
                try:
                    for entry in registry.entries():
                        path = channel_of(entry)
                        vm = uuid.UUID(entry.uuid)
                        if path and known.get(vm) != path and self.channels is not None:
                            self.channels.add_vm(vm, Path(path))
                            known[vm] = path
                except Exception:  # the loop must survive one bad entry
                    log.exception("attest: channel sync failed")
                if self._stop.wait(self.sync_interval):
                    return

        self._sync = threading.Thread(target=sync, name="attest-sync", daemon=True)
        self._sync.start()
        log.info("attest: enrollment API on %s, guest channels served", self.server.url)

    def _watch_saves(self, hooks: Any) -> None:
        """Judge each VM's boot when a save (or snapshot, or outgoing migration) begins.

        The boot poll runs every ``boot_poll_interval``; a guest that reboots and is saved
        within one interval would otherwise leave its binding active in the saved state, and a
        restore into a new bridge (one per QEMU) could not tell. So the first GET_STATEBLOB
        (PERMANENT) of a save checks the binding first (a bridge status call; a reset
        deactivates it), then the daemon's own handler runs. Never vetoes: a refusal here only
        records what the counters show.
        """
        original = hooks.on_get_stateblob

        def on_get_stateblob(call: Any) -> Any:
            if call.blob_type == 1:
                try:
                    if self.enroll is not None:
                        self.enroll.active_binding(uuid.UUID(call.vm_uuid))
                except (VtpmError, ValueError):
                    pass  # not enrolled, reset (now recorded), migrating: the save goes on
            return original(call)

        hooks.on_get_stateblob = on_get_stateblob
        self._hooks = (hooks, original, on_get_stateblob)

    def stop(self) -> None:
        self._stop.set()
        if self._hooks is not None:
            hooks, original, ours = self._hooks
            if hooks.on_get_stateblob is ours:
                hooks.on_get_stateblob = original
        for part in (self.server, self.enroll, self.channels):
            if part is not None:
                with contextlib.suppress(Exception):
                    part.stop()
        if self.attestor is not None:
            self.attestor.close()
        if self._sync is not None:
            self._sync.join(5)


class _UnionOwners:
    def __init__(self, *policies: Any) -> None:
        self.policies = policies

    def owners(self, vm_uuid: uuid.UUID) -> frozenset[str]:
        out: frozenset[str] = frozenset()
        for p in self.policies:
            out |= p.owners(vm_uuid)
        return out


class _LibvirtXml:
    def __init__(self, uri: str) -> None:
        self.uri = uri

    def __call__(self, vm_uuid: uuid.UUID) -> str | None:
        from host_agent.lifecycle.libvirt_adapter import Hypervisor

        try:
            with Hypervisor(self.uri) as hv:
                return hv.xml(str(vm_uuid))
        except VtpmError:
            return None
