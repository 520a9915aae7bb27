"""A stand-in for ``pyudev.Context`` (CI machines have no TPM device; STYLE.md "Ports, adapters
and fakes"). Typed against :class:`host_agent.tpm.discovery.UdevContext`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class FakeDevice:
    subsystem: str
    device_node: str | None


@dataclass
class FakeUdevContext:
    """Answers ``list_devices(subsystem=…)`` from a fixed device list; records the queries."""

    devices: list[FakeDevice] = field(default_factory=list)
    queries: list[dict[str, Any]] = field(default_factory=list)

    def list_devices(self, **kwargs: Any) -> list[FakeDevice]:
        self.queries.append(kwargs)
        sub = kwargs.get("subsystem")
        return [d for d in self.devices if sub is None or d.subsystem == sub]
