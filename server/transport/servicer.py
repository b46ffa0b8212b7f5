"""NormService servicer: decode -> call the engine -> encode. Errors map in one place
(transport.errors); every request and every stream message is measured."""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import time
from time import monotonic, perf_counter
from typing import Any, Callable, Iterator, Optional, Union

import grpc

from google.protobuf.message import DecodeError

from normserve.client import codec, wire
from normserve.client.codec import CodecError
from normserve.client._proto import normserve_pb2 as pb
from normserve.client._proto import normserve_pb2_grpc as pb_grpc

from ..engine import EvalBatching, ForwardResult, InvalidInput, Layer, Registry
from ..metrics import Metrics
from ..shm import Region, SharedMemoryManager, ShmForbidden
from . import convert
from .auth import Action, Authorizer, Principal, Unauthenticated
from .errors import status_for

log = logging.getLogger("normserve.requests")

# NormalizeStreamPacked: more requests in one pack than this fail the stream (a pack's
# requests are answered together, so one huge pack would hold a worker for its whole run).
MAX_PACK_REQUESTS = 1024

_MODES = {pb.MODE_UNSPECIFIED: "eval", pb.MODE_EVAL: "eval", pb.MODE_TRAIN: "train"}


def _mode(request: pb.NormalizeRequest) -> str:
    try:
        return _MODES[request.mode]
    except KeyError:
        raise InvalidInput(f"unknown mode {request.mode}; expected MODE_TRAIN or MODE_EVAL") from None


def _expected(request: Any) -> Optional[int]:
    """The compare-and-set version of a LoadState/ResetRunningStats request, if any."""
    return request.expected_version if request.HasField("expected_version") else None


def _measured(method: Callable[..., Any]) -> Callable[..., Any]:
    """Time a unary RPC, count it by status code, and turn exceptions into statuses."""
    name = method.__name__

    @functools.wraps(method)
    def wrapper(self: "NormServicer", request: Any, context: grpc.ServicerContext) -> Any:
        normalize = name == "Normalize" and not isinstance(request, Undecodable)
        mode = _MODES.get(request.mode, "invalid") if normalize else "none"
        request_id = request.request_id if normalize else ""
        in_flight = self._metrics.in_flight.labels(name)
        in_flight.inc()
        start = perf_counter()
        code = "OK"
        try:
            if isinstance(request, Undecodable):
                raise request.error()
            return method(self, request, context)
        except Exception as exc:
            status, message = status_for(exc, name)
            code = status.name
            context.abort(status, message)
        finally:
            in_flight.dec()
            seconds = perf_counter() - start
            self._metrics.observe_request(name, mode, code, seconds, request_id)
            layer = getattr(request, "layer", "") or getattr(request, "name", "")
            _log_request(name, mode, code, seconds, request_id, layer)

    return wrapper


def _still_wanted(context: grpc.ServicerContext) -> Callable[[], bool]:
    """Whether the caller still waits for the answer: not cancelled, and its deadline not
    passed by the clock (gRPC's own deadline timer may fire late on a busy server, and a
    train update must not be committed after its deadline)."""

    def wanted() -> bool:
        remaining = context.time_remaining()
        return bool(context.is_active()) and (remaining is None or remaining > 0)

    return wanted


def _log_request(method: str, mode: str, code: str, seconds: float, request_id: str, layer: str) -> None:
    """One line per request at DEBUG (fields as `extra`, so JSON logs carry them)."""
    if log.isEnabledFor(logging.DEBUG):
        log.debug(
            "%s layer=%s mode=%s code=%s %.3fms request_id=%s",
            method, layer, mode, code, seconds * 1e3, request_id or "-",
            extra={"method": method, "layer": layer, "mode": mode, "code": code,
                   "duration_seconds": seconds, "request_id": request_id},
        )


_LOCAL_PEERS = ("unix:", "ipv4:127.", "ipv6:[::1]:", "ipv6:%5B::1%5D:")


def _check_local(peer: str) -> None:
    """Shared memory is for clients on the server's host: the peer must be a Unix socket or
    loopback (containers sharing /dev/shm must then share the network namespace too)."""
    if not peer.startswith(_LOCAL_PEERS):
        raise ShmForbidden(f"shared memory needs a client on the server's host (loopback or Unix socket); this call came from {peer}")


def _owner(principal: Optional[Principal]) -> Optional[str]:
    """Who a shared-memory region belongs to: the token's name (None: no authentication)."""
    return None if principal is None else principal.name


def _region_info(region: Region) -> pb.SharedMemoryRegion:
    return pb.SharedMemoryRegion(
        name=region.name, key=region.key, byte_size=region.byte_size, lease_seconds=region.lease_seconds
    )


class Undecodable:
    """Stands in for a request whose bytes are not a valid message, so that it is answered
    with INVALID_ARGUMENT (by the servicer) rather than INTERNAL (by gRPC's deserializer)."""

    def __init__(self, message_type: str, reason: str):
        self.message_type = message_type
        self.reason = reason

    def error(self) -> CodecError:
        return CodecError(f"request is not a valid {self.message_type} message: {self.reason}")


class OversizedPack:
    """Stands in for a NormalizePack of more than MAX_PACK_REQUESTS requests: refused
    before it is parsed (parsing a million tiny requests would take seconds and GBs)."""

    def error(self) -> CodecError:
        return CodecError(f"a NormalizePack holds at most {MAX_PACK_REQUESTS} requests; this one holds more")


def _parse_pack(raw: bytes) -> Any:
    count = wire.count_field(raw, _PACK_REQUESTS, MAX_PACK_REQUESTS)
    if count is not None and count > MAX_PACK_REQUESTS:
        return OversizedPack()
    pack = pb.NormalizePack.FromString(raw)  # and where the count wasn't sure:
    return OversizedPack() if len(pack.requests) > MAX_PACK_REQUESTS else pack


_PACK_REQUESTS = pb.NormalizePack.DESCRIPTOR.fields_by_name["requests"].number


def _tolerant(parse: Callable[[bytes], Any], message_class: Any) -> Callable[[bytes], Any]:
    def tolerant(data: bytes) -> Any:
        try:
            return parse(data)
        except DecodeError as e:
            return Undecodable(message_class.DESCRIPTOR.full_name, str(e) or "malformed protobuf")

    return tolerant


def add_to_server(servicer: "NormServicer", server: grpc.Server) -> None:
    """Register the servicer like the generated add_NormServiceServicer_to_server, but with
    request parsers that turn undecodable bytes into INVALID_ARGUMENT, and with tensor
    bytes that travel beside the Normalize messages (wire.Framed)."""
    service = pb.DESCRIPTOR.services_by_name["NormService"]
    handlers = {}
    for method in service.methods:
        request_class = getattr(pb, method.input_type.name)
        if request_class is pb.NormalizeRequest:
            parse = wire.parser(request_class, wire.REQUEST_DATA)
        elif request_class is pb.NormalizePack:
            parse = _parse_pack
        else:
            parse = request_class.FromString
        make = grpc.stream_stream_rpc_method_handler if method.client_streaming else grpc.unary_unary_rpc_method_handler
        handlers[method.name] = make(
            getattr(servicer, method.name),
            request_deserializer=_tolerant(parse, request_class),
            response_serializer=wire.serialize,
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    server.add_registered_method_handlers(service.full_name, handlers)


class _Stream:
    """An open stream's caller, counters and idle watch, looked up once per stream."""

    __slots__ = ("method", "context", "principal", "watch", "received", "in_flight", "received_total", "_sent", "_idle")

    def __init__(
        self, method: str, context: grpc.ServicerContext, principal: Optional[Principal], metrics: Metrics, idle: "_IdleStreams"
    ):
        self.method, self.context, self.principal = method, context, principal
        self.received = 0  # requests so far: the next one's sequence
        self.in_flight = metrics.in_flight.labels(method)
        self.received_total = metrics.stream_messages.labels("received")
        self._sent = metrics.stream_messages.labels("sent")
        self._idle = idle
        self.watch = idle.open(context)

    def touch(self) -> None:
        self._idle.touch(self.watch)

    def sent(self, requests: int) -> None:
        """Answers to `requests` requests went out."""
        self._idle.touch(self.watch)
        self._sent.inc(requests)


class _IdleStreams:
    """Cancels streams that have been silent for `idle_seconds` (a silent stream holds a
    worker thread and a stream slot)."""

    def __init__(self, idle_seconds: float):
        self.idle_seconds = idle_seconds
        self._open: dict[int, list[Any]] = {}  # token -> [context, last activity]
        self._lock = threading.Lock()
        self._sweeper: Optional[threading.Thread] = None

    def open(self, context: grpc.ServicerContext) -> list[Any]:
        """Start watching a stream; returns its token for touch and close."""
        entry = [context, monotonic()]
        with self._lock:
            self._open[id(entry)] = entry
            if self._sweeper is None and self.idle_seconds:
                self._sweeper = threading.Thread(target=self._sweep, name="normserve-idle-streams", daemon=True)
                self._sweeper.start()
        return entry

    @staticmethod
    def touch(entry: list[Any]) -> None:
        # No lock: one float store per message (the sweeper reads a recent enough value).
        entry[1] = monotonic()

    def close(self, entry: list[Any]) -> None:
        with self._lock:
            self._open.pop(id(entry), None)

    def _sweep(self) -> None:
        while True:
            time.sleep(min(1.0, self.idle_seconds / 4))
            now = monotonic()
            with self._lock:
                idle = [(t, c) for t, (c, last) in self._open.items() if now - last > self.idle_seconds]
                for token, _ in idle:
                    del self._open[token]
            for _, context in idle:
                log.info("cancelling a stream idle for over %.0fs (stream_idle_seconds)", self.idle_seconds)
                context.cancel()


class NormServicer(pb_grpc.NormServiceServicer):
    def __init__(
        self,
        layers: Registry,
        metrics: Metrics,
        auth: Authorizer,
        max_tensor_elements: int,
        max_streams: int,
        stream_idle_seconds: float = 0.0,
        max_tensor_rank: int = codec.MAX_RANK,
        batching: Optional[EvalBatching] = None,
        shm: Optional[SharedMemoryManager] = None,
    ):
        self._batching = batching
        self._max_rank = max_tensor_rank
        self._shm = shm if shm is not None else SharedMemoryManager(0, 1, 1.0)
        self._layers = layers
        self._auth = auth
        self._idle_streams = _IdleStreams(stream_idle_seconds)
        self._metrics = metrics
        self._max_elements = max_tensor_elements
        self._max_streams = max_streams
        # Each open stream holds a worker thread: capping them below the pool size keeps
        # threads free for unary calls (and health checks).
        self._stream_slots = threading.BoundedSemaphore(max_streams)

    def _allow(self, context: grpc.ServicerContext, action: Action, layer: Optional[str] = None) -> Optional[Principal]:
        """Authenticate the caller and check it may do `action` (on `layer`)."""
        principal = self._auth.authenticate(context.invocation_metadata())
        self._auth.check(principal, action, layer)
        return principal

    # -- layer management --------------------------------------------------------------
    @_measured
    def CreateLayer(self, request: pb.CreateLayerRequest, context: grpc.ServicerContext) -> pb.CreateLayerResponse:
        self._allow(context, Action.ADMIN, request.name)
        config = convert.config_from_spec(request.spec)
        state = convert.decode_state(request.state, self._max_elements)
        layer = self._layers.create(request.name, config, state)
        return pb.CreateLayerResponse(layer=convert.layer_info(layer))

    @_measured
    def GetLayer(self, request: pb.GetLayerRequest, context: grpc.ServicerContext) -> pb.GetLayerResponse:
        self._allow(context, Action.READ, request.name)
        return pb.GetLayerResponse(layer=convert.layer_info(self._layers.get(request.name)))

    @_measured
    def ListLayers(self, request: pb.ListLayersRequest, context: grpc.ServicerContext) -> pb.ListLayersResponse:
        principal = self._allow(context, Action.READ)
        layers = [l for l in self._layers.list(request.prefix) if principal is None or principal.may_see(l.name)]
        return pb.ListLayersResponse(layers=[convert.layer_info(layer) for layer in layers])

    @_measured
    def DeleteLayer(self, request: pb.DeleteLayerRequest, context: grpc.ServicerContext) -> pb.DeleteLayerResponse:
        self._allow(context, Action.ADMIN, request.name)
        self._layers.delete(request.name)
        return pb.DeleteLayerResponse()

    # -- state -------------------------------------------------------------------------
    @_measured
    def ResetRunningStats(
        self, request: pb.ResetRunningStatsRequest, context: grpc.ServicerContext
    ) -> pb.ResetRunningStatsResponse:
        self._allow(context, Action.ADMIN, request.name)
        layer = self._layers.get(request.name)
        version = layer.reset_running_stats(_expected(request))
        return pb.ResetRunningStatsResponse(state=convert.state_version(version))

    @_measured
    def GetState(self, request: pb.GetStateRequest, context: grpc.ServicerContext) -> pb.GetStateResponse:
        self._allow(context, Action.READ, request.name)
        state, version = self._layers.get(request.name).state_dict()
        return pb.GetStateResponse(
            state={key: codec.from_torch(t) for key, t in state.items()},
            version=convert.state_version(version),
        )

    @_measured
    def LoadState(self, request: pb.LoadStateRequest, context: grpc.ServicerContext) -> pb.LoadStateResponse:
        self._allow(context, Action.ADMIN, request.name)
        layer = self._layers.get(request.name)
        version = layer.load_state(convert.decode_state(request.state, self._max_elements), _expected(request))
        return pb.LoadStateResponse(state=convert.state_version(version))

    # -- normalization -----------------------------------------------------------------
    def _normalize(
        self,
        request: pb.NormalizeRequest,
        principal: Optional[Principal],
        still_wanted: Optional[Callable[[], bool]],
        response: pb.NormalizeResponse,
        peer: Callable[[], str],
    ) -> wire.Buffer:
        """Run one request and fill `response` in place; returns the output's bytes, to
        travel beside it (wire.Framed; b"" when they are in `response` or in a region)."""
        mode = _mode(request)
        data = wire.payload(request)
        self._auth.check(principal, Action.TRAIN if mode == "train" else Action.EVAL, request.layer)
        in_shm = request.input.HasField("shared_memory")
        out_shm = request.HasField("output_shared_memory")
        if in_shm or out_shm:
            _check_local(peer())  # asked only here: most requests carry their bytes
        layer = self._layers.get(request.layer)
        output: wire.Buffer = b""
        if not (in_shm or out_shm):
            x = codec.to_torch(request.input, self._max_elements, self._max_rank, data)
            result = self._forward(layer, x, mode, request, still_wanted)
            output = codec.encode_head(result.output, response.output)
        else:
            # The regions stay mapped until the request is done with them.
            regions = self._shm.request(_owner(principal))
            try:
                if in_shm:
                    x = regions.input(request.input, self._max_elements, self._max_rank, data)
                else:
                    x = codec.to_torch(request.input, self._max_elements, self._max_rank, data)
                # The output place is checked before the layer runs.
                place = regions.output_place(request.output_shared_memory, x) if out_shm else None
                result = self._forward(layer, x, mode, request, still_wanted)
                if place is None:
                    output = codec.encode_head(result.output, response.output)
                else:
                    regions.write(place, result.output, response.output)
                del x  # may view a region's mapping: gone before the region may be unmapped
            finally:
                regions.release()
            self._metrics.observe_shared_memory(regions.bytes_in, regions.bytes_out)
        convert.fill_state_version(response.state, result.state)
        response.request_id = request.request_id
        response.replayed = result.replayed
        return output

    def _forward(
        self,
        layer: Layer,
        x: Any,
        mode: str,
        request: pb.NormalizeRequest,
        still_wanted: Optional[Callable[[], bool]],
    ) -> ForwardResult:
        start = perf_counter()
        result = layer.forward(x, mode == "train", still_wanted, request.request_id, self._batching)
        self._metrics.observe_compute(layer.name, layer.kind, mode, x, result, perf_counter() - start)
        return result

    # -- shared memory -----------------------------------------------------------------
    @_measured
    def RegisterSharedMemory(
        self, request: pb.RegisterSharedMemoryRequest, context: grpc.ServicerContext
    ) -> pb.RegisterSharedMemoryResponse:
        principal = self._allow(context, Action.SHARED_MEMORY)
        _check_local(context.peer())
        region = self._shm.register(
            _owner(principal), request.name, request.key, request.byte_size, request.lease_seconds
        )
        return pb.RegisterSharedMemoryResponse(region=_region_info(region))

    @_measured
    def UnregisterSharedMemory(
        self, request: pb.UnregisterSharedMemoryRequest, context: grpc.ServicerContext
    ) -> pb.UnregisterSharedMemoryResponse:
        principal = self._allow(context, Action.SHARED_MEMORY)
        self._shm.unregister(_owner(principal), request.name)
        return pb.UnregisterSharedMemoryResponse()

    @_measured
    def ListSharedMemory(
        self, request: pb.ListSharedMemoryRequest, context: grpc.ServicerContext
    ) -> pb.ListSharedMemoryResponse:
        principal = self._allow(context, Action.SHARED_MEMORY)
        regions = self._shm.list(_owner(principal), request.prefix)
        return pb.ListSharedMemoryResponse(regions=[_region_info(r) for r in regions])

    @_measured
    def Normalize(self, request: pb.NormalizeRequest, context: grpc.ServicerContext) -> Union[pb.NormalizeResponse, wire.Framed]:
        principal = self._auth.authenticate(context.invocation_metadata())
        response = pb.NormalizeResponse()
        output = self._normalize(request, principal, _still_wanted(context), response, context.peer)
        return wire.frame(response, wire.RESPONSE_DATA, output)

    def NormalizeStream(
        self, request_iterator: Iterator[pb.NormalizeRequest], context: grpc.ServicerContext
    ) -> Iterator[Union[pb.NormalizeStreamResponse, wire.Framed]]:
        """One response per request, in order; a bad message gets an Error and the stream
        goes on."""
        with self._stream("NormalizeStream", context) as stream:
            for request in request_iterator:
                message, output = self._stream_answer(stream, request)
                yield wire.frame(message, wire.STREAM_RESPONSE_DATA, output)
                stream.sent(1)

    def NormalizeStreamPacked(
        self, request_iterator: Iterator[pb.NormalizePack], context: grpc.ServicerContext
    ) -> Iterator[pb.NormalizeStreamPack]:
        """NormalizeStream with several requests per message: one pack of answers per pack."""
        with self._stream("NormalizeStreamPacked", context) as stream:
            for pack in request_iterator:
                stream.touch()  # a pack may be empty
                if isinstance(pack, (Undecodable, OversizedPack)):
                    self._metrics.observe_request("NormalizeStreamPacked", "invalid", "INVALID_ARGUMENT", 0.0)
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(pack.error()))
                self._metrics.pack_requests.observe(len(pack.requests))
                answers = pb.NormalizeStreamPack()
                for request in pack.requests:
                    message, output = self._stream_answer(stream, request)
                    if output:
                        message.response.output.data = bytes(output)
                    answers.responses.append(message)
                yield answers
                stream.sent(len(pack.requests))

    @contextlib.contextmanager
    def _stream(self, method: str, context: grpc.ServicerContext) -> Iterator["_Stream"]:
        """A stream's slot (see max_streams), caller, idle watch and gauges, held while it is open."""
        metrics = self._metrics
        if not self._stream_slots.acquire(blocking=False):
            metrics.observe_request(method, "none", "RESOURCE_EXHAUSTED", 0.0)
            context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"too many open streams: the limit is max_streams={self._max_streams}; retry later or use unary calls",
            )
        try:
            principal = self._auth.authenticate(context.invocation_metadata())
        except Unauthenticated as e:
            self._stream_slots.release()
            metrics.observe_request(method, "none", "UNAUTHENTICATED", 0.0)
            context.abort(grpc.StatusCode.UNAUTHENTICATED, str(e))
        metrics.open_streams.inc()
        stream = _Stream(method, context, principal, metrics, self._idle_streams)
        try:
            yield stream
        finally:
            self._idle_streams.close(stream.watch)
            metrics.open_streams.dec()
            self._stream_slots.release()

    def _stream_answer(self, stream: "_Stream", request: Any) -> tuple[pb.NormalizeStreamResponse, wire.Buffer]:
        """The answer to one stream request (numbered by its place in the stream), measured
        and logged, and its output's bytes (see _normalize); an error becomes the answer."""
        stream.touch()
        sequence = stream.received
        stream.received += 1
        stream.received_total.inc()
        undecodable = isinstance(request, Undecodable)
        mode = "invalid" if undecodable else _MODES.get(request.mode, "invalid")
        output: wire.Buffer = b""
        stream.in_flight.inc()
        start = perf_counter()
        try:
            if undecodable:
                raise request.error()
            message = pb.NormalizeStreamResponse(sequence=sequence)
            wanted = _still_wanted(stream.context)
            output = self._normalize(request, stream.principal, wanted, message.response, stream.context.peer)
            code = "OK"
        except Exception as exc:
            status, text = status_for(exc, stream.method)
            message = pb.NormalizeStreamResponse(sequence=sequence, error=pb.Error(code=status.value[0], message=text))
            code = status.name
        finally:
            stream.in_flight.dec()
        seconds = perf_counter() - start
        request_id, layer = ("", "") if undecodable else (request.request_id, request.layer)
        self._metrics.observe_request(stream.method, mode, code, seconds, request_id)
        _log_request(stream.method, mode, code, seconds, request_id, layer)
        return message, output
