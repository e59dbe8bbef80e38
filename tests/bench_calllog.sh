#!/usr/bin/env bash
# Call-log benchmark: POST /sessions throughput, call set-up CPU
# and event-loop lag with no store, the SQLite store and the MySQL store,
# driven by the benchmark harness at $BENCH_DIR (set by `make bench-calllog`;
# one run.sh per store; compare within a run).
#   make bench-calllog                 REPEAT=3 SCENARIOS="create_fresh connect"
set -euo pipefail
: "${BENCH_DIR:?run it with make bench-calllog, which sets BENCH_DIR}"
cd "$(dirname "$0")/.."
PY=$PWD/.venv/bin/python
LAG=$(mktemp /tmp/intaleq-lag.XXXXXX.jsonl)
DB=bench_intaleq_$$
export DB_HOST=${DB_HOST:-127.0.0.1} DB_PORT=${DB_PORT:-3306}
MYSQL_USER=${DB_USERNAME:-root}
sql() {
    "$PY" -c 'import os, sys, pymysql
c = pymysql.connect(host=os.environ["DB_HOST"], port=int(os.environ["DB_PORT"]),
                    user=sys.argv[1], password=os.environ.get("DB_PASSWORD", ""))
c.cursor().execute(sys.argv[2])' "$MYSQL_USER" "$1"
}
sql "CREATE DATABASE $DB"
trap 'sql "DROP DATABASE IF EXISTS $DB"; rm -f "$LAG"' EXIT

for store in none sqlite mysql; do
    extra=()
    if [[ $store == mysql ]]; then
        extra=(ENVIRONMENT=production DB_USERNAME="$MYSQL_USER" DB_DATABASE="$DB")
    fi
    env "${extra[@]}" BENCH_LAG_FILE="$LAG" SERVERS=target TARGET_NAME="store=$store" \
        SCENARIOS="${SCENARIOS:-create_fresh connect}" REPEAT="${REPEAT:-3}" \
        TARGET_CMD="$PY tests/bench_server.py --store $store" TARGET_DIR="$PWD" \
        SQLITE_PATH="/tmp/intaleq-bench-$$.sqlite3" \
        "$BENCH_DIR/run.sh" 2>&1 | grep -v '^run.sh: \[' || true
    rm -f /tmp/intaleq-bench-$$.sqlite3*
done
echo
echo "event-loop lag while serving (ms a 5 ms sleep overshot), one line per server run:"
cat "$LAG"
