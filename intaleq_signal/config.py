"""Configuration: one immutable object built and validated up front
(``docs/operations.md``, "Configuration").

Every variable is parsed here, before any socket is opened, so a bad value
stops the process with one line naming the variable and exit status 78
(EX_CONFIG) instead of failing later in the middle of a call.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
import re
import socket
from collections.abc import Mapping

from .exceptions import EX_CONFIG, ConfigError
from .ice import parse_ice_servers

__all__ = [
    "Config",
    "ConfigError",
    "EX_CONFIG",
    "load_env_file",
    "parse_duration",
    "parse_server_addr",
]

MIN_API_KEY_LENGTH = 32
MIN_TURN_SECRET_LENGTH = 32
#: ``TURN_TTL`` range, seconds (docs/operations.md, "TURN with coturn"):
#: shorter credentials may expire before the app has even gathered its
#: relay candidates; longer ones keep an ended call's credentials able to
#: open relays for days, and an expiry past 2**31 is refused by coturn 4.6.
MIN_TURN_TTL = 60.0
MAX_TURN_TTL = 7 * 24 * 3600.0
#: The ``API_KEY`` line of ``.env.example``: a key everyone can read, so it is
#: refused like a short one (docs/operations.md; tests/test_config.py checks
#: the file still carries this exact value).
API_KEY_PLACEHOLDER = "change-me-to-a-random-secret-of-32-characters-or-more"

#: ``DB_POOL_SIZE`` range: PyMySQL writer threads, one connection each.
MIN_DB_POOL_SIZE = 1
MAX_DB_POOL_SIZE = 32
#: Every other thread the process can start, for the unit's ``TasksMax=``
#: (systemd.resource-control(5): it counts threads; docs/operations.md):
OTHER_THREADS: tuple[tuple[str, int], ...] = (
    ("main thread", 1),
    ("call-log journal thread", 1),
    # loop.run_in_executor(None, ...): concurrent.futures.ThreadPoolExecutor's
    # default max_workers, min(32, cpu_count + 4) (Python docs, concurrent.futures).
    ("event loop default executor", 32),
    # uvloop's libuv threadpool (getaddrinfo, file I/O): UV_THREADPOOL_SIZE,
    # 4 when unset (libuv docs, "Thread pool work scheduling").
    ("libuv threadpool", 4),
)
#: The most threads the code can start: ``MAX_DB_POOL_SIZE`` writers plus
#: :data:`OTHER_THREADS` (32 + 1 + 1 + 32 + 4 = 70).
MAX_THREADS = MAX_DB_POOL_SIZE + sum(count for _, count in OTHER_THREADS)
LOG_LEVELS = ("debug", "info", "warn", "error")
LOG_FORMATS = ("text", "json")
ENVIRONMENTS = ("production", "development")
ON_STOP_CHOICES = ("handoff", "end")
TOKEN_MODES = ("off", "optional", "required")

_DURATION = re.compile(r"^\s*([0-9]{1,12}(?:\.[0-9]{1,9})?)\s*(ms|s|m|h)?\s*$")
_DIGITS = re.compile(r"^[0-9]{1,12}$")  # ASCII only: str.isdigit() takes "²" and "٣"
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_duration(name: str, text: str) -> float:
    """Parse ``500ms``, ``20s``, ``5m``, ``1h`` or bare seconds into seconds.

    Raises:
        ConfigError: naming ``name`` when ``text`` is not such a duration.
    """
    match = _DURATION.match(text)
    if match is None:
        raise ConfigError(f"{name}={text!r} is not a duration (use 500ms, 20s, 5m, 1h or seconds)")
    seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    if not math.isfinite(seconds):
        raise ConfigError(f"{name}={text!r} is not a finite duration")
    return seconds


def parse_server_addr(text: str) -> tuple[str, int]:
    """Parse ``host:port`` or ``[v6]:port`` (``SERVER_ADDR``).

    Raises:
        ConfigError: when the host is empty, the port is not 0–65535, or an
        IPv6 address is not bracketed.
    """
    name = "SERVER_ADDR"
    host, sep, port_text = text.strip().rpartition(":")
    if not sep or not host:
        raise ConfigError(f"{name}={text!r} is not host:port (IPv6 as [::1]:47880)")
    if host.startswith("["):
        if not host.endswith("]"):
            raise ConfigError(f"{name}={text!r} has an unclosed IPv6 bracket")
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ConfigError(f"{name}={text!r}: {host!r} is not an IPv6 address") from None
    elif ":" in host:
        raise ConfigError(f"{name}={text!r}: write an IPv6 address in brackets, [::1]:47880")
    if not _DIGITS.match(port_text) or not 0 <= int(port_text) <= 65535:
        raise ConfigError(f"{name}={text!r}: port must be a number from 0 to 65535")
    return host, int(port_text)


def load_env_file(path: str) -> dict[str, str]:
    """Read ``KEY=VALUE`` lines: ``#`` comments, blank lines, an optional
    ``export`` prefix, and values in single or double quotes.

    Raises:
        ConfigError: when the file cannot be read or a line is not KEY=VALUE.
    """
    try:
        with open(path, encoding="utf-8") as handle:
            lines = handle.read().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--env-file {path}: {exc}") from None
    values: dict[str, str] = {}
    for number, raw in enumerate(lines, 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[len("export ") :].lstrip()
        key, sep, value = line.partition("=")
        key = key.strip()
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise ConfigError(f"--env-file {path} line {number}: expected KEY=VALUE")
        values[key] = _env_value(value.strip())
    return values


def _env_value(text: str) -> str:
    """A value as written after ``=``: quoted (the quotes removed, anything
    after the closing quote ignored) or bare (a `` #`` comment cut off)."""
    if text[:1] in ("'", '"'):
        closing = text.find(text[0], 1)
        if closing > 0:
            return text[1:closing]
    return text.split(" #", 1)[0].rstrip()


@dataclasses.dataclass(frozen=True, slots=True)
class Config:
    """The validated settings of one daemon process. Durations are seconds
    (float), sizes bytes. Build it with :meth:`from_env`."""

    api_key: str
    host: str = "127.0.0.1"
    port: int = 47880
    log_level: str = "info"
    log_format: str = "text"
    max_message_bytes: int = 4096
    heartbeat_interval: float = 20.0
    heartbeat_timeout: float = 30.0
    session_duration: float = 60.0
    auth_timeout: float = 10.0
    reconnect_grace: float = 15.0
    rate_limit_per_min: int = 10
    trusted_proxies: frozenset[str] = frozenset({"127.0.0.1", "::1"})
    max_sessions: int = 10000
    environment: str = "production"
    db_host: str = "127.0.0.1"
    db_port: int = 3306
    db_database: str = "callDB"
    db_username: str | None = None
    db_password: str | None = None
    db_pool_size: int = 4
    #: Where the development call log lives when no MySQL is configured.
    sqlite_path: str = "intaleq-signal.sqlite3"
    #: This instance's name in the call log (``node_id`` of its rows).
    node_id: str = "localhost:47880"
    #: The local journal of call-log events not yet in the database.
    journal_path: str = "intaleq-signal.journal"
    #: On SIGTERM/SIGINT: ``handoff`` (calls go on after a restart) or ``end``.
    on_stop: str = "handoff"
    #: ``off``, ``optional`` (checked when given) or ``required``.
    participant_tokens: str = "optional"
    #: STUN/TURN URLs handed to the apps, and the TURN credentials' secret
    #: and lifetime (seconds).
    ice_servers: tuple[str, ...] = ()
    turn_secret: str | None = None
    turn_ttl: float = 3600.0
    #: Redis shared by several instances (None: one process, state in it),
    #: and the prefix of every key this daemon writes there.
    redis_url: str | None = None
    redis_prefix: str = "intaleq-signal:"

    @property
    def uses_mysql(self) -> bool:
        """MySQL whenever ``DB_USERNAME`` is set (required in production)."""
        return self.db_username is not None

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Config:
        """Build and validate a config from environment-style strings.

        Raises:
            ConfigError: for the first invalid or missing variable.
        """
        reader = _Reader(env)
        host, port = parse_server_addr(reader.get("SERVER_ADDR", "127.0.0.1:47880"))
        api_key = _utf8("API_KEY", reader.get("API_KEY", ""))
        if not api_key:
            raise ConfigError("API_KEY is required (at least 32 characters)")
        if len(api_key) < MIN_API_KEY_LENGTH:
            raise ConfigError(
                f"API_KEY is too short ({len(api_key)} characters, at least {MIN_API_KEY_LENGTH} required)"
            )
        if api_key == API_KEY_PLACEHOLDER:
            raise ConfigError(
                "API_KEY is still the placeholder of .env.example; generate a secret with: "
                "python3 -c 'import secrets; print(secrets.token_urlsafe(32))'"
            )
        heartbeat_interval = reader.duration("HEARTBEAT_INTERVAL", "20s", positive=True)
        heartbeat_timeout = reader.duration("HEARTBEAT_TIMEOUT", "30s", positive=True)
        if heartbeat_timeout <= heartbeat_interval:
            raise ConfigError(
                "HEARTBEAT_TIMEOUT must be greater than HEARTBEAT_INTERVAL "
                f"({heartbeat_timeout:g}s <= {heartbeat_interval:g}s)"
            )
        environment = reader.choice("ENVIRONMENT", "production", ENVIRONMENTS)
        db_username = env.get("DB_USERNAME") or None
        if environment == "production" and db_username is None:
            raise ConfigError(
                "DB_USERNAME is required when ENVIRONMENT=production "
                "(set ENVIRONMENT=development to use the embedded SQLite call log)"
            )
        ice_servers = parse_ice_servers(env.get("ICE_SERVERS", ""))
        turn_secret = _parse_turn_secret(env.get("TURN_SECRET", ""))
        if turn_secret is None and any(url.startswith("turn") for url in ice_servers):
            raise ConfigError("TURN_SECRET is required when ICE_SERVERS has a turn: or turns: URL")
        turn_ttl = reader.duration("TURN_TTL", "1h", positive=True)
        if not MIN_TURN_TTL <= turn_ttl <= MAX_TURN_TTL:
            raise ConfigError(
                f"TURN_TTL={reader.get('TURN_TTL', '1h')!r} must be from 1m to 168h (7 days): "
                "the lifetime of the TURN credentials"
            )
        return cls(
            api_key=api_key,
            host=host,
            port=port,
            log_level=reader.choice("LOG_LEVEL", "info", LOG_LEVELS),
            log_format=reader.choice("LOG_FORMAT", "text", LOG_FORMATS),
            max_message_bytes=reader.integer("MAX_MESSAGE_BYTES", "4096", 256, 1 << 20),
            heartbeat_interval=heartbeat_interval,
            heartbeat_timeout=heartbeat_timeout,
            session_duration=reader.duration("SESSION_DURATION", "60s", positive=True),
            auth_timeout=reader.duration("AUTH_TIMEOUT", "10s", positive=True),
            reconnect_grace=reader.duration("RECONNECT_GRACE", "15s", positive=False),
            rate_limit_per_min=reader.integer("RATE_LIMIT_PER_MIN", "10", 1, 10**9),
            # An explicitly empty TRUSTED_PROXIES trusts no proxy at all.
            trusted_proxies=_parse_proxies(env.get("TRUSTED_PROXIES", "127.0.0.1,::1")),
            max_sessions=reader.integer("MAX_SESSIONS", "10000", 1, 10**9),
            environment=environment,
            db_host=reader.get("DB_HOST", "127.0.0.1"),
            db_port=reader.integer("DB_PORT", "3306", 1, 65535),
            db_database=reader.get("DB_DATABASE", "callDB"),
            db_username=db_username,
            db_password=env.get("DB_PASSWORD") or None,
            db_pool_size=reader.integer("DB_POOL_SIZE", "4", MIN_DB_POOL_SIZE, MAX_DB_POOL_SIZE),
            sqlite_path=reader.get("SQLITE_PATH", "intaleq-signal.sqlite3"),
            node_id=_parse_node_id(reader.get("NODE_ID", f"{socket.gethostname()}:{port}")),
            journal_path=reader.get("JOURNAL_PATH", "intaleq-signal.journal"),
            on_stop=reader.choice("ON_STOP", "handoff", ON_STOP_CHOICES),
            participant_tokens=reader.choice("PARTICIPANT_TOKENS", "optional", TOKEN_MODES),
            ice_servers=ice_servers,
            turn_secret=turn_secret,
            turn_ttl=turn_ttl,
            redis_url=_parse_redis_url(env.get("REDIS_URL", "").strip()),
            redis_prefix=_parse_redis_prefix(reader.get("REDIS_PREFIX", "intaleq-signal:")),
        )


class _Reader:
    """Typed accessors over a string mapping; empty values mean "default"."""

    __slots__ = ("env",)

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env

    def get(self, name: str, default: str) -> str:
        value = self.env.get(name, "").strip()
        return value or default

    def duration(self, name: str, default: str, *, positive: bool) -> float:
        seconds = parse_duration(name, self.get(name, default))
        if positive and seconds <= 0:
            raise ConfigError(f"{name} must be greater than 0")
        return seconds

    def integer(self, name: str, default: str, low: int, high: int) -> int:
        text = self.get(name, default)
        if not _DIGITS.match(text) or not low <= int(text) <= high:
            raise ConfigError(f"{name}={text!r} must be an integer from {low} to {high}")
        return int(text)

    def choice(self, name: str, default: str, allowed: tuple[str, ...]) -> str:
        value = self.get(name, default).lower()
        if value == "warning":
            value = "warn"
        if value not in allowed:
            raise ConfigError(f"{name}={value!r} must be one of: {', '.join(allowed)}")
        return value


def _utf8(name: str, value: str) -> str:
    """``value``, refused unless it is valid UTF-8: a secret read from an
    EnvironmentFile in another encoding (Latin-1, say) reaches
    ``os.environ`` with surrogate escapes, which the HMACs and the key
    comparison cannot encode. The value is not echoed (docs/operations.md,
    "Configuration")."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ConfigError(
            f"{name} is not valid UTF-8 (at character {exc.start + 1}); "
            "save the environment file as UTF-8 or use ASCII characters"
        ) from None
    return value


def _parse_turn_secret(text: str) -> str | None:
    """``TURN_SECRET``: coturn's ``static-auth-secret``, at least
    :data:`MIN_TURN_SECRET_LENGTH` characters of UTF-8 once surrounding
    blanks are stripped; empty: none (docs/operations.md, "TURN with
    coturn"). A value of blanks only is refused, not taken as unset."""
    if not text:
        return None
    secret = _utf8("TURN_SECRET", text).strip()
    if not secret:
        raise ConfigError("TURN_SECRET is only whitespace; set the secret or leave it empty")
    if len(secret) < MIN_TURN_SECRET_LENGTH:
        raise ConfigError(
            f"TURN_SECRET is too short ({len(secret)} characters, at least {MIN_TURN_SECRET_LENGTH} required)"
        )
    return secret


def _parse_node_id(text: str) -> str:
    """``NODE_ID``: 1–255 printable characters (it is stored in the call
    log's ``node_id`` column, ``VARCHAR(255)``)."""
    if len(text) > 255 or not text.isprintable():
        raise ConfigError(f"NODE_ID={text[:60]!r} must be 1 to 255 printable characters")
    return text


def redacted_url(url: str) -> str:
    """``url`` fit for a log line: a password (``user:password@``) replaced
    by ``***``."""
    scheme, sep, rest = url.partition("://")
    userinfo, at, host = rest.rpartition("@")
    if not sep or not at:
        return url
    user = userinfo.partition(":")[0]
    return f"{scheme}://{user + ':' if user else ''}***@{host}"


def _parse_redis_url(text: str) -> str | None:
    """``REDIS_URL``: empty (one process), or a ``redis://host[:port][/db]``,
    ``rediss://`` (TLS) or ``unix:///path`` URL; a password goes in it as
    ``redis://:password@host`` and is never logged. No query parameters
    (the daemon sets its own timeouts)."""
    if not text:
        return None
    shown = redacted_url(text)[:80]
    scheme, sep, rest = text.partition("://")
    if (
        not sep
        or scheme not in ("redis", "rediss", "unix")
        or not rest.strip("/")
        or any(c.isspace() for c in text)
    ):
        raise ConfigError(f"REDIS_URL={shown!r} must be a redis://, rediss:// or unix:// URL")
    if "?" in rest or "#" in rest:
        raise ConfigError(f"REDIS_URL={shown!r}: no query parameters (the daemon sets its own)")
    if scheme != "unix":
        where, _, database = rest.rpartition("@")[2].partition("/")
        host, colon, port = where.rpartition(":") if not where.endswith("]") else (where, "", "")
        if colon and (not port.isdigit() or not 0 < int(port) < 65536):
            raise ConfigError(f"REDIS_URL={shown!r}: the port must be a number from 1 to 65535")
        if database and not database.isdigit():
            raise ConfigError(f"REDIS_URL={shown!r}: the database after '/' must be a number")
    return text


def _parse_redis_prefix(text: str) -> str:
    """``REDIS_PREFIX``: 1–64 printable characters without spaces."""
    if len(text) > 64 or not text.isprintable() or any(c.isspace() for c in text):
        raise ConfigError(f"REDIS_PREFIX={text[:80]!r} must be 1 to 64 printable characters without spaces")
    return text


def _parse_proxies(text: str) -> frozenset[str]:
    addresses = set()
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        try:
            addresses.add(str(ipaddress.ip_address(item)))
        except ValueError:
            raise ConfigError(f"TRUSTED_PROXIES: {item!r} is not an IP address") from None
    return frozenset(addresses)


def config_from_environment(env_file: str | None) -> Config:
    """Merge ``env_file`` under the real environment (real variables win)
    and build the config.

    Raises:
        ConfigError: as :meth:`Config.from_env`, or for an unreadable file.
    """
    merged: dict[str, str] = load_env_file(env_file) if env_file else {}
    merged.update(os.environ)
    return Config.from_env(merged)
