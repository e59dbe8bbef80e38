"""What instances keep in Redis and send each other, as data: key names,
the session record, the entries of an instance's inbox stream and the Lua
scripts that change several keys at once (docs/design.md, "Several
instances"). No I/O here.

Keys (``P`` is ``REDIS_PREFIX``)::

    P node:<node_id>        lease of a live instance: its incarnation (expires after NODE_LEASE)
    P session:<session_id>  hash: the session record (owner, ids, times, status)
    P ride:<ride_id>        the ride's live session id
    P owned:<node_id>       set: the sessions an instance owns
    P nodes                 set: the instances that have joined (and may own sessions)
    P inbox:<node_id>       stream: messages for an instance's connections and sessions

Times in records are epoch seconds (UTC) as decimal text.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ..calllog.sql import SessionRow
from ..media import Media

__all__ = [
    "ADOPT",
    "CREATE",
    "END",
    "Entry",
    "Keys",
    "NODE_LEASE",
    "Record",
    "holder",
    "media_fields",
    "pack",
    "unpack",
]

#: A live instance renews its lease every LEASE_RENEW seconds; one that
#: stops renewing (killed, cut from Redis) is dead after NODE_LEASE seconds.
NODE_LEASE = 3.0
LEASE_RENEW = 1.0


class Keys:
    """The key names under one prefix."""

    __slots__ = ("prefix",)

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def node(self, node_id: str) -> str:
        return f"{self.prefix}node:{node_id}"

    def session(self, session_id: str) -> str:
        return f"{self.prefix}session:{session_id}"

    def ride(self, ride_id: str) -> str:
        return f"{self.prefix}ride:{ride_id}"

    def owned(self, node_id: str) -> str:
        return f"{self.prefix}owned:{node_id}"

    def inbox(self, node_id: str) -> str:
        return f"{self.prefix}inbox:{node_id}"


@dataclasses.dataclass(frozen=True, slots=True)
class Record:
    """A session as Redis holds it (``P session:<id>``).

    ``deadline`` is when it expires (never active) or is cut (active), epoch
    seconds; ``status`` is ``created``, ``active`` or ``ended``; ``creator``
    is the instance that created it (the ``node_id`` of its call-log row);
    ``media`` its media progress (docs/protocol.md, "media_state"), the
    record's fields named as the call-log columns.
    """

    session_id: str
    ride_id: str
    driver_id: str
    passenger_id: str
    owner: str
    status: str
    created_at: float
    deadline: float
    connected_at: float | None = None
    initiated_by: str | None = None
    end_reason: str | None = None
    ended_at: float | None = None
    creator: str = ""
    media: Media | None = None

    @classmethod
    def from_pairs(cls, session_id: str, flat: list[Any]) -> Record | None:
        """The record of a flat ``field, value, ...`` list (what the Lua
        scripts return of ``HGETALL``), or None."""
        return cls.from_hash(session_id, dict(zip(flat[::2], flat[1::2], strict=True)))

    @classmethod
    def from_hash(cls, session_id: str, fields: dict[Any, Any]) -> Record | None:
        """The record of an ``HGETALL`` answer (bytes or str keys), or None
        for an empty or incomplete hash."""
        data = {_text(k): _text(v) for k, v in fields.items()}
        try:
            return cls(
                session_id=session_id,
                ride_id=data["ride_id"],
                driver_id=data["driver_id"],
                passenger_id=data["passenger_id"],
                owner=data.get("owner", ""),
                status=data["status"],
                created_at=float(data["created_at"]),
                deadline=float(data["deadline"]),
                connected_at=_float(data.get("connected_at")),
                initiated_by=data.get("initiated_by") or None,
                end_reason=data.get("end_reason") or None,
                ended_at=_float(data.get("ended_at")),
                creator=data.get("creator", ""),
                media=_media(data),
            )
        except (KeyError, ValueError):
            return None

    def row(self) -> SessionRow:
        """The record as the engine restores sessions (as from the call log)."""
        return SessionRow(
            session_id=self.session_id,
            ride_id=self.ride_id,
            driver_id=self.driver_id,
            passenger_id=self.passenger_id,
            status=self.status,
            initiated_by=self.initiated_by,
            end_reason=self.end_reason,
            created_at=self.created_at,
            connected_at=self.connected_at,
            ended_at=self.ended_at,
            media=self.media,
        )

    def live(self, now: float) -> bool:
        """Neither ended nor past its deadline at ``now`` (epoch seconds)."""
        return self.status != "ended" and now < self.deadline


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _float(value: str | None) -> float | None:
    return float(value) if value else None


def _media(data: dict[str, str]) -> Media | None:
    """The media fields of a record (:func:`media_fields`), or None."""
    media = Media(
        _float(data.get("media_connected_at")),
        _float(data.get("driver_media_at")),
        _float(data.get("passenger_media_at")),
        data.get("driver_candidate") or None,
        data.get("passenger_candidate") or None,
        int(data.get("media_failures") or 0),
    )
    return None if media.empty else media


def media_fields(columns: dict[str, Any]) -> dict[str, str]:
    """The record fields of media columns (``Media.columns()``, or a
    ``MediaReported`` event's): those not None, as text."""
    return {
        name: repr(value) if isinstance(value, float) else str(value)
        for name, value in columns.items()
        if value is not None and name in _MEDIA_COLUMNS
    }


_MEDIA_COLUMNS = frozenset(field.name for field in dataclasses.fields(Media))


# -- inbox entries -----------------------------------------------------------

#: Entry kinds. Edge (the instance holding the socket) to owner (the
#: instance running the session): ``open`` (a socket authenticates: ``t`` is
#: its authenticate message), ``msg`` (a whole message), ``frame`` (any
#: other frame, for the rate limit), ``gone`` (the socket stopped being open).
#: Owner to edge: ``send`` (write ``t``), ``close`` (close with ``code``).
EDGE_KINDS = frozenset({"open", "msg", "frame", "gone"})
OWNER_KINDS = frozenset({"send", "close"})


@dataclasses.dataclass(frozen=True, slots=True)
class Entry:
    """One inbox stream entry.

    Args:
        kind: one of :data:`EDGE_KINDS` or :data:`OWNER_KINDS`.
        conn: the connection, ``<edge node_id>/<edge incarnation>.<number>``.
        text: the message (``open``, ``msg``, ``send``), the close reason
            (``close``), else empty.
        ip: the client's address (``open``).
        code: the WebSocket close code (``close``).
    """

    kind: str
    conn: str
    text: str = ""
    ip: str = ""
    code: int = 0

    @property
    def edge(self) -> str:
        """The node id of the instance holding the socket."""
        return holder(self.conn)[0]


def holder(conn: str) -> tuple[str, str]:
    """``(node id, incarnation)`` of the process holding the socket
    ``conn`` (``<node_id>/<incarnation>.<number>``)."""
    node, _, rest = conn.rpartition("/")
    return node, rest.partition(".")[0]


#: Between the header fields of a packed entry: a control character, so
#: never part of a node id (printable), an address, a kind or a number.
_SEP = "\x1f"


def pack(entries: list[Entry]) -> str:
    """Several entries as the one field of one stream entry (one ``XADD``
    per batch, not per message): for each, a header line
    ``kind SEP conn SEP ip SEP code SEP length`` then ``length`` code
    points of text."""
    parts = []
    for entry in entries:
        text = entry.text
        parts.append(
            f"{entry.kind}{_SEP}{entry.conn}{_SEP}{entry.ip}{_SEP}{entry.code}{_SEP}{len(text)}\n{text}"
        )
    return "".join(parts)


def unpack(data: str) -> list[Entry]:
    """The entries of :func:`pack`, in order; it stops at the first
    malformed one (written by another version: the rest skipped)."""
    entries = []
    end = len(data)
    at = 0
    while at < end:
        newline = data.find("\n", at)
        if newline < 0:
            break
        fields = data[at:newline].split(_SEP)
        if len(fields) != 5 or not fields[3].isdigit() or not fields[4].isdigit():
            break
        kind, conn, ip, code, length = fields
        if kind not in EDGE_KINDS and kind not in OWNER_KINDS or "/" not in conn:
            break
        at = newline + 1 + int(length)
        if at > end:
            break
        entries.append(Entry(kind, conn, data[newline + 1 : at], ip, int(code)))
    return entries


# -- Lua scripts ---------------------------------------------------------------

#: POST /sessions across instances: one live session per ride.
#: KEYS: ride, new session. ARGV: session_id, ride_id, driver_id,
#: passenger_id, owner, created_at, deadline, now, record ttl (ms),
#: owned set key, prefix of session keys, "1" when this instance can take a
#: new session, this instance's node key, its incarnation. Returns {1, id}
#: created; {0, id} the ride's live session with the same participants;
#: {-1, id} another live session of the ride; {-2, ""} no new session can be
#: taken here (MAX_SESSIONS, stopping); {-3, ""} this instance's lease is
#: not in Redis (Redis lost its data, or every lease lapsed): nothing there
#: can be trusted until the leases are taken again.
CREATE = """
if redis.call('GET', ARGV[13]) ~= ARGV[14] then return {-3, ''} end
local existing = redis.call('GET', KEYS[1])
if existing then
  local rec = redis.call('HMGET', ARGV[11] .. existing, 'driver_id', 'passenger_id', 'status', 'deadline')
  if rec[3] and rec[3] ~= 'ended' and tonumber(rec[4]) > tonumber(ARGV[8]) then
    if rec[1] == ARGV[3] and rec[2] == ARGV[4] then
      return {0, existing}
    end
    return {-1, existing}
  end
end
if ARGV[12] ~= '1' then return {-2, ''} end
redis.call('HSET', KEYS[2], 'ride_id', ARGV[2], 'driver_id', ARGV[3], 'passenger_id', ARGV[4],
           'owner', ARGV[5], 'creator', ARGV[5], 'status', 'created', 'created_at', ARGV[6],
           'deadline', ARGV[7])
redis.call('PEXPIRE', KEYS[2], ARGV[9])
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[9])
redis.call('SADD', ARGV[10], ARGV[1])
return {1, ARGV[1]}
"""

#: Take over a session whose owner is dead (its lease lapsed) or gone.
#: KEYS: session, new owner's owned set. ARGV: new owner, prefix,
#: session_id, the new owner's incarnation. Returns {-1, ''} when the
#: caller's own lease is not in Redis (it cannot tell a dead owner from
#: lost data), else {1, '', field, value, ...} when this caller is the
#: owner now (with the record, so that it is restored before anything else
#: runs), {0, incarnation} when a live owner runs it (the value of its
#: lease), {0, ''} when there is no such session.
ADOPT = """
if redis.call('GET', ARGV[2] .. 'node:' .. ARGV[1]) ~= ARGV[4] then return {-1, ''} end
local owner = redis.call('HGET', KEYS[1], 'owner')
if not owner then return {0, ''} end
if owner == ARGV[1] then return {1, '', unpack(redis.call('HGETALL', KEYS[1]))} end
if owner ~= '' then
  local lease = redis.call('GET', ARGV[2] .. 'node:' .. owner)
  if lease then return {0, lease} end
end
redis.call('HSET', KEYS[1], 'owner', ARGV[1])
if owner ~= '' then redis.call('SREM', ARGV[2] .. 'owned:' .. owner, ARGV[3]) end
redis.call('SADD', KEYS[2], ARGV[3])
return {1, '', unpack(redis.call('HGETALL', KEYS[1]))}
"""

#: A session ended. KEYS: session, ride, owned set. ARGV: session_id,
#: end_reason, ended_at, tombstone ttl (ms).
END = """
redis.call('HSET', KEYS[1], 'status', 'ended', 'end_reason', ARGV[2], 'ended_at', ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
if redis.call('GET', KEYS[2]) == ARGV[1] then redis.call('DEL', KEYS[2]) end
redis.call('SREM', KEYS[3], ARGV[1])
return 1
"""
