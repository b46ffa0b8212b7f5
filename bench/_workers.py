"""Benchmark client workers (threads or processes) for bench/run.py.

A worker serves one cell at a time over a multiprocessing Connection:

    parent -> ("cell", spec)       worker builds its client and input, warms up
    worker -> ("ready", first)     first output of the cell (checked by the parent)
    parent -> ("go", t0, t_end)    timed phase from t0 to t_end (time.monotonic, which is
                                   CLOCK_MONOTONIC: the same clock in every process)
    worker -> ("done", result)     counts and latencies
    parent -> ("exit",)

Anything unexpected is answered with ("error", traceback). This module imports no torch
at import time (client processes for the transport paths never load it); the in-process
path imports it lazily.
"""

from __future__ import annotations

import os
import signal
import threading
import time
import traceback
from array import array
from typing import Any, Callable, Optional

import numpy as np

# Longest a worker waits for the parent's next message inside a cell.
PARENT_TIMEOUT_S = 600.0


class Abort(Exception):
    pass


def make_input(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """The input of one client in one cell: the same for every path (same seed)."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(shape, dtype=np.float32) * 2.0 + 0.5).astype(np.float32)


def _recv(conn: Any, timeout: float = PARENT_TIMEOUT_S) -> tuple:
    if not conn.poll(timeout):
        raise TimeoutError(f"no message from the benchmark parent in {timeout:.0f} s")
    return conn.recv()


def _sleep_until(t: float) -> None:
    delay = t - time.monotonic()
    if delay > 0:
        time.sleep(min(delay, 5.0))


def _torch_module(spec: dict) -> Any:
    import torch

    torch.set_num_threads(1)
    cls = getattr(torch.nn, spec["kind"])
    module = cls(spec["num_features"])
    module.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in spec["state"].items()})
    module.train(spec["mode"] == "train")
    return module.to(spec["device"])


def _unary_call(spec: dict, x: np.ndarray) -> tuple[Callable[[], Any], Callable[[], None]]:
    """(call, close): call() runs one request and returns its output."""
    path, layer, mode = spec["path"], spec["layer"], spec["mode"]
    if path == "inproc":
        import torch

        module = _torch_module(spec)
        xt, device = torch.from_numpy(x), spec["device"]

        def call() -> Any:  # from and back to host memory, as a client's tensors travel
            with torch.no_grad():
                return module(xt.to(device)).cpu()

        return call, lambda: None
    if path in ("lean", "lean_aio"):
        from lean import LeanClient

        lean = LeanClient(spec["target"])
        return (lambda: lean.normalize(layer, x, mode)), lean.close
    if path in ("unary", "unary_batch", "shm"):
        from normserve.client import Client

        client = Client(spec["target"], shared_memory=path == "shm")
        return (lambda: client.normalize(layer, x, mode)), client.close
    raise ValueError(f"unknown unary path {path!r}")


def _as_numpy(y: Any) -> np.ndarray:
    if isinstance(y, np.ndarray):
        return np.array(y, copy=True)
    return y.detach().numpy().copy()  # torch (in-process path)


def run_unary(conn: Any, spec: dict) -> None:
    x = make_input(tuple(spec["shape"]), spec["seed"])
    call, close = _unary_call(spec, x)
    try:
        first = _as_numpy(call())
        for _ in range(spec["warmup"] - 1):
            call()
        conn.send(("ready", first))
        msg = _recv(conn)
        if msg[0] != "go":
            raise Abort()
        t0, t_end = msg[1], msg[2]
        _sleep_until(t0)
        lat = array("d")
        monotonic = time.monotonic
        now = monotonic()
        # Bounded by time: every iteration ends when t_end is reached.
        while now < t_end:
            start = now
            call()
            now = monotonic()
            lat.append(now - start)
        result = {
            "n": len(lat),
            "t0": t0,
            "t_last": now,
            "lat": np.frombuffer(lat, dtype=np.float64).copy() if len(lat) else np.zeros(0),
            "total": spec["warmup"] + len(lat),
        }
        conn.send(("done", result))
    finally:
        close()


def run_stream(conn: Any, spec: dict) -> None:
    """One stream for the whole cell: `warmup` messages, a pause for the common start,
    then messages until t_end. At most `depth` messages are in flight (a semaphore
    released on every response), so the stream is pipelined but bounded."""
    path, layer, mode = spec["path"], spec["layer"], spec["mode"]
    x = make_input(tuple(spec["shape"]), spec["seed"])
    warmup, depth = spec["warmup"], spec["stream_depth"]
    if path == "stream":
        from normserve.client import Client

        client: Any = Client(spec["target"])
    elif path == "lean_stream":
        from lean import LeanClient

        client = LeanClient(spec["target"])
    else:
        raise ValueError(f"unknown stream path {path!r}")
    go = threading.Event()
    stop = threading.Event()
    window = threading.Semaphore(depth)
    times: dict[str, float] = {}

    def batches():
        for _ in range(warmup):
            while not window.acquire(timeout=1.0):
                if stop.is_set():
                    return
            yield x
        if not go.wait(PARENT_TIMEOUT_S) or stop.is_set():
            return
        _sleep_until(times["t0"])
        t_end = times["t_end"]
        while not stop.is_set() and time.monotonic() < t_end:
            if window.acquire(timeout=0.5):
                yield x

    first: Optional[np.ndarray] = None
    received = 0
    t_last = 0.0
    try:
        for y in client.normalize_stream(layer, batches(), mode):
            window.release()
            received += 1
            if received == 1:
                first = _as_numpy(y)
            if received == warmup:
                conn.send(("ready", first))
                msg = _recv(conn)
                if msg[0] != "go":
                    stop.set()
                    go.set()
                    raise Abort()
                times["t0"], times["t_end"] = msg[1], msg[2]
                go.set()
            t_last = time.monotonic()
    finally:
        stop.set()
        go.set()
        client.close()
    if received < warmup:
        raise RuntimeError(f"stream ended after {received} of {warmup} warm-up messages")
    n = received - warmup
    conn.send(("done", {"n": n, "t0": times["t0"], "t_last": t_last if n else times["t0"], "lat": None, "total": received}))


def serve(conn: Any, parent_pid: Optional[int] = None) -> None:
    """A worker's main loop; returns on ("exit",), on EOF, or when the parent is gone."""
    if parent_pid is not None:
        # A process worker: Ctrl-C goes to the whole process group; the parent cleans up.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    while True:
        try:
            if not conn.poll(1.0):
                if parent_pid is not None and os.getppid() != parent_pid:
                    return
                continue
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg[0] == "exit":
            return
        if msg[0] != "cell":
            continue  # a stray go/abort for a cell that already failed here
        spec = msg[1]
        try:
            if spec["path"] in ("stream", "lean_stream"):
                run_stream(conn, spec)
            else:
                run_unary(conn, spec)
        except Abort:
            pass
        except BaseException:  # noqa: BLE001 - reported to the parent, which fails loudly
            try:
                conn.send(("error", traceback.format_exc()))
            except (EOFError, OSError):
                return


def process_main(conn: Any, parent_pid: int, torch_threads: int = 1) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", str(torch_threads))
    serve(conn, parent_pid)
