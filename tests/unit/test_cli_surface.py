"""Every command a user or a script runs has ``--help`` that explains it and ``--json`` output.

Walks the three argparse trees (``vtpm-host``, ``vtpm-verify``, ``vtpm-guest``) so a new
subcommand is checked without editing this file.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator

import pytest

from guest_agent.cli import build_parser as guest_parser
from host_agent.cli import build_parser as host_parser
from verifier.cli import build_parser as verify_parser

#: Commands without ``--json``, each with the reason.
NO_JSON = {
    "vtpm-host daemon": "a foreground service: its output is the log (--log-format json)",
    "vtpm-host migration serve": "a foreground service: its output is the log",
    "vtpm-host migration journal": "always prints one JSON document",
    "vtpm-guest quote": "always prints one JSON document (the evidence bundle)",
}


def _leaves(
    name: str, parser: argparse.ArgumentParser, help_line: str = ""
) -> Iterator[tuple[str, tuple[argparse.ArgumentParser, str]]]:
    """(command, (its parser, the one-line help its parent lists it with)) for every leaf."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield name, (parser, help_line)
        return
    for action in subs:
        helps = {c.dest: c.help or "" for c in action._choices_actions}
        for sub_name, sub in action.choices.items():
            yield from _leaves(f"{name} {sub_name}", sub, helps.get(sub_name, ""))


LEAVES = dict(
    leaf
    for prog, build in (
        ("vtpm-host", host_parser),
        ("vtpm-verify", verify_parser),
        ("vtpm-guest", guest_parser),
    )
    for leaf in _leaves(prog, build())
)


def _options(parser: argparse.ArgumentParser) -> set[str]:
    return {opt for a in parser._actions for opt in a.option_strings}


def test_the_walk_finds_the_commands() -> None:
    assert {"vtpm-host init", "vtpm-verify attest", "vtpm-guest quote"} <= set(LEAVES)
    assert len(LEAVES) > 30
    assert set(NO_JSON) <= set(LEAVES), "NO_JSON names a command that is gone"


@pytest.mark.parametrize("command", sorted(LEAVES))
def test_every_command_has_json_output(command: str) -> None:
    options = _options(LEAVES[command][0])
    if command in NO_JSON:
        assert "--json" not in options, f"{command} has --json now: drop it from NO_JSON"
    else:
        assert "--json" in options, f"{command} has no --json"


@pytest.mark.parametrize("command", sorted(LEAVES))
def test_every_command_has_help_that_explains(command: str) -> None:
    parser, help_line = LEAVES[command]
    explained = (parser.description or "").strip() or help_line.strip()
    assert len(explained) >= 15, f"{command}: no description and no help line in its parent"
    assert parser.format_help().startswith("usage: ")
