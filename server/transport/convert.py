"""Engine objects -> protobuf messages (tensors and specs go through normserve.client.codec)."""

from __future__ import annotations

from normserve.client import codec
from normserve.client._proto import normserve_pb2 as pb

from ..engine import Layer, LayerConfig, StateVersion, make_config


def config_from_spec(spec: pb.LayerSpec) -> LayerConfig:
    kind, kwargs = codec.spec_to_kwargs(spec)
    return make_config(kind, **kwargs)


def spec_from_config(config: LayerConfig) -> pb.LayerSpec:
    return codec.kwargs_to_spec(config.kind, dict(config.args))


def state_version(v: StateVersion) -> pb.StateVersion:
    return pb.StateVersion(version=v.version, num_batches_tracked=v.num_batches_tracked)


def fill_state_version(out: pb.StateVersion, v: StateVersion) -> None:
    out.version = v.version
    out.num_batches_tracked = v.num_batches_tracked


def layer_info(layer: Layer) -> pb.LayerInfo:
    return pb.LayerInfo(
        name=layer.name,
        kind=layer.kind,
        spec=spec_from_config(layer.config),
        state=state_version(layer.version),
        has_running_stats=layer.has_running_stats,
    )


def decode_state(state, max_elements: int) -> dict:
    return {key: codec.to_torch(t, max_elements) for key, t in state.items()}
