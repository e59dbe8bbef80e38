"""Call-log writer: a pool of threads that apply events off the event loop,
and a journal thread that keeps every event not yet committed on local disk.

Modelled on aiosqlite: each worker thread owns one database connection and
is fed by its own FIFO queue; a sentinel lets queued work finish on close.
Events are routed by ``session_id``, so the writes of one session always go
through the same thread and are applied in order. A failed write is retried
with exponential backoff on a fresh connection until it lands;
:meth:`CallLogWriter.record` never blocks and never touches the database, so
a slow or unreachable database cannot delay signaling.

With a :class:`~intaleq_signal.calllog.journal.Journal`, every recorded
event also goes to the journal thread, which appends it to the journal file
unless its commit in the database was reported first (within
:data:`JOURNAL_LINGER`: a healthy database costs the disk nothing), and
deletes it once it commits. So each accepted event is at every moment
committed in the database or on its way to the journal for at most
:data:`JOURNAL_LINGER` seconds, then in it (``docs/operations.md``, "Call log
and journal"). The events a previous process left in the journal are
written first, in their order, with their own times (:meth:`open`).
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
import zlib
from collections.abc import Callable
from typing import Any

from ..exceptions import StartError
from .events import CallEvent, PreviousRunClosed
from .journal import Journal
from .sql import SessionRow
from .store import Store

__all__ = ["CallLogWriter", "StartError"]

log = logging.getLogger("intaleq_signal.calllog")

_STOP = object()  # the sentinel: everything queued before it is written first

BACKOFF_FIRST = 0.1  # seconds
BACKOFF_MAX = 5.0
BACKOFF_FATAL = 30.0  # credentials and similar errors: no hot retry loop
DEFAULT_MAX_PENDING = 100_000
#: Events written in one transaction when they queue up faster than one
#: commit each (one commit instead of many: the writer's CPU per event).
MAX_BATCH = 1024
#: Least time between the starts of two batches of one writer (seconds):
#: an event after a quiet spell is written at once, but under a steady
#: flow of sessions the writer commits at most this often, so each commit
#: carries more rows (SQLite's CPU per row: 60 µs in batches of 16, 25 µs
#: in batches of 1,000, docs/performance.md). Not applied while closing.
COMMIT_INTERVAL = 0.05
#: How long a writer lets events gather after the first one before it
#: writes (seconds): a burst of sessions then costs one commit and one
#: thread wake-up instead of one each. Not applied while closing.
BATCH_LINGER = 0.01
#: How long the journal thread waits for the database commits of new events
#: before it appends the uncommitted ones to the journal file (seconds).
#: Bounds the events a ``kill -9`` can lose (at most this much, well under
#: a second).
JOURNAL_LINGER = 0.2
#: After a failed journal write, the next attempt (seconds).
JOURNAL_RETRY = 1.0
#: Bound on the journal's last write at exit (seconds): its lock wait
#: (``journal.BUSY_TIMEOUT_MS``) and the write itself.
JOURNAL_CLOSE_TIMEOUT = 3.0
#: A writer with nothing to write checks its connection this often
#: (seconds), so ``/health`` tells a database lost while idle.
IDLE_PROBE = 5.0
#: ``/health`` says ``degraded`` while a write failed or an event has waited
#: this long (seconds) for its commit.
DEGRADED_AFTER = 5.0

#: One queued event: (sequence number, ``time.monotonic()`` when recorded, event).
Item = tuple[int, float, CallEvent]


class CallLogWriter:
    """Apply :mod:`~intaleq_signal.calllog.events` to a :class:`Store`.

    Args:
        store: the database seam.
        threads: writer threads (``DB_POOL_SIZE``; 1 for SQLite).
        max_pending: bound on queued events; past it new events are dropped
            and counted in :attr:`dropped` (a warning is logged from 80 %).
        sleep: injectable for tests (seconds).
        journal: where events wait for their commit on disk (None: no
            journal, events live in memory until they commit).
    """

    def __init__(
        self,
        store: Store,
        threads: int = 1,
        max_pending: int = DEFAULT_MAX_PENDING,
        sleep: Callable[[float], None] | None = None,
        journal: Journal | None = None,
    ) -> None:
        self.store = store
        self.max_pending = max_pending
        self.state = "unavailable"  # until a connection is made
        self.writes = 0
        self.failures = 0
        self.dropped = 0
        self.rejected = 0  # events the database refused as data errors
        #: Events in the journal file (0 without a journal).
        self.journal_backlog = 0
        #: False while the journal cannot be written (its events wait in memory).
        self.journal_writable = True
        #: Events the journal could not keep at exit (its last write failed).
        self.journal_lost = 0
        self._replayed: dict[int, CallEvent] = {}  # what open() read from the journal
        self._queues: list[queue.SimpleQueue[object]] = [queue.SimpleQueue() for _ in range(threads)]
        self._threads = [
            threading.Thread(target=self._run, args=(i,), name=f"calllog-{i}", daemon=True)
            for i in range(threads)
        ]
        self._journal = journal
        self._journal_queue: queue.SimpleQueue[object] | None = None
        self._journal_thread: threading.Thread | None = None
        if journal is not None:
            self._journal_queue = queue.SimpleQueue()
            self._journal_thread = threading.Thread(
                target=self._run_journal, name="calllog-journal", daemon=True
            )
        self._started = False
        self._seq = 0
        self._replay_pending: set[int] = set()  # journal events of a previous process not yet committed
        self._replay_done = threading.Condition()
        self._deadline: float | None = None  # monotonic; set by close()
        self._wake = threading.Event()
        self._journal_wake = threading.Event()
        self._sleep = sleep
        self._warned_at = 0.0
        self._abandoned = 0
        self._lock = threading.Lock()
        self._attempted = [threading.Event() for _ in range(threads)]
        self._in_hand = [0] * threads  # events thread i holds, taken but not yet written
        self._batch_started = [-math.inf] * threads  # monotonic start of thread i's latest batch
        self._oldest: list[float | None] = [None] * threads  # record time of thread i's oldest in hand
        self._last_failure = -math.inf  # monotonic time of the latest failed write
        self._reported_at_start = False
        self._node_id: str | None = None
        #: Whether this instance holds its node_id's claim (None: not known yet).
        self.node_claimed: bool | None = None

    # -- the event loop's side ------------------------------------------------

    def open(self) -> int:
        """Open the journal and queue the events a previous process left in
        it, in their order, ahead of every new event. Returns their number.

        Raises:
            JournalError: the journal file cannot be used.
        """
        if self._journal is None:
            return 0
        backlog = self._journal.open()
        now = time.monotonic()
        for seq, event in backlog:
            self._route(event).put((seq, now, event))
        if backlog:
            self._seq = backlog[-1][0]
            self._replay_pending = {seq for seq, _ in backlog}
        self._replayed = dict(backlog)
        self.journal_backlog = len(backlog)
        return len(backlog)

    def start(self, wait: float = 1.0) -> None:
        """Start the threads and wait up to ``wait`` seconds for their first
        connection attempts, so the database state is known when serving
        starts (a database that does not answer only delays that much).

        Raises:
            StartError: the system refused a thread (``TasksMax=``).
        """
        threads = [self._journal_thread] if self._journal_thread is not None else []
        threads += self._threads
        for count, thread in enumerate(threads):
            try:
                thread.start()
            except RuntimeError as exc:
                self._started = count > 0
                self.close(0.0)
                raise StartError(
                    f"cannot start call-log thread {count + 1} of {len(threads)} ({exc}): "
                    "the system's task limit (systemd TasksMax=) is below what DB_POOL_SIZE needs"
                ) from None
        self._started = True
        if self._replayed:
            log.warning("call log: %d events from the journal are written first", len(self._replayed))
        deadline = time.monotonic() + wait
        for attempted in self._attempted:
            attempted.wait(max(0.0, deadline - time.monotonic()))

    @property
    def pending(self) -> int:
        """Events queued or being written (approximate, for metrics)."""
        return sum(q.qsize() for q in self._queues) + sum(self._in_hand)

    def health(self) -> str:
        """The database as ``/health`` reports it: the store's healthy state
        (``ok``, ``sqlite``), ``degraded`` (a write failed, or an event has
        waited more than :data:`DEGRADED_AFTER` seconds, within the last
        :data:`DEGRADED_AFTER` seconds), or ``unavailable``."""
        state = self.state
        if state == "unavailable":
            return state
        now = time.monotonic()
        if now - self._last_failure < DEGRADED_AFTER:
            return "degraded"
        if any(t is not None and now - t > DEGRADED_AFTER for t in list(self._oldest)):
            return "degraded"
        return state

    def record(self, event: CallEvent) -> None:
        """Queue one event; O(1), never blocks, safe only on the loop thread."""
        pending = self.pending
        if pending >= self.max_pending * 0.8:
            self._warn_backlog(pending)
            if pending >= self.max_pending:
                self.dropped += 1
                return
        self._seq = seq = self._seq + 1
        item = (seq, time.monotonic(), event)
        if self._journal_queue is not None:
            self._journal_queue.put(item)  # before the writer can report its commit
        self._route(event).put(item)

    def _route(self, event: CallEvent) -> queue.SimpleQueue[object]:
        return self._queues[zlib.crc32(event.session_id.encode()) % len(self._queues)]

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
        """Write what is queued, waiting at most ``timeout`` seconds for the
        database, then stop the threads; with a journal, what did not commit
        is then in the journal file, for the next start. Returns the number
        of events not committed to the database."""
        if not self._started:  # never served: nothing new to write
            if self._journal is not None:
                self._journal.close()
            return 0
        for q in self._queues:
            q.put(_STOP)  # before the deadline: a thread giving up drains up to it
        self._deadline = time.monotonic() + timeout
        self._wake.set()
        with self._replay_done:
            self._replay_done.notify_all()
        for thread in self._threads:
            if thread.ident is not None:
                thread.join(max(0.0, self._deadline - time.monotonic()))
        # A thread still stuck in a write holds its event and its queue (the
        # sentinel still in it); one that gave up counted its own.
        with self._lock:  # not while a thread moves its events to _abandoned
            left = self._abandoned + sum(
                self._in_hand[i] + max(0, q.qsize() - 1)
                for i, (q, t) in enumerate(zip(self._queues, self._threads, strict=True))
                if t.is_alive()
            )
        if self._journal_thread is not None and self._journal_queue is not None:
            if self._journal_thread.ident is not None:
                self._journal_queue.put(_STOP)
                self._journal_wake.set()
                self._journal_thread.join(JOURNAL_CLOSE_TIMEOUT)
            else:
                self._journal.close()  # type: ignore[union-attr]
            if self.journal_backlog:
                log.warning(
                    "call log: %d events not committed to the database are kept in the journal "
                    "and written at the next start",
                    self.journal_backlog,
                )
            return self.journal_backlog + self.journal_lost
        if left:
            log.error("call log: %d events could not be written before exit", left)
        return left

    # -- writer threads --------------------------------------------------------

    def _run(self, index: int) -> None:
        conn = self._open(index)
        self._attempted[index].set()
        try:
            while True:
                batch = self._take(index)
                if not batch:  # idle: is the database still there?
                    conn = self._probe(conn, index)
                    continue
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
                self._oldest[index] = None
                if stop:
                    return
        finally:
            if conn is not None:
                self.store.close(conn)

    def _take(self, index: int) -> list[Any]:
        """The next event, waiting for it, and those queued behind it within
        :data:`BATCH_LINGER`, or until :data:`COMMIT_INTERVAL` after the
        previous batch began, up to :data:`MAX_BATCH` (the sentinel, when
        met, is last). Taken events count as in hand (``pending``) at once."""
        q = self._queues[index]
        try:
            batch = [q.get(timeout=IDLE_PROBE if self._deadline is None else None)]
        except queue.Empty:
            return []
        if batch[0] is _STOP:
            return batch
        self._in_hand[index] = 1
        self._oldest[index] = batch[0][1]  # type: ignore[index]
        if self._deadline is None:
            now = time.monotonic()
            pause = self._batch_started[index] + COMMIT_INTERVAL - now
            if q.empty():
                pause = max(pause, BATCH_LINGER)
            if pause > 0:
                time.sleep(pause)
                now += pause
            self._batch_started[index] = now
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

    def _write_batch(self, conn: object | None, batch: list[Item], index: int) -> object | None:
        """Apply ``batch`` in order: in one transaction when it can, else
        one event at a time with retries (:meth:`_write`). Returns the live
        connection, or None when the close deadline passed; ``_in_hand``
        counts down as events land."""
        waits = any(isinstance(item[2], PreviousRunClosed) for item in batch)
        if len(batch) > 1 and conn is not None and not waits:
            try:
                self.store.apply_batch(conn, [item[2] for item in batch])
            except Exception:  # noqa: BLE001 - rolled back; each event is retried below
                self._failed()
            else:
                self._landed(len(batch))
                self._committed(batch)
                return conn
        for item in batch:
            if isinstance(item[2], PreviousRunClosed) and not self._wait_for_replay(item[0]):
                return None
            conn = self._write(conn, item[2], index)
            if conn is None:
                return None
            self._committed([item])
            self._in_hand[index] -= 1
        return conn

    def _wait_for_replay(self, seq: int) -> bool:
        """Start-up work on open rows (sequence number ``seq``) waits until
        every event replayed from the journal before it has committed: a
        killed process's true endings land before anything would close its
        rows otherwise. False when the close deadline passed first."""
        pending = self._replay_pending
        with self._replay_done:
            while pending and min(pending) < seq:
                if self._deadline is not None and time.monotonic() >= self._deadline:
                    return False
                self._replay_done.wait(0.5)
        return True

    def _committed(self, items: list[Item]) -> None:
        """``items`` are in the database (or refused as bad data, which no
        retry can change): they leave the journal."""
        if self._journal_queue is not None:
            self._journal_queue.put([item[0] for item in items])
        pending = self._replay_pending
        if pending:
            with self._replay_done:
                pending.difference_update(item[0] for item in items)
                self._replay_done.notify_all()

    def _open(self, index: int) -> object | None:
        """Connect (and create the table when missing) at start, once: the
        database state is known before the first call, and a database that
        is down is reported (once, not once per thread), not waited for."""
        try:
            conn = self._connect(index)
        except Exception as exc:  # noqa: BLE001 - reported; writes will retry
            self._failed()
            with self._lock:
                first = self.state != "unavailable" or not self._reported_at_start
                self._reported_at_start = True
                self.state = "unavailable"
            if first:
                log.error("call log: database unavailable at start, will retry: %s", exc)
            return None
        self.state = self.store.healthy_state
        return conn

    def _connect(self, index: int) -> object:
        """A new connection, the table prepared; the thread that does the
        start-up work (index 0, where events without a session go) also
        holds this instance's claim on its ``node_id`` (:meth:`claim_node`)."""
        conn = self.store.connect()
        self.store.prepare(conn)
        if index == 0 and self._node_id is not None:
            self._hold_claim(conn)
        return conn

    def load_sessions(self, node_id: str, since: float, timeout: float) -> list[SessionRow] | None:
        """What a restart restores (``docs/operations.md``, "Restarts"):
        the rows of ``node_id`` still open and those ended since ``since``
        (epoch seconds), read once the events replayed from the journal
        have committed, so they are the rows as the last process left them.
        Blocking (at most about ``timeout`` seconds and a connection
        attempt): call it off the event loop. None, logged, when the
        database cannot be read in time, or when another live instance
        holds this ``node_id`` (its sessions are not ours to take): nothing
        is restored then."""
        if self.node_claimed is False:
            log.error("call log: sessions not restored: another live instance holds NODE_ID %r", node_id)
            return None
        deadline = time.monotonic() + timeout
        with self._replay_done:
            while self._replay_pending:
                left = deadline - time.monotonic()
                if left <= 0:
                    log.error(
                        "call log: sessions not restored: %d journal events are not in the database yet",
                        len(self._replay_pending),
                    )
                    return None
                self._replay_done.wait(left)
        try:
            conn = self.store.connect()
            try:
                self.store.prepare(conn)
                return self.store.load(conn, node_id, since)
            finally:
                self.store.close(conn)
        except Exception as exc:  # noqa: BLE001 - reported; serving goes on without them
            log.error("call log: sessions not restored, the database cannot be read: %s", exc)
            return None

    def claim_node(self, node_id: str) -> None:
        """Before :meth:`start`: this instance is ``node_id`` in the call
        log. Its start-up work on open rows runs only while it holds the
        database's claim on that name (``Store.claim``): a second live
        instance started with the same ``NODE_ID`` leaves the first one's
        rows alone and says so."""
        self._node_id = node_id

    def _hold_claim(self, conn: object) -> bool:
        held = self.store.claim(conn, self._node_id)  # type: ignore[arg-type]
        if not held and self.node_claimed is not False:
            log.error(
                "call log: NODE_ID %r is held by another live instance on this database; this one "
                "leaves open rows alone (give every instance its own NODE_ID)",
                self._node_id,
            )
        self.node_claimed = held
        return held

    def _probe(self, conn: object | None, index: int) -> object | None:
        """With nothing to write for :data:`IDLE_PROBE` seconds: check the
        connection (or make one), so a database lost while idle shows in
        ``/health``; a probe that hangs shows as a write that waits."""
        self._oldest[index] = time.monotonic()
        try:
            if conn is None:
                conn = self._connect(index)
            else:
                self.store.ping(conn)
        except Exception as exc:  # noqa: BLE001 - reported like a failed write
            self._failed()
            conn = self._lost(conn, exc, loud=False)
        else:
            self._available()
        finally:
            self._oldest[index] = None
        return conn

    def _write(self, conn: object | None, event: CallEvent, index: int) -> object | None:
        """Apply ``event``, reconnecting and retrying until it lands; returns
        the live connection, or None when the close deadline passed."""
        delay = BACKOFF_FIRST
        while True:
            try:
                if conn is None:
                    conn = self._connect(index)
                if isinstance(event, PreviousRunClosed) and self._node_id is not None:
                    if not self._hold_claim(conn):
                        return conn  # not ours to close: skipped (and said so)
                self.store.apply(conn, event)
            except Exception as exc:  # noqa: BLE001 - any driver error means retry
                self._failed()
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
                fatal = self.store.is_fatal(exc)
                conn = self._lost(conn, exc, loud=fatal)
                wait = BACKOFF_FATAL if fatal else delay
                delay = min(delay * 2, BACKOFF_MAX)
                if not self._pause(wait):
                    return None
                continue
            self._landed(1)
            return conn

    def _lost(self, conn: object | None, exc: BaseException, loud: bool) -> None:
        """A connection attempt or a connection failed: close it, say so
        when the database was taken as up (or always, if ``loud``), and
        mark it unavailable. Returns None, the connection now."""
        if conn is not None:
            self.store.close(conn)
        if self.state != "unavailable" or loud:
            log.error("call log: database unavailable, will retry: %s", exc)
        self.state = "unavailable"
        return None

    def _available(self) -> None:
        if self.state == "unavailable":
            log.warning("call log: database available again")
        self.state = self.store.healthy_state

    def _failed(self) -> None:
        self.failures += 1
        self._last_failure = time.monotonic()

    def _landed(self, events: int) -> None:
        self.writes += events
        self._available()

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

    # -- the journal thread ----------------------------------------------------

    def _run_journal(self) -> None:
        """Append recorded events to the journal unless their commit came
        first; delete committed ones; until the sentinel, then a last write
        and close. A failed write is logged and retried every
        :data:`JOURNAL_RETRY` seconds, new events or not: nothing is given
        up while the process runs."""
        journal, q = self._journal, self._journal_queue
        assert journal is not None and q is not None
        state = _JournalState(self._replayed)
        stop = False
        try:
            while not stop:
                waiting = state.appends or state.removes
                try:
                    items = [q.get(timeout=JOURNAL_RETRY if waiting else None)]
                except queue.Empty:
                    items = []
                if items and items[0] is not _STOP:
                    self._journal_wake.wait(JOURNAL_LINGER)
                while True:
                    try:
                        items.append(q.get_nowait())
                    except queue.Empty:
                        break
                stop = state.take(items)
                if state.appends or state.removes:
                    self._journal_write(journal, state, final=stop)
        finally:
            journal.close()
            self.journal_backlog = len(state.in_file)
            if state.appends:  # the last write failed: these are lost
                self.journal_lost += len(state.appends)

    def _journal_write(self, journal: Journal, state: _JournalState, final: bool) -> None:
        """One journal transaction for what ``state`` has waiting; a journal
        file removed or replaced meanwhile is written anew with every event
        the old one held."""
        try:
            if not journal.intact():
                log.error(
                    "call-log journal %s was removed or replaced: writing a new one with its %d events",
                    journal.path,
                    len(state.in_file) + len(state.appends),
                )
                journal.recreate(sorted({**state.in_file, **state.appends}.items()))
                state.removes.clear()
            else:
                journal.write(sorted(state.appends.items()), sorted(state.removes))
        except Exception as exc:  # noqa: BLE001 - disk full, I/O error, locked: kept, retried
            self.journal_writable = False
            if final:
                log.error(
                    "call-log journal: %d events could not be kept at exit (%s): they are lost",
                    len(state.appends),
                    exc,
                )
            elif not state.failing:
                log.error("call-log journal: write failed, will retry: %s", exc)
            state.failing = True
            return
        if state.failing:
            log.warning("call-log journal: writing again")
        state.written()
        self.journal_writable = True
        self.journal_backlog = len(state.in_file)


class _JournalState:
    """The journal thread's view: what the file holds, and what waits to be
    appended to it or deleted from it."""

    __slots__ = ("in_file", "appends", "removes", "failing")

    def __init__(self, in_file: dict[int, CallEvent]) -> None:
        self.in_file = dict(in_file)  # seq -> event, as in the file
        self.appends: dict[int, CallEvent] = {}  # recorded, not committed, not yet in the file
        self.removes: set[int] = set()  # in the file, committed since
        self.failing = False

    def take(self, items: list[object]) -> bool:
        """Apply queued items (recorded events, committed sequence numbers,
        the sentinel); True when the sentinel was among them."""
        stop = False
        for item in items:
            if item is _STOP:
                stop = True
            elif type(item) is tuple:
                self.appends[item[0]] = item[2]  # type: ignore[index]
            else:
                for seq in item:  # type: ignore[attr-defined]
                    if self.appends.pop(seq, None) is None and seq in self.in_file:
                        self.removes.add(seq)
        return stop

    def written(self) -> None:
        self.in_file.update(self.appends)
        for seq in self.removes:
            self.in_file.pop(seq, None)
        self.appends.clear()
        self.removes.clear()
        self.failing = False
