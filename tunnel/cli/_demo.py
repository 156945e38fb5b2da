"""``tunnel demo``: a server, a sample app and an agent in one process on loopback.

It shows the whole path a visitor's request takes, with nothing to set up, and
checks it: one request goes through the tunnel and its answer is printed.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from functools import partial

import h11
import trio

from .._asgi import Receive, Scope, Send
from .._config import ClientConfig, ServerConfig
from ..client import open_tunnel
from ..server import serve
from ..server.hypercorn._plain import serve_plain

__all__ = ["run_demo"]

DEMO_HOST = "demo.localhost"
REQUEST_TIMEOUT = 10.0


async def sample_app(
    scope: Scope,
    receive: Receive,
    send: Send,
) -> None:
    """The local service of the demo: says hello and who asked."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            await send({"type": message["type"] + ".complete"})
            if message["type"] == "lifespan.shutdown":
                return
    if scope["type"] != "http":
        return
    headers = dict(scope["headers"])
    visitor = headers.get(b"x-forwarded-for", b"?").decode()
    body = (
        f"Hello from the local service behind the tunnel!\n"
        f"You asked for {scope['path']} as {headers.get(b'host', b'?').decode()}, "
        f"from {visitor}.\n"
    ).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [
                (b"content-type", b"text/plain; charset=utf-8"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def fetch(port: int, host: str, path: str = "/") -> tuple[int, bytes]:
    """GET ``path`` from 127.0.0.1:``port`` with ``Host: host``; (status, body)."""
    conn = h11.Connection(h11.CLIENT)
    with trio.fail_after(REQUEST_TIMEOUT):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            request = h11.Request(
                method="GET",
                target=path,
                headers=[("Host", host), ("Connection", "close"), ("User-Agent", "tunnel-demo")],
            )
            await stream.send_all(conn.send(request) + conn.send(h11.EndOfMessage()))
            status, body = 0, bytearray()
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await stream.receive_some(65536))
                elif isinstance(event, h11.Response):
                    status = event.status_code
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                    return status, bytes(body)


async def run_demo(*, once: bool, print_: Callable[[str], None] = print) -> int:
    """Run the demo; return the process exit status (0 when the check passed)."""
    token = secrets.token_urlsafe(16)
    async with trio.open_nursery() as nursery:
        (app_url,) = await nursery.start(
            partial(serve_plain, sample_app, "127.0.0.1:0", errorlog=None)
        )
        app_port = int(app_url.rsplit(":", 1)[1])
        (server_url,) = await nursery.start(
            serve, ServerConfig(address="127.0.0.1:0", tokens=frozenset({token}))
        )
        server_port = int(server_url.rsplit(":", 1)[1])
        print_(f"tunnel server   {server_url}")
        print_(f"sample app      http://127.0.0.1:{app_port}")
        config = ClientConfig(
            address=f"127.0.0.1:{server_port}", token=token, port=app_port, host=DEMO_HOST
        )
        async with open_tunnel(config) as tunnel:
            print_(f"public URL      {tunnel.url}")
            status, body = await fetch(server_port, f"{DEMO_HOST}:{server_port}", "/hello")
            ok = status == 200 and body.startswith(b"Hello from the local service")
            print_(f"GET {tunnel.url}/hello → {status}")
            for line in body.decode("utf-8", "replace").splitlines():
                print_(f"    {line}")
            if not ok:
                print_("demo FAILED: the request did not come back through the tunnel")
            elif not once:
                print_("")
                print_(f"Open {tunnel.url}/ in a browser, or run")
                print_(f"    curl -H 'Host: {DEMO_HOST}' http://127.0.0.1:{server_port}/")
                print_("Ctrl-C stops the demo.")
                await trio.sleep_forever()
        # The server and the sample app run until cancelled.
        nursery.cancel_scope.cancel()
    return 0 if ok else 1
