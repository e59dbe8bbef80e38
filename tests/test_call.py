"""A whole call through the real daemon: the first thing that must work."""

from __future__ import annotations

import asyncio

import pytest

from conftest import closed_with, join, recv_json, send_json

pytestmark = pytest.mark.compat


def test_full_call_relays_and_logs(server) -> None:
    session = server.new_session(ride_id="ride-full")

    async def scenario() -> None:
        driver, _ = await join(server, session, "driver-1")
        passenger, joined = await join(server, session, "passenger-1")
        assert joined[1] == {
            "type": "session_joined",
            "session_id": session["session_id"],
            "ride_id": "ride-full",
            "role": "passenger",
        }
        assert await recv_json(passenger) == {"type": "participant_joined", "role": "driver"}
        assert await recv_json(driver) == {"type": "participant_joined", "role": "passenger"}

        await send_json(driver, {"type": "offer", "sdp": "v=0\r\no=- 1 2 IN IP4 0.0.0.0\r\n"})
        assert await recv_json(passenger) == {"type": "offer", "sdp": "v=0\r\no=- 1 2 IN IP4 0.0.0.0\r\n"}
        await send_json(passenger, {"type": "answer", "sdp": "v=0\r\nanswer"})
        assert await recv_json(driver) == {"type": "answer", "sdp": "v=0\r\nanswer"}
        candidate = {
            "candidate": "candidate:1 1 udp 1 10.0.0.1 5000 typ host",
            "sdpMid": "0",
            "sdpMLineIndex": 0,
        }
        await send_json(passenger, {"type": "ice_candidate", "candidate": candidate})
        assert await recv_json(driver) == {"type": "ice_candidate", "candidate": candidate}

        await send_json(driver, {"type": "end_call"})
        assert await recv_json(driver) == {"type": "call_ended", "reason": "user_terminated"}
        assert await recv_json(passenger) == {"type": "call_ended", "reason": "user_terminated"}
        assert await closed_with(driver) == 1000
        assert await closed_with(passenger) == 1000

    asyncio.run(scenario())
    assert server.stop() == 0
    [row] = server.call_logs()
    assert row["session_id"] == session["session_id"]
    assert row["status"] == "ended"
    assert row["end_reason"] == "user_terminated"
    assert row["initiated_by"] == "driver-1"
    assert row["created_at"] <= row["connected_at"] <= row["ended_at"]
