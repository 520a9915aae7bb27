"""The roles' systemd units, rendered the way the roles render them and checked.

systemd is not PID 1 on the test machines, so the roles run the agent under the supervisor there
and no unit is ever started here. What can be checked without a running systemd is checked:
``ansible.builtin.template`` renders each unit from the role's own template and defaults (a tiny
playbook on ``localhost``), into a directory whose path has a space, ``%`` and ``$`` in it; then

- the unit parses as an INI file with the sections and settings the roles rely on
  (``KillMode=process`` for the agent: bridges and swtpms outlive a restart, invariant 6);
- ``ExecStart`` unquoted by systemd's rules gives back exactly the command the role hands the
  supervisor (the same variable);
- ``systemd-analyze verify`` accepts the unit (package ``systemd``, in deps/debian-packages.txt:
  it runs without systemd as PID 1). It refuses an ``ExecStart`` whose program does not exist, so
  it also proves the quoting kept the odd path in one piece.
"""

from __future__ import annotations

import configparser
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
ROLES = REPO / "ansible" / "roles"
BIN = Path(sys.executable).parent


def systemd_words(line: str) -> list[str]:
    """Split an ``ExecStart=`` value as systemd does for the forms the templates write: words
    separated by blanks, double-quoted words with C escapes, ``%%`` for ``%`` and, in the
    arguments after the program, ``$$`` for ``$``. Anything else (a lone ``%`` or ``$``: a
    specifier or variable) is an error here."""
    words: list[str] = []
    i, n = 0, len(line)
    while i < n:
        program = not words  # systemd expands no variables in the program's path
        if line[i] == " ":
            i += 1
            continue
        quoted = line[i] == '"'
        i += quoted
        word = ""
        while i < n and (line[i] != '"' if quoted else line[i] != " "):
            c = line[i]
            if c == "\\" and quoted:
                word += line[i + 1]
                i += 2
                continue
            if c == "%" or (c == "$" and not program):
                assert line[i + 1 : i + 2] == c, f"unescaped {c} in {line!r}"
                i += 1
            word += c
            i += 1
        if quoted:
            assert i < n, f"unterminated quote in {line!r}"
            i += 1
        words.append(word)
    return words


@dataclass(frozen=True)
class Rendered:
    out: Path  # the units, by name
    prefix: Path  # vtpm_prefix: every path of both roles under it
    commands: dict[str, list[str]]  # unit name -> the command the supervisor would run


@pytest.fixture
def rendered() -> Iterator[Rendered]:
    root = Path(tempfile.mkdtemp(prefix="vtpm units "))
    try:
        odd = root / "opt 100% $HOME"  # a space, a specifier, a variable
        venv_bin = odd / "venv" / "bin"
        venv_bin.mkdir(parents=True)
        for name in ("vtpm-host", "vtpm-verify"):
            (venv_bin / name).symlink_to(BIN / name)
        out = root / "out"
        out.mkdir()
        playbook = root / "render.yml"
        play = [
            {
                "name": "Render the roles' systemd units",
                "hosts": "localhost",
                "connection": "local",
                "gather_facts": False,
                "vars_files": [
                    str(ROLES / "vtpm_host/defaults/main.yml"),
                    str(ROLES / "vtpm_registrar/defaults/main.yml"),
                ],
                "tasks": [
                    {
                        "name": f"Render {unit}",
                        "ansible.builtin.template": {
                            "src": str(ROLES / role / "templates" / f"{unit}.j2"),
                            "dest": str(out / unit),
                            "mode": "0644",
                        },
                    }
                    for role, unit in (
                        ("vtpm_host", "vtpm-host.service"),
                        ("vtpm_registrar", "vtpm-registrar.service"),
                    )
                ]
                + [
                    {
                        "name": "Write the commands the supervisor would run",
                        "ansible.builtin.copy": {
                            "content": "{{ {'vtpm-host.service': vtpm_host_agent_command,"
                            " 'vtpm-registrar.service': vtpm_registrar_command} | to_json }}",
                            "dest": str(out / "commands.json"),
                            "mode": "0644",
                        },
                    }
                ],
            }
        ]
        playbook.write_text(json.dumps(play))
        extra = {
            "vtpm_src": str(REPO),
            "vtpm_prefix": str(odd),
            "vtpm_host_venv": str(odd / "venv"),
            "vtpm_registrar_venv": str(odd / "venv"),
            "vtpm_registrar_port": 8443,
        }
        proc = subprocess.run(
            [str(BIN / "ansible-playbook"), "-i", "localhost,", str(playbook),
             "-e", json.dumps(extra), "-e", f"ansible_python_interpreter={sys.executable}"],
            capture_output=True, text=True, timeout=300,
            env={**os.environ, "ANSIBLE_HOME": str(root / "ansible-home"),
                 "ANSIBLE_LOCAL_TEMP": str(root / "ansible-tmp"), "ANSIBLE_NOCOLOR": "1"},
        )  # fmt: skip
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
        yield Rendered(out, odd, json.loads((out / "commands.json").read_text()))
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _unit(path: Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=True, interpolation=None, delimiters=("=",))
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(path.read_text())
    return parser


@pytest.mark.parametrize("unit", ["vtpm-host.service", "vtpm-registrar.service"])
def test_rendered_unit_runs_the_roles_command_and_systemd_accepts_it(
    rendered: Rendered, unit: str
) -> None:
    path = rendered.out / unit
    parsed = _unit(path)
    assert parsed.sections() == ["Unit", "Service", "Install"]
    service = parsed["Service"]
    assert service["Type"] == "simple" and service["Restart"] == "on-failure"
    assert parsed["Install"]["WantedBy"] == "multi-user.target"
    command = rendered.commands[unit]
    assert systemd_words(service["ExecStart"]) == command
    assert command[0].startswith(str(rendered.prefix)) and Path(command[0]).exists()
    name = unit.removesuffix(".service")
    log = rendered.prefix / "var/log/vtpm-trust" / f"{name}.log"
    assert service["StandardOutput"] == "append:" + str(log).replace("%", "%%")
    if unit == "vtpm-host.service":
        assert service["KillMode"] == "process", "bridges and swtpms must outlive a restart"
        assert command[1] == "daemon" and "--config" in command
    else:
        env = systemd_words(service["Environment"])
        assert env == [f"PGPASSFILE={rendered.prefix}/var/lib/vtpm-registrar/pgpass"]

    analyze = shutil.which("systemd-analyze")
    assert analyze is not None, "systemd-analyze missing: run `make test`, it installs systemd"
    proc = subprocess.run(
        [analyze, "verify", str(path)], capture_output=True, text=True, timeout=120
    )
    complaints = [line for line in (proc.stdout + proc.stderr).splitlines() if unit in line]
    assert proc.returncode == 0 and not complaints, proc.stdout + proc.stderr


def test_systemd_words_refuses_what_systemd_would_expand() -> None:
    words = systemd_words('"/a b/$x" c "x\\"y" "100%%" "$$HOME"')
    assert words == ["/a b/$x", "c", 'x"y', "100%", "$HOME"]
    with pytest.raises(AssertionError, match="unescaped %"):
        systemd_words('"100%h"')
    with pytest.raises(AssertionError, match="unterminated"):
        systemd_words('"open')
