"""normserve throughput/latency benchmark against in-process torch and a lean gRPC baseline.

    .venv/bin/python bench/run.py [--quick] [--only W1,W2] [--clients 1,4] [--seconds S]
                                  [--modes eval,train] [--paths a,b,c,d,f] [--threads | --processes]
                                  [--durability none|interval|always] [--stream-depth 8]
                                  [--repeat N] [--server-args "--max-workers 16"]
                                  [--rss [--rss-requests N] | --rss-only] [--json out.json]

Workloads (float32; every layer is created fresh for each cell, with a random but fixed
state: running mean/var, weight, bias):

    W1  (1, 16) into BatchNorm1d(16)          train uses (2, 16): one value per channel
                                              is invalid for BatchNorm in train mode
    W2  (1, 3, 224, 224) into BatchNorm2d(3)
    W3  (32, 3, 224, 224) into BatchNorm2d(3) (~19 MB per request)
    W4  (8, 64, 56, 56) into BatchNorm2d(64)

each in eval and train mode, at 1 and 4 concurrent clients (1 and 16 for W1; --clients
sets the same levels for every workload), through these paths:

    a  inproc       torch in the client itself, same tensors, module call, no transport
                    (each client has its own module: train state is not shared)
    b  lean         THE BASELINE: bench/lean.py, a minimal grpcio server (own process,
                    ThreadPoolExecutor(32), 64 MiB messages, torch.set_num_threads(1)) and
                    client; no validation, metrics or state store
    c  unary        normserve via the SDK, Client.normalize, server with --batching off
    f  c+batch      the same against a second normserve server with --batching on
                    (dynamic batching of concurrent eval requests); a last table sets
                    f's req/s, p50 and p99 beside c's, with the req/s ratio on / off
    d  stream       normserve via the SDK, Client.normalize_stream: one stream per client
                    for the whole cell, at most --stream-depth (8) messages in flight
    e  lean_stream  (not in the default set) the lean server's NormalizeStream
    g  shm          normserve via the SDK over same-host shared memory,
                    Client(shared_memory=True).normalize: the tensors go through a
                    POSIX shared-memory segment the server maps, not through gRPC
    h  lean_aio     (not in the default set) the lean baseline's servicer in a grpc.aio
                    server (one event loop) instead of a threaded one: the measurement
                    behind normserve's threaded server (see README, Benchmarks)

(normserve's default --max-streams is 16, so path d with more than 16 clients fails loudly
with RESOURCE_EXHAUSTED.)

The normserve server is one `normserve serve` process (tests/serverproc.py) with
`--durability none --metrics-port -1` (see --durability), started once; the lean server
is started once too. Cells run one after another: per cell each client warms up (a few
requests, or for streams a few messages on the stream that is then timed), its first
response is checked, then all clients start together and run for --seconds.

Per cell: req/s (sum over clients of each client's requests / its time), MB/s (request +
response tensor bytes), latency p50/p99 of unary calls (measured around each call) and the
ratio of req/s to the lean baseline (b) in the same run. Streams get no per-message
latency (a message's send and its answer are on different threads and pipelined); their
latency column is the throughput-derived mean, time per message per stream, marked "~".

Correctness (every cell, every path, fails loudly with exit status 1): each client's first
response must equal in-process torch exactly, eval: `module.eval()(x)` with the same state;
train: a fresh copy of the layer (same weight/bias), `module.train()(x)`. After a train
cell on normserve, the layer's num_batches_tracked and version must equal the number of
train requests it answered (no lost or doubled updates).

Clients: processes by default (--threads for threads). Tried both on this 2-core machine
(W1/W2 eval, 4 and 16 clients, paths b/c/d, 3 alternating repetitions each, other jobs
loading the machine): with threads all clients share one GIL and (gRPC's per-process
subchannel pool) one connection, the client side and the server swap the bottleneck from
run to run, and lean's own req/s swung 1.3k-4.0k (W1, 16 clients); ratios to lean spread
by 0.12-1.73 between repetitions. With processes (spawn; a persistent pool; clients import
no torch except for the in-process path) lean's req/s stayed within 1.6k-1.7k and ratios
spread by 0.12-0.23 (one cell 0.59). Processes are the fairer measurement, so they are
the default (with 1 client the two differ little).

Also printed per cell and summed up in a second table: the server's CPU time per request
(all threads, /proc/PID/stat, over the timed phase) and the clients' — less sensitive to
CPU taken by other processes than req/s (10 ms tick resolution: coarse in --quick).

--quick: a CI smoke run: every workload, mode and path at 1 client, 0.3 s per cell, 2
warm-up requests (1 for W3); checks only that everything runs and is correct.
--rss: sample the normserve server's VmRSS after warm-up and after --rss-requests (20,000)
W2 requests (alternating eval and train, 2 client threads, a fresh server) and print the
ratio (target: within +-10%; outside it the run fails). --rss-only runs just that.

Machines are noisy: absolute numbers drift; the ratios to (b) measured in the same run are
the figures that count. On a shared 2-core machine lean's own req/s for one cell swung by
1.6x between runs minutes apart: --repeat N runs each workload/mode/clients group N times
(baseline first each time) and the tables show medians, each ratio taken within its own
repetition. --server-args passes more options to the normserve servers (to try settings).
Exit status: 0 when every cell ran and was correct.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import math
import multiprocessing as mp
import os
import pathlib
import platform
import re
import shlex
import signal
import statistics
import sys
import threading
import time
from typing import Any, Optional, Sequence

import numpy as np

BENCH = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent / "tests"))

import _workers  # noqa: E402  (light: no torch)

# -- configuration -------------------------------------------------------------------------
WORKLOADS: dict[str, dict[str, Any]] = {
    "W1": {"kind": "BatchNorm1d", "num_features": 16, "eval": (1, 16), "train": (2, 16), "clients": (1, 16)},
    "W2": {"kind": "BatchNorm2d", "num_features": 3, "eval": (1, 3, 224, 224), "train": (1, 3, 224, 224), "clients": (1, 4)},
    "W3": {"kind": "BatchNorm2d", "num_features": 3, "eval": (32, 3, 224, 224), "train": (32, 3, 224, 224), "clients": (1, 4)},
    "W4": {"kind": "BatchNorm2d", "num_features": 64, "eval": (8, 64, 56, 56), "train": (8, 64, 56, 56), "clients": (1, 4)},
}
MODES = ("eval", "train")
PATHS = {
    "a": "inproc", "b": "lean", "c": "unary", "d": "stream", "e": "lean_stream", "f": "unary_batch", "g": "shm",
    "h": "lean_aio",
}
LABELS = {
    "inproc": "a inproc",
    "lean": "b lean",
    "unary": "c unary",
    "stream": "d stream",
    "lean_stream": "e lean-strm",
    "unary_batch": "f c+batch",
    "shm": "g shm",
    "lean_aio": "h lean-aio",
}
NORMSERVE_PATHS = ("unary", "stream", "unary_batch", "shm")
BASELINE = "lean"
_KEY = {v: k for k, v in PATHS.items()}
CELL_TIMEOUT_PAD_S = 120.0  # beyond --seconds, per cell phase


class BenchFailure(Exception):
    """A cell failed or answered wrongly."""


def _log(msg: str) -> None:
    print(msg, flush=True)


# -- clients: threads or processes ---------------------------------------------------------
class Workers:
    """A persistent pool of client workers, one Connection each."""

    def __init__(self, processes: bool):
        self.processes = processes
        self.conns: list[Any] = []
        self._handles: list[Any] = []
        self._ctx = mp.get_context("spawn")

    def ensure(self, n: int) -> None:
        while len(self.conns) < n:
            parent_end, child_end = mp.Pipe()
            if self.processes:
                p = self._ctx.Process(
                    target=_workers.process_main, args=(child_end, os.getpid()), daemon=True, name=f"bench-client-{len(self.conns)}"
                )
                p.start()
                child_end.close()
                self._handles.append(p)
            else:
                t = threading.Thread(target=_workers.serve, args=(child_end,), daemon=True, name=f"bench-client-{len(self.conns)}")
                t.start()
                self._handles.append(t)
            self.conns.append(parent_end)

    def pids(self, n: int) -> Optional[list[int]]:
        """PIDs of the first n client processes; None when clients are threads."""
        return [p.pid for p in self._handles[:n]] if self.processes else None

    def recv(self, i: int, timeout: float) -> tuple:
        conn = self.conns[i]
        deadline = time.monotonic() + timeout
        while not conn.poll(0.5):
            if self.processes and not self._handles[i].is_alive():
                raise BenchFailure(f"client process {i} died (exit code {self._handles[i].exitcode})")
            if time.monotonic() > deadline:
                raise BenchFailure(f"client {i} did not answer within {timeout:.0f} s")
        msg = conn.recv()
        if msg[0] == "error":
            raise BenchFailure(f"client {i} failed:\n{msg[1]}")
        return msg

    def close(self) -> None:
        for conn in self.conns:
            try:
                conn.send(("exit",))
            except (OSError, EOFError, ValueError):
                pass
        deadline = time.monotonic() + 3.0  # one deadline for all: a worker mid-cell won't read "exit"
        for h in self._handles:
            h.join(max(0.0, deadline - time.monotonic()))
        if self.processes:
            alive = [p for p in self._handles if p.is_alive()]  # only processes this pool started
            for p in alive:
                p.terminate()
            for p in alive:
                p.join(3.0)
                if p.is_alive():
                    p.kill()
                    p.join(3.0)
        for conn in self.conns:
            conn.close()
        self.conns.clear()
        self._handles.clear()


# -- reference modules and checks ----------------------------------------------------------
def reference_state(wl: str) -> dict[str, np.ndarray]:
    """A fixed, non-trivial state for workload `wl` (so eval checks mean something)."""
    spec = WORKLOADS[wl]
    c = spec["num_features"]
    rng = np.random.default_rng(1000 + int(wl[1:]))
    return {
        "weight": (1.0 + 0.2 * rng.standard_normal(c)).astype(np.float32),
        "bias": (0.3 * rng.standard_normal(c)).astype(np.float32),
        "running_mean": (0.5 * rng.standard_normal(c)).astype(np.float32),
        "running_var": rng.uniform(0.5, 2.0, c).astype(np.float32),
        "num_batches_tracked": np.array(0, dtype=np.int64),
    }


def reference_module(wl: str) -> Any:
    import torch

    spec = WORKLOADS[wl]
    module = getattr(torch.nn, spec["kind"])(spec["num_features"])
    module.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in reference_state(wl).items()})
    return module.eval()


def expected_output(wl: str, mode: str, x: np.ndarray, device: str = "cpu") -> np.ndarray:
    """eval: the layer's module with the same state; train: a fresh copy in train mode.

    Computed on the server's device: GPU kernels round differently from CPU ones."""
    import torch

    module = copy.deepcopy(reference_module(wl)).to(device)
    module.train(mode == "train")
    with torch.no_grad():
        return module(torch.from_numpy(x).to(device)).cpu().numpy()


def check_output(what: str, got: Any, want: np.ndarray) -> None:
    got = np.asarray(got)
    if got.shape != want.shape or got.dtype != want.dtype:
        raise BenchFailure(f"WRONG RESULT {what}: got {got.dtype}{got.shape}, want {want.dtype}{want.shape}")
    if not np.array_equal(got, want):
        diff = float(np.max(np.abs(got.astype(np.float64) - want.astype(np.float64))))
        raise BenchFailure(f"WRONG RESULT {what}: max |got - want| = {diff:g} (exact match required)")


def seed_for(wl: str, mode: str, i: int) -> int:
    return 10_000 * int(wl[1:]) + 1_000 * MODES.index(mode) + i


# -- servers -------------------------------------------------------------------------------
def start_normserve(durability: str, *extra: str) -> Any:
    """`normserve serve` on 127.0.0.1:0 via tests/serverproc.py; fails loudly if it exits.
    In its own session, like the lean server: where the kernel schedules by autogroup
    (sessions), a server inside the benchmark's session would share one CPU slice with
    all the client processes while the lean server had a slice of its own."""
    from serverproc import ServerProcess

    server = ServerProcess("--durability", durability, "--metrics-port", "-1", *extra, new_session=True)
    server.start()
    if not server.target or server.proc is None or server.proc.poll() is not None:
        code = server.stop()
        raise BenchFailure(f"normserve server did not start (exit status {code}):\n{server.log()}")
    return server


class Servers:
    def __init__(self, durability: str, server_args: Sequence[str] = ()):
        self.durability = durability
        self.server_args = tuple(server_args)  # more `normserve serve` options (--server-args)
        self.normserve: Any = None  # --batching off
        self.normserve_batch: Any = None  # --batching on
        self.lean: Any = None
        self.lean_aio: Any = None

    def start(
        self, need_normserve: bool, need_lean: bool, need_normserve_batch: bool = False, need_lean_aio: bool = False
    ) -> None:
        from lean import LeanProcess

        if need_normserve:
            self.normserve = start_normserve(self.durability, *self.server_args, "--batching", "off")
        if need_normserve_batch:
            self.normserve_batch = start_normserve(self.durability, *self.server_args, "--batching", "on")
        if need_lean:
            self.lean = LeanProcess().start()
        if need_lean_aio:
            self.lean_aio = LeanProcess(aio=True).start()

    def pid_for(self, path: str) -> Optional[int]:
        if path == "unary_batch":
            return self.normserve_batch.proc.pid
        if path in NORMSERVE_PATHS:
            return self.normserve.proc.pid
        if path in ("lean", "lean_stream"):
            return self.lean.pid
        if path == "lean_aio":
            return self.lean_aio.pid
        return None

    def stop(self) -> None:
        for server in (self.lean, self.lean_aio, self.normserve, self.normserve_batch):
            if server is not None:
                try:
                    server.stop()
                except Exception as e:  # noqa: BLE001 - keep stopping the others
                    _log(f"warning: stopping a server failed: {e}")
        self.lean = self.lean_aio = self.normserve = self.normserve_batch = None


# -- one cell ------------------------------------------------------------------------------
_names = itertools.count()


def run_cell(
    workers: Workers, servers: Servers, wl: str, mode: str, clients: int, path: str, args: argparse.Namespace
) -> dict[str, Any]:
    spec = WORKLOADS[wl]
    shape = spec[mode]
    layer = f"bench-{wl}-{mode}-c{clients}-{path}-{next(_names)}"
    state = reference_state(wl)
    warmup = args.warmup if wl != "W3" else args.warmup_w3
    target = ""
    ns_client = lean_client = None
    if path in NORMSERVE_PATHS:
        from normserve.client import Client

        target = (servers.normserve_batch if path == "unary_batch" else servers.normserve).target
        ns_client = Client(target, timeout=60)
        ns_client.create_layer(layer, reference_module(wl))
    elif path in ("lean", "lean_stream", "lean_aio"):
        from lean import LeanClient

        target = (servers.lean_aio if path == "lean_aio" else servers.lean).target
        lean_client = LeanClient(target)
        lean_client.create_layer(layer, spec["kind"], spec["num_features"], state)
    workers.ensure(clients)
    try:
        for i in range(clients):
            workers.conns[i].send(
                (
                    "cell",
                    {
                        "path": path,
                        "target": target,
                        "layer": layer,
                        "mode": mode,
                        "shape": shape,
                        "seed": seed_for(wl, mode, i),
                        "warmup": warmup,
                        "stream_depth": args.stream_depth,
                        "device": args.device,
                        "kind": spec["kind"],
                        "num_features": spec["num_features"],
                        "state": state,
                    },
                )
            )
        firsts = [workers.recv(i, CELL_TIMEOUT_PAD_S + 60)[1] for i in range(clients)]
        try:
            for i, first in enumerate(firsts):
                x = _workers.make_input(shape, seed_for(wl, mode, i))
                want = expected_output(wl, mode, x, "cpu" if path.startswith("lean") else args.device)
                check_output(f"{wl} {mode} c={clients} {path} client {i} (first response)", first, want)
        except BaseException:
            for i in range(clients):
                workers.conns[i].send(("abort",))
            raise
        del firsts
        server_pid = servers.pid_for(path)
        client_pids = workers.pids(clients)
        t0 = time.monotonic() + 0.05 + 0.01 * clients
        t_end = t0 + args.seconds
        for i in range(clients):
            workers.conns[i].send(("go", t0, t_end))
        _workers._sleep_until(t0)
        cpu_before = (cpu_seconds(server_pid), cpu_seconds_clients(client_pids))
        results = [workers.recv(i, args.seconds + CELL_TIMEOUT_PAD_S)[1] for i in range(clients)]
        cpu_after = (cpu_seconds(server_pid), cpu_seconds_clients(client_pids))
        wall = time.monotonic() - t0
        total = sum(r["total"] for r in results)
        if mode == "train" and ns_client is not None:
            info = ns_client.get_layer(layer)
            if info.state.num_batches_tracked != total or info.state.version != total:
                raise BenchFailure(
                    f"WRONG STATE {wl} train c={clients} {path}: {total} train requests answered but the layer has "
                    f"num_batches_tracked={info.state.num_batches_tracked} version={info.state.version}"
                )
    finally:
        for c in (ns_client, lean_client):
            if c is None:
                continue
            try:
                c.delete_layer(layer)  # keeps the servers' memory flat across cells
            except Exception as e:  # noqa: BLE001 - never mask the cell's own error
                _log(f"warning: deleting layer {layer} failed: {type(e).__name__}: {str(e).splitlines()[0]}")
            finally:
                c.close()
    cell = summarize(wl, mode, clients, path, shape, results)
    n = cell["requests"]
    server_cpu = None if server_pid is None else cpu_after[0] - cpu_before[0]
    client_cpu = cpu_after[1] - cpu_before[1]
    cell.update(
        wall_s=wall,
        server_cpu_s=server_cpu,
        server_cores=None if server_cpu is None else server_cpu / wall,
        server_cpu_ms_per_req=None if server_cpu is None or not n else server_cpu / n * 1e3,
        client_cpu_s=client_cpu,
        client_cores=client_cpu / wall,
        client_cpu_ms_per_req=client_cpu / n * 1e3 if n else None,
    )
    return cell


_CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: Optional[int]) -> float:
    """User + system CPU time of process `pid` (all its threads), from /proc/PID/stat."""
    if pid is None:
        return 0.0
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK  # utime, stime (fields 14, 15)


def cpu_seconds_clients(pids: Optional[list[int]]) -> float:
    """CPU of the client processes, or of this process when clients are threads."""
    if pids is None:
        t = os.times()
        return t.user + t.system
    return sum(cpu_seconds(pid) for pid in pids)


def summarize(wl: str, mode: str, clients: int, path: str, shape: tuple, results: list[dict]) -> dict[str, Any]:
    rates = []
    per_msg = []
    for r in results:
        elapsed = r["t_last"] - r["t0"]
        rates.append(r["n"] / elapsed if r["n"] and elapsed > 0 else 0.0)
        if r["n"]:
            per_msg.append(elapsed / r["n"])
    req_s = float(sum(rates))
    nbytes = 2 * math.prod(shape) * 4  # request + response, float32
    cell: dict[str, Any] = {
        "workload": wl,
        "mode": mode,
        "shape": list(shape),
        "clients": clients,
        "path": path,
        "requests": int(sum(r["n"] for r in results)),
        "req_s": req_s,
        "mb_s": req_s * nbytes / 1e6,
        "bytes_per_request": nbytes,
        "per_client_req_s": rates,
    }
    lats = [r["lat"] for r in results if r["lat"] is not None and len(r["lat"])]
    if lats:
        lat = np.concatenate(lats)
        cell.update(
            latency="measured",
            p50_ms=float(np.percentile(lat, 50) * 1e3),
            p99_ms=float(np.percentile(lat, 99) * 1e3),
            mean_ms=float(lat.mean() * 1e3),
        )
    else:
        cell.update(
            latency="throughput-derived" if per_msg else "none",
            p50_ms=None,
            p99_ms=None,
            mean_ms=float(np.mean(per_msg) * 1e3) if per_msg else None,
        )
    return cell


def cell_line(cell: dict[str, Any]) -> str:
    head = f"{cell['workload']} {cell['mode']:<5} c={cell['clients']:<2} {LABELS[cell['path']]:<12}"
    body = f"{cell['req_s']:>10.1f} req/s {cell['mb_s']:>9.1f} MB/s"
    if cell["latency"] == "measured":
        lat = f"p50 {cell['p50_ms']:>8.3f} ms  p99 {cell['p99_ms']:>8.3f} ms"
    elif cell["mean_ms"] is not None:
        lat = f"mean~{cell['mean_ms']:>8.3f} ms (throughput-derived)"
    else:
        lat = "no timed requests"
    ratio = cell.get("ratio_to_lean")
    rtxt = f"  x{ratio:.2f} of lean" if ratio is not None else ""
    cpu = ""
    if cell.get("server_cpu_ms_per_req") is not None:
        cpu = f"  server {cell['server_cpu_ms_per_req']:.3f} cpu-ms/req ({cell['server_cores']:.2f} cores)"
    if cell.get("client_cpu_ms_per_req") is not None:
        cpu += f"  clients {cell['client_cpu_ms_per_req']:.3f} cpu-ms/req"
    return f"{head} {body}  {lat}{rtxt}{cpu}"


# -- the final table -----------------------------------------------------------------------
def medians(cells: list[dict]) -> list[dict]:
    """One cell per (workload, mode, clients, path): the median of each number over the
    repetitions (--repeat). Ratios are medians of the per-repetition ratios, each taken
    against the baseline measured just before it, so slow drifts of the machine cancel."""
    groups: dict[tuple, list[dict]] = {}
    for c in cells:
        groups.setdefault((c["workload"], c["mode"], c["clients"], c["path"]), []).append(c)
    out = []
    for group in groups.values():
        cell = dict(group[0])
        for key, value in group[0].items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key not in ("clients", "repetition"):
                values = [c[key] for c in group if isinstance(c.get(key), (int, float))]
                cell[key] = statistics.median(values) if values else value
        out.append(cell)
    return out


def table(
    cells: list[dict], workloads: list[str], modes: list[str], levels: dict[str, list[int]], paths: list[str]
) -> str:
    n_levels = max(len(v) for v in levels.values())
    by_key = {(c["workload"], c["mode"], c["clients"], c["path"]): c for c in cells}
    col_w = 15
    headers = []
    for k in range(n_levels):
        values = sorted({levels[wl][k] for wl in workloads if k < len(levels[wl])})
        label = "c=" + "/".join(map(str, values))
        for p in paths:
            headers.append(f"{label} {_KEY[p]}")
    lines = [
        "req/s per cell, (ratio to b lean at the same workload, mode and clients)",
        f"{'workload mode':<14}|" + "|".join(f"{h:^{col_w}}" for h in headers),
    ]
    lines.append("-" * len(lines[-1]))
    for wl in workloads:
        for mode in modes:
            row = []
            for k in range(n_levels):
                for p in paths:
                    c = by_key.get((wl, mode, levels[wl][k], p)) if k < len(levels[wl]) else None
                    if c is None:
                        row.append(f"{'-':^{col_w}}")
                        continue
                    ratio = c.get("ratio_to_lean")
                    rtxt = f"({_fmt_ratio(ratio)})" if ratio is not None else ""
                    row.append(f"{_fmt_rate(c['req_s']):>7} {rtxt:<7}")
            lines.append(f"{wl + ' ' + mode:<14}|" + "|".join(f"{r:^{col_w}}" for r in row))
    legend = {
        "inproc": "a = in-process torch (no transport)",
        "lean": "b = lean gRPC baseline",
        "unary": "c = normserve SDK unary (batching off)",
        "unary_batch": "f = c with batching on",
        "stream": "d = normserve SDK stream",
        "lean_stream": "e = lean stream",
        "shm": "g = normserve SDK over shared memory",
        "lean_aio": "h = lean baseline on grpc.aio",
    }
    note = ""
    if any("/" in h for h in headers):
        note = "; c=A/B: the level differs by workload (e.g. c=4/16: 16 for W1, 4 for the others)"
    lines.append("paths: " + "; ".join(legend[p] for p in paths) + f". c=N: N concurrent clients{note}")
    return "\n".join(lines)


def cpu_table(
    cells: list[dict], workloads: list[str], modes: list[str], levels: dict[str, list[int]], paths: list[str]
) -> str:
    """Server CPU per request (ms; all server threads, from /proc), normserve paths as a
    ratio to lean's. Less sensitive to CPU stolen by other processes than req/s."""
    server_paths = [p for p in paths if p != "inproc"]
    n_levels = max(len(v) for v in levels.values())
    by_key = {(c["workload"], c["mode"], c["clients"], c["path"]): c for c in cells}
    col_w = 15
    headers = []
    for k in range(n_levels):
        values = sorted({levels[wl][k] for wl in workloads if k < len(levels[wl])})
        for p in server_paths:
            headers.append(f"c={'/'.join(map(str, values))} {_KEY[p]}")
    lines = [
        "server CPU ms per request (all server threads), (ratio to b lean's)",
        f"{'workload mode':<14}|" + "|".join(f"{h:^{col_w}}" for h in headers),
    ]
    lines.append("-" * len(lines[-1]))
    for wl in workloads:
        for mode in modes:
            row = []
            for k in range(n_levels):
                lean = by_key.get((wl, mode, levels[wl][k], BASELINE)) if k < len(levels[wl]) else None
                for p in server_paths:
                    c = by_key.get((wl, mode, levels[wl][k], p)) if k < len(levels[wl]) else None
                    if c is None or c.get("server_cpu_ms_per_req") is None:
                        row.append(f"{'-':^{col_w}}")
                        continue
                    base = lean.get("server_cpu_ms_per_req") if lean else None
                    rtxt = f"({_fmt_ratio(c['server_cpu_ms_per_req'] / base)})" if base else ""
                    row.append(f"{_fmt_ms(c['server_cpu_ms_per_req']):>7} {rtxt:<7}")
            lines.append(f"{wl + ' ' + mode:<14}|" + "|".join(f"{r:^{col_w}}" for r in row))
    return "\n".join(lines)


def batching_table(cells: list[dict]) -> str:
    """Path f (batching on) against path c (batching off), cell by cell: both ran back to
    back in the same run, so their ratio is the figure that counts."""
    by_key = {(c["workload"], c["mode"], c["clients"], c["path"]): c for c in cells}
    lines = [
        "dynamic batching: f (on) vs c (off), unary",
        f"{'workload mode':<14}|{'clients':^9}|{'c req/s':>10} |{'f req/s':>10} |{'on/off':>8} |"
        f"{'c p50 ms':>10} |{'f p50 ms':>10} |{'c p99 ms':>10} |{'f p99 ms':>10}",
    ]
    lines.append("-" * len(lines[-1]))
    for (wl, mode, clients, path), on in by_key.items():
        off = by_key.get((wl, mode, clients, "unary"))
        if path != "unary_batch" or off is None:
            continue
        ratio = on["req_s"] / off["req_s"] if off["req_s"] else float("nan")
        lines.append(
            f"{wl + ' ' + mode:<14}|{clients:^9}|{_fmt_rate(off['req_s']):>10} |{_fmt_rate(on['req_s']):>10} |"
            f"{ratio:>8.2f} |{_fmt_ms(off['p50_ms'] or 0):>10} |{_fmt_ms(on['p50_ms'] or 0):>10} |"
            f"{_fmt_ms(off['p99_ms'] or 0):>10} |{_fmt_ms(on['p99_ms'] or 0):>10}"
        )
    return "\n".join(lines)


def git_state() -> dict[str, Any]:
    """The commit measured and whether the tree had uncommitted changes outside bench/."""
    import subprocess

    def git(*a: str) -> str:
        try:
            return subprocess.run(
                ["git", *a], cwd=BENCH.parent, capture_output=True, text=True, timeout=10
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    dirty = [l for l in git("status", "--porcelain").splitlines() if l[3:] and not l[3:].startswith("bench/")]
    return {"commit": git("rev-parse", "--short", "HEAD"), "dirty_files": len(dirty)}


def _fmt_ratio(v: float) -> str:
    return f"{v:.2f}" if v < 10 else f"{v:.1f}" if v < 100 else f"{v:.0f}"


def _fmt_ms(v: float) -> str:
    return f"{v:.0f}" if v >= 100 else f"{v:.1f}" if v >= 10 else f"{v:.3f}"


def _fmt_rate(v: float) -> str:
    if v >= 10_000:
        return f"{v / 1000:.1f}k"
    if v >= 100:
        return f"{v:.0f}"
    return f"{v:.1f}"


# -- RSS -----------------------------------------------------------------------------------
def vm_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise BenchFailure(f"no VmRSS for pid {pid}")


def measure_rss(durability: str, requests: int, threads: int = 2) -> dict[str, Any]:
    """Fresh normserve server; W2 requests alternating eval/train from `threads` clients."""
    from normserve.client import Client

    shape = WORKLOADS["W2"]["eval"]
    server = start_normserve(durability)
    try:
        pid = server.proc.pid
        with Client(server.target, timeout=60) as c:
            c.create_layer("rss", reference_module("W2"))
        errors: list[str] = []

        def drive(n: int, seed: int) -> None:
            x = _workers.make_input(shape, seed)
            try:
                with Client(server.target, timeout=60) as c:
                    for k in range(n):
                        c.normalize("rss", x, mode="train" if k % 2 else "eval")
            except Exception as e:  # noqa: BLE001
                errors.append(repr(e))

        def phase(n: int) -> None:
            ts = [threading.Thread(target=drive, args=(n // threads, 77 + i)) for i in range(threads)]
            for t in ts:
                t.start()
            for t in ts:
                t.join()
            if errors:
                raise BenchFailure("RSS run failed: " + "; ".join(errors[:3]))

        phase(max(200, requests // 100))  # warm-up
        before = vm_rss_kib(pid)
        samples = [before]
        chunks = 4
        for _ in range(chunks):
            phase(requests // chunks)
            samples.append(vm_rss_kib(pid))
        after = samples[-1]
    finally:
        server.stop()
    return {
        "requests": requests,
        "workload": "W2 alternating eval/train",
        "client_threads": threads,
        "rss_kib_after_warmup": before,
        "rss_kib_after": after,
        "rss_kib_samples": samples,
        "ratio": after / before,
        "within_10pct": abs(after / before - 1) <= 0.10,
    }


# -- main ----------------------------------------------------------------------------------
def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="CI smoke run: 1 client, 0.3 s per cell, checks correctness")
    p.add_argument("--only", default="", help="comma-separated workloads, e.g. W1,W2 (default all)")
    p.add_argument("--clients", default="", help="client levels for every workload, e.g. 1,4 (default 1,4; W1 1,16)")
    p.add_argument("--seconds", type=float, default=None, help="timed seconds per cell (default 2.0; --quick 0.3)")
    p.add_argument("--modes", default="eval,train", help="modes to run (default eval,train)")
    p.add_argument(
        "--paths",
        default="a,b,c,d,f,g",
        help="paths to run: a inproc, b lean, c unary (batching off), d stream, e lean stream, "
        "f unary with batching on, g shared memory, h lean baseline on a grpc.aio server",
    )
    g = p.add_mutually_exclusive_group()
    g.add_argument("--processes", dest="processes", action="store_true", default=True, help="clients are processes (default)")
    g.add_argument("--threads", dest="processes", action="store_false", help="clients are threads of this process")
    p.add_argument("--durability", default="none", choices=("none", "interval", "always"), help="normserve --durability")
    p.add_argument("--repeat", type=int, default=1, help="run each workload/mode/clients group N times; tables show medians")
    p.add_argument(
        "--device",
        default="cpu",
        help="where normserve's layers and the in-process path compute: cpu (default), cuda or cuda:N; "
        "the lean baseline stays on the CPU",
    )
    p.add_argument("--server-args", default="", help="more `normserve serve` options, e.g. \"--max-workers 16\"")
    p.add_argument("--warmup", type=int, default=None, help="warm-up requests per client (default 5; --quick 2)")
    p.add_argument("--warmup-w3", type=int, default=None, help="warm-up requests per client for W3 (default 2; --quick 1)")
    p.add_argument("--stream-depth", type=int, default=8, help="most messages in flight per stream (default 8)")
    p.add_argument("--rss", action="store_true", help="also measure normserve server RSS growth over W2 requests")
    p.add_argument("--rss-requests", type=int, default=20_000, help="W2 requests for --rss (default 20,000)")
    p.add_argument("--rss-only", action="store_true", help="only the --rss measurement, no cells")
    p.add_argument("--json", default="", help="write every number to this file")
    args = p.parse_args(argv)
    if args.rss_only:
        args.rss = True
    if args.rss and not 100 <= args.rss_requests <= 1_000_000:
        p.error("--rss-requests must be in [100, 1000000]")
    args.seconds = args.seconds if args.seconds is not None else (0.3 if args.quick else 2.0)
    args.warmup = args.warmup if args.warmup is not None else (2 if args.quick else 5)
    args.warmup_w3 = args.warmup_w3 if args.warmup_w3 is not None else (1 if args.quick else 2)
    if args.seconds <= 0 or args.seconds > 600:
        p.error("--seconds must be in (0, 600]")
    if not re.fullmatch(r"cpu|cuda(:\d+)?", args.device):
        p.error(f"--device takes cpu, cuda or cuda:N, got {args.device!r}")
    if min(args.warmup, args.warmup_w3, args.repeat) < 1 or args.stream_depth < 1:
        p.error("--warmup, --warmup-w3, --stream-depth and --repeat must be >= 1")
    try:
        args.path_list = [PATHS[k.strip()] for k in args.paths.split(",") if k.strip()]
    except KeyError as e:
        p.error(f"unknown path {e}; expected some of {','.join(PATHS)}")
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not args.modes or any(m not in MODES for m in args.modes):
        p.error("--modes takes eval and/or train")
    args.workloads = [w.strip().upper() for w in args.only.split(",") if w.strip()] or list(WORKLOADS)
    for w in args.workloads:
        if w not in WORKLOADS:
            p.error(f"unknown workload {w}; expected some of {','.join(WORKLOADS)}")
    if args.clients:
        try:
            levels = [int(c) for c in args.clients.split(",")]
        except ValueError:
            p.error("--clients takes comma-separated integers")
        if not levels or min(levels) < 1 or max(levels) > 64:
            p.error("--clients levels must be in [1, 64]")
        args.levels = {w: levels for w in args.workloads}
    elif args.quick:
        args.levels = {w: [1] for w in args.workloads}
    else:
        args.levels = {w: list(WORKLOADS[w]["clients"]) for w in args.workloads}
    return args


class Terminated(BaseException):
    """SIGTERM: stop like Ctrl-C (clean up the servers and clients, exit 1)."""


def _on_sigterm(signum: int, _frame: Any) -> None:
    raise Terminated()


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _on_sigterm)
    import torch

    torch.set_num_threads(1)
    started = time.monotonic()
    load_before = os.getloadavg()
    git = git_state()
    paths = args.path_list
    order = [BASELINE] + [p for p in paths if p != BASELINE] if BASELINE in paths else paths
    _log(
        f"normserve bench: workloads {','.join(args.workloads)}; paths {','.join(paths)}; "
        f"clients as {'processes' if args.processes else 'threads'}; {args.seconds:g} s per cell; "
        f"durability={args.durability}; device {args.device}; {os.cpu_count()} CPUs; load {load_before[0]:.2f}; "
        f"commit {git['commit']}" + (f" + {git['dirty_files']} uncommitted file(s)" if git["dirty_files"] else "")
    )
    servers = Servers(args.durability, ["--device", args.device, *shlex.split(args.server_args)])
    workers = Workers(args.processes)
    cells: list[dict] = []
    failures: list[str] = []
    rss: Optional[dict] = None
    try:
        if args.rss_only:
            paths = []
        servers.start(
            need_normserve=any(p in ("unary", "stream", "shm") for p in paths),
            need_normserve_batch="unary_batch" in paths,
            need_lean=any(p in ("lean", "lean_stream") for p in paths),
            need_lean_aio="lean_aio" in paths,
        )
        for wl in args.workloads if paths else ():
            for mode in args.modes:
                for clients in args.levels[wl]:
                    for repetition in range(args.repeat):
                        base: Optional[float] = None
                        for path in order:
                            cell = run_cell(workers, servers, wl, mode, clients, path, args)
                            cell["repetition"] = repetition
                            if path == BASELINE:
                                base = cell["req_s"]
                            if base:
                                cell["ratio_to_lean"] = cell["req_s"] / base
                            cells.append(cell)
                            _log(cell_line(cell))
        if args.rss:
            _log(f"RSS: W2 x {args.rss_requests} requests on a fresh normserve server ...")
            rss = measure_rss(args.durability, args.rss_requests)
            _log(
                f"RSS normserve server: {rss['rss_kib_after_warmup'] / 1024:.1f} MiB after warm-up, "
                f"{rss['rss_kib_after'] / 1024:.1f} MiB after {rss['requests']} W2 requests: "
                f"ratio {rss['ratio']:.3f} ({'within' if rss['within_10pct'] else 'OUTSIDE'} +-10%); samples MiB "
                + ", ".join(f"{s / 1024:.1f}" for s in rss["rss_kib_samples"])
            )
            if not rss["within_10pct"]:
                failures.append(f"RSS grew by a factor {rss['ratio']:.3f}")
    except BenchFailure as e:
        failures.append(str(e))
        _log(f"FAILED: {e}")
    except Exception as e:  # noqa: BLE001 - anything else: report, clean up, exit 1
        import traceback

        failures.append(f"{type(e).__name__}: {e}")
        _log(f"FAILED with an unexpected error:\n{traceback.format_exc()}")
    except (KeyboardInterrupt, Terminated) as e:
        what = "interrupted" if isinstance(e, KeyboardInterrupt) else "terminated (SIGTERM)"
        failures.append(what)
        _log(what)
    finally:
        workers.close()
        servers.stop()
    elapsed = time.monotonic() - started
    if cells:
        shown = medians(cells) if args.repeat > 1 else cells
        if args.repeat > 1:
            _log(f"\nTables: medians over {args.repeat} repetitions (each ratio is taken within its repetition)")
        _log("")
        columns = sorted(paths, key=lambda p: _KEY[p])
        _log(table(shown, args.workloads, args.modes, args.levels, columns))
        if any(c.get("server_cpu_ms_per_req") is not None for c in shown):
            _log("")
            _log(cpu_table(shown, args.workloads, args.modes, args.levels, columns))
        if any(c["path"] == "unary_batch" for c in shown) and any(c["path"] == "unary" for c in shown):
            _log("")
            _log(batching_table(shown))
    _log(
        f"\n{len(cells)} cells in {elapsed:.1f} s; clients as {'processes' if args.processes else 'threads'}; "
        f"load average {load_before[0]:.2f} -> {os.getloadavg()[0]:.2f}"
    )
    if args.json:
        doc = {
            "config": {
                "argv": sys.argv[1:],
                "quick": args.quick,
                "seconds": args.seconds,
                "workloads": args.workloads,
                "levels": args.levels,
                "paths": paths,
                "clients_as": "processes" if args.processes else "threads",
                "durability": args.durability,
                "stream_depth": args.stream_depth,
                "repeat": args.repeat,
                "server_args": args.server_args,
                "device": args.device,
                "warmup": args.warmup,
                "warmup_w3": args.warmup_w3,
                "cpus": os.cpu_count(),
                "git": git,
                "python": platform.python_version(),
                "torch": torch.__version__,
                "loadavg_before": load_before,
                "loadavg_after": os.getloadavg(),
                "elapsed_s": elapsed,
            },
            "cells": cells,
            "rss": rss,
            "failures": failures,
            "ok": not failures,
        }
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)
        _log(f"wrote {args.json}")
    if failures:
        _log("FAILED: " + " | ".join(f.splitlines()[0] for f in failures))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
