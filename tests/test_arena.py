"""modelcache._arena: one host slab, page-aligned blocks, best-fit with coalescing."""

from __future__ import annotations

import gc
import itertools
import threading
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from modelcache import _arena
from modelcache._arena import PAGE, HostArena, HostBlock, allocate_slab, host_view


def check(arena: HostArena, live: list[HostBlock]) -> None:
    """Blocks and free runs tile the capacity: aligned, inside it, disjoint, runs coalesced."""
    blocks = sorted(live, key=lambda b: b.offset)
    for b in blocks:
        assert b.offset % PAGE == 0 and b.size % PAGE == 0 and b.size >= max(b.nbytes, 1)
        assert b.offset >= 0 and b.offset + b.size <= arena.capacity
        assert b.tensor.numel() == b.nbytes
        if b.nbytes:
            assert b.tensor.data_ptr() % PAGE == 0
    for a, b in itertools.pairwise(blocks):
        assert a.offset + a.size <= b.offset, (a, b)
    runs = list(zip(arena._run_offsets, arena._run_sizes, strict=True))
    assert runs == sorted(runs)
    for (o1, s1), (o2, _) in itertools.pairwise(runs):
        assert o1 + s1 < o2, "adjacent free runs were not merged"
    spans = sorted([(b.offset, b.size) for b in blocks] + runs)
    cursor = 0
    for offset, size in spans:
        assert offset == cursor, "a byte is neither free nor in a block, or in both"
        cursor += size
    assert cursor == arena.capacity
    assert arena.used == sum(b.size for b in blocks)
    stats = arena.stats()
    assert stats.used + stats.free == stats.capacity
    assert stats.largest_free == max(arena._run_sizes, default=0)
    assert stats.blocks == len(blocks)


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.tuples(st.booleans(), st.integers(0, 5 * PAGE + 7), st.integers(0, 1000)),
        max_size=60,
    )
)
def test_random_alloc_free_never_overlap_and_coalesce(ops: list[tuple[bool, int, int]]) -> None:
    """Any alloc/free sequence keeps blocks disjoint, aligned and in bounds; all freed -> one run."""
    arena = HostArena(16 * PAGE + 100, pin=False)
    assert arena.capacity == 16 * PAGE
    live: list[HostBlock] = []
    stamp: dict[int, int] = {}  # id(block) -> the byte each block's memory is filled with
    for is_alloc, nbytes, pick in ops:
        if is_alloc or not live:
            largest = arena.largest_free
            block = arena.alloc(nbytes)
            if block is None:
                assert largest < HostArena.block_size(nbytes)
            else:
                assert block.nbytes == nbytes and block.size == HostArena.block_size(nbytes)
                value = len(stamp) % 251 + 1
                block.view()[:] = bytes([value]) * nbytes
                stamp[id(block)] = value
                live.append(block)
        else:
            block = live.pop(pick % len(live))
            arena.free(block)
        check(arena, live)
        for b in live:  # nobody else's writes reached a live block's memory
            assert bytes(b.view()) == bytes([stamp[id(b)]]) * b.nbytes
    for block in live:
        arena.free(block)
    check(arena, [])
    assert arena.largest_free == arena.capacity and arena.used == 0
    assert arena.fragmentation == 0.0


def test_alloc_returns_none_when_no_run_fits() -> None:
    """A full arena, or one without a large enough run, answers None instead of raising."""
    arena = HostArena(4 * PAGE, pin=False)
    blocks = [arena.alloc(PAGE) for _ in range(4)]
    assert all(b is not None for b in blocks)
    assert arena.alloc(1) is None
    assert arena.stats().free == 0
    a, b, c, _d = (blk for blk in blocks if blk is not None)
    arena.free(a)
    arena.free(c)
    assert arena.stats().free == 2 * PAGE
    assert arena.largest_free == PAGE
    assert arena.fragmentation == pytest.approx(0.5)
    assert arena.alloc(PAGE + 1) is None  # 2 pages free, but not in one run
    arena.free(b)  # merges a, b, c into one run
    assert arena.largest_free == 3 * PAGE
    assert arena.alloc(3 * PAGE) is not None


def test_best_fit_keeps_the_large_run() -> None:
    """A small request takes the smallest run that fits, leaving the big run whole."""
    arena = HostArena(10 * PAGE, pin=False)
    first = arena.alloc(PAGE)
    keep = arena.alloc(PAGE)
    assert first is not None and keep is not None
    arena.free(first)  # runs: [0, 1 page) and [2 pages, 10 pages)
    small = arena.alloc(10)
    assert small is not None and small.offset == 0
    assert arena.largest_free == 8 * PAGE


def test_sizes_round_up_to_pages() -> None:
    """Zero and odd sizes reserve whole pages; tensors and views have exactly nbytes."""
    arena = HostArena(8 * PAGE, pin=False)
    empty = arena.alloc(0)
    odd = arena.alloc(PAGE + 1)
    assert empty is not None and odd is not None
    assert (empty.size, odd.size) == (PAGE, 2 * PAGE)
    assert len(empty.view()) == 0 and len(odd.view()) == PAGE + 1
    assert odd.offset % PAGE == 0 and odd.tensor.data_ptr() % PAGE == 0
    assert arena.used == 3 * PAGE


def test_double_free_and_foreign_block_raise() -> None:
    """Freeing a block twice, or another arena's block, is a ValueError and changes nothing."""
    arena, other = HostArena(4 * PAGE, pin=False), HostArena(4 * PAGE, pin=False)
    block = arena.alloc(100)
    theirs = other.alloc(100)
    assert block is not None and theirs is not None
    with pytest.raises(ValueError):
        arena.free(theirs)
    arena.free(block)
    with pytest.raises(ValueError):
        arena.free(block)
    assert arena.used == 0 and arena.largest_free == 4 * PAGE
    again = arena.alloc(100)
    assert again is not None and again.offset == block.offset
    with pytest.raises(ValueError):
        arena.free(block)  # a stale block at the same offset as a live one
    arena.free(again)


def test_one_allocation_made_lazily_and_reused() -> None:
    """The slab is made on the first alloc, once; blocks are views of it."""
    arena = HostArena(8 * PAGE, pin=False)
    assert not arena.stats().allocated
    assert arena.alloc(9 * PAGE) is None
    assert not arena.stats().allocated  # a refused request allocates nothing
    a = arena.alloc(PAGE)
    assert a is not None and arena.stats().allocated
    slab = arena._slab
    assert slab is not None
    b = arena.alloc(2 * PAGE)
    assert b is not None
    arena.free(a)
    c = arena.alloc(PAGE)
    assert c is not None and arena._slab is slab
    for block in (b, c):
        assert block.tensor.untyped_storage().data_ptr() == slab.untyped_storage().data_ptr()
        assert block.tensor.data_ptr() == slab.data_ptr() + block.offset


@pytest.mark.asyncio
async def test_allocate_ahead_in_a_thread() -> None:
    """``await arena.allocate()`` makes the slab once; later allocs use it."""
    arena = HostArena(4 * PAGE, pin=False)
    await arena.allocate()
    slab = arena._slab
    assert slab is not None and slab.numel() == 4 * PAGE
    await arena.allocate()
    assert arena._slab is slab
    block = arena.alloc(10)
    assert block is not None and block.tensor.data_ptr() == slab.data_ptr()


def test_view_is_writable_and_keeps_memory_alive() -> None:
    """view() writes the block's tensor, and outlives the arena and the block."""
    arena = HostArena(2 * PAGE, pin=False)
    block = arena.alloc(10)
    assert block is not None
    view = block.view()
    assert view.format == "B" and not view.readonly and view.c_contiguous
    view[:] = bytes(range(10))
    assert block.tensor.tolist() == list(range(10))
    block.tensor[0] = 200
    del arena, block
    gc.collect()
    assert bytes(view) == bytes([200, *range(1, 10)])


def test_zero_capacity_arena() -> None:
    """A zero-byte arena allocates nothing and refuses every request."""
    arena = HostArena(0, pin=False)
    assert arena.alloc(0) is None
    assert arena.stats().largest_free == 0 and not arena.stats().allocated


def test_host_view_rejects_other_tensors() -> None:
    """host_view needs a contiguous CPU uint8 tensor."""
    with pytest.raises(ValueError):
        host_view(torch.zeros(4, dtype=torch.float32))
    with pytest.raises(ValueError):
        host_view(torch.zeros(8, dtype=torch.uint8)[::2])
    assert len(host_view(torch.zeros(0, dtype=torch.uint8))) == 0


def test_pinning_without_cuda_is_a_clear_error() -> None:
    """pin=True on a machine without CUDA is a ValueError from us, not a torch RuntimeError."""
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ValueError, match="CUDA"):
        HostArena(PAGE, pin=True)
    with pytest.raises(ValueError, match="CUDA"):
        allocate_slab(PAGE, pin=True)


def test_slab_is_page_aligned_and_exact() -> None:
    """allocate_slab returns exactly nbytes, starting on a page."""
    for n in (1, PAGE, 3 * PAGE + 5, 5 << 20):
        slab = allocate_slab(n, pin=False)
        assert slab.numel() == n and slab.data_ptr() % PAGE == 0
    assert allocate_slab(0, pin=False).numel() == 0


class RecordingDevices:
    """Stand-ins for ``torch.cuda.device`` and torch's cudart: each runtime call records the
    calling thread's current device, which (as in CUDA) starts at 0 in every thread."""

    def __init__(self) -> None:
        self.local = threading.local()
        self.calls: list[tuple[str, int]] = []
        devices = self

        class Guard:
            def __init__(self, device: Any) -> None:
                self.index = torch.device(device).index

            def __enter__(self) -> None:
                self.previous = devices.current()
                devices.local.device = self.index

            def __exit__(self, *exc: object) -> None:
                devices.local.device = self.previous

        self.guard = Guard

    def current(self) -> int:
        return int(getattr(self.local, "device", 0))

    def cudaHostRegister(self, address: int, nbytes: int, flags: int) -> int:
        self.calls.append(("register", self.current()))
        return 0

    def cudaHostUnregister(self, address: int) -> int:
        self.calls.append(("unregister", self.current()))
        return 0


def test_pinning_registers_and_unregisters_on_the_arena_device(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A cuda:1 arena's slab is registered and unregistered (by whichever thread drops it) with
    device 1 current: never on device 0 (every thread's start), whose context that would make."""
    devices = RecordingDevices()
    monkeypatch.setattr(torch.cuda, "device", devices.guard)
    monkeypatch.setattr(_arena, "_cudart", lambda: devices)
    monkeypatch.setattr(_arena, "cuda_available", lambda: True)
    arena = HostArena(16 * PAGE, pin=True, device="cuda:1")
    block = arena.alloc(100)  # makes the slab on this thread, whose current device is 0
    assert block is not None
    holder = [arena, block]
    del arena, block

    def drop() -> None:
        holder.clear()
        gc.collect()

    thread = threading.Thread(target=drop)
    thread.start()
    thread.join()
    assert devices.calls == [("register", 1), ("unregister", 1)]


@pytest.mark.cuda
def test_pinned_arena_blocks_are_pinned_and_copy_exactly() -> None:
    """A pinned arena's blocks are page-locked, aligned, and round-trip through the device."""
    arena = HostArena(64 * PAGE + 123, pin=True)
    block = arena.alloc(5 * PAGE + 3)
    assert block is not None
    assert block.tensor.is_pinned()
    assert block.tensor.data_ptr() % PAGE == 0
    data = torch.randint(0, 256, (block.nbytes,), dtype=torch.uint8)
    block.tensor.copy_(data)
    on_device = block.tensor.to("cuda", non_blocking=True)
    torch.cuda.synchronize()
    back = arena.alloc(block.nbytes)
    assert back is not None
    back.tensor.copy_(on_device, non_blocking=True)
    torch.cuda.synchronize()
    assert torch.equal(back.tensor, data)
    arena.free(block)
    arena.free(back)
    assert arena.largest_free == arena.capacity
