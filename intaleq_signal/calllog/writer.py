"""Call-log writer: a pool of threads that apply events off the event loop.

Modelled on aiosqlite: each worker thread owns one database connection and
is fed by its own FIFO queue; a sentinel lets queued work finish on close.
Events are routed by ``session_id``, so the writes of one session always go
through the same thread and are applied in order (SPEC §5). A failed write
is retried with exponential backoff on a fresh connection until it lands;
:meth:`CallLogWriter.record` never blocks and never touches the database, so
a slow or unreachable database cannot delay signaling.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import zlib
from collections.abc import Callable

from .events import CallEvent
from .store import Store

__all__ = ["CallLogWriter"]

log = logging.getLogger("intaleq_signal.calllog")

_STOP = object()  # the sentinel: everything queued before it is written first

BACKOFF_FIRST = 0.1  # seconds
BACKOFF_MAX = 5.0
BACKOFF_FATAL = 30.0  # credentials and similar errors: no hot retry loop
DEFAULT_MAX_PENDING = 100_000
#: Events written in one transaction when they queue up faster than one
#: commit each (one commit instead of many: the writer's CPU per event).
MAX_BATCH = 256
#: How long a writer lets events gather after the first one before it
#: writes (seconds): a burst of sessions then costs one commit and one
#: thread wake-up instead of one each. Not applied while closing.
BATCH_LINGER = 0.01


class CallLogWriter:
    """Apply :mod:`~intaleq_signal.calllog.events` to a :class:`Store`.

    Args:
        store: the database seam.
        threads: writer threads (``DB_POOL_SIZE``; 1 for SQLite).
        max_pending: bound on queued events; past it new events are dropped
            and counted in :attr:`dropped` (a warning is logged from 80 %).
        sleep: injectable for tests (seconds).
    """

    def __init__(
        self,
        store: Store,
        threads: int = 1,
        max_pending: int = DEFAULT_MAX_PENDING,
        sleep: Callable[[float], None] | None = None,
    ) -> None:
        self.store = store
        self.max_pending = max_pending
        self.state = "unavailable"  # until a connection is made
        self.writes = 0
        self.failures = 0
        self.dropped = 0
        self.rejected = 0  # events the database refused as data errors
        self._queues: list[queue.SimpleQueue[object]] = [queue.SimpleQueue() for _ in range(threads)]
        self._threads = [
            threading.Thread(target=self._run, args=(i,), name=f"calllog-{i}", daemon=True)
            for i in range(threads)
        ]
        self._deadline: float | None = None  # monotonic; set by close()
        self._wake = threading.Event()
        self._sleep = sleep
        self._warned_at = 0.0
        self._abandoned = 0
        self._lock = threading.Lock()
        self._attempted = [threading.Event() for _ in range(threads)]
        self._in_hand = [0] * threads  # events thread i holds, taken but not yet written

    def start(self, wait: float = 1.0) -> None:
        """Start the threads and wait up to ``wait`` seconds for their first
        connection attempts, so the database state is known when serving
        starts (a database that does not answer only delays that much)."""
        for thread in self._threads:
            thread.start()
        deadline = time.monotonic() + wait
        for attempted in self._attempted:
            attempted.wait(max(0.0, deadline - time.monotonic()))

    @property
    def pending(self) -> int:
        """Events queued or being written (approximate, for metrics)."""
        return sum(q.qsize() for q in self._queues) + sum(self._in_hand)

    def record(self, event: CallEvent) -> None:
        """Queue one event; O(1), never blocks, safe only on the loop thread."""
        pending = self.pending
        if pending >= self.max_pending * 0.8:
            self._warn_backlog(pending)
            if pending >= self.max_pending:
                self.dropped += 1
                return
        index = zlib.crc32(event.session_id.encode()) % len(self._queues)
        self._queues[index].put(event)

    def _warn_backlog(self, pending: int) -> None:
        now = time.monotonic()
        if now - self._warned_at >= 10.0:
            self._warned_at = now
            log.warning(
                "call-log backlog at %d of %d events (database %s); %d dropped so far",
                pending,
                self.max_pending,
                self.state,
                self.dropped,
            )

    def busy(self) -> bool:
        """True while a writer thread is still running (after :meth:`close`:
        one stuck in a database call past the deadline)."""
        return any(thread.is_alive() for thread in self._threads)

    def close(self, timeout: float) -> int:
        """Write what is queued, waiting at most ``timeout`` seconds, then
        stop the threads. Returns the number of events left unwritten."""
        for q in self._queues:
            q.put(_STOP)  # before the deadline: a thread giving up drains up to it
        self._deadline = time.monotonic() + timeout
        self._wake.set()
        for thread in self._threads:
            thread.join(max(0.0, self._deadline - time.monotonic()))
        # A thread still stuck in a write holds its event and its queue (the
        # sentinel still in it); one that gave up counted its own.
        with self._lock:  # not while a thread moves its events to _abandoned
            left = self._abandoned + sum(
                self._in_hand[i] + max(0, q.qsize() - 1)
                for i, (q, t) in enumerate(zip(self._queues, self._threads, strict=True))
                if t.is_alive()
            )
        if left:
            log.error("call log: %d events could not be written before exit", left)
        return left

    # -- worker thread -------------------------------------------------------

    def _run(self, index: int) -> None:
        conn = self._open()
        self._attempted[index].set()
        try:
            while True:
                batch = self._take(index)
                stop = batch[-1] is _STOP
                if stop:
                    batch.pop()
                conn = self._write_batch(conn, batch, index)  # type: ignore[arg-type]
                if conn is None:  # gave up at the close deadline
                    q = self._queues[index]
                    with self._lock:
                        self._abandoned += self._in_hand[index]
                        if not stop:
                            self._abandoned += sum(1 for _ in iter(q.get_nowait, _STOP))
                        self._in_hand[index] = 0
                    return
                self._in_hand[index] = 0
                if stop:
                    return
        finally:
            if conn is not None:
                self.store.close(conn)

    def _take(self, index: int) -> list[object]:
        """The next event, waiting for it, and those queued behind it within
        :data:`BATCH_LINGER`, up to :data:`MAX_BATCH` (the sentinel, when
        met, is last). Taken events count as in hand (``pending``) at once."""
        q = self._queues[index]
        batch = [q.get()]
        if batch[0] is _STOP:
            return batch
        self._in_hand[index] = 1
        if self._deadline is None and q.empty():
            time.sleep(BATCH_LINGER)
        while len(batch) < MAX_BATCH:
            try:
                item = q.get_nowait()
            except queue.Empty:
                break
            batch.append(item)
            if item is _STOP:
                break
            self._in_hand[index] += 1
        return batch

    def _write_batch(self, conn: object | None, batch: list[CallEvent], index: int) -> object | None:
        """Apply ``batch`` in order: in one transaction when it can, else
        one event at a time with retries (:meth:`_write`). Returns the live
        connection, or None when the close deadline passed; ``_in_hand``
        counts down as events land."""
        if len(batch) > 1 and conn is not None:
            try:
                self.store.apply_batch(conn, batch)
            except Exception:  # noqa: BLE001 - rolled back; each event is retried below
                self.failures += 1
            else:
                self._landed(len(batch))
                return conn
        for event in batch:
            conn = self._write(conn, event)
            if conn is None:
                return None
            self._in_hand[index] -= 1
        return conn

    def _open(self) -> object | None:
        """Connect (and create the table when missing) at start, once: the
        database state is known before the first call, and a database that
        is down is reported, not waited for."""
        try:
            conn = self.store.connect()
            self.store.prepare(conn)
        except Exception as exc:  # noqa: BLE001 - reported; writes will retry
            self.failures += 1
            self.state = "unavailable"
            log.error("call log: database unavailable at start, will retry: %s", exc)
            return None
        self.state = self.store.healthy_state
        return conn

    def _write(self, conn: object | None, event: CallEvent) -> object | None:
        """Apply ``event``, reconnecting and retrying until it lands; returns
        the live connection, or None when the close deadline passed."""
        delay = BACKOFF_FIRST
        while True:
            try:
                if conn is None:
                    conn = self.store.connect()
                    self.store.prepare(conn)
                self.store.apply(conn, event)
            except Exception as exc:  # noqa: BLE001 - any driver error means retry
                self.failures += 1
                if conn is not None and self.store.is_permanent(exc):
                    # The database answered and refused this event's data:
                    # retrying cannot help and would block the queue behind it.
                    self.rejected += 1
                    log.error(
                        "call log: %s for session %s refused, not retried: %s",
                        type(event).__name__,
                        event.session_id,
                        exc,
                    )
                    return conn
                if conn is not None:
                    self.store.close(conn)
                    conn = None
                fatal = self.store.is_fatal(exc)
                if self.state != "unavailable" or fatal:
                    log.error("call log: database unavailable, will retry: %s", exc)
                self.state = "unavailable"
                wait = BACKOFF_FATAL if fatal else delay
                delay = min(delay * 2, BACKOFF_MAX)
                if not self._pause(wait):
                    return None
                continue
            self._landed(1)
            return conn

    def _landed(self, events: int) -> None:
        self.writes += events
        if self.state == "unavailable":
            log.warning("call log: database available again")
        self.state = self.store.healthy_state

    def _pause(self, seconds: float) -> bool:
        """Back off; False when the close deadline has passed."""
        if self._deadline is not None:
            remaining = self._deadline - time.monotonic()
            if remaining <= 0:
                return False
            seconds = min(seconds, remaining)
        if self._sleep is not None:
            self._sleep(seconds)
        elif self._deadline is None:
            self._wake.wait(seconds)  # close() wakes it to retry at once
        else:
            time.sleep(seconds)
        return True
