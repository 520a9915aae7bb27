"""Dependencies point inward (ARCHITECTURE.md §7): checked by walking every module's imports."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
OURS = {"evidence", "host_agent", "guest_agent", "verifier"}
ALLOWED = {
    "evidence": {"evidence"},
    "guest_agent": {"guest_agent"},
    "verifier": {"verifier", "evidence"},
    "host_agent": {"host_agent", "evidence"},
}
# evidence/ may import only the standard library and cryptography.
EVIDENCE_THIRD_PARTY = {"cryptography"}


def _imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    out: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.extend((node.lineno, alias.name.split(".")[0]) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.lineno, node.module.split(".")[0]))
    return out


def _modules(package: str) -> list[Path]:
    return sorted((REPO / package).rglob("*.py"))


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_packages_import_only_inward(package: str) -> None:
    bad = []
    for path in _modules(package):
        for line, top in _imports(path):
            if top in OURS and top not in ALLOWED[package]:
                bad.append(f"{path.relative_to(REPO)}:{line} imports {top}")
    assert not bad, "imports against the dependency direction:\n" + "\n".join(bad)


@pytest.mark.parametrize("package", ["evidence", "guest_agent"])
def test_pure_packages_use_only_stdlib(package: str) -> None:
    allowed = set(sys.stdlib_module_names) | {"__future__"} | ALLOWED[package]
    if package == "evidence":
        allowed |= EVIDENCE_THIRD_PARTY
    bad = []
    for path in _modules(package):
        for line, top in _imports(path):
            if top not in allowed:
                bad.append(f"{path.relative_to(REPO)}:{line} imports {top}")
    assert not bad, f"{package}/ imports outside its allowance:\n" + "\n".join(bad)


def test_evidence_does_no_io() -> None:
    """evidence/ is pure: no clock, randomness, sockets, subprocesses, files or logging setup."""
    forbidden = {"os", "socket", "subprocess", "time", "random", "secrets", "logging", "io"}
    forbidden |= {"pathlib", "shutil", "tempfile", "threading", "asyncio"}
    bad = []
    for path in _modules("evidence"):
        for line, top in _imports(path):
            if top in forbidden:
                bad.append(f"{path.relative_to(REPO)}:{line} imports {top}")
        if "open(" in path.read_text():
            bad.append(f"{path.relative_to(REPO)} calls open()")
    assert not bad, "evidence/ must stay free of I/O:\n" + "\n".join(bad)
