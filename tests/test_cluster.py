"""Several instances sharing sessions through the machine's real Redis
(docs/operations.md, "Several instances"; docs/design.md, "Several
instances"): real daemon processes, one MySQL call log, the driver on one
instance and the passenger on another."""

from __future__ import annotations

import asyncio
import time

import pytest

from conftest import auth_msg, join, recv_json, send_json, wait_until

pytestmark = pytest.mark.cluster


async def recv_until(ws, kind: str, timeout: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        message = await recv_json(ws, max(0.1, deadline - time.monotonic()))
        if message["type"] == kind:
            return message


def test_driver_and_passenger_on_two_instances_relay_in_order(cluster):
    a, b = cluster.start("a"), cluster.start("b")
    session = a.new_session(ride_id="ride-cluster-order")
    count = 1000

    async def scenario() -> None:
        d, greeting_d = await join(a, session, "driver-1")
        p, greeting_p = await join(b, session, "passenger-1")
        assert [m["type"] for m in greeting_p] == ["authenticated", "session_joined"], greeting_p
        assert (await recv_json(p))["type"] == "participant_joined"
        assert (await recv_json(d)) == {"type": "participant_joined", "role": "passenger"}

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
        d_old, _ = await join(b, session, "driver-1")
        p, _ = await join(a, session, "passenger-1")
        await recv_until(d_old, "participant_joined")
        await recv_until(p, "participant_joined")
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
        d, _ = await join(a, session, "driver-1")
        p, _ = await join(b, session, "passenger-1")
        await recv_until(d, "participant_joined")
        await recv_until(p, "participant_joined")
        a.kill()
        await p.wait_closed()
        assert p.close_code == 1012, p.close_code
        d2, _ = await join(b, session, "driver-1")
        p2, _ = await join(b, session, "passenger-1")
        await recv_until(d2, "participant_joined")
        await recv_until(p2, "participant_joined")
        await send_json(d2, {"type": "offer", "sdp": "again"})
        assert await recv_until(p2, "offer") == {"type": "offer", "sdp": "again"}
        await send_json(p2, {"type": "end_call"})
        assert (await recv_until(d2, "call_ended"))["reason"] == "user_terminated"

    asyncio.run(scenario())
    wait_until(lambda: cluster.db.rows()[0]["status"] == "ended")
    [row] = cluster.db.rows()
    assert row["end_reason"] == "user_terminated" and row["node_id"] == "a"
