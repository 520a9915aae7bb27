"""swtpm-localca's directory, shared by everything that runs ``swtpm_setup`` as root.

swtpm-localca keeps its CA and serial counter in ``/var/lib/swtpm-localca``, which must stay
owned by ``tss``: files a root-run swtpm_setup creates there break libvirt's own swtpm_setup
(which runs as ``tss``) later (platform-notes.md §3, §7). Both the per-VM vTPM provisioning
(:mod:`host_agent.vtpm.swtpm_provision`) and the development software root
(:mod:`host_agent.tpm.software_root`) hand the files back after each run with
:func:`restore_localca_owner`.
"""

from __future__ import annotations

import contextlib
import os
import pwd
from pathlib import Path

__all__ = ["LOCALCA_DIR", "restore_localca_owner"]

#: swtpm-localca's state directory (``statedir`` in /etc/swtpm-localca.conf).
LOCALCA_DIR = Path("/var/lib/swtpm-localca")


def restore_localca_owner(localca_dir: Path = LOCALCA_DIR, *, created: bool = False) -> None:
    """Give every entry of swtpm-localca's directory back to the directory's owner.

    Running as root, swtpm_setup (swtpm_localca) may create root-owned files there (the lock,
    the serial counter, the CA itself on the very first run). If the directory belongs to another
    user (Debian: ``tss``), the root-owned entries are chowned to it; if this run ``created`` the
    directory as root and a ``tss`` user exists, the whole tree goes to ``tss:root`` as Debian's
    swtpm-tools package would have made it. Does nothing when not root. Never raises.
    """
    if os.geteuid() != 0:
        return
    try:
        st = localca_dir.stat()
    except OSError:
        return
    uid, gid = st.st_uid, st.st_gid
    if uid == 0:
        if not created:
            return
        try:
            uid, gid = pwd.getpwnam("tss").pw_uid, 0
        except KeyError:
            return
        with contextlib.suppress(OSError):
            os.chown(localca_dir, uid, gid)
            os.chmod(localca_dir, 0o750)
    for root, dirs, files in os.walk(localca_dir):
        for name in (*dirs, *files):
            path = os.path.join(root, name)
            with contextlib.suppress(OSError):
                if os.lstat(path).st_uid == 0:
                    os.lchown(path, uid, gid)
