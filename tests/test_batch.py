"""modelcache._batch: small local reads asked for together share one worker-thread call."""

from __future__ import annotations

import gc
import os
import random
import threading
import weakref
from collections.abc import Sequence
from pathlib import Path

import anyio
import pytest

from modelcache import ModelCache, _batch
from modelcache._batch import SmallReads
from modelcache._exceptions import ModelNotFoundError
from modelcache._store import Store

from .conftest import check_invariants, hold_every_read_slot, model_bytes, settle


def _files(tmp_path: Path, n: int) -> list[bytes]:
    datas = [bytes([i]) * (100 + i) for i in range(n)]
    for i, data in enumerate(datas):
        (tmp_path / f"m{i}").mkdir()
        (tmp_path / f"m{i}" / "w.bin").write_bytes(data)
    return datas


async def test_header_reads_asked_together_share_a_worker_thread_call(
    tmp_path: Path, thread_calls: list[str]
) -> None:
    """Local header reads (read_head) and stats asked for while one is in a worker thread run
    together in the next thread call, each getting its own answer (and its own error)."""
    datas = _files(tmp_path, 20)
    store = Store(f"file://{tmp_path}/{{model_id}}")
    heads: dict[int, tuple[int, bytes]] = {}
    sizes: dict[int, int] = {}
    missing: list[BaseException] = []

    async def head(i: int) -> None:
        url = store.join(store.model_url(f"m{i}"), "w.bin")
        heads[i] = await store.read_head(url, 50, model_id=f"m{i}")
        sizes[i] = await store.size(url, model_id=f"m{i}")

    async def absent() -> None:
        try:
            await store.read_head(store.join(store.model_url("m0"), "nope"), 8, model_id="m0")
        except ModelNotFoundError as exc:
            missing.append(exc)

    async with anyio.create_task_group() as tg:
        for i in range(20):
            tg.start_soon(head, i)
        tg.start_soon(absent)
    assert heads == {i: (len(d), d[:50]) for i, d in enumerate(datas)}
    assert sizes == {i: len(d) for i, d in enumerate(datas)}
    assert len(missing) == 1
    # The first read goes alone (nothing else was asked yet); the other 20 wait for it and go
    # in one call; their stats in one more. One call per read before batching: 41.
    assert len(thread_calls) <= 4, thread_calls
    await store.aclose()


async def test_a_cancelled_caller_leaves_the_queue_and_the_rest_are_read(tmp_path: Path) -> None:
    """A caller cancelled while its read waits (even the one that would drive the next thread
    call, or drove one that never started) leaves at once; every other caller gets its bytes."""
    datas = _files(tmp_path, 4)
    limiter = anyio.CapacityLimiter(1)
    reads = SmallReads(lambda: limiter, lanes=1)
    holder = object()
    await limiter.acquire_on_behalf_of(holder)  # no thread call can start yet
    got: dict[int, bytes] = {}
    scopes = [anyio.CancelScope() for _ in range(4)]

    async def read(i: int) -> None:
        with scopes[i]:
            got[i] = await reads.run((tmp_path / f"m{i}" / "w.bin").read_bytes)

    async with anyio.create_task_group() as tg:
        for i in range(4):
            tg.start_soon(read, i)
        await anyio.wait_all_tasks_blocked()
        # m0's caller drives a call of [m0] waiting for the limiter; m1..m3 are queued.
        scopes[0].cancel()  # the driver: its call never started
        scopes[2].cancel()  # a queued read
        await anyio.wait_all_tasks_blocked()
        limiter.release_on_behalf_of(holder)
    assert got == {1: datas[1], 3: datas[3]}
    assert reads.batches == 2  # the cancelled call, then m1 and m3 together
    assert not reads._queue and reads._drivers == 0


async def test_a_read_error_reaches_its_caller_only(tmp_path: Path) -> None:
    """An exception raised by one read of a batch is raised by that read's caller alone."""
    limiter = anyio.CapacityLimiter(1)
    reads = SmallReads(lambda: limiter, lanes=1)
    results: dict[str, object] = {}

    def fail() -> bytes:
        raise OSError("broken")

    async def run(name: str, call: object) -> None:
        try:
            results[name] = await reads.run(call)  # type: ignore[arg-type]
        except OSError as exc:
            results[name] = exc

    async with anyio.create_task_group() as tg:
        tg.start_soon(run, "first", bytes)
        tg.start_soon(run, "bad", fail)
        tg.start_soon(run, "good", bytes)
    assert results["first"] == b"" and results["good"] == b""
    assert isinstance(results["bad"], OSError) and str(results["bad"]) == "broken"
    assert reads.batches == 1  # asked for in one turn of the loop: one batch


@pytest.mark.parametrize("n", [1, 3])
async def test_no_read_is_left_behind(tmp_path: Path, n: int) -> None:
    """However the reads arrive, every one is run and the queue ends empty, nobody driving."""
    limiter = anyio.CapacityLimiter(1)
    reads = SmallReads(lambda: limiter, lanes=1)
    out: list[int] = []

    async def run(i: int) -> None:
        out.append(await reads.run(int, str(i)))

    for _ in range(2):
        async with anyio.create_task_group() as tg:
            for i in range(n):
                tg.start_soon(run, i)
    assert sorted(out) == sorted(list(range(n)) * 2)
    assert not reads._queue and reads._drivers == 0


class _GatedWeights(Store):
    """A local Store whose weight reads of one id wait for an event (headers are not gated)."""

    def __init__(self, location: str, slow_id: str) -> None:
        super().__init__(location)
        self.slow_id = slow_id
        self.gate = anyio.Event()

    async def read_scatter(
        self, url: str, offset: int, dests: Sequence[memoryview], *, model_id: str
    ) -> None:
        if model_id == self.slow_id:
            await self.gate.wait()
        await super().read_scatter(url, offset, dests, model_id=model_id)


@pytest.mark.usefixtures("count_threads")
async def test_local_header_reads_take_no_load_slot(
    tmp_path: Path, thread_calls: list[str]
) -> None:
    """A load's header read of a local file takes no load slot: while the only slot reads a
    model's weights, the loads queued behind it read their headers (together, in one or two
    thread calls) and reserve their bytes, and each waits for the slot only to read weights.
    (use()'s loads: a prefetch reads its loads' headers itself and runs them in lanes.)"""
    for name, nbytes in [("big", 1000)] + [(f"m{i}", 10 + i) for i in range(10)]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(model_bytes(nbytes))
    store = _GatedWeights(f"file://{tmp_path}/{{model_id}}", "big")
    async with ModelCache(store, device_budget=10_000, max_concurrent_loads=1) as cache:
        async with anyio.create_task_group() as tg:
            tg.start_soon(cache.prefetch, ["big"])
            await settle()  # big holds the only slot, its weights read waiting
            thread_calls.clear()

            async def use(model_id: str) -> None:
                async with cache.use(model_id):
                    pass

            for i in range(10):
                tg.start_soon(use, f"m{i}")
            await settle()
            stats = cache.stats()
            assert stats.loading == 11
            assert stats.bytes_reserved == 1000 + sum(10 + i for i in range(10))
            assert thread_calls.count("_run_batch") <= 2, thread_calls
            check_invariants(cache)
            store.gate.set()
        assert sorted(cache.resident()) == sorted(["big"] + [f"m{i}" for i in range(10)])


async def test_a_read_whose_caller_left_is_never_handed_the_drive(tmp_path: Path) -> None:
    """A read taken into a batch whose caller then leaves is not put back in the queue when the
    batch's thread call never starts (its driver cancelled): put back, it could be handed the
    drive with nobody to take it, and every later read would wait forever."""
    limiter = anyio.CapacityLimiter(1)
    reads = SmallReads(lambda: limiter, lanes=1)
    holder = object()
    await limiter.acquire_on_behalf_of(holder)  # no thread call can start yet
    scopes = {name: anyio.CancelScope() for name in "abc"}

    async def read(name: str) -> None:
        with scopes[name]:
            await reads.run(str, name)

    async with anyio.create_task_group() as tg:
        for name in "abc":
            tg.start_soon(read, name)
        await anyio.wait_all_tasks_blocked()
        scopes["a"].cancel()  # the driver of [a]: b drives [b, c], waiting for the limiter
        await anyio.wait_all_tasks_blocked()
        scopes["c"].cancel()  # c, in b's batch, leaves at once
        await anyio.wait_all_tasks_blocked()
        scopes["b"].cancel()  # the driver: its call never started
        await anyio.wait_all_tasks_blocked()
    assert not reads._queue and reads._drivers == 0  # nobody waits: nobody holds the drive
    limiter.release_on_behalf_of(holder)
    assert await reads.run(str, "d") == "d"


class _Payload:
    """A read's result that can be weakly referenced (bytes cannot)."""


async def test_a_kept_read_error_keeps_no_other_read_of_its_batch() -> None:
    """The exception of one read of a batch, kept by its caller, keeps no other read's result
    alive (without a garbage collection): the batch's frame in its traceback holds no batch."""
    limiter = anyio.CapacityLimiter(1)
    reads = SmallReads(lambda: limiter, lanes=1)
    refs: list[weakref.ref[_Payload]] = []
    kept: list[OSError] = []

    def fail() -> _Payload:
        raise OSError("broken")

    async def good() -> None:
        refs.append(weakref.ref(await reads.run(_Payload)))

    async def bad() -> None:
        try:
            await reads.run(fail)
        except OSError as exc:
            kept.append(exc)

    gc.disable()
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(good)  # all four in one batch (asked for in one turn of the loop)
            tg.start_soon(good)
            tg.start_soon(bad)
            tg.start_soon(good)
        assert reads.batches == 1 and len(kept) == 1
        assert [ref() for ref in refs] == [None, None, None]
    finally:
        gc.enable()


class _CountedOpens(Store):
    """A local Store that records the model id of every file it opens."""

    def __init__(self, location: str) -> None:
        self.opened: list[str] = []
        super().__init__(location, opener=self._open)

    def _open(self, path: str) -> int:
        self.opened.append(Path(path).parent.name)
        return os.open(path, os.O_RDONLY)


async def test_an_abandoned_load_reads_no_header(tmp_path: Path) -> None:
    """Loads whose callers all leave while their local header reads wait in the batch queue
    read nothing (their reads leave the queue), as loads waiting for a load slot never did: a
    backlog of abandoned loads does not hold up the header read of a wanted one."""
    for name in [f"m{i}" for i in range(10)] + ["wanted"]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(model_bytes(10))
    store = _CountedOpens(f"file://{tmp_path}/{{model_id}}")
    async with ModelCache(store, device_budget=10_000) as cache:
        give_back = await hold_every_read_slot(store)  # no thread call can start yet
        scopes = [anyio.CancelScope() for _ in range(10)]

        async def use(i: int) -> None:
            with scopes[i]:
                async with cache.use(f"m{i}"):
                    pass

        async with anyio.create_task_group() as tg:
            for i in range(10):
                tg.start_soon(use, i)
            await anyio.wait_all_tasks_blocked()  # every header read waits in the batch queue
            for scope in scopes:
                scope.cancel()  # every caller leaves
            await anyio.wait_all_tasks_blocked()
            give_back()
        async with cache.use("wanted"):
            pass
        await cache.wait_idle()
        assert set(store.opened) == {"wanted"}  # its header and its weights
        assert cache.resident() == ["wanted"] and cache.stats().bytes_reserved == 10
        check_invariants(cache)


async def test_a_batch_keeps_no_result_its_caller_dropped() -> None:
    """Once a batch has run, nothing of it keeps its reads' results (the worker thread that ran
    it still holds its arguments a moment after handing back): a result its caller dropped is
    freed."""
    limiter = anyio.CapacityLimiter(1)
    reads = SmallReads(lambda: limiter, lanes=1)
    refs: list[weakref.ref[_Payload]] = []

    async def good() -> None:
        refs.append(weakref.ref(await reads.run(_Payload)))

    gc.disable()
    try:
        async with anyio.create_task_group() as tg:
            for _ in range(3):
                tg.start_soon(good)
        assert reads.batches == 1
        assert [ref() for ref in refs] == [None, None, None]
    finally:
        gc.enable()


async def test_callers_leaving_do_not_scan_the_queue(monkeypatch: pytest.MonkeyPatch) -> None:
    """A caller that leaves while its read is queued does not search the queue for it (it is
    skipped where it stands): thousands of callers leaving newest first (a close, a burst of
    timeouts) would otherwise stall the event loop for a time quadratic in their number."""
    limiter = anyio.CapacityLimiter(1)
    reads = SmallReads(lambda: limiter, lanes=1)
    holder = object()
    await limiter.acquire_on_behalf_of(holder)  # no thread call can start yet
    compared: list[object] = []

    def eq(self: object, other: object) -> bool:
        compared.append(other)
        return self is other

    monkeypatch.setattr(_batch._Read, "__eq__", eq)
    scopes = [anyio.CancelScope() for _ in range(50)]
    got: list[str] = []

    async def read(i: int) -> None:
        with scopes[i]:
            got.append(await reads.run(str, i))

    async with anyio.create_task_group() as tg:
        for i in range(50):
            tg.start_soon(read, i)
        await anyio.wait_all_tasks_blocked()
        for scope in reversed(scopes[1:49]):  # newest first; 0 drives, 49 stays
            scope.cancel()
            await anyio.wait_all_tasks_blocked()
        limiter.release_on_behalf_of(holder)
    assert compared == []
    assert sorted(got) == ["0", "49"]
    assert not reads._queue and reads._drivers == 0


async def test_a_read_that_blocks_holds_one_lane_and_the_others_are_read() -> None:
    """A read that blocks in its thread (a stalled mount, a FIFO with no writer) holds up only
    its lane: reads asked for after it are run in the other lanes (with one lane they all waited
    for it, and a model's cold load waited on another model's stuck file)."""
    reads = SmallReads(lambda: anyio.CapacityLimiter(8), lanes=2)
    stuck = threading.Event()
    answers: list[str] = []

    async def read(i: int) -> None:
        answers.append(await reads.run(str, i))

    async with anyio.create_task_group() as tg:
        tg.start_soon(reads.run, stuck.wait)
        await anyio.wait_all_tasks_blocked()  # its batch is in its thread, blocked
        try:
            with anyio.fail_after(30):  # a guard against the hang, not a timing
                async with anyio.create_task_group() as others:
                    for i in range(20):
                        others.start_soon(read, i)
        finally:
            stuck.set()
        assert sorted(answers) == sorted(str(i) for i in range(20))
    assert not reads._queue and reads._drivers == 0


@pytest.mark.parametrize("seed", range(20))
async def test_lanes_are_never_lost_whoever_leaves(seed: int) -> None:
    """Callers leaving at any point (queued, handed a lane, driving a batch that never started)
    never lose a lane or a read: the others are all answered, and at the end no lane is held
    and nothing is queued."""
    rng = random.Random(seed)
    limiter = anyio.CapacityLimiter(1)
    reads = SmallReads(lambda: limiter, lanes=3)
    holder = object()
    await limiter.acquire_on_behalf_of(holder)  # batches wait for the limiter
    scopes = [anyio.CancelScope() for _ in range(30)]
    answers: dict[int, str] = {}

    async def read(i: int) -> None:
        with scopes[i]:
            answers[i] = await reads.run(str, i)

    cancelled: set[int] = set()
    async with anyio.create_task_group() as tg:
        for i in range(30):
            tg.start_soon(read, i)
            if rng.random() < 0.3:
                await anyio.wait_all_tasks_blocked()
        await anyio.wait_all_tasks_blocked()
        for i in rng.sample(range(30), 12):
            scopes[i].cancel()
            cancelled.add(i)
            if rng.random() < 0.5:
                await anyio.wait_all_tasks_blocked()
            if rng.random() < 0.2:  # let one batch run now and then
                limiter.release_on_behalf_of(holder)
                await anyio.wait_all_tasks_blocked()
                await limiter.acquire_on_behalf_of(holder)
        limiter.release_on_behalf_of(holder)
    assert set(range(30)) - cancelled <= set(answers)
    assert all(answers[i] == str(i) for i in answers)
    assert not reads._queue and reads._drivers == 0
