"""Logging to stderr in ``text`` or ``json`` (one object per line)
(docs/operations.md, "Logs").

Never log the API key, SDP bodies or ICE candidates above ``debug``.

When stderr is a journald stream (systemd.exec(5) ``JOURNAL_STREAM``), every
line starts with its syslog priority, ``<2>`` critical … ``<7>`` debug
(sd-daemon(3)), so ``journalctl -p warning`` selects by level.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
from collections.abc import Mapping
from typing import IO

__all__ = ["setup_logging", "stderr_is_journal", "syslog_priority"]

_JOURNAL_STREAM = re.compile(r"([0-9]{1,20}):([0-9]{1,20})")  # ASCII digits: str.isdigit() takes "²"
_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warn": logging.WARNING, "error": logging.ERROR}


class JSONFormatter(logging.Formatter):
    """``{"ts": ISO-8601 UTC, "level", "logger", "msg"[, "exc"]}`` per line."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def syslog_priority(levelno: int) -> int:
    """The syslog priority of a logging level (RFC 5424 §6.2.1 severities):
    critical 2, error 3, warning 4, info 6, debug (and below) 7; a custom
    level takes the priority of the standard level at or below it."""
    if levelno >= logging.CRITICAL:
        return 2
    if levelno >= logging.ERROR:
        return 3
    if levelno >= logging.WARNING:
        return 4
    if levelno >= logging.INFO:
        return 6
    return 7


class JournalPrefix(logging.Formatter):
    """Put ``<priority>`` (sd-daemon(3)) before each line ``inner`` makes.

    journald reads one priority per line of a stream, so every line of a
    multi-line record (a traceback in the text format) gets the prefix,
    not only the first; a JSON record is always one line.
    """

    def __init__(self, inner: logging.Formatter) -> None:
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{syslog_priority(record.levelno)}>"
        return "\n".join(prefix + line for line in self.inner.format(record).split("\n"))


def stderr_is_journal(env: Mapping[str, str] | None = None, stream: IO[str] | None = None) -> bool:
    """Whether ``stream`` (stderr) is the journald stream systemd connected.

    systemd.exec(5): for ``StandardError=journal`` systemd sets
    ``JOURNAL_STREAM=<device>:<inode>`` (decimal) of that stream; a process
    compares it with ``fstat()`` of its stderr, since a child whose stderr was
    redirected inherits the variable too (sd-daemon(3)). Unset, malformed or
    not matching: False.
    """
    match = _JOURNAL_STREAM.fullmatch((os.environ if env is None else env).get("JOURNAL_STREAM", ""))
    if match is None:
        return False
    try:
        status = os.fstat((sys.stderr if stream is None else stream).fileno())
    except (AttributeError, OSError, ValueError):  # no stream, no descriptor, closed
        return False
    return (status.st_dev, status.st_ino) == (int(match.group(1)), int(match.group(2)))


def setup_logging(level: str, fmt: str) -> None:
    """Route every logger to stderr at ``level`` (``debug`` … ``error``).

    The websockets library logs only warnings and errors: its per-connection
    info lines ("connection open", "HTTP response sent") would drown ours.
    Lines carry syslog priority prefixes when stderr is the journal
    (:func:`stderr_is_journal`).
    """
    handler = logging.StreamHandler(sys.stderr)
    formatter: logging.Formatter
    if fmt == "json":
        formatter = JSONFormatter()
    else:
        formatter = logging.Formatter(
            "%(asctime)s.%(msecs)03dZ %(levelname)s %(name)s: %(message)s", "%Y-%m-%dT%H:%M:%S"
        )
        formatter.converter = time.gmtime
    if stderr_is_journal():
        formatter = JournalPrefix(formatter)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(_LEVELS[level])
    library = logging.getLogger("websockets")
    library.setLevel(max(_LEVELS[level], logging.WARNING))
    # asyncio's own debug line ("Using selector: EpollSelector") on every
    # start says nothing about the daemon, and would come before the one
    # line of a start-up that fails inside the loop.
    logging.getLogger("asyncio").setLevel(max(_LEVELS[level], logging.INFO))
    # Filters apply where a record is made, so on the child logger itself.
    logging.getLogger("websockets.server").addFilter(_quiet_failed_handshakes)


def _quiet_failed_handshakes(record: logging.LogRecord) -> bool:
    """websockets < 15 logs every connection that ends before a whole
    request (a port probe, a client gone, our own 400) as an ERROR with a
    traceback; that is routine on a public port, not an error."""
    return record.getMessage() != "opening handshake failed"
