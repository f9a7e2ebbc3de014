"""describe(): shared header checks, remembered failures, loads in flight, cancellation."""

from __future__ import annotations

import asyncio
from typing import Any

import anyio
import pytest

from modelcache import CacheClosedError, ModelBuildError, ModelCache, ModelNotFoundError
from modelcache._format import ModelInfo

from .conftest import GatedStore, MemoryModels, check_invariants, settle

#: `settle` counts worker threads.
pytestmark = pytest.mark.usefixtures("count_threads")


def store_calls(gated: GatedStore, model_id: str) -> int:
    """Store operations made for ``model_id``, of every kind."""
    return sum(n for (_, mid), n in gated.calls.items() if mid == model_id)


def describe_tasks() -> list[str]:
    return [t.get_name() for t in asyncio.all_tasks() if "describe" in t.get_name()]


async def test_concurrent_describes_of_one_id_share_one_header_read(
    models: MemoryModels, gated: GatedStore
) -> None:
    """50 concurrent describe() calls for one id read its headers once and all get them."""
    models.add("a", 1000)
    gated.gate("a", "read_range")
    infos: list[ModelInfo] = []

    async def describe() -> None:
        infos.append(await cache.describe("a"))

    async with ModelCache(gated, device_budget=4096) as cache:
        async with anyio.create_task_group() as tg:
            for _ in range(50):
                tg.start_soon(describe)
            await anyio.wait_all_tasks_blocked()
            gated.open("a", "read_range")
        assert len(infos) == 50 and all(i is infos[0] for i in infos)
        assert infos[0].nbytes == 1000
        assert store_calls(gated, "a") == 2  # the file's size, its header
        assert cache.stats().loads == 0
        check_invariants(cache)


async def test_concurrent_describes_of_an_unknown_id_share_one_check_and_remember_it(
    models: MemoryModels, gated: GatedStore
) -> None:
    """50 concurrent describe() calls for an unknown id make one check, and its answer is
    remembered: describe() raises it again without touching the store until failure_ttl."""
    gated.gate("missing", "size")
    errors: list[BaseException] = []

    async def describe() -> None:
        try:
            await cache.describe("missing")
        except ModelNotFoundError as exc:
            errors.append(exc)

    async with ModelCache(gated, device_budget=4096, failure_ttl=60) as cache:
        async with anyio.create_task_group() as tg:
            for _ in range(50):
                tg.start_soon(describe)
            await anyio.wait_all_tasks_blocked()
            gated.open("missing", "size")
        assert len(errors) == 50
        calls = store_calls(gated, "missing")
        assert calls == 2  # the single file, then the index
        for _ in range(10):
            with pytest.raises(ModelNotFoundError, match="'missing'"):
                await cache.describe("missing")
        assert store_calls(gated, "missing") == calls
        assert cache.stats().failures == 0  # describe() refusals are not failed use() calls


async def test_a_cancelled_describe_leaves_the_shared_check_to_the_others(
    models: MemoryModels, gated: GatedStore
) -> None:
    """A describe() cancelled by its caller's timeout does not cancel the read that the other
    callers of the same id share."""
    models.add("a", 1000)
    gated.gate("a", "read_range")
    got: list[ModelInfo] = []

    async def patient() -> None:
        got.append(await cache.describe("a"))

    async with ModelCache(gated, device_budget=4096) as cache:
        async with anyio.create_task_group() as tg:
            tg.start_soon(patient)
            with anyio.CancelScope() as impatient:
                tg.start_soon(patient)
                await anyio.wait_all_tasks_blocked()
                impatient.cancel()
                await cache.describe("a")
            await anyio.wait_all_tasks_blocked()
            gated.open("a", "read_range")
        assert len(got) == 2
        assert gated.calls[("read_range", "a")] == 1


async def test_describe_cancelled_by_every_caller_leaves_nothing_behind(
    models: MemoryModels, gated: GatedStore
) -> None:
    """When every caller of a check gives up (a stalled store), the check ends too: no task or
    table entry is left, nothing is remembered, and the next describe() reads afresh."""
    models.add("a", 1000)
    gated.gate("a", "read_range")
    async with ModelCache(gated, device_budget=4096) as cache:

        async def check(caller: anyio.CancelScope) -> None:
            with caller:
                await cache.describe("a")

        for _ in range(3):
            async with anyio.create_task_group() as tg:
                caller = anyio.CancelScope()
                tg.start_soon(check, caller)
                await settle()  # the check waits at the gated header read
                caller.cancel()  # the caller gives up (the adapter's timeout)
        await settle()
        assert describe_tasks() == []
        assert cache._checks._checks == {} and len(cache._failures.memory) == 0
        gated.open("a", "read_range")
        assert (await cache.describe("a")).nbytes == 1000
        assert gated.calls[("read_range", "a")] == 4


async def test_describe_uses_the_headers_of_a_load_in_flight(
    models: MemoryModels, gated: GatedStore
) -> None:
    """describe() of an id whose load has read its headers answers from them: no store read."""
    models.add("a", 1000)
    gated.gate("a", "read_into")
    async with ModelCache(gated, device_budget=4096) as cache:
        async with anyio.create_task_group() as tg:

            async def user() -> None:
                async with cache.use("a"):
                    pass

            tg.start_soon(user)
            await settle()  # the load waits at its gated weight read, its headers read
            before = store_calls(gated, "a")
            info = await cache.describe("a")
            assert (info.model_id, info.nbytes) == ("a", 1000)
            assert store_calls(gated, "a") == before
            gated.open("a", "read_into")
        check_invariants(cache)


async def test_describe_raises_a_failed_loads_header_errors_not_its_build_errors(
    models: MemoryModels, gated: GatedStore
) -> None:
    """A remembered load failure that any load would meet (missing files) answers describe()
    without a store read; a build failure does not: the headers are fine."""
    models.add("a", 1000)

    def broken(weights: Any, info: ModelInfo) -> Any:
        raise RuntimeError("boom")

    cache = ModelCache(gated, device_budget=4096, failure_ttl=60)

    @cache.model
    class Broken:
        from_weights = broken

    async with cache:
        with pytest.raises(ModelNotFoundError):
            async with cache.use("missing"):
                pass
        calls = store_calls(gated, "missing")
        with pytest.raises(ModelNotFoundError):
            await cache.describe("missing")
        assert store_calls(gated, "missing") == calls
        with pytest.raises(ModelBuildError):
            async with cache.use("a"):
                pass
        assert (await cache.describe("a")).nbytes == 1000


async def test_describe_needs_an_open_cache(models: MemoryModels) -> None:
    """describe() before `async with cache` or after it raises CacheClosedError."""
    models.add("a", 1000)
    cache = ModelCache(models.template, device_budget=4096)
    with pytest.raises(CacheClosedError):
        await cache.describe("a")
    async with cache:
        assert (await cache.describe("a")).nbytes == 1000
    with pytest.raises(CacheClosedError):
        await cache.describe("a")
