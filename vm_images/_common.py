"""What ``vm_images/build.py`` and ``vm_images/disk.py`` share: the build error, running a build
tool, progress lines, the cache key hash, and publishing or pruning a cache entry.

Nothing here shapes what goes into an image, so this file is not an input of either cache key;
code that does belongs in ``build.py`` or ``disk.py``, whose sources the keys hash. Standard
library only, so both still run as plain scripts with Debian's Python.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

__all__ = [
    "ImageBuildError",
    "Progress",
    "cache_key",
    "env_cache_dir",
    "log",
    "prune_entries",
    "publish_entry",
    "run_step",
    "work_dir",
]

Progress = Callable[[str], None]

# A dot-named directory untouched for this long is a leftover of an interrupted build.
LEFTOVER_SECONDS = 3600


class ImageBuildError(RuntimeError):
    """A build step failed; the message names the step, the command and its output."""


def run_step(
    step: str, cmd: list[str], *, tail: int | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a build tool; its output is returned, or put in the error (the last ``tail``
    characters of stdout and of stderr when ``tail`` is given).

    Raises:
        ImageBuildError: the tool cannot be started, or it exits non-zero.
    """
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as err:
        raise ImageBuildError(f"{step}: cannot run {cmd[0]}: {err}") from err
    if proc.returncode != 0:
        out, err_text = proc.stdout, proc.stderr
        if tail is not None:
            out, err_text = out[-tail:], err_text[-tail:]
        raise ImageBuildError(f"{step}: {' '.join(cmd)} exited {proc.returncode}\n{out}{err_text}")
    return proc


def log(progress: Progress | None, msg: str) -> None:
    if progress is not None:
        progress(msg)


def env_cache_dir(environ: Mapping[str, str] | None, variable: str, name: str) -> Path:
    """``$variable`` if set, else ``~/.cache/vtpm-trust/<name>``."""
    env = os.environ if environ is None else environ
    if env.get(variable):
        return Path(env[variable]).expanduser()
    return Path(env.get("HOME", str(Path.home()))) / ".cache" / "vtpm-trust" / name


def cache_key(inputs: Mapping[str, object]) -> str:
    """A short, stable hash of a build's inputs (a JSON-able dict)."""
    blob = json.dumps(inputs, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:20]


def work_dir(root: Path, key: str) -> Path:
    """A fresh ``root/.<key>.<random>`` to build an entry in (dot-named: a leftover if killed)."""
    root.mkdir(parents=True, exist_ok=True)
    out = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=root))
    out.chmod(0o755)
    return out


def publish_entry(
    out: Path,
    final: Path,
    manifest: Mapping[str, object],
    *,
    force: bool,
    progress: Progress | None,
) -> bool:
    """Write ``out/manifest.json`` and rename ``out`` to the entry ``final``.

    With ``force`` an existing ``final`` is deleted first. Returns False when another build of
    the same key finished ``final`` first: ``out`` is deleted, theirs is as good as ours.

    Raises:
        OSError: the rename failed and ``final`` is no finished entry.
    """
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    if force and final.exists():
        shutil.rmtree(final)
    try:
        out.rename(final)
    except OSError:
        if not (final / "manifest.json").is_file():
            raise
        shutil.rmtree(out, ignore_errors=True)
        log(progress, f"another build finished {final} first; using it")
        return False
    return True


def prune_entries(
    root: Path,
    keep: Iterable[str],
    *,
    now: float,
    remove: Callable[[Path], None],
    progress: Progress | None,
) -> list[Path]:
    """Remove, with ``remove``, the entries of ``root`` not named in ``keep`` and the leftovers
    of builds older than an hour; returns what went.

    Only directories that look like ours are touched: an entry has a ``manifest.json``; a
    leftover of an interrupted build is dot-named (``.<key>.<random>``).
    """
    keep = set(keep)
    removed = []
    for path in sorted(root.iterdir()) if root.is_dir() else []:
        if not path.is_dir() or path.name in keep:
            continue
        entry = (path / "manifest.json").is_file() and not path.name.startswith(".")
        leftover = path.name.startswith(".") and now - path.stat().st_mtime > LEFTOVER_SECONDS
        if entry or leftover:
            remove(path)
            removed.append(path)
            log(progress, f"pruned {path}")
    return removed
