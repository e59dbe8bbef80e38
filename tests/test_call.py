"""A whole call through the real daemon: the first thing that must work."""

from __future__ import annotations

import asyncio

import pytest

from conftest import join, recv_json, relay_and_end

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

        await relay_and_end(driver, passenger)

    asyncio.run(scenario())
    assert server.stop() == 0
    [row] = server.call_logs()
    assert row["session_id"] == session["session_id"]
    assert row["status"] == "ended"
    assert row["end_reason"] == "user_terminated"
    assert row["initiated_by"] == "driver-1"
    assert row["created_at"] <= row["connected_at"] <= row["ended_at"]
