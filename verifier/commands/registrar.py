"""``vtpm-verify registrar``: the fleet registrar (host admission and the fleet CA).

::

    vtpm-verify registrar init   --state-dir D (--ek-ca FILE | --swtpm-localca [DIR]) [--json]
    vtpm-verify registrar serve  --state-dir D --listen HOST:PORT [--json]
    vtpm-verify registrar hosts  --state-dir D [--json]
    vtpm-verify registrar ca     --state-dir D [--json]
    vtpm-verify registrar remove --state-dir D --host-id ID [--json]
    vtpm-verify registrar approve --state-dir D --pcr-policy HEX [--policy-ref TEXT] [--json]

``serve --json`` prints one line ``{"url": "https://HOST:PORT", "ca_sha256": HEX}`` once it
listens (``PORT`` 0 picks a free port), then serves until SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import secrets
import signal
import sys
import threading
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes

from evidence.verify import VAIK_POLICY_REF
from verifier._cli import emit_json, read_input
from verifier.registrar.state import (
    SWTPM_LOCALCA_DIR,
    RegistrarConfig,
    init_state,
    open_service,
    server_credentials,
    swtpm_localca_certificates,
)

__all__ = ["register"]


def _now() -> datetime:
    return datetime.now(UTC)


def _state_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--state-dir",
        required=True,
        type=Path,
        metavar="DIR",
        help="the registrar's state directory (keys, certificates, EK CA bundle, database)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON document")


def register(subparsers: Any) -> None:
    """Add ``registrar init|serve|hosts|ca|remove|approve`` to ``vtpm-verify``."""
    reg = subparsers.add_parser(
        "registrar",
        help="fleet registrar: admit hosts, issue AIK and mTLS certificates",
        description=(
            "The fleet registrar admits hosts: it checks their EK certificate against the EK CA "
            "bundle, proves with MakeCredential/ActivateCredential that their AIK lives in the "
            "same TPM, and issues an AIK certificate and an mTLS identity from the fleet CA."
        ),
    )
    sub = reg.add_subparsers(dest="registrar_command", metavar="ACTION", required=True)

    init = sub.add_parser(
        "init",
        help="create the fleet CA, policy key and HTTPS identity (idempotent)",
        description=(
            "Create what is missing in the state directory: fleet CA key and certificate, fleet "
            "policy key, the registrar's HTTPS key and certificate, the EK CA bundle and the "
            "database. Existing keys are never replaced; new EK CA certificates are merged into "
            "the bundle. Private keys are written with mode 0600."
        ),
    )
    _state_dir(init)
    init.add_argument(
        "--ek-ca",
        action="append",
        default=[],
        metavar="FILE",
        help="PEM file of EK CA certificates to trust (repeatable; root and intermediates)",
    )
    init.add_argument(
        "--swtpm-localca",
        nargs="?",
        const=str(SWTPM_LOCALCA_DIR),
        metavar="DIR",
        help=(
            "trust swtpm's local CA (the software root's EK issuer; DEVELOPMENT ONLY); "
            f"default directory {SWTPM_LOCALCA_DIR}"
        ),
    )
    init.add_argument(
        "--server-name",
        action="append",
        metavar="NAME",
        help="DNS name or IP the HTTPS certificate covers (repeatable; default localhost, "
        "127.0.0.1, ::1); giving a different set later re-issues the certificate",
    )
    init.add_argument("--fleet-name", help="the fleet CA's common name (new directories only)")
    init.add_argument(
        "--database-url",
        help="SQLAlchemy URL (e.g. postgresql+psycopg://…); default a SQLite file in DIR",
    )
    init.set_defaults(func=_init)

    serve = sub.add_parser(
        "serve",
        help="serve the HTTPS API",
        description=(
            "Serve the registrar's HTTPS API (/v1/ca, /v1/policy-key, /v1/policy-approvals, "
            "/v1/hosts/ID, /v1/registrations) with the certificate `init` issued. Stops on "
            "SIGINT/SIGTERM."
        ),
    )
    _state_dir(serve)
    serve.add_argument(
        "--listen", required=True, metavar="HOST:PORT", help="address to bind (port 0: any)"
    )
    serve.set_defaults(func=_serve)

    hosts = sub.add_parser(
        "hosts", help="list admitted hosts", description="List the hosts admitted so far."
    )
    _state_dir(hosts)
    hosts.set_defaults(func=_hosts)

    ca = sub.add_parser(
        "ca",
        help="print the fleet CA certificate and its fingerprint",
        description=(
            "Print the fleet CA certificate (PEM) and its SHA-256 fingerprint, which hosts pin "
            "when they first fetch it over HTTPS."
        ),
    )
    _state_dir(ca)
    ca.set_defaults(func=_ca)

    remove = sub.add_parser(
        "remove",
        help="forget an admitted host",
        description=(
            "Forget an admitted host, so that it can be admitted again (e.g. with a new TPM). Its "
            "AIK and mTLS certificates are not revoked: they stay valid until they expire."
        ),
    )
    _state_dir(remove)
    remove.add_argument("--host-id", required=True, help="the host to forget")
    remove.set_defaults(func=_remove)

    approve = sub.add_parser(
        "approve",
        help="approve a host platform policy (PolicyAuthorize)",
        description=(
            "Sign, with the fleet policy key, an approval of a host PCR0-8 policy digest; vAIKs "
            "can sign only on host platform states approved this way. The approval is recorded "
            "and served to hosts at GET /v1/policy-approvals."
        ),
    )
    _state_dir(approve)
    approve.add_argument("--pcr-policy", required=True, metavar="HEX", help="32-byte digest")
    approve.add_argument(
        "--policy-ref",
        default=VAIK_POLICY_REF.decode(),
        metavar="TEXT",
        help=(
            "policyRef bound in the vAIK policy (default: %(default)s, the one every vAIK's "
            "sign policy names; an approval under another policyRef authorises no vAIK)"
        ),
    )
    approve.set_defaults(func=_approve)


def _init(args: argparse.Namespace) -> int:
    pems = [read_input(path) for path in args.ek_ca]
    if args.swtpm_localca is not None:
        pems += swtpm_localca_certificates(Path(args.swtpm_localca))
    defaults = RegistrarConfig()
    config = RegistrarConfig(
        fleet_name=args.fleet_name or defaults.fleet_name,
        database_url=args.database_url or "",
        server_names=tuple(args.server_name or defaults.server_names),
    )
    report = init_state(
        args.state_dir,
        ek_ca_pems=pems,
        config=config,
        server_names=tuple(args.server_name) if args.server_name else None,
        now=_now(),
        random_bytes=secrets.token_bytes,
    )
    fingerprint = report.ca_certificate.fingerprint(hashes.SHA256()).hex()
    if args.json:
        emit_json(
            {
                "state_dir": str(report.state_dir),
                "created": list(report.created),
                "ek_ca_subjects": list(report.ek_ca_subjects),
                "ca_sha256": fingerprint,
            }
        )
    else:
        print(f"registrar state: {report.state_dir}")
        print(f"created: {', '.join(report.created) or 'nothing (already initialised)'}")
        print(f"EK CAs trusted: {'; '.join(report.ek_ca_subjects)}")
        print(f"fleet CA sha256: {fingerprint}")
    if args.swtpm_localca is not None:
        print(
            "warning: trusting swtpm-localca: EK certificates from software TPMs will be "
            "accepted; for development only",
            file=sys.stderr,
        )
    return 0


def _usage(message: str) -> int:
    print(f"vtpm-verify registrar: error: {message}", file=sys.stderr)
    return 2


def _split_listen(text: str) -> tuple[str, int] | None:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not host or int(port) > 65535:
        return None
    return host.strip("[]"), int(port)


def _covers(cert: x509.Certificate, host: str) -> bool:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    try:
        return ipaddress.ip_address(host) in san.get_values_for_type(x509.IPAddress)
    except ValueError:
        return host in san.get_values_for_type(x509.DNSName)


def _serve(args: argparse.Namespace) -> int:
    from verifier.registrar.server import make_server

    listen = _split_listen(args.listen)
    if listen is None:
        return _usage(f"--listen: expected HOST:PORT, got {args.listen!r}")
    host, port = listen
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    service, store = open_service(args.state_dir, clock=_now, random_bytes=secrets.token_bytes)
    certfile, keyfile = server_credentials(args.state_dir)
    cert = x509.load_pem_x509_certificate(certfile.read_bytes())
    if host not in ("0.0.0.0", "::") and not _covers(cert, host):
        print(
            f"warning: the HTTPS certificate does not name {host}; clients will refuse it "
            "(re-issue it with `registrar init --server-name NAME`)",
            file=sys.stderr,
        )
    server = make_server(service, host, port, certfile=certfile, keyfile=keyfile)
    bound_host, bound_port = server.server_address[:2]
    host_text = bound_host.decode() if isinstance(bound_host, bytes) else str(bound_host)
    url_host = f"[{host_text}]" if ":" in host_text else host_text
    url = f"https://{url_host}:{bound_port}"
    ca = x509.load_pem_x509_certificate(service.ca_certificate())
    fingerprint = ca.fingerprint(hashes.SHA256()).hex()
    if args.json:
        print(f'{{"url": "{url}", "ca_sha256": "{fingerprint}"}}', flush=True)
    else:
        print(f"registrar listening on {url} (fleet CA sha256 {fingerprint})", flush=True)

    def stop(signum: int, frame: FrameType | None) -> None:
        del signum, frame
        threading.Thread(target=server.shutdown, daemon=True).start()

    previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.serve_forever()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        server.server_close()
        store.close()
    return 0


def _hosts(args: argparse.Namespace) -> int:
    service, store = open_service(args.state_dir, clock=_now, random_bytes=secrets.token_bytes)
    try:
        hosts = service.hosts()
    finally:
        store.close()
    if args.json:
        emit_json({"hosts": [h.to_json() for h in hosts]})
    else:
        for h in hosts:
            print(f"{h.host_id}\t{h.ek_kind} EK\tAIK {h.aik_name}\tadmitted {h.admitted_at}")
        if not hosts:
            print("no hosts admitted")
    return 0


def _remove(args: argparse.Namespace) -> int:
    service, store = open_service(args.state_dir, clock=_now, random_bytes=secrets.token_bytes)
    try:
        removed = service.remove_host(args.host_id)
    finally:
        store.close()
    if args.json:
        emit_json({"host_id": args.host_id, "removed": removed})
    else:
        print(f"{args.host_id}: {'removed' if removed else 'not admitted'}")
    return 0 if removed else 1


def _ca(args: argparse.Namespace) -> int:
    service, store = open_service(args.state_dir, clock=_now, random_bytes=secrets.token_bytes)
    store.close()
    pem = service.ca_certificate()
    cert = x509.load_pem_x509_certificate(pem)
    fingerprint = cert.fingerprint(hashes.SHA256()).hex()
    if args.json:
        emit_json(
            {
                "ca_certificate": pem.decode(),
                "ca_sha256": fingerprint,
                "subject": cert.subject.rfc4514_string(),
                "policy_key": service.policy_key(),
            }
        )
    else:
        sys.stdout.write(pem.decode())
        print(f"sha256: {fingerprint}", file=sys.stderr)
    return 0


def _approve(args: argparse.Namespace) -> int:
    try:
        digest = bytes.fromhex(args.pcr_policy)
    except ValueError:
        digest = b""
    if len(digest) != 32:
        return _usage(f"--pcr-policy: expected 64 hex digits, got {args.pcr_policy!r}")
    if len(args.policy_ref.encode()) > 32:
        return _usage(
            f"--policy-ref: expected at most 32 bytes, got {len(args.policy_ref.encode())}"
        )
    service, store = open_service(args.state_dir, clock=_now, random_bytes=secrets.token_bytes)
    store.close()
    approval = service.approve_platform_policy(digest, args.policy_ref.encode())
    out = {
        "approved_policy": approval.approved_policy.hex(),
        "policy_ref": approval.policy_ref.hex(),
        "signature": approval.signature.hex(),
        "policy_key_name": service.policy_key()["name"],
    }
    if args.json:
        emit_json(out)
    else:
        for key, value in out.items():
            print(f"{key}: {value}")
    return 0
