"""Build the vtpm-trust test guest: the Debian kernel plus a small initramfs, cached by input hash.

The guest serves every vm-tier test (vm_images/README.md): static busybox, the virtio and 9p
modules, dropbear with a build-time host key and test key, a trimmed Python 3.11 from Debian, the
``memwriter`` ground-truth program and an ``/init`` that prints ``VTPM-GUEST-READY`` on ttyS0.

Run ``python -m vm_images.build [--json]`` (or ``python vm_images/build.py``). Progress goes to
stderr, one line per step. The cache directory is ``$VTPM_IMAGE_CACHE/<key>/`` or
``~/.cache/vtpm-trust/images/<key>/``; the key hashes every input (this script, ``init``, the C
source, the kernel release and the Debian package versions the image is made from), so a second
build with the same inputs is a no-op that says so.

This module uses the standard library only and imports nothing of ours but
``vm_images/_common.py`` (likewise), so it also runs as a plain script with Debian's Python.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import hashlib
import json
import lzma
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script: python vm_images/build.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vm_images._common import (  # shared with disk.py
    ImageBuildError,
    Progress,
    cache_key,
    env_cache_dir,
    prune_entries,
    publish_entry,
    work_dir,
)
from vm_images._common import log as _log
from vm_images._common import run_step as _run

__all__ = [
    "FORMAT",
    "READY_MARKER",
    "SOURCE_DIR",
    "SOURCE_FILES",
    "GuestImage",
    "ImageBuildError",
    "build_image",
    "cache_key",
    "collect_inputs",
    "default_cache_root",
    "load_image",
    "main",
    "module_load_order",
    "prune_cache",
    "query_package_versions",
]

FORMAT = "vtpm-trust/guest-image/1"
READY_MARKER = "VTPM-GUEST-READY"
SOURCE_DIR = Path(__file__).resolve().parent
# Files whose content is part of the cache key (relative to the source directory).
SOURCE_FILES = ("build.py", "init", "src/memwriter.c")
# Debian packages the image is assembled from; their versions are part of the cache key.
PACKAGES = (
    "busybox-static",
    "dropbear-bin",
    "python3.11-minimal",
    "libpython3.11-minimal",
    "libpython3.11-stdlib",
    "libc6",
    "libc6-dev",
    "gcc-12",
    "zlib1g",
    "libexpat1",
    "libtomcrypt1",
    "libtommath1",
    "libgmp10",
    "libcrypt1",
    "libuuid1",
    "libssl3",  # only shipped with --with-ssl
)
# Modules the guest needs, by name; their dependencies are added from modules.dep.
MODULES = (
    "virtio_ring",
    "virtio",
    "virtio_pci_legacy_dev",
    "virtio_pci_modern_dev",
    "virtio_pci",
    "virtio_console",
    "failover",
    "net_failover",
    "virtio_net",
    "9pnet",
    "9pnet_virtio",
    "netfs",
    "fscache",
    "9p",
)
BASE_CMDLINE = "console=ttyS0 panic=-1 quiet loglevel=3"

PYTHON = Path("/usr/bin/python3.11")
PYTHON_LIB = Path("/usr/lib/python3.11")
# Dropped from the guest's stdlib: tests, GUI, packaging tools and modules whose C parts we omit.
PY_DROP_DIRS = frozenset(
    {
        "test",
        "tests",
        "idlelib",
        "tkinter",
        "turtledemo",
        "ensurepip",
        "lib2to3",
        "pydoc_data",
        "distutils",
        "venv",
        "sqlite3",
        "curses",
        "dbm",
        "ctypes",
        "xmlrpc",
        "xml",
        "wsgiref",
        "unittest",
        "__pycache__",
        "site-packages",
        "dist-packages",
    }
)
PY_DROP_FILES = frozenset(
    {"pydoc.py", "turtle.py", "_pydecimal.py", "decimal.py", "antigravity.py", "doctest.py"}
)
# CJK codecs need C modules (_codecs_cn, ...) that are not shipped.
PY_DROP_ENCODINGS = re.compile(
    r"(big5|big5hkscs|cp932|cp949|cp950|euc_.*|gb2312|gbk|gb18030|hz|iso2022_.*|johab|shift_jis.*)\.py"
)
PY_DROP_PREFIXES = ("config-3.11",)
# C extension modules kept from lib-dynload (everything the guest agent needs is built in:
# json's fallback, hashlib's sha*, hmac, base64/binascii, struct, socket, select, fcntl).
PY_KEEP_EXTENSIONS = (
    "_asyncio",
    "_contextvars",
    "_json",
    "_multiprocessing",
    "_posixshmem",
    "_queue",
    "_typing",
    "_uuid",
    "mmap",
    "resource",
    "termios",
)
PY_SSL_EXTENSIONS = ("_hashlib", "_ssl")

LIBDIR = "lib/x86_64-linux-gnu"


@dataclass(frozen=True)
class GuestImage:
    """A built (or cached) guest image. Paths are absolute."""

    key: str
    directory: Path
    kernel: Path
    kernel_version: str
    initramfs: Path
    ssh_private_key: Path
    ssh_host_public_key: str
    manifest_path: Path
    manifest: Mapping[str, object]
    built: bool

    @property
    def cmdline(self) -> str:
        """The base kernel command line the image is meant to boot with."""
        return BASE_CMDLINE

    def as_json(self) -> dict[str, object]:
        return {
            "key": self.key,
            "built": self.built,
            "directory": str(self.directory),
            "kernel": str(self.kernel),
            "kernel_version": self.kernel_version,
            "initramfs": str(self.initramfs),
            "ssh_private_key": str(self.ssh_private_key),
            "ssh_host_public_key": self.ssh_host_public_key,
            "manifest": str(self.manifest_path),
            "cmdline": BASE_CMDLINE,
            "initramfs_bytes": self.manifest.get("initramfs_bytes"),
            "build_seconds": self.manifest.get("build_seconds"),
        }


# ----------------------------------------------------------------------------- inputs and key


def default_cache_root(environ: Mapping[str, str] | None = None) -> Path:
    """``$VTPM_IMAGE_CACHE`` if set, else ``~/.cache/vtpm-trust/images``."""
    return env_cache_dir(environ, "VTPM_IMAGE_CACHE", "images")


def _version_key(release: str) -> list[object]:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", release)]


def default_kernel_release(boot: Path = Path("/boot"), modules: Path = Path("/lib/modules")) -> str:
    """The newest installed kernel that has both ``/boot/vmlinuz-R`` and ``modules.dep``."""
    found = [
        p.name.removeprefix("vmlinuz-")
        for p in boot.glob("vmlinuz-*")
        if (modules / p.name.removeprefix("vmlinuz-") / "modules.dep").is_file()
    ]
    if not found:
        raise ImageBuildError(
            f"no kernel found: expected {boot}/vmlinuz-<release> with "
            f"{modules}/<release>/modules.dep (install linux-image-amd64)"
        )
    return max(found, key=_version_key)


def query_package_versions(names: Iterable[str]) -> dict[str, str]:
    """Installed Debian package versions; a package that is not installed maps to ``""``."""
    names = list(names)
    proc = subprocess.run(
        ["dpkg-query", "-W", "-f=${Package}\t${Version}\t${db:Status-Abbrev}\n", *names],
        capture_output=True,
        text=True,
    )
    versions = dict.fromkeys(names, "")
    for line in proc.stdout.splitlines():
        parts = line.split("\t")
        if len(parts) == 3 and parts[0] in versions and parts[2].startswith("ii"):
            versions[parts[0]] = parts[1]
    return versions


def collect_inputs(
    *,
    kernel_release: str,
    package_versions: Mapping[str, str],
    source_dir: Path = SOURCE_DIR,
    with_ssl: bool = False,
) -> dict[str, object]:
    """Everything the image is made from, as a JSON-able dict (hashing it gives the cache key)."""
    files = {
        name: hashlib.sha256((source_dir / name).read_bytes()).hexdigest() for name in SOURCE_FILES
    }
    return {
        "format": FORMAT,
        "sources": files,
        "kernel_release": kernel_release,
        "packages": dict(sorted(package_versions.items())),
        "with_ssl": with_ssl,
    }


# ----------------------------------------------------------------------------- modules


def module_load_order(modules_dep: str, wanted: Iterable[str]) -> list[str]:
    """Relative .ko paths of ``wanted`` and their dependencies, dependencies first.

    ``modules_dep`` is the text of ``modules.dep`` ("path: dep dep ..."); names match the file
    name without ``.ko``/``.ko.xz``/``.ko.zst`` (``-`` and ``_`` are the same).
    """
    deps: dict[str, list[str]] = {}
    by_name: dict[str, str] = {}
    for line in modules_dep.splitlines():
        if ":" not in line:
            continue
        path, _, rest = line.partition(":")
        deps[path] = rest.split()
        by_name[_module_name(path)] = path
    order: list[str] = []
    visiting: set[str] = set()

    def visit(path: str) -> None:
        if path in order:
            return
        if path in visiting:
            raise ImageBuildError(f"dependency cycle in modules.dep at {path}")
        visiting.add(path)
        for dep in deps.get(path, []):
            visit(dep)
        visiting.discard(path)
        order.append(path)

    for name in wanted:
        key = name.replace("-", "_")
        if key not in by_name:
            raise ImageBuildError(f"module {name} not in modules.dep (is it built in or missing?)")
        visit(by_name[key])
    return order


def _module_name(path: str) -> str:
    base = path.rsplit("/", 1)[-1]
    base = re.sub(r"\.ko(\.(xz|zst|gz))?$", "", base)
    return base.replace("-", "_")


# ----------------------------------------------------------------------------- cpio (newc)


class _Cpio:
    """A minimal newc ("070701") archive writer: root-owned entries, fixed mtime, no hard links."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.ino = 1
        self.size = 0

    def _entry(
        self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)
    ) -> None:
        nameb = name.encode() + b"\0"
        fields = [
            self.ino,
            mode,
            0,  # uid
            0,  # gid
            2 if stat.S_ISDIR(mode) else 1,
            0,  # mtime: fixed, so the same tree gives the same bytes
            len(data),
            0,
            0,
            rdev[0],
            rdev[1],
            len(nameb),
            0,
        ]
        self.ino += 1
        header = b"070701" + b"".join(b"%08X" % f for f in fields)
        self._add(header + nameb)
        self._pad()
        if data:
            self._add(data)
            self._pad()

    def _add(self, b: bytes) -> None:
        self.chunks.append(b)
        self.size += len(b)

    def _pad(self) -> None:
        if self.size % 4:
            self._add(b"\0" * (4 - self.size % 4))

    def add_tree(self, root: Path) -> None:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            rel_dir = os.path.relpath(dirpath, root)
            for name in sorted(dirnames + filenames):
                full = Path(dirpath) / name
                rel = name if rel_dir == "." else f"{rel_dir}/{name}"
                st = full.lstat()
                if stat.S_ISLNK(st.st_mode):
                    self._entry(rel, stat.S_IFLNK | 0o777, os.readlink(full).encode())
                elif stat.S_ISDIR(st.st_mode):
                    self._entry(rel, stat.S_IFDIR | stat.S_IMODE(st.st_mode))
                elif stat.S_ISREG(st.st_mode):
                    self._entry(rel, stat.S_IFREG | stat.S_IMODE(st.st_mode), full.read_bytes())

    def add_char_device(self, name: str, perm: int, major: int, minor: int) -> None:
        self._entry(name, stat.S_IFCHR | perm, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return b"".join(self.chunks)


# ----------------------------------------------------------------------------- build steps


def _shared_libraries(step: str, binaries: Iterable[Path]) -> set[Path]:
    """Absolute paths of every shared library (and the loader) the binaries need, via ldd."""
    libs: set[Path] = set()
    for binary in binaries:
        out = _run(step, ["ldd", str(binary)]).stdout
        for line in out.splitlines():
            m = re.search(r"=>\s*(/\S+)", line) or re.match(r"\s*(/\S+)\s+\(", line)
            if m:
                libs.add(Path(m.group(1)))
    return libs


def _install_libraries(stage: Path, libs: Iterable[Path]) -> int:
    total = 0
    for lib in sorted(libs):
        dest = stage / LIBDIR / lib.name
        if dest.exists():
            continue
        shutil.copyfile(lib.resolve(), dest)
        dest.chmod(0o755)
        total += dest.stat().st_size
        if lib.name.startswith("ld-linux"):
            # The loader's path is compiled into every binary: /lib64/ld-linux-x86-64.so.2.
            (stage / "lib64" / lib.name).symlink_to(f"../{LIBDIR}/{lib.name}")
    return total


def _tree_bytes(path: Path) -> int:
    return sum(p.lstat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def _stage_busybox(stage: Path) -> int:
    busybox = shutil.which("busybox") or "/bin/busybox"
    dest = stage / "bin" / "busybox"
    shutil.copyfile(busybox, dest)
    dest.chmod(0o755)
    applets = _run("busybox", [str(dest), "--list-full"]).stdout.split()
    for applet in applets:
        link = stage / applet
        if applet in ("bin/busybox", "linuxrc") or link.exists():
            continue
        link.parent.mkdir(parents=True, exist_ok=True)
        depth = applet.count("/")
        link.symlink_to("../" * depth + "bin/busybox")
    return dest.stat().st_size


def _stage_modules(stage: Path, release: str) -> list[str]:
    mod_root = Path("/lib/modules") / release
    order = module_load_order((mod_root / "modules.dep").read_text(), MODULES)
    names = []
    for rel in order:
        src = mod_root / rel
        name = _module_name(rel) + ".ko"
        data = src.read_bytes()
        if rel.endswith(".xz"):
            data = lzma.decompress(data)
        elif rel.endswith(".gz"):
            data = gzip.decompress(data)
        elif rel.endswith(".zst"):
            raise ImageBuildError(f"modules: {rel} is zstd-compressed; decompress it first")
        (stage / "lib" / "modules" / name).write_bytes(data)
        names.append(name)
    (stage / "etc" / "vtpm" / "modules.order").write_text("\n".join(names) + "\n")
    return names


def _stage_memwriter(stage: Path, source_dir: Path) -> int:
    dest = stage / "usr" / "bin" / "memwriter"
    _run(
        "memwriter",
        [
            "gcc",
            "-static",
            "-O2",
            "-Wall",
            "-o",
            str(dest),
            str(source_dir / "src" / "memwriter.c"),
        ],
    )
    _run("memwriter", ["strip", str(dest)])
    return dest.stat().st_size


def _dropbear_public(step: str, key: Path) -> str:
    out = _run(step, ["dropbearkey", "-y", "-f", str(key)]).stdout
    for line in out.splitlines():
        if line.startswith("ssh-"):
            return " ".join(line.split()[:2])
    raise ImageBuildError(f"{step}: no public key in dropbearkey output:\n{out}")


def _stage_dropbear(stage: Path, out_dir: Path) -> tuple[str, set[Path]]:
    """Install dropbear, make the host key and the test client key; return the host public key."""
    dropbear = Path("/usr/sbin/dropbear")
    dest = stage / "usr" / "sbin" / "dropbear"
    shutil.copyfile(dropbear, dest)
    dest.chmod(0o755)
    host_key = stage / "etc" / "dropbear" / "dropbear_ed25519_host_key"
    host_key.parent.mkdir(parents=True)
    _run("dropbear host key", ["dropbearkey", "-t", "ed25519", "-f", str(host_key)])
    host_pub = _dropbear_public("dropbear host key", host_key)
    client = out_dir / "id_ed25519.dropbear"
    _run("ssh test key", ["dropbearkey", "-t", "ed25519", "-f", str(client)])
    _run(
        "ssh test key",
        ["dropbearconvert", "dropbear", "openssh", str(client), str(out_dir / "id_ed25519")],
    )
    (out_dir / "id_ed25519").chmod(0o600)
    client_pub = _dropbear_public("ssh test key", client)
    client.unlink()
    (out_dir / "id_ed25519.pub").write_text(client_pub + " vtpm-trust-test\n")
    ssh_dir = stage / "root" / ".ssh"
    ssh_dir.mkdir(parents=True, mode=0o700)
    ssh_dir.chmod(0o700)
    (ssh_dir / "authorized_keys").write_text(client_pub + " vtpm-trust-test\n")
    (ssh_dir / "authorized_keys").chmod(0o600)
    (stage / "root").chmod(0o700)
    return host_pub, {dropbear}


def _stage_python(stage: Path, with_ssl: bool) -> tuple[set[Path], dict[str, object]]:
    """Copy Debian's python3.11 with a trimmed stdlib and unchecked-hash .pyc files."""
    dest_bin = stage / "usr" / "bin" / "python3.11"
    shutil.copyfile(PYTHON, dest_bin)
    dest_bin.chmod(0o755)
    (stage / "usr" / "bin" / "python3").symlink_to("python3.11")
    dest_lib = stage / "usr" / "lib" / "python3.11"

    def ignore(directory: str, names: list[str]) -> set[str]:
        dropped = set()
        for name in names:
            full = Path(directory) / name
            if (
                (name in PY_DROP_DIRS and full.is_dir())
                or (name in PY_DROP_FILES and Path(directory) == PYTHON_LIB)
                or name.startswith(PY_DROP_PREFIXES)
                or (Path(directory).name == "encodings" and PY_DROP_ENCODINGS.fullmatch(name))
            ):
                dropped.add(name)
        return dropped

    shutil.copytree(PYTHON_LIB, dest_lib, symlinks=True, ignore=ignore)
    keep = PY_KEEP_EXTENSIONS + (PY_SSL_EXTENSIONS if with_ssl else ())
    extensions = []
    for so in sorted((dest_lib / "lib-dynload").iterdir()):
        if so.name.split(".", 1)[0] not in keep:
            so.unlink()
        else:
            extensions.append(so)
    source_bytes = _tree_bytes(dest_lib)
    _run(
        "python bytecode",
        [
            str(PYTHON),
            "-m",
            "compileall",
            "-q",
            "-j0",
            "--invalidation-mode",
            "unchecked-hash",
            "-s",
            str(stage),
            "-p",
            "/",
            str(dest_lib),
        ],
    )
    version = _run(
        "python", [str(PYTHON), "-c", "import platform; print(platform.python_version())"]
    )
    binaries = [PYTHON, *(PYTHON_LIB / "lib-dynload" / so.name for so in extensions)]
    info: dict[str, object] = {
        "version": version.stdout.strip(),
        "binary_bytes": dest_bin.stat().st_size,
        "stdlib_source_bytes": source_bytes,
        "stdlib_bytes_with_pyc": _tree_bytes(dest_lib),
        "extensions": [so.name.split(".", 1)[0] for so in extensions],
        "ssl": with_ssl,
    }
    return set(binaries), info


def _stage_etc(stage: Path, source_dir: Path, key: str, release: str) -> None:
    init = stage / "init"
    shutil.copyfile(source_dir / "init", init)
    init.chmod(0o755)
    etc = stage / "etc"
    (etc / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (etc / "group").write_text("root:x:0:\ntty:x:5:\n")
    (etc / "shells").write_text("/bin/sh\n/bin/ash\n")
    (etc / "hosts").write_text("127.0.0.1 localhost vtpm-guest\n")
    (etc / "inittab").write_text(
        "# busybox init after /init: no gettys; poweroff/reboot requests are honoured.\n"
        "::ctrlaltdel:/sbin/poweroff -f\n"
        "::shutdown:/bin/sync\n"
    )
    (etc / "vtpm" / "image-key").write_text(key + "\n")
    (etc / "vtpm" / "kernel-release").write_text(release + "\n")


def _stderr_progress(msg: str) -> None:
    print(f"vm_images: {msg}", file=sys.stderr, flush=True)


def load_image(directory: Path, *, built: bool = False) -> GuestImage:
    """Read a cache entry's manifest and return the image it describes."""
    manifest_path = directory / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("format") != FORMAT:
        raise ImageBuildError(
            f"{manifest_path}: format {manifest.get('format')!r}, expected {FORMAT!r}"
        )
    return GuestImage(
        key=str(manifest["key"]),
        directory=directory,
        kernel=Path(manifest["kernel"]),
        kernel_version=str(manifest["kernel_release"]),
        initramfs=directory / str(manifest["initramfs"]),
        ssh_private_key=directory / str(manifest["ssh_private_key"]),
        ssh_host_public_key=str(manifest["ssh_host_public_key"]),
        manifest_path=manifest_path,
        manifest=manifest,
        built=built,
    )


def build_image(
    *,
    cache_root: Path | None = None,
    kernel_release: str | None = None,
    package_versions: Mapping[str, str] | None = None,
    source_dir: Path = SOURCE_DIR,
    with_ssl: bool = False,
    force: bool = False,
    progress: Progress | None = _stderr_progress,
) -> GuestImage:
    """Build the guest image, or return the cached one when every input is unchanged.

    Args:
        cache_root: where cache entries live (default :func:`default_cache_root`).
        kernel_release: kernel to boot (default: the newest installed one).
        package_versions: Debian package versions for the key (default: asked from dpkg).
        source_dir: where ``init`` and ``src/memwriter.c`` are (tests point it at a copy).
        with_ssl: also ship ``_ssl``/``_hashlib`` and OpenSSL's libraries.
        force: rebuild even when the cache entry exists.
        progress: called with one line per build step (``None``: silent).

    Returns:
        The image; ``built`` says whether this call built it.

    Raises:
        ImageBuildError: a tool or an input is missing, or a build step failed.
    """
    t0 = time.monotonic()
    root = default_cache_root() if cache_root is None else cache_root
    release = kernel_release or default_kernel_release()
    versions = query_package_versions(PACKAGES) if package_versions is None else package_versions
    missing = sorted(p for p, v in versions.items() if not v)
    if missing:
        raise ImageBuildError(f"Debian packages not installed: {', '.join(missing)}")
    inputs = collect_inputs(
        kernel_release=release,
        package_versions=versions,
        source_dir=source_dir,
        with_ssl=with_ssl,
    )
    key = cache_key(inputs)
    final = root / key
    if (final / "manifest.json").is_file() and not force:
        _log(progress, f"cached: {final} (key {key}), nothing to do")
        return load_image(final)
    kernel = Path("/boot") / f"vmlinuz-{release}"
    if not kernel.is_file():
        raise ImageBuildError(f"kernel {kernel} not found")

    _log(progress, f"building key {key} for kernel {release} into {final}")
    out = work_dir(root, key)
    try:
        with tempfile.TemporaryDirectory(prefix="vtpm-guest-stage-") as tmp:
            details = _assemble(Path(tmp), out, key, release, source_dir, with_ssl, progress)
        manifest = {
            "format": FORMAT,
            "key": key,
            "inputs": inputs,
            "kernel": str(kernel),
            "kernel_release": release,
            "cmdline": BASE_CMDLINE,
            "ready_marker": READY_MARKER,
            "initramfs": "initramfs.cpio",
            "initramfs_bytes": (out / "initramfs.cpio").stat().st_size,
            "compression": "none",
            "ssh_user": "root",
            "ssh_private_key": "id_ed25519",
            "ssh_public_key": (out / "id_ed25519.pub").read_text().strip(),
            **details,
            "build_seconds": round(time.monotonic() - t0, 2),
        }
        if not publish_entry(out, final, manifest, force=force, progress=progress):
            return load_image(final)  # another build of the same key won the race
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    image = load_image(final, built=True)
    size = image.initramfs.stat().st_size
    _log(progress, f"built {image.initramfs}: {size / 1e6:.1f} MB in {manifest['build_seconds']} s")
    return image


STAGE_DIRS = (
    "bin",
    "sbin",
    "usr/bin",
    "usr/sbin",
    "usr/lib",
    "lib/modules",
    LIBDIR,
    "lib64",
    "etc/vtpm",
    "dev",
    "proc",
    "sys",
    "tmp",
    "run",
    "mnt/repo",
    "var/log",
)


def _assemble(
    stage: Path,
    out: Path,
    key: str,
    release: str,
    source_dir: Path,
    with_ssl: bool,
    progress: Progress | None,
) -> dict[str, object]:
    """Fill ``stage``, write ``out/initramfs.cpio``; return the manifest's build details."""
    for d in STAGE_DIRS:
        (stage / d).mkdir(parents=True, exist_ok=True)
    (stage / "tmp").chmod(0o1777)
    sizes: dict[str, int] = {}
    steps: dict[str, float] = {}

    @contextlib.contextmanager
    def step(name: str) -> Iterator[None]:
        t = time.monotonic()
        yield
        steps[name] = round(time.monotonic() - t, 3)
        _log(progress, f"{name}: {steps[name]:.2f} s")

    with step("busybox"):
        sizes["busybox"] = _stage_busybox(stage)
    with step("modules"):
        modules = _stage_modules(stage, release)
        sizes["modules"] = _tree_bytes(stage / "lib" / "modules")
    with step("memwriter"):
        sizes["memwriter"] = _stage_memwriter(stage, source_dir)
    with step("dropbear"):
        host_pub, dropbear_bins = _stage_dropbear(stage, out)
    with step("python"):
        py_bins, py_info = _stage_python(stage, with_ssl)
        sizes["python"] = _tree_bytes(stage / "usr" / "lib" / "python3.11")
        sizes["python"] += (stage / "usr" / "bin" / "python3.11").stat().st_size
    with step("libraries"):
        libs = _shared_libraries("libraries", [*dropbear_bins, *py_bins])
        sizes["libraries"] = _install_libraries(stage, libs)
    with step("init"):
        _stage_etc(stage, source_dir, key, release)
    with step("initramfs"):
        cpio = _Cpio()
        cpio.add_char_device("dev/console", 0o600, 5, 1)
        cpio.add_char_device("dev/null", 0o666, 1, 3)
        cpio.add_tree(stage)
        # Uncompressed on purpose: under TCG the kernel spends ~1.2 s inflating a gzip image
        # of this size and ~0.3 s copying the raw one; the cache holds 33 MB instead of 14 MB.
        (out / "initramfs.cpio").write_bytes(cpio.finish())
    return {
        "ssh_host_public_key": host_pub,
        "modules": modules,
        "libraries": sorted(str(p) for p in libs),
        "python": py_info,
        "component_bytes": sizes,
        "step_seconds": steps,
    }


def prune_cache(
    root: Path, keep: Iterable[str], *, now: float, progress: Progress | None = None
) -> list[Path]:
    """Delete cache entries other than ``keep``, and build leftovers older than an hour.

    Only directories that look like ours are touched: an entry has a ``manifest.json``; a
    leftover of an interrupted build is named ``.<key>.<random>``. Returns what was removed.
    """
    return prune_entries(root, keep, now=now, remove=_discard, progress=progress)


def _discard(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m vm_images.build", description="Build (or reuse) the test guest image."
    )
    parser.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    parser.add_argument("--cache-dir", type=Path, help="cache root (default $VTPM_IMAGE_CACHE)")
    parser.add_argument("--kernel-release", help="kernel release (default: newest installed)")
    parser.add_argument("--with-ssl", action="store_true", help="ship Python's ssl/_hashlib")
    parser.add_argument("--force", action="store_true", help="rebuild even if cached")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    parser.add_argument(
        "--prune", action="store_true", help="then delete every other entry in the cache root"
    )
    args = parser.parse_args(argv)
    progress = None if args.quiet else _stderr_progress
    try:
        image = build_image(
            cache_root=args.cache_dir,
            kernel_release=args.kernel_release,
            with_ssl=args.with_ssl,
            force=args.force,
            progress=progress,
        )
        if args.prune:
            prune_cache(image.directory.parent, {image.key}, now=time.time(), progress=progress)
    except ImageBuildError as err:
        print(f"vm_images: error: {err}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(image.as_json(), indent=2))
    else:
        for name in ("kernel", "initramfs", "ssh_private_key", "manifest_path"):
            print(f"{name}: {getattr(image, name)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
