"""The HTTP front (intaleq_signal/front.py) driven directly, with a recording
transport: what it answers itself, when it calls the hooks, and how it ends a
connection. The same paths through real sockets are in test_http.py,
test_wire.py and test_fuzz.py."""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import sys
import time
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
from websockets.http11 import Request, Response

from intaleq_signal.exceptions import Refusal
from intaleq_signal.front import (
    KEEPALIVE_REQUESTS,
    MAX_PIPELINED_BYTES,
    FrontFactory,
    FrontState,
    HTTPFront,
    error_response,
)

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
        self.eof = self.aborted = self.closed = self.paused = False
        self.pauses = 0

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

    def pause_reading(self) -> None:
        assert not self.paused
        self.paused = True
        self.pauses += 1

    def resume_reading(self) -> None:
        assert self.paused
        self.paused = False


def stack_depth() -> int:
    frame, depth = sys._getframe(), 0
    while frame is not None:
        frame, depth = frame.f_back, depth + 1
    return depth


class Hooks:
    """process_request/process_response that record their calls; the
    answer is a 418 whose message is the request's ``X-API-Key``."""

    def __init__(self, raise_in_request: bool = False, pending: bool = False) -> None:
        self.seen: list[tuple[str, str, bytes, Any]] = []
        self.raise_in_request = raise_in_request
        #: process_request returns a future of the answer, resolved by the test.
        self.pending: list[tuple[asyncio.Future[Response], Response]] | None = [] if pending else None
        self.depth = 0  # the deepest stack process_request was called on

    def process_request(self, connection: Any, request: Request) -> Any:
        self.seen.append(
            (connection.http_method, request.path, connection.http_body, connection.http_body_error)
        )
        self.depth = max(self.depth, stack_depth())
        connection.client_ip = "198.51.100.1"  # as http_api resolves it, per request
        if self.raise_in_request:
            raise RuntimeError("boom")
        response = error_response(Refusal("teapot", request.headers.get("X-API-Key", "-"), http_status=418))
        if self.pending is not None:
            future = asyncio.get_running_loop().create_future()
            self.pending.append((future, response))
            return future
        return response

    def process_response(self, connection: Any, request: Request, response: Response) -> Response | None:
        return None


def front_for(hooks: Hooks, open_timeout: float = 10.0, **keepalive: Any) -> tuple[HTTPFront, Transport]:
    factory = FrontFactory(hooks.process_request, hooks.process_response, open_timeout, **keepalive)
    front = factory(protocol=None, server=None, close_timeout=0.05)
    transport = Transport()
    front.connection_made(transport)
    return front, transport


def status_and_body(written: bytes) -> tuple[int, dict[str, Any]]:
    head, _, body = written.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), json.loads(body)


def answers(written: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    """The answers written, one after the other: ``(status, headers, body)``."""
    found = []
    rest = written
    while rest:
        head, sep, rest = rest.partition(b"\r\n\r\n")
        assert sep, written[-300:]
        lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(": ")
            assert name.lower() not in headers, head
            headers[name.lower()] = value
        length = int(headers["content-length"])
        found.append((int(lines[0].split(" ")[1]), headers, rest[:length]))
        rest = rest[length:]
    return found


def kept(answer: tuple[int, dict[str, str], bytes]) -> bool:
    """Whether an answer keeps its connection: ``Keep-Alive`` and no
    ``Connection`` header, or ``Connection: close``, nothing in between."""
    headers = answer[1]
    if headers.get("connection") == "close":
        assert "keep-alive" not in headers, headers
        return False
    assert "connection" not in headers and headers["keep-alive"].startswith("timeout="), headers
    return True


def get(key: str, *extra: str, version: str = "1.1") -> bytes:
    return "\r\n".join([f"GET /k HTTP/{version}", f"X-API-Key: {key}", *extra, "", ""]).encode()


async def until(predicate: Callable[[], Any], timeout: float = 10.0, step: float = 0.0) -> None:
    """Run the loop until ``predicate()`` holds (a generous deadline: the
    CPU is shared)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(step)


@in_loop
async def test_a_request_in_pieces_is_answered_by_the_hooks_and_the_connection_kept() -> None:
    hooks = Hooks()
    front, transport = front_for(hooks)
    for byte in POST + BODY:
        assert not transport.written
        front.data_received(bytes([byte]))
    assert hooks.seen == [("POST", "/sessions", BODY, None)]
    assert status_and_body(transport.written) == (418, {"error": "teapot", "message": "k"})
    assert kept(answers(transport.written)[0])
    assert not transport.eof and not transport.closed
    assert front.http_body == b"" and front.http_method == "GET"  # reset for the next request
    assert front.eof_received() is False  # the client closes between requests: close
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
    assert transport.eof and not kept(answers(transport.written)[0])


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
    assert transport.eof and not kept(answers(transport.written)[0])


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
    front.data_received(POST.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n") + BODY)
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


# -- persistent connections (RFC 9112 §9.3; docs/protocol.md, "HTTP API") ----------------------


@pytest.mark.parametrize("count", [2, 3])
@in_loop
async def test_requests_on_one_connection_are_answered_in_order(count: int) -> None:
    """Each request after the answer to the one before, on one connection:
    each answered, the attributes the hooks read being the request's own."""
    hooks = Hooks()
    front, transport = front_for(hooks)
    requests = [POST + BODY, b"GET /health HTTP/1.1\r\nX-API-Key: two\r\n\r\n", get("three")][:count]
    for n, request in enumerate(requests, 1):
        front.data_received(request)
        assert len(answers(transport.written)) == n
    expected = [("POST", "/sessions", BODY, None), ("GET", "/health", b"", None), ("GET", "/k", b"", None)]
    assert hooks.seen == expected[:count]
    found = answers(transport.written)
    assert [json.loads(body)["message"] for _, _, body in found] == ["k", "two", "three"][:count]
    assert all(kept(answer) for answer in found)
    assert not (transport.eof or transport.closed or transport.aborted)
    # between requests nothing of the last one is kept (an idle connection stays small)
    assert (front._buffer, front._head, front._headers, front.http_body) == (b"", b"", (), b"")
    assert (front.http_method, front.http_version, front.http_body_error, front.client_ip) == (
        "GET",
        "1.1",
        None,
        "?",
    )
    front.connection_lost(None)


@in_loop
async def test_an_upgrade_to_another_protocol_is_ignored_and_the_connection_kept() -> None:
    """RFC 9110 §7.8: a server may ignore an upgrade it does not offer. Only
    a WebSocket upgrade is handed on; ``Upgrade: h2c`` (curl --http2) is an
    ordinary request, its answer keeps the connection and the request
    pipelined behind it is answered."""
    hooks = Hooks()
    front, transport = front_for(hooks)
    h2c = b"POST /sessions HTTP/1.1\r\nUpgrade: h2c\r\nConnection: Upgrade\r\nContent-Length: 0\r\n\r\n"
    front.data_received(h2c + b"GET /health HTTP/1.1\r\n\r\n")
    await until(lambda: len(answers(transport.written)) == 2)
    assert [request[:2] for request in hooks.seen] == [("POST", "/sessions"), ("GET", "/health")]
    assert all(kept(answer) for answer in answers(transport.written))
    front.connection_lost(None)


@in_loop
async def test_pipelined_requests_in_one_chunk_are_answered_in_order() -> None:
    """RFC 9112 §9.3.2: requests sent in one chunk behind one another are
    answered in order, one per pass of the event loop (never recursion:
    the hooks' stack does not grow with the number of requests); the
    KEEPALIVE_REQUESTS-th answer closes the connection."""
    hooks = Hooks()
    front, transport = front_for(hooks)
    front.data_received(b"".join(get(str(n)) for n in range(KEEPALIVE_REQUESTS + 5)))
    first_depth = hooks.depth
    await until(lambda: transport.eof)
    found = answers(transport.written)
    messages = [json.loads(body)["message"] for _, _, body in found]
    assert messages == [str(n) for n in range(KEEPALIVE_REQUESTS)]
    assert [kept(answer) for answer in found] == [True] * (KEEPALIVE_REQUESTS - 1) + [False]
    assert hooks.depth <= first_depth + 2, (first_depth, hooks.depth)
    front.connection_lost(None)


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (get("c", "Connection: close"), 418),
        (get("c", "connection: Keep-Alive, CLOSE"), 418),  # a token list, case-insensitive
        (get("c", version="1.0"), 418),
        (get("c", "Connection: keep-alive", version="1.0"), 418),
        (b"POST /sessions HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 418),  # 411
        (b"POST /sessions HTTP/1.1\r\nContent-Length: 99999\r\n\r\n", 418),  # 413
        (b"GET /k HTTP/1.1\r\nContent-Length: 1x\r\n\r\n", 418),  # 400
        (b"POST /sessions HTTP/1.1\r\n\r\n", 418),  # 411 without Content-Length
        (b"GET /k HTTP/1.1\r\nBad Header: x\r\n\r\n", 400),
        (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n", 414),
        (b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * 200 + b"\r\n", 431),
    ],
    ids=[
        "connection-close",
        "connection-list",
        "http-1.0",
        "http-1.0-keep-alive",
        "chunked",
        "too-large",
        "bad-length",
        "no-length",
        "malformed",
        "long-target",
        "many-headers",
    ],
)
@in_loop
async def test_answers_that_close_the_connection(request_bytes: bytes, status: int) -> None:
    """docs/protocol.md, "HTTP API": the answer says Connection: close and
    the connection is half-closed; a request behind it is never read."""
    hooks = Hooks()
    front, transport = front_for(hooks)
    front.data_received(request_bytes + get("behind"))
    await until(lambda: transport.eof)
    [answer] = answers(transport.written)
    assert answer[0] == status and not kept(answer)
    front.data_received(get("after"))
    await asyncio.sleep(0)
    assert len(answers(transport.written)) == 1
    assert len(hooks.seen) == (0 if status in (400, 414, 431) else 1)  # a malformed head: no hook
    front.connection_lost(None)


@in_loop
async def test_a_failing_hook_closes_the_connection() -> None:
    hooks = Hooks(raise_in_request=True)
    front, transport = front_for(hooks)
    front.data_received(get("a") + get("b"))
    await until(lambda: transport.eof)
    [answer] = answers(transport.written)
    assert answer[0] == 500 and not kept(answer)
    assert len(hooks.seen) == 1
    front.connection_lost(None)


@in_loop
async def test_an_idle_kept_connection_is_closed_after_the_keepalive_timeout() -> None:
    """A kept connection with no byte of a next request is closed after
    keepalive_timeout (a clean close: nothing is lost)."""
    front, transport = front_for(Hooks(), keepalive_timeout=0.05)
    front.data_received(get("a"))
    assert kept(answers(transport.written)[0]) and not transport.closed
    await until(lambda: transport.closed, step=0.01)
    assert not transport.aborted and len(answers(transport.written)) == 1
    front.connection_lost(None)


@in_loop
async def test_the_next_request_has_the_open_timeout_from_its_first_byte() -> None:
    """Once a byte of the next request arrives, the idle timeout no longer
    applies: the whole request has open_timeout (a slowloris on a kept
    connection is dropped like one on a new connection)."""
    hooks = Hooks()
    front, transport = front_for(hooks, open_timeout=0.12, keepalive_timeout=0.02)
    front.data_received(get("a"))
    assert kept(answers(transport.written)[0])
    loop = asyncio.get_running_loop()
    started = loop.time()
    front.data_received(b"GET /slow HTTP/1.1\r\n")  # the rest never comes
    await until(lambda: transport.aborted, step=0.01)
    assert loop.time() - started >= 0.11  # the open timeout, not the idle one
    assert not transport.closed  # closed by the open timeout (abort), not as idle (close)
    assert len(answers(transport.written)) == 1 and len(hooks.seen) == 1
    front.connection_lost(None)


@in_loop
async def test_the_request_limit_closes_the_connection() -> None:
    hooks = Hooks()
    front, transport = front_for(hooks, keepalive_requests=3)
    for key in ("1", "2", "3"):
        front.data_received(get(key))
    assert [kept(answer) for answer in answers(transport.written)] == [True, True, False]
    assert transport.eof
    front.data_received(get("4"))
    assert len(hooks.seen) == 3
    front.connection_lost(None)


@in_loop
async def test_shutdown_closes_idle_kept_connections_and_every_later_answer() -> None:
    """FrontFactory.shutdown(): a kept connection waiting for its next
    request is closed at once; one in the middle of a request gets its
    answer with Connection: close."""
    hooks = Hooks()
    factory = FrontFactory(hooks.process_request, hooks.process_response, 10.0)
    fronts = [factory(protocol=None, server=None, close_timeout=0.05) for _ in range(3)]
    transports = [Transport() for _ in fronts]
    for front, transport in zip(fronts, transports, strict=True):
        front.connection_made(transport)
        front.data_received(get("a"))
    fronts[1].data_received(b"GET /k HTTP/1.1\r\n")  # half its next request
    fronts[2].connection_lost(None)
    transports[2].closed = True
    assert factory.shutdown() == 1
    assert transports[0].closed and not transports[1].closed
    fronts[1].data_received(b"\r\n")
    assert [kept(answer) for answer in answers(transports[1].written)] == [True, False]
    for front in fronts[:2]:
        front.connection_lost(None)
    assert not factory.kept


@pytest.mark.parametrize("tail", [b"", b"GET /never"])
@in_loop
async def test_a_client_half_closing_after_pipelined_requests_gets_every_answer(tail: bytes) -> None:
    """RFC 9112 §9.6: a client may half-close once its requests are sent;
    each whole request is answered, then the connection closes (the last
    answer says so when nothing is left behind it)."""
    hooks = Hooks()
    front, transport = front_for(hooks)
    front.data_received(get("1") + get("2") + get("3") + tail)
    assert front.eof_received() is True  # answers still to write
    await until(lambda: transport.closed)
    found = answers(transport.written)
    assert [json.loads(body)["message"] for _, _, body in found] == ["1", "2", "3"]
    assert [kept(answer) for answer in found] == [True, True, bool(tail)]
    front.connection_lost(None)


@in_loop
async def test_a_pending_answer_keeps_pipelined_input_within_a_bound() -> None:
    """While process_request's answer is pending (several instances ask
    Redis), the input behind it is kept up to MAX_PIPELINED_BYTES and
    reading is paused past it; each pending answer goes out in order, and
    reading resumes once the input kept is under the bound again."""
    hooks = Hooks(pending=True)
    front, transport = front_for(hooks)
    pad = "X-Pad: " + "p" * 1000
    behind = [get(str(n), pad) for n in range(1, 2 * MAX_PIPELINED_BYTES // len(get("0", pad)) + 2)]
    front.data_received(get("0", pad))
    assert len(hooks.pending) == 1 and not transport.written  # its answer is pending
    chunk = 4096
    stream = b"".join(behind)
    sent = 0
    while not transport.paused:
        front.data_received(stream[sent : sent + chunk])
        sent += chunk
    assert MAX_PIPELINED_BYTES < sent <= MAX_PIPELINED_BYTES + chunk
    assert len(hooks.pending) == 1 and not transport.written  # nothing read behind a pending answer
    for n in range(len(behind) + 1):
        await until(lambda n=n: len(hooks.pending) > n)
        future, response = hooks.pending[n]
        future.set_result(response)
        await until(lambda n=n: len(answers(transport.written)) > n)
        while not transport.paused and sent < len(stream):  # reading resumed: more comes
            front.data_received(stream[sent : sent + chunk])
            sent += chunk
        assert len(front._buffer) <= MAX_PIPELINED_BYTES + chunk
    assert sent >= len(stream) and transport.pauses > 1
    found = answers(transport.written)
    assert [json.loads(body)["message"] for _, _, body in found] == [str(n) for n in range(len(behind) + 1)]
    assert all(kept(answer) for answer in found) and not transport.paused
    assert front._state is FrontState.HEAD and not front._buffer  # idle: no buffer kept
    front.connection_lost(None)
