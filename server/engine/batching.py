"""Dynamic batching of concurrent eval requests on one layer.

Eval is a per-sample computation for the layouts batched here, so requests that arrive
while the layer is busy can be concatenated along dim 0, run through the layer in one
forward and split again: each request gets exactly (bitwise) the output it would get
alone. Train requests are never batched (that would change BatchNorm statistics).

Scheme (leader/follower, per layer): a request that finds the layer's queue idle becomes
the leader and runs at once, alone; it never waits. Requests that arrive while a forward
is in progress queue up. When the leader is done it hands leadership to the oldest queued
request, which takes every queued request compatible with it (same dtype, device and
per-sample shape; up to `max_size` samples), optionally waits up to `max_delay` for more
(only under load: a queue that was idle never waits), reads the layer's current snapshot
once, runs one forward and hands its members their slices. Every member of a batch reads
that one snapshot and reports its version.

Not batched (run alone, as before): inputs whose dim 0 is not a batch dimension
(unbatched InstanceNorm input, a LayerNorm/RMSNorm input that is exactly
`normalized_shape`); BatchNorm layers with track_running_stats=False, whose eval mode
normalizes with the statistics of the whole batch; inputs over SOLO_ELEMENTS elements or
`max_size` samples. If a batched forward fails, its members run alone so that each gets
its own result or error. A queued request whose caller goes away (cancellation, deadline)
leaves the queue with RequestAbandoned.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional, Sequence

import torch

from .errors import RequestAbandoned
from .specs import LayerConfig, spatial_dims

if TYPE_CHECKING:
    from .layer import ForwardResult, Layer

# Requests with more elements than this run alone: their compute dwarfs the fixed cost of
# a forward (~20-40 us on CPU), and concatenating them would cost a copy. Measured on CPU,
# eval BatchNorm2d, 4 requests in one forward vs 4 forwards: 16 and 3,072 elements
# 4x faster; 12,288 even; 150,528 (a 224x224 RGB image) 2x slower.
SOLO_ELEMENTS = 8192

# How often a queued request checks whether its caller is still waiting for it.
_POLL_SECONDS = 0.05

# Called once per forward a batcher runs: (layer kind, requests, each request's queue time
# in seconds).
BatchObserver = Callable[[str, int, Sequence[float]], None]


def batchable(config: LayerConfig, x: torch.Tensor) -> bool:
    """Whether `x` (already validated for the layer) may be concatenated with others
    along dim 0 without changing any output."""
    fam, rank = config.family, x.dim()
    if fam == "batch_norm":
        # Without running statistics, eval mode normalizes with the batch's statistics.
        return bool(config.args["track_running_stats"])
    if fam == "instance_norm":
        return rank == spatial_dims(config.kind) + 2
    if fam == "group_norm":
        return True
    return rank > len(tuple(config.args["normalized_shape"]))  # layer_norm, rms_norm


class _Request:
    __slots__ = ("x", "key", "samples", "still_wanted", "enqueued", "wake", "lead", "result", "error")

    def __init__(self, x: torch.Tensor, still_wanted: Optional[Callable[[], bool]]):
        self.x = x
        self.key = (x.dtype, x.device, x.shape[1:])
        self.samples = x.shape[0]
        self.still_wanted = still_wanted
        self.enqueued = time.perf_counter()
        self.wake = threading.Lock()
        self.wake.acquire()  # released when the request is answered or made leader
        self.lead = False
        self.result: Optional["ForwardResult"] = None
        self.error: Optional[BaseException] = None


class _LayerQueue:
    """The batching queue of one layer."""

    def __init__(self, batching: "EvalBatching"):
        self._batching = batching
        self._lock = threading.Lock()
        self._arrived = threading.Condition(self._lock)
        self._delaying = False  # a leader waits on _arrived for more requests
        self._busy = False  # a leader is forming or running a batch
        self._queue: deque[_Request] = deque()

    def forward(self, layer: "Layer", x: torch.Tensor, still_wanted: Optional[Callable[[], bool]]) -> "ForwardResult":
        with self._lock:
            idle = not self._busy
            if idle:
                self._busy = True
            else:
                request = _Request(x, still_wanted)
                self._queue.append(request)
                if self._delaying:
                    self._arrived.notify()
        if idle:
            # Nobody is computing or queued: run at once, alone (requests arriving
            # meanwhile queue up and are batched by the next leader).
            from .layer import ForwardResult

            try:
                snap = layer._snapshot
                result = ForwardResult(layer._run(snap.module, x), snap.version)
            finally:
                self._hand_over()
            observer = self._batching.observer
            if observer is not None:
                observer(layer.kind, 1, (0.0,))
            return result
        self._wait(request)
        if request.lead:
            self._lead(layer, request)
        return self._answer(request)

    @staticmethod
    def _answer(request: _Request) -> "ForwardResult":
        if request.error is not None:
            raise request.error
        assert request.result is not None
        return request.result

    def _wait(self, request: _Request) -> None:
        """Until answered or made leader; a caller that goes away leaves the queue."""
        if request.still_wanted is None:
            request.wake.acquire()
            return
        while not request.wake.acquire(timeout=_POLL_SECONDS):
            if request.still_wanted():
                continue
            with self._lock:
                try:
                    self._queue.remove(request)
                except ValueError:
                    continue  # taken into a batch or made leader meanwhile: wait for it
            raise RequestAbandoned("request cancelled or past its deadline while queued for batching")

    def _lead(self, layer: "Layer", leader: _Request) -> None:
        """Form a batch around `leader`, run it, answer its members, hand over."""
        batching = self._batching
        limit = batching.max_size
        members = [leader]
        try:
            with self._lock:
                samples = self._take(members, leader.samples, limit)
                if batching.max_delay > 0 and samples < limit:
                    deadline = time.perf_counter() + batching.max_delay
                    self._delaying = True
                    try:
                        while samples < limit:
                            left = deadline - time.perf_counter()
                            if left <= 0 or not self._arrived.wait(left):
                                break
                            samples = self._take(members, samples, limit)
                    finally:
                        self._delaying = False
            self._run(layer, members)
        except BaseException as e:  # noqa: BLE001 - every member, the leader included, gets it
            for r in members:
                if r.result is None and r.error is None:
                    r.error = e
        finally:
            for r in members[1:]:
                r.wake.release()
            self._hand_over()

    def _take(self, members: list[_Request], samples: int, limit: int) -> int:
        """Move queued requests compatible with members[0] into `members` (caller holds
        the lock), oldest first, while the batch stays within `limit` samples."""
        key = members[0].key
        kept: list[_Request] = []
        queue = self._queue
        while queue:
            r = queue.popleft()
            if r.key == key and samples + r.samples <= limit:
                members.append(r)
                samples += r.samples
            else:
                kept.append(r)
        queue.extend(kept)
        return samples

    def _hand_over(self) -> None:
        with self._lock:
            if not self._queue:
                self._busy = False
                return
            successor = self._queue.popleft()
        successor.lead = True
        successor.wake.release()

    def _run(self, layer: "Layer", members: list[_Request]) -> None:
        """One snapshot, one forward (or, if that fails, one per member); sets each
        member's result or error."""
        from .layer import ForwardResult

        started = time.perf_counter()
        live = []
        for r in members:
            if r.still_wanted is not None and len(members) > 1 and not r.still_wanted():
                r.error = RequestAbandoned("request cancelled or past its deadline while queued for batching")
            else:
                live.append(r)
        if not live:
            return
        snap = layer._snapshot  # one snapshot for the whole batch
        queued = [started - r.enqueued for r in live]
        out = None
        if len(live) > 1:
            try:
                out = layer._run(snap.module, torch.cat([r.x for r in live]))
            except Exception:  # noqa: BLE001 - retried member by member below
                out = None
        if out is not None and out.shape[0] == sum(r.samples for r in live):
            for r, part, q in zip(live, out.split([r.samples for r in live]), queued):
                r.result = ForwardResult(part, snap.version, queued_seconds=q)
        else:  # alone: each member gets its own output or its own error
            for r, q in zip(live, queued):
                try:
                    r.result = ForwardResult(layer._run(snap.module, r.x), snap.version, queued_seconds=q)
                except Exception as e:  # noqa: BLE001 - handed to that request's caller
                    r.error = e
        observer = self._batching.observer
        if observer is not None:
            observer(layer.kind, len(live), queued)


@dataclass
class EvalBatching:
    """Server-wide batching settings and one queue per layer. `max_size`: most samples
    (sum of dim 0) per batched forward; `max_delay`: seconds a leader formed under load
    may wait for more requests (0: batch only what is already queued)."""

    max_size: int = 64
    max_delay: float = 0.0
    observer: Optional[BatchObserver] = None

    def __post_init__(self) -> None:
        if self.max_size < 1:
            raise ValueError(f"max_size must be >= 1, got {self.max_size}")
        if not (self.max_delay >= 0 and self.max_delay != float("inf")):
            raise ValueError(f"max_delay must be a finite number >= 0, got {self.max_delay}")
        self._queues: "weakref.WeakKeyDictionary[Layer, _LayerQueue]" = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()

    def accepts(self, config: LayerConfig, x: torch.Tensor) -> bool:
        """Whether an eval of `x` (validated for the layer) goes through the queue; the
        others run alone, directly."""
        return x.shape[0] <= self.max_size and x.numel() <= SOLO_ELEMENTS and batchable(config, x)

    def forward(self, layer: "Layer", x: torch.Tensor, still_wanted: Optional[Callable[[], bool]] = None) -> "ForwardResult":
        """Eval `x` (validated by the layer and accepted) through `layer`, batched with
        concurrent requests."""
        queue = self._queues.get(layer)
        if queue is None:
            with self._lock:
                queue = self._queues.get(layer)
                if queue is None:
                    queue = self._queues[layer] = _LayerQueue(self)
        return queue.forward(layer, x, still_wanted)
