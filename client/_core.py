"""The one implementation of request building, response decoding and call semantics,
shared by the sync `Client` and the `AsyncClient` (they only differ in how they wait).

A `Call` describes one unary RPC: the method, the request message, how to decode the
answer, whether it may be retried, and how to reconcile a retry's answer. Multi-step
operations (import_state) are generators that yield Calls and receive their results,
run by each client's driver loop.
"""

from __future__ import annotations

import collections
import dataclasses
import importlib.metadata
import math
import os
import uuid
import warnings
from typing import Any, Callable, Generator, Generic, Iterable, Mapping, Optional, Sequence, TypeVar, Union

import grpc
import numpy as np

from . import _shm, codec, wire
from ._modules import infer_kwargs, load_state_dict, module_spec
from ._proto import normserve_pb2 as pb
from .errors import (
    AlreadyExistsError,
    CancelledError,
    DeadlineExceededError,
    FailedPreconditionError,
    InvalidArgumentError,
    NormServeError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnavailableError,
    from_status_value,
)
from .types import LayerInfo, NormalizeResult, StateVersion

R = TypeVar("R")

DEFAULT_TARGET = "127.0.0.1:50051"
# Matches the server's default; big enough for a (32, 3, 224, 224) float32 batch.
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
USER_AGENT = "normserve-python"

Metadata = Sequence[tuple[str, str]]
"""gRPC metadata: (key, value) pairs sent with a call, e.g. [("authorization", "Bearer …")]."""

_MODES = {"train": pb.MODE_TRAIN, "eval": pb.MODE_EVAL}
INPUT_DTYPES = ("float32", "float64", "float16", "bfloat16")


# -- methods: paths and message classes from the descriptor (no generated stub needed) ------
@dataclasses.dataclass(frozen=True)
class Method:
    """One RPC of a service: its path and message (de)serializers."""

    path: str
    serialize: Optional[Callable[[Any], bytes]]
    deserialize: Optional[Callable[[bytes], Any]]


def _service_methods() -> dict[str, Method]:
    service = pb.DESCRIPTOR.services_by_name["NormService"]
    methods = {}
    for m in service.methods:
        request, response = getattr(pb, m.input_type.name), getattr(pb, m.output_type.name)
        methods[m.name] = Method(f"/{service.full_name}/{m.name}", request.SerializeToString, response.FromString)
    # Tensor bytes travel beside these messages (wire.Framed).
    for name, response, path in (
        ("Normalize", pb.NormalizeResponse, wire.RESPONSE_DATA),
        ("NormalizeStream", pb.NormalizeStreamResponse, wire.STREAM_RESPONSE_DATA),
    ):
        methods[name] = Method(methods[name].path, wire.serialize, wire.parser(response, path))
    return methods


METHODS: dict[str, Method] = _service_methods()
STREAM_METHOD = "NormalizeStream"
PACKED_STREAM_METHOD = "NormalizeStreamPacked"
UNARY_METHODS = tuple(name for name in METHODS if name not in (STREAM_METHOD, PACKED_STREAM_METHOD))
# grpc.health.v1.Health/Check with hand-encoded messages (see health_request below).
HEALTH_CHECK = "HealthCheck"
HEALTH_METHOD = Method("/grpc.health.v1.Health/Check", None, None)


# -- channel configuration -----------------------------------------------------------------
def channel_options(
    *,
    max_message_bytes: int,
    keepalive_time: Optional[float],
    keepalive_timeout: Optional[float],
    keepalive_without_calls: bool,
    options: Sequence[tuple[str, Any]],
) -> list[tuple[str, Any]]:
    """gRPC channel arguments for the client's settings; explicit `options` win."""
    if max_message_bytes <= 0:
        raise ValueError(f"max_message_bytes must be positive, got {max_message_bytes}")
    opts: dict[str, Any] = {
        "grpc.max_receive_message_length": max_message_bytes,
        "grpc.max_send_message_length": max_message_bytes,
        "grpc.primary_user_agent": f"{USER_AGENT}/{_version()}",
    }
    if keepalive_time is not None:
        if keepalive_time <= 0:
            raise ValueError(f"keepalive_time must be positive, got {keepalive_time}")
        opts["grpc.keepalive_time_ms"] = int(keepalive_time * 1000)
        opts["grpc.keepalive_permit_without_calls"] = int(keepalive_without_calls)
        opts["grpc.http2.max_pings_without_data"] = 0
    if keepalive_timeout is not None:
        if keepalive_timeout <= 0:
            raise ValueError(f"keepalive_timeout must be positive, got {keepalive_timeout}")
        opts["grpc.keepalive_timeout_ms"] = int(keepalive_timeout * 1000)
    opts.update(dict(options))
    return list(opts.items())


def _version() -> str:
    try:
        return importlib.metadata.version("normserve")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - run from a bare checkout
        return "0"


CredentialsArg = Union[grpc.ChannelCredentials, bool, None]
CompressionArg = Union[grpc.Compression, str, None]


def channel_credentials(credentials: CredentialsArg) -> Optional[grpc.ChannelCredentials]:
    """None/False: plaintext; True: TLS with the system's root certificates; or the
    given grpc.ChannelCredentials (e.g. `tls_credentials(...)`)."""
    if credentials is None or credentials is False:
        return None
    if credentials is True:
        return grpc.ssl_channel_credentials()
    if not isinstance(credentials, grpc.ChannelCredentials):
        raise TypeError(f"credentials must be grpc.ChannelCredentials, True or None, got {type(credentials).__name__}")
    return credentials


def _read(value: Union[bytes, str, os.PathLike[str], None]) -> Optional[bytes]:
    if value is None or isinstance(value, bytes):
        return value
    with open(value, "rb") as f:
        return f.read()


def tls_credentials(
    ca_cert: Union[bytes, str, os.PathLike[str], None] = None,
    cert: Union[bytes, str, os.PathLike[str], None] = None,
    key: Union[bytes, str, os.PathLike[str], None] = None,
) -> grpc.ChannelCredentials:
    """TLS channel credentials from PEM bytes or file paths.

    `ca_cert`: the root certificate(s) to trust (None: the system's); `cert` and `key`:
    a client certificate chain and its private key, for mutual TLS (both or neither)."""
    if (cert is None) != (key is None):
        raise ValueError("pass both cert and key (mutual TLS) or neither")
    return grpc.ssl_channel_credentials(
        root_certificates=_read(ca_cert), private_key=_read(key), certificate_chain=_read(cert)
    )


_COMPRESSIONS = {"gzip": grpc.Compression.Gzip, "deflate": grpc.Compression.Deflate, "none": grpc.Compression.NoCompression}


def compression(value: CompressionArg) -> Optional[grpc.Compression]:
    """grpc.Compression, or its name ("gzip", "deflate", "none"), or None."""
    if value is None or isinstance(value, grpc.Compression):
        return value
    try:
        return _COMPRESSIONS[value.lower()]
    except (KeyError, AttributeError):
        raise ValueError(f"compression must be one of {sorted(_COMPRESSIONS)} or a grpc.Compression, got {value!r}") from None


def merge_metadata(default: tuple[tuple[str, str], ...], extra: Optional[Metadata]) -> tuple[tuple[str, str], ...]:
    return default + tuple(extra or ())


# -- calls ---------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Done(Generic[R]):
    """A reconciled outcome: the call is finished with `value`."""

    value: R


@dataclasses.dataclass(frozen=True)
class Call(Generic[R]):
    """One unary RPC: `method` (a key of METHODS, or HEALTH_CHECK), the request, how to
    decode the response, and the retry semantics.

    `retry`: whether the RetryPolicy applies. `reconcile`: consulted when an attempt after
    a retry fails (an earlier attempt may have been applied): it returns a follow-up Call
    or Done to turn that failure into the outcome the first attempt had, or None to
    raise the error."""

    method: str
    request: Any
    decode: Callable[[Any], R]
    retry: bool = True
    reconcile: Optional[Callable[[NormServeError], Union["Call[R]", Done[R], None]]] = None


def _invalid(e: Exception) -> InvalidArgumentError:
    return InvalidArgumentError(str(e))


def mode_value(mode: str) -> "pb.Mode":
    """"train" / "eval" (any case) -> the wire enum; anything else is INVALID_ARGUMENT."""
    try:
        return _MODES[mode.lower()]
    except (KeyError, AttributeError):
        raise InvalidArgumentError(f"mode must be 'train' or 'eval', got {mode!r}") from None


def is_torch(x: Any) -> bool:
    return codec.is_torch(x)


def _check_torch(x: Any) -> None:
    """Torch tensors the codec can't send: sparse, quantized, meta."""
    if str(x.layout) != "torch.strided":
        raise InvalidArgumentError(f"tensors with layout {x.layout} are not supported; pass a dense (strided) tensor")
    if x.is_quantized:
        raise InvalidArgumentError("quantized tensors are not supported; dequantize() them first")
    if x.device.type == "meta":
        raise InvalidArgumentError("meta tensors have no data to send")


def encode(x: Any, out: Optional[pb.Tensor] = None) -> pb.Tensor:
    """A numpy array, torch tensor (any device, any strides) or array-like -> Tensor
    (`out`, filled in place, when given)."""
    tensor: pb.Tensor = _encoded(codec.encode, x, out)
    return tensor


def _encoded(encoder: Callable[[Any, Any], Any], x: Any, out: Optional[pb.Tensor]) -> Any:
    """encoder(x, out), with local encoding errors as InvalidArgumentError."""
    if is_torch(x):
        _check_torch(x)
    try:
        return encoder(x, out)
    except codec.CodecError as e:
        raise _invalid(e) from None
    except (TypeError, ValueError, RuntimeError) as e:  # e.g. np.asarray of a ragged list
        raise InvalidArgumentError(f"cannot encode {type(x).__name__} as a tensor: {e}") from None


def _check_input_dtype(name: Optional[str]) -> str:
    if name not in INPUT_DTYPES:
        raise InvalidArgumentError(f"unsupported input dtype {name}; expected one of {', '.join(INPUT_DTYPES)}")
    return name


def encode_input(x: Any, out: pb.Tensor) -> wire.Buffer:
    """Like `encode`, for normalize inputs (floating dtypes only), filling `out` in place
    except for the bytes of a large tensor: those are returned (codec.encode_head)."""
    data: wire.Buffer = _encoded(codec.encode_head, x, out)
    _check_input_dtype(codec.DTYPE_NAMES.get(out.dtype))
    return data


def input_layout(x: Any) -> tuple[Any, str, tuple[int, ...]]:
    """(x as a numpy array or torch tensor, dtype name, shape) of a normalize input that
    goes through shared memory; the checks of encode_input."""

    def layout(x: Any, _: None) -> tuple[Any, str]:
        if is_torch(x):
            return x, codec.tensor_dtype_name(x)
        x = np.asarray(x)
        return x, codec.array_dtype_name(x)

    x, name = _encoded(layout, x, None)
    return x, _check_input_dtype(name), tuple(x.shape)


def torch_device(x: Any) -> Any:
    """The device to return results on for input `x`; None means "return numpy"."""
    return x.device if is_torch(x) else None


def decode(t: pb.Tensor, device: Any = None, data: Optional[wire.Buffer] = None) -> Any:
    """A writable numpy array, or a torch tensor on `device` when one is given (`data`:
    the bytes, when they travelled beside the message)."""
    try:
        view = codec.to_numpy(t, data=data) if device is None else codec.to_torch(t, data=data)
        return codec.copy_out(view, device)  # the view is of the message's bytes
    except codec.CodecError as e:
        raise _invalid(e) from None


def encode_state(state: Mapping[str, Any]) -> dict[str, pb.Tensor]:
    if not isinstance(state, Mapping):
        raise InvalidArgumentError(f"state must be a mapping of tensors (a state_dict), got {type(state).__name__}")
    return {str(key): encode(value) for key, value in state.items()}


def state_version(v: pb.StateVersion) -> StateVersion:
    return StateVersion(version=v.version, num_batches_tracked=v.num_batches_tracked)


def layer_info(info: pb.LayerInfo) -> LayerInfo:
    kind, args = codec.spec_to_kwargs(info.spec)
    return LayerInfo(
        name=info.name,
        kind=kind,
        args=args,
        state=state_version(info.state),
        has_running_stats=info.has_running_stats,
    )


def request_id(mode: "pb.Mode", given: str) -> str:
    """Train requests always carry an idempotency id; eval requests need none."""
    return given or (uuid.uuid4().hex if mode == pb.MODE_TRAIN else "")


def normalize_result(response: Any, device: Any, data: Optional[wire.Buffer] = None) -> NormalizeResult[Any]:
    """From a NormalizeResponse, plain or Framed (or plain, with its bytes in `data`)."""
    return NormalizeResult(
        output=decode(response.output, device, wire.payload(response) if data is None else data),
        state=state_version(response.state),
        request_id=response.request_id,
        replayed=response.replayed,
    )


# PyTorch's constructor defaults, to tell whether an existing layer is the one a create
# asked for (the server reports every argument, defaults filled in).
_DEFAULTS: dict[str, dict[str, Any]] = {
    "BatchNorm": {"eps": 1e-5, "momentum": 0.1, "affine": True, "track_running_stats": True, "bias": True, "dtype": "float32"},
    "InstanceNorm": {"eps": 1e-5, "momentum": 0.1, "affine": False, "track_running_stats": False, "bias": True, "dtype": "float32"},
    "LayerNorm": {"eps": 1e-5, "elementwise_affine": True, "bias": True, "dtype": "float32"},
    "GroupNorm": {"eps": 1e-5, "affine": True, "bias": True, "dtype": "float32"},
    "RMSNorm": {"eps": None, "elementwise_affine": True, "dtype": "float32"},
}


def full_args(kind: str, args: Mapping[str, Any]) -> dict[str, Any]:
    """Constructor kwargs with PyTorch's defaults filled in (for comparing layer specs)."""
    family = next((f for f in _DEFAULTS if kind.startswith(f)), "")
    full = {**_DEFAULTS.get(family, {}), **args}
    if "normalized_shape" in full:
        full["normalized_shape"] = list(full["normalized_shape"])
    return full


def same_spec(requested: pb.LayerSpec, existing: pb.LayerSpec) -> bool:
    """True when `existing` (as the server reports it) is what `requested` asked for."""
    try:
        kind_a, args_a = codec.spec_to_kwargs(requested)
        kind_b, args_b = codec.spec_to_kwargs(existing)
    except codec.CodecError:
        return False
    return kind_a == kind_b and full_args(kind_a, args_a) == full_args(kind_b, args_b)


# -- the calls of the API ----------------------------------------------------------------------
def create_layer(name: str, kind: Union[str, Any], state: Optional[Mapping[str, Any]], kwargs: dict[str, Any]) -> Call[LayerInfo]:
    """CreateLayer. Retried; an ALREADY_EXISTS after a retry is checked against the layer
    that exists: if it has exactly the requested kind and arguments, the earlier attempt
    created it and the call succeeds (the answer had been lost)."""
    if not isinstance(kind, str):
        if kwargs:
            raise InvalidArgumentError("pass either a module or constructor kwargs, not both")
        module = kind
        try:
            kind, kwargs = module_spec(module)
        except codec.CodecError as e:
            raise _invalid(e) from None
        if state is None:
            state = module.state_dict()
    try:
        spec = codec.kwargs_to_spec(kind, kwargs)
    except codec.CodecError as e:
        raise _invalid(e) from None
    request = pb.CreateLayerRequest(name=name, spec=spec, state=encode_state(state or {}))

    def reconcile(err: NormServeError) -> Optional[Call[LayerInfo]]:
        if not isinstance(err, AlreadyExistsError):
            return None

        def check(response: pb.GetLayerResponse) -> LayerInfo:
            if not same_spec(spec, response.layer.spec):
                raise err
            return layer_info(response.layer)

        return Call("GetLayer", pb.GetLayerRequest(name=name), check)

    return Call("CreateLayer", request, lambda r: layer_info(r.layer), reconcile=reconcile)


def get_layer(name: str) -> Call[LayerInfo]:
    return Call("GetLayer", pb.GetLayerRequest(name=name), lambda r: layer_info(r.layer))


def list_layers(prefix: str) -> Call[list[LayerInfo]]:
    return Call("ListLayers", pb.ListLayersRequest(prefix=prefix), lambda r: [layer_info(i) for i in r.layers])


def _gone(err: NormServeError) -> Optional[Done[None]]:
    return Done(None) if isinstance(err, NotFoundError) else None


def delete_layer(name: str) -> Call[None]:
    """DeleteLayer. Retried; a NOT_FOUND after a retry means an earlier attempt deleted
    the layer (its answer was lost), so the call succeeds."""
    return Call("DeleteLayer", pb.DeleteLayerRequest(name=name), lambda r: None, reconcile=_gone)


def get_state(name: str, as_torch: bool) -> Call[dict[str, Any]]:
    device = "cpu" if as_torch else None
    return Call(
        "GetState", pb.GetStateRequest(name=name), lambda r: {key: decode(t, device) for key, t in r.state.items()}
    )


def load_state(name: str, state: Mapping[str, Any], expected_version: Optional[int]) -> Call[StateVersion]:
    """LoadState. Retried: loading the same state twice leaves the same state (the version
    may count both loads); with `expected_version` a second application is impossible."""
    request = pb.LoadStateRequest(name=name, state=encode_state(state), expected_version=expected_version)
    return Call("LoadState", request, lambda r: state_version(r.state))


def reset_running_stats(name: str, expected_version: Optional[int]) -> Call[StateVersion]:
    """ResetRunningStats; retried like LoadState (resetting twice leaves the same state)."""
    request = pb.ResetRunningStatsRequest(name=name, expected_version=expected_version)
    return Call("ResetRunningStats", request, lambda r: state_version(r.state))


def normalize(layer: str, x: Any, mode: str, given_id: str) -> Call[NormalizeResult[Any]]:
    """Normalize. Retried with the same request id, so a train request is applied once."""
    value = mode_value(mode)
    request = pb.NormalizeRequest(layer=layer, mode=value, request_id=request_id(value, given_id))
    data = encode_input(x, request.input)  # in place: a constructor argument would be copied again
    device = torch_device(x)
    return Call("Normalize", wire.frame(request, wire.REQUEST_DATA, data), lambda r: normalize_result(r, device))


# -- same-host shared memory -------------------------------------------------------------------
# A region the server dropped (lease expired) answers NOT_FOUND with this in its message.
_REGION_GONE = "unknown shared-memory region"
# Errors after which the server may still be working on a request: its segment is not
# reused (a late write must not land in another call's output).
_UNSETTLED = (DeadlineExceededError, CancelledError, UnavailableError)


def register_region(segment: _shm.Segment) -> Call[float]:
    """RegisterSharedMemory (or renew it: the same name, key and size); the granted lease."""
    request = pb.RegisterSharedMemoryRequest(name=segment.name, key=segment.key, byte_size=segment.size)
    return Call("RegisterSharedMemory", request, lambda r: r.region.lease_seconds)


def unregister_region(name: str) -> Call[None]:
    """UnregisterSharedMemory; a NOT_FOUND after a retry means an earlier attempt did it."""
    return Call("UnregisterSharedMemory", pb.UnregisterSharedMemoryRequest(name=name), lambda r: None, reconcile=_gone)


def _warn_once(pool: _shm.SegmentPool, why: str) -> None:
    if not pool.warned:
        pool.warned = True
        warnings.warn(f"normserve: {why}; sending tensors over gRPC", RuntimeWarning, stacklevel=4)


def _register(pool: _shm.SegmentPool, segment: _shm.Segment) -> Program[bool]:
    """Register `segment`; False when the server can't use shared memory (the segment is
    then dropped, and for lasting reasons the pool is marked unavailable, with a warning)."""
    try:
        pool.lease_seconds = yield register_region(segment)
    except ResourceExhaustedError:  # the server's limits: this call goes over bytes
        pool.discard(segment)
        return False
    except NormServeError as e:
        # Disabled (FAILED_PRECONDITION), another host (NOT_FOUND: no such segment there),
        # a server without the RPCs (UNIMPLEMENTED), a token that may not.
        lasting = (FailedPreconditionError, NotFoundError, PermissionDeniedError)
        if not isinstance(e, lasting) and e.code != grpc.StatusCode.UNIMPLEMENTED:
            raise
        pool.discard(segment)
        pool.unavailable = f"{e.code.name}: {e.message}"
        _warn_once(pool, f"the server can't use shared memory ({pool.unavailable})")
        return False
    segment.renewed(pool.lease_seconds)
    return True


def shared_request(
    pool: _shm.SegmentPool, layer: str, value: "pb.Mode", x: Any, given_id: str
) -> Program[Optional[tuple[pb.NormalizeRequest, _shm.Segment]]]:
    """A Normalize request whose input is written into a (registered) segment of the pool,
    and whose output goes next to it; None when the server can't use shared memory. The
    caller gives the segment back (`pool.settle`) once the answer has been read."""
    x, name, shape = input_layout(x)
    nbytes = math.prod(shape) * codec.ITEMSIZE[name]
    out_at = _shm.output_offset(nbytes)
    try:
        segment, retired = pool.take(out_at + nbytes)
    except OSError as e:  # e.g. /dev/shm full: this call goes over bytes
        _warn_once(pool, f"cannot create a shared-memory segment for {out_at + nbytes} bytes ({e})")
        return None
    try:
        yield from release_segments(retired)
        if segment.needs_registering() and not (yield from _register(pool, segment)):
            return None
        request = pb.NormalizeRequest(
            layer=layer, mode=value, request_id=request_id(value, given_id),
            output_shared_memory=_shm.ref(segment, out_at, nbytes),
        )
        request.input.dtype = codec.DTYPE_ENUMS[name]
        request.input.shape[:] = shape
        request.input.shared_memory.CopyFrom(_shm.ref(segment, 0, nbytes))
        _shm.write_input(segment, x, name, shape)
    except BaseException:
        pool.settle(segment, clean=True)
        raise
    return request, segment


def normalize_shared(pool: _shm.SegmentPool, layer: str, x: Any, mode: str, given_id: str) -> Program[NormalizeResult[Any]]:
    """Normalize through a shared-memory segment: the input is written into it, the server
    writes the output next to it, and the output is copied out. Falls back to `normalize`
    (bytes) when the server can't use shared memory."""
    value = mode_value(mode)
    prepared = (yield from shared_request(pool, layer, value, x, given_id)) if pool.unavailable is None else None
    if prepared is None:
        fallback: NormalizeResult[Any] = yield normalize(layer, x, mode, given_id)
        return fallback
    request, segment = prepared
    device = torch_device(x)
    call = Call("Normalize", request, lambda r: shared_result(r, segment, device))
    clean = False
    try:
        try:
            result: NormalizeResult[Any] = yield call
        except NotFoundError as e:
            if _REGION_GONE not in e.message:
                clean = True
                raise
            # The lease ran out meanwhile (an idle client): register again and retry once.
            if not (yield from _register(pool, segment)):
                result = yield normalize(layer, x, mode, request.request_id)
                return result
            result = yield call
        clean = True
        segment.renewed(pool.lease_seconds)
        return result
    except NormServeError as e:
        clean = clean or not isinstance(e, _UNSETTLED)
        raise
    finally:
        pool.settle(segment, clean)


def shared_result(
    response: Any, segment: _shm.Segment, device: Any, data: Optional[wire.Buffer] = None
) -> NormalizeResult[Any]:
    """The result of a request through `segment` (its output there, or, when the server
    sent it as bytes, in `response` or `data`: see normalize_result)."""
    if not response.output.HasField("shared_memory"):
        return normalize_result(response, device, data)
    try:
        output = _shm.read_output(segment, response.output, device)
    except codec.CodecError as e:
        raise _invalid(e) from None
    return NormalizeResult(
        output=output, state=state_version(response.state), request_id=response.request_id, replayed=response.replayed
    )


def release_segments(segments: list[_shm.Segment]) -> Program[None]:
    """Unregister and unlink segments (close(), or segments too small to keep). A server
    that can't be reached is not waited for: its leases release the regions."""
    try:
        for segment in segments:
            if segment.renew_at == 0.0:
                continue  # never registered
            try:
                yield unregister_region(segment.name)
            except (UnavailableError, DeadlineExceededError):
                break
            except NormServeError:
                pass
    finally:
        for segment in segments:
            segment.destroy()


# -- streams -----------------------------------------------------------------------------------
def stream_request(layer: str, mode: "pb.Mode", x: Any) -> Any:
    """A stream message: a NormalizeRequest, plain or Framed."""
    request = pb.NormalizeRequest(layer=layer, mode=mode, request_id=request_id(mode, ""))
    return wire.frame(request, wire.REQUEST_DATA, encode_input(x, request.input))


def shared_stream_request(
    pool: _shm.SegmentPool, layer: str, mode: "pb.Mode", x: Any
) -> Program[tuple[pb.NormalizeRequest, Optional[_shm.Segment]]]:
    """A stream message through a shared-memory segment (None: over bytes, when the server
    can't use shared memory)."""
    if pool.unavailable is None:
        prepared = yield from shared_request(pool, layer, mode, x, "")
        if prepared is not None:
            return prepared
    return stream_request(layer, mode, x), None


def stream_result(
    response: pb.NormalizeStreamResponse, device: Any, segment: Optional[_shm.Segment] = None
) -> NormalizeResult[Any]:
    """The result of one stream message, or its error raised (with `.sequence`)."""
    if response.HasField("error"):
        err = from_status_value(response.error.code, response.error.message)
        err.sequence = response.sequence
        raise err
    data = wire.payload(response)  # a stream message's bytes travel beside the outer message
    if segment is not None:
        return shared_result(response.response, segment, device, data)
    return normalize_result(response.response, device, data)


def stream_answer(
    response: pb.NormalizeStreamResponse,
    sent: "collections.deque[tuple[Any, Optional[_shm.Segment]]]",
    pool: Optional[_shm.SegmentPool],
) -> NormalizeResult[Any]:
    """The result of the oldest message sent (`sent`: its device and segment), which
    `response` answers; its segment goes back to the pool."""
    device, segment = sent.popleft()
    try:
        return stream_result(response, device, segment)
    finally:
        if segment is not None and pool is not None:
            pool.settle(segment, clean=True)


def settle_unanswered(pool: Optional[_shm.SegmentPool], sent: Iterable[tuple[Any, Optional[_shm.Segment]]]) -> None:
    """A stream ended: segments of messages never answered may still be written to by
    the server, so they are dropped, not reused."""
    if pool is not None:
        for _, segment in sent:
            if segment is not None:
                pool.settle(segment, clean=False)


# -- health ------------------------------------------------------------------------------------
# grpc.health.v1 messages are encoded by hand: HealthCheckRequest is {string service = 1},
# HealthCheckResponse is {ServingStatus status = 1}. This keeps grpcio-health-checking (a
# server extra) out of the client and avoids registering a second copy of its descriptors.
HEALTH_STATUSES = {0: "UNKNOWN", 1: "SERVING", 2: "NOT_SERVING", 3: "SERVICE_UNKNOWN"}


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise ValueError("truncated varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos


def health_request(service: str) -> bytes:
    data = service.encode()
    return b"\x0a" + _varint(len(data)) + data if data else b""


def health_status(raw: bytes) -> str:
    """The ServingStatus name in an encoded HealthCheckResponse (unknown fields skipped)."""
    status, pos = 0, 0
    try:
        while pos < len(raw):
            tag, pos = _read_varint(raw, pos)
            field, wire = tag >> 3, tag & 7
            if wire == 0:
                value, pos = _read_varint(raw, pos)
                if field == 1:
                    status = value
            elif wire == 1:
                pos += 8
            elif wire == 2:
                length, pos = _read_varint(raw, pos)
                pos += length
            elif wire == 5:
                pos += 4
            else:
                raise ValueError(f"unsupported wire type {wire}")
        if pos > len(raw):
            raise ValueError("truncated field")
    except ValueError as e:
        raise InvalidArgumentError(f"malformed HealthCheckResponse: {e}") from None
    return HEALTH_STATUSES.get(status, f"STATUS_{status}")


def health(service: str) -> Call[str]:
    """grpc.health.v1.Health/Check; a probe, so not retried."""
    return Call(HEALTH_CHECK, health_request(service), health_status, retry=False)


# -- multi-step operations -----------------------------------------------------------------------
Program = Generator[Call[Any], Any, R]


def load_checkpoint(source: Any, prefix: str) -> dict[str, Any]:
    """The state_dict under `prefix` of a path / state_dict / module (needs torch)."""
    try:
        return load_state_dict(source, prefix)
    except codec.CodecError as e:
        raise _invalid(e) from None


def import_state(name: str, state: dict[str, Any], kind: Optional[str], kwargs: dict[str, Any]) -> Program[LayerInfo]:
    """Load `state` into layer `name`, creating it as `kind` (arguments inferred from the
    tensors, `kwargs` winning) when it doesn't exist."""
    try:
        yield get_layer(name)
    except NotFoundError as e:
        if kind is None:
            raise NotFoundError(f"{e.message}; pass kind= to create it from the checkpoint") from None
    else:
        yield load_state(name, state, None)
        info: LayerInfo = yield get_layer(name)
        return info
    try:
        inferred = infer_kwargs(kind, state)
    except codec.CodecError as e:
        raise _invalid(e) from None
    created: LayerInfo = yield create_layer(name, kind, state, {**inferred, **kwargs})
    return created

