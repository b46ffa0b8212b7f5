"""One named layer and its state, with per-request mode and copy-on-write updates.

Concurrency model: the current state is an immutable `_Snapshot` (a torch module in eval
mode plus a version number) behind one reference. Eval requests read that reference and
run without any lock, so they never block each other and always see one consistent state.
Train requests (and LoadState / ResetRunningStats) take the layer's write lock, run on a
copy whose running buffers are cloned, and publish the copy only when everything
succeeded: updates are linearizable and a failed request leaves the state as it was.
The mode lives in the per-request copy, never on the shared module.
"""

from __future__ import annotations

import threading
import time
import warnings
from dataclasses import dataclass
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, NamedTuple, Optional

import numpy as np
import torch
from torch import nn

from .errors import InvalidInput, LayerNotFound, NoRunningStats, RequestAbandoned, VersionConflict
from .specs import LayerConfig, build_module, spatial_dims
from .shared import AlreadyApplied, StaleState, Superseded
from .store import LayerRecord, StateStore

if TYPE_CHECKING:
    from .batching import EvalBatching

# torch only warns when an InstanceNorm without affine/running stats sees another channel
# count; the result is still what torch computes, so the warning is noise here.
warnings.filterwarnings("ignore", message="input's size at dim=.* does not match num_features")

_OUT_OF_MEMORY = getattr(torch, "OutOfMemoryError", ())  # older torch: no such class
_FLOAT_TYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_NUMPY_TYPES = (torch.float32, torch.float64)


@dataclass(frozen=True)
class StateVersion:
    """`version` grows by one with every state change; `num_batches_tracked` as in torch."""

    version: int
    num_batches_tracked: int


@dataclass(frozen=True)
class _Snapshot:
    module: nn.Module  # eval mode; never mutated once published
    version: StateVersion


@dataclass(frozen=True)
class _Committed:
    version: StateVersion
    ticket: Any  # the store's durability ticket
    before: _Snapshot
    after: nn.Module
    queued_seconds: float
    replayed: bool = False


# A shared store can answer "moved on" when another replica committed first; each such
# answer means progress elsewhere, so this bound is only a guard against a broken store.
_MAX_COMMIT_ATTEMPTS = 1000


class ForwardResult(NamedTuple):
    output: torch.Tensor
    state: StateVersion  # the state the request read (eval) or produced (train)
    replayed: bool = False  # a repeated request id: nothing was applied this time
    # Time a train request waited for the layer's write lock, or a batched eval request
    # in its layer's batching queue.
    queued_seconds: float = 0.0
    # Train requests: how far the batch's mean was from the running mean before the update,
    # in running standard deviations, averaged over channels (None when not measurable).
    drift: Optional[float] = None


def _state_version(module: nn.Module, version: int) -> StateVersion:
    nbt = getattr(module, "num_batches_tracked", None)
    return StateVersion(version, int(nbt) if nbt is not None else 0)


_NON_FINITE = (
    "train batch contains NaN or Inf, or its statistics overflow the layer's dtype; "
    "the running statistics would be poisoned"
)


def _check_finite_stats(module: nn.Module) -> None:
    buffers = module._buffers  # direct: nn.Module.__getattr__ is slow for buffers
    for name in ("running_mean", "running_var"):
        t = buffers[name]
        assert t is not None
        # numpy is several times cheaper than torch for the small vectors this sees.
        finite = np.isfinite(t.numpy()).all() if t.dtype in _NUMPY_TYPES and t.device.type == "cpu" else torch.isfinite(t).all()
        if not finite:
            raise InvalidInput(_NON_FINITE)


def _drift(before: nn.Module, after: nn.Module) -> Optional[float]:
    """Distance of the batch mean from the running mean before the update, in running
    standard deviations, averaged over channels. The batch mean is recovered from the
    update itself (new = old + factor * (batch - old)), so this costs no pass over the data."""
    momentum = before.momentum
    old, new = before._buffers, after._buffers  # direct: nn.Module.__getattr__ is slow for buffers
    factor = 1.0 / float(new["num_batches_tracked"]) if momentum is None else float(momentum)  # type: ignore[arg-type]
    if factor <= 0:
        return None
    old_mean, new_mean, old_var = old["running_mean"], new["running_mean"], old["running_var"]
    assert old_mean is not None and new_mean is not None and old_var is not None
    if old_mean.device.type == "cpu" and old_mean.dtype in _NUMPY_TYPES:
        # numpy: a few microseconds instead of tens for torch's per-op overhead.
        step = np.abs(new_mean.numpy() - old_mean.numpy()) / np.sqrt(old_var.numpy() + before.eps)
        return float(step.sum()) / step.size / factor
    step = new_mean.sub(old_mean).abs_()
    return float(step.div_(old_var.add(before.eps).sqrt_()).mean()) / factor


def _state_of(module: nn.Module) -> dict[str, torch.Tensor]:
    """module.state_dict() for these leaf modules, without its hook and prefix machinery
    (a large part of a small train request's cost): parameters, then persistent buffers."""
    state = {k: p.detach() for k, p in module._parameters.items() if p is not None}
    skip = module._non_persistent_buffers_set
    state.update((k, b) for k, b in module._buffers.items() if b is not None and k not in skip)
    return state


def _shallow_copy(module: nn.Module) -> nn.Module:
    """What copy.copy does for these modules, without the cost of its protocol."""
    work = object.__new__(type(module))
    work.__dict__.update(module.__dict__)
    return work


def _writable_copy(module: nn.Module) -> nn.Module:
    """A shallow copy sharing parameters, with its own clones of every buffer."""
    work = _shallow_copy(module)
    work.__dict__["_buffers"] = {k: None if v is None else v.clone() for k, v in module._buffers.items()}
    return work


class Layer:
    """A named layer. Every committed change is published in memory, then appended to the
    state store under the write lock (so one layer's records are in version order), then
    waited on for durability outside the lock (so concurrent updates share fsyncs)."""

    def __init__(
        self,
        name: str,
        config: LayerConfig,
        state: Optional[Mapping[str, torch.Tensor]] = None,
        *,
        store: Optional[StateStore] = None,
        version: int = 0,
        request_ids: Iterable[tuple[str, int, int]] = (),
        idempotency_window: int = 1024,
        device: torch.device | str = "cpu",
        incarnation: int = 0,
    ):
        self.name = name
        self.config = config
        self.device = torch.device(device)
        self.deleted = False
        self.incarnation = incarnation  # shared stores: which creation of this name
        self._store = store if store is not None else StateStore()
        self._write_lock = threading.Lock()
        self._window = idempotency_window
        # Recent request id -> the state it produced. Changed only under the write lock,
        # and before the snapshot it belongs to is published (see record()).
        self._ids: OrderedDict[str, StateVersion] = OrderedDict(
            (rid, StateVersion(v, n)) for rid, v, n in request_ids
        )
        module = build_module(config, self.device)
        if state:
            module = self._loaded(module, state)
        self._snapshot = _Snapshot(module, _state_version(module, version))

    # -- reading ---------------------------------------------------------------------
    @property
    def kind(self) -> str:
        return self.config.kind

    @property
    def has_running_stats(self) -> bool:
        return self.config.tracks_running_stats

    @property
    def version(self) -> StateVersion:
        return self._snapshot.version

    def state_dict(self) -> tuple[dict[str, torch.Tensor], StateVersion]:
        """The layer's state_dict and the version it belongs to (tensors are read-only views)."""
        snap = self._snapshot
        return _state_of(snap.module), snap.version

    def record(self) -> LayerRecord:
        """The layer's complete durable state, consistent without taking the write lock:
        ids are recorded before their snapshot is published, so a copy taken after reading
        the snapshot holds every id up to its version; later ones are filtered out."""
        snap = self._snapshot
        ids = self._ids.copy()  # one C-level copy: atomic with respect to other threads
        v = snap.version.version
        return self._make_record(
            snap, tuple((rid, s.version, s.num_batches_tracked) for rid, s in ids.items() if s.version <= v), True
        )

    def _make_record(self, snap: _Snapshot, ids: tuple[tuple[str, int, int], ...], full_ids: bool) -> LayerRecord:
        return LayerRecord(
            name=self.name,
            kind=self.kind,
            args=dict(self.config.args),
            version=snap.version.version,
            state=_state_of(snap.module),
            request_ids=ids,
            full_ids=full_ids,
        )

    # -- running batches -------------------------------------------------------------
    def forward(
        self,
        x: torch.Tensor,
        train: bool,
        still_wanted: Optional[Callable[[], bool]] = None,
        request_id: str = "",
        batching: Optional["EvalBatching"] = None,
    ) -> ForwardResult:
        """Run one batch in train or eval mode.

        `still_wanted` is asked just before a train update is committed; when it returns
        False the update is dropped and RequestAbandoned raised. A train `request_id` this
        layer has already applied is answered with the state that application produced and
        the same output (train outputs depend only on the batch), and nothing changes.
        With `batching`, an eval request may run in one forward with concurrent ones
        (engine/batching.py); train requests never are.
        """
        self._check_input(x, train)
        if batching is not None and not train and batching.accepts(self.config, x):
            return batching.forward(self, x, still_wanted)
        if not (train and self.has_running_stats):
            # Nothing to update: eval, or a kind whose train mode changes no state
            # (for those torch gives the same output in both modes).
            snap = self._snapshot
            return ForwardResult(self._run(snap.module, x), snap.version)
        outputs: list[torch.Tensor] = []

        def step(snap: _Snapshot) -> nn.Module:
            work = _writable_copy(snap.module)
            work.training = True
            outputs[:] = [self._run(work, x)]
            work.training = False
            _check_finite_stats(work)
            return work

        waited_from = time.perf_counter()
        done = self._update(step, request_id=request_id, still_wanted=still_wanted, waited_from=waited_from)
        result = ForwardResult(outputs[0], done.version, done.replayed, done.queued_seconds)
        if done.replayed:
            return result
        self._store.wait_durable(done.ticket)
        return result._replace(drift=_drift(done.before.module, done.after))

    def _update(
        self,
        step: Callable[[_Snapshot], nn.Module],
        expected_version: Optional[int] = None,
        request_id: str = "",
        still_wanted: Optional[Callable[[], bool]] = None,
        waited_from: float = 0.0,
    ) -> "_Committed":
        """Under the write lock: compute the next state with `step(current)` and commit it.
        A shared store may answer that another replica moved the layer on: then its state
        is installed and `step` runs again on it (each retry means another replica made
        progress, so this ends; the bound only guards against a pathological store)."""
        with self._write_lock:
            queued = time.perf_counter() - waited_from if waited_from else 0.0
            for _ in range(_MAX_COMMIT_ATTEMPTS):
                self._check_live()
                snap = self._snapshot
                self._check_expected(snap, expected_version)
                work = step(snap)
                if request_id and request_id in self._ids:
                    return _Committed(self._ids[request_id], None, snap, work, queued, replayed=True)
                if still_wanted is not None and not still_wanted():
                    raise RequestAbandoned("request cancelled or past its deadline; state unchanged")
                try:
                    version, ticket = self._commit(snap, work, request_id)
                except StaleState as stale:
                    # The store's word goes, even when older than this copy (it lost writes).
                    self._install(stale.record, force=True)
                    continue
                except AlreadyApplied as done:
                    applied = StateVersion(done.version, done.num_batches_tracked)
                    return _Committed(applied, None, snap, work, queued, replayed=True)
                except (LayerNotFound, Superseded):
                    self.deleted = True  # the registry fetches the layer again on the next request
                    raise
                return _Committed(version, ticket, snap, work, queued)
        raise VersionConflict(
            f"layer {self.name!r} changed {_MAX_COMMIT_ATTEMPTS} times while this update was computed; "
            "nothing was applied, retry"
        )

    def install(self, record: LayerRecord, refetch: Callable[[], Optional[tuple[int, LayerRecord]]]) -> None:
        """Adopt the state another replica committed (shared stores only). A record older
        than this copy means either a fetch that raced this replica's own commit, or a store
        that lost writes: under the write lock (no commit of ours can race) `refetch()`
        tells which, and the store's state is taken."""
        with self._write_lock:
            if record.version < self._snapshot.version.version:
                found = refetch()
                if found is None or found[0] != self.incarnation:
                    return  # deleted or created again: the registry's business
                record = found[1]
                self._install(record, force=record.version != self._snapshot.version.version)
            else:
                self._install(record)

    def _install(self, record: LayerRecord, force: bool = False) -> None:
        snap = self._snapshot
        if force or record.version > snap.version.version:
            work = self._loaded(snap.module, record.state)
            self._snapshot = _Snapshot(work, _state_version(work, record.version))

    def _run(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The output stays on the layer's device; the codec moves it when encoding."""
        try:
            if x.device != self.device:
                x = x.to(self.device)
            with torch.no_grad():
                return module(x)
        except _OUT_OF_MEMORY:
            raise  # not the caller's input: INTERNAL, logged
        except (RuntimeError, ValueError) as e:
            # Shape and dtype checks torch makes beyond ours (e.g. mixed dtypes on CPU).
            raise InvalidInput(
                f"{self.kind} layer {self.name!r} ({self.config.args['dtype']}) rejected input "
                f"{tuple(x.shape)} {str(x.dtype).removeprefix('torch.')}: {e}"
            ) from None

    def _check_live(self) -> None:
        if self.deleted:
            raise LayerNotFound(f"layer {self.name!r} not found (deleted)")

    def _check_expected(self, snap: _Snapshot, expected_version: Optional[int]) -> None:
        if expected_version is not None and snap.version.version != expected_version:
            raise VersionConflict(
                f"layer {self.name!r} is at version {snap.version.version}, not the expected "
                f"{expected_version}; re-read its state and retry"
            )

    def _commit(self, snap: _Snapshot, work: nn.Module, request_id: str = "") -> tuple[StateVersion, Any]:
        """Publish `work` as the next state and record it in the store (caller holds the
        write lock); returns the new version and the store's durability ticket."""
        version = _state_version(work, snap.version.version + 1)
        new = _Snapshot(work, version)
        if self._store.shared:
            # The store decides: publish only what it accepted.
            store: Any = self._store
            store.commit(self._make_record(new, (), True), self.incarnation, snap.version.version, request_id, self._window)
            self._remember(request_id, version)
            self._snapshot = new
            return version, None
        self._remember(request_id, version)
        self._snapshot = new
        try:
            ids = ((request_id, version.version, version.num_batches_tracked),) if request_id else ()
            ticket = self._store.append(self._make_record(new, ids, full_ids=False))
        except BaseException:
            self._snapshot = snap  # not logged, so not committed
            self._ids.pop(request_id, None)
            raise
        return version, ticket

    def _remember(self, request_id: str, version: StateVersion) -> None:
        if request_id:
            self._ids[request_id] = version
            while len(self._ids) > self._window:
                self._ids.popitem(last=False)

    def mark_deleted(self) -> Any:
        """Stop accepting changes and log the deletion; returns the durability ticket."""
        with self._write_lock:
            self._check_live()
            self.deleted = True
            return self._store.append(LayerRecord(name=self.name, deleted=True))

    def _check_input(self, x: torch.Tensor, train: bool) -> None:
        shape = tuple(x.shape)
        if x.dtype not in _FLOAT_TYPES:
            raise InvalidInput(f"input dtype {x.dtype} is not a floating type; expected float32, float64, float16 or bfloat16")
        if x.numel() == 0:
            raise InvalidInput(f"input {shape} is empty")
        _check_shape(self.config, shape)
        if train and not self.has_running_stats and not bool(torch.isfinite(x).all()):
            # Layers with running statistics check the updated statistics instead (O(C),
            # not a pass over the batch): any NaN/Inf in a channel makes its mean or
            # variance non-finite. See _check_finite_stats.
            raise InvalidInput(_NON_FINITE)
        if train and self.config.family == "batch_norm" and x.numel() // x.shape[1] <= 1:
            raise InvalidInput(
                f"BatchNorm in train mode needs more than 1 value per channel, got input {shape}"
            )

    # -- state changes ---------------------------------------------------------------
    def load_state(self, state: Mapping[str, torch.Tensor], expected_version: Optional[int] = None) -> StateVersion:
        """Replace the state, strictly like module.load_state_dict(strict=True)."""
        done = self._update(lambda snap: self._loaded(snap.module, state), expected_version)
        self._store.wait_durable(done.ticket)
        return done.version

    def _loaded(self, module: nn.Module, state: Mapping[str, torch.Tensor]) -> nn.Module:
        """A copy of `module` holding `state` (validated: keys, shapes, dtypes, finite)."""
        current = _state_of(module)
        missing = sorted(set(current) - set(state))
        unexpected = sorted(set(state) - set(current))
        if missing or unexpected:
            raise InvalidInput(
                f"state keys do not match {self.kind}: missing {missing}, unexpected {unexpected}; "
                f"expected exactly {sorted(current)}"
            )
        params = {}
        buffers = {}
        for key, old in current.items():
            new = state[key]
            if tuple(new.shape) != tuple(old.shape):
                raise InvalidInput(f"state[{key!r}] has shape {tuple(new.shape)}, expected {tuple(old.shape)}")
            if old.is_floating_point() != new.is_floating_point():
                raise InvalidInput(f"state[{key!r}] has dtype {new.dtype}, expected {old.dtype}")
            value = new.to(device=old.device, dtype=old.dtype, copy=True)
            # Checked after the cast: a finite float64 can overflow a float16 layer.
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                raise InvalidInput(f"state[{key!r}] contains NaN or Inf (in the layer's dtype {old.dtype})")
            if key == "num_batches_tracked" and int(value) < 0:
                raise InvalidInput(f"state['num_batches_tracked'] must be >= 0, got {int(value)}")
            if key in module._parameters:
                params[key] = nn.Parameter(value, requires_grad=False)
            else:
                buffers[key] = value
        work = _shallow_copy(module)
        object.__setattr__(work, "_parameters", {**module._parameters, **params})
        object.__setattr__(work, "_buffers", {**module._buffers, **buffers})
        return work

    def reset_running_stats(self, expected_version: Optional[int] = None) -> StateVersion:
        if not self.has_running_stats:
            raise NoRunningStats(f"layer {self.name!r} ({self.kind}) keeps no running statistics")

        def step(snap: _Snapshot) -> nn.Module:
            work = _writable_copy(snap.module)
            work.reset_running_stats()
            return work

        done = self._update(step, expected_version)
        self._store.wait_durable(done.ticket)
        return done.version


def _check_shape(config: LayerConfig, shape: tuple[int, ...]) -> None:
    """Reject ranks and sizes torch would reject, with a message naming what's expected."""
    kind, args, fam = config.kind, config.args, config.family
    rank = len(shape)
    if fam in ("batch_norm", "instance_norm"):
        d = spatial_dims(kind)
        ranks = (d + 1, d + 2) if (fam == "instance_norm" or d == 1) else (d + 2,)
        if rank not in ranks:
            layout = {1: "(N, C) or (N, C, L)", 2: "(N, C, H, W)", 3: "(N, C, D, H, W)"}[d]
            if fam == "instance_norm":
                layout = {1: "(C, L) or (N, C, L)", 2: "(C, H, W) or (N, C, H, W)", 3: "(C, D, H, W) or (N, C, D, H, W)"}[d]
            raise InvalidInput(f"{kind} expects input of rank {' or '.join(map(str, ranks))} {layout}, got {shape}")
        channel_dim = 1 if fam == "batch_norm" else rank - d - 1
        strict = fam == "batch_norm" or args["affine"] or args["track_running_stats"]
        if strict and shape[channel_dim] != args["num_features"]:
            raise InvalidInput(
                f"{kind} expects {args['num_features']} channels at dim {channel_dim}, got input {shape}"
            )
    elif fam == "group_norm":
        if rank < 2 or shape[1] != args["num_channels"]:
            raise InvalidInput(f"GroupNorm expects input (N, {args['num_channels']}, *), got {shape}")
    else:
        norm = tuple(args["normalized_shape"])
        if shape[rank - len(norm):] != norm or rank < len(norm):
            raise InvalidInput(f"{kind} expects input whose trailing dims are {norm}, got {shape}")
