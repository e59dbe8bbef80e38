#!/usr/bin/env bash
# How many idle authenticated connections the daemon holds inside
# the unit's memory limit. The daemon runs in a memory cgroup with the limit
# of intaleq-signal.service (MemoryMax=128M: memory.max on cgroup v2,
# memory.limit_in_bytes on v1, which is what systemd sets), and
# the benchmark harness's loadgen.js ($BENCH, set by make bench-memory) opens CONNS authenticated idle sockets (CONNS/2
# calls) against it. Prints the loadgen figures and the cgroup's peak usage,
# limit failures and OOM kills; exits 1 if the sockets were not all held.
#
#   make bench-memory                      # 10000 sockets under 128M (needs root)
#   CONNS=12000 LIMIT=128M make bench-memory
set -euo pipefail

CONNS=${CONNS:-10000}
LIMIT=${LIMIT:-128M}
PORT=${PORT:-20190}  # below the ephemeral port range
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$HERE")
BENCH=${BENCH:?run it with make bench-memory, which sets BENCH}
PY=${PY:-$ROOT/.venv/bin/python}
export NODE_PATH=${BENCH_DEPS:-${TMPDIR:-/tmp}/intaleq-bench-deps}/node_modules
if [[ ! -d $NODE_PATH/ws ]]; then
  echo "bench_memory_limit.sh: run 'make bench' once first (it installs the load generator's npm packages)" >&2
  exit 2
fi
ulimit -n "$(ulimit -Hn)"
if (( $(ulimit -n) < CONNS + 100 )); then  # each process (server, load generator) holds CONNS
  echo "bench_memory_limit.sh: open-files limit $(ulimit -n) is too low for $CONNS sockets" >&2
  exit 2
fi

bytes=$(numfmt --from=iec "$LIMIT")
name="intaleq-signal-bench-$$"
if [[ -f /sys/fs/cgroup/cgroup.controllers ]]; then  # cgroup v2
  cg=/sys/fs/cgroup/$name
  mkdir "$cg"
  echo "$bytes" >"$cg/memory.max"
  echo 0 >"$cg/memory.swap.max" 2>/dev/null || true
  peak_file=$cg/memory.peak events_file=$cg/memory.events stat_keys="anon file"
else  # cgroup v1
  cg=/sys/fs/cgroup/memory/$name
  mkdir "$cg"
  echo "$bytes" >"$cg/memory.limit_in_bytes"
  echo "$bytes" >"$cg/memory.memsw.limit_in_bytes" 2>/dev/null || true
  peak_file=$cg/memory.max_usage_in_bytes events_file=$cg/memory.failcnt stat_keys="total_rss total_cache"
fi

key=$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')
log=$(mktemp /tmp/intaleq-memory-limit.XXXXXX.log)
server=""
cleanup() {
  [[ -n $server ]] && kill -TERM "$server" 2>/dev/null && wait "$server" 2>/dev/null || true
  rmdir "$cg" 2>/dev/null || true
  rm -f "$log"
}
trap cleanup EXIT

# The same settings as the side-by-side benchmark (the harness's run.sh).
env API_KEY="bench-$key" SERVER_ADDR="127.0.0.1:$PORT" RATE_LIMIT_PER_MIN=100000000 \
  MAX_SESSIONS=10000000 SESSION_DURATION=1h AUTH_TIMEOUT=30s RECONNECT_GRACE=0s \
  HEARTBEAT_INTERVAL=20s HEARTBEAT_TIMEOUT=30s MAX_MESSAGE_BYTES=4096 LOG_LEVEL=warn \
  ENVIRONMENT=development SQLITE_PATH="${log%.log}.sqlite3" \
  bash -c "echo \$\$ >'$cg/cgroup.procs' && exec '$PY' -m intaleq_signal" >"$log" 2>&1 &
server=$!
for _ in $(seq 1 100); do
  (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break
  sleep 0.1
done

node "$BENCH/loadgen.js" idle --conns "$CONNS" --settle 3 --hold 5 --setup-concurrency 64 \
  --url "http://127.0.0.1:$PORT" --api-key "bench-$key" --server-pid "$server" --label memory_limit
alive=yes
kill -0 "$server" 2>/dev/null || alive=no
echo
echo "limit: $LIMIT ($bytes bytes) on $cg"
echo "peak usage of the cgroup: $(numfmt --to=iec "$(cat "$peak_file")") (process memory and page cache)"
for key in $stat_keys; do  # now: the process's own memory, and reclaimable page cache (the call log file)
  echo "  $key now: $(numfmt --to=iec "$(awk -v k="$key" '$1 == k {print $2}' "$cg/memory.stat")")"
done
echo "limit hits (v1 failcnt, v2 memory.events): $(tr '\n' ' ' <"$events_file")"
echo "server still running: $alive"
rm -f "${log%.log}.sqlite3"*
[[ $alive == yes ]]
