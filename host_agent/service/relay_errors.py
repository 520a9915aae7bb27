"""The daemon's running totals of its bridges' relay errors, per VM and kind.

Each bridge counts its own relay errors (``BridgeStats.relay_errors``, kinds in
``host_agent.vtpm.bridge_state.RELAY_ERROR_KINDS``) with an ``instance`` id that changes when
the bridge is restarted, and reports them two ways on the daemon link: it pushes a ``report``
when they changed, when it (re)connects and as it stops (so counts made just before a bridge
exits are not lost), and answers them in its ``status`` (the daemon also asks every few seconds,
:meth:`host_agent.service.daemon.Daemon.poll_bridges`, which catches a report sent while the
daemon was down). Both feed :class:`RelayErrorTally`, which turns them into totals that never
go down, as a Prometheus counter must: a new instance's counts add to what earlier instances of
the same VM reported, and the same counts reported twice add nothing.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass, field

__all__ = ["RelayErrorTally"]


@dataclass
class _Vm:
    instance: str = ""
    seen: dict[str, int] = field(default_factory=dict)  # the current instance's own counts
    totals: dict[str, int] = field(default_factory=dict)


class RelayErrorTally:
    """Monotonic relay error totals per VM and kind, built from bridges' own counters.

    Thread-safe.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._vms: dict[str, _Vm] = {}

    def update(self, vm_uuid: str, instance: str, counts: Mapping[str, int]) -> None:
        """What the bridge ``instance`` of ``vm_uuid`` reports now (its counts since it started).

        A new instance, or counts that went down (an instance restarted under the same id),
        start over from zero; otherwise only the increase is added.

        Raises:
            ValueError: a count that is not a non-negative integer, or a kind that is not a
                non-empty string.
        """
        for kind, n in counts.items():
            if not isinstance(kind, str) or not kind:
                raise ValueError(f"relay error kind must be a non-empty string, got {kind!r}")
            if not isinstance(n, int) or isinstance(n, bool) or n < 0:
                raise ValueError(
                    f"relay error count of {kind!r} must be an integer >= 0, got {n!r}"
                )
        with self._lock:
            vm = self._vms.setdefault(vm_uuid.lower(), _Vm())
            restarted = (
                vm.instance != instance
                or any(n < vm.seen.get(kind, 0) for kind, n in counts.items())
                or any(kind not in counts for kind in vm.seen)
            )
            if restarted:
                vm.instance, vm.seen = instance, {}
            for kind, n in counts.items():
                added = n - vm.seen.get(kind, 0)
                if added:
                    vm.totals[kind] = vm.totals.get(kind, 0) + added
            vm.seen = dict(counts)

    def counts(self) -> dict[tuple[str, str], int]:
        """Every total: ``{(vm_uuid, kind): n}``."""
        with self._lock:
            return {
                (vm_uuid, kind): n
                for vm_uuid, vm in self._vms.items()
                for kind, n in vm.totals.items()
            }

    def total(self, vm_uuid: str) -> int:
        """All relay errors of one VM's bridges so far (0 for a VM never seen)."""
        with self._lock:
            vm = self._vms.get(vm_uuid.lower())
            return 0 if vm is None else sum(vm.totals.values())
