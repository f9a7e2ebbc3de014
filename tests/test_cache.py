"""ModelCache behaviour: single-flight, leases, budget, failures, cancellation, closing."""

from __future__ import annotations

import asyncio
import gc
import sys
import threading
import traceback
import weakref
from typing import Any

import anyio
import anyio.lowlevel
import pytest
import torch

import modelcache._failures
from modelcache import (
    CacheClosedError,
    InvalidModelIdError,
    LRUPolicy,
    ModelBuildError,
    ModelCache,
    ModelNotFoundError,
    ModelTooLargeError,
    Store,
    Weights,
)
from modelcache._format import ModelInfo
from modelcache._torch import TorchBackend

from .conftest import GatedStore, MemoryModels, check_invariants, settle

#: `settle` counts worker threads.
pytestmark = pytest.mark.usefixtures("count_threads")


async def test_use_loads_once_then_hits(models: MemoryModels) -> None:
    """The first use loads; later uses are hits on the same object."""
    models.add("a", 1000)
    async with ModelCache(models.template, device_budget=4096) as cache:
        async with cache.use("a") as first:
            assert isinstance(first, Weights)
            assert first["w"].shape == (1000,)
        async with cache.use("a") as second:
            assert second is first
        stats = cache.stats()
        assert (stats.loads, stats.misses, stats.hits) == (1, 1, 1)
        assert stats.bytes_resident == stats.bytes_reserved == 1000
        assert "1 models" in repr(cache)
        check_invariants(cache)


async def test_single_flight_under_1000_waiters(models: MemoryModels, gated: GatedStore) -> None:
    """1,000 concurrent first uses of one id make one load and all get the same model."""
    models.add("a", 1000)
    gated.gate("a", "read_into")
    got: list[Any] = []

    async def user() -> None:
        async with cache.use("a") as m:
            got.append(m)

    async with ModelCache(gated, device_budget=4096) as cache, anyio.create_task_group() as tg:
        for _ in range(1000):
            tg.start_soon(user)
        await anyio.wait_all_tasks_blocked()
        stats = cache.stats()
        assert (stats.loading, stats.waiters, stats.misses) == (1, 1000, 1000)
        check_invariants(cache)
        gated.open("a", "read_into")
    assert len(got) == 1000 and all(m is got[0] for m in got)
    assert cache.stats().loads == 1
    assert gated.calls[("read_into", "a")] == 1


async def test_different_ids_load_concurrently_up_to_the_limit(
    models: MemoryModels, gated: GatedStore
) -> None:
    """Loads of different ids overlap, at most max_concurrent_loads reading at once."""
    for i in range(5):
        models.add(f"m{i}", 100)
        gated.gate(f"m{i}", "read_into")

    async def user(i: int) -> None:
        async with cache.use(f"m{i}"):
            pass

    async with ModelCache(gated, device_budget=4096, max_concurrent_loads=3) as cache:
        async with anyio.create_task_group() as tg:
            for i in range(5):
                tg.start_soon(user, i)
            await anyio.wait_all_tasks_blocked()
            reading = [i for i in range(5) if gated.calls[("read_into", f"m{i}")]]
            assert len(reading) == 3
            assert cache.stats().loading == 5
            for i in range(5):
                gated.open(f"m{i}", "read_into")
        assert cache.stats().loads == 5


async def test_lru_evicts_unleased_only(models: MemoryModels) -> None:
    """Making room evicts the least recently used unleased model, never a leased one."""
    for name in "abc":
        models.add(name, 1000)
    async with ModelCache(models.template, device_budget=2000, policy=LRUPolicy()) as cache:
        async with cache.use("a"):
            async with cache.use("b"):
                pass
            async with cache.use("c"):  # b is the only unleased one
                assert sorted(cache.resident()) == ["a", "c"]
                check_invariants(cache)
        assert cache.stats().evictions == 1


async def test_lru_order_follows_use(models: MemoryModels) -> None:
    """The victim is the model used longest ago: not the one loaded first, nor the one used
    least often (b is used more often than a, but longer ago; the default cost-aware policy
    would keep b)."""
    for name in "abc":
        models.add(name, 1000)
    async with ModelCache(models.template, device_budget=2000, policy=LRUPolicy()) as cache:
        for name in "abbba":
            async with cache.use(name):
                pass
        async with cache.use("c"):
            pass
        assert sorted(cache.resident()) == ["a", "c"]


async def test_load_waits_while_every_byte_is_leased(models: MemoryModels) -> None:
    """A load that finds every byte leased waits for a release, then proceeds."""
    models.add("a", 1000)
    models.add("b", 1000)
    async with ModelCache(models.template, device_budget=1500) as cache:
        lease = cache.use("a")
        await lease.__aenter__()
        done = anyio.Event()

        async def want_b() -> None:
            async with cache.use("b"):
                done.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(want_b)
            await anyio.wait_all_tasks_blocked()
            assert not done.is_set()
            assert cache.stats().loading == 1
            assert cache.stats().bytes_reserved == 1000
            check_invariants(cache)
            await lease.__aexit__(None, None, None)
        assert done.is_set()
        assert cache.resident() == ["b"]


async def test_caller_bounds_the_wait_with_fail_after(models: MemoryModels) -> None:
    """A caller's timeout ends its wait; the abandoned load frees its place in line."""
    models.add("a", 1000)
    models.add("b", 1000)
    async with ModelCache(models.template, device_budget=1500) as cache:
        async with cache.use("a"):
            with pytest.raises(TimeoutError):
                with anyio.fail_after(0.05):
                    async with cache.use("b"):
                        pass
            await cache.wait_idle()  # b's header read may still be in a thread
            assert cache.stats().loading == 0
            assert cache.stats().bytes_reserved == 1000
            check_invariants(cache)
        async with cache.use("b"):
            assert cache.resident() == ["b"]


async def test_a_model_loaded_for_a_waiting_caller_is_leased_before_anything_evicts_it(
    models: MemoryModels, gated: GatedStore
) -> None:
    """A load that finished for a waiting caller is leased by it before any eviction (no livelock)."""
    models.add("a", 1000)
    models.add("b", 1000)
    gated.gate("a", "read_into")  # weight reads slower than header reads, as on remote stores
    gated.gate("b", "read_into")
    entered = {"a": anyio.Event(), "b": anyio.Event()}
    release = {"a": anyio.Event(), "b": anyio.Event()}

    async def user(model_id: str) -> None:
        async with cache.use(model_id):
            entered[model_id].set()
            await release[model_id].wait()

    async with ModelCache(gated, device_budget=1500) as cache, anyio.create_task_group() as tg:
        tg.start_soon(user, "a")
        await anyio.wait_all_tasks_blocked()
        tg.start_soon(user, "b")  # headers read, then waits in line for a's bytes
        await anyio.wait_all_tasks_blocked()
        gated.open("a", "read_into")
        await settle()
        assert entered["a"].is_set(), "a was evicted before its caller could lease it"
        stats = cache.stats()
        assert (stats.loads, stats.evictions, stats.leased, stats.loading) == (1, 0, 1, 1)
        check_invariants(cache)
        release["a"].set()  # now a may go, and b gets its bytes
        await settle()
        gated.open("b", "read_into")
        await settle()
        assert entered["b"].is_set()
        assert gated.calls[("read_into", "a")] == 1
        release["b"].set()


async def test_new_leases_on_a_victim_wait_so_a_waiting_load_gets_its_bytes(
    models: MemoryModels,
) -> None:
    """Once a victim is chosen for a waiting load, new uses of it wait: the load is not starved."""
    for name in "abc":
        models.add(name, 1000)
    entered: dict[str, list[anyio.Event]] = {name: [] for name in "abc"}
    releases: dict[str, list[anyio.Event]] = {name: [] for name in "abc"}
    buffers: dict[str, weakref.ref[Any]] = {}

    async def user(model_id: str, inside: anyio.Event, release: anyio.Event) -> None:
        async with cache.use(model_id) as weights:
            buffers.setdefault(model_id, weakref.ref(weights.buffer))
            del weights
            inside.set()
            await release.wait()

    def start(model_id: str) -> int:
        inside, release = anyio.Event(), anyio.Event()
        entered[model_id].append(inside)
        releases[model_id].append(release)
        tg.start_soon(user, model_id, inside, release)
        return len(entered[model_id]) - 1

    cache = ModelCache(models.template, device_budget=2000, policy=LRUPolicy())
    async with cache, anyio.create_task_group() as tg:
        start("a")
        await settle()  # loaded (and leased) before b: loads race otherwise
        start("b")  # a is now the least recently used: the victim for c
        await settle()
        start("c")
        await settle()
        assert not entered["c"][0].is_set() and cache.stats().loading == 1
        # Steady, overlapping traffic on both resident models: before, a never drained.
        start("a")
        start("b")
        await settle()
        assert entered["b"][1].is_set(), "b was not chosen: its uses stay hits"
        assert not entered["a"][1].is_set(), "a new lease on the victim was handed out"
        releases["a"][0].set()  # the last lease on a that was held when c queued
        await settle()
        assert entered["c"][0].is_set()
        assert sorted(cache.resident()) == ["b", "c"]
        assert not entered["a"][1].is_set()  # a reloads, queued behind c, as a new load
        stats = cache.stats()
        assert (stats.loading, stats.evictions, stats.bytes_reserved) == (1, 1, 2000)
        gc.collect()
        assert buffers["a"]() is None, "the evicted victim's buffer is still alive"
        check_invariants(cache)
        releases["c"][0].set()
        await settle()
        assert entered["a"][1].is_set()
        assert sorted(cache.resident()) == ["a", "b"]
        check_invariants(cache)
        for events in releases.values():
            for release in events:
                release.set()


async def test_a_task_holding_a_victim_is_served_its_nested_use_of_it(
    models: MemoryModels,
) -> None:
    """A nested use of a model the task holds is served even once it is a victim (no self-wait)."""
    models.add("a", 400)
    models.add("c", 700)

    async def use_c() -> None:
        async with cache.use("c"):
            c_entered.set()

    c_entered = anyio.Event()
    cache = ModelCache(models.template, device_budget=1000, policy=LRUPolicy())
    async with cache, anyio.create_task_group() as tg:
        async with cache.use("a") as outer:
            tg.start_soon(use_c)  # c needs a's bytes: a is chosen as its victim
            await settle()
            assert cache.tier_of("a") is None  # draining
            with anyio.fail_after(5):  # before the fix: waited for its own lease forever
                async with cache.use("a") as inner:
                    assert inner is outer
            assert not c_entered.is_set()
        await settle()
        assert c_entered.is_set()
        assert cache.stats().loads == 2
        check_invariants(cache)


async def test_a_task_holding_a_lease_is_served_a_second_resident_victim(
    models: MemoryModels,
) -> None:
    """Holding a victim, a task's use of another resident victim is a hit: it is not evicted
    for a load that still waits for the task's own lease (that was a deadlock)."""
    for name in "ab":
        models.add(name, 400)
    models.add("c", 700)

    async def use_c() -> None:
        async with cache.use("c"):
            c_entered.set()

    c_entered = anyio.Event()
    cache = ModelCache(models.template, device_budget=1000, policy=LRUPolicy())
    async with cache, anyio.create_task_group() as tg:
        async with cache.use("a"), cache.use("b"):
            pass
        async with cache.use("a"):
            tg.start_soon(use_c)  # c needs 700: a (leased) and b (not) are its victims
            await settle()
            assert sorted(cache.resident()) == ["a", "b"]  # b is not evicted before it helps
            with anyio.fail_after(5):  # before the fix: b was gone, its load queued behind c
                async with cache.use("b"):
                    pass
        await settle()
        assert c_entered.is_set()
        assert cache.stats().loads == 3
        check_invariants(cache)


async def test_waiting_loads_get_their_bytes_first_come_first_served(
    models: MemoryModels,
) -> None:
    """Loads waiting for bytes are granted in the order they queued, whatever their size."""
    models.add("big", 1000)
    models.add("c", 1000)
    models.add("small", 100)
    order: list[str] = []

    async def user(model_id: str) -> None:
        async with cache.use(model_id):
            order.append(model_id)

    cache = ModelCache(models.template, device_budget=1500)
    async with cache, anyio.create_task_group() as tg:
        lease = cache.use("big")
        await lease.__aenter__()
        tg.start_soon(user, "c")
        await settle()
        tg.start_soon(user, "small")  # fits now, but c queued first
        await settle()
        assert order == []
        await lease.__aexit__(None, None, None)
        await settle()
        assert order == ["c", "small"]
        check_invariants(cache)


@pytest.mark.parametrize("point", ["size", "read_range"])
async def test_a_load_whose_callers_left_before_it_reserved_evicts_nothing(
    models: MemoryModels, gated: GatedStore, point: str
) -> None:
    """A load every caller left during its header read stops there: no bytes, no eviction."""
    models.add("a", 600)
    models.add("b", 600)
    async with ModelCache(gated, device_budget=1000) as cache:
        async with cache.use("a"):
            pass
        gated.gate("b", point)
        async with anyio.create_task_group() as tg:
            caller = anyio.CancelScope()

            async def use_b() -> None:
                with caller:
                    async with cache.use("b"):
                        pass

            tg.start_soon(use_b)
            await settle()  # the load waits at the gated header read
            assert gated.calls[(point, "b")] == 1 and cache.stats().loading == 1
            caller.cancel()
        gated.open("b", point)
        await settle()
        stats = cache.stats()
        assert cache.resident() == ["a"]
        assert (stats.evictions, stats.loading, stats.loads, stats.failures) == (0, 0, 1, 0)
        assert stats.bytes_reserved == 600
        assert gated.calls[("read_into", "b")] == 0
        check_invariants(cache)


async def test_a_load_abandoned_while_waiting_to_read_weights_gives_its_bytes_back(
    models: MemoryModels, gated: GatedStore
) -> None:
    """A load whose callers left while it waited for a slot to read weights frees its bytes."""
    for name, nbytes in (("y", 100), ("x", 600), ("z", 100)):
        models.add(name, nbytes)
    gated.gate("y", "read_into")
    gated.gate("z", "size")
    gated.gate("x", "size")
    async with ModelCache(gated, device_budget=1000, max_concurrent_loads=2) as cache:
        async with anyio.create_task_group() as tg:
            tg.start_soon(cache.prefetch, ["y"])  # holds one slot, reading weights
            await anyio.wait_all_tasks_blocked()
            x_scope = anyio.CancelScope()

            async def use_x() -> None:
                with x_scope:
                    async with cache.use("x"):
                        pass

            tg.start_soon(use_x)  # holds the other slot, reading its header
            await anyio.wait_all_tasks_blocked()
            tg.start_soon(cache.prefetch, ["z"])  # queued for a slot
            await anyio.wait_all_tasks_blocked()
            gated.open("x", "size")  # x reserves its bytes; z takes the slot, reads its header
            await settle()
            assert cache.stats().bytes_reserved == 700 and gated.calls[("size", "z")] == 1
            x_scope.cancel()
            await anyio.wait_all_tasks_blocked()
            stats = cache.stats()
            assert (stats.bytes_reserved, stats.loading) == (100, 2)
            check_invariants(cache)
            gated.open("y", "read_into")
            gated.open("z", "size")
        assert sorted(cache.resident()) == ["y", "z"]
    assert gated.calls[("read_into", "x")] == 0


async def test_abandoned_loads_never_take_the_load_limiter(
    models: MemoryModels, gated: GatedStore
) -> None:
    """Loads whose callers all left are dropped at once: the backlog is only loads still wanted."""
    models.add("blocker", 100)
    models.add("fresh", 100)
    gated.gate("blocker", "size")  # holds the only load slot, as a stalled store does
    cache = ModelCache(gated, device_budget=4096, max_concurrent_loads=1)
    async with cache, anyio.create_task_group() as tg:
        tg.start_soon(cache.prefetch, ["blocker"])
        await anyio.wait_all_tasks_blocked()
        for i in range(50):  # ids that exist or not: the callers give up (a 503 upstream)
            if i % 2:
                models.add(f"m{i}", 100)
            with anyio.move_on_after(0):
                async with cache.use(f"m{i}"):
                    pass
        await anyio.wait_all_tasks_blocked()
        assert cache.stats().loading == 1  # only the blocker: the abandoned loads are gone
        fresh_done = anyio.Event()

        async def use_fresh() -> None:
            async with cache.use("fresh"):
                fresh_done.set()

        tg.start_soon(use_fresh)
        await anyio.wait_all_tasks_blocked()
        gated.open("blocker", "size")
        await cache.wait_idle()
        assert fresh_done.is_set()
        abandoned = {mid for (_, mid) in gated.calls} - {"blocker", "fresh"}
        assert abandoned == set(), "loads nobody waited for read the store"
        stats = cache.stats()
        assert (stats.loading, stats.failures, stats.loads) == (0, 0, 2)
        check_invariants(cache)


async def test_a_header_read_stalled_on_the_store_is_dropped_when_its_callers_leave(
    models: MemoryModels, gated: GatedStore
) -> None:
    """A header read nobody waits for any more is cancelled, not left to hold a load slot until
    the store answers: with one slot, a stalled read of an abandoned id blocks no other load."""
    models.add("stalled", 100)
    models.add("fresh", 100)
    gated.gate("stalled", "size")  # the store never answers for it
    cache = ModelCache(gated, device_budget=4096, max_concurrent_loads=1)
    async with cache, anyio.create_task_group() as tg:
        caller = anyio.CancelScope()

        async def use_stalled() -> None:
            with caller:
                async with cache.use("stalled"):
                    pass

        tg.start_soon(use_stalled)
        await anyio.wait_all_tasks_blocked()
        assert gated.calls[("size", "stalled")] == 1  # its header read is waiting on the store
        caller.cancel()  # the caller gives up (a 503 upstream)
        await anyio.wait_all_tasks_blocked()
        assert cache.stats().loading == 0
        with anyio.fail_after(5):
            async with cache.use("fresh"):
                pass
        stats = cache.stats()
        assert (stats.loading, stats.loads, stats.load_failures) == (0, 1, 0)
        check_invariants(cache)
        gated.open("stalled", "size")


async def test_model_larger_than_budget_fails_at_once(models: MemoryModels) -> None:
    """A model over the whole budget fails with ModelTooLargeError, reserving nothing."""
    models.add("big", 5000)
    models.add("small", 100)
    async with ModelCache(models.template, device_budget=4096) as cache:
        async with cache.use("small"):
            pass
        with pytest.raises(ModelTooLargeError, match="'big'"):
            async with cache.use("big"):
                pass
        assert cache.stats().bytes_reserved == 100
        async with cache.use("small"):
            pass
        check_invariants(cache)


async def test_failure_reaches_every_waiter_and_is_remembered(
    models: MemoryModels, gated: GatedStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failed load raises in all its waiters, reserves nothing, and fails fast for a while."""
    models.add("a", 100)
    models.add("ok", 100)
    calls = 0

    @staticmethod  # type: ignore[misc]
    def broken(weights: Weights, info: ModelInfo) -> Any:
        nonlocal calls
        calls += 1
        raise RuntimeError("boom")

    gated.gate("a", "read_into")
    errors: list[BaseException] = []

    async def user() -> None:
        try:
            async with cache.use("a"):
                pass
        except ModelBuildError as exc:
            errors.append(exc)

    cache = ModelCache(gated, device_budget=4096, failure_ttl=30)

    @cache.model
    class Broken:
        from_weights = broken

    async with cache:
        async with anyio.create_task_group() as tg:
            for _ in range(10):
                tg.start_soon(user)
            await anyio.wait_all_tasks_blocked()
            gated.open("a", "read_into")
        assert len(errors) == 10 and calls == 1
        assert "'a'" in str(errors[0]) and "boom" in str(errors[0])
        assert isinstance(errors[0].__cause__, RuntimeError)
        stats = cache.stats()
        assert (stats.bytes_reserved, stats.loading, stats.failures) == (0, 0, 1)
        with pytest.raises(ModelBuildError):  # remembered: no new load
            async with cache.use("a"):
                pass
        assert calls == 1 and cache.stats().failures == 2
        now = modelcache._failures.clock()
        monkeypatch.setattr(modelcache._failures, "clock", lambda: now + 31)
        with pytest.raises(ModelBuildError):  # forgotten after failure_ttl: tried again
            async with cache.use("a"):
                pass
        assert calls == 2
        check_invariants(cache)


async def test_missing_model_and_bad_ids(models: MemoryModels) -> None:
    """Missing models and unsafe ids raise typed errors; other models are still served."""
    models.add("ok", 100)
    async with ModelCache(models.template, device_budget=4096) as cache:
        with pytest.raises(ModelNotFoundError, match="'nope'") as info:
            async with cache.use("nope"):
                pass
        assert isinstance(info.value, KeyError)
        for bad in ("../ok", "/etc", "a/b", "s3://x", "a\x00", "x" * 500):
            with pytest.raises(InvalidModelIdError):
                async with cache.use(bad):
                    pass
        async with cache.use("ok") as w:
            assert len(w) == 1
        assert cache.stats().bytes_reserved == 100
        check_invariants(cache)


@pytest.mark.parametrize("point", ["size", "read_range", "reserve", "read_into"])
async def test_cancelled_waiters_leave_state_consistent(
    models: MemoryModels, gated: GatedStore, point: str
) -> None:
    """Cancelling waiters at any await of a load leaves the load going for the others."""
    models.add("a", 1000)
    models.add("blocker", 1000)
    async with ModelCache(gated, device_budget=1500) as cache:
        blocker = cache.use("blocker")
        if point == "reserve":
            await blocker.__aenter__()
        else:
            gated.gate("a", point)
        got: list[Any] = []

        async def user() -> None:
            async with cache.use("a") as m:
                got.append(m)

        async with anyio.create_task_group() as tg:
            scopes = []
            for _ in range(3):
                scope = anyio.CancelScope()
                scopes.append(scope)

                async def run(scope: anyio.CancelScope = scope) -> None:
                    with scope:
                        await user()

                tg.start_soon(run)
            await anyio.wait_all_tasks_blocked()
            assert cache.stats().waiters == 3
            scopes[0].cancel()
            scopes[1].cancel()
            await anyio.wait_all_tasks_blocked()
            assert cache.stats().waiters == 1
            check_invariants(cache)
            if point == "reserve":
                await blocker.__aexit__(None, None, None)
            else:
                gated.open("a", point)
        assert len(got) == 1
        assert cache.resident() == ["a"]
        check_invariants(cache)


async def test_load_outlives_all_its_cancelled_callers_once_reading_weights(
    models: MemoryModels, gated: GatedStore
) -> None:
    """When every caller is cancelled during the weight read, the load finishes and stays.

    (Cancelled before the bytes were reserved, it stops instead: see
    test_a_load_whose_callers_left_before_it_reserved_evicts_nothing.)"""
    point = "read_into"
    models.add("a", 1000)
    gated.gate("a", point)
    async with ModelCache(gated, device_budget=1500) as cache, anyio.create_task_group() as tg:
        caller = anyio.CancelScope()

        async def use_a() -> None:
            with caller:
                async with cache.use("a"):
                    pass

        tg.start_soon(use_a)
        await settle()  # the load waits at the gated weight read
        assert gated.calls[(point, "a")] == 1
        caller.cancel()
        await anyio.wait_all_tasks_blocked()
        assert cache.stats().loading == 1
        gated.open("a", point)
        await settle()  # the rest of the load runs in worker threads
        assert cache.resident() == ["a"]
        check_invariants(cache)


@pytest.mark.parametrize("point", ["size", "read_range", "reserve", "read_into"])
async def test_closing_mid_load_fails_waiters_and_frees_everything(
    models: MemoryModels, gated: GatedStore, point: str
) -> None:
    """Closing the cache during a load gives its waiters CacheClosedError and frees all bytes."""
    models.add("a", 1000)
    models.add("blocker", 1000)
    errors: list[BaseException] = []
    cache = ModelCache(gated, device_budget=1500)

    async def user() -> None:
        try:
            async with cache.use("a"):
                pass
        except CacheClosedError as exc:
            errors.append(exc)

    async with anyio.create_task_group() as tg, cache:
        if point == "reserve":
            await cache.use("blocker").__aenter__()
        else:
            gated.gate("a", point)
        tg.start_soon(user)
        await anyio.wait_all_tasks_blocked()
        assert cache.stats().loading == 1
    assert len(errors) == 1 and "'a'" in str(errors[0])
    stats = cache.stats()
    assert (stats.bytes_reserved, stats.bytes_resident, stats.loading, stats.models) == (0, 0, 0, 0)
    with pytest.raises(CacheClosedError):
        async with cache.use("a"):
            pass


class _EndsInAWorkerCall(TorchBackend):
    """Loads whose last await outlives a cancellation, as a worker-thread call does (anyio
    waits for the thread: a zero-copy load's one mapping call, a small file's one read)."""

    def __init__(self) -> None:
        super().__init__("cpu")
        self.entered = anyio.Event()
        self.release = anyio.Event()

    async def load(self, store: Store, info: ModelInfo, *, zero_copy: bool = True) -> Weights:
        weights = await super().load(store, info, zero_copy=zero_copy)
        with anyio.CancelScope(shield=True):
            self.entered.set()
            await self.release.wait()
        return weights


@pytest.mark.parametrize("caller", ["use", "host prefetch"])
async def test_closing_while_a_load_ends_in_a_worker_call_fails_its_callers(
    models: MemoryModels, caller: str
) -> None:
    """Closing the cache while a load's last call runs in a worker thread (which a cancellation
    waits for) gives its callers CacheClosedError: a use() gets no model of a closed cache, a
    host prefetch is not told the weights reached its host tier (admitted there as the cache
    closed); every byte of both tiers is freed."""
    models.add("a", 1000)
    backend = _EndsInAWorkerCall()
    host_budget = 4096 if caller == "host prefetch" else 0
    cache = ModelCache(
        models.template, backend=backend, device_budget=4096, host_budget=host_budget
    )
    outcome: list[str] = []

    async def call() -> None:
        try:
            if caller == "use":
                async with cache.use("a"):
                    pass
            else:
                await cache.prefetch(["a"], tier="host")
            outcome.append("served")
        except CacheClosedError:
            outcome.append("closed")

    async def release_once_closing() -> None:
        await anyio.wait_all_tasks_blocked()  # close has cancelled the load and waits for it
        backend.release.set()

    async with anyio.create_task_group() as tg, cache:
        tg.start_soon(call)
        await backend.entered.wait()
        tg.start_soon(release_once_closing)
    assert outcome == ["closed"]
    stats = cache.stats()
    assert (stats.bytes_reserved, stats.bytes_resident, stats.loading, stats.models) == (0, 0, 0, 0)
    if host_budget:
        host = stats.tiers["host"]
        assert (host.bytes_reserved, host.bytes, host.entries) == (0, 0, 0)


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, SystemExit])
def test_an_interrupt_in_a_builder_stops_the_loop_and_is_not_logged_as_never_retrieved(
    models: MemoryModels, caplog: pytest.LogCaptureFixture, interrupt: type[BaseException]
) -> None:
    """A builder's KeyboardInterrupt/SystemExit ends asyncio.run with it, and its load's task
    leaves no "exception was never retrieved" behind."""
    models.add("a", 1000)

    async def main() -> None:
        cache = ModelCache(models.template, device_budget=4096)

        @cache.model
        class Interrupted:
            @staticmethod
            def from_weights(weights: Weights, info: ModelInfo) -> None:
                raise interrupt("in a builder")

        async with cache, cache.use("a", model=Interrupted):
            pass

    with pytest.raises(interrupt, match="in a builder"):
        asyncio.run(main())
    gc.collect()
    assert not [r for r in caplog.records if "never retrieved" in r.getMessage()]


def test_close_ends_when_a_load_task_is_cancelled_before_it_first_ran(
    models: MemoryModels,
) -> None:
    """Code that cancels every task (a server's shutdown) in the loop step after a use()
    started a load, before the load's task first ran, does not leave the cache's close waiting
    for that load forever."""
    models.add("a", 1000)
    shutdown = asyncio.Event()

    class Signalling(Store):
        def model_url(self, model_id: str) -> str:
            # use() asks this just before it starts the load's task: the shutdown's wake-up is
            # queued ahead of that task's first step.
            shutdown.set()
            return super().model_url(model_id)

    cache = ModelCache(Signalling(models.template), device_budget=4096)

    async def serve() -> None:
        async with cache, cache.use("a"):
            pass

    async def main() -> None:
        server = asyncio.get_running_loop().create_task(serve())
        await shutdown.wait()
        for task in asyncio.all_tasks():
            if task is not asyncio.current_task():
                task.cancel()
        # A bound for the failure only: the close ends within a few steps of the loop.
        done, _ = await asyncio.wait([server], timeout=60)
        assert done == {server}, "the cache's close waits for a load that never ran"
        assert server.cancelled()
        assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("modelcache")]

    asyncio.run(main())
    stats = cache.stats()
    assert (stats.background, stats.bytes_reserved, stats.loading) == (0, 0, 0)


def test_a_use_joined_to_a_load_whose_task_is_cancelled_before_it_first_ran_is_answered(
    models: MemoryModels,
) -> None:
    """A load's task cancelled by other code before its first step, the cache open: the use()
    waiting for it is answered (as when the task is cancelled while it runs), not left waiting
    until the cache closes, and the next use() loads the model."""
    models.add("a", 1000)
    cancelled: list[str] = []

    def cancel_the_load() -> None:
        for task in asyncio.all_tasks():
            if task.get_name().startswith("modelcache load"):
                cancelled.append(task.get_name())
                task.cancel()

    class Signalling(Store):
        def model_url(self, model_id: str) -> str:
            # use() asks this just before it makes the load's task: this runs in the next step
            # of the loop, ahead of that task's first.
            if not cancelled:
                asyncio.get_running_loop().call_soon(cancel_the_load)
            return super().model_url(model_id)

    async def main() -> None:
        async with ModelCache(Signalling(models.template), device_budget=4096) as cache:
            with pytest.raises(CacheClosedError, match="'a'"):
                # A bound for the failure only: the answer comes within a few loop steps.
                with anyio.fail_after(60):
                    async with cache.use("a"):
                        pass
            assert cancelled == ["modelcache load 'a'"]
            stats = cache.stats()
            assert (stats.background, stats.bytes_reserved, stats.loading) == (0, 0, 0)
            async with cache.use("a") as weights:
                assert weights.nbytes == 1000

    asyncio.run(main())


@pytest.mark.skipif(sys.version_info < (3, 12), reason="asyncio.eager_task_factory: Python 3.12")
def test_use_and_prefetch_load_under_an_eager_task_factory(models: MemoryModels) -> None:
    """Under an eager task factory a load's first step runs as its task is made: its caller
    is its waiter before that (a load that found nobody waiting stopped, and use() started it
    again and again without yielding: break11, from reading)."""
    models.add("a", 1000)
    models.add("b", 1000)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        loop.set_task_factory(asyncio.eager_task_factory)  # type: ignore[attr-defined,unused-ignore]
        async with ModelCache(models.template, device_budget=4096) as cache:
            with anyio.fail_after(60):  # a bound for the failure only
                async with cache.use("a") as weights:
                    assert weights.nbytes == 1000
                await cache.prefetch(["b"])
            assert sorted(cache.resident()) == ["a", "b"]

    asyncio.run(main())


async def test_closing_frees_every_buffer(models: MemoryModels) -> None:
    """After close, no buffer of a loaded model is referenced by the cache."""
    models.add("a", 1000)
    async with ModelCache(models.template, device_budget=4096) as cache, cache.use("a") as w:
        ref = weakref.ref(w.buffer)
        del w
    gc.collect()
    assert ref() is None


async def test_eviction_frees_the_buffer(models: MemoryModels) -> None:
    """An evicted model's buffer is released (nothing in the cache keeps it alive)."""
    models.add("a", 1000)
    async with ModelCache(models.template, device_budget=4096) as cache:
        async with cache.use("a") as w:
            ref = weakref.ref(w.buffer)
            del w
        assert cache.evict("a")
        assert not cache.evict("a")
        gc.collect()
        assert ref() is None
        assert cache.stats().bytes_reserved == 0


async def test_hit_path_is_not_a_checkpoint(models: MemoryModels) -> None:
    """A hit completes inside an already-cancelled scope: it never yields to the scheduler."""
    models.add("a", 100)
    async with ModelCache(models.template, device_budget=4096) as cache:
        async with cache.use("a"):
            pass
        with anyio.CancelScope() as scope:
            scope.cancel()
            async with cache.use("a") as w:
                assert w["w"].numel() == 100
        assert not scope.cancelled_caught
        assert cache.stats().hits == 1


async def test_use_outside_the_context_is_refused(models: MemoryModels) -> None:
    """A cache not entered, or closed, refuses use with CacheClosedError."""
    models.add("a", 100)
    cache = ModelCache(models.template, device_budget=4096)
    with pytest.raises(CacheClosedError, match="async with"):
        async with cache.use("a"):
            pass
    async with cache:
        pass
    with pytest.raises(CacheClosedError):
        async with cache:
            pass


async def test_body_exception_is_not_wrapped(models: MemoryModels) -> None:
    """An exception raised inside `async with cache` propagates as itself."""
    with pytest.raises(KeyError, match="mine"):
        async with ModelCache(models.template, device_budget=4096):
            raise KeyError("mine")


def test_bad_arguments_are_refused(models: MemoryModels) -> None:
    """Budgets and limits are validated when the cache is made."""
    with pytest.raises(ValueError, match="device_budget"):
        ModelCache(models.template, device_budget="lots")
    with pytest.raises(ValueError, match="max_concurrent_loads"):
        ModelCache(models.template, device_budget=10, max_concurrent_loads=0)
    with pytest.raises(ValueError, match="model_id"):
        ModelCache("memory://no-placeholder", device_budget=10)


# -- model classes ---------------------------------------------------------------------------


class TinyNet(torch.nn.Module):
    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(width, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)  # type: ignore[no-any-return]


def _tiny_net_file(width: int) -> bytes:
    from safetensors.torch import save

    g = torch.Generator().manual_seed(width)
    return save({"lin.weight": torch.randn(2, width, generator=g), "lin.bias": torch.zeros(2)})


async def test_module_subclass_is_built_on_meta_with_config(models: MemoryModels) -> None:
    """An nn.Module is built from config.json and shares the weights' buffer (no copy)."""
    models.put("net/model.safetensors", _tiny_net_file(8))
    models.put("net/config.json", b'{"width": 8}')
    cache = ModelCache(models.template, device_budget=4096)
    cache.model(TinyNet)
    async with cache, TinyNet.use("net") as net:  # type: ignore[attr-defined]
        assert isinstance(net, TinyNet)
        assert not net.training and not net.lin.weight.requires_grad
        assert net(torch.ones(1, 8)).shape == (1, 2)
        entry = next(iter(cache._entries.values()))
        assert isinstance(entry.weights, Weights)
        base = entry.weights.buffer.untyped_storage().data_ptr()
        assert net.lin.weight.untyped_storage().data_ptr() == base
    del TinyNet.use  # type: ignore[attr-defined]


async def test_from_weights_sync_runs_off_the_loop_async_on_it(models: MemoryModels) -> None:
    """Sync builders run in a worker thread; async builders are awaited."""
    models.add("a", 100)
    threads: dict[str, int] = {}
    cache = ModelCache(models.template, device_budget=4096)

    @cache.model
    class Sync:
        def __init__(self, n: int) -> None:
            self.n = n

        @classmethod
        def from_weights(cls, weights: Weights, info: ModelInfo) -> Sync:
            threads["sync"] = threading.get_ident()
            return cls(weights["w"].numel())

    @cache.model
    class Async:
        @classmethod
        async def from_weights(cls, weights: Weights, info: ModelInfo) -> int:
            threads["async"] = threading.get_ident()
            await anyio.lowlevel.checkpoint()
            return info.nbytes

    async with cache:
        async with Sync.use("a") as s:  # type: ignore[attr-defined]
            assert s.n == 100
        async with cache.use("a", model=Async) as n:
            assert n == 100
        with pytest.raises(TypeError, match="several model classes"):
            cache.use("a")
    assert threads["async"] == threading.get_ident() != threads["sync"]


def test_decorating_the_wrong_things_is_refused(models: MemoryModels) -> None:
    """Classes that cannot be built from weights, or that define use, are refused."""
    cache = ModelCache(models.template, device_budget=4096)
    with pytest.raises(TypeError, match="from_weights"):
        cache.model(int)

    class HasUse(torch.nn.Module):
        def use(self) -> None: ...

    with pytest.raises(TypeError, match="use"):
        cache.model(HasUse)


@pytest.mark.cuda
async def test_cuda_device_tensors_are_bit_exact_views_of_one_allocation(
    models: MemoryModels,
) -> None:
    """On CUDA, weights are views of one device buffer, bit-identical to the file, freed on evict."""
    models.add("a", 1 << 20, seed=3)
    expected = torch.frombuffer(
        bytearray(models.fs.cat(f"{models.root}/a/model.safetensors")), dtype=torch.uint8
    )[-(1 << 20) :]
    torch.cuda.synchronize()
    start = torch.cuda.memory_allocated()
    async with ModelCache(models.template, device="cuda", device_budget="8MiB") as cache:
        async with cache.use("a") as w:
            assert w["w"].device.type == "cuda"
            assert w["w"].untyped_storage().data_ptr() == w.buffer.untyped_storage().data_ptr()
            assert torch.equal(w["w"].cpu(), expected)
            del w
        assert cache.evict("a")
        gc.collect()
        assert torch.cuda.memory_allocated() == start


async def test_is_bound_tells_which_classes_this_cache_builds(models: MemoryModels) -> None:
    """is_bound is true only for classes bound to this very cache."""
    cache, other = (ModelCache(models.template, device_budget=4096) for _ in range(2))

    @cache.model
    class Bound:
        @classmethod
        def from_weights(cls, weights: Weights, info: ModelInfo) -> int:
            return 0

    class Unbound:
        pass

    assert cache.is_bound(Bound)
    assert not cache.is_bound(Unbound)
    assert not other.is_bound(Bound)


async def test_describe_reads_headers_only_and_raises_like_a_load(
    models: MemoryModels, gated: GatedStore
) -> None:
    """describe gives a model's size without reading weights; unknown ids are ModelNotFoundError."""
    models.add("a", 1000)
    async with ModelCache(gated, device_budget=8192) as cache:
        info = await cache.describe("a")
        assert (info.model_id, info.nbytes) == ("a", 1000)
        assert gated.calls[("read_into", "a")] == 0
        assert cache.stats().loads == 0
        async with cache.use("a"):
            assert (await cache.describe("a")).nbytes == 1000  # from the resident entry
        with pytest.raises(ModelNotFoundError):
            await cache.describe("missing")
        with pytest.raises(InvalidModelIdError):
            await cache.describe("../etc")


async def test_a_remembered_failure_raised_often_keeps_a_short_traceback(
    models: MemoryModels,
) -> None:
    """Raising one remembered error again and again does not grow its traceback (no leak)."""
    async with ModelCache(models.template, device_budget=4096, failure_ttl=60) as cache:
        lengths = []
        for _ in range(50):
            with pytest.raises(ModelNotFoundError) as caught:
                async with cache.use("missing"):
                    pass
            lengths.append(len(traceback.extract_tb(caught.value.__traceback__)))
        assert max(lengths) <= lengths[1] < 20
