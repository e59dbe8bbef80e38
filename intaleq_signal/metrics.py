"""Counters, gauges and a histogram of one process, rendered in the
Prometheus text exposition format 0.0.4 (``docs/protocol.md``, "GET /metrics").

Counters are plain attributes bumped on the event loop; values owned by
other objects are read at scrape time from callables, so the hot path pays
one integer addition (two and a bisect for the relay-latency histogram).
Every metric's name and help text is in this module: the server only says
where the values come from (:meth:`Metrics.bind`).
"""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from .calllog.writer import CallLogWriter

__all__ = ["Histogram", "Metrics"]

#: Relay latency buckets, seconds: relaying is sub-millisecond when healthy.
RELAY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
#: Call start → media connected buckets, seconds: ICE over loopback takes
#: a fraction of a second, a phone through a TURN relay a few seconds.
MEDIA_CONNECT_BUCKETS = (0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 20.0, 30.0, 60.0)


class Histogram:
    """Cumulative-bucket histogram (``_bucket{le}``, ``_sum``, ``_count``)."""

    __slots__ = ("bounds", "counts", "sum", "count")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def samples(self, name: str) -> list[str]:
        lines = []
        running = 0
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += count
            label = "+Inf" if bound == float("inf") else repr(bound)
            lines.append(f'{name}_bucket{{le="{label}"}} {running}')
        lines.append(f"{name}_sum {self.sum!r}")
        lines.append(f"{name}_count {self.count}")
        return lines


class Metrics:
    """The daemon's own counters plus values read from elsewhere."""

    def __init__(self) -> None:
        self.sessions_created = 0
        self.calls_started = 0
        self.calls_ended: Counter[str] = Counter()  # by end reason
        self.messages_relayed = 0
        self.connections_rejected: Counter[str] = Counter()  # by reason
        self.relay_latency = Histogram(RELAY_BUCKETS)
        # media_state (docs/protocol.md, "media_state"): calls, not reports,
        # except the failures.
        self.media_connected_calls = 0
        self.media_failed_calls = 0
        self.media_failures = 0
        self.media_candidates: Counter[str] = Counter()  # by candidate type
        self.media_connect_time = Histogram(MEDIA_CONNECT_BUCKETS)
        self._read: list[tuple[str, str, str, Callable[[], float]]] = []

    def register(self, name: str, kind: str, help_text: str, read: Callable[[], float]) -> None:
        """Add a ``counter`` or ``gauge`` whose value is read at scrape time."""
        self._read.append((name, kind, help_text, read))

    def bind(
        self,
        *,
        sessions_live: Callable[[], int],
        calls_active: Callable[[], int],
        connections_open: Callable[[], int],
        calllog: CallLogWriter,
    ) -> None:
        """Register the process's gauges and the call log's counters, read
        at scrape time: the three callables (counts now), and the call-log
        writer's figures, in events (``docs/protocol.md``, "GET /metrics")."""
        register = self.register
        register("intaleq_sessions_live", "gauge", "Sessions neither ended nor expired.", sessions_live)
        register("intaleq_calls_active", "gauge", "Calls in progress.", calls_active)
        register("intaleq_connections_open", "gauge", "Open WebSocket connections.", connections_open)
        register(
            "intaleq_calllog_writes_pending",
            "gauge",
            "Call-log events queued or being written (the queue depth).",
            lambda: calllog.pending,
        )
        register(
            "intaleq_calllog_writes_total", "counter", "Call-log events written.", lambda: calllog.writes
        )
        register(
            "intaleq_calllog_writes_failed_total",
            "counter",
            "Failed call-log write attempts (each retry counts).",
            lambda: calllog.failures,
        )
        register(
            "intaleq_calllog_events_dropped_total",
            "counter",
            "Call-log events dropped: queue full, or refused by the database as bad data.",
            lambda: calllog.dropped + calllog.rejected,
        )
        register(
            "intaleq_calllog_journal_events",
            "gauge",
            "Call-log events kept in the local journal until the database takes them.",
            lambda: calllog.journal_backlog,
        )
        register(
            "intaleq_calllog_database_up",
            "gauge",
            "1 while the call-log database accepts writes, else 0.",
            lambda: 0 if calllog.state == "unavailable" else 1,
        )

    def render(self) -> str:
        """The exposition text (``text/plain; version=0.0.4``)."""
        out: list[str] = []

        def family(name: str, kind: str, help_text: str, samples: list[str]) -> None:
            out.extend((f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", *samples))

        def labelled(name: str, label: str, counts: Counter[str]) -> list[str]:
            return [f'{name}{{{label}="{key}"}} {value}' for key, value in sorted(counts.items())]

        family(
            "intaleq_sessions_created_total",
            "counter",
            "Sessions created by POST /sessions.",
            [f"intaleq_sessions_created_total {self.sessions_created}"],
        )
        family(
            "intaleq_calls_started_total",
            "counter",
            "Calls that became active (both participants connected).",
            [f"intaleq_calls_started_total {self.calls_started}"],
        )
        family(
            "intaleq_calls_ended_total",
            "counter",
            "Sessions ended, by end reason.",
            labelled("intaleq_calls_ended_total", "reason", self.calls_ended),
        )
        family(
            "intaleq_messages_relayed_total",
            "counter",
            "offer, answer and ice_candidate messages written to the other participant's open socket"
            " (a held one when it is delivered).",
            [f"intaleq_messages_relayed_total {self.messages_relayed}"],
        )
        family(
            "intaleq_connections_rejected_total",
            "counter",
            "WebSocket connections refused or closed by policy, by reason.",
            labelled("intaleq_connections_rejected_total", "reason", self.connections_rejected),
        )
        family(
            "intaleq_relay_latency_seconds",
            "histogram",
            "Time from receiving a message to writing it to the peer's socket.",
            self.relay_latency.samples("intaleq_relay_latency_seconds"),
        )
        family(
            "intaleq_media_connected_calls_total",
            "counter",
            "Calls whose two participants both reported media connected (once per call).",
            [f"intaleq_media_connected_calls_total {self.media_connected_calls}"],
        )
        family(
            "intaleq_media_failed_calls_total",
            "counter",
            "Calls with at least one media_state failed report (once per call).",
            [f"intaleq_media_failed_calls_total {self.media_failed_calls}"],
        )
        family(
            "intaleq_media_failures_total",
            "counter",
            "media_state failed reports.",
            [f"intaleq_media_failures_total {self.media_failures}"],
        )
        family(
            "intaleq_media_candidates_total",
            "counter",
            "Selected local ICE candidate types participants reported (each first one, then each change).",
            labelled("intaleq_media_candidates_total", "candidate_type", self.media_candidates),
        )
        family(
            "intaleq_media_connect_seconds",
            "histogram",
            "Time from the call becoming active to both participants reporting media connected.",
            self.media_connect_time.samples("intaleq_media_connect_seconds"),
        )
        for name, kind, help_text, read in self._read:
            family(name, kind, help_text, [f"{name} {read()}"])
        return "\n".join(out) + "\n"
