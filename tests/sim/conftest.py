"""Sim tier: a real swtpm per test session (and fresh ones on demand)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.helpers.swtpm import Swtpm, require_binaries, start_swtpm


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/sim/" in str(item.fspath):
            item.add_marker(pytest.mark.sim)


@pytest.fixture(scope="session")
def swtpm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Swtpm]:
    """One swtpm for the whole run (plain, no EK certificates)."""
    require_binaries("swtpm", "tpm2_startup")
    tpm = start_swtpm(tmp_path_factory.mktemp("swtpm"))
    yield tpm
    tpm.stop()


@pytest.fixture
def swtpm_factory(tmp_path: Path) -> Iterator[Callable[..., Swtpm]]:
    """Start extra swtpms (e.g. a second host, or one with EK certificates); all stopped after."""
    started: list[Swtpm] = []

    def make(name: str = "tpm", *, provision_ek: bool = False) -> Swtpm:
        tpm = start_swtpm(tmp_path / name, provision_ek=provision_ek)
        started.append(tpm)
        return tpm

    yield make
    for tpm in started:
        tpm.stop()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    report = yield
    if report.failed and "swtpm" in getattr(item, "fixturenames", ()):
        tpm = item.funcargs.get("swtpm")  # type: ignore[attr-defined]
        if isinstance(tpm, Swtpm):
            report.sections.append(("swtpm log", tpm.log_text()[-4000:]))
    return report
