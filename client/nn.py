"""Server-side layers as torch.nn modules (needs torch).

`RemoteNorm` is a torch.nn.Module whose forward runs on a server-side layer, in the mode
of the module's own `training` flag -- `.train()` normalizes with the batch statistics and
updates the server's running statistics, `.eval()` uses them -- so it drops into
`nn.Sequential` or any model like the local layer it stands for. `offload` moves chosen
normalization layers of a local model to the server (creating them with their current
configuration and state) and puts RemoteNorm modules in their place.

    from normserve.client import Client

    client = Client("127.0.0.1:50051")
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
    client.offload(model, "resnet/")          # model[1] is now RemoteNorm('resnet/1')
    model.train(); y = model(x)               # running stats move on the server
    model.eval(); y = model(x)                # ... and are used here

Limits: gradients do not flow through a RemoteNorm (its output is computed on the server,
outside autograd; a warning says so when the input requires grad), and its affine
parameters live on the server, so an optimizer doesn't see them. Inputs must have the
server layer's dtype (`model.double()` doesn't convert a remote layer). Outputs come back
on the input's device.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any, Callable, Iterable, Optional, Union

import torch
from torch import nn

from . import _core as core
from ._modules import module_spec
from .codec import KIND_FIELDS, CodecError
from .errors import AlreadyExistsError, InvalidArgumentError, NormServeError
from .types import LayerInfo

if TYPE_CHECKING:
    from ._client import Client

__all__ = ["LayerSelector", "RemoteNorm", "offload", "is_norm_layer"]

LayerSelector = Union[None, str, Iterable[str], type, tuple[type, ...], Callable[[str, Any], bool]]
"""Which layers `offload` moves: None (every supported normalization layer), a qualified
name or several, a module class or tuple of classes, or a predicate (name, module) -> bool."""


class RemoteNorm(nn.Module):  # type: ignore[misc]  # torch.nn.Module is untyped to mypy here
    """A torch.nn.Module backed by the server-side layer `name`.

    `forward(x)` sends `x` to the server in train mode when `self.training` is true, else
    in eval mode, and returns the output (same type, dtype and device as `x`).
    `state_dict()` reads the server's state (same keys as the local module's);
    `load_state_dict()` writes it (strict keys and shapes, as the server requires);
    `reset_running_stats()` resets it. `timeout` bounds each call (None: the client's).
    """

    def __init__(self, client: "Client", name: str, *, info: Optional[LayerInfo] = None, timeout: Optional[float] = None):
        super().__init__()
        self.client = client
        self.name = name
        self.timeout = timeout
        self.info = info if info is not None else client.get_layer(name, timeout=timeout)
        self._warned_grad = False

    @property
    def kind(self) -> str:
        """The torch.nn class name of the server-side layer, e.g. "BatchNorm2d"."""
        return self.info.kind

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalize `x` on the server in this module's mode (train if self.training)."""
        if x.requires_grad and torch.is_grad_enabled() and not self._warned_grad:
            self._warned_grad = True
            warnings.warn(
                f"RemoteNorm({self.name!r}): gradients do not flow through a server-side layer; "
                "its output is detached from autograd",
                stacklevel=2,
            )
        mode = "train" if self.training else "eval"
        out: torch.Tensor = self.client.normalize(self.name, x, mode, timeout=self.timeout)
        return out

    def reset_running_stats(self) -> None:
        """Reset the server-side running statistics (as the local module's method)."""
        self.client.reset_running_stats(self.name, timeout=self.timeout)

    def refresh(self) -> LayerInfo:
        """Re-read the layer's info (kind, arguments, state version) from the server."""
        self.info = self.client.get_layer(self.name, timeout=self.timeout)
        return self.info

    def extra_repr(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.info.args.items())
        return f"{self.name!r}, {self.kind}({args}), target={self.client.target!r}"

    # state_dict() / load_state_dict() go to the server: a model with remote layers keeps
    # the same state_dict keys as the all-local model.
    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        for key, value in self.client.get_state(self.name, as_torch=True, timeout=self.timeout).items():
            destination[prefix + key] = value

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: Any,
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        given = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix) and "." not in k[len(prefix):]}
        current = self.client.get_state(self.name, as_torch=True, timeout=self.timeout)
        missing_keys.extend(prefix + k for k in current if k not in given)
        unexpected_keys.extend(prefix + k for k in given if k not in current)
        known = {k: v for k, v in given.items() if k in current}
        if not known:
            return
        try:
            self.client.load_state(self.name, {**current, **known}, timeout=self.timeout)
        except NormServeError as e:
            error_msgs.append(f"while loading server-side layer {self.name!r}: {e}")


def is_norm_layer(module: Any) -> bool:
    """True for a torch.nn normalization layer the server can hold (exact class, not a subclass)."""
    kind = type(module).__name__
    return kind in KIND_FIELDS and type(module) is getattr(nn, kind, None)


def _chosen(model: nn.Module, layers: LayerSelector) -> list[tuple[str, nn.Module]]:
    modules = dict(model.named_modules())
    if layers is None:
        return [(n, m) for n, m in modules.items() if is_norm_layer(m)]
    if isinstance(layers, type) or (isinstance(layers, tuple) and all(isinstance(t, type) for t in layers)):
        classes = layers
        return [(n, m) for n, m in modules.items() if isinstance(m, classes) and is_norm_layer(m)]
    if callable(layers):
        pick = layers
        return [(n, m) for n, m in modules.items() if is_norm_layer(m) and pick(n, m)]
    names: list[str] = [layers] if isinstance(layers, str) else [str(n) for n in layers]
    chosen = []
    for n in names:
        if n not in modules:
            raise InvalidArgumentError(f"model has no submodule {n!r}")
        if not is_norm_layer(modules[n]):
            raise InvalidArgumentError(
                f"submodule {n!r} is a {type(modules[n]).__name__}, not one of {', '.join(KIND_FIELDS)}"
            )
        chosen.append((n, modules[n]))
    return chosen


def offload(
    model: nn.Module,
    client: "Client",
    prefix: str,
    *,
    layers: LayerSelector = None,
    if_exists: str = "error",
) -> dict[str, str]:
    """Move chosen normalization layers of `model` to the server, in place.

    Each chosen layer (see LayerSelector; default: every BatchNorm/InstanceNorm/LayerNorm/
    GroupNorm/RMSNorm) is created on the server as `prefix + qualified name` (e.g.
    "resnet/layer1.0.bn1") with its configuration and current state_dict, then replaced in
    its parent by a RemoteNorm in the same training mode. Returns {qualified name: server
    layer name}.

    `if_exists` decides what happens when a server layer of that name exists: "error"
    (AlreadyExistsError), "reuse" (attach to it and keep the server's state; its kind and
    arguments must match) or "overwrite" (load the local state into it; kind and arguments
    must match). All layers are created before any module is replaced; when a creation
    fails, the layers this call created are deleted again and `model` is unchanged.
    """
    if if_exists not in ("error", "reuse", "overwrite"):
        raise ValueError(f"if_exists must be 'error', 'reuse' or 'overwrite', got {if_exists!r}")
    chosen = _chosen(model, layers)
    if any(n == "" for n, _ in chosen):
        raise InvalidArgumentError("the model itself is a normalization layer; use client.create_layer and client.module")
    created: list[str] = []
    remotes: dict[str, RemoteNorm] = {}
    try:
        for qualname, module in chosen:
            server_name = prefix + qualname
            info = _create(client, server_name, module, if_exists, created)
            remote = RemoteNorm(client, server_name, info=info)
            remote.train(module.training)
            remotes[qualname] = remote
    except BaseException:
        for server_name in reversed(created):
            try:
                client.delete_layer(server_name)
            except NormServeError:  # pragma: no cover - best effort cleanup
                pass
        raise
    for qualname, remote in remotes.items():
        parent_name, _, child = qualname.rpartition(".")
        setattr(model.get_submodule(parent_name), child, remote)
    return {qualname: remote.name for qualname, remote in remotes.items()}


def _create(client: "Client", name: str, module: nn.Module, if_exists: str, created: list[str]) -> LayerInfo:
    try:
        info = client.create_layer(name, module)
    except AlreadyExistsError:
        if if_exists == "error":
            raise
    else:
        created.append(name)
        return info
    existing = client.get_layer(name)
    try:
        kind, kwargs = module_spec(module)
    except CodecError as e:  # pragma: no cover - _chosen admits supported modules only
        raise InvalidArgumentError(str(e)) from None
    if existing.kind != kind or core.full_args(kind, _normalized(kind, kwargs)) != core.full_args(kind, existing.args):
        raise AlreadyExistsError(
            f"layer {name!r} exists as {existing.kind}({existing.args}), which differs from the local {kind}({kwargs})"
        )
    if if_exists == "overwrite":
        client.load_state(name, module.state_dict())
        return client.get_layer(name)
    return existing


def _normalized(kind: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Constructor kwargs as the server reports them (through the wire spec)."""
    from .codec import kwargs_to_spec, spec_to_kwargs

    return spec_to_kwargs(kwargs_to_spec(kind, kwargs))[1]
