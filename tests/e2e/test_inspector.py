"""The traffic inspector: in a real browser (headless Chromium), and through its HTTP API.

The browser is driven with Selenium against the system ``chromium`` and
``chromedriver`` (``.ci/run`` installs both); nothing is downloaded. Selenium
blocks, so each call runs in a worker thread while trio keeps serving the
tunnel and the inspector.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import h11
import httpx
import pytest
import trio
from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import WebDriverWait

import tunnel
from helpers import LocalService, free_port

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
WAIT = 15.0

T = TypeVar("T")


@pytest.fixture
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebDriver]:
    """Headless Chromium with a fresh profile, closed after the test."""
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not os.path.exists(path)]
    if missing:
        message = f"{' and '.join(missing)} missing: apt-get install chromium chromium-driver"
        if os.environ.get("CI"):
            pytest.fail(message)  # CI installs them: missing there is a defect
        pytest.skip(message)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in (
        "--headless=new",
        "--no-sandbox",  # CI runs as root, where Chromium's sandbox refuses to start
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--window-size=1280,1000",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}",
    ):
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(CHROMEDRIVER))
    try:
        driver.set_page_load_timeout(WAIT)
        yield driver
    finally:
        driver.quit()


async def _in_thread(function: Callable[..., T], *args: Any) -> T:
    return await trio.to_thread.run_sync(function, *args)


async def _wait_for(driver: WebDriver, condition: Callable[[WebDriver], T], what: str) -> T:
    """Wait (in a thread) until ``condition(driver)`` is truthy; return its value."""

    def wait() -> T:
        return WebDriverWait(driver, WAIT).until(condition, f"the page never showed {what}")

    return await _in_thread(wait)


def _text(driver: WebDriver, element_id: str) -> str:
    text: str = driver.find_element(By.ID, element_id).text
    return text


def _row(driver: WebDriver, exchange_id: int, state: str = "done") -> WebElement | None:
    rows = driver.find_elements(
        By.CSS_SELECTOR, f'#list li[data-id="{exchange_id}"][data-state="{state}"]'
    )
    return rows[0] if rows else None


async def test_a_request_appears_live_opens_and_replays_in_chromium(
    tunnel_server: Any,
    local_service: LocalService,
    open_agent: Any,
    visitor: Any,
    browser: WebDriver,
    tmp_path: Path,
) -> None:
    with trio.fail_after(90):
        async with open_agent(
            tunnel_server.port, local_service.port, inspector="127.0.0.1:0"
        ) as client:
            assert client.inspector_url is not None
            await _in_thread(browser.get, client.inspector_url)
            await _wait_for(browser, lambda d: _text(d, "live") == "live", "its live marker")
            assert _text(browser, "state") == "connected"
            assert _text(browser, "public-url") == client.url
            # A marker the page would lose on a reload: the request must arrive
            # by the event stream, not by the page loading again.
            await _in_thread(browser.execute_script, "window.sameDocument = true")

            async with visitor(tunnel_server.port) as http:
                response = await http.post(
                    "/orders?via=tunnel", json={"item": "book", "quantity": 2}
                )
            assert response.status_code == 200

            row = await _wait_for(browser, lambda d: _row(d, 1), "the request in its list")
            assert "POST" in row.text
            assert "/orders?via=tunnel" in row.text
            assert "200" in row.text

            await _in_thread(row.click)
            await _wait_for(
                browser, lambda d: _text(d, "d-target") == "/orders?via=tunnel", "the detail"
            )
            request_body = _text(browser, "req-body")
            assert "JSON, pretty-printed" in request_body
            assert '"item": "book"' in request_body  # pretty-printed: a space after ':'
            assert "content-type" in _text(browser, "req-headers")
            response_body = _text(browser, "res-body")
            assert json.loads(response_body.split("\n", 1)[1])["path"] == "/orders"
            assert _text(browser, "d-status") == "200"

            await _in_thread(browser.find_element(By.ID, "replay").click)
            await _wait_for(
                browser,
                lambda d: (
                    d.find_element(By.ID, "detail").get_attribute("data-id") == "2"
                    and _text(d, "d-status") == "200"
                ),
                "the replayed response",
            )
            assert _text(browser, "d-replay-of") == "#1"
            assert _text(browser, "d-target") == "/orders?via=tunnel"
            replayed = json.loads(_text(browser, "res-body").split("\n", 1)[1])
            assert replayed["method"] == "POST"
            assert json.loads(replayed["body"]) == {"item": "book", "quantity": 2}
            assert '"quantity": 2' in _text(browser, "req-body")  # what was sent again
            listed = await _wait_for(browser, lambda d: _row(d, 2), "the replay in its list")
            first_row = browser.find_element(By.CSS_SELECTOR, "#list li")
            assert first_row.get_attribute("data-id") == "2"  # newest on top
            assert "/orders?via=tunnel" in listed.text

            assert await _in_thread(browser.execute_script, "return window.sameDocument")
            assert local_service.requests.count(("POST", "/orders")) == 2
            screenshot = tmp_path / "inspector.png"
            assert await _in_thread(browser.save_screenshot, str(screenshot))
            print(f"inspector screenshot: {screenshot}")


# -- the inspector's HTTP API, without a browser ----------------------------------


class EventReader:
    """Reads server-sent events over a raw connection (h11 decodes the chunking)."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.h11 = h11.Connection(h11.CLIENT)
        self.buffer = ""
        self.headers: dict[bytes, bytes] = {}

    async def open(self) -> None:
        request = h11.Request(method="GET", target="/api/events", headers=[("host", "127.0.0.1")])
        await self.stream.send_all(self.h11.send(request) + self.h11.send(h11.EndOfMessage()))
        while True:
            event = await self._event()
            if isinstance(event, h11.Response):
                self.headers = dict(event.headers)
                return

    async def _event(self) -> h11.Event:
        while True:
            event = self.h11.next_event()
            if event is not h11.NEED_DATA:
                return event  # type: ignore[return-value]
            self.h11.receive_data(await self.stream.receive_some(65536))

    async def next(self) -> tuple[str, Any]:
        """The next event's name and data."""
        while "\n\n" not in self.buffer:
            event = await self._event()
            assert isinstance(event, h11.Data), event
            self.buffer += bytes(event.data).decode()
        block, self.buffer = self.buffer.split("\n\n", 1)
        fields = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
        if "event" not in fields:
            return await self.next()  # the retry hint
        return fields["event"], json.loads(fields["data"])


async def test_the_event_stream_pushes_each_request_as_it_happens(
    tunnel_server: Any, local_service: LocalService, open_agent: Any, visitor: Any
) -> None:
    with trio.fail_after(20):
        async with open_agent(
            tunnel_server.port, local_service.port, inspector="127.0.0.1:0"
        ) as client:
            port = int(client.inspector_url.rsplit(":", 1)[1])
            async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
                events = EventReader(stream)
                await events.open()
                assert events.headers[b"content-type"] == b"text/event-stream"
                name, snapshot = await events.next()
                assert name == "snapshot"
                assert snapshot["exchanges"] == []
                assert snapshot["status"]["url"] == client.url
                async with visitor(tunnel_server.port) as http:
                    await http.get("/pushed")
                seen: list[tuple[str, Any]] = []
                while not seen or seen[-1][1].get("state") != "done":
                    seen.append(await events.next())
                assert {name for name, _ in seen} == {"exchange"}
                assert seen[-1][1]["target"] == "/pushed"
                assert seen[-1][1]["status"] == 200


async def test_a_body_over_the_cap_is_kept_in_part_and_cannot_be_replayed(
    tunnel_server: Any, local_service: LocalService, open_agent: Any, visitor: Any
) -> None:
    recorder = tunnel.Recorder(body_cap=1024)
    with trio.fail_after(20):
        async with (
            open_agent(
                tunnel_server.port,
                local_service.port,
                inspector="127.0.0.1:0",
                observer=recorder,
            ) as client,
            httpx.AsyncClient(base_url=client.inspector_url, trust_env=False) as inspector,
        ):
            assert client.recorder is recorder
            async with visitor(tunnel_server.port) as http:
                response = await http.post("/big", content=b"z" * 5000)
            assert response.status_code == 200
            detail = (await inspector.get("/api/exchanges/1")).json()
            body = detail["request"]["body"]
            assert (body["size"], body["kept"], body["truncated"]) == (5000, 1024, True)
            assert body["text"] == "z" * 1024
            assert detail["replayable"] is False
            refused = await inspector.post(
                "/api/exchanges/1/replay", headers={"x-tunnel-inspector": "1"}
            )
            assert refused.status_code == 409
            assert "5000 bytes" in refused.json()["error"]
            assert local_service.requests.count(("POST", "/big")) == 1


async def test_a_local_service_that_is_down_is_recorded_as_the_502_visitors_got(
    tunnel_server: Any, open_agent: Any, visitor: Any
) -> None:
    with trio.fail_after(20):
        async with open_agent(tunnel_server.port, free_port(), observer=tunnel.Recorder()) as c:
            async with visitor(tunnel_server.port) as http:
                response = await http.get("/nobody-home")
            assert response.status_code == 502
            assert c.recorder is not None
            (exchange,) = c.recorder.exchanges()
            assert exchange.status == 502
            assert exchange.error is not None
            assert "could not reach the local service" in exchange.error
            assert c.inspector_url is None  # recorded, but no page asked for


async def test_changes_need_the_inspector_header_and_a_loopback_host(
    tunnel_server: Any, local_service: LocalService, open_agent: Any, visitor: Any
) -> None:
    with trio.fail_after(20):
        async with (
            open_agent(tunnel_server.port, local_service.port, inspector="127.0.0.1:0") as client,
            httpx.AsyncClient(base_url=client.inspector_url, trust_env=False) as inspector,
        ):
            async with visitor(tunnel_server.port) as http:
                await http.get("/one")
            rebinding = await inspector.get("/api/exchanges", headers={"host": "evil.example"})
            assert rebinding.status_code == 403
            assert "DNS rebinding" in rebinding.text
            assert (await inspector.delete("/api/exchanges")).status_code == 403
            assert (await inspector.post("/api/exchanges/1/replay")).status_code == 403
            assert len((await inspector.get("/api/exchanges")).json()["exchanges"]) == 1
            cleared = await inspector.delete("/api/exchanges", headers={"x-tunnel-inspector": "1"})
            assert cleared.status_code == 204
            assert (await inspector.get("/api/exchanges")).json()["exchanges"] == []
            assert (await inspector.get("/api/exchanges/1")).status_code == 404


async def test_a_port_in_use_is_skipped_for_the_next(
    tunnel_server: Any, local_service: LocalService, open_agent: Any
) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with trio.fail_after(20):
            async with open_agent(
                tunnel_server.port, local_service.port, inspector=f"127.0.0.1:{port}"
            ) as client:
                assert client.inspector_url is not None
                got = int(client.inspector_url.rsplit(":", 1)[1])
                assert port < got < port + 10
            assert client.inspector_url is None  # closed with the agent


async def test_without_an_inspector_or_observer_nothing_is_recorded(
    tunnel_server: Any, local_service: LocalService, open_agent: Any
) -> None:
    with trio.fail_after(20):
        async with open_agent(tunnel_server.port, local_service.port) as client:
            assert client.recorder is None
            assert client.inspector_url is None


async def test_a_refused_agent_raises_its_own_error_with_the_inspector_on(
    tunnel_server: Any, local_service: LocalService, agent_config: Any
) -> None:
    config = agent_config(
        tunnel_server.port, local_service.port, token="wrong", inspector="127.0.0.1:0"
    )
    client = tunnel.Client(config)
    with trio.fail_after(20), pytest.raises(tunnel.AuthenticationError):
        await client.connect()
    assert client.inspector_url is None
