"""Shared fixtures: where the repository and the shared corpus are."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# CI clones the repository beside ../shared; a developer's checkout sits at /work/main beside it.
SHARED = REPO.parent / "shared"
CORPUS = SHARED / "corpus"


@pytest.fixture(scope="session")
def corpus() -> Path:
    """The shared corpus of real event logs. Missing corpus fails the run: it is not optional."""
    if not (CORPUS / "SOURCES.md").is_file():
        pytest.fail(f"shared corpus not found at {CORPUS} (CI keeps ../shared beside the checkout)")
    return CORPUS
