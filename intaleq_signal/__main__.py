"""``python -m intaleq_signal [--env-file PATH]`` and the ``intaleq-signal``
command (``docs/operations.md``, "Configuration").

Exit statuses: 0 after a clean stop; otherwise the ``exit_status`` of the
:class:`~intaleq_signal.exceptions.StartupError` that stopped the start
(78, ``EX_CONFIG``, for a setting or a limit restarting cannot fix; 1 when
the address cannot be bound), with its one line on stderr.
"""

from __future__ import annotations

import argparse
import sys

from .config import config_from_environment
from .exceptions import StartupError
from .logs import setup_logging, stderr_is_journal
from .server import run


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
    except StartupError as exc:
        return _fail(exc.line(), exc.exit_status)
    return 0


def _fail(message: str, status: int) -> int:
    """Print the one line that says why the process stops (an error for
    ``journalctl -p err`` when stderr is the journal); return ``status``."""
    prefix = "<3>" if stderr_is_journal() else ""
    print(f"{prefix}intaleq-signal: {message}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
