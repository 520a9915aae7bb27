"""A minimal synchronous QMP client and a QEMU launcher for memory tests (no guest OS needed).

QEMU starts paused (``-S``) with its RAM in a memfd and deterministic data loaded into it by the
generic loader device, so the memfd, a migration stream and an ELF dump can be taken of the same
RAM. Kept tiny on purpose; the richer helpers live in ``tests/helpers/qemu.py``.
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

__all__ = ["QemuRam", "Qmp", "make_ram_image", "qemu_with_ram"]


class Qmp:
    """One QMP connection: ``execute(cmd, **args)`` returns ``return`` or raises RuntimeError."""

    def __init__(self, path: Path, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self._sock.connect(str(path))
                break
            except OSError:
                self._sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        self._sock.settimeout(timeout)
        self._file = self._sock.makefile("rwb")
        self._read()  # greeting
        self.execute("qmp_capabilities")

    def _read(self) -> dict[str, Any]:
        while True:
            line = self._file.readline()
            if not line:
                raise RuntimeError("QMP connection closed")
            msg: dict[str, Any] = json.loads(line)
            if "event" not in msg:
                return msg

    def execute(self, cmd: str, **args: Any) -> Any:
        msg: dict[str, Any] = {"execute": cmd}
        if args:
            msg["arguments"] = args
        self._file.write(json.dumps(msg).encode() + b"\n")
        self._file.flush()
        reply = self._read()
        if "error" in reply:
            raise RuntimeError(f"QMP {cmd}: {reply['error']}")
        return reply.get("return")

    def close(self) -> None:
        self._file.close()
        self._sock.close()

    def save_stream(self, path: Path, timeout: float = 60.0) -> None:
        """Write a migration stream of the (paused) VM to ``path`` and wait for it."""
        self.save_stream_command(f"cat > {path}", timeout)

    def save_stream_command(self, command: str, timeout: float = 60.0) -> None:
        """Send a migration stream to a shell command (``exec:``) and wait for QEMU's side."""
        self.execute("migrate-set-parameters", **{"max-bandwidth": 100 * 1024**3})
        self.execute("migrate", uri=f"exec:{command}")
        deadline = time.monotonic() + timeout
        while True:
            status = self.execute("query-migrate").get("status")
            if status == "completed":
                return
            if status in ("failed", "cancelled") or time.monotonic() > deadline:
                raise RuntimeError(f"migration ended {status}")
            time.sleep(0.02)

    def dump_elf(self, path: Path) -> None:
        """``dump-guest-memory`` (ELF, no paging) to ``path``; synchronous."""
        self.execute("dump-guest-memory", paging=False, protocol=f"file:{path}")


class QemuRam:
    def __init__(self, proc: subprocess.Popen[bytes], qmp: Qmp, block: str) -> None:
        self.proc = proc
        self.qmp = qmp
        self.block = block

    @property
    def pid(self) -> int:
        return self.proc.pid


def make_ram_image(path: Path, size: int, seed: int = 1) -> bytes:
    """Deterministic mixed data: runs of random pages (from SHA-256 in counter mode) and zero
    pages, plus pages that are zero but for one byte. Returns the bytes written."""
    import hashlib

    out = bytearray(size)
    page = 4096
    for i in range(size // page):
        kind = hashlib.sha256(b"kind%d/%d" % (seed, i // 7)).digest()[0] % 3
        if kind == 0:
            continue
        if kind == 1:
            out[i * page] = 1 + (i % 250)
            continue
        stream = b"".join(
            hashlib.sha256(b"%d/%d/%d" % (seed, i, j)).digest() for j in range(page // 32)
        )
        out[i * page : (i + 1) * page] = stream
    path.write_bytes(out)
    return bytes(out)


@contextmanager
def qemu_with_ram(
    workdir: Path,
    image: Path,
    *,
    mem_mib: int = 64,
    load_addr: int = 0x100000,
    block: str = "pc.ram",
    extra: tuple[str, ...] = (),
) -> Iterator[QemuRam]:
    """A paused QEMU (TCG, no guest OS) whose memfd RAM holds ``image`` at ``load_addr``.

    The memory backend's id is ``block`` (libvirt names it ``pc.ram``), which is also the RAM block
    name in the migration stream.
    """
    qmp_path = workdir / "qmp.sock"
    cmd = [
        "qemu-system-x86_64",
        "-machine",
        f"pc,accel=tcg,memory-backend={block}",
        "-object",
        f"memory-backend-memfd,id={block},size={mem_mib}M,share=on",
        "-m",
        str(mem_mib),
        "-S",
        "-display",
        "none",
        "-nodefaults",
        "-device",
        f"loader,file={image},addr={load_addr:#x},force-raw=on",
        "-qmp",
        f"unix:{qmp_path},server=on,wait=off",
        *extra,
    ]
    log = open(workdir / "qemu.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    qmp = None
    try:
        qmp = Qmp(qmp_path)
        # The loader copies the image into RAM at reset, which -S has already done.
        yield QemuRam(proc, qmp, block)
    finally:
        if qmp is not None:
            with suppress(RuntimeError, OSError):
                qmp.execute("quit")
            qmp.close()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
