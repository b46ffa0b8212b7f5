"""The synchronous normserve client."""

from __future__ import annotations

import collections
import uuid
from typing import Any, Iterable, Iterator, Mapping, Optional, Sequence, Union

import grpc

from . import codec
from ._modules import infer_kwargs, load_state_dict, module_spec
from ._proto import normserve_pb2 as pb
from ._proto import normserve_pb2_grpc as pb_grpc
from .errors import InvalidArgumentError, NotFoundError, from_rpc_error, from_status_value
from .types import LayerInfo, NormalizeResult, StateVersion

DEFAULT_TARGET = "127.0.0.1:50051"
# Matches the server's default; big enough for a (32, 3, 224, 224) float32 batch.
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024

Metadata = Sequence[tuple[str, str]]
_MODES = {"train": pb.MODE_TRAIN, "eval": pb.MODE_EVAL}


def _mode(mode: str) -> int:
    try:
        return _MODES[mode.lower()]
    except (KeyError, AttributeError):
        raise InvalidArgumentError(f"mode must be 'train' or 'eval', got {mode!r}") from None


def _encode(x: Any) -> pb.Tensor:
    try:
        return codec.encode(x)
    except codec.CodecError as e:
        raise InvalidArgumentError(str(e)) from None


def _torch_device(x: Any) -> Any:
    """The device to return results on for input `x`; None means "return numpy"."""
    return x.device if codec.is_torch(x) else None


def _decode(t: pb.Tensor, torch_device: Any = None) -> Any:
    """A writable numpy array, or a torch tensor on `torch_device` when one is given."""
    try:
        if torch_device is not None:
            return codec.to_torch(t).clone().to(torch_device)
        return codec.to_numpy(t).copy()
    except codec.CodecError as e:
        raise InvalidArgumentError(str(e)) from None


def _state_version(v: pb.StateVersion) -> StateVersion:
    return StateVersion(version=v.version, num_batches_tracked=v.num_batches_tracked)


def _layer_info(info: pb.LayerInfo) -> LayerInfo:
    kind, args = codec.spec_to_kwargs(info.spec)
    return LayerInfo(
        name=info.name,
        kind=kind,
        args=args,
        state=_state_version(info.state),
        has_running_stats=info.has_running_stats,
    )


def _request_id(mode: int, given: str) -> str:
    """Train requests always carry an idempotency id; eval requests need none."""
    return given or (uuid.uuid4().hex if mode == pb.MODE_TRAIN else "")


def _result(response: pb.NormalizeResponse, torch_device: Any) -> NormalizeResult[Any]:
    return NormalizeResult(
        output=_decode(response.output, torch_device),
        state=_state_version(response.state),
        request_id=response.request_id,
        replayed=response.replayed,
    )


def _encode_state(state: Mapping[str, Any]) -> dict[str, pb.Tensor]:
    return {key: _encode(value) for key, value in state.items()}


class Client:
    """Synchronous client for a normserve server.

    >>> with Client("127.0.0.1:50051") as c:
    ...     c.create_layer("bn", "BatchNorm2d", num_features=3)
    ...     y = c.normalize("bn", x, mode="train")

    Arrays in, arrays out: numpy in gives numpy out; torch in gives torch out on the
    input's device (torch is optional). Every failed call raises a
    `normserve.client.errors.NormServeError` subclass carrying the gRPC status `code`.

    `timeout` (seconds) and `metadata` are defaults for every call; each method also
    takes its own.
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        timeout: Optional[float] = None,
        metadata: Optional[Metadata] = None,
        credentials: Optional[grpc.ChannelCredentials] = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        options: Sequence[tuple[str, Any]] = (),
    ):
        self.target = target
        self.timeout = timeout
        self.metadata = tuple(metadata or ())
        channel_options = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            *options,
        ]
        if credentials is None:
            self._channel = grpc.insecure_channel(target, options=channel_options)
        else:
            self._channel = grpc.secure_channel(target, credentials, options=channel_options)
        self._stub = pb_grpc.NormServiceStub(self._channel)

    # -- lifecycle -----------------------------------------------------------------------
    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, rpc: Any, request: Any, timeout: Optional[float], metadata: Optional[Metadata]) -> Any:
        try:
            return rpc(
                request,
                timeout=self.timeout if timeout is None else timeout,
                metadata=self.metadata + tuple(metadata or ()),
            )
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None

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
        local torch module, whose configuration and state_dict are copied."""
        if not isinstance(kind, str):
            if kwargs:
                raise InvalidArgumentError("pass either a module or constructor kwargs, not both")
            module = kind
            try:
                kind, kwargs = module_spec(module)
            except codec.CodecError as e:
                raise InvalidArgumentError(str(e)) from None
            if state is None:
                state = module.state_dict()
        try:
            spec = codec.kwargs_to_spec(kind, kwargs)
        except codec.CodecError as e:
            raise InvalidArgumentError(str(e)) from None
        request = pb.CreateLayerRequest(name=name, spec=spec, state=_encode_state(state or {}))
        return _layer_info(self._call(self._stub.CreateLayer, request, timeout, metadata).layer)

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
        try:
            state = load_state_dict(source, prefix)
        except codec.CodecError as e:
            raise InvalidArgumentError(str(e)) from None
        try:
            self.get_layer(name, timeout=timeout, metadata=metadata)
        except NotFoundError as e:
            if kind is None:
                raise NotFoundError(f"{e.message}; pass kind= to create it from the checkpoint") from None
        else:
            self.load_state(name, state, timeout=timeout, metadata=metadata)
            return self.get_layer(name, timeout=timeout, metadata=metadata)
        try:
            inferred = infer_kwargs(kind, state)  # type: ignore[arg-type]
        except codec.CodecError as e:
            raise InvalidArgumentError(str(e)) from None
        return self.create_layer(
            name, kind, state=state, timeout=timeout, metadata=metadata, **{**inferred, **kwargs}  # type: ignore[arg-type]
        )

    def get_layer(self, name: str, *, timeout: Optional[float] = None, metadata: Optional[Metadata] = None) -> LayerInfo:
        response = self._call(self._stub.GetLayer, pb.GetLayerRequest(name=name), timeout, metadata)
        return _layer_info(response.layer)

    def list_layers(
        self, prefix: str = "", *, timeout: Optional[float] = None, metadata: Optional[Metadata] = None
    ) -> list[LayerInfo]:
        """Layers sorted by name, optionally only those whose name starts with `prefix`."""
        response = self._call(self._stub.ListLayers, pb.ListLayersRequest(prefix=prefix), timeout, metadata)
        return [_layer_info(info) for info in response.layers]

    def delete_layer(self, name: str, *, timeout: Optional[float] = None, metadata: Optional[Metadata] = None) -> None:
        self._call(self._stub.DeleteLayer, pb.DeleteLayerRequest(name=name), timeout, metadata)

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
        response = self._call(self._stub.GetState, pb.GetStateRequest(name=name), timeout, metadata)
        device = "cpu" if as_torch else None
        return {key: _decode(t, device) for key, t in response.state.items()}

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
        version; otherwise AbortedError is raised and nothing changes."""
        request = pb.LoadStateRequest(name=name, state=_encode_state(state), expected_version=expected_version)
        return _state_version(self._call(self._stub.LoadState, request, timeout, metadata).state)

    def reset_running_stats(
        self,
        name: str,
        *,
        expected_version: Optional[int] = None,
        timeout: Optional[float] = None,
        metadata: Optional[Metadata] = None,
    ) -> StateVersion:
        """Reset running statistics (compare-and-set with `expected_version`, as in load_state)."""
        request = pb.ResetRunningStatsRequest(name=name, expected_version=expected_version)
        return _state_version(self._call(self._stub.ResetRunningStats, request, timeout, metadata).state)

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
        """Run one batch through a server-side layer; `mode` is "train" or "eval"."""
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

        Train requests carry an idempotency id (a fresh UUID unless `request_id` is given):
        sending the same id again, e.g. after a timeout, is not applied twice."""
        mode_value = _mode(mode)
        request = pb.NormalizeRequest(
            layer=layer, mode=mode_value, input=_encode(x), request_id=_request_id(mode_value, request_id)
        )
        response = self._call(self._stub.Normalize, request, timeout, metadata)
        return _result(response, _torch_device(x))

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
        in flight may have been applied too (in order) before the stream was cancelled.
        `timeout` bounds the whole stream; the client's default per-call timeout does not
        apply to streams.
        """
        for result in self.normalize_stream_results(layer, batches, mode, timeout=timeout, metadata=metadata):
            yield result.output

    def normalize_stream_results(
        self,
        layer: str,
        batches: Iterable[Any],
        mode: str = "eval",
        *,
        timeout: Optional[float] = None,
        metadata: Optional[Metadata] = None,
    ) -> Iterator[NormalizeResult[Any]]:
        """Like `normalize_stream`, yielding NormalizeResult (output + state version)."""
        mode_value = _mode(mode)
        devices: collections.deque[Any] = collections.deque()  # one per request sent
        local_error: list[BaseException] = []

        def requests() -> Iterator[pb.NormalizeRequest]:
            # gRPC consumes this on its own thread; an exception here would surface only as
            # a CANCELLED call, so keep it and raise it in the caller's thread instead.
            try:
                for x in batches:
                    tensor = _encode(x)
                    devices.append(_torch_device(x))
                    yield pb.NormalizeRequest(
                        layer=layer, mode=mode_value, input=tensor, request_id=_request_id(mode_value, "")
                    )
            except BaseException as e:  # noqa: BLE001 - re-raised below
                local_error.append(e)

        call = self._stub.NormalizeStream(
            requests(),
            timeout=timeout,  # not the client's per-call default: a stream may live long
            metadata=self.metadata + tuple(metadata or ()),
        )
        try:
            for response in call:
                device = devices.popleft()
                if response.HasField("error"):
                    err = from_status_value(response.error.code, response.error.message)
                    err.sequence = response.sequence  # type: ignore[attr-defined]
                    raise err
                yield _result(response.response, device)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
        finally:
            call.cancel()
        if local_error:
            raise local_error[0]
