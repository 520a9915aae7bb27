"""A real PostgreSQL server for the store tests, started per test session (no system service).

The server runs from Debian's ``/usr/lib/postgresql/<version>/bin`` on a temporary data directory,
listening on a free TCP port on 127.0.0.1 and on a socket in that directory, with ``trust``
authentication for the ``postgres`` superuser. PostgreSQL refuses to run as root, so when the
suite runs as root the server runs as the ``postgres`` user (``runuser``); the data directory is
handed to that user. Every test module shares one server through :func:`acquire` /
:func:`release`; it is stopped (``pg_ctl stop``, which signals the postmaster by its pid file)
when the test process exits, and its directory removed.

Missing binaries fail the run, they do not skip: ``make test`` installs ``postgresql``.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import pwd
import re
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from tests.helpers.ports import free_port

__all__ = ["Postgres", "acquire", "find_bin_dir", "release", "start_postgres"]

_NAME_RE = re.compile(r"[a-z_][a-z0-9_]{0,62}")


def find_bin_dir() -> Path:
    """The newest ``/usr/lib/postgresql/<version>/bin`` holding ``initdb`` and ``pg_ctl``."""
    candidates = sorted(
        Path("/usr/lib/postgresql").glob("*/bin"),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
    )
    for bin_dir in reversed(candidates):
        if (bin_dir / "initdb").is_file() and (bin_dir / "pg_ctl").is_file():
            return bin_dir
    raise RuntimeError(
        "PostgreSQL server binaries not found under /usr/lib/postgresql/*/bin; run `make test` "
        "so it installs the postgresql package"
    )


def _check_name(name: str) -> str:
    if not _NAME_RE.fullmatch(name):
        raise ValueError(f"database name {name!r} must match {_NAME_RE.pattern}")
    return name


@dataclass
class Postgres:
    """One running PostgreSQL server."""

    base: Path
    bin_dir: Path
    port: int
    run_as: str | None  # user the server runs as, None for the current user

    @property
    def data_dir(self) -> Path:
        return self.base / "data"

    @property
    def socket_dir(self) -> Path:
        return self.base / "run"

    @property
    def log(self) -> Path:
        return self.base / "server.log"

    def url(self, database: str = "postgres") -> str:
        """SQLAlchemy URL (psycopg 3) of ``database`` on this server."""
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{_check_name(database)}"

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def _cmd(self, *args: str) -> list[str]:
        if self.run_as is None:
            return list(args)
        return ["runuser", "-u", self.run_as, "--", *args]

    def psql(self, sql: str, database: str = "postgres") -> str:
        """Run one SQL command through ``psql`` (autocommit, so CREATE DATABASE works)."""
        proc = subprocess.run(
            [
                str(self.bin_dir / "psql"),
                "-X",
                "-q",
                "-t",
                "-A",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                "127.0.0.1",
                "-p",
                str(self.port),
                "-U",
                "postgres",
                "-d",
                _check_name(database),
                "-c",
                sql,
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"psql {sql!r} failed: {proc.stderr.strip()}")
        return proc.stdout

    def create_database(self, name: str, *, template: str | None = None) -> None:
        """``CREATE DATABASE name`` (a copy of ``template`` when given; nobody may be connected)."""
        sql = f"CREATE DATABASE {_check_name(name)}"
        if template is not None:
            sql += f" TEMPLATE {_check_name(template)}"
        self.psql(sql)

    def drop_database(self, name: str) -> None:
        self.psql(f"DROP DATABASE IF EXISTS {_check_name(name)} WITH (FORCE)")

    def rename_database(self, old: str, new: str) -> None:
        self.psql(f"ALTER DATABASE {_check_name(old)} RENAME TO {_check_name(new)}")

    def database_dir(self, name: str) -> Path:
        """Directory holding the heap files of database ``name`` (after ``CHECKPOINT``)."""
        oid = self.psql(f"SELECT oid FROM pg_database WHERE datname = '{_check_name(name)}'")
        return self.data_dir / "base" / oid.strip()

    def checkpoint(self) -> None:
        """Write every dirty buffer to the data files, so raw-file scans see what is stored."""
        self.psql("CHECKPOINT")

    def stop(self) -> None:
        if (self.data_dir / "postmaster.pid").exists():
            subprocess.run(
                self._cmd(
                    str(self.bin_dir / "pg_ctl"),
                    "-D",
                    str(self.data_dir),
                    "-m",
                    "fast",
                    "-w",
                    "stop",
                ),
                capture_output=True,
                check=False,
            )
        shutil.rmtree(self.base, ignore_errors=True)


def start_postgres(timeout: float = 60.0) -> Postgres:
    """initdb a fresh cluster in a temporary directory and start it on a free port."""
    bin_dir = find_bin_dir()
    run_as: str | None = None
    if os.geteuid() == 0:
        run_as = "postgres"
        try:
            pw = pwd.getpwnam(run_as)
        except KeyError:
            raise RuntimeError(
                "running as root and there is no postgres user to run the server"
            ) from None
    base = Path(tempfile.mkdtemp(prefix="vtpm-pg-"))
    (base / "run").mkdir()
    if run_as is not None:
        for path in (base, base / "run"):
            os.chown(path, pw.pw_uid, pw.pw_gid)
    pg = Postgres(base=base, bin_dir=bin_dir, port=free_port(), run_as=run_as)
    try:
        subprocess.run(
            pg._cmd(
                str(bin_dir / "initdb"),
                "-D",
                str(pg.data_dir),
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
            ),
            capture_output=True,
            check=True,
            timeout=timeout,
        )
        options = (
            f"-c listen_addresses=127.0.0.1 -p {pg.port} -k {pg.socket_dir} "
            "-c fsync=off -c full_page_writes=off"
        )
        subprocess.run(
            pg._cmd(
                str(bin_dir / "pg_ctl"),
                "-D",
                str(pg.data_dir),
                "-l",
                str(pg.log),
                "-o",
                options,
                "-w",
                "-t",
                str(int(timeout)),
                "start",
            ),
            capture_output=True,
            check=True,
            timeout=timeout + 10,
        )
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as err:
        detail = getattr(err, "stderr", b"") or b""
        log = pg.log_text()
        pg.stop()
        raise RuntimeError(
            f"PostgreSQL did not start: {err}; {detail.decode(errors='replace')}\n{log[-2000:]}"
        ) from err
    return pg


_lock = threading.Lock()
_shared: Postgres | None = None
_users = 0


def _stop_shared() -> None:
    global _shared
    with _lock:
        if _shared is not None:
            with contextlib.suppress(Exception):
                _shared.stop()
            _shared = None


def acquire() -> Postgres:
    """The test process's shared server, started on first use and stopped when the process
    exits (after the pytest session), so every module that needs it shares one start."""
    global _shared, _users
    with _lock:
        if _shared is None:
            _shared = start_postgres()
            atexit.register(_stop_shared)
        _users += 1
        return _shared


def release() -> None:
    """Drop one user of the shared server (it keeps running for the next module)."""
    global _users
    with _lock:
        _users = max(_users - 1, 0)
