"""A transformers model class as a user would pass it to ``--model-class``: the real MiniLM
served as sentence embeddings (``mc_transformers:Embedder``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import transformers

_Auto: Any = transformers.AutoModel


class Embedder(_Auto):  # type: ignore[misc]
    """AutoModel, bound by the adapter as it is; the hooks get the built model as ``self``."""

    predict_in_thread = True  # a forward of milliseconds: off the event loop

    def preprocess(self, payload: Mapping[str, Any], headers: Any = None) -> Any:
        return self.tokenizer(list(payload["instances"]), padding=True, return_tensors="pt")

    def predict(self, inputs: Any) -> torch.Tensor:
        return embed(self, inputs)


def embed(model: Any, batch: Any) -> torch.Tensor:
    """Mean-pooled, normalised sentence embeddings (what sentence-transformers computes)."""
    with torch.inference_mode():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, dim=1)
