"""The synchronous normserve client."""

from __future__ import annotations

import collections
import itertools
import time
from typing import TYPE_CHECKING, Any, Generator, Iterable, Iterator, Mapping, Optional, Sequence, TypeVar, Union

import grpc

from . import _core as core
from . import _packing, _shm
from ._proto import normserve_pb2 as pb
from ._core import DEFAULT_MAX_MESSAGE_BYTES, DEFAULT_TARGET, CompressionArg, CredentialsArg, Metadata
from ._retry import DEFAULT_RETRY, Attempts, RetryPolicy, deadline_after, remaining
from .errors import DeadlineExceededError, NormServeError, UnavailableError, from_rpc_error
from .types import LayerInfo, NormalizeResult, StateVersion

if TYPE_CHECKING:
    from .nn import LayerSelector, RemoteNorm

__all__ = ["Client", "DEFAULT_MAX_MESSAGE_BYTES", "DEFAULT_TARGET", "DEFAULT_RETRY"]

R = TypeVar("R")

# A health probe's deadline when neither the call nor the client sets one.
_PROBE_TIMEOUT = 5.0
# Longest close() waits for each shared-memory region to be unregistered.
_CLOSE_TIMEOUT = 2.0


class Client:
    """Synchronous client for a normserve server.

    >>> with Client("127.0.0.1:50051", timeout=10) as c:
    ...     c.create_layer("bn", "BatchNorm2d", num_features=3)
    ...     y = c.normalize("bn", x, mode="train")

    Arrays in, arrays out: numpy in gives numpy out; torch in gives torch out on the
    input's device (CPU or CUDA; the dtype is kept). torch is optional. Every failed call
    raises a `normserve.client.errors.NormServeError` subclass carrying the gRPC `code`.

    Arguments (all but `target` keyword-only):

    - `target`: "host:port" of the server.
    - `timeout`: default deadline of each call in seconds, retries included (None: no
      deadline); every method also takes its own `timeout`. Streams ignore this default.
    - `metadata`: (key, value) pairs sent with every call (e.g. an authorization token);
      methods take more with `metadata=`.
    - `credentials`: None for plaintext, True for TLS with the system's roots, or
      grpc.ChannelCredentials (see `tls_credentials(ca_cert, cert, key)`).
    - `compression`: "gzip", "deflate" or a grpc.Compression, for every call.
    - `retry`: a `RetryPolicy` (default: 5 attempts with exponential backoff and jitter
      for UNAVAILABLE / DEADLINE_EXCEEDED), or None to never retry.
    - `keepalive_time` / `keepalive_timeout` (seconds): send HTTP/2 pings on an idle
      connection and drop it when a ping isn't answered in time; with
      `keepalive_without_calls` also when no call is open. Keep `keepalive_time` at or
      above what the server permits (gRPC's default: 5 minutes) or it closes the connection.
    - `max_message_bytes`: largest message sent or received (default 64 MiB, the server's).
    - `interceptors`: grpc client interceptors (e.g. for tracing or auth).
    - `options`: raw gRPC channel arguments; they win over the settings above.
    - `shared_memory`: pass tensors through POSIX shared memory instead of gRPC messages
      when the server runs on the same host (see "Shared memory" in the README): same
      results, far fewer copies for big tensors. The client creates, registers and
      unlinks its segments itself; when the server can't use them (another host, the
      feature off, its limits reached) calls go over gRPC as usual (one RuntimeWarning).
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        timeout: Optional[float] = None,
        metadata: Optional[Metadata] = None,
        credentials: CredentialsArg = None,
        compression: CompressionArg = None,
        retry: Optional[RetryPolicy] = DEFAULT_RETRY,
        keepalive_time: Optional[float] = None,
        keepalive_timeout: Optional[float] = None,
        keepalive_without_calls: bool = False,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        interceptors: Sequence[Any] = (),
        options: Sequence[tuple[str, Any]] = (),
        shared_memory: bool = False,
    ):
        self.target = target
        self._segments = _shm.SegmentPool() if shared_memory else None
        self.timeout = timeout
        self.metadata: tuple[tuple[str, str], ...] = tuple(metadata or ())
        self.retry = retry
        channel_options = core.channel_options(
            max_message_bytes=max_message_bytes,
            keepalive_time=keepalive_time,
            keepalive_timeout=keepalive_timeout,
            keepalive_without_calls=keepalive_without_calls,
            options=options,
        )
        creds = core.channel_credentials(credentials)
        comp = core.compression(compression)
        if creds is None:
            self._channel = grpc.insecure_channel(target, options=channel_options, compression=comp)
        else:
            self._channel = grpc.secure_channel(target, creds, options=channel_options, compression=comp)
        channel: grpc.Channel = self._channel
        if interceptors:
            channel = grpc.intercept_channel(channel, *interceptors)
        self._unary: dict[str, grpc.UnaryUnaryMultiCallable[Any, Any]] = {
            name: channel.unary_unary(m.path, request_serializer=m.serialize, response_deserializer=m.deserialize)
            for name, m in core.METHODS.items()
            if name in core.UNARY_METHODS
        }
        self._unary[core.HEALTH_CHECK] = channel.unary_unary(core.HEALTH_METHOD.path)
        stream, packed = core.METHODS[core.STREAM_METHOD], core.METHODS[core.PACKED_STREAM_METHOD]
        self._stream: grpc.StreamStreamMultiCallable[Any, Any] = channel.stream_stream(
            stream.path, request_serializer=stream.serialize, response_deserializer=stream.deserialize
        )
        self._packed_stream: grpc.StreamStreamMultiCallable[Any, Any] = channel.stream_stream(
            packed.path, request_serializer=packed.serialize, response_deserializer=packed.deserialize
        )
        self._packed: Optional[bool] = None  # whether the server has NormalizeStreamPacked, once known

    # -- lifecycle -----------------------------------------------------------------------
    def close(self) -> None:
        """Close the channel; calls in flight are cancelled. Shared-memory segments are
        unregistered and unlinked first."""
        if self._segments is not None:
            self._drive(core.release_segments(self._segments.drain()), _CLOSE_TIMEOUT, None)
        self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Client({self.target!r})"

    # -- the one call path -----------------------------------------------------------------
    def _run(self, call: core.Call[R], timeout: Optional[float], metadata: Optional[Metadata]) -> R:
        timeout = self.timeout if timeout is None else timeout
        attempts = Attempts(self.retry if call.retry else None, timeout)
        md = core.merge_metadata(self.metadata, metadata)
        rpc = self._unary[call.method]
        while True:
            try:
                response = rpc(call.request, timeout=attempts.start(), metadata=md)
            except grpc.RpcError as e:
                err = from_rpc_error(e)
            else:
                return call.decode(response)
            if attempts.retried and call.reconcile is not None:
                outcome = call.reconcile(attempts.give_up(err))
                if isinstance(outcome, core.Done):
                    return outcome.value
                if outcome is not None:
                    return self._run(outcome, timeout, metadata)
            delay = attempts.next_delay(err)
            if delay is None:
                raise attempts.give_up(err)
            time.sleep(delay)

    def _drive(self, program: core.Program[R], timeout: Optional[float], metadata: Optional[Metadata]) -> R:
        result: Any = None
        error: Optional[NormServeError] = None
        while True:
            try:
                call = program.send(result) if error is None else program.throw(error)
            except StopIteration as stop:
                value: R = stop.value
                return value
            try:
                result, error = self._run(call, timeout, metadata), None
            except NormServeError as e:
                result, error = None, e
            except BaseException:  # e.g. cancelled: the program gives back what it holds now
                program.close()
                raise

    # -- health ----------------------------------------------------------------------------
    def health(self, service: str = "", *, timeout: Optional[float] = None, metadata: Optional[Metadata] = None) -> str:
        """The server's grpc.health.v1 status: "SERVING", "NOT_SERVING", "UNKNOWN" or
        "SERVICE_UNKNOWN". `service` "" asks about the whole server, or name one (e.g.
        "normserve.v1.NormService"); an unknown one raises NotFoundError. Not retried."""
        probe = timeout if timeout is not None else (self.timeout if self.timeout is not None else _PROBE_TIMEOUT)
        return self._run(core.health(service), probe, metadata)

    def ready(
        self, service: str = "", *, timeout: Optional[float] = None, wait: float = 0.0, metadata: Optional[Metadata] = None
    ) -> bool:
        """True when the server (or `service`) reports SERVING through the health service.

        An unreachable server is not ready (False, no exception). With `wait` (seconds),
        keep probing until it is ready or `wait` has passed. `timeout` bounds each probe.
        Other failures (e.g. UNAUTHENTICATED, an unknown `service`) raise."""
        deadline = time.monotonic() + max(wait, 0.0)
        while True:
            try:
                if self.health(service, timeout=timeout, metadata=metadata) == "SERVING":
                    return True
            except (UnavailableError, DeadlineExceededError):
                pass
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            time.sleep(min(0.1, left))

    # -- layers --------------------------------------------------------------------------
    def create_layer(
        self,
        name: str,
        kind: Union[str, Any],
        *,
        state: Optional[Mapping[str, Any]] = None,
        timeout: Optional[float] = None,
        metadata: Optional[Metadata] = None,
        **kwargs: Any,
    ) -> LayerInfo:
        """Create a layer from a torch class name and its constructor kwargs
        (`create_layer("bn", "BatchNorm2d", num_features=3, momentum=None)`), or from a
        local torch module, whose configuration and state_dict are copied. `state`: an
        initial state_dict (strict).

        Retry-safe: when the answer to an attempt is lost and the retry finds the name
        taken, the existing layer is compared with the request; the same kind and
        arguments mean the lost attempt created it, and its LayerInfo is returned. A
        different layer raises AlreadyExistsError as usual."""
        return self._run(core.create_layer(name, kind, state, kwargs), timeout, metadata)

    def import_state(
        self,
        name: str,
        source: Any,
        *,
        prefix: str = "",
        kind: Optional[str] = None,
        timeout: Optional[float] = None,
        metadata: Optional[Metadata] = None,
        **kwargs: Any,
    ) -> LayerInfo:
        """Create or update a layer from a PyTorch checkpoint (needs torch).

        `source` is a `.pt` path (loaded with weights_only=True), a state_dict, or a module;
        `prefix` picks one module's tensors out of a model's state_dict (e.g. "layer1.0.bn1").
        An existing layer gets the state (strict LoadState); otherwise `kind` is required and
        the layer is created with constructor kwargs inferred from the tensors (num_features,
        affine, track_running_stats, normalized_shape, dtype, bias); `kwargs` add or override
        them (e.g. eps, momentum, num_groups)."""
        state = core.load_checkpoint(source, prefix)
        return self._drive(core.import_state(name, state, kind, kwargs), timeout, metadata)

    def get_layer(self, name: str, *, timeout: Optional[float] = None, metadata: Optional[Metadata] = None) -> LayerInfo:
        """The layer's kind, full constructor arguments and state version."""
        return self._run(core.get_layer(name), timeout, metadata)

    def list_layers(
        self, prefix: str = "", *, timeout: Optional[float] = None, metadata: Optional[Metadata] = None
    ) -> list[LayerInfo]:
        """Layers sorted by name, optionally only those whose name starts with `prefix`."""
        return self._run(core.list_layers(prefix), timeout, metadata)

    def delete_layer(self, name: str, *, timeout: Optional[float] = None, metadata: Optional[Metadata] = None) -> None:
        """Delete a layer and its state. Retry-safe: a retry that finds the layer gone
        (an earlier attempt deleted it, its answer lost) counts as success."""
        self._run(core.delete_layer(name), timeout, metadata)

    # -- state ---------------------------------------------------------------------------
    def get_state(
        self,
        name: str,
        *,
        as_torch: bool = False,
        timeout: Optional[float] = None,
        metadata: Optional[Metadata] = None,
    ) -> dict[str, Any]:
        """The layer's state_dict (same keys as the torch module's): numpy arrays, or torch
        tensors with `as_torch=True` (needed for bfloat16 layers)."""
        return self._run(core.get_state(name, as_torch), timeout, metadata)

    def load_state(
        self,
        name: str,
        state: Mapping[str, Any],
        *,
        expected_version: Optional[int] = None,
        timeout: Optional[float] = None,
        metadata: Optional[Metadata] = None,
    ) -> StateVersion:
        """Replace the layer's state (strict: every key of its state_dict, matching shapes).

        With `expected_version`, the load happens only if the layer is still at that
        version; otherwise AbortedError is raised and nothing changes. (A retried load
        whose first answer was lost may then raise AbortedError although it was applied:
        re-read and compare, as after any AbortedError.)"""
        return self._run(core.load_state(name, state, expected_version), timeout, metadata)

    def reset_running_stats(
        self,
        name: str,
        *,
        expected_version: Optional[int] = None,
        timeout: Optional[float] = None,
        metadata: Optional[Metadata] = None,
    ) -> StateVersion:
        """Reset running statistics (compare-and-set with `expected_version`, as in load_state)."""
        return self._run(core.reset_running_stats(name, expected_version), timeout, metadata)

    # -- normalization -------------------------------------------------------------------
    def normalize(
        self,
        layer: str,
        x: Any,
        mode: str = "eval",
        *,
        request_id: str = "",
        timeout: Optional[float] = None,
        metadata: Optional[Metadata] = None,
    ) -> Any:
        """Run one batch through a server-side layer; `mode` is "train" or "eval".

        Returns numpy for numpy (or array-like) input, torch for torch input (on its device)."""
        return self.normalize_result(layer, x, mode, request_id=request_id, timeout=timeout, metadata=metadata).output

    def normalize_result(
        self,
        layer: str,
        x: Any,
        mode: str = "eval",
        *,
        request_id: str = "",
        timeout: Optional[float] = None,
        metadata: Optional[Metadata] = None,
    ) -> NormalizeResult[Any]:
        """Like `normalize`, also returning the state version the request read or produced.

        Train requests carry an idempotency id (a fresh UUID unless `request_id` is given),
        the same on every retry: the server applies it once, and answers a repeat with
        `replayed=True`."""
        if self._segments is not None:
            return self._drive(core.normalize_shared(self._segments, layer, x, mode, request_id), timeout, metadata)
        return self._run(core.normalize(layer, x, mode, request_id), timeout, metadata)

    def normalize_stream(
        self,
        layer: str,
        batches: Iterable[Any],
        mode: str = "eval",
        *,
        timeout: Optional[float] = None,
        metadata: Optional[Metadata] = None,
    ) -> Iterator[Any]:
        """Stream batches through one bidirectional call; yields outputs in order.

        Requests are sent as fast as `batches` yields them (several in flight). A batch the
        server rejects raises its error (with `.sequence`, its 0-based position) and ends
        the iteration. Batches before it were applied; batches after it that were already
        in flight may have been applied too (in order) before the stream was cancelled, and
        small batches are read from `batches` ahead of time (see the README: packed
        streams), so some after it may have been taken from the iterator.
        `timeout` bounds the whole stream; the client's default per-call timeout does not
        apply to streams. Streams are not retried, except that a packed stream refused by
        a server without NormalizeStreamPacked (before it ran anything) is sent again over
        NormalizeStream (see the README: packed streams).
        """
        results = self.normalize_stream_results(layer, batches, mode, timeout=timeout, metadata=metadata)
        try:
            for result in results:
                yield result.output
        finally:
            results.close()  # cancels the call when the caller stops early

    def normalize_stream_results(
        self,
        layer: str,
        batches: Iterable[Any],
        mode: str = "eval",
        *,
        timeout: Optional[float] = None,
        metadata: Optional[Metadata] = None,
    ) -> Generator[NormalizeResult[Any], None, None]:
        """Like `normalize_stream`, yielding NormalizeResult (output + state version)."""
        mode_value = core.mode_value(mode)
        md = core.merge_metadata(self.metadata, metadata)
        sent: collections.deque[Any] = collections.deque()  # (device, segment) per request sent

        def prepared() -> Iterator[_packing.Item]:
            for x in batches:
                request, segment = self._stream_request(layer, mode_value, x, metadata)
                yield request, core.torch_device(x), segment

        items = prepared()
        first = next(items, None)
        source = itertools.chain([] if first is None else [first], items)
        local_error: list[BaseException] = []
        deadline = deadline_after(timeout)
        pump: Optional[_packing.Pump[_packing.Item]] = None
        replay: _packing.Replay[_packing.Item] = _packing.Replay()
        if (first is None or _packing.packs(first[0])) and self._packs_supported(md, timeout):  # see _packing
            pump = _packing.Pump(source, _packing.measure, _packing.discarder(self._segments))
            messages = self._packs(pump, sent, local_error, replay)
            call = self._packed_stream(messages, timeout=remaining(deadline), metadata=md)
        else:
            call = self._stream(self._requests(source, sent, local_error), timeout=timeout, metadata=md)
        try:
            try:
                yield from self._answers(call, pump is not None, sent, replay)
            except grpc.RpcError as e:
                if pump is None or not replay.usable(e):
                    raise
                # A replica without NormalizeStreamPacked refused the stream before running
                # any of it: the same requests, and the rest, go over NormalizeStream.
                pump.requeue(lambda: replay.refuse(sent))
                messages = self._unpacked(pump, sent, local_error)
                call = self._stream(messages, timeout=remaining(deadline), metadata=md)
                yield from self._answers(call, False, sent, replay)
        except grpc.RpcError as e:
            err = from_rpc_error(e)
            if local_error and err.code == grpc.StatusCode.CANCELLED:
                raise local_error[0] from None  # the local error is what cancelled the call
            raise err from None
        finally:
            call.cancel()
            if pump is not None:
                pump.close()
            core.settle_unanswered(self._segments, sent)
        if local_error:
            raise local_error[0]

    def _answers(
        self, call: Any, packed: bool, sent: "collections.deque[Any]", replay: "_packing.Replay[Any]"
    ) -> Iterator[NormalizeResult[Any]]:
        for response in call:
            replay.answered()
            for answer in response.responses if packed else (response,):
                yield core.stream_answer(answer, sent, self._segments)

    @staticmethod
    def _requests(items: Iterator[Any], sent: "collections.deque[Any]", local_error: list[BaseException]) -> Iterator[Any]:
        """NormalizeStream's messages. gRPC consumes this on its own thread; an exception
        here would surface only as a CANCELLED call, so it is kept for the caller's thread."""
        try:
            for request, device, segment in items:
                sent.append((device, segment))
                yield request
        except GeneratorExit:  # gRPC closing the iterator: the call is over
            raise
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            local_error.append(e)

    @staticmethod
    def _packs(
        pump: "_packing.Pump[_packing.Item]",
        sent: "collections.deque[Any]",
        local_error: list[BaseException],
        replay: "_packing.Replay[_packing.Item]",
    ) -> Iterator[Any]:
        """NormalizeStreamPacked's messages: what the pump has ready, one pack at a time."""

        def record(taken: list[_packing.Item]) -> None:
            replay.record(taken)
            _packing.note_sent(sent, taken)

        while taken := pump.take(record, stop=lambda: replay.refused):
            yield _packing.pack([request for request, _, _ in taken])
        if pump.error is not None and not replay.refused:
            local_error.append(pump.error)

    @staticmethod
    def _unpacked(
        pump: "_packing.Pump[_packing.Item]", sent: "collections.deque[Any]", local_error: list[BaseException]
    ) -> Iterator[Any]:
        """NormalizeStream's messages for a stream the server refused packed: one request
        per message, from the pump (which holds the refused ones first)."""
        while taken := pump.take(lambda taken: _packing.note_sent(sent, taken)):
            yield from (request for request, _, _ in taken)
        if pump.error is not None:
            local_error.append(pump.error)

    def _packs_supported(self, metadata: tuple[tuple[str, str], ...], timeout: Optional[float]) -> bool:
        """Whether the server has NormalizeStreamPacked: one empty stream asks, once per
        client, within the stream's timeout (5 s at most); a server from before it answers
        UNIMPLEMENTED, and streams then go unpacked."""
        if self._packed is None:
            probe = min(timeout or _PROBE_TIMEOUT, _PROBE_TIMEOUT)
            try:
                for _ in self._packed_stream(iter(()), timeout=probe, metadata=metadata):
                    pass
                self._packed = True
            except grpc.RpcError as e:
                if e.code() != grpc.StatusCode.UNIMPLEMENTED:
                    return True  # not an answer to the question: the stream itself will meet it
                self._packed = False
        return self._packed

    def _stream_request(
        self, layer: str, mode: "pb.Mode", x: Any, metadata: Optional[Metadata]
    ) -> tuple[Any, Optional[_shm.Segment]]:
        """One stream message, and its shared-memory segment (None: the bytes travel)."""
        if self._segments is None:
            return core.stream_request(layer, mode, x), None
        return self._drive(core.shared_stream_request(self._segments, layer, mode, x), None, metadata)

    # -- torch.nn integration ----------------------------------------------------------------
    def module(self, name: str) -> "RemoteNorm":
        """A torch.nn.Module whose forward runs on server-side layer `name`: in train mode
        when the module is in training mode (`.train()`), else eval (`.eval()`). Usable in
        nn.Sequential; its state_dict() reads and load_state_dict() writes the server's
        state. Needs torch. See `normserve.client.nn.RemoteNorm`."""
        remote: RemoteNorm = _nn().RemoteNorm(self, name)
        return remote

    def offload(
        self,
        model: Any,
        prefix: str,
        *,
        layers: "LayerSelector" = None,
        if_exists: str = "error",
    ) -> dict[str, str]:
        """Move the normalization layers of a local torch model to the server, in place:
        each chosen layer is created on the server as `prefix + its qualified name`, with
        its configuration and current state, and replaced in `model` by a RemoteNorm.
        Returns {qualified name: server layer name}. See `normserve.client.nn.offload`."""
        placed: dict[str, str] = _nn().offload(model, self, prefix, layers=layers, if_exists=if_exists)
        return placed


def _nn() -> Any:
    """normserve.client.nn, with a clear error when torch is missing."""
    try:
        from . import nn
    except ImportError as e:
        raise ImportError(f"remote torch modules need torch (pip install torch): {e}") from e
    return nn

