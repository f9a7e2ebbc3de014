"""Several replicas on a real local Ray cluster behave as one cache (issue 15's tests 1-5)."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Set as AbstractSet
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import ray
from conftest import TINY_BYTES, expected, store_of
from mc_models import predict_app
from modelcache_ray import Residency

from modelcache import InvalidModelIdError, ModelFormatError, ModelNotFoundError

X = [[1.0, 2.0, 3.0, 4.0]]


def replica_actors(app: str) -> dict[str, Any]:
    """The live replica actors of ``app``'s deployment, by replica id."""
    return {
        a["name"].rsplit("#", 1)[1]: ray.get_actor(a["name"], namespace="serve")
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["name"].startswith(f"SERVE_REPLICA::{app}#")
    }


def stats_of(actor: Any) -> dict[str, Any]:
    """A replica's routing stats, asked now (its cache's counters among them)."""
    out: dict[str, Any] = ray.get(actor.record_routing_stats.remote())
    return out


def cluster_stats(app: str) -> list[dict[str, Any]]:
    """Every live replica's routing stats."""
    return [stats_of(a) for a in replica_actors(app).values()]


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


def zipf_ids(n: int, count: int, seed: int) -> list[str]:
    """``count`` draws of m0..m{n-1} with Zipf(1.0) weights."""
    rng = random.Random(seed)
    return rng.choices(
        [f"m{i}" for i in range(n)], weights=[1 / (i + 1) for i in range(n)], k=count
    )


async def stream(handle: Any, ids: list[str], concurrency: int = 16) -> list[dict[str, Any]]:
    """Ask for each id in turn, ``concurrency`` at a time; check every answer."""
    gate = asyncio.Semaphore(concurrency)

    async def one(model_id: str) -> dict[str, Any]:
        async with gate:
            answer = await ask(handle, model_id)
        assert answer["predictions"] == expected(model_id, X), model_id
        return answer

    return await asyncio.gather(*(one(m) for m in ids))


async def test_each_request_goes_to_the_replica_chosen_for_its_model(
    deploy: Any, store: Path, request: Any
) -> None:
    """Many concurrent requests for many cold ids, every budget room for all: each id is loaded
    exactly once cluster-wide (a replica chosen for one id is never handed to a request for
    another, as Ray's FIFOMixin would)."""
    handle = deploy(predict_app(store_of(store), device_budget=40 * TINY_BYTES))
    ids = [f"m{i}" for i in range(40)] * 5
    random.Random(3).shuffle(ids)
    await stream(handle, ids, concurrency=100)
    assert sum(s["loads"] for s in cluster_stats(request.node.name)) == 40


async def test_budgets_add_up_across_replicas(deploy: Any, store: Path, request: Any) -> None:
    """30 models that fit the three budgets together but not one: after warm-up, the cluster
    hits nearly every request (each model lives on one replica, none thrashes)."""
    handle = deploy(predict_app(store_of(store), device_budget=18 * TINY_BYTES))
    app = request.node.name
    await stream(handle, [f"m{i}" for i in range(30)] + zipf_ids(30, 200, seed=1))
    before = cluster_stats(app)
    await stream(handle, zipf_ids(30, 400, seed=2))
    after = cluster_stats(app)
    hits = sum(a["hits"] for a in after) - sum(b["hits"] for b in before)
    misses = sum(a["misses"] for a in after) - sum(b["misses"] for b in before)
    assert hits + misses == 400
    assert hits / 400 >= 0.98
    assert sum(a["loads"] for a in after) <= 32  # each model loaded about once in all


async def test_killed_replica_models_reload_elsewhere(
    deploy: Any, store: Path, request: Any
) -> None:
    """A replica killed mid-stream: every later answer is right, and the models it held are
    loaded by the replicas left (or its replacement) on their next requests."""
    handle = deploy(predict_app(store_of(store), device_budget=20 * TINY_BYTES))
    app = request.node.name
    ids = [f"m{i}" for i in range(12)]
    await stream(handle, ids * 2)
    held_by = {name: residency(stats_of(a)) for name, a in replica_actors(app).items()}
    victim = max(held_by, key=lambda name: len(held_by[name]))
    lost = held_by[victim]
    assert lost  # it held some of the models
    ray.kill(replica_actors(app)[victim], no_restart=True)
    await stream(handle, ids * 3)
    live = [a for name, a in replica_actors(app).items() if name != victim]
    held = frozenset().union(*(residency(stats_of(a)) for a in live))
    assert lost <= held


async def test_hot_model_with_slow_handler_spreads(deploy: Any, store: Path, request: Any) -> None:
    """One very hot model whose holder stays full is served by more than one replica, each
    copy loaded once."""
    handle = deploy(
        predict_app(
            store_of(store), device_budget=10 * TINY_BYTES, max_ongoing_requests=2, delay_s=0.2
        )
    )
    answers = await stream(handle, ["m7"] * 40, concurrency=40)
    assert len({a["replica"] for a in answers}) > 1
    stats = cluster_stats(request.node.name)
    assert sum(s["loads"] for s in stats) == len({a["replica"] for a in answers})


async def test_hot_model_gets_copies_before_its_holder_queues(
    deploy: Any, store: Path, request: Any
) -> None:
    """A model with two thirds of the requests, from 4 clients (its holder never near full),
    is served by more than one replica, each copy loaded once; lukewarm models (~3% each) stay
    on one replica each."""
    handle = deploy(predict_app(store_of(store), device_budget=40 * TINY_BYTES, share_half_life=50))
    lukewarm = [f"m{i}" for i in range(2, 14)]
    ids = [m for i in range(80) for m in ("m1", "m1", lukewarm[i % len(lukewarm)])]
    answers = await stream(handle, ids, concurrency=4)
    served_by: dict[str, set[str]] = {}
    for model_id, answer in zip(ids, answers, strict=True):
        served_by.setdefault(model_id, set()).add(answer["replica"])
    assert len(served_by["m1"]) > 1
    assert all(len(served_by[m]) == 1 for m in lukewarm)
    loads = sum(s["loads"] for s in cluster_stats(request.node.name))
    assert loads == len(lukewarm) + len(served_by["m1"])


async def test_unknown_id_is_a_typed_error_and_404(
    deploy: Any, store: Path, ray_cluster: int, request: Any
) -> None:
    """An id not in the store: a handle caller gets ModelNotFoundError, an HTTP caller 404;
    a request with no id gets InvalidModelIdError / 400."""
    # One replica: the errors are the replica's; routing has its own tests.
    handle = deploy(predict_app(store_of(store), replicas=1, device_budget=10 * TINY_BYTES))
    with pytest.raises(ModelNotFoundError) as caught:
        await ask(handle, "no-such-model")
    assert "no-such-model" in str(caught.value)
    with pytest.raises(InvalidModelIdError):
        await handle.remote(X)
    url = f"http://127.0.0.1:{ray_cluster}/{request.node.name}"
    body = {"instances": X}
    async with aiohttp.ClientSession() as http:
        async with http.post(url, json=body, headers={SERVE_ID: "no-such-model"}) as r:
            assert r.status == 404
            assert (await r.json())["model_id"] == "no-such-model"
        async with http.post(url, json=body) as r:
            assert r.status == 400
        async with http.post(url, json=body, headers={SERVE_ID: "m3"}) as r:
            assert r.status == 200
            assert (await r.json())["predictions"] == expected("m3", X)


async def test_failed_load_reaches_the_caller_and_the_id_recovers(deploy: Any, store: Path) -> None:
    """A load that fails answers its typed error (not a hang); once the files are fixed the
    same id is served: the router keeps routing it (no black hole)."""
    handle = deploy(
        predict_app(store_of(store), replicas=2, device_budget=10 * TINY_BYTES, failure_ttl=0)
    )
    good = (store / "m4" / "model.safetensors").read_bytes()
    (store / "m4" / "model.safetensors").write_bytes(b"not safetensors")
    for _ in range(3):
        with pytest.raises(ModelFormatError):
            await ask(handle, "m4")
    (store / "m4" / "model.safetensors").write_bytes(good)
    assert (await ask(handle, "m4"))["predictions"] == expected("m4", X)


SERVE_ID = "serve_multiplexed_model_id"


def residency(stats: dict[str, Any]) -> AbstractSet[int]:
    """The hashes of the ids on a replica's device."""
    return Residency.from_stats(stats).device
