"""Benchmark of the bridge's data-channel relay (not a test: it asserts nothing about time).

Two identical fresh swtpm 0.7.1 instances. A client that speaks QEMU's side of the protocol
(SET_DATAFD with a socketpair, STOP/SET_BUFFERSIZE/INIT, TPM2_Startup) sends the same TPM
command N times, one at a time, and times each round trip:

  * straight to swtpm's control socket (the baseline: what QEMU does without a bridge);
  * through the bridge, run as its own process (``python -m host_agent.vtpm.bridge``), as in
    production;
  * through a bare relay (the floor): a process that only copies bytes between the two data
    sockets, with no control channel, framing or injection. Any relay in a separate process pays
    its two extra wake-ups per round trip; the bridge / floor ratio shows what the bridge adds
    beyond them.

It prints median and p99 round-trip times per command, the ratio bridge / direct of the
medians (goal: <= 1.2) and the ratio bridge / bare relay. Commands: TPM2_GetRandom(16),
TPM2_PCR_Read(sha256, PCR 0-7), TPM2_Hash(1 KiB, sha256), TPM2_CreatePrimary(ECC P-256
storage key; flushed after each, untimed).

With ``--guest`` it also boots the vm_images test guest twice under QEMU/TCG, once on swtpm
directly and once through the bridge, and times TPM2_GetRandom(16) on the guest's /dev/tpmrm0:
the latency the guest sees, which is what the bridge must not noticeably change.

Usage: ``python bench/bridge.py [-n 3000] [--spin-us 0] [--guest] [--json]``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from host_agent.vtpm import ctrl_codec as cc  # noqa: E402


def tpm_cmd(code: int, body: bytes) -> bytes:
    return struct.pack(">HII", 0x8001, 10 + len(body), code) + body


def _create_primary_ecc() -> bytes:
    auth = struct.pack(">IHBH", 0x40000009, 0, 0, 0)
    public = struct.pack(">HHI", 0x0023, 0x000B, 0x00030072) + struct.pack(">H", 0)
    public += struct.pack(">HHH", 0x0006, 128, 0x0043) + struct.pack(">HHH", 0x0010, 3, 0x0010)
    public += struct.pack(">HH", 0, 0)
    body = struct.pack(">II", 0x40000001, len(auth)) + auth
    body += struct.pack(">HHH", 4, 0, 0) + struct.pack(">H", len(public)) + public
    body += struct.pack(">HI", 0, 0)
    return struct.pack(">HII", 0x8002, 10 + len(body), 0x131) + body


COMMANDS = {
    "GetRandom(16)": tpm_cmd(0x17B, struct.pack(">H", 16)),
    "PCR_Read(sha256, 0-7)": tpm_cmd(0x17E, struct.pack(">IHB3s", 1, 0x000B, 3, b"\xff\0\0")),
    "Hash(1 KiB, sha256)": tpm_cmd(
        0x17D, struct.pack(">H", 1024) + bytes(1024) + struct.pack(">HI", 0x000B, 0x40000007)
    ),
    "CreatePrimary(ECC P-256)": _create_primary_ecc(),
}


def start_swtpm(d: Path) -> subprocess.Popen[bytes]:
    d.mkdir(parents=True)
    ctrl = d / "swtpm.sock"
    proc = subprocess.Popen(
        ["swtpm", "socket", "--tpm2", "--tpmstate", f"dir={d}",
         "--ctrl", f"type=unixio,path={ctrl}", "--log", f"file={d}/swtpm.log,level=0"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    while not ctrl.exists():
        time.sleep(0.01)
    time.sleep(0.05)
    return proc


# The floor: copy bytes between two inherited sockets until either side closes.
BARE_RELAY = r"""
import selectors, socket, sys
a, b = (socket.socket(fileno=int(f)) for f in sys.argv[1:3])
sel = selectors.DefaultSelector()
sel.register(a, selectors.EVENT_READ, b)
sel.register(b, selectors.EVENT_READ, a)
while True:
    for key, _ in sel.select():
        data = key.fileobj.recv(65536)
        if not data:
            sys.exit()
        key.data.sendall(data)
"""


def start_bare_relay(guest_end: socket.socket) -> tuple[subprocess.Popen[bytes], socket.socket]:
    """A bare relay between ``guest_end`` and a new socketpair; returns it and the end for swtpm."""
    relay_end, tpm_end = socket.socketpair()
    fds = [guest_end.fileno(), relay_end.fileno()]
    proc = subprocess.Popen([sys.executable, "-c", BARE_RELAY, *map(str, fds)], pass_fds=fds)
    relay_end.close()
    return proc, tpm_end


class Client:
    """QEMU's side: control requests and one-at-a-time TPM commands on the data fd.

    With ``relay`` the data fd given to swtpm is a bare relay's (the floor measurement)."""

    def __init__(self, ctrl_path: Path, *, relay: bool = False) -> None:
        self.ctrl = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        for _ in range(500):
            try:
                self.ctrl.connect(str(ctrl_path))
                break
            except OSError:
                time.sleep(0.01)
        ours, theirs = socket.socketpair()
        self.relay: subprocess.Popen[bytes] | None = None
        if relay:
            self.relay, to_tpm = start_bare_relay(theirs)
            theirs.close()
            theirs = to_tpm
        socket.send_fds(self.ctrl, [cc.SetDataFd().encode()], [theirs.fileno()])
        theirs.close()
        assert self.ctrl.recv(4) == b"\0\0\0\0"
        self.data = ours
        for req in (cc.Stop(), cc.SetBufferSize(0xF80), cc.Init(0)):
            self.ctrl.sendall(req.encode())
            dec = cc.ReplyDecoder()
            dec.expect(req, False)
            while (reply := dec.next_reply()) is None:
                dec.feed(self.ctrl.recv(4096))
            assert reply.result == 0, (req, reply)
        assert self.rt(tpm_cmd(0x144, b"\0\0"))[6:10] == b"\0\0\0\0"

    def rt(self, cmd: bytes) -> bytes:
        self.data.send(cmd)
        resp = self.data.recv(4096)
        size = struct.unpack_from(">I", resp, 2)[0]
        while len(resp) < size:
            resp += self.data.recv(4096)
        return resp

    def shutdown(self) -> None:
        self.ctrl.sendall(cc.Shutdown().encode())
        self.ctrl.recv(4)
        self.ctrl.close()
        self.data.close()
        if self.relay is not None:
            self.relay.wait(5)


def measure(client: Client, cmd: bytes, n: int) -> list[float]:
    for _ in range(20):  # warm-up
        resp = client.rt(cmd)
        if cmd[6:10] == b"\0\0\x01\x31":
            client.rt(tpm_cmd(0x165, resp[10:14]))
    times = []
    for _ in range(n):
        t0 = time.perf_counter_ns()
        resp = client.rt(cmd)
        times.append((time.perf_counter_ns() - t0) / 1000)
        if resp[6:10] != b"\0\0\0\0":
            raise SystemExit(f"TPM error {resp.hex()}")
        if cmd[6:10] == b"\0\0\x01\x31":  # CreatePrimary: flush the new object (not timed)
            client.rt(tpm_cmd(0x165, resp[10:14]))
    return times


GUEST_LOOP = r"""
import os, struct, time
fd = os.open("/dev/tpmrm0", os.O_RDWR)
cmd = struct.pack(">HIIH", 0x8001, 12, 0x17B, 16)
ts = []
for i in range(N + 50):
    t = time.perf_counter_ns()
    os.write(fd, cmd)
    r = os.read(fd, 4096)
    ts.append((time.perf_counter_ns() - t) / 1000)
    assert r[6:10] == bytes(4)
ts = sorted(ts[50:])
print(ts[len(ts) // 2], ts[len(ts) * 99 // 100])
"""


def guest_rtt(work: Path, n: int, spin_us: float) -> dict[str, float]:
    """Median/p99 of GetRandom(16) as the guest sees it, without and with the bridge."""
    from tests.helpers.qemu import GuestConfig, start_guest
    from vm_images.build import build_image

    img = build_image()
    base = GuestConfig(
        kernel=img.kernel, initramfs=img.initramfs, ssh_key=img.ssh_private_key,
        ssh_host_key=img.ssh_host_public_key, cmdline=img.cmdline,
    )  # fmt: skip
    out: dict[str, float] = {}
    for mode in ("direct", "bridge"):
        d = work / f"guest-{mode}"
        tpm = start_swtpm(d / "tpm")
        ctrl = d / "tpm" / "swtpm.sock"
        bridge = None
        if mode == "bridge":
            bridge = subprocess.Popen(
                [sys.executable, "-m", "host_agent.vtpm.bridge", "--vm-uuid", str(uuid.uuid4()),
                 "--listen", str(d / "ctrl.sock"), "--swtpm-ctrl", str(ctrl),
                 "--allow-unhooked-state-transfer", "--log-level", "WARNING",
                 "--response-spin-us", str(spin_us)],
                cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
            )  # fmt: skip
            while not (d / "ctrl.sock").exists():
                time.sleep(0.01)
            ctrl = d / "ctrl.sock"
        guest = start_guest(base.with_(tpm_socket=ctrl), d / "g")
        try:
            res = guest.check("python3 -", stdin=GUEST_LOOP.replace("N", str(n)).encode())
            med, p99 = map(float, res.split())
            out[f"{mode}_median_us"], out[f"{mode}_p99_us"] = round(med, 1), round(p99, 1)
        finally:
            guest.shutdown()
            for p in (bridge, tpm):
                if p is not None and p.poll() is None:
                    p.terminate()
                    p.wait(5)
    out["ratio"] = round(out["bridge_median_us"] / out["direct_median_us"], 3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=3000)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--guest", action="store_true", help="also time it from inside a guest")
    ap.add_argument("--spin-us", type=float, default=0.0, help="bridge --response-spin-us")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bb-", dir="/tmp"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        direct_tpm = start_swtpm(work / "direct")
        bridged_tpm = start_swtpm(work / "bridged")
        floor_tpm = start_swtpm(work / "floor")
        procs += [direct_tpm, bridged_tpm, floor_tpm]
        bridge = subprocess.Popen(
            [sys.executable, "-m", "host_agent.vtpm.bridge", "--vm-uuid", str(uuid.uuid4()),
             "--listen", str(work / "ctrl.sock"), "--swtpm-ctrl", str(work / "bridged/swtpm.sock"),
             "--allow-unhooked-state-transfer", "--log-level", "WARNING",
             "--response-spin-us", str(args.spin_us)],
            cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
        )  # fmt: skip
        procs.append(bridge)
        while not (work / "ctrl.sock").exists():
            time.sleep(0.01)
        direct = Client(work / "direct/swtpm.sock")
        bridged = Client(work / "ctrl.sock")
        floor = Client(work / "floor/swtpm.sock", relay=True)
        rows = []
        for name, cmd in COMMANDS.items():
            # alternate in blocks so drift (CPU frequency, other load) hits all sides alike
            d_all: list[float] = []
            b_all: list[float] = []
            f_all: list[float] = []
            for _ in range(5):
                d_all += measure(direct, cmd, args.n // 5)
                b_all += measure(bridged, cmd, args.n // 5)
                f_all += measure(floor, cmd, args.n // 5)
            d_med, b_med = statistics.median(d_all), statistics.median(b_all)
            f_med = statistics.median(f_all)
            q = lambda xs: statistics.quantiles(xs, n=100)[98]  # noqa: E731
            rows.append(
                {
                    "command": name,
                    "direct_median_us": round(d_med, 1),
                    "bridge_median_us": round(b_med, 1),
                    "direct_p99_us": round(q(d_all), 1),
                    "bridge_p99_us": round(q(b_all), 1),
                    "ratio": round(b_med / d_med, 3),
                    "added_us": round(b_med - d_med, 1),
                    "bare_relay_median_us": round(f_med, 1),
                    "bare_relay_ratio": round(f_med / d_med, 3),
                    "bridge_over_bare_relay": round(b_med / f_med, 3),
                }
            )
        direct.shutdown()
        bridged.shutdown()
        floor.shutdown()
        guest = guest_rtt(work, min(args.n, 2000), args.spin_us) if args.guest else None
        if args.json:
            print(json.dumps({"n": args.n, "rows": rows, "guest": guest}, indent=1))
            return
        print(f"TPM command round trip, {args.n} each (µs; bridge = separate process)")
        print(f"{'command':24} {'direct med':>10} {'bridge med':>10} {'direct p99':>10} "
              f"{'bridge p99':>10} {'ratio':>6} {'added':>6} {'bare relay':>10} "
              f"{'ratio':>6} {'bridge/bare':>11}")  # fmt: skip
        for r in rows:
            print(
                f"{r['command']:24} {r['direct_median_us']:10.1f} {r['bridge_median_us']:10.1f} "
                f"{r['direct_p99_us']:10.1f} {r['bridge_p99_us']:10.1f} {r['ratio']:6.3f} "
                f"{r['added_us']:6.1f} {r['bare_relay_median_us']:10.1f} "
                f"{r['bare_relay_ratio']:6.3f} {r['bridge_over_bare_relay']:11.3f}"
            )
        if guest is not None:
            print(
                f"{'guest GetRandom(16)':24} {guest['direct_median_us']:10.1f} "
                f"{guest['bridge_median_us']:10.1f} {guest['direct_p99_us']:10.1f} "
                f"{guest['bridge_p99_us']:10.1f} {guest['ratio']:6.3f} "
                f"{guest['bridge_median_us'] - guest['direct_median_us']:6.1f}"
            )
        print("goal: ratio <= 1.2 (bridge / direct); bare relay = the floor of any relay process")
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(5)
                except subprocess.TimeoutExpired:
                    p.kill()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
