"""The HTTP front (intaleq_signal/front.py) driven directly, with a recording
transport: what it answers itself, when it calls the hooks, and how it ends a
connection. The same paths through real sockets are in test_http.py,
test_wire.py and test_fuzz.py."""

from __future__ import annotations

import asyncio
import functools
import json
import logging
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
from websockets.http11 import Request, Response

from intaleq_signal.exceptions import Refusal
from intaleq_signal.front import FrontFactory, HTTPFront, error_response

pytestmark = pytest.mark.compat


def in_loop(test: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    """Run an async test in a fresh event loop (the front's timers need one)."""

    @functools.wraps(test)
    def run(*args: Any, **kwargs: Any) -> None:
        asyncio.run(test(*args, **kwargs))

    return run


POST = b"POST /sessions HTTP/1.1\r\nHost: x\r\nX-API-Key: k\r\nContent-Length: 13\r\n\r\n"
BODY = b'{"ride": "1"}'


class Transport(asyncio.Transport):
    """Records what the front does to its connection."""

    def __init__(self) -> None:
        super().__init__()
        self.written = b""
        self.eof = self.aborted = self.closed = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("192.0.2.7", 50000) if name == "peername" else default

    def write(self, data: bytes) -> None:
        self.written += data

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.eof = True

    def abort(self) -> None:
        self.aborted = True

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.aborted or self.closed


class Hooks:
    """process_request/process_response that record their calls."""

    def __init__(self, raise_in_request: bool = False) -> None:
        self.seen: list[tuple[str, str, bytes, Any]] = []
        self.raise_in_request = raise_in_request

    def process_request(self, connection: Any, request: Request) -> Response:
        self.seen.append(
            (connection.http_method, request.path, connection.http_body, connection.http_body_error)
        )
        if self.raise_in_request:
            raise RuntimeError("boom")
        return error_response(Refusal("teapot", request.headers.get("X-API-Key", "-"), http_status=418))

    def process_response(self, connection: Any, request: Request, response: Response) -> Response | None:
        return None


def front_for(hooks: Hooks, open_timeout: float = 10.0) -> tuple[HTTPFront, Transport]:
    factory = FrontFactory(hooks.process_request, hooks.process_response, open_timeout)
    front = factory(protocol=None, server=None, close_timeout=0.05)
    transport = Transport()
    front.connection_made(transport)
    return front, transport


def status_and_body(written: bytes) -> tuple[int, dict[str, Any]]:
    head, _, body = written.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), json.loads(body)


@in_loop
async def test_a_request_in_pieces_is_answered_by_the_hooks_then_half_closed() -> None:
    hooks = Hooks()
    front, transport = front_for(hooks)
    for byte in POST + BODY:
        assert not transport.written
        front.data_received(bytes([byte]))
    assert hooks.seen == [("POST", "/sessions", BODY, None)]
    assert status_and_body(transport.written) == (418, {"error": "teapot", "message": "k"})
    assert transport.eof and not transport.closed
    answered = transport.written
    front.data_received(b"GET / HTTP/1.1\r\n\r\n")  # one request per connection: dropped
    assert transport.written == answered and len(hooks.seen) == 1
    assert front.eof_received() is False  # the client has read the answer: close
    front.connection_lost(None)


@in_loop
async def test_refused_framing_reaches_the_hooks_without_a_body() -> None:
    hooks = Hooks()
    front, transport = front_for(hooks)
    front.data_received(
        b"POST /sessions HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    )
    [(method, path, body, refused)] = hooks.seen
    assert (method, path, body) == ("POST", "/sessions", b"")
    assert isinstance(refused, Refusal) and (refused.http_status, refused.code) == (411, "length_required")
    assert transport.eof


@pytest.mark.parametrize(
    ("head", "status"),
    [
        (b"GET /health HTTP/1.1\r\nBad Header: x\r\n\r\n", 400),
        (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n", 414),
        (b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * 200 + b"\r\n", 431),
        (b"GET / HTTP/1.1\n\n", 400),
    ],
)
@in_loop
async def test_malformed_heads_are_answered_without_the_hooks(head: bytes, status: int) -> None:
    hooks = Hooks()
    front, transport = front_for(hooks)
    front.data_received(head)
    assert hooks.seen == []
    assert status_and_body(transport.written)[0] == status
    assert transport.eof


@in_loop
async def test_http_1_0_is_never_handed_on_as_an_upgrade() -> None:
    """RFC 6455 §4.1: an opening handshake is HTTP/1.1; an HTTP/1.0 request
    with ``Upgrade: websocket`` is answered by the hooks (process_request
    refuses it on /ws), with the version on the connection."""
    hooks = Hooks()
    front, transport = front_for(hooks)
    front.data_received(b"GET /ws HTTP/1.0\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
    assert hooks.seen == [("GET", "/ws", b"", None)] and front.http_version == "1.0"
    assert status_and_body(transport.written)[0] == 418  # the hooks' answer, not a hand-off


@in_loop
async def test_a_failing_hook_is_a_500_json_answer_and_a_log_line(caplog) -> None:
    hooks = Hooks(raise_in_request=True)
    front, transport = front_for(hooks)
    with caplog.at_level(logging.ERROR, logger="intaleq_signal.http"):
        front.data_received(POST + BODY)
    assert status_and_body(transport.written) == (
        500,
        {"error": "internal_error", "message": "the request could not be handled"},
    )
    assert "process_request failed" in caplog.text and "RuntimeError: boom" in caplog.text


@in_loop
async def test_a_request_that_never_completes_is_dropped_after_the_open_timeout() -> None:
    front, transport = front_for(Hooks(), open_timeout=0.05)
    front.data_received(POST)  # the body never comes
    await asyncio.sleep(0.1)
    assert transport.aborted and not transport.written


@in_loop
async def test_a_client_that_never_closes_after_its_answer_is_dropped() -> None:
    front, transport = front_for(Hooks())
    front.data_received(POST + BODY)
    assert transport.eof and not transport.aborted
    await asyncio.sleep(0.1)  # close_timeout of 0.05 s
    assert transport.aborted


@in_loop
async def test_expect_100_continue_is_answered_before_the_body() -> None:
    hooks = Hooks()
    front, transport = front_for(hooks)
    front.data_received(POST.replace(b"\r\n\r\n", b"\r\nExpect: 100-continue\r\n\r\n"))
    assert transport.written == b"HTTP/1.1 100 Continue\r\n\r\n"
    front.data_received(BODY)
    assert hooks.seen == [("POST", "/sessions", BODY, None)]
