"""The model class and deployments the tests' replicas run (imported by them by module name)."""

from __future__ import annotations

import asyncio
from typing import Any

import torch
from modelcache_ray import CachedModels, affinity_router_config
from ray import serve


class Tiny(torch.nn.Module):
    """y = x @ W.T + b: small enough that a store of dozens costs nothing."""

    def __init__(self, width: int = 4, classes: int = 3) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)  # type: ignore[no-any-return]


class Predict(CachedModels):
    """Answers a list of instances with the model's outputs, as nested lists; over HTTP the
    body is ``{"instances": [...]}``. ``delay_s`` (an init option) makes every call slow."""

    model_class = Tiny

    def __init__(self, store: Any, *, delay_s: float = 0.0, **options: Any) -> None:
        super().__init__(store, **options)
        self.delay_s = delay_s

    async def handle(self, model: Tiny, request: Any) -> Any:
        if not isinstance(request, list):
            request = (await request.json())["instances"]
        if self.delay_s:
            await asyncio.sleep(self.delay_s)  # a slow handler: work, not test ordering
        with torch.inference_mode():
            out: list[list[float]] = model(torch.tensor(request, dtype=torch.float32)).tolist()
        return {"predictions": out, "replica": serve.get_replica_context().replica_id.unique_id}


def predict_app(
    store: str,
    *,
    replicas: int = 3,
    max_ongoing_requests: int = 256,
    router: bool = True,
    spread_queue_len: int | None = None,
    patience_s: float = 60.0,
    hot_share: float | None = 0.25,
    share_half_life: int = 1000,
    **options: Any,
) -> Any:
    """A `Predict` application over ``store`` (options: the cache's and ``delay_s``).

    ``patience_s`` is long: on a loaded 2-core machine a probe of a replica's queue can time out
    and the request wait for a retry; it must not fall through to any replica (and load its
    model there) because the machine is slow. The patience rule has its own unit test."""
    config: dict[str, Any] = {}
    if router:
        config["request_router_config"] = affinity_router_config(
            stats_period_s=0.2,
            spread_queue_len=spread_queue_len,
            patience_s=patience_s,
            hot_share=hot_share,
            share_half_life=share_half_life,
        )
    deployment = serve.deployment(
        num_replicas=replicas,
        max_ongoing_requests=max_ongoing_requests,
        ray_actor_options={"num_cpus": 0.1},
        **config,
    )(Predict)
    return deployment.bind(store, **options)
