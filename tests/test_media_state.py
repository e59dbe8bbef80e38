"""``media_state`` against the real daemon (docs/protocol.md,
"media_state"): websockets clients report their peer connection as apps
do; nothing reaches the peer; the call log's media columns and ``/metrics``
(read with Prometheus' own parser) tell which calls really connected; a
restart goes on from the progress of its calls. No browser: the reports
are what an app sends on ``connectionstatechange``."""

from __future__ import annotations

import asyncio
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from test_restart import restart_env
from websockets.asyncio.client import ClientConnection

from conftest import (
    Clients,
    ServerProcess,
    closed_with,
    connected_call,
    in_loop,
    join,
    metric,
    recv_json,
    send_json,
    wait_until,
)


async def report(ws: ClientConnection, *states: dict[str, Any]) -> None:
    """Send ``media_state`` reports, then a heartbeat: its ``pong`` coming
    next proves the server took them and answered none of them."""
    for fields in states:
        await send_json(ws, {"type": "media_state", **fields})
    await send_json(ws, {"type": "heartbeat"})
    assert await recv_json(ws) == {"type": "pong"}


def families(server: ServerProcess) -> dict[str, Any]:
    """``GET /metrics`` parsed, by family name."""
    status, _, body = server.request("GET", "/metrics")
    assert status == 200, body
    return {family.name: family for family in text_string_to_metric_families(body.decode())}


def ended_row(server: ServerProcess) -> dict[str, Any]:
    return wait_until(lambda: next((r for r in server.call_logs() if r["status"] == "ended"), None))


@in_loop
async def test_reports_give_the_media_columns_and_metrics(server: ServerProcess, clients: Clients) -> None:
    """A call whose two apps report connecting, then connected (the driver over a host candidate; the
    passenger after one failure, through TURN): the peer never gets a report; a bad report gets
    invalid_message; /metrics counts the call once as media connected, once as failed, its candidate
    types and the time from the call's start; its row has the media columns."""
    session = server.new_session()
    d, p = await clients.pair(session)
    await send_json(d, {"type": "media_state", "state": "up", "candidate_type": "host"})
    assert await recv_json(d) == {
        "type": "error",
        "code": "invalid_message",
        "message": "field 'state' must be one of connecting, connected, disconnected, failed",
    }
    await report(d, {"state": "connecting"}, {"state": "connected", "candidate_type": "host", "rtt_ms": 3})
    await report(p, {"state": "connecting"}, {"state": "failed"})
    await report(p, {"state": "connected", "candidate_type": "relay", "rtt_ms": 41.5})
    offer = {"type": "offer", "sdp": "v=0\r\nafter the reports"}
    await send_json(d, offer)
    assert await recv_json(p) == offer  # the first thing the passenger gets: no report was relayed
    found = families(server)
    for name, kind in (
        ("intaleq_media_connected_calls", "counter"),
        ("intaleq_media_failed_calls", "counter"),
        ("intaleq_media_failures", "counter"),
        ("intaleq_media_candidates", "counter"),
        ("intaleq_media_connect_seconds", "histogram"),
    ):
        assert found[name].type == kind, name
    assert metric(server, "intaleq_media_connected_calls_total") == 1
    assert metric(server, "intaleq_calls_started_total") == 1  # the share of calls with media: 1/1
    assert metric(server, "intaleq_media_failed_calls_total") == 1
    assert metric(server, "intaleq_media_failures_total") == 1
    assert metric(server, "intaleq_media_candidates_total", candidate_type="host") == 1
    assert metric(server, "intaleq_media_candidates_total", candidate_type="relay") == 1
    assert metric(server, "intaleq_media_connect_seconds_count") == 1
    assert metric(server, "intaleq_media_connect_seconds_bucket", le="+Inf") == 1
    assert metric(server, "intaleq_media_connect_seconds_sum") >= 0
    assert metric(server, "intaleq_messages_relayed_total") == 1
    await send_json(d, {"type": "end_call"})
    assert await closed_with(d) == 1000 and await closed_with(p) == 1000
    row = ended_row(server)
    media = (row["driver_candidate"], row["passenger_candidate"], row["media_failures"])
    assert media == ("host", "relay", 1)
    assert row["connected_at"] <= row["driver_media_at"] <= row["passenger_media_at"] <= row["ended_at"]
    assert row["media_connected_at"] == row["passenger_media_at"]


@in_loop
async def test_media_state_before_authenticate_is_not_authenticated(
    server: ServerProcess, clients: Clients
) -> None:
    """docs/protocol.md, rule 1: like any other message first, unauthorized not_authenticated, close 4001."""
    ws = await clients.connect()
    await send_json(ws, {"type": "media_state", "state": "connected", "candidate_type": "host"})
    assert await recv_json(ws) == {"type": "unauthorized", "reason": "not_authenticated"}
    assert await closed_with(ws) == 4001
    assert metric(server, "intaleq_connections_rejected_total", reason="not_authenticated") == 1


def test_a_restart_goes_on_from_the_media_progress(server_factory: Any, tmp_path: Any) -> None:
    """docs/operations.md, "Restarts": the driver reported connected before a restart (ON_STOP=handoff),
    the passenger after it: media_connected_at is set at the passenger's report, counted by the process
    that saw it, and the driver's report is kept."""
    env = restart_env(tmp_path)
    first = server_factory(**env)
    session = first.new_session()

    async def before() -> None:
        d, p = await connected_call(first, session)
        await report(d, {"state": "connected", "candidate_type": "srflx"})
        first.proc.terminate()
        assert await closed_with(d) == 1012 and await closed_with(p) == 1012

    asyncio.run(before())
    assert first.stop() == 0
    second = server_factory(**env)

    async def after() -> None:
        d, _ = await join(second, session, "driver-1")
        p, _ = await join(second, session, "passenger-1")
        assert await recv_json(p) == {"type": "participant_joined", "role": "driver"}
        assert await recv_json(d) == {"type": "participant_joined", "role": "passenger"}
        await report(p, {"state": "connected", "candidate_type": "host"})
        assert metric(second, "intaleq_media_connected_calls_total") == 1
        await send_json(p, {"type": "end_call"})
        assert await closed_with(d) == 1000 and await closed_with(p) == 1000

    asyncio.run(after())
    row = ended_row(second)
    assert (row["driver_candidate"], row["passenger_candidate"]) == ("srflx", "host")
    assert row["driver_media_at"] < row["passenger_media_at"] == row["media_connected_at"]
