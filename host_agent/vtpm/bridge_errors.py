"""Errors of the bridge, its daemon link and the tools that reach it.

::

    VtpmError
    ├── StateError(state, required)     (host_agent.errors) e.g. read_pcrs with no QEMU attached
    ├── BridgeTransportError(what)      a socket to QEMU, swtpm, the daemon or a bridge failed
    │                                   (wraps OSError once, where it enters)
    ├── SwtpmCtrlError(cmd, result)     swtpm refused or broke a control command of our own
    ├── InjectionError(rc)              an injected TPM command failed or timed out
    │   └── InjectionRefused            a state-changing injection after the first GET_STATEBLOB
    ├── LinkCallError(error_id)         a bridge answered a link call with an error
    └── BridgeNotFound(domain)          no registered bridge answers to that UUID or name
"""

from __future__ import annotations

from typing import ClassVar

from evidence.errors import VtpmError

__all__ = [
    "BridgeNotFound",
    "BridgeTransportError",
    "InjectionError",
    "InjectionRefused",
    "LinkCallError",
    "SwtpmCtrlError",
]


class BridgeTransportError(VtpmError):
    """A socket the bridge or a link client uses failed.

    Args:
        what: which endpoint (``"swtpm ctrl /run/…/ctrl.sock"``).
        message: what happened (the OSError text).
    """

    id: ClassVar[str] = "vtpm.bridge.transport"

    def __init__(self, what: str, message: str) -> None:
        self.what = what
        super().__init__(f"{what}: {message}")


class SwtpmCtrlError(VtpmError):
    """swtpm answered a control command of the bridge's own with an error.

    Args:
        cmd: the command name (``"CMD_GET_TPMESTABLISHED"``).
        result: swtpm's result code.
    """

    id: ClassVar[str] = "vtpm.swtpm.ctrl"

    def __init__(self, cmd: str, result: int, message: str = "") -> None:
        self.cmd = cmd
        self.result = result
        super().__init__(f"{cmd}: swtpm result 0x{result:x}" + (f" ({message})" if message else ""))


class InjectionError(VtpmError):
    """A TPM command the bridge injected failed (TPM return code) or got no answer in time.

    Args:
        message: which command and what happened.
        rc: the TPM response code, or None for a timeout or a lost channel.
    """

    id: ClassVar[str] = "vtpm.bridge.injection"

    def __init__(self, message: str, rc: int | None = None) -> None:
        self.rc = rc
        super().__init__(message)


class InjectionRefused(InjectionError):
    """A state-changing injection was asked after the first GET_STATEBLOB: it would miss the
    state QEMU is saving."""

    id: ClassVar[str] = "vtpm.bridge.injection_refused"


class LinkCallError(VtpmError):
    """A bridge answered a link call with an error; ``error_id`` is the bridge-side error id."""

    id: ClassVar[str] = "vtpm.link.call"

    def __init__(self, error_id: str, message: str) -> None:
        self.error_id = error_id
        super().__init__(f"[{error_id}] {message}")


class BridgeNotFound(VtpmError):
    """No running bridge is registered under that VM UUID or name."""

    id: ClassVar[str] = "vtpm.bridge.not_found"

    def __init__(self, domain: str, where: str) -> None:
        self.domain = domain
        super().__init__(f"no running bridge for {domain!r} under {where}")
