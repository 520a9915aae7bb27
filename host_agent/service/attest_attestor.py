"""The attestation of one VM: what the host signs for a quote request, and the ports it needs.

:class:`Attestor` answers one request (no sockets): the vPCRs read through the VM's bridge
(:class:`PcrReader`), the binding from the enrollment side (:class:`BindingSource`,
:class:`ActiveBinding`), the vAIK signature and the certifications by the host TPM.
:class:`AttestRefused` carries the stable error id a guest is refused with. The channel sockets
that feed it are :mod:`host_agent.service.attest_channels`; the daemon component that wires both
is :mod:`host_agent.service.attest`.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import uuid
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, ClassVar, Final, Protocol

from evidence.attestation import AttestationMessage, encode_attestation_message
from evidence.errors import ParseError, VtpmError
from evidence.tpm2_policy import PolicyApproval
from host_agent.service.attest_wire import parse_quote_request, quote_answer, refusal
from host_agent.tpm.port import Attestation, HostTpm, WrappedKey

__all__ = [
    "SHA256",
    "ActiveBinding",
    "AttestRefused",
    "Attestor",
    "BindingSource",
    "PcrReader",
]

# The daemon's operators filter on this name: it is the one the code logged under before the split.
log = logging.getLogger("host_agent.service.attest")

SHA256: Final = 0x000B


# --------------------------------------------------------------------------------------------
# Ports and the attestation itself


class AttestRefused(VtpmError):
    """The host will not attest this VM now (no binding, a reboot since enrollment, …).

    ``id`` is what the guest and the tenant see (``attest.not_enrolled``, …).
    """

    id: ClassVar[str] = "attest.refused"

    def __init__(self, message: str, error_id: str = "attest.refused") -> None:
        super().__init__(message)
        self.error_id = error_id


@dataclass(frozen=True)
class ActiveBinding:
    """What attesting one VM needs from its enrollment: the vAIK and the tenant certificate."""

    vm_uuid: uuid.UUID
    vaik: WrappedKey
    cert_user: bytes
    generation: int


class BindingSource(Protocol):
    """The enrollment side (:class:`host_agent.service.enroll.EnrollmentService`)."""

    def active_binding(self, vm_uuid: uuid.UUID) -> ActiveBinding:
        """The binding to attest with now (the store's record, and the VM's bridge confirms the
        vTPM has not been reset since).

        Raises:
            AttestRefused: none (``attest.not_enrolled``) or not now (``attest.reauth_required``).
        """
        ...

    def stored_binding(self, vm_uuid: uuid.UUID) -> ActiveBinding:
        """The binding as the store holds it, without asking the bridge: enough to start the
        TPM's work, never enough to sign (:meth:`active_binding` must confirm it after the vPCRs
        were read).

        Raises:
            AttestRefused: as :meth:`active_binding`, for what the store alone shows.
        """
        ...


class PcrReader(Protocol):
    """Reads a running VM's vPCRs through its bridge (``HooksServer`` satisfies it)."""

    def read_pcrs(
        self, vm_uuid: str, bank: str = "sha256", timeout: float = 30.0
    ) -> dict[int, bytes]: ...


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


class _BindingChanged(Exception):
    """The binding an attestation started with is not the VM's binding any more."""

    def __init__(self, binding: ActiveBinding) -> None:
        super().__init__(f"the binding of VM {binding.vm_uuid} changed")
        self.binding = binding


class Attestor:
    """Answers one quote request: vPCRs through the bridge, signature and certificates by the TPM.

    Args:
        tpm: the host TPM (AIK and AuthKey exist).
        pcrs: reads the VM's vPCRs.
        bindings: the enrollment side.
        approval: the fleet's current approval of this host's platform state for vAIK signing
            (``PolicyApproval`` from the registrar); called per request, so cache it there.
        aik_certificates: DER, the AIK certificate first.
        pcr_timeout: seconds to wait for the bridge.
    """

    def __init__(
        self,
        tpm: HostTpm,
        pcrs: PcrReader,
        bindings: BindingSource,
        approval: Callable[[], PolicyApproval],
        aik_certificates: Sequence[bytes],
        *,
        pcr_timeout: float = 5.0,
    ) -> None:
        if not aik_certificates:
            raise ValueError("aik_certificates must hold the AIK certificate")
        self.tpm = tpm
        self.pcrs = pcrs
        self.bindings = bindings
        self.approval = approval
        self.aik_certificates = [_b64(bytes(c)) for c in aik_certificates]
        self.pcr_timeout = pcr_timeout
        self._authkey_public = _b64(tpm.host_key_public("authkey"))
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="attest-pcr")
        self._last: dict[uuid.UUID, ActiveBinding] = {}  # per VM, confirmed at every use

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def quote(self, vm_uuid: uuid.UUID, nonce: bytes) -> dict[str, Any]:
        """The ``evidence`` object of an answer (bundle fields, base64).

        Raises:
            AttestRefused: no active binding; the bridge could not read the vPCRs.
            VtpmError: the TPM refused (e.g. the host's platform state is not approved).
        """
        if not isinstance(nonce, bytes) or not 16 <= len(nonce) <= 64:
            raise ValueError("nonce must be 16..64 bytes")
        approval = self.approval()
        # The binding this VM was last attested with (or the store's) is enough to start: the
        # certifications sign nothing the VM said, and nothing is signed before the binding is
        # confirmed as it is now (store and bridge) after the vPCRs were read.
        binding = self._last.get(vm_uuid) or self.bindings.stored_binding(vm_uuid)
        for attempt in (1, 2):
            try:
                done = self._attest(vm_uuid, nonce, binding, approval)
            except _BindingChanged as changed:  # enrolled again since: start over with it
                self._last[vm_uuid] = binding = changed.binding
                if attempt == 2:
                    raise AttestRefused(
                        f"VM {vm_uuid} was enrolled again meanwhile", "attest.retry"
                    ) from None
                continue
            except AttestRefused:
                self._last.pop(vm_uuid, None)
                raise
            self._last[vm_uuid] = binding
            break
        cert_authkey, cert_vaik = done.cert_authkey, done.cert_vaik
        message_bytes, signature = done.message, done.signature
        return {
            "vm_uuid": _b64(vm_uuid.bytes),
            "cert_user": _b64(binding.cert_user),
            "attestation": {"message": _b64(message_bytes), "signature": _b64(signature)},
            "vaik": {
                "public": _b64(binding.vaik.public),
                "certification": {
                    "attest": _b64(cert_vaik.attest),
                    "signature": _b64(cert_vaik.signature),
                },
            },
            "authkey": {
                "public": self._authkey_public,
                "certification": {
                    "attest": _b64(cert_authkey.attest),
                    "signature": _b64(cert_authkey.signature),
                },
            },
            "aik_certificates": list(self.aik_certificates),
        }

    def _attest(
        self, vm_uuid: uuid.UUID, nonce: bytes, binding: ActiveBinding, approval: PolicyApproval
    ) -> Attestation:
        """The TPM's part (one port call) with the bridge's part overlapping it.

        Raises:
            _BindingChanged: the binding is not ``binding`` any more (nothing was signed).
        """

        # Read the vPCRs, then confirm the binding with the store and the bridge's counters (a
        # reset before or during the read shows there, the counters only grow), so the vPCRs
        # of another boot, or a vAIK that is moving away, are never signed.
        def read_and_confirm() -> bytes:
            try:
                values = self.pcrs.read_pcrs(str(vm_uuid), "sha256", self.pcr_timeout)
            except VtpmError as err:
                self.bindings.active_binding(vm_uuid)  # the precise refusal, if there is one
                raise AttestRefused(
                    f"cannot read the vPCRs of VM {vm_uuid} through its bridge: {err}",
                    "attest.vpcrs_unavailable",
                ) from err
            current = self.bindings.active_binding(vm_uuid)
            if current != binding:
                raise _BindingChanged(current)
            return encode_attestation_message(AttestationMessage(vm_uuid, nonce, SHA256, values))

        message = self._pool.submit(read_and_confirm)
        qualifying = hashlib.sha256(binding.cert_user + nonce).digest()
        try:
            return self.tpm.attest(
                binding.vaik, qualifying, message, approval, message_timeout=self.pcr_timeout + 5
            )
        except TimeoutError as err:
            raise AttestRefused(
                f"the bridge of VM {vm_uuid} did not answer", "attest.vpcrs_unavailable"
            ) from err
        finally:
            if not message.done():
                message.cancel()

    def answer(self, vm_uuid: uuid.UUID, frame: Mapping[str, Any]) -> dict[str, Any]:
        """The answer frame to one request frame (a refusal for anything that goes wrong)."""
        try:
            request = parse_quote_request(frame)
        except ParseError as err:
            rid = frame.get("id")
            return refusal(rid if isinstance(rid, str) else "", "attest.bad_request", str(err))
        try:
            return quote_answer(request.id, self.quote(vm_uuid, request.nonce))
        except AttestRefused as err:
            return refusal(request.id, err.error_id, str(err))
        except VtpmError as err:
            log.warning("attest: VM %s: %s", vm_uuid, err)
            return refusal(request.id, err.id, f"the host could not attest: {err}")
