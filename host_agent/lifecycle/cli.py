"""``vtpm-host vm adopt|create|list|start|stop``: adopted VMs on libvirt.

The libvirt URI comes from the configuration (``libvirt.uri``, ``VTPM_LIBVIRT_URI``, or
``--uri``); absent, libvirt's embedded QEMU driver rooted at ``<state_dir>/libvirt``, whose root is
prepared on the way (qemu.conf, the ``libvirt-qemu`` user). The embedded root is locked by the
process that opens it: while the daemon runs, these commands get a clear "root busy" error.

Each command builds the configuration once, opens the hypervisor and, only when a swtpm must
start (adopt, create, start), the host TPM that seals the VM's state key.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import uuid as uuid_mod
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._cli_common import add_agent_args, build_config, vm_subparsers
from ..config import AgentConfig
from ..vtpm.cli import DEFAULT_RUNTIME_DIR
from .embedded import embedded_root_of, prepare_embedded_root

if TYPE_CHECKING:  # libvirt is imported only when a command runs (see _manager)
    from .adoption import AdoptResult, VmManager

__all__ = ["add_libvirt_args", "register", "vm_manager"]


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="machine-readable output")
    add_agent_args(p)
    add_libvirt_args(
        p,
        uri_help="libvirt URI (default: libvirt.uri, else qemu:///embed?root=<state-dir>/libvirt)",
    )
    p.add_argument(
        "--daemon-sock",
        type=Path,
        help="the daemon's bridge-link socket (default <state-dir>/run/daemon.sock)",
    )


def add_libvirt_args(p: argparse.ArgumentParser, *, uri_help: str) -> None:
    """``--uri``, ``--tcti`` (the host TPM that seals the VMs' state keys) and ``--runtime-dir``,
    for :func:`vm_manager`."""
    p.add_argument("--uri", metavar="URI", help=uri_help)
    p.add_argument("--tcti", metavar="TCTI", help="host TPM TCTI (seals the VMs' state keys)")
    p.add_argument(
        "--runtime-dir",
        type=Path,
        default=DEFAULT_RUNTIME_DIR,
        help=f"where bridges register themselves (default {DEFAULT_RUNTIME_DIR})",
    )


def register(subparsers: Any) -> None:
    sub = vm_subparsers(subparsers)

    p = sub.add_parser(
        "adopt",
        help="rewrite a libvirt domain for the agent (memfd RAM, external vTPM, channel, ACPI)",
        description=(
            "Rewrite DOMAIN's persistent definition: guest RAM becomes a shared memfd, the TPM "
            "the external backend on the VM's bridge socket, a virtio-serial channel carries "
            "attestation, ACPI is on. The VM gets its own swtpm (its libvirt-made vTPM state is "
            "carried over). Adopting twice changes nothing; a running domain keeps its old "
            "definition until its next start."
        ),
    )
    p.add_argument("domain", metavar="DOMAIN", help="domain name or UUID")
    _common(p)
    p.set_defaults(func=_cmd_adopt)

    p = sub.add_parser(
        "create",
        help="define a new adopted VM from a vm_images/ image",
        description="Define NAME booting the kernel and initramfs of a vm_images/ image.",
    )
    p.add_argument("name", metavar="NAME")
    p.add_argument(
        "--image",
        type=Path,
        required=True,
        metavar="DIR_OR_MANIFEST",
        help="an image directory (holding manifest.json) or its manifest",
    )
    p.add_argument("--memory", type=int, default=256, metavar="MiB", help="guest RAM (256)")
    p.add_argument("--uuid", help="the new domain's UUID (default: a random one)")
    p.add_argument("--cmdline-extra", default="", help="appended to the image's kernel cmdline")
    p.add_argument(
        "--qemu-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra QEMU argument (repeatable), e.g. a user-networking NIC with addr=0x10",
    )
    _common(p)
    p.set_defaults(func=_cmd_create)

    p = sub.add_parser("list", help="domains, their state, and whether they are adopted")
    _common(p)
    p.set_defaults(func=_cmd_list)

    p = sub.add_parser(
        "start",
        help="start an adopted VM: its swtpm, its bridge, then the domain",
    )
    p.add_argument("domain", metavar="DOMAIN", help="domain name or UUID")
    p.add_argument("--paused", action="store_true", help="start with the CPUs paused")
    _common(p)
    p.set_defaults(func=_cmd_start)

    p = sub.add_parser(
        "stop", help="stop a VM (destroy, or ACPI shutdown first) and its bridge and swtpm"
    )
    p.add_argument("domain", metavar="DOMAIN", help="domain name or UUID")
    p.add_argument(
        "--graceful",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="ask the guest to power off and wait up to SECONDS before destroying it",
    )
    _common(p)
    p.set_defaults(func=_cmd_stop)


# ---------------------------------------------------------------------------- plumbing


def _libvirt_log_to(path: Path) -> None:
    """Send the embedded driver's own log lines (version banner, "security driver none",
    "tainted: high-privileges" …) to ``path`` instead of this command's stderr.

    libvirt reads ``LIBVIRT_LOG_OUTPUTS`` once, when it is loaded: this runs before the first
    ``import libvirt`` of the process, and leaves an operator's own setting alone.
    """
    if "libvirt" not in sys.modules and "LIBVIRT_LOG_OUTPUTS" not in os.environ:
        os.environ["LIBVIRT_LOG_OUTPUTS"] = f"3:file:{path}"


@contextmanager
def vm_manager(
    config: AgentConfig,
    *,
    runtime_dir: Path,
    daemon_socket: Path | None = None,
    libvirt_log: bool = True,
) -> Iterator[VmManager]:
    """A :class:`~host_agent.lifecycle.adoption.VmManager` on ``config``'s libvirt connection.

    An embedded driver's root is prepared first (and, with ``libvirt_log``, the driver's own log
    goes to ``<root>/log/libvirt.log``). The host TPM is opened only if the manager seals a
    state key, and closed on the way out. ``daemon_socket`` defaults to the state directory's.
    """
    uri = config.libvirt.uri_for(config.state_dir)
    root = embedded_root_of(uri)
    if root is not None:
        prepare_embedded_root(root)
        if libvirt_log:
            _libvirt_log_to(root / "log" / "libvirt.log")
    from .adoption import VmManager, daemon_socket_of
    from .libvirt_adapter import Hypervisor

    tpms: list[Any] = []

    def sealer() -> Any:
        from ..tpm.discovery import open_host_tpm

        tpm = open_host_tpm(config.tpm)
        tpms.append(tpm)
        return tpm

    with Hypervisor(uri) as hv:
        try:
            yield VmManager(
                hypervisor=hv,
                state_dir=config.state_dir,
                sealer=sealer,
                runtime_dir=runtime_dir,
                daemon_socket=daemon_socket or daemon_socket_of(config.state_dir),
            )
        finally:
            for tpm in tpms:
                tpm.close()


def _manager(args: argparse.Namespace) -> AbstractContextManager[VmManager]:
    return vm_manager(
        build_config(args), runtime_dir=args.runtime_dir, daemon_socket=args.daemon_sock
    )


def _adopt_output(args: argparse.Namespace, result: AdoptResult, verb: str) -> None:
    rec = result.record
    if args.json:
        print(json.dumps({"changed": result.changed, **dataclasses.asdict(rec)}, sort_keys=True))
        return
    state = "rewritten" if result.changed else "already adopted, unchanged"
    print(f"{verb} {rec.name} ({rec.uuid}): definition {state}")
    print(f"  bridge socket  {rec.bridge_socket}")
    print(f"  channel        {rec.channel_socket} ({rec.channel_name})")
    print(f"  vTPM           {rec.tpm_model}, state {rec.vtpm_state}")


def _now() -> datetime:
    return datetime.now(UTC)


# ---------------------------------------------------------------------------- commands


def _cmd_adopt(args: argparse.Namespace) -> int:
    with _manager(args) as m:
        result = m.adopt(args.domain, now=_now())
    _adopt_output(args, result, "adopted")
    return 0


def _cmd_create(args: argparse.Namespace) -> int:
    from .adoption import load_image_spec

    image = load_image_spec(args.image)
    vm_uuid = str(uuid_mod.UUID(args.uuid)) if args.uuid else str(uuid_mod.uuid4())
    with _manager(args) as m:
        result = m.create(
            args.name,
            image,
            memory_mib=args.memory,
            now=_now(),
            vm_uuid=vm_uuid,
            cmdline_extra=args.cmdline_extra,
            qemu_args=args.qemu_arg,
        )
    _adopt_output(args, result, "created")
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    with _manager(args) as m:
        vms = m.list()
    if args.json:
        print(json.dumps([v.as_json() for v in vms], sort_keys=True))
        return 0
    if not vms:
        print("no domains")
        return 0
    width = max(len(v.name) for v in vms)
    for v in vms:
        adopted = "adopted" if v.adopted else "-"
        print(f"{v.name:<{width}}  {v.uuid}  {v.state:<13} {adopted}")
    return 0


def _cmd_start(args: argparse.Namespace) -> int:
    with _manager(args) as m:
        info = m.start(args.domain, paused=args.paused)
        record = m.record(info.uuid)
    out = {"name": info.name, "uuid": info.uuid, "state": info.state.value,
           "bridge_socket": record.bridge_socket if record else None}  # fmt: skip
    if args.json:
        print(json.dumps(out, sort_keys=True))
    else:
        print(f"started {info.name} ({info.uuid}): {info.state.value}")
    return 0


def _cmd_stop(args: argparse.Namespace) -> int:
    with _manager(args) as m:
        m.stop(args.domain, graceful_timeout=args.graceful)
        info = m.hypervisor.info(args.domain)
    if args.json:
        print(json.dumps({"name": info.name, "uuid": info.uuid, "state": info.state.value}))
    else:
        print(f"stopped {info.name} ({info.uuid}): {info.state.value}")
    return 0
