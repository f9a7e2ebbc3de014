"""The demo's models and its deterministic store: 500 classifiers, MLPs and small CNNs, 1-40 MiB.

``Classifier`` is the one class the server binds (``--model-class models:Classifier``): it is a
``torch.nn.Module`` built as ``Classifier(**config.json)``, and ``config["arch"]`` picks its body,
so one class serves models of both kinds and of every size. Weights come from a
``torch.Generator`` seeded per model: the same id always has the same bytes, on any machine.

A store is ``<root>/<model_id>/model.safetensors`` + ``config.json``, and ``<root>/manifest.json``
(the marker, written last) lists each model's config and file size so a re-run only checks sizes.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

__all__ = [
    "CLASSES",
    "CNN_INPUT",
    "MANIFEST",
    "MLP_INPUTS",
    "Classifier",
    "ModelSpec",
    "ensure_store",
    "input_shape",
    "load_reference",
    "model_ids",
    "specs",
]

#: Output classes of every model.
CLASSES = 10
#: Input features of the MLPs.
MLP_INPUTS = 64
#: Input shape (channels, height, width) of the CNNs.
CNN_INPUT = (3, 8, 8)
#: The store's marker: written once every model is on disk.
MANIFEST = "manifest.json"
#: Bumped when the models change: a store with another version is rewritten.
STORE_VERSION = 1
MIB = 1 << 20


class Classifier(torch.nn.Module):
    """An MLP (``arch="mlp"``) or a small CNN (``arch="cnn"``), sized by its config.

    mlp: ``hidden`` widths of ReLU layers over ``MLP_INPUTS`` features, then ``classes``.
    cnn: 3x3 convolutions with ``channels`` (the first two with stride 2: 8x8 -> 4x4 -> 2x2),
    ReLU, global average pooling, then a linear layer to ``classes``.
    """

    def __init__(
        self,
        arch: str,
        hidden: Sequence[int] = (),
        channels: Sequence[int] = (),
        classes: int = CLASSES,
    ) -> None:
        super().__init__()
        self.arch = arch
        layers: list[torch.nn.Module] = []
        if arch == "mlp":
            width = MLP_INPUTS
            for h in hidden:
                layers += [torch.nn.Linear(width, h), torch.nn.ReLU()]
                width = h
            layers.append(torch.nn.Linear(width, classes))
        elif arch == "cnn":
            width = CNN_INPUT[0]
            for i, c in enumerate(channels):
                stride = 2 if i < 2 else 1
                layers += [torch.nn.Conv2d(width, c, 3, stride=stride, padding=1), torch.nn.ReLU()]
                width = c
            layers += [
                torch.nn.AdaptiveAvgPool2d(1),
                torch.nn.Flatten(),
                torch.nn.Linear(width, classes),
            ]
        else:
            raise ValueError(f"unknown arch {arch!r} (expected 'mlp' or 'cnn')")
        self.net = torch.nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.arch == "cnn" and x.dim() == 2:  # flat instances: (batch, 3*8*8)
            x = x.view(x.shape[0], *CNN_INPUT)
        return self.net(x)  # type: ignore[no-any-return]


@dataclass(frozen=True)
class ModelSpec:
    """One model of the store: its id, its config.json, and its weights' size in bytes."""

    model_id: str
    config: dict[str, Any]
    nbytes: int

    @property
    def arch(self) -> str:
        return str(self.config["arch"])


def model_ids(n: int) -> list[str]:
    return [f"model-{i:03d}" for i in range(n)]


def input_shape(arch: str) -> tuple[int, ...]:
    """The shape of one instance for a model of ``arch`` (CNN instances may also come flat)."""
    return (MLP_INPUTS,) if arch == "mlp" else CNN_INPUT


def _seed(model_id: str, seed: int) -> int:
    digest = hashlib.sha256(f"{seed}:{model_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _config(model_id: str, seed: int, min_mib: float, max_mib: float) -> dict[str, Any]:
    """A config whose weights take about a log-uniform size in [min_mib, max_mib] MiB."""
    rng = random.Random(_seed(model_id, seed))
    target = math.exp(rng.uniform(math.log(min_mib), math.log(max_mib))) * MIB / 4  # params
    if rng.random() < 0.35:
        layers = rng.choice((2, 3))
        # Params ~ 27*c (stem) + 9*c*c*(layers-1) + 10*c: solve for the width c.
        a, b = 9 * (layers - 1), 27 + 10 + layers
        c = (-b + math.sqrt(b * b + 4 * a * target)) / (2 * a)
        return {"arch": "cnn", "channels": [max(8, round(c))] * layers, "classes": CLASSES}
    layers = rng.choice((2, 3, 4))
    # Params ~ 64*h + h*h*(layers-1) + 10*h: solve for the width h.
    a, b = layers - 1, MLP_INPUTS + CLASSES + layers
    h = (-b + math.sqrt(b * b + 4 * a * target)) / a / 2
    return {"arch": "mlp", "hidden": [max(8, round(h))] * layers, "classes": CLASSES}


def _meta_module(config: dict[str, Any]) -> Classifier:
    with torch.device("meta"):
        return Classifier(**config)


def _weight_bytes(config: dict[str, Any]) -> int:
    return sum(t.numel() * 4 for t in _meta_module(config).state_dict().values())


def specs(n: int, *, seed: int = 0, min_mib: float = 1.0, max_mib: float = 40.0) -> list[ModelSpec]:
    """The store's ``n`` models: ids ``model-000``..., configs and sizes (no weights made)."""
    out = []
    for model_id in model_ids(n):
        config = _config(model_id, seed, min_mib, max_mib)
        out.append(ModelSpec(model_id, config, _weight_bytes(config)))
    return out


def make_weights(spec: ModelSpec, seed: int) -> dict[str, torch.Tensor]:
    """Deterministic float32 weights: uniform in +-1/sqrt(fan_in), like PyTorch's own init."""
    gen = torch.Generator().manual_seed(_seed(spec.model_id, seed))
    weights: dict[str, torch.Tensor] = {}
    for prefix, module in _meta_module(spec.config).named_modules():
        if not isinstance(module, torch.nn.Linear | torch.nn.Conv2d):
            continue
        fan_in = module.weight[0].numel()
        bound = 1.0 / math.sqrt(fan_in)
        for name, param in (("weight", module.weight), ("bias", module.bias)):
            if param is None:
                continue
            tensor = torch.empty(param.shape, dtype=torch.float32)
            weights[f"{prefix}.{name}"] = tensor.uniform_(-bound, bound, generator=gen)
    return weights


def _write_model(root: Path, spec: ModelSpec, seed: int) -> int:
    """Write the model's files (the weights under a temporary name first); return the file size."""
    folder = root / spec.model_id
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(spec.config))
    tmp = folder / f".model.safetensors.{os.getpid()}.tmp"
    save_file(make_weights(spec, seed), str(tmp))
    size = tmp.stat().st_size
    tmp.replace(folder / "model.safetensors")
    return size


def _intact(root: Path, spec: ModelSpec, entry: Any) -> bool:
    """Whether the model's files match its manifest entry (config, file size)."""
    if not isinstance(entry, dict) or entry.get("config") != spec.config:
        return False
    folder = root / spec.model_id
    try:
        size = (folder / "model.safetensors").stat().st_size
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return size == entry.get("bytes") and size > spec.nbytes and config == spec.config


def ensure_store(
    root: Path,
    models: Sequence[ModelSpec],
    *,
    seed: int = 0,
    workers: int = 2,
    progress: Callable[[Iterable[int], int], Iterable[int]] | None = None,
) -> int:
    """Make ``root`` hold ``models`` (written with ``workers`` threads); return how many were
    written. With a manifest there, each model's files are only checked (sizes and config)."""
    root.mkdir(parents=True, exist_ok=True)
    marker = root / MANIFEST
    manifest: dict[str, Any] = {}
    if marker.exists():
        try:
            manifest = json.loads(marker.read_text())
        except ValueError:
            manifest = {}
    if manifest.get("version") != STORE_VERSION or manifest.get("seed") != seed:
        manifest = {"version": STORE_VERSION, "seed": seed, "models": {}}
    known: dict[str, Any] = manifest["models"]
    todo = [spec for spec in models if not _intact(root, spec, known.get(spec.model_id))]
    if todo:
        marker.unlink(missing_ok=True)  # incomplete until every model is written
        with ThreadPoolExecutor(workers) as pool:
            sizes = pool.map(lambda spec: _write_model(root, spec, seed), todo)
            for spec, size in zip(
                todo, progress(sizes, len(todo)) if progress else sizes, strict=True
            ):
                known[spec.model_id] = {"config": spec.config, "bytes": size}
        tmp = marker.with_suffix(".tmp")
        tmp.write_text(json.dumps(manifest, indent=0, sort_keys=True))
        tmp.replace(marker)
    return len(todo)


def load_reference(root: Path, model_id: str) -> Classifier:
    """The model built directly from the store's files with plain torch and safetensors."""
    folder = root / model_id
    with torch.device("meta"):  # no random init: the weights come from the file
        model = Classifier(**json.loads((folder / "config.json").read_text()))
    model.load_state_dict(load_file(str(folder / "model.safetensors")), strict=True, assign=True)
    return model.eval()
