"""Unit tests of intaleq_signal.config (docs/operations.md, "Configuration"):
defaults, parsing and the one-line errors that name the variable."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from intaleq_signal.config import (
    API_KEY_PLACEHOLDER,
    EX_CONFIG,
    MAX_DB_POOL_SIZE,
    MIN_DB_POOL_SIZE,
    Config,
    ConfigError,
    config_from_environment,
    load_env_file,
    parse_duration,
    parse_server_addr,
    redacted_url,
)

ROOT = Path(__file__).resolve().parent.parent

KEY = "k" * 32
BASE = {"API_KEY": KEY, "ENVIRONMENT": "development"}

#: Every variable of docs/operations.md, "Configuration", plus SQLITE_PATH,
#: cleared from os.environ before config_from_environment tests.
ALL_VARIABLES = (
    "SERVER_ADDR",
    "API_KEY",
    "LOG_LEVEL",
    "LOG_FORMAT",
    "MAX_MESSAGE_BYTES",
    "HEARTBEAT_INTERVAL",
    "HEARTBEAT_TIMEOUT",
    "SESSION_DURATION",
    "AUTH_TIMEOUT",
    "RECONNECT_GRACE",
    "RATE_LIMIT_PER_MIN",
    "TRUSTED_PROXIES",
    "MAX_SESSIONS",
    "ENVIRONMENT",
    "DB_HOST",
    "DB_PORT",
    "DB_DATABASE",
    "DB_USERNAME",
    "DB_PASSWORD",
    "DB_POOL_SIZE",
    "SQLITE_PATH",
)


def build(**overrides: str) -> Config:
    return Config.from_env({**BASE, **overrides})


def config_error(**overrides: str) -> str:
    with pytest.raises(ConfigError) as info:
        build(**overrides)
    return str(info.value)


# -- defaults -----------------------------------------------------------------


def test_defaults():
    """docs/operations.md, "Configuration" (its table): the default of every variable."""
    config = build()
    assert (config.host, config.port) == ("127.0.0.1", 47880)
    assert config.api_key == KEY
    assert config.log_level == "info"
    assert config.log_format == "text"
    assert config.max_message_bytes == 4096
    assert config.heartbeat_interval == 20.0
    assert config.heartbeat_timeout == 30.0
    assert config.session_duration == 60.0
    assert config.auth_timeout == 10.0
    assert config.reconnect_grace == 15.0
    assert config.rate_limit_per_min == 10
    assert config.trusted_proxies == frozenset({"127.0.0.1", "::1"})
    assert config.max_sessions == 10000
    assert config.environment == "development"
    assert (config.db_host, config.db_port, config.db_database) == ("127.0.0.1", 3306, "callDB")
    assert config.db_username is None
    assert config.db_password is None
    assert config.db_pool_size == 4
    assert config.uses_mysql is False


def test_environment_defaults_to_production():
    """docs/operations.md, "Configuration": ENVIRONMENT defaults to production (which then
    requires DB_USERNAME)."""
    config = Config.from_env({"API_KEY": KEY, "DB_USERNAME": "calls"})
    assert config.environment == "production"


def test_empty_values_mean_default():
    """docs/operations.md, "Configuration": an empty variable (as EnvironmentFile= writes it)
    takes the default."""
    config = build(LOG_LEVEL="", HEARTBEAT_INTERVAL="", MAX_SESSIONS="", SERVER_ADDR="")
    assert config.log_level == "info"
    assert config.heartbeat_interval == 20.0
    assert config.max_sessions == 10000
    assert config.port == 47880


def test_every_variable_is_read():
    """docs/operations.md, "Configuration" (its table): each variable sets its field."""
    config = build(
        SERVER_ADDR="0.0.0.0:9000",
        LOG_LEVEL="debug",
        LOG_FORMAT="json",
        MAX_MESSAGE_BYTES="8192",
        HEARTBEAT_INTERVAL="5s",
        HEARTBEAT_TIMEOUT="9s",
        SESSION_DURATION="2m",
        AUTH_TIMEOUT="500ms",
        RECONNECT_GRACE="0",
        RATE_LIMIT_PER_MIN="30",
        TRUSTED_PROXIES="10.0.0.1",
        MAX_SESSIONS="5",
        DB_HOST="db.internal",
        DB_PORT="3307",
        DB_DATABASE="calls",
        DB_USERNAME="signal",
        DB_PASSWORD="secret",
        DB_POOL_SIZE="8",
    )
    assert (config.host, config.port) == ("0.0.0.0", 9000)
    assert (config.log_level, config.log_format) == ("debug", "json")
    assert config.max_message_bytes == 8192
    assert (config.heartbeat_interval, config.heartbeat_timeout) == (5.0, 9.0)
    assert config.session_duration == 120.0
    assert config.auth_timeout == 0.5
    assert config.reconnect_grace == 0.0
    assert config.rate_limit_per_min == 30
    assert config.trusted_proxies == frozenset({"10.0.0.1"})
    assert config.max_sessions == 5
    assert (config.db_host, config.db_port, config.db_database) == ("db.internal", 3307, "calls")
    assert (config.db_username, config.db_password, config.db_pool_size) == ("signal", "secret", 8)


# -- durations ----------------------------------------------------------------


@pytest.mark.parametrize(
    "text, seconds",
    [
        ("500ms", 0.5),
        ("20s", 20.0),
        ("5m", 300.0),
        ("1h", 3600.0),
        ("7", 7.0),
        ("1.5", 1.5),
        ("0.25s", 0.25),
        ("0", 0.0),
        (" 20s ", 20.0),
    ],
)
def test_parse_duration_forms(text, seconds):
    """docs/operations.md, "Configuration": durations accept 500ms, 20s, 5m, 1h or a bare
    number of seconds."""
    assert parse_duration("SESSION_DURATION", text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "text", ["", "abc", "-1", "1d", "10 sec", "1e3", "ms", "5mm", "1,5", "inf", "nan", "1" * 400]
)
def test_parse_duration_invalid(text):
    """docs/operations.md, "Configuration": an unparsable duration is a ConfigError naming the variable."""
    with pytest.raises(ConfigError, match="SESSION_DURATION"):
        parse_duration("SESSION_DURATION", text)


@pytest.mark.parametrize(
    "name", ["HEARTBEAT_INTERVAL", "HEARTBEAT_TIMEOUT", "SESSION_DURATION", "AUTH_TIMEOUT", "RECONNECT_GRACE"]
)
def test_unparsable_duration_variable_is_named(name):
    """docs/operations.md, "Configuration": bad duration → one line naming the variable."""
    assert name in config_error(**{name: "soon"})


@pytest.mark.parametrize("name", ["HEARTBEAT_INTERVAL", "SESSION_DURATION", "AUTH_TIMEOUT"])
def test_zero_duration_refused_where_it_makes_no_sense(name):
    """docs/operations.md, "Configuration": a zero ping interval, session duration or auth
    timeout is bad configuration."""
    assert name in config_error(**{name: "0s"})


def test_zero_reconnect_grace_allowed():
    """docs/operations.md, "Configuration", RECONNECT_GRACE: 0 means a dropped active
    participant ends the call at once."""
    assert build(RECONNECT_GRACE="0").reconnect_grace == 0.0


@pytest.mark.parametrize("interval, timeout", [("20s", "20s"), ("30s", "20s"), ("1m", "59s")])
def test_heartbeat_timeout_must_exceed_interval(interval, timeout):
    """docs/operations.md, "Configuration": HEARTBEAT_TIMEOUT not greater than
    HEARTBEAT_INTERVAL stops the process."""
    message = config_error(HEARTBEAT_INTERVAL=interval, HEARTBEAT_TIMEOUT=timeout)
    assert "HEARTBEAT_TIMEOUT" in message


def test_heartbeat_timeout_greater_by_a_millisecond_is_fine():
    """docs/operations.md, "Configuration": any timeout strictly greater than the interval is accepted."""
    config = build(HEARTBEAT_INTERVAL="1s", HEARTBEAT_TIMEOUT="1001ms")
    assert config.heartbeat_timeout > config.heartbeat_interval


# -- SERVER_ADDR --------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("127.0.0.1:47880", ("127.0.0.1", 47880)),
        ("0.0.0.0:80", ("0.0.0.0", 80)),
        ("localhost:1", ("localhost", 1)),
        ("example.com:65535", ("example.com", 65535)),
        ("[::1]:47880", ("::1", 47880)),
        ("[::]:0", ("::", 0)),
        ("[2001:db8::5]:443", ("2001:db8::5", 443)),
    ],
)
def test_parse_server_addr_forms(text, expected):
    """docs/operations.md, "Configuration", SERVER_ADDR: host:port, IPv6 as [::1]:47880."""
    assert parse_server_addr(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "localhost",
        "127.0.0.1",
        "127.0.0.1:",
        ":47880",
        "127.0.0.1:70000",
        "127.0.0.1:65536",
        "127.0.0.1:-1",
        "127.0.0.1:http",
        "::1:47880",
        "::1",
        "2001:db8::5:443",
        "[::1]",
        "[::1:47880",
        "[not-v6]:80",
        "[]:80",
        "[127.0.0.1]:80",
    ],
)
def test_parse_server_addr_invalid(text):
    """docs/operations.md, "Configuration": an unparsable SERVER_ADDR is a ConfigError naming SERVER_ADDR."""
    with pytest.raises(ConfigError, match="SERVER_ADDR"):
        parse_server_addr(text)


def test_bad_server_addr_through_from_env():
    """docs/operations.md, "Configuration": Config.from_env reports a bad SERVER_ADDR by name."""
    assert "SERVER_ADDR" in config_error(SERVER_ADDR="::1:47880")


def test_server_addr_port_with_non_ascii_digit():
    """docs/operations.md, "Configuration": any bad port is a ConfigError (exit 78), never a
    bare ValueError traceback."""
    with pytest.raises(ConfigError, match="SERVER_ADDR"):
        parse_server_addr("127.0.0.1:\u00b2")  # '²'.isdigit() is True but int('²') fails


# -- API_KEY ------------------------------------------------------------------


def test_api_key_required():
    """docs/operations.md, "Configuration": API_KEY is required."""
    with pytest.raises(ConfigError, match="API_KEY"):
        Config.from_env({"ENVIRONMENT": "development"})


@pytest.mark.parametrize("length", [1, 16, 31])
def test_api_key_too_short(length):
    """docs/operations.md, "Configuration": API_KEY of fewer than 32 characters stops the
    process; the key itself is not printed."""
    key = "s3cr3t-" + "x" * (length - 7) if length > 7 else "z" * length
    message = config_error(API_KEY=key)
    assert "API_KEY" in message
    assert key not in message


def test_api_key_of_32_characters_accepted():
    """docs/operations.md, "Configuration": 32 characters is enough."""
    assert build(API_KEY="a" * 32).api_key == "a" * 32


def test_env_example_api_key_is_refused():
    """docs/operations.md: the API_KEY written in .env.example (read from the file,
    so the two cannot drift) stops the process like a short key, naming API_KEY
    without echoing the value; the whole file, unedited, fails on API_KEY."""
    example = load_env_file(str(ROOT / ".env.example"))
    assert example["API_KEY"] == API_KEY_PLACEHOLDER
    message = config_error(API_KEY=example["API_KEY"])
    assert "API_KEY" in message
    assert API_KEY_PLACEHOLDER not in message
    with pytest.raises(ConfigError, match="API_KEY"):
        Config.from_env({**example, "ENVIRONMENT": "development"})


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed here")
def test_make_env_replaces_the_placeholder(tmp_path):
    """The Makefile's .env target (behind `make run`) writes a random API_KEY, which is accepted."""
    shutil.copy(ROOT / ".env.example", tmp_path / ".env.example")
    subprocess.run(
        ["make", "--no-print-directory", "-f", str(ROOT / "Makefile"), ".env"],
        cwd=tmp_path,
        check=True,
        capture_output=True,
        timeout=60,
    )
    config = Config.from_env(load_env_file(str(tmp_path / ".env")))
    assert config.environment == "development"
    assert config.api_key != API_KEY_PLACEHOLDER


# -- choices ------------------------------------------------------------------


@pytest.mark.parametrize("value", ["debug", "info", "warn", "error", "INFO", "warning"])
def test_log_levels(value):
    """docs/operations.md, "Configuration", LOG_LEVEL: debug, info, warn, error."""
    assert build(LOG_LEVEL=value).log_level in ("debug", "info", "warn", "error")


@pytest.mark.parametrize(
    "name, value",
    [
        ("LOG_LEVEL", "verbose"),
        ("LOG_LEVEL", "trace"),
        ("LOG_FORMAT", "xml"),
        ("LOG_FORMAT", "logfmt"),
        ("ENVIRONMENT", "staging"),
        ("ENVIRONMENT", "dev"),
    ],
)
def test_unknown_choice(name, value):
    """docs/operations.md, "Configuration": an unknown LOG_LEVEL / LOG_FORMAT / ENVIRONMENT
    names the variable."""
    assert name in config_error(**{name: value})


# -- ENVIRONMENT and the database -------------------------------------------


@pytest.mark.parametrize("env", [{"API_KEY": KEY}, {"API_KEY": KEY, "DB_USERNAME": ""}])
def test_production_requires_db_username(env):
    """docs/operations.md, "Configuration": in production, missing DB_USERNAME is a configuration error."""
    with pytest.raises(ConfigError, match="DB_USERNAME"):
        Config.from_env({**env, "ENVIRONMENT": "production"})


def test_development_without_db_username_uses_sqlite():
    """docs/operations.md, "Configuration": development without DB_USERNAME runs with the
    embedded SQLite log."""
    config = build()
    assert config.uses_mysql is False
    assert config.sqlite_path


@pytest.mark.parametrize("environment", ["production", "development"])
def test_db_username_means_mysql(environment):
    """docs/operations.md, "Configuration": DB_USERNAME set → the MySQL call log."""
    config = build(ENVIRONMENT=environment, DB_USERNAME="signal")
    assert config.uses_mysql is True
    assert config.db_username == "signal"


# -- integers -----------------------------------------------------------------


@pytest.mark.parametrize(
    "name, value",
    [
        ("MAX_MESSAGE_BYTES", "abc"),
        ("MAX_MESSAGE_BYTES", "-1"),
        ("MAX_MESSAGE_BYTES", "0"),
        ("MAX_MESSAGE_BYTES", "4k"),
        ("RATE_LIMIT_PER_MIN", "0"),
        ("RATE_LIMIT_PER_MIN", "1.5"),
        ("MAX_SESSIONS", "0"),
        ("MAX_SESSIONS", "many"),
        ("DB_PORT", "0"),
        ("DB_PORT", "65536"),
        ("DB_POOL_SIZE", "0"),
        ("DB_POOL_SIZE", "-4"),
    ],
)
def test_bad_integer_names_variable(name, value):
    """docs/operations.md, "Configuration": a bad number names the variable."""
    assert name in config_error(**{name: value})


def test_db_pool_size_range():
    """docs/operations.md: DB_POOL_SIZE takes 1 to MAX_DB_POOL_SIZE writer threads, the bound
    the unit's TasksMax is sized for (tests/test_operation.py); one more names the variable."""
    assert build(DB_POOL_SIZE=str(MIN_DB_POOL_SIZE)).db_pool_size == MIN_DB_POOL_SIZE
    assert build(DB_POOL_SIZE=str(MAX_DB_POOL_SIZE)).db_pool_size == MAX_DB_POOL_SIZE
    message = config_error(DB_POOL_SIZE=str(MAX_DB_POOL_SIZE + 1))
    assert "DB_POOL_SIZE" in message
    assert f"from {MIN_DB_POOL_SIZE} to {MAX_DB_POOL_SIZE}" in message
    assert "DB_POOL_SIZE" in config_error(DB_POOL_SIZE="64")


@pytest.mark.parametrize("name", ["MAX_MESSAGE_BYTES", "DB_PORT"])
def test_integer_with_non_ascii_digit_is_a_config_error(name):
    """docs/operations.md, "Configuration": bad configuration exits 78 with a line naming the
    variable, not a ValueError traceback."""
    with pytest.raises(ConfigError, match=name):
        build(**{name: "\u00b2"})  # '²'.isdigit() is True but int('²') raises ValueError


# -- TRUSTED_PROXIES ----------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("10.0.0.1", {"10.0.0.1"}),
        ("10.0.0.1, 10.0.0.2", {"10.0.0.1", "10.0.0.2"}),
        ("127.0.0.1,::1", {"127.0.0.1", "::1"}),
        ("0:0:0:0:0:0:0:1", {"::1"}),
        ("10.0.0.1,,", {"10.0.0.1"}),
        ("", set()),
        (" , ", set()),
    ],
)
def test_trusted_proxies(text, expected):
    """docs/operations.md, "Configuration", TRUSTED_PROXIES: comma-separated addresses; an
    empty value trusts nobody."""
    assert build(TRUSTED_PROXIES=text).trusted_proxies == frozenset(expected)


@pytest.mark.parametrize("text", ["nginx", "10.0.0.1,10.0.0.300", "10.0.0.0/8", "localhost"])
def test_trusted_proxies_bad_address(text):
    """docs/operations.md, "Configuration": a bad TRUSTED_PROXIES entry names the variable."""
    assert "TRUSTED_PROXIES" in config_error(TRUSTED_PROXIES=text)


def test_exit_status_is_ex_config():
    """docs/operations.md, "Configuration": bad configuration exits with status 78 (EX_CONFIG)."""
    assert EX_CONFIG == 78


# -- load_env_file ------------------------------------------------------------


def test_load_env_file(tmp_path):
    """docs/operations.md, "Configuration", --env-file: KEY=VALUE lines, # comments, blank
    lines, optional quotes, export prefix."""
    path = tmp_path / ".env"
    path.write_text(
        "# a comment\n"
        "\n"
        "   \n"
        "PLAIN=value\n"
        'DOUBLE="two words"\n'
        "SINGLE='single # not a comment'\n"
        "export EXPORTED=yes\n"
        "SPACED = padded \n"
        "EMPTY=\n"
        "EQUALS=a=b=c\n"
        "TRAILING=value # comment\n"
        "HASH=abc#def\n"
        "  # indented comment\n",
        encoding="utf-8",
    )
    assert load_env_file(str(path)) == {
        "PLAIN": "value",
        "DOUBLE": "two words",
        "SINGLE": "single # not a comment",
        "EXPORTED": "yes",
        "SPACED": "padded",
        "EMPTY": "",
        "EQUALS": "a=b=c",
        "TRAILING": "value",
        "HASH": "abc#def",
    }


def test_load_env_file_quoted_value_with_trailing_comment(tmp_path):
    """docs/operations.md, "Configuration": optional quotes and # comments combine: KEY="v" #
    note gives v without quotes."""
    path = tmp_path / ".env"
    path.write_text('API_KEY="abc def" # production key\n', encoding="utf-8")
    assert load_env_file(str(path)) == {"API_KEY": "abc def"}


@pytest.mark.parametrize("line", ["NOEQUALS", "=value", "1KEY=x", "BAD KEY=x", "KEY-NAME=x"])
def test_load_env_file_bad_line(tmp_path, line):
    """docs/operations.md, "Configuration": a line that is not KEY=VALUE is a ConfigError
    giving the file and line number."""
    path = tmp_path / ".env"
    path.write_text(f"# header\nOK=1\n{line}\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_env_file(str(path))
    assert str(path) in str(info.value)
    assert "line 3" in str(info.value)


def test_load_env_file_missing(tmp_path):
    """docs/operations.md, "Configuration": an unreadable --env-file is a ConfigError naming the file."""
    path = tmp_path / "missing.env"
    with pytest.raises(ConfigError, match="--env-file"):
        load_env_file(str(path))


def test_load_env_file_not_utf8(tmp_path):
    """docs/operations.md, "Configuration": an undecodable --env-file is a ConfigError, not a traceback."""
    path = tmp_path / ".env"
    path.write_bytes(b"KEY=\xff\xfe\n")
    with pytest.raises(ConfigError, match="--env-file"):
        load_env_file(str(path))


# -- config_from_environment --------------------------------------------------


@pytest.fixture
def clean_environ(monkeypatch):
    for name in ALL_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_real_environment_wins_over_env_file(tmp_path, clean_environ):
    """docs/operations.md, "Configuration": --env-file is loaded first; real environment variables win."""
    path = tmp_path / ".env"
    path.write_text(
        f"API_KEY={'f' * 40}\nENVIRONMENT=development\nLOG_LEVEL=debug\nMAX_SESSIONS=7\n", encoding="utf-8"
    )
    clean_environ.setenv("LOG_LEVEL", "error")
    config = config_from_environment(str(path))
    assert config.log_level == "error"
    assert config.api_key == "f" * 40
    assert config.max_sessions == 7


def test_config_from_environment_without_file(clean_environ):
    """docs/operations.md, "Configuration": without --env-file the environment alone configures the server."""
    clean_environ.setenv("API_KEY", KEY)
    clean_environ.setenv("ENVIRONMENT", "development")
    assert config_from_environment(None).api_key == KEY


def test_config_from_environment_missing_file(tmp_path, clean_environ):
    """docs/operations.md, "Configuration": a missing --env-file stops the process with a
    configuration error."""
    clean_environ.setenv("API_KEY", KEY)
    with pytest.raises(ConfigError):
        config_from_environment(str(tmp_path / "nope.env"))


def test_node_id_defaults_to_host_and_port():
    import socket

    assert build(SERVER_ADDR="127.0.0.1:5000").node_id == f"{socket.gethostname()}:5000"
    assert build(NODE_ID="  edge-1 ").node_id == "edge-1"


@pytest.mark.parametrize("value", ["x" * 256, "bad\tid", "new\x00line"])
def test_node_id_must_fit_its_column(value):
    assert "NODE_ID" in config_error(NODE_ID=value)


def test_journal_path_default_and_override():
    assert build().journal_path == "intaleq-signal.journal"
    assert build(JOURNAL_PATH="/var/lib/x/j").journal_path == "/var/lib/x/j"


@pytest.mark.parametrize(
    "url",
    [
        "localhost:6379",
        "http://redis:6379",
        "redis://",
        "redis:// host",
        "memcached://x",
        "redis://127.0.0.1:abc",
        "redis://127.0.0.1:99999",
        "redis://127.0.0.1:6379/abc",
        "redis://127.0.0.1:6379?socket_timeout=abc",
        "redis://127.0.0.1:6379/0?foo=bar",
    ],
)
def test_bad_redis_url_names_the_variable(url):
    with pytest.raises(ConfigError, match="REDIS_URL"):
        Config.from_env({**BASE, "REDIS_URL": url})


def test_redis_password_is_never_shown():
    """A password in REDIS_URL (the way to give one) stays out of every line."""
    with pytest.raises(ConfigError) as refused:
        Config.from_env({**BASE, "REDIS_URL": "redis://user:s3cretpass@127.0.0.1:abc"})
    assert "s3cretpass" not in str(refused.value) and "user:***@" in str(refused.value)
    assert redacted_url("redis://:pw@h:1/0") == "redis://***@h:1/0"
    assert redacted_url("rediss://u:p:w@h") == "rediss://u:***@h"
    assert redacted_url("redis://h:6379/0") == "redis://h:6379/0"
    config = Config.from_env({**BASE, "REDIS_URL": "redis://:pw@[::1]:6379/2"})
    assert config.redis_url == "redis://:pw@[::1]:6379/2"


def test_redis_settings():
    config = Config.from_env({**BASE, "REDIS_URL": " redis://127.0.0.1:6379/2 ", "REDIS_PREFIX": "calls:"})
    assert (config.redis_url, config.redis_prefix) == ("redis://127.0.0.1:6379/2", "calls:")
    assert Config.from_env(BASE).redis_url is None
    for prefix in ("has space:", "x" * 65):
        with pytest.raises(ConfigError, match="REDIS_PREFIX"):
            Config.from_env({**BASE, "REDIS_PREFIX": prefix})


# -- TURN ---------------------------------------------------------------------

TURN_SECRET = "t" * 40


@pytest.mark.parametrize("text, seconds", [("1m", 60.0), ("60s", 60.0), ("1h", 3600.0), ("168h", 604800.0)])
def test_turn_ttl_range_accepted(text, seconds):
    """docs/operations.md, "Configuration": TURN_TTL from 1 minute to 7 days."""
    assert build(TURN_TTL=text).turn_ttl == seconds


@pytest.mark.parametrize("text", ["59s", "500ms", "0.5", "169h", "604801", "100000h"])
def test_turn_ttl_out_of_range_names_the_variable(text):
    """Below a minute the credentials can expire before the relay is even
    allocated; past 7 days an ended call's credentials open relays for that
    long (and far enough out coturn refuses the expiry)."""
    line = config_error(TURN_TTL=text)
    assert line.startswith(f"TURN_TTL={text!r}") and "1m to 168h" in line, line


def test_turn_secret_is_stripped_like_other_values():
    """An EnvironmentFile line ``TURN_SECRET= <secret> `` gives the secret
    coturn has, without the blanks (the HMAC would differ otherwise)."""
    config = build(ICE_SERVERS="turn:t.example.org", TURN_SECRET=f" \t{TURN_SECRET} ")
    assert config.turn_secret == TURN_SECRET


def test_turn_secret_of_whitespace_only_is_refused():
    line = config_error(ICE_SERVERS="stun:s.example.org", TURN_SECRET=" " * 40)
    assert line.startswith("TURN_SECRET") and "whitespace" in line, line


@pytest.mark.parametrize("name", ["API_KEY", "TURN_SECRET"])
def test_secrets_that_are_not_utf8_are_refused(name):
    """A Latin-1 EnvironmentFile reaches os.environ with surrogate escapes
    ("\\udce9" for the byte 0xE9): refused at start, naming the variable,
    the value not echoed (it used to raise UnicodeEncodeError)."""
    value = "s" * 40 + "\udce9" + "s" * 4
    line = config_error(**{"ICE_SERVERS": "turn:t.example.org", "TURN_SECRET": TURN_SECRET, name: value})
    assert line.startswith(name) and "UTF-8" in line and "s" * 40 not in line, line


@pytest.mark.parametrize(
    "overrides, variable",
    [
        ({"ICE_SERVERS": "turn:127.0.0.1:3478", "TURN_SECRET": "s" * 40 + "\udce9"}, "TURN_SECRET"),
        ({"API_KEY": "k" * 40 + "\udce9"}, "API_KEY"),
        ({"TURN_TTL": "30s"}, "TURN_TTL"),
        ({"TURN_TTL": "8000h"}, "TURN_TTL"),
    ],
    ids=["latin1-turn-secret", "latin1-api-key", "ttl-30s", "ttl-8000h"],
)
def test_the_daemon_exits_78_naming_the_turn_setting(tmp_path, overrides, variable):
    """docs/operations.md, "Configuration": the real process, its
    environment holding the raw bytes of a Latin-1 file: exit 78 and one
    line naming the variable (no traceback, exit 1 and restart loop)."""
    from conftest import daemon_env, run_daemon

    result = run_daemon(daemon_env(tmp_path, **overrides))
    lines = result.stderr.strip().splitlines()
    assert result.returncode == EX_CONFIG and len(lines) == 1, result
    assert variable in lines[0] and "Traceback" not in result.stderr, lines
