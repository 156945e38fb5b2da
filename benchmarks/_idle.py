"""Idle agents: COUNT ``tunnel.Client`` s in one trio process, each claiming its own host.

Run as ``python benchmarks/_idle.py SERVER_PORT TOKEN LOCAL_PORT FIRST COUNT``: the
agents claim ``idle-FIRST.localhost`` … ``idle-(FIRST+COUNT-1).localhost`` and
forward to ``LOCAL_PORT``. The script prints ``connected COUNT`` once every one
of them is connected and then keeps them up, idle but for their keepalive
PINGs, until it is terminated. It fails (and says so) if they are not all up
within a minute.

They connect at most ``PARALLEL`` at a time, as agents started over minutes
would, rather than flooding the server's listen queue in one burst.
"""

from __future__ import annotations

import signal
import sys

import trio

import tunnel

PARALLEL = 32
CONNECT_WITHIN = 60.0


def host(index: int) -> str:
    return f"idle-{index}.localhost"


async def main(server_port: int, token: str, local_port: int, first: int, count: int) -> None:
    clients = [
        tunnel.Client(
            tunnel.ClientConfig(
                address=f"127.0.0.1:{server_port}",
                token=token,
                port=local_port,
                host=host(index),
                inspector=None,
            )
        )
        for index in range(first, first + count)
    ]
    async with trio.open_nursery() as agents:
        limit = trio.Semaphore(PARALLEL)

        async def start(client: tunnel.Client) -> None:
            async with limit:
                await agents.start(client.connect)

        with trio.fail_after(CONNECT_WITHIN):
            async with trio.open_nursery() as starting:
                for client in clients:
                    starting.start_soon(start, client)
        print(f"connected {count}", flush=True)
        with trio.open_signal_receiver(signal.SIGTERM) as signals:
            async for _ in signals:
                break
        agents.cancel_scope.cancel()


if __name__ == "__main__":
    port, token, local, first, count = sys.argv[1:6]
    trio.run(main, int(port), token, int(local), int(first), int(count))
