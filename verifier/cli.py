"""``vtpm-verify``: the tenant's and the fleet's relying-party tool.

Exit status: 0 success (or trusted), 1 untrusted, 2 error (malformed input, missing file, misuse).
Every command that prints data has ``--json`` for scripts.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from evidence.errors import VtpmError

__all__ = ["build_parser", "main"]

# Each module registers its subcommand(s) with ``register(subparsers)``.
_COMMAND_MODULES = (
    "verifier.commands.eventlog",
    "verifier.commands.ima",
    "verifier.commands.registrar",
    "verifier.commands.tenant",
)

EXIT_OK = 0
EXIT_UNTRUSTED = 1
EXIT_ERROR = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vtpm-verify",
        description=(
            "Verify what a TPM-measured VM reports: enroll a VM you rent, attest it over SSH, "
            "replay firmware event logs and IMA measurement lists, manage reference values, and "
            "run the fleet registrar. Exit status: 0 ok/trusted, 1 untrusted, 2 error."
        ),
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in _COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def _silence_stdout() -> None:
    import os

    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except VtpmError as err:
        print(f"vtpm-verify: error [{err.id}]: {err}", file=sys.stderr)
        return EXIT_ERROR
    except BrokenPipeError:
        # The reader went away (`| head`): not an error of ours; keep Python from complaining.
        _silence_stdout()
        return EXIT_OK
    except OSError as err:
        print(f"vtpm-verify: error: {err.strerror or err}: {err.filename}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
