"""``vtpm-host init``, admission step: register with the fleet registrar and keep the identity.

:func:`register_with_registrar` is an ``init`` step (``host_agent.tpm.cli.INIT_STEPS``). It runs
after the host keys exist and, unless the stored identity is still good, admits the host with
:func:`host_agent.registration.register_host` over HTTPS:

* **remote** (``registrar.url`` set): the fleet registrar at that URL, its CA pinned by
  ``registrar.ca_sha256``;
* **embedded** (single host, the default): the registrar runs as a child process,
  ``vtpm-verify registrar init`` then ``serve --listen 127.0.0.1:0 --json`` with its state under
  ``<state_dir>/registrar``, stopped again when registration is over. The EK CA bundle it trusts
  is ``registrar.ek_ca`` or, for the software root, swtpm-localca. A child process, not an
  import: ``host_agent/`` does not depend on ``verifier/`` (ARCHITECTURE.md §7), and the host
  talks to its own registrar exactly as it would to a fleet's.

What it keeps, under ``<state_dir>/identity/`` (mode 0700; each file written to a temporary name
and renamed, all only after registration succeeded and its answer checked)::

    tls-key.pem   the host's P-256 mTLS private key (0600), made once and reused
    tls.pem       its mTLS certificate      ca.pem    the fleet CA certificate
    aik.pem       the AIK certificate (written last)

Idempotent: when ``aik.pem`` still verifies against ``ca.pem``
(:func:`evidence.aik_cert.verify_aik_certificate`) for this TPM's AIK and this host id, the
mTLS certificate still matches the key, and (remote mode) ``ca.pem`` is the pinned CA, the step
does nothing and returns None. A refusal raises (nothing is written).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import ClassVar

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from evidence.aik_cert import verify_aik_certificate
from evidence.errors import ChainError, VtpmError
from evidence.tpm2 import object_name

from .config import AgentConfig, RegistrarConfig
from .registration import HttpsRegistrar, Registration, register_host
from .tpm.port import HostKeyReport, HostTpm

__all__ = [
    "AdmissionError",
    "EmbeddedRegistrarError",
    "IdentityFiles",
    "default_host_id",
    "embedded_registrar",
    "identity_problem",
    "register_with_registrar",
]

log = logging.getLogger(__name__)

_START_TIMEOUT = 60.0
_STOP_TIMEOUT = 10.0


class AdmissionError(VtpmError):
    """The host cannot be admitted as configured (e.g. remote mode without a CA fingerprint)."""

    id: ClassVar[str] = "host.admission"


class EmbeddedRegistrarError(AdmissionError):
    """The embedded registrar child process failed to initialise or to start serving."""

    id: ClassVar[str] = "host.admission.embedded_registrar"


@dataclass(frozen=True)
class IdentityFiles:
    """The host's stored fleet identity (layout in the module docstring)."""

    directory: Path

    @property
    def tls_key(self) -> Path:
        return self.directory / "tls-key.pem"

    @property
    def tls_certificate(self) -> Path:
        return self.directory / "tls.pem"

    @property
    def ca_certificate(self) -> Path:
        return self.directory / "ca.pem"

    @property
    def aik_certificate(self) -> Path:
        return self.directory / "aik.pem"

    @classmethod
    def under(cls, state_dir: Path) -> IdentityFiles:
        return cls(state_dir / "identity")


def default_host_id() -> str:
    """This machine's host name, lower-cased, without a trailing dot."""
    return socket.gethostname().lower().rstrip(".")


def _fingerprint(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA256()).hex()


def _pinned(config: RegistrarConfig) -> str | None:
    return None if config.ca_sha256 is None else config.ca_sha256.replace(":", "").lower()


def _check_identity(
    ca_pem: bytes,
    aik_pem: bytes,
    tls_pem: bytes,
    tls_public: ec.EllipticCurvePublicKey,
    *,
    aik_name: bytes,
    host_id: str,
    ca_sha256: str | None,
    now: datetime,
) -> None:
    """Raise ChainError unless the identity is complete and good for this TPM and host."""
    try:
        ca = x509.load_pem_x509_certificate(ca_pem)
        aik = x509.load_pem_x509_certificate(aik_pem)
        tls = x509.load_pem_x509_certificate(tls_pem)
    except ValueError as err:
        raise ChainError(f"a stored certificate does not parse: {err}") from err
    if ca_sha256 is not None and _fingerprint(ca) != ca_sha256:
        raise ChainError(
            f"fleet CA: expected the configured SHA-256 {ca_sha256}, stored {_fingerprint(ca)}"
        )
    aik_public = verify_aik_certificate(aik.public_bytes(serialization.Encoding.DER), [ca], now)
    if object_name(aik_public) != aik_name:
        raise ChainError(
            f"AIK certificate: expected this TPM's AIK {aik_name.hex()}, "
            f"got {object_name(aik_public).hex()}"
        )
    subject = aik.subject.rfc4514_string()
    if subject != f"CN={host_id}":
        raise ChainError(f"AIK certificate: expected subject CN={host_id}, got {subject}")
    try:
        tls.verify_directly_issued_by(ca)
    except (InvalidSignature, ValueError, TypeError) as err:
        raise ChainError("mTLS certificate: expected one issued by the fleet CA") from err
    if not tls.not_valid_before_utc <= now <= tls.not_valid_after_utc:
        raise ChainError(
            f"mTLS certificate: valid until {tls.not_valid_after_utc.isoformat()}, "
            f"not at {now.isoformat()}"
        )
    if tls.public_key() != tls_public:
        raise ChainError("mTLS certificate: expected it to certify the stored mTLS key")


def _load_tls_key(path: Path) -> ec.EllipticCurvePrivateKey | None:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError):
        return None
    if isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP256R1):
        return key
    return None


def identity_problem(
    files: IdentityFiles,
    *,
    aik_name: bytes,
    host_id: str,
    ca_sha256: str | None,
    now: datetime,
) -> str | None:
    """Why the stored identity must be (re)made, or None when it is complete and good."""
    paths = (files.ca_certificate, files.aik_certificate, files.tls_certificate, files.tls_key)
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        return f"no stored {', '.join(missing)}"
    key = _load_tls_key(files.tls_key)
    if key is None:
        return f"{files.tls_key.name} is not a P-256 private key"
    try:
        _check_identity(
            files.ca_certificate.read_bytes(),
            files.aik_certificate.read_bytes(),
            files.tls_certificate.read_bytes(),
            key.public_key(),
            aik_name=aik_name,
            host_id=host_id,
            ca_sha256=ca_sha256,
            now=now,
        )
    except (VtpmError, OSError) as err:
        return str(err)
    return None


def _write_atomically(files: list[tuple[Path, bytes, int]]) -> None:
    """Write every file to a temporary name first, then rename them in order."""
    temps: list[tuple[Path, Path]] = []
    try:
        for path, data, mode in files:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            temp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
            temps.append((temp, path))
            with os.fdopen(fd, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            os.chmod(temp, mode)
        for temp, path in temps:
            os.replace(temp, path)
    except BaseException:
        for temp, _ in temps:
            with contextlib.suppress(FileNotFoundError):
                temp.unlink()
        raise
    dir_fd = os.open(files[0][0].parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _store(files: IdentityFiles, reg: Registration, key: ec.EllipticCurvePrivateKey) -> None:
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _write_atomically(
        [
            (files.ca_certificate, reg.ca_certificate, 0o644),
            (files.tls_key, key_pem, 0o600),
            (files.tls_certificate, reg.tls_certificate, 0o644),
            (files.aik_certificate, reg.aik_certificate, 0o644),
        ]
    )


# --------------------------------------------------------------------------------------------
# The embedded registrar


def registrar_command() -> list[str]:
    """How to run ``vtpm-verify registrar`` (the same interpreter, so the same installation)."""
    return [sys.executable, "-m", "verifier.cli", "registrar"]


def _tail(path: Path, limit: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-limit:].strip()
    except OSError:
        return ""


def _read_banner(proc: subprocess.Popen[str], deadline: float) -> str:
    assert proc.stdout is not None
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return ""
        ready, _, _ = select.select([proc.stdout], [], [], remaining)
        if ready:
            return proc.stdout.readline()


@contextlib.contextmanager
def embedded_registrar(
    state_dir: Path,
    *,
    ek_ca: Path | None,
    swtpm_localca: bool,
    log_path: Path,
    start_timeout: float = _START_TIMEOUT,
) -> Iterator[HttpsRegistrar]:
    """Run the embedded registrar as a child process and yield an HTTPS client for it.

    ``vtpm-verify registrar init --json`` creates (or completes) ``state_dir`` and reports the
    fleet CA fingerprint; ``serve --listen 127.0.0.1:0 --json`` reports the URL it bound. The
    client pins the CA by that fingerprint. The child is stopped (SIGTERM) on exit.

    Args:
        state_dir: the registrar's state directory.
        ek_ca: a PEM file of EK CA certificates to trust (merged into its bundle).
        swtpm_localca: also trust swtpm-localca (the software root's EK issuer).
        log_path: where the child's stderr goes (appended).
        start_timeout: seconds to wait for ``init`` and for ``serve`` to listen.

    Raises:
        EmbeddedRegistrarError: ``init`` failed or ``serve`` did not report a URL in time.
    """
    cmd = registrar_command()
    init_args = [*cmd, "init", "--state-dir", str(state_dir), "--json"]
    if ek_ca is not None:
        init_args += ["--ek-ca", str(ek_ca)]
    if swtpm_localca:
        init_args.append("--swtpm-localca")
    try:
        init = subprocess.run(
            init_args, capture_output=True, text=True, timeout=start_timeout, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        raise EmbeddedRegistrarError(f"embedded registrar: `registrar init` failed: {err}") from err
    if init.returncode != 0:
        raise EmbeddedRegistrarError(
            f"embedded registrar: `registrar init` exited {init.returncode}: "
            f"{init.stderr.strip() or init.stdout.strip()}"
        )
    try:
        fingerprint = str(json.loads(init.stdout)["ca_sha256"])
    except (ValueError, KeyError, TypeError) as err:
        raise EmbeddedRegistrarError(
            f"embedded registrar: `registrar init --json` printed {init.stdout[:200]!r}"
        ) from err

    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as err_log:
        try:
            proc = subprocess.Popen(
                [*cmd, "serve", "--state-dir", str(state_dir), "--listen", "127.0.0.1:0", "--json"],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=err_log,
                text=True,
            )
        except OSError as err:
            raise EmbeddedRegistrarError(f"embedded registrar: cannot start: {err}") from err
    try:
        line = _read_banner(proc, time.monotonic() + start_timeout)
        try:
            banner = json.loads(line)
            url, served = str(banner["url"]), str(banner["ca_sha256"])
        except (ValueError, KeyError, TypeError) as err:
            raise EmbeddedRegistrarError(
                f"embedded registrar: `registrar serve --json` did not report its URL within "
                f"{start_timeout:.0f}s (got {line[:200]!r}); its log {log_path}: "
                f"{_tail(log_path)}"
            ) from err
        if served != fingerprint:
            raise EmbeddedRegistrarError(
                f"embedded registrar: serves fleet CA {served}, `init` reported {fingerprint}"
            )
        yield HttpsRegistrar(url, ca_sha256=fingerprint)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


@contextlib.contextmanager
def _registrar(config: AgentConfig, root: str) -> Iterator[tuple[HttpsRegistrar, str]]:
    reg = config.registrar
    if reg.url is not None:
        pinned = _pinned(reg)
        if pinned is None:
            raise AdmissionError(
                f"registrar.url is {reg.url}, but registrar.ca_sha256 is not set: give the fleet "
                "CA's SHA-256 fingerprint (`vtpm-verify registrar ca` prints it) so the host "
                "can trust the registrar"
            )
        try:
            client = HttpsRegistrar(reg.url, ca_sha256=pinned)
        except ValueError as err:
            raise AdmissionError(f"registrar.url: {err}") from err
        yield client, f"the registrar at {reg.url}"
        return
    with embedded_registrar(
        config.state_dir / "registrar",
        ek_ca=reg.ek_ca,
        swtpm_localca=reg.ek_ca is None and root == "software",
        log_path=config.state_dir / "registrar.log",
    ) as client:
        yield client, "the embedded registrar"


def _utcnow() -> datetime:
    return datetime.now(UTC)


def register_with_registrar(
    tpm: HostTpm,
    config: AgentConfig,
    keys: HostKeyReport,
    *,
    clock: Callable[[], datetime] = _utcnow,
) -> str | None:
    """The ``init`` step: admit this host unless its stored identity is still good.

    Args:
        tpm: the host TPM (host keys exist).
        config: the agent configuration (``state_dir``, ``registrar``).
        keys: the host key report (unused: the AIK Name is read from the TPM).
        clock: current time, timezone-aware.

    Returns:
        None when nothing was to be done; else one line saying what was done.

    Raises:
        RegistrarRefused: the registrar refused this host (its error id in ``remote_id``).
        RegistrarUnreachable: the registrar could not be reached or spoke outside the API.
        ChainError: the registrar's answer is not a valid identity for this host.
        AdmissionError: the configuration does not allow admission (embedded registrar failed,
            remote registrar without a CA fingerprint).
    """
    del keys
    files = IdentityFiles.under(config.state_dir)
    host_id = config.registrar.host_id or default_host_id()
    aik_name = tpm.aik_name()
    pinned = _pinned(config.registrar)
    problem = identity_problem(
        files, aik_name=aik_name, host_id=host_id, ca_sha256=pinned, now=clock()
    )
    if problem is None:
        log.info("admission: nothing to do, %s verifies for this AIK", files.aik_certificate)
        return None
    log.info("admission: registering %s (%s)", host_id, problem)
    tls_key = _load_tls_key(files.tls_key) or ec.generate_private_key(ec.SECP256R1())
    with _registrar(config, tpm.root) as (registrar, where):
        reg = register_host(tpm, registrar, host_id, tls_key)
    _check_identity(
        reg.ca_certificate,
        reg.aik_certificate,
        reg.tls_certificate,
        tls_key.public_key(),
        aik_name=aik_name,
        host_id=host_id,
        ca_sha256=pinned,
        now=clock(),
    )
    _store(files, reg, tls_key)
    ca = x509.load_pem_x509_certificate(reg.ca_certificate)
    return (
        f"registered {host_id} with {where}: AIK certificate {files.aik_certificate} "
        f"(fleet CA sha256 {_fingerprint(ca)})"
    )
