"""The root directory of libvirt's embedded QEMU driver (``qemu:///embed?root=ROOT``).

libvirt 9.0's embedded driver needs, before its first connection (platform-notes.md §7):

1. the ``libvirt-qemu`` user: it is parsed while libvirt builds its *default* configuration,
   before ``qemu.conf`` is read, so no setting replaces it ("Failed to parse user
   'libvirt-qemu'"). Debian creates it with ``libvirt-daemon-system``, which a host running only
   the embedded driver need not install; :func:`ensure_libvirt_qemu_user` creates it like that
   package does (``groupadd -r``, ``useradd -r -g libvirt-qemu -G kvm -d /var/lib/libvirt -s
   /usr/sbin/nologin -M``);
2. ``ROOT/etc/qemu.conf`` (:data:`QEMU_CONF`): QEMU and swtpm run as root, no cgroups, no
   namespaces, no security driver, and ``stdio_handler = "file"`` (no virtlogd), as in
   platform-notes §7; plus ``remember_owner = 0``, so libvirt's DAC code does not stamp
   ``trusted.libvirt.security.*`` xattrs on files it only reads (the kernel in /boot, the image).

:func:`prepare_embedded_root` does both, idempotently. The root's path must stay short: libvirt
puts QEMU's monitor socket and swtpm's socket under it, and unix socket paths end at 107 bytes.
"""

from __future__ import annotations

import grp
import os
import pwd
import subprocess
from pathlib import Path
from typing import ClassVar
from urllib.parse import parse_qs, urlsplit

from evidence.errors import VtpmError

__all__ = [
    "LIBVIRT_QEMU_USER",
    "MAX_ROOT_LENGTH",
    "QEMU_CONF",
    "EmbeddedRootError",
    "embedded_root_of",
    "embedded_uri",
    "ensure_libvirt_qemu_user",
    "prepare_embedded_root",
]

LIBVIRT_QEMU_USER = "libvirt-qemu"

#: ``ROOT/etc/qemu.conf`` for the embedded driver (platform-notes.md §7).
QEMU_CONF = """\
# Written by vtpm-host (host_agent/lifecycle/embedded.py); rewritten when it differs.
user = "root"
group = "root"
swtpm_user = "root"
swtpm_group = "root"
cgroup_controllers = [ ]
namespaces = [ ]
security_driver = "none"
stdio_handler = "file"
remember_owner = 0
"""

#: Longest root path accepted: ``ROOT/lib/qemu/domain-NNN-<name>/monitor.sock`` must fit in 107.
MAX_ROOT_LENGTH = 60


class EmbeddedRootError(VtpmError):
    """The embedded driver's root cannot be prepared (user creation or qemu.conf failed)."""

    id: ClassVar[str] = "hypervisor.embedded_root"


def embedded_uri(root: Path) -> str:
    """``qemu:///embed?root=ROOT`` for an absolute root."""
    return f"qemu:///embed?root={Path(root)}"


def embedded_root_of(uri: str) -> Path | None:
    """The root of a ``qemu:///embed?root=…`` URI, None for any other URI."""
    parts = urlsplit(uri)
    if parts.scheme != "qemu" or parts.path != "/embed":
        return None
    roots = parse_qs(parts.query).get("root")
    return Path(roots[0]) if roots else None


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def _group_exists(name: str) -> bool:
    try:
        grp.getgrnam(name)
    except KeyError:
        return False
    return True


def _run(cmd: list[str]) -> None:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise EmbeddedRootError(f"cannot run {cmd[0]}: {err}") from err
    if proc.returncode != 0:
        raise EmbeddedRootError(
            f"{' '.join(cmd)} failed with status {proc.returncode}: "
            f"{(proc.stderr or proc.stdout).strip()}"
        )


def ensure_libvirt_qemu_user() -> bool:
    """Create the ``libvirt-qemu`` system user and group if missing (as libvirt-daemon-system).

    Returns:
        True if anything was created.

    Raises:
        EmbeddedRootError: missing, and ``groupadd``/``useradd`` failed (not root?).
    """
    if _user_exists(LIBVIRT_QEMU_USER):
        return False
    if not _group_exists(LIBVIRT_QEMU_USER):
        _run(["groupadd", "-r", "-f", LIBVIRT_QEMU_USER])
    cmd = ["useradd", "-r", "-g", LIBVIRT_QEMU_USER]
    if _group_exists("kvm"):
        cmd += ["-G", "kvm"]
    cmd += ["-d", "/var/lib/libvirt", "-s", "/usr/sbin/nologin", "-M", LIBVIRT_QEMU_USER]
    _run(cmd)
    return True


def prepare_embedded_root(root: Path, *, ensure_user: bool = True) -> Path:
    """Make ``root`` ready for ``qemu:///embed?root=ROOT``; safe to call every time.

    Creates the root (mode 0700) and ``ROOT/etc``, writes :data:`QEMU_CONF` to
    ``ROOT/etc/qemu.conf`` when the file is missing or differs (atomically), and ensures the
    ``libvirt-qemu`` user exists (unless ``ensure_user`` is false).

    Returns:
        The absolute root.

    Raises:
        ValueError: a relative root, or one longer than :data:`MAX_ROOT_LENGTH` bytes.
        EmbeddedRootError: a directory or qemu.conf cannot be written, or the user not created.
    """
    root = Path(root)
    if not root.is_absolute():
        raise ValueError(f"the embedded libvirt root must be absolute, got {root}")
    if len(os.fsencode(root)) > MAX_ROOT_LENGTH:
        raise ValueError(
            f"the embedded libvirt root {root} is longer than {MAX_ROOT_LENGTH} bytes: QEMU's "
            "monitor socket under it would exceed the unix socket path limit; choose a shorter "
            "agent state directory or set libvirt.uri"
        )
    conf = root / "etc" / "qemu.conf"
    try:
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        conf.parent.mkdir(mode=0o755, exist_ok=True)
        # libvirt opens <root>/log/libvirt.log (LIBVIRT_LOG_OUTPUTS, set by the vm CLI) when its
        # module loads, before the driver would create the directory: a missing one makes
        # `import libvirt` itself fail on a fresh root.
        (root / "log").mkdir(mode=0o700, exist_ok=True)
        try:
            current = conf.read_text()
        except FileNotFoundError:
            current = None
        if current != QEMU_CONF:
            tmp = conf.with_name(f".qemu.conf.{os.getpid()}")
            tmp.write_text(QEMU_CONF)
            os.replace(tmp, conf)
    except OSError as err:
        raise EmbeddedRootError(f"cannot prepare the embedded libvirt root {root}: {err}") from err
    if ensure_user:
        ensure_libvirt_qemu_user()
    return root
