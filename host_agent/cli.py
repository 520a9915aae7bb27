"""``vtpm-host``: the host agent's admin CLI.

Commands are grouped by concern (``tpm``, ``memory``, ``vm``, ``image`` …); each lives in its own
module and registers itself below.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version

from evidence.errors import VtpmError

__all__ = ["build_parser", "main"]

# Each module registers its subcommand(s) with ``register(subparsers)``; a command's handler is
# ``args.func(args) -> int``. Errors derived from VtpmError print one line and exit 2.
_COMMAND_MODULES: tuple[str, ...] = (
    "host_agent.memory.cli",
    "host_agent.tpm.cli",
    "host_agent.store.cli",
    "host_agent.vtpm.cli",
    "host_agent.lifecycle.save_cli",
    "host_agent.service.daemon",
    "host_agent.lifecycle.cli",
    "host_agent.service.status",
    "host_agent.migration.cli",
)


def _version() -> str:
    try:
        return version("vtpm-trust")
    except PackageNotFoundError:
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vtpm-host",
        description=(
            "vtpm-trust host agent: owns the host TPM keys, the per-VM swtpm instances and "
            "their bridges, the trusted store, and the guest attestation channel."
        ),
    )
    parser.add_argument("--version", action="version", version=f"vtpm-host {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return int(args.func(args))
    except VtpmError as err:
        print(f"vtpm-host: error [{err.id}]: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
