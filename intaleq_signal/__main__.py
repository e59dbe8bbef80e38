"""``python -m intaleq_signal [--env-file PATH]`` and the ``intaleq-signal``
command (SPEC §2)."""

from __future__ import annotations

import argparse
import sys

from .calllog.writer import StartError
from .config import EX_CONFIG, ConfigError, config_from_environment
from .logs import setup_logging, stderr_is_journal
from .server import ListenError, run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="intaleq-signal",
        description="Voice-call signaling server of the Intaleq ride-hailing app.",
    )
    parser.add_argument(
        "--env-file",
        metavar="PATH",
        help="load KEY=VALUE settings from PATH first (environment variables win)",
    )
    args = parser.parse_args(argv)
    try:
        config = config_from_environment(args.env_file)
        setup_logging(config.log_level, config.log_format)
        run(config)
    except ConfigError as exc:
        return _fail(f"configuration error: {exc}", EX_CONFIG)
    except StartError as exc:  # restarting cannot help: a limit to raise
        return _fail(str(exc), EX_CONFIG)
    except ListenError as exc:  # the address is taken, or not ours to bind
        return _fail(str(exc), 1)
    return 0


def _fail(message: str, status: int) -> int:
    """Print the one line that says why the process stops (an error for
    ``journalctl -p err`` when stderr is the journal); return ``status``."""
    prefix = "<3>" if stderr_is_journal() else ""
    print(f"{prefix}intaleq-signal: {message}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
