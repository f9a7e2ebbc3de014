"""Write ``count`` small Classifier models as ``DIR/model-<i>/`` (safetensors + config.json).

Usage: ``python write_models.py DIR COUNT``
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from app import Classifier
from safetensors.torch import save_file


def write_models(root: Path, count: int) -> list[str]:
    ids = [f"model-{i}" for i in range(count)]
    for i, model_id in enumerate(ids):
        torch.manual_seed(i)
        folder = root / model_id
        folder.mkdir(parents=True, exist_ok=True)
        save_file(Classifier(4, 3).state_dict(), folder / "model.safetensors")
        (folder / "config.json").write_text(json.dumps({"width": 4, "classes": 3}))
    return ids


if __name__ == "__main__":
    write_models(Path(sys.argv[1]), int(sys.argv[2]))
