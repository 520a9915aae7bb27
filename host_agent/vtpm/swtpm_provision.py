"""Manufacture a VM's vTPM with ``swtpm_setup`` (EK, EK certificate, platform certificate).

What libvirt does at a VM's first start (protocols.md §3), with the state encrypted from the first
byte by the VM's state key, handed over through a pipe (``--keyfile-fd``)::

    swtpm_setup --tpm2 --tpmstate <dir>.setup --vmid NAME:UUID --create-ek-cert
                --create-platform-cert --lock-nvram --pcr-banks sha256
                --keyfile-fd N --cipher aes-256-cbc --logfile <vm dir>/swtpm_setup.log

The result: RSA-2048 EK (0x81010001) and ECC P-384 EK (0x81010016) with certificates in NV
0x01c00002 / 0x01c00016 (subject ``CN=NAME:UUID``, issuer ``CN=swtpm-localca``), a platform
certificate in 0x01c08000, only the sha256 PCR bank active (platform-notes.md §3).

swtpm_setup writes into ``<dir>.setup``, which is renamed to ``<dir>`` only when it succeeded: a
crash half way leaves no half-made vTPM that a later start would take for a provisioned one.

swtpm-localca keeps its CA and serial counter in ``/var/lib/swtpm-localca``, which must stay
owned by ``tss``: files a root-run swtpm_setup creates there break libvirt's own swtpm_setup
(which runs as ``tss``) later (platform-notes.md §3, §7). After every run as root the files are
handed back to the directory's owner (or to ``tss`` if the run created the directory).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
from pathlib import Path

from host_agent.errors import SwtpmProvisionError
from host_agent.swtpm_localca import LOCALCA_DIR, restore_localca_owner

from .swtpm_key import STATE_KEY_CIPHER, hex_key, key_pipe, wipe

__all__ = ["LOCALCA_DIR", "provision_vtpm", "restore_localca_owner"]


def provision_vtpm(
    *,
    vm_uuid: str,
    vm_name: str,
    state_dir: Path,
    key: bytearray,
    log_file: Path,
    swtpm_setup: str = "swtpm_setup",
    pcr_banks: str = "sha256",
    localca_dir: Path = LOCALCA_DIR,
    timeout: float = 60.0,
) -> None:
    """Run swtpm_setup for a VM whose ``state_dir`` holds no state yet.

    Args:
        vm_uuid: the VM's UUID (in the EK certificate's subject).
        vm_name: the VM's name (likewise).
        state_dir: the final ``--tpmstate`` directory; must be missing or empty.
        key: the VM's 32-byte state key (not modified).
        log_file: swtpm_setup's log (appended to).
        swtpm_setup: the program.
        pcr_banks: PCR banks to leave active.
        localca_dir: swtpm-localca's directory, whose ownership is restored afterwards.
        timeout: seconds swtpm_setup may take.

    Raises:
        SwtpmProvisionError: swtpm_setup is missing, failed or timed out; nothing is left in
            ``state_dir``.
    """
    work = state_dir.with_name(state_dir.name + ".setup")
    localca_existed = localca_dir.exists()
    secret = hex_key(key)
    try:
        if work.exists():
            shutil.rmtree(work)
        work.mkdir(mode=0o700)
        os.chmod(work, 0o700)
        with key_pipe(secret) as fd:
            wipe(secret)
            cmd = [
                swtpm_setup,
                "--tpm2",
                "--tpmstate",
                str(work),
                "--vmid",
                f"{vm_name}:{vm_uuid}",
                "--create-ek-cert",
                "--create-platform-cert",
                "--lock-nvram",
                "--pcr-banks",
                pcr_banks,
                "--keyfile-fd",
                str(fd),
                "--cipher",
                STATE_KEY_CIPHER,
                "--logfile",
                str(log_file),
            ]
            status, out, err = _run_group(cmd, fd, timeout)
        if status != 0:
            said = (err or out).decode(errors="replace").strip()
            raise SwtpmProvisionError(
                vm_uuid,
                f"swtpm_setup exited with status {status}: {said[-400:] or _tail(log_file)}",
            )
        if not (work / "tpm2-00.permall").is_file():
            raise SwtpmProvisionError(
                vm_uuid, f"swtpm_setup succeeded but wrote no tpm2-00.permall; {_tail(log_file)}"
            )
        for entry in work.iterdir():
            os.chmod(entry, 0o600)
        if state_dir.exists():  # empty but for swtpm's .lock (the caller checked)
            with contextlib.suppress(FileNotFoundError):
                (state_dir / ".lock").unlink()
            state_dir.rmdir()
        os.rename(work, state_dir)
        _fsync_dir(state_dir.parent)
    except SwtpmProvisionError:
        _remove(work)
        raise
    except subprocess.TimeoutExpired as err:
        _remove(work)
        raise SwtpmProvisionError(vm_uuid, f"swtpm_setup took more than {timeout:g} s") from err
    except OSError as err:
        _remove(work)
        raise SwtpmProvisionError(vm_uuid, f"cannot run swtpm_setup: {err}") from err
    finally:
        wipe(secret)
        restore_localca_owner(localca_dir, created=not localca_existed)


def _run_group(cmd: list[str], fd: int, timeout: float) -> tuple[int, bytes, bytes]:
    """Run swtpm_setup in its own process group; on timeout kill the group, its swtpm too.

    Raises:
        subprocess.TimeoutExpired: after the group was killed.
        OSError: the program cannot be run.
    """
    proc = subprocess.Popen(
        cmd,
        pass_fds=(fd,),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return proc.returncode, out, err


def _tail(path: Path, n: int = 400) -> str:
    try:
        text = path.read_text(errors="replace").strip()
    except OSError:
        return "(no swtpm_setup log)"
    return f"log: {text[-n:]}"


def _remove(path: Path) -> None:
    with contextlib.suppress(OSError):
        shutil.rmtree(path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
