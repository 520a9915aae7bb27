"""The registrar's own small database: admitted hosts and pending challenges.

SQLAlchemy 2 Core over a URL: a SQLite file in the state directory by default; a PostgreSQL URL
when several registrar instances share one fleet (challenges are rows, not memory, so any instance
can complete a challenge another one issued).

Challenges are single-use: :meth:`RegistrarStore.take_challenge` deletes the row in the same
transaction that reads it, so a replayed answer finds nothing. A refused admission stores nothing:
the host row is written only by :meth:`RegistrarStore.admit`, after every check has passed.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from verifier.registrar.errors import HostConflict

__all__ = ["AdmittedHost", "PendingChallenge", "RegistrarStore"]

_metadata = sa.MetaData()

_hosts = sa.Table(
    "registrar_hosts",
    _metadata,
    sa.Column("host_id", sa.String(253), primary_key=True),
    sa.Column("ek_digest", sa.String(64), nullable=False, unique=True),
    sa.Column("ek_kind", sa.String(8), nullable=False),
    sa.Column("ek_public", sa.LargeBinary, nullable=False),
    sa.Column("ek_certificate", sa.LargeBinary, nullable=False),
    sa.Column("aik_public", sa.LargeBinary, nullable=False),
    sa.Column("aik_name", sa.String(132), nullable=False),
    sa.Column("aik_certificate", sa.Text, nullable=False),
    sa.Column("tls_certificate", sa.Text, nullable=False),
    sa.Column("admitted_at", sa.DateTime(timezone=True), nullable=False),
)

_challenges = sa.Table(
    "registrar_challenges",
    _metadata,
    sa.Column("challenge_id", sa.String(64), primary_key=True),
    sa.Column("host_id", sa.String(253), nullable=False),
    sa.Column("request", sa.Text, nullable=False),
    sa.Column("ek_kind", sa.String(8), nullable=False),
    sa.Column("secret_digest", sa.LargeBinary, nullable=False),
    sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
)


_approvals = sa.Table(
    "registrar_policy_approvals",
    _metadata,
    sa.Column("approved_policy", sa.String(64), primary_key=True),
    sa.Column("policy_ref", sa.String(64), primary_key=True),
    sa.Column("signature", sa.LargeBinary, nullable=False),
    sa.Column("approved_at", sa.DateTime(timezone=True), nullable=False),
)


def _utc(value: datetime) -> datetime:
    # SQLite drops the timezone; everything we store is UTC.
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


@dataclass(frozen=True)
class AdmittedHost:
    """One admitted host, as stored."""

    host_id: str
    ek_digest: str
    ek_kind: str
    ek_public: bytes
    ek_certificate: bytes
    aik_public: bytes
    aik_name: str
    aik_certificate: str
    tls_certificate: str
    admitted_at: datetime

    def to_json(self) -> dict[str, str]:
        return {
            "host_id": self.host_id,
            "ek_sha256": self.ek_digest,
            "ek_kind": self.ek_kind,
            "aik_name": self.aik_name,
            "aik_certificate": self.aik_certificate,
            "tls_certificate": self.tls_certificate,
            "admitted_at": self.admitted_at.isoformat(),
        }


@dataclass(frozen=True)
class PendingChallenge:
    """A challenge issued and not yet answered."""

    challenge_id: str
    host_id: str
    request: str
    ek_kind: str
    secret_digest: bytes
    expires_at: datetime


class RegistrarStore:
    """Admitted hosts and pending challenges in one SQL database."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    @classmethod
    def open(cls, url: str) -> RegistrarStore:
        """Open (and create the tables of) the database at ``url``."""
        engine = sa.create_engine(url)
        _metadata.create_all(engine)
        return cls(engine)

    def close(self) -> None:
        self._engine.dispose()

    def add_challenge(self, challenge: PendingChallenge) -> None:
        """Record a challenge; it supersedes any challenge still pending for the same host."""
        with self._engine.begin() as conn:
            conn.execute(_challenges.delete().where(_challenges.c.host_id == challenge.host_id))
            conn.execute(
                _challenges.insert().values(
                    challenge_id=challenge.challenge_id,
                    host_id=challenge.host_id,
                    request=challenge.request,
                    ek_kind=challenge.ek_kind,
                    secret_digest=challenge.secret_digest,
                    expires_at=challenge.expires_at,
                )
            )

    def take_challenge(self, challenge_id: str) -> PendingChallenge | None:
        """Remove and return a pending challenge; ``None`` if unknown or already taken."""
        with self._engine.begin() as conn:
            row = (
                conn.execute(_challenges.select().where(_challenges.c.challenge_id == challenge_id))
                .mappings()
                .first()
            )
            if row is None:
                return None
            deleted = conn.execute(
                _challenges.delete().where(_challenges.c.challenge_id == challenge_id)
            )
            if deleted.rowcount != 1:  # another instance took it between our read and delete
                return None
        return PendingChallenge(
            challenge_id=row["challenge_id"],
            host_id=row["host_id"],
            request=row["request"],
            ek_kind=row["ek_kind"],
            secret_digest=bytes(row["secret_digest"]),
            expires_at=_utc(row["expires_at"]),
        )

    def purge_expired(self, now: datetime) -> int:
        """Delete challenges that expired before ``now``; returns how many."""
        with self._engine.begin() as conn:
            result = conn.execute(_challenges.delete().where(_challenges.c.expires_at < now))
            return int(result.rowcount)

    def check_conflict(self, host_id: str, ek_digest: str) -> None:
        """Raise HostConflict if ``host_id`` or the EK is admitted with the other one differing."""
        with self._engine.connect() as conn:
            self._check_conflict(conn, host_id, ek_digest)

    @staticmethod
    def _check_conflict(conn: sa.Connection, host_id: str, ek_digest: str) -> None:
        by_id = conn.execute(
            sa.select(_hosts.c.ek_digest).where(_hosts.c.host_id == host_id)
        ).first()
        by_ek = conn.execute(
            sa.select(_hosts.c.host_id).where(_hosts.c.ek_digest == ek_digest)
        ).first()
        if by_id is not None and by_id[0] != ek_digest:
            raise HostConflict(
                f"host {host_id!r}: expected the EK it was admitted with (sha256 {by_id[0]}), "
                f"got another EK (sha256 {ek_digest}); to admit it with a new TPM, first run "
                f"`vtpm-verify registrar remove --host-id {host_id}`"
            )
        if by_ek is not None and by_ek[0] != host_id:
            raise HostConflict(
                f"EK sha256 {ek_digest}: already admitted as host {by_ek[0]!r}, not {host_id!r}"
            )

    def admit(self, host: AdmittedHost) -> None:
        """Insert the host, or replace its row when it re-registers with the same EK.

        The conflict check runs again inside the writing transaction, and a concurrent admission
        that slips past it trips the primary key or the unique EK digest: either way
        HostConflict, never two rows for one host or one EK.
        """
        try:
            with self._engine.begin() as conn:
                self._check_conflict(conn, host.host_id, host.ek_digest)
                # Only the row of this very host and EK is replaced: a row another request
                # wrote meanwhile (another EK) survives and our insert trips the primary key.
                conn.execute(
                    _hosts.delete().where(
                        _hosts.c.host_id == host.host_id, _hosts.c.ek_digest == host.ek_digest
                    )
                )
                conn.execute(
                    _hosts.insert().values(
                        host_id=host.host_id,
                        ek_digest=host.ek_digest,
                        ek_kind=host.ek_kind,
                        ek_public=host.ek_public,
                        ek_certificate=host.ek_certificate,
                        aik_public=host.aik_public,
                        aik_name=host.aik_name,
                        aik_certificate=host.aik_certificate,
                        tls_certificate=host.tls_certificate,
                        admitted_at=host.admitted_at,
                    )
                )
        except sa.exc.IntegrityError as err:
            raise HostConflict(
                f"host {host.host_id!r}: admitted concurrently by another request "
                f"(EK sha256 {host.ek_digest}); try again"
            ) from err

    def remove(self, host_id: str) -> bool:
        """Forget an admitted host (its certificates stay valid until they expire)."""
        with self._engine.begin() as conn:
            result = conn.execute(_hosts.delete().where(_hosts.c.host_id == host_id))
            return bool(result.rowcount)

    def hosts(self) -> list[AdmittedHost]:
        with self._engine.connect() as conn:
            rows = conn.execute(_hosts.select().order_by(_hosts.c.host_id)).mappings().all()
        return [self._host(r) for r in rows]

    def host(self, host_id: str) -> AdmittedHost | None:
        with self._engine.connect() as conn:
            row = (
                conn.execute(_hosts.select().where(_hosts.c.host_id == host_id)).mappings().first()
            )
        return None if row is None else self._host(row)

    def add_approval(
        self, approved_policy: bytes, policy_ref: bytes, signature: bytes, now: datetime
    ) -> bytes:
        """Record an approval; an approval already on record is kept. Returns its signature."""
        key = (approved_policy.hex(), policy_ref.hex())
        where = (_approvals.c.approved_policy == key[0], _approvals.c.policy_ref == key[1])
        try:
            with self._engine.begin() as conn:
                row = conn.execute(sa.select(_approvals.c.signature).where(*where)).first()
                if row is not None:
                    return bytes(row[0])
                conn.execute(
                    _approvals.insert().values(
                        approved_policy=key[0],
                        policy_ref=key[1],
                        signature=signature,
                        approved_at=now,
                    )
                )
        except sa.exc.IntegrityError:  # recorded concurrently: keep that one
            with self._engine.connect() as conn:
                return bytes(
                    conn.execute(sa.select(_approvals.c.signature).where(*where)).scalar_one()
                )
        return signature

    def approvals(self) -> list[tuple[bytes, bytes, bytes, datetime]]:
        """Every approval on record: (approved_policy, policy_ref, signature, approved_at)."""
        with self._engine.connect() as conn:
            rows = conn.execute(
                _approvals.select().order_by(_approvals.c.approved_at, _approvals.c.policy_ref)
            ).all()
        return [(bytes.fromhex(r[0]), bytes.fromhex(r[1]), bytes(r[2]), _utc(r[3])) for r in rows]

    def count_challenges(self) -> int:
        with self._engine.connect() as conn:
            return int(
                conn.execute(sa.select(sa.func.count()).select_from(_challenges)).scalar_one()
            )

    @staticmethod
    def _host(row: sa.RowMapping) -> AdmittedHost:
        return AdmittedHost(
            host_id=row["host_id"],
            ek_digest=row["ek_digest"],
            ek_kind=row["ek_kind"],
            ek_public=bytes(row["ek_public"]),
            ek_certificate=bytes(row["ek_certificate"]),
            aik_public=bytes(row["aik_public"]),
            aik_name=row["aik_name"],
            aik_certificate=row["aik_certificate"],
            tls_certificate=row["tls_certificate"],
            admitted_at=_utc(row["admitted_at"]),
        )

    def __iter__(self) -> Iterator[AdmittedHost]:
        return iter(self.hosts())
