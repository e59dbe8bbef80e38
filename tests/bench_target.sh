#!/bin/sh
# The daemon as `make bench` starts it for each scenario: with a fresh
# development call log (SQLite), so that no run pays for the rows of the runs
# before it (a grown file makes every insert dearer). Not a test.
#
#   tests/bench_target.sh .venv/bin/python -m intaleq_signal
db=${TMPDIR:-/tmp}/intaleq-bench-calllog.sqlite3
rm -f "$db" "$db"-wal "$db"-shm
SQLITE_PATH=$db exec "$@"
