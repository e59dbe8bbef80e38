"""intaleq-signal: the voice-call signaling backend of the Intaleq app.

Layout (one job per module):

- ``config``     settings from the environment, validated up front (SPEC §2)
- ``wire``       request bodies on the WebSocket port (SPEC §1 obstacle)
- ``http_api``   ``process_request``: /sessions, /health, /metrics (SPEC §3)
- ``signaling``  the WebSocket protocol: auth, relay, endings, heartbeat (§4)
- ``sessions``   the session registry and the per-direction hold queues
- ``lifecycle``  session and connection state machines, as data
- ``messages``   client message validation, server message shapes
- ``ratelimit``  client IP, per-IP windows, per-connection token bucket
- ``calllog/``   call-log events, the writer thread pool and its stores (§5)
- ``metrics``, ``logs``  Prometheus text and stderr logging (§6)
- ``server``     start-up, signals and graceful shutdown; ``__main__`` the CLI
"""

__version__ = "0.1.0"
