"""intaleq-signal: the voice-call signaling backend of the Intaleq app.

Layout (one job per module):

- ``config``     settings from the environment, validated up front
- ``front``      each connection's HTTP request, answered or handed on
- ``wire``       the WebSocket connection after the upgrade
- ``http_api``   ``process_request``: /sessions, /health, /metrics
- ``signaling``  the WebSocket protocol: auth, relay, endings, heartbeat
- ``sessions``   the session registry and the per-direction hold queues
- ``lifecycle``  session and connection state machines, as data
- ``messages``   client message validation, server message shapes
- ``ratelimit``  client IP, per-IP windows, per-connection token bucket
- ``calllog/``   call-log events, the writer thread pool and its stores
- ``metrics``, ``logs``  Prometheus text and stderr logging
- ``exceptions`` every exception raised on purpose, as one documented tree
- ``server``     start-up, signals and graceful shutdown; ``__main__`` the CLI

``docs/design.md``, "Module map", says more.
"""

__version__ = "0.1.0"
