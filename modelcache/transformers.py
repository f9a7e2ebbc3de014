"""Hugging Face transformers models served from the cache (extra ``transformers``).

``@cache.model`` accepts a ``transformers.PreTrainedModel`` subclass (``class Enc(BertModel)``)
or an ``AutoModel*`` class (``cache.model(AutoModel)``); the cache then builds it this way,
in a worker thread with the weights' device current:

* the config from the model's ``config.json`` through the library's own config classes (the
  class's ``config_class``; for an Auto class, the one its ``model_type`` names, and the
  concrete model class the config's ``architectures`` pick, as ``from_pretrained`` does);
* the model made by transformers' ``from_pretrained`` from the cache's tensors
  (``state_dict=``, no path: nothing is read from disk or the hub): the library handles
  checkpoint key prefixes (``bert.``), renamed keys and tied weights as it does for a
  checkpoint, builds on the meta device and assigns the tensors; their dtype is kept, so the
  parameters *are* views of the cache's buffer (no copy); non-persistent buffers
  (``position_ids``) are materialised on the weights' device;
* weights the model needs but the checkpoint lacks, or whose shapes differ, are an error naming
  them (``from_pretrained`` would initialise them at random: a served model must not), and so
  is any tensor left on the meta device;
* eval mode, gradients off;
* a tokenizer from the side files, when the model has one, as ``model.tokenizer``: built once
  per load. A class's ``side_files`` defaults to `TOKENIZER_FILES`.

Nothing here downloads: set ``HF_HUB_OFFLINE=1`` to be sure nothing else does.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from functools import partial
from itertools import chain
from typing import TYPE_CHECKING, Any

import torch

from ._builders import ModelBuilder
from ._format import ModelInfo
from ._sidefiles import side_patterns

if TYPE_CHECKING:
    import transformers

__all__ = ["TOKENIZER_FILES", "build_pretrained", "is_transformers_class", "load_tokenizer"]

#: The side files read for a transformers class that declares none: every tokenizer format's.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "chat_template.jinja",
)
_TOKENIZER_MARKERS = frozenset(TOKENIZER_FILES) - {"chat_template.jinja", "added_tokens.json"}


def is_transformers_class(target: object) -> bool:
    """Whether ``target`` is a transformers model class or Auto class (no import of the library:
    a class defined in it is among its bases)."""
    return isinstance(target, type) and any(
        base.__module__.partition(".")[0] == "transformers" for base in target.__mro__
    )


def _is_auto(target: type) -> bool:
    return any(base.__name__ == "_BaseAutoModelClass" for base in target.__mro__)


def _config_and_class(
    target: type, config: Mapping[str, Any]
) -> tuple[transformers.PreTrainedConfig, type[transformers.PreTrainedModel]]:
    """The library's config object for ``config``, and the model class to build."""
    if _is_auto(target):
        from transformers import CONFIG_MAPPING
        from transformers.models.auto.auto_factory import _get_model_class

        model_type = config.get("model_type")
        if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
            raise ValueError(f"config.json names no model_type transformers knows: {model_type!r}")
        made = CONFIG_MAPPING[model_type].from_dict(dict(config))
        mapping: Any = target._model_mapping  # type: ignore[attr-defined]
        if type(made) not in mapping:
            raise ValueError(f"{target.__name__} has no model for a {model_type!r} config")
        return made, _get_model_class(made, mapping)  # type: ignore[no-untyped-call]
    config_class: Any = target.config_class  # type: ignore[attr-defined]
    return config_class.from_dict(dict(config)), target


def _weights_dtype(weights: Mapping[str, torch.Tensor]) -> torch.dtype | None:
    """The floating dtype most of the weights have (None when none is floating)."""
    counts = Counter(t.dtype for t in weights.values() if t.is_floating_point())
    return counts.most_common(1)[0][0] if counts else None


def load_tokenizer(info: ModelInfo) -> Any:
    """A tokenizer made from ``info``'s side files, or None when it carries none."""
    if not _TOKENIZER_MARKERS.intersection(info.files):
        return None
    from transformers import AutoTokenizer

    with info.files_dir() as path:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)


def build_pretrained(target: type, weights: Mapping[str, torch.Tensor], info: ModelInfo) -> Any:
    """Build ``target`` (a transformers model or Auto class) from the cache's tensors."""
    if info.config is None:
        raise ValueError("a transformers model needs its config.json, and the store has none")
    config, model_class = _config_and_class(target, info.config)
    tensors = dict(weights)
    options: dict[str, Any] = {}
    devices = {t.device for t in tensors.values()}
    if len(devices) == 1 and (device := devices.pop()).type != "cpu":
        options["device_map"] = {"": device}
    loaded: Any = model_class.from_pretrained(
        None,
        config=config,
        state_dict=tensors,
        dtype=_weights_dtype(tensors),
        output_loading_info=True,
        local_files_only=True,
        **options,
    )
    model, loading = loaded
    problems = []
    if loading["missing_keys"]:
        problems.append(f"missing from the weights: {', '.join(sorted(loading['missing_keys']))}")
    if loading["mismatched_keys"]:
        shown = ", ".join(str(key) for key in sorted(loading["mismatched_keys"], key=str))
        problems.append(f"shapes differ from the config's: {shown}")
    if loading.get("error_msgs"):
        problems.append("; ".join(map(str, loading["error_msgs"])))
    meta = [
        name
        for name, tensor in chain(model.named_parameters(), model.named_buffers())
        if tensor.is_meta
    ]
    if meta:
        problems.append(f"left on the meta device: {', '.join(meta)}")
    if problems:
        raise ValueError(f"{model_class.__name__} cannot be served: {'; '.join(problems)}")
    model.eval()
    model.requires_grad_(False)
    model.tokenizer = load_tokenizer(info)
    return model


def transformers_builder(target: type, name: str) -> ModelBuilder:
    """The builder of a transformers class (see the module notes)."""
    declared = getattr(target, "side_files", None)
    side_files = TOKENIZER_FILES if declared is None else side_patterns(declared, name)
    return ModelBuilder(partial(build_pretrained, target), name, side_files=side_files)
