"""The registry's rules for who serves a host: takeover, pools, least busy.

The registry is plain data behind synchronous methods, so these tests drive it
directly; a session's HTTP/2 connection is reduced to the few facts the
registry reads from it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, cast

import pytest

from tunnel._config.hooks import ConnectRequest, TunnelInfo
from tunnel.server._registry import AgentSession, HostInUse, Registry

HOST = "app.localhost"


@dataclass
class Link:
    """What the registry reads from a session's link (and its statistics)."""

    ready: bool = True
    accepting: bool = True
    open_streams: int = 0
    closed_reason: str | None = None
    bytes_received: int = 0
    bytes_sent: int = 0
    rtt: float | None = None


def session(
    digest: bytes = b"a", *, pool: bool = False, agent_id: str = "", host: str = HOST, **link: Any
) -> AgentSession:
    request = ConnectRequest((), "token", host, None, "/_tunnel", pool=pool)
    info = TunnelInfo(host, None, time.time(), request)
    return AgentSession(info, digest, cast(Any, Link(**link)), pool=pool, agent_id=agent_id)


def test_newer_session_of_same_identity_replaces_older() -> None:
    registry = Registry()
    old, new = session(), session()
    assert registry.claim(old) == []
    assert registry.claim(new) == [old]
    assert registry.sessions_of(HOST) == [new]
    assert registry.lookup(HOST) is new


def test_other_identity_is_refused_pool_or_not() -> None:
    registry = Registry()
    registry.claim(session(b"a", pool=True))
    with pytest.raises(HostInUse):
        registry.claim(session(b"b", pool=True))
    with pytest.raises(HostInUse):
        registry.check_claim(HOST, b"b")


def test_pooled_sessions_join_and_share_by_least_busy() -> None:
    registry = Registry()
    busy = session(pool=True, agent_id="one", open_streams=5)
    idle = session(pool=True, agent_id="two", open_streams=1)
    assert registry.claim(busy) == []
    assert registry.claim(idle) == []
    assert registry.sessions_of(HOST) == [busy, idle]
    assert all(registry.lookup(HOST) is idle for _ in range(10))
    cast(Link, idle.link).open_streams = 9
    assert registry.lookup(HOST) is busy


def test_idle_pool_members_take_turns() -> None:
    registry = Registry()
    members = [session(pool=True, agent_id=str(i)) for i in range(3)]
    for member in members:
        registry.claim(member)
    picked = [registry.lookup(HOST) for _ in range(30)]
    assert {id(m) for m in picked} == {id(m) for m in members}
    assert all(picked.count(member) == 10 for member in members)


def test_unavailable_members_are_skipped() -> None:
    registry = Registry()
    draining = session(pool=True, agent_id="one", accepting=False)
    starting = session(pool=True, agent_id="two", ready=False)
    registry.claim(draining)
    registry.claim(starting)
    assert registry.lookup(HOST) is None
    cast(Link, starting.link).ready = True
    assert registry.lookup(HOST) is starting


def test_non_pool_newcomer_replaces_a_whole_pool_and_pool_newcomer_a_single() -> None:
    registry = Registry()
    pooled = [session(pool=True, agent_id=str(i)) for i in range(2)]
    for member in pooled:
        registry.claim(member)
    single = session()
    assert registry.claim(single) == pooled
    joiner = session(pool=True, agent_id="late")
    # The single agent never asked to share its host.
    assert registry.claim(joiner) == [single]
    assert registry.sessions_of(HOST) == [joiner]


def test_agent_back_on_a_new_connection_replaces_its_stale_one_in_a_pool() -> None:
    registry = Registry()
    stale = session(pool=True, agent_id="one")
    other = session(pool=True, agent_id="two")
    registry.claim(stale)
    registry.claim(other)
    back = session(pool=True, agent_id="one")
    assert registry.claim(back) == [stale]
    assert registry.sessions_of(HOST) == [other, back]


def test_release_keeps_the_rest_of_a_pool_and_remembers_an_emptied_host() -> None:
    registry = Registry()
    one, two = session(pool=True, agent_id="1"), session(pool=True, agent_id="2")
    registry.claim(one)
    registry.claim(two)
    registry.release(one)
    assert registry.sessions_of(HOST) == [two]
    registry.release(one)  # twice is harmless
    assert registry.holds(HOST)
    registry.release(two)
    assert not registry.holds(HOST)
    assert registry.knows(HOST)
    assert registry.lookup(HOST) is None


def test_replaced_session_released_late_does_not_drop_its_successor() -> None:
    registry = Registry()
    old, new = session(), session()
    registry.claim(old)
    registry.claim(new)
    registry.release(old)
    assert registry.lookup(HOST) is new


def test_a_pool_counts_as_one_tunnel_for_the_identity_limit() -> None:
    registry = Registry()
    registry.claim(session(pool=True, agent_id="1"), limit=1)
    registry.claim(session(pool=True, agent_id="2"), limit=1)
    assert registry.count(b"a") == 1
    with pytest.raises(HostInUse, match="limit of 1"):
        registry.claim(session(host="other.localhost"), limit=1)


def test_statistics_list_every_member() -> None:
    registry = Registry()
    registry.claim(session(pool=True, agent_id="1", open_streams=2))
    registry.claim(session(pool=True, agent_id="2", open_streams=3))
    registry.claim(session(host="b.localhost"))
    stats = registry.statistics()
    assert [(s.host, s.streams_in_flight) for s in stats] == [
        (HOST, 2),
        (HOST, 3),
        ("b.localhost", 0),
    ]
