"""A participant is absent from the moment its socket stops being open for
sending — a close frame, a message too big (1009), invalid UTF-8 (1007), a
protocol error (1002), the TCP connection lost — not when the TCP teardown
ends, which takes up to CLOSE_TIMEOUT when the client keeps its TCP
connection open after the close frames (docs/protocol.md, rule 6). What the
other participant sends from that moment is held for it (up to 64 messages
/ 16 KiB, delivered in order when it comes back) or refused with
``peer_not_connected``: never dropped, and never counted in
``intaleq_messages_relayed_total`` unless it was written to an open socket
(docs/protocol.md, rule 4).

The daemon is stopped (SIGSTOP) while one participant's socket stops being
open and the other one sends: when it resumes, it finds both at once, in the
order they happened — the worst case, with no timing in the test.
"""

from __future__ import annotations

import contextlib
import json
import signal
import struct
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from conftest import RawWebSocket, auth_msg, client_frame, metric, wait_until
from intaleq_signal.sessions import HOLD_MAX_MESSAGES
from intaleq_signal.signaling import CLOSE_TIMEOUT

pytestmark = pytest.mark.compat

RELAYED = "intaleq_messages_relayed_total"
MAX_MESSAGE_BYTES = 4096  # the default (docs/operations.md, "Configuration")
CANDIDATE_LINE = "candidate:842163049 1 udp 1677729535 203.0.113.7 46154 typ srflx raddr 0.0.0.0 rport 0"
#: What the other participant sends once the socket stopped being open: an
#: offer and candidates, six more than the hold queue takes.
SENT = [{"type": "offer", "sdp": "v=0\r\no=- 7 2 IN IP4 127.0.0.1\r\n"}] + [
    {"type": "ice_candidate", "candidate": {"candidate": f"{CANDIDATE_LINE} generation {n}", "sdpMid": "0"}}
    for n in range(HOLD_MAX_MESSAGES + 5)
]


def daemon_side(server_port: int, client_port: int) -> tuple[str, int] | None:
    """The daemon's end of a loopback TCP connection in /proc/net/tcp: its
    state (``01`` established) and the bytes in its receive queue."""
    local, remote = f"0100007F:{server_port:04X}", f"0100007F:{client_port:04X}"
    with open("/proc/net/tcp") as table:
        for line in table:
            fields = line.split()
            if fields[1] == local and fields[2] == remote:
                return fields[3], int(fields[4].split(":")[1], 16)
    return None


def arrived(server: Any, raw: RawWebSocket) -> bool:
    """Whether what ``raw`` did reached the daemon's socket: bytes waiting
    to be read, or the connection no longer established (a RST or FIN)."""
    side = daemon_side(server.port, raw.port)
    return side is None or side[0] != "01" or side[1] > 0


@contextlib.contextmanager
def frozen(server: Any) -> Iterator[None]:
    """The daemon stopped for the block: what clients send meanwhile waits
    in its sockets and is seen at once, in the order it arrived, when it
    resumes."""
    server.proc.send_signal(signal.SIGSTOP)
    try:
        yield
    finally:
        server.proc.send_signal(signal.SIGCONT)


#: A close frame (code 1000).
CLOSE_FRAME = client_frame(0x8, struct.pack("!H", 1000))


#: How the passenger's socket stops being open. The ``kept_open`` ways keep
#: the TCP connection open afterwards (the daemon aborts it CLOSE_TIMEOUT
#: later).
WAYS: dict[str, Callable[[RawWebSocket], None]] = {
    "close_frame_kept_open": lambda raw: raw.send_close(1000),
    "too_big_kept_open": lambda raw: raw.send_json({"type": "offer", "sdp": "a" * MAX_MESSAGE_BYTES}),
    "invalid_utf8_kept_open": lambda raw: raw.send_frame(0x1, b'{"type": "heartbeat", "x": "\xff"}'),
    "protocol_error_kept_open": lambda raw: raw.send_frame(0x1, b'{"type": "heartbeat"}', masked=False),
    "tcp_reset": RawWebSocket.reset,
    "tcp_closed_without_close_frame": RawWebSocket.close,
}


def pair(server: Any, session: dict[str, Any]) -> tuple[RawWebSocket, RawWebSocket]:
    """Both participants joined and told of each other: the call is active."""
    driver = RawWebSocket(server)
    driver.join(session, "driver-1")
    passenger = RawWebSocket(server)
    passenger.join(session, "passenger-1")
    assert driver.text() == {"type": "participant_joined", "role": "passenger"}
    assert passenger.text() == {"type": "participant_joined", "role": "driver"}
    return driver, passenger


def until_pong(raw: RawWebSocket) -> list[dict[str, Any]]:
    """Send a heartbeat; every message received before its pong."""
    raw.send_json({"type": "heartbeat"})
    before = []
    while (message := raw.text()) != {"type": "pong"}:
        before.append(message)
    return before


def end_call(driver: RawWebSocket, passenger: RawWebSocket) -> None:
    driver.send_json({"type": "end_call"})
    ended = {"type": "call_ended", "reason": "user_terminated"}
    assert driver.closing() == ([ended], 1000)
    assert passenger.closing() == ([ended], 1000)


@pytest.mark.parametrize("way", list(WAYS))
def test_closing_socket_is_absent_at_once(server_factory, way: str) -> None:
    """The passenger's socket stops being open (``way``) and, at the same
    moment, the driver sends 70 messages: the driver is told
    participant_left before anything else (the old daemon kept the
    passenger present until the TCP teardown, up to CLOSE_TIMEOUT, and
    dropped what it relayed meanwhile, counted as relayed); the first 64
    are held and reach the passenger, in order, when it reconnects; each of
    the 6 others gets peer_not_connected; the relayed counter counts what
    was written to a socket. Events/messages lost: 0 of 70."""
    server = server_factory(RECONNECT_GRACE="30s")
    session = server.new_session()
    driver, passenger = pair(server, session)
    offer = {"type": "offer", "sdp": "v=0\r\nfirst"}
    driver.send_json(offer)
    assert passenger.text() == offer
    answer = {"type": "answer", "sdp": "v=0\r\nfirst answer"}
    passenger.send_json(answer)
    assert driver.text() == answer
    assert metric(server, RELAYED) == 2

    with frozen(server):
        WAYS[way](passenger)
        wait_until(lambda: arrived(server, passenger), timeout=10, step=0.01)
        for message in SENT:
            driver.send_json(message)
        resumed = time.monotonic()
    assert driver.text() == {"type": "participant_left", "role": "passenger"}
    # CLOSE_TIMEOUT is when the old daemon told it, for the kept_open ways.
    assert time.monotonic() - resumed < CLOSE_TIMEOUT
    refused = [driver.text() for _ in SENT[HOLD_MAX_MESSAGES:]]
    assert [m.get("code") for m in refused] == ["peer_not_connected"] * len(refused), refused
    assert until_pong(driver) == []
    assert metric(server, RELAYED) == 2  # nothing written to the passenger yet

    back = RawWebSocket(server)
    back.join(session, "passenger-1")
    assert back.text() == {"type": "participant_joined", "role": "driver"}
    assert [back.text() for _ in SENT[:HOLD_MAX_MESSAGES]] == SENT[:HOLD_MAX_MESSAGES]
    assert until_pong(back) == []
    assert driver.text() == {"type": "participant_joined", "role": "passenger"}
    assert metric(server, RELAYED) == 2 + HOLD_MAX_MESSAGES
    end_call(driver, back)
    left = f"participant left session={session['session_id']} role=passenger"
    server.wait_for_log(left)  # stderr is read by a thread of the test: it may lag under load
    assert server.log.count(left) == 1
    for raw in (driver, passenger, back):
        raw.close()


def test_authenticate_and_close_frame_in_one_chunk_keep_the_held_messages(server_factory) -> None:
    """A participant that comes back with its authenticate and a close frame
    in one TCP chunk is closed before its authenticate is handled: it never
    joins (it could not be told), and what was held for it stays held for
    its next connection (the old daemon flushed the held messages to the
    closing socket, where they were dropped)."""
    server = server_factory(RECONNECT_GRACE="30s")
    session = server.new_session()
    driver, passenger = pair(server, session)
    passenger.send_close(1000)
    assert passenger.closing() == ([], 1000)
    assert driver.text() == {"type": "participant_left", "role": "passenger"}
    held = SENT[:3]
    for message in held:
        driver.send_json(message)
    assert until_pong(driver) == []  # held, not refused

    closing = RawWebSocket(server)
    closing.send(client_frame(0x1, json.dumps(auth_msg(session, "passenger-1")).encode()) + CLOSE_FRAME)
    # The daemon's close frame is written while that chunk is handled: by
    # the time the heartbeat below is read, its authenticate was handled.
    assert closing.closing() == ([], 1000)
    closing.close()
    assert until_pong(driver) == []  # neither participant_joined nor participant_left
    assert metric(server, RELAYED) == 0

    back = RawWebSocket(server)
    back.join(session, "passenger-1")
    assert [back.text() for _ in range(1 + len(held))] == [
        {"type": "participant_joined", "role": "driver"},
        *held,
    ]
    assert driver.text() == {"type": "participant_joined", "role": "passenger"}
    assert metric(server, RELAYED) == len(held)
    end_call(driver, back)
    server.wait_for_log(f"participant gone before joining session={session['session_id']} role=passenger")
    for raw in (driver, passenger, back):
        raw.close()


def test_closing_socket_replaces_nobody(server_factory) -> None:
    """An authenticate followed by a close frame in the same TCP chunk does
    not take the seat from the participant's live socket (the old daemon
    closed the live one with 4002 for a socket that was already closing,
    and the call lost the participant)."""
    server = server_factory(RECONNECT_GRACE="30s")
    session = server.new_session()
    driver, passenger = pair(server, session)
    closing = RawWebSocket(server)
    closing.send(client_frame(0x1, json.dumps(auth_msg(session, "passenger-1")).encode()) + CLOSE_FRAME)
    assert closing.closing() == ([], 1000)  # written while its chunk was handled
    closing.close()
    assert until_pong(passenger) == []  # not replaced
    assert until_pong(driver) == []
    offer = {"type": "offer", "sdp": "v=0\r\nstill here"}
    driver.send_json(offer)
    assert passenger.text() == offer
    end_call(driver, passenger)
    for raw in (driver, passenger):
        raw.close()
