"""Adopted VMs: adopt, create, start, stop and list them (ARCHITECTURE.md §3, "VM adoption").

An adopted VM has, besides its libvirt definition (rewritten by
:func:`host_agent.lifecycle.domain_xml.adopt_domain_xml`)::

    <state_dir>/vms/<uuid>/            (mode 0711: QEMU must reach the sockets)
        adoption.json   the adoption record (later: a store record)
        bridge.sock     the bridge's control socket; the domain's <tpm> backend connects here
        attest.sock     the attestation channel's socket (QEMU binds it)
        bridge.pid      bridge.log      console.log (domains made by ``vm create``)
    <state_dir>/vtpm/<uuid>/        the VM's swtpm (:class:`host_agent.vtpm.swtpm.SwtpmInstance`)

Starting a VM starts its swtpm, then its bridge (``python -m host_agent.vtpm.bridge --once``,
in its own session, so it survives the CLI like QEMU does), waits until the bridge listens, and
only then boots the domain. Neither outlives the VM: swtpm runs with ``--terminate`` (it exits
when QEMU's data channel closes), the bridge with ``--once`` (it exits when QEMU leaves), and
:meth:`VmManager.stop` and :meth:`VmManager.supervise` (the daemon's lifecycle-event hook)
stop whatever is left.

A domain that used libvirt's own ``<backend type='emulator'>`` keeps its vTPM identity: its
state under the embedded root's ``lib/swtpm/<uuid>/tpm2/`` is read with a scratch swtpm
(CMD_GET_STATEBLOB) and pushed into the VM's new, encrypted swtpm (CMD_SET_STATEBLOB), so the EK,
its certificates, NV and persistent objects carry over. swtpm 0.7.1 cannot open a plaintext
state with a key, hence the detour through state blobs rather than a file copy.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid as uuid_mod
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, ClassVar

from evidence.errors import ParseError, VtpmError
from host_agent.errors import SwtpmError
from host_agent.vtpm import ctrl_codec as cc
from host_agent.vtpm.bridge_link import registration_path
from host_agent.vtpm.swtpm import SwtpmInstance, SwtpmOptions, vtpm_dir_of
from host_agent.vtpm.swtpm_key import StateKeySealer

from . import domain_xml as dx
from .libvirt_adapter import (
    DomainInfo,
    DomainRef,
    EventKind,
    Hypervisor,
    LifecycleEvent,
)

__all__ = [
    "RECORD_FORMAT",
    "AdoptResult",
    "AdoptionRecord",
    "AdoptionRecordError",
    "GuestImageSpec",
    "LifecycleError",
    "VmLayout",
    "VmManager",
    "VmSummary",
    "daemon_socket_of",
    "load_image_spec",
]

log = logging.getLogger(__name__)

RECORD_FORMAT = "vtpm-trust/adoption/1"
IMAGE_FORMAT = "vtpm-trust/guest-image/1"


class LifecycleError(VtpmError):
    """A VM operation cannot proceed (not adopted, already running, bridge did not come up…)."""

    id: ClassVar[str] = "lifecycle.error"


class AdoptionRecordError(ParseError):
    """An adoption record on disk is malformed."""

    id: ClassVar[str] = "parse.adoption_record"


def daemon_socket_of(state_dir: Path) -> Path:
    """The daemon's bridge-link socket under the agent's state directory."""
    return Path(state_dir) / "run" / "daemon.sock"


@dataclass(frozen=True)
class VmLayout:
    """Where one adopted VM's agent-side files live (see the module docstring)."""

    vm_dir: Path

    @classmethod
    def of(cls, state_dir: Path, vm_uuid: str) -> VmLayout:
        return cls(Path(state_dir) / "vms" / str(uuid_mod.UUID(vm_uuid)))

    @property
    def record(self) -> Path:
        return self.vm_dir / "adoption.json"

    @property
    def bridge_socket(self) -> Path:
        return self.vm_dir / "bridge.sock"

    @property
    def channel_socket(self) -> Path:
        return self.vm_dir / "attest.sock"

    @property
    def bridge_pid(self) -> Path:
        return self.vm_dir / "bridge.pid"

    @property
    def bridge_log(self) -> Path:
        return self.vm_dir / "bridge.log"

    @property
    def console_log(self) -> Path:
        return self.vm_dir / "console.log"


@dataclass(frozen=True)
class AdoptionRecord:
    """What ``vm adopt`` / ``vm create`` recorded (JSON, :data:`RECORD_FORMAT`)."""

    name: str
    uuid: str
    adopted_at: str
    bridge_socket: str
    channel_socket: str
    channel_name: str
    tpm_model: str
    previous_tpm_backend: str | None
    vtpm_state: str  # "provisioned" | "migrated-from-libvirt" | "existing"
    xml_sha256_before: str
    xml_sha256_after: str
    format: str = RECORD_FORMAT

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str = "adoption record") -> AdoptionRecord:
        try:
            raw = json.loads(text)
        except ValueError as err:
            raise AdoptionRecordError(where, 0, "JSON", str(err), unit="line") from err
        if not isinstance(raw, dict) or raw.get("format") != RECORD_FORMAT:
            got = raw.get("format") if isinstance(raw, dict) else type(raw).__name__
            raise AdoptionRecordError(where, 0, f"format {RECORD_FORMAT!r}", repr(got), unit="line")
        names = {f for f in cls.__dataclass_fields__}
        if set(raw) != names:
            raise AdoptionRecordError(
                where, 0, f"keys {sorted(names)}", f"{sorted(raw)}", unit="line"
            )
        for key, value in raw.items():
            if not (isinstance(value, str) or (key == "previous_tpm_backend" and value is None)):
                raise AdoptionRecordError(where, 0, f"{key}: a string", repr(value), unit="line")
        return cls(**raw)


@dataclass(frozen=True)
class AdoptResult:
    record: AdoptionRecord
    changed: bool  # the definition was rewritten (False: it was adopted already)


@dataclass(frozen=True)
class VmSummary:
    """One line of ``vm list``."""

    name: str
    uuid: str
    state: str
    adopted: bool
    bridge_socket: str | None
    bridge_running: bool
    swtpm_running: bool

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class GuestImageSpec:
    """A bootable kernel + initramfs (a ``vm_images/`` image, read from its manifest)."""

    kernel: Path
    initrd: Path
    cmdline: str


def load_image_spec(path: Path) -> GuestImageSpec:
    """Read a ``vm_images/`` manifest (a directory holding ``manifest.json``, or the file).

    host_agent does not import vm_images (dependencies point inward): the manifest is the
    interface, format :data:`IMAGE_FORMAT`.

    Raises:
        AdoptionRecordError: no manifest, not JSON, another format, missing fields.
    """
    manifest = Path(path) / "manifest.json" if Path(path).is_dir() else Path(path)
    try:
        raw = json.loads(manifest.read_text())
    except OSError as err:
        raise AdoptionRecordError(str(manifest), 0, "a readable image manifest", str(err)) from err
    except ValueError as err:
        raise AdoptionRecordError(str(manifest), 0, "JSON", str(err), unit="line") from err
    if not isinstance(raw, dict) or raw.get("format") != IMAGE_FORMAT:
        got = raw.get("format") if isinstance(raw, dict) else type(raw).__name__
        raise AdoptionRecordError(str(manifest), 0, f"format {IMAGE_FORMAT!r}", repr(got))
    try:
        kernel = Path(str(raw["kernel"]))
        initrd = manifest.parent / str(raw["initramfs"])
        cmdline = str(raw["cmdline"])
    except KeyError as err:
        raise AdoptionRecordError(str(manifest), 0, f"field {err}", "nothing") from err
    return GuestImageSpec(kernel=kernel.resolve(), initrd=initrd.resolve(), cmdline=cmdline)


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError):
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        if state == "Z":
            return False
    return True


def _read_pid(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _is_bridge_for(pid: int, vm_uuid: str) -> bool:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"host_agent.vtpm.bridge" in argv and vm_uuid.encode() in argv


# ---------------------------------------------------------------------------- state blobs


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise OSError(f"control socket closed after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def _read_permanent_blob(state_dir: Path, swtpm: str, timeout: float) -> bytes:
    """The permanent state blob of a plaintext swtpm state directory, via a scratch swtpm."""
    with tempfile.TemporaryDirectory(prefix="vtm-", dir="/tmp") as tmp:
        work = Path(tmp) / "tpm2"
        shutil.copytree(state_dir, work, ignore=shutil.ignore_patterns(".lock"))
        ctrl = Path(tmp) / "ctrl"
        proc = subprocess.Popen(
            [swtpm, "socket", "--tpm2", "--tpmstate", f"dir={work}",
             "--ctrl", f"type=unixio,path={ctrl}", "--log", f"file={tmp}/log,level=1"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + timeout
            while not ctrl.exists():
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise OSError(f"scratch swtpm did not listen on {ctrl}")
                time.sleep(0.01)
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(timeout)
                s.connect(str(ctrl))
                # Initialise first: a swtpm that was never initialised answers GET_STATEBLOB
                # with a bare error; a running one returns its current permanent state.
                s.sendall(cc.Init().encode())
                result = int.from_bytes(_recv_exact(s, 4), "big")
                if result != 0:
                    raise OSError(f"CMD_INIT: result 0x{result:x}")
                req = cc.GetStateBlob(cc.BlobType.PERMANENT)
                s.sendall(req.encode())
                head = _recv_exact(s, 16)
                length = int.from_bytes(head[12:16], "big")
                reply = cc.decode_reply(head + _recv_exact(s, length), req, tpm_running=True)
                assert isinstance(reply, cc.StateBlobReply)
                if reply.result != 0 or not reply.data:
                    raise OSError(f"GET_STATEBLOB PERMANENT: result 0x{reply.result:x}")
                s.sendall(cc.Shutdown().encode())
                with contextlib.suppress(OSError):
                    _recv_exact(s, 4)
                return bytes(reply.data)
        finally:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(2)
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)


def _push_permanent_blob(ctrl: Path, blob: bytes, timeout: float) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(ctrl))
        req = cc.SetStateBlob(cc.BlobType.PERMANENT, blob)
        s.sendall(req.encode())
        result = int.from_bytes(_recv_exact(s, 4), "big")
        if result != 0:
            raise OSError(f"SET_STATEBLOB PERMANENT: result 0x{result:x}")
        # As QEMU after an incoming migration: CMD_INIT makes swtpm load the pushed state and
        # write it to its (encrypted) state files; until then it is only held in memory.
        s.sendall(cc.Init(flags=1).encode())
        result = int.from_bytes(_recv_exact(s, 4), "big")
        if result != 0:
            raise OSError(f"CMD_INIT after SET_STATEBLOB: result 0x{result:x}")


# ---------------------------------------------------------------------------- the manager


@dataclass
class VmManager:
    """Adopted VMs on one hypervisor connection.

    Args:
        hypervisor: the libvirt adapter.
        state_dir: the agent's state directory.
        sealer: returns the host TPM (seals each VM's state key); called only when a swtpm starts.
        runtime_dir: where bridges register (``vtpm-host vm pcrs`` finds them there).
        daemon_socket: the daemon's bridge-link socket (state-transfer hooks go there; with no
            daemon a bridge vetoes saves and restores after ``hook_timeout``).
        swtpm_options: how swtpm runs.
        bridge_timeout: seconds to wait for a bridge to listen.
        bridge_hook_timeout: the bridge's ``--hook-timeout``.
        python: the interpreter that runs the bridge.
    """

    hypervisor: Hypervisor
    state_dir: Path
    sealer: Callable[[], StateKeySealer]
    runtime_dir: Path
    daemon_socket: Path
    swtpm_options: SwtpmOptions = field(default_factory=SwtpmOptions)
    bridge_timeout: float = 10.0
    bridge_hook_timeout: float = 10.0
    python: str = sys.executable

    # ------------------------------------------------------------------ helpers

    def layout(self, vm_uuid: str) -> VmLayout:
        return VmLayout.of(self.state_dir, vm_uuid)

    def record(self, vm_uuid: str) -> AdoptionRecord | None:
        path = self.layout(vm_uuid).record
        try:
            text = path.read_text()
        except FileNotFoundError:
            return None
        except OSError as err:
            raise LifecycleError(f"cannot read {path}: {err}") from err
        return AdoptionRecord.from_json(text, str(path))

    def swtpm(self, ref: DomainRef) -> SwtpmInstance:
        return SwtpmInstance(
            vtpm_dir_of(self.state_dir),
            ref.uuid,
            ref.name,
            _LazySealer(self.sealer),
            options=self.swtpm_options,
        )

    def _libvirt_swtpm_state(self, vm_uuid: str) -> Path | None:
        root = self.hypervisor.embedded_root
        candidates = [root / "lib" / "swtpm" / vm_uuid / "tpm2"] if root else []
        candidates.append(Path("/var/lib/libvirt/swtpm") / vm_uuid / "tpm2")
        for c in candidates:
            if (c / "tpm2-00.permall").is_file():
                return c
        return None

    def _write_record(self, layout: VmLayout, record: AdoptionRecord) -> None:
        tmp = layout.record.with_suffix(".json.tmp")
        tmp.write_text(record.to_json())
        os.chmod(tmp, 0o600)
        os.replace(tmp, layout.record)

    def _make_vm_dir(self, layout: VmLayout) -> None:
        try:
            layout.vm_dir.mkdir(mode=0o711, parents=True, exist_ok=True)
            os.chmod(layout.vm_dir, 0o711)
        except OSError as err:
            raise LifecycleError(f"cannot create {layout.vm_dir}: {err}") from err

    # ------------------------------------------------------------------ adopt / create

    def adopt(self, vm: str, *, now: datetime) -> AdoptResult:
        """Rewrite a domain's persistent definition for the agent and give it its vTPM.

        The definition is rewritten only if it changes; a second adoption changes nothing.
        The vTPM: carried over from libvirt's emulator state when there is one, else
        provisioned (EK + certificates, ``swtpm_setup``) unless the VM already has one.

        Raises:
            DomainNotFound: no such domain.
            DomainXmlError, UnadoptableDomain: the definition cannot be adopted (unchanged).
            LifecycleError: the domain runs with libvirt's emulator TPM (its state is live).
            HypervisorError: libvirt refused the new definition (the old one stays, and a vTPM
                this call made is removed again).
            SwtpmError, VtpmError: the vTPM could not be provisioned or carried over.
        """
        hv = self.hypervisor
        ref = hv.lookup(vm)
        before = hv.xml(ref, inactive=True)
        desc = dx.describe_domain_xml(before)
        layout = self.layout(ref.uuid)
        after = dx.adopt_domain_xml(
            before,
            bridge_socket=str(layout.bridge_socket),
            channel_socket=str(layout.channel_socket),
        )
        info = hv.info(ref)
        if desc.tpm_backend == "emulator" and info.active:
            raise LifecycleError(
                f"domain {ref.name} runs with libvirt's own swtpm, whose state is live; stop it, "
                "then adopt it (its vTPM state is carried over)"
            )
        existing = self.record(ref.uuid)
        self._make_vm_dir(layout)
        inst = self.swtpm(ref)
        vtpm_state = "existing" if inst.provisioned else "provisioned"
        libvirt_state = (
            self._libvirt_swtpm_state(ref.uuid) if desc.tpm_backend == "emulator" else None
        )
        if not inst.provisioned:
            if libvirt_state is not None:
                self._migrate_state(inst, libvirt_state)
                vtpm_state = "migrated-from-libvirt"
            else:
                inst.start()
                inst.stop()
        changed = _canonical(after) != _canonical(before)
        if changed:
            try:
                hv.define(after)
            except VtpmError:
                if vtpm_state != "existing":  # made by this call: leave nothing behind
                    with contextlib.suppress(VtpmError):
                        inst.remove()
                raise
            after = hv.xml(ref, inactive=True)
        else:
            after = before  # libvirt's own text, as recorded the first time
        record = AdoptionRecord(
            name=ref.name,
            uuid=ref.uuid,
            adopted_at=existing.adopted_at if existing else now.isoformat(),
            bridge_socket=str(layout.bridge_socket),
            channel_socket=str(layout.channel_socket),
            channel_name=dx.DEFAULT_CHANNEL_NAME,
            tpm_model=dx.describe_domain_xml(after).tpm_model or "tpm-crb",
            previous_tpm_backend=(existing.previous_tpm_backend if existing else desc.tpm_backend),
            vtpm_state=existing.vtpm_state if existing else vtpm_state,
            xml_sha256_before=existing.xml_sha256_before if existing else _sha256(before),
            xml_sha256_after=_sha256(after),
        )
        if record != existing:
            self._write_record(layout, record)
        log.info("adopted %s (%s): definition %s", ref.name, ref.uuid,
                 "rewritten" if changed else "unchanged")  # fmt: skip
        return AdoptResult(record, changed)

    def _migrate_state(self, inst: SwtpmInstance, libvirt_state: Path) -> None:
        """libvirt's plaintext swtpm state → the VM's encrypted state (see the module docstring)."""
        opts = self.swtpm_options
        try:
            blob = _read_permanent_blob(libvirt_state, opts.swtpm, opts.start_timeout)
        except OSError as err:
            raise SwtpmError(
                inst.uuid, f"cannot read libvirt's vTPM state {libvirt_state}: {err}"
            ) from err
        inst.restart_for_incoming()
        try:
            _push_permanent_blob(inst.ctrl_socket, blob, opts.start_timeout)
        except OSError as err:
            inst.stop()
            raise SwtpmError(inst.uuid, f"cannot carry libvirt's vTPM state over: {err}") from err
        inst.stop()
        if not inst.provisioned:
            raise SwtpmError(inst.uuid, "swtpm wrote no permanent state from libvirt's blob")
        log.info("vTPM state of %s carried over from %s", inst.uuid, libvirt_state)

    def create(
        self,
        name: str,
        image: GuestImageSpec,
        *,
        memory_mib: int,
        now: datetime,
        vm_uuid: str,
        cmdline_extra: str = "",
        qemu_args: Sequence[str] = (),
    ) -> AdoptResult:
        """Define a new adopted VM booting ``image`` and provision its vTPM.

        Raises:
            LifecycleError: a domain of that name exists.
            HypervisorError, SwtpmError, VtpmError: as :meth:`adopt`.
        """
        hv = self.hypervisor
        if any(d.name == name for d in hv.domains()):
            raise LifecycleError(f"a domain named {name!r} exists already")
        layout = self.layout(vm_uuid)
        self._make_vm_dir(layout)
        cmdline = f"{image.cmdline} {cmdline_extra}".strip()
        xml = dx.domain_xml_for_image(
            name,
            vm_uuid,
            kernel=str(image.kernel),
            initrd=str(image.initrd),
            cmdline=cmdline,
            memory_mib=memory_mib,
            bridge_socket=str(layout.bridge_socket),
            channel_socket=str(layout.channel_socket),
            console_log=str(layout.console_log),
            qemu_args=tuple(qemu_args),
        )
        ref = hv.define(xml)
        inst = self.swtpm(ref)
        if not inst.provisioned:
            inst.start()
            inst.stop()
        after = hv.xml(ref, inactive=True)
        record = AdoptionRecord(
            name=ref.name,
            uuid=ref.uuid,
            adopted_at=now.isoformat(),
            bridge_socket=str(layout.bridge_socket),
            channel_socket=str(layout.channel_socket),
            channel_name=dx.DEFAULT_CHANNEL_NAME,
            tpm_model="tpm-crb",
            previous_tpm_backend=None,
            vtpm_state="provisioned",
            xml_sha256_before="",
            xml_sha256_after=_sha256(after),
        )
        self._write_record(layout, record)
        return AdoptResult(record, True)

    # ------------------------------------------------------------------ start / stop

    def _adopted(self, ref: DomainRef) -> AdoptionRecord:
        record = self.record(ref.uuid)
        desc = dx.describe_domain_xml(self.hypervisor.xml(ref, inactive=True))
        if record is None or not desc.adopted or desc.external_tpm_path != record.bridge_socket:
            raise LifecycleError(
                f"domain {ref.name} is not adopted (or its definition changed since): run "
                f"`vtpm-host vm adopt {ref.name}` first"
            )
        return record

    def start(self, vm: str, *, paused: bool = False) -> DomainInfo:
        """Start the VM's swtpm and bridge, wait for the bridge socket, then boot the domain.

        On failure everything started here is stopped again.

        Raises:
            DomainNotFound; LifecycleError: not adopted, already running, bridge did not listen;
            SwtpmError, HypervisorError.
        """
        hv = self.hypervisor
        ref = hv.lookup(vm)
        self._adopted(ref)
        if hv.info(ref).active:
            raise LifecycleError(f"domain {ref.name} is running already")
        inst = self.swtpm(ref)
        if inst.adopt():  # a leftover of an earlier run of this VM: start afresh
            inst.stop()
        self._stop_bridge(ref)
        inst.start()
        try:
            self._start_bridge(ref, inst)
            hv.start(ref, paused=paused)
        except BaseException:
            self._stop_bridge(ref)
            with contextlib.suppress(VtpmError):
                inst.stop()
            raise
        return hv.info(ref)

    def arm_incoming(self, vm: DomainRef | str) -> None:
        """Get a stopped adopted VM ready for a restore or an incoming migration.

        Its swtpm is restarted for incoming state (:meth:`SwtpmInstance.restart_for_incoming`:
        no provisioning, QEMU pushes the state) and a fresh bridge listens; any plain client
        (``virsh restore``, managedsave start, ``restoreFlags``) may then start QEMU. A swtpm on
        an existing state serves a plain boot as well, so arming never breaks one.

        Raises:
            DomainNotFound; LifecycleError: not adopted, running, or the bridge did not listen;
            SwtpmError.
        """
        hv = self.hypervisor
        ref = hv.lookup(vm)
        self._adopted(ref)
        if hv.info(ref).active:
            raise LifecycleError(f"domain {ref.name} is running: nothing to arm")
        inst = self.swtpm(ref)
        if inst.adopt():
            inst.stop()
        self._stop_bridge(ref)
        inst.restart_for_incoming()
        try:
            self._start_bridge(ref, inst)
        except BaseException:
            with contextlib.suppress(VtpmError):
                inst.stop()
            raise

    def _bridge_command(self, ref: DomainRef, inst: SwtpmInstance) -> list[str]:
        layout = self.layout(ref.uuid)
        cmd = [
            self.python, "-m", "host_agent.vtpm.bridge",
            "--vm-uuid", ref.uuid, "--vm-name", ref.name,
            "--listen", str(layout.bridge_socket),
            "--swtpm-ctrl", str(inst.ctrl_socket),
            "--daemon-sock", str(self.daemon_socket),
            "--runtime-dir", str(self.runtime_dir),
            "--hook-timeout", str(self.bridge_hook_timeout),
            "--once",
        ]  # fmt: skip
        if self.hypervisor.embedded_root is None:  # system libvirtd: QEMU runs as libvirt-qemu
            import grp

            with contextlib.suppress(KeyError):
                gid = grp.getgrnam("libvirt-qemu").gr_gid
                cmd += ["--listen-mode", "660", "--listen-gid", str(gid)]
        return cmd

    def _start_bridge(self, ref: DomainRef, inst: SwtpmInstance) -> int:
        layout = self.layout(ref.uuid)
        reg = registration_path(self.runtime_dir, ref.uuid)
        with contextlib.suppress(FileNotFoundError):
            reg.unlink()
        try:
            with open(layout.bridge_log, "ab") as out:
                proc = subprocess.Popen(
                    self._bridge_command(ref, inst),
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=out,
                    start_new_session=True,  # outlives this process, like QEMU (invariant 6)
                )
        except OSError as err:
            raise LifecycleError(f"cannot run the bridge of {ref.name}: {err}") from err
        layout.bridge_pid.write_text(f"{proc.pid}\n")
        deadline = time.monotonic() + self.bridge_timeout
        while True:
            if proc.poll() is not None:
                tail = layout.bridge_log.read_text(errors="replace")[-600:]
                raise LifecycleError(
                    f"the bridge of {ref.name} exited with status {proc.returncode}: {tail}"
                )
            with contextlib.suppress(OSError, ValueError):
                if json.loads(reg.read_text()).get("pid") == proc.pid:
                    return proc.pid
            if time.monotonic() > deadline:
                proc.kill()
                proc.wait(5)
                raise LifecycleError(
                    f"the bridge of {ref.name} did not listen on {layout.bridge_socket} within "
                    f"{self.bridge_timeout:g} s"
                )
            time.sleep(0.01)

    def _stop_bridge(self, ref: DomainRef, timeout: float = 5.0) -> None:
        layout = self.layout(ref.uuid)
        pid = _read_pid(layout.bridge_pid)
        if pid is not None and _pid_alive(pid) and _is_bridge_for(pid, ref.uuid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while _pid_alive(pid) and time.monotonic() < deadline:
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, os.WNOHANG)
                time.sleep(0.01)
            if _pid_alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError, OSError):
            if pid is not None:
                os.waitpid(pid, os.WNOHANG)
        with contextlib.suppress(FileNotFoundError):
            layout.bridge_pid.unlink()

    def cleanup(self, ref: DomainRef) -> None:
        """Stop the bridge and swtpm of a VM that no longer runs. Idempotent."""
        self._stop_bridge(ref)
        inst = self.swtpm(ref)
        if inst.adopt():
            inst.stop()

    def stop(self, vm: str, *, graceful_timeout: float = 0.0) -> None:
        """Stop the domain (ACPI shutdown first if ``graceful_timeout`` > 0), then its bridge and
        swtpm: nothing of the VM is left running.

        Raises:
            DomainNotFound, HypervisorError, SwtpmError.
        """
        hv = self.hypervisor
        ref = hv.lookup(vm)
        if hv.info(ref).active and graceful_timeout > 0:
            hv.shutdown(ref)
            deadline = time.monotonic() + graceful_timeout
            while hv.info(ref).active and time.monotonic() < deadline:
                time.sleep(0.1)
        if hv.info(ref).active:
            hv.destroy(ref)
        self.cleanup(ref)

    def supervise(self) -> Callable[[], None]:
        """Follow lifecycle events: when an adopted VM stops (for any reason: shutdown, destroy,
        crash, save, migration), stop whatever of its bridge and swtpm is left.

        Returns:
            A function that stops following.
        """

        def clean(ref: DomainRef) -> None:
            try:
                self.cleanup(ref)
            except VtpmError as err:
                log.error("cleaning up after %s stopped: %s", ref.name, err)

        def on_event(ev: LifecycleEvent) -> None:
            if ev.kind is not EventKind.STOPPED:
                return
            if not self.layout(ev.vm.uuid).record.exists():
                return
            # off the libvirt event thread: stopping a process may take seconds
            threading.Thread(
                target=clean, args=(ev.vm,), name=f"cleanup-{ev.vm.uuid[:8]}", daemon=True
            ).start()

        return self.hypervisor.subscribe(on_event)

    # ------------------------------------------------------------------ list

    def list(self) -> list[VmSummary]:
        out: list[VmSummary] = []
        for d in self.hypervisor.domains():
            record = None
            with contextlib.suppress(VtpmError):
                record = self.record(d.uuid)
            desc = None
            with contextlib.suppress(VtpmError):
                desc = dx.describe_domain_xml(self.hypervisor.xml(d.ref, inactive=True))
            adopted = (
                record is not None
                and desc is not None
                and desc.adopted
                and desc.external_tpm_path == record.bridge_socket
            )
            layout = self.layout(d.uuid)
            pid = _read_pid(layout.bridge_pid)
            bridge_running = pid is not None and _pid_alive(pid) and _is_bridge_for(pid, d.uuid)
            inst = self.swtpm(d.ref)
            swtpm_running = False
            with contextlib.suppress(VtpmError):
                swtpm_running = inst.adopt()
            out.append(
                VmSummary(
                    name=d.name,
                    uuid=d.uuid,
                    state=d.state.value,
                    adopted=adopted,
                    bridge_socket=record.bridge_socket if adopted and record else None,
                    bridge_running=bridge_running,
                    swtpm_running=swtpm_running,
                )
            )
        return out


def _canonical(text: str) -> str:
    return ET.canonicalize(text, strip_text=True)


class _LazySealer:
    """Opens the host TPM only when a swtpm actually needs its state key."""

    def __init__(self, factory: Callable[[], StateKeySealer]) -> None:
        self._factory = factory
        self._sealer: StateKeySealer | None = None

    def _get(self) -> StateKeySealer:
        if self._sealer is None:
            self._sealer = self._factory()
        return self._sealer

    def seal(self, data: bytes) -> bytes:
        return self._get().seal(data)

    def unseal(self, blob: bytes) -> bytes:
        return self._get().unseal(blob)
