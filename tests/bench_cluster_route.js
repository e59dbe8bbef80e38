'use strict';
// Preloaded (`node -r`) into the benchmark harness's load generator by
// tests/bench_cluster.py; not a test. The load generator talks to one
// server: this spreads its calls over several instances without changing
// it. Run with `--workers K`, worker i makes its POST /sessions and opens
// its drivers' sockets on instance i mod N (so each instance runs the
// sessions of its workers); with BENCH_CLUSTER_PAIRS=cross the passengers'
// sockets go to the next instance, so every call is relayed between two
// instances through Redis.
//
//   BENCH_CLUSTER_PORTS=20111,20112  the instances' ports, in order
//   BENCH_CLUSTER_PAIRS=same|cross   where the passenger connects
//
// A call is set up by opening the driver's socket, then the passenger's, in
// the same tick; each routed socket checks, once the load generator has
// tied it to its participant, that it guessed the role right, and stops the
// run otherwise.

const ports = (process.env.BENCH_CLUSTER_PORTS || '').split(',').filter(Boolean).map(Number);
const cross = process.env.BENCH_CLUSTER_PAIRS === 'cross';
const argv = process.argv;
const at = argv.lastIndexOf('--worker-index');

if (process.env.LOADGEN_WORKER === '1' && ports.length > 0 && at !== -1) {
  const worker = Number(argv[at + 1]);
  const home = ports[worker % ports.length];
  const away = ports[(worker + 1) % ports.length];
  const url = argv.indexOf('--url');
  if (url === -1) throw new Error('bench_cluster_route: the load generator was started without --url');
  argv[url + 1] = `http://127.0.0.1:${home}`;

  if (cross && away !== home) {
    const WebSocket = require('ws');
    const roles = ['driver', 'passenger'];
    let opened = 0;
    class Routed extends WebSocket {
      constructor(address, ...rest) {
        const role = roles[opened++ % 2];
        super(role === 'passenger' ? address.replace(`:${home}/`, `:${away}/`) : address, ...rest);
        queueMicrotask(() => {
          if (!this._p || this._p.role !== role) {
            throw new Error(`bench_cluster_route: socket ${opened} taken for the ${role}, is the ${this._p && this._p.role}`);
          }
        });
      }
    }
    require.cache[require.resolve('ws')].exports = Routed;
  }
}
