"""Store settings: built from the agent configuration's ``[store]`` slice, checked on creation."""

from __future__ import annotations

from pathlib import Path

import pytest

from host_agent.config import StoreConfig
from host_agent.store import DEFAULT_COUNTER_INDEX, StoreSettings


def test_default_is_a_sqlite_file_in_the_state_dir(tmp_path: Path) -> None:
    settings = StoreSettings.from_config(StoreConfig(), tmp_path)
    assert settings.url == f"sqlite:///{tmp_path / 'store.sqlite'}"
    assert settings.counter_index == DEFAULT_COUNTER_INDEX
    assert not settings.allow_existing_counter


def test_a_configured_url_is_kept(tmp_path: Path) -> None:
    url = "postgresql://vtpm@db.example/fleet"
    assert StoreSettings.from_config(StoreConfig(url=url), tmp_path).url == url


@pytest.mark.parametrize("index", [0, 0x0000_0001, 0x0200_0000, 0x8100_0001])
def test_counter_index_must_be_an_nv_index(index: int) -> None:
    with pytest.raises(ValueError, match="is not an NV index"):
        StoreSettings(url="sqlite:///x", counter_index=index)


@pytest.mark.parametrize("prefix", ["", "Store", "x;drop", "1abc", "a" * 41])
def test_table_prefix_is_a_plain_identifier(prefix: str) -> None:
    with pytest.raises(ValueError, match="table_prefix"):
        StoreSettings(url="sqlite:///x", table_prefix=prefix)
