"""Train-request throughput with --durability always vs none (1 and 8 clients).

    .venv/bin/python bench/durability.py [--seconds 5] [--clients 1,8]

Each configuration runs against its own fresh server process (state in a temporary
directory) with W1-train batches, (2, 16) into BatchNorm1d(16): small tensors, so the
cost of durability is as visible as it gets. Reports req/s per cell and the ratio
always/none measured in the same run.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import threading
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "tests"))
from serverproc import ServerProcess  # noqa: E402

from normserve.client import Client  # noqa: E402


def run(durability: str, clients: int, seconds: float) -> float:
    with ServerProcess("--durability", durability, "--metrics-port", "-1") as server:
        with Client(server.target) as setup:
            setup.create_layer("bn", "BatchNorm1d", num_features=16, momentum=None)
        counts = [0] * clients
        start = threading.Barrier(clients + 1)
        stop = threading.Event()

        def worker(i: int) -> None:
            x = np.random.default_rng(i).standard_normal((2, 16)).astype(np.float32)
            with Client(server.target, timeout=30) as c:
                c.normalize("bn", x, mode="train")  # warm-up
                start.wait()
                while not stop.is_set():
                    c.normalize("bn", x, mode="train")
                    counts[i] += 1

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
        for t in threads:
            t.start()
        start.wait()
        t0 = time.perf_counter()
        time.sleep(seconds)
        stop.set()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - t0
        return sum(counts) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--clients", default="1,8")
    args = parser.parse_args()
    print(f"{'clients':>7} {'none req/s':>11} {'always req/s':>13} {'always/none':>12}")
    for clients in (int(c) for c in args.clients.split(",")):
        none = run("none", clients, args.seconds)
        always = run("always", clients, args.seconds)
        print(f"{clients:>7} {none:>11.0f} {always:>13.0f} {always / none:>12.2f}")


if __name__ == "__main__":
    main()
