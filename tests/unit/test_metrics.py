"""host_agent.service.metrics: the exposition format (pure), the agent's metrics, the endpoint."""

from __future__ import annotations

import math
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from host_agent.service.metrics import (
    CONTENT_TYPE,
    AgentMetrics,
    MetricFamily,
    MetricsComponent,
    MetricsConfig,
    MetricsSettingsError,
    Sample,
    load_metrics_settings,
    render_exposition,
)


def test_render_exposition_help_type_and_samples() -> None:
    fam = MetricFamily("x_total", "counter", "Things.", (Sample("x_total", (("a", "b"),), 3.0),))
    assert (
        render_exposition([fam])
        == '# HELP x_total Things.\n# TYPE x_total counter\nx_total{a="b"} 3\n'
    )


def test_render_exposition_escapes_labels_and_help() -> None:
    fam = MetricFamily(
        "y", "gauge", "back\\slash\nnewline", (Sample("y", (("k", 'q"\\\n'),), 0.5),)
    )
    text = render_exposition([fam])
    assert "# HELP y back\\\\slash\\nnewline\n" in text
    assert 'y{k="q\\"\\\\\\n"} 0.5\n' in text


def test_render_exposition_special_values_and_empty() -> None:
    fam = MetricFamily(
        "z",
        "gauge",
        "h",
        (
            Sample("z", (("v", "inf"),), math.inf),
            Sample("z", (("v", "ninf"),), -math.inf),
            Sample("z", (("v", "nan"),), math.nan),
        ),
    )
    text = render_exposition([fam])
    assert 'z{v="inf"} +Inf' in text and 'z{v="ninf"} -Inf' in text and 'z{v="nan"} NaN' in text
    assert render_exposition([]) == ""


def test_attestations_and_refusals_by_reason() -> None:
    m = AgentMetrics()
    m.attestation(ok=True)
    m.attestation(ok=True)
    m.attestation(ok=False, reason="attest.vaik_missing")
    m.refusal("restore.memory_mismatch")
    m.relay_error("swtpm_gone", "vm-1")
    text = m.exposition()
    assert 'vtpm_attestations_total{result="ok"} 2' in text
    assert 'vtpm_attestations_total{result="refused"} 1' in text
    assert 'vtpm_refusals_total{reason="attest.vaik_missing"} 1' in text
    assert 'vtpm_refusals_total{reason="restore.memory_mismatch"} 1' in text
    assert 'vtpm_bridge_relay_errors_total{vm="vm-1",kind="swtpm_gone"} 1' in text


def test_relay_errors_from_the_source_add_up_and_a_failing_source_is_survived() -> None:
    m = AgentMetrics()
    totals = {("vm-a", "swtpm_gone"): 2, ("vm-b", "qemu_malformed"): 1}
    m.relay_source(lambda: totals)
    m.relay_error("swtpm_gone", "vm-a")
    text = m.exposition()
    assert 'vtpm_bridge_relay_errors_total{vm="vm-a",kind="swtpm_gone"} 3' in text
    assert 'vtpm_bridge_relay_errors_total{vm="vm-b",kind="qemu_malformed"} 1' in text

    def broken() -> dict[tuple[str, str], int]:
        raise RuntimeError("bridge link down")

    m.relay_source(broken)
    text = m.exposition()
    assert 'vtpm_bridge_relay_errors_total{vm="vm-a",kind="swtpm_gone"} 1' in text
    assert "vtpm_attestations_total" in text


def test_histograms_are_cumulative_with_inf_sum_and_count() -> None:
    m = AgentMetrics(buckets=(0.1, 1.0))
    for v in (0.05, 0.5, 5.0):
        m.seal_duration(v)
    m.verify_duration(0.1)
    text = m.exposition()
    assert 'vtpm_seal_duration_seconds_bucket{le="0.1"} 1' in text
    assert 'vtpm_seal_duration_seconds_bucket{le="1"} 2' in text
    assert 'vtpm_seal_duration_seconds_bucket{le="+Inf"} 3' in text
    assert "vtpm_seal_duration_seconds_sum 5.55" in text
    assert "vtpm_seal_duration_seconds_count 3" in text
    assert 'vtpm_verify_duration_seconds_bucket{le="0.1"} 1' in text  # le is inclusive
    assert "# TYPE vtpm_seal_duration_seconds histogram" in text


def test_every_sample_line_parses() -> None:
    m = AgentMetrics()
    m.attestation(ok=False, reason='we"ird')
    m.vm_source(lambda: {"connected": 2, "down": 1})
    for line in m.exposition().splitlines():
        if line.startswith("#"):
            assert line.split()[1] in ("HELP", "TYPE")
            continue
        name_labels, value = line.rsplit(" ", 1)
        float(value.replace("+Inf", "inf"))
        assert name_labels.startswith("vtpm_")
    assert 'vtpm_vms{bridge="connected"} 2' in m.exposition()


def test_config_refuses_non_loopback_unless_allowed() -> None:
    with pytest.raises(ValueError, match="not a loopback"):
        MetricsConfig(host="0.0.0.0")
    assert MetricsConfig(host="0.0.0.0", allow_non_loopback=True).host == "0.0.0.0"
    with pytest.raises(ValueError, match="0-65535"):
        MetricsConfig(port=70000)


def test_endpoint_serves_metrics_on_loopback() -> None:
    m = AgentMetrics()
    m.attestation(ok=True)
    comp = MetricsComponent(m, MetricsConfig(port=0))
    comp.start(None)
    try:
        url = f"http://127.0.0.1:{comp.port}"
        with urllib.request.urlopen(f"{url}/metrics", timeout=5) as resp:
            assert resp.headers["Content-Type"] == CONTENT_TYPE
            assert 'vtpm_attestations_total{result="ok"} 1' in resp.read().decode()
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(f"{url}/other", timeout=5)
        assert err.value.code == 404
    finally:
        comp.stop()
    assert comp.port is None


def test_disabled_endpoint_binds_nothing() -> None:
    comp = MetricsComponent(AgentMetrics(), MetricsConfig(port=None))
    comp.start(None)
    assert comp.port is None
    comp.stop()


def test_settings_file_is_read_strictly(tmp_path: Path) -> None:
    default = MetricsConfig()
    assert load_metrics_settings(tmp_path / "absent.json", default) == default
    path = tmp_path / "settings.json"
    path.write_text('{"port": 9555}')
    assert load_metrics_settings(path, default) == MetricsConfig(port=9555)
    path.write_text('{"port": null}')
    assert load_metrics_settings(path, default).port is None
    for bad in ('{"port": "x"}', '{"prot": 1}', '{"host": "10.0.0.1"}', "[", '{"port": true}'):
        path.write_text(bad)
        with pytest.raises(MetricsSettingsError):
            load_metrics_settings(path, default)


def test_component_takes_its_port_from_the_state_dir_and_offers_its_metrics(
    tmp_path: Path,
) -> None:
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "settings.json").write_text('{"port": 0}')

    class Config:
        state_dir = tmp_path

    class Daemon:
        config = Config()
        metrics = None
        registry = None

    daemon = Daemon()
    comp = MetricsComponent()
    comp.start(daemon)
    try:
        assert comp.port not in (None, 9477)
        assert daemon.metrics is comp.metrics
    finally:
        comp.stop()
