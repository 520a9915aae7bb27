"""``vtpm-host store check`` and ``store prune``.

``check`` opens the trusted store the way the agent does, and reports.

Opening verifies everything the agent verifies at start (key unseals, head MAC, generation
against the TPM counter, every record row, the record set), so ``check`` either prints what the
store holds or fails with the very error the agent would refuse to start with (exit status 2,
``vtpm-host: error [store.rolled_back]: …``). It opens read-only: it runs beside the agent and
never touches the counter.

``prune`` drops old sealed records (:mod:`host_agent.lifecycle.retention`): through the running
daemon, which holds the store, or, with no daemon, by opening the store itself (the store's
writer lock refuses if another process holds it).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from sqlalchemy.engine import make_url

from host_agent._cli_common import TCTI_HELP, add_agent_args, build_config
from host_agent.config import AgentConfig
from host_agent.store.provision import open_store, store_settings

__all__ = ["register"]


def check(config: AgentConfig) -> dict[str, Any]:
    """Open the store with the host TPM, return a summary; raises the store's refusal."""
    from host_agent.tpm.discovery import open_host_tpm

    settings = store_settings(config)
    tpm = open_host_tpm(config.tpm)
    try:
        store = open_store(config, tpm, read_only=True)
        try:
            return {
                "url": make_url(settings.url).render_as_string(hide_password=True),
                "store_id": store.store_id.hex(),
                "generation": store.generation,
                "counter_index": f"{store.counter_index:#010x}",
                "counter": tpm.counter_read(store.counter_index),
                "increment_pending": store.increment_pending,
                "records": store.record_counts(),
            }
        finally:
            store.close()
    finally:
        tpm.close()


def prune(config: AgentConfig, request: dict[str, Any]) -> dict[str, Any]:
    """Run a prune request (see :func:`host_agent.lifecycle.retention.prune_request`) through
    the daemon, or on the store itself when no daemon answers on its control socket."""
    from host_agent.lifecycle.retention import prune_request
    from host_agent.service.daemon import DaemonError, control_client
    from host_agent.tpm.discovery import open_host_tpm

    try:
        return {**control_client(config).call("prune", **request), "via": "daemon"}
    except DaemonError as err:
        if not isinstance(err.__cause__, OSError | EOFError):
            raise
    tpm = open_host_tpm(config.tpm)
    try:
        store = open_store(config, tpm)
        try:
            uri = config.libvirt.uri_for(config.state_dir)
            return {**prune_request(store, uri, request), "via": "store"}
        finally:
            store.close()
    finally:
        tpm.close()


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def _cmd_prune(args: argparse.Namespace) -> int:
    request: dict[str, Any] = {
        "keep": args.keep,
        "dry_run": args.dry_run,
        "keep_images": [str(p.resolve()) for p in args.keep_image],
    }
    if args.vm:
        request["vm_uuid"] = args.vm
    result = prune(build_config(args), request)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    gone = result.get("would_delete" if args.dry_run else "deleted", [])
    verb = "would delete" if args.dry_run else "deleted"
    for rec in gone:
        print(f"{verb:<12} {rec['record_id']}")
    for rec in result["kept"]:
        print(f"{'kept':<12} {rec['record_id']}  ({'; '.join(rec['why'])})")
    for bad in result["unreadable"]:
        print(f"unreadable   {bad['file']}: {bad['error']} (its VM's records are all kept)")
    for rid in result["malformed"]:
        print(f"malformed    {rid} (left alone)")
    print(f"{len(gone)} record(s) {verb}, {len(result['kept'])} kept (via the {result['via']})")
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    summary = check(build_config(args))
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"store      {summary['url']}  (verified)")
    print(f"store_id   {summary['store_id']}")
    print(
        f"generation {summary['generation']}  (TPM counter {summary['counter_index']}: "
        f"{summary['counter']})"
    )
    if summary["increment_pending"]:
        print("pending    the last change awaits its counter increment (the agent finishes it)")
    for record_type, n in summary["records"].items():
        print(f"records    {record_type:<10} {n}")
    if not summary["records"]:
        print("records    none")
    return 0


def register(subparsers: Any) -> None:
    """Add ``store`` (with ``check`` and ``prune``) to the ``vtpm-host`` parser."""
    store = subparsers.add_parser("store", help="inspect the trusted store")
    ssub = store.add_subparsers(dest="store_command", metavar="SUBCOMMAND", required=True)
    chk = ssub.add_parser(
        "check",
        help="open and verify the store as the agent does at start; print what it holds",
        description=(
            "Unseal the store's data key with the host TPM, check the store head, compare its "
            "generation with the TPM rollback counter, authenticate every record and the record "
            "set. Prints the generation and the records per type, or fails with the error the "
            "agent would refuse to start with (a rolled-back or tampered database)."
        ),
    )
    add_agent_args(chk, tcti_help=TCTI_HELP, json_help="one JSON document")
    chk.set_defaults(func=_cmd_check)

    prn = ssub.add_parser(
        "prune",
        help="delete old sealed save records (keeps what a restore can still need)",
        description=(
            "Delete sealed records (and their memory leaves) of saves that no restore can still "
            "need. Per VM a record stays when it is one of the --keep newest, when a managed "
            "save image or an external snapshot's memory file that libvirt knows (or a file "
            "given with --keep-image) holds its vTPM state, or when a restore in flight uses "
            "it. Images saved with 'virsh save' to other paths are protected only by --keep and "
            "--keep-image. A state file that cannot be read keeps all records of its VM. Runs "
            "through the daemon when it is running (it also prunes a VM after each verified "
            "restore), else on the store directly. The deletion is one store transaction."
        ),
    )
    add_agent_args(prn, tcti_help=TCTI_HELP, json_help="one JSON document: deleted, kept, why")
    prn.add_argument(
        "--keep",
        type=_positive,
        default=3,
        metavar="N",
        help="newest records kept per VM, at least 1 (default: 3)",
    )
    prn.add_argument("--dry-run", action="store_true", help="say what would go; delete nothing")
    prn.add_argument("--vm", metavar="UUID", help="prune only this VM's records")
    prn.add_argument(
        "--keep-image",
        type=Path,
        action="append",
        default=[],
        metavar="FILE",
        help="also keep the record this save image or memory file needs (repeatable)",
    )
    prn.add_argument(
        "--uri",
        metavar="URI",
        help="libvirt URI whose managed saves and snapshots to scan when no daemon runs "
        "(the daemon scans its own)",
    )
    prn.set_defaults(func=_cmd_prune)
