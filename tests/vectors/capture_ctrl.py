"""Capture golden bytes of swtpm's control channel from its two real clients.

A recording relay listens on a unix socket, connects to swtpm's ``--ctrl`` socket for every client
it accepts, and copies each ``recvmsg`` across unchanged, file descriptors included (SCM_RIGHTS is
passed through, so QEMU's data fd reaches swtpm as it would directly). Every chunk is recorded with
its direction, bytes and number of passed fds.

Scenarios (each writes ``tests/vectors/ctrl/<name>.json``):

- ``swtpm_ioctl``: one ``swtpm_ioctl`` run per command against a fresh swtpm 0.7.1: -c, -e before
  INIT, -i, -e, -l 0, -r 0, -b 0, -g, --info 1, -v, -C, -h, --save permanent/volatile/savestate,
  --stop, -e while stopped, --save while stopped, --load permanent/volatile, -b 4096 while
  stopped, -i, -s.
- ``qemu_boot_save``: QEMU 7.2 ``-tpmdev emulator`` boots the vm_images guest to READY, is saved
  with ``migrate`` to a file, and quits.
- ``qemu_restore``: a new QEMU ``-incoming`` restores that file into a fresh swtpm, runs, quits.

Run ``python tests/vectors/capture_ctrl.py`` (needs swtpm, swtpm_ioctl, qemu-system-x86_64 and the
cached test image). The transcripts are deterministic up to the blob contents (timestamps and
random seeds inside the TPM state) and the number of guest data commands.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
OUT = REPO / "tests" / "vectors" / "ctrl"
sys.path.insert(0, str(REPO))


class RecordingRelay:
    """Relay unix stream clients to ``target`` (one at a time), recording every chunk."""

    def __init__(self, listen: Path, target: Path) -> None:
        self.listen_path = listen
        self.target = target
        self.sessions: list[list[dict[str, Any]]] = []
        self._srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._srv.bind(str(listen))
        self._srv.listen(4)
        self._stop = False
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop:
            try:
                client, _ = self._srv.accept()
            except OSError:
                return
            upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            for _ in range(200):
                try:
                    upstream.connect(str(self.target))
                    break
                except OSError:
                    time.sleep(0.01)
            log: list[dict[str, Any]] = []
            self.sessions.append(log)
            lock = threading.Lock()
            t1 = threading.Thread(target=self._pump, args=(client, upstream, "c2s", log, lock))
            t2 = threading.Thread(target=self._pump, args=(upstream, client, "s2c", log, lock))
            t1.start()
            t2.start()
            t1.join()
            t2.join()
            client.close()
            upstream.close()

    @staticmethod
    def _pump(
        src: socket.socket,
        dst: socket.socket,
        direction: str,
        log: list[dict[str, Any]],
        lock: threading.Lock,
    ) -> None:
        while True:
            try:
                data, fds, _flags, _addr = socket.recv_fds(src, 1 << 20, 4)
            except OSError:
                data, fds = b"", []
            if not data:
                with contextlib.suppress(OSError):
                    dst.shutdown(socket.SHUT_WR)
                return
            with lock:
                log.append({"dir": direction, "hex": data.hex(), "fds": len(fds)})
            try:
                if fds:
                    socket.send_fds(dst, [data], fds)
                    for fd in fds:
                        os.close(fd)
                else:
                    dst.sendall(data)
            except OSError:
                return

    def close(self) -> None:
        self._stop = True
        self._srv.close()


def _swtpm(state: Path, ctrl: Path) -> subprocess.Popen[bytes]:
    state.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [
            "swtpm",
            "socket",
            "--tpm2",
            "--tpmstate",
            f"dir={state}",
            "--ctrl",
            f"type=unixio,path={ctrl}",
            "--log",
            f"file={state}/swtpm.log,level=1",
        ]
    )
    while not ctrl.exists():
        time.sleep(0.01)
    time.sleep(0.05)
    return proc


def _version(cmd: list[str]) -> str:
    out = subprocess.run(cmd, capture_output=True, text=True).stdout + ""
    return out.strip().splitlines()[0] if out.strip() else "?"


def _write(name: str, sessions: list[dict[str, Any]], note: str) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    doc = {
        "format": "vtpm-trust/ctrl-transcript/1",
        "name": name,
        "captured": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "swtpm": _version(["swtpm", "--version"]),
        "qemu": _version(["qemu-system-x86_64", "--version"]),
        "note": note,
        "sessions": sessions,
    }
    (OUT / f"{name}.json").write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {OUT / name}.json: {len(sessions)} sessions")


def capture_swtpm_ioctl(work: Path) -> None:
    work.mkdir(parents=True)
    ctrl = work / "swtpm.ctrl"
    relay_path = work / "relay.sock"
    proc = _swtpm(work / "state", ctrl)
    relay = RecordingRelay(relay_path, ctrl)
    blobs = work / "blobs"
    blobs.mkdir()
    steps: list[list[str]] = [
        ["-c"],
        ["-e"],
        ["-i"],
        ["-e"],
        ["-l", "0"],
        ["-r", "0"],
        ["-b", "0"],
        ["-g"],
        ["--info", "1"],
        ["-v"],
        ["-C"],
        ["-h", "abc"],
        ["--save", "permanent", str(blobs / "perm")],
        ["--save", "volatile", str(blobs / "vol")],
        ["--save", "savestate", str(blobs / "save")],
        ["--stop"],
        ["-e"],
        ["--save", "permanent", str(blobs / "perm2")],
        ["--load", "permanent", str(blobs / "perm")],
        ["--load", "volatile", str(blobs / "vol")],
        ["-b", "4096"],
        ["-i"],
        ["-s"],
    ]
    labels = []
    for step in steps:
        res = subprocess.run(
            ["swtpm_ioctl", "--unix", str(relay_path), *step], capture_output=True, text=True
        )
        labels.append({"args": step, "rc": res.returncode, "stdout": res.stdout.strip()[:300]})
        time.sleep(0.05)
    proc.wait(10)
    relay.close()
    sessions = [
        {"client": "swtpm_ioctl " + " ".join(lab["args"]), "tool": lab, "chunks": chunks}
        for lab, chunks in zip(labels, relay.sessions, strict=True)
    ]
    _write(
        "swtpm_ioctl",
        sessions,
        "one swtpm_ioctl run per session against one fresh swtpm (no swtpm_setup); "
        "blob paths point at a deleted temp dir",
    )


def capture_qemu(work: Path) -> None:
    work.mkdir(parents=True, exist_ok=True)
    from tests.helpers.qemu import GuestConfig, start_guest
    from vm_images.build import build_image

    img = build_image()
    base = GuestConfig(
        kernel=img.kernel,
        initramfs=img.initramfs,
        ssh_key=img.ssh_private_key,
        ssh_host_key=img.ssh_host_public_key,
        cmdline=img.cmdline,
        net=False,
    )
    ctrl = work / "swtpm1.ctrl"
    proc = _swtpm(work / "state1", ctrl)
    relay = RecordingRelay(work / "relay1.sock", ctrl)
    guest = start_guest(base.with_(tpm_socket=work / "relay1.sock"), work / "g1")
    image = work / "save.img"
    guest.qmp.stop()
    guest.qmp.migrate_to_file(image)
    guest.shutdown()
    proc.wait(10)
    relay.close()
    _write(
        "qemu_boot_save",
        [
            {
                "client": "qemu boot to READY, stop, migrate to file, quit",
                "chunks": relay.sessions[0],
            }
        ],
        "QEMU -machine pc (SeaBIOS), tpm-crb, vm_images guest; data-channel traffic not recorded",
    )

    ctrl2 = work / "swtpm2.ctrl"
    proc2 = _swtpm(work / "state2", ctrl2)
    relay2 = RecordingRelay(work / "relay2.sock", ctrl2)
    guest2 = start_guest(
        base.with_(tpm_socket=work / "relay2.sock", incoming=f"exec:cat {image}"), work / "g2"
    )
    deadline = time.monotonic() + 30
    while guest2.qmp.query_status() != "paused" and time.monotonic() < deadline:
        time.sleep(0.05)
    guest2.qmp.cont()
    time.sleep(1.0)
    guest2.shutdown()
    proc2.wait(10)
    relay2.close()
    _write(
        "qemu_restore",
        [{"client": "qemu -incoming exec:cat FILE, cont, quit", "chunks": relay2.sessions[0]}],
        "restore of qemu_boot_save's image into a fresh swtpm",
    )


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="ctrlcap-", dir="/tmp"))
    try:
        capture_swtpm_ioctl(work / "ioctl")
        capture_qemu(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
