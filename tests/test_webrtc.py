"""Real WebRTC calls through the real daemon.

Two libwebrtc endpoints (two pages of headless Chromium, driven with
Playwright) run the reference web client, ``clients/web/intaleq-call.js``,
written the way docs/protocol.md tells app developers to: trickle ICE, wait
for ``participant_joined``, the driver offers and the passenger answers,
heartbeats, reconnect with backoff and re-offer with an ICE restart,
``media_state`` reports. Each page is ``tests/webrtc/call.html``, a thin
harness that imports the module as the repository has it (both served by
this module's HTTP server), starts a call with it and records what goes on
the wire; the test waits for what it must see and reads those records.
A second pairing puts aiortc (a different WebRTC stack, driven from Python with
the websockets client) against Chromium.

A call passes when both RTCPeerConnections reach ``connected``, audio packets
keep arriving (inbound-rtp ``packetsReceived`` read twice a second apart), and
``end_call`` brings ``call_ended`` ``user_terminated`` to both sides. Each test
prints (``pytest -s``) and logs the figures the README quotes: first offer sent
→ ``connected``, and the bytes on the wire of offers, answers and candidates.

One Chromium serves every test of the module (a fresh browser context
each), in one event loop.

Media stays on this machine: the page signals only its 127.0.0.1/::1
candidates and aiortc is made to gather on 127.0.0.1 only (libwebrtc may
still send its checks and media to them from a socket on another address of
this host, which the kernel delivers locally).

Needs Debian's Chromium at /usr/bin/chromium (``apt-get install chromium``)
and the PyPI packages ``playwright`` and ``aiortc`` (never ``playwright
install``: the system Chromium is used). Without Chromium every test here is
skipped, saying so.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import datetime
import http.server
import importlib.util
import json
import logging
import math
import os
import re
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest

from conftest import ROOT, ServerProcess, authenticate, send_json, wait_until
from coturn import needs_coturn

try:
    from playwright import async_api as playwright_api
except ImportError:  # pragma: no cover - skipped below, with the reason
    playwright_api = None

CHROMIUM = "/usr/bin/chromium"
#: The harness page, and what the HTTP server serves from the repository:
#: the page and the reference client it imports, clients/web/intaleq-call.js.
CALL_PAGE = "tests/webrtc/call.html"
SERVED = ("clients/web/", "tests/webrtc/")
HAVE_AIORTC = importlib.util.find_spec("aiortc") is not None

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)),
        reason=f"real WebRTC tests need Debian's Chromium at {CHROMIUM}, which is missing: "
        "install it with `apt-get install chromium`",
    ),
    pytest.mark.skipif(
        playwright_api is None,
        reason="real WebRTC tests need the PyPI package playwright (pip install -e '.[test]'); "
        "the browser is Debian's Chromium: never `playwright install`",
    ),
]

log = logging.getLogger("test_webrtc")

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--use-fake-device-for-media-stream",
    "--use-fake-ui-for-media-stream",
    "--disable-background-networking",
    "--allow-loopback-in-peer-connection",
    "--disable-features=WebRtcHideLocalIpsWithMdns",
    "--no-first-run",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
    "--autoplay-policy=no-user-gesture-required",
    "--disable-background-timer-throttling",
    "--disable-renderer-backgrounding",
    "--disable-backgrounding-occluded-windows",
]

CONNECT_TIMEOUT = 30.0  # s, for ICE + DTLS on a loaded 2-core machine
SIGNAL_TIMEOUT = 15.0  # s, for a signaling round trip

RELAYED = ("offer", "answer", "ice_candidate")
MEDIA_STATES = {"connecting", "connected", "disconnected", "failed"}
GREETING = ("authenticated", "session_joined", "participant_joined")
#: The page got call_ended user_terminated and its current socket closed with 1000.
ENDED_JS = (
    "() => call.received.some(m => m.type === 'call_ended' && m.msg.reason === 'user_terminated')"
    " && call.closes.length === call.sockets && call.closes.at(-1).code === 1000"
)


# -- reporting ---------------------------------------------------------------


def report(request: pytest.FixtureRequest, figures: dict[str, Any]) -> None:
    """Print (``pytest -s``), log and attach the measured figures, before any
    assertion on them can stop the test."""
    line = f"[webrtc] {request.node.name}: {json.dumps(figures, sort_keys=True)}"
    print(line)
    log.info(line)
    for key, value in figures.items():
        request.node.user_properties.append((key, value))


def wire_sizes(sent: list[dict[str, Any]]) -> dict[str, Any]:
    """Byte sizes of what one endpoint put on the wire, by kind."""
    offers = [m["bytes"] for m in sent if m["type"] == "offer"]
    answers = [m["bytes"] for m in sent if m["type"] == "answer"]
    real = [
        m["bytes"]
        for m in sent
        if m["type"] == "ice_candidate" and m["msg"]["candidate"] and m["msg"]["candidate"]["candidate"]
    ]
    ends = [
        m["bytes"]
        for m in sent
        if m["type"] == "ice_candidate"
        and (m["msg"]["candidate"] is None or m["msg"]["candidate"]["candidate"] == "")
    ]
    return {"offer_bytes": offers, "answer_bytes": answers, "candidate_bytes": real, "end_marker_bytes": ends}


# -- Chromium ----------------------------------------------------------------


class _Files(http.server.SimpleHTTPRequestHandler):
    """The harness page and the client, straight from the repository (GET
    only, nothing outside :data:`SERVED`)."""

    extensions_map = {".js": "text/javascript", ".html": "text/html"}

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, directory=str(ROOT), **kwargs)

    def send_head(self) -> Any:
        if not self.path.split("?", 1)[0].lstrip("/").startswith(SERVED):
            self.send_error(404)
            return None
        return super().send_head()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        pass


class Browser:
    """One headless Debian Chromium for the whole module, the event loop its
    Playwright lives in (:meth:`run` runs a test's scenario there), and the
    HTTP server of the harness page (:attr:`base`)."""

    def __init__(self) -> None:
        self.files = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Files)
        threading.Thread(target=self.files.serve_forever, daemon=True).start()
        self.base = f"http://127.0.0.1:{self.files.server_address[1]}/"
        self.loop = asyncio.new_event_loop()
        self.playwright = self.run(playwright_api.async_playwright().start())
        self.browser = self.run(
            self.playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        )

    def run(self, coroutine: Awaitable[Any]) -> Any:
        return self.loop.run_until_complete(coroutine)

    @contextlib.asynccontextmanager
    async def context(self) -> AsyncIterator[Any]:
        """A fresh browser context (its own pages, nothing shared with the
        previous test's)."""
        context = await self.browser.new_context(base_url=self.base)
        try:
            yield context
        finally:
            await context.close()

    def close(self) -> None:
        try:
            self.run(self.browser.close())
            self.run(self.playwright.stop())
        finally:
            self.loop.close()
            self.files.shutdown()
            self.files.server_close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    shared = Browser()
    try:
        yield shared
    finally:
        shared.close()


class CallPage:
    """One endpoint: a page running the reference client in ``call.html``,
    and ways to read it."""

    def __init__(self, page: Any, name: str) -> None:
        self.page = page
        self.name = name
        self.console: list[str] = []
        page.on("console", lambda m: self.console.append(f"{m.type}: {m.text}"))
        page.on("pageerror", lambda e: self.console.append(f"pageerror: {e}"))
        page.on("requestfailed", lambda r: self.console.append(f"request failed: {r.url} {r.failure}"))
        page.on("response", lambda r: r.ok or self.console.append(f"HTTP {r.status}: {r.url}"))

    @classmethod
    async def open(
        cls, context: Any, server: ServerProcess, session: dict[str, Any], user_id: str, **options: Any
    ) -> CallPage:
        """The client authenticates with the participant token of
        ``user_id``'s role (``driver-…`` or ``passenger-…``). ``options``: more
        of the harness's settings: ``iceTransportPolicy``, ``wsUrl`` (another
        way to the daemon), ``tamperFingerprint``, ``client`` (more options of
        the client: heartbeat and backoff)."""
        role = "driver" if user_id.startswith("driver") else "passenger"
        page = cls(await context.new_page(), user_id)
        await page.page.goto(CALL_PAGE)  # from the context's base_url
        if not await page.js("() => 'call' in window"):
            # The page or the module did not arrive from the HTTP server (seen
            # once under a heavy load): say so, and load it once more.
            line = f"[webrtc] {user_id}: the harness did not load, loading it again: {page.console}"
            print(line)
            log.warning(line)
            await page.page.reload()
            if not await page.js("() => 'call' in window"):
                raise AssertionError(f"{user_id}: the harness did not load: {page.console}")
        await page.page.evaluate(
            "cfg => call.start(cfg)",
            {
                "wsUrl": f"ws://127.0.0.1:{server.port}/ws",
                "sessionId": session["session_id"],
                "userId": user_id,
                "token": session[f"{role}_token"],
                **options,
            },
        )
        return page

    async def js(self, expression: str, arg: Any = None) -> Any:
        return await self.page.evaluate(expression, arg)

    async def snapshot(self) -> dict[str, Any]:
        return await self.js("() => call.snapshot()")

    async def diagnostics(self) -> str:
        try:
            snap = await self.snapshot()
            text = await self.js("() => document.getElementById('log').textContent")
        except Exception as exc:  # noqa: BLE001 - a diagnostic must not hide the failure
            return f"{self.name}: page unreadable ({exc})"
        brief = {k: snap[k] for k in ("role", "connectionState", "signalingState", "errors", "closes")}
        brief["received"] = [m["type"] for m in snap["received"]]
        brief["sent"] = [m["type"] for m in snap["sent"]]
        brief["attempts"] = len(snap["attempts"])
        return f"--- {self.name}: {json.dumps(brief)}\n{text}\nconsole: {self.console}"

    async def wait(self, expression: str, what: str, timeout: float, *others: CallPage) -> None:
        """Poll ``expression`` in the page until it is truthy."""
        try:
            await self.page.wait_for_function(expression, timeout=timeout * 1000, polling=100)
        except playwright_api.TimeoutError:
            details = [await p.diagnostics() for p in (self, *others)]
            raise AssertionError(
                f"{self.name}: not {what} within {timeout}s\n" + "\n".join(details)
            ) from None

    async def wait_received(self, kind: str, count: int = 1, timeout: float = SIGNAL_TIMEOUT) -> None:
        await self.wait(
            f"() => call.received.filter(m => m.type === {json.dumps(kind)}).length >= {count}",
            f"{count}x {kind} received",
            timeout,
        )

    async def wait_connected(self, timeout: float = CONNECT_TIMEOUT, *others: CallPage) -> None:
        await self.wait(
            "() => call.pc && call.pc.connectionState === 'connected'", "connected", timeout, *others
        )

    async def inbound_audio(self) -> dict[str, Any]:
        return await self.js("() => call.inboundAudio()")

    async def selected_path(self) -> dict[str, Any] | None:
        return await self.js("() => call.selectedPath()")


async def eventually(
    probe: Callable[[], Awaitable[Any]], what: str, timeout: float, diag: Callable[[], Awaitable[str]]
) -> Any:
    """Poll ``probe`` until it returns something truthy."""
    deadline = time.monotonic() + timeout
    while True:
        value = await probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not {what} within {timeout}s\n{await diag()}")
        await asyncio.sleep(0.1)


async def packets_growing(
    read: Callable[[], Awaitable[int]], what: str, diag: Callable[[], Awaitable[str]]
) -> tuple[int, int]:
    """Audio packets received, read twice a second apart: ``(first, second)``
    with ``second > first > 0`` asserted."""
    await eventually(read, f"{what}: first audio packet", CONNECT_TIMEOUT, diag)
    first = await read()
    await asyncio.sleep(1.0)
    second = await read()
    assert second > first > 0, f"{what}: packetsReceived {first} then {second}\n{await diag()}"
    return first, second


def call_start_to_connected_ms(snap: dict[str, Any]) -> float | None:
    """The page's first participant_joined (the call starts) to its first
    ``connected``, in ms."""
    joined = next(m["t"] for m in snap["received"] if m["type"] == "participant_joined")
    return round(snap["connectedAt"] - joined, 1) if snap["connectedAt"] else None


def media_reports(snap: dict[str, Any]) -> list[dict[str, Any]]:
    """The media_state messages a page sent."""
    return [m["msg"] for m in snap["sent"] if m["type"] == "media_state"]


def reconnect_to_rejoined_ms(snap: dict[str, Any]) -> float:
    """The page's last connection attempt (the one that went through) to the
    participant_joined it brought, in ms."""
    rejoined = [m["t"] for m in snap["received"] if m["type"] == "participant_joined"][-1]
    return round(rejoined - snap["attempts"][-1]["t"], 1)


def check_media_reports(snap: dict[str, Any], candidate: str) -> None:
    """docs/protocol.md, "media_state": the page reported its connection
    state as it changed — ``connecting``, then ``connected`` with the
    selected pair's local candidate type and round-trip time."""
    reports = media_reports(snap)
    states = [r["state"] for r in reports]
    assert states[:2] == ["connecting", "connected"] and set(states) <= MEDIA_STATES, reports
    connected = reports[1]
    assert connected["candidate_type"] == candidate, reports
    assert 0 <= connected.get("rtt_ms", 0) <= 60000, reports
    assert all(set(r) <= {"type", "state", "candidate_type", "rtt_ms"} for r in reports), reports


def media_columns(row: dict[str, Any]) -> dict[str, Any]:
    """The call log's media columns of a call, with call start (``connected_at``)
    to ``media_connected_at`` in ms."""
    moment = datetime.datetime.fromisoformat
    figures = {key: row[key] for key in ("driver_candidate", "passenger_candidate", "media_failures")}
    figures["media_connected"] = row["media_connected_at"] is not None
    if row["media_connected_at"] and row["connected_at"]:
        delta = moment(row["media_connected_at"]) - moment(row["connected_at"])
        figures["call_start_to_media_connected_ms"] = round(delta.total_seconds() * 1000, 1)
    return figures


def relayed(records: list[dict[str, Any]]) -> list[Any]:
    return [m["msg"] for m in records if m["type"] in RELAYED]


def ufrag(sdp: str) -> str | None:
    match = re.search(r"^a=ice-ufrag:(\S+)", sdp, re.M)
    return match.group(1) if match else None


async def both(a: CallPage, b: CallPage) -> str:
    return (await a.diagnostics()) + "\n" + (await b.diagnostics())


def on_loopback(path: dict[str, Any] | None) -> bool:
    """The media runs between host candidates, towards one of the loopback
    candidates signalled. (libwebrtc also checks from its sockets on this
    machine's other addresses, so the local end, and a peer-reflexive remote
    end, whose address the stats redact to "", may be such an address: all of
    it stays inside this machine's kernel.)"""
    if not path or not path["local"] or not path["remote"]:
        return False
    local_type = path["local"].split()[-1]
    remote_address, remote_type = path["remote"].split()[1].rsplit(":", 1)[0], path["remote"].split()[-1]
    return local_type == "host" and (
        (remote_type == "host" and remote_address in ("127.0.0.1", "::1")) or remote_type == "prflx"
    )


def check_trickled(sent: list[dict[str, Any]], who: str) -> None:
    """Trickle ICE: no SDP this page sent embeds a candidate; candidates went
    one per message, each generation closed by "" and gathering by null."""
    for m in sent:
        if m["type"] in ("offer", "answer"):
            assert "a=candidate" not in m["msg"]["sdp"], f"{who} embedded candidates in its {m['type']}"
    candidates = [m["msg"]["candidate"] for m in sent if m["type"] == "ice_candidate"]
    assert any(c and c["candidate"] for c in candidates), f"{who} trickled no candidate"
    assert any(c and c["candidate"] == "" for c in candidates), f"{who} sent no end-of-generation"
    assert candidates[-1] is None, f"{who} did not end with the null end-of-candidates"


# -- Chromium <-> Chromium ----------------------------------------------------


async def start_chromium_call(
    context: Any, server: ServerProcess, session: dict[str, Any], **options: Any
) -> tuple[CallPage, CallPage]:
    """Both pages up (with ``options``, see :meth:`CallPage.open`) and the
    call connected both ways."""
    driver = await CallPage.open(context, server, session, "driver-1", **options)
    passenger = await CallPage.open(context, server, session, "passenger-1", **options)
    await driver.wait_connected(CONNECT_TIMEOUT, passenger)
    await passenger.wait_connected(CONNECT_TIMEOUT, driver)
    return driver, passenger


async def audio_both_ways(driver: CallPage, passenger: CallPage) -> dict[str, Any]:
    """Audio packets keep arriving at both pages (both read in the same second)."""

    async def diag() -> str:
        return await both(driver, passenger)

    async def packets(page: CallPage) -> int:
        return (await page.inbound_audio())["packetsReceived"]

    at_passenger, at_driver = await asyncio.gather(
        packets_growing(lambda: packets(passenger), "passenger receiving driver", diag),
        packets_growing(lambda: packets(driver), "driver receiving passenger", diag),
    )
    return {"passenger_packets": at_passenger, "driver_packets": at_driver}


async def on_restarted_ice_session(driver: CallPage, passenger: CallPage) -> None:
    """Both transports run on the ICE session of the latest descriptions
    (after an ICE restart: new ufrags)."""
    for page, other in ((driver, passenger), (passenger, driver)):
        await page.wait(
            "async () => { const p = await call.selectedPath();"
            " return p && p.iceLocalUsernameFragment === p.localDescriptionUfrag; }",
            "on the restarted ICE session",
            CONNECT_TIMEOUT,
            other,
        )


async def end_call(ender: CallPage, other: CallPage) -> None:
    await ender.js("() => call.endCall()")
    for page in (ender, other):
        await page.wait(
            ENDED_JS,
            "call_ended user_terminated and close 1000",
            SIGNAL_TIMEOUT,
            ender if page is other else other,
        )


def test_chromium_to_chromium_call(server_factory, browser, request) -> None:
    server = server_factory()
    session = server.new_session(ride_id="ride-webrtc")

    async def scenario() -> None:
        async with browser.context() as context:
            driver, passenger = await start_chromium_call(context, server, session)
            audio = await audio_both_ways(driver, passenger)
            energy = [(await page.inbound_audio())["totalAudioEnergy"] for page in (driver, passenger)]
            path = await passenger.selected_path()
            await end_call(passenger, driver)
            d, p = await driver.snapshot(), await passenger.snapshot()

        figures = {
            "first_offer_to_driver_connected_ms": round(d["connectedAt"] - d["firstOfferSentAt"], 1),
            "first_offer_to_passenger_connected_ms": round(p["connectedAt"] - d["firstOfferSentAt"], 1),
            "call_start_to_connected_ms": [call_start_to_connected_ms(d), call_start_to_connected_ms(p)],
            "media_state_sent": [media_reports(d), media_reports(p)],
            "driver_sent": wire_sizes(d["sent"]),
            "passenger_sent": wire_sizes(p["sent"]),
            "candidates_gathered_signalled": [
                (len(s["gathered"]), len(s["gathered"]) - len(s["skipped"])) for s in (d, p)
            ],
            "candidate_example": next(m["text"] for m in d["sent"] if m["type"] == "ice_candidate"),
            "sdp_with_all_candidates_embedded": [d["embedded"], p["embedded"]],
            "total_audio_energy": energy,
            "media_path": path,
            "session_joined_bytes": [session_joined_bytes(d), session_joined_bytes(p)],
            **audio,
        }
        report(request, figures)

        assert d["errors"] == [] and p["errors"] == [], (d["errors"], p["errors"])
        # docs/protocol.md, "The flow of a call": the driver offers after participant_joined,
        # the passenger answers.
        assert [m["type"] for m in d["sent"] if m["type"] in ("offer", "answer")] == ["offer"]
        assert [m["type"] for m in p["sent"] if m["type"] in ("offer", "answer")] == ["answer"]
        first_offer = next(m for m in d["sent"] if m["type"] == "offer")
        assert any(m["type"] == "participant_joined" and m["t"] <= first_offer["t"] for m in d["received"])
        check_trickled(d["sent"], "driver")
        check_trickled(p["sent"], "passenger")
        # Relayed as given, in order, both ways, including the "" and null forms.
        assert relayed(p["received"]) == relayed(d["sent"])
        assert relayed(d["received"]) == relayed(p["sent"])
        assert on_loopback(path), path
        assert all(e > 0 for e in energy), f"decoded only silence: totalAudioEnergy {energy}"
        check_media_reports(d, "host")
        check_media_reports(p, "host")

    browser.run(scenario())
    assert server.stop() == 0
    [row] = server.call_logs()
    report(request, media_columns(row))
    assert (row["status"], row["end_reason"], row["initiated_by"]) == ("ended", "user_terminated", "driver-1")
    # Which calls really connected: both reported connected, over host candidates (loopback).
    assert row["media_connected_at"] is not None and row["media_connected_at"] >= row["connected_at"], row
    assert (row["driver_candidate"], row["passenger_candidate"], row["media_failures"]) == ("host", "host", 0)


class SignalingLink:
    """A TCP link between one page and the daemon that the test can break
    as a mobile network breaks. :meth:`lose`: the daemon's end of every
    connection is closed (the daemon sees the participant leave, as it would
    after its heartbeat timeout), the page's end stays open but silent —
    nothing it sends arrives, nothing comes back, so only the client's own
    heartbeat can tell — and new connections are refused (closed at once).
    :meth:`heal`: the page's dead connections are reset (its close frame
    reaching a server that forgot it) and new ones go through again."""

    def __init__(self, daemon_port: int) -> None:
        self.daemon_port = daemon_port
        self.down = False
        self.refused: list[float] = []  # when each connection was refused (monotonic)
        self.links: list[dict[str, Any]] = []
        self.server: Any = None

    async def start(self) -> SignalingLink:
        self.server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.url = f"ws://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/ws"
        return self

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.down:
            self.refused.append(time.monotonic())
            writer.transport.abort()
            return
        daemon_reader, daemon_writer = await asyncio.open_connection("127.0.0.1", self.daemon_port)
        link = {"page": writer, "daemon": daemon_writer, "lost": False}
        self.links.append(link)
        await asyncio.gather(self._pump(reader, daemon_writer, link), self._pump(daemon_reader, writer, link))

    @staticmethod
    async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, link: dict[str, Any]) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await reader.read(65536):
                if not link["lost"]:
                    writer.write(data)
                    await writer.drain()
        if not link["lost"]:
            writer.close()

    def lose(self) -> None:
        self.down = True
        for link in self.links:
            link["lost"] = True
            link["daemon"].transport.abort()

    def heal(self) -> None:
        self.down = False
        for link in self.links:
            if link["lost"]:
                link["page"].transport.abort()

    async def close(self) -> None:
        for link in self.links:
            for end in ("page", "daemon"):
                link[end].transport.abort()
        self.server.close()
        await self.server.wait_closed()


#: The driver's client in the network-loss test: a heartbeat every second,
#: the socket given up after 2 s of silence, retries after 100–200 ms, then
#: 200–400 ms, 400–800 ms, …
QUICK_CLIENT = {"heartbeatInterval": 1000, "heartbeatTimeout": 2000, "reconnectDelay": 200}


def backoff_checked(events: list[dict[str, Any]], base: float, cap: float = 5000) -> list[float]:
    """The delays (ms) of the client's reconnect attempts, each checked to be
    its attempt's exponential step with jitter: in [0.5, 1) x min(cap, base x 2^n)."""
    planned = [
        e["detail"] for e in events if e["type"] == "signaling" and e["detail"]["state"] == "reconnecting"
    ]
    for n, step in enumerate(planned):
        nominal = min(cap, base * 2 ** step["attempt"])
        assert step["attempt"] == n and 0.5 * nominal <= step["delay"] < nominal, planned
    return [round(step["delay"]) for step in planned]


def test_chromium_reconnect_with_ice_restart(server_factory, browser, request) -> None:
    """docs/protocol.md, "Reconnect and ICE restart": the driver's network is
    lost under a live call (:class:`SignalingLink`): the daemon sees it
    leave, the driver's socket goes silent. The audio goes on peer to peer;
    the client notices by its heartbeat, keeps its RTCPeerConnection, and
    retries with jittered exponential backoff while the network is down;
    once it is back, the next attempt re-authenticates, the driver re-offers
    with an ICE restart, and the call goes on, connected, on the new ICE
    session."""
    server = server_factory(RECONNECT_GRACE="10s")
    session = server.new_session(ride_id="ride-webrtc-reconnect")

    async def scenario() -> None:
        link = await SignalingLink(server.port).start()
        try:
            async with browser.context() as context:
                driver = await CallPage.open(
                    context, server, session, "driver-1", wsUrl=link.url, client=QUICK_CLIENT
                )
                passenger = await CallPage.open(context, server, session, "passenger-1")
                await driver.wait_connected(CONNECT_TIMEOUT, passenger)
                await passenger.wait_connected(CONNECT_TIMEOUT, driver)
                await audio_both_ways(driver, passenger)
                path_before = await driver.selected_path()

                # The driver's network goes; its RTCPeerConnection stays.
                lost_at = time.monotonic()
                link.lose()
                await passenger.wait_received("participant_left")
                # The audio is peer-to-peer: it goes on while signaling is down.
                down = [(await passenger.inbound_audio())["packetsReceived"]]
                # The driver's heartbeat gets no pong: the socket is given up,
                # and the attempts to reconnect fail, spaced by the backoff.
                await driver.wait(
                    "() => call.signaling('lost').length === 1", "heartbeat failed", SIGNAL_TIMEOUT
                )
                noticed_s = time.monotonic() - lost_at

                async def refused_twice() -> bool:
                    return len(link.refused) >= 2

                await eventually(
                    refused_twice, "2 attempts refused", SIGNAL_TIMEOUT, lambda: both(driver, passenger)
                )
                down.append((await passenger.inbound_audio())["packetsReceived"])

                # The network is back within RECONNECT_GRACE: the next attempt
                # authenticates again, and on participant_joined the driver
                # re-offers with an ICE restart.
                started = time.monotonic()
                link.heal()
                await driver.wait_received("participant_joined", 2)
                rejoined_ms = (time.monotonic() - started) * 1000
                await passenger.wait_received("participant_joined", 2)
                await driver.wait_received("answer", 2)
                await on_restarted_ice_session(driver, passenger)
                await driver.wait_connected(CONNECT_TIMEOUT, passenger)
                await passenger.wait_connected(CONNECT_TIMEOUT, driver)
                audio = await audio_both_ways(driver, passenger)
                path_after = await driver.selected_path()
                await end_call(driver, passenger)
                d, p = await driver.snapshot(), await passenger.snapshot()
        finally:
            await link.close()

        offers = [m for m in d["sent"] if m["type"] == "offer"]
        answers = [m for m in p["sent"] if m["type"] == "answer"]
        restart_answered = [
            m["t"] for m in d["received"] if m["type"] == "answer" and m["t"] > offers[-1]["t"]
        ]
        figures = {
            "network_lost_to_heartbeat_failed_s": round(noticed_s, 2),
            "attempts_refused_while_down": len(link.refused),
            "backoff_delays_ms": [
                round(e["detail"]["delay"])
                for e in d["events"]
                if e["type"] == "signaling" and e["detail"]["state"] == "reconnecting"
            ],
            "network_back_to_participant_joined_ms": round(rejoined_ms, 1),
            "reconnect_to_participant_joined_ms": reconnect_to_rejoined_ms(d),
            "passenger_packets_while_signaling_down": down,
            "restart_offer_to_answer_received_ms": round(restart_answered[0] - offers[-1]["t"], 1)
            if restart_answered
            else None,
            "restart_offer_bytes": offers[-1]["bytes"],
            "restart_answer_bytes": answers[-1]["bytes"],
            "driver_sent": wire_sizes(d["sent"]),
            "passenger_sent": wire_sizes(p["sent"]),
            "driver_ufrags": [ufrag(o["msg"]["sdp"]) for o in offers],
            "path_before": path_before,
            "path_after": path_after,
            **audio,
        }
        report(request, figures)

        assert d["errors"] == [] and p["errors"] == [], (d["errors"], p["errors"])
        assert down[1] > down[0] > 0, "the audio stopped while the signaling socket was down"
        # The passenger saw the driver leave, then come back.
        peer_events = [m["type"] for m in p["received"] if m["type"].startswith("participant_")]
        assert peer_events == ["participant_joined", "participant_left", "participant_joined"], peer_events
        # The reconnected driver got the same greeting as on its first join.
        assert d["sockets"] == 2
        greetings = [m["type"] for m in d["received"] if m["type"] in GREETING]
        assert greetings == list(GREETING) * 2, greetings
        # Re-offered with an ICE restart (new ufrag both ways), answered; no
        # other offer or answer.
        assert (len(offers), len(answers)) == (2, 2)
        assert [m["type"] for m in p["sent"] if m["type"] in ("offer", "answer")] == ["answer", "answer"]
        assert ufrag(offers[1]["msg"]["sdp"]) != ufrag(offers[0]["msg"]["sdp"])
        assert ufrag(answers[1]["msg"]["sdp"]) != ufrag(answers[0]["msg"]["sdp"])
        assert path_after and path_after["iceLocalUsernameFragment"] == ufrag(offers[1]["msg"]["sdp"])
        check_trickled(d["sent"], "driver")
        check_trickled(p["sent"], "passenger")
        assert relayed(p["received"]) == relayed(d["sent"])
        assert relayed(d["received"]) == relayed(p["sent"])
        assert on_loopback(path_after), path_after
        assert [c["code"] for c in d["closes"]][-1] == 1000 and [c["code"] for c in p["closes"]] == [1000]
        # The network loss as the client saw it: one socket given up by the
        # heartbeat (the daemon never closed it), the attempts while the
        # network was down refused, each after its backoff step, then one
        # that went through.
        lost = [
            e["detail"] for e in d["events"] if e["type"] == "signaling" and e["detail"]["state"] == "lost"
        ]
        assert (lost[0]["code"], lost[0]["reason"]) == (1006, "heartbeat"), lost
        assert [e["code"] for e in lost[1:]] == [1006] * len(link.refused), lost
        delays = backoff_checked(d["events"], QUICK_CLIENT["reconnectDelay"])
        assert len(d["attempts"]) == len(delays) + 1 == len(link.refused) + 2, (delays, len(link.refused))
        assert [m["type"] for m in d["sent"]].count("heartbeat") >= 2
        # The passenger's socket was never touched.
        assert (len(p["attempts"]), p["sockets"]) == (1, 1)
        # docs/protocol.md, "media_state": the ICE restart moved both onto a
        # new candidate pair while connected, and each reported connected again.
        for snap, restarted in ((d, offers[-1]["t"]), (p, answers[-1]["t"])):
            again = [m["msg"] for m in snap["sent"] if m["type"] == "media_state" and m["t"] > restarted]
            assert {"state": "connected", "candidate_type": "host"}.items() <= again[-1].items(), again

    browser.run(scenario())
    assert server.stop() == 0
    [row] = server.call_logs()
    assert (row["status"], row["end_reason"], row["initiated_by"]) == ("ended", "user_terminated", "driver-1")
    report(request, media_columns(row))
    assert row["media_connected_at"] is not None, row
    assert (row["driver_candidate"], row["passenger_candidate"], row["media_failures"]) == ("host", "host", 0)


def test_reference_client_stops_after_replaced_and_going_away(server_factory, browser, request) -> None:
    """docs/protocol.md, "Close codes": 4002 (a newer socket of the same
    participant took over) and 1001 (the server stops for good, here with
    ``ON_STOP=end``) end the call for the client: it reports ``ended`` with
    ``replaced`` / ``server_shutdown`` and never reconnects (its retries
    would come within 100 ms here; none came in ten times that)."""
    server = server_factory()
    taken, stopped = server.new_session(), server.new_session()
    quick = {"reconnectDelay": 100}

    async def scenario() -> list[dict[str, Any]]:
        async with browser.context() as context:
            replaced = await CallPage.open(context, server, taken, "driver-1", client=quick)
            gone = await CallPage.open(context, server, stopped, "passenger-1", client=quick)
            for page in (replaced, gone):
                await page.wait("() => call.signaling('joined').length === 1", "joined", SIGNAL_TIMEOUT)
            async with server.ws() as ws:
                await authenticate(ws, taken, "driver-1", token=taken["driver_token"])
                await replaced.wait("() => call.closes.length === 1", "closed as replaced", SIGNAL_TIMEOUT)
                assert await asyncio.to_thread(server.stop) == 0
            await gone.wait("() => call.closes.length === 1", "closed by the stop", SIGNAL_TIMEOUT)
            await asyncio.sleep(1.0)
            return [await page.snapshot() for page in (replaced, gone)]

    r, g = browser.run(scenario())
    report(
        request, {"closes": [r["closes"], g["closes"]], "attempts": [len(r["attempts"]), len(g["attempts"])]}
    )
    for snap, code, reason in ((r, 4002, "replaced"), (g, 1001, "server_shutdown")):
        assert snap["errors"] == [], snap["errors"]
        assert [c["code"] for c in snap["closes"]] == [code], snap["closes"]
        ended = [e["detail"] for e in snap["events"] if e["type"] == "ended"]
        assert [e["reason"] for e in ended] == [reason], ended
        assert snap["ended"] and not snap["reconnectPending"]
        assert (len(snap["attempts"]), snap["sockets"]) == (1, 1), snap["attempts"]
        assert not [e for e in snap["events"] if e["detail"].get("state") == "reconnecting"], snap["events"]
    assert any(m["type"] == "error" and m["msg"]["code"] == "replaced" for m in r["received"]), r["received"]
    assert {"type": "call_ended", "reason": "server_shutdown"} in [m["msg"] for m in g["received"]]


def test_chromium_call_whose_media_cannot_connect(server_factory, browser, request) -> None:
    """docs/protocol.md, "media_state": a call that reaches the server but
    whose media never connects. The harness changes the DTLS fingerprint in
    every description its page receives, so ICE connects but DTLS cannot
    (an ICE failure takes Chromium about 15 s; this fails at once, the
    same way for the apps and the call log): connectionState goes
    ``failed`` on both pages, each reports it, and the call log has no
    ``media_connected_at`` and counts the failures."""
    server = server_factory()
    session = server.new_session(ride_id="ride-webrtc-no-media")

    async def scenario() -> list[dict[str, Any]]:
        async with browser.context() as context:
            driver = await CallPage.open(context, server, session, "driver-1", tamperFingerprint=True)
            passenger = await CallPage.open(context, server, session, "passenger-1", tamperFingerprint=True)
            for page, other in ((driver, passenger), (passenger, driver)):
                await page.wait(
                    "() => call.sent.some(m => m.type === 'media_state' && m.msg.state === 'failed')",
                    "media_state failed sent",
                    CONNECT_TIMEOUT,
                    other,
                )
            await end_call(driver, passenger)
            return [await page.snapshot() for page in (driver, passenger)]

    d, p = browser.run(scenario())
    report(
        request,
        {
            "states": [[s["state"] for s in snap["states"]] for snap in (d, p)],
            "media_state_sent": [media_reports(snap) for snap in (d, p)],
            "first_offer_to_failed_ms": [
                round(
                    next(s["t"] for s in snap["states"] if s["state"] == "failed") - d["firstOfferSentAt"], 1
                )
                for snap in (d, p)
            ],
        },
    )
    for snap in (d, p):
        assert snap["errors"] == [], snap["errors"]
        assert snap["connectedAt"] is None, snap["states"]
        reports = media_reports(snap)
        assert [r["state"] for r in reports][:1] == ["connecting"] and "failed" in [
            r["state"] for r in reports
        ]
        assert all(r["state"] != "connected" for r in reports), reports
    assert server.stop() == 0
    [row] = server.call_logs()
    assert (row["status"], row["end_reason"]) == ("ended", "user_terminated"), row
    assert row["connected_at"] is not None and row["media_connected_at"] is None, row
    assert row["media_failures"] >= 1, row


# -- through a TURN relay (a real coturn) ----------------------------------------

TURN_SECRET = "turn-secret-" + "x" * 32


def candidate_type(end: str | None) -> str | None:
    """``"udp 127.0.0.1:50001 relay"`` -> ``"relay"``."""
    return end.split()[-1] if end else None


def session_joined_bytes(snap: dict[str, Any]) -> int:
    return next(m["bytes"] for m in snap["received"] if m["type"] == "session_joined")


@needs_coturn
def test_chromium_call_through_a_turn_relay(server_factory, coturn_factory, browser, request) -> None:
    """docs/protocol.md, "ICE servers": both pages take ``ice_servers`` from
    their own ``session_joined`` and allow only relay candidates
    (``iceTransportPolicy: "relay"``); the call connects through coturn with
    the daemon's TURN credentials, the selected pair is relay on both sides,
    and the audio flows. (coturn runs the documented configuration plus
    ``verbose``, so that its log shows each allocation.)"""
    turn = coturn_factory(TURN_SECRET, verbose=True)
    server = server_factory(ICE_SERVERS=turn.url, TURN_SECRET=TURN_SECRET)
    session = server.new_session(ride_id="ride-webrtc-turn")

    async def scenario() -> dict[str, Any]:
        async with browser.context() as context:
            driver, passenger = await start_chromium_call(
                context, server, session, iceTransportPolicy="relay"
            )
            audio = await audio_both_ways(driver, passenger)
            paths = [await page.selected_path() for page in (driver, passenger)]
            energy = [(await page.inbound_audio())["totalAudioEnergy"] for page in (driver, passenger)]
            await end_call(driver, passenger)
            return {"d": await driver.snapshot(), "p": await passenger.snapshot(), "paths": paths,
                    "energy": energy, "audio": audio}  # fmt: skip

    result = browser.run(scenario())
    d, p, paths = result["d"], result["p"], result["paths"]
    report(
        request,
        {
            "first_offer_to_driver_connected_ms": round(d["connectedAt"] - d["firstOfferSentAt"], 1),
            "first_offer_to_passenger_connected_ms": round(p["connectedAt"] - d["firstOfferSentAt"], 1),
            "session_joined_bytes": [session_joined_bytes(d), session_joined_bytes(p)],
            "media_paths": paths,
            "total_audio_energy": result["energy"],
            **result["audio"],
        },
    )
    assert d["errors"] == [] and p["errors"] == [], (d["errors"], p["errors"])
    assert d["iceErrors"] == [] and p["iceErrors"] == [], (d["iceErrors"], p["iceErrors"])
    for snap, path in ((d, paths[0]), (p, paths[1])):
        # Each page's own relay towards the other's (seen first as peer
        # reflexive when its checks arrive before its candidate).
        assert candidate_type(path["local"]) == "relay", path
        assert candidate_type(path["remote"]) in ("relay", "prflx"), path
        signalled = [m["msg"]["candidate"]["candidate"] for m in snap["sent"]
                     if m["type"] == "ice_candidate" and m["msg"]["candidate"]
                     and m["msg"]["candidate"]["candidate"]]  # fmt: skip
        assert signalled and all(" typ relay " in c for c in signalled), signalled
        [joined] = [m["msg"] for m in snap["received"] if m["type"] == "session_joined"]
        [entry] = joined["ice_servers"]
        assert entry["urls"] == [turn.url] and entry["username"].endswith(f":{snap['role']}"), entry
    assert all(e > 0 for e in result["energy"]), result["energy"]
    check_media_reports(d, "relay")
    check_media_reports(p, "relay")
    assert server.stop() == 0
    [row] = server.call_logs()
    report(request, media_columns(row))
    assert row["media_connected_at"] is not None, row
    assert (row["driver_candidate"], row["passenger_candidate"]) == ("relay", "relay"), row
    for role in ("driver", "passenger"):  # coturn allocated for both, with the daemon's usernames
        assert re.search(
            rf"user <\d+:{session['session_id']}:{role}>.*ALLOCATE processed, success", turn.log
        ), turn.log[-4000:]


#: How many ICE candidate pairs the page's RTCPeerConnection has.
CANDIDATE_PAIRS_JS = (
    "async () => { let n = 0;"
    " (await call.pc.getStats()).forEach(r => { if (r.type === 'candidate-pair') n++; }); return n; }"
)


@needs_coturn
def test_chromium_call_fails_when_coturn_refuses_the_credentials(
    server_factory, coturn_factory, browser, request
) -> None:
    """The daemon and coturn disagree on the secret: coturn answers the
    allocation with 401, no relay candidate exists, the relay-only call
    never connects and ICE fails."""
    turn = coturn_factory("another-secret-" + "y" * 32)
    server = server_factory(ICE_SERVERS=turn.url, TURN_SECRET=TURN_SECRET)
    session = server.new_session(ride_id="ride-webrtc-turn-401")

    async def scenario() -> dict[str, Any]:
        async with browser.context() as context:
            driver = await CallPage.open(context, server, session, "driver-1", iceTransportPolicy="relay")
            passenger = await CallPage.open(
                context, server, session, "passenger-1", iceTransportPolicy="relay"
            )
            for page, other in ((driver, passenger), (passenger, driver)):
                await page.wait("() => call.iceErrors.some(e => e.errorCode === 401)", "TURN 401",
                                CONNECT_TIMEOUT, other)  # fmt: skip
                # Gathering ends with no candidate at all, so no candidate
                # pair can ever form: the call cannot connect (Chromium
                # leaves connectionState at "new" rather than "failed").
                await page.wait("() => call.pc.iceGatheringState === 'complete'", "gathering complete",
                                CONNECT_TIMEOUT, other)  # fmt: skip
                await page.wait_received(
                    "ice_candidate", 2
                )  # the other side's "" and null: no candidate either
            pairs = [await page.js(CANDIDATE_PAIRS_JS) for page in (driver, passenger)]
            return {"d": await driver.snapshot(), "p": await passenger.snapshot(), "pairs": pairs}

    result = browser.run(scenario())
    d, p = result["d"], result["p"]
    report(
        request,
        {"ice_errors": [d["iceErrors"][:1], p["iceErrors"][:1]], "states": [d["states"], p["states"]]},
    )
    assert result["pairs"] == [0, 0], result["pairs"]
    for snap in (d, p):
        assert snap["connectedAt"] is None, snap["states"]
        assert [m["msg"]["candidate"] for m in snap["received"] if m["type"] == "ice_candidate"][-1] is None
        assert not [m for m in snap["sent"] if m["type"] == "ice_candidate" and m["msg"]["candidate"]
                    and m["msg"]["candidate"]["candidate"]], "a candidate was gathered"  # fmt: skip
    # docs/operations.md, "TURN with coturn": what coturn logs without verbose.
    for role in ("driver", "passenger"):
        assert re.search(
            rf"check_stun_auth: Cannot find credentials of user <\d+:[^:>]+:{role}>", turn.log
        ), turn.log[-4000:]


# -- aiortc <-> Chromium -------------------------------------------------------

TONE_HZ = 400


class AiortcPeer:
    """An aiortc endpoint on the daemon's WebSocket (the websockets client).

    aiortc has no trickle ICE: ``setLocalDescription`` gathers every candidate
    and the SDP it leaves embeds them, so its offer or answer is sent whole,
    followed by the null end-of-candidates. The candidates Chromium trickles
    are added one by one with ``candidate_from_sdp``. Its RTCPeerConnection
    is made on ``session_joined``, with that message's ``ice_servers``.

    Args:
        relay: only TURN relay candidates (``iceTransportPolicy`` "relay").
    """

    def __init__(
        self, server: ServerProcess, session: dict[str, Any], user_id: str, relay: bool = False
    ) -> None:
        self.server = server
        self.session = session
        self.user_id = user_id
        self.relay = relay
        self.pc: Any = None
        self.role: str | None = None
        self.sent: list[dict[str, Any]] = []
        self.received: list[dict[str, Any]] = []
        self.errors: list[str] = []
        self.frames = 0
        self.loud_frames = 0
        self.first_offer_sent_at: float | None = None
        self.connected_at: float | None = None
        self.pending: list[Any] = []
        self.ws: Any = None
        self.tasks: list[asyncio.Task[Any]] = []

    def _create_peer_connection(self, ice_servers: list[dict[str, Any]]) -> None:
        from aiortc import RTCConfiguration, RTCIceServer, RTCIceTransportPolicy, RTCPeerConnection

        policy = RTCIceTransportPolicy.RELAY if self.relay else RTCIceTransportPolicy.ALL
        self.pc = RTCPeerConnection(
            RTCConfiguration(
                iceServers=[RTCIceServer(**entry) for entry in ice_servers], iceTransportPolicy=policy
            )
        )
        self.pc.addTrack(tone_track())

        @self.pc.on("connectionstatechange")
        def _state() -> None:
            if self.pc.connectionState == "connected" and self.connected_at is None:
                self.connected_at = time.time() * 1000

        @self.pc.on("track")
        def _track(track: Any) -> None:
            self.tasks.append(asyncio.create_task(self._consume(track)))

    def selected_types(self) -> tuple[str, str] | None:
        """(local, remote) candidate types of the nominated ICE pair."""
        [transceiver] = self.pc.getTransceivers()
        connection = transceiver.receiver.transport.transport._connection  # aioice.Connection
        nominated = connection._nominated.get(1)
        return (nominated.local_candidate.type, nominated.remote_candidate.type) if nominated else None

    async def _consume(self, track: Any) -> None:
        from aiortc.mediastreams import MediaStreamError

        try:
            while True:
                frame = await track.recv()
                self.frames += 1
                samples = array.array("h", bytes(frame.planes[0]))
                if samples and max(abs(min(samples)), max(samples)) > 300:
                    self.loud_frames += 1
        except MediaStreamError:
            pass

    async def start(self) -> None:
        self.ws = await self.server.ws().__aenter__()
        await send_json(
            self.ws,
            {"type": "authenticate", "session_id": self.session["session_id"], "user_id": self.user_id},
        )
        self.tasks.append(asyncio.create_task(self._run()))

    async def send(self, message: dict[str, Any]) -> None:
        text = json.dumps(message)
        await self.ws.send(text)
        now = time.time() * 1000
        if message["type"] == "offer" and self.first_offer_sent_at is None:
            self.first_offer_sent_at = now
        self.sent.append({"t": now, "type": message["type"], "bytes": len(text.encode()), "msg": message})

    async def _run(self) -> None:
        try:
            async for text in self.ws:
                message = json.loads(text)
                self.received.append(
                    {
                        "t": time.time() * 1000,
                        "type": message["type"],
                        "bytes": len(text.encode()),
                        "msg": message,
                    }
                )
                await self._handle(message)
        except Exception as exc:  # noqa: BLE001 - recorded, asserted empty by the test
            if type(exc).__name__ not in ("ConnectionClosedOK",):
                self.errors.append(repr(exc))

    async def _handle(self, message: dict[str, Any]) -> None:
        from aiortc import RTCSessionDescription

        kind = message["type"]
        if kind == "session_joined":
            self.role = message["role"]
            if self.pc is None:
                self._create_peer_connection(message.get("ice_servers", []))
        elif kind == "participant_joined" and self.role == "driver":
            await self.pc.setLocalDescription(await self.pc.createOffer())
            await self.send({"type": "offer", "sdp": self.pc.localDescription.sdp})
            await self.send({"type": "ice_candidate", "candidate": None})
        elif kind == "offer":
            await self.pc.setRemoteDescription(RTCSessionDescription(sdp=message["sdp"], type="offer"))
            await self._flush()
            await self.pc.setLocalDescription(await self.pc.createAnswer())
            await self.send({"type": "answer", "sdp": self.pc.localDescription.sdp})
            await self.send({"type": "ice_candidate", "candidate": None})
        elif kind == "answer":
            await self.pc.setRemoteDescription(RTCSessionDescription(sdp=message["sdp"], type="answer"))
            await self._flush()
        elif kind == "ice_candidate":
            if self.pc.remoteDescription is None:
                self.pending.append(message["candidate"])
            else:
                await self._add(message["candidate"])
        elif kind in ("call_ended", "call_timeout"):
            await self.pc.close()
        elif kind in ("error", "unauthorized"):
            self.errors.append(json.dumps(message))

    async def _flush(self) -> None:
        for candidate in self.pending:
            await self._add(candidate)
        self.pending.clear()

    async def _add(self, candidate: dict[str, Any] | None) -> None:
        from aiortc.sdp import candidate_from_sdp

        if candidate is None or candidate["candidate"] == "":
            await self.pc.addIceCandidate(None)  # end of candidates
            return
        line = candidate["candidate"]
        ice = candidate_from_sdp(line.split(":", 1)[1] if line.startswith("candidate:") else line)
        ice.sdpMid = candidate.get("sdpMid")
        ice.sdpMLineIndex = candidate.get("sdpMLineIndex")
        await self.pc.addIceCandidate(ice)

    async def end_call(self) -> None:
        await self.send({"type": "end_call"})

    async def close(self) -> None:
        if self.pc is not None:
            await self.pc.close()
        if self.ws is not None:
            await self.ws.close()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    def diagnostics(self) -> str:
        return (
            f"--- aiortc {self.user_id}: state={self.pc and self.pc.connectionState} frames={self.frames} "
            f"errors={self.errors} received={[m['type'] for m in self.received]} "
            f"sent={[m['type'] for m in self.sent]}"
        )


def tone_track() -> Any:
    """aiortc's AudioStreamTrack (8 kHz mono, 20 ms frames, real-time paced)
    with a 400 Hz tone instead of silence."""
    from aiortc.mediastreams import AudioStreamTrack

    period = array.array("h", (int(8000 * math.sin(2 * math.pi * TONE_HZ * i / 8000)) for i in range(160)))
    tone = period.tobytes()

    class ToneTrack(AudioStreamTrack):
        async def recv(self) -> Any:
            frame = await super().recv()
            plane = frame.planes[0]
            plane.update(tone.ljust(plane.buffer_size, b"\0")[: plane.buffer_size])
            return frame

    return ToneTrack()


@pytest.fixture
def aiortc_on_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    """aiortc (aioice) gathers host candidates on every interface except
    127.0.0.1; keep this test's media on loopback instead."""
    import aioice.ice

    monkeypatch.setattr(aioice.ice, "get_host_addresses", lambda use_ipv4, use_ipv6: ["127.0.0.1"])


@pytest.mark.skipif(
    not HAVE_AIORTC, reason="the aiortc pairing needs the PyPI package aiortc (pip install -e '.[test]')"
)
@pytest.mark.parametrize(
    "aiortc_role, via",
    [("passenger", "host"), ("driver", "host"), pytest.param("passenger", "relay", marks=needs_coturn)],
)
def test_aiortc_with_chromium(
    server_factory, coturn_factory, browser, request, aiortc_on_loopback, aiortc_role, via
) -> None:
    """``via`` "relay": both ends take only TURN relay candidates, from the
    ``ice_servers`` of their ``session_joined``, through a real coturn."""
    relay = via == "relay"
    if relay:
        turn = coturn_factory(TURN_SECRET)
        server = server_factory(ICE_SERVERS=turn.url, TURN_SECRET=TURN_SECRET)
    else:
        server = server_factory()
    session = server.new_session(ride_id=f"ride-aiortc-{aiortc_role}-{via}")
    ids = {"driver": "driver-1", "passenger": "passenger-1"}
    browser_role = "driver" if aiortc_role == "passenger" else "passenger"
    options = {"iceTransportPolicy": "relay"} if relay else {}

    async def scenario() -> None:
        peer = AiortcPeer(server, session, ids[aiortc_role], relay=relay)
        try:
            async with browser.context() as context:
                if aiortc_role == "driver":
                    await peer.start()
                    page = await CallPage.open(context, server, session, ids[browser_role], **options)
                else:
                    page = await CallPage.open(context, server, session, ids[browser_role], **options)
                    await peer.start()

                async def diag() -> str:
                    return peer.diagnostics() + "\n" + await page.diagnostics()

                async def aiortc_connected() -> bool:
                    return peer.pc.connectionState == "connected"

                await page.wait_connected(CONNECT_TIMEOUT)
                await eventually(aiortc_connected, "aiortc connected", CONNECT_TIMEOUT, diag)

                async def frames() -> int:
                    return peer.frames

                async def chromium_packets() -> int:
                    return (await page.inbound_audio())["packetsReceived"]

                aiortc_frames, chromium_rx = await asyncio.gather(
                    packets_growing(frames, "aiortc receiving Chromium", diag),
                    packets_growing(chromium_packets, "Chromium receiving aiortc", diag),
                )
                energy = (await page.inbound_audio())["totalAudioEnergy"]
                path = await page.selected_path()
                aiortc_path = peer.selected_types()
                await peer.end_call()
                await page.wait(ENDED_JS, "call_ended user_terminated and close 1000", SIGNAL_TIMEOUT)

                async def aiortc_ended() -> bool:
                    return peer.ws.close_code == 1000 and any(
                        m["msg"] == {"type": "call_ended", "reason": "user_terminated"} for m in peer.received
                    )

                await eventually(
                    aiortc_ended, "aiortc: call_ended user_terminated, close 1000", SIGNAL_TIMEOUT, diag
                )
                snap = await page.snapshot()
        finally:
            await peer.close()

        if aiortc_role == "driver":
            started, connected = peer.first_offer_sent_at, snap["connectedAt"]
        else:
            started, connected = snap["firstOfferSentAt"], snap["connectedAt"]
        figures = {
            "first_offer_to_chromium_connected_ms": round(connected - started, 1),
            "first_offer_to_aiortc_connected_ms": round(peer.connected_at - started, 1),
            "aiortc_sent": wire_sizes(peer.sent),
            "aiortc_sdp_candidates": [
                m["msg"]["sdp"].count("a=candidate") for m in peer.sent if "sdp" in m["msg"]
            ],
            "chromium_sent": wire_sizes(snap["sent"]),
            "aiortc_frames": aiortc_frames,
            "aiortc_loud_frames": peer.loud_frames,
            "chromium_packets": chromium_rx,
            "chromium_total_audio_energy": energy,
            "media_path": path,
            "aiortc_pair_types": aiortc_path,
        }
        report(request, figures)

        assert peer.errors == [] and snap["errors"] == [], (peer.errors, snap["errors"])
        assert relayed(snap["received"]) == relayed(peer.sent)
        assert relayed(peer.received) == relayed(snap["sent"])
        check_trickled(snap["sent"], "Chromium")
        sizes = [m["bytes"] for m in peer.sent if m["type"] in ("offer", "answer")]
        assert peer.loud_frames > 0, "aiortc decoded only silence"
        assert energy > 0, "Chromium decoded only silence"
        if relay:
            assert candidate_type(path["local"]) == "relay", path
            assert aiortc_path is not None and aiortc_path[0] == "relay", aiortc_path
        else:
            assert on_loopback(path), path
        # aiortc cannot trickle: its SDP embeds its candidates (one here, as it
        # gathers on 127.0.0.1 only, or its one relay; ~90 B more per candidate on a phone).
        assert sizes and max(sizes) <= 4096, f"aiortc's SDP ({sizes} B) is over the default MAX_MESSAGE_BYTES"
        assert [m["msg"]["candidate"] for m in peer.sent if m["type"] == "ice_candidate"] == [None]

    browser.run(scenario())
    assert server.stop() == 0
    [row] = server.call_logs()
    assert (row["status"], row["end_reason"], row["initiated_by"]) == ("ended", "user_terminated", "driver-1")
    # Only the Chromium side reports media_state (aiortc sends none): the call
    # log has its candidate, and no media_connected_at, which needs both.
    report(request, media_columns(row))
    assert row[f"{browser_role}_candidate"] == ("relay" if relay else "host"), row
    assert row[f"{aiortc_role}_candidate"] is None and row["media_connected_at"] is None, row


@pytest.mark.e2e
def test_chromium_call_goes_on_across_a_daemon_restart(server_factory, browser, tmp_path, request) -> None:
    """docs/operations.md, "Restarts": the daemon is restarted (SIGTERM,
    ON_STOP=handoff) under a live Chromium call: both pages see close 1012
    and no call_ended, the audio keeps flowing while no daemon runs, and the
    reference client does the rest by itself: it retries at once (0–500 ms of
    jitter), then with backoff until the next process (same NODE_ID, same
    port) serves, authenticates again, and the driver re-offers with an ICE
    restart; the call is connected again, and ends normally later."""
    env = {
        "ON_STOP": None,
        "NODE_ID": "webrtc-restart",
        "SQLITE_PATH": str(tmp_path / "calls.sqlite3"),
        "RECONNECT_GRACE": "30s",
        "SESSION_DURATION": "10m",
    }
    first = server_factory(**env)
    session = first.new_session(ride_id="ride-webrtc-restart")

    async def scenario() -> dict[str, Any]:
        async with browser.context() as context:
            driver, passenger = await start_chromium_call(context, first, session)
            await audio_both_ways(driver, passenger)
            signalled = time.monotonic()
            assert await asyncio.to_thread(first.stop) == 0
            for page in (driver, passenger):
                await page.wait("() => call.closes.length === 1", "closed by the restart", SIGNAL_TIMEOUT)
            # No daemon runs: the peer-to-peer audio goes on.
            down = [(await passenger.inbound_audio())["packetsReceived"]]
            await asyncio.sleep(1.0)
            down.append((await passenger.inbound_audio())["packetsReceived"])
            second = server_factory(SERVER_ADDR=f"127.0.0.1:{first.port}", **env)
            serving_s = time.monotonic() - signalled
            started = time.monotonic()
            await driver.wait_received("participant_joined", 2)
            await passenger.wait_received("participant_joined", 2)
            rejoined_ms = (time.monotonic() - started) * 1000
            await driver.wait_received("answer", 2)
            await on_restarted_ice_session(driver, passenger)
            await driver.wait_connected(CONNECT_TIMEOUT, passenger)
            await passenger.wait_connected(CONNECT_TIMEOUT, driver)
            audio = await audio_both_ways(driver, passenger)
            await end_call(driver, passenger)
            d, p = await driver.snapshot(), await passenger.snapshot()
        return {
            "d": d,
            "p": p,
            "down": down,
            "server": second,
            "figures": {
                "sigterm_to_next_process_serving_s": round(serving_s, 2),
                "next_process_serving_to_participant_joined_ms": round(rejoined_ms, 1),
                "reconnect_to_participant_joined_ms": [reconnect_to_rejoined_ms(s) for s in (d, p)],
                "attempts_while_no_daemon": [len(snap["attempts"]) - snap["sockets"] for snap in (d, p)],
                "backoff_delays_ms": [
                    [
                        round(e["detail"]["delay"])
                        for e in snap["events"]
                        if e["detail"].get("state") == "reconnecting"
                    ]
                    for snap in (d, p)
                ],
                "passenger_packets_while_no_daemon": down,
                **audio,
            },
        }

    result = browser.run(scenario())
    report(request, result["figures"])
    d, p, down = result["d"], result["p"], result["down"]
    assert d["errors"] == [] and p["errors"] == [], (d["errors"], p["errors"])
    assert down[1] > down[0] > 0, "the audio stopped while no daemon ran"
    for snap in (d, p):
        assert [c["code"] for c in snap["closes"]] == [1012, 1000], snap["closes"]
        ended = [m["msg"] for m in snap["received"] if m["type"] == "call_ended"]
        assert ended == [{"type": "call_ended", "reason": "user_terminated"}], ended
        # docs/protocol.md, "Reconnect and ICE restart": after 1012 the first
        # attempt comes at once, with jitter only; the failed ones back off.
        lost = [e["detail"] for e in snap["events"] if e["detail"].get("state") == "lost"]
        assert lost[0]["code"] == 1012 and all(e["code"] == 1006 for e in lost[1:]), lost
        delays = [e["detail"]["delay"] for e in snap["events"] if e["detail"].get("state") == "reconnecting"]
        assert len(delays) == len(lost) and delays[0] < 500, delays
        assert all(
            0.5 * min(5000, 500 * 2**n) <= delay < min(5000, 500 * 2**n)
            for n, delay in enumerate(delays[1:], 1)
        ), delays
        # Authenticated again: the same greeting as on the first join.
        greetings = [m["type"] for m in snap["received"] if m["type"] in GREETING]
        assert greetings == list(GREETING) * 2, greetings
    offers = [m for m in d["sent"] if m["type"] == "offer"]
    assert len(offers) == 2 and ufrag(offers[1]["msg"]["sdp"]) != ufrag(offers[0]["msg"]["sdp"])
    second = result["server"]
    wait_until(lambda: second.call_logs()[0]["status"] == "ended")
    [row] = second.call_logs()
    assert row["end_reason"] == "user_terminated", row
    report(request, media_columns(row))
    assert row["media_connected_at"] is not None and row["media_failures"] == 0, row
