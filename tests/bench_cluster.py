"""Several instances against one, side by side in one run (``make
bench-cluster``; docs/performance.md, "Several instances"); not a test.

    BENCH_DIR=<harness> python tests/bench_cluster.py [--repeat 3] [--quick] [--redis-url URL]

Each scenario of the benchmark harness's load generator (``relay_light``:
50 calls at 10 msg/s per socket, the latency a relay between instances adds
when nothing queues; ``relay``: 200 calls at 10 msg/s; ``relay_heavy``: 1000
calls at 15 msg/s, below one instance's saturation on a quiet machine, the
CPU-per-message figure; ``saturate``: 1000 calls as fast as allowed, the
ceiling) runs against three set-ups, each started fresh:

- ``one``: one instance, no Redis (the single-process deployment);
- ``same``: two instances sharing sessions through Redis, each call whole
  on one of them (half of the calls on each);
- ``cross``: two instances, each call's driver on the instance running its
  session and the passenger on the other, so that every message crosses
  Redis (each instance runs half of the sessions).

The load generator runs with two workers in every set-up (the same load
generator for all three); ``tests/bench_cluster_route.js``, preloaded into
it, points worker *i* at instance *i* and, for ``cross``, the passengers at
the other one. CPU is read from ``/proc/<pid>/stat`` of the daemons, of
``redis-server`` and of the load generator at the start and end of the
measured window; CPU per message counts the daemons and Redis. Redis is
a redis-server started for the benchmark (so that the Redis CPU counted is
its alone) unless ``REDIS_URL`` / ``--redis-url`` names one; each run uses
its own ``REDIS_PREFIX`` and deletes its keys afterwards.
Results: one JSON line per run in ``$RESULTS`` (default under /tmp), and a
table of medians on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ROUTE = ROOT / "tests" / "bench_cluster_route.js"
CLK_TCK = os.sysconf("SC_CLK_TCK")

#: The load generator's parameters per scenario (full, quick): those of the
#: harness's own side-by-side run, and a lighter relay for the latency that
#: a call relayed between instances adds when nothing queues.
SCENARIOS = {
    "relay_light": (
        "relay --calls 50 --rate 10 --duration 10 --warmup 2 --drain 3",
        "relay --calls 50 --rate 10 --duration 3 --warmup 1 --drain 2",
    ),
    "relay": (
        "relay --calls 200 --rate 10 --duration 10 --warmup 2 --drain 3",
        "relay --calls 50 --rate 10 --duration 3 --warmup 1 --drain 2",
    ),
    "relay_heavy": (
        "relay --calls 1000 --rate 15 --duration 8 --warmup 2 --drain 3",
        "relay --calls 300 --rate 15 --duration 3 --warmup 1 --drain 2",
    ),
    "saturate": (
        "saturate --calls 1000 --max-rate 45 --window 16 --duration 8 --warmup 2 --drain 3",
        "saturate --calls 300 --max-rate 45 --window 16 --duration 3 --warmup 1 --drain 2",
    ),
}
#: set-up: (instances, where the passenger connects)
SETUPS = {"one": (1, "same"), "same": (2, "same"), "cross": (2, "cross")}

#: The daemon's environment for a benchmark: limits that would throttle
#: load from one address lifted, nothing expiring during a run.
SERVER_ENV = {
    "RATE_LIMIT_PER_MIN": "100000000",
    "MAX_SESSIONS": "10000000",
    "SESSION_DURATION": "1h",
    "AUTH_TIMEOUT": "30s",
    "RECONNECT_GRACE": "0s",
    "HEARTBEAT_INTERVAL": "20s",
    "HEARTBEAT_TIMEOUT": "30s",
    "MAX_MESSAGE_BYTES": "4096",
    "LOG_LEVEL": "warn",
    "ENVIRONMENT": "development",
}


# -- CPU from /proc ------------------------------------------------------------------


def proc_cpu(pid: int) -> float:
    """utime + stime of a process (all its threads), seconds; 0 once gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def children(pid: int) -> list[int]:
    """The child processes of ``pid`` (those of each of its threads)."""
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(child) for child in (task / "children").read_text().split()]
        except OSError:
            pass
    return found


def machine_busy() -> float:
    """CPU seconds the whole machine spent busy (all but idle and iowait)."""
    values = [int(value) for value in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(values) - values[3] - values[4]) / CLK_TCK


def redis_pids() -> list[int]:
    found = subprocess.run(["pgrep", "-x", "redis-server"], capture_output=True, text=True).stdout
    return [int(pid) for pid in found.split()]


class Sample:
    """CPU counters at one moment: each daemon, Redis, the load generator
    (its process and its workers), the machine."""

    def __init__(self, daemons: list[int], redis: list[int], loadgen: list[int]) -> None:
        self.t = time.monotonic()
        self.daemons = [proc_cpu(pid) for pid in daemons]
        self.redis = sum(proc_cpu(pid) for pid in redis)
        self.loadgen = sum(proc_cpu(pid) for pid in loadgen)
        self.machine = machine_busy()


# -- daemons and Redis ----------------------------------------------------------------


class Instance:
    """One daemon process, started fresh with its own call-log file."""

    def __init__(self, name: str, port: int, workdir: Path, env: dict[str, str]) -> None:
        self.name = name
        self.port = port
        self.log = workdir / f"{name}.log"
        inherited = {key: value for key, value in os.environ.items() if not key.startswith("REDIS_")}
        full = {**inherited, **SERVER_ENV, **env, "SERVER_ADDR": f"127.0.0.1:{port}"}
        full["SQLITE_PATH"] = str(workdir / f"{name}.sqlite3")
        full["JOURNAL_PATH"] = str(workdir / f"{name}.journal")
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "intaleq_signal"],
                cwd=ROOT,
                env=full,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_ready(self, clustered: bool, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as answer:
                    health = json.loads(answer.read())
                if not clustered or health.get("redis") == "ok":
                    return
            except OSError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"instance {self.name} did not start; its log:\n{self.log.read_text()[-2000:]}")

    def stop(self) -> bool:
        """SIGTERM, then SIGKILL after 10 s; True when it had to be killed."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                return True
        return False


def port_free(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


class OwnRedis:
    """A redis-server of this run's own (no persistence), so that the
    Redis CPU measured is this benchmark's alone."""

    def __init__(self, port: int, workdir: Path) -> None:
        self.url = f"redis://127.0.0.1:{port}/0"
        self.log = workdir / "redis.log"
        if not port_free(port):
            raise RuntimeError(f"port {port} (for redis-server) is in use; set --base-port")
        command = ["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--dir", str(workdir)]
        command += ["--save", "", "--appendonly", "no", "--maxmemory-policy", "noeviction"]
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + 10
        while port_free(port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server did not start; its log:\n{self.log.read_text()[-2000:]}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


def delete_keys(redis_url: str, prefix: str) -> int:
    import redis  # the [redis] extra, installed by make with the test tools

    client = redis.Redis.from_url(redis_url)
    try:
        keys = list(client.scan_iter(match=prefix + "*", count=1000))
        if keys:
            client.delete(*keys)
        return len(keys)
    finally:
        client.close()


# -- one run --------------------------------------------------------------------------


def run_one(args: argparse.Namespace, scenario: str, setup: str, rep: int, run_no: int) -> dict:
    count, pairs = SETUPS[setup]
    loadgen_args = SCENARIOS[scenario][1 if args.quick else 0].split()
    warmup = float(loadgen_args[loadgen_args.index("--warmup") + 1])
    duration = float(loadgen_args[loadgen_args.index("--duration") + 1])
    ports = [args.base_port + 1 + i for i in range(count)]
    for port in ports:
        if not port_free(port):
            raise RuntimeError(f"port {port} is in use; set --base-port")
    prefix = f"intaleq-bench-{os.getpid()}-{run_no}:"
    workdir = Path(tempfile.mkdtemp(prefix="intaleq-bench-cluster-"))
    instances: list[Instance] = []
    result: dict = {"scenario": scenario, "setup": setup, "rep": rep}
    try:
        for i, port in enumerate(ports):
            env = {"API_KEY": args.api_key, "NODE_ID": f"bench-{'ab'[i]}"}
            if count > 1:
                env.update(REDIS_URL=args.redis_url, REDIS_PREFIX=prefix)
            instances.append(Instance("ab"[i], port, workdir, env))
        for instance in instances:
            instance.wait_ready(clustered=count > 1)
        env = {
            **os.environ,
            "NODE_PATH": str(args.deps / "node_modules"),
            "BENCH_CLUSTER_PORTS": ",".join(map(str, ports)),
            "BENCH_CLUSTER_PAIRS": pairs,
        }
        command = ["node", "-r", str(ROUTE), str(args.bench_dir / "loadgen.js"), *loadgen_args]
        command += ["--url", f"http://127.0.0.1:{ports[0]}", "--api-key", args.api_key]
        command += ["--workers", str(args.workers), "--label", f"{scenario}/{setup}"]
        output = workdir / "loadgen.json"
        with open(output, "wb") as sink:
            loadgen = subprocess.Popen(command, env=env, stdout=sink, stderr=subprocess.PIPE, text=True)
        lines: list[str] = []
        opened = threading.Event()

        def read_stderr() -> None:
            for line in loadgen.stderr:  # type: ignore[union-attr]
                lines.append(line)
                if " calls open in " in line:
                    opened.set()
            opened.set()  # the load generator ended

        reader = threading.Thread(target=read_stderr, daemon=True)
        reader.start()
        samples = []
        try:
            opened.wait(180)
            if loadgen.poll() is None:
                # the workers start sending now; the measured window follows the warm-up
                time.sleep(warmup)
                daemons = [instance.pid for instance in instances]
                redis = [args.own_redis.proc.pid] if args.own_redis else redis_pids()
                generator = [loadgen.pid, *children(loadgen.pid)]
                samples.append(Sample(daemons, redis, generator))
                time.sleep(duration)
                samples.append(Sample(daemons, redis, generator))
            loadgen.wait(300)
        finally:
            if loadgen.poll() is None:
                loadgen.kill()
                loadgen.wait()
        reader.join(5)
        if loadgen.returncode != 0 or len(samples) != 2:
            result["failed"] = f"loadgen exit {loadgen.returncode}: {''.join(lines)[-1500:]}"
            return result
        out = output.read_text()
        figures = json.loads(out)
        a, b = samples
        seconds = b.t - a.t
        delivered = figures["delivered_per_s"] * duration  # received within the window
        daemons_s = sum(b.daemons) - sum(a.daemons)
        redis_s = b.redis - a.redis
        loadgen_s = b.loadgen - a.loadgen
        machine_s = b.machine - a.machine
        result.update(
            instances=count,
            pairs=pairs,
            calls_open=figures.get("calls_open"),
            offered_per_s=figures["offered_per_s"],
            delivered_per_s=figures["delivered_per_s"],
            latency=figures["latency"],
            lost=figures["lost"],
            reordered=figures["reordered"],
            errors=figures["errors"],
            closes=figures["closes"],
            daemon_cpu_pct=[round((b.daemons[i] - a.daemons[i]) / seconds * 100, 1) for i in range(count)],
            redis_cpu_pct=round(redis_s / seconds * 100, 1),
            loadgen_cpu_pct=round(loadgen_s / seconds * 100, 1),
            machine_cpu_pct=round(machine_s / seconds * 100, 1),
            other_cpu_pct=round(max(0.0, machine_s - daemons_s - redis_s - loadgen_s) / seconds * 100, 1),
            cpu_us_per_msg=round((daemons_s + redis_s) / delivered * 1e6, 2) if delivered else None,
            daemon_cpu_us_per_msg=round(daemons_s / delivered * 1e6, 2) if delivered else None,
            redis_cpu_us_per_msg=round(redis_s / delivered * 1e6, 2) if delivered else None,
        )
        return result
    finally:
        killed = [instance.name for instance in instances if instance.stop()]
        if killed:
            result["killed_after_sigterm"] = killed
            print(f"bench_cluster: instance(s) {' '.join(killed)} did not stop within 10 s", file=sys.stderr)
        if count > 1:
            result["redis_keys_deleted"] = delete_keys(args.redis_url, prefix)
        shutil.rmtree(workdir, ignore_errors=True)


# -- the table ------------------------------------------------------------------------


def median(values: list[float]) -> float | None:
    values = [value for value in values if value is not None]
    return statistics.median(values) if values else None


def fmt(value: float | None, digits: int = 1) -> str:
    return "—" if value is None else f"{value:,.{digits}f}"


def ratio(value: float | None, base: float | None) -> str:
    return "" if value is None or not base else f" ({value / base:.2f}×)"


def table(results: list[dict]) -> str:
    rows = [
        "| scenario | set-up | delivered msg/s | CPU µs/msg, daemons + Redis | of which Redis"
        " | p50 ms | p99 ms | lost | CPU %: daemons / Redis / load gen. / other |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    ok = [result for result in results if "failed" not in result]
    for scenario in SCENARIOS:
        base: dict[str, float | None] = {}
        for setup in SETUPS:
            runs = [r for r in ok if (r["scenario"], r["setup"]) == (scenario, setup)]
            if not runs:
                continue

            def m(key: str, runs: list[dict] = runs) -> float | None:
                return median([r[key] for r in runs])

            delivered, per_msg = m("delivered_per_s"), m("cpu_us_per_msg")
            if setup == "one":
                base = {"delivered": delivered, "per_msg": per_msg}
            daemons = median([sum(r["daemon_cpu_pct"]) for r in runs])
            rows.append(
                f"| {scenario} | {setup} | {fmt(delivered, 0)}{ratio(delivered, base.get('delivered'))}"
                f" | {fmt(per_msg)}{ratio(per_msg, base.get('per_msg'))} | {fmt(m('redis_cpu_us_per_msg'))}"
                f" | {fmt(median([r['latency']['p50_ms'] for r in runs]), 2)}"
                f" | {fmt(median([r['latency']['p99_ms'] for r in runs]), 2)}"
                f" | {fmt(m('lost'), 0)} | {fmt(daemons, 0)} / {fmt(m('redis_cpu_pct'), 0)}"
                f" / {fmt(m('loadgen_cpu_pct'), 0)} / {fmt(m('other_cpu_pct'), 0)} |"
            )
    return "\n".join(rows)


# -- main -----------------------------------------------------------------------------


def npm_packages(bench_dir: Path, deps: Path) -> None:
    """The load generator's npm packages, installed once into ``deps`` (the
    harness's folder may be read-only)."""
    if (deps / "node_modules" / "ws").is_dir():
        return
    print(f"bench_cluster: installing the load generator's npm packages into {deps} ...", file=sys.stderr)
    deps.mkdir(parents=True, exist_ok=True)
    for name in ("package.json", "package-lock.json"):
        shutil.copy(bench_dir / name, deps / name)
    subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=deps, check=True, stdout=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=int(os.environ.get("REPEAT", "3")))
    parser.add_argument("--quick", action="store_true", default=os.environ.get("QUICK") == "1")
    parser.add_argument("--scenarios", default=os.environ.get("SCENARIOS", " ".join(SCENARIOS)))
    parser.add_argument("--setups", default=os.environ.get("SETUPS", " ".join(SETUPS)))
    parser.add_argument("--workers", type=int, default=2, help="load generator processes (default 2)")
    parser.add_argument("--base-port", type=int, default=int(os.environ.get("BASE_PORT", "20110")))
    parser.add_argument(
        "--redis-url",
        default=os.environ.get("REDIS_URL", ""),
        help="a Redis to use (each run under its own REDIS_PREFIX, its keys deleted afterwards); default:"
        " a redis-server started for this benchmark, else redis://127.0.0.1:6379/0",
    )
    args = parser.parse_args(argv)
    bench = os.environ.get("BENCH_DIR", "")
    if not bench or not (Path(bench) / "loadgen.js").is_file():
        print("bench_cluster: skipped: no benchmark harness at BENCH_DIR (see docs/performance.md)")
        return 0
    args.bench_dir = Path(bench).resolve()
    args.deps = Path(os.environ.get("BENCH_DEPS", f"{tempfile.gettempdir()}/intaleq-bench-deps"))
    args.api_key = "bench-" + secrets.token_hex(24)
    scenarios = args.scenarios.split()
    setups = args.setups.split()
    unknown = [name for name in scenarios if name not in SCENARIOS] + [s for s in setups if s not in SETUPS]
    if unknown:
        parser.error(f"unknown scenario or set-up: {' '.join(unknown)}")
    npm_packages(args.bench_dir, args.deps)
    workdir = Path(tempfile.mkdtemp(prefix="intaleq-bench-redis-"))
    args.own_redis = None
    if not args.redis_url and shutil.which("redis-server"):
        args.own_redis = OwnRedis(args.base_port + 9, workdir)
        args.redis_url = args.own_redis.url
    args.redis_url = args.redis_url or "redis://127.0.0.1:6379/0"
    try:
        return run_all(args, scenarios, setups)
    finally:
        if args.own_redis:
            args.own_redis.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def run_all(args: argparse.Namespace, scenarios: list[str], setups: list[str]) -> int:
    path = os.environ.get("RESULTS") or f"/tmp/intaleq-bench-cluster-{time.strftime('%Y%m%d-%H%M%S')}.jsonl"
    print(f"bench_cluster: results -> {path}; Redis: {args.redis_url}", file=sys.stderr)
    results = []
    run_no = 0
    with open(path, "w", encoding="utf-8") as sink:
        for rep in range(1, args.repeat + 1):
            for scenario in scenarios:
                for setup in setups:
                    run_no += 1
                    print(f"bench_cluster: [{rep}/{args.repeat}] {scenario} on {setup} ...", file=sys.stderr)
                    result = run_one(args, scenario, setup, rep, run_no)
                    if "failed" in result:
                        print(f"bench_cluster: failed: {result['failed']}", file=sys.stderr)
                    sink.write(json.dumps(result) + "\n")
                    sink.flush()
                    results.append(result)
    print(f"\nMedians of {args.repeat} round(s); ratios to one instance; CPU % of one core (2 cores: 200 %)")
    print()
    print(table(results))
    return 1 if any("failed" in result for result in results) else 0


if __name__ == "__main__":
    sys.exit(main())
