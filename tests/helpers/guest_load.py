"""Keep a test guest busy in the background: memory writes and TPM commands without pause.

Shell commands for the vm_images guest (busybox + python3), to run over whatever reaches the
guest (``Guest.check`` on its serial console, or SSH through ``tests.helpers.guest_tenant``):

- :data:`START_MEMWRITER`: ``memwriter`` rewrites 64 random pages every 2 ms;
- :func:`start_tpm_loop`: TPM2_GetRandom(16) on ``/dev/tpmrm0`` without pause, each answer
  checked; every 50 answers the count goes to ``/tmp/tpm.count``, and the first error or wrong
  answer to ``/tmp/tpm.err`` (then the loop stops);
- :data:`READ_TPM_LOOP` and :func:`tpm_answers`: the count so far, failing on a reported error;
- :data:`STOP_BUSY`: both stopped;
- :data:`GUEST_LOAD` with :func:`run_py`: a TPM load for a given time, in the foreground;
- :data:`GUEST_EXTEND` with :func:`run_py`: extends PCR 23 with SHA-256 of its argument.
"""

from __future__ import annotations

import shlex
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tests.helpers.qemu import Guest

__all__ = [
    "GUEST_EXTEND",
    "GUEST_LOAD",
    "READ_TPM_LOOP",
    "START_MEMWRITER",
    "STOP_BUSY",
    "run_py",
    "start_tpm_loop",
    "tpm_answers",
]

TPM_LOOP = r"""
import os, struct
fd = os.open("/dev/tpmrm0", os.O_RDWR)
cmd = struct.pack(">HIIH", 0x8001, 12, 0x17B, 16)
n = 0
while True:
    try:
        os.write(fd, cmd)
        r = os.read(fd, 4096)
        ok = r[6:10] == bytes(4) and len(r) == 12 + 16
    except OSError as err:
        r, ok = repr(err).encode(), False
    if not ok:
        open("/tmp/tpm.err", "w").write(r.hex())
        break
    n += 1
    if n % 50 == 0:
        open("/tmp/tpm.count.tmp", "w").write(str(n))
        os.rename("/tmp/tpm.count.tmp", "/tmp/tpm.count")
"""

START_MEMWRITER = "(memwriter -m 64 -r 1000000 -n 64 -i 2 </dev/null >/dev/null 2>&1 &)"
READ_TPM_LOOP = "cat /tmp/tpm.err 2>/dev/null; echo; cat /tmp/tpm.count 2>/dev/null || echo 0"
STOP_BUSY = "killall memwriter; kill $(cat /tmp/tpmloop.pid)"


def start_tpm_loop() -> str:
    """The shell command that writes the loop into the guest and starts it in the background."""
    write = f"printf %s {shlex.quote(TPM_LOOP)} > /tmp/tpmloop.py"
    run = "python3 /tmp/tpmloop.py </dev/null >/dev/null 2>&1"
    return f"{write} && ({run} & echo $! > /tmp/tpmloop.pid)"


def tpm_answers(output: str) -> int:
    """The loop's answer count from :data:`READ_TPM_LOOP`'s output; AssertionError if the loop
    reported an error or a wrong answer (its hex)."""
    err, count = output.split("\n", 1)
    assert err == "", f"the guest's TPM loop failed: {err}"
    return int(count.strip())


#: For :func:`run_py` with a duration in seconds: GetRandom(n) and PCR_Read(23) on /dev/tpmrm0,
#: every response checked; prints ``BAD i HEX`` per wrong answer, then ``DONE count errors``.
GUEST_LOAD = r"""
import os, struct, sys, time
fd = os.open("/dev/tpmrm0", os.O_RDWR)
end = time.time() + float(sys.argv[1])
i = errors = 0
while time.time() < end:
    i += 1
    n = 1 + i % 32
    if i % 4:
        os.write(fd, struct.pack(">HIIH", 0x8001, 12, 0x17B, n))
        want = 12 + n
    else:
        os.write(fd, struct.pack(">HIIIHB3s", 0x8001, 20, 0x17E, 1, 0xB, 3, b"\0\0\x80"))
        want = 10 + 4 + 4 + 2 + 1 + 3 + 4 + 2 + 32
    r = os.read(fd, 4096)
    tag, size, rc = struct.unpack(">HII", r[:10])
    if rc or size != len(r) or len(r) != want:
        errors += 1
        print("BAD", i, r.hex(), flush=True)
print("DONE", i, errors, flush=True)
"""

#: For :func:`run_py` with one argument: TPM2_PCR_Extend of PCR 23 (sha256) with SHA-256 of the
#: argument; prints ``EXTENDED``.
GUEST_EXTEND = r"""
import os, struct, hashlib, sys
fd = os.open("/dev/tpmrm0", os.O_RDWR)
auth = struct.pack(">IHBH", 0x40000009, 0, 0, 0)
body = struct.pack(">II", 23, len(auth)) + auth + struct.pack(">IH", 1, 0xB)
body += hashlib.sha256(sys.argv[1].encode()).digest()
os.write(fd, struct.pack(">HII", 0x8002, 10 + len(body), 0x182) + body)
r = os.read(fd, 4096)
assert struct.unpack(">I", r[6:10])[0] == 0, r.hex()
print("EXTENDED")
"""


def run_py(guest: Guest, script: str, *args: str, timeout: float = 120) -> str:
    """Run the Python ``script`` in ``guest`` (serial console) with ``args``; its stdout."""
    return guest.check(
        f"python3 - {' '.join(args)}", stdin=script.encode(), timeout=timeout
    ).decode()
