"""Several replicas on a real local Ray cluster behave as one cache (issue 15's tests 1-5)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import ray
from conftest import TINY_BYTES, expected, store_of
from mc_models import predict_app

X = [[1.0, 2.0, 3.0, 4.0]]


def replica_actors(app: str) -> list[Any]:
    """The live replica actors of ``app``'s deployment."""
    names = [
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["name"].startswith(f"SERVE_REPLICA::{app}#")
    ]
    return [ray.get_actor(n, namespace="serve") for n in names]


def cluster_stats(app: str) -> list[dict[str, Any]]:
    """Every replica's routing stats (its cache's counters among them)."""
    return [ray.get(a.record_routing_stats.remote()) for a in replica_actors(app)]


async def ask(handle: Any, model_id: str) -> dict[str, Any]:
    out: dict[str, Any] = await handle.options(multiplexed_model_id=model_id).remote(X)
    return out


async def test_concurrent_first_requests_load_once_cluster_wide(
    deploy: Any, store: Path, request: Any
) -> None:
    """200 concurrent first requests for one cold id make exactly one load, summed over replicas."""
    handle = deploy(predict_app(store_of(store), device_budget=10 * TINY_BYTES))
    answers = await asyncio.gather(*(ask(handle, "m1") for _ in range(200)))
    assert all(a["predictions"] == expected("m1", X) for a in answers)
    stats = cluster_stats(request.node.name)
    assert len(stats) == 3
    assert sum(s["loads"] for s in stats) == 1
    assert len({a["replica"] for a in answers}) == 1
