"""CPU model buffers keep their pages across loads, never while anything references them."""

from __future__ import annotations

import gc
import mmap
import subprocess
import sys
import threading

import anyio
import pytest
import torch
from safetensors.torch import load

from modelcache import LRUPolicy, ModelCache, Weights, _direct, _pool
from modelcache._cache import ModelCache as _ModelCache
from modelcache._pool import BufferPool, PoolStats, pool_of

from .conftest import MemoryModels, check_invariants
from .safetensors_files import model_file

MIB = 1 << 20
#: Large enough for a pooled mapping (smaller models come from the heap).
BIG = 2 * MIB

pytestmark = pytest.mark.skipif(not BufferPool.available(), reason="needs Linux mmap/mremap")


def the_pool(cache: ModelCache) -> BufferPool:
    c: _ModelCache = cache
    pool = pool_of(c._backend)
    assert pool is not None
    return pool


def mapped(address: int) -> bool:
    """Whether ``address`` lies in a mapping of this process."""
    with open("/proc/self/maps") as maps:
        for line in maps:
            lo, hi = (int(x, 16) for x in line.split(None, 1)[0].split("-"))
            if lo <= address < hi:
                return True
    return False


def expected(models: MemoryModels, model_id: str) -> dict[str, torch.Tensor]:
    data = models.fs.cat(f"{models.root}/{model_id}/model.safetensors")
    return load(data)


def assert_exact(weights: Weights, want: dict[str, torch.Tensor]) -> None:
    assert set(weights) == set(want)
    for name, tensor in want.items():
        assert weights[name].dtype == tensor.dtype
        assert torch.equal(weights[name].view(torch.uint8), tensor.view(torch.uint8)), name


async def test_a_load_after_an_eviction_reuses_the_freed_buffers_pages(
    models: MemoryModels,
) -> None:
    """A model evicted with no reference left gives its buffer to the next load of a similar
    size (same address, counted as reused), and that load is bit-exact."""
    models.add("a", BIG + 8192, seed=1)
    models.add("b", BIG, seed=2)
    async with ModelCache(models.template, device_budget=BIG + 8192) as cache:
        async with cache.use("a") as weights:
            address = weights.buffer.data_ptr()
        del weights
        async with cache.use("b") as weights:  # evicts a: its buffer is free
            assert weights.buffer.data_ptr() == address
            assert_exact(weights, expected(models, "b"))
        del weights
        stats = the_pool(cache).stats()
        assert (stats.fresh, stats.reused) == (1, 1)
        assert cache.stats().pool_idle_bytes == 0  # a's pages are b's now
        check_invariants(cache)


async def test_a_tensor_kept_past_eviction_is_never_reused(models: MemoryModels) -> None:
    """A tensor a user keeps after its model was evicted keeps its bytes: the next load gets
    other memory, and the kept memory is pooled only once the tensor is gone."""
    models.add("a", BIG, seed=1)
    models.add("b", BIG, seed=2)
    async with ModelCache(models.template, device_budget=BIG) as cache:
        async with cache.use("a") as weights:
            kept = weights["w"][5:]  # a view: it holds the whole buffer
            before = kept.clone()
            address = weights.buffer.data_ptr()
        del weights
        async with cache.use("b") as weights:  # evicts a, still referenced by `kept`
            assert weights.buffer.data_ptr() != address
            assert_exact(weights, expected(models, "b"))
            gc.collect()
            assert torch.equal(kept, before)
        del weights
        pool = the_pool(cache)
        assert (pool.stats().fresh, pool.stats().live_buffers) == (2, 2)  # b resident, a kept
        assert torch.equal(kept, before)
        kept_address = kept.data_ptr()
        del kept
        # a's memory is free now, but b fills the budget: it goes back to the system.
        stats = pool.stats()
        assert (stats.live_buffers, stats.idle_buffers, stats.released) == (1, 0, 1)
        assert not mapped(kept_address)
        check_invariants(cache)


async def test_reused_memory_shows_no_bytes_of_the_previous_model(
    models: MemoryModels,
) -> None:
    """A load into reused pages is bit-exact, padding included: its buffer equals a fresh
    load's byte for byte (the previous model's bytes never show between tensors)."""
    g = torch.Generator().manual_seed(3)
    # A U8 tensor of an odd length before an F32: the F32 is shifted, leaving 3 padding bytes.
    tensors = {
        "u": torch.randint(0, 256, (BIG + 1,), dtype=torch.uint8, generator=g),
        "f": torch.randn(1000, generator=g),
    }
    models.put("padded/model.safetensors", model_file(tensors, misalign=True))
    models.add("noise", BIG + 8192, seed=4)  # random bytes everywhere the padding will be
    async with ModelCache(models.template, device_budget=BIG + 8192) as fresh_cache:
        async with fresh_cache.use("padded") as weights:
            fresh = weights.buffer.clone()
        del weights
    async with ModelCache(models.template, device_budget=BIG + 8192) as cache:
        async with cache.use("noise"):
            pass
        cache.evict("noise")
        # The worker thread that read noise drops its call's arguments (a view of the buffer)
        # just after handing back the result: the buffer is idle a moment after the eviction.
        with anyio.fail_after(10):
            while not the_pool(cache).stats().idle_buffers:  # noqa: ASYNC110 (no event to wait on)
                await anyio.sleep(0.001)
        async with cache.use("padded") as weights:
            assert the_pool(cache).stats().reused == 1
            assert_exact(weights, tensors)
            assert torch.equal(weights.buffer, fresh)
        del weights


async def test_pooled_and_live_bytes_stay_within_the_budget_when_sizes_do_not_fit(
    models: MemoryModels,
) -> None:
    """When no free buffer fits a load, the largest is grown and the rest given back: the bytes
    the pool holds (live + idle) never exceed the device plus host budget."""
    budget = 6 * MIB
    for i in range(3):
        models.add(f"small{i}", 2 * MIB - 4096, seed=i)
    models.add("big", 5 * MIB, seed=9)
    models.add("mid", 3 * MIB, seed=8)
    async with ModelCache(models.template, device_budget=budget, policy=LRUPolicy()) as cache:
        pool = the_pool(cache)
        assert pool.limit == budget
        for model_id in ("small0", "small1", "small2", "big", "mid", "small0", "big"):
            async with cache.use(model_id) as weights:
                assert_exact(weights, expected(models, model_id))
                stats = pool.stats()
                assert stats.live_bytes + stats.idle_bytes <= budget, stats
            del weights
            check_invariants(cache)
        stats = pool.stats()
        # "big" found three 2 MiB buffers idle: it grew one and the others went back; "mid"
        # took big's buffer, shrunk.
        assert stats.reused >= 2 and stats.released >= 2, stats


def test_growing_a_buffer_keeps_its_faulted_pages_and_releases_the_rest() -> None:
    """A request larger than every idle buffer grows the largest in place (its pages count as
    faulted) and gives back the other idle buffers over the limit, oldest first."""
    pool = BufferPool(10 * MIB)
    taken = [pool.take(3 * MIB) for _ in range(3)]
    addresses = [t.data_ptr() for t, _, _ in taken]
    for tensor, _, _ in taken:
        tensor.fill_(7)
    del taken, tensor
    assert pool.stats().idle_bytes == 9 * MIB
    tensor, view, faulted = pool.take(8 * MIB)
    assert faulted == 3 * MIB
    assert bool((tensor[: 3 * MIB] == 7).all())  # the old pages, as they were
    stats = pool.stats()
    assert (stats.live_bytes, stats.idle_bytes, stats.released) == (8 * MIB, 0, 2)
    assert sum(mapped(a) for a in addresses) <= 1  # two of three unmapped (one may have moved)
    del tensor, view
    pool.close()
    assert pool.stats().idle_bytes == 0


async def test_close_gives_every_pooled_buffer_back(models: MemoryModels) -> None:
    """After the cache closes, no idle buffer stays mapped; a buffer still referenced stays
    valid and is unmapped when its last tensor dies."""
    models.add("a", BIG, seed=1)
    models.add("b", BIG, seed=2)
    async with ModelCache(models.template, device_budget=BIG) as cache:
        async with cache.use("a") as weights:
            idle_address = weights.buffer.data_ptr()
        del weights
        async with cache.use("b") as weights:
            pass  # b reuses a's buffer
        kept = weights["w"]
        del weights
        cache.evict("b")
        assert mapped(idle_address)
        pool = the_pool(cache)
    assert pool.stats().idle_bytes == 0 and pool.limit == 0
    assert torch.equal(kept, expected(models, "b")["w"])
    address = kept.data_ptr()
    assert mapped(address)
    del kept
    gc.collect()
    assert not mapped(address)
    assert pool.stats().live_bytes == 0


def test_a_backend_used_without_a_cache_keeps_nothing() -> None:
    """A pool with limit 0 (a backend no cache configured) unmaps a buffer when it dies."""
    pool = BufferPool()
    tensor, view, faulted = pool.take(BIG)
    address = tensor.data_ptr()
    assert faulted == 0
    del tensor, view
    assert not mapped(address)
    assert pool.stats() == PoolStats(0, 0, 0, 0, 0, reused=0, fresh=1, released=1)


async def test_host_tier_models_count_in_the_pool_limit(models: MemoryModels) -> None:
    """With a host tier, the pool's limit is the device plus host budget (CPU buffers move
    between the two tiers without a copy)."""
    models.add("a", BIG)
    async with ModelCache(models.template, device_budget=BIG, host_budget=3 * BIG) as cache:
        assert the_pool(cache).limit == 4 * BIG
        async with cache.use("a") as weights:
            assert_exact(weights, expected(models, "a"))
        del weights


async def test_a_budget_of_whole_models_reuses_buffers_whose_size_is_no_page_multiple(
    models: MemoryModels,
) -> None:
    """A budget of exactly k models keeps an evicted model's buffer for the next load even when
    the model's size is no page multiple (the limit counts bytes asked for, as the budget does)."""
    size = BIG + 2
    for i in range(4):
        models.add(f"m{i}", size, seed=i)
    async with ModelCache(models.template, device_budget=2 * size) as cache:
        for i in range(8):
            async with cache.use(f"m{i % 4}") as weights:
                assert_exact(weights, expected(models, f"m{i % 4}"))
            del weights
        stats = the_pool(cache).stats()
        assert (stats.fresh, stats.released) == (2, 0)  # every later load reused a buffer
        assert stats.live_bytes + stats.idle_bytes <= stats.limit + 2 * mmap.PAGESIZE
        check_invariants(cache)


class _RecordingLibc:
    """The C library as `_pool` calls it, recording the address and thread of every munmap."""

    def __init__(self, real: object) -> None:
        self.real = real
        self.munmap_threads: list[int] = []
        self.unmapped: list[int] = []

    def __getattr__(self, name: str) -> object:
        return getattr(self.real, name)

    def munmap(self, address: int, size: int) -> int:
        self.munmap_threads.append(threading.get_ident())
        self.unmapped.append(address)
        return self.real.munmap(address, size)  # type: ignore[attr-defined, no-any-return]


@pytest.fixture
def recording_libc(monkeypatch: pytest.MonkeyPatch) -> _RecordingLibc:
    libc = _RecordingLibc(_pool._libc)  # type: ignore[attr-defined]
    monkeypatch.setattr(_pool, "_libc", libc)
    return libc


async def test_a_large_buffer_dying_on_the_event_loop_is_unmapped_off_it(
    recording_libc: _RecordingLibc,
) -> None:
    """A large buffer whose last tensor dies on the event loop's thread is unmapped by another
    thread (munmap takes ~0.1 ms a MiB: over 100 ms for 1 GiB held the loop)."""
    pool = BufferPool()
    tensor, view, _ = pool.take(4 * BIG)
    address = tensor.data_ptr()
    del tensor, view  # the finalizer runs here, on this (the loop's) thread
    _pool._UNMAPPER.wait()
    assert recording_libc.unmapped == [address]
    assert threading.get_ident() not in recording_libc.munmap_threads
    assert pool.stats().released == 1


_FORK_WHILE_UNMAPPING = """
import os, signal, threading
from modelcache import _pool
from modelcache._pool import BufferPool

parent, busy, release = os.getpid(), threading.Event(), threading.Event()
real = _pool._libc


class Held:  # the parent's unmapper thread waits inside munmap until told
    def __getattr__(self, name):
        return getattr(real, name)

    def munmap(self, address, size):
        if os.getpid() == parent and threading.current_thread().name == "modelcache-unmap":
            busy.set()
            release.wait()
        return real.munmap(address, size)


_pool._libc = Held()
pool = BufferPool()
tensor, view, _ = pool.take(4 << 20)
del tensor, view  # given back on this thread: unmapped in the unmapper's
busy.wait()
pid = os.fork()
if pid == 0:
    signal.alarm(60)  # a child whose unmapper never runs would wait forever
    tensor, view, _ = pool.take(4 << 20)
    address = tensor.data_ptr()
    del tensor, view
    _pool._UNMAPPER.wait()
    with open("/proc/self/maps") as maps:
        spans = [[int(x, 16) for x in line.split(None, 1)[0].split("-")] for line in maps]
    os._exit(int(any(lo <= address < hi for lo, hi in spans)))
release.set()
_, status = os.waitpid(pid, 0)
print("child", os.waitstatus_to_exitcode(status))
"""


def test_a_child_forked_while_the_unmapper_runs_unmaps_what_it_gives_back() -> None:
    """A process forked while the parent's unmapper thread is busy gets an unmapper of its own:
    what it gives back is unmapped and `wait` returns (the parent's thread is not in the child)."""
    done = subprocess.run(
        [sys.executable, "-c", _FORK_WHILE_UNMAPPING], capture_output=True, text=True, timeout=300
    )
    assert done.stdout.strip() == "child 0", done.stdout + done.stderr


async def test_closing_a_cache_unmaps_its_large_idle_buffers_off_the_event_loop(
    models: MemoryModels, recording_libc: _RecordingLibc
) -> None:
    """Closing a cache gives its idle buffers back from another thread than the loop's, and
    they are unmapped once the unmapper has run."""
    models.add("a", 4 * BIG, seed=1)
    async with ModelCache(models.template, device_budget=4 * BIG) as cache:
        async with cache.use("a") as weights:
            address = weights.buffer.data_ptr()
        del weights
        cache.evict("a")
        assert mapped(address)
        pool = the_pool(cache)
        # The worker thread that read a drops its call's arguments (a view of the buffer) just
        # after handing back the result: the buffer is idle a moment after the eviction.
        with anyio.fail_after(10):
            while not pool.stats().idle_buffers:  # noqa: ASYNC110 (no event to wait on)
                await anyio.sleep(0.001)
    _pool._UNMAPPER.wait()
    # Unmapped (the address itself may be mapped again since, by anything else).
    assert recording_libc.unmapped == [address]
    assert pool.stats().idle_bytes == 0
    assert threading.get_ident() not in recording_libc.munmap_threads


def test_a_lead_starts_the_buffer_mid_page_and_counts_only_its_bytes() -> None:
    """``take(n, lead)`` hands out ``n`` bytes starting ``lead`` bytes into a page-aligned
    mapping (where a direct read lands straight in it); the limit counts ``n``: a budget of
    exactly two such buffers keeps a dead one for the next, whose faulted bytes are counted from
    the buffer's start."""
    lead = 4096 - 8
    pool = BufferPool(2 * BIG)
    first, view, faulted = pool.take(BIG, lead)
    second, _, _ = pool.take(BIG, lead)
    assert (first.data_ptr() % mmap.PAGESIZE, first.numel(), len(view), faulted) == (
        lead,
        BIG,
        BIG,
        0,
    )
    assert view.readonly is False and _direct._address(view) == first.data_ptr()
    first.fill_(5)
    address = first.data_ptr()
    del first, view
    stats = pool.stats()
    assert (stats.idle_buffers, stats.released) == (1, 0), stats  # kept: 2 * BIG fits the limit
    again, _, faulted = pool.take(BIG, lead)
    assert again.data_ptr() == address and faulted == BIG
    assert bool((again == 5).all())
    plain, _, faulted = pool.take(MIB)  # no lead: page-aligned, as before
    assert plain.data_ptr() % mmap.PAGESIZE == 0
    for bad in (-1, mmap.PAGESIZE):
        with pytest.raises(ValueError, match="lead"):
            pool.take(BIG, bad)
    del again, second, plain
    pool.close()
