"""``vtpm-host``: the host agent's admin CLI.

The host-TPM, bridge, memory and lifecycle commands are added by their issues; today the CLI
answers ``--help`` and ``--version`` so packaging and scripts can rely on the entry point.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version

__all__ = ["build_parser", "main"]


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
    parser.add_subparsers(dest="command", metavar="COMMAND")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
