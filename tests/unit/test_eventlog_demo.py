"""``scripts/demo_corpus.py`` (act 0 of ``make demo``) reports honestly, and fails on a mismatch."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

from tests.conftest import REPO


def _demo() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "vtpm_demo_corpus", REPO / "scripts" / "demo_corpus.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_demo_reproduces_every_shipped_value(
    corpus: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _demo().main(["--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] is True and doc["failures"] == 0
    assert len(doc["logs"]) == 35
    # 245 go-tpm-tools + 130 tpm2-tools + 8 + 8 go-attestation JSON values.
    assert doc["values_matched"] == 391


def test_demo_reports_a_mismatch(corpus: Path) -> None:
    demo = _demo()
    data = (corpus / "tpm2-tools/test/integration/fixtures/event-uefivar.bin").read_bytes()
    row = demo.check("uefivar", data, {"sha256": {7: bytes(32)}})
    assert not row.ok and row.invalid_pcrs == [7] and "MISMATCH on PCR 7" in row.result
    bad = demo.check("truncated", data[:-1], None)
    assert not bad.ok and bad.result.startswith("ERROR")


def test_demo_table(corpus: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _demo().main([]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1].startswith("OK: 35 logs parsed and replayed; 391 expected PCR values")


def test_demo_summary_line(corpus: Path) -> None:
    ok, line = _demo().summary()
    assert ok and line.startswith("35 real firmware event logs") and "391 expected" in line
