"""How a model object is made from its weights.

A builder is anything the user binds to the cache: a class with a ``from_weights(weights, info)``
classmethod, a ``torch.nn.Module`` subclass (built on the meta device, then handed the weight
views with ``load_state_dict(assign=True)``: no second copy of the weights), or a plain function
``(weights, info) -> model``. Sync builders run in a worker thread with the weights' device
current (``torch.cuda.device`` / ``cupy.cuda.Device``): a worker thread starts on device 0, so a
builder's ``torch.empty(..., device="cuda")`` would otherwise land on GPU 0 for a ``cuda:1``
cache. Async builders run on the event loop, which is shared: they name their device themselves.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from functools import partial
from itertools import chain
from typing import Any

import anyio
import torch

from ._backend import LoadedWeights, device_context
from ._exceptions import ModelBuildError, ModelCacheError
from ._format import ModelInfo
from ._sidefiles import side_patterns
from ._torch import Weights

__all__ = ["WEIGHTS", "ModelBuilder", "build_module", "builder_for"]


def build_module(cls: type[torch.nn.Module], weights: Weights, info: ModelInfo) -> torch.nn.Module:
    """Make ``cls(**config)`` on the meta device and assign the weights as its parameters.

    ``config`` is the model's ``config.json`` (empty when it has none). The module is returned in
    eval mode with gradients off: it serves inference. Parameters or buffers that the weights do
    not cover would stay on the meta device, so they are an error.
    """
    with torch.device("meta"):
        module = cls(**dict(info.config or {}))
    module.load_state_dict(weights, strict=True, assign=True)
    missing = [
        name
        for name, tensor in chain(module.named_parameters(), module.named_buffers())
        if tensor.is_meta
    ]
    if missing:
        raise ValueError(
            f"{', '.join(missing[:5])} not in the weights (non-persistent buffers?); "
            f"give {cls.__name__} a from_weights classmethod to build it"
        )
    module.eval()
    module.requires_grad_(False)
    return module


def _on_device(func: Callable[..., Any], weights: LoadedWeights, info: ModelInfo) -> Any:
    with device_context(weights):
        return func(weights, info)


def _weights_only(weights: LoadedWeights, info: ModelInfo) -> LoadedWeights:
    return weights


class ModelBuilder:
    """A callable ``(weights, info) -> model`` and how to run it."""

    __slots__ = ("func", "is_async", "name", "needs_config", "side_files")

    def __init__(
        self,
        func: Callable[..., Any],
        name: str,
        *,
        needs_config: bool = True,
        side_files: tuple[str, ...] = (),
    ):
        self.func = func
        self.name = name
        self.is_async = inspect.iscoroutinefunction(func)
        #: Whether the loader reads the model's config.json and side files for it (every bound
        #: builder; not the unbound `Weights`, whose loads stay one header read).
        self.needs_config = needs_config
        #: Side-file names or globs read with the model (`_sidefiles`), checked when bound.
        self.side_files = side_files

    def __repr__(self) -> str:
        return f"<ModelBuilder {self.name}>"

    async def build(self, weights: LoadedWeights, info: ModelInfo) -> Any:
        """Run the builder; any error it raises becomes a ModelBuildError naming the model."""
        try:
            if self.func is _weights_only:
                return weights
            if self.is_async:
                return await self.func(weights, info)
            return await anyio.to_thread.run_sync(_on_device, self.func, weights, info)
        except ModelCacheError:
            raise
        except Exception as exc:
            raise ModelBuildError(
                f"model {info.model_id!r}: {self.name} failed to build it from {info.url}: "
                f"{type(exc).__name__}: {exc}",
                model_id=info.model_id,
                path=info.url,
            ) from exc


#: The builder used when none is bound: the model is its `Weights`.
WEIGHTS = ModelBuilder(_weights_only, "Weights", needs_config=False)


def builder_for(target: object) -> ModelBuilder:
    """The builder for a decorated class or a function; TypeError for anything else."""
    name = getattr(target, "__qualname__", repr(target))
    side_files = side_patterns(getattr(target, "side_files", None), name)
    if isinstance(target, type):
        from_weights = getattr(target, "from_weights", None)
        if callable(from_weights):
            return ModelBuilder(from_weights, name, side_files=side_files)
        from .transformers import is_transformers_class, transformers_builder  # no cycle at import

        if is_transformers_class(target):  # a PreTrainedModel or an AutoModel* class
            return transformers_builder(target, name)
        if issubclass(target, torch.nn.Module):
            return ModelBuilder(partial(build_module, target), name, side_files=side_files)
        raise TypeError(
            f"{name} cannot be built from weights: give it a from_weights(weights, info) "
            "classmethod, or make it a torch.nn.Module subclass"
        )
    if callable(target):
        return ModelBuilder(target, name, side_files=side_files)
    raise TypeError(f"expected a model class or a function (weights, info) -> model, got {name}")
