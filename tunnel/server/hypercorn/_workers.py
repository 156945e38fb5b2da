"""Several worker processes: the parent binds, each worker runs its own app.

A trio process uses one core. With ``ServerConfig.workers`` set to N, the parent
binds the listening sockets and starts N worker processes that accept from the
same sockets, each with its own :class:`~tunnel.TunnelApp` (registry, sessions).
Every agent opens a connection to each worker (see the worker headers of the
handshake), so whichever worker takes a visitor's connection can serve it. The
parent restarts a worker that dies; SIGTERM to a worker drains it, and a
graceful shutdown sends it to all of them.

Workers are fresh interpreters (``python -c``) that receive their settings
pickled on stdin and the listening sockets as inherited descriptors; unlike
``multiprocessing``, they never import the user's main module again, so a script
without an ``if __name__ == "__main__"`` guard works. The parent keeps the
worker's stdin open for as long as it wants the worker: if the parent dies (even
by SIGKILL), the worker reads end-of-file there and drains and exits rather than
serve on as an orphan nobody supervises.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Final

import trio
from hypercorn.utils import repr_socket_addr

from ..._exceptions import ConfigError, TunnelError
from ..._malloc import keeping_freed_buffers
from .._ledger import clear_worker
from .._worker_id import node_id
from ._config import hypercorn_config

if TYPE_CHECKING:
    from hypercorn.config import Sockets

    from ..._asgi import ASGIApp
    from ..._config import ServerConfig

__all__ = ["serve_workers"]

logger = logging.getLogger("tunnel.server")

#: Seconds a worker may take from its start to listening.
START_TIMEOUT: Final = 60.0
#: Seconds before restarting a worker that died; doubles while it keeps dying.
RESTART_INITIAL: Final = 0.5
RESTART_MAX: Final = 30.0
#: A worker that stayed up this long (seconds) starts again from RESTART_INITIAL.
STABLE_AFTER: Final = 30.0
#: Seconds a worker gets beyond the graceful timeout to exit on shutdown.
EXIT_GRACE: Final = 10.0
#: Seconds a worker that is ending anyway gets to exit before it is killed.
EXIT_WAIT: Final = 2.0
#: The most a worker's start-up report may hold.
MAX_REPORT: Final = 1 << 20

# The worker's first statement: make the parent's import path its own (the
# package may be importable only through it), then hand over to _worker.py.
_BOOTSTRAP = (
    "import pickle, sys; sys.path[:0] = pickle.load(sys.stdin.buffer); "
    "from tunnel.server.hypercorn._worker import worker_main; worker_main()"
)


async def serve_workers(
    config: ServerConfig,
    fallback: ASGIApp | None,
    shutdown_trigger: Callable[[], Awaitable[None]] | None,
    task_status: trio.TaskStatus[list[str]],
) -> None:
    """:func:`tunnel.serve` with ``config.workers`` processes."""
    _check_portable(config, fallback)
    hc = hypercorn_config(config)
    sockets = hc.create_sockets()
    listening = [*sockets.secure_sockets, *sockets.insecure_sockets]
    cleanup = contextlib.ExitStack()
    try:
        for sock in listening:
            sock.listen(hc.backlog)
        urls = [_url("https", sock) for sock in sockets.secure_sockets] + [
            _url("http", sock) for sock in sockets.insecure_sockets
        ]
        stopping = trio.Event()
        ledger = tempfile.mkdtemp(prefix="tunnel-hosts-")
        cleanup.callback(shutil.rmtree, ledger, ignore_errors=True)
        cleanup.callback(_stop_watching, _watch_for_removal(ledger))
        async with trio.open_nursery() as nursery:
            # Started side by side: each takes a second or more to import.
            extra: list[list[str]] = [[] for _ in range(config.workers)]
            async with trio.open_nursery() as starting:
                for index in range(config.workers):
                    worker = _Worker(
                        index, _for_worker(config, index), fallback, sockets, stopping, ledger
                    )
                    starting.start_soon(_start_supervisor, nursery, worker, extra)
            task_status.started(urls + [url for found in extra for url in found])
            if shutdown_trigger is None:
                await trio.sleep_forever()
            await shutdown_trigger()
            # Each worker drains and exits; its supervisor returns then.
            stopping.set()
    except BaseExceptionGroup as group:
        error = _single(group)
        if error is group:
            raise
        raise error from None
    finally:
        for sock in listening:
            sock.close()
        cleanup.close()


#: The watchdog of the ledger's directory: it reads its standard input, a pipe
#: from this process, until the end, which comes however this process ends
#: (SIGKILL included), and removes the directory then.
_WATCHDOG = (
    "import shutil, signal, sys\n"
    # Signals meant for the server's processes (a reload, a dump) must not end
    # it before its work: it ends when the server has.
    "for name in ('SIGINT', 'SIGHUP', 'SIGUSR1', 'SIGUSR2'):\n"
    "    signal.signal(getattr(signal, name), signal.SIG_IGN)\n"
    "sys.stdin.buffer.read()\n"
    "shutil.rmtree(sys.argv[1], True)\n"
)


def _watch_for_removal(directory: str) -> subprocess.Popen[bytes]:
    """A small process that removes ``directory`` once this one has ended, however."""
    return subprocess.Popen(
        [sys.executable, "-c", _WATCHDOG, directory],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        # Out of the terminal's process group: Ctrl-C must not stop it first.
        start_new_session=True,
    )


def _stop_watching(watchdog: subprocess.Popen[bytes]) -> None:
    assert watchdog.stdin is not None
    watchdog.stdin.close()
    try:
        watchdog.wait(timeout=5)
    except subprocess.TimeoutExpired:
        watchdog.kill()
        watchdog.wait()


def _single(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The one error inside nested groups of one, else the group itself."""
    error: BaseException = group
    while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
        error = error.exceptions[0]
    return error


async def _start_supervisor(nursery: trio.Nursery, worker: _Worker, extra: list[list[str]]) -> None:
    extra[worker.index] = await nursery.start(worker.supervise)


def _url(scheme: str, sock: socket.socket) -> str:
    # As Hypercorn reports the URLs of the sockets it binds itself.
    return f"{scheme}://{repr_socket_addr(sock.family, sock.getsockname())}"


def _for_worker(config: ServerConfig, index: int) -> ServerConfig:
    """Worker ``index``'s settings: the node id of them all, its own metrics port.

    The metrics port is the given one plus ``index`` (0 stays 0: any free port).
    """
    config = replace(config, node_id=node_id(config))
    if config.metrics_address is None:
        return config
    host, _, port = config.metrics_address.strip().rpartition(":")
    if int(port) == 0:
        return config
    return replace(config, metrics_address=f"{host}:{int(port) + index}")


def _check_portable(config: ServerConfig, fallback: ASGIApp | None) -> None:
    """Refuse, with the fix, settings that a worker process could not rebuild."""
    code = {
        "auth": config.auth,
        "on_connection": config.callbacks.on_connection,
        "on_disconnection": config.callbacks.on_disconnection,
        "on_request": config.callbacks.on_request,
        "fallback": fallback,
    }
    for name, value in code.items():
        module = getattr(value, "__module__", None) or getattr(type(value), "__module__", None)
        if value is not None and module == "__main__":
            raise ConfigError(
                f"ServerConfig.workers={config.workers}: {name} is defined in the main script, "
                "which the worker processes do not run; move it into a module they can import"
            )
    try:
        pickle.dumps((config, fallback))
    except Exception as exc:
        raise ConfigError(
            f"ServerConfig.workers={config.workers}: every worker process gets a copy of the "
            f"settings and the fallback app, and this one cannot be copied ({exc}); make the "
            "auth hook, the callbacks and the fallback module-level functions or objects"
        ) from None


class _Worker:
    """One worker slot: its process, restarted whenever it dies."""

    def __init__(
        self,
        index: int,
        config: ServerConfig,
        fallback: ASGIApp | None,
        sockets: Sockets,
        stopping: trio.Event,
        ledger: str,
    ) -> None:
        self.index = index
        self.config = config
        self.fallback = fallback
        self.sockets = sockets
        self.stopping = stopping
        #: The directory of the workers' :class:`HostLedger`.
        self.ledger = ledger

    async def supervise(self, *, task_status: trio.TaskStatus[list[str]]) -> None:
        """Run the worker, restarting it when it dies, until the server stops."""
        # The first start's failure is the server's: it is raised. Later ones
        # (the OOM killer striking a restart, say) count as one more death.
        process, urls = await self._start()
        task_status.started(urls)
        delay = RESTART_INITIAL
        while True:
            started_at = trio.current_time()
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._drain_on_stop, process)
                    await process.wait()
                    nursery.cancel_scope.cancel()
            except BaseException:
                # Cancelled: stop at once.
                await self._end(process, graceful=False)
                raise
            await self._end(process)
            if self.stopping.is_set():
                return
            up = trio.current_time() - started_at
            if up >= STABLE_AFTER:
                delay = RESTART_INITIAL
            while True:
                logger.warning(
                    "server worker %d exited with code %s after %.1fs; restarting it in %.1fs",
                    self.index,
                    process.returncode,
                    up,
                    delay,
                )
                with trio.move_on_after(delay):
                    await self.stopping.wait()
                if self.stopping.is_set():
                    return
                delay = min(RESTART_MAX, delay * 2)
                try:
                    process, _ = await self._start()
                    break
                except TunnelError as exc:
                    logger.error("server worker %d did not restart: %s", self.index, exc)
                    up = 0.0

    async def _drain_on_stop(self, process: trio.Process) -> None:
        await self.stopping.wait()
        process.send_signal(signal.SIGTERM)
        # Draining has a deadline, whatever the worker is stuck on.
        await trio.sleep(self.config.graceful_timeout + EXIT_GRACE)
        logger.warning("server worker %d did not stop in time; killing it", self.index)
        process.kill()

    async def _start(self) -> tuple[trio.Process, list[str]]:
        """Start the worker process and wait until it listens; return it and its extra URLs."""
        sockets = self.sockets
        secure = [sock.fileno() for sock in sockets.secure_sockets]
        insecure = [sock.fileno() for sock in sockets.insecure_sockets]
        read_fd, write_fd = os.pipe()
        root = logging.getLogger()
        formats = [h.formatter._fmt for h in root.handlers if h.formatter is not None]
        # A dead or replaced worker's claims go before its successor starts.
        clear_worker(self.ledger, self.index)
        ledger = (self.ledger, self.index, self.config.workers)
        process_settings = (root.level, formats[:1], keeping_freed_buffers())
        payload = pickle.dumps(sys.path) + pickle.dumps(
            (self.config, self.fallback, secure, insecure, ledger, write_fd, *process_settings)
        )
        try:
            process = await trio.lowlevel.open_process(
                [sys.executable, "-c", _BOOTSTRAP],
                stdin=subprocess.PIPE,
                pass_fds=(*secure, *insecure, write_fd),
            )
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)
        report = trio.lowlevel.FdStream(read_fd)
        try:
            assert process.stdin is not None
            with trio.move_on_after(START_TIMEOUT) as scope:
                await process.stdin.send_all(payload)
                # The worker writes its report and closes the pipe, or dies,
                # which closes it too.
                data = bytearray()
                while chunk := await report.receive_some():
                    data += chunk
                    if len(data) > MAX_REPORT:
                        break
            message: Any = None
            if not scope.cancelled_caught:
                try:
                    message = pickle.loads(data)
                except Exception:
                    message = None
        except BaseException:
            await self._end(process, graceful=False)
            raise
        finally:
            await report.aclose()
        if isinstance(message, tuple) and message[0] == "ready":
            return process, list(message[1])
        # Failing: let it finish writing its traceback to stderr first.
        await self._end(process)
        if isinstance(message, tuple) and message[0] == "error":
            error = message[1]
            if isinstance(error, BaseException):
                raise error
            raise TunnelError(f"server worker {self.index} failed to start: {error}")
        if scope.cancelled_caught:
            raise TunnelError(f"server worker {self.index} did not start within {START_TIMEOUT:g}s")
        raise TunnelError(
            f"server worker {self.index} died while starting (exit code {process.returncode}); "
            "see its log above"
        )

    async def _end(self, process: trio.Process, *, graceful: bool = True) -> None:
        """Make sure ``process`` has exited: give it a moment when ``graceful``, then kill it."""
        with trio.CancelScope(shield=True):
            if process.stdin is not None:
                await trio.aclose_forcefully(process.stdin)
            if process.returncode is None and graceful:
                # Exiting on its own (a start-up error being written out, say).
                with trio.move_on_after(EXIT_WAIT):
                    await process.wait()
            if process.returncode is None:
                process.kill()
                with trio.move_on_after(5):
                    await process.wait()
