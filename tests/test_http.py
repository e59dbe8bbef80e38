"""HTTP on the WebSocket port (docs/protocol.md, "HTTP API"), the per-IP
connection limit (docs/protocol.md, "Connecting"), shutdown
(docs/operations.md, "Shutdown") and process-level configuration errors
(docs/operations.md, "Configuration"), all against the real daemon process.

Raw-socket tests speak bytes on purpose: the request-body workaround in
``intaleq_signal.wire`` sits below websockets' HTTP parser, so framing corner
cases (100-continue, split packets, chunked, bad ``Content-Length``, garbage)
are only reachable that way.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import signal
import socket
import subprocess
import time
import uuid
from contextlib import closing
from typing import Any

import pytest
from websockets.exceptions import InvalidStatus

from conftest import (
    API_KEY,
    answer_end,
    attempt,
    authenticate,
    client_frame,
    closed_with,
    connect_raw,
    daemon_env,
    free_port,
    health,
    join,
    parse_response,
    read_answer,
    read_until_closed,
    recv_json,
    ride,
    run_daemon,
    send_json,
    upgrade_head,
    wait_until,
)
from intaleq_signal.http_api import is_loopback_peer
from intaleq_signal.tokens import TokenMinter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

JSON_HEADERS = {"X-API-Key": API_KEY, "Content-Type": "application/json"}


# -- helpers ------------------------------------------------------------------


def session_body(ride_id: str, driver_id: str = "driver-1", passenger_id: str = "passenger-1") -> bytes:
    return json.dumps({"ride_id": ride_id, "driver_id": driver_id, "passenger_id": passenger_id}).encode()


def post_raw_body(server: Any, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, dict, bytes]:
    return server.request("POST", "/sessions", body, {**JSON_HEADERS, **(headers or {})})


def assert_error(
    answer: tuple[int, dict[str, str], bytes], status: int | tuple[int, ...], code: str | None = None
) -> dict[str, Any]:
    """An error answer (docs/protocol.md, "HTTP API"): the status, JSON, body ``{"error", "message"}``."""
    got, headers, body = answer
    statuses = status if isinstance(status, tuple) else (status,)
    assert got in statuses, (got, body)
    assert headers.get("content-type", "").startswith("application/json"), headers
    document = json.loads(body)
    assert set(document) == {"error", "message"}, document
    assert isinstance(document["error"], str) and document["error"]
    assert isinstance(document["message"], str) and document["message"]
    if code is not None:
        assert document["error"] == code, document
    return document


def read_until(sock: socket.socket, marker: bytes, timeout: float = 5.0) -> bytes:
    deadline = time.monotonic() + timeout
    data = b""
    while marker not in data:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        chunk = sock.recv(65536)
        assert chunk, f"closed before {marker!r}: {data!r}"
        data += chunk
    return data


def exchange(server: Any, *pieces: bytes, delay: float = 0.0, timeout: float = 5.0) -> tuple[bytes, bool]:
    """Send ``pieces`` (``delay`` seconds apart) on a new connection, then
    read one answer (:func:`conftest.read_answer`): ``(data, closed)``,
    ``closed`` telling whether the daemon closed the connection after it."""
    with connect_raw(server) as sock:
        for index, piece in enumerate(pieces):
            if index and delay:
                time.sleep(delay)
            sock.sendall(piece)
        return read_answer(sock, timeout, head=b"".join(pieces).startswith(b"HEAD "))


def kept_alive(headers: dict[str, str]) -> bool:
    """docs/protocol.md, "HTTP API": an answer that keeps its connection
    says ``Keep-Alive: timeout=5``; one that closes it ``Connection: close``."""
    if headers.get("connection") == "close":
        assert "keep-alive" not in headers, headers
        return False
    assert "connection" not in headers and headers["keep-alive"] == "timeout=5", headers
    return True


def post_head(length: int | None, *extra: str, key: str = API_KEY) -> bytes:
    lines = ["POST /sessions HTTP/1.1", "Host: 127.0.0.1", f"X-API-Key: {key}"]
    lines.append("Content-Type: application/json")
    if length is not None:
        lines.append(f"Content-Length: {length}")
    lines.extend(extra)
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


Step = dict[str, str] | None | tuple[str, dict[str, str] | None]


def joins(headers: dict[str, str] | None = None) -> Step:
    """An upgrade (with ``headers``) that authenticates, then closes: never
    counts towards RATE_LIMIT_PER_MIN."""
    return ("joins", headers)


def refused(headers: dict[str, str] | None = None) -> Step:
    """An upgrade refused with ``unauthorized`` (4001): counts."""
    return ("refused", headers)


def attempts(server: Any, *steps: Step) -> list[int]:
    """One WebSocket upgrade per step, one after the other: 101, or the
    HTTP status refusing it. A step is the headers of an upgrade closed
    without authenticating (``None``: no header), or :func:`joins` /
    :func:`refused`."""
    session = server.new_session() if any(isinstance(step, tuple) for step in steps) else None

    async def one(step: Step) -> int:
        kind, headers = step if isinstance(step, tuple) else ("closes", step)
        if kind == "joins":
            return await attempt(server, headers, session=session)
        try:
            async with server.ws(additional_headers=headers or {}) as ws:
                if kind == "refused":
                    await send_json(ws, {"type": "heartbeat"})
                    assert await recv_json(ws) == {"type": "unauthorized", "reason": "not_authenticated"}
                    assert await closed_with(ws) == 4001
                return 101
        except InvalidStatus as exc:
            return exc.response.status_code

    async def run() -> list[int]:
        return [await one(step) for step in steps]

    return asyncio.run(run())


# -- POST /sessions: success, API key ------------------------------------------------


@pytest.mark.compat
def test_post_sessions_creates_session(server) -> None:
    """docs/protocol.md, "HTTP API": POST /sessions → 200 JSON {session_id: UUID4, ride_id, expires_in:
    SESSION_DURATION, driver_token, passenger_token}."""
    ride_id = ride()
    status, headers, body = post_raw_body(server, session_body(ride_id))
    assert status == 200, body
    assert headers["content-type"].startswith("application/json")
    document = json.loads(body)
    assert set(document) == {"session_id", "ride_id", "expires_in", "driver_token", "passenger_token"}
    minter = TokenMinter(API_KEY)
    for role in ("driver", "passenger"):
        assert document[f"{role}_token"] == minter.token(document["session_id"], role)
    parsed = uuid.UUID(document["session_id"])
    assert parsed.version == 4 and str(parsed) == document["session_id"]
    assert document["ride_id"] == ride_id
    assert document["expires_in"] == 60 and type(document["expires_in"]) is int
    # a query string does not change the route
    status, _, body = server.request("POST", "/sessions?source=backend", session_body(ride()), JSON_HEADERS)
    assert status == 200, body


def test_expires_in_rounds_up_to_whole_seconds(server_factory) -> None:
    """docs/protocol.md, "HTTP API": expires_in is SESSION_DURATION in whole seconds, rounded up (2500ms →
    3)."""
    server = server_factory(SESSION_DURATION="2500ms")
    status, body = server.post_session(ride_id=ride())
    assert status == 200, body
    assert body["expires_in"] == 3 and type(body["expires_in"]) is int


@pytest.mark.compat
def test_missing_or_wrong_api_key_is_401(server) -> None:
    """docs/protocol.md, "HTTP API": missing or wrong X-API-Key → 401 unauthorized {"error","message"}."""
    body = session_body(ride())
    base = {"Content-Type": "application/json"}
    assert_error(server.request("POST", "/sessions", body, base), 401, "unauthorized")
    for key in ("wrong", "", API_KEY[:-1], API_KEY + "x", API_KEY[:-1] + "Y", API_KEY.upper()):
        answer = server.request("POST", "/sessions", body, {**base, "X-API-Key": key})
        assert_error(answer, 401, "unauthorized")
    # the key goes in X-API-Key, not elsewhere
    answer = server.request("POST", "/sessions", body, {**base, "Authorization": f"Bearer {API_KEY}"})
    assert_error(answer, 401, "unauthorized")
    assert API_KEY not in server.log  # docs/operations.md, "Logs": never the API key in the logs


def test_wrong_api_keys_are_rate_limited_per_ip(server) -> None:
    """docs/protocol.md, "HTTP API": after 10 wrong keys from one IP within a minute → 429, even for the
    right key."""
    body = session_body(ride())
    for attempt_number in range(10):
        answer = post_raw_body(server, body, {"X-API-Key": f"wrong-{attempt_number}"})
        assert_error(answer, 401, "unauthorized")
    assert_error(post_raw_body(server, body), 429)
    assert_error(post_raw_body(server, body, {"X-API-Key": "wrong-again"}), 429)
    assert_error(server.request("POST", "/sessions", body, {"Content-Type": "application/json"}), 429)
    # the limit is per client IP: another client behind the trusted proxy is not locked out
    status, document = server.post_session(ride_id=ride(), headers={"X-Real-IP": "203.0.113.50"})
    assert status == 200, document


def test_wrong_keys_behind_proxy_do_not_lock_out_others(server) -> None:
    """docs/protocol.md, "POST /sessions" and "Connecting": key failures count per client IP (X-Real-IP
    behind a trusted proxy)."""
    body = session_body(ride())
    for attempt_number in range(10):
        answer = post_raw_body(server, body, {"X-API-Key": f"w{attempt_number}", "X-Real-IP": "198.51.100.9"})
        assert_error(answer, 401, "unauthorized")
    assert_error(post_raw_body(server, body, {"X-Real-IP": "198.51.100.9"}), 429)
    status, document = server.post_session(ride_id=ride())  # 127.0.0.1 itself is unaffected
    assert status == 200, document


# -- POST /sessions: body validation -----------------------------------------------


@pytest.mark.compat
def test_invalid_fields_are_400_naming_the_field(server) -> None:
    """docs/protocol.md, "HTTP API": missing, empty, non-string or >255-char fields → 400 invalid_request
    naming the field."""
    good = {"ride_id": ride(), "driver_id": "driver-1", "passenger_id": "passenger-1"}
    for field in ("ride_id", "driver_id", "passenger_id"):
        variants: list[tuple[str, dict[str, Any]]] = [
            ("missing", {k: v for k, v in good.items() if k != field}),
            ("empty", {**good, field: ""}),
            ("number", {**good, field: 42}),
            ("null", {**good, field: None}),
            ("list", {**good, field: ["a"]}),
            ("object", {**good, field: {"id": "a"}}),
            ("bool", {**good, field: True}),
            ("too long", {**good, field: "x" * 256}),
            ("too long multi-byte", {**good, field: "é" * 256}),
        ]
        for name, document in variants:
            answer = post_raw_body(server, json.dumps(document).encode())
            error = assert_error(answer, 400, "invalid_request")
            assert field in error["message"], (field, name, error)


@pytest.mark.compat
def test_field_length_counts_code_points(server) -> None:
    """docs/protocol.md, "POST /sessions" and "Precise points": 255 characters (code points) are accepted,
    also multi-byte."""
    for char in ("x", "é", "ع", "😀"):
        ride_id = char * 255
        status, headers, body = post_raw_body(
            server, session_body(ride_id, driver_id=char * 255, passenger_id="p" + char * 254)
        )
        assert status == 200, (char, body)
        assert json.loads(body)["ride_id"] == ride_id
    for char in ("é", "😀"):
        error = assert_error(post_raw_body(server, session_body(char * 256)), 400, "invalid_request")
        assert "ride_id" in error["message"]


@pytest.mark.compat
def test_driver_equal_to_passenger_is_400(server) -> None:
    """docs/protocol.md, "HTTP API": driver and passenger must differ → 400
    invalid_request naming the field."""
    answer = post_raw_body(server, session_body(ride(), driver_id="same", passenger_id="same"))
    error = assert_error(answer, 400, "invalid_request")
    assert "driver_id" in error["message"] or "passenger_id" in error["message"]


@pytest.mark.compat
def test_not_json_is_400_invalid_json(server) -> None:
    """docs/protocol.md, "HTTP API": a body that is not JSON (or not UTF-8, or NaN) → 400 invalid_json."""
    valid = session_body(ride())
    bodies = [
        b"",
        b"not json",
        valid[:-1],
        valid + b"}",
        b"{'ride_id': 'r', 'driver_id': 'd', 'passenger_id': 'p'}",
        b'{"ride_id": "r\xff", "driver_id": "d", "passenger_id": "p"}',
        b"\xff\xfe{\x00}\x00",
        b'{"ride_id": NaN, "driver_id": "d", "passenger_id": "p"}',
        b'{"ride_id": "r", "driver_id": "d", "passenger_id": "p", "x": Infinity}',
        b'{"ride_id": "r", "driver_id": "d", "passenger_id": "p", "x": -Infinity}',
        b"[" * 5000 + b"]" * 5000,
    ]
    for body in bodies:
        assert_error(post_raw_body(server, body), 400, "invalid_json")


@pytest.mark.compat
def test_json_that_is_not_an_object_is_400_invalid_request(server) -> None:
    """docs/protocol.md, "HTTP API": valid JSON that is not an object (array, string, number, null) → 400
    invalid_request."""
    for body in (b"[]", b'["ride", "driver", "passenger"]', b'"ride"', b"42", b"null", b"true"):
        assert_error(post_raw_body(server, body), 400, "invalid_request")


@pytest.mark.compat
def test_body_over_16_kib_is_413(server) -> None:
    """docs/protocol.md, "HTTP API": a body larger than 16 KiB → 413; exactly 16 KiB is accepted."""
    body = session_body(ride())
    exact = body[:-1] + b" " * (16 * 1024 - len(body)) + b"}"
    assert len(exact) == 16 * 1024
    status, _, answer = post_raw_body(server, exact)
    assert status == 200, answer
    over = session_body(ride())
    over = over[:-1] + b" " * (16 * 1024 + 1 - len(over)) + b"}"
    assert_error(post_raw_body(server, over), 413)
    # announced but never sent: answered from the head alone, at once
    started = time.monotonic()
    data, closed = exchange(server, post_head(10**9))
    assert closed and time.monotonic() - started < 3, data
    assert_error(parse_response(data), 413)
    # a length with thousands of digits is refused too, not a crash (int() has a digit limit)
    data, closed = exchange(server, post_head(None, "Content-Length: " + "9" * 5000))
    assert closed, data
    assert_error(parse_response(data), (413, 400))


@pytest.mark.compat
def test_chunked_body_is_refused_without_hanging(server) -> None:
    """docs/protocol.md, "HTTP API": chunked bodies (Transfer-Encoding) → 411 or 400, never a hang."""
    body = session_body(ride())
    chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    cases = [
        (post_head(None, "Transfer-Encoding: chunked"), chunked),
        (post_head(None, "Transfer-Encoding: chunked"), b""),  # body never sent
        (post_head(None, "Transfer-Encoding: gzip, chunked"), b""),
        (post_head(len(body), "Transfer-Encoding: chunked"), body),  # both framings
    ]
    for head, rest in cases:
        started = time.monotonic()
        data, closed = exchange(server, head + rest)
        assert closed and time.monotonic() - started < 3, (head, data)
        assert_error(parse_response(data), (411, 400))
    assert server.request("GET", "/health")[0] == 200


@pytest.mark.compat
def test_missing_content_length_is_411(server) -> None:
    """docs/protocol.md, "HTTP API": POST without Content-Length → 411, never a hang."""
    started = time.monotonic()
    data, closed = exchange(server, post_head(None))
    assert closed and time.monotonic() - started < 3, data
    assert_error(parse_response(data), 411)


@pytest.mark.compat
def test_http_1_0_requests_are_answered(server) -> None:
    """docs/protocol.md, "HTTP API": an HTTP/1.0 request (health checkers) gets an HTTP answer, not a silent
    close."""
    data, closed = exchange(server, b"GET /health HTTP/1.0\r\n\r\n")
    assert closed, data
    status, headers, body = parse_response(data.replace(b"HTTP/1.0 ", b"HTTP/1.1 ", 1))
    assert status == 200 and not kept_alive(headers), data
    assert json.loads(body)["status"] == "ok"
    data, closed = exchange(server, post_head(None).replace(b"HTTP/1.1", b"HTTP/1.0", 1))
    assert closed, data
    assert_error(parse_response(data.replace(b"HTTP/1.0 ", b"HTTP/1.1 ", 1)), 411)


@pytest.mark.compat
def test_invalid_content_length_is_400(server) -> None:
    """docs/protocol.md, "HTTP API": an invalid Content-Length → 400 and close."""
    body = session_body(ride())
    for value in ("abc", "-1", "+5", "1e3", "0x10", "12 13", ""):
        data, closed = exchange(server, post_head(None, f"Content-Length: {value}") + body)
        assert closed, (value, data)
        assert_error(parse_response(data), 400)
    # two different lengths
    data, closed = exchange(server, post_head(len(body), "Content-Length: 3") + body)
    assert closed, data
    assert_error(parse_response(data), 400)


@pytest.mark.compat
def test_api_key_is_checked_before_the_body(server) -> None:
    """docs/protocol.md, "POST /sessions" (check order): a wrong key with a bad
    body → 401, not 400/411/413."""
    wrong = {"X-API-Key": "wrong"}
    assert_error(post_raw_body(server, b"not json", wrong), 401, "unauthorized")
    assert_error(post_raw_body(server, b"[]", wrong), 401, "unauthorized")
    assert_error(post_raw_body(server, session_body(ride(), "same", "same"), wrong), 401, "unauthorized")
    for head in (
        post_head(None, key="wrong"),  # missing Content-Length
        post_head(None, "Transfer-Encoding: chunked", key="wrong"),
        post_head(10**6, key="wrong"),  # too large
        post_head(None, "Content-Length: abc", key="wrong"),
    ):
        data, closed = exchange(server, head)
        assert closed, (head, data)
        assert_error(parse_response(data), 401, "unauthorized")
    # with the right key the body is what is refused
    assert_error(post_raw_body(server, b"not json"), 400, "invalid_json")


@pytest.mark.compat
def test_expect_100_continue(server) -> None:
    """docs/protocol.md, "HTTP API": `Expect: 100-continue` gets `100 Continue`, then the answer."""
    ride_id = ride()
    body = session_body(ride_id)
    with connect_raw(server) as sock:
        sock.sendall(post_head(len(body), "Expect: 100-continue"))
        interim = read_until(sock, b"\r\n\r\n")
        assert interim.startswith(b"HTTP/1.1 100 Continue\r\n"), interim
        final = interim.partition(b"\r\n\r\n")[2]
        sock.sendall(body)
        data, closed = read_answer(sock, 5, data=final)
    assert not closed
    status, headers, answer = parse_response(data)
    assert status == 200 and kept_alive(headers), answer
    assert json.loads(answer)["ride_id"] == ride_id
    # a client that does not wait for the interim answer works as well
    data, closed = exchange(server, post_head(len(body), "Expect: 100-continue") + session_body(ride()))
    assert not closed
    interim, _, final = data.partition(b"\r\n\r\n")
    assert interim == b"HTTP/1.1 100 Continue", data
    assert parse_response(final)[0] == 200, data


@pytest.mark.compat
def test_body_sent_in_several_tcp_pieces(server) -> None:
    """docs/protocol.md, "HTTP API": a request whose head and body arrive in several delayed TCP pieces is
    answered."""
    ride_id = ride()
    body = session_body(ride_id)
    head = post_head(len(body))
    pieces = [head[:7], head[7:40], head[40:-2], head[-2:] + body[:3], body[3:20], body[20:]]
    data, closed = exchange(server, *pieces, delay=0.15)
    assert not closed, data
    status, headers, answer = parse_response(data)
    assert status == 200 and kept_alive(headers), answer
    assert headers["content-type"].startswith("application/json")
    assert json.loads(answer)["ride_id"] == ride_id


# -- persistent connections (docs/protocol.md, "HTTP API"; RFC 9112 §9.3) -------------------


@pytest.mark.compat
def test_keep_alive_serves_several_requests_on_one_connection(server) -> None:
    """docs/protocol.md, "HTTP API": an HTTP/1.1 client (http.client, as PHP's curl) sends its next
    request on the same connection: two POST /sessions and a GET /health on one socket."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        sockets = []
        for ride_id in (ride(), ride()):
            conn.request("POST", "/sessions", session_body(ride_id), JSON_HEADERS)
            response = conn.getresponse()
            headers = {k.lower(): v for k, v in response.getheaders()}
            assert (response.status, json.loads(response.read())["ride_id"]) == (200, ride_id)
            assert kept_alive(headers) and not response.will_close
            sockets.append(conn.sock)
        conn.request("GET", "/health")
        response = conn.getresponse()
        assert (response.status, json.loads(response.read())["status"]) == (200, "ok")
        assert sockets[0] is not None and sockets[0] is sockets[1] is conn.sock
    finally:
        conn.close()


@pytest.mark.compat
def test_connection_close_is_honoured(server) -> None:
    """docs/protocol.md, "HTTP API": a request with `Connection: close` (a token list, any case)
    gets `Connection: close` and the connection is closed after the answer."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        conn.request("POST", "/sessions", session_body(ride()), {**JSON_HEADERS, "Connection": "close"})
        response = conn.getresponse()
        assert response.status == 200 and response.will_close
        assert not kept_alive({k.lower(): v for k, v in response.getheaders()})
        response.read()
    finally:
        conn.close()
    # on a connection kept after a first request, then with a request behind it
    first = b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n"
    closing_request = b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: TE, Close\r\n\r\n"
    with connect_raw(server) as sock:
        sock.sendall(first + closing_request + b"GET /health HTTP/1.1\r\n\r\n")
        data, closed = read_answer(sock)
        end, closes = answer_end(data)  # type: ignore[misc]
        assert not (closed or closes), data
        data, closed = read_answer(sock, data=data[end:])
    assert closed, data
    status, headers, body = parse_response(data)
    assert status == 200 and not kept_alive(headers), data
    assert b"HTTP/1.1" not in body  # the request behind it was not answered


@pytest.mark.compat
def test_pipelined_requests_then_an_upgrade_on_one_connection(server) -> None:
    """RFC 9112 §9.3.2: requests sent back to back on one connection are answered in order;
    a WebSocket upgrade after them on the same connection is handed on (101, then frames)."""
    ride_id = ride()
    body = session_body(ride_id)
    with connect_raw(server) as sock:
        sock.sendall(b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n" + post_head(len(body)) + body)
        first, closed = read_answer(sock)
        end, closes = answer_end(first)  # type: ignore[misc]  # the 200 may be in the same read
        assert not (closed or closes), first
        data, closed = read_answer(sock, data=first[end:])
        assert not closed
        assert_error(parse_response(first[:end]), 404, "not_found")
        status, headers, answer = parse_response(data)
        assert status == 200 and kept_alive(headers), data
        session = json.loads(answer)
        assert session["ride_id"] == ride_id
        sock.sendall(upgrade_head())
        assert read_until(sock, b"\r\n\r\n").startswith(b"HTTP/1.1 101 ")
        payload = json.dumps(
            {"type": "authenticate", "session_id": session["session_id"], "user_id": "driver-1"}
        ).encode()
        sock.sendall(client_frame(0x1, payload))
        assert b'"user_id":"driver-1"' in read_until(sock, b"session_joined")


# -- POST /sessions: one live session per ride, capacity -------------------------


def test_repost_returns_same_session_with_remaining_time(server_factory) -> None:
    """docs/protocol.md, "HTTP API": a re-POST for a live ride with the same participants returns it with the
    time left."""
    server = server_factory(SESSION_DURATION="5s")
    ride_id = ride()
    first = server.new_session(ride_id=ride_id)
    assert first["expires_in"] == 5
    time.sleep(1.2)
    status, again = server.post_session(ride_id=ride_id)
    assert status == 200, again
    assert again["session_id"] == first["session_id"] and again["ride_id"] == ride_id
    assert 3 <= again["expires_in"] <= 4, again

    async def scenario() -> None:
        driver, _ = await join(server, first, "driver-1")
        passenger, _ = await join(server, first, "passenger-1")
        await recv_json(driver)
        await recv_json(passenger)
        # an active call: the time left before call_timeout, counted from connected_at
        status, active = server.post_session(ride_id=ride_id)
        assert status == 200, active
        assert active["session_id"] == first["session_id"]
        assert active["expires_in"] == 5, active
        await driver.close()
        await passenger.close()

    asyncio.run(scenario())
    assert server.post_session(ride_id=ride())[0] == 200


def test_different_participants_are_409_ride_conflict(server) -> None:
    """docs/protocol.md, "HTTP API": a POST for a live ride with other participants → 409 ride_conflict."""
    ride_id = ride()
    server.new_session(ride_id=ride_id)
    for driver_id, passenger_id in (
        ("driver-2", "passenger-1"),
        ("driver-1", "passenger-2"),
        ("passenger-1", "driver-1"),
    ):
        answer = post_raw_body(server, session_body(ride_id, driver_id, passenger_id))
        assert_error(answer, 409, "ride_conflict")
    assert server.post_session(ride_id=ride_id)[0] == 200


def test_new_session_after_end_or_expiry(server_factory) -> None:
    """docs/protocol.md, "HTTP API": once a ride's session ended (end_call) or expired, a POST creates a new
    session."""
    server = server_factory(SESSION_DURATION="1500ms")
    ended_ride, expired_ride = ride(), ride()
    ended = server.new_session(ride_id=ended_ride)
    expiring = server.new_session(ride_id=expired_ride)
    assert ended["expires_in"] == 2

    async def end_call() -> None:
        driver, _ = await join(server, ended, "driver-1")
        passenger, _ = await join(server, ended, "passenger-1")
        await recv_json(driver)
        await recv_json(passenger)
        await send_json(driver, {"type": "end_call"})
        assert await recv_json(driver) == {"type": "call_ended", "reason": "user_terminated"}
        assert await closed_with(driver) == 1000
        assert await closed_with(passenger) == 1000

    asyncio.run(end_call())
    status, after_end = server.post_session(ride_id=ended_ride)
    assert status == 200, after_end
    assert after_end["session_id"] != ended["session_id"]

    time.sleep(1.7)  # the session of expired_ride was never joined: it expired
    status, after_expiry = server.post_session(ride_id=expired_ride, driver_id="driver-9")
    assert status == 200, after_expiry  # no conflict with an expired session
    assert after_expiry["session_id"] != expiring["session_id"]
    assert after_expiry["expires_in"] == 2


def test_max_sessions_is_503_but_repost_still_200(server_factory) -> None:
    """docs/protocol.md, "HTTP API": at MAX_SESSIONS → 503; a re-POST of an existing session is not refused;
    409 before 503."""
    server = server_factory(MAX_SESSIONS="2")
    first_ride = ride()
    first = server.new_session(ride_id=first_ride)
    server.new_session()
    assert_error(post_raw_body(server, session_body(ride())), 503)
    status, again = server.post_session(ride_id=first_ride)
    assert status == 200 and again["session_id"] == first["session_id"], again
    assert_error(post_raw_body(server, session_body(first_ride, "driver-2")), 409, "ride_conflict")
    # the key and the body are checked before capacity
    assert_error(post_raw_body(server, session_body(ride()), {"X-API-Key": "wrong"}), 401)
    assert_error(post_raw_body(server, b"[]"), 400)
    assert health(server)["sessions"] == 2

    async def end_first() -> None:
        driver, _ = await join(server, first, "driver-1")
        await send_json(driver, {"type": "end_call"})
        assert await recv_json(driver) == {"type": "call_ended", "reason": "user_terminated"}
        assert await closed_with(driver) == 1000

    asyncio.run(end_first())
    assert server.post_session(ride_id=ride())[0] == 200  # room again


@pytest.mark.compat
def test_other_methods_on_sessions_are_405_with_allow(server) -> None:
    """docs/protocol.md, "HTTP API": other methods on /sessions → 405 with an Allow header listing POST."""
    for method in ("GET", "PUT", "DELETE", "PATCH", "OPTIONS"):
        answer = server.request(method, "/sessions", None, {"X-API-Key": API_KEY})
        assert_error(answer, 405)
        assert "POST" in [m.strip() for m in answer[1]["allow"].split(",")], (method, answer[1])


# -- /health, /metrics, other paths ---------------------------------------------------


@pytest.mark.compat
def test_health_get_and_head(server) -> None:
    """docs/protocol.md, "HTTP API": GET /health → 200 {"status": "ok", uptime, sessions, calls, connections,
    database}; HEAD."""
    status, headers, body = server.request("GET", "/health")
    assert status == 200
    assert headers["content-type"].startswith("application/json")
    document = json.loads(body)
    assert document["status"] == "ok"
    assert {"uptime_seconds", "sessions", "active_calls", "connections", "database"} <= set(document)
    assert document["database"] == "sqlite"
    for field in ("uptime_seconds", "sessions", "active_calls", "connections"):
        assert type(document[field]) is int and document[field] >= 0, document
    assert (document["sessions"], document["active_calls"], document["connections"]) == (0, 0, 0)
    # HEAD: the status and headers, no body bytes at all
    data, closed = exchange(server, b"HEAD /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    assert not closed, data
    status, headers, rest = parse_response(data)
    assert status == 200 and rest == b"" and kept_alive(headers), data
    assert headers["content-type"].startswith("application/json")
    assert server.request("HEAD", "/health")[0] == 200


def test_health_counts_sessions_calls_and_connections(server) -> None:
    """docs/protocol.md, "HTTP API": /health reports live sessions, active calls and open connections."""
    session = server.new_session(ride_id=ride())
    server.new_session(ride_id=ride())
    assert health(server)["sessions"] == 2

    async def scenario() -> None:
        driver, _ = await join(server, session, "driver-1")
        document = health(server)
        assert (document["sessions"], document["active_calls"], document["connections"]) == (2, 0, 1)
        passenger, _ = await join(server, session, "passenger-1")
        document = health(server)
        assert (document["sessions"], document["active_calls"], document["connections"]) == (2, 1, 2)
        await send_json(driver, {"type": "end_call"})
        assert await closed_with(driver) == 1000
        assert await closed_with(passenger) == 1000

    asyncio.run(scenario())
    deadline = time.monotonic() + 3
    while True:
        document = health(server)
        if document["connections"] == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert (document["sessions"], document["active_calls"], document["connections"]) == (1, 0, 0)


@pytest.mark.compat
def test_metrics_for_loopback_only(server) -> None:
    """docs/protocol.md, "HTTP API": GET /metrics → Prometheus text to direct loopback clients; proxied
    requests → 404."""
    server.new_session(ride_id=ride())
    status, headers, body = server.request("GET", "/metrics")
    assert status == 200, body
    assert headers["content-type"].startswith("text/plain")
    text = body.decode()
    assert "# TYPE intaleq_sessions_created_total counter" in text
    assert "intaleq_sessions_created_total 1\n" in text
    for name in (
        "intaleq_calls_started_total",
        "intaleq_calls_ended_total",
        "intaleq_messages_relayed_total",
        "intaleq_connections_rejected_total",
        "intaleq_connections_open",
        "intaleq_calllog_writes_pending",
        "intaleq_calllog_writes_failed_total",
    ):
        assert f"# TYPE {name} " in text, name
    proxied = (
        {"X-Forwarded-For": "203.0.113.7"},
        {"X-Real-IP": "203.0.113.7"},
        {"X-Real-IP": "127.0.0.1"},
        {"Forwarded": "for=203.0.113.7;proto=https"},  # RFC 7239, sent by some proxies instead
    )
    for header in proxied:
        assert_error(server.request("GET", "/metrics", None, header), 404)


def request_from(server: Any, source: str, path: str, headers: dict[str, str] | None = None) -> tuple:
    """``GET path`` to the daemon on 127.0.0.1 from a socket bound to
    ``source`` (any local address: Linux routes 127.0.0.0/8 and the host's own
    addresses over lo without setup): ``(status, headers, body)``."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10, source_address=(source, 0))
    try:
        conn.request("GET", path, headers=headers or {})
        assert conn.sock.getsockname()[0] == source
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def non_loopback_address() -> str | None:
    """An IPv4 address of this host that is not loopback, or None: the source
    address the kernel picks for a route off the host (a UDP connect sends nothing)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("198.51.100.1", 9))  # TEST-NET-2 (RFC 5737)
        except OSError:
            return None
        address = probe.getsockname()[0]
    return None if is_loopback_peer(address) or address == "0.0.0.0" else address


@pytest.mark.compat
def test_metrics_for_every_loopback_peer(server) -> None:
    """docs/protocol.md, "GET /metrics": any loopback peer (here 127.0.0.2, in 127.0.0.0/8 like
    127.0.0.1, RFC 1122 §3.2.1.3) gets the metrics; with a forwarding header still 404."""
    status, headers, body = request_from(server, "127.0.0.2", "/metrics")
    assert status == 200, body
    assert headers["content-type"].startswith("text/plain")
    assert b"# TYPE intaleq_sessions_created_total counter" in body
    for header in ({"X-Forwarded-For": "127.0.0.1"}, {"X-Real-IP": "127.0.0.2"}):
        assert_error(request_from(server, "127.0.0.2", "/metrics", header), 404)


def test_metrics_refused_to_a_non_loopback_peer(server) -> None:
    """docs/protocol.md, "GET /metrics": a peer outside loopback (this host's own LAN address) gets 404."""
    address = non_loopback_address()
    if address is None:
        pytest.skip("this host has no non-loopback IPv4 address (is_loopback_peer is tested alone)")
    assert_error(request_from(server, address, "/metrics"), 404, "not_found")
    assert request_from(server, address, "/health")[0] == 200  # the peer itself reaches the daemon


@pytest.mark.parametrize(
    ("address", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.0.0.2", True),
        ("127.255.255.254", True),
        ("::1", True),
        ("0:0:0:0:0:0:0:1", True),
        ("::ffff:127.0.0.1", True),
        ("::ffff:127.0.0.2", True),
        ("::ffff:7f00:2", True),
        ("128.0.0.1", False),
        ("126.255.255.255", False),
        ("192.0.2.2", False),
        ("10.0.0.1", False),
        ("0.0.0.0", False),
        ("::", False),
        ("::2", False),
        ("::ffff:192.0.2.2", False),
        ("::127.0.0.1", False),  # IPv4-compatible (deprecated, RFC 4291 §2.5.5.1), not mapped
        ("fd00::2", False),
        ("fe80::1", False),
        ("?", False),
        ("", False),
        ("localhost", False),
    ],
)
def test_is_loopback_peer(address: str, loopback: bool) -> None:
    """docs/protocol.md, "GET /metrics": 127.0.0.0/8, ::1 and IPv4-mapped
    ::ffff:127.x are loopback; nothing else."""
    assert is_loopback_peer(address) is loopback


@pytest.mark.compat
def test_other_paths_and_ws_without_upgrade(server) -> None:
    """docs/protocol.md, "HTTP API": /ws without upgrade → 426; POST /ws → 405; unknown path → 404."""
    assert_error(server.request("GET", "/ws"), 426)
    assert_error(server.request("GET", "/ws", None, {"Connection": "Upgrade"}), 426)
    assert_error(server.request("POST", "/ws", b"", {"X-API-Key": API_KEY}), 405)
    for path in ("/", "/nope", "/session", "/sessions/x", "/wss", "/health/x", "/ws/x"):
        assert_error(server.request("GET", path), 404)
    assert_error(server.request("POST", "/nope", b"{}"), 404)


@pytest.mark.compat
@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GARBAGE\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",
        b"GET /health\r\nHost: x\r\n\r\n",
        b"GET /health HTTP/2.0\r\nHost: x\r\n\r\n",
        b"GET /health HTTP/1.1 extra\r\nHost: x\r\n\r\n",
        b"GET health HTTP/1.1\r\nHost: x\r\n\r\n",
        b"G@T /health HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /health HTTP/1.1\r\nthis is not a header\r\n\r\n",
        b"GET /health HTTP/1.1\r\nHost: x\r\n folded: continuation\r\n\r\n",
        b"GET /health HTTP/1.1\r\nBad Header: x\r\n\r\n",
        b"GET /health HTTP/1.1\r\nX-Test: a\x01b\r\n\r\n",
        b"POST /sessions HTTP/1.1\r\nContent-Length: 2\r\nX Bad: y\r\n\r\n{}",
    ],
    ids=[
        "garbage",
        "tls-hello",
        "no-version",
        "http2-version",
        "extra-token",
        "no-slash",
        "bad-method",
        "no-colon",
        "folded",
        "space-in-name",
        "control-char-value",
        "post-bad-header",
    ],
)
def test_malformed_http_is_400_and_close(server, request_bytes: bytes) -> None:
    """docs/protocol.md, "HTTP API": malformed HTTP → 400 and the connection is closed."""
    data, closed = exchange(server, request_bytes)
    assert closed, data
    assert data.startswith(b"HTTP/1.1 400 "), data
    status, headers, body = parse_response(data)
    assert_error((status, headers, body), 400)
    assert not kept_alive(headers)


@pytest.mark.compat
def test_refused_and_aborted_connections_log_one_line(server) -> None:
    """docs/operations.md, "Shutdown": a malformed request or a connection closed before its request logs no
    traceback."""
    exchange(server, b"GARBAGE\r\n\r\n")
    socket.create_connection(("127.0.0.1", server.port), timeout=5).close()  # TCP probe
    with connect_raw(server) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\n")  # half a head, then gone
    assert server.request("GET", "/health")[0] == 200
    assert server.stop() == 0
    assert "Traceback" not in server.log, server.log
    assert "opening handshake failed" not in server.log, server.log


def test_idle_and_slow_clients_are_dropped(server) -> None:
    """docs/protocol.md, "HTTP API": idle clients, half a head or half a body are dropped after a bounded
    time."""
    body = session_body(ride())
    partials = [
        b"",  # connects and says nothing
        b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n",  # half a head
        post_head(len(body)) + body[:10],  # half a body
    ]
    started = time.monotonic()
    sockets = [connect_raw(server) for _ in partials]
    try:
        for sock, partial in zip(sockets, partials, strict=True):
            if partial:
                sock.sendall(partial)
        for sock, partial in zip(sockets, partials, strict=True):
            data, closed = read_until_closed(sock, max(0.1, started + 15 - time.monotonic()))
            assert closed, (partial, data)
    finally:
        for sock in sockets:
            sock.close()
    assert time.monotonic() - started < 15
    assert health(server)["status"] == "ok"


# -- per-IP WebSocket connection limit (docs/protocol.md, "Connecting") --------------------------------------


@pytest.mark.compat
def test_ws_connection_limit_per_ip(server_factory) -> None:
    """docs/protocol.md, "Connecting": once RATE_LIMIT_PER_MIN upgrades from a client IP ended without
    authenticating (closed or refused) within a minute, its upgrades get HTTP 429 before the upgrade;
    upgrades that authenticate never count."""
    server = server_factory(RATE_LIMIT_PER_MIN="3")
    results = attempts(server, None, joins(), joins(), refused(), joins(), None, joins(), None, joins())
    assert results == [101, 101, 101, 101, 101, 101, 429, 429, 429]

    async def refused_answer() -> Any:
        try:
            async with server.ws():
                pass
        except InvalidStatus as exc:
            return exc.response
        raise AssertionError("the upgrade was accepted")

    response = asyncio.run(refused_answer())
    assert response.status_code == 429
    assert json.loads(response.body)["error"] == "rate_limited"
    assert response.headers["Retry-After"] == "60"
    # plain HTTP does not count, and is not refused
    assert server.request("GET", "/health")[0] == 200
    assert server.post_session(ride_id=ride())[0] == 200
    metrics = server.request("GET", "/metrics")[2].decode()
    assert 'intaleq_connections_rejected_total{reason="ip_rate_limited"} 4' in metrics


def test_ws_limit_uses_x_real_ip_from_trusted_proxy(server_factory) -> None:
    """docs/protocol.md, "Connecting": behind a trusted proxy the client IP is X-Real-IP, so clients are
    counted apart."""
    server = server_factory(RATE_LIMIT_PER_MIN="3")
    phone = {"X-Real-IP": "203.0.113.7"}
    other = {"X-Real-IP": "203.0.113.8"}
    results = attempts(server, phone, joins(phone), refused(phone), joins(phone), phone, phone, joins(phone))
    assert results == [101, 101, 101, 101, 101, 429, 429]
    assert attempts(server, other, None, joins(other), other, refused(other), other) == [101] * 5 + [429]
    # X-Real-IP wins over X-Forwarded-For
    both = {"X-Real-IP": "203.0.113.7", "X-Forwarded-For": "198.51.100.1"}
    assert attempts(server, both) == [429]
    # an X-Real-IP that is not an address does not merge everyone into one bucket
    assert attempts(server, {"X-Real-IP": "unknown"}, {"X-Real-IP": "2001:db8::1"}) == [101, 101]


def test_ws_limit_uses_last_x_forwarded_for_address(server_factory) -> None:
    """docs/protocol.md, "Connecting": without X-Real-IP the client IP is the last address of X-Forwarded-
    For."""
    server = server_factory(RATE_LIMIT_PER_MIN="3")
    forwarded = {"X-Forwarded-For": "198.51.100.1, 203.0.113.9"}
    results = attempts(server, forwarded, joins(forwarded), forwarded, forwarded, joins(forwarded))
    assert results == [101, 101, 101, 101, 429]
    assert attempts(server, {"X-Real-IP": "203.0.113.9"}) == [429]  # same client
    # the first address is not the client; a different last address is another client
    assert attempts(server, {"X-Forwarded-For": "203.0.113.9, 198.51.100.77"}) == [101]
    assert attempts(server, {"X-Forwarded-For": "203.0.113.9,198.51.100.78"}) == [101]
    assert attempts(server, None) == [101]  # 127.0.0.1 itself untouched


def test_ws_limit_ignores_headers_from_untrusted_peers(server_factory) -> None:
    """docs/protocol.md, "Connecting": with TRUSTED_PROXIES empty, X-Real-IP / X-Forwarded-For are ignored
    (TCP peer counts)."""
    server = server_factory(RATE_LIMIT_PER_MIN="3", TRUSTED_PROXIES="")
    results = attempts(
        server,
        {"X-Real-IP": "203.0.113.1"},
        joins({"X-Real-IP": "203.0.113.2"}),
        {"X-Forwarded-For": "203.0.113.3"},
        refused({"X-Real-IP": "203.0.113.4"}),
        {"X-Real-IP": "203.0.113.5"},
        None,
    )
    assert results == [101, 101, 101, 101, 429, 429]


NAT = {"X-Real-IP": "100.64.0.1"}  # one carrier-grade NAT address (RFC 6598) for every phone


def metric_lines(server: Any, name: str) -> list[str]:
    text = server.request("GET", "/metrics")[2].decode()
    return [line for line in text.splitlines() if line.startswith(name)]


def test_ws_limit_lets_phones_behind_one_address_join_and_reconnect(server_factory) -> None:
    """docs/protocol.md, "Connecting": with the default RATE_LIMIT_PER_MIN (10), 200 participants of 100
    calls behind one client IP (a carrier NAT) all authenticate, all connected at once, and each reconnects
    20 times within the minute: upgrades that authenticate never count. The clients keep at most 100 of
    their upgrades waiting to authenticate at a time (the per-IP bound on those)."""
    server = server_factory(RATE_LIMIT_PER_MIN="10", SESSION_DURATION="5m")
    sessions = [server.new_session() for _ in range(100)]
    seats = [(session, user_id) for session in sessions for user_id in ("driver-1", "passenger-1")]

    async def scenario() -> None:
        waiting = asyncio.Semaphore(100)  # upgraded, not yet told `authenticated`

        async def connect(session: dict[str, Any], user_id: str) -> Any:
            async with waiting:
                ws = await server.ws(additional_headers=NAT)
                try:
                    await authenticate(ws, session, user_id)
                except BaseException:
                    await ws.close()
                    raise
            return ws

        async def reconnect(ws: Any, session: dict[str, Any], user_id: str) -> Any:
            for n in range(20):
                if n % 2:  # the network flapped: the old socket is gone first
                    await ws.close()
                    ws = await connect(session, user_id)
                else:  # the app is unsure its old socket is dead: the new one replaces it (4002)
                    new = await connect(session, user_id)
                    await ws.close()
                    ws = new
            return ws

        sockets = await asyncio.gather(*(connect(session, user_id) for session, user_id in seats))
        assert metric_lines(server, "intaleq_connections_open ") == ["intaleq_connections_open 200"]
        assert metric_lines(server, "intaleq_calls_active ") == ["intaleq_calls_active 100"]
        started = time.monotonic()
        sockets = await asyncio.gather(
            *(reconnect(ws, session, user_id) for ws, (session, user_id) in zip(sockets, seats, strict=True))
        )
        assert time.monotonic() - started < 60  # all 4000 reconnects within the minute
        assert metric_lines(server, "intaleq_calls_active ") == ["intaleq_calls_active 100"]
        await asyncio.gather(*(ws.close() for ws in sockets))

    asyncio.run(scenario())
    assert metric_lines(server, "intaleq_connections_rejected_total{") == []
    joined = "participant joined session="
    wait_until(lambda: server.log.count(joined) >= 200 * 21, timeout=10, explain=lambda: server.log[-2000:])
    assert server.log.count(joined) == 200 * 21
    assert "reason=ip_rate_limited" not in server.log


def test_ws_limit_bounds_upgrades_waiting_to_authenticate(server_factory) -> None:
    """docs/protocol.md, "Connecting": at most 100 upgrades per client IP wait to authenticate at once: the
    101st gets 429 rate_limited (Retry-After: AUTH_TIMEOUT); once one of the 100 authenticates, a new one
    is admitted; other client IPs are unaffected."""
    server = server_factory(RATE_LIMIT_PER_MIN="10", AUTH_TIMEOUT="5m")
    session = server.new_session()

    async def scenario() -> None:
        waiting = await asyncio.gather(*(server.ws(additional_headers=NAT) for _ in range(100)))
        # a pong comes only once the daemon's handler runs: all 100 now wait to authenticate
        pongs = [await ws.ping() for ws in waiting]
        await asyncio.wait_for(asyncio.gather(*pongs), 5)
        try:
            async with server.ws(additional_headers=NAT):
                raise AssertionError("the 101st upgrade waiting to authenticate was accepted")
        except InvalidStatus as exc:
            response = exc.response
        assert response.status_code == 429
        assert json.loads(response.body) == {
            "error": "rate_limited",
            "message": "too many connections waiting to authenticate",
        }
        assert response.headers["Retry-After"] == "300"
        assert await attempt(server, {"X-Real-IP": "100.64.0.2"}, session=session) == 101
        await authenticate(waiting[0], session, "driver-1")
        assert await attempt(server, NAT, session=session, user_id="passenger-1") == 101
        await asyncio.gather(*(ws.close() for ws in waiting))

    asyncio.run(scenario())
    assert metric_lines(server, "intaleq_connections_rejected_total{") == [
        'intaleq_connections_rejected_total{reason="ip_pending_limited"} 1'
    ]


def test_ws_limit_counts_upgrades_ended_unauthenticated(server_factory) -> None:
    """docs/protocol.md, "Connecting": with the default RATE_LIMIT_PER_MIN (10), 10 upgrades from one client
    IP that end without authenticating (refused with unauthorized, or closed) → its 11th upgrade that
    would end so gets 429, and so does one that would authenticate (the 10 upgrades that authenticated in
    between never counted); a different X-Real-IP is unaffected."""
    server = server_factory(RATE_LIMIT_PER_MIN="10")
    phone = {"X-Real-IP": "203.0.113.70"}
    other = {"X-Real-IP": "203.0.113.71"}
    steps = []
    for n in range(10):  # an upgrade that authenticates (never counted) between each
        steps += [joins(phone), refused(phone) if n % 2 else phone]
    assert attempts(server, *steps, phone, joins(phone)) == [101] * 20 + [429, 429]
    assert attempts(server, joins(other), other, refused(other)) == [101, 101, 101]
    assert metric_lines(server, "intaleq_connections_rejected_total{") == [
        'intaleq_connections_rejected_total{reason="ip_rate_limited"} 2',
        'intaleq_connections_rejected_total{reason="not_authenticated"} 6',
    ]


# -- shutdown (docs/operations.md, "Shutdown") -------------------------------------------------------------


def test_sigterm_ends_active_call_with_server_shutdown(server) -> None:
    """docs/operations.md, "Shutdown": SIGTERM ends live calls with call_ended server_shutdown, close 1001,
    exit 0, logged."""
    session = server.new_session(ride_id=ride())

    async def scenario() -> float:
        driver, _ = await join(server, session, "driver-1")
        passenger, _ = await join(server, session, "passenger-1")
        assert await recv_json(driver) == {"type": "participant_joined", "role": "passenger"}
        assert await recv_json(passenger) == {"type": "participant_joined", "role": "driver"}
        started = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        assert await recv_json(driver) == {"type": "call_ended", "reason": "server_shutdown"}
        assert await recv_json(passenger) == {"type": "call_ended", "reason": "server_shutdown"}
        assert await closed_with(driver) == 1001
        assert await closed_with(passenger) == 1001
        return started

    started = asyncio.run(scenario())
    assert server.proc.wait(10) == 0
    assert time.monotonic() - started < 5
    [row] = server.call_logs()
    assert row["session_id"] == session["session_id"]
    assert row["status"] == "ended"
    assert row["end_reason"] == "server_shutdown"
    assert row["connected_at"] is not None and row["ended_at"] is not None


def test_while_stopping_sessions_and_health_are_503(server) -> None:
    """docs/operations.md, "Shutdown"; docs/protocol.md, "HTTP API": while stopping, POST /sessions and new
    upgrades → 503, /health → 503 shutting_down, each answer closing its connection; a kept-alive
    connection waiting for its next request is closed as the stop begins."""
    kept = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    with connect_raw(server) as lingering, closing(kept):
        kept.request("GET", "/health")
        assert kept.getresponse().read()
        # a WebSocket client that never answers the closing handshake keeps the
        # server in its stopping phase for the close timeout
        lingering.sendall(upgrade_head())
        assert read_until(lingering, b"\r\n\r\n").startswith(b"HTTP/1.1 101 ")
        started = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        server.wait_for_log("stopping: ending live calls")
        # closed now, not when the process exits (the requests below are answered after it)
        assert read_until_closed(kept.sock, 5) == (b"", True)
        answer = post_raw_body(server, session_body(ride()))
        assert_error(answer, 503)
        assert not kept_alive(answer[1])  # docs/protocol.md, "HTTP API": no connection kept while stopping
        status, headers, body = server.request("GET", "/health")
        assert status == 503 and not kept_alive(headers), body
        assert json.loads(body) == {"status": "shutting_down"}
        assert asyncio.run(attempt(server)) == 503
        # the lingering client was sent a close frame with 1001
        frame = read_until(lingering, b"\x03\xe9")
        assert frame[0] == 0x88, frame
    assert server.proc.wait(10) == 0
    assert time.monotonic() - started < 8


def test_sigint_ends_waiting_session_and_exits_0(server) -> None:
    """docs/operations.md, "Shutdown": SIGINT stops like SIGTERM: joined and unauthenticated sockets get
    close 1001, exit 0."""
    session = server.new_session(ride_id=ride())

    async def scenario() -> None:
        driver, _ = await join(server, session, "driver-1")
        anonymous = await server.ws().__aenter__()
        await asyncio.sleep(0.1)
        server.proc.send_signal(signal.SIGINT)
        assert await recv_json(driver) == {"type": "call_ended", "reason": "server_shutdown"}
        assert await closed_with(driver) == 1001
        assert await closed_with(anonymous) == 1001

    asyncio.run(scenario())
    assert server.proc.wait(10) == 0
    [row] = server.call_logs()
    assert row["end_reason"] == "server_shutdown"
    assert "KeyboardInterrupt" not in server.log


def test_sigterm_with_idle_http_client_exits_promptly(server_factory) -> None:
    """docs/operations.md, "Shutdown": SIGTERM exits 0 within a few seconds, call log flushed, even with
    idle HTTP clients open: one that sent nothing, one that sent half a request, one whose connection
    was kept after its answer (closed cleanly; test_while_stopping_sessions_and_health_are_503 shows
    it closed as the stop begins)."""
    server = server_factory(LOG_LEVEL="info")
    session = server.new_session()
    address = ("127.0.0.1", server.port)
    kept = http.client.HTTPConnection(*address, timeout=10)
    with socket.create_connection(address), socket.create_connection(address) as half, closing(kept):
        kept.request("GET", "/health")
        assert kept.getresponse().read()
        half.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        time.sleep(0.2)
        started = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        assert read_until_closed(kept.sock, 6) == (b"", True)
        try:
            code = server.proc.wait(6)
        except subprocess.TimeoutExpired:
            code = None
        elapsed = time.monotonic() - started
    assert code == 0 and elapsed < 5, (code, elapsed, server.log)
    assert server.stop() == 0
    assert "Traceback" not in server.log, server.log
    rows = server.call_logs()
    assert [(r["session_id"], r["end_reason"]) for r in rows] == [(session["session_id"], "server_shutdown")]


# -- configuration at the process level (docs/operations.md, "Configuration") --------------------------------


@pytest.mark.parametrize(
    ("overrides", "variable"),
    [
        ({"API_KEY": "too-short-key"}, "API_KEY"),
        ({"API_KEY": None}, "API_KEY"),
        ({"SERVER_ADDR": "nonsense"}, "SERVER_ADDR"),
        ({"SERVER_ADDR": "127.0.0.1:99999"}, "SERVER_ADDR"),
        ({"SERVER_ADDR": "::1:47880"}, "SERVER_ADDR"),
        ({"HEARTBEAT_INTERVAL": "20s", "HEARTBEAT_TIMEOUT": "10s"}, "HEARTBEAT_TIMEOUT"),
        ({"HEARTBEAT_INTERVAL": "20s", "HEARTBEAT_TIMEOUT": "20s"}, "HEARTBEAT_TIMEOUT"),
        ({"LOG_LEVEL": "loud"}, "LOG_LEVEL"),
        ({"LOG_FORMAT": "xml"}, "LOG_FORMAT"),
        ({"ENVIRONMENT": "production", "DB_USERNAME": None}, "DB_USERNAME"),
        ({"ENVIRONMENT": "staging"}, "ENVIRONMENT"),
        ({"SESSION_DURATION": "abc"}, "SESSION_DURATION"),
        ({"AUTH_TIMEOUT": "5x"}, "AUTH_TIMEOUT"),
        ({"RATE_LIMIT_PER_MIN": "ten"}, "RATE_LIMIT_PER_MIN"),
        ({"MAX_SESSIONS": "0"}, "MAX_SESSIONS"),
        ({"TRUSTED_PROXIES": "nginx"}, "TRUSTED_PROXIES"),
    ],
    ids=lambda value: "-".join(f"{k}={v}" for k, v in value.items()) if isinstance(value, dict) else value,
)
def test_config_error_exits_78_naming_the_variable(tmp_path, overrides: dict, variable: str) -> None:
    """docs/operations.md, "Configuration": bad configuration → exit status 78 and one stderr line naming the
    variable."""
    result = run_daemon(daemon_env(tmp_path, **overrides))
    assert result.returncode == 78, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert variable in lines[0], lines
    assert "Traceback" not in result.stderr
    if "API_KEY" in overrides and overrides["API_KEY"]:
        assert overrides["API_KEY"] not in result.stderr  # never echo the secret


def test_unedited_env_example_exits_78_naming_api_key(tmp_path) -> None:
    """docs/operations.md: started with .env.example as it ships (its placeholder API_KEY),
    the daemon stops at once: exit 78, one line naming API_KEY, the value not echoed."""
    result = run_daemon(daemon_env(tmp_path, API_KEY=None), "--env-file", os.path.join(ROOT, ".env.example"))
    assert result.returncode == 78, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "API_KEY" in lines[0] and "placeholder" in lines[0], lines
    assert "change-me" not in result.stderr


def test_env_file_missing_or_malformed_exits_78(tmp_path) -> None:
    """docs/operations.md, "Configuration": an unreadable or malformed --env-file is a configuration error
    (78, one line)."""
    bad = tmp_path / "bad.env"
    bad.write_text("API_KEY\n")
    for path in (str(tmp_path / "missing.env"), str(bad)):
        result = run_daemon(daemon_env(tmp_path), "--env-file", path)
        assert result.returncode == 78, result
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert path in result.stderr or "env-file" in result.stderr, result.stderr


def test_env_file_is_loaded_and_real_environment_wins(server_factory, tmp_path) -> None:
    """docs/operations.md, "Configuration": --env-file loads KEY=VALUE (comments, quotes, export); real
    environment variables win."""
    file_key = "file-api-key-" + "k" * 32
    file_port, real_port = free_port(), free_port()
    env_file = tmp_path / "signal.env"
    env_file.write_text(
        "# intaleq-signal test settings\n"
        "\n"
        f'API_KEY="{file_key}"\n'
        "export ENVIRONMENT=development\n"
        f"SERVER_ADDR=127.0.0.1:{file_port}\n"
        "LOG_LEVEL=loud  # invalid, but the real environment overrides it\n"
        f"SQLITE_PATH='{tmp_path / 'from-file.sqlite3'}'\n"
        "SESSION_DURATION=42s\n"
    )
    server = server_factory(
        "--env-file",
        str(env_file),
        API_KEY=None,
        ENVIRONMENT=None,
        SQLITE_PATH=None,
        SERVER_ADDR=f"127.0.0.1:{real_port}",
        LOG_LEVEL="info",
    )
    assert f"127.0.0.1:{real_port}" in server.wait_for_log("listening on")
    status, document = server.post_session(ride(), key=file_key)
    assert status == 200, document
    assert document["expires_in"] == 42
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", file_port), timeout=1).close()
    assert server.stop() == 0, server.log
    assert (tmp_path / "from-file.sqlite3").exists()
    assert file_key not in server.log


def test_http_1_0_on_ws_without_upgrade_is_426_with_upgrade_is_400(server):
    """docs/protocol.md, "Anything else": a request for /ws without an
    Upgrade header is told to upgrade (426) whatever its HTTP version; one
    that asks for the upgrade over HTTP/1.0 is refused (400, RFC 6455 §4.1)."""
    for request, status in (
        (b"GET /ws HTTP/1.0\r\n\r\n", 426),
        (b"GET /ws HTTP/1.0\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n", 400),
    ):
        sock = connect_raw(server)
        sock.sendall(request)
        data, _ = read_until_closed(sock, 5)
        assert parse_response(data)[0] == status, (request, data)
