"""Keep a test guest busy in the background: memory writes and TPM commands without pause.

Shell commands for the vm_images guest (busybox + python3), to run over whatever reaches the
guest (``Guest.check`` on its serial console, or SSH through ``tests.helpers.guest_tenant``):

- :data:`START_MEMWRITER`: ``memwriter`` rewrites 64 random pages every 2 ms;
- :func:`start_tpm_loop`: TPM2_GetRandom(16) on ``/dev/tpmrm0`` without pause, each answer
  checked; every 50 answers the count goes to ``/tmp/tpm.count``, and the first error or wrong
  answer to ``/tmp/tpm.err`` (then the loop stops);
- :data:`READ_TPM_LOOP` and :func:`tpm_answers`: the count so far, failing on a reported error;
- :data:`STOP_BUSY`: both stopped.
"""

from __future__ import annotations

import shlex

__all__ = ["READ_TPM_LOOP", "START_MEMWRITER", "STOP_BUSY", "start_tpm_loop", "tpm_answers"]

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
