"""The ledger that keeps worker processes from giving one host to two identities.

Real files in a temporary directory, as the workers share them; the ledgers of
two workers are two objects here.
"""

from __future__ import annotations

import os
import threading

import pytest

from tunnel.server._ledger import HostLedger, clear_worker
from tunnel.server._registry import Registry
from tunnel.server._store import Claim, LocalStore

HOST = "app.localhost"


@pytest.fixture
def ledgers(tmp_path) -> tuple[HostLedger, HostLedger]:
    return HostLedger(str(tmp_path), 0, 2), HostLedger(str(tmp_path), 1, 2)


def test_a_host_is_held_by_one_identity_on_every_worker(ledgers) -> None:
    zero, one = ledgers
    assert zero.claim(HOST, b"alice")
    assert one.held_by_other(HOST, b"mallory")
    assert not one.claim(HOST, b"mallory")
    # The same identity, on the other worker: that is its agent's second connection.
    assert not one.held_by_other(HOST, b"alice")
    assert one.claim(HOST, b"alice")
    zero.release(HOST)
    assert not one.claim(HOST, b"mallory")  # still held through worker one
    one.release(HOST)
    assert one.claim(HOST, b"mallory")


def test_a_dead_workers_claims_are_cleared_before_it_restarts(ledgers, tmp_path) -> None:
    zero, one = ledgers
    assert zero.claim(HOST, b"alice")
    assert zero.claim("tcp:20000", b"alice")
    clear_worker(str(tmp_path), 0)
    assert one.claim(HOST, b"mallory")
    assert one.claim("tcp:20000", b"mallory")
    assert sorted(os.listdir(tmp_path)) == sorted(
        [".lock", *(name for name in os.listdir(tmp_path) if name.endswith(".1"))]
    )


def test_release_of_an_unknown_host_is_harmless(ledgers) -> None:
    zero, _ = ledgers
    zero.release("never.localhost")


async def test_the_stores_of_two_workers_refuse_a_second_identity(ledgers) -> None:
    from test_registry import session  # the registry tests' session maker

    zero, one = Registry(), Registry()
    zero.store, one.store = LocalStore(ledgers[0]), LocalStore(ledgers[1])
    assert await zero.store.claim(HOST, b"alice", None) is Claim.OK
    zero.claim(session(b"alice"))
    assert await one.store.held_by_other(HOST, b"mallory")
    assert await one.store.claim(HOST, b"mallory", None) is Claim.HELD
    assert await one.store.claim(HOST, b"alice", None) is Claim.OK
    one.claim(session(b"alice"))
    # Alice's agent leaves worker zero only: worker one still holds the host.
    (alice,) = zero.sessions_of(HOST)
    zero.release(alice)  # and the registry lets go of zero's entry
    assert await zero.store.claim(HOST, b"mallory", None) is Claim.HELD
    (alice,) = one.sessions_of(HOST)
    one.release(alice)
    assert await zero.store.claim(HOST, b"mallory", None) is Claim.OK


async def test_an_identitys_tunnels_are_counted_over_all_workers(ledgers) -> None:
    zero, one = LocalStore(ledgers[0]), LocalStore(ledgers[1])
    assert await zero.claim("a.localhost", b"alice", 2) is Claim.OK
    assert await one.claim("b.localhost", b"alice", 2) is Claim.OK
    assert await zero.claim("c.localhost", b"alice", 2) is Claim.LIMIT
    # A host it holds already (its agent's second connection) is not another tunnel.
    assert await zero.claim("b.localhost", b"alice", 2) is Claim.OK
    assert await one.claim("c.localhost", b"bob", 2) is Claim.OK
    one.release("b.localhost")
    assert await zero.claim("c.localhost", b"alice", 2) is Claim.HELD  # bob's
    assert await zero.claim("d.localhost", b"alice", 2) is Claim.LIMIT  # b is on zero too
    zero.release("b.localhost")
    assert await zero.claim("d.localhost", b"alice", 2) is Claim.OK


def test_a_claim_being_written_is_never_read_as_another_identitys(tmp_path) -> None:
    # Worker zero claims and releases over and over (its agent reconnecting)
    # while worker one checks the same identity's second connection without
    # the lock, as a handshake's first check does: it must never see the
    # claim half written and take it for someone else's.
    zero, one = HostLedger(str(tmp_path), 0, 2), HostLedger(str(tmp_path), 1, 2)
    done = threading.Event()

    def reconnecting() -> None:
        while not done.is_set():
            zero.claim(HOST, b"alice")
            zero.release(HOST)

    thread = threading.Thread(target=reconnecting)
    thread.start()
    try:
        wrong = sum(one.held_by_other(HOST, b"alice") for _ in range(20000))
    finally:
        done.set()
        thread.join()
    assert wrong == 0


async def test_a_host_being_claimed_again_is_not_released_by_the_connection_it_replaces(
    ledgers,
) -> None:
    from test_registry import session  # the registry tests' session maker

    zero, one = Registry(), Registry()
    zero.store, one.store = LocalStore(ledgers[0]), LocalStore(ledgers[1])
    old = session(b"alice")
    assert await zero.store.claim(HOST, b"alice", None) is Claim.OK
    zero.claim(old)
    # Alice's agent opens a new connection to worker zero; while its handshake
    # runs, the old connection ends. The host must stay hers throughout.
    zero.reserve(HOST)
    assert await zero.store.claim(HOST, b"alice", None) is Claim.OK
    zero.release(old)
    assert await one.store.claim(HOST, b"mallory", None) is Claim.HELD
    new = session(b"alice")
    zero.claim(new)
    zero.unreserve(HOST)
    assert await one.store.claim(HOST, b"mallory", None) is Claim.HELD
    # A handshake refused (or cancelled) lets go of what it claimed.
    zero.release(new)
    assert await one.store.claim(HOST, b"mallory", None) is Claim.OK
    one.store.release(HOST)
    zero.reserve(HOST)
    assert await zero.store.claim(HOST, b"alice", None) is Claim.OK
    zero.unreserve(HOST)
    assert await one.store.claim(HOST, b"mallory", None) is Claim.OK
