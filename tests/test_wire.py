"""The byte-level edge: HTTP heads and bodies before the handshake
(intaleq_signal/front.py), messages and pings after it
(intaleq_signal/wire.py). Raw sockets against the real daemon; the cases a
newcomer's adversarial session found (docs/protocol.md, "HTTP API" and
"WebSocket /ws")."""

from __future__ import annotations

import asyncio
import json
import socket

import pytest
from test_http import assert_error, session_body
from websockets.asyncio.client import ClientConnection

from conftest import (
    API_KEY,
    answer_end,
    client_frame,
    daemon_env,
    join,
    parse_response,
    read_answer,
    recv_json,
    run_daemon,
    send_json,
    upgrade_head,
)

pytestmark = pytest.mark.compat


def raw_answer(server, data: bytes, timeout: float = 5.0) -> tuple[int, dict[str, str], bytes]:
    """The first answer to ``data`` sent on a new connection; the daemon
    closed the connection after it exactly when it said `Connection: close`."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=timeout) as sock:
        sock.sendall(data)
        reply, closed = read_answer(sock, timeout)
    found = answer_end(reply)
    assert found is not None, reply
    assert closed == found[1], reply
    return parse_response(reply[: found[0]])


def post(body: bytes, *headers: str) -> bytes:
    lines = ["POST /sessions HTTP/1.1", "Host: x", *headers, f"Content-Length: {len(body)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def test_repeated_api_key_header_is_a_wrong_key(server) -> None:
    """docs/protocol.md, "POST /sessions": X-API-Key sent twice (even once right) is 401 and
    counts toward the 429 lock."""
    body = session_body("ride-dup-key")
    answer = raw_answer(server, post(body, f"X-API-Key: {API_KEY}", f"X-API-Key: {API_KEY}"))
    assert_error(answer, 401, "unauthorized")
    for _ in range(9):
        assert_error(raw_answer(server, post(body, "X-API-Key: a", "X-API-Key: b")), 401)
    assert_error(raw_answer(server, post(body, f"X-API-Key: {API_KEY}")), 429, "rate_limited")


def test_repeated_proxy_headers_are_not_believed(server) -> None:
    """docs/protocol.md, "Connecting": a repeated X-Real-IP is ignored; repeated
    X-Forwarded-For headers form one list."""
    head = upgrade_head(
        "X-Real-IP: 203.0.113.1",
        "X-Real-IP: 203.0.113.2",
        "X-Forwarded-For: 198.51.100.1",
        "X-Forwarded-For: 198.51.100.2",
    )
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(head)
        assert sock.recv(4096).startswith(b"HTTP/1.1 101")
        sock.sendall(client_frame(0x1, b'{"type":"heartbeat"}'))  # not authenticate: refused
        sock.recv(4096)
    line = server.wait_for_log("connection refused reason=not_authenticated")
    assert "ip=198.51.100.2" in line


@pytest.mark.parametrize("trailer", [b"\r\n", b"GET /health HTTP/1.1\r\n\r\n", b"garbage"])
def test_bytes_after_a_request_do_not_lose_the_answer(server, trailer) -> None:
    """docs/protocol.md, "HTTP API": whatever follows a request on its connection (a request
    pipelined behind it, answered in turn, or bytes that never become one) never costs its answer."""
    status, _, body = raw_answer(
        server, post(session_body(f"ride-trailer-{len(trailer)}"), f"X-API-Key: {API_KEY}") + trailer
    )
    assert status == 200, body
    assert b"session_id" in body
    status, _, body = raw_answer(server, b"GET /health HTTP/1.1\r\n\r\n" + trailer)
    assert status == 200, body


def test_bare_lf_line_endings_are_400_not_a_hang(server) -> None:
    """docs/protocol.md, "Anything else": malformed HTTP (LF instead of CRLF) gets 400 and close, at once."""
    assert_error(raw_answer(server, b"GET /health HTTP/1.1\nHost: x\n\n", timeout=3), 400)


def test_leading_empty_lines_are_ignored(server) -> None:
    """RFC 9112 §2.2: empty lines before the request line are skipped."""
    status, _, _ = raw_answer(server, b"\r\n\r\nGET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 200


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GET /health HTTP/1.1\r\nX-Long: " + b"a" * 9000 + b"\r\n\r\n", 431),
        (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n", 414),
        (b"GET /health HTTP/1.1\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(200)) + b"\r\n", 431),
        (
            b"GET /health HTTP/1.1\r\n"
            + b"X-Big: "
            + b"b" * 8000
            + b"\r\n" * 1
            + b"X-Big2: "
            + b"c" * 8000
            + b"\r\nX-Big3: "
            + b"d" * 8000
            + b"\r\n\r\n",
            431,
        ),
    ],
    ids=["long-header", "long-target", "many-headers", "head-over-16k"],
)
def test_oversized_heads_get_json_answers(server, request_bytes, status) -> None:
    """docs/protocol.md, "Anything else": every HTTP answer is JSON, the library's size refusals included."""
    assert_error(raw_answer(server, request_bytes), status)


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ("Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n", 400),
        (
            "Upgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            "Sec-WebSocket-Version: 13\r\n",
            426,
        ),
        (
            "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: short\r\n"
            "Sec-WebSocket-Version: 13\r\n",
            400,
        ),
    ],
    ids=["no-key", "no-connection-upgrade", "bad-key"],
)
def test_bad_websocket_handshakes_get_json_answers(server, headers, status) -> None:
    """docs/protocol.md, "Anything else": the library's handshake refusals are rewritten as JSON errors."""
    answer = raw_answer(server, f"GET /ws HTTP/1.1\r\nHost: x\r\n{headers}\r\n".encode())
    assert_error(answer, status)


def test_websocket_upgrade_over_http_1_0_is_400(server) -> None:
    """RFC 6455 §4.1: the opening handshake is HTTP/1.1 (found by a
    newcomer's session: an HTTP/1.0 upgrade got 101); other paths still
    answer HTTP/1.0 requests that carry an Upgrade header."""
    head = upgrade_head().replace(b"GET /ws HTTP/1.1", b"GET /ws HTTP/1.0")
    assert_error(raw_answer(server, head), 400, "bad_request")
    status, _, _ = raw_answer(server, b"GET /health HTTP/1.0\r\nUpgrade: websocket\r\n\r\n")
    assert status == 200


def test_content_length_edge_forms(server) -> None:
    """docs/protocol.md, "POST /sessions": leading zeros are a valid Content-Length; identity
    coding is refused with 411."""
    body = session_body("ride-zeros")
    request = post(body, f"X-API-Key: {API_KEY}").replace(
        f"Content-Length: {len(body)}".encode(), f"Content-Length: 000000000{len(body)}".encode()
    )
    assert raw_answer(server, request)[0] == 200
    identity = post(body, f"X-API-Key: {API_KEY}", "Transfer-Encoding: identity")
    document = assert_error(raw_answer(server, identity), 411, "length_required")
    assert "Transfer-Encoding" in document["message"]


@pytest.mark.parametrize("method", ["PUT", "PATCH", "DELETE"])
def test_other_methods_without_length_are_405(server, method) -> None:
    """docs/protocol.md, "POST /sessions": other methods on /sessions get 405 with Allow,
    whatever their framing."""
    answer = raw_answer(server, f"{method} /sessions HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert_error(answer, 405)
    assert answer[1]["allow"] == "POST"


def test_huge_number_in_body_is_invalid_request(server) -> None:
    """docs/protocol.md, "POST /sessions": a 5000-digit number is valid JSON but not a string
    field: 400 invalid_request."""
    body = b'{"ride_id": ' + b"9" * 5000 + b', "driver_id": "d", "passenger_id": "p"}'
    answer = server.request("POST", "/sessions", body, {"X-API-Key": API_KEY})
    assert "ride_id" in assert_error(answer, 400, "invalid_request")["message"]


async def authenticated(server, ride_id: str) -> ClientConnection:
    """A websockets client authenticated as the driver of a new session."""
    ws, _ = await join(server, server.new_session(ride_id=ride_id), "driver-1")
    return ws


def queue_frames(ws: ClientConnection, kind: str, count: int) -> None:
    """Queue ``count`` frames of one kind on the client, written by the
    next ``send_data()``: unsolicited pongs, or one heartbeat message in
    ``count`` fragments (a text frame, then continuation frames), or pings."""
    if kind == "ping":
        for _ in range(count):
            ws.protocol.send_ping(b"x")
    elif kind == "pong":
        for _ in range(count):
            ws.protocol.send_pong(b"x")
    else:
        ws.protocol.send_text(b'{"type": "heartbeat"}', fin=False)
        for _ in range(count - 2):
            ws.protocol.send_continuation(b"", fin=False)
        ws.protocol.send_continuation(b"", fin=True)


@pytest.mark.parametrize("kind", ["ping", "pong", "continuation"])
def test_control_and_fragment_floods_are_rate_limited(server, kind) -> None:
    """docs/protocol.md, rule 7: every frame counts against the
    message rate: pings, unsolicited pongs and continuation fragments too
    (pongs and fragments were not counted: 300 pongs, or a heartbeat sent
    in 300 fragments, passed). 300 of them in a burst: error rate_limited,
    close 1008."""

    async def scenario() -> None:
        ws = await authenticated(server, f"ride-{kind}-flood")
        queue_frames(ws, kind, 300)
        ws.send_data()
        message = await recv_json(ws)
        assert message["type"] == "error" and message["code"] == "rate_limited", message
        with pytest.raises(Exception):  # noqa: B017 - ConnectionClosed of either kind
            while True:
                await asyncio.wait_for(ws.recv(), 5)
        assert ws.close_code == 1008

    asyncio.run(scenario())


def test_pongs_and_fragments_at_a_normal_rate_are_not_limited(server) -> None:
    """docs/protocol.md, rule 7: 30 unsolicited pongs and a heartbeat
    in 30 fragments, well within the burst of 100, are not limited; the
    fragmented heartbeat is answered, and the socket stays open."""

    async def scenario() -> None:
        ws = await authenticated(server, "ride-normal-rate")
        queue_frames(ws, "pong", 30)
        queue_frames(ws, "continuation", 30)
        ws.send_data()
        assert await recv_json(ws) == {"type": "pong"}
        await send_json(ws, {"type": "heartbeat"})
        assert await recv_json(ws) == {"type": "pong"}
        await ws.close()
        assert ws.close_code == 1000

    asyncio.run(scenario())


def test_frames_pipelined_behind_the_upgrade_are_handled(server) -> None:
    """RFC 6455 §4.1: a frame sent right behind the handshake request is not lost."""
    session = server.new_session(ride_id="ride-pipelined")
    payload = json.dumps(
        {"type": "authenticate", "session_id": session["session_id"], "user_id": "driver-1"}
    ).encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(upgrade_head() + client_frame(0x1, payload))
        data = b""
        while b"authenticated" not in data:
            chunk = sock.recv(4096)
            assert chunk, data
            data += chunk
    assert b'"user_id":"driver-1"' in data


def test_unusable_sqlite_path_exits_78(tmp_path) -> None:
    """docs/operations.md, "Configuration": a call-log file that cannot be opened is a
    configuration error (exit 78, one line)."""
    result = run_daemon(daemon_env(tmp_path, SQLITE_PATH=str(tmp_path / "missing-dir" / "calls.sqlite3")))
    assert result.returncode == 78, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "SQLITE_PATH" in lines[0], result.stderr
