"""The libvirt adapter against the real embedded driver: domain operations, typed lifecycle events,
errors wrapped once as HypervisorError.

libvirt binds a process to the first embedded root it opens, for the life of the process (closing
every connection does not release it). Other modules of this run may bind the pytest process to
their own root, so the adapter runs here in one worker process of its own (``spawn``): the
module's tests send it plain calls and get plain data back; libvirt objects never leave the
worker, as they never leave the adapter. The domain uses libvirt's own emulator TPM backend:
these tests are about the adapter, not the bridge (tests/vm/test_vm_adopt.py covers that).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

import pytest

from vm_images.build import GuestImage

BOOT_TIMEOUT = 120.0

# ---------------------------------------------------------------------------- the worker side

_HV: Any = None
_EVENTS: list[Any] = []


def _w_open(root: str) -> str:
    from host_agent.lifecycle.embedded import embedded_uri, prepare_embedded_root
    from host_agent.lifecycle.libvirt_adapter import Hypervisor

    global _HV
    prepare_embedded_root(Path(root))
    _HV = Hypervisor(embedded_uri(Path(root)))
    _HV.subscribe(_EVENTS.append)
    return str(_HV.uri)


def _plain(value: Any) -> Any:
    import dataclasses
    import enum

    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def _w_call(method: str, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """Call ``Hypervisor.<method>``; return its result (plain data) and seconds, or the error."""
    from evidence.errors import VtpmError
    from host_agent.lifecycle.libvirt_adapter import HypervisorError

    t0 = time.monotonic()
    try:
        result = getattr(_HV, method)(*args, **kwargs)
    except VtpmError as err:
        out: dict[str, Any] = {"error": type(err).__name__, "id": err.id, "message": str(err)}
        if isinstance(err, HypervisorError):
            out.update(code=err.code, domain=err.domain, vm=err.vm)
        return out
    return {"result": _plain(result), "seconds": time.monotonic() - t0}


def _w_open_other_root(root: str) -> dict[str, Any]:
    from host_agent.lifecycle.embedded import embedded_uri, prepare_embedded_root
    from host_agent.lifecycle.libvirt_adapter import Hypervisor, HypervisorError

    prepare_embedded_root(Path(root))
    try:
        Hypervisor(embedded_uri(Path(root))).close()
    except HypervisorError as err:
        return {"error": type(err).__name__, "id": err.id, "message": str(err)}
    return {"result": "opened"}


def _w_wait_events(vm_uuid: str, names: list[str], timeout: float) -> list[str]:
    """The event names seen for ``vm_uuid`` once every one of ``names`` arrived (or timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        seen = [e.name for e in _EVENTS if e.vm.uuid == vm_uuid]
        if all(n in seen for n in names) or time.monotonic() > deadline:
            return seen
        time.sleep(0.02)


def _w_close() -> None:
    if _HV is not None:
        _HV.close()


# ---------------------------------------------------------------------------- fixtures


class Worker:
    def __init__(self, pool: ProcessPoolExecutor) -> None:
        self.pool = pool

    def run(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        return self.pool.submit(fn, *args, **kwargs).result(timeout=300)

    def call(self, method: str, *args: Any, **kwargs: Any) -> dict[str, Any]:
        out = self.run(_w_call, method, *args, **kwargs)
        assert isinstance(out, dict)
        return out

    def ok(self, method: str, *args: Any, **kwargs: Any) -> Any:
        out = self.call(method, *args, **kwargs)
        assert "error" not in out, out
        return out["result"]


@pytest.fixture(scope="module")
def root() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="la-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def worker(root: Path) -> Iterator[Worker]:
    pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))
    w = Worker(pool)
    w.run(_w_open, str(root / "lv"))
    yield w
    with contextlib.suppress(Exception):
        for d in w.ok("domains"):
            if d["active"]:
                w.call("destroy", d["uuid"])
            w.call("undefine", d["uuid"], keep_tpm=False)
        w.run(_w_close)
    pool.shutdown(wait=True)


def _domain_xml(image: GuestImage, name: str, vm_uuid: str, console: Path) -> str:
    return f"""<domain type='qemu'>
  <name>{name}</name><uuid>{vm_uuid}</uuid>
  <memory unit='MiB'>256</memory><vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type><kernel>{image.kernel}</kernel>
      <initrd>{image.initramfs}</initrd><cmdline>{escape(image.cmdline)}</cmdline></os>
  <features><acpi/><apic/></features>
  <devices>
    <serial type='file'><source path='{console}' append='on'/><target port='0'/></serial>
    <tpm model='tpm-crb'><backend type='emulator' version='2.0'/></tpm>
    <memballoon model='none'/>
  </devices>
</domain>"""


def _wait_ready(console: Path, count: int = 1, timeout: float = BOOT_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while True:
        text = console.read_text(errors="replace") if console.exists() else ""
        if text.count("VTPM-GUEST-READY") >= count:
            return
        assert time.monotonic() < deadline, f"no READY on the console: {text[-1500:]}"
        time.sleep(0.1)


# ---------------------------------------------------------------------------- tests


def test_domain_operations_and_their_lifecycle_events(
    worker: Worker, root: Path, guest_image: GuestImage
) -> None:
    vm_uuid, name = str(uuid.uuid4()), "adapter1"
    console = root / "adapter1.console"
    timings: dict[str, float] = {}

    out = worker.call("define", _domain_xml(guest_image, name, vm_uuid, console))
    assert out["result"] == {"name": name, "uuid": vm_uuid}
    timings["define"] = out["seconds"]
    assert worker.ok("lookup", name) == worker.ok("lookup", vm_uuid.upper()) == out["result"]
    info = worker.ok("info", name)
    assert (info["state"], info["active"], info["persistent"]) == ("shutoff", False, True)

    timings["start"] = worker.call("start", name)["seconds"]
    _wait_ready(console)
    assert worker.ok("info", name)["state"] == "running"
    assert "<backend type='emulator'" in worker.ok("xml", name)

    worker.ok("suspend", name)
    assert worker.ok("info", name)["state"] == "paused"
    worker.ok("resume", name)

    dump = root / "adapter1.core"
    timings["core_dump"] = worker.call("core_dump", name, dump)["seconds"]
    assert dump.read_bytes()[:4] == b"\x7fELF"
    dump.unlink()
    snap_mem = root / "adapter1.snap1.mem"
    out = worker.call("snapshot", name, "snap1", memory_file=snap_mem)
    assert out["result"] == "snap1" and snap_mem.stat().st_size > 0
    assert worker.ok("snapshot_memory_file", name, "snap1") == str(snap_mem)
    assert worker.call("snapshot_xml", name, "nope")["error"] == "HypervisorError"
    timings["snapshot"] = out["seconds"]
    assert worker.ok("info", name)["state"] == "running"

    image = root / "adapter1.save"
    timings["save"] = worker.call("save", name, image)["seconds"]
    assert worker.ok("info", name)["state"] == "shutoff"
    assert vm_uuid in worker.ok("save_image_xml", image)
    out = worker.call("restore", image)
    assert out["result"] == {"name": name, "uuid": vm_uuid}
    timings["restore"] = out["seconds"]
    assert worker.ok("info", name)["state"] == "running"

    worker.ok("destroy", name)
    worker.ok("destroy", name)  # a stopped domain: not an error
    worker.ok("undefine", name, keep_tpm=False)

    want = [
        "defined.added", "started.booted", "suspended.paused", "resumed.unpaused",
        "stopped.saved", "started.restored", "stopped.destroyed", "undefined.removed",
    ]  # fmt: skip
    seen = worker.run(_w_wait_events, vm_uuid, want, 15.0)
    # libvirt adds its own (start resumes the -S CPUs, a snapshot pauses briefly): ours come in
    # this order among them
    rest = iter(seen)
    assert all(n in rest for n in want), seen
    print("\nembedded driver, 256 MiB TCG guest: " + ", ".join(
        f"{k} {v:.2f} s" for k, v in timings.items()
    ))  # fmt: skip


def test_errors_are_hypervisor_errors_with_libvirt_code_and_domain(
    worker: Worker, root: Path
) -> None:
    missing = worker.call("lookup", "no-such-domain")
    assert missing["error"] == "DomainNotFound" and missing["id"] == "hypervisor.domain_not_found"
    assert missing["code"] == 42 and missing["vm"] == "no-such-domain"  # VIR_ERR_NO_DOMAIN
    assert worker.call("info", str(uuid.uuid4()))["error"] == "DomainNotFound"

    bad = worker.call("define", "<domain type='qemu'><name>x</name></domain>")
    assert bad["error"] == "HypervisorError" and bad["id"] == "hypervisor.error"
    assert isinstance(bad["code"], int) and isinstance(bad["domain"], int)
    assert "define" in bad["message"]

    other = worker.run(_w_open_other_root, str(root / "other"))
    assert other["error"] == "EmbeddedRootBusy", other
    assert "one root per process" in other["message"]


def test_domains_lists_every_domain_with_its_state(
    worker: Worker, root: Path, guest_image: GuestImage
) -> None:
    vm_uuid = str(uuid.uuid4())
    worker.ok("define", _domain_xml(guest_image, "listed1", vm_uuid, root / "listed1.console"))
    try:
        doms = worker.ok("domains")
        (mine,) = [d for d in doms if d["uuid"] == vm_uuid]
        assert mine == {
            "name": "listed1", "uuid": vm_uuid, "state": "shutoff", "active": False,
            "persistent": True,
        }  # fmt: skip
        assert [d["name"] for d in doms] == sorted(d["name"] for d in doms)
    finally:
        worker.ok("undefine", vm_uuid)
    assert worker.call("lookup", vm_uuid)["error"] == "DomainNotFound"
