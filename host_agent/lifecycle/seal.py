"""Sealed save (patent step 1-1): at the GET_STATEBLOB hook, seal memory, vPCRs and vTPM state.

Whatever starts a save (``virsh save``, managedsave, an external-memory snapshot, ``vtpm-host vm
save``, a plain QMP ``migrate`` to a file), QEMU stops the VM and asks the bridge for the vTPM
state: GET_STATEBLOB PERMANENT, VOLATILE, then SAVESTATE (platform-notes, "A control-channel
bridge"). The bridge calls the daemon after swtpm answered and before QEMU gets the blob; the
daemon routes the call to :meth:`Sealer.on_get_stateblob`:

- PERMANENT: the VM is stopped and its RAM final. Learn QEMU's pid from the bridge (the peer of
  its control connection), hash its guest-RAM memfd (the incremental pass of a background
  tracker when one runs and soft-dirty works, else a full hash: the announced fallback), read the
  vPCRs through the bridge, and keep the blob;
- VOLATILE: keep the blob;
- SAVESTATE (the last): seal one record into the store, then allow. QEMU gets its answer to the
  last GET_STATEBLOB only after the record is committed, so no saved state exists without its
  record. Any failure vetoes the save (QEMU aborts it; the VM stays as it was).

Records (in the trusted store, encrypted and authenticated there; the store never holds a
plaintext vTPM state, invariant 5)::

    seal/<id>         JSON, :data:`SEAL_FORMAT`: VM UUID and name, host id, time, origin
                      ("save" | "adopted"), memory root + layout + how it was hashed (and,
                      in ``extra.hash_note``, why a full hash at the stop), vPCRs,
                      the three state blobs (digest, length, flags, bytes), domain XML digest
    seal-leaves/<id>  the memory leaves: a leaf file (:func:`~host_agent.memory.merkle.
                      encode_leaf_file`, 32 bytes per 4 KiB page) with its runs of zero-page
                      leaves packed (:func:`pack_leaves`; older records: zlib)

``<id>`` is ``<vm uuid>.<sealed_at in ns>``. Restore (:mod:`host_agent.lifecycle.restore`) and
``vtpm-host image verify`` (:mod:`host_agent.lifecycle.image_verify`) read them back.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import multiprocessing
import os
import struct
import threading
import time
import zlib
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, ClassVar, Protocol

from evidence.errors import ParseError, VtpmError
from host_agent.errors import MemorySourceError
from host_agent.memory.dirty import SoftDirtyTracker, TrackerSupport, probe_soft_dirty
from host_agent.memory.hasher import default_workers, hash_extents
from host_agent.memory.merkle import (
    FANOUT,
    PAGE_SIZE,
    ZERO_LEAF,
    BlockLeaves,
    LeafSet,
    encode_leaf_file,
    parse_leaf_file,
)
from host_agent.memory.sources import file_extents, find_qemu_memfd, hash_source
from host_agent.store import TrustedStore
from host_agent.vtpm.daemon_link import HookCall
from host_agent.vtpm.hooks_server import Allow, Decision, HookHandler, Veto

__all__ = [
    "LEAVES_RECORD",
    "SEAL_FORMAT",
    "SEAL_RECORD",
    "BridgeCalls",
    "RamHasher",
    "SealError",
    "SealedBlob",
    "SealedState",
    "Sealer",
    "hash_qemu_ram",
    "list_sealed",
    "load_leaves",
    "pack_leaves",
    "put_sealed",
    "qemu_pid_of",
    "unpack_leaves",
]

log = logging.getLogger(__name__)

SEAL_RECORD = "seal"
LEAVES_RECORD = "seal-leaves"
SEAL_FORMAT = "vtpm-trust/seal/1"
PERMANENT, VOLATILE, SAVESTATE = 1, 2, 3
BLOB_NAMES = {PERMANENT: "permanent", VOLATILE: "volatile", SAVESTATE: "savestate"}


class SealError(VtpmError):
    """A save could not be sealed (no QEMU pid, memory unreadable, vPCRs unreadable …)."""

    id: ClassVar[str] = "lifecycle.seal"


class SealRecordError(ParseError):
    """A sealed record read back from the store is malformed."""

    id: ClassVar[str] = "parse.seal_record"


class BridgeCalls(Protocol):
    """What the sealer needs of the daemon's hooks server (:class:`HooksServer` satisfies it)."""

    def call(self, vm_uuid: str, op: str, timeout: float = 30.0, **args: Any) -> dict[str, Any]:
        """Run ``op`` on the bridge of ``vm_uuid``."""
        ...

    def read_pcrs(
        self, vm_uuid: str, bank: str = "sha256", timeout: float = 30.0
    ) -> dict[int, bytes]:
        """The vPCRs of ``bank``, read through the bridge."""
        ...


@dataclass(frozen=True)
class SealedBlob:
    """One vTPM state blob as QEMU got it from swtpm (``result`` is swtpm's, e.g. 0x800 for an
    empty SAVESTATE)."""

    blob_type: int
    blob: bytes
    flags: int = 0
    result: int = 0

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.blob).hexdigest()

    def as_json(self) -> dict[str, Any]:
        return {
            "sha256": self.sha256,
            "length": len(self.blob),
            "flags": self.flags,
            "result": self.result,
            "blob": base64.b64encode(self.blob).decode(),
        }


@dataclass(frozen=True)
class SealedState:
    """One sealed record (see the module docstring)."""

    record_id: str
    vm_uuid: str
    vm_name: str
    host_id: str
    sealed_at: str
    origin: str
    memory_root: bytes
    layout: tuple[tuple[str, int], ...]
    hash_mode: str
    blobs: dict[int, SealedBlob]
    vpcrs: dict[int, bytes] | None = None
    domain_xml_sha256: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def blob(self, blob_type: int) -> SealedBlob:
        try:
            return self.blobs[blob_type]
        except KeyError:
            raise SealRecordError(
                f"seal record {self.record_id}", 0, "the three state blobs", "missing one"
            ) from None

    def as_json(self) -> dict[str, Any]:
        return {
            "format": SEAL_FORMAT,
            "record_id": self.record_id,
            "vm_uuid": self.vm_uuid,
            "vm_name": self.vm_name,
            "host_id": self.host_id,
            "sealed_at": self.sealed_at,
            "origin": self.origin,
            "memory": {
                "root": self.memory_root.hex(),
                "layout": [[n, p] for n, p in self.layout],
                "hash_mode": self.hash_mode,
            },
            "vpcrs": None if self.vpcrs is None else _pcrs_json(self.vpcrs),
            "state": {BLOB_NAMES[t]: b.as_json() for t, b in sorted(self.blobs.items())},
            "domain_xml_sha256": self.domain_xml_sha256,
            **({"extra": self.extra} if self.extra else {}),
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> SealedState:
        """Raises: SealRecordError: not a seal record of this format."""
        what = f"seal record {obj.get('record_id', '?')}"
        try:
            if obj["format"] != SEAL_FORMAT:
                raise SealRecordError(what, 0, SEAL_FORMAT, str(obj["format"]))
            blobs = {}
            for t, name in BLOB_NAMES.items():
                b = obj["state"][name]
                raw = base64.b64decode(b["blob"], validate=True)
                if hashlib.sha256(raw).hexdigest() != b["sha256"]:
                    raise SealRecordError(what, 0, f"{name} blob matching its digest", "other")
                blobs[t] = SealedBlob(t, raw, int(b["flags"]), int(b["result"]))
            vp = obj.get("vpcrs")
            return cls(
                record_id=str(obj["record_id"]),
                vm_uuid=str(obj["vm_uuid"]),
                vm_name=str(obj["vm_name"]),
                host_id=str(obj["host_id"]),
                sealed_at=str(obj["sealed_at"]),
                origin=str(obj["origin"]),
                memory_root=bytes.fromhex(obj["memory"]["root"]),
                layout=tuple((str(n), int(p)) for n, p in obj["memory"]["layout"]),
                hash_mode=str(obj["memory"]["hash_mode"]),
                blobs=blobs,
                vpcrs=None if vp is None else _pcrs_of(vp),
                domain_xml_sha256=obj.get("domain_xml_sha256"),
                extra=dict(obj.get("extra", {})),
            )
        except SealRecordError:
            raise
        except (KeyError, TypeError, ValueError) as err:
            raise SealRecordError(what, 0, "a well-formed seal record", repr(err)) from err


def _pcrs_json(pcrs: dict[int, bytes]) -> dict[str, Any]:
    return {"bank": "sha256", "pcrs": {str(k): v.hex() for k, v in sorted(pcrs.items())}}


def _pcrs_of(obj: dict[str, Any]) -> dict[int, bytes]:
    return {int(k): bytes.fromhex(v) for k, v in obj["pcrs"].items()}


#: Packed leaves: magic, u64 unpacked length, u32 runs, runs (u64 offset, u32 leaves), literals.
LEAF_PACK_MAGIC = b"VTZR\x01"
#: Zero-leaf runs shorter than this stay literal (they cost a loop turn each to find).
ZERO_RUN_MIN = 16
#: Unpacked leaf files above this are refused (8 GiB of leaves: a 1 TiB guest).
MAX_LEAF_FILE = 1 << 33
_RUN = struct.Struct(">QI")
_PACK_HEAD = struct.Struct(">5sQI")


def pack_leaves(data: bytes) -> bytes:
    """Pack a leaf file: runs of the zero page's leaf become (offset, count), the rest stays.

    Guest RAM is mostly zero pages in long runs, and the other leaves are SHA-256 digests that
    no compressor shrinks; zlib spent 0.2-0.4 s of the save pause on 8 MiB of leaves (1 GiB
    guest) to reach the size this reaches in ~30 ms. Lossless for any bytes."""
    zrun = ZERO_LEAF * ZERO_RUN_MIN
    big = ZERO_LEAF * 1024
    runs: list[tuple[int, int]] = []
    parts: list[bytes] = []
    pos = 0
    i = data.find(zrun)
    while i != -1:
        j = i + len(zrun)
        while data.startswith(big, j):
            j += len(big)
        while data.startswith(ZERO_LEAF, j):
            j += len(ZERO_LEAF)
        parts.append(data[pos:i])
        runs.append((i, (j - i) // len(ZERO_LEAF)))
        pos = j
        i = data.find(zrun, j)
    parts.append(data[pos:])
    head = _PACK_HEAD.pack(LEAF_PACK_MAGIC, len(data), len(runs))
    return b"".join([head, *(_RUN.pack(o, n) for o, n in runs), *parts])


def unpack_leaves(packed: bytes, what: str = "packed leaves") -> bytes:
    """The leaf file :func:`pack_leaves` packed.

    Raises:
        SealRecordError: not a packed leaf file, or its runs do not add up.
    """
    if len(packed) < _PACK_HEAD.size or not packed.startswith(LEAF_PACK_MAGIC):
        raise SealRecordError(what, 0, f"magic {LEAF_PACK_MAGIC!r}", repr(packed[:5]))
    _magic, total, nruns = _PACK_HEAD.unpack_from(packed)
    if total > MAX_LEAF_FILE:
        raise SealRecordError(what, 5, f"at most {MAX_LEAF_FILE} bytes unpacked", str(total))
    at = _PACK_HEAD.size
    if len(packed) < at + nruns * _RUN.size:
        raise SealRecordError(what, at, f"{nruns} runs", f"{len(packed) - at} bytes")
    out = bytearray()
    lit = at + nruns * _RUN.size
    for k in range(nruns):
        offset, count = _RUN.unpack_from(packed, at + k * _RUN.size)
        gap = offset - len(out)
        if gap < 0 or count < 1 or offset + count * len(ZERO_LEAF) > total:
            raise SealRecordError(
                what, at + k * _RUN.size, "ordered zero runs inside the file", f"{offset}+{count}"
            )
        if lit + gap > len(packed):
            raise SealRecordError(what, lit, f"{gap} literal bytes", f"{len(packed) - lit}")
        out += packed[lit : lit + gap]
        lit += gap
        out += ZERO_LEAF * count
    out += packed[lit:]
    if len(out) != total:
        raise SealRecordError(what, len(packed), f"{total} bytes unpacked", str(len(out)))
    return bytes(out)


def put_sealed(store: TrustedStore, sealed: SealedState, leaves: LeafSet) -> None:
    """Commit the record and its leaves as one store change."""
    if leaves.root() != sealed.memory_root:
        raise ValueError("the leaves do not give the sealed memory root")
    packed = pack_leaves(encode_leaf_file(leaves))
    with store.transaction() as tx:
        tx.put(LEAVES_RECORD, sealed.record_id, packed)
        tx.put(SEAL_RECORD, sealed.record_id, sealed.as_json())


def list_sealed(store: TrustedStore, vm_uuid: str | None = None) -> list[SealedState]:
    """Sealed records (of one VM, when given), newest first."""
    out = []
    for rec in store.list_records(SEAL_RECORD):
        sealed = SealedState.from_json(rec.json())
        if vm_uuid is None or sealed.vm_uuid == vm_uuid:
            out.append(sealed)
    return sorted(out, key=lambda s: s.sealed_at, reverse=True)


def load_leaves(store: TrustedStore, record_id: str) -> LeafSet:
    """The memory leaves of a sealed record.

    Raises:
        SealRecordError: they cannot be decompressed; LeafFileError: malformed leaf file.
    """
    rec = store.get(LEAVES_RECORD, record_id)
    what = f"seal leaves {record_id}"
    if rec.payload.startswith(LEAF_PACK_MAGIC):
        return parse_leaf_file(unpack_leaves(rec.payload, what))
    try:  # records sealed before the packing (zlib)
        data = zlib.decompress(rec.payload)
    except zlib.error as err:
        raise SealRecordError(what, 0, "packed leaves or zlib data", str(err)) from err
    return parse_leaf_file(data)


def qemu_pid_of(bridges: BridgeCalls, vm_uuid: str) -> int:
    """QEMU's pid, as the bridge sees it on its control connection (SO_PEERCRED).

    Raises:
        SealError: the bridge has no QEMU attached or does not know the pid.
    """
    status = bridges.call(vm_uuid, "status", timeout=10.0)
    pid = status.get("qemu_pid")
    if not isinstance(pid, int) or pid <= 0:
        raise SealError(f"the bridge of VM {vm_uuid} reports no QEMU pid (status: {status})")
    return pid


def hash_qemu_ram(pid: int, *, workers: int | None = None) -> LeafSet:
    """A full hash of QEMU ``pid``'s guest-RAM memfd (the main RAM block only), in this process.

    Raises:
        MemorySourceError: no such QEMU or no memfd RAM.
    """
    return hash_source(f"pid:{pid}", workers=workers).leaves


def _hash_stripe(path: str, block: str, first: int, pages: int) -> bytes | str:
    """Leaves of ``pages`` pages of the memfd at ``path`` from page ``first`` (a worker process).

    Returns the leaves, or the error text (our exceptions do not survive pickling)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as err:
        return f"cannot open {path}: {err}"
    try:
        extents = file_extents(fd, block, first * PAGE_SIZE, pages * PAGE_SIZE)
        leaves = hash_extents(fd, [(block, pages)], extents, source=path, workers=1)
        return leaves.blocks[0].leaves
    except (OSError, VtpmError) as err:
        return str(err)
    finally:
        os.close(fd)


class RamHasher:
    """Hashes a QEMU's guest RAM on a pool of processes, one per core.

    ``hashlib`` releases the GIL only inside each 4 KiB digest, so the threads of one process
    spend the time between pages waiting for each other (on the 2-core development machine two
    threads were slower than one). Processes do not share a GIL: each ``pread``s and hashes its
    own stripes of the memfd (``/proc/<qemu pid>/fd/N``) and returns 32 bytes per page. The pool
    is started (and warmed) once, when the daemon starts, not in a VM's save pause.

    Args:
        processes: pool size (default: the cores this process may run on); 1 hashes in-process.
    """

    STRIPES_PER_PROCESS = 4
    MIN_PAGES = 16384  # below 64 MiB the in-process hash is cheaper than the round trips

    def __init__(self, processes: int | None = None) -> None:
        self.processes = processes or default_workers()
        self._pool: ProcessPoolExecutor | None = None

    def start(self) -> RamHasher:
        if self.processes > 1 and self._pool is None:
            ctx = multiprocessing.get_context("forkserver")
            self._pool = ProcessPoolExecutor(self.processes, mp_context=ctx)
            list(self._pool.map(_warm_n, range(self.processes)))
        return self

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    def hash(self, pid: int) -> LeafSet:
        """The leaves of QEMU ``pid``'s main guest RAM.

        Raises:
            MemorySourceError: no such QEMU, no memfd RAM, or a read failed.
        """
        path, block, size = find_qemu_memfd(pid)
        pages = size // PAGE_SIZE
        if self._pool is None or pages < self.MIN_PAGES or size % PAGE_SIZE:
            return hash_qemu_ram(pid, workers=1)
        n = self.processes * self.STRIPES_PER_PROCESS
        step = -(-pages // n)
        step += -step % FANOUT
        jobs = [(path, block, first, min(step, pages - first)) for first in range(0, pages, step)]
        parts = list(self._pool.map(_hash_stripe, *zip(*jobs, strict=True)))
        for part in parts:
            if isinstance(part, str):
                raise MemorySourceError(f"pid:{pid}", part)
        return LeafSet.of([BlockLeaves(block, b"".join(p for p in parts if isinstance(p, bytes)))])


def _warm_n(_i: int) -> int:
    """A no-op task that makes each pool process start (and import this module) at once."""
    return os.getpid()


@dataclass
class _Tracking:
    pid: int
    tracker: SoftDirtyTracker | None  # None: it could not even be set up (``error`` says why)
    thread: threading.Thread
    error: BaseException | None = None
    started: float = 0.0


@dataclass
class _Save:
    pid: int
    leaves: LeafSet
    hash_mode: str
    hash_seconds: float
    vpcrs: dict[int, bytes]
    started: float
    blobs: dict[int, SealedBlob] = field(default_factory=dict)
    pcr_seconds: float = 0.0
    hash_note: str = ""


class Sealer:
    """The GET_STATEBLOB handler (see the module docstring).

    Args:
        store: the trusted store (records are committed before QEMU gets the last blob).
        bridges: the hooks server (QEMU's pid, vPCR reads).
        host_id: this host's id, written into every record.
        now: wall clock for ``sealed_at`` (the daemon edge passes ``datetime.now(UTC)``).
        vm_name: ``uuid -> name`` (the registry); "" when unknown.
        domain_xml_sha256: ``uuid -> digest`` of the domain definition, None when unknown.
        workers: hashing threads of the background pass (default: one per core).
        hasher: hashes guest RAM at the stop (default: in this process).
        probe: how to learn whether soft-dirty tracking works (tests may force the fallback).
        announce: called with a line whenever dirty-page tracking falls back to full hashes.
        clock: monotonic clock for timings.
    """

    def __init__(
        self,
        store: TrustedStore,
        bridges: BridgeCalls,
        *,
        host_id: str,
        now: Callable[[], datetime],
        vm_name: Callable[[str], str] = lambda _u: "",
        domain_xml_sha256: Callable[[str], str | None] = lambda _u: None,
        workers: int | None = None,
        hasher: RamHasher | None = None,
        probe: Callable[[], TrackerSupport] = probe_soft_dirty,
        announce: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.bridges = bridges
        self.host_id = host_id
        self._now = now
        self._vm_name = vm_name
        self._xml_digest = domain_xml_sha256
        self._workers = workers
        self._hasher = hasher or RamHasher(1)
        self._probe = probe
        self._announce = announce or (lambda line: log.warning("%s", line))
        self._clock = clock
        self._support_cache: TrackerSupport | None = None
        self._lock = threading.Lock()
        self._saves: dict[str, _Save] = {}
        self._tracking: dict[str, _Tracking] = {}
        self._delegates: dict[str, HookHandler] = {}
        self._sealed_since: dict[str, float] = {}
        self.last_pause: dict[str, float] = {}  # VM → seconds from PERMANENT to sealed

    def take_sealed(self) -> dict[str, float]:
        """VMs whose save was sealed since the last call, with the (monotonic) time: the daemon
        arms them for the restore that usually follows once their QEMU has gone."""
        with self._lock:
            out, self._sealed_since = self._sealed_since, {}
        return out

    def delegate(self, vm_uuid: str, handler: HookHandler | None) -> None:
        """Route this VM's GET_STATEBLOB hooks to ``handler`` instead of sealing (an outgoing
        migration, which sends its own signed record to the target), until called with None."""
        with self._lock:
            if handler is None:
                self._delegates.pop(vm_uuid, None)
            else:
                self._delegates[vm_uuid] = handler

    # ------------------------------------------------------------------ background pass

    def prepare(self, vm_uuid: str) -> str:
        """Start the background pass for a running VM (VM start, or ``vm save`` before the stop).

        Returns:
            ``"soft-dirty"`` (tracking; the stop re-hashes only written pages) or ``"full"``
            (the announced fallback: this kernel keeps no soft-dirty bits, so a background pass
            would be thrown away and the stop hashes everything).
        """
        support = self._support()
        if not support.available:
            self._announce(
                f"VM {vm_uuid}: dirty-page tracking unavailable ({support.reason}); the save "
                "hashes all guest memory at the stop"
            )
            return "full"
        return self._start_tracking(vm_uuid, qemu_pid_of(self.bridges, vm_uuid), support)

    def track_running(self, vm_uuid: str, qemu_pid: int, *, refresh: float = 600.0) -> bool:
        """Keep a background pass over a running VM's memory, whatever save comes next.

        The daemon calls this for every VM whose vTPM runs, so that ``virsh save``, managedsave
        and snapshots re-hash only the pages written since the pass, like ``vtpm-host vm save``.
        Soft-dirty bits accumulate from a pass on, so a pass older than ``refresh`` seconds is
        replaced by a new one (a full hash, in the background) to keep the stop's share small.

        Returns:
            True if a pass was started now. Nothing starts where soft-dirty tracking is
            unavailable (each save announces its full hash at the stop), while a save of the VM
            is in progress, or when a recent pass already tracks this QEMU (one that failed
            included: it is reported at the stop, not retried every poll).

        Raises:
            MemorySourceError: the QEMU has no memfd guest RAM to track (remembered as this
                QEMU's failed pass: the next call for it does nothing).
        """
        support = self._support()
        if not support.available:
            return False
        with self._lock:
            if vm_uuid in self._saves:
                return False
            entry = self._tracking.get(vm_uuid)
            if (
                entry is not None
                and entry.pid == qemu_pid
                and (entry.thread.is_alive() or self._clock() - entry.started < refresh)
            ):
                return False
        try:
            self._start_tracking(vm_uuid, qemu_pid, support)
        except MemorySourceError as err:  # kept, so the stop says why and polls do not retry
            with self._lock:
                self._tracking[vm_uuid] = _Tracking(
                    qemu_pid, None, threading.Thread(), err, started=self._clock()
                )
            raise
        return True

    def tracking(self) -> dict[str, int]:
        """The VMs with a background pass: ``{vm_uuid: qemu_pid}``."""
        with self._lock:
            return {vm: entry.pid for vm, entry in self._tracking.items()}

    def _start_tracking(self, vm_uuid: str, pid: int, support: TrackerSupport) -> str:
        tracker = SoftDirtyTracker.for_qemu(
            pid, workers=self._workers, probe=lambda: support, announce=self._announce
        )
        entry = _Tracking(pid, tracker, threading.Thread(), started=self._clock())

        def run() -> None:
            try:
                tracker.start()
            except BaseException as err:  # reported at the stop, which then hashes fully
                entry.error = err

        entry.thread = threading.Thread(target=run, name=f"bgpass-{vm_uuid[:8]}", daemon=True)
        with self._lock:
            self._tracking[vm_uuid] = entry
        entry.thread.start()
        return "soft-dirty" if tracker.support.available else "full"

    def _support(self) -> TrackerSupport:
        """Whether soft-dirty tracking works here (probed once; the kernel does not change)."""
        if self._support_cache is None:
            self._support_cache = self._probe()
        return self._support_cache

    def _hash_at_stop(self, vm_uuid: str, pid: int) -> tuple[LeafSet, str, str]:
        """The leaves at the stop, how they were made, and why a full hash when it is one
        (announced: every save path — ``virsh save``, managedsave, a snapshot — says so)."""
        with self._lock:
            entry = self._tracking.pop(vm_uuid, None)
        if entry is not None and entry.pid == pid:
            if entry.thread.ident is not None:  # a pass that could not be set up never started
                entry.thread.join()
            if (
                entry.error is None
                and entry.tracker is not None
                and entry.tracker.support.available
            ):
                result = entry.tracker.finish()
                mode = f"{result.mode} ({result.rehashed_pages} pages re-hashed)"
                return result.leaves, mode, ""
            note = f"background pass unusable ({entry.error})"
        else:
            support = self._support()
            if not support.available:
                note = f"dirty-page tracking unavailable ({support.reason})"
            else:
                note = (
                    "no background pass was running (the daemon starts one within seconds of "
                    "seeing the vTPM run, unless told not to; `vtpm-host vm save` starts one)"
                )
        self._announce(f"VM {vm_uuid}: {note}; hashing all guest memory at the stop")
        return self._hasher.hash(pid), "full", note

    # ------------------------------------------------------------------ the hook

    def on_get_stateblob(self, call: HookCall) -> Decision:
        """Hook handler: keep the blob; seal at the last one. A failure vetoes the save."""
        vm = call.vm_uuid
        with self._lock:
            delegate = self._delegates.get(vm)
        if delegate is not None:
            return delegate(call)
        blob = SealedBlob(call.blob_type, call.blob, call.state_flags, call.result)
        if len(call.blob) != call.length:
            return Veto(f"the bridge sent {len(call.blob)} of the blob's {call.length} bytes")
        save: _Save | None
        try:
            if call.blob_type == PERMANENT:
                save = self._begin(vm)
            else:
                with self._lock:
                    save = self._saves.get(vm)
                if save is None:
                    return Veto(
                        f"GET_STATEBLOB {BLOB_NAMES.get(call.blob_type, call.blob_type)} without "
                        "the PERMANENT one first (daemon restarted mid-save?): refusing to hand "
                        "out an unsealed state"
                    )
            save.blobs[call.blob_type] = blob
            if call.blob_type != SAVESTATE:
                return Allow()
            with self._lock:
                self._saves.pop(vm, None)
            t_seal = self._clock()
            record_id = self._seal(vm, save)
            seal_seconds = self._clock() - t_seal
        except VtpmError as err:
            with self._lock:
                self._saves.pop(vm, None)
            log.error("save of VM %s not sealed: %s", vm, err)
            return Veto(f"save not sealed: {err}")
        self.last_pause[vm] = self._clock() - save.started
        with self._lock:
            self._sealed_since[vm] = self._clock()
        log.info(
            "VM %s: save sealed as %s (memory %s, %d pages, %s; hash %.3f s, vPCRs %.3f s, "
            "record %.3f s; pause %.3f s)",
            vm,
            record_id,
            save.leaves.root().hex()[:16],
            save.leaves.pages,
            save.hash_mode,
            save.hash_seconds,
            save.pcr_seconds,
            seal_seconds,
            self.last_pause[vm],
        )
        return Allow()

    def _begin(self, vm: str) -> _Save:
        t0 = self._clock()
        pid = qemu_pid_of(self.bridges, vm)
        leaves, mode, note = self._hash_at_stop(vm, pid)
        leaves.root()  # the node cache, while nothing else waits
        hashed = self._clock() - t0
        t1 = self._clock()
        vpcrs = self.bridges.read_pcrs(vm)
        save = _Save(pid, leaves, mode, hashed, vpcrs, t0, hash_note=note)
        save.pcr_seconds = self._clock() - t1
        with self._lock:
            self._saves[vm] = save
        return save

    def _seal(self, vm: str, save: _Save) -> str:
        missing = [BLOB_NAMES[t] for t in BLOB_NAMES if t not in save.blobs]
        if missing:
            raise SealError(f"blobs {missing} never came: refusing to seal a partial state")
        when = self._now()
        record_id = f"{vm}.{int(when.timestamp() * 1e9)}"
        sealed = SealedState(
            record_id=record_id,
            vm_uuid=vm,
            vm_name=self._vm_name(vm),
            host_id=self.host_id,
            sealed_at=when.isoformat(),
            origin="save",
            memory_root=save.leaves.root(),
            layout=save.leaves.layout,
            hash_mode=save.hash_mode,
            blobs=dict(save.blobs),
            vpcrs=save.vpcrs,
            domain_xml_sha256=self._xml_digest(vm),
            extra={
                "hash_seconds": round(save.hash_seconds, 4),
                "qemu_pid": save.pid,
                **({"hash_note": save.hash_note} if save.hash_note else {}),
            },
        )
        put_sealed(self.store, sealed, save.leaves)
        return record_id
