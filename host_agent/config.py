"""Configuration of the host agent: one tree of frozen dataclasses, built once at the edge.

``load_config(path, environ)`` reads an optional TOML file, applies the environment overrides
declared in :data:`ENV_OVERRIDES` (the only place environment variables are read), fills derived
defaults and returns an :class:`AgentConfig`. Components receive their slice (``TpmConfig``,
``StoreConfig``…) in their constructor; nothing reads configuration at import time, and tests
build the dataclasses directly.

File format (every key optional; unknown keys are errors)::

    state_dir = "/var/lib/vtpm-trust"

    [tpm]
    tcti = "device:/dev/tpmrm0"    # absent: first tpmrm device (pyudev), else the software root
    state_dir = "/var/lib/vtpm-trust/tpm"          # default: <state_dir>/tpm
    allow_software_root = true

    [store]
    url = "postgresql+psycopg://…"               # default: sqlite:///<state_dir>/store.sqlite

    [registrar]
    url = "https://registrar.example:8443"       # absent: the embedded registrar
    ca_sha256 = "5d41…"                          # with url: SHA-256 of the fleet CA (DER), hex
    host_id = "hv01.example"                     # default: the hostname, lower-cased
    ek_ca = "/etc/vtpm-trust/ek-ca.pem"          # embedded: EK CAs (software root: swtpm-localca)

    [libvirt]
    uri = "qemu:///system"                       # absent: qemu:///embed?root=<state_dir>/libvirt

    [logging]
    format = "json"                              # "text" (default) or "json": one object a line
    level = "info"                               # debug | info | warning | error | critical

    [metrics]
    listen = "127.0.0.1:9477"                    # HOST:PORT ([::1]:PORT) or "off"; absent: the
                                                 # metrics component's default (127.0.0.1:9477)
    allow_non_loopback = false                   # true to listen beyond this machine

Adding a section: add a frozen dataclass with defaults and a field of that type on
:class:`AgentConfig`; the loader walks the dataclasses, so it needs no other change.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from evidence.errors import VtpmError
from host_agent.logging_setup import LOG_FORMATS

__all__ = [
    "DEFAULT_STATE_DIR",
    "ENV_OVERRIDES",
    "LOG_LEVELS",
    "AgentConfig",
    "ConfigError",
    "LibvirtConfig",
    "LoggingConfig",
    "MetricsEndpointConfig",
    "RegistrarConfig",
    "StoreConfig",
    "TpmConfig",
    "load_config",
    "parse_listen",
]

DEFAULT_STATE_DIR = Path("/var/lib/vtpm-trust")


class ConfigError(VtpmError):
    """The configuration file or an override is invalid (unknown key, wrong type, bad TOML)."""

    id: ClassVar[str] = "config.invalid"


@dataclass(frozen=True)
class TpmConfig:
    """Host TPM.

    Attributes:
        tcti: TCTI string; wins over discovery when set (``"device:/dev/tpmrm0"``,
            ``"swtpm:path=/run/swtpm.sock"``).
        state_dir: host key blobs and, when used, the software root's swtpm state.
        allow_software_root: with no TPM found, create the embedded development swtpm.
    """

    tcti: str | None = None
    state_dir: Path = DEFAULT_STATE_DIR / "tpm"
    allow_software_root: bool = True


@dataclass(frozen=True)
class StoreConfig:
    """Trusted store. ``url`` is an SQLAlchemy URL; None means the SQLite file in the state dir."""

    url: str | None = None


@dataclass(frozen=True)
class RegistrarConfig:
    """Fleet registrar. ``url`` None means the embedded (single-host) registrar.

    Attributes:
        url: ``https://HOST[:PORT]`` of the fleet registrar; None: run the embedded one.
        ca_sha256: with ``url``, the SHA-256 fingerprint (hex, colons allowed) of the fleet CA
            certificate: the host fetches the CA once and keeps it only if it matches.
        host_id: this host's name in the fleet; None: the hostname, lower-cased.
        ek_ca: embedded registrar only: a PEM file of the EK CA certificates it trusts. None
            trusts swtpm-localca, which only the software root's EK certificates chain to.
    """

    url: str | None = None
    ca_sha256: str | None = None
    host_id: str | None = None
    ek_ca: Path | None = None

    def __post_init__(self) -> None:
        if self.ca_sha256 is not None:
            digits = self.ca_sha256.replace(":", "").lower()
            if len(digits) != 64 or any(c not in "0123456789abcdef" for c in digits):
                raise ConfigError(
                    f"registrar.ca_sha256: expected 64 hex digits, got {self.ca_sha256!r}"
                )

    @property
    def embedded(self) -> bool:
        return self.url is None


@dataclass(frozen=True)
class LibvirtConfig:
    """The hypervisor connection. ``uri`` None means libvirt's embedded QEMU driver rooted in the
    agent's state directory (:meth:`uri_for`)."""

    uri: str | None = None

    def uri_for(self, state_dir: Path) -> str:
        """The URI to open: ``uri``, else ``qemu:///embed?root=<state_dir>/libvirt``."""
        return self.uri if self.uri is not None else f"qemu:///embed?root={state_dir / 'libvirt'}"


LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


@dataclass(frozen=True)
class LoggingConfig:
    """The daemon's logs (on stderr; ``host_agent/logging_setup.py``).

    Attributes:
        format: ``text`` (readable lines) or ``json`` (one JSON object per line).
        level: ``debug``, ``info``, ``warning``, ``error`` or ``critical`` (any case).
    """

    format: str = "text"
    level: str = "info"

    def __post_init__(self) -> None:
        if self.format not in LOG_FORMATS:
            raise ConfigError(
                f"logging.format: expected one of {', '.join(LOG_FORMATS)}, got {self.format!r}"
            )
        if self.level.lower() not in LOG_LEVELS:
            raise ConfigError(
                f"logging.level: expected one of {', '.join(LOG_LEVELS)}, got {self.level!r}"
            )


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def parse_listen(text: str, where: str = "metrics.listen") -> tuple[str, int] | None:
    """``"HOST:PORT"`` (``"[::1]:PORT"`` for IPv6) as ``(host, port)``; ``"off"`` as None.

    Raises:
        ConfigError: anything else, naming ``where``, what was expected and what arrived.
    """
    expected = f'{where}: expected "HOST:PORT" (port 0-65535), "[IPV6]:PORT" or "off", got'
    if text.strip().lower() == "off":
        return None
    host, sep, port_text = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ConfigError(f"{expected} {text!r} (put an IPv6 address in brackets)")
    if not sep or not host or not port_text.isdigit() or int(port_text) > 65535:
        raise ConfigError(f"{expected} {text!r}")
    return host, int(port_text)


@dataclass(frozen=True)
class MetricsEndpointConfig:
    """Where the Prometheus endpoint (``host_agent/service/metrics.py``) listens.

    Attributes:
        listen: ``"HOST:PORT"``, ``"[IPV6]:PORT"`` or ``"off"``; None: not configured here, the
            metrics component's own default applies (``127.0.0.1:9477``).
        allow_non_loopback: accept a non-loopback ``listen`` host (publishes the metrics beyond
            this machine; otherwise such an address is refused).
    """

    listen: str | None = None
    allow_non_loopback: bool = False

    def __post_init__(self) -> None:
        address = self.address
        if address is not None and not self.allow_non_loopback and not _is_loopback(address[0]):
            raise ConfigError(
                f"metrics.listen: expected a loopback address (127.0.0.1, [::1], localhost) "
                f"unless metrics.allow_non_loopback = true, got {self.listen!r}"
            )

    @property
    def address(self) -> tuple[str, int] | None:
        """``(host, port)``, or None when unset or ``"off"`` (see :attr:`enabled`)."""
        return None if self.listen is None else parse_listen(self.listen)

    @property
    def enabled(self) -> bool | None:
        """True: listen at :attr:`address`; False: ``"off"``; None: not configured here."""
        return None if self.listen is None else self.address is not None


@dataclass(frozen=True)
class AgentConfig:
    """The root of the host agent's configuration."""

    state_dir: Path = DEFAULT_STATE_DIR
    tpm: TpmConfig = field(default_factory=TpmConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    registrar: RegistrarConfig = field(default_factory=RegistrarConfig)
    libvirt: LibvirtConfig = field(default_factory=LibvirtConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    metrics: MetricsEndpointConfig = field(default_factory=MetricsEndpointConfig)


#: Environment variable → dotted config key. The one place the environment is consulted.
ENV_OVERRIDES: Mapping[str, str] = {
    "VTPM_STATE_DIR": "state_dir",
    "VTPM_TPM_TCTI": "tpm.tcti",
    "VTPM_TPM_STATE_DIR": "tpm.state_dir",
    "VTPM_STORE_URL": "store.url",
    "VTPM_REGISTRAR_URL": "registrar.url",
    "VTPM_REGISTRAR_CA_SHA256": "registrar.ca_sha256",
    "VTPM_HOST_ID": "registrar.host_id",
    "VTPM_LIBVIRT_URI": "libvirt.uri",
    "VTPM_LOG_FORMAT": "logging.format",
    "VTPM_LOG_LEVEL": "logging.level",
    "VTPM_METRICS_LISTEN": "metrics.listen",
}


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str, *, from_env: bool) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        if from_env and value == "" and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _coerce(value, inner[0], where, from_env=from_env)
        raise ConfigError(f"{where}: unsupported type {tp}")
    if tp is Path:
        if isinstance(value, Path):
            return value
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{where}: expected a path (string), got {value!r}")
        return Path(value)
    if tp is bool:
        if from_env and isinstance(value, str):
            low = value.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if from_env and isinstance(value, str):
            try:
                return int(value, 0)
            except ValueError:
                pass
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported type {_type_name(tp)}")


def _build(cls: type[Any], table: Mapping[str, Any], where: str, *, from_env: bool = False) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(table) - set(fields))
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(
            f"unknown key(s) {', '.join(prefix + k for k in unknown)}; "
            f"allowed here: {', '.join(sorted(fields))}"
        )
    kwargs: dict[str, Any] = {}
    for name, value in table.items():
        key = f"{where}.{name}" if where else name
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, Mapping):
                raise ConfigError(f"{key}: expected a table")
            kwargs[name] = _build(tp, value, key, from_env=from_env)  # type: ignore[arg-type]
        else:
            kwargs[name] = _coerce(value, tp, key, from_env=from_env)
    return cls(**kwargs)


def _merge(base: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = base
    for p in parts[:-1]:
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{p}: expected a table")
        node = child
    node[parts[-1]] = value


def _hint(dotted: str) -> Any:
    cls: Any = AgentConfig
    tp: Any = None
    for part in dotted.split("."):
        tp = typing.get_type_hints(cls)[part]
        cls = tp
    return tp


def load_config(path: Path | None, environ: Mapping[str, str]) -> AgentConfig:
    """Build the agent's configuration.

    Order of precedence (later wins): defaults, the TOML file at ``path`` (if given), environment
    overrides (:data:`ENV_OVERRIDES`). Derived defaults: ``tpm.state_dir`` = ``<state_dir>/tpm``.

    Raises:
        ConfigError: unreadable file, bad TOML, unknown key, wrong type.
    """
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            raw = tomllib.loads(Path(path).read_text())
        except OSError as err:
            raise ConfigError(f"cannot read config file {path}: {err}") from err
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"config file {path} is not valid TOML: {err}") from err
    for var, key in ENV_OVERRIDES.items():
        if var in environ:
            _merge(raw, key, _coerce(environ[var], _hint(key), var, from_env=True))
    config: AgentConfig = _build(AgentConfig, raw, "")
    tpm_table = raw.get("tpm", {})
    if "state_dir" not in tpm_table:
        config = dataclasses.replace(
            config, tpm=dataclasses.replace(config.tpm, state_dir=config.state_dir / "tpm")
        )
    return config


def with_state_dir(config: AgentConfig, state_dir: Path) -> AgentConfig:
    """``config`` with another agent state directory (the CLI's ``--state-dir``).

    Sub-directories that were derived from the old state dir move with it.
    """
    tpm_dir = config.tpm.state_dir
    if tpm_dir == config.state_dir / "tpm":
        tpm_dir = state_dir / "tpm"
    return dataclasses.replace(
        config, state_dir=state_dir, tpm=dataclasses.replace(config.tpm, state_dir=tpm_dir)
    )
