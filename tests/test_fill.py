"""A cold fill of many small models: what it leaves for the garbage collector, and what each
load does once (issue 16 item 2). The rates are measured in benches/fill_rate.py; these tests
check the behaviour that makes them."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import sys
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any, cast

import anyio
import pytest
import torch
from safetensors.torch import save_file

from modelcache import (
    CacheClosedError,
    InvalidModelIdError,
    ModelCache,
    ModelLoadError,
    ModelNotFoundError,
)

from .conftest import GatedStore, MemoryModels, check_invariants, hold_every_read_slot

#: GC-tracked objects a resident one-tensor model keeps (was 21, then 16 with a policy slot
#: object, 15, 14 where a version's tuple was counted before a second collection untracked
#: it): its entry and its key, its headers (the info, its tensor table and mapping, the shard
#: header and the shards tuple, one TensorInfo), its version, its weights (the mapping, its
#: dict, buffer and view). The policy keeps numbers in dicts, no object per entry; a laid-out
#: shard keeps no tensor table of its own.
TRACKED_PER_MODEL = 13


@pytest.fixture
def tiny(tmp_path: Path) -> str:
    """A one-tensor (empty) safetensors file: every id of the fill resolves to it."""
    path = tmp_path / "tiny.safetensors"
    save_file({"w": torch.zeros(0, dtype=torch.uint8)}, str(path))
    return f"file://{path}"


def _cache(url: str) -> ModelCache:
    return ModelCache(
        lambda model_id: url,
        device="cpu",
        device_budget="1GiB",
        zero_copy=False,
        revalidate_after=None,
    )


async def _fill(cache: ModelCache, ids: list[str], tasks: int = 8) -> None:
    async def worker(part: list[str]) -> None:
        for model_id in part:
            async with cache.use(model_id):
                pass

    async with anyio.create_task_group() as tg:
        for k in range(tasks):
            tg.start_soon(worker, ids[k::tasks])


@pytest.fixture(params=["asyncio", "anyio"])
def load_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both ways a load runs: asyncio's fast path (a task of its own, asyncio events and
    futures, one cancel scope), and anyio's primitives alone, as on trio (forced here)."""
    import modelcache._concurrency as concurrency

    if request.param == "anyio":
        monkeypatch.setattr(concurrency, "_asyncio_loop", lambda: None)
    return str(request.param)


@pytest.fixture
def gc_off() -> Iterator[None]:
    """The collector off for the test (and on again after it)."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def _tracked() -> int:
    # Twice: a collection stops tracking a tuple of untracked items, and a tuple holding such a
    # tuple only in the next one (a version's ((url, tag),)).
    gc.collect()
    gc.collect()
    return len(gc.get_objects())


async def test_a_resident_model_keeps_few_gc_tracked_objects(tiny: str, gc_off: None) -> None:
    """A resident small model keeps at most TRACKED_PER_MODEL GC-tracked objects: every full
    collection scans all of them, so a fill's collector time grows with this count."""
    async with _cache(tiny) as cache:
        await _fill(cache, [f"warm{i}" for i in range(20)])  # worker threads, first-use state
        before = _tracked()
        n = 300
        await _fill(cache, [f"m{i}" for i in range(n)])
        per_model = (_tracked() - before) / n
        assert cache.stats().models == n + 20
    assert per_model <= TRACKED_PER_MODEL + 0.2, per_model


async def test_a_prefetched_model_keeps_no_more_gc_tracked_objects_than_its_own(
    tiny: str, gc_off: None
) -> None:
    """A model a prefetch loaded (its headers read in a group, its load run in a lane) keeps
    no more GC-tracked objects than a use()'s (TRACKED_PER_MODEL): a lane, its group's list or
    a header read leaves nothing behind per model."""
    async with _cache(tiny) as cache:
        await cache.prefetch([f"warm{i}" for i in range(40)])
        before = _tracked()
        n = 320
        await cache.prefetch([f"m{i}" for i in range(n)])
        per_model = (_tracked() - before) / n
        assert cache.stats().models == n + 40
    assert per_model <= TRACKED_PER_MODEL + 0.05, per_model


def _ours(obj: object) -> bool:
    """An object of this library: an instance of its classes, or one of its coroutines,
    generators or functions."""
    code = getattr(obj, "cr_code", None) or getattr(obj, "gi_code", None)
    if code is None:
        code = getattr(obj, "__code__", None)
    if code is not None:
        return "/modelcache/" in code.co_filename
    return type(obj).__module__.startswith("modelcache")


async def test_a_fill_leaves_no_reference_cycle(tiny: str, gc_off: None) -> None:
    """A fill makes no reference cycle of the library's objects: with the collector off, a
    collection afterwards finds none (each would be garbage only a collection frees)."""
    async with _cache(tiny) as cache:
        await _fill(cache, [f"warm{i}" for i in range(20)])
        gc.collect()  # what came before the fill (a cache holds cycles of its own parts)
        await _fill(cache, [f"m{i}" for i in range(200)])
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            gc.collect()
            garbage = [obj for obj in gc.garbage if _ours(obj)]
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
    assert garbage == [], garbage[:5]


async def test_a_load_validates_its_id_once(tiny: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A cold load validates its model id once, where ``use()`` begins: the load is given the
    id's URL and neither validates nor resolves it again."""
    import modelcache._store as store_module

    calls: list[object] = []
    real = store_module.validate_model_id

    def counting(model_id: object, **kwargs: Any) -> str:
        calls.append(model_id)
        return real(model_id, **kwargs)

    monkeypatch.setattr(store_module, "validate_model_id", counting)
    async with _cache(tiny) as cache:
        ids = [f"m{i}" for i in range(10)]
        await _fill(cache, ids, tasks=3)
    assert sorted(calls) == sorted(ids)  # type: ignore[type-var]


async def test_a_load_runs_in_a_task_of_its_own_that_close_cancels_and_waits_for(
    models: MemoryModels,
) -> None:
    """On asyncio a load is a task of its own (no task-group wrapper around it), counted by
    ``wait_idle`` while it runs; closing the cache cancels it (its waiter gets
    CacheClosedError) and waits for it to end."""
    models.add("a", 100)
    store = GatedStore(models.template)
    store.gate("a", "read_into")
    errors: list[BaseException] = []
    cache = ModelCache(store, device_budget=1000, revalidate_after=None)

    async def use() -> None:
        try:
            async with cache.use("a"):
                pass
        except CacheClosedError as exc:
            errors.append(exc)

    async with anyio.create_task_group() as tg:
        async with cache:
            tg.start_soon(use)
            await anyio.wait_all_tasks_blocked()
            (load,) = [t for t in asyncio.all_tasks() if t.get_name() == "modelcache load 'a'"]
            coro = load.get_coro()
            assert getattr(coro, "__qualname__", "") == "Background._run_load"
            assert cache.stats().background == 1
        assert load.done() and not load.cancelled()  # ended, its cancellation caught
        assert cache.stats().background == 0
    assert len(errors) == 1


# -- a fill through prefetch(ids): its loads start from the caller's task --------------------


@contextlib.contextmanager
def _tasks_made() -> Iterator[list[asyncio.Task[Any]]]:
    """Every asyncio task made in the block (named after it is made: read the names later)."""
    created: list[asyncio.Task[Any]] = []

    def factory(loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> asyncio.Task[Any]:
        task = asyncio.Task(coro, loop=loop, **kwargs)
        created.append(task)
        return task

    loop = asyncio.get_running_loop()
    loop.set_task_factory(factory)
    try:
        yield created
    finally:
        loop.set_task_factory(None)


async def test_a_device_prefetch_runs_its_loads_in_lanes_not_a_task_per_id(tiny: str) -> None:
    """``prefetch(ids)`` starts each fresh id's load from the caller's task and waits for them
    there; the loads of a group of 32 local ids whose headers it read together run in as many
    lanes as the cache has load slots (`_prefill.load_in_turn`): per group, one task for its
    header read and four lanes, not a task per id (a task per load was, after the collector,
    the largest part of a small model's prefetched load)."""
    async with _cache(tiny) as cache:
        ids = [f"m{i}" for i in range(100)]  # groups of 32, 32, 32 and 4
        with _tasks_made() as created:
            await cache.prefetch(ids)
        assert sorted(cache.resident()) == sorted(ids)
        assert cache.stats().leased == 0  # resident and unleased
    names = [task.get_name() for task in created]
    assert names.count("modelcache prefetch loads") == 4 * 4, names
    assert names.count("modelcache prefetch headers") == 4, names
    assert len(names) == 4 * 4 + 4, names


async def test_a_device_prefetch_keeps_a_window_of_loads_in_flight(
    models: MemoryModels, load_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A prefetch of many ids keeps at most ``PREFETCH_WINDOW`` of the loads it starts in flight
    (each in flight holds its task and state; 100,000 at once would hold them all), and loads
    every id."""
    import modelcache._cache as cache_module

    monkeypatch.setattr(cache_module, "PREFETCH_WINDOW", 3)
    ids = [f"m{i}" for i in range(7)]
    for model_id in ids:
        models.add(model_id, 10)
    store = GatedStore(models.template)
    for model_id in ids:
        store.gate(model_id, "size")
    async with ModelCache(store, device_budget=1000, revalidate_after=None) as cache:
        async with anyio.create_task_group() as tg:
            tg.start_soon(cache.prefetch, ids)
            await anyio.wait_all_tasks_blocked()
            assert cache.stats().loading == 3
            for model_id in ids:
                store.open(model_id, "size")
        assert sorted(cache.resident()) == sorted(ids)
        assert cache.stats().loading == cache.stats().waiters == 0
        check_invariants(cache)


async def test_a_cancelled_device_prefetch_abandons_the_loads_it_started(
    models: MemoryModels,
    load_path: str,
) -> None:
    """A prefetch cancelled while its loads read headers leaves them all: nobody else waits for
    them, so they stop (no bytes reserved, nothing resident), as use()'s callers' loads do."""
    ids = [f"m{i}" for i in range(6)]
    for model_id in ids:
        models.add(model_id, 10)
    store = GatedStore(models.template)
    for model_id in ids:
        store.gate(model_id, "size")
    async with ModelCache(store, device_budget=1000, revalidate_after=None) as cache:
        with anyio.CancelScope() as scope:
            async with anyio.create_task_group() as tg:
                tg.start_soon(cache.prefetch, ids)
                await anyio.wait_all_tasks_blocked()
                assert cache.stats().loading == len(ids)
                scope.cancel()
        await cache.wait_idle()
        stats = cache.stats()
        assert (stats.loading, stats.waiters, stats.bytes_reserved, stats.models) == (0, 0, 0, 0)
        check_invariants(cache)
        for model_id in ids:
            store.open(model_id, "size")
        assert store.calls[("read_into", "m0")] == 0


async def test_a_device_prefetch_shares_loads_in_flight_and_raises_the_first_failure(
    models: MemoryModels,
    load_path: str,
) -> None:
    """A prefetch joins a load a use() started (one read), loads every id it can, and then
    raises a failure (a missing id) as its own copy."""
    models.add("a", 10)
    models.add("b", 10)
    store = GatedStore(models.template)
    store.gate("a", "size")
    async with ModelCache(store, device_budget=1000, revalidate_after=None) as cache:
        async with anyio.create_task_group() as tg:

            async def use_a() -> None:
                async with cache.use("a"):
                    pass

            tg.start_soon(use_a)
            await anyio.wait_all_tasks_blocked()

            async def prefetch() -> None:
                with pytest.raises(ModelNotFoundError):
                    await cache.prefetch(["a", "missing", "b"])

            tg.start_soon(prefetch)
            await anyio.wait_all_tasks_blocked()
            store.open("a", "size")
        assert sorted(cache.resident()) == ["a", "b"]
        assert store.calls[("size", "a")] == 1
        assert cache.stats().leased == 0
        check_invariants(cache)


async def test_a_load_enters_one_cancel_scope(tiny: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """On asyncio a small model's load enters one cancel scope of its own, its task's: the
    abandonable header stage cancels that one when the last caller leaves rather than enter
    one more (a scope and its two sets per stage were a part of each load's cost and garbage)."""
    scope_class = type(anyio.CancelScope())
    real_enter = scope_class.__enter__
    entered: list[str] = []

    def counting_enter(self: Any) -> Any:
        task = asyncio.current_task()
        # Scopes the library enters itself (a thread call's own, anyio's, are not counted).
        if "/modelcache/" in sys._getframe(1).f_code.co_filename and task is not None:
            entered.append(task.get_name())
        return real_enter(self)

    async with _cache(tiny) as cache:
        monkeypatch.setattr(scope_class, "__enter__", counting_enter)
        ids = [f"m{i}" for i in range(10)]
        await _fill(cache, ids, tasks=3)
        monkeypatch.undo()
    assert sorted(name for name in entered if name.startswith("modelcache load")) == sorted(
        f"modelcache load {i!r}" for i in ids
    )


async def _use_once(cache: ModelCache, model_id: str) -> None:
    async with cache.use(model_id):
        pass


async def test_loads_fill_abandon_and_close_on_either_path(
    tmp_path: Path, models: MemoryModels, load_path: str
) -> None:
    """On either path: a fill loads every id; a load whose callers all left during its batched
    header read stops (nothing reserved or resident); closing the cache with a load in flight
    fails its waiter with CacheClosedError and waits for it."""
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        save_file(
            {"w": torch.zeros(4, dtype=torch.uint8)}, str(tmp_path / name / "model.safetensors")
        )
    async with _cache(f"file://{tmp_path}/a/model.safetensors") as cache:
        await _fill(cache, [f"m{i}" for i in range(30)], tasks=4)
        assert cache.stats().models == 30
        check_invariants(cache)
    store_url = f"file://{tmp_path}/{{model_id}}"
    async with ModelCache(store_url, device_budget=1000, revalidate_after=None) as cache:
        give_back = await hold_every_read_slot(cache.store)  # the header batch cannot start
        with anyio.CancelScope() as scope:
            async with anyio.create_task_group() as tg:
                # A use()'s load reads its own headers (a prefetch reads them before its loads
                # start: test_a_prefetch_cancelled_while_it_reads_headers_leaves_nothing).
                tg.start_soon(_use_once, cache, "a")
                await anyio.wait_all_tasks_blocked()
                assert cache.stats().loading == 1
                scope.cancel()
        await anyio.wait_all_tasks_blocked()
        stats = cache.stats()
        assert (stats.loading, stats.bytes_reserved, stats.models) == (0, 0, 0)
        give_back()
        await cache.wait_idle()
        check_invariants(cache)
    models.add("c", 100)
    store = GatedStore(models.template)
    store.gate("c", "read_into")
    errors: list[BaseException] = []
    cache = ModelCache(store, device_budget=1000, revalidate_after=None)

    async def use() -> None:
        try:
            async with cache.use("c"):
                pass
        except CacheClosedError as exc:
            errors.append(exc)

    async with anyio.create_task_group() as tg:
        async with cache:
            tg.start_soon(use)
            await anyio.wait_all_tasks_blocked()
            assert cache.stats().loading == 1
        assert cache.stats().background == 0
    assert len(errors) == 1


async def test_a_warm_device_prefetch_keeps_a_window_of_tasks(
    tiny: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A prefetch of ids already resident (or repeated in its list) takes them in turn in
    ``PREFETCH_WINDOW`` tasks, not a task per id (10,000 warm ids made 10,000 tasks)."""
    import modelcache._cache as cache_module

    monkeypatch.setattr(cache_module, "PREFETCH_WINDOW", 3)
    async with _cache(tiny) as cache:
        ids = [f"m{i}" for i in range(20)]
        await cache.prefetch(ids)
        with _tasks_made() as created:
            await cache.prefetch([*ids, *ids])
        assert sorted(cache.resident()) == sorted(ids)
        assert cache.stats().leased == 0
        check_invariants(cache)
    assert len(created) <= 3, created


async def test_a_prefetch_keeps_its_first_failure_alone(tiny: str) -> None:
    """A prefetch raises its first failure and keeps no other: a prefetch of many ids that fail
    (invalid, or after a close) held every error and its traceback until it returned."""
    async with _cache(tiny) as cache:
        with pytest.raises(InvalidModelIdError) as raised:
            await cache.prefetch([f"../bad{i}" for i in range(50)])
        gc.collect()
        alive = [obj for obj in gc.get_objects() if type(obj) is InvalidModelIdError]
        assert alive == [raised.value]


async def test_a_device_prefetch_fill_makes_one_worker_call_per_group_of_headers(
    tiny: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A prefetch of local one-file models (no weight bytes) makes one worker-thread call per
    ``PREFETCH_WINDOW // 2`` ids, its header reads, and no load reads its own headers: the
    loads' header stages were most of a small model's fill."""
    import anyio.to_thread

    import modelcache._lower as lower

    calls: list[str] = []
    real = anyio.to_thread.run_sync

    async def counting(func: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(getattr(func, "__name__", ""))
        return await real(func, *args, **kwargs)

    async def no_header_stage(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a prefetched load read its own headers")

    async with _cache(tiny) as cache:
        monkeypatch.setattr(anyio.to_thread, "run_sync", counting)
        monkeypatch.setattr(lower, "read_model_info", no_header_stage)
        await cache.prefetch([f"m{i}" for i in range(128)])
        assert cache.stats().models == 128
    assert calls == ["_run_batch"] * 4, calls


# -- the lanes of a prefetch's group (`_prefill.load_in_turn`): each load as its own ----------


def _gated(cache: ModelCache, held: dict[str, anyio.Event], broken: set[str]) -> type:
    """A class bound to ``cache`` whose build of an id in ``held`` waits for its event, and of
    an id in ``broken`` raises ValueError."""

    @cache.model
    class Gated:
        def __init__(self, model_id: str) -> None:
            self.model_id = model_id

        @classmethod
        async def from_weights(cls, weights: Any, info: Any) -> Gated:
            gate = held.get(info.model_id)
            if gate is not None:
                await gate.wait()
            if info.model_id in broken:
                raise ValueError(f"cannot build {info.model_id}")
            return cls(info.model_id)

    return Gated


async def test_a_use_joins_a_load_waiting_in_a_lane(tiny: str, load_path: str) -> None:
    """A use() of an id whose prefetched load waits in a lane (the lanes busy with the loads
    before it) joins that load: one load per id, the use gets its model once it runs."""
    async with _cache(tiny) as cache:
        held = {f"m{i}": anyio.Event() for i in range(4)}  # the four lanes' first loads
        gated = _gated(cache, held, set())
        ids = [f"m{i}" for i in range(8)]
        got: list[str] = []

        async def use_m6() -> None:
            async with cache.use("m6", model=gated) as model:
                got.append(model.model_id)

        async with anyio.create_task_group() as tg:
            tg.start_soon(partial(cache.prefetch, ids, model=gated))
            await anyio.wait_all_tasks_blocked()
            assert cache.stats().loading == 8  # four building, four in line in the lanes
            tg.start_soon(use_m6)
            await anyio.wait_all_tasks_blocked()
            assert (cache.stats().waiters, got) == (9, [])
            for gate in held.values():
                gate.set()
        stats = cache.stats()
        assert got == ["m6"]
        assert (stats.loads, stats.models, stats.loading, stats.waiters) == (8, 8, 0, 0)
        check_invariants(cache)


async def test_a_load_failing_in_a_lane_fails_alone(tiny: str, load_path: str) -> None:
    """A load of a group that fails (its build raises) fails alone: the prefetch raises its
    error, its lane goes on with the next loads, every other id is resident, and the failure
    is remembered for a use() as a failed load's is."""
    async with _cache(tiny) as cache:
        gated = _gated(cache, {}, {"m1", "m5"})
        ids = [f"m{i}" for i in range(12)]
        with pytest.raises(ModelLoadError, match="cannot build m1"):
            await cache.prefetch(ids, model=gated)
        assert sorted(cache.resident()) == sorted(set(ids) - {"m1", "m5"})
        stats = cache.stats()
        assert (stats.loads, stats.load_failures, stats.loading, stats.waiters) == (10, 2, 0, 0)
        with pytest.raises(ModelLoadError, match="cannot build m5"):
            async with cache.use("m5", model=gated):
                pass
        check_invariants(cache)


async def test_a_prefetch_cancelled_mid_group_leaves_no_load_behind(
    tiny: str, load_path: str
) -> None:
    """A prefetch cancelled while its lanes build their first loads leaves the loads in line
    behind them: each stops when its lane reaches it (nobody waits), so no entry, reservation
    or task is left of them once the builds end; the builds under way finish as a use()'s
    load would (resident, unleased)."""
    async with _cache(tiny) as cache:
        held = {f"m{i}": anyio.Event() for i in range(4)}
        gated = _gated(cache, held, set())
        ids = [f"m{i}" for i in range(10)]
        with anyio.CancelScope() as scope:
            async with anyio.create_task_group() as tg:
                tg.start_soon(partial(cache.prefetch, ids, model=gated))
                await anyio.wait_all_tasks_blocked()
                assert cache.stats().loading == 10
                scope.cancel()
        assert cache.stats().waiters == 0
        for gate in held.values():
            gate.set()
        await cache.wait_idle()
        stats = cache.stats()
        assert sorted(cache.resident()) == sorted(held)
        assert (stats.loads, stats.loading, stats.waiters, stats.leased) == (4, 0, 0, 0)
        assert stats.load_failures == 0  # abandoned, not failed
        assert cast(Any, cache)._background.running == 0
        check_invariants(cache)


async def test_a_close_fails_the_loads_in_line_in_a_lane(tiny: str, load_path: str) -> None:
    """A cache closed while its lanes build fails every load of the group, those under way and
    those in line (a use() joined to one raises CacheClosedError), and waits for the lanes:
    none is left waiting for a load that never runs."""
    cache = _cache(tiny)
    held = {f"m{i}": anyio.Event() for i in range(4)}
    gated = _gated(cache, held, set())
    ids = [f"m{i}" for i in range(8)]
    outcomes: list[str] = []

    async def prefetch() -> None:
        try:
            await cache.prefetch(ids, model=gated)
        except CacheClosedError:
            outcomes.append("prefetch closed")

    async def use_m6() -> None:
        try:
            async with cache.use("m6", model=gated):
                outcomes.append("m6 served")
        except CacheClosedError:
            outcomes.append("m6 closed")

    async with anyio.create_task_group() as tg, cache:
        tg.start_soon(prefetch)
        await anyio.wait_all_tasks_blocked()
        tg.start_soon(use_m6)
        await anyio.wait_all_tasks_blocked()
        assert cache.stats().loading == 8
    assert sorted(outcomes) == ["m6 closed", "prefetch closed"]
    stats = cache.stats()
    assert (stats.loading, stats.waiters, stats.models, stats.bytes_reserved) == (0, 0, 0, 0)
    assert cast(Any, cache)._background.running == 0


async def test_a_lane_cancelled_by_other_code_leaves_its_loads_in_line_to_run(tiny: str) -> None:
    """A lane whose task other code cancels while the cache is open (a server cancelling a
    task it did not start) ends its load under way, as a load's own task cancelled would; the
    loads in line behind it are not failed with it (a use() joined to one got CacheClosedError
    from an open cache): each runs in a task of its own, and the use() gets its model."""
    one_lane = ModelCache(
        lambda model_id: tiny,
        device="cpu",
        device_budget="1GiB",
        zero_copy=False,
        revalidate_after=None,
        max_concurrent_loads=1,  # one lane: every other load of the group is in line in it
    )
    async with one_lane as cache:
        held = {"m0": anyio.Event()}
        gated = _gated(cache, held, set())
        ids = [f"m{i}" for i in range(6)]
        got: list[str] = []

        async def prefetch() -> None:
            with contextlib.suppress(CacheClosedError):  # m0's load was cancelled
                await cache.prefetch(ids, model=gated)

        async def use_m3() -> None:
            async with cache.use("m3", model=gated) as model:
                got.append(model.model_id)

        async with anyio.create_task_group() as tg:
            tg.start_soon(prefetch)
            await anyio.wait_all_tasks_blocked()
            tg.start_soon(use_m3)
            await anyio.wait_all_tasks_blocked()
            (lane,) = [
                t for t in asyncio.all_tasks() if t.get_name() == "modelcache prefetch loads"
            ]
            lane.cancel()
            await anyio.wait_all_tasks_blocked()
            held["m0"].set()
        await cache.wait_idle()
        assert got == ["m3"]
        assert sorted(cache.resident()) == ids[1:]
        stats = cache.stats()
        assert (stats.loading, stats.waiters, stats.leased) == (0, 0, 0)
        check_invariants(cache)
