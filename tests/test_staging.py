"""modelcache._staging: chunked, overlapped store -> device copies through a reusable pool.

The copy engine here is a fake whose copies complete only when the test says so, in any order,
and copy the bytes AT COMPLETION: a chunk refilled before its copy completed would put wrong
bytes in the destination, and the stores below also check every fill against pending copies.
"""

from __future__ import annotations

import ctypes
import gc
import math
import random
import threading
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import fsspec
import pytest
import torch

from modelcache._arena import HostArena
from modelcache._cuda import CudaStaging
from modelcache._exceptions import StoreError
from modelcache._format import ModelInfo
from modelcache._loader import read_model_info
from modelcache._staging import (
    CompletionWaiter,
    CopyHandle,
    StagingPool,
    plan_pieces,
    stage_to_device,
)
from modelcache._store import Store
from modelcache._torch import TorchBackend, TorchCudaCopyEngine, tensor_views

from .conftest import GatedStore, MemoryModels, settle
from .safetensors_files import Dest, tensor_bytes, write_model, write_raw, write_sharded

#: `settle` counts worker threads.
pytestmark = pytest.mark.usefixtures("count_threads")

MODEL_ID = "m-1"
SENTINEL = 0xA5

# -- the fake engine and a store that checks every fill -------------------------------------------


def _span(t: torch.Tensor) -> tuple[int, int]:
    return t.data_ptr(), t.data_ptr() + t.numel()


def _overlaps(a: tuple[int, int], b: tuple[int, int]) -> bool:
    return a[0] < b[1] and b[0] < a[1]


@dataclass(eq=False)
class FakeCopy:
    src: torch.Tensor
    dst: torch.Tensor
    done: anyio.Event


class FakeCopyEngine:
    """Queues copies; `complete` performs one (reading its source then) and wakes its waiter."""

    def __init__(self, fail_on: int | None = None) -> None:
        self.pending: list[FakeCopy] = []
        self.submitted = 0
        self.completed = 0
        self.fail_on = fail_on  # the nth completed copy raises in wait (a device error)
        self._failed: set[int] = set()
        self._arrived = anyio.Event()

    def submit(self, src: torch.Tensor, dst: torch.Tensor) -> CopyHandle:
        assert src.numel() == dst.numel() > 0
        for copy in self.pending:
            assert not _overlaps(_span(copy.src), _span(src)), "chunk submitted twice"
            assert not _overlaps(_span(copy.dst), _span(dst)), "destination written twice"
        copy = FakeCopy(src, dst, anyio.Event())
        self.pending.append(copy)
        self.submitted += 1
        self._arrived.set()
        return CopyHandle(src, dst, copy)

    async def wait(self, handle: CopyHandle) -> None:
        copy = handle.token
        assert isinstance(copy, FakeCopy)
        await copy.done.wait()
        if id(copy) in self._failed:
            raise RuntimeError("device copy failed")

    def complete(self, copy: FakeCopy) -> None:
        self.pending.remove(copy)
        copy.dst.copy_(copy.src)
        self.completed += 1
        if self.completed == self.fail_on:
            self._failed.add(id(copy))
        copy.done.set()

    async def wait_for_pending(self) -> None:
        while not self.pending:
            self._arrived = anyio.Event()
            await self._arrived.wait()


def _address(view: memoryview) -> int:
    return ctypes.addressof(ctypes.c_ubyte.from_buffer(view))


class CheckingStore(Store):
    """A Store that asserts no read fills memory a pending copy still reads; can fail a read."""

    engine: FakeCopyEngine | None = None
    fail_on: int | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.reads = 0

    async def read_into(self, url: str, offset: int, dest: memoryview, *, model_id: str) -> None:
        self.reads += 1
        start = _address(dest)
        if self.engine is not None:
            for copy in self.engine.pending:
                assert not _overlaps(_span(copy.src), (start, start + len(dest))), (
                    "a chunk was refilled while its copy was pending"
                )
        if self.reads == self.fail_on:
            raise StoreError(f"read {self.reads} failed", model_id=model_id, path=url)
        await super().read_into(url, offset, dest, model_id=model_id)


async def quiesce(store: Store) -> None:
    """`settle`, after letting every runnable task run its next steps.

    anyio's ``wait_all_tasks_blocked`` sleeps 0.1 s whenever a task is still runnable: a few
    plain checkpoints first make that the exception rather than the rule.
    """
    for _ in range(30):
        await anyio.lowlevel.checkpoint()
    await settle()


async def complete_copies(
    engine: FakeCopyEngine,
    store: Store,
    pool: StagingPool,
    order: str,
    seed: int = 0,
    stalls: list[tuple[int, int]] | None = None,
) -> None:
    """Whenever nothing else can run, complete one pending copy (fifo, lifo or random).

    Records in ``stalls`` any quiescent moment where a chunk in use had no pending copy (a read
    that did not run ahead of the copies).
    """
    rng = random.Random(seed)
    while True:
        await engine.wait_for_pending()
        await quiesce(store)
        if stalls is not None and len(engine.pending) != pool.in_use:
            await quiesce(store)  # look twice: a worker thread may just have handed back
            if len(engine.pending) != pool.in_use:
                stalls.append((len(engine.pending), pool.in_use))
        if order == "fifo":
            i = 0
        elif order == "lifo":
            i = len(engine.pending) - 1
        else:
            i = rng.randrange(len(engine.pending))
        engine.complete(engine.pending[i])


async def stage(
    store: Store,
    info: ModelInfo,
    buffer: torch.Tensor,
    pool: StagingPool,
    engine: FakeCopyEngine,
    order: str = "random",
    seed: int = 0,
) -> None:
    """stage_to_device with a task completing the copies; its error is raised as itself.

    Afterwards, asserts that at every quiescent moment each chunk in use awaited its copy.
    """
    error: Exception | None = None
    stalls: list[tuple[int, int]] = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(complete_copies, engine, store, pool, order, seed, stalls)
        try:
            await stage_to_device(store, info, buffer, pool, engine)
        except Exception as exc:
            error = exc
        tg.cancel_scope.cancel()
    if error is not None:
        raise error
    assert not stalls, stalls


# -- models ---------------------------------------------------------------------------------------


def random_tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    itemsize = torch.empty((), dtype=dtype).element_size()
    raw = torch.randint(0, 256, (math.prod(shape) * itemsize,), dtype=torch.uint8, generator=g)
    return raw.view(dtype).reshape(shape)


MISALIGNED = {
    "u": random_tensor(torch.uint8, (3,), 1),
    "f": random_tensor(torch.float32, (13, 7), 2),
    "h": random_tensor(torch.float16, (33,), 3),
    "b": random_tensor(torch.uint8, (5,), 4),
    "q": random_tensor(torch.int64, (9,), 5),
    "bf": random_tensor(torch.bfloat16, (17,), 6),
    "z": random_tensor(torch.float64, (0,), 7),
    "d": random_tensor(torch.float64, (11,), 8),
}
SHARDS = [
    {"a": random_tensor(torch.float32, (40, 3), 11), "s": random_tensor(torch.int8, (7,), 12)},
    {"u": random_tensor(torch.uint8, (5,), 13), "b": random_tensor(torch.bfloat16, (60,), 14)},
    {"c": random_tensor(torch.float64, (23,), 15), "v": random_tensor(torch.int16, (1,), 16)},
]


@pytest.fixture
def root(tmp_path: Path) -> Iterator[str]:
    """A fresh memory:// root for models, removed afterwards."""
    path = f"/mcs-{uuid.uuid4().hex}"
    yield path
    fs = fsspec.filesystem("memory")
    if fs.exists(path):
        fs.rm(path, recursive=True)


def write(kind: str, directory: Dest) -> dict[str, torch.Tensor]:
    """Write the ``kind`` model ("misaligned" or "sharded") under ``directory``; its tensors."""
    if kind == "misaligned":
        write_model(directory, MISALIGNED, misalign=True)
        return MISALIGNED
    write_sharded(directory, SHARDS, misalign=True)
    return {k: v for shard in SHARDS for k, v in shard.items()}


def place(kind: str, root: str, tmp_path: Path) -> str:
    """A store template for models on ``kind`` ("memory" or "file")."""
    if kind == "memory":
        return f"memory://{root}/{{model_id}}"
    (tmp_path / "store").mkdir(exist_ok=True)
    return f"file://{tmp_path}/store/{{model_id}}"


def model_dir(template: str, model_id: str = MODEL_ID) -> Dest:
    directory = template.format(model_id=model_id)
    return Path(directory.removeprefix("file://")) if directory.startswith("file://") else directory


def device_buffer(info: ModelInfo) -> torch.Tensor:
    """A CPU stand-in for the device buffer, filled with a sentinel."""
    return torch.full((info.nbytes,), SENTINEL, dtype=torch.uint8)


def assert_exact(
    buffer: torch.Tensor, info: ModelInfo, tensors: Mapping[str, torch.Tensor]
) -> None:
    """Every segment holds the file's bytes, and every tensor view equals the one written."""
    for seg in info.segments:
        fs, path = fsspec.core.url_to_fs(seg.url)
        want = fs.cat_file(path, start=seg.src, end=seg.src + seg.length)
        assert bytes(buffer[seg.dst : seg.dst + seg.length].tolist()) == want, seg
    views = tensor_views(buffer, info)
    assert set(views) == set(tensors)
    for name, t in tensors.items():
        assert views[name].dtype == t.dtype and views[name].shape == t.shape, name
        assert tensor_bytes(views[name]) == tensor_bytes(t), name


# -- tests ----------------------------------------------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize("order", ["fifo", "lifo", "random"])
@pytest.mark.parametrize("count", [1, 3])
@pytest.mark.parametrize("chunk_size", [7, 64, 1000])
@pytest.mark.parametrize("kind", ["misaligned", "sharded"])
@pytest.mark.parametrize("where", ["memory", "file"])
async def test_stage_is_bit_exact(
    tmp_path: Path, root: str, where: str, kind: str, chunk_size: int, count: int, order: str
) -> None:
    """Copies completing late and out of order still give the file's bytes at every segment."""
    template = place(where, root, tmp_path)
    tensors = write(kind, model_dir(template))
    store = CheckingStore(template)
    info = await read_model_info(store, MODEL_ID)
    assert len(info.segments) > 1
    assert max(s.length for s in info.segments) > chunk_size or chunk_size == 1000
    engine = FakeCopyEngine()
    store.engine = engine
    pool = StagingPool(chunk_size, count, pin=False)
    buffer = device_buffer(info)
    await stage(store, info, buffer, pool, engine, order, seed=chunk_size * count)
    assert_exact(buffer, info, tensors)
    stats = pool.stats()
    pieces = plan_pieces(info, chunk_size)
    assert engine.submitted == engine.completed == stats.acquired == len(pieces)
    assert stats.max_in_use == min(count, len(pieces))  # reads overlapped the copies in flight
    assert stats.in_use == stats.waiting == 0 and stats.allocations == 1
    assert not engine.pending


@pytest.mark.asyncio
@pytest.mark.parametrize("chunk_size", [1, 5, 64, 4096])
@pytest.mark.parametrize("kind", ["misaligned", "sharded"])
async def test_pieces_cover_every_segment_byte_once(root: str, kind: str, chunk_size: int) -> None:
    """Pieces are at most chunk_size, in order, and their reads tile the segments exactly."""
    template = f"memory://{root}/{{model_id}}"
    write(kind, model_dir(template))
    info = await read_model_info(Store(template), MODEL_ID)
    pieces = plan_pieces(info, chunk_size)
    filled: list[tuple[str, int, int]] = []  # (url, src, dst) of every byte read
    previous_end = 0
    for piece in pieces:
        assert 0 < piece.length <= chunk_size and piece.dst >= previous_end
        previous_end = piece.dst + piece.length
        assert piece.reads[0].at == 0
        assert piece.reads[-1].at + piece.reads[-1].length == piece.length
        for r in piece.reads:
            filled.extend((r.url, r.src + i, piece.dst + r.at + i) for i in range(r.length))
    wanted = [(s.url, s.src + i, s.dst + i) for s in info.segments for i in range(s.length)]
    assert filled == wanted
    # A piece only starts a new chunk when the previous one is full (or at a gap that does
    # not fit): never more pieces than chunks to cover the buffer plus one per segment.
    assert len(pieces) <= math.ceil(info.nbytes / chunk_size) + len(info.segments)


@pytest.mark.asyncio
async def test_chunk_with_pending_copy_is_never_refilled(root: str) -> None:
    """With every chunk's copy pending, staging stops; the chunk freed first is the one reused."""
    template = f"memory://{root}/{{model_id}}"
    tensors = write("misaligned", model_dir(template))
    store = CheckingStore(template)
    engine = FakeCopyEngine()
    store.engine = engine
    info = await read_model_info(store, MODEL_ID)
    pool = StagingPool(64, 2, pin=False)
    buffer = device_buffer(info)
    async with anyio.create_task_group() as tg:
        tg.start_soon(stage_to_device, store, info, buffer, pool, engine)
        await settle()
        assert len(engine.pending) == 2 and pool.in_use == 2
        reads = store.reads
        await settle()
        assert store.reads == reads  # nothing more is read while both chunks await their copies
        first, second = engine.pending
        first_bytes = bytes(first.src.tolist())
        engine.complete(second)  # late and out of order: the second copy finishes first
        await settle()
        assert len(engine.pending) == 2 and engine.pending[0] is first
        assert engine.pending[1].src.data_ptr() == second.src.data_ptr()  # its chunk, reused
        assert bytes(first.src.tolist()) == first_bytes  # the pending copy's chunk untouched
        while engine.pending:
            await settle()
            engine.complete(engine.pending[-1])
    assert_exact(buffer, info, tensors)
    assert pool.in_use == 0


@pytest.mark.asyncio
async def test_pool_allocates_once_across_loads(tmp_path: Path, root: str) -> None:
    """Several loads through one pool reuse the same chunks: exactly one host allocation."""
    template = f"memory://{root}/{{model_id}}"
    write("misaligned", model_dir(template, "a"))
    write("sharded", model_dir(template, "b"))
    store = CheckingStore(template)
    pool = StagingPool(100, 3, pin=False)
    addresses: set[int] = set()
    pieces = 0
    for model_id in ("a", "b", "a", "b"):
        engine = FakeCopyEngine()
        store.engine = engine
        info = await read_model_info(store, model_id)
        await stage(store, info, device_buffer(info), pool, engine)
        assert pool._chunks is not None
        addresses |= {c.tensor.data_ptr() for c in pool._chunks}
        pieces += len(plan_pieces(info, 100))
    stats = pool.stats()
    assert stats.allocations == 1
    assert len(addresses) == 3
    assert stats.acquired == pieces and stats.in_use == 0


@pytest.mark.asyncio
async def test_cancel_mid_stage_waits_for_copies_then_returns_every_chunk(root: str) -> None:
    """Cancelled with copies in flight, staging holds their chunks until they complete."""
    template = f"memory://{root}/{{model_id}}"
    write("sharded", model_dir(template))
    store = CheckingStore(template)
    engine = FakeCopyEngine()
    store.engine = engine
    info = await read_model_info(store, MODEL_ID)
    pool = StagingPool(32, 3, pin=False)
    scope = anyio.CancelScope()
    finished = anyio.Event()

    async def run() -> None:
        with scope:
            await stage_to_device(store, info, device_buffer(info), pool, engine)
        finished.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(run)
        await settle()
        engine.complete(engine.pending[0])  # one piece done, its chunk reused
        await settle()
        assert len(engine.pending) == 3 and pool.in_use == 3
        scope.cancel()
        await settle()
        assert not finished.is_set()  # still waiting for the copies in flight
        assert pool.in_use == 3  # no chunk back while its copy may read it
        for copy in reversed(list(engine.pending)):
            engine.complete(copy)
        await finished.wait()
    assert scope.cancelled_caught
    assert pool.in_use == 0 and pool.stats().waiting == 0 and not engine.pending
    assert engine.submitted == engine.completed == 4


@pytest.mark.asyncio
async def test_cancel_during_reads_returns_every_chunk(
    models: MemoryModels, gated: GatedStore
) -> None:
    """Cancelled while reads are blocked (and tasks wait for chunks), the pool ends whole."""
    models.add(MODEL_ID, 5000)
    info = await read_model_info(gated, MODEL_ID)
    gated.gate(MODEL_ID, "read_into")
    engine = FakeCopyEngine()
    pool = StagingPool(1000, 2, pin=False)
    other = anyio.CancelScope()
    with anyio.CancelScope() as scope:
        async with anyio.create_task_group() as tg:
            tg.start_soon(stage_to_device, gated, info, device_buffer(info), pool, engine)

            async def second_load() -> None:  # a second load waits for chunks, FIFO
                with other:
                    await stage_to_device(gated, info, device_buffer(info), pool, engine)

            tg.start_soon(second_load)
            await settle()
            assert pool.in_use == 2 and pool.stats().waiting == 2
            assert gated.calls[("read_into", MODEL_ID)] == 2
            scope.cancel()
    assert pool.in_use == 0 and pool.stats().waiting == 0
    assert engine.submitted == 0 and not engine.pending


@pytest.mark.asyncio
@pytest.mark.parametrize("fail_on", [1, 4, 9])
async def test_read_error_is_raised_as_itself_and_pool_is_whole(root: str, fail_on: int) -> None:
    """A store error fails the stage as that StoreError, after every chunk came back."""
    template = f"memory://{root}/{{model_id}}"
    write("misaligned", model_dir(template))
    store = CheckingStore(template)
    engine = FakeCopyEngine()
    store.engine = engine
    info = await read_model_info(store, MODEL_ID)
    store.fail_on = store.reads + fail_on
    pool = StagingPool(40, 3, pin=False)
    with pytest.raises(StoreError, match="failed") as caught:
        await stage(store, info, device_buffer(info), pool, engine, "lifo")
    assert type(caught.value) is StoreError
    assert pool.in_use == 0 and pool.stats().waiting == 0 and not engine.pending
    assert engine.submitted == engine.completed


@pytest.mark.asyncio
async def test_copy_error_is_raised_as_itself_and_pool_is_whole(root: str) -> None:
    """An engine error in wait fails the stage as itself; the other copies are waited for."""
    template = f"memory://{root}/{{model_id}}"
    write("sharded", model_dir(template))
    store = CheckingStore(template)
    engine = FakeCopyEngine(fail_on=2)
    store.engine = engine
    info = await read_model_info(store, MODEL_ID)
    pool = StagingPool(50, 3, pin=False)
    with pytest.raises(RuntimeError, match="device copy failed"):
        await stage(store, info, device_buffer(info), pool, engine, "fifo")
    assert pool.in_use == 0 and not engine.pending
    assert engine.submitted == engine.completed


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "cancel_first", [True, False], ids=["cancel-then-hand", "hand-then-cancel"]
)
async def test_acquire_is_fifo_and_cancelled_waiters_lose_no_chunk(cancel_first: bool) -> None:
    """Waiters get chunks in arrival order; a waiter cancelled as it is handed one loses none."""
    pool = StagingPool(16, 2, pin=False)
    a = await pool.acquire()
    b = await pool.acquire()
    holders: dict[str, int] = {}
    scopes = {name: anyio.CancelScope() for name in ("w1", "w2", "w3", "w4")}

    async def waiter(name: str) -> None:
        with scopes[name]:
            chunk = await pool.acquire()
            holders[name] = chunk.index
            try:
                await anyio.sleep_forever()
            finally:
                del holders[name]
                pool.release(chunk)

    async with anyio.create_task_group() as tg:
        for name in scopes:
            tg.start_soon(waiter, name)
            await anyio.wait_all_tasks_blocked()
        assert pool.stats().waiting == 4
        scopes["w2"].cancel()  # still waiting: it just leaves the queue
        await anyio.wait_all_tasks_blocked()
        assert pool.stats().waiting == 3
        if cancel_first:  # w1 is cancelled, then handed a chunk before it runs: passes it on
            scopes["w1"].cancel()
            pool.release(a)
        else:  # w1 is handed a chunk, then cancelled: it holds it, then gives it back
            pool.release(a)
            scopes["w1"].cancel()
        await anyio.wait_all_tasks_blocked()
        assert holders == {"w3": a.index}
        pool.release(b)
        await anyio.wait_all_tasks_blocked()
        assert holders == {"w3": a.index, "w4": b.index}
        assert pool.in_use == 2 and pool.stats().waiting == 0
        tg.cancel_scope.cancel()
    assert pool.in_use == 0
    stats = pool.stats()
    assert stats.max_in_use == 2 and stats.waiting == 0 and stats.allocations == 1
    assert stats.acquired == (4 if cancel_first else 5)  # a, b, w3, w4 (and w1 when it took one)


@pytest.mark.asyncio
async def test_release_of_a_chunk_not_held_raises() -> None:
    """Releasing twice, or another pool's chunk, is a ValueError."""
    pool, other = StagingPool(16, 1, pin=False), StagingPool(16, 1, pin=False)
    chunk = await pool.acquire()
    theirs = await other.acquire()
    with pytest.raises(ValueError):
        pool.release(theirs)
    pool.release(chunk)
    with pytest.raises(ValueError):
        pool.release(chunk)
    assert (await pool.acquire()) is chunk


@pytest.mark.asyncio
async def test_chunks_are_page_aligned_views_of_one_slab() -> None:
    """Chunks are chunk_size long, start on pages, and views write their tensors."""
    pool = StagingPool(5000, 3, pin=False)
    chunks = [await pool.acquire() for _ in range(3)]
    for c in chunks:
        assert c.tensor.numel() == len(c.view) == 5000
        assert c.tensor.data_ptr() % 4096 == 0
        c.view[:3] = b"abc"
        assert c.tensor[:3].tolist() == list(b"abc")
    base = chunks[0].tensor.untyped_storage().data_ptr()
    assert all(c.tensor.untyped_storage().data_ptr() == base for c in chunks)


@pytest.mark.asyncio
async def test_empty_model_stages_nothing(root: str) -> None:
    """A model without tensors needs no chunk and no copy (the pool is not even allocated)."""
    write_raw(f"memory://{root}/{MODEL_ID}/model.safetensors", {}, b"")
    store = Store(f"memory://{root}/{{model_id}}")
    info = await read_model_info(store, MODEL_ID)
    pool = StagingPool(64, 2, pin=False)
    engine = FakeCopyEngine()
    await stage_to_device(store, info, device_buffer(info), pool, engine)
    assert engine.submitted == 0 and pool.stats().allocations == 0


@pytest.mark.asyncio
async def test_wrong_buffer_is_refused(root: str) -> None:
    """The device buffer must be a 1-D uint8 tensor of exactly info.nbytes."""
    template = f"memory://{root}/{{model_id}}"
    write("misaligned", model_dir(template))
    store = Store(template)
    info = await read_model_info(store, MODEL_ID)
    pool = StagingPool(64, 2, pin=False)
    for bad in (
        torch.empty(info.nbytes + 1, dtype=torch.uint8),
        torch.empty(info.nbytes // 4, dtype=torch.float32),
    ):
        with pytest.raises(ValueError):
            await stage_to_device(store, info, bad, pool, FakeCopyEngine())
    assert pool.stats().acquired == 0


@pytest.mark.asyncio
async def test_cpu_backend_to_device_and_to_host_copy(root: str) -> None:
    """On the CPU, to_device returns a copy and to_host fills the block."""
    backend = TorchBackend("cpu")
    host = torch.arange(100, dtype=torch.uint8)
    copy = await backend.to_device(host)
    assert torch.equal(copy, host) and copy.data_ptr() != host.data_ptr()
    arena = HostArena(8192, pin=False)
    block = arena.alloc(100)
    assert block is not None
    await backend.to_host(copy, block)
    assert torch.equal(block.tensor, host)
    small = arena.alloc(10)
    assert small is not None
    with pytest.raises(ValueError):
        await backend.to_host(copy, small)


async def test_completion_waiter_waits_in_order_in_one_thread_and_wakes_the_loop() -> None:
    """Operations end in submission order, each waited for (blocking) by the one waiter thread;
    a failed wait is raised to its waiter, may be awaited again, and later ones still end."""
    gates = [threading.Event() for _ in range(4)]
    ended: list[tuple[int, str]] = []

    def sync(i: int) -> None:
        gates[i].wait()
        ended.append((i, threading.current_thread().name))
        if i == 1:
            raise RuntimeError("device error")

    waiter = CompletionWaiter("test waiter")
    completions = [waiter.watch(partial(sync, i)) for i in range(4)]
    gates[3].set()
    gates[2].set()
    gates[1].set()  # all but the first may end: none is waited for before it
    await anyio.wait_all_tasks_blocked()
    assert ended == [] and not any(c.finished for c in completions)
    gates[0].set()
    await completions[3].wait()
    assert [i for i, _ in ended] == [0, 1, 2, 3]
    assert {name for _, name in ended} == {"test waiter"}
    assert all(c.finished for c in completions)
    await completions[0].wait()
    for _ in range(2):  # the error, each time it is awaited (a cancelled wait is retried)
        with pytest.raises(RuntimeError, match="device error"):
            await completions[1].wait()
    waiter.close()
    assert waiter._thread is not None
    waiter._thread.join(timeout=10)
    assert not waiter._thread.is_alive()
    with pytest.raises(RuntimeError, match="closed"):
        waiter.watch(lambda: None)


async def test_completion_waiter_thread_ends_with_its_owner() -> None:
    """A waiter that is garbage collected stops its thread (an engine dropped leaks nothing)."""
    waiter = CompletionWaiter("dropped waiter")
    await waiter.watch(lambda: None).wait()
    thread = waiter._thread
    assert thread is not None and thread.is_alive()
    del waiter
    gc.collect()
    thread.join(timeout=10)
    assert not thread.is_alive()


def test_cuda_objects_without_cuda_are_clear_errors() -> None:
    """Asking for CUDA where torch has none is our ValueError, never a torch CUDA error."""
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    for make in (
        lambda: TorchBackend("cuda"),
        lambda: TorchBackend("cuda:1"),
        lambda: StagingPool(pin=True),
        lambda: TorchCudaCopyEngine("cuda"),
    ):
        with pytest.raises(ValueError, match="CUDA"):
            make()
    with pytest.raises(ValueError):
        TorchBackend("cpu", staging_chunks=0)


# -- the CUDA staging core both backends compose, with an engine that logs -----------------------


class LoggingEngine:
    """A fenced copy engine that copies at once; logs each fence and copy with its thread."""

    def __init__(self, name: str, log: list[tuple[str, str]]) -> None:
        self.name = name
        self.log = log

    def fence(self) -> None:
        self.log.append((f"{self.name} fence", threading.current_thread().name))

    def submit(self, src: torch.Tensor, dst: torch.Tensor) -> CopyHandle:
        dst.copy_(src)
        self.log.append((f"{self.name} copy", threading.current_thread().name))
        return CopyHandle(src, dst)

    async def wait(self, handle: CopyHandle) -> None:
        pass


class Unpinned:
    """A `HostPinner` that pins nothing: the pool's chunks stay pageable, as on the CPU."""

    def register(self, address: int, nbytes: int) -> bool:
        return False

    def unregister(self, address: int) -> None:
        pass


def logging_staging(log: list[tuple[str, str]]) -> CudaStaging[LoggingEngine]:
    """A `CudaStaging` on CPU stand-ins: engines named in order of making, allocations logged."""
    names = iter(["to_device", "to_host"])

    def engine() -> LoggingEngine:
        log.append(("engine", threading.current_thread().name))
        return LoggingEngine(next(names), log)

    def allocate(nbytes: int, model_id: str) -> torch.Tensor:
        log.append((f"allocate {model_id}", threading.current_thread().name))
        return torch.full((nbytes,), SENTINEL, dtype=torch.uint8)

    return CudaStaging(16, 2, engine=engine, allocate=allocate, pinner=Unpinned())


async def test_cuda_staging_makes_its_pool_and_two_engines_once_for_concurrent_first_calls() -> (
    None
):
    """Concurrent first calls share one pool and two engines (host -> device, device -> host),
    each engine made in a worker thread, never on the event loop."""
    log: list[tuple[str, str]] = []
    staging = logging_staging(log)
    assert staging.pool is None
    made: list[tuple[StagingPool, LoggingEngine, LoggingEngine]] = []

    async def first_call() -> None:
        made.append(await staging.parts())

    async with anyio.create_task_group() as tg:
        for _ in range(3):
            tg.start_soon(first_call)
    assert len(made) == 3 and all(parts is made[0] for parts in made)
    pool, to_device, to_host = made[0]
    assert (to_device.name, to_host.name) == ("to_device", "to_host")
    assert staging.pool is pool and (pool.chunk_size, pool.count, pool.pin) == (16, 2, True)
    assert [what for what, _ in log] == ["engine", "engine"]
    assert threading.current_thread().name not in {thread for _, thread in log}


async def test_cuda_staging_fences_each_allocation_in_its_thread_before_any_copy(
    models: MemoryModels,
) -> None:
    """Loads and promotions allocate and fence the host -> device engine in one worker thread
    before its first copy (the allocator's stream may still use the memory); demotions fence the
    device -> host engine on the caller's thread before copying; a sync copy bypasses the engine
    and runs in a worker thread."""
    models.add("a", 100, seed=4)
    store = Store(models.template)
    info = await read_model_info(store, "a")
    log: list[tuple[str, str]] = []
    staging = logging_staging(log)
    loop = threading.current_thread().name

    buffer = await staging.load(store, info)
    fs, path = fsspec.core.url_to_fs(info.shards[0].url)
    assert bytes(buffer.tolist()) == fs.cat_file(path, start=info.shards[0].data_start)
    (allocated, at), (fenced, fenced_at), *copies = log[2:]
    assert (allocated, fenced) == ("allocate a", "to_device fence") and at == fenced_at != loop
    assert {what for what, _ in copies} == {"to_device copy"} and len(copies) == 7  # 100 / 16

    log.clear()
    host = torch.arange(50, dtype=torch.uint8)
    on_device = await staging.to_device(host, 50, "b")
    assert torch.equal(on_device, host)
    (allocated, at), (fenced, fenced_at), (copied, _) = log
    assert (allocated, fenced, copied) == ("allocate b", "to_device fence", "to_device copy")
    assert at == fenced_at != loop

    log.clear()
    back = torch.zeros(50, dtype=torch.uint8)
    await staging.to_host(on_device, back)
    assert torch.equal(back, host)
    assert log == [("to_host fence", loop), ("to_host copy", loop)]

    log.clear()
    copied_in: list[str] = []

    def sync_copy(dst: torch.Tensor, src: torch.Tensor) -> None:
        copied_in.append(threading.current_thread().name)
        dst.copy_(src)

    pageable = await staging.to_device(host, 50, "c", sync_copy=sync_copy)
    assert torch.equal(pageable, host)
    assert [what for what, _ in log] == ["allocate c", "to_device fence"]
    assert copied_in and copied_in[0] != loop
    back.zero_()
    await staging.to_host(pageable, back, sync_copy=sync_copy)
    assert torch.equal(back, host) and log[-1] == ("to_host fence", loop)
    assert len(copied_in) == 2 and copied_in[1] != loop


def test_staging_arguments_are_checked_where_a_backend_is_made() -> None:
    """A chunk size or count below 1 is a ValueError when the backend is made, not at a load."""
    log: list[tuple[str, str]] = []
    for size, count in ((0, 4), (32, 0)):
        with pytest.raises(ValueError, match="must be >= 1"):
            TorchBackend("cpu", staging_chunk_size=size, staging_chunks=count)
        with pytest.raises(ValueError, match="must be >= 1"):
            CudaStaging(
                size, count, engine=lambda: LoggingEngine("x", log), allocate=lambda n, m: None
            )
    assert not log  # nothing was made


# -- CUDA -----------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.asyncio
@pytest.mark.parametrize("kind", ["misaligned", "sharded"])
async def test_cuda_staging_is_bit_exact_and_reuses_the_pinned_pool(root: str, kind: str) -> None:
    """Loads onto CUDA through small pinned chunks are bit-exact; one pinned allocation."""
    template = f"memory://{root}/{{model_id}}"
    tensors = write(kind, model_dir(template, "a"))
    write("sharded" if kind == "misaligned" else "misaligned", model_dir(template, "b"))
    store = Store(template)
    backend = TorchBackend("cuda", staging_chunk_size=64, staging_chunks=3)
    for model_id in ("a", "b", "a"):
        info = await read_model_info(store, model_id)
        weights = await backend.load(store, info)
        assert weights.buffer.device.type == "cuda"
        if model_id == "a":
            for name, t in tensors.items():
                assert weights[name].device.type == "cuda"
                assert tensor_bytes(weights[name]) == tensor_bytes(t), name
    pool = backend.staging_pool
    assert pool is not None and pool.pin
    stats = pool.stats()
    assert stats.allocations == 1 and stats.in_use == 0 and stats.max_in_use == 3
    assert pool._chunks is not None and all(c.tensor.is_pinned() for c in pool._chunks)


@pytest.mark.cuda
@pytest.mark.asyncio
async def test_cuda_large_model_is_bit_exact(models: MemoryModels) -> None:
    """A 24 MiB model through 1 MiB chunks arrives intact (many copies in flight)."""
    models.add(MODEL_ID, 24 << 20, seed=3)
    store = Store(models.template)
    info = await read_model_info(store, MODEL_ID)
    backend = TorchBackend("cuda", staging_chunk_size=1 << 20, staging_chunks=4)
    weights = await backend.load(store, info)
    fs, path = fsspec.core.url_to_fs(info.shards[0].url)
    data = fs.cat_file(path, start=info.shards[0].data_start)
    expected = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    assert torch.equal(weights["w"].cpu(), expected)


@pytest.mark.cuda
@pytest.mark.asyncio
async def test_cuda_device_memory_returns_after_the_buffer_is_dropped(root: str) -> None:
    """Dropping the weights frees all the device memory the load took."""
    template = f"memory://{root}/{{model_id}}"
    write("sharded", model_dir(template))
    store = Store(template)
    info = await read_model_info(store, MODEL_ID)
    backend = TorchBackend("cuda", staging_chunk_size=128, staging_chunks=2)
    await backend.load(store, info)  # the first load makes the stream and the pool
    # The baseline after a collection: the first load's result was dropped unreferenced, but
    # anything a cycle still held of it (the first GPU run saw its 1024 bytes here) must not
    # count as "before". Whether a dropped model's bytes return without a collection is
    # test_cuda.py's test_dropped_weights_free_device_memory_without_the_garbage_collector.
    gc.collect()
    torch.cuda.synchronize()
    start = torch.cuda.memory_allocated()
    weights = await backend.load(store, info)
    assert torch.cuda.memory_allocated() > start
    del weights
    gc.collect()
    assert torch.cuda.memory_allocated() == start


@pytest.mark.cuda
@pytest.mark.asyncio
async def test_cuda_to_device_and_to_host_round_trip() -> None:
    """Pinned host block -> device -> another pinned block, bit-exact, one copy each way."""
    backend = TorchBackend("cuda")
    arena = HostArena(1 << 22, pin=True)
    block = arena.alloc((1 << 20) + 7)
    back = arena.alloc((1 << 20) + 7)
    assert block is not None and back is not None
    data = torch.randint(0, 256, (block.nbytes,), dtype=torch.uint8)
    block.tensor.copy_(data)
    on_device = await backend.to_device(block.tensor)
    assert on_device.device.type == "cuda" and on_device.numel() == block.nbytes
    await backend.to_host(on_device, back)
    assert torch.equal(back.tensor, data)
