"""host_agent.logging_setup: text or one JSON object per line."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from host_agent.logging_setup import JsonFormatter, JsonLogs, setup_logging


@pytest.fixture(autouse=True)
def _restore_root() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for h in list(root.handlers):
        root.removeHandler(h)
    for h in handlers:
        root.addHandler(h)
    root.setLevel(level)


def _lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_json_line_has_fixed_fields_and_extras() -> None:
    out = io.StringIO()
    setup_logging("json", "debug", out)
    logging.getLogger("vtpm.test").info(
        "sealed %s", "vm1", extra={"vm_uuid": "abc", "seconds": 0.25, "path": Path("/x")}
    )
    (doc,) = _lines(out)
    assert doc["level"] == "info" and doc["logger"] == "vtpm.test"
    assert doc["message"] == "sealed vm1"
    assert doc["vm_uuid"] == "abc" and doc["seconds"] == 0.25 and doc["path"] == "/x"
    assert str(doc["ts"]).endswith("+00:00") and "." in str(doc["ts"])
    assert list(doc)[:4] == ["ts", "level", "logger", "message"]


def test_multiline_message_and_traceback_stay_on_one_line() -> None:
    out = io.StringIO()
    setup_logging("json", logging.INFO, out)
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logging.getLogger("t").exception("first\nsecond")
    assert len(out.getvalue().splitlines()) == 1
    (doc,) = _lines(out)
    assert doc["message"] == "first\nsecond"
    assert "RuntimeError: boom" in str(doc["exc"])


def test_unserialisable_extra_uses_repr_and_bytes_hex() -> None:
    record = logging.LogRecord("n", logging.WARNING, "f", 1, "m", None, None)
    record.obj = object()
    record.blob = b"\x01\x02"
    doc = json.loads(JsonFormatter().format(record))
    assert doc["obj"].startswith("<object object") and doc["blob"] == "0102"


def test_text_format_and_level_filter() -> None:
    out = io.StringIO()
    setup_logging("text", "warning", out)
    logging.getLogger("t").info("hidden")
    logging.getLogger("t").warning("shown")
    assert "hidden" not in out.getvalue() and "WARNING t: shown" in out.getvalue()


def test_second_setup_replaces_the_handler() -> None:
    out = io.StringIO()
    setup_logging("json", stream=out)
    setup_logging("json", stream=out)
    logging.getLogger("t").warning("once")
    assert len(out.getvalue().splitlines()) == 1


def test_bad_format_or_level() -> None:
    with pytest.raises(ValueError, match="log format"):
        setup_logging("xml")
    with pytest.raises(ValueError, match="unknown log level"):
        setup_logging("json", "loud")


def test_json_logs_component_switches_and_restores() -> None:
    out = io.StringIO()
    setup_logging("text", "info", out)
    comp = JsonLogs()
    comp.start(None)
    logging.getLogger("t").info("as json", extra={"vm_uuid": "u"})
    comp.stop()
    logging.getLogger("t").info("as text")
    first, second = out.getvalue().splitlines()
    assert json.loads(first)["vm_uuid"] == "u"
    assert second.endswith("INFO t: as text")
