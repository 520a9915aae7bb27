"""A real ``libvirtd`` inside each namespace host (platform-notes §7 "system daemon", §8).

Two embedded-driver roots cannot live in one process, and a migration needs a libvirt daemon on
each side anyway (the source's libvirtd talks to the target's, peer to peer). So every namespace
host gets its own ``/usr/sbin/libvirtd``:

- in the host's network namespace (``ip netns exec``), listening on TCP at the host's address
  only (``auth_tcp = "none"``: the hosts are namespaces of one machine, nothing else reaches
  the veth pair), so both the local agent and the peer's libvirtd reach it as
  ``qemu+tcp://ADDRESS/system``;
- in a private mount namespace (``unshare -m --propagation private``) where ``/run/libvirt``,
  ``/var/lib/libvirt``, ``/etc/libvirt``, ``/var/log/libvirt`` and ``/var/cache/libvirt`` are bind
  mounts of directories under the host's own root, so two
  daemons (and the machine's own libvirt, and other suites' embedded roots) never share a socket,
  a pid file, a domain definition or a log; the only trace outside is the empty mount points;
- with a ``host_uuid`` of its own (libvirt refuses "to migrate guest to the same host" when the
  two daemons report the same host UUID, which they would on one machine), and the qemu.conf of
  the embedded driver (QEMU and swtpm as root, no cgroups, no namespaces, no security driver,
  ``stdio_handler = "file"`` so no virtlogd is needed).

::

    with two_hosts() as net, libvirtd_pair(net, tmp) as (a, b):
        conn_a = a.uri        # qemu+tcp://10.77.0.1/system
        net.run(net.a, ["virsh", "-c", a.uri, "migrate", "--live", "--p2p", "vm",
                        b.uri, "tcp://10.77.0.2"])

Stop kills every QEMU/swtpm the daemon started (the processes in its mount namespace), then the
daemon, by pid, so nothing outlives a test. Shared by the e2e tests
(``tests/helpers/libvirtd_ns.py`` re-exports it) and ``make demo-migration``.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from host_agent.lifecycle.embedded import QEMU_CONF as EMBEDDED_QEMU_CONF
from scripts.lab.netns import NetnsPair
from scripts.lab.procs import stop_process

__all__ = ["BIND_DIRS", "QEMU_CONF", "NsLibvirtd", "libvirtd_pair"]

#: System paths libvirtd (privileged) uses, each bound to ``ROOT/<path>`` in its mount namespace.
BIND_DIRS = (
    "/run/libvirt",
    "/var/lib/libvirt",
    "/etc/libvirt",
    "/var/log/libvirt",
    "/var/cache/libvirt",
)

#: The embedded driver's qemu.conf (platform-notes.md §7), plus the address QEMU listens on for
#: incoming migrations (this host's end of the veth pair).
QEMU_CONF = EMBEDDED_QEMU_CONF + 'migration_address = "{address}"\n'

LIBVIRTD_CONF = """\
listen_tls = 0
listen_tcp = 1
listen_addr = "{address}"
auth_tcp = "none"
auth_unix_rw = "none"
unix_sock_group = "root"
unix_sock_rw_perms = "0700"
host_uuid = "{host_uuid}"
log_outputs = "3:file:{root}/var/log/libvirt/libvirtd.log"
"""


@dataclass
class NsLibvirtd:
    """One libvirtd in namespace ``ns`` of ``net``, rooted at ``root``."""

    net: NetnsPair
    ns: str
    root: Path
    host_uuid: str = field(default_factory=lambda: str(uuid.uuid4()))
    binds: dict[str, Path] = field(default_factory=dict)
    hooks: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return self.net.address(self.ns)

    @property
    def uri(self) -> str:
        """How the agent and the peer's libvirtd reach this daemon."""
        return f"qemu+tcp://{self.address}/system"

    @property
    def log(self) -> Path:
        return self.root / "var/log/libvirt/libvirtd.log"

    @property
    def stderr_log(self) -> Path:
        return self.root / "libvirtd.stderr"

    def _prepare(self) -> None:
        for d in BIND_DIRS:
            (self.root / d.lstrip("/")).mkdir(parents=True, exist_ok=True)
        etc = self.root / "etc/libvirt"
        for name, script in self.hooks.items():  # libvirtd reads its hooks when it starts
            hook = etc / "hooks" / name
            hook.parent.mkdir(exist_ok=True)
            hook.write_text(script)
            hook.chmod(0o755)
        (etc / "qemu.conf").write_text(QEMU_CONF.format(address=self.address))
        (etc / "libvirtd.conf").write_text(
            LIBVIRTD_CONF.format(address=self.address, host_uuid=self.host_uuid, root=self.root)
        )

    def _script(self) -> str:
        lines = ["set -e"]
        pairs = [(d, self.root / d.lstrip("/")) for d in BIND_DIRS] + list(self.binds.items())
        for d, src in pairs:
            lines.append(f"mkdir -p {shlex.quote(d)}")
            lines.append(f"mount --bind {shlex.quote(str(src))} {shlex.quote(d)}")
        pid = self.root / "libvirtd.pid"
        conf = self.root / "etc/libvirt/libvirtd.conf"
        lines.append(f"exec /usr/sbin/libvirtd --listen -f {shlex.quote(str(conf))} -p {pid}")
        return "\n".join(lines)

    def start(self, timeout: float = 60.0) -> NsLibvirtd:
        """Start the daemon and wait until it answers on its TCP address."""
        self._prepare()
        argv = ["unshare", "-m", "--propagation", "private", "sh", "-c", self._script()]
        with open(self.stderr_log, "ab") as err:
            self.proc = subprocess.Popen(
                self.net.argv(self.ns, argv),
                stdin=subprocess.DEVNULL,
                stdout=err,
                stderr=err,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"libvirtd in {self.ns} exited: {self.log_tail()}")
            done = self.net.run(self.ns, ["virsh", "-q", "-c", self.uri, "uri"], timeout=30)
            if done.returncode == 0:
                return self
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"libvirtd in {self.ns} did not answer: {done.stderr}")
            time.sleep(0.2)

    def argv(self, argv: list[str]) -> list[str]:
        """``argv`` inside this host: the daemon's network *and* mount namespace, so it sees
        the same ``/run/libvirt`` and ``binds`` as the daemon and its QEMUs (``nsenter``)."""
        assert self.proc is not None
        return ["nsenter", "-t", str(self.proc.pid), "-m", "-n", "--", *argv]

    def virsh(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """``virsh -c URI ARGS`` inside this host's namespace."""
        done = self.net.run(self.ns, ["virsh", "-q", "-c", self.uri, *args], timeout=300)
        if check and done.returncode != 0:
            raise AssertionError(f"virsh {' '.join(args)} on {self.ns}: {done.stderr.strip()}")
        return done

    def domstate(self, name: str) -> str:
        done = self.virsh("domstate", name, check=False)
        return done.stdout.strip() if done.returncode == 0 else "absent"

    def log_tail(self, n: int = 3000) -> str:
        out = []
        for p in (self.stderr_log, self.log):
            with contextlib.suppress(OSError):
                out.append(f"--- {p}\n" + p.read_text(errors="replace")[-n:])
        return "\n".join(out)

    def mount_ns(self) -> str | None:
        """The daemon's mount namespace (``mnt:[N]``), None when it is not running."""
        if self.proc is None or self.proc.poll() is not None:
            return None
        with contextlib.suppress(OSError):
            return os.readlink(f"/proc/{self.proc.pid}/ns/mnt")
        return None

    def pids(self, *names: str) -> list[int]:
        """Live processes named like one of ``names`` (``qemu-system``, ``swtpm``; none: all)
        in this daemon's mount namespace, the daemon excepted: what it, or anything run in this
        host (:meth:`argv`), started (QEMU's argv names the bound paths, not the root, so the
        namespace is the reliable mark)."""
        ns = self.mount_ns()
        if ns is None:
            return []
        out = []
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit() or int(proc.name) == self.proc.pid:  # type: ignore[union-attr]
                continue
            try:
                if os.readlink(proc / "ns/mnt") != ns:
                    continue
                argv0 = (proc / "cmdline").read_bytes().split(b"\0", 1)[0].decode(errors="replace")
                state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if state != "Z" and (not names or any(n in Path(argv0).name for n in names)):
                out.append(int(proc.name))
        return out

    def stop(self) -> None:
        """Kill every process left in this host's mount namespace (QEMUs, swtpms, bridges, an
        agent a test did not stop), then the daemon (by pid, SIGTERM then SIGKILL)."""
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if self.proc is not None:
            stop_process(self.proc, 15)


@contextlib.contextmanager
def libvirtd_pair(
    net: NetnsPair,
    root: Path,
    binds_a: dict[str, Path] | None = None,
    binds_b: dict[str, Path] | None = None,
    hooks: dict[str, str] | None = None,
) -> Iterator[tuple[NsLibvirtd, NsLibvirtd]]:
    """A libvirtd in each of ``net``'s namespaces (roots ``root/a``, ``root/b``); both stopped
    afterwards, also when the second failed to start. ``binds_*``: more bind mounts
    (path in the host → directory), e.g. the agent's state directory at the same path on both
    hosts, as real hosts have it. ``hooks``: libvirt hook scripts (``qemu`` → its text) written
    to each host's ``/etc/libvirt/hooks`` before its libvirtd starts."""
    a = NsLibvirtd(net, net.a, root / "a", binds=dict(binds_a or {}), hooks=dict(hooks or {}))
    b = NsLibvirtd(net, net.b, root / "b", binds=dict(binds_b or {}), hooks=dict(hooks or {}))
    try:
        a.start()
        b.start()
        yield a, b
    finally:
        b.stop()
        a.stop()
