"""Run a demo script (``scripts/demo.py``, ``scripts/demo_migration.py``) with ``--json`` and
require every act to give its expected outcome; the e2e tests then read the acts' details."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["DemoRun", "run_demo"]

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class DemoRun:
    doc: dict[str, Any]  # the demo's JSON document
    acts: dict[int, dict[str, Any]]  # act number → the act's JSON
    report: str  # one line per act: number, status, result
    took: float  # seconds, with the interpreter's start


def run_demo(script: str, acts: int, timeout: float) -> DemoRun:
    """``python scripts/SCRIPT --json`` in the checkout; asserts it exited 0 with ``ok``, and
    that its ``acts`` acts all passed (the report and the narrative's tail say why not)."""
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / script), "--json"],
                          capture_output=True, text=True, timeout=timeout, cwd=REPO)  # fmt: skip
    took = time.monotonic() - t0
    assert proc.stdout.strip(), proc.stderr[-5000:]
    doc: dict[str, Any] = json.loads(proc.stdout)
    by_number = {a["number"]: a for a in doc["acts"]}
    report = "\n".join(f"{n} {a['status']}: {a['result']}" for n, a in by_number.items())
    assert proc.returncode == 0 and doc["ok"] is True, report + "\n" + proc.stderr[-5000:]
    assert [a["status"] for a in doc["acts"]] == ["passed"] * acts, report
    return DemoRun(doc, by_number, report, took)
