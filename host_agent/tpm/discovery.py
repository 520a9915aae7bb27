"""Finding the host TPM and opening the port on it.

Order (ARCHITECTURE.md §3 "Host admission"):

1. a configured TCTI string (``TpmConfig.tcti``) wins;
2. else the first ``tpmrm`` device udev knows (``/dev/tpmrm0``: the kernel's resource manager);
3. else, if allowed, the embedded software root (:class:`SoftwareRoot`), announced with a loud
   development-only warning.

The udev query is the one small function :func:`find_tpmrm_devices`, which takes a pyudev
context (or anything with the same ``list_devices`` method): CI machines have no TPM device, so
its test uses a fake context; everything else here runs for real in the tests.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol

from ..config import TpmConfig
from .errors import TpmNotFound
from .software_root import SoftwareRoot

if TYPE_CHECKING:
    from .adapter import Connection, PytssHostTpm

__all__ = [
    "SOFTWARE_ROOT_WARNING",
    "TpmLocation",
    "UdevContext",
    "discover",
    "find_tpmrm_devices",
    "open_host_tpm",
]

log = logging.getLogger(__name__)

SOFTWARE_ROOT_WARNING = (
    "NO HARDWARE TPM: using the embedded swtpm SOFTWARE ROOT. It is for DEVELOPMENT ONLY: its "
    "keys are files on this host and prove nothing about it. Configure tpm.tcti or install a TPM "
    "for production."
)

# TCTIs that talk to a simulator rather than a TPM chip.
_SIMULATOR_TCTIS = ("swtpm", "mssim", "libtpms")


class UdevContext(Protocol):
    """The part of ``pyudev.Context`` discovery uses."""

    def list_devices(self, **kwargs: Any) -> Any: ...


@dataclass(frozen=True)
class TpmLocation:
    """Where the host TPM is.

    Attributes:
        root: ``"software"`` for a simulator (embedded or configured), else ``"hardware"``.
        tcti: the TCTI string, or None when the software root still has to be started.
        source: ``"config"``, ``"udev"`` or ``"software-root"``.
    """

    root: Literal["hardware", "software"]
    tcti: str | None
    source: Literal["config", "udev", "software-root"]


def find_tpmrm_devices(context: UdevContext) -> list[str]:
    """Device nodes of subsystem ``tpmrm`` (e.g. ``/dev/tpmrm0``), sorted."""
    nodes = [d.device_node for d in context.list_devices(subsystem="tpmrm")]
    return sorted(n for n in nodes if n)


def _root_of(tcti: str) -> Literal["hardware", "software"]:
    return "software" if tcti.split(":", 1)[0] in _SIMULATOR_TCTIS else "hardware"


def discover(config: TpmConfig, *, udev: UdevContext | None = None) -> TpmLocation:
    """Where the TPM is (see the module docstring for the order).

    Args:
        config: the TPM slice of the agent configuration.
        udev: a pyudev context; default a real ``pyudev.Context()``.

    Raises:
        TpmNotFound: no TPM configured or found, and the software root is not allowed.
    """
    if config.tcti:
        return TpmLocation(_root_of(config.tcti), config.tcti, "config")
    if udev is None:
        import pyudev

        udev = pyudev.Context()
    devices = find_tpmrm_devices(udev)
    if devices:
        return TpmLocation("hardware", f"device:{devices[0]}", "udev")
    if not config.allow_software_root:
        raise TpmNotFound(
            "no TPM: tpm.tcti is not set, udev knows no tpmrm device, and "
            "tpm.allow_software_root is false"
        )
    return TpmLocation("software", None, "software-root")


def open_host_tpm(
    config: TpmConfig,
    *,
    udev: UdevContext | None = None,
    connection: Connection | None = None,
) -> PytssHostTpm:
    """Discover the TPM and open the port on it (a :class:`PytssHostTpm`).

    With the software root, the swtpm is provisioned and started here and stopped again when the
    returned port is closed (unless another agent process already runs it). A simulator (no
    resource manager) is used in ``shared`` mode: one connection, kept with its loaded keys
    while this process holds the lease ``<state_dir>/tpm.lock``, given up (keys flushed) as soon
    as another agent process (daemon or CLI) waits for it, so both can use one swtpm; a
    hardware TPM keeps one connection (the kernel's resource manager isolates clients).
    ``connection`` overrides the mode (``per-call``: connect and lock for each call).
    """
    from .adapter import PytssHostTpm

    location = discover(config, udev=udev)
    if location.tcti is not None:
        if location.root == "software":
            log.warning(
                "tpm.tcti %s is a TPM SIMULATOR: for DEVELOPMENT ONLY, it proves nothing "
                "about this host",
                location.tcti,
            )
        return PytssHostTpm(
            location.tcti,
            config.state_dir,
            root=location.root,
            connection=connection or ("shared" if location.root == "software" else "persistent"),
        )
    log.warning(SOFTWARE_ROOT_WARNING)
    root = SoftwareRoot(config.state_dir / "swtpm")
    root.start()
    try:
        return PytssHostTpm(
            root.tcti,
            config.state_dir,
            root="software",
            on_close=root.stop,
            connection=connection or "shared",
        )
    except BaseException:
        root.stop()
        raise
