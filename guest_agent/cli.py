"""``vtpm-guest``: the in-guest agent (Python standard library only).

Exit codes: 0 success, 2 error (one line on stderr).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

__all__ = ["build_parser", "main"]

VERSION = "0.1.0"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vtpm-guest",
        description=(
            "vtpm-trust guest agent: collects the firmware event log and the IMA measurement "
            "list and asks the host for a signed vPCR attestation over virtio-serial."
        ),
    )
    parser.add_argument("--version", action="version", version=f"vtpm-guest {VERSION}")
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
