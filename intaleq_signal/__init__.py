"""intaleq-signal: the voice-call signaling backend of the Intaleq app.

Layout (one job per module):

- ``config``     settings from the environment, validated up front
- ``front``      each connection's HTTP requests (kept alive), answered or handed on
- ``wire``       the WebSocket connection after the upgrade
- ``http_api``   ``process_request``: /sessions, /health, /metrics
- ``signaling``  the protocol engine, sans I/O: auth, relay, endings,
                 heartbeat sweeps, against a ``Peer``, a ``Clock`` and a
                 ``SessionStore`` it is given
- ``serving``    the asyncio driver of the engine: connection handler,
                 heartbeat loop, drain; the loop as the engine's clock
- ``sessions``   the session store (in this process) and the hold queues
- ``lifecycle``  session, connection state machines as (state, event) tables
- ``diagrams``   the Mermaid diagrams of docs/design.md, from those tables
- ``messages``   client message validation, server message shapes
- ``ratelimit``  client IP, per-IP windows, per-connection token bucket
- ``calllog/``   call-log events, the writer thread pool, the local journal
                 and the stores (SQLite, MySQL; one schema as data)
- ``metrics``, ``logs``  Prometheus text and stderr logging
- ``exceptions`` every exception raised on purpose, as one documented tree
- ``server``     start-up, main loop, shutdown; ``__main__`` the CLI
- ``systemd``    sd_notify (READY=1, STOPPING=1, WATCHDOG=1), socket activation

``docs/design.md``, "Module map", says more.
"""

__version__ = "0.1.0"
