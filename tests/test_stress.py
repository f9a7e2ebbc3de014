"""Concurrent traffic under byte pressure: leases held across checkpoints, host prefetches (whose
disk copies pin host entries), explicit evictions, a disk tier, budgets of a few models. Every
run must finish: a load that waits for bytes forever (a livelock, a starved load, a victim never
chosen) fails it by the deadline."""

from __future__ import annotations

import contextlib
import random
from pathlib import Path

import anyio
import anyio.lowlevel
import pytest

from modelcache import LRUPolicy, ModelCache, ModelTooLargeError

from .conftest import MemoryModels, check_invariants


@pytest.mark.parametrize("seed", [0, 1, 2])
async def test_traffic_under_byte_pressure_always_finishes(
    models: MemoryModels, tmp_path: Path, seed: int
) -> None:
    """12 tasks x 25 operations over 30 models (Zipf-like) finish within the deadline, with
    every answer the right model and the accounting exact afterwards (seed 1 hung before the
    lease-before-eviction and fairness rules)."""
    rng = random.Random(seed)
    sizes = {f"m{i}": rng.choice((64, 100, 128, 200, 256, 300, 400)) for i in range(30)}
    for model_id, size in sizes.items():
        models.add(model_id, size)
    host_budget = rng.choice((0, 300, 700, 1500))
    cache = ModelCache(
        models.template,
        device_budget=rng.choice((400, 600, 900)),
        host_budget=host_budget,
        disk_dir=tmp_path / "disk",
        disk_budget=100_000,
        failure_ttl=0,
        policy=LRUPolicy(),
        host_policy=LRUPolicy(),
    )
    ids = sorted(sizes)
    weights = [1.0 / (i + 1) for i in range(len(ids))]

    async def worker(w: int) -> None:
        r = random.Random(seed * 1000 + w)
        for _ in range(25):
            op, model_id = r.random(), r.choices(ids, weights)[0]
            if op < 0.08 and host_budget:
                with contextlib.suppress(ModelTooLargeError):
                    await cache.prefetch([model_id], tier="host")
            elif op < 0.12:
                cache.evict(model_id)
            else:
                async with cache.use(model_id) as model:
                    assert model["w"].numel() == sizes[model_id]
                    for _ in range(r.randint(0, 6)):
                        await anyio.lowlevel.checkpoint()

    async with cache:
        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                for w in range(12):
                    tg.start_soon(worker, w)
        await cache.wait_idle()
        check_invariants(cache)
