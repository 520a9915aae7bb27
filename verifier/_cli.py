"""Helpers shared by the ``vtpm-verify`` subcommands (I/O lives here, never in evidence/)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

__all__ = ["emit_json", "read_input"]


def read_input(path: str) -> bytes:
    """Read a file given on the command line; ``-`` means standard input."""
    if path == "-":
        return sys.stdin.buffer.read()
    return Path(path).read_bytes()


def emit_json(obj: Any) -> None:
    """Print one JSON document (sorted keys, so scripts and diffs see a stable shape)."""
    sys.stdout.write(json.dumps(obj, indent=2, sort_keys=True) + "\n")
