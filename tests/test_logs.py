"""Syslog priority prefixes on stderr when it is the journal (sd-daemon(3),
systemd.exec(5) ``JOURNAL_STREAM``), checked in real processes whose stderr
is a file standing in for journald's stream."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import daemon_env, run_daemon
from intaleq_signal.logs import stderr_is_journal, syslog_priority

#: Logs one record per level, a two-line message and an exception with its
#: traceback, through setup_logging(level="debug", fmt=sys.argv[1]).
LOGGING_SCRIPT = textwrap.dedent(
    """
    import logging, sys
    from intaleq_signal.logs import setup_logging
    setup_logging("debug", sys.argv[1])
    log = logging.getLogger("intaleq_signal.test")
    log.debug("a debug record")
    log.info("an info record")
    log.warning("a warning record")
    log.error("an error record")
    log.critical("a critical record")
    log.info("first line\\nsecond line")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        log.exception("an exception record")
    """
)


def stream_id(path: Path) -> str:
    """``JOURNAL_STREAM``'s value for a file: ``<st_dev>:<st_ino>`` in decimal."""
    status = os.stat(path)
    return f"{status.st_dev}:{status.st_ino}"


def log_to_file(tmp_path: Path, fmt: str, journal_stream: str | None) -> list[str]:
    """Run :data:`LOGGING_SCRIPT` with stderr on a file and ``JOURNAL_STREAM``
    set to ``journal_stream`` (``"match"``: that file's own) or unset; its lines."""
    path = tmp_path / f"stderr-{fmt}.log"
    path.touch()
    env = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
    if journal_stream is not None:
        env["JOURNAL_STREAM"] = stream_id(path) if journal_stream == "match" else journal_stream
    with open(path, "w", encoding="utf-8") as stderr:
        subprocess.run(
            [sys.executable, "-c", LOGGING_SCRIPT, fmt], env=env, stderr=stderr, check=True, timeout=30
        )
    return path.read_text(encoding="utf-8").splitlines()


def test_text_lines_carry_syslog_priorities_on_the_journal(tmp_path) -> None:
    """sd-daemon(3): with stderr the journal, each text line starts <7> debug, <6> info,
    <4> warning, <3> error, <2> critical; every line of a multi-line record keeps it."""
    lines = log_to_file(tmp_path, "text", "match")
    for prefix, text in (
        ("<7>", "DEBUG intaleq_signal.test: a debug record"),
        ("<6>", "INFO intaleq_signal.test: an info record"),
        ("<4>", "WARNING intaleq_signal.test: a warning record"),
        ("<3>", "ERROR intaleq_signal.test: an error record"),
        ("<2>", "CRITICAL intaleq_signal.test: a critical record"),
    ):
        line = next(line for line in lines if line.endswith(text))
        assert line.startswith(prefix), line
    assert "<6>second line" in lines
    start = next(i for i, line in enumerate(lines) if line.endswith("an exception record"))
    traceback = lines[start:]
    assert traceback[1] == "<3>Traceback (most recent call last):", traceback
    assert traceback[-1] == "<3>RuntimeError: boom", traceback
    assert all(line.startswith("<3>") for line in traceback), traceback
    assert len(lines) == 5 + 2 + len(traceback)


def test_json_lines_carry_syslog_priorities_on_the_journal(tmp_path) -> None:
    """sd-daemon(3): with stderr the journal, a JSON record is <priority> then one object;
    a traceback stays inside the object, so one prefixed line per record."""
    lines = log_to_file(tmp_path, "json", "match")
    assert len(lines) == 7, lines
    priorities = {"debug": 7, "info": 6, "warning": 4, "error": 3, "critical": 2}
    for line in lines:
        prefix, sep, document = line.partition(">")
        record = json.loads(document)
        assert sep and prefix == f"<{priorities[record['level']]}", line
    assert "RuntimeError: boom" in json.loads(lines[-1].partition(">")[2])["exc"]


@pytest.mark.parametrize("journal_stream", [None, "other-file", "12:34", "", "garbage", "1:2:3"])
@pytest.mark.parametrize("fmt", ["text", "json"])
def test_no_priorities_when_stderr_is_not_the_journal(tmp_path, fmt: str, journal_stream: str | None) -> None:
    """systemd.exec(5): JOURNAL_STREAM unset, malformed or naming another file (a child whose
    stderr was redirected inherits it) means stderr is not the journal: no prefixes."""
    if journal_stream == "other-file":
        other = tmp_path / "other.log"
        other.touch()
        journal_stream = stream_id(other)
    lines = log_to_file(tmp_path, fmt, journal_stream)
    assert any("an error record" in line for line in lines), lines
    assert not any(line.startswith("<") for line in lines), lines


def test_daemon_logs_with_priorities_on_the_journal(server_factory, tmp_path) -> None:
    """sd-daemon(3): the daemon itself, stderr on the journal: "listening on" is <6>,
    a wrong API key <4>, so `journalctl -p warning` shows the latter only."""
    path = tmp_path / "daemon.log"
    path.touch()
    server = server_factory(stderr_path=path, LOG_LEVEL="info", JOURNAL_STREAM=stream_id(path))
    listening = server.wait_for_log("listening on")
    assert listening.startswith("<6>"), listening
    assert server.request("POST", "/sessions", b"{}", {"X-API-Key": "w" * 40})[0] == 401
    assert server.wait_for_log("wrong API key").startswith("<4>")
    assert server.stop() == 0, server.log
    lines = server.log.splitlines()
    assert lines and all(re.match(r"<[2-7]>\S", line) for line in lines), lines


@pytest.mark.parametrize(
    ("level", "priority"),
    [
        (logging.CRITICAL, 2),
        (logging.ERROR + 5, 3),
        (logging.ERROR, 3),
        (logging.WARNING, 4),
        (logging.INFO + 1, 6),
        (logging.INFO, 6),
        (logging.DEBUG, 7),
        (5, 7),
    ],
)
def test_syslog_priority(level: int, priority: int) -> None:
    """RFC 5424 §6.2.1 severities; a custom level takes the standard one at or below it."""
    assert syslog_priority(level) == priority


def test_stderr_is_journal_compares_device_and_inode(tmp_path) -> None:
    """systemd.exec(5): JOURNAL_STREAM matches only the stream with that st_dev:st_ino."""
    path = tmp_path / "stream.log"
    with open(path, "w", encoding="utf-8") as stream:
        status = os.fstat(stream.fileno())
        assert stderr_is_journal({"JOURNAL_STREAM": f"{status.st_dev}:{status.st_ino}"}, stream)
        assert not stderr_is_journal({"JOURNAL_STREAM": f"{status.st_dev}:{status.st_ino + 1}"}, stream)
        assert not stderr_is_journal({"JOURNAL_STREAM": f"{status.st_dev + 1}:{status.st_ino}"}, stream)
        assert not stderr_is_journal({}, stream)
        assert not stderr_is_journal({"JOURNAL_STREAM": "\u00b2:\u00b3"}, stream)
    assert not stderr_is_journal({"JOURNAL_STREAM": f"{status.st_dev}:{status.st_ino}"}, stream)  # closed


def test_the_line_that_stops_the_process_is_an_error_on_the_journal(tmp_path) -> None:
    """A configuration error's one line carries ``<3>`` on the journal, and
    no prefix elsewhere."""
    for journal in (True, False):
        path = tmp_path / f"stop-{journal}.log"
        path.touch()
        journal_stream = {"JOURNAL_STREAM": stream_id(path)} if journal else {}
        done = run_daemon(daemon_env(tmp_path, API_KEY="short", **journal_stream), stderr_path=path)
        assert done.returncode == 78
        [line] = done.stderr.splitlines()
        expected = (
            "<3>intaleq-signal: configuration error: API_KEY" if journal else "intaleq-signal: configuration"
        )
        assert line.startswith(expected), line
