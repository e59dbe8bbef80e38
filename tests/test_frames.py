"""The frame reader of the relay path (intaleq_signal/wire.py, ``frame_at``)
against the library's own parser, byte by byte: for every frame the
library reads, ``frame_at`` must find the same end and, for the frames it
reads itself, the same payload; for every frame the library refuses from
its header (not masked, over the size limit), it must hand it on unread.
And through a real connection object: a stream of frames cut anywhere
gives the engine the same messages as the library alone would."""

from __future__ import annotations

import asyncio
import functools
import os
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import PayloadTooBig, ProtocolError
from websockets.frames import Frame
from websockets.server import ServerProtocol
from websockets.streams import StreamReader

from intaleq_signal.wire import OTHER, PARTIAL, SIMPLE, UNREADABLE, HTTPServerConnection, frame_at

pytestmark = pytest.mark.compat

LIMIT = 300


def raw_frame(first: int, payload: bytes, *, masked: bool = True, wide: int = 0, key: bytes = b"") -> bytes:
    """A frame with any first byte (FIN, RSV, opcode), masked or not, and its
    length in the shortest form or, ``wide`` = 2 or 8, a longer one (which
    RFC 6455 §5.2 says not to send and the library still reads)."""
    size = len(payload)
    if wide == 8 or size >= 65536:
        length = bytes((127,)) + size.to_bytes(8, "big")
    elif wide == 2 or size >= 126:
        length = bytes((126,)) + size.to_bytes(2, "big")
    else:
        length = bytes((size,))
    if not masked:
        return bytes((first,)) + length + payload
    key = key or os.urandom(4)
    body = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    return bytes((first, 0x80 | length[0])) + length[1:] + key + body


def library_reads(data: bytes, limit: int) -> tuple[str, int, Any]:
    """What websockets' parser makes of the frame at the start of ``data``:
    ``("frame", bytes used, Frame)``, ``("partial", 0, None)`` or
    ``("refused", 0, exception)``."""
    reader = StreamReader()
    reader.feed_data(data)
    parser = Frame.parse(reader.read_exact, mask=True, max_size=limit, extensions=None)
    try:
        next(parser)
    except StopIteration as done:
        return "frame", len(data) - len(reader.buffer), done.value
    except (ProtocolError, PayloadTooBig) as exc:
        return "refused", 0, exc
    return "partial", 0, None


frames = st.builds(
    raw_frame,
    first=st.sampled_from([0x81, 0x81, 0x81, 0x01, 0x82, 0x80, 0x89, 0x8A, 0x88, 0xC1, 0x91, 0x83, 0x8B]),
    payload=st.binary(max_size=LIMIT + 20),
    masked=st.booleans().map(lambda b: b or os.urandom(1)[0] > 20),
    wide=st.sampled_from([0, 0, 2, 8]),
)


@settings(max_examples=200, deadline=None)
@given(frame=frames, trailing=st.binary(max_size=8))
def test_frame_at_agrees_with_the_library(frame: bytes, trailing: bytes) -> None:
    data = frame + trailing
    kind, mask, end = frame_at(data, 0, LIMIT)
    outcome, used, parsed = library_reads(data, LIMIT)
    if outcome == "refused" and kind == OTHER:
        # A whole frame the library refuses after its header (a bad opcode,
        # RSV bits, a control frame too long or fragmented): it is the
        # library's, read whole.
        assert not isinstance(parsed, PayloadTooBig)
        assert end == len(frame)
        return
    if outcome == "refused":
        assert kind == UNREADABLE, (kind, parsed)
        return
    assert outcome == "frame", outcome
    assert end == used == len(frame)
    if kind == SIMPLE:
        assert parsed.fin and parsed.opcode == 1 and not (parsed.rsv1 or parsed.rsv2 or parsed.rsv3)
        payload = bytes(b ^ data[mask + i % 4] for i, b in enumerate(data[mask + 4 : end]))
        assert payload == parsed.data
    else:
        assert kind == OTHER
        assert not (parsed.fin and parsed.opcode == 1) or parsed.rsv1 or parsed.rsv2 or parsed.rsv3


@settings(max_examples=200, deadline=None)
@given(frame=frames, cut=st.integers(0, 400))
def test_a_frame_cut_short_is_partial_or_unreadable(frame: bytes, cut: int) -> None:
    """Before its last byte, a frame is never taken for whole."""
    data = frame[: min(cut, len(frame) - 1)]
    kind, _, _ = frame_at(data, 0, LIMIT)
    outcome, _, parsed = library_reads(data, LIMIT)
    if kind == UNREADABLE:
        assert outcome == "refused", outcome
    else:
        assert kind == PARTIAL
        assert outcome in ("partial", "refused"), outcome


def test_frame_at_reads_from_an_offset_and_at_the_limit() -> None:
    first = raw_frame(0x81, b"a" * LIMIT)
    second = raw_frame(0x81, b"b" * (LIMIT + 1))
    kind, mask, end = frame_at(first + second, 0, LIMIT)
    assert (kind, end) == (SIMPLE, len(first))
    assert frame_at(first + second, end, LIMIT)[0] == UNREADABLE
    assert frame_at(first + second[:1], end, LIMIT)[0] == PARTIAL
    assert frame_at(raw_frame(0x81, b"x", masked=False), 0, LIMIT)[0] == UNREADABLE


class Transport(asyncio.Transport):
    """Records what the connection writes."""

    def __init__(self) -> None:
        super().__init__()
        self.written = bytearray()
        self.closing = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 1) if name == "peername" else default

    def write(self, data: Any) -> None:
        self.written += data

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = True

    def get_write_buffer_size(self) -> int:
        return 0

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        pass


class _Server:
    """What a connection asks of its server: a handler (the handshake is
    done by hand here)."""

    def __init__(self) -> None:
        self.handler_tasks: set[Any] = set()

    async def handler(self, connection: Any) -> None:
        pass

    def start_connection_handler(self, connection: Any) -> None:  # websockets < 15
        pass

    def is_serving(self) -> bool:
        return True


def open_connection(fast: bool) -> tuple[HTTPServerConnection, list[Any], Transport]:
    """An upgraded connection (OPEN, started) whose messages and other frames
    are recorded; ``fast=False`` makes it hand every chunk to the library."""
    protocol = ServerProtocol(max_size=LIMIT)
    connection = HTTPServerConnection(protocol, _Server(), close_timeout=10)
    transport = Transport()
    connection.connection_made(transport)
    connection.data_received(
        b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    protocol.send_response(protocol.accept(connection.request))
    protocol.data_to_send()
    transport.written.clear()
    seen: list[Any] = []
    connection.start(seen.append, lambda: seen.append("frame"), lambda: seen.append("closing"))
    # The handshake request went to the library without giving up the relay path.
    assert connection._limit == LIMIT
    if not fast:  # every chunk straight to the library's parser, as before wire.frame_at
        connection._receive = functools.partial(ServerConnection.data_received, connection)
    return connection, seen, transport


stream_frames = st.lists(
    st.one_of(
        st.builds(raw_frame, first=st.just(0x81), payload=st.text(max_size=40).map(str.encode)),
        st.builds(raw_frame, first=st.sampled_from([0x01, 0x00, 0x80]), payload=st.binary(max_size=10)),
        st.builds(raw_frame, first=st.sampled_from([0x89, 0x8A]), payload=st.binary(max_size=10)),
        st.builds(raw_frame, first=st.just(0x82), payload=st.binary(max_size=10)),
        st.builds(raw_frame, first=st.just(0x81), payload=st.just(b"x" * (LIMIT + 1))),
        st.builds(raw_frame, first=st.just(0x81), payload=st.just(b"y"), masked=st.just(False)),
        st.just(raw_frame(0x88, b"\x03\xe8")),
    ),
    max_size=12,
)


async def feed(fast: bool, pieces: list[bytes]) -> tuple[list[Any], Any, bytes]:
    """What a connection hands on, its state and what it wrote, after
    ``pieces`` arrive as separate chunks; ``fast=False``: the library alone."""
    connection, seen, transport = open_connection(fast)
    for piece in pieces:
        connection.data_received(piece)
    return seen, connection.protocol.state, bytes(transport.written)


@settings(max_examples=150, deadline=None)
@given(stream=stream_frames, cuts=st.lists(st.integers(0, 2000), max_size=6))
def test_a_stream_cut_anywhere_gives_what_the_library_gives(stream: list[bytes], cuts: list[int]) -> None:
    data = b"".join(stream)
    bounds = [0, *sorted({c for c in cuts if 0 < c < len(data)}), len(data)]
    pieces = [data[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
    assert asyncio.run(feed(True, pieces)) == asyncio.run(feed(False, pieces))


def test_nothing_is_handed_on_after_invalid_utf8() -> None:
    """RFC 6455 §8.1: invalid UTF-8 fails the connection (1007); the messages
    behind it in the same chunk are not handed on. (The library alone
    parses the whole chunk first and would still hand them on.)"""
    chunk = raw_frame(0x81, b"before") + raw_frame(0x81, b"\xff") + raw_frame(0x81, b"after")
    seen, state, written = asyncio.run(feed(True, [chunk]))
    assert seen == ["before", "closing"]
    assert state.name == "CLOSING"
    assert written.startswith(b"\x88") and written[2:4] == (1007).to_bytes(2, "big")


def test_a_close_frame_in_the_chunk_is_read_before_its_messages() -> None:
    """A chunk with a close frame goes to the library whole: it reads the
    close frame before handing the messages in front of it on, so they are
    handled on a connection already closing (docs/protocol.md: an
    authenticate that could not be answered joins nobody)."""
    chunk = raw_frame(0x81, b"auth") + raw_frame(0x88, b"\x03\xe8")

    async def run() -> tuple[list[Any], list[Any]]:
        connection, seen, _ = open_connection(True)
        states: list[Any] = []
        connection.on_message = lambda message: states.append((message, connection.protocol.state.name))
        connection.data_received(chunk)
        return states, seen

    states, seen = asyncio.run(run())
    assert states == [("auth", "CLOSING")]
    assert seen == ["frame", "closing"]


@pytest.mark.parametrize("size", [0, 125, 126, LIMIT])
def test_one_byte_at_a_time(size: int) -> None:
    frame = raw_frame(0x81, b"z" * size)

    async def run() -> list[Any]:
        connection, seen, _ = open_connection(True)
        for i in range(len(frame)):
            connection.data_received(frame[i : i + 1])
        return seen

    assert asyncio.run(run()) == ["z" * size]


@pytest.mark.parametrize("size", [1, 125, 126, 200, LIMIT, LIMIT + 1])
@pytest.mark.parametrize("wide", [0, 2, 8])
@pytest.mark.parametrize("masked", [True, False])
def test_one_frame_per_chunk(size: int, wide: int, masked: bool) -> None:
    """A chunk that is one frame (how most relayed messages arrive), in every
    length form, within and over the limit, masked or not."""
    frame = raw_frame(0x81, b"m" * size, wide=wide, masked=masked)
    assert asyncio.run(feed(True, [frame, frame])) == asyncio.run(feed(False, [frame, frame]))
