"""examples/kserve_predictor: its model class's hooks, configured from environment variables."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from conftest import EXAMPLE, Server


@pytest.fixture(scope="module")
def example_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    store = tmp_path_factory.mktemp("example-store")
    spec = importlib.util.spec_from_file_location("predictor", EXAMPLE / "predictor.py")
    assert spec is not None
    assert spec.loader is not None
    predictor = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(predictor)
    predictor.write_example_store(store, count=3)
    env = {
        "MODELCACHE_STORE": f"file://{store}/{{model_id}}/",
        "MODELCACHE_MODEL_CLASS": "predictor:Classifier",
        "MODELCACHE_DEVICE_BUDGET": "64KiB",
        "MODELCACHE_PER_MODEL_METRICS": "1",
    }
    log: Path = tmp_path_factory.mktemp("example-logs") / "server.log"
    srv = Server(log, [], env=env, cwd=EXAMPLE)
    yield srv
    assert srv.stop() == 0, log.read_text()[-4000:]


async def test_example_hooks_shape_the_answers(example_server: Server) -> None:
    """The example's preprocess/predict/postprocess answer labels and scores over V1 and V2;
    its preprocess's ValueError answers 400; flags came from MODELCACHE_* variables."""
    url = example_server.url
    row = [[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]]
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{url}/v1/models/sentiment-1:predict", json={"instances": row}) as r:
            assert (r.status, r.headers["modelcache-tier"]) == (200, "store")
            body = await r.json()
        assert body["predictions"][0] in ("negative", "neutral", "positive")
        assert 0 < body["scores"][0] <= 1
        v2 = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 8], "data": row[0]}]}
        async with s.post(f"{url}/v2/models/sentiment-0/infer", json={**v2, "id": "q"}) as r:
            assert r.status == 200, await r.text()
            body = await r.json()
        assert body["id"] == "q"
        assert [o["name"] for o in body["outputs"]] == ["label", "score"]
        assert body["outputs"][0]["data"][0] in ("negative", "positive")
        async with s.post(f"{url}/v1/models/sentiment-0:predict", json={"instances": [[1]]}) as r:
            assert r.status == 400
            assert "expected rows of 8 features" in (await r.json())["error"]
        async with s.get(f"{url}/metrics") as r:
            text = await r.text()
        assert 'modelcache_model_loads_total{cache="default",model="sentiment-1"} 1.0' in text
