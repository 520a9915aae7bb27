"""``vtpm-verify ima``: being written (foundation issue)."""

from __future__ import annotations

import argparse
from typing import Any


def register(subparsers: Any) -> None:
    del subparsers


_ = argparse
