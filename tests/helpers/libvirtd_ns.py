"""Re-export of :mod:`scripts.lab.libvirtd_ns` (the per-host libvirtd, shared with the demo)."""

from scripts.lab.libvirtd_ns import BIND_DIRS, QEMU_CONF, NsLibvirtd, libvirtd_pair

__all__ = ["BIND_DIRS", "QEMU_CONF", "NsLibvirtd", "libvirtd_pair"]
