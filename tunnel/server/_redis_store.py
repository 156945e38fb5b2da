"""The cluster's store on Redis (``ServerConfig.store``), through coredis.

Every decision that two nodes could race on is one Lua script, so Redis makes
it atomically: two identities never own one host, whatever the timing of their
claims on different nodes. Times come from Redis's own clock (``TIME``), never
a node's, so the nodes' clocks may disagree.

Keys (all under ``tunnel:``):

``owner:<key>``
    The owning identity's digest (hex), with a TTL.
``nodes:<key>``
    A sorted set of the members (server processes) serving the key, each
    scored with the time its entry expires.
``identity:<digest>``
    A sorted set of the keys the identity holds, scored likewise (the
    per-identity tunnel limit counts it).
``member:<id>``
    A member's node id and address, with a TTL.
``members``
    Every live member, scored with its expiry.
``rate:<bucket>``
    A token bucket of a cluster-wide request rate.

Each member renews its entries every half TTL; the TTL is two keepalive
intervals, so a dead node's entries vanish within two intervals. This is a
single Redis (with replicas or Sentinel if you like), not Redis Cluster: the
scripts touch keys they compute.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import AsyncIterator
from typing import Any, Final
from urllib.parse import urlsplit, urlunsplit

import trio

from .._config import ServerConfig
from .._exceptions import ConfigError, StoreUnavailableError
from .._protocol.limits import RateLimit
from .._settings import server_setting
from ._store import Claim, Holder, Member, Store
from ._worker_id import node_id, worker_id

__all__ = ["RedisStore", "check_store", "open_redis_store", "open_store", "redacted"]

logger = logging.getLogger("tunnel.server")

#: How long one call to Redis may take before the store counts as unavailable.
CALL_TIMEOUT: Final = 2.0
#: How long connecting may take.
CONNECT_TIMEOUT: Final = 2.0
#: Releases waiting for the store's task; beyond this they expire instead.
MAX_PENDING_RELEASES: Final = 10_000
#: Seconds before a failed renewal is tried again.
RETRY_AFTER: Final = 1.0
#: Keys renewed per script call (the script's arguments stay small).
RENEW_BATCH: Final = 500

_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

-- Expiries only grow: a node with a shorter keepalive (so a shorter TTL) must
-- not cut short what a node with a longer one keeps alive.
local function expire_after(key, ttl)
  if redis.call('PTTL', key) < ttl then
    redis.call('PEXPIRE', key, ttl)
  end
end

-- The owner of key, if another identity than digest that some live member serves.
local function held_by_another(key, digest)
  local nodes_key = 'tunnel:nodes:' .. key
  redis.call('ZREMRANGEBYSCORE', nodes_key, '-inf', now)
  local owner = redis.call('GET', 'tunnel:owner:' .. key)
  return owner and owner ~= digest and redis.call('ZCARD', nodes_key) > 0, owner
end

-- Record (or renew) that member serves key for digest, for ttl milliseconds.
local function hold(key, digest, member, ttl)
  local owner_key, nodes_key = 'tunnel:owner:' .. key, 'tunnel:nodes:' .. key
  local identity_key = 'tunnel:identity:' .. digest
  if redis.call('PTTL', owner_key) < ttl then
    redis.call('SET', owner_key, digest, 'PX', ttl)
  else
    redis.call('SET', owner_key, digest, 'KEEPTTL')
  end
  redis.call('ZADD', nodes_key, now + ttl, member)
  expire_after(nodes_key, ttl)
  redis.call('ZADD', identity_key, 'GT', now + ttl, key)
  expire_after(identity_key, ttl)
  if string.sub(key, 1, 4) == 'tcp:' then
    redis.call('SADD', 'tunnel:tcp', key)
  end
end
"""

# KEYS: -. ARGV: key, digest, member, ttl, limit (0: none).
_CLAIM = (
    _NOW
    + """
local key, digest, member = ARGV[1], ARGV[2], ARGV[3]
local ttl, limit = tonumber(ARGV[4]), tonumber(ARGV[5])
local held, owner = held_by_another(key, digest)
if held then
  return 'held'
end
if owner ~= digest and limit > 0 then
  local identity_key = 'tunnel:identity:' .. digest
  redis.call('ZREMRANGEBYSCORE', identity_key, '-inf', now)
  if not redis.call('ZSCORE', identity_key, key) and redis.call('ZCARD', identity_key) >= limit then
    return 'limit'
  end
end
hold(key, digest, member, ttl)
return 'ok'
"""
)

# ARGV: member, node, address, ttl, then key, digest pairs. Returns the keys
# another identity owns now (given away while this member could not renew).
_RENEW = (
    _NOW
    + """
local member, node, address, ttl = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
redis.call('SET', 'tunnel:member:' .. member, node .. ' ' .. address, 'PX', ttl)
redis.call('ZREMRANGEBYSCORE', 'tunnel:members', '-inf', now)
redis.call('ZADD', 'tunnel:members', now + ttl, member)
local lost = {}
for i = 5, #ARGV, 2 do
  local key, digest = ARGV[i], ARGV[i + 1]
  if held_by_another(key, digest) then
    table.insert(lost, key)
  else
    hold(key, digest, member, ttl)
  end
end
return lost
"""
)

# ARGV: key, member. The owner goes with the last member serving the key.
_RELEASE = (
    _NOW
    + """
local key, member = ARGV[1], ARGV[2]
local owner_key, nodes_key = 'tunnel:owner:' .. key, 'tunnel:nodes:' .. key
redis.call('ZREM', nodes_key, member)
redis.call('ZREMRANGEBYSCORE', nodes_key, '-inf', now)
if redis.call('ZCARD', nodes_key) == 0 then
  local owner = redis.call('GET', owner_key)
  if owner then
    redis.call('ZREM', 'tunnel:identity:' .. owner, key)
  end
  redis.call('DEL', owner_key, nodes_key)
  redis.call('SREM', 'tunnel:tcp', key)
end
return 1
"""
)

# ARGV: key, digest. Returns the owner if it is not digest and still served.
_HELD_BY_OTHER = (
    _NOW
    + """
if held_by_another(ARGV[1], ARGV[2]) then
  return 1
end
return 0
"""
)

# ARGV: key. Returns "node address" of each live member serving it.
_HOLDERS = (
    _NOW
    + """
local found = {}
for _, member in ipairs(redis.call('ZRANGEBYSCORE', 'tunnel:nodes:' .. ARGV[1], now, '+inf')) do
  local entry = redis.call('GET', 'tunnel:member:' .. member)
  if entry then
    table.insert(found, entry)
  end
end
return found
"""
)

# ARGV: bucket, rate (per second), burst. Returns the wait in milliseconds.
_TAKE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local key, rate, burst = 'tunnel:rate:' .. ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local state = redis.call('HMGET', key, 'tokens', 'at')
local tokens, at = tonumber(state[1]) or burst, tonumber(state[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - at) * rate)
local wait = 0
if tokens >= 1 then
  tokens = tokens - 1
else
  wait = math.ceil((1 - tokens) / rate * 1000)
end
redis.call('HSET', key, 'tokens', tostring(tokens), 'at', tostring(now))
redis.call('PEXPIRE', key, math.ceil(burst / rate * 1000) + 1000)
return wait
"""

# ARGV: -. Returns the node ids of the live members.
_NODES = (
    _NOW
    + """
local nodes = {}
for _, member in ipairs(redis.call('ZRANGEBYSCORE', 'tunnel:members', now, '+inf')) do
  local entry = redis.call('GET', 'tunnel:member:' .. member)
  if entry then
    nodes[string.match(entry, '^%S+')] = true
  end
end
local found = {}
for node in pairs(nodes) do
  table.insert(found, node)
end
return found
"""
)


# ARGV: member, JSON, ttl.
_PUBLISH_TUNNELS = """
redis.call('SET', 'tunnel:tunnels:' .. ARGV[1], ARGV[2], 'PX', tonumber(ARGV[3]))
return 1
"""

# ARGV: this member. Returns the tunnels the other live members published and
# still serve (a tunnel let go of since its member's last renewal is left out).
_TUNNELS = (
    _NOW
    + """
local found = {}
for _, member in ipairs(redis.call('ZRANGEBYSCORE', 'tunnel:members', now, '+inf')) do
  if member ~= ARGV[1] then
    local entry = redis.call('GET', 'tunnel:tunnels:' .. member)
    if entry then
      for _, tunnel in ipairs(cjson.decode(entry)) do
        local until_ = redis.call('ZSCORE', 'tunnel:nodes:' .. tunnel['host'], member)
        if until_ and tonumber(until_) > now then
          table.insert(found, cjson.encode(tunnel))
        end
      end
    end
  end
end
return found
"""
)

# ARGV: this member. Returns the TCP tunnels (``tcp:<port>``) other live members
# serve; forgets those nobody serves any more.
_TCP_ELSEWHERE = (
    _NOW
    + """
local found = {}
for _, key in ipairs(redis.call('SMEMBERS', 'tunnel:tcp')) do
  local nodes_key = 'tunnel:nodes:' .. key
  redis.call('ZREMRANGEBYSCORE', nodes_key, '-inf', now)
  local members = redis.call('ZRANGE', nodes_key, 0, -1)
  if #members == 0 then
    redis.call('SREM', 'tunnel:tcp', key)
  else
    for _, member in ipairs(members) do
      if member ~= ARGV[1] then
        table.insert(found, key)
        break
      end
    end
  end
end
return found
"""
)

#: The pub/sub channel of the admin API's disconnect requests.
_DISCONNECTS: Final = "tunnel:disconnect"


def redacted(url: str) -> str:
    """``url`` without its password (in the user part or the query), for messages and logs."""
    parts = urlsplit(url)
    if parts.query:
        query = "&".join(
            f"{name}=***" if name.lower() == "password" else f"{name}{sep}{value}"
            for name, sep, value in (item.partition("=") for item in parts.query.split("&"))
        )
        parts = parts._replace(query=query)
        url = urlunsplit(parts)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisStore(Store):
    """This process's view of the cluster's Redis store.

    Made by :func:`open_redis_store`, whose task owns the Redis client.

    Args:
        client: A connected coredis client.
        url: The store's URL (for messages; shown without its password).
        member: This process's id in the store (unique per process).
        node: Its node's id.
        address: Where the other nodes reach its node.
        ttl: Seconds an entry lives without being renewed.
    """

    clustered = True

    def __init__(
        self, client: Any, url: str, *, member: str, node: str, address: str, ttl: float
    ) -> None:
        self._client = client
        self.url = redacted(url)
        self.member = member
        self.node = node
        self.address = address
        self.ttl_ms = max(1000, int(ttl * 1000))
        self._scripts = {
            name: client.register_script(text)
            for name, text in {
                "claim": _CLAIM,
                "renew": _RENEW,
                "release": _RELEASE,
                "held_by_other": _HELD_BY_OTHER,
                "holders": _HOLDERS,
                "take": _TAKE,
                "nodes": _NODES,
                "publish_tunnels": _PUBLISH_TUNNELS,
                "tunnels": _TUNNELS,
                "tcp_elsewhere": _TCP_ELSEWHERE,
            }.items()
        }
        self._releases_in, self._releases = trio.open_memory_channel[str](MAX_PENDING_RELEASES)
        self._nodes = 1
        self._renew_now = trio.Event()
        # Held by a renewal and by each release: never one inside the other.
        self._renewing = trio.Lock()
        #: Whether the last call to Redis succeeded.
        self.reachable = True

    async def _call(self, script: str, *args: str | int) -> Any:
        try:
            with trio.fail_after(CALL_TIMEOUT):
                result = await self._scripts[script](keys=[], args=list(args))
        except trio.TooSlowError:
            self._lost_contact(f"no answer within {CALL_TIMEOUT:g} s")
            raise StoreUnavailableError(
                f"the cluster's store ({self.url}) did not answer"
            ) from None
        except Exception as exc:  # coredis raises many kinds; all mean the same here
            self._lost_contact(str(exc) or type(exc).__name__)
            raise StoreUnavailableError(
                f"the cluster's store ({self.url}) is unreachable: {exc}"
            ) from None
        if not self.reachable:
            self.reachable = True
            logger.warning("tunnel server: the cluster's store %s answers again", self.url)
        return result

    def _lost_contact(self, reason: str) -> None:
        if self.reachable:
            self.reachable = False
            logger.warning(
                "tunnel server: lost the cluster's store %s (%s); serving the tunnels held "
                "here, refusing new agents until it is back",
                self.url,
                reason,
            )

    async def claim(self, key: str, digest: bytes, limit: int | None) -> Claim:
        answer = await self._call("claim", key, digest.hex(), self.member, self.ttl_ms, limit or 0)
        return Claim(_text(answer))

    async def held_by_other(self, key: str, digest: bytes) -> bool:
        return bool(await self._call("held_by_other", key, digest.hex()))

    def release(self, key: str) -> None:
        with contextlib.suppress(trio.WouldBlock):  # else it expires with its TTL
            self._releases_in.send_nowait(key)

    async def holders(self, key: str) -> list[Member]:
        found = []
        for entry in await self._call("holders", key):
            node, _, address = _text(entry).partition(" ")
            if node != self.node:
                found.append(Member(node, address))
        return found

    async def take(self, bucket: str, limit: RateLimit) -> float | None:
        rate = limit.requests_per_second
        if rate is None:
            return 0.0
        try:
            wait = await self._call("take", bucket, repr(float(rate)), limit.burst)
        except StoreUnavailableError:
            return None  # each node counts on its own until the store is back
        return int(wait) / 1000

    def node_count(self) -> int:
        return self._nodes

    async def renew(self, holder: Holder) -> list[str]:
        """Renew this process's entries; return the keys given to another identity.

        Releases wait meanwhile (a release between the reading of what is held
        and its renewal would be undone by it). Then this process's tunnels (as
        the admin API lists them) are published for the other nodes' admin APIs.
        """
        lost: list[str] = []
        async with self._renewing:
            items = list(holder.holdings().items())
            for start in range(0, max(len(items), 1), RENEW_BATCH):
                pairs = [
                    part
                    for key, digest in items[start : start + RENEW_BATCH]
                    if holder.holds(key)  # not released while an earlier batch ran
                    for part in (key, digest.hex())
                ]
                answer = await self._call(
                    "renew", self.member, self.node, self.address, self.ttl_ms, *pairs
                )
                lost.extend(_text(key) for key in answer)
        with contextlib.suppress(StoreUnavailableError):
            tunnels = json.dumps(holder.tunnels())
            await self._call("publish_tunnels", self.member, tunnels, self.ttl_ms)
            self._nodes = max(1, len(await self.nodes()))
        return lost

    async def nodes(self) -> list[str]:
        """The ids of the cluster's live nodes, this one's included once it renewed."""
        return sorted(_text(node) for node in await self._call("nodes"))

    async def tunnels(self) -> list[dict[str, Any]]:
        return [json.loads(entry) for entry in await self._call("tunnels", self.member)]

    async def tcp_elsewhere(self) -> list[str]:
        return [_text(key) for key in await self._call("tcp_elsewhere", self.member)]

    async def disconnect_elsewhere(self, key: str, reason: str, reconnect: bool) -> None:
        message = json.dumps(
            {"key": key, "reason": reason, "reconnect": reconnect, "by": self.member}
        )
        try:
            with trio.fail_after(CALL_TIMEOUT):
                await self._client.publish(_DISCONNECTS, message)
        except Exception as exc:
            raise StoreUnavailableError(f"the cluster's store ({self.url}): {exc}") from None

    async def run(
        self,
        holder: Holder,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Renew this process's entries every half TTL, and do what else the store asks.

        That is: carry out releases, and the other nodes' disconnect requests.
        """
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._carry_out_releases, holder)
            nursery.start_soon(self._take_disconnects, holder, nursery)
            interval = self.ttl_ms / 2000
            first = True
            while True:
                if first:
                    # The first renewal before the node serves: it is in the
                    # store, and knows the cluster's size, by its first agent.
                    first = False
                    with contextlib.suppress(StoreUnavailableError):
                        await self.renew(holder)
                    task_status.started()
                    continue
                wait = interval
                try:
                    for key in await self.renew(holder):
                        logger.warning(
                            "tunnel server: %s was given to another identity while this node "
                            "could not reach the cluster's store; letting its agent go",
                            key,
                        )
                        holder.lost(key)
                    holder.forward_tcp(await self.tcp_elsewhere())
                except StoreUnavailableError:
                    # Soon again, not a whole interval later: entries live two
                    # intervals, and one missed renewal must not let them lapse.
                    wait = min(interval, RETRY_AFTER)
                with trio.move_on_after(wait):
                    await self._renew_now.wait()
                self._renew_now = trio.Event()

    def move_to(self, address: str) -> None:
        """This node is reached at ``address`` now (the port it bound); tell the others soon."""
        self.address = address
        self._renew_now.set()

    async def _take_disconnects(self, holder: Holder, nursery: trio.Nursery) -> None:
        """Disconnect what another node's admin API asks to, for as long as this runs."""
        while True:
            try:
                async with self._client.pubsub(channels=[_DISCONNECTS]) as messages:
                    async for message in messages:
                        if message.get("type") != "message":
                            continue
                        request = json.loads(_text(message["data"]))
                        if request.get("by") != self.member and holder.holds(request["key"]):
                            nursery.start_soon(
                                holder.disconnect,
                                request["key"],
                                str(request.get("reason", "")),
                                bool(request.get("reconnect")),
                            )
            except Exception as exc:  # Redis gone (the heartbeat reports it); subscribe again
                logger.debug("tunnel server: disconnect channel: %s", exc)
            await trio.sleep(self.ttl_ms / 2000)

    async def _carry_out_releases(self, holder: Holder) -> None:
        async for key in self._releases:
            if not self.reachable:
                # Each would wait for its own timeout; the entries expire anyway.
                continue
            async with self._renewing:
                if holder.holds(key):
                    continue  # served again since (the agent back on a new connection)
                with contextlib.suppress(StoreUnavailableError):
                    await self._call("release", key, self.member)


def open_store(
    config: ServerConfig, address: str | None = None
) -> contextlib.AbstractAsyncContextManager[RedisStore]:
    """The store of ``config.store``, for this process: see :func:`open_redis_store`.

    ``address`` is where the other nodes reach this one (default:
    ``config.peer_address``).

    Entries live two keepalive intervals unless renewed, so a dead node's
    vanish within two intervals, as its agents' connections are found dead.
    """
    if config.store is None:
        raise ValueError("ServerConfig.store is not set")
    node = node_id(config)
    return open_redis_store(
        config.store,
        member=f"{node}/{worker_id()}",
        node=node,
        address=address or config.peer_address,
        ttl=2 * config.keepalive_interval,
    )


async def check_store(config: ServerConfig) -> None:
    """Raise :class:`~tunnel.StoreUnavailableError` unless ``config.store`` answers."""
    async with open_store(config):
        pass


@contextlib.asynccontextmanager
async def open_redis_store(
    url: str, *, member: str, node: str, address: str, ttl: float
) -> AsyncIterator[RedisStore]:
    """Connect to the store at ``url``, check that it answers, and yield it.

    The client is opened and closed by the calling task (coredis asks that).

    Raises:
        StoreUnavailableError: Redis is unreachable, or refused the connection (a
            wrong password, say); the message names the URL without its password.
    """
    try:
        import coredis  # only a cluster's server needs it
    except ImportError:
        raise ConfigError(
            f"{server_setting('store')} needs the Redis client coredis: "
            "pip install 'trio-tunnel[cluster]'"
        ) from None

    try:
        client = coredis.Redis.from_url(
            url, connect_timeout=CONNECT_TIMEOUT, stream_timeout=CALL_TIMEOUT
        )
    except (ValueError, OSError) as exc:  # a bad option, a TLS file missing
        raise StoreUnavailableError(
            f"cannot use the cluster's store at {redacted(url)}: {exc}"
        ) from None
    failure: StoreUnavailableError | None = None
    async with contextlib.AsyncExitStack() as stack:
        try:
            # Entered outside any cancel scope of ours: the client opens a task
            # group that must close inside whatever scope it opened in. Its
            # connect_timeout bounds the entry; the ping gets a deadline.
            await stack.enter_async_context(client)
            with trio.fail_after(CALL_TIMEOUT):
                await client.ping()
        except Exception as exc:  # coredis raises many kinds (and groups of them)
            failure = StoreUnavailableError(
                f"cannot reach the cluster's store at {redacted(url)}: {_reason(exc)}"
            )
        else:
            yield RedisStore(client, url, member=member, node=node, address=address, ttl=ttl)
    if failure is not None:
        # Raised once the client is closed, so its task group does not wrap it.
        raise failure


def _reason(exc: BaseException) -> str:
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    if isinstance(exc, trio.TooSlowError):
        return "no answer in time"
    return str(exc) or type(exc).__name__
