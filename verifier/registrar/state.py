"""The registrar's state directory: keys, certificates, EK CA bundle, config and database.

Layout (created by :func:`init_state`; directory mode 0700, private keys 0600)::

    registrar.json      RegistrarConfig (unknown keys are errors)
    fleet-ca.key        fleet CA private key (ECDSA P-256, PKCS#8 PEM)         0600
    fleet-ca.pem        fleet CA certificate (self-signed)
    fleet-policy.key    fleet policy key (ECDSA P-256): signs PolicyAuthorize approvals  0600
    server.key          the registrar's HTTPS key                              0600
    server.pem          the registrar's HTTPS certificate, issued by the fleet CA
    ek-ca-bundle.pem    the EK CA certificates trusted to vouch for host EKs
    registrar.db        SQLite database (unless ``database_url`` points elsewhere)

:func:`init_state` is idempotent: it creates what is missing, merges new EK CA certificates into
the bundle, and never replaces an existing key.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from verifier.registrar.ca import FleetCa, new_ca_certificate
from verifier.registrar.ekcert import EkTrustBundle, merge_bundles
from verifier.registrar.errors import RegistrarStateError
from verifier.registrar.service import RegistrarOptions, RegistrarService
from verifier.registrar.store import RegistrarStore

__all__ = [
    "SWTPM_LOCALCA_DIR",
    "InitReport",
    "RegistrarConfig",
    "init_state",
    "load_config",
    "open_service",
    "server_credentials",
    "swtpm_localca_certificates",
]

SWTPM_LOCALCA_DIR = Path("/var/lib/swtpm-localca")
_CONFIG = "registrar.json"
_CA_KEY = "fleet-ca.key"
_CA_CERT = "fleet-ca.pem"
_POLICY_KEY = "fleet-policy.key"
_SERVER_KEY = "server.key"
_SERVER_CERT = "server.pem"
_BUNDLE = "ek-ca-bundle.pem"
_DB = "registrar.db"


@dataclass(frozen=True)
class RegistrarConfig:
    """What ``registrar.json`` holds.

    Attributes:
        fleet_name: the fleet CA certificate's common name.
        database_url: SQLAlchemy URL; empty means the SQLite file in the state directory.
        server_names: DNS names and IP addresses the registrar's HTTPS certificate covers.
        challenge_ttl_seconds: how long a host has to answer a credential challenge.
        aik_lifetime_days: validity of issued AIK certificates.
        tls_lifetime_days: validity of issued mTLS certificates.
    """

    fleet_name: str = "vtpm-trust fleet CA"
    database_url: str = ""
    server_names: tuple[str, ...] = ("localhost", "127.0.0.1", "::1")
    challenge_ttl_seconds: int = 300
    aik_lifetime_days: int = 3650
    tls_lifetime_days: int = 825

    def options(self) -> RegistrarOptions:
        return RegistrarOptions(
            challenge_ttl=timedelta(seconds=self.challenge_ttl_seconds),
            aik_lifetime=timedelta(days=self.aik_lifetime_days),
            tls_lifetime=timedelta(days=self.tls_lifetime_days),
        )

    def url(self, state_dir: Path) -> str:
        return self.database_url or f"sqlite:///{state_dir / _DB}"


@dataclass(frozen=True)
class InitReport:
    """What :func:`init_state` did."""

    state_dir: Path
    created: tuple[str, ...]
    ek_ca_subjects: tuple[str, ...]
    ca_certificate: x509.Certificate
    config: RegistrarConfig = field(default_factory=RegistrarConfig)


def swtpm_localca_certificates(directory: Path = SWTPM_LOCALCA_DIR) -> list[bytes]:
    """The CA certificates swtpm_setup's local CA signs EK certificates with (root + issuer).

    Raises:
        RegistrarStateError: the directory holds neither certificate.
    """
    pems = [
        (directory / name).read_bytes()
        for name in ("swtpm-localca-rootca-cert.pem", "issuercert.pem")
        if (directory / name).is_file()
    ]
    if not pems:
        raise RegistrarStateError(
            f"swtpm-localca: expected swtpm-localca-rootca-cert.pem and issuercert.pem in "
            f"{directory}, found neither (run swtpm_setup --create-ek-cert once)"
        )
    return pems


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _write_public(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(data)
    os.chmod(tmp, 0o644)
    tmp.replace(path)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _load_key(path: Path) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise RegistrarStateError(f"{path}: expected an ECDSA private key")
    return key


def load_config(state_dir: Path) -> RegistrarConfig:
    """Read ``registrar.json``; unknown keys and wrong types are errors."""
    path = state_dir / _CONFIG
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError as err:
        raise RegistrarStateError(
            f"{state_dir}: not a registrar state directory (no {_CONFIG}); "
            "run `vtpm-verify registrar init --state-dir DIR` first"
        ) from err
    except (OSError, ValueError) as err:
        raise RegistrarStateError(f"{path}: unreadable ({err})") from err
    known = set(RegistrarConfig.__dataclass_fields__)
    if not isinstance(raw, dict) or set(raw) - known:
        extra = sorted(set(raw) - known) if isinstance(raw, dict) else raw
        raise RegistrarStateError(f"{path}: unknown settings {extra}; known: {sorted(known)}")
    if "server_names" in raw:
        raw["server_names"] = tuple(raw["server_names"])
    try:
        config = RegistrarConfig(**raw)
    except TypeError as err:
        raise RegistrarStateError(f"{path}: {err}") from err
    for key, value in asdict(config).items():
        default = getattr(RegistrarConfig(), key)
        if not isinstance(value, type(default)):
            raise RegistrarStateError(
                f"{path}: {key} must be {type(default).__name__}, got {type(value).__name__}"
            )
    return config


def _serial(random_bytes: Callable[[int], bytes]) -> int:
    return int.from_bytes(random_bytes(16), "big") >> 1 | 1


def init_state(
    state_dir: Path,
    *,
    ek_ca_pems: Sequence[bytes] = (),
    config: RegistrarConfig | None = None,
    server_names: Sequence[str] | None = None,
    now: datetime,
    random_bytes: Callable[[int], bytes],
) -> InitReport:
    """Create (or complete) a registrar state directory; idempotent.

    Args:
        state_dir: the directory (created with mode 0700 if missing).
        ek_ca_pems: PEM certificates to add to the EK CA bundle.
        config: settings for a new directory; an existing ``registrar.json`` is kept as is.
        server_names: names the HTTPS certificate must cover; when they differ from the
            configured ones, the configuration is updated and the certificate re-issued
            (same key, so clients that trust the fleet CA notice nothing).
        now: the current time (UTC), for the certificates' validity.
        random_bytes: source of serial numbers.

    Raises:
        RegistrarStateError: a new directory without any EK CA certificate, or unreadable files.
    """
    created: list[str] = []
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    if not (state_dir / _CONFIG).exists():
        cfg = config or RegistrarConfig()
        data = asdict(cfg)
        data["server_names"] = list(cfg.server_names)
        _write_public(state_dir / _CONFIG, (json.dumps(data, indent=2) + "\n").encode())
        created.append(_CONFIG)
    cfg = load_config(state_dir)
    reissue = server_names is not None and tuple(server_names) != cfg.server_names
    if reissue:
        assert server_names is not None
        cfg = replace(cfg, server_names=tuple(server_names))
        data = asdict(cfg)
        data["server_names"] = list(cfg.server_names)
        _write_public(state_dir / _CONFIG, (json.dumps(data, indent=2) + "\n").encode())
        created.append(f"{_CONFIG} (server_names)")
    for name in (_CA_KEY, _POLICY_KEY, _SERVER_KEY):
        if not (state_dir / name).exists():
            _write_private(state_dir / name, _key_pem(ec.generate_private_key(ec.SECP256R1())))
            created.append(name)
    ca_key = _load_key(state_dir / _CA_KEY)
    if not (state_dir / _CA_CERT).exists():
        cert = new_ca_certificate(
            ca_key, common_name=cfg.fleet_name, now=now, serial=_serial(random_bytes)
        )
        _write_public(state_dir / _CA_CERT, cert.public_bytes(serialization.Encoding.PEM))
        created.append(_CA_CERT)
    bundle_path = state_dir / _BUNDLE
    existing = [bundle_path.read_bytes()] if bundle_path.exists() else []
    if not existing and not ek_ca_pems:
        raise RegistrarStateError(
            "EK CA bundle: expected at least one EK CA certificate for a new registrar "
            "(--ek-ca FILE, or --swtpm-localca for the software root's local CA)"
        )
    bundle = merge_bundles([*existing, *ek_ca_pems])
    if not existing or bundle.to_pem() != existing[0]:
        _write_public(bundle_path, bundle.to_pem())
        created.append(_BUNDLE)
    ca = _load_ca(state_dir)
    if reissue or not (state_dir / _SERVER_CERT).exists():
        _issue_server_cert(state_dir, ca, cfg, now=now, random_bytes=random_bytes)
        created.append(_SERVER_CERT)
    RegistrarStore.open(cfg.url(state_dir)).close()
    return InitReport(
        state_dir=state_dir,
        created=tuple(created),
        ek_ca_subjects=tuple(c.subject.rfc4514_string() for c in bundle.certificates),
        ca_certificate=ca.certificate,
        config=cfg,
    )


def _issue_server_cert(
    state_dir: Path,
    ca: FleetCa,
    cfg: RegistrarConfig,
    *,
    now: datetime,
    random_bytes: Callable[[int], bytes],
) -> None:
    import ipaddress

    key = _load_key(state_dir / _SERVER_KEY)
    dns: list[str] = []
    ips: list[str] = []
    for name in cfg.server_names:
        try:
            ipaddress.ip_address(name)
            ips.append(name)
        except ValueError:
            dns.append(name)
    cert = ca.issue_tls_certificate(
        "vtpm-trust registrar",
        key.public_key(),
        dns_names=tuple(dns),
        ip_addresses=tuple(ips),
        now=now,
        lifetime=timedelta(days=cfg.tls_lifetime_days),
        serial=_serial(random_bytes),
    )
    _write_public(state_dir / _SERVER_CERT, cert.public_bytes(serialization.Encoding.PEM))


def _load_ca(state_dir: Path) -> FleetCa:
    try:
        cert = x509.load_pem_x509_certificate((state_dir / _CA_CERT).read_bytes())
        return FleetCa(
            key=_load_key(state_dir / _CA_KEY),
            certificate=cert,
            policy_key=_load_key(state_dir / _POLICY_KEY),
        )
    except (OSError, ValueError) as err:
        raise RegistrarStateError(f"{state_dir}: fleet CA unreadable ({err})") from err


def server_credentials(state_dir: Path) -> tuple[Path, Path]:
    """Paths of the registrar's HTTPS certificate and key."""
    return state_dir / _SERVER_CERT, state_dir / _SERVER_KEY


def open_service(
    state_dir: Path,
    *,
    clock: Callable[[], datetime],
    random_bytes: Callable[[int], bytes],
) -> tuple[RegistrarService, RegistrarStore]:
    """Build the service from a state directory (the caller closes the store)."""
    cfg = load_config(state_dir)
    ca = _load_ca(state_dir)
    try:
        bundle = EkTrustBundle.from_pem((state_dir / _BUNDLE).read_bytes())
    except OSError as err:
        raise RegistrarStateError(f"{state_dir}: EK CA bundle unreadable ({err})") from err
    store = RegistrarStore.open(cfg.url(state_dir))
    service = RegistrarService(
        ca, bundle, store, options=cfg.options(), clock=clock, random_bytes=random_bytes
    )
    return service, store
