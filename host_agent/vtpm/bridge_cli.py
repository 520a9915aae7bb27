"""The bridge's command line: its argument parser and the :class:`BridgeConfig` it yields.

Kept apart from the event loop so the loop module holds no argparse; ``main`` stays in
:mod:`host_agent.vtpm.bridge` (``python -m host_agent.vtpm.bridge``), which builds the bridge
from :func:`config_from_args`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from host_agent.vtpm.bridge_state import BridgeConfig

__all__ = ["build_parser", "config_from_args"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m host_agent.vtpm.bridge",
        description="Per-VM bridge between QEMU's tpm-emulator backend and swtpm.",
    )
    p.add_argument("--vm-uuid", required=True)
    p.add_argument("--vm-name", default="")
    p.add_argument("--listen", required=True, type=Path, help="the VM's control socket (QEMU)")
    p.add_argument("--swtpm-ctrl", required=True, type=Path, help="swtpm's --ctrl socket")
    p.add_argument("--daemon-sock", type=Path, help="the daemon's link socket")
    p.add_argument("--runtime-dir", type=Path, help="registry + query socket directory")
    p.add_argument("--hook-timeout", type=float, default=10.0)
    p.add_argument("--reconnect-interval", type=float, default=0.2)
    p.add_argument("--response-spin-us", type=float, default=0.0)
    p.add_argument("--listen-mode", type=lambda v: int(v, 8), default=0o600)
    p.add_argument("--listen-uid", type=int)
    p.add_argument("--listen-gid", type=int)
    p.add_argument("--allow-unhooked-state-transfer", action="store_true")
    p.add_argument("--once", action="store_true", help="exit when the first QEMU leaves")
    p.add_argument("--log-level", default="INFO")
    return p


def config_from_args(args: argparse.Namespace) -> BridgeConfig:
    """The bridge configuration the parsed command line asks for."""
    return BridgeConfig(
        vm_uuid=args.vm_uuid,
        vm_name=args.vm_name,
        listen=args.listen,
        swtpm_ctrl=args.swtpm_ctrl,
        daemon_socket=args.daemon_sock,
        runtime_dir=args.runtime_dir,
        hook_timeout=args.hook_timeout,
        reconnect_interval=args.reconnect_interval,
        response_spin=args.response_spin_us / 1e6,
        listen_mode=args.listen_mode,
        listen_uid=args.listen_uid,
        listen_gid=args.listen_gid,
        allow_unhooked_state_transfer=args.allow_unhooked_state_transfer,
        exit_when_qemu_leaves=args.once,
    )
