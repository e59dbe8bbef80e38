"""Several instances sharing sessions through the machine's real Redis
(docs/operations.md, "Several instances"; docs/design.md, "Several
instances"): real daemon processes, one MySQL call log, the driver on one
instance and the passenger on another."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time

import pytest
import redis
import websockets

from conftest import (
    auth_msg,
    daemon_env,
    free_port,
    health,
    join,
    metric,
    recv_json,
    run_daemon,
    send_json,
    wait_until,
)

pytestmark = pytest.mark.cluster


async def call_on(driver_at, passenger_at, session: dict) -> tuple:
    """The driver joined on ``driver_at``, the passenger on ``passenger_at``
    (instances), each told of the other: ``(driver socket, passenger socket)``."""
    d, _ = await join(driver_at, session, "driver-1")
    p, _ = await join(passenger_at, session, "passenger-1")
    await recv_until(d, "participant_joined")
    await recv_until(p, "participant_joined")
    return d, p


async def recv_until(ws, kind: str, timeout: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        message = await recv_json(ws, max(0.1, deadline - time.monotonic()))
        if message["type"] == kind:
            return message


def test_driver_and_passenger_on_two_instances_relay_in_order(cluster):
    a, b = cluster.start("a"), cluster.start("b")
    session = a.new_session(ride_id="ride-cluster-order")
    count = 500  # each way: 1,000 relayed messages

    async def scenario() -> None:
        d, greeting_d = await join(a, session, "driver-1")
        p, greeting_p = await join(b, session, "passenger-1")
        assert [m["type"] for m in greeting_p] == ["authenticated", "session_joined"], greeting_p
        assert (await recv_json(p))["type"] == "participant_joined"
        assert (await recv_json(d)) == {"type": "participant_joined", "role": "passenger"}
        # Each socket is counted where it is open (docs/protocol.md, "GET /health").
        assert [health(a)["connections"], health(b)["connections"]] == [1, 1]
        assert [metric(a, "intaleq_connections_open"), metric(b, "intaleq_connections_open")] == [1, 1]

        async def send(ws, tag: str) -> None:
            # Within the message rate (docs/protocol.md, rule 7): a burst of
            # 90, then 45 per second.
            started = time.monotonic()
            for i in range(count):
                if i >= 90:
                    await asyncio.sleep(max(0.0, started + (i - 90) / 45 - time.monotonic()))
                await send_json(ws, {"type": "offer", "sdp": f"{tag}-{i}"})

        async def receive(ws) -> list[str]:
            got = []
            for _ in range(count):
                message = await recv_json(ws, 15)
                assert message["type"] == "offer", (len(got), message)
                got.append(message["sdp"])
            return got

        results = await asyncio.gather(send(d, "d"), send(p, "p"), receive(p), receive(d))
        assert results[2] == [f"d-{i}" for i in range(count)]
        assert results[3] == [f"p-{i}" for i in range(count)]
        # media_state (docs/protocol.md, "media_state"): the passenger's, routed from b, reaches the
        # engine of a, which runs the session; neither is relayed (the next message is the pong).
        for ws, candidate in ((d, "host"), (p, "relay")):
            await send_json(ws, {"type": "media_state", "state": "connected", "candidate_type": candidate})
            await send_json(ws, {"type": "heartbeat"})
            assert await recv_json(ws) == {"type": "pong"}
        counted = [metric(server, "intaleq_media_connected_calls_total") for server in (a, b)]
        assert counted == [1, 0]  # counted where the session runs
        await send_json(p, {"type": "end_call"})
        for ws in (d, p):
            assert await recv_until(ws, "call_ended") == {"type": "call_ended", "reason": "user_terminated"}
            await ws.wait_closed()
            assert ws.close_code == 1000

    asyncio.run(scenario())
    wait_until(lambda: cluster.db.rows() and cluster.db.rows()[0]["status"] == "ended")
    [row] = cluster.db.rows()
    assert (row["end_reason"], row["initiated_by"], row["node_id"]) == ("user_terminated", "driver-1", "a")
    assert row["connected_at"] is not None
    assert (row["driver_candidate"], row["passenger_candidate"]) == ("host", "relay")
    assert row["media_connected_at"] == row["passenger_media_at"] is not None


def test_one_live_session_per_ride_across_instances(cluster):
    a, b = cluster.start("a"), cluster.start("b")
    first = a.new_session(ride_id="ride-cluster-lock")
    again = b.new_session(ride_id="ride-cluster-lock")
    assert again["session_id"] == first["session_id"]
    assert again["driver_token"] == first["driver_token"]
    status, body = b.post_session("ride-cluster-lock", "someone-else", "passenger-1")
    assert status == 409 and body["error"] == "ride_conflict", body


def test_newer_socket_on_another_instance_replaces_the_old_one(cluster):
    a, b = cluster.start("a"), cluster.start("b")
    session = a.new_session(ride_id="ride-cluster-replace")

    async def scenario() -> None:
        d_old, p = await call_on(b, a, session)
        d_new, greeting = await join(a, session, "driver-1")
        assert greeting[-1]["type"] == "session_joined"
        assert await recv_json(d_old) == {
            "type": "error",
            "code": "replaced",
            "message": "a newer connection of this participant took over",
        }
        await d_old.wait_closed()
        assert d_old.close_code == 4002
        # The passenger saw no participant_left; the new socket relays.
        await send_json(p, {"type": "answer", "sdp": "after-replace"})
        assert await recv_until(d_new, "answer") == {"type": "answer", "sdp": "after-replace"}
        await send_json(d_new, {"type": "end_call"})
        kinds = []
        while True:
            message = await recv_json(p)
            kinds.append(message["type"])
            if message["type"] == "call_ended":
                break
        assert "participant_left" not in kinds, kinds

    asyncio.run(scenario())


def test_expiry_fires_once_across_instances(cluster):
    a, b = cluster.start("a", SESSION_DURATION="2s"), cluster.start("b", SESSION_DURATION="2s")
    session = a.new_session(ride_id="ride-cluster-expiry")

    async def scenario() -> None:
        p, _ = await join(b, session, "passenger-1")
        assert await recv_until(p, "call_ended", 10) == {"type": "call_ended", "reason": "expired"}
        await p.wait_closed()
        late = await b.ws()
        await send_json(late, auth_msg(session, "driver-1"))
        assert await recv_json(late) == {"type": "unauthorized", "reason": "session_expired"}

    asyncio.run(scenario())
    wait_until(lambda: cluster.db.rows()[0]["status"] == "ended")
    [row] = cluster.db.rows()
    assert row["end_reason"] == "expired"


def test_killed_instance_holding_the_driver_the_call_goes_on(cluster):
    """kill -9 of the instance running the session and holding the driver:
    the passenger's socket on the other instance is closed with 1012, both
    come back to the survivor within RECONNECT_GRACE, the survivor adopts
    the session and the call goes on until end_call."""
    env = {"RECONNECT_GRACE": "20s", "SESSION_DURATION": "10m"}
    a, b = cluster.start("a", **env), cluster.start("b", **env)
    session = a.new_session(ride_id="ride-cluster-kill")

    async def scenario() -> None:
        d, p = await call_on(a, b, session)
        a.kill()
        await p.wait_closed()
        assert p.close_code == 1012, p.close_code
        d2, p2 = await call_on(b, b, session)
        await send_json(d2, {"type": "offer", "sdp": "again"})
        assert await recv_until(p2, "offer") == {"type": "offer", "sdp": "again"}
        await send_json(p2, {"type": "end_call"})
        assert (await recv_until(d2, "call_ended"))["reason"] == "user_terminated"

    asyncio.run(scenario())
    wait_until(lambda: cluster.db.rows()[0]["status"] == "ended")
    [row] = cluster.db.rows()
    assert row["end_reason"] == "user_terminated" and row["node_id"] == "a"


class RedisServer:
    """A private redis-server on a free port (no persistence, as production
    needs none), stopped and started again by the test."""

    def __init__(self, tmp_path) -> None:
        self.port = free_port()
        self.dir = tmp_path
        self.proc: subprocess.Popen | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.dir),
            ],  # fmt: skip
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis(port=self.port)
        try:
            wait_until(lambda: _pings(client), timeout=10)
        finally:
            client.close()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def _pings(client) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


@pytest.fixture
def private_redis(tmp_path):
    server = RedisServer(tmp_path)
    yield server
    server.stop()


def test_redis_down_for_ten_seconds(cluster, private_redis):
    """docs/operations.md, "Several instances": Redis killed (restarted
    empty after 10 s) under two live calls, one across the instances and one
    on one instance. Meanwhile: POST /sessions 503 unavailable, a new
    authenticate gets error unavailable and the socket stays open, the call
    on one instance relays, /health says "redis": "unavailable"; no process
    dies. After: the instances write their sessions into Redis again, the
    waiting socket joins when it sends authenticate again, the call across
    instances relays (what was sent meanwhile arrives, in order), every
    call-log event is there."""
    env = {
        "REDIS_URL": private_redis.url,
        "SESSION_DURATION": "10m",
        "RECONNECT_GRACE": "30s",
        "AUTH_TIMEOUT": "1m",
    }
    a, b = cluster.start("a", **env), cluster.start("b", **env)
    across = a.new_session(ride_id="ride-outage-across")
    local = a.new_session(ride_id="ride-outage-local")
    later = a.new_session(ride_id="ride-outage-later")

    async def scenario() -> None:
        d1, p1 = await call_on(a, b, across)
        d2, p2 = await call_on(a, a, local)
        private_redis.stop()
        await asyncio.to_thread(wait_until, lambda: health(b).get("redis") == "unavailable", 10)
        status, body = await asyncio.to_thread(b.post_session, "ride-outage-new")
        assert (status, body["error"]) == (503, "unavailable"), body
        waiting = await b.ws()
        await send_json(waiting, auth_msg(later, "driver-1"))
        assert (await recv_json(waiting, 10))["code"] == "unavailable"
        # One instance: the call goes on.
        await send_json(d2, {"type": "offer", "sdp": "local-during"})
        assert await recv_until(p2, "offer") == {"type": "offer", "sdp": "local-during"}
        # Across instances: sent now, delivered when Redis is back.
        for i in range(5):
            await send_json(p1, {"type": "answer", "sdp": f"across-during-{i}"})
        await asyncio.sleep(10)
        private_redis.start()
        await asyncio.to_thread(wait_until, lambda: health(b).get("redis") == "ok", 15)
        for i in range(5):
            assert await recv_until(d1, "answer", 15) == {"type": "answer", "sdp": f"across-during-{i}"}
        await send_json(d1, {"type": "offer", "sdp": "across-after"})
        assert await recv_until(p1, "offer") == {"type": "offer", "sdp": "across-after"}
        # The waiting socket tries again, a second apart, as apps are told
        # to (unavailable while the instances take their leases again, at
        # most a few seconds); then the session is known again.
        answers = []
        for _ in range(10):
            await send_json(waiting, auth_msg(later, "driver-1"))
            answers.append(await recv_json(waiting, 10))
            if answers[-1]["type"] != "error":
                break
            await asyncio.sleep(1)
        assert answers[-1]["type"] == "authenticated", (answers, b.log[-4000:])
        assert all(m.get("code") == "unavailable" for m in answers[:-1]), answers
        for ender, ride in ((d1, across), (d2, local), (waiting, later)):
            await send_json(ender, {"type": "end_call"})
            assert (await recv_until(ender, "call_ended"))["reason"] == "user_terminated", ride

    asyncio.run(scenario())
    wait_until(lambda: all(row["status"] == "ended" for row in cluster.db.rows()), 15)
    rows = {row["ride_id"]: row for row in cluster.db.rows()}
    assert set(rows) == {"ride-outage-across", "ride-outage-local", "ride-outage-later"}
    for ride_id in ("ride-outage-across", "ride-outage-local"):
        assert rows[ride_id]["connected_at"] is not None and rows[ride_id]["initiated_by"] == "driver-1"
        assert rows[ride_id]["end_reason"] == "user_terminated"
    assert rows["ride-outage-later"]["end_reason"] == "user_terminated"
    for server in (a, b):
        assert server.proc.poll() is None, server.log


def test_without_redis_url_redis_is_never_imported(server_factory, tmp_path):
    """A `redis` that cannot be imported on the path: the daemon without
    REDIS_URL serves as always; with REDIS_URL it stops with one line
    naming the extra (exit 78)."""
    fake = tmp_path / "fake"
    (fake / "redis").mkdir(parents=True)
    (fake / "redis" / "__init__.py").write_text("raise ImportError('redis is not installed here')\n")
    server = server_factory(PYTHONPATH=str(fake))
    server.new_session()
    env = daemon_env(tmp_path, PYTHONPATH=str(fake), REDIS_URL="redis://127.0.0.1:6379/0")
    result = run_daemon(env)
    assert result.returncode == 78, result.stderr
    assert "REDIS_URL needs redis-py: pip install 'intaleq-signal[redis]'" in result.stderr
    assert "Traceback" not in result.stderr


class Participant:
    """One app of a call, as apps are told to behave (docs/protocol.md,
    "Every refusal, error and ending, and what to do"): on close 1012 it
    reconnects at once to an instance that takes connections and
    authenticates again; it records every message it gets."""

    def __init__(self, session: dict, user_id: str, instances: list, first: int) -> None:
        self.session = session
        self.user_id = user_id
        self.instances = instances
        self.turn = first
        self.received: list[dict] = []
        self.closes: list[int | None] = []
        self.ws = None
        self.joined = asyncio.Event()

    async def run(self) -> None:
        while True:
            self.ws = await self._connect()
            await send_json(self.ws, auth_msg(self.session, self.user_id))
            try:
                async for text in self.ws:
                    message = json.loads(text)
                    self.received.append(message)
                    if message["type"] == "session_joined":
                        self.joined.set()
            except websockets.ConnectionClosed:
                pass
            self.closes.append(self.ws.close_code)
            if self.ws.close_code != 1012:
                return
            self.joined.clear()
            self.turn += 1

    async def _connect(self):
        deadline = time.monotonic() + 20
        while True:
            server = self.instances[self.turn % len(self.instances)]
            try:
                return await server().ws()
            except (TimeoutError, OSError, websockets.InvalidStatus):
                if time.monotonic() > deadline:
                    raise
                self.turn += 1
                await asyncio.sleep(0.05)

    def ended(self) -> list[dict]:
        return [m for m in self.received if m["type"] in ("call_ended", "call_timeout")]


def test_rolling_restart_of_three_instances_under_50_calls_ends_none(cluster):
    """docs/operations.md, "Several instances": three instances restarted
    one after the other (SIGTERM, ON_STOP=handoff, back on the same port
    and NODE_ID) under 50 live calls whose participants are spread over
    them: every socket of a stopping instance closes with 1012, the apps
    reconnect elsewhere, no call ends; afterwards each call still relays
    and ends normally, and every row says user_terminated."""
    env = {"ON_STOP": None, "SESSION_DURATION": "10m", "RECONNECT_GRACE": "30s"}
    names = ["a", "b", "c"]
    for name in names:
        cluster.start(name, **env)
    ports = {name: cluster.instances[name].port for name in names}
    sessions = [cluster.instances[names[i % 3]].new_session(ride_id=f"ride-rolling-{i}") for i in range(50)]
    getters = [lambda name=name: cluster.instances[name] for name in names]

    async def scenario() -> list[tuple[Participant, Participant]]:
        calls = [
            (Participant(s, "driver-1", getters, i), Participant(s, "passenger-1", getters, i + 1))
            for i, s in enumerate(sessions)
        ]
        tasks = [asyncio.create_task(p.run()) for call in calls for p in call]
        for call in calls:
            for p in call:
                await asyncio.wait_for(p.joined.wait(), 20)
        for name in names:
            server = cluster.instances[name]
            assert await asyncio.to_thread(server.stop) == 0
            await asyncio.to_thread(cluster.start, name, SERVER_ADDR=f"127.0.0.1:{ports[name]}", **env)
        for call in calls:  # everybody is back (on some instance)
            for p in call:
                try:
                    await asyncio.wait_for(p.joined.wait(), 20)
                except TimeoutError:
                    sid = p.session["session_id"]
                    logs = "\n".join(
                        f"{name}: {line}"
                        for name, server in cluster.started
                        for line in server.log.splitlines()
                        if sid in line or "released" in line or "lease" in line
                    )
                    raise AssertionError(
                        f"{p.user_id} not back: {p.closes} {p.received[-6:]}\n{logs}"
                    ) from None
        for _, passenger in calls:
            await send_json(passenger.ws, {"type": "answer", "sdp": "after-restarts"})
        for driver, _ in calls:
            await asyncio.to_thread(
                wait_until, lambda d=driver: {"type": "answer", "sdp": "after-restarts"} in d.received, 20
            )
            await send_json(driver.ws, {"type": "end_call"})
        await asyncio.wait_for(asyncio.gather(*tasks), 30)
        return calls

    calls = asyncio.run(scenario())
    for driver, passenger in calls:
        for p in (driver, passenger):
            assert p.ended() == [{"type": "call_ended", "reason": "user_terminated"}], (p.user_id, p.received)
            assert p.closes[-1] == 1000 and set(p.closes[:-1]) <= {1012}, p.closes
    assert sum(len(p.closes) - 1 for call in calls for p in call) >= 50  # the restarts did cut sockets
    wait_until(lambda: all(row["status"] == "ended" for row in cluster.db.rows()), 20)
    rows = cluster.db.rows()
    assert len(rows) == 50 and {row["end_reason"] for row in rows} == {"user_terminated"}


def test_sigterm_right_after_a_call_ended_stops_at_once(cluster):
    """SIGTERM a moment after a call across instances ended (the inbox
    reader busy with the ending's entries): each instance exits 0, within
    the stop timeout (a cancellation redis-py swallowed once kept it
    waiting forever)."""
    for attempt in range(2):
        a, b = cluster.start(f"a{attempt}"), cluster.start(f"b{attempt}")
        session = a.new_session()

        async def scenario(a=a, b=b, session=session) -> None:
            d, p = await call_on(a, b, session)
            await send_json(p, {"type": "end_call"})
            await recv_until(d, "call_ended")

        asyncio.run(scenario())
        assert a.stop(timeout=10) == 0, a.log[-3000:]
        assert b.stop(timeout=10) == 0, b.log[-3000:]


def test_unreachable_redis_at_start_is_one_line_without_the_password(tmp_path):
    """docs/operations.md, "Several instances": the password in REDIS_URL
    is never shown; an unreachable Redis at start is one line, exit 1 (a
    restart may cure it), no traceback."""
    env = daemon_env(tmp_path, REDIS_URL=f"redis://:s3cretpass@127.0.0.1:{free_port()}/0")
    result = run_daemon(env)
    assert result.returncode == 1, result.stderr
    assert "REDIS_URL: cannot use Redis at redis://***@127.0.0.1:" in result.stderr, result.stderr
    assert "s3cretpass" not in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_stopping_instance_with_on_stop_end_hands_routed_sockets_on(cluster):
    """An instance stopping with ON_STOP=end closes the sockets it relays
    for sessions run elsewhere with 1012 (their calls go on there), not 1001
    ("do not reconnect"); the driver comes back through the other instance
    and the call ends normally."""
    a = cluster.start("a", RECONNECT_GRACE="20s", SESSION_DURATION="10m")
    b = cluster.start("b", RECONNECT_GRACE="20s", SESSION_DURATION="10m", ON_STOP="end")
    session = a.new_session(ride_id="ride-cluster-end-edge")

    async def scenario() -> None:
        d, p = await call_on(b, a, session)
        assert await asyncio.to_thread(b.stop) == 0
        await d.wait_closed()
        assert d.close_code == 1012, d.close_code
        assert await recv_until(p, "participant_left") == {"type": "participant_left", "role": "driver"}
        d2, _ = await join(a, session, "driver-1")
        await recv_until(p, "participant_joined")
        await send_json(d2, {"type": "end_call"})
        assert (await recv_until(p, "call_ended"))["reason"] == "user_terminated"

    asyncio.run(scenario())
    wait_until(lambda: cluster.db.rows()[0]["status"] == "ended")
    assert cluster.db.rows()[0]["end_reason"] == "user_terminated"
