"""``vtpm-host image verify`` and ``vtpm-host vm adopt-state`` (sealed save, verified restore).

- ``vtpm-host image verify FILE [--json]``: offline check of a save image / snapshot memory file
  against its sealed record (:func:`host_agent.lifecycle.image_verify.verify_image`). Opens the
  store read-only (the daemon may hold it for writing). Exit status 0 on ``match``, 1 otherwise.
- ``vtpm-host vm adopt-state DOMAIN FILE``: the operator's explicit path for a state made
  without the agent: the daemon seals a record for FILE's memory and vTPM state as VM DOMAIN
  (a UUID, or a name the daemon knows). A later restore of FILE then verifies like any other.

Saves and restores themselves need no command: whatever starts them (QMP ``migrate``, ``virsh
save``/``restore``, managedsave, snapshots) goes through the VM's bridge, whose hooks the daemon
answers (:mod:`host_agent.lifecycle.seal`, :mod:`host_agent.lifecycle.restore`).
"""

from __future__ import annotations

import argparse
import json
import os
import uuid as uuid_mod
from pathlib import Path
from typing import Any

from host_agent.config import AgentConfig, load_config, with_state_dir

__all__ = ["register"]


def _vm_subparsers(subparsers: Any) -> Any:
    vm = subparsers.choices.get("vm")
    if vm is None:
        vm = subparsers.add_parser("vm", help="per-VM operations")
        return vm.add_subparsers(dest="vm_command", metavar="VM_COMMAND", required=True)
    for action in vm._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action
    return vm.add_subparsers(dest="vm_command", metavar="VM_COMMAND", required=True)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--config", type=Path, metavar="FILE", help="agent configuration (TOML)")
    p.add_argument("--state-dir", type=Path, metavar="DIR", help="agent state directory")


def register(subparsers: Any) -> None:
    image = subparsers.add_parser("image", help="offline checks of save images and snapshots")
    isub = image.add_subparsers(dest="image_command", metavar="IMAGE_COMMAND", required=True)
    p = isub.add_parser("verify", help="check a save image against its sealed record")
    p.add_argument("file", type=Path, metavar="FILE")
    p.add_argument("--workers", type=int, help="hashing threads")
    _common(p)
    p.set_defaults(func=_cmd_verify)

    sub = _vm_subparsers(subparsers)
    p = sub.add_parser(
        "adopt-state",
        help="seal a record for a save image made without the agent (operator decision)",
    )
    p.add_argument("domain", metavar="DOMAIN", help="VM UUID (or a name the daemon knows)")
    p.add_argument("file", type=Path, metavar="FILE")
    p.add_argument("--name", default="", help="the VM's name, recorded with the state")
    _common(p)
    p.set_defaults(func=_cmd_adopt_state)


def _config(args: argparse.Namespace) -> AgentConfig:
    config = load_config(args.config, os.environ)
    if args.state_dir is not None:
        config = with_state_dir(config, args.state_dir.resolve())
    return config


def _cmd_verify(args: argparse.Namespace) -> int:
    from host_agent.lifecycle.image_verify import verify_image
    from host_agent.service.daemon import default_host_id
    from host_agent.store.provision import open_store
    from host_agent.tpm.discovery import open_host_tpm

    config = _config(args)
    tpm = open_host_tpm(config.tpm)
    try:
        with open_store(config, tpm, read_only=True) as store:
            verdict = verify_image(
                store, args.file, host_id=default_host_id(config), workers=args.workers
            )
    finally:
        tpm.close()
    if args.json:
        print(json.dumps(verdict.as_json(), sort_keys=True))
    else:
        print(f"{args.file}: {verdict.verdict} (record {verdict.record}): {verdict.reason}")
    return 0 if verdict.verdict == "match" else 1


def _cmd_adopt_state(args: argparse.Namespace) -> int:
    from host_agent.service.daemon import DaemonError, control_client

    client = control_client(_config(args))
    vm_uuid = args.domain
    name = args.name
    try:
        vm_uuid = str(uuid_mod.UUID(args.domain))
    except ValueError:
        vms = [v for v in client.call("status")["vms"] if v["name"] == args.domain]
        if len(vms) != 1:
            raise DaemonError(f"the daemon knows no single VM named {args.domain!r}") from None
        vm_uuid, name = vms[0]["uuid"], name or args.domain
    value = client.call("adopt_state", vm_uuid=vm_uuid, vm_name=name, file=str(args.file.resolve()))
    if args.json:
        print(json.dumps({"vm_uuid": vm_uuid, **value}, sort_keys=True))
    else:
        print(f"adopted the state in {args.file} for VM {vm_uuid} as record {value['record']}")
    return 0
