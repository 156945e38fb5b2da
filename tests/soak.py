"""Soak: steady load through a tunnel server while agents are killed, stopped and cut off.

Run with ``nox -s soak`` (6 minutes) or ``nox -s soak -- --quick`` (about 40 s);
directly: ``python tests/soak.py [--duration SECONDS] [--quick] [--small-posts SECONDS]``.

What runs, all on loopback:

* a tunnel server, as a subprocess (``tests/processes.py server``), whose RSS and
  open file descriptors are read from ``/proc`` at the start and the end;
* *chaos* agents, one subprocess per host, each behind a
  :class:`faultproxy.FaultProxy`, at random ``kill -9``-ed and restarted,
  SIGSTOP-ed and SIGCONT-ed (once for 30 s in a full run), cut off (RST), or
  black-holed (once for a whole minute in a full run);
* a *steady* agent that nothing happens to: its visitors must only see 200s;
* *churn*: in-process agents that connect, serve one request and leave, over
  and over (2,000 cycles in a full run);
* visitors: keep-alive HTTP clients sending requests to every host as fast as
  the answers come.

Then a *small-posts* phase (issue 11): a fresh server and agent (each its own
process, as deployed) and visitors on raw sockets writing curl-style POSTs,
head and small JSON body in one segment, on keep-alive connections as fast as
the answers come, for a minute (10 s with ``--quick``). Every answer must be a
200 whose body names the SHA-256 of the body sent. ``--small-posts SECONDS``
runs that phase alone.

Then a *rolling restarts* phase (``tests/rolling.py``): ``tunnel server
--workers 2`` and ``tunnel http`` agents (two in a pool, one alone) are
restarted gracefully one by one (SIGTERM, then a fresh process) under GET
load, for 2 minutes (one round with ``--quick``); there no GET may be lost or
answered 502, and every process must exit 0 with no traceback. ``--phases
rolling`` runs that phase alone.

Every request of the first phase must get an HTTP answer: 200, or 502 when its
agent was offline for longer than the grace period. A request with no answer at all (an error or
a timeout) is *lost*; the soak fails if any is lost, if a steady request was
not a 200, if a chaos agent did not come back, or if the server's RSS grew by
more than 10 MiB or its descriptors by any.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import signal
import sys
from collections import Counter
from dataclasses import dataclass, field
from functools import partial

import h11
import httpx
import trio
from faultproxy import FaultProxy
from processes import TOKEN, Child, start_agent, start_server
from rolling import rolling_restarts

import tunnel
from helpers import LocalService, free_port, serve_local

KEEPALIVE = 1.0
GRACE = 5.0
#: A request unanswered after this long is lost (a hang, not a slow answer).
REQUEST_TIMEOUT = 90.0
RSS_BUDGET_MIB = 10.0


@dataclass
class Tally:
    """Requests of one kind of host, by outcome."""

    sent: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    #: Answered (status and headers), but the body ended early: the agent was
    #: lost while the response was on its way, and that is how HTTP says so.
    cut: int = 0
    lost: int = 0
    errors: Counter[str] = field(default_factory=Counter)

    @property
    def ok(self) -> int:
        return sum(n for status, n in self.statuses.items() if 200 <= status < 300)

    @property
    def bad_gateway(self) -> int:
        return self.statuses[502]

    @property
    def other(self) -> int:
        return sum(self.statuses.values()) - self.ok - self.bad_gateway


@dataclass
class Faults:
    kills: int = 0
    stops: int = 0
    longest_stop: float = 0.0
    cuts: int = 0
    black_holes: int = 0
    longest_black_hole: float = 0.0


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


class Soak:
    def __init__(self, duration: float, quick: bool) -> None:
        self.duration = duration
        self.quick = quick
        self.chaos_hosts = [f"chaos-{i}.localhost" for i in range(3)]
        self.tallies = {"chaos": Tally(), "steady": Tally(), "churn": Tally()}
        self.faults = Faults()
        self.churn_cycles = 0
        self.churn_target = 200 if quick else 2000
        self.port = free_port()
        self.running = True
        self.long_stop_done = quick
        self.long_hole_done = quick
        self.unrecovered: list[str] = []

    async def request(self, http: httpx.AsyncClient, tally: Tally, path: str) -> None:
        tally.sent += 1
        status = 0
        try:
            with trio.fail_after(REQUEST_TIMEOUT):
                async with http.stream("GET", path) as response:
                    status = response.status_code
                    await response.aread()
            tally.statuses[status] += 1
        except (httpx.HTTPError, trio.TooSlowError) as exc:
            if status:
                tally.cut += 1
            else:
                tally.lost += 1
                tally.errors[type(exc).__name__] += 1

    def visitor(self, host: str) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{self.port}",
            headers={"host": host},
            timeout=httpx.Timeout(REQUEST_TIMEOUT),
            limits=httpx.Limits(max_connections=8),
            trust_env=False,
        )

    async def load(self, host: str, tally: Tally, workers: int) -> None:
        async with self.visitor(host) as http:

            async def worker(n: int) -> None:
                i = 0
                while self.running:
                    await self.request(http, tally, f"/load/{n}/{i}")
                    i += 1

            async with trio.open_nursery() as nursery:
                for n in range(workers):
                    nursery.start_soon(worker, n)

    async def chaos(self, host: str, local_port: int, seed: int, connected: trio.Event) -> None:
        """One agent process behind a proxy, and the faults done to it."""
        rng = random.Random(seed)
        async with trio.open_nursery() as nursery:
            proxy: FaultProxy = await nursery.start(FaultProxy(self.port).run)
            options = ("--keepalive", str(KEEPALIVE), "--backoff", "0.1", "--backoff-max", "1")
            options += ("--connect-timeout", "2")
            agent: Child = await start_agent(proxy.port, local_port, host, *options)
            try:
                await agent.wait_for_line("connected", 30)
                connected.set()
                while self.running:
                    await trio.sleep(rng.uniform(2, 6))
                    if not self.running:
                        break
                    fault = rng.choice(["kill", "stop", "cut", "hole"])
                    if fault == "kill":
                        self.faults.kills += 1
                        await agent.aclose()
                        await trio.sleep(rng.uniform(0, 2))
                        agent = await start_agent(proxy.port, local_port, host, *options)
                    elif fault == "stop":
                        long = not self.long_stop_done and self.elapsed() > 30
                        seconds = 30.0 if long else rng.uniform(0.5, 4)
                        self.long_stop_done |= long
                        self.faults.stops += 1
                        self.faults.longest_stop = max(self.faults.longest_stop, seconds)
                        agent.signal(signal.SIGSTOP)
                        await trio.sleep(seconds)
                        agent.signal(signal.SIGCONT)
                    elif fault == "cut":
                        self.faults.cuts += 1
                        proxy.cut()
                    else:
                        long = not self.long_hole_done and self.elapsed() > 60
                        seconds = 60.0 if long else rng.uniform(0.5, 4)
                        self.long_hole_done |= long
                        self.faults.black_holes += 1
                        self.faults.longest_black_hole = max(
                            self.faults.longest_black_hole, seconds
                        )
                        proxy.black_hole()
                        await trio.sleep(seconds)
                        proxy.pass_through()
                # Whatever happened last, the agent must be back and serving.
                async with self.visitor(host) as http:
                    for _ in range(200):
                        try:
                            if (await http.get("/recovered")).status_code == 200:
                                break
                        except httpx.HTTPError:
                            pass
                        await trio.sleep(0.1)
                    else:
                        self.unrecovered.append(host)
            finally:
                await agent.aclose()
                nursery.cancel_scope.cancel()

    async def churn(self, local_port: int, n: int) -> None:
        host = f"churn-{n}.localhost"
        async with self.visitor(host) as http:
            while self.running and self.churn_cycles < self.churn_target:
                config = tunnel.ClientConfig(
                    address=f"127.0.0.1:{self.port}", token=TOKEN, port=local_port, host=host
                )
                async with tunnel.open_tunnel(config):
                    await self.request(http, self.tallies["churn"], "/churn")
                self.churn_cycles += 1

    def elapsed(self) -> float:
        return trio.current_time() - self.started

    async def run(self) -> bool:
        server = await start_server(self.port, "--keepalive", str(KEEPALIVE), "--grace", str(GRACE))
        try:
            async with trio.open_nursery() as nursery:
                service = LocalService("soak")
                await nursery.start(partial(serve_local, service))
                steady = tunnel.ClientConfig(
                    address=f"127.0.0.1:{self.port}",
                    token=TOKEN,
                    port=service.port,
                    host="steady.localhost",
                )
                async with tunnel.open_tunnel(steady):
                    ok = await self._run(nursery, server, service.port)
                nursery.cancel_scope.cancel()
            return ok
        finally:
            await server.aclose()

    async def _run(self, nursery: trio.Nursery, server: Child, local_port: int) -> bool:
        # Warm up (imports, pools, first allocations), then take the baseline
        # with no visitor connection open.
        async with self.visitor("steady.localhost") as http:
            for _ in range(300):
                await http.get("/warm-up")
        # Idle visitor connections last header_timeout (Hypercorn's keep-alive).
        await trio.sleep(tunnel.ServerConfig().header_timeout + 1)
        rss_start, fds_start = rss_mib(server.pid), open_fds(server.pid)

        self.started = trio.current_time()
        async with trio.open_nursery() as work:
            for i, host in enumerate(self.chaos_hosts):
                # A host no agent ever claimed is a 404: load starts once it has.
                connected = trio.Event()
                work.start_soon(self.chaos, host, local_port, i, connected)
                await connected.wait()
                work.start_soon(self.load, host, self.tallies["chaos"], 3)
            work.start_soon(self.load, "steady.localhost", self.tallies["steady"], 6)
            for n in range(2):
                work.start_soon(self.churn, local_port, n)
            with trio.move_on_after(self.duration):
                while True:
                    await trio.sleep(10)
                    self.progress(server.pid)
            self.running = False
        await trio.sleep(6)
        rss_end, fds_end = rss_mib(server.pid), open_fds(server.pid)
        return self.report(rss_start, rss_end, fds_start, fds_end)

    def progress(self, pid: int) -> None:
        sent = sum(t.sent for t in self.tallies.values())
        lost = sum(t.lost for t in self.tallies.values())
        print(
            f"  {self.elapsed():5.0f} s: {sent} requests, {lost} lost, "
            f"{self.churn_cycles} churn cycles, server RSS {rss_mib(pid):.1f} MiB",
            flush=True,
        )

    def report(self, rss_start: float, rss_end: float, fds_start: int, fds_end: int) -> bool:
        f = self.faults
        print()
        print(
            f"soak: {self.elapsed():.0f} s; 3 chaos agents, 1 steady agent, "
            f"{self.churn_cycles} connect/disconnect cycles"
        )
        print()
        head = ("hosts", "sent", "2xx", "502", "other", "cut short", "lost")
        print("| {:<8} | {:>8} | {:>8} | {:>6} | {:>6} | {:>9} | {:>5} |".format(*head))
        print("|" + "|".join("-" * (w + 2) for w in (8, 8, 8, 6, 6, 9, 5)) + "|")
        total = Tally()
        for name, t in self.tallies.items():
            print(
                f"| {name:<8} | {t.sent:>8} | {t.ok:>8} | {t.bad_gateway:>6} | "
                f"{t.other:>6} | {t.cut:>9} | {t.lost:>5} |"
            )
            total.sent += t.sent
            total.statuses.update(t.statuses)
            total.cut += t.cut
            total.lost += t.lost
            total.errors.update(t.errors)
        print(
            f"| {'total':<8} | {total.sent:>8} | {total.ok:>8} | {total.bad_gateway:>6} | "
            f"{total.other:>6} | {total.cut:>9} | {total.lost:>5} |"
        )
        others = {
            k: n for k, n in sorted(total.statuses.items()) if k != 502 and not 200 <= k < 300
        }
        if others:
            print(f"other statuses: {others}")
        print()
        print(
            f"faults: {f.kills} kill -9, {f.stops} SIGSTOP/SIGCONT "
            f"(longest {f.longest_stop:.0f} s), {f.cuts} cuts, "
            f"{f.black_holes} black holes (longest {f.longest_black_hole:.0f} s)"
        )
        print(
            f"server: RSS {rss_start:.1f} -> {rss_end:.1f} MiB ({rss_end - rss_start:+.1f}), "
            f"open fds {fds_start} -> {fds_end}"
        )
        failures = []
        if total.lost:
            failures.append(f"{total.lost} requests lost: {dict(total.errors)}")
        steady = self.tallies["steady"]
        if steady.ok != steady.sent:
            failures.append(f"steady host: {dict(steady.statuses)}")
        if self.unrecovered:
            failures.append(f"agents not back at the end: {self.unrecovered}")
        if rss_end - rss_start > RSS_BUDGET_MIB:
            failures.append(f"server RSS grew by {rss_end - rss_start:.1f} MiB")
        if fds_end > fds_start:
            failures.append(f"server fds grew from {fds_start} to {fds_end}")
        for failure in failures:
            print(f"FAILED: {failure}")
        if not failures:
            print("OK: every request answered, nothing leaked")
        return not failures


# -- small posts, curl-style (issue 11) ------------------------------------------


@dataclass
class SmallPosts:
    """Outcomes of the small-posts phase."""

    sent: int = 0
    ok: int = 0
    #: Status -> count, for every answer that was not a 200.
    statuses: Counter[int] = field(default_factory=Counter)
    #: 200s whose body did not name what was sent (a body lost or changed).
    wrong_body: int = 0
    #: Requests with no answer at all.
    errors: Counter[str] = field(default_factory=Counter)

    @property
    def failed(self) -> int:
        return self.sent - self.ok


async def _post_loop(port: int, worker: int, posts: SmallPosts, until: float) -> None:
    sock = await trio.open_tcp_stream("127.0.0.1", port)
    conn = h11.Connection(h11.CLIENT)
    n = 0
    async with sock:
        while trio.current_time() < until:
            body = json.dumps({"item": "socks", "qty": 2, "worker": worker, "n": n}).encode()
            n += 1
            head = (
                "POST /sha HTTP/1.1\r\nHost: posts.localhost\r\nUser-Agent: curl/7.88.1\r\n"
                "Accept: */*\r\nContent-Type: application/x-www-form-urlencoded\r\n"
                f"Content-Length: {len(body)}\r\n\r\n"
            ).encode()
            # h11 only keeps count of the exchange; the bytes go out as curl's
            # do, head and body in one segment.
            conn.send(
                h11.Request(
                    method="POST",
                    target="/sha",
                    headers=[("Host", "posts.localhost"), ("Content-Length", str(len(body)))],
                )
            )
            conn.send(h11.Data(data=body))
            conn.send(h11.EndOfMessage())
            posts.sent += 1
            try:
                with trio.fail_after(REQUEST_TIMEOUT):
                    await sock.send_all(head + body)
                    status, answer = await _read_answer(sock, conn)
            except (OSError, trio.BrokenResourceError, h11.ProtocolError, trio.TooSlowError) as exc:
                posts.errors[type(exc).__name__] += 1
                return
            expected = {"sha256": hashlib.sha256(body).hexdigest(), "length": len(body)}
            if status != 200:
                posts.statuses[status] += 1
            elif json.loads(answer) != expected:
                posts.wrong_body += 1
            else:
                posts.ok += 1
            if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                return
            conn.start_next_cycle()


async def _read_answer(sock: trio.SocketStream, conn: h11.Connection) -> tuple[int, bytes]:
    status, body = 0, bytearray()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await sock.receive_some(65536))
        elif isinstance(event, h11.Response):
            status = event.status_code
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            return status, bytes(body)
        elif isinstance(event, h11.ConnectionClosed):
            raise trio.BrokenResourceError("closed before the answer ended")


async def small_posts(duration: float, workers: int = 8) -> SmallPosts:
    """Small curl-style POSTs through a server and agent of their own for ``duration`` s."""
    posts = SmallPosts()
    port = free_port()
    server = await start_server(port, "--graceful", "1")
    try:
        async with trio.open_nursery() as nursery:
            service = LocalService("posts")
            await nursery.start(partial(serve_local, service))
            agent = await start_agent(port, service.port, "posts.localhost")
            try:
                await agent.wait_for_line("connected", 20)
                until = trio.current_time() + duration
                async with trio.open_nursery() as load:
                    for worker in range(workers):
                        # A worker whose connection ended starts another.
                        async def loop(worker: int = worker) -> None:
                            while trio.current_time() < until:
                                await _post_loop(port, worker, posts, until)

                        load.start_soon(loop)
            finally:
                await agent.aclose()
            nursery.cancel_scope.cancel()
    finally:
        await server.aclose()
    return posts


async def run_small_posts(duration: float) -> bool:
    posts = await small_posts(duration)
    print(
        f"small posts: {posts.sent} sent in {duration:g} s, {posts.ok} 200s with their body, "
        f"other statuses {dict(posts.statuses)}, wrong bodies {posts.wrong_body}, "
        f"no answer {dict(posts.errors)}"
    )
    if posts.failed:
        print(f"FAILED: {posts.failed} small posts were not a 200 with their body")
        return False
    print("OK: every small post answered 200 with its body")
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="about 40 s instead of 6 minutes")
    parser.add_argument("--duration", type=float, help="seconds of load and faults")
    parser.add_argument(
        "--small-posts",
        type=float,
        metavar="SECONDS",
        help="run only the small-posts phase, for this long",
    )
    parser.add_argument(
        "--phases",
        default="chaos,small-posts,rolling",
        help="which phases to run (default chaos,small-posts,rolling)",
    )
    args = parser.parse_args()
    if args.small_posts is not None:
        sys.exit(0 if trio.run(run_small_posts, args.small_posts) else 1)
    phases = set(args.phases.split(","))
    ok = True
    if "chaos" in phases:
        duration = args.duration or (30.0 if args.quick else 300.0)
        ok = trio.run(Soak(duration, args.quick).run)
    if "small-posts" in phases:
        ok = trio.run(run_small_posts, 10.0 if args.quick else 60.0) and ok
    if "rolling" in phases:
        ok = rolling_phase(args.quick) and ok
    sys.exit(0 if ok else 1)


def rolling_phase(quick: bool) -> bool:
    print()
    print("rolling restarts: SIGTERM, then a fresh process, of agents and server workers")
    restarts = trio.run(
        partial(
            rolling_restarts,
            0.0 if quick else 120.0,
            log=lambda line: print(f"  {line}", flush=True),
        )
    )
    print(restarts.summary())
    failures = []
    if restarts.lost:
        failures.append(f"{restarts.lost} GETs lost: {dict(restarts.errors)}")
    if restarts.bad_gateway:
        failures.append(f"{restarts.bad_gateway} GETs answered 502")
    if restarts.unclean:
        failures.append(f"processes that did not stop cleanly: {restarts.unclean}")
    for failure in failures:
        print(f"FAILED: {failure}")
    if not failures:
        print("OK: every GET answered, none 502, every process stopped cleanly")
    return not failures


if __name__ == "__main__":
    main()
