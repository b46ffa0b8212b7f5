"""Train and eval req/s: the embedded store vs the shared Redis store with 1 and 3 replicas.

    .venv/bin/python bench/replicas.py [--seconds 5] [--clients 1,4]

Every configuration runs in the same invocation (ratios only mean something within one
run): a fresh server (embedded store, durability=always) or fresh replicas sharing one
fresh redis-server (appendonly, appendfsync always: as durable as the embedded default).
Clients are processes; with several replicas each client balances its calls over all of
them (gRPC round_robin). Workloads: W1 shapes, BatchNorm1d(16) -- train (2, 16), eval
(1, 16) -- small tensors, so the store's cost per request is as visible as it gets.

On a 2-core machine replicas compete for the same cores as the clients and Redis: the
3-replica figures say more about overhead than about scaling.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import pathlib
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "tests"))
from redisproc import RedisProcess  # noqa: E402
from serverproc import ServerProcess  # noqa: E402

SHAPES = {"train": (2, 16), "eval": (1, 16)}


def _client(target: str, mode: str, seed: int, t0: float, t_end: float, out: "mp.Queue[tuple[int, list[float]]]") -> None:
    from normserve.client import Client

    options = [("grpc.lb_policy_name", "round_robin")] if "," in target else []
    x = np.random.default_rng(seed).standard_normal(SHAPES[mode]).astype(np.float32)
    latencies = []
    with Client(target, timeout=30, options=options) as c:
        for _ in range(20):
            c.normalize("bn", x, mode)  # warm-up: connections, caches
        while time.monotonic() < t0:
            time.sleep(0.001)
        while (start := time.monotonic()) < t_end:
            c.normalize("bn", x, mode)
            latencies.append(time.monotonic() - start)
    out.put((len(latencies), latencies))


def measure(targets: list[str], mode: str, clients: int, seconds: float) -> tuple[float, float]:
    """(req/s, p50 ms) of `clients` processes for `seconds`."""
    target = targets[0] if len(targets) == 1 else "ipv4:" + ",".join(targets)
    ctx = mp.get_context("spawn")
    out: "mp.Queue[tuple[int, list[float]]]" = ctx.Queue()
    t0 = time.monotonic() + 8.0  # spawned clients import the SDK and warm up first
    procs = [ctx.Process(target=_client, args=(target, mode, i, t0, t0 + seconds, out)) for i in range(clients)]
    for p in procs:
        p.start()
    results = [out.get(timeout=seconds + 120) for _ in procs]
    for p in procs:
        p.join(30)
    latencies = [v for _, ls in results for v in ls]
    return sum(n for n, _ in results) / seconds, statistics.median(latencies) * 1e3


def run_config(name: str, servers: list[ServerProcess], modes: list[str], clients: list[int], seconds: float, rows: dict) -> None:
    from normserve.client import Client

    try:
        for s in servers:
            s.start()
        with Client(servers[0].target) as setup:
            setup.create_layer("bn", "BatchNorm1d", num_features=16)
        targets = [s.target for s in servers]
        for mode in modes:
            for n in clients:
                rows[(name, mode, n)] = measure(targets, mode, n, seconds)
                rps, p50 = rows[(name, mode, n)]
                print(f"  {name:<18} {mode:<5} {n:>2} clients: {rps:8.0f} req/s  p50 {p50:6.3f} ms", flush=True)
    finally:
        for s in servers:
            s.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--clients", default="1,4")
    parser.add_argument("--modes", default="train,eval")
    args = parser.parse_args()
    clients = [int(c) for c in args.clients.split(",")]
    modes = args.modes.split(",")
    quiet = ("--metrics-port", "-1")
    rows: dict[tuple[str, str, int], tuple[float, float]] = {}
    run_config("embedded", [ServerProcess(*quiet, "--durability", "always")], modes, clients, args.seconds, rows)
    for replicas in (1, 3):
        redis = RedisProcess()
        redis.persist = True
        redis.start()
        try:
            store = ("--store", redis.url)
            servers = [ServerProcess(*quiet, *store) for _ in range(replicas)]
            run_config(f"redis x{replicas}", servers, modes, clients, args.seconds, rows)
        finally:
            redis.cleanup()

    print("\n| config | mode | clients | req/s | p50 ms | ratio to embedded | overhead per request |")
    print("|---|---|---|---|---|---|---|")
    for (name, mode, n), (rps, p50) in rows.items():
        base_rps, base_p50 = rows[("embedded", mode, n)]
        extra = f"{(p50 - base_p50) * 1e3:+.0f} µs (p50)" if name != "embedded" else ""
        print(f"| {name} | {mode} | {n} | {rps:.0f} | {p50:.3f} | {rps / base_rps:.2f} | {extra} |")


if __name__ == "__main__":
    main()
