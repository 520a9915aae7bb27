"""Prometheus metrics of the host agent: counters and histograms, and an HTTP endpoint.

Three parts, each testable alone:

- :func:`render_exposition` — pure: metric families in, the Prometheus text exposition format
  (version 0.0.4) out. No clock, no I/O.
- :class:`AgentMetrics` — the agent's metrics (thread-safe), fed by the daemon's services:

  ========================================  =========  =====================================
  name                                      type       labels
  ========================================  =========  =====================================
  ``vtpm_attestations_total``               counter    ``result`` = ``ok`` | ``refused``
  ``vtpm_refusals_total``                   counter    ``reason`` = the refusal's error id
  ``vtpm_seal_duration_seconds``            histogram  (save/snapshot/outgoing migration)
  ``vtpm_verify_duration_seconds``          histogram  (restore/incoming migration check)
  ``vtpm_bridge_relay_errors_total``        counter    ``vm`` (UUID), ``kind``
  ``vtpm_vms``                              gauge      ``bridge`` = connected|running|down
  ========================================  =========  =====================================

  Refusal reasons are the stable dotted error ids (``restore.memory_mismatch``…), so their number
  is bounded by the error tree, never by user input. Relay error kinds are those of
  ``host_agent.vtpm.bridge_state.RELAY_ERROR_KINDS`` (``swtpm_gone``, ``qemu_malformed``…); the
  bridges count them and the daemon collects them (:meth:`AgentMetrics.relay_source`).
- :class:`MetricsComponent` — a daemon component (``start(daemon)`` / ``stop()``) serving
  ``GET /metrics`` on ``127.0.0.1:<port>`` (:class:`MetricsConfig`). It binds loopback only unless
  ``allow_non_loopback`` is set: put a reverse proxy or the node exporter's textfile collector
  in front to publish it.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import math
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

from evidence.errors import VtpmError

__all__ = [
    "CONTENT_TYPE",
    "DEFAULT_BUCKETS",
    "DEFAULT_METRICS_PORT",
    "AgentMetrics",
    "MetricFamily",
    "MetricsComponent",
    "MetricsConfig",
    "MetricsSettingsError",
    "Sample",
    "load_metrics_settings",
    "render_exposition",
]

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
DEFAULT_METRICS_PORT = 9477
#: Seconds: sealing hashes guest memory (0.2 s per 256 MiB, seconds per GiB), so the buckets
#: run from 10 ms to a minute.
DEFAULT_BUCKETS: tuple[float, ...] = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


# ---------------------------------------------------------------------------- exposition format


@dataclass(frozen=True)
class Sample:
    """One line: ``name{labels} value`` (``name`` includes a ``_bucket``/``_sum`` suffix)."""

    name: str
    labels: tuple[tuple[str, str], ...]
    value: float


@dataclass(frozen=True)
class MetricFamily:
    name: str
    type: str  # counter | gauge | histogram
    help: str
    samples: tuple[Sample, ...] = field(default_factory=tuple)


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _escape_label(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _format_value(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value == int(value) and abs(value) < 2**53:
        return str(int(value))
    return repr(float(value))


def render_exposition(families: Iterable[MetricFamily]) -> str:
    """The Prometheus text exposition format (0.0.4) of ``families``, in the order given.

    Each family gets its ``# HELP`` and ``# TYPE`` lines, then its samples; label values and help
    text are escaped as the format requires (backslash, newline, and ``"`` in label values).
    """
    out: list[str] = []
    for fam in families:
        out.append(f"# HELP {fam.name} {_escape_help(fam.help)}")
        out.append(f"# TYPE {fam.name} {fam.type}")
        for s in fam.samples:
            labels = ""
            if s.labels:
                labels = "{" + ",".join(f'{k}="{_escape_label(v)}"' for k, v in s.labels) + "}"
            out.append(f"{s.name}{labels} {_format_value(s.value)}")
    return "\n".join(out) + "\n" if out else ""


def _le(bound: float) -> str:
    return "+Inf" if math.isinf(bound) else _format_value(bound)


# ---------------------------------------------------------------------------- metric state


class _Histogram:
    def __init__(self, buckets: Sequence[float]) -> None:
        self.bounds = (*sorted(buckets), math.inf)
        self.counts = [0] * len(self.bounds)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.bounds):
            if value <= bound:
                self.counts[i] += 1
        self.sum += value
        self.count += 1

    def samples(self, name: str, labels: tuple[tuple[str, str], ...]) -> list[Sample]:
        out = [
            Sample(f"{name}_bucket", (*labels, ("le", _le(b))), float(c))
            for b, c in zip(self.bounds, self.counts, strict=True)
        ]
        out.append(Sample(f"{name}_sum", labels, self.sum))
        out.append(Sample(f"{name}_count", labels, float(self.count)))
        return out


class AgentMetrics:
    """The host agent's metrics. Every method is thread-safe and cheap; durations in seconds."""

    def __init__(self, buckets: Sequence[float] = DEFAULT_BUCKETS) -> None:
        self._lock = threading.Lock()
        self._attestations: dict[str, int] = {"ok": 0, "refused": 0}
        self._refusals: dict[str, int] = {}
        self._relay_errors: dict[tuple[str, str], int] = {}
        self._relay_source: Callable[[], Mapping[tuple[str, str], int]] | None = None
        self._seal = _Histogram(buckets)
        self._verify = _Histogram(buckets)
        self._vm_source: Callable[[], Mapping[str, int]] | None = None

    def attestation(self, *, ok: bool, reason: str | None = None) -> None:
        """An attestation request ended; a refusal also counts under its ``reason``."""
        with self._lock:
            self._attestations["ok" if ok else "refused"] += 1
            if not ok:
                key = reason or "unknown"
                self._refusals[key] = self._refusals.get(key, 0) + 1

    def refusal(self, reason: str) -> None:
        """Something other than an attestation was refused (a restore, a migration…)."""
        with self._lock:
            self._refusals[reason] = self._refusals.get(reason, 0) + 1

    def seal_duration(self, seconds: float) -> None:
        with self._lock:
            self._seal.observe(seconds)

    def verify_duration(self, seconds: float) -> None:
        with self._lock:
            self._verify.observe(seconds)

    def relay_error(self, kind: str, vm_uuid: str = "") -> None:
        """Count one relay error seen outside the bridges' own counters."""
        with self._lock:
            key = (vm_uuid, kind)
            self._relay_errors[key] = self._relay_errors.get(key, 0) + 1

    def relay_source(self, source: Callable[[], Mapping[tuple[str, str], int]] | None) -> None:
        """Where the bridges' relay errors come from: a callable giving monotonic totals
        ``{(vm_uuid, kind): n}`` (the daemon's :meth:`~host_agent.service.daemon.Daemon.
        poll_bridges`), read at each scrape and added to :meth:`relay_error`'s counts."""
        self._relay_source = source

    def vm_source(self, source: Callable[[], Mapping[str, int]] | None) -> None:
        """Where ``vtpm_vms`` comes from: a callable giving VM counts by bridge state."""
        self._vm_source = source

    def families(self) -> list[MetricFamily]:
        """A consistent snapshot of every family."""
        relay: dict[tuple[str, str], int] = {}
        relay_source = self._relay_source
        if relay_source is not None:
            try:
                relay = dict(relay_source())
            except Exception:  # a failing source must not break the scrape
                log.exception("relay error source failed")
        with self._lock:
            for key, n in self._relay_errors.items():
                relay[key] = relay.get(key, 0) + n
            fams = [
                MetricFamily(
                    "vtpm_attestations_total",
                    "counter",
                    "Attestation requests answered, by result.",
                    tuple(
                        Sample("vtpm_attestations_total", (("result", k),), float(v))
                        for k, v in sorted(self._attestations.items())
                    ),
                ),
                MetricFamily(
                    "vtpm_refusals_total",
                    "counter",
                    "Refusals (attestation, restore, migration), by reason (error id).",
                    tuple(
                        Sample("vtpm_refusals_total", (("reason", k),), float(v))
                        for k, v in sorted(self._refusals.items())
                    ),
                ),
                MetricFamily(
                    "vtpm_seal_duration_seconds",
                    "histogram",
                    "Time to seal a VM's state at save, snapshot or outgoing migration.",
                    tuple(self._seal.samples("vtpm_seal_duration_seconds", ())),
                ),
                MetricFamily(
                    "vtpm_verify_duration_seconds",
                    "histogram",
                    "Time to verify a restored or incoming VM against its sealed record.",
                    tuple(self._verify.samples("vtpm_verify_duration_seconds", ())),
                ),
                MetricFamily(
                    "vtpm_bridge_relay_errors_total",
                    "counter",
                    "Errors relaying between QEMU and swtpm in the bridges, by VM and kind.",
                    tuple(
                        Sample(
                            "vtpm_bridge_relay_errors_total",
                            (("vm", vm), ("kind", kind)),
                            float(n),
                        )
                        for (vm, kind), n in sorted(relay.items())
                    ),
                ),
            ]
        source = self._vm_source
        if source is not None:
            try:
                counts = dict(source())
            except Exception:  # a failing source must not break the scrape
                log.exception("vtpm_vms source failed")
                counts = {}
            fams.append(
                MetricFamily(
                    "vtpm_vms",
                    "gauge",
                    "VMs known to the agent, by bridge state.",
                    tuple(
                        Sample("vtpm_vms", (("bridge", k),), float(v))
                        for k, v in sorted(counts.items())
                    ),
                )
            )
        return fams

    def exposition(self) -> str:
        return render_exposition(self.families())


# ---------------------------------------------------------------------------- the endpoint


class MetricsSettingsError(VtpmError):
    """The metrics endpoint's settings file is malformed."""

    id: ClassVar[str] = "metrics.settings"


@dataclass(frozen=True)
class MetricsConfig:
    """Where the metrics endpoint listens. ``port`` 0 picks a free port; None disables it."""

    port: int | None = DEFAULT_METRICS_PORT
    host: str = "127.0.0.1"
    allow_non_loopback: bool = False

    def __post_init__(self) -> None:
        if self.port is not None and not 0 <= self.port <= 65535:
            raise ValueError(f"metrics port must be 0-65535, got {self.port}")
        if not self.allow_non_loopback:
            try:
                loopback = ipaddress.ip_address(self.host).is_loopback
            except ValueError:
                loopback = self.host == "localhost"
            if not loopback:
                raise ValueError(
                    f"metrics host {self.host!r} is not a loopback address "
                    "(set allow_non_loopback to publish metrics beyond this machine)"
                )


def load_metrics_settings(path: Path, default: MetricsConfig) -> MetricsConfig:
    """:class:`MetricsConfig` from a JSON file ``{"port": 9477, "host": "127.0.0.1",
    "allow_non_loopback": false}`` (every key optional; ``"port": null`` disables the endpoint),
    or ``default`` when the file does not exist.

    Raises:
        MetricsSettingsError: unreadable or malformed file, unknown key, bad value.
    """
    try:
        obj = json.loads(path.read_text())
    except FileNotFoundError:
        return default
    except (OSError, ValueError) as err:
        raise MetricsSettingsError(f"metrics settings {path}: {err}") from err
    allowed = {"port", "host", "allow_non_loopback"}
    if not isinstance(obj, dict) or set(obj) - allowed:
        raise MetricsSettingsError(
            f"metrics settings {path}: expected an object with keys among {sorted(allowed)}, "
            f"got {obj!r}"
        )
    port, host = obj.get("port", default.port), obj.get("host", default.host)
    allow = obj.get("allow_non_loopback", default.allow_non_loopback)
    if not (port is None or (isinstance(port, int) and not isinstance(port, bool))):
        raise MetricsSettingsError(f"metrics settings {path}: port must be an integer or null")
    if not isinstance(host, str) or not isinstance(allow, bool):
        raise MetricsSettingsError(f"metrics settings {path}: host is a string, allow_* a bool")
    try:
        return MetricsConfig(port=port, host=host, allow_non_loopback=allow)
    except ValueError as err:
        raise MetricsSettingsError(f"metrics settings {path}: {err}") from err


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], metrics: AgentMetrics) -> None:
        self.metrics = metrics
        super().__init__(address, _Handler)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "vtpm-host-metrics/1"

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("metrics %s %s", self.address_string(), format % args)

    def do_GET(self) -> None:
        if self.path.split("?", 1)[0] != "/metrics":
            body = b"not found: try /metrics\n"
            self.send_response(HTTPStatus.NOT_FOUND)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
        else:
            body = self.server.metrics.exposition().encode()
            self.send_response(HTTPStatus.OK)
            self.send_header("Content-Type", CONTENT_TYPE)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class MetricsComponent:
    """Daemon component serving ``GET /metrics`` (see the module docstring).

    Load it with ``vtpm-host daemon --component host_agent.service.metrics:MetricsComponent``.
    Started by a daemon, it offers its :class:`AgentMetrics` to the other components as
    ``daemon.metrics`` (unless one is there already), counts VMs from ``daemon.registry``, and
    takes where to listen from the agent configuration's ``[metrics] listen`` (``HOST:PORT`` or
    ``off``; also ``vtpm-host daemon --metrics-listen``) when it is set, else from
    ``<state_dir>/metrics/settings.json`` (:func:`load_metrics_settings`, what older versions of
    the Ansible role wrote), else from the constructor (default ``127.0.0.1:9477``).
    """

    def __init__(
        self, metrics: AgentMetrics | None = None, config: MetricsConfig | None = None
    ) -> None:
        self.metrics = metrics if metrics is not None else AgentMetrics()
        self.config = config or MetricsConfig()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int | None:
        """The bound port once started (useful with ``port = 0``)."""
        return None if self._server is None else int(self._server.server_address[1])

    def start(self, daemon: Any = None) -> None:
        if daemon is not None:
            configured = getattr(getattr(daemon, "config", None), "metrics", None)
            if configured is not None and configured.enabled is not None:
                address = configured.address
                self.config = MetricsConfig(
                    port=None if address is None else address[1],
                    host=self.config.host if address is None else address[0],
                    allow_non_loopback=configured.allow_non_loopback,
                )
            else:
                state_dir = getattr(getattr(daemon, "config", None), "state_dir", None)
                if state_dir is not None:
                    self.config = load_metrics_settings(
                        Path(state_dir) / "metrics" / "settings.json", self.config
                    )
            if getattr(daemon, "metrics", None) is None:
                with contextlib.suppress(AttributeError):
                    daemon.metrics = self.metrics
            registry = getattr(daemon, "registry", None)
            if registry is not None and self.metrics._vm_source is None:
                self.metrics.vm_source(lambda: _count_bridges(registry))
            poll = getattr(daemon, "poll_bridges", None)
            if callable(poll) and self.metrics._relay_source is None:
                self.metrics.relay_source(poll)
        if self.config.port is None:
            log.info("metrics endpoint disabled")
            return
        self._server = _Server((self.config.host, self.config.port), self.metrics)
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="metrics", daemon=True
        )
        self._thread.start()
        log.info("metrics endpoint on http://%s:%s/metrics", self.config.host, self.port)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(5.0)
            self._thread = None


def _count_bridges(registry: Any) -> dict[str, int]:
    counts = {"connected": 0, "running": 0, "down": 0}
    for entry in registry.entries():
        if entry.bridge_connected:
            counts["connected"] += 1
        elif entry.bridge_pid is not None:
            counts["running"] += 1
        else:
            counts["down"] += 1
    return counts
