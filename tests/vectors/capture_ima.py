"""Capture real IMA measurement lists and the TPM's PCR 10 from a Linux guest (run by hand).

This is how the golden vectors in ``tests/vectors/ima/`` were made; tests read the saved files and
never run this script. It boots the Debian kernel under QEMU/TCG with a fresh swtpm (all four PCR
banks active, since no ``swtpm_setup`` restricts them), a tiny busybox initramfs whose ``/init``
loads a custom IMA policy, runs a few programs, provokes both kinds of violation, then prints
PCR 10 of every bank, the ASCII and the binary lists (base64) and PCR 10 again to the serial
console. The script checks that both PCR reads agree, so the lists are exactly the ones the TPM
holds, and saves one ``<name>.ascii`` / ``<name>.bin`` / ``<name>.json`` triple per configuration.

Usage: ``python tests/vectors/capture_ima.py [--out tests/vectors/ima] [--only NAME]``
Needs qemu-system-x86_64, swtpm, cpio, busybox-static and the kernel below
(docs: ../shared/docs/platform-notes.md §5).
"""

from __future__ import annotations

import argparse
import base64
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

KERNEL_VERSION = "6.1.0-56-amd64"
KERNEL = Path(f"/boot/vmlinuz-{KERNEL_VERSION}")
BUSYBOX = Path("/bin/busybox")
BANKS = ("sha1", "sha256", "sha384", "sha512")

# One rule per line, written in one go (IMA accepts one policy write without IMA_WRITE_POLICY).
# fowner=1000 keeps FILE_CHECK to the two files the script prepares, so the list stays small.
POLICY = (
    "measure func=BPRM_CHECK\n"
    "measure func=FILE_CHECK mask=MAY_READ fowner=1000\n"
    "measure func=CRITICAL_DATA\n"
)

# name -> extra kernel command line. Every configuration measures the same actions.
CONFIGS: dict[str, str] = {
    "linux-6.1-ima-ng-sha256": "ima_policy=tcb|critical_data ima_hash=sha256 ima_template=ima-ng",
    "linux-6.1-ima-sig-sha256": "ima_policy=tcb|critical_data ima_hash=sha256 ima_template=ima-sig",
    "linux-6.1-ima-sha1": "ima_policy=tcb|critical_data ima_hash=sha1 ima_template=ima",
}

INIT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t securityfs securityfs /sys/kernel/security
S=/sys/kernel/security/ima
cat /ima-policy > $S/policy || echo "CAPTURE-ERROR policy write failed"
# Programs: distinct inodes are measured separately (a copy of busybox, a script, a name with a
# space in it).
mkdir -p /work
cp /bin/busybox /work/hello
cp /bin/busybox "/work/with space"
printf '#!/bin/sh\necho script-ran\n' > /work/script.sh
chmod 755 /work/hello "/work/with space" /work/script.sh
/work/hello echo hello-ran
"/work/with space" echo space-ran
/work/script.sh
# open_writers violation: read a measured file while it is open for writing.
echo data > /work/w.txt
chown 1000 /work/w.txt
exec 3>>/work/w.txt
cat /work/w.txt > /dev/null
exec 3>&-
# ToMToU violation: open a measured file for writing while it is open for reading.
echo data > /work/t.txt
chown 1000 /work/t.txt
exec 4</work/t.txt
cat /work/t.txt > /dev/null
echo more >> /work/t.txt
exec 4<&-
dump_pcrs() {
  for b in sha1 sha256 sha384 sha512; do
    f=/sys/class/tpm/tpm0/pcr-$b/10
    if [ -r $f ]; then echo "CAPTURE-PCR$1 $b $(cat $f)"; fi
  done
}
dump_pcrs A
echo CAPTURE-ASCII-BEGIN
base64 $S/ascii_runtime_measurements
echo CAPTURE-ASCII-END
echo CAPTURE-BINARY-BEGIN
base64 $S/binary_runtime_measurements
echo CAPTURE-BINARY-END
dump_pcrs B
echo "CAPTURE-UNAME $(uname -r)"
echo "CAPTURE-CMDLINE $(cat /proc/cmdline)"
echo CAPTURE-DONE
poweroff -f
"""


def _build_initramfs(work: Path) -> Path:
    root = work / "root"
    for d in ("bin", "proc", "sys", "dev", "tmp"):
        (root / d).mkdir(parents=True, exist_ok=True)
    shutil.copy2(BUSYBOX, root / "bin" / "busybox")
    (root / "ima-policy").write_text(POLICY)
    init = root / "init"
    init.write_text(INIT)
    init.chmod(0o755)
    files = subprocess.run(
        ["find", ".", "-print0"], cwd=root, check=True, capture_output=True
    ).stdout
    cpio = subprocess.run(
        ["cpio", "--null", "-o", "-H", "newc", "--owner=0:0", "--quiet"],
        cwd=root,
        input=files,
        check=True,
        capture_output=True,
    ).stdout
    out = work / "initramfs.cpio"
    out.write_bytes(cpio)
    return out


def _boot(work: Path, initramfs: Path, ima_args: str) -> tuple[str, str]:
    state = work / "tpmstate"
    if state.exists():
        shutil.rmtree(state)
    state.mkdir()
    ctrl = work / "swtpm-ctrl.sock"
    swtpm = subprocess.Popen(
        [
            "swtpm", "socket", "--tpm2", "--tpmstate", f"dir={state}",
            "--ctrl", f"type=unixio,path={ctrl}", "--log", f"file={work / 'swtpm.log'}",
        ]
    )  # fmt: skip
    try:
        for _ in range(100):
            if ctrl.exists():
                break
            time.sleep(0.05)
        cmdline = f"console=ttyS0 panic=-1 quiet loglevel=3 {ima_args}"
        qemu = subprocess.run(
            [
                "qemu-system-x86_64", "-machine", "pc,accel=tcg", "-m", "256", "-smp", "1",
                "-nographic", "-no-reboot", "-nodefaults", "-serial", "stdio",
                "-kernel", str(KERNEL), "-initrd", str(initramfs), "-append", cmdline,
                "-chardev", f"socket,id=chrtpm,path={ctrl}",
                "-tpmdev", "emulator,id=tpm0,chardev=chrtpm", "-device", "tpm-crb,tpmdev=tpm0",
            ],
            capture_output=True,
            timeout=300,
            check=False,
        )  # fmt: skip
        return qemu.stdout.decode("utf-8", "replace"), cmdline
    finally:
        if swtpm.poll() is None:
            swtpm.terminate()
            swtpm.wait(10)


def _section(console: str, name: str) -> bytes:
    m = re.search(rf"CAPTURE-{name}-BEGIN\r?\n(.*?)CAPTURE-{name}-END", console, re.S)
    if not m:
        raise SystemExit(f"no {name} section in the console output")
    return base64.b64decode("".join(m.group(1).split()))


def _pcrs(console: str, tag: str) -> dict[str, str]:
    return {b: v.lower() for b, v in re.findall(rf"CAPTURE-PCR{tag} (\w+) ([0-9A-Fa-f]+)", console)}


def capture(name: str, ima_args: str, out: Path, work: Path) -> None:
    initramfs = _build_initramfs(work)
    console, cmdline = _boot(work, initramfs, ima_args)
    (work / f"{name}.console.log").write_text(console)
    if "CAPTURE-DONE" not in console:
        raise SystemExit(f"{name}: guest did not finish; console in {work}")
    if "CAPTURE-ERROR" in console:
        raise SystemExit(f"{name}: guest reported an error; console in {work}")
    before, after = _pcrs(console, "A"), _pcrs(console, "B")
    if not before or before != after:
        raise SystemExit(f"{name}: PCR 10 changed while the lists were read: {before} {after}")
    uname = re.search(r"CAPTURE-UNAME (\S+)", console)
    ascii_list = _section(console, "ASCII")
    binary_list = _section(console, "BINARY")
    (out / f"{name}.ascii").write_bytes(ascii_list)
    (out / f"{name}.bin").write_bytes(binary_list)
    qemu_version = subprocess.run(
        ["qemu-system-x86_64", "--version"], capture_output=True, text=True, check=True
    ).stdout.splitlines()[0]
    swtpm_version = subprocess.run(
        ["swtpm", "--version"], capture_output=True, text=True, check=True
    ).stdout.splitlines()[0]
    meta = {
        "what": "IMA ascii_runtime_measurements + binary_runtime_measurements and PCR 10",
        "kernel": uname.group(1) if uname else KERNEL_VERSION,
        "kernel_cmdline": cmdline,
        "ima_policy_written": POLICY.splitlines(),
        "qemu": qemu_version,
        "swtpm": swtpm_version,
        "captured": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "kernel_rule": "5.8",
        "pcr10": before,
        "entries": ascii_list.count(b"\n"),
    }
    (out / f"{name}.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    print(f"{name}: {meta['entries']} entries, pcr10 {before}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "ima")
    parser.add_argument("--only", choices=sorted(CONFIGS))
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="capture-ima-"))
    try:
        for name, ima_args in CONFIGS.items():
            if args.only is None or args.only == name:
                capture(name, ima_args, args.out, work)
    finally:
        if args.keep:
            print(f"work directory kept: {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    os.umask(0o022)
    sys.exit(main())
