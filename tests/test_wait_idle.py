"""``await cache.wait_idle()`` and ``stats().background``: the cache's own work in flight."""

from __future__ import annotations

import asyncio
import sys
import threading
from pathlib import Path
from typing import Any

import anyio
import pytest

from modelcache import ModelCache
from modelcache._arena import HostBlock
from modelcache._backend import LoadedWeights
from modelcache._concurrency import Background
from modelcache._disk import DiskTier
from modelcache._lower import HostDiskTiers

from .conftest import GatedStore, MemoryModels, check_invariants
from .test_backend import RecordingBackend


class GatedDemote(RecordingBackend):
    """A device backend whose copies down to host memory wait until ``gate`` is set."""

    __slots__ = ("gate",)

    def __init__(self) -> None:
        super().__init__(on_host=False)
        self.gate = anyio.Event()

    async def demote(self, loaded: LoadedWeights, block: HostBlock) -> None:
        await self.gate.wait()
        await super().demote(loaded, block)


class Waiter:
    """``cache.wait_idle()`` run in a task: whether it has returned."""

    def __init__(self, cache: ModelCache) -> None:
        self.cache = cache
        self.returned = False
        self.scope = anyio.CancelScope()

    async def __call__(self) -> None:
        with self.scope:
            await self.cache.wait_idle()
            self.returned = True


async def test_wait_idle_returns_at_once_when_nothing_is_in_flight(models: MemoryModels) -> None:
    """With no load, copy or write in flight, wait_idle returns without waiting for anything."""
    models.add("a", 1000)
    async with ModelCache(models.template, device_budget=4000) as cache:
        await cache.wait_idle()  # before anything ran
        async with cache.use("a"):
            assert cache.stats().background == 0  # the load's task has ended
            await cache.wait_idle()  # inside a lease: nothing waits for it
        async with anyio.create_task_group() as tg:
            waiter = Waiter(cache)
            tg.start_soon(waiter)
            await anyio.wait_all_tasks_blocked()
            assert waiter.returned


async def test_wait_idle_does_not_return_while_a_load_is_in_flight(
    models: MemoryModels, gated: GatedStore
) -> None:
    """A load stalled at its weight read is background work: wait_idle returns once it ended."""
    models.add("a", 1000)
    gated.gate("a", "read_into")
    async with ModelCache(gated, device_budget=4000) as cache:
        waiter = Waiter(cache)

        async def use() -> None:
            async with cache.use("a"):
                pass

        async with anyio.create_task_group() as tg:
            tg.start_soon(use)
            await anyio.wait_all_tasks_blocked()
            assert cache.stats().background == 1
            tg.start_soon(waiter)
            await anyio.wait_all_tasks_blocked()
            assert not waiter.returned
            gated.open("a", "read_into")
        assert waiter.returned
        assert cache.stats().background == 0 and cache.resident() == ["a"]


async def test_wait_idle_does_not_return_while_a_demotion_copies(models: MemoryModels) -> None:
    """An eviction's copy down to host memory runs in the background: wait_idle waits for it,
    and once it returns the model is in the host tier."""
    models.add("a", 1000)
    backend = GatedDemote()
    async with ModelCache(
        models.template, backend=backend, device_budget=4000, host_budget=4000
    ) as cache:
        async with cache.use("a"):
            pass
        assert cache.evict("a")
        assert cache.stats().background == 1
        waiter = Waiter(cache)
        async with anyio.create_task_group() as tg:
            tg.start_soon(waiter)
            await anyio.wait_all_tasks_blocked()
            assert not waiter.returned and cache.resident("host") == []
            backend.gate.set()
        assert waiter.returned
        assert cache.resident("host") == ["a"] and cache.stats().background == 0
        check_invariants(cache)


async def test_wait_idle_does_not_return_while_a_disk_write_runs(
    models: MemoryModels, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A copy to the disk tier (a worker thread) is background work: wait_idle returns only
    once it has ended, and then the disk tier holds the model."""
    models.add("a", 1000)
    release = threading.Event()
    write = DiskTier.write

    def held_write(self: DiskTier, *args: Any, **kwargs: Any) -> Any:
        release.wait()
        return write(self, *args, **kwargs)

    monkeypatch.setattr(DiskTier, "write", held_write)
    async with ModelCache(
        models.template, device_budget=4000, disk_dir=tmp_path, disk_budget="1MiB"
    ) as cache:
        async with cache.use("a"):
            pass
        assert cache.stats().background == 1  # the write, in its thread
        waiter = Waiter(cache)
        async with anyio.create_task_group() as tg:
            tg.start_soon(waiter)
            await anyio.wait_all_tasks_blocked()
            assert not waiter.returned and cache.stats().tiers["disk"].entries == 0
            release.set()
        assert waiter.returned
        assert cache.stats().tiers["disk"].entries == 1 and cache.stats().background == 0


async def test_a_cancelled_wait_idle_leaves_the_work_and_later_waits_alone(
    models: MemoryModels,
) -> None:
    """Cancelling wait_idle cancels no background work, and a later wait_idle still waits for
    that work and returns when it ends."""
    models.add("a", 1000)
    backend = GatedDemote()
    async with ModelCache(
        models.template, backend=backend, device_budget=4000, host_budget=4000
    ) as cache:
        async with cache.use("a"):
            pass
        assert cache.evict("a")
        first, second = Waiter(cache), Waiter(cache)
        async with anyio.create_task_group() as tg:
            tg.start_soon(first)
            await anyio.wait_all_tasks_blocked()
            first.scope.cancel()
            await anyio.wait_all_tasks_blocked()
            assert not first.returned and cache.stats().background == 1
            tg.start_soon(second)
            await anyio.wait_all_tasks_blocked()
            assert not second.returned
            backend.gate.set()
        assert second.returned and not first.returned
        assert cache.resident("host") == ["a"]
        check_invariants(cache)


def test_a_copy_down_whose_task_is_cancelled_before_it_first_ran_is_undone(
    models: MemoryModels,
) -> None:
    """Code that cancels every task (a server's shutdown) in the loop step after an eviction
    started its copy down to host memory, before the copy's task first ran: once the cache
    has closed, nothing of the copy is left (its host and device bytes, its count in
    ``stats().background``) and wait_idle returns, as when the copy's task is cancelled while
    it runs."""
    models.add("a", 1000)
    backend = RecordingBackend(on_host=False)
    cache = ModelCache(models.template, backend=backend, device_budget=4000, host_budget=4000)
    main: list[asyncio.Task[None]] = []

    def shutdown() -> None:
        for task in asyncio.all_tasks():
            if task not in main:
                task.cancel()

    async def serve() -> None:
        async with cache:
            async with cache.use("a"):
                pass
            # Queued ahead of the first step of the copy's task, which the eviction starts.
            asyncio.get_running_loop().call_soon(shutdown)
            assert cache.evict("a")
            await anyio.sleep_forever()

    async def run() -> None:
        main.append(asyncio.current_task())  # type: ignore[arg-type]
        server = asyncio.get_running_loop().create_task(serve())
        # A bound for the failure only: the close ends within a few steps of the loop.
        done, _ = await asyncio.wait([server], timeout=60)
        assert done == {server} and server.cancelled()
        stats = cache.stats()
        assert (stats.background, stats.bytes_reserved, stats.tiers["host"].bytes_reserved) == (
            0,
            0,
            0,
        )
        with anyio.fail_after(60):
            await cache.wait_idle()

    asyncio.run(run())


@pytest.mark.skipif(sys.version_info < (3, 12), reason="asyncio.eager_task_factory: Python 3.12")
def test_a_task_that_ends_in_its_first_step_under_an_eager_task_factory_ends_once() -> None:
    """Under an eager task factory a load's first step runs as its task is made: one whose
    coroutine ends there (a load nobody waits for; a copy down whose backend never awaits)
    is counted out once, and not taken for a task that never ran (`Background._never_ran`
    started it again, and again: the loop spun and nothing waited for it ever returned)."""
    ran: list[int] = []

    async def quick() -> None:
        ran.append(1)  # no await: it ends in its first step

    async def main() -> None:
        loop = asyncio.get_running_loop()
        loop.set_task_factory(asyncio.eager_task_factory)  # type: ignore[attr-defined,unused-ignore]
        background = Background()
        async with anyio.create_task_group() as tg:
            background.start_load(tg, quick, name="quick")
            assert ran == [1] and background.running == 0
            with anyio.fail_after(60):  # a bound for the failure only
                await background.wait_tasks()
                await background.wait_idle()
        assert ran == [1]

    asyncio.run(main())


async def test_an_error_escaping_a_copy_down_during_the_close_is_raised_by_the_close(
    models: MemoryModels, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A copy down that ends with an error escaping it (a bug) while the cache closes, after
    the close cancelled it: the close raises that error, as it did when the copy was a task of
    the cache's group, rather than losing it in a task nobody awaits ("Task exception was
    never retrieved", about a group no longer active)."""
    models.add("a", 1000)
    entered, gate, closing = anyio.Event(), anyio.Event(), anyio.Event()

    class Uncancellable(RecordingBackend):
        async def demote(self, loaded: LoadedWeights, block: HostBlock) -> None:
            entered.set()
            with anyio.CancelScope(shield=True):  # as a copy in a worker thread: not cancelled
                await gate.wait()
            await super().demote(loaded, block)

    def bug(self: HostDiskTiers, entry: object) -> None:
        raise RuntimeError("a bug in the copy down")

    monkeypatch.setattr(HostDiskTiers, "_admit_host", bug)
    cache = ModelCache(
        models.template, backend=Uncancellable(on_host=False), device_budget=4000, host_budget=4000
    )

    async def open_gate_once_closing() -> None:
        await closing.wait()
        await anyio.wait_all_tasks_blocked()  # the close waits for the copy
        assert repr(cache).startswith("<ModelCache closing")
        gate.set()

    with pytest.RaisesGroup(pytest.RaisesExc(RuntimeError, match="a bug"), flatten_subgroups=True):
        async with anyio.create_task_group() as tg:
            tg.start_soon(open_gate_once_closing)
            async with cache:
                async with cache.use("a"):
                    pass
                assert cache.evict("a")
                await entered.wait()
                closing.set()
    assert cache.stats().background == 0


def _a_copy_down_blocked_in_a_thread(
    models: MemoryModels,
) -> tuple[ModelCache, threading.Event, threading.Event]:
    """A cache whose copies down of model "a" (1000 bytes) block in a worker thread: the first
    event is set once one does, the second frees it."""
    models.add("a", 1000)
    entered, release = threading.Event(), threading.Event()

    class ThreadDemote(RecordingBackend):
        async def demote(self, loaded: LoadedWeights, block: HostBlock) -> None:
            def blocked() -> None:
                entered.set()
                release.wait()

            await anyio.to_thread.run_sync(blocked)
            await super().demote(loaded, block)

    cache = ModelCache(
        models.template, backend=ThreadDemote(on_host=False), device_budget=4000, host_budget=4000
    )
    return cache, entered, release


def test_a_close_cancelled_again_while_it_waits_for_a_copy_down_still_ends(
    models: MemoryModels,
) -> None:
    """The task that owns the cache is cancelled natively (``task.cancel()``, as asyncio's
    shutdown or a supervisor does) to close it, and twice more while its close waits for a
    copy down in a worker thread: the close still waits for the copy and ends whole (the
    cache closed, the host bytes back), as a task group's exit does, and the task ends
    cancelled. It stopped at the first cancel in the wait: the cache stayed closing, its host
    tier never closed."""
    cache, entered, release = _a_copy_down_blocked_in_a_thread(models)

    async def owner() -> None:
        async with cache:
            async with cache.use("a"):
                pass
            assert cache.evict("a")
            await anyio.sleep_forever()

    async def run() -> None:
        task = asyncio.get_running_loop().create_task(owner())
        await anyio.to_thread.run_sync(entered.wait)
        for _ in range(3):
            task.cancel()
            await anyio.wait_all_tasks_blocked()  # the close waits for the copy's thread
        release.set()
        # A bound for the failure only: the close ends once the copy's thread returns.
        done, _ = await asyncio.wait([task], timeout=60)
        assert done == {task} and task.cancelled()
        assert repr(cache).startswith("<ModelCache closed")
        stats = cache.stats()
        assert (stats.background, stats.tiers["host"].bytes_reserved) == (0, 0)

    asyncio.run(run())


def test_a_timeout_expiring_while_the_close_waits_for_a_copy_down_ends_it_closed(
    models: MemoryModels,
) -> None:
    """``asyncio.timeout`` around the cache's block expires while its close waits for a copy
    down in a worker thread: the close waits for the copy and ends whole, then TimeoutError is
    raised. The close stopped at the cancellation: the cache stayed closing for good."""
    cache, entered, release = _a_copy_down_blocked_in_a_thread(models)

    async def release_later() -> None:
        await anyio.sleep(0.3)  # the timeout (0.1 s) has expired in the close
        release.set()

    async def run() -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(release_later)
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.1), cache:
                    async with cache.use("a"):
                        pass
                    assert cache.evict("a")
                    await anyio.to_thread.run_sync(entered.wait)
        assert repr(cache).startswith("<ModelCache closed")
        stats = cache.stats()
        assert (stats.background, stats.tiers["host"].bytes_reserved) == (0, 0)

    asyncio.run(run())
