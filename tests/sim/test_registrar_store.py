"""The registrar's store on a SQLite file and on a real PostgreSQL server.

A fleet runs several registrar instances behind a load balancer on one PostgreSQL database
(ARCHITECTURE.md §6): a challenge issued by one instance is answered at another, and a
challenge is taken exactly once even when answers race.
"""

from __future__ import annotations

import itertools
import secrets
import threading
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from host_agent.registration import register_host
from tests.helpers import postgres
from tests.unit.test_registrar_ekcert import NOW, make_pki, pem
from tests.unit.test_registrar_service import SoftwareHost
from verifier.registrar.errors import ChallengeRejected, HostConflict
from verifier.registrar.state import RegistrarConfig, init_state, open_service
from verifier.registrar.store import AdmittedHost, PendingChallenge, RegistrarStore

_names = itertools.count()


@pytest.fixture(scope="module")
def pg() -> Iterator[postgres.Postgres]:
    server = postgres.acquire()
    yield server
    postgres.release()


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'registrar.db'}"
    server: postgres.Postgres = request.getfixturevalue("pg")
    name = f"registrar_{next(_names)}"
    server.create_database(name)
    return server.url(name)


@pytest.fixture
def store(url: str) -> Iterator[RegistrarStore]:
    s = RegistrarStore.open(url)
    yield s
    s.close()


def _host(host_id: str = "host-a", ek: str = "ab" * 32) -> AdmittedHost:
    return AdmittedHost(
        host_id=host_id,
        ek_digest=ek,
        ek_kind="ecc",
        ek_public=b"\x00\x23",
        ek_certificate=b"\x30\x00",
        aik_public=b"\x00\x23",
        aik_name="000b" + "11" * 32,
        aik_certificate="-----BEGIN CERTIFICATE-----",
        tls_certificate="-----BEGIN CERTIFICATE-----",
        admitted_at=NOW,
    )


def _challenge(
    challenge_id: str, expires: datetime = NOW, host_id: str = "host-a"
) -> PendingChallenge:
    return PendingChallenge(challenge_id, host_id, "{}", "ecc", b"\x01" * 32, expires)


def test_hosts_round_trip_with_utc_times(store: RegistrarStore) -> None:
    store.admit(_host())
    [got] = store.hosts()
    assert got == _host()
    assert got.admitted_at.tzinfo is not None and got.admitted_at == NOW


def test_conflicts(store: RegistrarStore) -> None:
    store.admit(_host())
    store.check_conflict("host-a", "ab" * 32)  # the same host again is fine
    with pytest.raises(HostConflict):
        store.check_conflict("host-a", "cd" * 32)
    with pytest.raises(HostConflict):
        store.check_conflict("host-b", "ab" * 32)


def test_a_challenge_is_taken_once_even_when_answers_race(store: RegistrarStore) -> None:
    store.add_challenge(_challenge("c" * 32))
    results: list[PendingChallenge | None] = []
    barrier = threading.Barrier(8)

    def take() -> None:
        barrier.wait()
        results.append(store.take_challenge("c" * 32))

    threads = [threading.Thread(target=take) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(r is not None for r in results) == 1


def test_expired_challenges_are_purged(store: RegistrarStore) -> None:
    store.add_challenge(_challenge("a" * 32, NOW - timedelta(seconds=1), "host-a"))
    store.add_challenge(_challenge("b" * 32, NOW + timedelta(seconds=1), "host-b"))
    assert store.purge_expired(NOW) == 1
    assert store.count_challenges() == 1


def test_a_new_challenge_supersedes_the_hosts_pending_one(store: RegistrarStore) -> None:
    store.add_challenge(_challenge("a" * 32))
    store.add_challenge(_challenge("b" * 32))
    assert store.take_challenge("a" * 32) is None
    assert store.take_challenge("b" * 32) is not None


def test_an_approval_is_recorded_once(store: RegistrarStore) -> None:
    assert store.add_approval(b"\x01" * 32, b"ref", b"sig-1", NOW) == b"sig-1"
    assert store.add_approval(b"\x01" * 32, b"ref", b"sig-2", NOW) == b"sig-1"
    assert store.approvals() == [(b"\x01" * 32, b"ref", b"sig-1", NOW)]


def test_two_registrar_instances_share_one_database(url: str, tmp_path: Path) -> None:
    """Instance 1 issues the challenge, instance 2 checks the answer and admits the host."""
    pki = make_pki()
    bundle = [pem(pki.root[0], pki.intermediate[0])]
    state = tmp_path / "fleet"
    init_state(
        state,
        ek_ca_pems=bundle,
        config=RegistrarConfig(database_url=url),
        now=NOW,
        random_bytes=secrets.token_bytes,
    )
    one, store1 = open_service(state, clock=lambda: NOW, random_bytes=secrets.token_bytes)
    two, store2 = open_service(state, clock=lambda: NOW, random_bytes=secrets.token_bytes)

    class Balanced:
        def ca_certificate(self) -> bytes:
            return one.ca_certificate()

        def start(self, body: object) -> dict[str, str]:
            return one.start(body)

        def activate(self, challenge_id: str, body: object) -> dict[str, str]:
            return two.activate(challenge_id, body)

    try:
        register_host(
            SoftwareHost(pki), Balanced(), "host-a", ec.generate_private_key(ec.SECP256R1())
        )
        assert [h.host_id for h in one.hosts()] == ["host-a"]
        with pytest.raises(ChallengeRejected):
            two.activate("0" * 32, {"secret": "AAAA", "csr": "x"})
    finally:
        store1.close()
        store2.close()


def test_admit_rechecks_conflicts_in_its_transaction(store: RegistrarStore) -> None:
    store.admit(_host("host-a", "ab" * 32))
    with pytest.raises(HostConflict):
        store.admit(_host("host-a", "cd" * 32))
    with pytest.raises(HostConflict):
        store.admit(_host("host-b", "ab" * 32))
    assert [(h.host_id, h.ek_digest) for h in store.hosts()] == [("host-a", "ab" * 32)]


def test_concurrent_admissions_of_one_host_leave_one_row(store: RegistrarStore) -> None:
    errors: list[Exception] = []
    barrier = threading.Barrier(6)

    def admit(i: int) -> None:
        barrier.wait()
        try:
            store.admit(_host("host-a", f"{i:02x}" * 32))
        except HostConflict as err:
            errors.append(err)

    threads = [threading.Thread(target=admit, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(store.hosts()) == 1
    assert len(errors) == 5
