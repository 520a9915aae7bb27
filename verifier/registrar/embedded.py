"""The embedded registrar: the registrar service in the host agent's own process.

Single-host setups (ARCHITECTURE.md §3, §6 "embedded default") need no registrar daemon: the host
agent keeps a registrar state directory of its own and calls the service in-process. The object
here has the three methods ``host_agent.registration.RegistrarEndpoint`` asks for
(``ca_certificate``, ``start``, ``activate``), so ``register_host(tpm, EmbeddedRegistrar(...),
…)`` runs the same protocol, with the same checks, as over HTTPS.

Example::

    with EmbeddedRegistrar(state / "registrar", ek_ca_pems=swtpm_localca_certificates()) as reg:
        registration = register_host(host_tpm, reg, host_id, tls_key)
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any

from evidence.tpm2_policy import PolicyApproval
from verifier.registrar.state import RegistrarConfig, init_state, open_service
from verifier.registrar.store import AdmittedHost

__all__ = ["EmbeddedRegistrar"]


def _now() -> datetime:
    return datetime.now(UTC)


class EmbeddedRegistrar:
    """A registrar state directory opened in this process (created if missing; idempotent).

    Args:
        state_dir: the registrar's state directory.
        ek_ca_pems: EK CA certificates to trust (merged into the bundle; required the first time).
        config: settings for a new state directory.
        clock: current time, timezone-aware UTC (default: the system clock).
        random_bytes: randomness source (default: :func:`secrets.token_bytes`).
    """

    def __init__(
        self,
        state_dir: Path,
        *,
        ek_ca_pems: Sequence[bytes] = (),
        config: RegistrarConfig | None = None,
        clock: Callable[[], datetime] = _now,
        random_bytes: Callable[[int], bytes] = secrets.token_bytes,
    ) -> None:
        init_state(
            state_dir,
            ek_ca_pems=ek_ca_pems,
            config=config,
            now=clock(),
            random_bytes=random_bytes,
        )
        self._service, self._store = open_service(state_dir, clock=clock, random_bytes=random_bytes)

    def __enter__(self) -> EmbeddedRegistrar:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self._store.close()

    def ca_certificate(self) -> bytes:
        """The fleet CA certificate (PEM)."""
        return self._service.ca_certificate()

    def start(self, body: Any) -> dict[str, str]:
        """``POST /v1/registrations``, in-process."""
        return self._service.start(body)

    def activate(self, challenge_id: str, body: Any) -> dict[str, str]:
        """``POST /v1/registrations/<id>/activation``, in-process."""
        return self._service.activate(challenge_id, body)

    def approve_platform_policy(
        self, pcr_policy_digest: bytes, policy_ref: bytes
    ) -> PolicyApproval:
        """Approve a host PCR0-8 policy with the fleet policy key (single-host: the host's own)."""
        return self._service.approve_platform_policy(pcr_policy_digest, policy_ref)

    def policy_key(self) -> dict[str, str]:
        return self._service.policy_key()

    def hosts(self) -> list[AdmittedHost]:
        return self._service.hosts()
