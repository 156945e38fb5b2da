"""Large transfers over one keep-alive connection: download and upload, in MiB/s.

A plain blocking socket with a 1 MiB receive buffer and pre-built send buffers,
so that the client side costs little next to what it measures. Every transfer
checks that exactly the expected number of bytes crossed, both ways.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass

__all__ = ["TransferResult", "download", "upload"]

MIB = 1 << 20
_SEND_PIECE = bytes(MIB)


@dataclass(frozen=True)
class TransferResult:
    direction: str
    size: int
    seconds: float

    @property
    def mib_per_s(self) -> float:
        return self.size / MIB / self.seconds


class TransferError(Exception):
    pass


def _connect(port: int, timeout: float) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


class _ResponseReader:
    """Reads one response, counting its body without keeping it."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = bytearray()
        self.scratch = bytearray(MIB)

    def _more(self) -> None:
        count = self.sock.recv_into(self.scratch)
        if not count:
            raise TransferError("connection closed mid-response")
        self.buffer += memoryview(self.scratch)[:count]

    def _line(self) -> bytes:
        while (end := self.buffer.find(b"\r\n")) < 0:
            self._more()
        line = bytes(self.buffer[:end])
        del self.buffer[: end + 2]
        return line

    def _skip(self, count: int) -> None:
        taken = min(count, len(self.buffer))
        del self.buffer[:taken]
        count -= taken
        while count:
            received = self.sock.recv_into(self.scratch, min(count, len(self.scratch)))
            if not received:
                raise TransferError("connection closed mid-body")
            count -= received

    def read(self) -> tuple[int, int, bytes]:
        """(status, body length, the body if short) of the next response."""
        while (end := self.buffer.find(b"\r\n\r\n")) < 0:
            self._more()
        head = bytes(self.buffer[:end]).lower()
        del self.buffer[: end + 4]
        status = int(head[9:12])
        length = None
        chunked = False
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip() == b"content-length":
                length = int(value)
            elif name.strip() == b"transfer-encoding":
                chunked = b"chunked" in value
        if length is not None and length <= 64:
            while len(self.buffer) < length:
                self._more()
            body = bytes(self.buffer[:length])
            del self.buffer[:length]
            return status, length, body
        if length is not None:
            self._skip(length)
            return status, length, b""
        if not chunked:
            raise TransferError("response has neither Content-Length nor chunked encoding")
        total = 0
        body = bytearray()
        while size := int(self._line().split(b";", 1)[0], 16):
            if size <= 64 and total + size <= 64:
                while len(self.buffer) < size:
                    self._more()
                body += self.buffer[:size]
                del self.buffer[:size]
            else:
                self._skip(size)
            total += size
            if self._line():
                raise TransferError("chunk not followed by CRLF")
        while self._line():  # trailers
            pass
        return status, total, bytes(body) if total <= 64 else b""


def download(port: int, host: str, size: int, *, timeout: float = 60) -> TransferResult:
    """GET ``size`` bytes from ``/download``; time from the request to the last byte."""
    with _connect(port, timeout) as sock:
        reader = _ResponseReader(sock)
        deadline = time.monotonic() + timeout
        started = time.perf_counter()
        sock.sendall(f"GET /download?bytes={size} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        status, received, _ = reader.read()
        seconds = time.perf_counter() - started
        if time.monotonic() > deadline:
            raise TransferError("download took longer than its time limit")
    if status != 200 or received != size:
        raise TransferError(f"download: status {status}, {received} of {size} bytes")
    return TransferResult("download", size, seconds)


def upload(port: int, host: str, size: int, *, timeout: float = 60) -> TransferResult:
    """POST ``size`` bytes to ``/upload``; time from the request to the answer."""
    with _connect(port, timeout) as sock:
        reader = _ResponseReader(sock)
        deadline = time.monotonic() + timeout
        started = time.perf_counter()
        sock.sendall(
            f"POST /upload HTTP/1.1\r\nHost: {host}\r\n"
            f"Content-Type: application/octet-stream\r\nContent-Length: {size}\r\n\r\n".encode()
        )
        view = memoryview(_SEND_PIECE)
        left = size
        while left:
            piece = view[: min(left, MIB)]
            sock.sendall(piece)
            left -= len(piece)
        status, _, body = reader.read()
        seconds = time.perf_counter() - started
        if time.monotonic() > deadline:
            raise TransferError("upload took longer than its time limit")
    if status != 200 or body != str(size).encode():
        raise TransferError(f"upload: status {status}, the service counted {body!r} of {size}")
    return TransferResult("upload", size, seconds)
