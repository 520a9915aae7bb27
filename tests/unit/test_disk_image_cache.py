"""vm_images/disk.py without building anything: the cache keys cover every input, a cached build
is a no-op, and the apt mirror is read from the host's apt configuration. The real build and boot
are in tests/vm/test_disk_image.py."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

import pytest

from vm_images import disk
from vm_images.build import ImageBuildError
from vm_images.disk import (
    AGENT_DIR,
    CONFIG_DIR,
    apt_source,
    apt_sources,
    cache_key,
    collect_base_inputs,
    collect_disk_inputs,
    mirror_release_date,
    parse_size,
)

RELEASE = "6.1.0-56-amd64"
VERSIONS = {"busybox-static": "1:1.35.0-4", "debootstrap": "1.0.128", "e2fsprogs": "1.47.0-2"}


@pytest.fixture
def trees(tmp_path: Path) -> tuple[Path, Path]:
    """Copies of vm_images/disk/ and guest_agent/ that a test may edit."""
    config = tmp_path / "config"
    agent = tmp_path / "agent"
    shutil.copytree(CONFIG_DIR, config)
    shutil.copytree(AGENT_DIR, agent, ignore=shutil.ignore_patterns("__pycache__"))
    return config, agent


def _key(trees: tuple[Path, Path], **overrides: Any) -> str:
    args: dict[str, Any] = {
        "base_key": "b" * 20,
        "kernel_release": RELEASE,
        "package_versions": VERSIONS,
        "size": 2 * 1024**3,
        "config_dir": trees[0],
        "agent_dir": trees[1],
    }
    args.update(overrides)
    return cache_key(collect_disk_inputs(**args))


def _base_key(**overrides: Any) -> str:
    args: dict[str, Any] = {
        "suite": "bookworm",
        "mirror": "http://mirror.invalid/debian",
        "release_date": "Sat, 11 Jul 2026 10:16:37 UTC",
        "packages": ["openssh-server", "python3"],
        "debootstrap_version": "1.0.128",
    }
    args.update(overrides)
    return cache_key(collect_base_inputs(**args))


def test_disk_key_is_stable(trees: tuple[Path, Path]) -> None:
    assert _key(trees) == _key(trees)
    assert _key(trees) == _key(trees, package_versions=dict(reversed(VERSIONS.items())))


@pytest.mark.parametrize(
    "change",
    [
        {"base_key": "c" * 20},
        {"kernel_release": "6.1.0-57-amd64"},
        {"package_versions": {**VERSIONS, "busybox-static": "1:1.36"}},
        {"size": 3 * 1024**3},
    ],
)
def test_disk_key_changes_with_each_input(trees: tuple[Path, Path], change: dict[str, Any]) -> None:
    assert _key(trees, **change) != _key(trees)


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIG_DIR.iterdir()))
def test_disk_key_changes_when_a_config_file_changes(trees: tuple[Path, Path], name: str) -> None:
    before = _key(trees)
    with (trees[0] / name).open("a") as f:
        f.write("\n# edited\n")
    assert _key(trees) != before


def test_disk_key_follows_the_guest_agent_sources(trees: tuple[Path, Path]) -> None:
    before = _key(trees)
    agent = trees[1]
    (agent / "__pycache__").mkdir(exist_ok=True)
    (agent / "__pycache__" / "cli.cpython-311.pyc").write_bytes(b"bytecode")
    assert _key(trees) == before, "bytecode is not an input"
    (agent / "extra.py").write_text("X = 1\n")
    added = _key(trees)
    assert added != before
    (agent / "extra.py").write_text("X = 2\n")
    assert _key(trees) not in (before, added)


def test_disk_key_covers_this_builder_and_build_py(
    trees: tuple[Path, Path], tmp_path: Path
) -> None:
    fake = tmp_path / "disk.py"
    fake.write_text("# another builder\n")
    assert _key(trees, sources=(fake,)) != _key(trees)


@pytest.mark.parametrize(
    "change",
    [
        {"suite": "trixie"},
        {"mirror": "http://other.invalid/debian"},
        {"release_date": "Sun, 12 Jul 2026 10:00:00 UTC"},
        {"release_date": None},
        {"packages": ["openssh-server", "python3", "strace"]},
        {"debootstrap_version": "1.0.129"},
    ],
)
def test_base_key_changes_with_each_input(change: dict[str, Any]) -> None:
    assert _base_key(**change) != _base_key()
    assert _base_key(packages=["python3", "openssh-server"]) == _base_key()


def test_apt_sources_deb822_and_one_line(tmp_path: Path) -> None:
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list").write_text(
        "# comment\n"
        "deb-src http://src.invalid/debian bookworm main\n"
        "deb [arch=amd64 signed-by=/k/one.gpg] http://one.invalid/debian/ bookworm-backports main\n"
    )
    (tmp_path / "sources.list.d" / "a.sources").write_text(
        "Types: deb\n"
        "# a comment inside\n"
        "URIs: http://two.invalid/debian\n"
        "Suites: bookworm bookworm-updates\n"
        "Components: main contrib\n"
        "Signed-By: /k/two.gpg\n"
        "\n"
        "Types: deb\n"
        "URIs: http://off.invalid/debian\n"
        "Suites: bookworm\n"
        "Components: main\n"
        "Enabled: no\n"
    )
    (tmp_path / "sources.list.d" / "b.sources.disabled").write_text(
        "Types: deb\nURIs: http://ignored.invalid/\nSuites: bookworm\nComponents: main\n"
    )
    found = [(s.uri, s.suite, s.keyring) for s in apt_sources(tmp_path)]
    assert found == [
        ("http://one.invalid/debian", "bookworm-backports", "/k/one.gpg"),
        ("http://two.invalid/debian", "bookworm", "/k/two.gpg"),
        ("http://two.invalid/debian", "bookworm-updates", "/k/two.gpg"),
    ]
    assert apt_source("bookworm", tmp_path).uri == "http://two.invalid/debian"
    with pytest.raises(ImageBuildError, match="trixie"):
        apt_source("trixie", tmp_path)


def test_mirror_release_date_from_apt_lists(tmp_path: Path) -> None:
    (tmp_path / "two.invalid_debian_dists_bookworm_InRelease").write_text(
        "-----BEGIN PGP SIGNED MESSAGE-----\nOrigin: Debian\nDate: Sat, 11 Jul 2026 10:16:37 UTC\n"
    )
    got = mirror_release_date("http://two.invalid/debian/", "bookworm", tmp_path)
    assert got == "Sat, 11 Jul 2026 10:16:37 UTC"
    assert mirror_release_date("http://two.invalid/debian", "trixie", tmp_path) is None


def test_parse_size() -> None:
    assert parse_size("2G") == 2 * 1024**3
    assert parse_size("1536M") == 1536 * 1024**2
    assert parse_size("4096") == 4096
    with pytest.raises(ValueError):
        parse_size("two gigs")


def test_second_build_is_a_noop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The expensive steps are stubbed: the first call runs each once, the second none."""
    calls: dict[str, int] = {}

    def count(name: str) -> None:
        calls[name] = calls.get(name, 0) + 1

    boot = tmp_path / "boot"
    boot.mkdir()
    (boot / f"vmlinuz-{RELEASE}").write_bytes(b"kernel")
    src = disk.AptSource("http://mirror.invalid/debian", "bookworm", None, "test")

    def fake_base(**kw: Any) -> Path:
        count("base")
        rootfs = tmp_path / "base-rootfs"
        (rootfs / "etc").mkdir(parents=True, exist_ok=True)
        return rootfs

    def fake_customise(rootfs: Path, out: Path, *a: Any) -> dict[str, object]:
        count("configure")
        (out / "id_ed25519").write_text("private")
        (out / "id_ed25519.pub").write_text("ssh-ed25519 AAAA test\n")
        return {"ssh_host_public_key": "ssh-ed25519 BBBB"}

    def fake_initramfs(out: Path, *a: Any) -> list[str]:
        count("initramfs")
        (out / "initrd.cpio").write_bytes(b"cpio")
        return []

    def fake_mkfs(image: Path, rootfs: Path, size: int, root_uuid: str) -> None:
        count("mkfs")
        with open(image, "wb") as f:
            f.truncate(size)

    monkeypatch.setattr(disk, "BOOT", boot)
    monkeypatch.setattr(disk, "host_suite", lambda: "bookworm")
    monkeypatch.setattr(disk, "apt_source", lambda suite: src)
    monkeypatch.setattr(disk, "mirror_release_date", lambda uri, suite: "a date")
    monkeypatch.setattr(disk, "query_package_versions", lambda names: dict.fromkeys(names, "1"))
    monkeypatch.setattr(disk, "build_base", fake_base)
    monkeypatch.setattr(disk, "_copy_modules", lambda *a: [])
    monkeypatch.setattr(disk, "_customise", fake_customise)
    monkeypatch.setattr(disk, "_initramfs", fake_initramfs)
    monkeypatch.setattr(disk, "_mkfs", fake_mkfs)
    monkeypatch.setattr(os, "geteuid", lambda: 0)

    cache = tmp_path / "cache"
    first = disk.build_disk_image(
        cache_root=cache, size=1024**2, kernel_release=RELEASE, progress=None
    )
    assert first.built and calls == {"base": 1, "configure": 1, "initramfs": 1, "mkfs": 1}
    assert first.image.stat().st_size == 1024**2
    assert first.as_json()["ssh_key"] == str(cache / first.key / "id_ed25519")

    lines: list[str] = []
    second = disk.build_disk_image(
        cache_root=cache, size=1024**2, kernel_release=RELEASE, progress=lines.append
    )
    assert not second.built and second.key == first.key
    assert calls == {"base": 1, "configure": 1, "initramfs": 1, "mkfs": 1}
    assert lines == [f"cached: {cache / first.key} (key {first.key}), nothing to do"]

    third = disk.build_disk_image(
        cache_root=cache, size=2 * 1024**2, kernel_release=RELEASE, progress=None
    )
    assert third.built and third.key != first.key, "another size is another image"
    assert sorted(p.name for p in cache.iterdir()) == sorted([first.key, third.key])


def test_prune_keeps_the_current_entries_and_the_package_cache(tmp_path: Path) -> None:
    for name in ("aaaa", "bbbb", "base-1111", "base-2222", "debs", ".cccc.tmp", ".dddd.tmp"):
        (tmp_path / name).mkdir()
    for name in ("aaaa", "bbbb", "base-1111", "base-2222"):
        (tmp_path / name / "manifest.json").write_text("{}")
    os.utime(tmp_path / ".cccc.tmp", (0, 0))  # an interrupted build from long ago
    removed = disk.prune_disk_cache(tmp_path, {"aaaa", "base-1111"}, now=time.time())
    assert sorted(p.name for p in removed) == [".cccc.tmp", "base-2222", "bbbb"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".dddd.tmp", "aaaa", "base-1111", "debs"]


def test_a_failed_debootstrap_leaves_nothing_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    unmounted: list[Path] = []

    def failing_debootstrap(target: Path, **kw: Any) -> None:
        (target / "proc").mkdir(parents=True)
        raise ImageBuildError("debootstrap exited 1")

    monkeypatch.setattr(disk, "_debootstrap", failing_debootstrap)
    monkeypatch.setattr(disk, "_unmount_all", lambda path, progress: unmounted.append(path))
    with pytest.raises(ImageBuildError, match="exited 1"):
        disk.build_base(
            cache_root=tmp_path,
            base_key="k" * 20,
            inputs={},
            suite="bookworm",
            source=disk.AptSource("http://mirror.invalid/debian", "bookworm", None, "test"),
            packages=["python3"],
            progress=None,
        )
    assert [p.name for p in tmp_path.iterdir()] == [], "the work directory is removed"
    assert unmounted and unmounted[0].name.startswith(".base-kkkk"), "mounts are undone first"


def test_mounts_under_reads_mountinfo_deepest_first(tmp_path: Path) -> None:
    # Whatever is mounted on this machine, nothing is under a fresh temporary directory.
    assert disk._mounts_under(tmp_path) == []
    assert disk._mounts_under(Path("/"))[-1] == Path("/")
