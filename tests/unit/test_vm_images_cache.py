"""vm_images/build.py: the cache key covers every input, a cached build is a no-op, and the
module load order follows modules.dep. Pure: kernel release and package versions are given, so
no dpkg, gcc or QEMU runs here (the real second build is checked in tests/vm)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from vm_images.build import (
    FORMAT,
    SOURCE_DIR,
    SOURCE_FILES,
    ImageBuildError,
    build_image,
    cache_key,
    collect_inputs,
    default_cache_root,
    module_load_order,
    prune_cache,
)

RELEASE = "6.1.0-56-amd64"
VERSIONS = {
    "busybox-static": "1:1.35.0-4",
    "dropbear-bin": "2022.83-1",
    "python3.11-minimal": "3.11.2",
}


@pytest.fixture
def sources(tmp_path: Path) -> Path:
    """A copy of the image's source files that a test may edit."""
    root = tmp_path / "src"
    for name in SOURCE_FILES:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(SOURCE_DIR / name, root / name)
    return root


def _key(sources: Path, **overrides: object) -> str:
    args: dict[str, object] = {
        "kernel_release": RELEASE,
        "package_versions": VERSIONS,
        "source_dir": sources,
    }
    args.update(overrides)
    return cache_key(collect_inputs(**args))  # type: ignore[arg-type]


def test_cache_key_is_stable_for_the_same_inputs(sources: Path) -> None:
    assert _key(sources) == _key(sources)
    assert _key(sources) == _key(sources, package_versions=dict(reversed(VERSIONS.items())))


@pytest.mark.parametrize("name", SOURCE_FILES)
def test_cache_key_changes_when_a_source_file_changes(sources: Path, name: str) -> None:
    before = _key(sources)
    with (sources / name).open("a") as f:
        f.write("\n# changed\n")
    assert _key(sources) != before


@pytest.mark.parametrize(
    "override",
    [
        {"kernel_release": "6.1.0-57-amd64"},
        {"package_versions": {**VERSIONS, "dropbear-bin": "2022.83-2"}},
        {"package_versions": {**VERSIONS, "libc6": "2.36-9"}},
        {"with_ssl": True},
    ],
    ids=["kernel", "package-version", "extra-package", "ssl"],
)
def test_cache_key_changes_when_an_environment_input_changes(
    sources: Path, override: dict[str, object]
) -> None:
    assert _key(sources, **override) != _key(sources)


def test_second_build_is_a_noop_that_says_so(sources: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    key = _key(sources)
    entry = cache / key
    entry.mkdir(parents=True)
    manifest = {
        "format": FORMAT,
        "key": key,
        "kernel": f"/boot/vmlinuz-{RELEASE}",
        "kernel_release": RELEASE,
        "initramfs": "initramfs.cpio",
        "ssh_private_key": "id_ed25519",
        "ssh_host_public_key": "ssh-ed25519 AAAA",
    }
    (entry / "manifest.json").write_text(json.dumps(manifest))
    lines: list[str] = []

    image = build_image(
        cache_root=cache,
        kernel_release=RELEASE,
        package_versions=VERSIONS,
        source_dir=sources,
        progress=lines.append,
    )

    assert not image.built
    assert image.key == key
    assert image.initramfs == entry / "initramfs.cpio"
    assert image.ssh_private_key == entry / "id_ed25519"
    assert len(lines) == 1 and "nothing to do" in lines[0] and key in lines[0]
    assert sorted(p.name for p in cache.iterdir()) == [key], "no build directory was made"


def test_missing_packages_fail_with_their_names(sources: Path, tmp_path: Path) -> None:
    with pytest.raises(ImageBuildError, match="dropbear-bin"):
        build_image(
            cache_root=tmp_path,
            kernel_release=RELEASE,
            package_versions={**VERSIONS, "dropbear-bin": ""},
            source_dir=sources,
            progress=None,
        )


def test_cache_root_honours_the_environment(tmp_path: Path) -> None:
    assert default_cache_root({"VTPM_IMAGE_CACHE": str(tmp_path)}) == tmp_path
    assert default_cache_root({"HOME": "/home/x"}) == Path("/home/x/.cache/vtpm-trust/images")


def test_prune_removes_only_other_entries_and_stale_leftovers(tmp_path: Path) -> None:
    for name in ("current", "old", ".current.fresh", ".old.stale"):
        (tmp_path / name).mkdir()
    for name in ("current", "old"):
        (tmp_path / name / "manifest.json").write_text("{}")
    (tmp_path / "not-ours").mkdir()
    (tmp_path / "a-file").write_text("x")
    stale = (tmp_path / ".old.stale").stat().st_mtime
    fresh_now = (tmp_path / ".current.fresh").stat().st_mtime + 10

    removed = prune_cache(tmp_path, {"current"}, now=fresh_now)
    assert [p.name for p in removed] == ["old"]
    removed = prune_cache(tmp_path, {"current"}, now=stale + 7200)
    assert sorted(p.name for p in removed) == [".current.fresh", ".old.stale"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "current", "not-ours"]


# Lines as they appear in Debian 6.1's modules.dep (one made .ko.xz to cover compressed trees).
MODULES_DEP = """\
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/virtio/virtio.ko: kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio_pci_legacy_dev.ko \
kernel/drivers/virtio/virtio_pci_modern_dev.ko kernel/drivers/virtio/virtio.ko \
kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio_pci_legacy_dev.ko:
kernel/drivers/virtio/virtio_pci_modern_dev.ko:
kernel/fs/9p/9p.ko: kernel/net/9p/9pnet.ko kernel/fs/fscache/fscache.ko kernel/fs/netfs/netfs.ko.xz
kernel/net/9p/9pnet.ko:
kernel/fs/netfs/netfs.ko.xz:
kernel/fs/fscache/fscache.ko: kernel/fs/netfs/netfs.ko.xz
"""


def test_module_load_order_puts_dependencies_first() -> None:
    order = [p.rsplit("/", 1)[1] for p in module_load_order(MODULES_DEP, ["virtio_pci", "9p"])]
    assert order.index("virtio_ring.ko") < order.index("virtio.ko") < order.index("virtio_pci.ko")
    assert order.index("virtio_pci_modern_dev.ko") < order.index("virtio_pci.ko")
    assert order.index("netfs.ko.xz") < order.index("fscache.ko") < order.index("9p.ko")
    assert order.index("9pnet.ko") < order.index("9p.ko")
    assert len(order) == len(set(order)) == 9


def test_unknown_module_is_an_error() -> None:
    with pytest.raises(ImageBuildError, match="virtio_blk"):
        module_load_order(MODULES_DEP, ["virtio_blk"])
