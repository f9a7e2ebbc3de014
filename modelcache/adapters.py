"""LoRA adapters over one shared base model (extra ``peft``): the adapters are the cached models.

Thousands of fine-tunes of one base ship as peft saves them, ``adapter_model.safetensors`` +
``adapter_config.json`` per id. `LoraAdapters` binds an adapter class to a `ModelCache` whose
store names those files (``".../{model_id}/adapter_model.safetensors"``: a single-file template,
``adapter_config.json`` read beside it as a side file). The cache then holds *adapters* within
its byte budget, with its tiers, single-flight loads and leases; the base is loaded once by the
caller and never copied.

How an adapter is applied, and why this way:

* When `LoraAdapters` is made, a forward hook is put on every ``nn.Linear`` of the base, once.
  A hook reads the adapter active *in the calling thread or task* (a `ContextVar`); with none it
  returns at once, so the plain base costs one context lookup per linear layer.
* A request for adapter X runs the base inside ``adapter.applied()`` (or calls
  ``adapter(*args)``): each targeted layer adds ``scaling * B(A(x))`` to its output, computed
  from X's tensors, which are views of the cache's buffer. So requests for different adapters run
  at the same time, in different threads or tasks, over the same base weights: no copy of the
  base, no merge into it, no lock, and the adapter is the only state a request selects.
* The alternative, peft's multi-adapter model with ``set_adapter`` per request, changes the
  base's modules: requests must hold a lock around the whole forward (one at a time), and every
  adapter is loaded into the modules by peft, outside the cache's budget. `benches/adapters.py`
  measures both.
* Math as peft's LoRA layer in eval mode: ``result + lora_B(lora_A(x)) * scaling``, ``scaling =
  lora_alpha / r`` (``/ sqrt(r)`` with ``use_rslora``; per-module ``rank_pattern`` and
  ``alpha_pattern`` honoured), computed in the wider of the input's and the adapter's dtypes (a
  bfloat16 adapter over a float32 base is peft's float32 result). Adapters with what this does
  not implement (DoRA, LoRA biases, ``modules_to_save``, embedding or convolution LoRA,
  ``fan_in_fan_out``) are refused when built, naming the setting: a served adapter is never
  silently different from peft's.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from ._cache import ModelCache
from ._format import ModelInfo

__all__ = ["ADAPTER_CONFIG", "LoraAdapter", "LoraAdapters"]

ADAPTER_CONFIG = "adapter_config.json"
#: Settings this implementation does not apply: an adapter using one is refused.
_UNSUPPORTED = {
    "use_dora": "DoRA",
    "lora_bias": "LoRA biases",
    "modules_to_save": "modules_to_save",
    "fan_in_fan_out": "fan_in_fan_out (Conv1D layers)",
    "trainable_token_indices": "trainable tokens",
    "target_parameters": "target_parameters",
    "layer_replication": "layer_replication",
    "alora_invocation_tokens": "aLoRA",
}
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<part>[AB])\.weight$")

_active: ContextVar[LoraAdapter | None] = ContextVar("modelcache_lora_adapter", default=None)


@dataclass(frozen=True, slots=True)
class _Lora:
    a: torch.Tensor  # (r, in)
    b: torch.Tensor  # (out, r)
    scaling: float


class LoraAdapter:
    """One adapter's LoRA tensors (views of the cache's buffer), ready to apply to the base."""

    __slots__ = ("adapters", "config", "layers", "model_id")

    def __init__(
        self,
        adapters: LoraAdapters,
        model_id: str,
        layers: Mapping[str, _Lora],
        config: Mapping[str, Any],
    ) -> None:
        self.adapters = adapters
        self.model_id = model_id
        self.layers = layers
        self.config = config

    def __repr__(self) -> str:
        return f"<LoraAdapter {self.model_id!r}: {len(self.layers)} layers>"

    @contextlib.contextmanager
    def applied(self) -> Iterator[Any]:
        """Within the block, the base (yielded) runs with this adapter in this thread or task."""
        token = _active.set(self)
        try:
            yield self.adapters.base
        finally:
            _active.reset(token)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """The base's forward with this adapter applied (no grad)."""
        with self.applied() as base, torch.no_grad():
            return base(*args, **kwargs)


def _pattern_value(patterns: Mapping[str, Any], name: str, default: Any) -> Any:
    """peft's per-module override: the first key matching the module name's end."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _parse_config(info: ModelInfo) -> dict[str, Any]:
    raw = info.files.get(ADAPTER_CONFIG)
    if raw is None:
        raise ValueError(f"no {ADAPTER_CONFIG} beside the adapter's weights")
    config = json.loads(raw)
    if not isinstance(config, dict):
        raise ValueError(f"{ADAPTER_CONFIG} is not a JSON object")
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"not a LoRA adapter: peft_type {config.get('peft_type')!r}")
    used = [what for key, what in _UNSUPPORTED.items() if config.get(key)]
    if used:
        raise ValueError(f"uses what modelcache does not apply: {', '.join(used)}")
    return config


class LoraAdapters:
    """LoRA adapters served from ``cache`` over ``base``, a model held by the caller.

    ``adapters.use(id)`` leases adapter ``id`` from the cache (loading it on first use) and
    yields a `LoraAdapter`: ``adapter(**batch)`` runs the base with it. The base's device must
    be the cache's. Make one `LoraAdapters` per base (it binds a class to the cache and hooks
    the base's linear layers once).
    """

    def __init__(self, cache: ModelCache, base: torch.nn.Module) -> None:
        self.cache = cache
        self.base = base
        self._linears: dict[str, torch.nn.Linear] = {
            name: module
            for name, module in base.named_modules()
            if isinstance(module, torch.nn.Linear)
        }
        for name, module in self._linears.items():
            module.register_forward_hook(partial(_apply, self, name))
        owner = self

        class Adapter(LoraAdapter):
            side_files = (ADAPTER_CONFIG,)

            @classmethod
            def from_weights(cls, weights: Mapping[str, torch.Tensor], info: ModelInfo) -> Any:
                return owner._build(weights, info)

        self.adapter_class: type = cache.model(Adapter)

    def use(self, model_id: str) -> contextlib.AbstractAsyncContextManager[LoraAdapter]:
        """Lease adapter ``model_id``: ``async with adapters.use(id) as adapter: adapter(x)``."""
        return self.cache.use(model_id, model=self.adapter_class)

    def _build(self, weights: Mapping[str, torch.Tensor], info: ModelInfo) -> LoraAdapter:
        config = _parse_config(info)
        parts: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in weights.items():
            match = _KEY.match(key)
            if match is None:
                raise ValueError(f"tensor {key!r} is not a LoRA A or B weight of a linear layer")
            parts.setdefault(match["module"], {})[match["part"]] = tensor
        alpha, use_rslora = config.get("lora_alpha", 8), bool(config.get("use_rslora"))
        layers: dict[str, _Lora] = {}
        for name, pair in parts.items():
            module = self._linears.get(name)
            if module is None:
                raise ValueError(f"the base has no linear layer {name!r}")
            if set(pair) != {"A", "B"}:
                raise ValueError(f"{name}: lora_A and lora_B must both be present")
            a, b = pair["A"], pair["B"]
            r = a.shape[0]
            if a.shape[1] != module.in_features or b.shape != (module.out_features, r):
                raise ValueError(
                    f"{name}: LoRA shapes {tuple(a.shape)} and {tuple(b.shape)} do not fit the "
                    f"base's {module.in_features} -> {module.out_features} layer"
                )
            if a.device != module.weight.device:
                raise ValueError(f"{name}: adapter on {a.device}, base on {module.weight.device}")
            rank = _pattern_value(config.get("rank_pattern") or {}, name, config.get("r", r))
            if rank != r:
                raise ValueError(f"{name}: rank {r} in the weights, {rank} in the config")
            scale = _pattern_value(config.get("alpha_pattern") or {}, name, alpha)
            scaling = scale / math.sqrt(r) if use_rslora else scale / r
            layers[name] = _Lora(a, b, scaling)
        return LoraAdapter(self, info.model_id, layers, config)


def _apply(
    owner: LoraAdapters, name: str, module: torch.nn.Module, args: tuple[Any, ...], output: Any
) -> Any:
    """Forward hook of every base linear layer: add the active adapter's update, if any.

    Only ``owner``'s adapters: another `LoraAdapters` over the same base has hooks of its own,
    and each would otherwise add the update again."""
    adapter = _active.get()
    if adapter is None or adapter.adapters is not owner:
        return None
    lora = adapter.layers.get(name)
    if lora is None:
        return None
    # peft's LoRA layer in eval mode: result + lora_B(lora_A(dropout(x))) * scaling, in the
    # wider of the input's and the adapter's dtypes (peft keeps a half-precision adapter's
    # weights in float32 over a float32 base), the sum cast back to the base's output dtype.
    dtype = torch.promote_types(args[0].dtype, lora.a.dtype)
    x, a, b = args[0].to(dtype), lora.a.to(dtype), lora.b.to(dtype)
    update = torch.nn.functional.linear(torch.nn.functional.linear(x, a), b)
    return (output + update * lora.scaling).to(output.dtype)
