"""``vtpm-host init``, TPM part: create what is missing, idempotently, then run the extra steps.

:func:`init_host` opens the TPM (discovery; the software root if needed), makes sure SRK, AIK
and AuthKey exist, and then runs each :data:`InitStep` in order. Registration with the registrar
is such a step, wired in by ``host_agent/registration.py`` (listed in
``host_agent.tpm.cli.INIT_STEPS``): a step gets the open port, the config and the key report, does
its work only if needed, and returns one line saying what it did (None: nothing to do).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from cryptography import x509

from ..config import AgentConfig
from .discovery import UdevContext, open_host_tpm
from .port import AUTHKEY_PCRS, HostKeyReport, HostTpm

__all__ = ["InitReport", "InitStep", "init_host", "tpm_info"]

#: ``step(tpm, config, keys) -> message | None``; must be idempotent.
InitStep = Callable[[HostTpm, AgentConfig, HostKeyReport], "str | None"]


@dataclass(frozen=True)
class InitReport:
    """What ``init`` found and did.

    Attributes:
        root: ``"hardware"`` or ``"software"``.
        keys: the host key report (``keys.created`` empty when they all existed).
        steps: messages of the extra steps that did something.
        platform_state_approved: PCR0-8 still hold AuthKey's values (False: AuthKey unusable).
    """

    root: str
    tcti: str
    keys: HostKeyReport
    steps: tuple[str, ...]
    platform_state_approved: bool

    @property
    def changed(self) -> bool:
        return bool(self.keys.created or self.steps)


def init_host(
    config: AgentConfig,
    *,
    steps: Sequence[InitStep] = (),
    udev: UdevContext | None = None,
) -> InitReport:
    """Create SRK, AIK and AuthKey if missing, then run ``steps``; safe to run again."""
    tpm = open_host_tpm(config.tpm, udev=udev)
    try:
        keys = tpm.ensure_host_keys()
        messages: list[str] = []
        for step in steps:
            msg = step(tpm, config, keys)
            if msg:
                messages.append(msg)
        approved = tpm.platform_state_approved()
        return InitReport(tpm.root, tpm.tcti, keys, tuple(messages), approved)
    finally:
        tpm.close()


def _cert_summary(index: int, der: bytes) -> dict[str, Any]:
    entry: dict[str, Any] = {"nv_index": f"0x{index:08x}"}
    try:
        cert = x509.load_der_x509_certificate(der)
        entry["subject"] = cert.subject.rfc4514_string()
        entry["issuer"] = cert.issuer.rfc4514_string()
    except ValueError as err:
        entry["subject"] = entry["issuer"] = None
        entry["error"] = f"not a DER X.509 certificate: {err}"
    return entry


def tpm_info(config: AgentConfig, *, udev: UdevContext | None = None) -> dict[str, Any]:
    """The ``vtpm-host tpm info`` document (host keys are null before ``init``)."""
    from .adapter import HostKeysMissing

    tpm = open_host_tpm(config.tpm, udev=udev)
    try:
        info: dict[str, Any] = {
            "root": tpm.root,
            "tcti": tpm.tcti,
            "ek_certificates": [_cert_summary(i, der) for i, der in tpm.ek_certificates()],
        }
        try:
            info["aik_name"] = tpm.aik_name().hex()
            authkey = tpm.host_key_public("authkey")
            from evidence.tpm2_policy import name_of_public

            info["authkey_name"] = name_of_public(authkey).hex()
            info["authkey_policy"] = tpm.authkey_policy().hex()
            info["platform_state_approved"] = tpm.platform_state_approved()
        except HostKeysMissing:
            info["aik_name"] = info["authkey_name"] = info["authkey_policy"] = None
            info["platform_state_approved"] = None
        values = tpm.pcr_values(AUTHKEY_PCRS)
        info["pcrs"] = {"sha256": {str(i): values[i].hex() for i in AUTHKEY_PCRS}}
        if tpm.root == "software":
            info["warning"] = "software root: for development only"
        return info
    finally:
        tpm.close()
