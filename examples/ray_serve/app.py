"""Every model of a store, served by 3 Ray Serve replicas that act as one cache.

Each replica owns a ModelCache; `CacheAffinityRouter` sends each model id to the replica that
holds it (a cold id to its rendezvous home, so it is loaded once), and spreads a hot model to
one more replica when its holders are full. Run it from this directory::

    python write_models.py models 50          # 50 small models under ./models (or use yours)
    serve run app:app                          # http://127.0.0.1:8000/
    curl -s -X POST http://127.0.0.1:8000/ -H 'serve_multiplexed_model_id: model-7' \\
        -d '{"instances": [[1, 2, 3, 4]]}'

or from Python: ``handle.options(multiplexed_model_id="model-7").remote([[1, 2, 3, 4]])``.

Settings come from the environment: ``MODELCACHE_STORE`` (a URL template with ``{model_id}``;
default ``./models``), ``MODELCACHE_DEVICE`` (``cpu``), ``MODELCACHE_DEVICE_BUDGET`` (``256MiB``
per replica), ``MODELCACHE_HOST_BUDGET`` (``0``), ``MODELCACHE_REPLICAS`` (``3``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from modelcache_ray import CachedModels, affinity_router_config
from ray import serve

HERE = Path(__file__).resolve().parent


class Classifier(torch.nn.Module):
    """A linear classifier; its config.json gives ``width`` and ``classes``."""

    def __init__(self, width: int = 4, classes: int = 3) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)  # type: ignore[no-any-return]


class Models(CachedModels):
    model_class = Classifier

    async def handle(self, model: Classifier, request: Any) -> Any:
        # Over HTTP, a starlette Request; through a handle, the instances themselves.
        instances = request if isinstance(request, list) else (await request.json())["instances"]
        with torch.inference_mode():
            out: list[list[float]] = model(torch.tensor(instances, dtype=torch.float32)).tolist()
        return {"predictions": out}


deployment = serve.deployment(
    num_replicas=int(os.environ.get("MODELCACHE_REPLICAS", "3")),
    # Concurrent requests for one model share its load: a replica can take many at once.
    max_ongoing_requests=32,
    ray_actor_options={"num_cpus": 0.25},
    request_router_config=affinity_router_config(),
)(Models)
app = deployment.bind(
    os.environ.get("MODELCACHE_STORE", f"file://{HERE / 'models'}/{{model_id}}/"),
    device=os.environ.get("MODELCACHE_DEVICE", "cpu"),
    device_budget=os.environ.get("MODELCACHE_DEVICE_BUDGET", "256MiB"),
    host_budget=os.environ.get("MODELCACHE_HOST_BUDGET", "0"),
)
