"""A worker process's body: read the settings, serve the parent's sockets, report back.

The parent (``_workers.py``) starts ``python -c`` with its bootstrap, which makes the
parent's import path this process's and calls :func:`worker_main`.
"""

from __future__ import annotations

import logging
import pickle
import signal
import socket
import sys
from functools import partial
from typing import TYPE_CHECKING, Any

import trio
from hypercorn.config import Sockets

from ..._malloc import keep_freed_buffers
from ..._scheduling import instruments_from_environment
from .._ledger import HostLedger
from ._run import serve_sockets

if TYPE_CHECKING:
    from ..._asgi import ASGIApp
    from ..._config import ServerConfig

__all__ = ["worker_main"]

logger = logging.getLogger("tunnel.server")


def worker_main() -> None:
    """A worker process's body, after the bootstrap set its import path."""
    # Ctrl-C reaches the whole process group; the parent decides what happens.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    report = _Report()
    try:
        settings = pickle.load(sys.stdin.buffer)
        config, fallback, secure, insecure, ledger, report.fd = settings[:6]
        log_level, log_formats, malloc = settings[6:]
        if malloc:
            keep_freed_buffers()  # as the main process did (see tunnel._malloc)
        if log_formats:
            logging.basicConfig(level=log_level, format=log_formats[0])
        else:
            logging.getLogger().setLevel(log_level)
        sockets = Sockets(
            secure_sockets=[socket.socket(fileno=fd) for fd in secure],
            insecure_sockets=[socket.socket(fileno=fd) for fd in insecure],
            quic_sockets=[],
        )
        trio.run(
            _worker,
            *(config, fallback, sockets, HostLedger(*ledger), report),
            instruments=instruments_from_environment(),
        )
    except Exception as exc:
        # While starting, the parent waits for this; later nobody reads it.
        if not report.send(("error", exc)):
            report.send(("error", f"{type(exc).__name__}: {exc}"))
        raise


class _Report:
    """The pipe on which a worker tells the parent it started (or why not), once."""

    def __init__(self) -> None:
        self.fd = -1

    def send(self, message: tuple[str, Any]) -> bool:
        """Send ``message`` and close the pipe; False if it could not be pickled."""
        if self.fd < 0:
            return True
        try:
            data = pickle.dumps(message)
        except Exception:
            return False
        fd, self.fd = self.fd, -1
        try:
            with open(fd, "wb", closefd=True) as pipe:
                pipe.write(data)
        except OSError:
            pass  # the parent gave up waiting
        return True


async def _worker(
    config: ServerConfig,
    fallback: ASGIApp | None,
    sockets: Sockets,
    ledger: HostLedger,
    report: _Report,
) -> None:
    async def terminated() -> None:
        async with trio.open_nursery() as nursery:

            async def on_signal() -> None:
                # From the parent's graceful shutdown, or sent to this process
                # directly (a whole process group stopped by systemd or Docker).
                with trio.open_signal_receiver(signal.SIGTERM) as signals:
                    async for _ in signals:
                        break
                nursery.cancel_scope.cancel()

            async def on_orphaned() -> None:
                # Nothing more comes on stdin: readable means end-of-file, the
                # parent closed it or died.
                await trio.lowlevel.wait_readable(sys.stdin.fileno())
                logger.warning("the server's main process is gone; this worker stops")
                nursery.cancel_scope.cancel()

            nursery.start_soon(on_signal)
            nursery.start_soon(on_orphaned)

    async with trio.open_nursery() as nursery:
        urls: list[str] = await nursery.start(
            partial(serve_sockets, config, fallback, sockets, terminated, ledger=ledger)
        )
        # The parent knows the public URLs; what only the worker knows is where
        # it serves its metrics.
        report.send(("ready", [url for url in urls if url.endswith("/metrics")]))
