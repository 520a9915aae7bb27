"""``vtpm-host vm pcrs DOMAIN [--json]``: a running VM's vPCRs, read through its bridge.

DOMAIN is a VM UUID or name, resolved through the bridges registered under the runtime
directory (``--runtime-dir``, default :data:`DEFAULT_RUNTIME_DIR`). The libvirt adapter will add
resolution through libvirt in a later issue.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from host_agent.vtpm.bridge_link import LinkClient, find_bridge

__all__ = ["DEFAULT_RUNTIME_DIR", "register"]

DEFAULT_RUNTIME_DIR = Path("/run/vtpm-trust/bridges")


def register(subparsers: Any) -> None:
    vm = subparsers.add_parser("vm", help="per-VM vTPM operations")
    sub = vm.add_subparsers(dest="vm_command", metavar="VM_COMMAND", required=True)
    pcrs = sub.add_parser("pcrs", help="read a running VM's vPCRs through its bridge")
    pcrs.add_argument("domain", metavar="DOMAIN", help="VM UUID or name")
    pcrs.add_argument("--json", action="store_true", help="machine-readable output")
    pcrs.add_argument("--bank", default="sha256", choices=("sha1", "sha256", "sha384"))
    pcrs.add_argument(
        "--runtime-dir",
        type=Path,
        default=DEFAULT_RUNTIME_DIR,
        help=f"where bridges register themselves (default {DEFAULT_RUNTIME_DIR})",
    )
    pcrs.add_argument("--timeout", type=float, default=30.0)
    pcrs.set_defaults(func=_pcrs)


def _pcrs(args: argparse.Namespace) -> int:
    record = find_bridge(args.runtime_dir, args.domain)
    with LinkClient(Path(record.query_socket), timeout=args.timeout + 5) as client:
        value = client.call("read_pcrs", bank=args.bank, timeout=args.timeout)
    pcrs = {str(i): value["pcrs"][str(i)] for i in sorted(map(int, value["pcrs"]))}
    if args.json:
        print(json.dumps({"bank": value["bank"], "pcrs": pcrs}))
        return 0
    name = f" ({record.vm_name})" if record.vm_name else ""
    print(f"VM {record.vm_uuid}{name}, bank {value['bank']}:")
    for index, digest in pcrs.items():
        print(f"  PCR {int(index):2d}: {digest}")
    return 0
