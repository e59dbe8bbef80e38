"""Production operation (docs/operations.md, "systemd", "Logs", "Health and
metrics"): systemd notifications and unit hardening, Prometheus exposition,
logging content and format."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import API_KEY, closed_with, connected_call, recv_json, run_daemon, send_json
from intaleq_signal.config import MAX_DB_POOL_SIZE, MAX_THREADS, OTHER_THREADS
from intaleq_signal.systemd import Notifier

ROOT = Path(__file__).resolve().parent.parent

SDP_OFFER = "v=0\r\no=- 4611731400430051336 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\na=secret-offer-marker\r\n"
SDP_ANSWER = "v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\na=secret-answer-marker\r\n"
CANDIDATE = "candidate:842163049 1 udp 1677729535 198.51.100.77 46154 typ srflx secret-candidate-marker"


@pytest.fixture
def notify_socket(tmp_path):
    """A datagram socket standing in for systemd's NOTIFY_SOCKET."""
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(10)
    yield path, sock
    sock.close()


def datagrams(sock: socket.socket, until: str, timeout: float = 10.0) -> list[str]:
    """Read notifications until one contains ``until``."""
    seen = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        message = sock.recv(4096).decode()
        seen.append(message)
        if until in message.split("\n"):
            return seen
    raise AssertionError(f"{until} not received: {seen}")


def run_call(server, ride_id: str) -> None:
    session = server.new_session(ride_id=ride_id)

    async def scenario() -> None:
        driver, passenger = await connected_call(server, session)
        await send_json(driver, {"type": "offer", "sdp": SDP_OFFER})
        assert (await recv_json(passenger))["sdp"] == SDP_OFFER
        await send_json(passenger, {"type": "answer", "sdp": SDP_ANSWER})
        await recv_json(driver)
        candidate = {"candidate": CANDIDATE, "sdpMid": "0", "sdpMLineIndex": 0}
        await send_json(driver, {"type": "ice_candidate", "candidate": candidate})
        await recv_json(passenger)
        await send_json(passenger, {"type": "end_call"})
        assert await closed_with(driver) == 1000

    asyncio.run(scenario())


def test_ready_watchdog_and_stopping_notifications(server_factory, notify_socket) -> None:
    """docs/operations.md, "systemd": READY=1 once listening, WATCHDOG=1 from the loop,
    STOPPING=1 on SIGTERM."""
    path, sock = notify_socket
    server = server_factory(NOTIFY_SOCKET=str(path), WATCHDOG_USEC="400000")
    ready = datagrams(sock, "READY=1")
    assert any("STATUS=listening on 127.0.0.1:" in message for message in ready)
    # the socket listens by the time READY=1 is sent
    with socket.create_connection(("127.0.0.1", server.port), timeout=2):
        pass
    started = time.monotonic()
    pings = [m for m in datagrams(sock, "WATCHDOG=1") + datagrams(sock, "WATCHDOG=1") if m == "WATCHDOG=1"]
    assert len(pings) >= 2
    assert time.monotonic() - started < 2.0  # every WATCHDOG_USEC/2 = 0.2 s, not once a minute
    server.proc.send_signal(15)
    assert datagrams(sock, "STOPPING=1")
    assert server.stop() == 0


def test_no_watchdog_pings_for_another_pid(server_factory, notify_socket) -> None:
    """sd_watchdog_enabled(3): WATCHDOG_PID naming another process means no pings from this one."""
    path, sock = notify_socket
    server_factory(NOTIFY_SOCKET=str(path), WATCHDOG_USEC="200000", WATCHDOG_PID="1")
    datagrams(sock, "READY=1")
    sock.settimeout(1.0)
    with pytest.raises(TimeoutError):
        sock.recv(4096)


def test_notifier_without_socket_is_a_no_op() -> None:
    """Outside systemd (no NOTIFY_SOCKET) notifications do nothing and never raise."""
    notifier = Notifier({})
    assert notifier.ready("x") is False
    assert notifier.watchdog_interval is None
    broken = Notifier({"NOTIFY_SOCKET": "/nonexistent/socket", "WATCHDOG_USEC": "30000000"})
    assert broken.watchdog_interval == 15.0
    assert broken.watchdog() is False


def test_notifier_abstract_socket_address() -> None:
    """sd_notify(3): an address starting with @ is in the abstract namespace."""
    assert Notifier({"NOTIFY_SOCKET": "@/org/freedesktop/systemd1/notify"}).address == (
        "\0/org/freedesktop/systemd1/notify"
    )


def test_unit_file_directives() -> None:
    """docs/operations.md, "systemd": the unit has the settings the operation depends on."""
    unit = (ROOT / "intaleq-signal.service").read_text()
    directives = {line.strip() for line in unit.splitlines() if "=" in line and not line.startswith("#")}
    for required in (
        "Type=notify",
        "User=intaleq-signal",
        "EnvironmentFile=/etc/intaleq-signal/intaleq-signal.env",
        "MemoryMax=128M",
        "RestartPreventExitStatus=78",
        "Restart=on-failure",
        "WatchdogSec=30s",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "PrivateDevices=yes",
        "CapabilityBoundingSet=",
        "SystemCallFilter=@system-service",
    ):
        assert required in directives, required
    assert any(d.startswith("RestrictAddressFamilies=") for d in directives)


def unit_setting(name: str) -> str:
    """The value of the one ``name=`` line of the unit."""
    unit = (ROOT / "intaleq-signal.service").read_text()
    values = re.findall(rf"^{name}=(.*)$", unit, re.M)
    assert len(values) == 1, values
    return values[0].strip()


def test_tasks_max_covers_every_thread_the_code_can_start() -> None:
    """systemd.resource-control(5): TasksMax counts threads. It is at least MAX_THREADS
    (DB_POOL_SIZE's upper bound of writers plus every other thread, config.py), and the
    unit's comment shows that sum."""
    tasks_max = int(unit_setting("TasksMax"))
    assert tasks_max >= MAX_THREADS, (tasks_max, MAX_THREADS)
    assert MAX_THREADS == MAX_DB_POOL_SIZE + sum(count for _, count in OTHER_THREADS)
    unit = (ROOT / "intaleq-signal.service").read_text()
    assert f"= {MAX_THREADS} (intaleq_signal/config.py MAX_THREADS)" in unit


def test_default_executor_count_matches_python(monkeypatch) -> None:
    """The default executor's count in OTHER_THREADS: run_in_executor(None, ...) uses
    ThreadPoolExecutor's default max_workers (Python docs, concurrent.futures), which
    stays within that count however many CPUs the host has."""
    counts = dict(OTHER_THREADS)
    for name in ("cpu_count", "process_cpu_count"):  # 3.13 sizes by process_cpu_count
        if hasattr(os, name):
            monkeypatch.setattr(os, name, lambda: 4096)
    executor = concurrent.futures.ThreadPoolExecutor()
    assert executor._max_workers <= counts["event loop default executor"]
    executor.shutdown()


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed here")
def test_unit_files_verify_without_warnings(tmp_path) -> None:
    """systemd-analyze(1) verify: every line of the service and of its socket unit parses
    (an unknown key or a bad value such as TasksMax=sixty is only a warning to systemd, so
    no output is allowed), and the socket finds its service by name. ExecStart points at an
    existing program in the copy, the venv not being installed here."""
    unit = (ROOT / "intaleq-signal.service").read_text()
    copy = tmp_path / "intaleq-signal.service"
    copy.write_text(re.sub(r"^ExecStart=.*$", "ExecStart=/bin/true", unit, count=1, flags=re.M))
    socket_copy = tmp_path / "intaleq-signal.socket"
    socket_copy.write_text((ROOT / "intaleq-signal.socket").read_text())
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(copy), str(socket_copy)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "intaleq-signal." not in output, output


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed here")
def test_unit_security_exposure_is_ok() -> None:
    """docs/operations.md, "systemd": systemd-analyze security rates the unit OK or better
    (exposure <= 2.0)."""
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", str(ROOT / "intaleq-signal.service")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    output = result.stdout + result.stderr
    line = next(line for line in output.splitlines() if "Overall exposure level" in line)
    exposure = float(line.split(":")[-1].split()[0])
    assert exposure <= 2.0, line


def test_metrics_parse_as_prometheus_text(server) -> None:
    """docs/protocol.md, "GET /metrics": valid exposition text with the listed counters, gauges
    and a histogram."""
    run_call(server, "ride-metrics")
    server.post_session(key="wrong-key-for-metrics-" * 2)
    status, headers, body = server.request("GET", "/metrics")
    assert status == 200, body
    assert headers["content-type"].startswith("text/plain; version=0.0.4")
    families = {family.name: family for family in text_string_to_metric_families(body.decode())}
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in families.values()
        for sample in family.samples
    }
    assert families["intaleq_sessions_created"].type == "counter"
    assert samples[("intaleq_sessions_created_total", ())] == 1
    assert samples[("intaleq_calls_started_total", ())] == 1
    assert samples[("intaleq_calls_ended_total", (("reason", "user_terminated"),))] == 1
    assert samples[("intaleq_messages_relayed_total", ())] == 3
    assert families["intaleq_relay_latency_seconds"].type == "histogram"
    assert samples[("intaleq_relay_latency_seconds_count", ())] == 3
    assert samples[("intaleq_relay_latency_seconds_bucket", (("le", "+Inf"),))] == 3
    assert 0 < samples[("intaleq_relay_latency_seconds_sum", ())] < 3
    for gauge in (
        "intaleq_sessions_live",
        "intaleq_calls_active",
        "intaleq_connections_open",
        "intaleq_calllog_writes_pending",
        "intaleq_calllog_database_up",
    ):
        assert families[gauge].type == "gauge", gauge
    assert samples[("intaleq_calllog_database_up", ())] == 1
    for counter in (
        "intaleq_calllog_writes",
        "intaleq_calllog_writes_failed",
        "intaleq_calllog_events_dropped",
        "intaleq_connections_rejected",
    ):
        assert families[counter].type == "counter", counter


def test_info_logs_never_carry_key_sdp_or_candidates(server_factory) -> None:
    """docs/operations.md, "Logs": a full call at info logs its events but never the API key,
    SDP bodies or candidates."""
    server = server_factory(LOG_LEVEL="info")
    server.post_session(key="x" * 40)  # a wrong key is logged, never echoed
    run_call(server, "ride-log-leak")
    assert server.stop() == 0
    log = server.log
    for secret in (
        API_KEY,
        "x" * 40,
        "secret-offer-marker",
        "secret-answer-marker",
        "secret-candidate-marker",
        "198.51.100.77",
    ):
        assert secret not in log, secret
    for event in (
        "session created",
        "participant joined",
        "call active",
        "call ended",
        "reason=user_terminated",
        "duration=",
        "wrong API key",
    ):
        assert event in log, event
    assert " DEBUG " not in log


def test_debug_logs_show_relayed_messages(server_factory) -> None:
    """docs/operations.md, "Logs": SDP and candidates appear only at debug level."""
    server = server_factory(LOG_LEVEL="debug")
    run_call(server, "ride-debug")
    server.wait_for_log("secret-offer-marker")


def test_json_log_format_is_one_object_per_line(server_factory) -> None:
    """docs/operations.md, "Logs": LOG_FORMAT=json writes one JSON object per line."""
    server = server_factory(LOG_FORMAT="json", LOG_LEVEL="info")
    run_call(server, "ride-json")
    assert server.stop() == 0
    lines = [line for line in server.log.splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]
    assert all({"ts", "level", "logger", "msg"} <= set(record) for record in records)
    assert any(record["msg"].startswith("listening on") for record in records)
    assert any("call ended" in record["msg"] and record["level"] == "info" for record in records)


def test_refused_connection_logged_with_reason_and_ip(server) -> None:
    """docs/operations.md, "Logs": a refused connection is one line with its reason and the client IP."""

    async def scenario() -> None:
        async with server.ws(additional_headers={"X-Real-IP": "203.0.113.50"}) as ws:
            await send_json(ws, {"type": "authenticate", "session_id": "nope", "user_id": "u"})
            assert (await recv_json(ws))["reason"] == "session_not_found"

    asyncio.run(scenario())
    line = server.wait_for_log("connection refused reason=session_not_found")
    assert "ip=203.0.113.50" in line


def test_port_in_use_is_one_line_and_writes_nothing(server, tmp_path) -> None:
    """A second daemon on a taken address says so in one line, exits 1,
    and neither opens, writes nor warns about the call log."""
    sqlite_path = tmp_path / "second.sqlite3"
    env = {
        **server.env,
        "SQLITE_PATH": str(sqlite_path),
        "LOG_LEVEL": "info",
        "JOURNAL_STREAM": "",
    }
    done = run_daemon(env)
    assert done.returncode == 1, done.stderr
    lines = done.stderr.strip().splitlines()
    assert lines == [
        f"intaleq-signal: cannot listen on 127.0.0.1:{server.port}: " + lines[0].split(": ", 2)[2]
    ]
    assert "in use" in lines[0]
    assert not sqlite_path.exists()  # not even created


def test_no_thread_for_the_call_log_is_one_line_and_exit_78(monkeypatch, capsys) -> None:
    """Running out of tasks (systemd TasksMax=) at start: one line, and the
    status systemd does not restart on."""
    from intaleq_signal import __main__ as entry
    from intaleq_signal.calllog.writer import StartError

    def refuse(config: object) -> None:
        raise StartError("cannot start call-log thread 3 of 5 (can't start new thread): ...")

    monkeypatch.setenv("API_KEY", API_KEY)
    monkeypatch.setenv("ENVIRONMENT", "development")
    monkeypatch.setattr(entry, "run", refuse)
    assert entry.main([]) == 78
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("intaleq-signal: cannot start call-log thread 3 of 5"), err


def test_template_unit_is_the_service_but_for_the_instance_lines() -> None:
    """docs/operations.md, "Several instances": intaleq-signal@.service is
    intaleq-signal.service line for line (hardening, limits, restarts),
    but for its description, its ordering after Redis, the per-instance
    environment file and the per-instance settings on its command line."""

    def directives(name: str) -> list[str]:
        text = (ROOT / name).read_text()
        return [line for line in text.splitlines() if line and not line.startswith("#")]

    service, template = directives("intaleq-signal.service"), directives("intaleq-signal@.service")
    differing = {line.partition("=")[0] for line in set(service) ^ set(template)}
    assert differing == {"Description", "After", "EnvironmentFile", "ExecStart"}, differing
    assert "EnvironmentFile=-/etc/intaleq-signal/%i.env" in template
    [start] = [line for line in template if line.startswith("ExecStart=")]
    assert start == (
        "ExecStart=/usr/bin/env SERVER_ADDR=127.0.0.1:%i NODE_ID=%H:%i"
        " JOURNAL_PATH=intaleq-signal-%i.journal /opt/intaleq-signal/venv/bin/intaleq-signal"
    )
    assert [line for line in template if not line.startswith(tuple(differing))] == [
        line for line in service if not line.startswith(tuple(differing))
    ]
