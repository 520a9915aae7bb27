"""``vtpm-host vm migrate`` and ``vtpm-host migration serve|journal``.

``vm migrate DOMAIN --to HOST [--address HOST:PORT] [--libvirt-uri URI] [--json]`` asks this
host's migration service (the daemon's component, or ``migration serve``) over
``<state>/run/migration.sock`` to move DOMAIN's vAIK to HOST; with ``--libvirt-uri`` (the
target's libvirtd) libvirt live-migrates the running VM within the protocol (the daemon's
component only). DOMAIN is the VM's UUID or the name it was adopted under.
Exit status 0 when committed, 2 with ``vtpm-host: error [id]`` when refused or aborted.

``hook qemu`` / ``hook script``: libvirt's qemu hook, a plain ``virsh migrate`` of a protected
VM (:mod:`.hook`).

``migration serve --listen HOST:PORT [--approvals FILE]`` runs the service standalone in the
foreground, holding the TPM and the store (use it where no daemon runs; tests do). It prints one
JSON line ``{"listen": "HOST:PORT", "pid": N}`` once it accepts connections, and stops on
SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

from host_agent._cli_common import add_agent_args, build_config, vm_subparsers
from host_agent.config import AgentConfig

from .channel import TlsIdentity, parse_address
from .journal import Journal
from .service import (
    DEFAULT_PORT,
    MigrationService,
    RemoteMigrationError,
    control_call,
    load_approvals,
)

__all__ = ["register", "run_service"]


def _common(p: argparse.ArgumentParser) -> None:
    add_agent_args(p, state_dir_help="agent state directory")


def register(subparsers: Any) -> None:
    p = vm_subparsers(subparsers).add_parser(
        "migrate",
        help="move a VM's vAIK to another admitted host (migration protocol)",
        description=(
            "Run the migration protocol with HOST: it proves with its TPM that it is an "
            "admitted host in an approved state, gets the vAIK duplicated to its ExgKey, and "
            "activates it when this host commits; this host then deletes its copy."
        ),
    )
    p.add_argument("domain", metavar="DOMAIN", help="the VM's UUID or adopted name")
    p.add_argument("--to", required=True, metavar="HOST", help="the target's host id")
    p.add_argument(
        "--address",
        metavar="HOST:PORT",
        help=f"the target's migration listener (default HOST:{DEFAULT_PORT})",
    )
    p.add_argument(
        "--libvirt-uri",
        metavar="URI",
        help=(
            "the target's libvirt (e.g. qemu+tcp://HOST/system): libvirt live-migrates the "
            "running VM within the protocol, and the target checks its memory and vTPM state "
            "before it runs; without it only the vAIK and its binding move"
        ),
    )
    p.add_argument(
        "--migrate-uri",
        metavar="URI",
        help="where the target QEMU takes the migration stream (default tcp://<address host>)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON document")
    _common(p)
    p.set_defaults(func=_cmd_migrate)

    m = subparsers.add_parser("migration", help="the host-to-host migration service")
    msub = m.add_subparsers(dest="migration_command", metavar="COMMAND", required=True)
    s = msub.add_parser("serve", help="run the migration service in the foreground")
    s.add_argument("--listen", default=f"0.0.0.0:{DEFAULT_PORT}", metavar="HOST:PORT")
    s.add_argument("--advertise", metavar="HOST:PORT", help="address peers reach us at")
    s.add_argument("--approvals", type=Path, metavar="FILE", help="fleet policy approvals")
    s.add_argument("--resolve-interval", type=float, default=2.0, metavar="SECONDS")
    s.add_argument("--log-level", default="INFO")
    _common(s)
    s.set_defaults(func=_cmd_serve)
    j = msub.add_parser(
        "journal",
        help="print this host's migration journal (JSON), asked of the running service",
        description=(
            'Print the migration journal ({"entries": [...]}) of the service running on this '
            "host; with --vm also the VM's vAIK state here (active, moving, pending, absent)."
        ),
    )
    j.add_argument("--vm", metavar="UUID", help="also print this VM's vAIK state")
    _common(j)
    j.set_defaults(func=_cmd_journal)

    from .hook import register as register_hook

    register_hook(subparsers)


def _socket(config: AgentConfig) -> Path:
    return Path(config.state_dir) / "run" / "migration.sock"


def _resolve(config: AgentConfig, domain: str) -> uuid.UUID | None:
    """DOMAIN as a UUID, or the UUID of the adopted VM of that name (the VM registry)."""
    try:
        return uuid.UUID(domain)
    except ValueError:
        pass
    from host_agent.service.vm_registry import VmRegistry
    from host_agent.vtpm.cli import DEFAULT_RUNTIME_DIR

    registry = VmRegistry(Path(config.state_dir), DEFAULT_RUNTIME_DIR)
    registry.load()
    entry = registry.find(domain)
    return None if entry is None else uuid.UUID(entry.uuid)


def _cmd_migrate(args: argparse.Namespace) -> int:
    config = build_config(args)
    vm_uuid = _resolve(config, args.domain)
    if vm_uuid is None:
        print(
            f"vtpm-host: error [migration.unknown_vm]: no adopted VM is named {args.domain!r} "
            "(give its UUID, or adopt it first)",
            file=sys.stderr,
        )
        return 2
    address = args.address or f"{args.to}:{DEFAULT_PORT}"
    request: dict[str, Any] = {
        "op": "migrate",
        "vm_uuid": str(vm_uuid),
        "to": args.to,
        "address": address,
    }
    if args.libvirt_uri:
        host, _port = parse_address(address, DEFAULT_PORT)
        request["libvirt_dest"] = args.libvirt_uri
        request["migrate_uri"] = args.migrate_uri or (
            f"tcp://[{host}]" if ":" in host else f"tcp://{host}"
        )
    try:
        result = control_call(_socket(config), request)
    except RemoteMigrationError as err:  # print the service's own error id, not ours
        print(f"vtpm-host: error [{err.remote_id}]: {err.remote_message}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result, sort_keys=True))
    else:
        ack = "" if result.get("acknowledged") else " (the target will be told by recovery)"
        print(f"migrated the vAIK of VM {vm_uuid} to {args.to}: committed{ack}")
    return 0


def _cmd_journal(args: argparse.Namespace) -> int:
    request: dict[str, Any] = {"op": "journal"}
    if args.vm:
        request["vm_uuid"] = args.vm
    value = control_call(_socket(build_config(args)), request)
    print(json.dumps(value, sort_keys=True))
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=args.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    config = build_config(args)
    approvals = args.approvals or Path(config.state_dir) / "migration" / "policy-approvals.json"
    return run_service(
        config,
        listen=args.listen,
        advertise=args.advertise or "",
        approvals_path=approvals,
        resolve_interval=args.resolve_interval,
    )


def run_service(
    config: AgentConfig,
    *,
    listen: str,
    advertise: str,
    approvals_path: Path,
    resolve_interval: float = 2.0,
    journal: Callable[[Any], Journal] | None = None,
) -> int:
    """Open the TPM and the store, run :class:`MigrationService` until SIGTERM/SIGINT.

    Args:
        journal: builds the journal over the store (default :class:`StoreJournal`); tests pass a
            fault-injecting wrapper round it.
    """
    from host_agent.store.provision import open_store
    from host_agent.tpm.discovery import open_host_tpm

    from .host import MigrationHost, load_identity_certificates

    state_dir = Path(config.state_dir)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    tpm = open_host_tpm(config.tpm)
    try:
        store = open_store(config, tpm)
        try:
            fleet_ca, aik_cert = load_identity_certificates(state_dir)
            host = MigrationHost(
                tpm=tpm,
                store=store,
                identity=TlsIdentity.under(state_dir),
                host_id=TlsIdentity.under(state_dir).host_id(),
                fleet_ca=fleet_ca,
                aik_certificate=aik_cert,
                approvals=lambda: load_approvals(approvals_path),
                advertise=advertise,
                journal=None if journal is None else journal(store),
            )
            service = MigrationService(
                host,
                listen=parse_address(listen, DEFAULT_PORT),
                control_socket=_socket(config),
                resolve_interval=resolve_interval,
            ).start()
            try:
                bound_host, port = service.address
                banner = {"listen": f"{bound_host}:{port}", "pid": os.getpid()}
                print(json.dumps(banner), flush=True)
                stop.wait()
            finally:
                service.stop()
        finally:
            store.close()
    finally:
        tpm.close()
        for s, h in previous.items():
            signal.signal(s, h)
    return 0
