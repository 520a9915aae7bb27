"""host_agent.config: defaults, TOML, environment overrides, unknown keys are errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from host_agent.config import (
    AgentConfig,
    ConfigError,
    LoggingConfig,
    RegistrarConfig,
    TpmConfig,
    load_config,
    parse_listen,
    with_state_dir,
)
from host_agent.service.daemon import with_command_line


def test_defaults_without_file_or_environment() -> None:
    config = load_config(None, {})
    assert config == AgentConfig(tpm=TpmConfig(state_dir=Path("/var/lib/vtpm-trust/tpm")))
    assert config.registrar.embedded
    assert config.tpm.tcti is None


def test_file_values_and_derived_tpm_state_dir(tmp_path: Path) -> None:
    f = tmp_path / "agent.toml"
    f.write_text(
        'state_dir = "/srv/vtpm"\n[tpm]\ntcti = "device:/dev/tpmrm0"\n'
        '[store]\nurl = "sqlite:///x.db"\n[registrar]\nurl = "https://reg:8443"\n'
    )
    config = load_config(f, {})
    assert config.state_dir == Path("/srv/vtpm")
    assert config.tpm == TpmConfig(tcti="device:/dev/tpmrm0", state_dir=Path("/srv/vtpm/tpm"))
    assert config.store.url == "sqlite:///x.db"
    assert config.registrar == RegistrarConfig(url="https://reg:8443")
    assert not config.registrar.embedded


def test_environment_overrides_file(tmp_path: Path) -> None:
    f = tmp_path / "agent.toml"
    f.write_text('[tpm]\ntcti = "device:/dev/tpmrm0"\nallow_software_root = true\n')
    config = load_config(f, {"VTPM_TPM_TCTI": "swtpm:port=2321", "VTPM_STATE_DIR": "/x"})
    assert config.tpm.tcti == "swtpm:port=2321"
    assert config.tpm.state_dir == Path("/x/tpm")
    assert config.tpm.allow_software_root is True


def test_unrelated_environment_is_ignored() -> None:
    assert load_config(None, {"HOME": "/root", "VTPM_UNKNOWN": "1"}) == load_config(None, {})


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("colour = 1\n", "unknown key(s) colour"),
        ("[tpm]\ntci = 'x'\n", "unknown key(s) tpm.tci"),
        ("[tmp]\n", "unknown key(s) tmp"),
        ("[tpm]\nallow_software_root = 'yes'\n", "expected true or false"),
        ("state_dir = 3\n", "expected a path"),
        ("tpm = 3\n", "expected a table"),
        ("[tpm\n", "not valid TOML"),
    ],
)
def test_invalid_files_are_errors(tmp_path: Path, text: str, needle: str) -> None:
    f = tmp_path / "agent.toml"
    f.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(f, {})
    assert needle in str(err.value)
    assert err.value.id == "config.invalid"


def test_missing_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "absent.toml", {})


def test_with_state_dir_moves_derived_directories() -> None:
    config = with_state_dir(load_config(None, {}), Path("/tmp/agent"))
    assert config.state_dir == Path("/tmp/agent")
    assert config.tpm.state_dir == Path("/tmp/agent/tpm")


def test_config_is_frozen() -> None:
    config = load_config(None, {})
    with pytest.raises(AttributeError):
        config.state_dir = Path("/")  # type: ignore[misc]


def test_logging_and_metrics_sections(tmp_path: Path) -> None:
    f = tmp_path / "agent.toml"
    f.write_text(
        '[logging]\nformat = "json"\nlevel = "DEBUG"\n[metrics]\nlisten = "127.0.0.1:9555"\n'
    )
    config = load_config(f, {})
    assert config.logging == LoggingConfig(format="json", level="DEBUG")
    assert config.metrics.address == ("127.0.0.1", 9555) and config.metrics.enabled
    f.write_text('[metrics]\nlisten = "off"\n')
    assert load_config(f, {}).metrics.enabled is False
    assert load_config(f, {}).metrics.address is None
    unset = load_config(None, {})
    assert unset.logging == LoggingConfig("text", "info") and unset.metrics.enabled is None
    f.write_text('[metrics]\nlisten = "[::1]:0"\n')
    assert load_config(f, {}).metrics.address == ("::1", 0)
    f.write_text('[metrics]\nlisten = "0.0.0.0:9477"\nallow_non_loopback = true\n')
    assert load_config(f, {}).metrics.address == ("0.0.0.0", 9477)


def test_logging_and_metrics_from_the_environment() -> None:
    env = {"VTPM_LOG_FORMAT": "json", "VTPM_LOG_LEVEL": "warning", "VTPM_METRICS_LISTEN": "off"}
    config = load_config(None, env)
    assert config.logging == LoggingConfig("json", "warning")
    assert config.metrics.enabled is False


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ('[logging]\nformat = "xml"\n', "logging.format: expected one of text, json, got 'xml'"),
        ('[logging]\nlevel = "loud"\n', "logging.level: expected one of debug, info, warning"),
        ("[logging]\nformat = 1\n", "logging.format: expected a string, got 1"),
        ('[logging]\ncolour = "x"\n', "unknown key(s) logging.colour"),
        ('[metrics]\nlisten = "9477"\n', 'expected "HOST:PORT" (port 0-65535)'),
        ('[metrics]\nlisten = "127.0.0.1:99999"\n', "got '127.0.0.1:99999'"),
        ('[metrics]\nlisten = "127.0.0.1:http"\n', "got '127.0.0.1:http'"),
        ('[metrics]\nlisten = ":9477"\n', "got ':9477'"),
        ('[metrics]\nlisten = "::1:9477"\n', "put an IPv6 address in brackets"),
        ('[metrics]\nlisten = "10.0.0.1:9477"\n', "expected a loopback address"),
        ("[metrics]\nlisten = 9477\n", "metrics.listen: expected a string, got 9477"),
        ("[metrics]\nport = 9477\n", "unknown key(s) metrics.port"),
    ],
)
def test_bad_logging_and_metrics_values_say_what_was_expected(
    tmp_path: Path, text: str, needle: str
) -> None:
    f = tmp_path / "agent.toml"
    f.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(f, {})
    assert needle in str(err.value)
    assert err.value.id == "config.invalid"


def test_bad_environment_value_is_an_error() -> None:
    with pytest.raises(ConfigError, match=r"logging\.format: expected one of text, json"):
        load_config(None, {"VTPM_LOG_FORMAT": "yaml"})


def test_daemon_command_line_wins_and_is_checked_the_same_way(tmp_path: Path) -> None:
    f = tmp_path / "agent.toml"
    f.write_text('[logging]\nformat = "json"\nlevel = "debug"\n[metrics]\nlisten = "off"\n')
    config = load_config(f, {})
    assert with_command_line(config) == config
    changed = with_command_line(config, log_format="text", metrics_listen="127.0.0.1:0")
    assert changed.logging == LoggingConfig("text", "debug")
    assert changed.metrics.address == ("127.0.0.1", 0)
    with pytest.raises(ConfigError, match=r"logging\.level: expected one of"):
        with_command_line(config, log_level="verbose")
    with pytest.raises(ConfigError, match="expected a loopback address"):
        with_command_line(config, metrics_listen="192.0.2.1:9477")


@given(st.text(max_size=40))
def test_parse_listen_either_answers_or_raises_config_error(text: str) -> None:
    try:
        got = parse_listen(text)
    except ConfigError as err:
        assert "metrics.listen: expected" in str(err)
        return
    assert got is None or (got[0] and 0 <= got[1] <= 65535)
