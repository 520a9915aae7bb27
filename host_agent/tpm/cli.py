"""``vtpm-host init`` and ``vtpm-host tpm info``.

Both build the configuration once (``--config``, the ``VTPM_*`` environment, ``--state-dir``,
``--tcti``) and pass its slices down.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from typing import Any

from .._cli_common import TCTI_HELP, add_agent_args, build_config
from .provision import InitReport, InitStep, init_host, tpm_info

__all__ = ["INIT_STEPS", "register"]

#: Extra ``init`` steps, ``"module:function"`` (see :data:`host_agent.tpm.provision.InitStep`),
#: run in order after the host keys exist. Admission: register with the registrar (embedded or
#: ``registrar.url``) and keep the AIK certificate and mTLS identity (host_agent/admission.py).
#: Store: create the trusted store (data key sealed to this TPM, rollback counter), or verify it.
INIT_STEPS: tuple[str, ...] = (
    "host_agent.admission:register_with_registrar",
    "host_agent.store.provision:ensure_store",
)

_DISCOVERY_HELP = (
    "TPM discovery: --tcti (or tpm.tcti / VTPM_TPM_TCTI) wins; else the first tpmrm device udev "
    "knows (/dev/tpmrm0); else an embedded swtpm 'software root' is provisioned (swtpm_setup, EK "
    "certificates from swtpm-localca) and run under <state-dir>/tpm/swtpm: DEVELOPMENT ONLY."
)


def _steps() -> list[InitStep]:
    steps: list[InitStep] = []
    for spec in INIT_STEPS:
        module, _, func = spec.partition(":")
        steps.append(getattr(importlib.import_module(module), func))
    return steps


def _cmd_init(args: argparse.Namespace) -> int:
    report = init_host(build_config(args), steps=_steps())
    if report.root == "software":
        print("WARNING: software root (embedded swtpm): for development only", file=sys.stderr)
    if args.json:
        print(json.dumps(_init_json(report), indent=2, sort_keys=True))
    else:
        _print_init(report)
    if not report.platform_state_approved:
        print(
            "WARNING: PCR0-8 no longer hold the values AuthKey is bound to: AuthKey is unusable "
            "(firmware or boot chain changed). Re-approve the platform and re-create AuthKey.",
            file=sys.stderr,
        )
        return 1
    return 0


def _print_init(report: InitReport) -> None:
    if report.changed:
        for key in report.keys.created:
            print(f"created {key}")
        for msg in report.steps:
            print(msg)
    else:
        print("nothing to do: SRK, AIK and AuthKey exist")
    print(f"aik_name {report.keys.aik_name.hex()}")
    print(f"authkey_name {report.keys.authkey_name.hex()}")
    locality = " + PolicyLocality(0)" if report.keys.authkey_locality else ""
    print(f"authkey_policy {report.keys.authkey_policy.hex()} (PolicyPCR sha256:0-8{locality})")


def _init_json(report: InitReport) -> dict[str, Any]:
    keys = report.keys
    return {
        "root": report.root,
        "tcti": report.tcti,
        "changed": report.changed,
        "created": list(keys.created),
        "steps": list(report.steps),
        "aik_name": keys.aik_name.hex(),
        "authkey_name": keys.authkey_name.hex(),
        "authkey_policy": keys.authkey_policy.hex(),
        "authkey_locality": keys.authkey_locality,
        "platform_state_approved": report.platform_state_approved,
    }


def _cmd_info(args: argparse.Namespace) -> int:
    info = tpm_info(build_config(args))
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    _print_info(info)
    return 0


def _print_info(info: dict[str, Any]) -> None:
    dev = "  (DEVELOPMENT ONLY)" if info["root"] == "software" else ""
    print(f"root           {info['root']}{dev}")
    print(f"tcti           {info['tcti']}")
    for c in info["ek_certificates"]:
        print(f"ek certificate {c['nv_index']}  subject {c['subject']}  issuer {c['issuer']}")
    if info["aik_name"] is None:
        print("host keys      missing: run `vtpm-host init`")
    else:
        print(f"aik_name       {info['aik_name']}")
        print(f"authkey_name   {info['authkey_name']}")
        print(f"authkey_policy {info['authkey_policy']}")
        state = "approved" if info["platform_state_approved"] else "NOT APPROVED (AuthKey unusable)"
        print(f"platform state {state}")
    for i, v in info["pcrs"]["sha256"].items():
        print(f"pcr sha256:{i:<2}  {v}")


def register(subparsers: Any) -> None:
    """Add ``init`` and ``tpm`` to the ``vtpm-host`` parser."""
    init = subparsers.add_parser(
        "init",
        help="admit this host: find the TPM, create SRK, AIK and AuthKey (idempotent)",
        description=(
            "Create whatever is missing: the software root if there is no TPM, the SRK "
            "(persistent 0x81000001), the AIK (restricted ECC P-256 signing key) and the "
            "AuthKey (usable only while PCR0-8 hold today's values), then the registration "
            "steps. A second run changes nothing and says 'nothing to do'. " + _DISCOVERY_HELP
        ),
    )
    add_agent_args(
        init,
        tcti_help=TCTI_HELP,
        json_help="one JSON document: root, tcti, changed, created, steps, key names, "
        "authkey_policy, platform_state_approved (exit 1 when it is false)",
    )
    init.set_defaults(func=_cmd_init)

    tpm = subparsers.add_parser(
        "tpm",
        help="inspect the host TPM",
        description="Inspect the host TPM. " + _DISCOVERY_HELP,
    )
    tsub = tpm.add_subparsers(dest="tpm_command", metavar="SUBCOMMAND", required=True)
    info = tsub.add_parser(
        "info",
        help="root, TCTI, EK certificates, host key names, AuthKey policy, PCR0-8",
        description=(
            "Print what the host TPM is (hardware or the development software root), its EK "
            "certificates, the AIK and AuthKey names, AuthKey's policy digest and PCR0-8 of "
            "the sha256 bank."
        ),
    )
    add_agent_args(info, tcti_help=TCTI_HELP, json_help="one JSON document")
    info.set_defaults(func=_cmd_info)
