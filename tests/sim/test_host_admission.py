"""Issue 3 "done when": init → registration → AIK certificate issued; a second init: no change.

Everything is real: ``vtpm-host init`` as an operator runs it (a subprocess; with no TPM it
provisions the swtpm software root), the embedded registrar it runs as a child process
(``vtpm-verify registrar init`` + ``serve``), registration over HTTPS on 127.0.0.1, and in-process
calls of the init step against swtpms with EK certificates and a registrar started from its CLI.
"""

from __future__ import annotations

import dataclasses
import json
import os
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from evidence.aik_cert import verify_aik_certificate
from evidence.errors import ChainError
from evidence.tpm2 import TpmtPublic, object_name, public_key
from host_agent.admission import (
    AdmissionError,
    IdentityFiles,
    register_with_registrar,
)
from host_agent.config import AgentConfig, RegistrarConfig, TpmConfig
from host_agent.tpm.adapter import PytssHostTpm
from host_agent.tpm.cli import INIT_STEPS
from tests.helpers.swtpm import Swtpm
from tests.unit.test_registrar_ekcert import make_pki, pem

REPO = Path(__file__).resolve().parents[2]
HOST = [sys.executable, "-m", "host_agent.cli"]
VERIFY = [sys.executable, "-m", "verifier.cli", "registrar"]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VTPM_")}
    return {**env, **extra}


def _run(cmd: list[str], **extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, env=_env(**extra), capture_output=True, text=True, cwd=REPO)


def _json(cmd: list[str]) -> dict[str, object]:
    done = _run(cmd)
    assert done.returncode == 0, done.stderr
    out: dict[str, object] = json.loads(done.stdout)
    return out


def _hosts(registrar_state: Path) -> list[dict[str, str]]:
    hosts = _json([*VERIFY, "hosts", "--state-dir", str(registrar_state), "--json"])["hosts"]
    assert isinstance(hosts, list)
    return hosts


def _snapshot(*dirs: Path) -> dict[str, tuple[bytes, int, int]]:
    """Every file under ``dirs``: bytes, mtime and mode."""
    out = {}
    for d in dirs:
        for p in sorted(d.rglob("*")):
            if p.is_file():
                st = p.stat()
                out[str(p)] = (p.read_bytes(), st.st_mtime_ns, stat.S_IMODE(st.st_mode))
    return out


def _serve_pids(registrar_state: Path) -> list[str]:
    out = subprocess.run(
        ["pgrep", "-f", f"registrar serve --state-dir {registrar_state}"],
        capture_output=True,
        text=True,
    )
    return out.stdout.split()


def _load_pem(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


# ---------------------------------------------------------------- vtpm-host init, end to end


@dataclasses.dataclass(frozen=True)
class Admitted:
    state: Path
    first: subprocess.CompletedProcess[str]
    info: dict[str, object]

    @property
    def identity(self) -> IdentityFiles:
        return IdentityFiles.under(self.state)

    @property
    def registrar(self) -> Path:
        return self.state / "registrar"


@pytest.fixture(scope="module")
def admitted(tmp_path_factory: pytest.TempPathFactory) -> Admitted:
    """One ``vtpm-host init`` on a fresh machine (software root, embedded registrar)."""
    state = tmp_path_factory.mktemp("admission") / "state"
    first = _run([*HOST, "init", "--state-dir", str(state)], VTPM_HOST_ID="host-a.example")
    assert first.returncode == 0, first.stderr
    info = _json([*HOST, "tpm", "info", "--json", "--state-dir", str(state)])
    return Admitted(state, first, info)


def test_admission_is_a_default_init_step() -> None:
    assert "host_agent.admission:register_with_registrar" in INIT_STEPS


def test_init_registers_and_the_aik_certificate_chains_to_the_fleet_ca(
    admitted: Admitted,
) -> None:
    files = admitted.identity
    assert "registered host-a.example with the embedded registrar" in admitted.first.stdout
    assert str(files.aik_certificate) in admitted.first.stdout
    for path in (files.aik_certificate, files.tls_certificate, files.ca_certificate):
        assert path.is_file()
    assert stat.S_IMODE(files.tls_key.stat().st_mode) == 0o600
    assert stat.S_IMODE(files.directory.stat().st_mode) == 0o700
    assert [p.name for p in files.directory.iterdir() if p.name.startswith(".")] == []

    # The fleet CA, as the registrar itself reports it.
    ca_doc = _json([*VERIFY, "ca", "--state-dir", str(admitted.registrar), "--json"])
    ca = x509.load_pem_x509_certificate(str(ca_doc["ca_certificate"]).encode())
    assert _load_pem(files.ca_certificate) == ca
    assert ca_doc["ca_sha256"] in admitted.first.stdout

    aik_cert = _load_pem(files.aik_certificate)
    aik = verify_aik_certificate(_der(aik_cert), [ca], datetime.now(UTC))
    assert object_name(aik).hex() == admitted.info["aik_name"]  # `tpm info`'s AIK
    assert aik_cert.public_key() == public_key(aik)
    assert aik_cert.subject.rfc4514_string() == "CN=host-a.example"

    tls = _load_pem(files.tls_certificate)
    tls.verify_directly_issued_by(ca)
    key = serialization.load_pem_private_key(files.tls_key.read_bytes(), password=None)
    assert tls.public_key() == key.public_key()

    [host] = _hosts(admitted.registrar)
    assert (host["host_id"], host["aik_name"]) == ("host-a.example", admitted.info["aik_name"])
    assert _serve_pids(admitted.registrar) == []  # the child registrar was stopped


def test_a_second_init_changes_nothing(admitted: Admitted) -> None:
    before = _snapshot(admitted.identity.directory, admitted.registrar)
    log_before = (admitted.state / "registrar.log").read_bytes()
    second = _run(
        [*HOST, "init", "--state-dir", str(admitted.state)], VTPM_HOST_ID="host-a.example"
    )
    assert second.returncode == 0, second.stderr
    assert "nothing to do" in second.stdout
    assert "registered" not in second.stdout and "created" not in second.stdout
    assert _snapshot(admitted.identity.directory, admitted.registrar) == before
    assert (admitted.state / "registrar.log").read_bytes() == log_before  # no registrar started
    assert len(_hosts(admitted.registrar)) == 1


def test_a_refused_registration_leaves_no_identity_files(tmp_path: Path) -> None:
    """The embedded registrar trusts another EK CA only: swtpm's EK certificates are refused."""
    other = make_pki("other-ek-ca")
    (tmp_path / "other-ek-ca.pem").write_bytes(pem(other.root[0], other.intermediate[0]))
    config = tmp_path / "agent.toml"
    config.write_text(f'[registrar]\nek_ca = "{tmp_path / "other-ek-ca.pem"}"\nhost_id = "h"\n')
    state = tmp_path / "state"
    done = _run([*HOST, "init", "--config", str(config), "--state-dir", str(state)])
    assert done.returncode == 2, done.stdout
    assert "vtpm-host: error [host.registration.refused]" in done.stderr
    assert "registrar.ek_certificate" in done.stderr and "swtpm-localca" in done.stderr
    assert not (state / "identity").exists()
    assert _hosts(state / "registrar") == []
    assert _serve_pids(state / "registrar") == []


# ---------------------------------------------------------------- the step, in process


@pytest.fixture
def host(swtpm_factory: Callable[..., Swtpm], tmp_path: Path) -> Iterator[PytssHostTpm]:
    tpm = swtpm_factory("host", provision_ek=True)
    port = PytssHostTpm(tpm.tcti, tmp_path / "host-keys", root="software")
    port.ensure_host_keys()
    yield port
    port.close()


def _config(tmp_path: Path, host: PytssHostTpm, registrar: RegistrarConfig) -> AgentConfig:
    return AgentConfig(
        state_dir=tmp_path / "agent",
        tpm=TpmConfig(tcti=host.tcti, state_dir=tmp_path / "host-keys"),
        registrar=registrar,
    )


@pytest.fixture
def fleet_registrar(tmp_path: Path) -> Iterator[tuple[str, str, Path]]:
    """A fleet registrar as an operator runs it: URL, CA fingerprint, state dir."""
    state = tmp_path / "fleet-registrar"
    init = _json([*VERIFY, "init", "--state-dir", str(state), "--swtpm-localca", "--json"])
    serve = subprocess.Popen(
        [*VERIFY, "serve", "--state-dir", str(state), "--listen", "127.0.0.1:0", "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        cwd=REPO,
        env=_env(),
    )
    try:
        assert serve.stdout is not None
        banner = json.loads(serve.stdout.readline())
        assert banner["ca_sha256"] == init["ca_sha256"]
        yield banner["url"], banner["ca_sha256"], state
    finally:
        serve.terminate()
        assert serve.wait(10) == 0
        assert serve.stdout is not None
        serve.stdout.close()


def test_remote_registrar_with_a_pinned_ca(
    host: PytssHostTpm, tmp_path: Path, fleet_registrar: tuple[str, str, Path]
) -> None:
    url, fingerprint, registrar_state = fleet_registrar
    pinned = ":".join(fingerprint[i : i + 2] for i in range(0, 64, 2)).upper()
    config = _config(tmp_path, host, RegistrarConfig(url=url, ca_sha256=pinned, host_id="hv1"))
    keys = host.ensure_host_keys()
    message = register_with_registrar(host, config, keys)
    assert message is not None and f"with the registrar at {url}" in message
    files = IdentityFiles.under(config.state_dir)
    aik = verify_aik_certificate(
        _der(_load_pem(files.aik_certificate)), [_load_pem(files.ca_certificate)], datetime.now(UTC)
    )
    assert aik == TpmtPublic.unmarshal(host.aik_public())
    before = _snapshot(files.directory)
    assert register_with_registrar(host, config, keys) is None
    assert _snapshot(files.directory) == before
    assert [h["host_id"] for h in _hosts(registrar_state)] == ["hv1"]

    # Another fleet's pin: the stored identity no longer counts, and the registrar is refused.
    other = dataclasses.replace(config.registrar, ca_sha256="ab" * 32)
    with pytest.raises(ChainError, match="fingerprint"):
        register_with_registrar(host, dataclasses.replace(config, registrar=other), keys)
    assert _snapshot(files.directory) == before


def test_remote_registrar_needs_a_ca_fingerprint(
    host: PytssHostTpm, tmp_path: Path, fleet_registrar: tuple[str, str, Path]
) -> None:
    config = _config(tmp_path, host, RegistrarConfig(url=fleet_registrar[0], host_id="hv1"))
    with pytest.raises(AdmissionError, match="ca_sha256"):
        register_with_registrar(host, config, host.ensure_host_keys())
    assert not IdentityFiles.under(config.state_dir).directory.exists()


def test_a_damaged_identity_is_made_again_with_the_same_key(
    host: PytssHostTpm, tmp_path: Path
) -> None:
    config = _config(tmp_path, host, RegistrarConfig(host_id="single"))
    keys = host.ensure_host_keys()
    assert register_with_registrar(host, config, keys) is not None
    files = IdentityFiles.under(config.state_dir)
    tls_key = files.tls_key.read_bytes()
    first_aik = files.aik_certificate.read_bytes()
    files.aik_certificate.write_bytes(files.tls_certificate.read_bytes())  # not an AIK cert

    message = register_with_registrar(host, config, keys)
    assert message is not None and "registered single" in message
    assert files.tls_key.read_bytes() == tls_key  # the mTLS key is made once
    assert files.aik_certificate.read_bytes() != first_aik  # a freshly issued certificate
    ca = _load_pem(files.ca_certificate)
    verify_aik_certificate(_der(_load_pem(files.aik_certificate)), [ca], datetime.now(UTC))
    [row] = _hosts(config.state_dir / "registrar")  # re-admission replaces the row
    assert row["host_id"] == "single"
    assert register_with_registrar(host, config, keys) is None


def test_a_new_tpm_under_an_admitted_host_id_is_refused_and_the_identity_kept(
    host: PytssHostTpm, swtpm_factory: Callable[..., Swtpm], tmp_path: Path
) -> None:
    """The TPM is swapped under the same state dir: the registrar refuses its other EK."""
    from host_agent.registration import RegistrarRefused

    config = _config(tmp_path, host, RegistrarConfig(host_id="single"))
    assert register_with_registrar(host, config, host.ensure_host_keys()) is not None
    files = IdentityFiles.under(config.state_dir)
    before = _snapshot(files.directory)

    other = PytssHostTpm(
        swtpm_factory("replacement", provision_ek=True).tcti, tmp_path / "keys-2", root="software"
    )
    try:
        keys = other.ensure_host_keys()
        with pytest.raises(RegistrarRefused) as info:
            register_with_registrar(other, config, keys)
    finally:
        other.close()
    assert info.value.remote_id == "registrar.host_conflict", info.value
    assert _snapshot(files.directory) == before
    [row] = _hosts(config.state_dir / "registrar")
    assert bytes.fromhex(row["aik_name"]) == host.aik_name()


def test_an_embedded_registrar_that_cannot_start_is_a_typed_error(
    host: PytssHostTpm, tmp_path: Path
) -> None:
    from host_agent.admission import EmbeddedRegistrarError

    bad = tmp_path / "no-such-ca.pem"
    config = _config(tmp_path, host, RegistrarConfig(host_id="single", ek_ca=bad))
    with pytest.raises(EmbeddedRegistrarError, match="registrar init"):
        register_with_registrar(host, config, host.ensure_host_keys())
    assert not IdentityFiles.under(config.state_dir).directory.exists()


def test_registrar_settings_load_from_file_and_environment(tmp_path: Path) -> None:
    from host_agent.config import ConfigError, load_config

    path = tmp_path / "agent.toml"
    path.write_text(
        '[registrar]\nurl = "https://reg.example:8443"\nca_sha256 = "' + "AB:" * 31 + 'AB"\n'
    )
    config = load_config(path, {"VTPM_HOST_ID": "hv7.example"})
    assert config.registrar == RegistrarConfig(
        url="https://reg.example:8443", ca_sha256="AB:" * 31 + "AB", host_id="hv7.example"
    )
    assert load_config(None, {"VTPM_REGISTRAR_CA_SHA256": "00" * 32}).registrar.ca_sha256
    with pytest.raises(ConfigError, match="64 hex digits"):
        load_config(None, {"VTPM_REGISTRAR_CA_SHA256": "not-a-fingerprint"})
