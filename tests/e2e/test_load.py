"""Load test: 64 concurrent clients against one server process (default settings, own
ServerProcess on 127.0.0.1), two identical rounds of ~10 s each.

Each client is a thread with its own `Client` (and its own raw channel for what the SDK
refuses to send, e.g. an unknown dtype enum). The mix: unary train and eval, train and
eval streams, GetState, ListLayers, and invalid requests (bad shapes, unknown layers, NaN
train batches, bad dtypes, one value per channel, a stream mixing good and bad messages).
Every train request that can succeed goes to one BatchNorm2d(momentum=None, float64).

Checked after each round:
- no deadlock: every thread ends within a bound after the round's end;
- every answer has a status expected for its request kind (never INTERNAL or UNKNOWN;
  streams may get RESOURCE_EXHAUSTED from the stream-slot limit, nothing else may);
- linearizable training: the shared layer's num_batches_tracked and version equal the
  number of acknowledged train requests, the acknowledged versions are exactly 1..N, and
  running_mean / running_var equal the mean of the acknowledged batch means / unbiased
  variances (cumulative moving average, float64);
- reads never go back: each thread's successive GetState versions never decrease;
- the server's RSS (VmRSS of its PID) after round 2 is within +10% of its RSS after
  round 1 (flat memory under repeated identical load);
- the server's /metrics recorded no INTERNAL/UNKNOWN and its log has no traceback.

The figures (requests/s, answers by code and kind, latency percentiles, RSS) are printed:
run with `-s` to see them. NORMSERVE_LOAD_SECONDS changes the round length.
"""

from __future__ import annotations

import collections
import os
import re
import threading
import time
import traceback
import urllib.request
from dataclasses import dataclass, field

import grpc
import numpy as np
import pytest
import torch

from normserve.client import Client, codec
from normserve.client import errors as E
from normserve.client._proto import normserve_pb2 as pb
from serverproc import ServerProcess

pytestmark = pytest.mark.e2e

CLIENTS = 64
ROUND_SECONDS = float(os.environ.get("NORMSERVE_LOAD_SECONDS", "10"))
MAX_OPS_PER_THREAD = 5000  # bounds every loop even if the clock misbehaves
CALL_TIMEOUT = 60.0  # per call; DEADLINE_EXCEEDED is not an expected answer
JOIN_GRACE = 120.0  # a thread still running this long after the round's end is stuck
RSS_GROWTH_LIMIT = 0.10

C = 3
SHARED = "load-bn"  # BatchNorm2d(C, momentum=None, float64): every train request
LN = "load-ln"  # LayerNorm([5])
GN = "load-gn"  # GroupNorm(2, 4)
SERVICE = "normserve.v1.NormService"
S = grpc.StatusCode

# Request kind -> (weight, codes it may be answered with).
KINDS: dict[str, tuple[int, frozenset[str]]] = {
    "train": (24, frozenset({"OK"})),
    "eval": (18, frozenset({"OK"})),
    "train_stream": (5, frozenset({"OK", "RESOURCE_EXHAUSTED"})),
    "eval_stream": (4, frozenset({"OK", "RESOURCE_EXHAUSTED"})),
    "mixed_stream": (3, frozenset({"OK", "RESOURCE_EXHAUSTED"})),
    "get_state": (8, frozenset({"OK"})),
    "list": (5, frozenset({"OK"})),
    "bad_shape": (8, frozenset({"INVALID_ARGUMENT"})),
    "unknown_layer": (7, frozenset({"NOT_FOUND"})),
    "nan_train": (6, frozenset({"INVALID_ARGUMENT"})),
    "bad_dtype": (5, frozenset({"INVALID_ARGUMENT"})),
    "one_value_train": (4, frozenset({"INVALID_ARGUMENT"})),
}
_NAMES = list(KINDS)
_WEIGHTS = np.array([w for w, _ in KINDS.values()], dtype=float)
_WEIGHTS /= _WEIGHTS.sum()
# What each message of a mixed stream must get (None: a result).
MIXED_EXPECTED = [None, S.INVALID_ARGUMENT.value[0], S.NOT_FOUND.value[0], S.INVALID_ARGUMENT.value[0], None]


# -- per-thread records ----------------------------------------------------------------------
@dataclass
class Record:
    answers: collections.Counter = field(default_factory=collections.Counter)  # (kind, code name)
    latencies: list = field(default_factory=list)
    # Acknowledged train batches on SHARED: (per-channel mean, per-channel unbiased var, version).
    acks: list = field(default_factory=list)
    problems: list = field(default_factory=list)
    finished: bool = False


def batch(g: np.random.Generator, n: int = None) -> torch.Tensor:
    n = n or int(g.integers(2, 5))
    mean = g.uniform(-3, 3, (1, C, 1, 1))
    scale = g.uniform(0.5, 2, (1, C, 1, 1))
    return torch.from_numpy(g.normal(0, 1, (n, C, 2, 2)) * scale + mean)


def stats(x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    per_channel = x.transpose(0, 1).reshape(C, -1)
    return per_channel.mean(1).numpy(), per_channel.var(1, unbiased=True).numpy()


def raw_request(layer: str, mode: int, tensor: pb.Tensor) -> pb.NormalizeRequest:
    return pb.NormalizeRequest(layer=layer, mode=mode, input=tensor)


class Worker:
    def __init__(self, index: int, target: str, seed: int):
        self.index = index
        self.g = np.random.default_rng(seed)
        self.client = Client(target, timeout=CALL_TIMEOUT, retry=None)
        self.channel = grpc.insecure_channel(target)
        self.normalize_raw = self.channel.unary_unary(
            f"/{SERVICE}/Normalize", pb.NormalizeRequest.SerializeToString, pb.NormalizeResponse.FromString
        )
        self.stream_raw = self.channel.stream_stream(
            f"/{SERVICE}/NormalizeStream", pb.NormalizeRequest.SerializeToString, pb.NormalizeStreamResponse.FromString
        )
        self.last_version = -1

    def close(self) -> None:
        self.client.close()
        self.channel.close()

    # Each op returns nothing; failures raise (NormServeError / RpcError carry the code).
    def op(self, kind: str, rec: Record) -> None:
        g = self.g
        if kind == "train":
            x = batch(g)
            r = self.client.normalize_result(SHARED, x, "train")
            assert r.output.shape == x.shape and not r.replayed
            rec.acks.append((*stats(x), r.state.version))
        elif kind == "eval":
            layer = [SHARED, LN, GN][int(g.integers(3))]
            x = {SHARED: batch(g), LN: torch.randn(3, 5), GN: torch.randn(2, 4, 3)}[layer]
            out = self.client.normalize(layer, x, "eval")
            assert out.shape == x.shape
        elif kind in ("train_stream", "eval_stream"):
            mode = "train" if kind == "train_stream" else "eval"
            xs = [batch(g) for _ in range(int(g.integers(1, 4)))]
            results = list(self.client.normalize_stream_results(SHARED, iter(xs), mode, timeout=CALL_TIMEOUT))
            assert len(results) == len(xs)
            if mode == "train":
                for x, r in zip(xs, results):
                    rec.acks.append((*stats(x), r.state.version))
        elif kind == "mixed_stream":
            nan = batch(g)
            nan[0, 0, 0, 0] = float("nan")
            msgs = [
                raw_request(LN, pb.MODE_EVAL, codec.encode(torch.randn(2, 5))),
                raw_request(SHARED, pb.MODE_TRAIN, codec.encode(torch.randn(2, C + 1, 2, 2, dtype=torch.float64))),
                raw_request(f"load-missing-{self.index}", pb.MODE_EVAL, codec.encode(torch.randn(2, 5))),
                raw_request(SHARED, pb.MODE_TRAIN, codec.encode(nan)),
                raw_request(GN, pb.MODE_TRAIN, codec.encode(torch.randn(2, 4))),
            ]
            answers = list(self.stream_raw(iter(msgs), timeout=CALL_TIMEOUT))
            got = [a.error.code if a.WhichOneof("result") == "error" else None for a in answers]
            assert [a.sequence for a in answers] == list(range(len(msgs))), [a.sequence for a in answers]
            assert got == MIXED_EXPECTED, f"mixed stream answered {got}, expected {MIXED_EXPECTED}"
        elif kind == "get_state":
            state = self.client.get_state(SHARED)
            version = self.client.get_layer(SHARED).state.version
            nbt = int(state["num_batches_tracked"])
            assert version >= self.last_version, f"version went back {self.last_version} -> {version}"
            assert nbt <= version  # read later than the state: never behind it
            self.last_version = version
        elif kind == "list":
            layers = self.client.list_layers("load-")
            assert {SHARED, LN, GN} <= {l.name for l in layers}
        elif kind == "bad_shape":
            x = [torch.randn(2, C + 1, 2, 2, dtype=torch.float64), torch.randn(2, C, 4, dtype=torch.float64),
                 torch.randn(3, 7)][int(g.integers(3))]
            self.client.normalize(SHARED if x.dim() != 2 else LN, x, ["train", "eval"][int(g.integers(2))])
        elif kind == "unknown_layer":
            self.client.normalize(f"load-missing-{self.index}", batch(g), ["train", "eval"][int(g.integers(2))])
        elif kind == "nan_train":
            x = batch(g)
            x.view(-1)[int(g.integers(x.numel()))] = [float("nan"), float("inf"), -float("inf")][int(g.integers(3))]
            self.client.normalize(SHARED, x, "train")
        elif kind == "bad_dtype":
            x = batch(g)
            t = codec.encode(x)
            if g.integers(2):
                t.dtype = 99  # unknown enum
            else:  # int64 input (the SDK refuses to send it)
                t = codec.encode(x.to(torch.int64))
            self.normalize_raw(raw_request(SHARED, pb.MODE_TRAIN, t), timeout=CALL_TIMEOUT)
        elif kind == "one_value_train":
            self.client.normalize(SHARED, batch(g, n=1)[:, :, :1, :1], "train")
        else:
            raise AssertionError(kind)

    def run(self, rec: Record, start: threading.Barrier, end_at: list) -> None:
        try:
            start.wait()
            end = end_at[0]
            ops = 0
            while time.monotonic() < end and ops < MAX_OPS_PER_THREAD:
                ops += 1
                kind = _NAMES[int(self.g.choice(len(_NAMES), p=_WEIGHTS))]
                t0 = time.perf_counter()
                try:
                    self.op(kind, rec)
                    code = "OK"
                except E.NormServeError as e:
                    code = e.code.name
                except grpc.RpcError as e:
                    code = e.code().name
                except GeneratorExit:
                    # Not an answer: the SDK leaked the request generator's GeneratorExit
                    # (a failed stream must raise a NormServeError).
                    code = "GeneratorExit"
                rec.latencies.append(time.perf_counter() - t0)
                rec.answers[(kind, code)] += 1
                if code not in KINDS[kind][1]:
                    rec.problems.append(f"{kind} answered {code}")
        except Exception:  # an assertion or anything unexpected: keep it, end this thread
            rec.problems.append(traceback.format_exc())
        finally:
            rec.finished = True


# -- the run ---------------------------------------------------------------------------------
def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        m = re.search(r"^VmRSS:\s+(\d+) kB", f.read(), re.M)
    assert m, "no VmRSS"
    return int(m.group(1))


def run_round(workers: list[Worker]) -> tuple[list[Record], float]:
    """All workers for ROUND_SECONDS; returns their records and the wall time."""
    records = [Record() for _ in workers]
    start = threading.Barrier(len(workers) + 1, timeout=120)
    end_at = [0.0]
    threads = [
        threading.Thread(target=w.run, args=(r, start, end_at), name=f"load-{w.index}", daemon=True)
        for w, r in zip(workers, records)
    ]
    for t in threads:
        t.start()
    end_at[0] = time.monotonic() + ROUND_SECONDS
    t0 = time.monotonic()
    start.wait()
    deadline = end_at[0] + JOIN_GRACE
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    stuck = [t.name for t in threads if t.is_alive()]
    assert not stuck, f"deadlock? {len(stuck)} client threads still running {JOIN_GRACE}s after the round: {stuck[:8]}"
    assert all(r.finished for r in records)
    return records, time.monotonic() - t0


def summarize(label: str, records: list[Record], wall: float) -> collections.Counter:
    answers = collections.Counter()
    for r in records:
        answers.update(r.answers)
    total = sum(answers.values())
    by_code = collections.Counter()
    for (_, code), n in answers.items():
        by_code[code] += n
    lat = np.array([x for r in records for x in r.latencies]) * 1e3
    print(f"\n[{label}] {total} requests in {wall:.1f}s = {total / wall:.0f} req/s from {len(records)} clients; "
          f"latency ms p50 {np.percentile(lat, 50):.1f} p90 {np.percentile(lat, 90):.1f} p99 {np.percentile(lat, 99):.1f} "
          f"max {lat.max():.0f}")
    print(f"[{label}] answers by code: {dict(by_code.most_common())}")
    print(f"[{label}] by kind: " + ", ".join(f"{k}:{c}={n}" for (k, c), n in sorted(answers.items())))
    return answers


def server_codes(metrics_url: str) -> collections.Counter:
    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    codes = collections.Counter()
    for m in re.finditer(r'(?m)^normserve_requests_total\{([^}]*)\} (\S+)$', text):
        codes[dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))["code"]] += float(m.group(2))
    return codes


@pytest.fixture(scope="module")
def load_server():
    with ServerProcess() as server:
        yield server


def test_load_64_clients_two_rounds(load_server):
    server = load_server
    failures: list[str] = []  # every check runs and every figure prints; all fail together

    def check(ok: bool, message: str) -> None:
        if not ok:
            failures.append(message)

    with Client(server.target, timeout=CALL_TIMEOUT) as admin:
        admin.create_layer(SHARED, "BatchNorm2d", num_features=C, momentum=None, dtype=torch.float64)
        admin.create_layer(LN, "LayerNorm", normalized_shape=[5])
        admin.create_layer(GN, "GroupNorm", num_groups=2, num_channels=4)
        for _ in range(3):  # warm-up: first-call allocations out of the RSS figures
            admin.normalize(LN, torch.randn(3, 5), "eval")
            admin.normalize(GN, torch.randn(2, 4), "train")

        workers = [Worker(i, server.target, seed=1000 + i) for i in range(CLIENTS)]
        try:
            rss = [rss_kib(server.proc.pid)]
            all_acks: list = []
            for round_no in (1, 2):
                label = f"round {round_no}"
                records, wall = run_round(workers)  # asserts no thread is stuck
                rss.append(rss_kib(server.proc.pid))
                answers = summarize(label, records, wall)
                problems = collections.Counter(p if "\n" not in p else p.strip().splitlines()[-1] for r in records for p in r.problems)
                check(not problems, f"{label}: unexpected answers/errors {dict(problems)}; first traceback:\n"
                      + next((p for r in records for p in r.problems if "\n" in p), "-"))
                bad = {k: n for k, n in answers.items() if k[1] in ("INTERNAL", "UNKNOWN")}
                check(not bad, f"{label}: INTERNAL/UNKNOWN answers {bad}")
                seen = {k for k, _ in answers}
                check(seen == set(KINDS), f"{label}: kinds not exercised: {set(KINDS) - seen}")

                # Linearizable training on the shared layer.
                all_acks += [a for r in records for a in r.acks]
                n = len(all_acks)
                state = admin.get_state(SHARED, as_torch=True)
                info = admin.get_layer(SHARED)
                nbt = int(state["num_batches_tracked"])
                print(f"[{label}] shared layer: {n} acknowledged train batches in all; "
                      f"num_batches_tracked={nbt}, version={info.state.version}")
                check(nbt == n, f"{label}: num_batches_tracked {nbt} != {n} acknowledged train requests")
                check(info.state.version == n, f"{label}: version {info.state.version} != {n}")
                versions = sorted(a[2] for a in all_acks)
                check(versions == list(range(1, n + 1)),
                      f"{label}: acknowledged versions are not 1..{n} (duplicates: "
                      f"{[v for v, c in collections.Counter(versions).items() if c > 1][:10]})")
                if n:
                    means = np.stack([a[0] for a in all_acks]).mean(0)
                    variances = np.stack([a[1] for a in all_acks]).mean(0)
                    check(np.allclose(state["running_mean"].numpy(), means, rtol=1e-9, atol=1e-9),
                          f"{label}: running_mean {state['running_mean'].tolist()} != mean of batch means {means.tolist()}")
                    check(np.allclose(state["running_var"].numpy(), variances, rtol=1e-9, atol=1e-9),
                          f"{label}: running_var {state['running_var'].tolist()} != mean of batch variances {variances.tolist()}")
        finally:
            for w in workers:
                w.close()

    before, after1, after2 = rss
    growth1, growth2 = after1 - before, after2 - after1
    print(f"[rss] server VmRSS: before {before / 1024:.1f} MiB, after round 1 {after1 / 1024:.1f} MiB "
          f"(+{growth1 / 1024:.1f}), after round 2 {after2 / 1024:.1f} MiB (+{growth2 / 1024:.1f}, "
          f"{100 * growth2 / after1:+.1f}% of the round-1 RSS)")
    check(after2 <= after1 * (1 + RSS_GROWTH_LIMIT),
          f"server RSS grew {100 * growth2 / after1:.1f}% in round 2 (limit {100 * RSS_GROWTH_LIMIT:.0f}%): "
          f"{after1} -> {after2} KiB")

    codes = server_codes(server.metrics_url)
    print(f"[server] requests by code (its /metrics): {dict(codes.most_common())}")
    check(codes["INTERNAL"] == 0 and codes["UNKNOWN"] == 0, f"server recorded {dict(codes)}")
    check("Traceback" not in server.log(), "traceback in the server log:\n" + server.log()[-3000:])
    check(server.proc.poll() is None, "server process died")
    assert not failures, "\n".join(failures)
