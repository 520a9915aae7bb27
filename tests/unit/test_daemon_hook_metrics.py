"""The daemon's save/restore hooks feed the metrics component: durations and vetoes."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from host_agent.service.daemon import Daemon, observe_hook
from host_agent.service.metrics import AgentMetrics
from host_agent.vtpm.daemon_link import HookCall
from host_agent.vtpm.hooks_server import Allow, Decision, Veto

CALL = HookCall(
    id=1,
    vm_uuid="6f1c7a2e-0000-4000-8000-000000000001",
    event="set_stateblob",
    blob_type=1,
    state_flags=0,
    result=0,
    length=0,
    sha256="00" * 32,
)


def _ticks(*values: float):  # type: ignore[no-untyped-def]
    it = iter(values)
    return lambda: next(it)


def test_observe_hook_reports_duration_and_keeps_the_decision() -> None:
    seen: list[tuple[str, float, Decision]] = []
    veto = Veto("page 7 differs")
    wrapped = observe_hook(
        lambda call: veto, "restore", lambda k, c, s, d: seen.append((k, s, d)), _ticks(1.0, 3.5)
    )
    assert wrapped(CALL) is veto
    assert seen == [("restore", 2.5, veto)]


def test_a_failing_observer_never_changes_the_decision() -> None:
    def broken(*_: object) -> None:
        raise RuntimeError("metrics down")

    allow = Allow()
    assert observe_hook(lambda call: allow, "save", broken)(CALL) is allow


def test_handler_errors_propagate_unchanged() -> None:
    def handler(call: HookCall) -> Decision:
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        observe_hook(handler, "save", lambda *a: None)(CALL)


def test_daemon_feeds_seal_and_verify_histograms_and_restore_refusals() -> None:
    metrics = AgentMetrics()
    daemon = SimpleNamespace(metrics=metrics)
    Daemon._hook_observed(daemon, "save", CALL, 0.2, Allow())  # type: ignore[arg-type]
    Daemon._hook_observed(daemon, "restore", CALL, 0.4, Veto("pages 3-4 differ"))  # type: ignore[arg-type]
    text = metrics.exposition()
    seal = [ln for ln in text.splitlines() if "seal" in ln and ln.endswith("_count 1")]
    verify = [ln for ln in text.splitlines() if "verify" in ln and "_count" in ln]
    assert seal, text
    assert verify and verify[0].endswith(" 1"), text
    assert 'reason="restore.vetoed"' in text
    assert "pages 3-4" not in text  # free-text reasons never become label values


def test_no_metrics_component_is_fine() -> None:
    Daemon._hook_observed(SimpleNamespace(), "save", CALL, 0.1, Allow())  # type: ignore[arg-type]
