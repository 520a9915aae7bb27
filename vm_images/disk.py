"""Build the vtpm-trust disk image: a Debian root file system on ext4, booted with IMA measuring it.

``python -m vm_images.disk [--json] [--size 2G]`` makes, in two cached stages:

1. **base** — ``debootstrap --variant=minbase`` of the host's Debian suite plus the packages in
   ``vm_images/disk/packages`` (openssh-server, python3, busybox, kmod), from the apt mirror this
   machine is configured with (read from ``/etc/apt/sources.list*`` at build time). Cached by the
   package list, suite, mirror, the mirror's Release date (from apt's local lists: free), the
   debootstrap version and :data:`BASE_RECIPE`.
2. **disk** — the base tree plus the host kernel's virtio modules, the guest agent from
   ``guest_agent/``, the configuration in ``vm_images/disk/``, fresh SSH keys, written into a raw
   image with ``mkfs.ext4 -d`` (no loop devices, no mounts), and a small busybox initramfs that
   loads the IMA policy, mounts the root from virtio-blk and ``switch_root``s to
   ``/sbin/vtpm-init``. Cached by everything above plus this file, every file in
   ``vm_images/disk/``, ``vm_images/build.py`` (whose cpio writer and busybox staging are reused),
   the kernel release and package version, busybox-static's version, the guest agent's sources and
   the image size.

Progress goes to stderr, one line per step; ``--json`` prints the result on stdout. Entries live
in ``$VTPM_DISK_CACHE/<key>/`` or ``~/.cache/vtpm-trust/disks/<key>/`` (beside, not inside, the
initramfs cache, whose ``--prune`` would otherwise delete them). Needs root (debootstrap, device
nodes and root-owned files in the image). Standard library only.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script: python vm_images/disk.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vm_images._common import (
    ImageBuildError,
    Progress,
    cache_key,
    env_cache_dir,
    prune_entries,
    publish_entry,
    run_step,
    work_dir,
)
from vm_images._common import log as _log
from vm_images.build import (  # the cpio writer and busybox staging are shared with build.py
    READY_MARKER,
    _Cpio,
    _stage_busybox,
    default_kernel_release,
    module_load_order,
    query_package_versions,
)

__all__ = [
    "BASE_CMDLINE",
    "FORMAT",
    "AptSource",
    "DiskImage",
    "apt_source",
    "apt_sources",
    "build_disk_image",
    "cache_key",
    "collect_base_inputs",
    "collect_disk_inputs",
    "default_disk_cache_root",
    "load_disk_image",
    "main",
    "mirror_release_date",
    "parse_size",
    "prune_disk_cache",
]

FORMAT = "vtpm-trust/disk-image/1"
BASE_FORMAT = "vtpm-trust/disk-base/1"
# Bump when the base stage's recipe (the debootstrap call, the clean-up after it) changes: the
# base key hashes the package list and the mirror, not this file, so that editing the disk
# stage does not repeat the download.
BASE_RECIPE = 1
REPO = Path(__file__).resolve().parents[1]
CONFIG_DIR = Path(__file__).resolve().parent / "disk"
AGENT_DIR = REPO / "guest_agent"
BUILD_PY = Path(__file__).resolve().parent / "build.py"
VARIANT = "minbase"
BOOT = Path("/boot")
DEFAULT_SIZE = 2 * 1024**3
HOSTNAME = "vtpm-disk"
# Modules the initramfs loads to reach the root file system (dependencies come from modules.dep).
INITRAMFS_MODULES = (
    "virtio_pci",
    "virtio_blk",
    "crc32c_generic",
    "ext4",
)
# Modules the root file system's init loads with modprobe: IMA measures them from ext4.
ROOTFS_MODULES = ("virtio_net", "virtio_console")
BASE_CMDLINE = (
    "console=ttyS0 panic=-1 quiet loglevel=3 ima_policy=tcb ima_hash=sha256 ima_template=ima-ng"
)
# The disk is attached read-only in effect: writes go to a temporary overlay QEMU discards.
DRIVE_OPTIONS = "format=raw,if=virtio,snapshot=on"
# Host packages whose versions are part of the disk key.
HOST_PACKAGES = ("busybox-static", "debootstrap", "e2fsprogs")

# ----------------------------------------------------------------------------- results


@dataclass(frozen=True)
class DiskImage:
    """A built (or cached) disk image. Paths are absolute."""

    key: str
    directory: Path
    image: Path
    kernel: Path
    kernel_release: str
    initrd: Path
    cmdline: str
    root_uuid: str
    ssh_private_key: Path
    ssh_host_public_key: str
    manifest: Mapping[str, object]
    built: bool

    def qemu_drive_args(self) -> tuple[str, ...]:
        """``-drive`` arguments for the root disk (writes are discarded: ``snapshot=on``)."""
        return ("-drive", f"file={self.image},{DRIVE_OPTIONS}")

    def as_json(self) -> dict[str, object]:
        return {
            "key": self.key,
            "built": self.built,
            "directory": str(self.directory),
            "image": str(self.image),
            "image_format": "raw",
            "size_bytes": self.manifest.get("size_bytes"),
            "allocated_bytes": self.manifest.get("allocated_bytes"),
            "kernel": str(self.kernel),
            "kernel_release": self.kernel_release,
            "initrd": str(self.initrd),
            "cmdline": self.cmdline,
            "root_uuid": self.root_uuid,
            "ssh_user": "root",
            "ssh_key": str(self.ssh_private_key),
            "ssh_host_public_key": self.ssh_host_public_key,
            "qemu_drive": list(self.qemu_drive_args()),
            "build_seconds": self.manifest.get("build_seconds"),
            "step_seconds": self.manifest.get("step_seconds"),
        }


def default_disk_cache_root(environ: Mapping[str, str] | None = None) -> Path:
    """``$VTPM_DISK_CACHE`` if set, else ``~/.cache/vtpm-trust/disks``."""
    return env_cache_dir(environ, "VTPM_DISK_CACHE", "disks")


def parse_size(text: str) -> int:
    """``2G``, ``1536M``, ``4294967296`` → bytes (binary units)."""
    m = re.fullmatch(r"\s*(\d+)\s*([KMGT]?)(i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise ValueError(f"not a size: {text!r} (e.g. 2G, 1536M)")
    scale = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}[m.group(2).upper()]
    return int(m.group(1)) * scale


# ----------------------------------------------------------------------------- the apt mirror


@dataclass(frozen=True)
class AptSource:
    """One ``deb`` source of the host's apt configuration."""

    uri: str
    suite: str
    keyring: str | None
    origin: str  # the file it came from


def _deb822_stanzas(text: str) -> Iterator[dict[str, str]]:
    fields: dict[str, str] = {}
    last = ""
    for line in [*text.splitlines(), ""]:
        if line.startswith("#"):
            continue
        if not line.strip():
            if fields:
                yield fields
            fields, last = {}, ""
        elif line[0] in " \t" and last:
            fields[last] += "\n" + line.strip()
        elif ":" in line:
            name, _, value = line.partition(":")
            last = name.strip().lower()
            fields[last] = value.strip()


def _one_line_sources(text: str, origin: str) -> Iterator[AptSource]:
    for line in text.splitlines():
        m = re.match(r"deb\s+(\[[^\]]*\]\s+)?(\S+)\s+(\S+)\s+(.*)", line.split("#", 1)[0].strip())
        if not m or "main" not in m.group(4).split():
            continue
        keyring = re.search(r"signed-by=([^\s\]]+)", m.group(1) or "")
        yield AptSource(m.group(2).rstrip("/"), m.group(3), keyring and keyring.group(1), origin)


def apt_sources(etc_apt: Path = Path("/etc/apt")) -> list[AptSource]:
    """Every enabled ``deb`` source with component ``main``, in the order apt reads them."""
    files = []
    if (etc_apt / "sources.list").is_file():
        files.append(etc_apt / "sources.list")
    parts = etc_apt / "sources.list.d"
    if parts.is_dir():
        files += sorted(p for p in parts.iterdir() if p.suffix in (".list", ".sources"))
    found: list[AptSource] = []
    for path in files:
        text = path.read_text(errors="replace")
        if path.suffix != ".sources":
            found += _one_line_sources(text, str(path))
            continue
        for st in _deb822_stanzas(text):
            if st.get("enabled", "yes").lower() == "no" or "deb" not in st.get("types", "").split():
                continue
            if "main" not in st.get("components", "").split():
                continue
            for uri in st.get("uris", "").split():
                for suite in st.get("suites", "").split():
                    found.append(
                        AptSource(uri.rstrip("/"), suite, st.get("signed-by") or None, str(path))
                    )
    return found


def apt_source(suite: str, etc_apt: Path = Path("/etc/apt")) -> AptSource:
    """The first configured mirror that serves ``suite`` (``main``): debootstrap uses it."""
    for src in apt_sources(etc_apt):
        if src.suite == suite:
            return src
    raise ImageBuildError(
        f"no apt source for suite {suite!r} with component main in {etc_apt}/sources.list*"
    )


def mirror_release_date(
    uri: str, suite: str, lists: Path = Path("/var/lib/apt/lists")
) -> str | None:
    """The ``Date:`` of the suite's Release file as apt last fetched it (no network), if any."""
    base = re.sub(r"^[a-z]+://", "", uri).rstrip("/").replace("/", "_")
    for name in ("InRelease", "Release"):
        path = lists / f"{base}_dists_{suite}_{name}"
        if path.is_file():
            for line in path.read_text(errors="replace").splitlines():
                if line.startswith("Date:"):
                    return line.partition(":")[2].strip()
    return None


def host_suite(os_release: Path = Path("/etc/os-release")) -> str:
    for line in os_release.read_text().splitlines():
        if line.startswith("VERSION_CODENAME="):
            return line.partition("=")[2].strip().strip('"')
    raise ImageBuildError(f"no VERSION_CODENAME in {os_release}")


# ----------------------------------------------------------------------------- cache keys


def _file_digests(root: Path, *, pattern: str = "*") -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob(pattern))
        if p.is_file() and "__pycache__" not in p.parts and not p.name.endswith(".pyc")
    }


def read_package_list(path: Path) -> list[str]:
    return [w for line in path.read_text().splitlines() for w in line.split("#", 1)[0].split() if w]


def collect_base_inputs(
    *,
    suite: str,
    mirror: str,
    release_date: str | None,
    packages: list[str],
    debootstrap_version: str,
) -> dict[str, object]:
    """What the debootstrap stage is made from (hashing it gives the base key)."""
    return {
        "format": BASE_FORMAT,
        "recipe": BASE_RECIPE,
        "variant": VARIANT,
        "suite": suite,
        "mirror": mirror,
        "release_date": release_date,
        "packages": sorted(packages),
        "debootstrap": debootstrap_version,
    }


def collect_disk_inputs(
    *,
    base_key: str,
    kernel_release: str,
    package_versions: Mapping[str, str],
    size: int,
    config_dir: Path = CONFIG_DIR,
    agent_dir: Path = AGENT_DIR,
    sources: tuple[Path, ...] = (Path(__file__).resolve(), BUILD_PY),
) -> dict[str, object]:
    """Everything the disk image is made from (hashing it gives the cache key)."""
    return {
        "format": FORMAT,
        "base": base_key,
        "sources": {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sources},
        "config": _file_digests(config_dir),
        "guest_agent": _file_digests(agent_dir),
        "kernel_release": kernel_release,
        "packages": dict(sorted(package_versions.items())),
        "size": size,
        "cmdline": BASE_CMDLINE,
    }


# ----------------------------------------------------------------------------- helpers


def _stderr_progress(msg: str) -> None:
    print(f"vm_images.disk: {msg}", file=sys.stderr, flush=True)


def _run(step: str, cmd: list[str]) -> subprocess.CompletedProcess[str]:
    """A build tool's run; a failure's message keeps the last 4000 characters of its output."""
    return run_step(step, cmd, tail=4000)


def _mounts_under(path: Path) -> list[Path]:
    """Mount points at or below ``path``, deepest first (from /proc/self/mountinfo)."""
    prefix = str(path.resolve())
    found = []
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            point = line.split()[4].replace("\\040", " ")
            if point == prefix or point.startswith(prefix + "/"):
                found.append(Path(point))
    return sorted(found, key=lambda p: len(p.parts), reverse=True)


def _unmount_all(path: Path, progress: Progress | None) -> None:
    """Lazily unmount whatever a failed debootstrap left mounted under ``path``."""
    for point in _mounts_under(path):
        _log(progress, f"cleanup: unmounting {point}")
        subprocess.run(["umount", "-l", str(point)], capture_output=True)


def _remove_tree(path: Path, progress: Progress | None) -> None:
    _unmount_all(path, progress)
    if _mounts_under(path):
        raise ImageBuildError(f"cleanup: {path} still has mounts; not deleting it")
    shutil.rmtree(path, ignore_errors=True)


class _Steps:
    def __init__(self, progress: Progress | None) -> None:
        self.progress = progress
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        _log(self.progress, f"{name} ...")
        t = time.monotonic()
        yield
        self.seconds[name] = round(time.monotonic() - t, 2)
        _log(self.progress, f"{name}: done in {self.seconds[name]:.1f} s")


# ----------------------------------------------------------------------------- base stage


def _debootstrap(
    target: Path,
    *,
    suite: str,
    source: AptSource,
    packages: list[str],
    deb_cache: Path,
    progress: Progress | None,
) -> None:
    """Run debootstrap, reporting each phase (with package counts) as it starts."""
    deb_cache.mkdir(parents=True, exist_ok=True)
    cmd = [
        "debootstrap",
        f"--variant={VARIANT}",
        f"--include={','.join(packages)}",
        f"--cache-dir={deb_cache}",
    ]
    if source.keyring and source.keyring.startswith("/"):
        cmd.append(f"--keyring={source.keyring}")
    cmd += [suite, str(target), source.uri]
    _log(progress, f"debootstrap: {' '.join(cmd)}")
    log_lines: list[str] = []
    with subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
    ) as proc:
        assert proc.stdout is not None
        # One line every few seconds (the latest step) instead of ~600 per-package lines.
        t0 = last = time.monotonic()
        for line in proc.stdout:
            log_lines.append(line.rstrip())
            now = time.monotonic()
            if line.startswith(("W:", "E:")) or "successfully" in line or now - last >= 5:
                _log(progress, f"debootstrap: [{now - t0:3.0f} s] {line.strip()}")
                last = now
        rc = proc.wait()
    if rc != 0:
        debootstrap_log = target / "debootstrap" / "debootstrap.log"
        extra = (
            debootstrap_log.read_text(errors="replace")[-3000:] if debootstrap_log.is_file() else ""
        )
        raise ImageBuildError(
            f"debootstrap exited {rc}\n" + "\n".join(log_lines[-40:]) + "\n" + extra
        )


def _clean_base(rootfs: Path) -> None:
    """Drop what debootstrap leaves that the image does not need (apt lists and archives)."""
    for rel in ("var/lib/apt/lists", "var/cache/apt/archives"):
        d = rootfs / rel
        for p in d.glob("*") if d.is_dir() else []:
            if p.is_file() and p.name != "lock":
                p.unlink()
    for p in (rootfs / "var/cache/apt").glob("*.bin"):
        p.unlink()


def build_base(
    *,
    cache_root: Path,
    base_key: str,
    inputs: Mapping[str, object],
    suite: str,
    source: AptSource,
    packages: list[str],
    progress: Progress | None,
    force: bool = False,
) -> Path:
    """The debootstrapped tree for ``base_key`` (built now if it is not cached); returns it."""
    final = cache_root / f"base-{base_key}"
    if (final / "manifest.json").is_file() and not force:
        _log(progress, f"base: cached {final}")
        return final / "rootfs"
    cache_root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".base-{base_key}.", dir=cache_root))
    steps = _Steps(progress)
    t0 = time.monotonic()
    try:
        with steps("debootstrap"):
            _debootstrap(
                work / "rootfs",
                suite=suite,
                source=source,
                packages=packages,
                deb_cache=cache_root / "debs",
                progress=progress,
            )
        _unmount_all(work, progress)
        _clean_base(work / "rootfs")
        manifest = {
            "format": BASE_FORMAT,
            "key": base_key,
            "inputs": inputs,
            "seconds": round(time.monotonic() - t0, 1),
            "step_seconds": steps.seconds,
        }
        (work / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        if force and final.exists():
            _remove_tree(final, progress)
        try:
            work.rename(final)
        except OSError:
            if not (final / "manifest.json").is_file():
                raise
            _remove_tree(work, progress)
    except BaseException:
        _remove_tree(work, progress)
        raise
    return final / "rootfs"


# ----------------------------------------------------------------------------- disk stage


def _put(dest: Path, data: bytes | str, mode: int = 0o644) -> None:
    """Write a file into the stage as a new inode: the stage is a hard-link copy of the cached
    base tree, so writing through an existing link would change the base for every later build."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        dest.unlink()
    dest.write_bytes(data.encode() if isinstance(data, str) else data)
    dest.chmod(mode)


def _install(src: Path, dest: Path, mode: int = 0o644, subst: Mapping[str, str] = {}) -> None:
    text = src.read_bytes()
    for k, v in subst.items():
        text = text.replace(k.encode(), v.encode())
    _put(dest, text, mode)


def _policy_rules(path: Path, root_uuid: str) -> str:
    lines = path.read_text().replace("@ROOT_UUID@", root_uuid).splitlines()
    return "".join(
        line.strip() + "\n" for line in lines if line.strip() and not line.startswith("#")
    )


def _copy_modules(stage: Path, release: str, wanted: tuple[str, ...]) -> list[str]:
    """Copy ``wanted`` and their dependencies into ``stage/lib/modules/<release>`` + depmod."""
    src_root = Path("/lib/modules") / release
    order = module_load_order((src_root / "modules.dep").read_text(), wanted)
    dest_root = stage / "usr" / "lib" / "modules" / release
    for rel in order:
        if not rel.endswith(".ko"):
            raise ImageBuildError(
                f"modules: {rel} is compressed; IMA measures only .ko via finit_module"
            )
        _put(dest_root / rel, (src_root / rel).read_bytes())
    for name in ("modules.order", "modules.builtin", "modules.builtin.modinfo"):
        if (src_root / name).is_file():
            _put(dest_root / name, (src_root / name).read_bytes())
    _run("depmod", ["depmod", "-b", str(stage), release])
    return order


def _ssh_keys(stage: Path, out: Path) -> str:
    """Fresh host key (pinned by tests) and test client key; returns the host public key."""
    ssh = stage / "etc" / "ssh"
    for p in ssh.glob("ssh_host_*"):
        p.unlink()
    host = ssh / "ssh_host_ed25519_key"
    _run(
        "ssh host key",
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", HOSTNAME, "-f", str(host)],
    )
    host_pub = " ".join(host.with_suffix(".pub").read_text().split()[:2])
    client = out / "id_ed25519"
    _run(
        "ssh test key",
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "vtpm-trust-test", "-f", str(client)],
    )
    root_ssh = stage / "root" / ".ssh"
    root_ssh.mkdir(parents=True, exist_ok=True)
    root_ssh.chmod(0o700)
    _put(root_ssh / "authorized_keys", client.with_suffix(".pub").read_bytes(), 0o600)
    return host_pub


def _install_agent(stage: Path, agent_dir: Path) -> list[str]:
    """guest_agent/ → /opt/vtpm-guest, put on Python's path by a .pth file."""
    dest = stage / "opt" / "vtpm-guest" / "guest_agent"
    files = []
    for p in sorted(agent_dir.rglob("*")):
        if not p.is_file() or "__pycache__" in p.parts or p.suffix == ".pyc":
            continue
        rel = p.relative_to(agent_dir)
        _install(p, dest / rel)
        files.append(str(rel))
    pth = stage / "usr" / "lib" / "python3" / "dist-packages" / "vtpm-guest.pth"
    _put(pth, "/opt/vtpm-guest\n")
    return files


def _initramfs(out: Path, stage_dir: Path, release: str, root_uuid: str, policy: str) -> list[str]:
    """busybox + block/ext4 modules + initramfs-init → ``out/initrd.cpio`` (uncompressed)."""
    for d in ("bin", "dev", "proc", "sys", "etc", "lib/modules", "newroot"):
        (stage_dir / d).mkdir(parents=True, exist_ok=True)
    _stage_busybox(stage_dir)
    src_root = Path("/lib/modules") / release
    order = module_load_order((src_root / "modules.dep").read_text(), INITRAMFS_MODULES)
    names = []
    for rel in order:
        name = rel.rsplit("/", 1)[-1]
        shutil.copyfile(src_root / rel, stage_dir / "lib" / "modules" / name)
        names.append(name)
    (stage_dir / "etc" / "modules.order").write_text("\n".join(names) + "\n")
    (stage_dir / "etc" / "root-uuid").write_text(root_uuid + "\n")
    (stage_dir / "etc" / "ima-policy").write_text(policy)
    _install(CONFIG_DIR / "initramfs-init", stage_dir / "init", 0o755)
    cpio = _Cpio()
    cpio.add_char_device("dev/console", 0o600, 5, 1)
    cpio.add_char_device("dev/null", 0o666, 1, 3)
    cpio.add_tree(stage_dir)
    (out / "initrd.cpio").write_bytes(cpio.finish())
    return names


def _customise(
    rootfs: Path, out: Path, key: str, release: str, root_uuid: str, agent_dir: Path
) -> dict[str, object]:
    cfg = CONFIG_DIR
    subst = {"@ROOT_UUID@": root_uuid}
    _install(cfg / "vtpm-init", rootfs / "sbin" / "vtpm-init", 0o755)
    _install(cfg / "vtpm-vport-links", rootfs / "usr/local/sbin/vtpm-vport-links", 0o755)
    _install(cfg / "vtpm-guest", rootfs / "usr/local/bin/vtpm-guest", 0o755)
    _install(cfg / "fstab", rootfs / "etc" / "fstab", subst=subst)
    _install(cfg / "inittab", rootfs / "etc" / "inittab")
    _install(cfg / "sshd_config", rootfs / "etc/ssh/sshd_config.d/vtpm.conf")
    _put(rootfs / "etc" / "hostname", HOSTNAME + "\n")
    _put(rootfs / "etc" / "hosts", f"127.0.0.1 localhost\n127.0.1.1 {HOSTNAME}\n")
    vtpm = rootfs / "etc" / "vtpm"
    vtpm.mkdir(exist_ok=True)
    _put(vtpm / "image-key", key + "\n")
    _put(vtpm / "kernel-release", release + "\n")
    _put(vtpm / "modules", "# loaded by /sbin/vtpm-init\n" + "\n".join(ROOTFS_MODULES) + "\n")
    _install(cfg / "ima-policy", vtpm / "ima-policy", subst=subst)
    host_pub = _ssh_keys(rootfs, out)
    agent_files = _install_agent(rootfs, agent_dir)
    return {"ssh_host_public_key": host_pub, "guest_agent_files": agent_files}


def _mkfs(image: Path, rootfs: Path, size: int, root_uuid: str) -> None:
    with open(image, "wb") as f:
        f.truncate(size)
    _run(
        "mkfs.ext4",
        [
            "mkfs.ext4",
            "-q",
            "-F",
            "-L",
            "vtpm-root",
            "-U",
            root_uuid,
            "-E",
            "root_owner=0:0",
            "-d",
            str(rootfs),
            str(image),
        ],
    )


def load_disk_image(directory: Path, *, built: bool = False) -> DiskImage:
    manifest_path = directory / "manifest.json"
    m = json.loads(manifest_path.read_text())
    if m.get("format") != FORMAT:
        raise ImageBuildError(f"{manifest_path}: format {m.get('format')!r}, expected {FORMAT!r}")
    return DiskImage(
        key=str(m["key"]),
        directory=directory,
        image=directory / str(m["image"]),
        kernel=Path(m["kernel"]),
        kernel_release=str(m["kernel_release"]),
        initrd=directory / str(m["initrd"]),
        cmdline=str(m["cmdline"]),
        root_uuid=str(m["root_uuid"]),
        ssh_private_key=directory / str(m["ssh_private_key"]),
        ssh_host_public_key=str(m["ssh_host_public_key"]),
        manifest=m,
        built=built,
    )


def build_disk_image(
    *,
    cache_root: Path | None = None,
    size: int = DEFAULT_SIZE,
    kernel_release: str | None = None,
    suite: str | None = None,
    agent_dir: Path = AGENT_DIR,
    force: bool = False,
    progress: Progress | None = _stderr_progress,
) -> DiskImage:
    """Build the disk image, or return the cached one when every input is unchanged.

    Raises:
        ImageBuildError: not root, a tool or input is missing, or a build step failed.
    """
    t0 = time.monotonic()
    root = default_disk_cache_root() if cache_root is None else cache_root
    release = kernel_release or default_kernel_release()
    suite = suite or host_suite()
    source = apt_source(suite)
    packages = read_package_list(CONFIG_DIR / "packages")
    kernel_pkg = f"linux-image-{release}"
    versions = query_package_versions((*HOST_PACKAGES, kernel_pkg))
    missing = sorted(p for p, v in versions.items() if not v)
    if missing:
        raise ImageBuildError(f"Debian packages not installed: {', '.join(missing)} (deps/)")
    base_inputs = collect_base_inputs(
        suite=suite,
        mirror=source.uri,
        release_date=mirror_release_date(source.uri, suite),
        packages=packages,
        debootstrap_version=versions["debootstrap"],
    )
    base_key = cache_key(base_inputs)
    inputs = collect_disk_inputs(
        base_key=base_key,
        kernel_release=release,
        package_versions=versions,
        size=size,
        agent_dir=agent_dir,
    )
    key = cache_key(inputs)
    final = root / key
    if (final / "manifest.json").is_file() and not force:
        _log(progress, f"cached: {final} (key {key}), nothing to do")
        return load_disk_image(final)
    if os.geteuid() != 0:
        raise ImageBuildError("building the disk image needs root (debootstrap, device nodes)")
    kernel = BOOT / f"vmlinuz-{release}"
    if not kernel.is_file():
        raise ImageBuildError(f"kernel {kernel} not found")
    if not agent_dir.is_dir():
        raise ImageBuildError(f"guest agent sources {agent_dir} not found")

    _log(progress, f"building disk key {key} (base {base_key}, kernel {release}) into {final}")
    rootfs_base = build_base(
        cache_root=root,
        base_key=base_key,
        inputs=base_inputs,
        suite=suite,
        source=source,
        packages=packages,
        progress=progress,
        force=force,
    )
    out = work_dir(root, key)
    steps = _Steps(progress)
    # Deterministic per key, so the IMA policy's fsuuid and the image agree across rebuilds.
    root_uuid = str(uuid.uuid5(uuid.NAMESPACE_URL, f"vtpm-trust-disk:{key}"))
    # The stage lives in the cache root (hard links to the base need the same file system) and
    # starts with a dot, so --prune clears it if a build is killed.
    try:
        with tempfile.TemporaryDirectory(prefix=f".stage-{key}.", dir=root) as tmp:
            stage = Path(tmp) / "rootfs"
            with steps("copy base tree"):
                # Hard links: ~1 s instead of ~12 s for a full copy; every write into the
                # stage goes through _put, which breaks the link first.
                _run("copy", ["cp", "-al", str(rootfs_base), str(stage)])
            with steps("modules"):
                rootfs_modules = _copy_modules(stage, release, INITRAMFS_MODULES + ROOTFS_MODULES)
            with steps("configure"):
                details = _customise(stage, out, key, release, root_uuid, agent_dir)
            with steps("initramfs"):
                policy = _policy_rules(CONFIG_DIR / "ima-policy", root_uuid)
                initrd_modules = _initramfs(out, Path(tmp) / "initrd", release, root_uuid, policy)
            with steps("filesystem image"):
                _mkfs(out / "disk.raw", stage, size, root_uuid)
        st = (out / "disk.raw").stat()
        manifest = {
            "format": FORMAT,
            "key": key,
            "base_key": base_key,
            "inputs": inputs,
            "base_inputs": base_inputs,
            "apt_source": {"uri": source.uri, "suite": suite, "from": source.origin},
            "image": "disk.raw",
            "image_format": "raw",
            "size_bytes": st.st_size,
            "allocated_bytes": st.st_blocks * 512,
            "root_uuid": root_uuid,
            "kernel": str(kernel),
            "kernel_release": release,
            "initrd": "initrd.cpio",
            "initrd_bytes": (out / "initrd.cpio").stat().st_size,
            "initrd_modules": initrd_modules,
            "rootfs_modules": rootfs_modules,
            "cmdline": BASE_CMDLINE,
            "ima_policy": policy.splitlines(),
            "ready_marker": READY_MARKER,
            "ssh_user": "root",
            "ssh_private_key": "id_ed25519",
            "ssh_public_key": (out / "id_ed25519.pub").read_text().strip(),
            **details,
            "step_seconds": steps.seconds,
            "build_seconds": round(time.monotonic() - t0, 1),
        }
        if not publish_entry(out, final, manifest, force=force, progress=progress):
            return load_disk_image(final)  # another build of the same key won the race
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    image = load_disk_image(final, built=True)
    _log(
        progress,
        f"built {image.image}: {st.st_size / 2**30:.1f} GiB raw, "
        f"{st.st_blocks * 512 / 1e6:.0f} MB allocated, in {manifest['build_seconds']} s",
    )
    return image


def prune_disk_cache(
    root: Path, keep: set[str], *, now: float, progress: Progress | None = None
) -> list[Path]:
    """Delete disk and base entries whose directory name is not in ``keep``, and build leftovers
    older than an hour. The debootstrap package cache (``debs/``) stays. Returns what went."""
    return prune_entries(
        root,
        {*keep, "debs"},
        now=now,
        remove=lambda path: _remove_tree(path, progress),
        progress=progress,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m vm_images.disk",
        description="Build (or reuse) the Debian disk image with IMA measuring its root.",
    )
    parser.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    parser.add_argument("--size", default="2G", help="image size (default 2G; sparse)")
    parser.add_argument("--cache-dir", type=Path, help="cache root (default $VTPM_DISK_CACHE)")
    parser.add_argument("--kernel-release", help="kernel release (default: newest installed)")
    parser.add_argument("--force", action="store_true", help="rebuild both stages")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    parser.add_argument(
        "--prune", action="store_true", help="then delete every other disk and base entry"
    )
    args = parser.parse_args(argv)
    try:
        size = parse_size(args.size)
    except ValueError as err:
        parser.error(str(err))
    try:
        image = build_disk_image(
            cache_root=args.cache_dir,
            size=size,
            kernel_release=args.kernel_release,
            force=args.force,
            progress=None if args.quiet else _stderr_progress,
        )
        if args.prune:
            base = f"base-{image.manifest['base_key']}"
            prune_disk_cache(
                image.directory.parent,
                {image.key, base},
                now=time.time(),
                progress=None if args.quiet else _stderr_progress,
            )
    except ImageBuildError as err:
        print(f"vm_images.disk: error: {err}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(image.as_json(), indent=2))
    else:
        for name in ("image", "kernel", "initrd", "cmdline", "ssh_private_key"):
            print(f"{name}: {getattr(image, name)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
