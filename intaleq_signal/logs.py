"""Logging to stderr in ``text`` or ``json`` (one object per line), SPEC §6.

Never log the API key, SDP bodies or ICE candidates above ``debug``.
"""

from __future__ import annotations

import json
import logging
import sys
import time

__all__ = ["setup_logging"]

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


def setup_logging(level: str, fmt: str) -> None:
    """Route every logger to stderr at ``level`` (``debug`` … ``error``).

    The websockets library logs only warnings and errors: its per-connection
    info lines ("connection open", "HTTP response sent") would drown ours.
    """
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JSONFormatter())
    else:
        formatter = logging.Formatter(
            "%(asctime)s.%(msecs)03dZ %(levelname)s %(name)s: %(message)s", "%Y-%m-%dT%H:%M:%S"
        )
        formatter.converter = time.gmtime
        handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(_LEVELS[level])
    library = logging.getLogger("websockets")
    library.setLevel(max(_LEVELS[level], logging.WARNING))
    # Filters apply where a record is made, so on the child logger itself.
    logging.getLogger("websockets.server").addFilter(_quiet_failed_handshakes)


def _quiet_failed_handshakes(record: logging.LogRecord) -> bool:
    """websockets < 15 logs every connection that ends before a whole
    request (a port probe, a client gone, our own 400) as an ERROR with a
    traceback; that is routine on a public port, not an error."""
    return record.getMessage() != "opening handshake failed"
