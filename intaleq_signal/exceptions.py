"""Every exception intaleq-signal raises on purpose, in one tree:

```
SignalingError            base of them all
├── Refusal               a request or message refused: code, message, http_status, headers
│   ├── MessageError      a client WebSocket message refused (no http_status)
│   ├── RideConflict      409 ride_conflict: the ride's live session has other participants
│   ├── Capacity          503 capacity: MAX_SESSIONS live sessions are held already
│   └── Unavailable       503 unavailable: the shared state (Redis) is unreachable; retry
├── StartupError          the process cannot start: exit_status, and line() for stderr
│   ├── ConfigError       exit 78: a setting is missing or invalid
│   │   └── StoreError    exit 78: a call-log file (SQLITE_PATH, JOURNAL_PATH) is unusable
│   │       └── JournalError  exit 78: the journal file, named by JOURNAL_PATH
│   ├── StartError        exit 78: the system refused a call-log thread (TasksMax=)
│   ├── ListenError       exit 1: the listening socket cannot be opened
│   └── RedisError        exit 1: Redis (REDIS_URL) cannot be reached at start
├── EventDecodeError      a journal entry this version cannot read (logged and dropped)
└── LifecycleError        an illegal state transition: a bug, never a client's doing
```

A :class:`Refusal` is what a client gets back. ``code`` is the stable
error code of ``docs/protocol.md``; ``message`` is the text for humans.
``http_status`` (with ``headers``, such as ``Allow`` or ``Retry-After``)
is set when it is answered over HTTP (``docs/protocol.md``, "HTTP API",
"Anything else"): ``front.error_response`` renders it as the JSON body
``{"error": code, "message": message}``. Over the WebSocket,
``messages.error_message`` renders it as the ``error`` message
``{"type": "error", "code": ..., "message": ...}`` (``docs/protocol.md``,
"Server → client"). The text of each is part of the protocol: tests compare
the bytes.

A :class:`StartupError` stops the process before it serves: ``__main__``
prints :meth:`StartupError.line` (one line) and exits with
:attr:`StartupError.exit_status`. 78 is sysexits.h ``EX_CONFIG``: the
systemd unit lists it in ``RestartPreventExitStatus=``, because restarting
cannot fix a setting or a limit (``docs/operations.md``, "systemd").

The modules that raise these also export the names they raise
(``messages.MessageError``, ``config.ConfigError``, ...).
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

__all__ = [
    "EX_CONFIG",
    "Capacity",
    "ConfigError",
    "EventDecodeError",
    "JournalError",
    "LifecycleError",
    "ListenError",
    "MessageError",
    "Refusal",
    "RedisError",
    "RideConflict",
    "SignalingError",
    "StartError",
    "StartupError",
    "StoreError",
    "Unavailable",
]

#: Exit status for bad configuration (sysexits.h ``EX_CONFIG``).
EX_CONFIG = 78

_NO_HEADERS: Mapping[str, str] = MappingProxyType({})


class SignalingError(Exception):
    """Base of every exception this package raises on purpose."""


class Refusal(SignalingError):
    """A request or message refused, and how the client is told.

    Args:
        code: the protocol's error code (``invalid_json``, ``not_found``, ...).
        message: the human-readable text sent with it; also ``str()``.
        http_status: the HTTP status when answered over HTTP, else None.
        headers: extra HTTP response headers (``Allow``, ``Retry-After``).
    """

    def __init__(
        self,
        code: str,
        message: str,
        *,
        http_status: int | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.http_status = http_status
        self.headers = headers or _NO_HEADERS


class MessageError(Refusal):
    """A client WebSocket message refused (``docs/protocol.md``, rule 7):
    ``invalid_json``, ``invalid_message`` or ``unknown_type`` in an
    ``error`` message, or before authentication the ``unauthorized``
    reason (rule 1)."""


class RideConflict(Refusal):
    """``POST /sessions`` for a ride whose live session has other
    participants: 409 ``ride_conflict`` (``docs/protocol.md``, "POST
    /sessions")."""

    def __init__(self, ride_id: str = "") -> None:
        super().__init__(
            "ride_conflict", "this ride has a live session with other participants", http_status=409
        )
        self.ride_id = ride_id


class Capacity(Refusal):
    """``MAX_SESSIONS`` live sessions are held already, or the server is
    stopping: 503 ``capacity`` (``http_api`` answers ``shutting_down``
    instead while stopping)."""

    def __init__(self) -> None:
        super().__init__("capacity", "too many live sessions; retry later", http_status=503)


class Unavailable(Refusal):
    """The shared state of several instances (Redis) cannot be reached:
    ``POST /sessions`` gets 503, an ``authenticate`` the ``error``
    ``unavailable`` and may be sent again on the same socket
    (``docs/protocol.md``, "Every refusal, error and ending, and what to do")."""

    def __init__(self) -> None:
        super().__init__(
            "unavailable",
            "the shared state is unreachable; retry in a moment",
            http_status=503,
            headers={"Retry-After": "1"},
        )


class StartupError(SignalingError):
    """The process cannot start; ``str()`` is one line for the operator."""

    #: The process's exit status (1: a failure a restart may cure).
    exit_status = 1

    def line(self) -> str:
        """The line printed on stderr before exiting."""
        return str(self)


class ConfigError(StartupError):
    """A configuration value is missing or invalid; ``str()`` names the
    variable (``docs/operations.md``, "Configuration")."""

    exit_status = EX_CONFIG

    def line(self) -> str:
        return f"configuration error: {self}"


class StoreError(ConfigError):
    """A call-log file cannot be used at start (the SQLite call log, the
    journal); ``str()`` names the setting."""


class JournalError(StoreError):
    """The journal file cannot be used: it cannot be opened, is not SQLite,
    or another process holds it; ``str()`` names ``JOURNAL_PATH``."""


class StartError(StartupError):
    """The call-log writer's threads could not be started: the system
    refused a new thread (systemd ``TasksMax=`` below what ``DB_POOL_SIZE``
    needs). Restarting cannot help: a limit to raise."""

    exit_status = EX_CONFIG


class ListenError(StartupError):
    """The listening socket could not be opened (``SERVER_ADDR`` taken, or
    not this host's); the ``OSError`` is chained. Exit 1: the unit's
    ``Restart=on-failure`` tries again."""


class RedisError(StartupError):
    """Redis (``REDIS_URL``) could not be reached at start, or another live
    instance holds this ``NODE_ID`` there. Exit 1: the unit's
    ``Restart=on-failure`` tries again."""


class EventDecodeError(SignalingError):
    """A journal entry is not an event this version knows
    (:func:`~intaleq_signal.calllog.events.decode`)."""


class LifecycleError(SignalingError):
    """An illegal session or connection state transition was requested (a
    programming error; ``docs/design.md``, "State machines")."""
