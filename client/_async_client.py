"""The asyncio normserve client (grpc.aio): the twin of the sync `Client`."""

from __future__ import annotations

import asyncio
import collections
import time
from typing import Any, AsyncGenerator, AsyncIterable, AsyncIterator, Iterable, Mapping, Optional, Sequence, TypeVar, Union

import grpc
import grpc.aio

from . import _core as core
from . import _packing, _shm
from ._proto import normserve_pb2 as pb
from ._core import DEFAULT_MAX_MESSAGE_BYTES, DEFAULT_TARGET, CompressionArg, CredentialsArg, Metadata
from ._retry import DEFAULT_RETRY, Attempts, RetryPolicy, deadline_after, remaining
from .errors import DeadlineExceededError, NormServeError, UnavailableError, from_rpc_error
from .types import LayerInfo, NormalizeResult, StateVersion

__all__ = ["AsyncClient"]

R = TypeVar("R")
T = TypeVar("T")

_PROBE_TIMEOUT = 5.0
_CLOSE_TIMEOUT = 2.0


class AsyncClient:
    """asyncio client for a normserve server: the same methods, arguments, results and
    errors as `Client`, awaited; streams are async iterators.

    >>> async with AsyncClient("127.0.0.1:50051", timeout=10) as c:
    ...     await c.create_layer("bn", "BatchNorm2d", num_features=3)
    ...     y = await c.normalize("bn", x, mode="train")
    ...     async for out in c.normalize_stream("bn", batches, mode="eval"):
    ...         ...

    It may be created anywhere; its channel opens on first use and belongs to that event
    loop (use one AsyncClient per loop). The constructor
    arguments are those of `Client` (see there); `interceptors` are grpc.aio client
    interceptors. `module()` and `offload()` exist on the sync `Client` only: a
    torch.nn.Module's forward is synchronous.
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
        self._channel_args: dict[str, Any] = dict(
            options=channel_options,
            compression=core.compression(compression),
            interceptors=list(interceptors) or None,
        )
        self._credentials = core.channel_credentials(credentials)
        # The channel is created on first use, inside the event loop that uses it (grpc.aio
        # binds a channel to the loop it was created on), so an AsyncClient can be built
        # anywhere -- at import time, in __init__ of an app -- and used in one loop.
        self._channel: Optional[grpc.aio.Channel] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._unary: dict[str, grpc.aio.UnaryUnaryMultiCallable[Any, Any]] = {}
        self._stream: Optional[grpc.aio.StreamStreamMultiCallable[Any, Any]] = None
        self._packed_stream: Optional[grpc.aio.StreamStreamMultiCallable[Any, Any]] = None
        self._packed: Optional[bool] = None  # whether the server has NormalizeStreamPacked, once known
        self._closed = False

    def _connect(self) -> grpc.aio.Channel:
        """The channel, created on first use in the running loop."""
        loop = asyncio.get_running_loop()
        if self._closed:
            raise RuntimeError("this AsyncClient is closed")
        if self._channel is not None:
            if loop is not self._loop:
                raise RuntimeError("an AsyncClient is bound to the event loop it was first used in; create one per loop")
            return self._channel
        if self._credentials is None:
            channel = grpc.aio.insecure_channel(self.target, **self._channel_args)
        else:
            channel = grpc.aio.secure_channel(self.target, self._credentials, **self._channel_args)
        self._unary = {
            name: channel.unary_unary(m.path, request_serializer=m.serialize, response_deserializer=m.deserialize)
            for name, m in core.METHODS.items()
            if name in core.UNARY_METHODS
        }
        self._unary[core.HEALTH_CHECK] = channel.unary_unary(core.HEALTH_METHOD.path)
        stream, packed = core.METHODS[core.STREAM_METHOD], core.METHODS[core.PACKED_STREAM_METHOD]
        self._stream = channel.stream_stream(
            stream.path, request_serializer=stream.serialize, response_deserializer=stream.deserialize
        )
        self._packed_stream = channel.stream_stream(
            packed.path, request_serializer=packed.serialize, response_deserializer=packed.deserialize
        )
        self._channel, self._loop = channel, loop
        return channel

    # -- lifecycle -----------------------------------------------------------------------
    async def close(self) -> None:
        """Close the channel; calls in flight are cancelled. Closing twice is harmless.
        Shared-memory segments are unregistered and unlinked first."""
        if self._segments is not None:
            segments = self._segments.drain()
            if self._channel is not None and not self._closed:
                await self._drive(core.release_segments(segments), _CLOSE_TIMEOUT, None)
            else:
                _shm.destroy_all(segments)
        self._closed = True
        if self._channel is not None:
            channel, self._channel = self._channel, None
            await channel.close()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"AsyncClient({self.target!r})"

    # -- the one call path -----------------------------------------------------------------
    async def _run(self, call: core.Call[R], timeout: Optional[float], metadata: Optional[Metadata]) -> R:
        timeout = self.timeout if timeout is None else timeout
        attempts = Attempts(self.retry if call.retry else None, timeout)
        md = core.merge_metadata(self.metadata, metadata)
        self._connect()
        rpc = self._unary[call.method]
        while True:
            try:
                response = await rpc(call.request, timeout=attempts.start(), metadata=md)
            except grpc.RpcError as e:
                err = from_rpc_error(e)
            else:
                return call.decode(response)
            if attempts.retried and call.reconcile is not None:
                outcome = call.reconcile(attempts.give_up(err))
                if isinstance(outcome, core.Done):
                    return outcome.value
                if outcome is not None:
                    return await self._run(outcome, timeout, metadata)
            delay = attempts.next_delay(err)
            if delay is None:
                raise attempts.give_up(err)
            await asyncio.sleep(delay)

    async def _drive(self, program: core.Program[R], timeout: Optional[float], metadata: Optional[Metadata]) -> R:
        result: Any = None
        error: Optional[NormServeError] = None
        while True:
            try:
                call = program.send(result) if error is None else program.throw(error)
            except StopIteration as stop:
                value: R = stop.value
                return value
            try:
                result, error = await self._run(call, timeout, metadata), None
            except NormServeError as e:
                result, error = None, e
            except BaseException:  # e.g. cancelled: the program gives back what it holds now
                program.close()
                raise

    # -- health ----------------------------------------------------------------------------
    async def health(
        self, service: str = "", *, timeout: Optional[float] = None, metadata: Optional[Metadata] = None
    ) -> str:
        """The server's grpc.health.v1 status: "SERVING", "NOT_SERVING", "UNKNOWN" or
        "SERVICE_UNKNOWN". `service` "" asks about the whole server, or name one (e.g.
        "normserve.v1.NormService"); an unknown one raises NotFoundError. Not retried."""
        probe = timeout if timeout is not None else (self.timeout if self.timeout is not None else _PROBE_TIMEOUT)
        return await self._run(core.health(service), probe, metadata)

    async def ready(
        self, service: str = "", *, timeout: Optional[float] = None, wait: float = 0.0, metadata: Optional[Metadata] = None
    ) -> bool:
        """True when the server (or `service`) reports SERVING through the health service.

        An unreachable server is not ready (False, no exception). With `wait` (seconds),
        keep probing until it is ready or `wait` has passed. `timeout` bounds each probe.
        Other failures (e.g. UNAUTHENTICATED, an unknown `service`) raise."""
        deadline = time.monotonic() + max(wait, 0.0)
        while True:
            try:
                if await self.health(service, timeout=timeout, metadata=metadata) == "SERVING":
                    return True
            except (UnavailableError, DeadlineExceededError):
                pass
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            await asyncio.sleep(min(0.1, left))

    # -- layers --------------------------------------------------------------------------
    async def create_layer(
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
        return await self._run(core.create_layer(name, kind, state, kwargs), timeout, metadata)

    async def import_state(
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
        """Create or update a layer from a PyTorch checkpoint (needs torch); as
        `Client.import_state`. The checkpoint is read in a worker thread."""
        state = await asyncio.to_thread(core.load_checkpoint, source, prefix)
        return await self._drive(core.import_state(name, state, kind, kwargs), timeout, metadata)

    async def get_layer(
        self, name: str, *, timeout: Optional[float] = None, metadata: Optional[Metadata] = None
    ) -> LayerInfo:
        """The layer's kind, full constructor arguments and state version."""
        return await self._run(core.get_layer(name), timeout, metadata)

    async def list_layers(
        self, prefix: str = "", *, timeout: Optional[float] = None, metadata: Optional[Metadata] = None
    ) -> list[LayerInfo]:
        """Layers sorted by name, optionally only those whose name starts with `prefix`."""
        return await self._run(core.list_layers(prefix), timeout, metadata)

    async def delete_layer(
        self, name: str, *, timeout: Optional[float] = None, metadata: Optional[Metadata] = None
    ) -> None:
        """Delete a layer and its state. Retry-safe: a retry that finds the layer gone
        (an earlier attempt deleted it, its answer lost) counts as success."""
        await self._run(core.delete_layer(name), timeout, metadata)

    # -- state ---------------------------------------------------------------------------
    async def get_state(
        self,
        name: str,
        *,
        as_torch: bool = False,
        timeout: Optional[float] = None,
        metadata: Optional[Metadata] = None,
    ) -> dict[str, Any]:
        """The layer's state_dict (same keys as the torch module's): numpy arrays, or torch
        tensors with `as_torch=True` (needed for bfloat16 layers)."""
        return await self._run(core.get_state(name, as_torch), timeout, metadata)

    async def load_state(
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
        version; otherwise AbortedError is raised and nothing changes."""
        return await self._run(core.load_state(name, state, expected_version), timeout, metadata)

    async def reset_running_stats(
        self,
        name: str,
        *,
        expected_version: Optional[int] = None,
        timeout: Optional[float] = None,
        metadata: Optional[Metadata] = None,
    ) -> StateVersion:
        """Reset running statistics (compare-and-set with `expected_version`, as in load_state)."""
        return await self._run(core.reset_running_stats(name, expected_version), timeout, metadata)

    # -- normalization -------------------------------------------------------------------
    async def normalize(
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
        result = await self.normalize_result(layer, x, mode, request_id=request_id, timeout=timeout, metadata=metadata)
        return result.output

    async def normalize_result(
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
            program = core.normalize_shared(self._segments, layer, x, mode, request_id)
            return await self._drive(program, timeout, metadata)
        return await self._run(core.normalize(layer, x, mode, request_id), timeout, metadata)

    async def normalize_stream(
        self,
        layer: str,
        batches: Union[Iterable[Any], AsyncIterable[Any]],
        mode: str = "eval",
        *,
        timeout: Optional[float] = None,
        metadata: Optional[Metadata] = None,
    ) -> AsyncGenerator[Any, None]:
        """Stream batches (an iterable or async iterable) through one bidirectional call;
        an async iterator of the outputs, in order. Semantics as `Client.normalize_stream`:
        a rejected batch raises its error (with `.sequence`); `timeout` bounds the whole
        stream (the client's default timeout does not apply); streams are not retried."""
        results = self.normalize_stream_results(layer, batches, mode, timeout=timeout, metadata=metadata)
        try:
            async for result in results:
                yield result.output
        finally:
            await results.aclose()  # cancels the call when the caller stops early

    async def normalize_stream_results(
        self,
        layer: str,
        batches: Union[Iterable[Any], AsyncIterable[Any]],
        mode: str = "eval",
        *,
        timeout: Optional[float] = None,
        metadata: Optional[Metadata] = None,
    ) -> AsyncGenerator[NormalizeResult[Any], None]:
        """Like `normalize_stream`, yielding NormalizeResult (output + state version)."""
        mode_value = core.mode_value(mode)
        md = core.merge_metadata(self.metadata, metadata)
        sent: collections.deque[Any] = collections.deque()  # (device, segment) per request sent

        async def prepared() -> AsyncIterator[_packing.Item]:
            async for x in _aiter(batches):
                request, segment = await self._stream_request(layer, mode_value, x, metadata)
                yield request, core.torch_device(x), segment

        self._connect()
        assert self._stream is not None and self._packed_stream is not None
        items = prepared()
        try:
            first: Optional[_packing.Item] = await items.__anext__()
        except StopAsyncIteration:
            first = None
        local_error: list[BaseException] = []
        deadline = deadline_after(timeout)
        pump: Optional[_packing.AsyncPump[_packing.Item]] = None
        replay: _packing.Replay[_packing.Item] = _packing.Replay()
        if (first is None or _packing.packs(first[0])) and await self._packs_supported(md, timeout):  # see _packing
            pump = _packing.AsyncPump(_prepend(first, items), _packing.measure, _packing.discarder(self._segments))
            messages = self._packs(pump, sent, local_error, replay)
            call = self._packed_stream(messages, timeout=remaining(deadline), metadata=md)
        else:
            messages = self._requests(_prepend(first, items), sent, local_error)
            call = self._stream(messages, timeout=timeout, metadata=md)
        try:
            try:
                async for result in self._answers(call, pump is not None, sent, replay):
                    yield result
            except grpc.RpcError as e:
                if pump is None or not replay.usable(e, masked=True):
                    raise
                # As in Client: a replica without NormalizeStreamPacked; NormalizeStream instead.
                pump.requeue(lambda: replay.refuse(sent))
                messages = self._unpacked(pump, sent, local_error)
                call = self._stream(messages, timeout=remaining(deadline), metadata=md)
                async for result in self._answers(call, False, sent, replay):
                    yield result
        except grpc.RpcError as e:
            err = from_rpc_error(e)
            if local_error and err.code == grpc.StatusCode.CANCELLED:
                raise local_error[0] from None  # the local error is what cancelled the call
            raise err from None
        finally:
            call.cancel()
            if pump is not None:
                await pump.aclose()
            core.settle_unanswered(self._segments, sent)
        if local_error:
            raise local_error[0]

    async def _answers(
        self, call: Any, packed: bool, sent: "collections.deque[Any]", replay: "_packing.Replay[Any]"
    ) -> AsyncIterator[NormalizeResult[Any]]:
        async for response in call:
            replay.answered()
            for answer in response.responses if packed else (response,):
                yield core.stream_answer(answer, sent, self._segments)

    @staticmethod
    async def _requests(
        items: AsyncIterator[Any], sent: "collections.deque[Any]", local_error: list[BaseException]
    ) -> AsyncIterator[Any]:
        """NormalizeStream's messages. Like the sync client: a local error (e.g. an
        unsupported dtype) ends the request stream; the answers to what was sent are read,
        then it is raised."""
        try:
            async for request, device, segment in items:
                sent.append((device, segment))
                yield request
        except Exception as e:  # noqa: BLE001 - re-raised in normalize_stream_results
            local_error.append(e)

    @staticmethod
    async def _packs(
        pump: "_packing.AsyncPump[_packing.Item]",
        sent: "collections.deque[Any]",
        local_error: list[BaseException],
        replay: "_packing.Replay[_packing.Item]",
    ) -> AsyncIterator[Any]:
        """NormalizeStreamPacked's messages: what the pump has ready, one pack at a time."""
        while taken := await pump.take(stop=lambda: replay.refused):
            replay.record(taken)
            _packing.note_sent(sent, taken)
            yield _packing.pack([request for request, _, _ in taken])
        if pump.error is not None and not replay.refused:
            local_error.append(pump.error)

    @staticmethod
    async def _unpacked(
        pump: "_packing.AsyncPump[_packing.Item]", sent: "collections.deque[Any]", local_error: list[BaseException]
    ) -> AsyncIterator[Any]:
        """As Client._unpacked."""
        while taken := await pump.take():
            _packing.note_sent(sent, taken)
            for request, _, _ in taken:
                yield request
        if pump.error is not None:
            local_error.append(pump.error)

    async def _packs_supported(self, metadata: tuple[tuple[str, str], ...], timeout: Optional[float]) -> bool:
        """Whether the server has NormalizeStreamPacked (as Client._packs_supported)."""
        if self._packed is None:
            assert self._packed_stream is not None
            probe = min(timeout or _PROBE_TIMEOUT, _PROBE_TIMEOUT)
            try:
                async for _ in self._packed_stream(_no_messages(), timeout=probe, metadata=metadata):
                    pass
                self._packed = True
            except grpc.RpcError as e:
                if e.code() != grpc.StatusCode.UNIMPLEMENTED:
                    return True  # not an answer to the question: the stream itself will meet it
                self._packed = False
        return self._packed

    async def _stream_request(
        self, layer: str, mode: "pb.Mode", x: Any, metadata: Optional[Metadata]
    ) -> tuple[Any, Optional[_shm.Segment]]:
        """One stream message, and its shared-memory segment (None: the bytes travel)."""
        if self._segments is None:
            return core.stream_request(layer, mode, x), None
        return await self._drive(core.shared_stream_request(self._segments, layer, mode, x), None, metadata)


async def _aiter(batches: Union[Iterable[Any], AsyncIterable[Any]]) -> AsyncIterator[Any]:
    if isinstance(batches, AsyncIterable):
        async for x in batches:
            yield x
    else:
        for x in batches:
            yield x


async def _prepend(first: Optional[T], rest: AsyncIterator[T]) -> AsyncIterator[T]:
    """`first` (when not None), then `rest`."""
    if first is None:
        return
    yield first
    async for item in rest:
        yield item


async def _no_messages() -> AsyncIterator[Any]:
    return
    yield

