"""``vtpm-guest``: the in-guest agent (Python standard library only).

Exit codes:
    0  success (``quote`` printed the bundle on stdout)
    1  the host refused to attest (not enrolled, or the VM rebooted since the tenant last
       authenticated: enroll again)
    2  usage or local error (bad --nonce, unreadable measurement list)
    3  attestation channel unavailable (no port, no host answer before --timeout, bad frame)
One line on stderr explains any non-zero status.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from guest_agent.channel import DEFAULT_PORT_NAME, GuestAgentError, Port, find_port
from guest_agent.quote import (
    EVENT_LOG_PATH,
    IMA_LIST_PATH,
    build_bundle,
    parse_nonce,
    read_optional,
    request_quote,
)

__all__ = ["build_parser", "main"]

VERSION = "0.1.0"

_EPILOG = """\
exit status: 0 ok, 1 the host refused (enroll again after a reboot), 2 usage/local error,
3 attestation channel unavailable.

The tenant normally runs this over SSH: `vtpm-verify attest --ssh USER@HOST` sends a fresh
nonce and verifies the bundle this prints."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vtpm-guest",
        description=(
            "vtpm-trust guest agent: collects the firmware event log and the IMA measurement "
            "list and asks the host for a signed vPCR attestation over virtio-serial."
        ),
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"vtpm-guest {VERSION}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    quote = sub.add_parser(
        "quote",
        help="print an evidence bundle (vtpm-trust/evidence/1) answering NONCE",
        description=(
            "Ask the host, over the virtio-serial port, for the vAIK signature over this VM's "
            "vPCRs and NONCE plus the certificate chain; add the firmware event log and the IMA "
            "list; print the evidence bundle as one line of JSON."
        ),
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    quote.add_argument("--nonce", required=True, metavar="HEX", help="16..64 bytes, hex")
    quote.add_argument(
        "--port", default=DEFAULT_PORT_NAME, metavar="NAME", help="virtio-serial port name"
    )
    quote.add_argument("--device", metavar="PATH", help="port device path (skips the lookup)")
    quote.add_argument("--timeout", type=float, default=10.0, help="seconds (default 10)")
    quote.add_argument("--event-log", default=EVENT_LOG_PATH, metavar="PATH", help="TCG2 log")
    quote.add_argument("--ima-list", default=IMA_LIST_PATH, metavar="PATH", help="binary IMA list")
    return parser


def _quote(args: argparse.Namespace) -> int:
    nonce = parse_nonce(args.nonce)
    event_log = read_optional(args.event_log)
    port = Port(args.device or find_port(args.port))
    try:
        evidence = request_quote(port, nonce, timeout=args.timeout)
    finally:
        port.close()
    # The IMA list is read after the vPCRs were signed: entries appended meanwhile are a tail
    # the verifier tolerates; a list read before could lack entries the signed PCR 10 covers.
    ima_list = read_optional(args.ima_list)
    sys.stdout.write(build_bundle(evidence, nonce, event_log, ima_list) + "\n")
    sys.stdout.flush()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return _quote(args)
    except GuestAgentError as err:
        print(f"vtpm-guest: {err}", file=sys.stderr)
        return err.exit_code
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
