"""Requests an agent refused unread are sent again, to another connection for the host.

An agent going away refuses what crosses its drain: RST_STREAM(REFUSED_STREAM)
right after its SETTINGS_MAX_CONCURRENT_STREAMS = 0, or a GOAWAY whose last
stream ID is below the request's. HTTP/2 guarantees such a request was never
processed, so the visitor must get the answer of the agent's next connection
(within the grace period), not a 502. Here the going-away agent is a bare one
that refuses on cue; the one that answers is a real agent.
"""

from __future__ import annotations

import h2.errors
import h2.settings
import httpx
import pytest
import trio
from hostile import GOAWAY, EvilAgent, frame, open_evil_agent

from helpers import LocalService, eventually


def _refuse(agent: EvilAgent, stream_id: int, how: str) -> bytes:
    if how == "goaway":
        # Last stream ID 0: none of the server's streams was taken.
        return frame(GOAWAY, 0, 0, (0).to_bytes(4, "big") + (0).to_bytes(4, "big"))
    agent.h2.update_settings({h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 0})
    agent.h2.reset_stream(stream_id, h2.errors.ErrorCodes.REFUSED_STREAM)
    return agent.h2.data_to_send()


@pytest.mark.parametrize("how", ["refused_stream", "goaway"])
@pytest.mark.parametrize("method", ["GET", "POST"])
async def test_a_request_refused_by_a_leaving_agent_goes_to_its_next_connection(
    tunnel_server, local_service: LocalService, open_agent, visitor, how: str, method: str
) -> None:
    port = tunnel_server.port
    answers: list[httpx.Response] = []
    with trio.fail_after(20):
        async with (
            open_evil_agent(port, "app.localhost") as leaving,
            visitor(port) as http,
            trio.open_nursery() as nursery,
        ):

            async def visit() -> None:
                content = b"body kept for the retry" if method == "POST" else None
                answers.append(await http.request(method, "/retried", content=content))

            nursery.start_soon(visit)
            stream_id = await leaving.wait_request()
            await leaving.send(_refuse(leaving, stream_id, how))
            await trio.sleep(0.2)  # the visitor waits for the agent's next connection
            assert answers == []
            async with open_agent(port, local_service.port):
                await eventually(lambda: bool(answers), 10)
    [answer] = answers
    assert answer.status_code == 200, answer.text
    assert answer.json()["path"] == "/retried"
    if method == "POST":
        assert answer.json()["body"] == "body kept for the retry"
    assert local_service.requests == [(method, "/retried")]


async def test_a_refused_request_with_no_agent_to_take_it_is_a_502(
    start_tunnel_server, visitor
) -> None:
    server = await start_tunnel_server(grace_period=0.5)
    with trio.fail_after(20):
        async with (
            open_evil_agent(server.port, "app.localhost") as leaving,
            visitor(server.port) as http,
            trio.open_nursery() as nursery,
        ):
            answers: list[httpx.Response] = []

            async def visit() -> None:
                answers.append(await http.get("/nobody"))

            nursery.start_soon(visit)
            stream_id = await leaving.wait_request()
            start = trio.current_time()
            await leaving.send(_refuse(leaving, stream_id, "refused_stream"))
            await eventually(lambda: bool(answers), 10)
            waited = trio.current_time() - start
    assert answers[0].status_code == 502
    assert "refused" in answers[0].text
    assert "Invalid input" not in answers[0].text
    assert 0.5 <= waited < 2.0
