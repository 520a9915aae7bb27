"""The lifecycle's small files: the embedded root's qemu.conf, adoption records, image manifests."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import pytest

from host_agent.config import AgentConfig, LibvirtConfig, load_config
from host_agent.lifecycle.adoption import (
    AdoptionRecord,
    AdoptionRecordError,
    VmLayout,
    daemon_socket_of,
    load_image_spec,
)
from host_agent.lifecycle.embedded import (
    QEMU_CONF,
    embedded_root_of,
    embedded_uri,
    prepare_embedded_root,
)

UUID = "0b3c5b0e-56d2-4b5e-9d1c-6c2e2b7f9a11"


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A short directory: an embedded root must keep QEMU's socket paths under 107 bytes."""
    d = Path(tempfile.mkdtemp(prefix="lf-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_prepare_embedded_root_writes_qemu_conf_once_and_repairs_it(short_dir: Path) -> None:
    root = short_dir / "libvirt"
    assert prepare_embedded_root(root, ensure_user=False) == root
    conf = root / "etc" / "qemu.conf"
    assert conf.read_text() == QEMU_CONF
    assert (root.stat().st_mode & 0o777) == 0o700
    for line in ('user = "root"', 'security_driver = "none"', 'stdio_handler = "file"'):
        assert line in QEMU_CONF
    mtime = conf.stat().st_mtime_ns
    prepare_embedded_root(root, ensure_user=False)  # idempotent: not rewritten
    assert conf.stat().st_mtime_ns == mtime
    conf.write_text('user = "libvirt-qemu"\n')  # drifted: repaired
    prepare_embedded_root(root, ensure_user=False)
    assert conf.read_text() == QEMU_CONF
    assert sorted(os.listdir(conf.parent)) == ["qemu.conf"]  # no temporary file left


def test_prepare_embedded_root_refuses_relative_and_long_roots(short_dir: Path) -> None:
    with pytest.raises(ValueError, match="absolute"):
        prepare_embedded_root(Path("relative/root"), ensure_user=False)
    with pytest.raises(ValueError, match="unix socket"):
        prepare_embedded_root(short_dir / ("x" * 80), ensure_user=False)


def test_embedded_uri_round_trip_and_config_default() -> None:
    assert embedded_root_of(embedded_uri(Path("/var/lib/vt/libvirt"))) == Path(
        "/var/lib/vt/libvirt"
    )
    assert embedded_root_of("qemu:///system") is None
    assert embedded_root_of("qemu+ssh://h/system") is None
    config = load_config(None, {"VTPM_STATE_DIR": "/srv/vt"})
    assert config.libvirt.uri_for(config.state_dir) == "qemu:///embed?root=/srv/vt/libvirt"
    config = load_config(None, {"VTPM_LIBVIRT_URI": "qemu:///system"})
    assert config.libvirt == LibvirtConfig(uri="qemu:///system")
    assert AgentConfig().libvirt.uri is None


def _record() -> AdoptionRecord:
    layout = VmLayout.of(Path("/var/lib/vt"), UUID)
    return AdoptionRecord(
        name="vm1",
        uuid=UUID,
        adopted_at="2026-11-27T07:00:00+00:00",
        bridge_socket=str(layout.bridge_socket),
        channel_socket=str(layout.channel_socket),
        channel_name="org.vtpm-trust.attest.0",
        tpm_model="tpm-crb",
        previous_tpm_backend=None,
        vtpm_state="provisioned",
        xml_sha256_before="",
        xml_sha256_after="ab" * 32,
    )


def test_adoption_record_round_trips_and_the_layout_is_under_the_state_dir() -> None:
    rec = _record()
    assert AdoptionRecord.from_json(rec.to_json()) == rec
    assert rec.bridge_socket == f"/var/lib/vt/vms/{UUID}/bridge.sock"
    assert daemon_socket_of(Path("/var/lib/vt")) == Path("/var/lib/vt/run/daemon.sock")
    with pytest.raises(ValueError):
        VmLayout.of(Path("/x"), "not-a-uuid")


@pytest.mark.parametrize(
    "text",
    [
        "",
        "[]",
        "{",
        json.dumps({**asdict(_record()), "format": "vtpm-trust/adoption/2"}),
        json.dumps({k: v for k, v in asdict(_record()).items() if k != "uuid"}),
        json.dumps({**asdict(_record()), "extra": 1}),
        json.dumps({**asdict(_record()), "name": 7}),
    ],
)
def test_malformed_adoption_records_are_parse_errors(text: str) -> None:
    with pytest.raises(AdoptionRecordError) as exc:
        AdoptionRecord.from_json(text)
    assert exc.value.id == "parse.adoption_record"


def test_image_manifest_gives_kernel_initrd_cmdline(short_dir: Path) -> None:
    manifest = {
        "format": "vtpm-trust/guest-image/1",
        "kernel": "/boot/vmlinuz-6.1.0-56-amd64",
        "initramfs": "initramfs.cpio",
        "cmdline": "console=ttyS0 panic=-1",
    }
    (short_dir / "manifest.json").write_text(json.dumps(manifest))
    spec = load_image_spec(short_dir)
    assert spec == load_image_spec(short_dir / "manifest.json")
    assert spec.initrd == (short_dir / "initramfs.cpio").resolve()
    assert (spec.kernel, spec.cmdline) == (Path(manifest["kernel"]), manifest["cmdline"])
    for bad in ({**manifest, "format": "other/1"}, {"format": "vtpm-trust/guest-image/1"}):
        (short_dir / "manifest.json").write_text(json.dumps(bad))
        with pytest.raises(AdoptionRecordError):
            load_image_spec(short_dir)
    with pytest.raises(AdoptionRecordError):
        load_image_spec(short_dir / "missing")
