"""``vtpm-host image verify`` and ``vtpm-host vm adopt-state`` (sealed save, verified restore).

- ``vtpm-host image verify FILE [--json]``: offline check of a save image / snapshot memory file
  against its sealed record (:func:`host_agent.lifecycle.image_verify.verify_image`). Opens the
  store read-only (the daemon may hold it for writing). Exit status 0 on ``match``, 1 otherwise.
- ``vtpm-host vm adopt-state DOMAIN FILE``: the operator's explicit path for a state made
  without the agent: the daemon seals a record for FILE's memory and vTPM state as VM DOMAIN
  (a UUID, or a name the daemon knows). A later restore of FILE then verifies like any other.

Saves and restores themselves need no command: whatever starts them (QMP ``migrate``, ``virsh
save``/``restore``, managedsave, snapshots) goes through the VM's bridge, whose hooks the daemon
answers (:mod:`host_agent.lifecycle.seal`, :mod:`host_agent.lifecycle.restore`). These commands
drive them on libvirt (each runs as its own process: the embedded driver's root is locked by
whoever opens it, so the daemon does not hold it):

- ``vtpm-host vm save DOMAIN FILE``: ask the daemon to start the background hashing pass (where
  dirty-page tracking works), then ``virDomainSaveFlags``; the daemon seals at the stop.
- ``vtpm-host vm restore FILE [--paused]``: arm the VM (its swtpm restarted for incoming state,
  a fresh bridge listening), then ``virDomainRestoreFlags``; a refusal is reported with the
  daemon's reason (differing pages …), and the VM's swtpm and bridge are stopped again.
- ``vtpm-host vm arm DOMAIN``: only the arming, so that a plain ``virsh restore`` (or managedsave
  start, or ``restoreFlags`` from any client) goes through the same verified path. The daemon
  arms a VM by itself after each sealed save; this is for the other cases (an image copied in,
  a restore refused earlier).
- ``vtpm-host vm revert DOMAIN SNAPSHOT``: libvirt 9.0 cannot revert external snapshots; stop the
  domain if it runs and restore from the snapshot's memory file through the same verified path.
  (Disks are not reverted: the snapshot's disk overlays stay as they are.)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import uuid as uuid_mod
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, ClassVar

from evidence.errors import VtpmError
from host_agent._cli_common import add_agent_args, build_config, vm_subparsers
from host_agent.config import AgentConfig
from host_agent.lifecycle.cli import add_libvirt_args, vm_manager

__all__ = ["register"]


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="machine-readable output")
    add_agent_args(p, state_dir_help="agent state directory")


class SnapshotNotFound(VtpmError):
    """No external memory file is known for that snapshot."""

    id: ClassVar[str] = "lifecycle.snapshot_not_found"


def _libvirt_args(p: argparse.ArgumentParser) -> None:
    add_libvirt_args(p, uri_help="libvirt URI (default: libvirt.uri, else embed)")


def register(subparsers: Any) -> None:
    image = subparsers.add_parser("image", help="offline checks of save images and snapshots")
    isub = image.add_subparsers(dest="image_command", metavar="IMAGE_COMMAND", required=True)
    p = isub.add_parser("verify", help="check a save image against its sealed record")
    p.add_argument("file", type=Path, metavar="FILE")
    p.add_argument("--workers", type=int, help="hashing threads")
    _common(p)
    p.set_defaults(func=_cmd_verify)

    sub = vm_subparsers(subparsers)
    p = sub.add_parser(
        "adopt-state",
        help="seal a record for a save image made without the agent (operator decision)",
    )
    p.add_argument("domain", metavar="DOMAIN", help="VM UUID (or a name the daemon knows)")
    p.add_argument("file", type=Path, metavar="FILE")
    p.add_argument("--name", default="", help="the VM's name, recorded with the state")
    _common(p)
    p.set_defaults(func=_cmd_adopt_state)

    p = sub.add_parser("save", help="save a running VM to FILE (sealed by the daemon)")
    p.add_argument("domain", metavar="DOMAIN")
    p.add_argument("file", type=Path, metavar="FILE")
    _common(p)
    _libvirt_args(p)
    p.set_defaults(func=_cmd_save)

    p = sub.add_parser("restore", help="restore a VM from FILE, verified against its record")
    p.add_argument("file", type=Path, metavar="FILE")
    p.add_argument("--paused", action="store_true", help="leave the restored VM paused")
    _common(p)
    _libvirt_args(p)
    p.set_defaults(func=_cmd_restore)

    p = sub.add_parser("arm", help="give a stopped VM its swtpm and bridge for a plain restore")
    p.add_argument("domain", metavar="DOMAIN")
    _common(p)
    _libvirt_args(p)
    p.set_defaults(func=_cmd_arm)

    p = sub.add_parser("revert", help="revert a VM to an external-memory snapshot (verified)")
    p.add_argument("domain", metavar="DOMAIN")
    p.add_argument("snapshot", metavar="SNAPSHOT")
    p.add_argument("--paused", action="store_true")
    _common(p)
    _libvirt_args(p)
    p.set_defaults(func=_cmd_revert)


def _manager(
    args: argparse.Namespace, config: AgentConfig
) -> contextlib.AbstractContextManager[Any]:
    """A :class:`~host_agent.lifecycle.adoption.VmManager` on this command's libvirt connection."""
    return vm_manager(config, runtime_dir=args.runtime_dir, libvirt_log=False)


def _arm(m: Any, ref: Any) -> None:
    """Arm the VM for an incoming QEMU (:func:`host_agent.lifecycle.restore.arm_vm`)."""
    from host_agent.lifecycle.restore import ArmSpec, RestoreRefused, arm_vm

    record = m.record(ref.uuid)
    if record is None:
        raise RestoreRefused(f"domain {ref.name} is not adopted: run `vtpm-host vm adopt` first")
    gid = None
    if m.hypervisor.embedded_root is None:  # system libvirtd: QEMU runs as libvirt-qemu
        import grp

        with contextlib.suppress(KeyError):
            gid = grp.getgrnam("libvirt-qemu").gr_gid
    spec = ArmSpec(
        vm_uuid=ref.uuid,
        vm_name=ref.name,
        vm_dir=m.layout(ref.uuid).vm_dir,
        bridge_socket=Path(record.bridge_socket),
        runtime_dir=m.runtime_dir,
        daemon_socket=m.daemon_socket,
        listen_gid=gid,
    )
    arm_vm(spec, m.swtpm(ref))


def _veto_of(config: AgentConfig, vm_uuid: str) -> tuple[int, str | None]:
    """(how many restores of the VM the daemon refused, the last reason)."""
    from host_agent.service.daemon import DaemonError, control_client

    try:
        value = control_client(config).call("last_veto", vm_uuid=vm_uuid)
    except DaemonError:
        return -1, None
    reason = value.get("reason")
    return int(value.get("count", 0)), str(reason) if reason else None


def _restore(args: argparse.Namespace, config: AgentConfig, m: Any, ref: Any, file: Path) -> Any:
    from host_agent.lifecycle.libvirt_adapter import HypervisorError
    from host_agent.lifecycle.restore import RestoreRefused

    before, _ = _veto_of(config, ref.uuid)
    _arm(m, ref)
    try:
        m.hypervisor.restore(file, paused=args.paused)
    except HypervisorError as err:
        m.cleanup(ref)
        count, reason = _veto_of(config, ref.uuid)
        if reason is None or count <= before:
            reason = "the daemon refused nothing (is it running?)"
        raise RestoreRefused(f"restore of {ref.name} from {file} refused: {reason}; {err}") from err
    return m.hypervisor.info(ref)


def _image_uuid(xml: str, file: Path) -> str:
    match = re.search(r"<uuid>\s*([0-9a-fA-F-]{32,36})\s*</uuid>", xml)
    if match is None:
        raise SnapshotNotFound(f"{file}: its domain XML names no <uuid>")
    return str(uuid_mod.UUID(match.group(1)))


def _snapshot_memory_file(m: Any, ref: Any, snapshot: str) -> Path:
    """The external memory file of ``snapshot``, from libvirt's snapshot metadata on disk.

    (The libvirt adapter has no snapshot-XML call yet; its metadata is read where libvirt keeps
    it: ``<root>/lib/qemu/snapshot/<domain>/<snapshot>.xml`` for the embedded driver,
    ``/var/lib/libvirt/qemu/snapshot/…`` for libvirtd.)
    """
    root = m.hypervisor.embedded_root
    base = (root / "lib" if root is not None else Path("/var/lib/libvirt")) / "qemu" / "snapshot"
    path = base / ref.name / f"{snapshot}.xml"
    try:
        tree = ET.fromstring(path.read_text())
    except (OSError, ET.ParseError) as err:
        raise SnapshotNotFound(f"snapshot {snapshot} of {ref.name}: {path}: {err}") from err
    mem = tree.find("memory")
    if mem is None or mem.get("snapshot") != "external" or not mem.get("file"):
        raise SnapshotNotFound(f"snapshot {snapshot} of {ref.name} has no external memory file")
    return Path(str(mem.get("file")))


def _print(args: argparse.Namespace, obj: dict[str, Any], text: str) -> None:
    print(json.dumps(obj, sort_keys=True) if args.json else text)


def _cmd_save(args: argparse.Namespace) -> int:
    from host_agent.service.daemon import DaemonError, control_client

    config = build_config(args)
    with _manager(args, config) as m:
        ref = m.hypervisor.lookup(args.domain)
        mode = "unknown"
        with contextlib.suppress(DaemonError):
            mode = control_client(config).call("prepare_save", vm_uuid=ref.uuid)["mode"]
        m.hypervisor.save(ref, args.file.resolve())
    records = control_client(config).call("records", vm_uuid=ref.uuid)["records"]
    record = records[0]["record_id"] if records else None
    _print(
        args,
        {"name": ref.name, "uuid": ref.uuid, "file": str(args.file), "record": record,
         "background_pass": mode},
        f"saved {ref.name} to {args.file}: sealed as {record} (background pass: {mode})",
    )  # fmt: skip
    return 0


def _cmd_restore(args: argparse.Namespace) -> int:
    config = build_config(args)
    file = args.file.resolve()
    with _manager(args, config) as m:
        ref = m.hypervisor.lookup(_image_uuid(m.hypervisor.save_image_xml(file), file))
        info = _restore(args, config, m, ref, file)
    _print(
        args,
        {"name": info.name, "uuid": info.uuid, "state": info.state.value},
        f"restored {info.name} from {file}: {info.state.value} (memory verified)",
    )
    return 0


def _cmd_arm(args: argparse.Namespace) -> int:
    config = build_config(args)
    with _manager(args, config) as m:
        ref = m.hypervisor.lookup(args.domain)
        if m.hypervisor.info(ref).active:
            raise SnapshotNotFound(f"domain {ref.name} is running: nothing to arm")
        _arm(m, ref)
    _print(args, {"name": ref.name, "uuid": ref.uuid, "armed": True}, f"armed {ref.name}")
    return 0


def _cmd_revert(args: argparse.Namespace) -> int:
    config = build_config(args)
    with _manager(args, config) as m:
        ref = m.hypervisor.lookup(args.domain)
        memory = _snapshot_memory_file(m, ref, args.snapshot)
        if m.hypervisor.info(ref).active:
            m.hypervisor.destroy(ref)
        m.cleanup(ref)
        info = _restore(args, config, m, ref, memory)
    _print(
        args,
        {"name": info.name, "uuid": info.uuid, "state": info.state.value, "memory": str(memory)},
        f"reverted {info.name} to {args.snapshot}: {info.state.value} (memory verified)",
    )
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from host_agent.lifecycle.image_verify import verify_image
    from host_agent.service.daemon import default_host_id
    from host_agent.store.provision import open_store
    from host_agent.tpm.discovery import open_host_tpm

    config = build_config(args)
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

    client = control_client(build_config(args))
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
