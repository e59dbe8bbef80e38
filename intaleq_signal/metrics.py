"""Counters and gauges of one process, rendered in the Prometheus text
exposition format (SPEC §3 ``/metrics``).

Counters are plain attributes bumped on the event loop; gauges are read at
scrape time from callables, so the hot path pays one integer addition.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

__all__ = ["Metrics"]


class Metrics:
    """The daemon's counters (monotonic totals) and gauge sources."""

    def __init__(self) -> None:
        self.sessions_created = 0
        self.calls_started = 0
        self.calls_ended: Counter[str] = Counter()  # by end reason
        self.messages_relayed = 0
        self.connections_rejected: Counter[str] = Counter()  # by reason
        self.gauges: dict[str, tuple[str, Callable[[], float]]] = {}

    def gauge(self, name: str, help_text: str, read: Callable[[], float]) -> None:
        """Register a gauge read at scrape time."""
        self.gauges[name] = (help_text, read)

    def render(self) -> str:
        """The exposition text (``text/plain; version=0.0.4``)."""
        out: list[str] = []

        def family(name: str, kind: str, help_text: str, samples: list[tuple[str, float]]) -> None:
            out.append(f"# HELP {name} {help_text}")
            out.append(f"# TYPE {name} {kind}")
            for labels, value in samples:
                out.append(f"{name}{labels} {value}")

        family(
            "intaleq_sessions_created_total",
            "counter",
            "Sessions created by POST /sessions.",
            [("", self.sessions_created)],
        )
        family(
            "intaleq_calls_started_total", "counter", "Calls that became active.", [("", self.calls_started)]
        )
        family(
            "intaleq_calls_ended_total",
            "counter",
            "Sessions ended, by end reason.",
            [(f'{{reason="{r}"}}', n) for r, n in sorted(self.calls_ended.items())],
        )
        family(
            "intaleq_messages_relayed_total",
            "counter",
            "offer, answer and ice_candidate messages relayed or held.",
            [("", self.messages_relayed)],
        )
        family(
            "intaleq_connections_rejected_total",
            "counter",
            "WebSocket connections refused, by reason.",
            [(f'{{reason="{r}"}}', n) for r, n in sorted(self.connections_rejected.items())],
        )
        for name, (help_text, read) in self.gauges.items():
            family(name, "gauge", help_text, [("", read())])
        return "\n".join(out) + "\n"
