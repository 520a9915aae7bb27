"""``make demo``'s scripts report honestly.

``scripts/demo_corpus.py`` (act 0) fails on a mismatch; ``scripts/demo.py`` exits 0 only when
every act gave its expected outcome, reports a missing piece as SKIPPED, never runs an act whose
prerequisite failed, and removes its state directory. (The acts themselves, for real:
``tests/e2e/test_demo.py``.)"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tests.conftest import REPO


def _load(name: str) -> ModuleType:
    if str(REPO / "scripts") not in sys.path:
        sys.path.insert(0, str(REPO / "scripts"))  # demo.py imports demo_corpus
    spec = importlib.util.spec_from_file_location(f"vtpm_{name}", REPO / "scripts" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _demo() -> ModuleType:
    return _load("demo_corpus")


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


def _scripted(demo: ModuleType, outcomes: list[str]) -> list[tuple[str, str, Any, bool]]:
    """Acts that pass ("ok"), fail ("fail") or miss a piece ("skip"), without running anything."""

    def act(kind: str) -> Any:
        def run(_demo: Any, act: Any) -> str:
            if kind == "fail":
                raise demo.DemoFailure("expected trusted, got NOT TRUSTED")
            if kind == "skip":
                raise demo.Skipped("the save hook is missing")
            act.outcome = "fine"
            return "fine"

        return run

    return [(f"act {i}", "fine", act(k), i != 0) for i, k in enumerate(outcomes)]  # as ACTS


def _run_demo(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    outcomes: list[str],
) -> tuple[int, dict[str, Any]]:
    demo = _load("demo")
    monkeypatch.setattr(demo, "ACTS", _scripted(demo, outcomes))
    state = tmp_path / "state"
    rc = demo.main(["--json", "--state-dir", str(state)])
    assert not state.exists(), "the state directory is removed"
    doc: dict[str, Any] = json.loads(capsys.readouterr().out)
    return rc, doc


def test_demo_exits_0_only_when_every_act_passed(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc, doc = _run_demo(monkeypatch, tmp_path, capsys, ["ok", "ok", "ok"])
    assert rc == 0 and doc["ok"] is True
    assert [a["status"] for a in doc["acts"]] == ["passed"] * 3


def test_a_failed_act_stops_the_acts_that_need_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc, doc = _run_demo(monkeypatch, tmp_path, capsys, ["ok", "fail", "ok"])
    assert rc == 1 and doc["ok"] is False
    assert [a["status"] for a in doc["acts"]] == ["passed", "failed", "not run"]
    assert doc["acts"][1]["result"] == "FAILED: expected trusted, got NOT TRUSTED"
    assert doc["acts"][2]["result"].startswith("not run: act 1")


def test_a_missing_piece_is_skipped_and_fails_the_demo(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc, doc = _run_demo(monkeypatch, tmp_path, capsys, ["ok", "skip"])
    assert rc == 1 and doc["acts"][1]["result"] == "SKIPPED: the save hook is missing"
    # only the corpus replay (act 0) may be skipped: its data lives outside the repository
    rc, doc = _run_demo(monkeypatch, tmp_path, capsys, ["skip", "ok"])
    assert rc == 0 and doc["acts"][0]["status"] == "skipped"


def test_vpcr_ranges() -> None:
    demo = _load("demo")
    assert demo._ranges([0, 1, 2, 3, 4, 5, 6, 7, 10]) == "0-7, 10"
    assert demo._ranges([]) == "none"
