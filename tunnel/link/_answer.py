"""An error page as the answer to one stream, from either end that answers streams."""

from __future__ import annotations

from collections.abc import Sequence

import h2.errors

from .._protocol.headers import header_value
from .._protocol.pages import PAGE_HEADERS, error_page
from ._state import StreamError
from ._trio import Stream

__all__ = ["answer_error"]


async def answer_error(
    stream: Stream, status: int, detail: str, extra: Sequence[tuple[bytes, bytes]] = ()
) -> None:
    """Answer ``stream`` with ``status`` and a short page saying ``detail``.

    Nothing is sent on a stream already done; a peer gone meanwhile is nobody
    to tell. The request's body, if more comes, is asked to stop.
    """
    if stream.done:
        return
    body = error_page(status, detail)
    # The answer to HEAD has no body: the other end's HTTP/2 would take DATA
    # on it as a protocol error and end the whole connection.
    head = stream.headers is not None and header_value(stream.headers, b":method") == b"HEAD"
    try:
        stream.send_headers(
            [
                (b":status", str(status).encode()),
                *PAGE_HEADERS,
                (b"content-length", str(len(body)).encode()),
                *extra,
            ],
            end_stream=head,
        )
        if not head:
            await stream.send_data(body, end_stream=True)
        if not stream.remote_ended:
            # The request body is of no use now; ask the other end to stop it.
            stream.cancel(h2.errors.ErrorCodes.NO_ERROR)
    except StreamError:
        pass  # the visitor or the connection is gone: nobody to tell
