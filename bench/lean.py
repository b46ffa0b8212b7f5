"""The lean baseline: the cheapest reasonable gRPC server (and client) for the same job.

    .venv/bin/python bench/lean.py [--port 0] [--max-workers 32]

Speaks normserve.v1 (same proto messages, same service name) but does only what the
job needs: decode the tensor bytes with torch.frombuffer, run the torch layer, return the
bytes. No validation, no metrics, no state store, no idempotency ids, no error mapping.
Train requests take the layer's lock and run `module.train(); module(x); module.eval()`;
eval requests run the module (which rests in eval mode) without a lock. It is only meant
for one mode per layer at a time (an eval call racing a train call on the same layer could
see train mode), which is how bench/run.py uses it.

Only CreateLayer (BatchNorm1d/2d/3d from the spec, optional strict initial state),
DeleteLayer, Normalize and NormalizeStream are implemented.

`--aio` runs the same servicer in a grpc.aio server (one event loop) instead of a
ThreadPoolExecutor server: bench/run.py's path f, to choose the server's model by measurement.

It prints `lean serving port=N` on stdout once bound, and stops on SIGTERM/SIGINT or when
its parent process goes away. `LeanProcess` starts it; `LeanClient` is the matching
minimal client (numpy in, numpy out) used by the benchmark.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import threading
from concurrent import futures
from typing import Any, Iterable, Iterator, Optional

import grpc
import numpy as np

from normserve.client._proto import normserve_pb2 as pb
from normserve.client._proto import normserve_pb2_grpc as pb_grpc

MAX_MESSAGE_BYTES = 64 * 1024 * 1024
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
]
_NP_DTYPES = {pb.DTYPE_FLOAT32: np.float32, pb.DTYPE_FLOAT64: np.float64, pb.DTYPE_FLOAT16: np.float16}


# -- server --------------------------------------------------------------------------------
class LeanServicer(pb_grpc.NormServiceServicer):
    def __init__(self) -> None:
        import torch

        self._torch = torch
        self._dtypes = {
            pb.DTYPE_FLOAT32: torch.float32,
            pb.DTYPE_FLOAT64: torch.float64,
            pb.DTYPE_FLOAT16: torch.float16,
            pb.DTYPE_INT64: torch.int64,
        }
        self._enums = {v: k for k, v in self._dtypes.items()}
        self._layers: dict[str, tuple[Any, threading.Lock]] = {}

    def _tensor(self, t: pb.Tensor) -> Any:
        return self._torch.frombuffer(t.data, dtype=self._dtypes[t.dtype]).view(tuple(t.shape))

    def CreateLayer(self, request: pb.CreateLayerRequest, context: grpc.ServicerContext) -> pb.CreateLayerResponse:
        nn = self._torch.nn
        kind = request.spec.WhichOneof("kind")
        cls = {"batch_norm1d": nn.BatchNorm1d, "batch_norm2d": nn.BatchNorm2d, "batch_norm3d": nn.BatchNorm3d}[kind]
        spec = getattr(request.spec, kind)
        kwargs: dict[str, Any] = {}
        if spec.HasField("eps"):
            kwargs["eps"] = spec.eps
        which = spec.WhichOneof("momentum_option")
        if which == "momentum":
            kwargs["momentum"] = spec.momentum
        elif which == "cumulative_average" and spec.cumulative_average:
            kwargs["momentum"] = None
        module = cls(spec.num_features, **kwargs)
        if request.state:
            module.load_state_dict({k: self._tensor(t).clone() for k, t in request.state.items()})
        module.eval()
        self._layers[request.name] = (module, threading.Lock())
        return pb.CreateLayerResponse(layer=pb.LayerInfo(name=request.name))

    def DeleteLayer(self, request: pb.DeleteLayerRequest, context: grpc.ServicerContext) -> pb.DeleteLayerResponse:
        self._layers.pop(request.name, None)
        return pb.DeleteLayerResponse()

    def _run(self, request: pb.NormalizeRequest, out: pb.NormalizeResponse) -> None:
        t = request.input
        x = self._torch.frombuffer(t.data, dtype=self._dtypes[t.dtype]).view(tuple(t.shape))
        module, lock = self._layers[request.layer]
        with self._torch.no_grad():
            if request.mode == pb.MODE_TRAIN:
                with lock:
                    module.train()
                    y = module(x)
                    module.eval()
            else:
                y = module(x)
        o = out.output
        o.dtype = t.dtype
        o.shape.extend(y.shape)
        o.data = y.numpy().tobytes()

    def Normalize(self, request: pb.NormalizeRequest, context: grpc.ServicerContext) -> pb.NormalizeResponse:
        response = pb.NormalizeResponse()
        self._run(request, response)
        return response

    def NormalizeStream(
        self, request_iterator: Iterator[pb.NormalizeRequest], context: grpc.ServicerContext
    ) -> Iterator[pb.NormalizeStreamResponse]:
        for sequence, request in enumerate(request_iterator):
            response = pb.NormalizeStreamResponse(sequence=sequence)
            self._run(request, response.response)
            yield response


class LeanAioServicer(LeanServicer):
    """The same work in a grpc.aio server: one event loop, handlers run on it in turn."""

    async def CreateLayer(self, request: pb.CreateLayerRequest, context: Any) -> pb.CreateLayerResponse:  # type: ignore[override]
        return LeanServicer.CreateLayer(self, request, context)

    async def DeleteLayer(self, request: pb.DeleteLayerRequest, context: Any) -> pb.DeleteLayerResponse:  # type: ignore[override]
        return LeanServicer.DeleteLayer(self, request, context)

    async def Normalize(self, request: pb.NormalizeRequest, context: Any) -> pb.NormalizeResponse:  # type: ignore[override]
        response = pb.NormalizeResponse()
        self._run(request, response)
        return response

    async def NormalizeStream(self, request_iterator: Any, context: Any) -> Any:  # type: ignore[override]
        sequence = 0
        async for request in request_iterator:
            response = pb.NormalizeStreamResponse(sequence=sequence)
            self._run(request, response.response)
            sequence += 1
            yield response


async def _serve_aio(host: str, port: int) -> int:
    import asyncio

    server = grpc.aio.server(options=[*CHANNEL_OPTIONS, ("grpc.so_reuseport", 0)])
    pb_grpc.add_NormServiceServicer_to_server(LeanAioServicer(), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        print(f"lean: cannot bind {host}:{port}", file=sys.stderr)
        return 1
    await server.start()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    parent = os.getppid()
    print(f"lean serving port={bound}", flush=True)
    while not stop.is_set() and os.getppid() == parent:
        try:
            await asyncio.wait_for(stop.wait(), 0.5)
        except asyncio.TimeoutError:
            pass
    await server.stop(1)
    return 0


def serve(host: str, port: int, max_workers: int, aio: bool = False) -> int:
    import torch

    torch.set_num_threads(1)
    if aio:
        import asyncio

        return asyncio.run(_serve_aio(host, port))
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers),
        options=[*CHANNEL_OPTIONS, ("grpc.so_reuseport", 0)],
    )
    pb_grpc.add_NormServiceServicer_to_server(LeanServicer(), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        print(f"lean: cannot bind {host}:{port}", file=sys.stderr)
        return 1
    server.start()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    parent = os.getppid()
    print(f"lean serving port={bound}", flush=True)
    # Bounded waits: also notice when the parent (the benchmark) is gone.
    while not stop.wait(0.5):
        if os.getppid() != parent:
            break
    server.stop(1).wait(5)
    return 0


# -- process wrapper -----------------------------------------------------------------------
class LeanProcess:
    """Runs this file as its own process on 127.0.0.1, port 0."""

    def __init__(self, max_workers: int = 32, startup_timeout: float = 60.0, aio: bool = False):
        self.max_workers = max_workers
        self.aio = aio
        self.startup_timeout = startup_timeout
        self.proc: Optional[subprocess.Popen[str]] = None
        self.target = ""
        self.lines: list[str] = []
        self._ready = threading.Event()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> "LeanProcess":
        cmd = [sys.executable, os.path.abspath(__file__), "--port", "0", "--max-workers", str(self.max_workers)]
        if self.aio:
            cmd.append("--aio")
        # Own session: a Ctrl-C in the terminal reaches the benchmark, which then stops
        # this server itself (SIGTERM); the server also exits when its parent is gone.
        self.proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            bufsize=1,
            start_new_session=True,
        )
        threading.Thread(target=self._drain, daemon=True).start()
        if not self._ready.wait(self.startup_timeout) or not self.target:
            self.stop()
            raise RuntimeError("lean server did not start:\n" + "".join(self.lines))
        return self

    def _drain(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            m = re.search(r"lean serving port=(\d+)", line)
            if m and not self._ready.is_set():
                self.target = f"127.0.0.1:{m.group(1)}"
                self._ready.set()
        self._ready.set()

    def stop(self, timeout: float = 15.0) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc.wait()

    def __enter__(self) -> "LeanProcess":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- client --------------------------------------------------------------------------------
class LeanClient:
    """Minimal client: numpy float array in, numpy array out (a read-only view of the
    response bytes), nothing else."""

    def __init__(self, target: str):
        self._channel = grpc.insecure_channel(target, options=CHANNEL_OPTIONS)
        self._stub = pb_grpc.NormServiceStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "LeanClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @staticmethod
    def _request(layer: str, mode: int, x: np.ndarray) -> pb.NormalizeRequest:
        request = pb.NormalizeRequest(layer=layer, mode=mode)
        t = request.input
        t.dtype = pb.DTYPE_FLOAT32 if x.dtype == np.float32 else pb.DTYPE_FLOAT64
        t.shape.extend(x.shape)
        t.data = x.tobytes()
        return request

    @staticmethod
    def _array(t: pb.Tensor) -> np.ndarray:
        return np.frombuffer(t.data, dtype=_NP_DTYPES[t.dtype]).reshape(tuple(t.shape))

    def create_layer(self, name: str, kind: str, num_features: int, state: Optional[dict[str, np.ndarray]] = None) -> None:
        spec = pb.LayerSpec()
        getattr(spec, {"BatchNorm1d": "batch_norm1d", "BatchNorm2d": "batch_norm2d", "BatchNorm3d": "batch_norm3d"}[kind]).num_features = num_features
        request = pb.CreateLayerRequest(name=name, spec=spec)
        for key, value in (state or {}).items():
            value = np.ascontiguousarray(value)
            t = request.state[key]
            t.dtype = {np.dtype(np.float32): pb.DTYPE_FLOAT32, np.dtype(np.int64): pb.DTYPE_INT64}[value.dtype]
            t.shape.extend(value.shape)
            t.data = value.tobytes()
        self._stub.CreateLayer(request, timeout=30)

    def delete_layer(self, name: str) -> None:
        self._stub.DeleteLayer(pb.DeleteLayerRequest(name=name), timeout=30)

    def normalize(self, layer: str, x: np.ndarray, mode: str = "eval") -> np.ndarray:
        m = pb.MODE_TRAIN if mode == "train" else pb.MODE_EVAL
        return self._array(self._stub.Normalize(self._request(layer, m, x)).output)

    def normalize_stream(self, layer: str, batches: Iterable[np.ndarray], mode: str = "eval") -> Iterator[np.ndarray]:
        m = pb.MODE_TRAIN if mode == "train" else pb.MODE_EVAL
        call = self._stub.NormalizeStream(self._request(layer, m, x) for x in batches)
        try:
            for response in call:
                yield self._array(response.response.output)
        finally:
            call.cancel()


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="lean baseline gRPC server for bench/run.py")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--max-workers", type=int, default=32)
    parser.add_argument("--aio", action="store_true", help="a grpc.aio server instead of the threaded one")
    args = parser.parse_args(argv)
    return serve(args.host, args.port, args.max_workers, args.aio)


if __name__ == "__main__":
    sys.exit(main())
