"""examples/ray_serve/app.py serves its store through the affinity router, over a handle and
over HTTP (the `serve run app:app` application, deployed in the session's cluster)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import torch

EXAMPLE = Path(__file__).resolve().parents[3] / "examples" / "ray_serve"
X = [[1.0, 2.0, 3.0, 4.0]]


def expected(model: torch.nn.Module) -> list[list[float]]:
    with torch.inference_mode():
        out: list[list[float]] = model(torch.tensor(X)).tolist()
    return out


async def test_example_app_serves_its_store(
    ray_cluster: int,
    deploy: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
) -> None:
    """The example's models answer by id through a handle and over HTTP; 404 for others."""
    monkeypatch.syspath_prepend(str(EXAMPLE))
    monkeypatch.setenv("MODELCACHE_STORE", f"file://{tmp_path}/{{model_id}}/")
    monkeypatch.setenv("MODELCACHE_DEVICE_BUDGET", "4KiB")
    monkeypatch.setenv("MODELCACHE_REPLICAS", "2")
    sys.modules.pop("app", None)
    app = importlib.import_module("app")
    writer = importlib.import_module("write_models")
    writer.write_models(tmp_path, 5)
    torch.manual_seed(3)
    reference = app.Classifier(4, 3)
    handle = deploy(app.app)
    answer = await handle.options(multiplexed_model_id="model-3").remote(X)
    assert answer["predictions"] == expected(reference)
    url = f"http://127.0.0.1:{ray_cluster}/{request.node.name}"
    async with aiohttp.ClientSession() as http:
        headers = {"serve_multiplexed_model_id": "model-3"}
        async with http.post(url, json={"instances": X}, headers=headers) as r:
            assert r.status == 200
            assert (await r.json())["predictions"] == expected(reference)
        headers = {"serve_multiplexed_model_id": "model-99"}
        async with http.post(url, json={"instances": X}, headers=headers) as r:
            assert r.status == 404
