"""libvirt's ``qemu`` hook on the target: a plain ``virsh migrate`` of a protected VM runs the
vAIK key-move protocol.

libvirt runs ``/etc/libvirt/hooks/qemu DOMAIN OP SUBOP EXTRA`` for every domain operation. On
the *destination* of a migration it runs ``DOMAIN migrate begin -`` with the domain XML on
stdin, synchronously, before the incoming QEMU starts: a non-zero exit fails the migration and
libvirt reports the hook's stderr; stdout, if not empty, would *replace* the domain XML, so
nothing is ever printed there.

The script (:func:`hook_script`, installed by the ansible role and the e2e tests) passes only
``migrate`` to ``vtpm-host hook qemu``; everything else exits 0 at once, and the hook never calls
libvirt (libvirtd waits for it: a call back could deadlock). ``hook qemu`` reads the XML
(:func:`parse_hook_domain`): a VM without the agent's adoption metadata is not ours and passes
untouched (exit 0, no daemon asked); for an adopted one it asks this host's migration service
(``<state>/run/migration.sock``, op ``expect``) to get ready. The service returns at once when a
``vtpm-host vm migrate`` armed it already; otherwise it *pulls* the VM from the peer that holds
its vAIK (``peers`` in the component's settings.json): that source runs every check of a push
(AIK chain to the fleet CA, ExgKey attributes and approved policy, nonce) before anything leaves,
and the hook returns once the VM is armed here and its vAIK imported as pending. Any refusal
(daemon down, no peer holds the VM, the source's checks) exits 2 with the reason on stderr;
libvirt then fails the migration and the VM keeps running on the source with its vAIK.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TextIO

from evidence.errors import VtpmError

from .errors import MigrationError

__all__ = ["HookDomain", "HookXmlError", "hook_script", "parse_hook_domain", "run_qemu_hook"]

MAX_XML = 4 << 20
"""The largest domain XML the hook reads (a domain definition is a few KiB)."""


class HookXmlError(MigrationError):
    """The XML libvirt gave the hook is not a domain definition the agent can read."""

    id: ClassVar[str] = "migration.hook.xml"


@dataclass(frozen=True)
class HookDomain:
    """What the hook needs of a migrating domain.

    Attributes:
        name, uuid: the domain.
        protected: it carries the agent's adoption metadata (its vTPM is the agent's).
        tpm_socket: its external TPM backend's socket (the bridge), if any.
    """

    name: str
    uuid: uuid.UUID
    protected: bool
    tpm_socket: str | None


def parse_hook_domain(xml: str) -> HookDomain:
    """The domain libvirt is migrating here.

    Raises:
        HookXmlError: not well-formed XML, not a ``<domain>``, or no valid ``<uuid>`` (each
            names what was expected and what arrived).
    """
    from host_agent.lifecycle.domain_xml import DomainXmlError, describe_domain_xml

    if not xml.strip():
        raise HookXmlError("the hook expected the domain XML on stdin, got nothing")
    if len(xml) > MAX_XML:
        raise HookXmlError(f"the hook expected at most {MAX_XML} bytes of XML, got {len(xml)}")
    try:
        described = describe_domain_xml(xml)
    except DomainXmlError as err:
        raise HookXmlError(f"the hook expected a libvirt domain definition: {err}") from err
    raw = described.uuid
    try:
        vm_uuid = uuid.UUID(raw or "")
    except ValueError:
        raise HookXmlError(f"the hook expected a <uuid> in the domain XML, got {raw!r}") from None
    return HookDomain(described.name, vm_uuid, described.adopted, described.external_tpm_path)


def hook_script(command: Sequence[str]) -> str:
    """``/etc/libvirt/hooks/qemu``: ``command`` (``… vtpm-host hook qemu`` plus options such as
    ``--config``) runs for ``migrate`` only; every other operation exits 0 at once."""
    run = " ".join(shlex.quote(c) for c in command)
    return f"""#!/bin/sh
# libvirt qemu hook of vtpm-trust (host_agent/migration/hook.py). libvirt runs it for every
# domain operation; only "DOMAIN migrate begin -" (this host is a migration's destination) goes
# to the agent, which gets a protected VM's vAIK moved here or fails the migration with the
# reason on stderr. Never call libvirt from here: libvirtd waits for this script.
[ "$2" = migrate ] || exit 0
exec {run} "$@"
"""


def run_qemu_hook(
    args: Sequence[str], stdin: TextIO, socket_path: Path, *, timeout: float = 300.0
) -> dict[str, Any]:
    """``hook qemu DOMAIN OP SUBOP EXTRA``: what happened (see the module docstring).

    Raises:
        HookXmlError: a ``migrate`` with XML the agent cannot read (nothing was asked).
        MigrationError: the service is not running, or refused the VM (its reason).
    """
    domain = args[0] if args else ""
    op = args[1] if len(args) > 1 else ""
    sub = args[2] if len(args) > 2 else ""
    if op != "migrate" or sub != "begin":
        return {"domain": domain, "op": op, "action": "ignored"}
    described = parse_hook_domain(stdin.read(MAX_XML + 1))
    if not described.protected:
        return {"domain": domain, "vm_uuid": str(described.uuid), "action": "not-protected"}
    from .service import RemoteMigrationError, control_call

    request = {"op": "expect", "vm_uuid": str(described.uuid), "tpm_socket": described.tpm_socket}
    try:
        value = control_call(socket_path, request, timeout)
    except RemoteMigrationError:
        raise
    except MigrationError as err:
        raise MigrationError(
            f"protected VM {described.name} ({described.uuid}) cannot arrive: this host's "
            f"vtpm-trust migration service does not answer ({err})"
        ) from err
    return {"domain": domain, "vm_uuid": str(described.uuid), "action": "armed", **value}


# ------------------------------------------------------------------------------ CLI


def register(subparsers: Any) -> None:
    from host_agent._cli_common import add_agent_args

    h = subparsers.add_parser(
        "hook",
        help="libvirt hook entry points (plain virsh migrate of a protected VM)",
        description="Entry points libvirt's hook scripts run; see `hook qemu` and `hook script`.",
    )
    hsub = h.add_subparsers(dest="hook_command", metavar="HOOK", required=True)
    q = hsub.add_parser(
        "qemu",
        help="libvirt's qemu hook: get a protected VM migrating here (runs the vAIK move)",
        description=(
            "Run by /etc/libvirt/hooks/qemu with libvirt's arguments (DOMAIN OP SUBOP EXTRA) and "
            "the domain XML on stdin. For 'migrate begin' of a VM the agent adopted, asks this "
            "host's migration service to get it ready: the source that holds its vAIK (one of "
            "the configured peers) runs the key-move protocol with this host, and the hook "
            "returns once the VM is armed and its vAIK imported here. Any other operation or "
            "VM exits 0 at once. Exit 2 with the reason on stderr fails the migration (libvirt "
            "reports it). Nothing is printed on stdout (libvirt would take it as the new XML); "
            "--json writes its one JSON document on stderr."
        ),
    )
    q.add_argument("hook_args", nargs="*", metavar="ARG", help="DOMAIN OP SUBOP EXTRA")
    q.add_argument("--json", action="store_true", help="one JSON document, on stderr")
    add_agent_args(q, state_dir_help="agent state directory (its run/migration.sock)")
    q.set_defaults(func=_cmd_qemu)
    s = hsub.add_parser(
        "script",
        help="print the /etc/libvirt/hooks/qemu script that runs `hook qemu`",
        description=(
            "Print the shell script to install as /etc/libvirt/hooks/qemu (mode 0755; libvirtd "
            "reads its hooks when it starts). It runs this Python's `vtpm-host hook qemu` with "
            "the given --config/--state-dir for migrations only."
        ),
    )
    s.add_argument("--json", action="store_true", help='print {"script": TEXT}')
    add_agent_args(s, state_dir_help="agent state directory the hook passes on")
    s.set_defaults(func=_cmd_script)


def _forwarded(args: argparse.Namespace) -> list[str]:
    out = []
    if args.config is not None:
        out += ["--config", str(Path(args.config).resolve())]
    if args.state_dir is not None:
        out += ["--state-dir", str(Path(args.state_dir).resolve())]
    return out


def _cmd_script(args: argparse.Namespace) -> int:
    script = hook_script(
        [sys.executable, "-m", "host_agent.cli", "hook", "qemu", *_forwarded(args), "--"]
    )
    if args.json:
        print(json.dumps({"script": script}))
    else:
        sys.stdout.write(script)
    return 0


def _cmd_qemu(args: argparse.Namespace) -> int:
    from host_agent._cli_common import build_config

    try:
        config = build_config(args)
        socket_path = Path(config.state_dir) / "run" / "migration.sock"
        result = run_qemu_hook(args.hook_args, sys.stdin, socket_path)
    except VtpmError as err:
        remote = getattr(err, "remote_id", None)
        eid = remote or err.id
        message = getattr(err, "remote_message", None) or str(err)
        if args.json:
            print(json.dumps({"ok": False, "error_id": eid, "message": message}), file=sys.stderr)
        else:
            print(f"vtpm-trust: [{eid}] {message}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"ok": True, **result}, sort_keys=True), file=sys.stderr)
    return 0
