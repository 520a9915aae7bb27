"""host_agent.config: defaults, TOML, environment overrides, unknown keys are errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from host_agent.config import (
    AgentConfig,
    ConfigError,
    RegistrarConfig,
    TpmConfig,
    load_config,
    with_state_dir,
)


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
