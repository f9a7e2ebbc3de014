"""A model class for the modelcache KServe predictor, with its own request hooks.

Serve every model of a store with it (from this directory, so ``predictor`` is importable)::

    python predictor.py /tmp/store          # writes a few example models, once
    python -m modelcache_kserve --store 'file:///tmp/store/{model_id}/' \
        --model-class predictor:Classifier --device-budget 1GiB
    curl -s localhost:8080/v1/models/sentiment-0:predict \
        -d '{"instances": [[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]]}'

The cache builds ``Classifier(**config.json)`` with the weights of ``model.safetensors``. Each
request runs ``preprocess -> predict -> postprocess`` on the leased model; any of the three may be
left out (the adapter's default takes its place) and any may be ``async def``. They run on the
event loop, so they must not block it for long: make ``predict`` async and offload it, or set
``predict_in_thread = True``, when it takes more than a few milliseconds of CPU.
"""

from __future__ import annotations

import json
import sys
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file


class Classifier(torch.nn.Module):
    """A linear classifier over ``width`` features whose class names come from config.json."""

    def __init__(self, width: int = 8, labels: list[str] | None = None) -> None:
        super().__init__()
        self.labels = labels or ["negative", "positive"]
        self.lin = torch.nn.Linear(width, len(self.labels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)  # type: ignore[no-any-return]

    # -- request hooks (payload: a dict for V1, a kserve InferRequest for V2) -----------------

    def preprocess(self, payload: Any, headers: Mapping[str, str] | None) -> torch.Tensor:
        """V1 ``{"instances": [[...], ...]}`` or V2 with one FP32 input -> a batch of features."""
        if isinstance(payload, dict):
            rows = payload.get("instances")
        else:
            rows = payload.inputs[0].as_numpy().tolist()
        x = torch.tensor(rows, dtype=torch.float32)
        if x.ndim != 2 or x.shape[1] != self.lin.in_features:  # a ValueError here answers 400
            raise ValueError(f"expected rows of {self.lin.in_features} features")
        return x.to(self.lin.weight.device)

    def predict(self, inputs: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return torch.softmax(self(inputs), dim=-1)

    def postprocess(self, outputs: torch.Tensor, request: Any) -> dict[str, Any]:
        """A label and its probability per row: V1 as two lists, V2 as two output tensors."""
        scores, classes = outputs.max(dim=-1)
        labels = [self.labels[int(i)] for i in classes]
        probabilities = [round(float(s), 6) for s in scores]
        if isinstance(request, dict):  # V1
            return {"predictions": labels, "scores": probabilities}
        return {  # V2 (request is a kserve InferRequest): echo its id, as the protocol asks
            "id": request.id or str(uuid.uuid4()),
            "model_name": request.model_name,
            "outputs": [
                {"name": "label", "datatype": "BYTES", "shape": [len(labels)], "data": labels},
                {
                    "name": "score",
                    "datatype": "FP32",
                    "shape": [len(labels)],
                    "data": probabilities,
                },
            ],
        }


def write_example_store(root: Path, count: int = 4, width: int = 8) -> None:
    """Write ``count`` classifiers as ``root/sentiment-<i>/{model.safetensors,config.json}``."""
    for i in range(count):
        torch.manual_seed(i)
        labels = ["negative", "positive"] if i % 2 == 0 else ["negative", "neutral", "positive"]
        model = Classifier(width, labels)
        folder = root / f"sentiment-{i}"
        folder.mkdir(parents=True, exist_ok=True)
        save_file(model.state_dict(), folder / "model.safetensors")
        (folder / "config.json").write_text(json.dumps({"width": width, "labels": labels}))


if __name__ == "__main__":
    write_example_store(Path(sys.argv[1] if len(sys.argv) > 1 else "store"))
