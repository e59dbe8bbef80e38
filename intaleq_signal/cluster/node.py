"""One instance's side of the shared state in Redis (docs/design.md,
"Several instances"; docs/operations.md, "Several instances").

Each session is run by one instance, its *owner*: the engine of that
instance holds the session and its timers, exactly as with one process, so
every rule of docs/protocol.md holds unchanged and every timer fires once.
A participant whose socket landed on another instance (the *edge*) is a
:class:`RemotePeer` in the owner's engine: what the socket receives goes to
the owner's inbox stream, what the owner sends goes to the edge's inbox
stream, each in order. Instances hold leases (``node:<id>``); the sessions
of an instance whose lease lapsed (killed, cut off) are adopted by the
first other instance that needs them or finds them, from their record in
Redis, as a restart restores them from the call log.

Streams rather than pub/sub: an entry stays in the stream until read, so a
reader that lost its Redis connection reads on from the last entry it saw
and nothing in between is lost; one stream per receiving instance, written
in order by one task per destination, keeps every session's order.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import time
import uuid
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import redis.asyncio as aioredis  # the [redis] extra: this module is imported only with REDIS_URL
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff

from .. import messages as msg
from ..calllog.events import CallActive, CallEnded, CallEvent, CallInitiated, MediaReported, SessionCreated
from ..config import redacted_url
from ..exceptions import Capacity, RedisError, RideConflict, Unavailable
from ..lifecycle import SessionState
from ..signaling import CLOSE_INTERNAL, CLOSE_SERVICE_RESTART
from .records import (
    ADOPT,
    CREATE,
    END,
    LEASE_RENEW,
    NODE_LEASE,
    Entry,
    Keys,
    Record,
    holder,
    media_fields,
    pack,
    unpack,
)

if TYPE_CHECKING:  # pragma: no cover
    from ..config import Config
    from ..signaling import Client, Signaling
    from ..wire import HTTPServerConnection

__all__ = ["Cluster", "RemotePeer"]

log = logging.getLogger("intaleq_signal.cluster")

#: Bound on one Redis command (seconds): past it Redis counts as
#: unreachable (one retry on a new connection: about twice this at worst
#: before a client gets ``unavailable``).
REDIS_TIMEOUT = 1.0
#: Stream entries (batches) kept per inbox at most (approximate trimming,
#: on every write: read ones go with it).
INBOX_MAXLEN = 10_000
#: Inbox entries packed into one stream entry at most.
BATCH_MAX = 1000
#: Entries waiting for one destination while Redis is unreachable; past it
#: the oldest are dropped (and counted).
OUTBOX_MAX = 100_000


class RemotePeer:
    """A participant's socket held by another instance, as the owner's
    engine sees it (a :class:`~intaleq_signal.signaling.Peer`). Heartbeats
    are the edge's business, so it is never idle here."""

    __slots__ = ("conn", "ip", "cluster", "open", "client")

    def __init__(self, cluster: Cluster, conn: str, ip: str) -> None:
        self.cluster = cluster
        self.conn = conn
        self.ip = ip
        self.open = True
        self.client: Client | None = None

    @property
    def last_received(self) -> float:
        return time.monotonic()

    @property
    def is_open(self) -> bool:
        return self.open

    def send_text(self, text: str) -> bool:
        if not self.open:
            return False
        self.cluster.post(Entry("send", self.conn, text))
        return True

    def close_soon(self, code: int, reason: str) -> None:
        if self.open:
            self.open = False
            self.cluster.post(Entry("close", self.conn, reason, code=code))
            self.cluster.remote_closed(self)

    def send_ping(self) -> None:
        pass  # the edge pings its own sockets


class _Outbox:
    """Entries for one destination stream, written in order by one task."""

    __slots__ = ("stream", "pending", "task")

    def __init__(self, stream: str) -> None:
        self.stream = stream
        self.pending: deque[Entry] = deque()
        self.task: asyncio.Task[None] | None = None


class _Edge:
    """A socket of this instance whose session another instance runs."""

    __slots__ = ("conn", "ws", "owner", "incarnation")

    def __init__(self, conn: str, ws: HTTPServerConnection, owner: str, incarnation: str) -> None:
        self.conn = conn
        self.ws = ws
        self.owner = owner
        self.incarnation = incarnation  # the owner's process this socket is routed to


class Cluster:
    """Sessions, leases and relays shared through Redis.

    Args:
        config: ``REDIS_URL``, ``REDIS_PREFIX``, ``NODE_ID`` and the
            durations of the protocol.
        engine: this instance's engine (the owner of its sessions).
        calllog: the call-log writer (an adopted session's row is written
            again first: the instance that created it may have died before
            its database took the row).
        redis_client: a ``redis.asyncio.Redis`` (tests), else made from
            ``REDIS_URL``.
    """

    def __init__(self, config: Config, engine: Signaling, calllog: Any, redis_client: Any = None) -> None:
        self.config = config
        self.engine = engine
        self.calllog = calllog
        self.node = config.node_id
        #: This process among the lives of ``NODE_ID``: the value of its
        #: lease, and part of its connections' ids.
        self.incarnation = uuid.uuid4().hex[:12]
        self.keys = Keys(config.redis_prefix)
        self.redis = redis_client or aioredis.Redis.from_url(
            config.redis_url,
            decode_responses=True,
            socket_timeout=REDIS_TIMEOUT,
            socket_connect_timeout=REDIS_TIMEOUT,
            health_check_interval=10,
            # A pooled connection that Redis closed (it restarted) fails
            # once: the command goes again on a new connection.
            retry=Retry(ExponentialBackoff(cap=0.1, base=0.02), 1),
            retry_on_error=[aioredis.ConnectionError],
        )
        self._errors = (aioredis.RedisError, OSError, asyncio.TimeoutError)
        self.available = False
        self._create = self.redis.register_script(CREATE)
        self._adopt = self.redis.register_script(ADOPT)
        self._end = self.redis.register_script(END)
        self._outboxes: dict[str, _Outbox] = {}
        self._remote: dict[str, RemotePeer] = {}  # conn -> peer, sessions run here
        self._edges: dict[str, _Edge] = {}  # conn -> socket, sessions run elsewhere
        self._waiting: dict[str, list[Entry]] = {}  # conn -> entries behind an open being located
        self._numbers = itertools.count(1)
        self._reader: asyncio.Task[None] | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._mirror: deque[tuple[Callable[..., Any], tuple[Any, ...]]] = deque()
        self._mirror_task: asyncio.Task[None] | None = None
        self.dropped = 0  # entries dropped while Redis was unreachable
        #: No instance is judged dead before this (monotonic seconds): right
        #: after Redis came back, leases are being taken again.
        self._settled = 0.0

    # -- start and stop ---------------------------------------------------------

    async def start(self) -> list[Record]:
        """Take this instance's lease (waiting up to ``NODE_LEASE`` for a
        killed predecessor's to lapse), empty its inbox, and return the
        records of the sessions it owns (a restart with the same
        ``NODE_ID`` takes them back).

        Raises:
            RedisError: Redis unreachable, or ``NODE_ID`` held by a live
            instance.
        """
        deadline = time.monotonic() + NODE_LEASE + 1
        try:
            while not await self.redis.set(self.keys.node(self.node), self.incarnation, nx=True,
                                           px=int(NODE_LEASE * 1000)):  # fmt: skip
                if time.monotonic() > deadline:
                    where = redacted_url(self.config.redis_url)
                    raise RedisError(
                        f"NODE_ID={self.node!r} is in use by a live instance on {where}: "
                        "every instance needs its own NODE_ID"
                    )
                await asyncio.sleep(0.2)
            await self.redis.sadd(self.keys.prefix + "nodes", self.node)
            await self.redis.delete(self.keys.inbox(self.node))
            records = []
            for session_id in await self.redis.smembers(self.keys.owned(self.node)):
                # Only what is still this instance's (not adopted while it was down).
                adopted, _, *fields = await self._adopt(
                    keys=[self.keys.session(session_id), self.keys.owned(self.node)],
                    args=[self.node, self.keys.prefix, session_id, self.incarnation],
                )
                record = Record.from_pairs(session_id, fields) if int(adopted) > 0 else None
                if record is not None:
                    records.append(record)
        except self._errors as exc:
            where = redacted_url(self.config.redis_url)
            raise RedisError(f"REDIS_URL: cannot use Redis at {where}: {exc}") from exc
        self.available = True
        loop = asyncio.get_running_loop()
        self._reader = loop.create_task(self._read_inbox())
        self._watcher = loop.create_task(self._watch())
        return records

    async def depart(self) -> None:
        """Give up this instance's lease at once (its sessions are then
        adopted wherever their apps reconnect, or by another instance's
        watcher within a second); no longer renew it."""
        watcher, self._watcher = self._watcher, None
        if watcher is not None:
            await _cancel(watcher, REDIS_TIMEOUT)
        try:
            await asyncio.wait_for(self.redis.delete(self.keys.node(self.node)), REDIS_TIMEOUT)
        except self._errors as exc:
            self._lost(exc)
        log.debug("stopping: lease given up")

    async def stop(self) -> None:
        """After :meth:`depart`: flush what is queued for other instances
        and the record changes, stop reading, close the connections."""
        for box in list(self._outboxes.values()):
            if box.task is not None:
                try:
                    await asyncio.wait_for(asyncio.shield(box.task), REDIS_TIMEOUT)
                except (TimeoutError, asyncio.CancelledError):
                    pass
        if self._mirror_task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._mirror_task), REDIS_TIMEOUT)
            except (TimeoutError, asyncio.CancelledError):
                pass
        for task in (self._reader, self._watcher):
            if task is not None:
                await _cancel(task, REDIS_TIMEOUT)
        try:  # the lease went with depart()
            await asyncio.wait_for(self.redis.aclose(), REDIS_TIMEOUT)
        except self._errors:
            pass
        log.debug("stopping: left the other instances")

    # -- sessions -----------------------------------------------------------

    async def create_session(self, ride_id: str, driver_id: str, passenger_id: str) -> tuple[str, float]:
        """``POST /sessions``: ``(session_id, deadline)``, the deadline in
        epoch seconds; a new session is run by this instance.

        Raises:
            RideConflict: the ride's live session has other participants.
            Capacity: as :meth:`Signaling.create_session`.
            Unavailable: Redis unreachable.
        """
        engine = self.engine
        self._check_settled()
        session_id = str(uuid.uuid4())
        now = time.time()
        deadline = now + self.config.session_duration
        ttl = int((2 * self.config.session_duration + 60) * 1000)  # its time to run, then its tombstone
        try:
            engine.check_capacity()
            room = "1"
        except Capacity:
            room = "0"  # a matching re-POST is answered all the same
        try:
            outcome, existing = await self._create(
                keys=[self.keys.ride(ride_id), self.keys.session(session_id)],
                args=[session_id, ride_id, driver_id, passenger_id, self.node, repr(now), repr(deadline),
                      repr(now), ttl, self.keys.owned(self.node), self.keys.prefix + "session:", room,
                      self.keys.node(self.node), self.incarnation],
            )  # fmt: skip
        except self._errors as exc:
            self._lost(exc)
            raise Unavailable() from exc
        if int(outcome) == -3:
            raise Unavailable()
        if int(outcome) == -1:
            raise RideConflict(ride_id)
        if int(outcome) == -2:
            raise Capacity()
        if int(outcome) == 0:
            local = engine.sessions.get(existing)
            if local is not None:
                return existing, time.time() + (local.deadline - engine.clock.time())
            record = await self.record(existing)
            return existing, record.deadline if record is not None else deadline
        engine.create_session(ride_id, driver_id, passenger_id, session_id=session_id)
        return session_id, deadline

    async def record(self, session_id: str) -> Record | None:
        """The session's record, or None.

        Raises:
            Unavailable: Redis unreachable.
        """
        try:
            fields = await self.redis.hgetall(self.keys.session(session_id))
        except self._errors as exc:
            self._lost(exc)
            raise Unavailable() from exc
        return Record.from_hash(session_id, fields) if fields else None

    async def locate(self, session_id: str) -> tuple[str, str] | None:
        """Where the session is run: ``None`` when here (now: a session of
        a dead or departed instance is adopted, an ended one remembered
        here) or unknown; else the owner's node id and incarnation.

        Raises:
            Unavailable: Redis unreachable.
        """
        if self.engine.sessions.get(session_id) is not None:
            return None
        self._check_settled()
        record = await self.record(session_id)
        if record is None:
            return None
        if record.status == "ended":
            self.engine.restore([record.row()])
            return None
        previous = record.owner
        if record.owner and record.owner != self.node:
            try:
                adopted, incarnation, *fields = await self._adopt(
                    keys=[self.keys.session(session_id), self.keys.owned(self.node)],
                    args=[self.node, self.keys.prefix, session_id, self.incarnation],
                )
            except self._errors as exc:
                self._lost(exc)
                raise Unavailable() from exc
            if int(adopted) < 0:
                raise Unavailable()  # this instance's lease is gone: wait for the watcher to take it again
            if not int(adopted):
                return (record.owner, incarnation) if incarnation else None
            # Restored before this task yields: Redis names this instance
            # the owner from now, and an open routed here must find it.
            record = Record.from_pairs(session_id, fields) or record
        if self.engine.sessions.get(session_id) is None:
            log.info("session adopted session=%s from=%s", session_id, previous or "-")
            self._backfill(record)
            self.engine.restore([record.row()])
        return None

    def _backfill(self, record: Record) -> None:
        """Write an adopted session's row as far as its record goes (each
        write is a no-op where the row has it already)."""
        write = self.calllog.record
        write(SessionCreated(record.session_id, record.ride_id, record.driver_id, record.passenger_id,
                             record.created_at, record.creator or record.owner))  # fmt: skip
        if record.connected_at is not None:
            write(CallActive(record.session_id, record.connected_at))
        if record.initiated_by:
            write(CallInitiated(record.session_id, record.initiated_by))
        if record.media is not None:
            write(MediaReported(record.session_id, **record.media.columns()))

    # -- the call-log events of sessions run here, mirrored ------------------------

    def mirror(self, event: CallEvent) -> None:
        """Keep the session's record in step with what its owner's engine
        records (the engine's call-log events)."""
        if isinstance(event, CallActive):
            session = self.engine.sessions.get(event.session_id)
            deadline = event.at + self.config.session_duration
            ttl = int((self.config.session_duration * 2 + 60) * 1000)
            key = self.keys.session(event.session_id)
            self._queue(self._hset_ttl, key, {"status": "active", "connected_at": repr(event.at),
                                              "deadline": repr(deadline)}, ttl, session)  # fmt: skip
        elif isinstance(event, CallInitiated):
            self._queue(
                self._hset_ttl, self.keys.session(event.session_id), {"initiated_by": event.user_id}, 0, None
            )
        elif isinstance(event, MediaReported):
            fields = media_fields(dataclasses.asdict(event))
            self._queue(self._hset_ttl, self.keys.session(event.session_id), fields, 0, None)
        elif isinstance(event, CallEnded):
            session = self.engine.sessions.get(event.session_id)
            ride = session.ride_id if session is not None else ""
            ttl = int((self.config.session_duration + 60) * 1000)
            self._queue(self._end_session, event.session_id, ride, event.reason, event.at, ttl)

    async def _hset_ttl(self, key: str, fields: dict[str, str], ttl: int, session: Any) -> None:
        await self.redis.hset(key, mapping=fields)
        if ttl:
            await self.redis.pexpire(key, ttl)
        if session is not None:
            await self.redis.pexpire(self.keys.ride(session.ride_id), ttl)

    async def _end_session(self, session_id: str, ride_id: str, reason: str, at: float, ttl: int) -> None:
        await self._end(
            keys=[self.keys.session(session_id), self.keys.ride(ride_id), self.keys.owned(self.node)],
            args=[session_id, reason, repr(at), ttl],
        )

    async def publish(self, session: Any, wall: float, now: float) -> None:
        """Write a session this instance runs whole (restored from the call
        log, or Redis lost it): record, ride lock, ownership."""
        duration = self.config.session_duration
        fields = {
            "ride_id": session.ride_id,
            "driver_id": session.driver.user_id,
            "passenger_id": session.passenger.user_id,
            "owner": self.node,
            "creator": self.node,
            "status": session.state.value if session.state is not SessionState.WAITING else "created",
            "created_at": repr(wall + (session.created - now)),
            "deadline": repr(wall + (session.deadline - now)),
        }
        if session.connected is not None:
            fields["connected_at"] = repr(wall + (session.connected - now))
            fields["status"] = "active"
        if session.initiated_by:
            fields["initiated_by"] = session.initiated_by
        if session.media is not None:
            fields.update(media_fields(session.media.columns()))
        ttl = int((session.deadline - now + duration + 60) * 1000)
        key = self.keys.session(session.session_id)
        await self.redis.hset(key, mapping=fields)
        await self.redis.pexpire(key, ttl)
        await self.redis.set(self.keys.ride(session.ride_id), session.session_id, px=ttl)
        await self.redis.sadd(self.keys.owned(self.node), session.session_id)

    def _queue(self, step: Callable[..., Any], *args: Any) -> None:
        if len(self._mirror) >= OUTBOX_MAX:  # Redis away for long: the oldest change goes
            self._mirror.popleft()
            self.dropped += 1
        self._mirror.append((step, args))
        if self._mirror_task is None:
            self._mirror_task = asyncio.get_running_loop().create_task(self._write_mirror())

    async def _write_mirror(self) -> None:
        """Apply the mirrored changes in order; while Redis is unreachable,
        keep them and retry (the lease watcher republishes on return)."""
        try:
            while self._mirror:
                step, args = self._mirror[0]
                try:
                    await step(*args)
                except self._errors as exc:
                    self._lost(exc)
                    await asyncio.sleep(0.5)
                    continue
                self._mirror.popleft()
        finally:
            self._mirror_task = None

    # -- sockets: edge side -------------------------------------------------------

    def hand_over(
        self, client: Client, ws: HTTPServerConnection, owner: tuple[str, str], first: str
    ) -> _Edge:
        """Route a socket of this instance to the session's owner (node id,
        incarnation): its authenticate first, then every message and frame
        it sends."""
        conn = f"{self.node}/{self.incarnation}.{next(self._numbers)}"
        edge = _Edge(conn, ws, *owner)
        self._edges[conn] = edge
        self.engine.handed_over(client)
        self.post_to(edge.owner, Entry("open", conn, first, ip=client.ip))
        return edge

    def edge_message(self, edge: _Edge, message: str | bytes) -> None:
        if type(message) is not str:
            edge.ws.send_text(msg.UNSUPPORTED_FRAME)
            self.post_to(edge.owner, Entry("frame", edge.conn))  # it counts against the rate all the same
            return
        self.post_to(edge.owner, Entry("msg", edge.conn, message))

    def edge_frame(self, edge: _Edge) -> None:
        self.post_to(edge.owner, Entry("frame", edge.conn))

    def edge_gone(self, edge: _Edge) -> None:
        if self._edges.pop(edge.conn, None) is not None:
            self.post_to(edge.owner, Entry("gone", edge.conn))

    def sweep_edges(self, ping: bool) -> None:
        """The heartbeat of this instance's routed sockets (docs/protocol.md,
        rule 8): a dead one is reported gone to its owner."""
        now = time.monotonic()
        timeout = self.config.heartbeat_timeout
        for edge in list(self._edges.values()):
            ws = edge.ws
            if not ws.is_open:
                continue
            if now - ws.last_received >= timeout:
                self.edge_gone(edge)
                ws.close_soon(CLOSE_INTERNAL, "heartbeat timeout")
            elif ping:
                ws.send_ping()

    @property
    def edges(self) -> int:
        return len(self._edges)

    def close_edges(self, code: int, reason: str) -> None:
        """At shutdown: close the routed sockets (their owners see them go)."""
        for edge in list(self._edges.values()):
            self.edge_gone(edge)
            edge.ws.close_soon(code, reason)

    # -- sockets: owner side ----------------------------------------------------

    def post(self, entry: Entry) -> None:
        """An entry for the edge holding ``entry.conn``."""
        self.post_to(entry.edge, entry)

    def remote_closed(self, peer: RemotePeer) -> None:
        """The owner's engine closed a remote socket: forget it once the
        engine's call stack unwinds."""
        if self._remote.pop(peer.conn, None) is not None and peer.client is not None:
            asyncio.get_running_loop().call_soon(self.engine.closed, peer.client)

    def _received(self, entry: Entry) -> None:
        """One inbox entry, in stream order."""
        kind = entry.kind
        if kind == "send" or kind == "close":
            edge = self._edges.get(entry.conn)
            if edge is None:
                return  # gone meanwhile
            if kind == "send":
                edge.ws.send_text(entry.text)
            else:
                self._edges.pop(entry.conn, None)
                edge.ws.close_soon(entry.code or 1000, entry.text)
            return
        engine = self.engine
        waiting = self._waiting.get(entry.conn)
        if waiting is not None:  # its open waits for the session to be taken in here
            waiting.append(entry)
            return
        if kind == "open":
            if not engine.accepting:  # stopping: the app reconnects and finds the session's next owner
                self.post(Entry("close", entry.conn, "service restart", code=CLOSE_SERVICE_RESTART))
                return
            session_id = msg.authenticate_session(entry.text)
            if session_id is not None and engine.sessions.get(session_id) is None:
                # Routed here by Redis before this process's own adoption
                # of the session came back to it (two connections, no
                # order between them): look it up first.
                self._waiting[entry.conn] = []
                asyncio.get_running_loop().create_task(self._open_located(entry, session_id))
                return
            self._open(entry)
            return
        peer = self._remote.get(entry.conn)
        if peer is None or peer.client is None:
            return
        if kind == "msg":
            peer.client.message_received(entry.text)
        elif kind == "frame":
            peer.client.frame_received()
        else:  # gone
            del self._remote[entry.conn]
            peer.open = False
            engine.closed(peer.client)

    def _open(self, entry: Entry) -> None:
        peer = RemotePeer(self, entry.conn, entry.ip)
        self._remote[entry.conn] = peer
        peer.client = client = self.engine.connected(peer)
        client.message_received(entry.text)

    async def _open_located(self, entry: Entry, session_id: str) -> None:
        """An open for a session this engine does not hold: taken in here
        when Redis says so (then the entries that came behind it), else
        the socket is closed with 1012 and its app reconnects."""
        try:
            elsewhere = await self.locate(session_id)
        except Unavailable:
            elsewhere = ("", "")  # cannot tell now: the app reconnects and asks again
        queued = self._waiting.pop(entry.conn, [])
        if elsewhere is not None:
            self.post(Entry("close", entry.conn, "service restart", code=CLOSE_SERVICE_RESTART))
            return
        self._open(entry)
        for later in queued:
            self._received(later)

    # -- streams ------------------------------------------------------------------

    def post_to(self, node: str, entry: Entry) -> None:
        box = self._outboxes.get(node)
        if box is None:
            box = self._outboxes[node] = _Outbox(self.keys.inbox(node))
        if len(box.pending) >= OUTBOX_MAX:
            box.pending.popleft()
            self.dropped += 1
        box.pending.append(entry)
        if box.task is None:
            box.task = asyncio.get_running_loop().create_task(self._flush(box))

    async def _flush(self, box: _Outbox) -> None:
        """Write the destination's entries in order: what is queued when
        the task runs goes as one stream entry (:func:`pack`); on an error
        the same batch again (order kept)."""
        try:
            while box.pending:
                batch = list(itertools.islice(box.pending, BATCH_MAX))
                try:
                    await self.redis.xadd(
                        box.stream, {"b": pack(batch)}, maxlen=INBOX_MAXLEN, approximate=True
                    )
                except self._errors as exc:
                    self._lost(exc)
                    await asyncio.sleep(0.2)
                    continue
                for _ in batch:
                    box.pending.popleft()
        finally:
            box.task = None

    async def _read_inbox(self) -> None:
        """Read this instance's inbox forever, from the last entry seen."""
        stream = self.keys.inbox(self.node)
        last = "0-0"
        while True:
            try:
                answer = await self.redis.xread({stream: last}, count=1000, block=1000)
            except asyncio.CancelledError:
                raise
            except self._errors as exc:
                self._lost(exc)
                await asyncio.sleep(0.5)
                continue
            for _, batches in answer or ():
                for entry_id, fields in batches:
                    last = entry_id
                    for entry in unpack(fields.get("b", "")):
                        try:
                            self._received(entry)
                        except Exception:
                            log.exception("inbox entry failed kind=%s conn=%s", entry.kind, entry.conn)

    # -- leases and dead instances ---------------------------------------------------

    async def _watch(self) -> None:
        """Renew this instance's lease; find dead instances: close the
        sockets routed to them (1012: their apps reconnect, and the session
        is adopted where they land), forget their sockets in sessions run
        here (a disconnect, rule 6), adopt their sessions."""
        while True:
            await asyncio.sleep(LEASE_RENEW if self.available else 0.5)
            try:
                renewed = await self.redis.set(
                    self.keys.node(self.node), self.incarnation, xx=True, px=int(NODE_LEASE * 1000)
                )
                if not renewed:  # Redis lost it (restarted, flushed): take it again, write our sessions again
                    self._settled = time.monotonic() + NODE_LEASE + LEASE_RENEW
                    await self.redis.set(
                        self.keys.node(self.node), self.incarnation, px=int(NODE_LEASE * 1000)
                    )
                    await self._republish()
                # Every time: another instance may have taken this one off
                # the list while it restarted.
                await self.redis.sadd(self.keys.prefix + "nodes", self.node)
                if not self.available:
                    log.info("redis available again")
                self.available = True
                if time.monotonic() >= self._settled:
                    await self._dead_instances()
            except asyncio.CancelledError:
                raise
            except self._errors as exc:
                self._lost(exc)
            except Exception:
                log.exception("cluster watch failed")

    async def _republish(self) -> None:
        """This instance's lease was gone: Redis lost its data (restarted
        empty), or this instance was cut off long enough to be taken for
        dead. Sessions another instance adopted meanwhile are released here;
        the others are written to Redis again."""
        engine = self.engine
        wall, now = time.time(), engine.clock.time()
        written = released = 0
        for session in engine.sessions.live_sessions():
            owner = await self.redis.hget(self.keys.session(session.session_id), "owner")
            if owner and owner != self.node:
                engine.release(session)
                released += 1
                continue
            await self.publish(session, wall, now)
            written += 1
        log.info(
            "lease taken again: %d sessions written to redis, %d released to other instances",
            written,
            released,
        )

    async def _dead_instances(self) -> None:
        """A process is alive while its lease holds its incarnation: sockets
        routed to a process that died or was restarted (same node id, new
        incarnation: the entries sent to the old one are lost) close with
        1012; sockets of such a process in sessions run here are gone."""
        nodes = await self.redis.smembers(self.keys.prefix + "nodes")
        alive = {self.node: self.incarnation}
        for node in nodes:
            if node != self.node:
                lease = await self.redis.get(self.keys.node(node))
                if lease:
                    alive[node] = lease
        for edge in list(self._edges.values()):
            if alive.get(edge.owner) != edge.incarnation:
                self._edges.pop(edge.conn, None)
                edge.ws.close_soon(CLOSE_SERVICE_RESTART, "service restart")
        for peer in list(self._remote.values()):
            node, incarnation = holder(peer.conn)
            if alive.get(node) != incarnation:
                del self._remote[peer.conn]
                peer.open = False
                if peer.client is not None:
                    self.engine.closed(peer.client)
        for node in set(nodes) - set(alive):
            owned = await self.redis.smembers(self.keys.owned(node))
            log.info("instance gone node=%s sessions=%d", node, len(owned))
            for session_id in owned:
                try:
                    await self.locate(session_id)
                except Unavailable:
                    return  # this instance's own lease is in question: next round
            if not await self.redis.scard(self.keys.owned(node)):
                await self.redis.srem(self.keys.prefix + "nodes", node)
                await self.redis.delete(self.keys.inbox(node))

    def _check_settled(self) -> None:
        """Right after this instance found its lease gone (Redis restarted
        empty, or was out of reach longer than a lease, so every lease
        lapsed), leases and sessions are being written again, within a
        renewal: a missing record or lease means nothing yet, so no session
        is created, adopted or refused as unknown until then.

        Raises:
            Unavailable: within that time.
        """
        if time.monotonic() < self._settled:
            raise Unavailable()

    @property
    def remote_connections(self) -> int:
        """Sockets of other instances in the sessions run here (counted
        where they are open, as edges)."""
        return len(self._remote)

    def _lost(self, exc: BaseException) -> None:
        if self.available:
            log.warning("redis unreachable: %s", exc)
        self.available = False


async def _cancel(task: asyncio.Task[Any], timeout: float) -> None:
    """Cancel ``task`` and wait for it, at most ``timeout`` seconds. The
    cancellation is repeated until the task ends: on Python 3.11,
    ``asyncio.wait_for`` (which redis-py wraps around a command when a
    socket timeout is set) can swallow one."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not task.done() and loop.time() < deadline:
        task.cancel()
        await asyncio.wait([task], timeout=0.05)
