"""What the ``vtpm-host`` command modules share: the agent configuration arguments (``--config``,
``--state-dir``, ``--tcti``, ``--json``), the one builder of the configuration from them, and the
``vm`` command's sub-command action that several modules add to.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path
from typing import Any

from host_agent.config import AgentConfig, load_config, with_state_dir

__all__ = ["STATE_DIR_HELP", "TCTI_HELP", "add_agent_args", "build_config", "vm_subparsers"]

STATE_DIR_HELP = "agent state directory (default /var/lib/vtpm-trust, or VTPM_STATE_DIR)"
TCTI_HELP = "TPM TCTI, e.g. device:/dev/tpmrm0"


def add_agent_args(
    p: argparse.ArgumentParser,
    *,
    state_dir_help: str = STATE_DIR_HELP,
    tcti_help: str | None = None,
    json_help: str | None = None,
) -> None:
    """Add ``--config FILE`` and ``--state-dir DIR``, then ``--tcti`` and ``--json`` when their
    help is given (in that order), for :func:`build_config`."""
    p.add_argument("--config", type=Path, metavar="FILE", help="agent configuration (TOML)")
    p.add_argument("--state-dir", type=Path, metavar="DIR", help=state_dir_help)
    if tcti_help is not None:
        p.add_argument("--tcti", metavar="TCTI", help=tcti_help)
    if json_help is not None:
        p.add_argument("--json", action="store_true", help=json_help)


def build_config(args: argparse.Namespace) -> AgentConfig:
    """The agent configuration: ``--config`` (or the defaults) and the ``VTPM_*`` environment,
    then ``--state-dir``, ``--tcti`` and ``--uri`` where the command has them and they are given.

    Raises:
        ConfigError: the file or the environment is invalid.
    """
    config = load_config(args.config, os.environ)
    if args.state_dir is not None:
        config = with_state_dir(config, args.state_dir.resolve())
    if getattr(args, "tcti", None):
        config = dataclasses.replace(config, tpm=dataclasses.replace(config.tpm, tcti=args.tcti))
    if getattr(args, "uri", None):
        config = dataclasses.replace(
            config, libvirt=dataclasses.replace(config.libvirt, uri=args.uri)
        )
    return config


def vm_subparsers(subparsers: Any) -> Any:
    """The ``vm`` command's sub-command action, made by whichever module registers first."""
    vm = subparsers.choices.get("vm")
    if vm is None:
        vm = subparsers.add_parser("vm", help="per-VM operations")
        return vm.add_subparsers(dest="vm_command", metavar="VM_COMMAND", required=True)
    for action in vm._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action
    return vm.add_subparsers(dest="vm_command", metavar="VM_COMMAND", required=True)
