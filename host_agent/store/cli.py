"""``vtpm-host store check``: open the trusted store the way the agent does, and report.

Opening verifies everything the agent verifies at start (key unseals, head MAC, generation
against the TPM counter, every record row, the record set), so ``check`` either prints what the
store holds or fails with the very error the agent would refuse to start with (exit status 2,
``vtpm-host: error [store.rolled_back]: …``). It opens read-only: it runs beside the agent and
never touches the counter.
"""

from __future__ import annotations

import argparse
import json
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
    """Add ``store`` (with ``check``) to the ``vtpm-host`` parser."""
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
