"""The DeviceBackend contract: the cache talks to its backend only through it; the CuPy backend."""

from __future__ import annotations

import gc
import sys
import threading
import types
import warnings
import weakref
from functools import partial
from typing import Any

import anyio
import numpy as np
import pytest
import torch

from modelcache import CupyBackend, DeviceBackend, DeviceOutOfMemoryError, ModelCache, Weights
from modelcache._arena import HostArena, HostBlock
from modelcache._backend import LoadedWeights, allocate_with_retry
from modelcache._cupy import RAW_DTYPES, CupyWeights, _array_views, numpy_dtype
from modelcache._format import ModelInfo
from modelcache._loader import fill_buffer, read_model_info
from modelcache._staging import StagingPool
from modelcache._store import Store
from modelcache._torch import TorchBackend, tensor_views

from .conftest import GatedStore, MemoryModels, check_invariants, gpu_cupy, model_bytes
from .fake_cupy import FakeCupy, FakeOutOfMemoryError
from .safetensors_files import model_file, tensor_bytes


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return {
        "f32": torch.randn(3, 5, generator=g),
        "f16": torch.randn(4, generator=g).half(),
        "bf16": torch.randn(2, 3, generator=g).bfloat16(),
        "i64": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "u8": torch.randint(0, 256, (7,), dtype=torch.uint8, generator=g),
        "f8": torch.randn(5, generator=g).to(torch.float8_e4m3fn),
        "bool": torch.tensor([True, False, True]),
        "empty": torch.empty(0, 4),
    }


class RecordingBackend:
    """A CPU backend that is not torch's: only the protocol, every call recorded.

    With ``on_host=False`` the cache must take the path of a real device (a host arena,
    ``demote`` copying into a block, ``promote`` copying back); nothing else is reachable, so an
    attribute the cache needed beyond the protocol would fail the test.
    """

    __slots__ = ("_on_host", "_torch", "calls")

    def __init__(self, *, on_host: bool) -> None:
        self._torch = TorchBackend("cpu", zero_copy=False)
        self._on_host = on_host
        self.calls: list[str] = []

    @property
    def device(self) -> torch.device:
        return self._torch.device

    @property
    def on_host(self) -> bool:
        return self._on_host

    def host_arena(self, capacity: int) -> HostArena:
        self.calls.append("host_arena")
        return HostArena(capacity, pin=False)

    async def load(self, store: Store, info: ModelInfo, *, zero_copy: bool = True) -> Weights:
        self.calls.append(f"load {info.model_id}")
        return await self._torch.load(store, info, zero_copy=zero_copy)

    async def promote(self, block: HostBlock, info: ModelInfo) -> Weights:
        self.calls.append(f"promote {info.model_id}")
        buffer = block.tensor.clone()  # a new "device" buffer: the block is freed after
        return Weights(tensor_views(buffer, info), info, buffer)

    async def demote(self, loaded: LoadedWeights, block: HostBlock) -> None:
        self.calls.append(f"demote {loaded.info.model_id}")
        assert isinstance(loaded, Weights)
        block.tensor.copy_(loaded.buffer)

    def host_bytes(self, loaded: LoadedWeights) -> memoryview | None:
        self.calls.append(f"host_bytes {loaded.info.model_id}")
        return self._torch.host_bytes(loaded)


def test_shipped_backends_satisfy_the_protocol() -> None:
    """TorchBackend and the recording fake are DeviceBackends; their weights LoadedWeights."""
    assert isinstance(TorchBackend("cpu"), DeviceBackend)
    assert isinstance(RecordingBackend(on_host=False), DeviceBackend)
    assert TorchBackend("cpu").on_host
    assert not TorchBackend("meta").on_host
    for name in ("device", "on_host", "host_arena", "load", "promote", "demote", "host_bytes"):
        assert hasattr(CupyBackend, name)


async def test_device_tier_off_host_demotes_and_promotes_through_the_protocol(
    models: MemoryModels, gated: GatedStore
) -> None:
    """An off-host backend: eviction copies into an arena block, use copies back, no re-read."""
    models.add("a", 1000, seed=1)
    models.add("b", 1000, seed=2)
    models.add("c", 300, seed=3)
    backend = RecordingBackend(on_host=False)
    async with ModelCache(gated, device_budget=1500, host_budget=4000, backend=backend) as cache:
        assert cache.device == torch.device("cpu")
        async with cache.use("a") as a:
            first = a["w"].clone()
        async with cache.use("b"):
            pass
        assert cache.resident() == ["b"]
        assert cache.resident("host") == ["a"]
        check_invariants(cache)
        async with cache.use("a") as a:
            assert a["w"].equal(first)
        assert gated.calls[("read_into", "a")] == 1
        await cache.prefetch(["c"], tier="host")  # read into an arena block, not loaded
        async with cache.use("c") as c:
            assert c["w"].numel() == 300
        check_invariants(cache)
    # A copy down runs in the background, beside the load that made room: either order.
    assert backend.calls[:2] == ["host_arena", "load a"]
    assert sorted(backend.calls[2:4]) == ["demote a", "load b"]
    assert sorted(backend.calls[4:6]) == ["demote b", "promote a"]
    assert backend.calls[6:] == ["promote c"]


async def test_device_tier_on_host_moves_weights_without_backend_copies(
    models: MemoryModels,
) -> None:
    """An on-host backend: no arena, no promote/demote calls; the weights themselves move."""
    models.add("a", 1000, seed=1)
    models.add("b", 1000, seed=2)
    backend = RecordingBackend(on_host=True)
    async with ModelCache(
        models.template, device_budget=1500, host_budget=4000, backend=backend
    ) as cache:
        async with cache.use("a") as a:
            ptr = a["w"].data_ptr()
        async with cache.use("b"):
            pass
        async with cache.use("a") as a:
            assert a["w"].data_ptr() == ptr
        check_invariants(cache)
    assert backend.calls == ["load a", "load b"]


def test_backend_and_device_are_exclusive(models: MemoryModels) -> None:
    """device and zero_copy belong to the backend when one is given."""
    backend = RecordingBackend(on_host=True)
    with pytest.raises(TypeError):
        ModelCache(models.template, device="meta", device_budget=100, backend=backend)
    with pytest.raises(TypeError):
        ModelCache(models.template, device_budget=100, zero_copy=False, backend=backend)


class RecordingPinner:
    """A HostPinner that pins nothing and records what it was asked."""

    def __init__(self, *, ok: bool) -> None:
        self.ok = ok
        self.registered: list[tuple[int, int]] = []
        self.unregistered: list[int] = []

    def register(self, address: int, nbytes: int) -> bool:
        self.registered.append((address, nbytes))
        return self.ok

    def unregister(self, address: int) -> None:
        self.unregistered.append(address)


async def test_a_backend_pinner_pins_the_arena_without_torch_cuda() -> None:
    """A pinner (CuPy's) registers the slab once, page-aligned, and unregisters it when freed."""
    pinner = RecordingPinner(ok=True)
    arena = HostArena(1 << 16, pin=True, pinner=pinner)
    block = arena.alloc(100)  # the slab is made here, on this thread
    assert block is not None and arena.pinned
    [(address, nbytes)] = pinner.registered
    assert address % 4096 == 0 and nbytes == 1 << 16
    assert block.tensor.data_ptr() == address
    del arena, block
    gc.collect()
    assert pinner.unregistered == [address]
    refused = RecordingPinner(ok=False)
    pool = StagingPool(4096, 2, pin=True, pinner=refused)
    chunk = await pool.acquire()  # pageable, but it works
    chunk.view[:3] = b"abc"
    pool.release(chunk)
    assert len(refused.registered) == 1 and not refused.unregistered


# -- the CuPy backend, on machines without CuPy or CUDA --------------------------------------


def test_cupy_backend_without_cupy_is_an_import_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """No CuPy installed: an ImportError naming the extra to install."""
    monkeypatch.setitem(sys.modules, "cupy", None)
    with pytest.raises(ImportError, match=r"modelcache\[cuda\]"):
        CupyBackend()


def test_cupy_backend_without_cuda_is_a_value_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """CuPy present but no CUDA (it raises CUDARuntimeError on first use): a ValueError."""

    class CUDARuntimeError(RuntimeError):
        pass

    def no_device() -> int:
        raise CUDARuntimeError("cudaErrorNoDevice: no CUDA-capable device is detected")

    fake = types.ModuleType("cupy")
    fake.cuda = types.SimpleNamespace(runtime=types.SimpleNamespace(getDeviceCount=no_device))  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "cupy", fake)
    with pytest.raises(ValueError, match="not available") as info:
        CupyBackend()
    assert not isinstance(info.value, CUDARuntimeError)
    fake.cuda.runtime.getDeviceCount = lambda: 1
    with pytest.raises(ValueError, match="1 CUDA device"):
        CupyBackend(1)
    with pytest.raises(ValueError, match=">= 1"):
        CupyBackend(0, staging_chunks=0)


async def test_array_views_are_bit_exact(models: MemoryModels) -> None:
    """The views CupyWeights hands out (built here on numpy, which slices as CuPy does)."""
    tensors = _tensors()
    models.put("m/model.safetensors", model_file(tensors, misalign=True))
    store = Store(models.template)
    try:
        info = await read_model_info(store, "m")
        buffer = np.empty(info.nbytes, dtype=np.uint8)
        await fill_buffer(store, info, buffer.data)
    finally:
        await store.aclose()
    weights = CupyWeights(_array_views(np, buffer, info), info, buffer)
    assert set(weights) == set(tensors)
    assert weights.raw == {"bf16", "f8"}
    for name, tensor in tensors.items():
        array = weights[name]
        assert array.shape == tuple(tensor.shape)
        assert array.dtype == np.dtype(numpy_dtype(info.tensors[name].dtype))
        assert array.tobytes() == tensor_bytes(tensor), name
    assert weights["bf16"].dtype == np.uint16 and weights["f8"].dtype == np.uint8
    assert {"BF16", "F8_E4M3"} <= RAW_DTYPES


# -- the CuPy backend on a fake CuPy with two devices (records each call's current device) -----


@pytest.fixture
def fake_cupy(monkeypatch: pytest.MonkeyPatch) -> FakeCupy:
    fake = FakeCupy(devices=2)
    monkeypatch.setitem(sys.modules, "cupy", fake)
    return fake


def _file_bytes(model_id: str, nbytes: int, seed: int) -> bytes:
    from safetensors.torch import load

    return bytes(load(model_bytes(nbytes, seed))["w"].numpy().tobytes())


async def test_cupy_backend_runs_every_cuda_call_on_its_device(
    models: MemoryModels, fake_cupy: FakeCupy
) -> None:
    """Device 1: pinning, unpinning, copies, event waits, allocations and sync builders all run
    with device 1 current, in whichever thread (never on device 0, whose context they'd make)."""
    built_on: list[int] = []

    class Model:
        @classmethod
        def from_weights(cls, weights: CupyWeights, info: ModelInfo) -> CupyWeights:
            built_on.append(fake_cupy.current())  # in a worker thread
            return weights

    models.add("a", 3000, seed=1)
    models.add("b", 3000, seed=2)
    backend = CupyBackend(1, staging_chunk_size=1000, staging_chunks=2)
    async with ModelCache(
        models.template, device_budget=4000, host_budget=16384, backend=backend
    ) as cache:
        cache.model(Model)
        async with cache.use("a", model=Model) as a:
            assert a["w"].get().tobytes() == _file_bytes("a", 3000, 1)
        async with cache.use("b", model=Model):
            pass
        async with cache.use("a", model=Model) as a:  # promoted from the pinned host block
            assert a["w"].get().tobytes() == _file_bytes("a", 3000, 1)
    del a, cache, backend
    gc.collect()  # the slabs go: their unregistration runs here, on this thread
    names = {what for what, _, _ in fake_cupy.calls}
    assert {"hostRegister", "hostUnregister", "memcpyAsync", "Event.synchronize"} <= names
    assert fake_cupy.devices_of() == {1}, sorted(set(fake_cupy.calls))
    assert built_on == [1, 1, 1]


async def test_cupy_copies_are_waited_for_by_a_thread_not_polled(
    models: MemoryModels, fake_cupy: FakeCupy
) -> None:
    """Copy completion: blocking-sync events synchronized by the engine's waiter thread, in
    submission order; the event loop never polls an event (no timer between copy and release)."""
    models.add("a", 5000, seed=3)
    release = threading.Event()
    fake_cupy.sync_gate = lambda event: release.wait()
    backend = CupyBackend(0, staging_chunk_size=1000, staging_chunks=3)
    store = Store(models.template)
    info = await read_model_info(store, "a")
    async with anyio.create_task_group() as tg:
        result: list[CupyWeights] = []
        tg.start_soon(lambda: _append(result, backend.load(store, info)))
        # Every chunk's copy submitted, none finished: all three wait for the gated thread.
        while not result and (
            backend.staging_pool is None or backend.staging_pool.stats().in_use < 3
        ):
            await anyio.wait_all_tasks_blocked()
        assert not result and backend.staging_pool is not None
        assert backend.staging_pool.stats().in_use == 3
        release.set()
    assert result[0]["w"].get().tobytes() == _file_bytes("a", 5000, 3)
    syncs = [(what, thread) for what, _, thread in fake_cupy.calls if what.startswith("Event.s")]
    assert {what for what, _ in syncs} == {"Event.synchronize"}  # blocking, never spinning
    assert len(syncs) == 5 and len({thread for _, thread in syncs}) == 1
    assert syncs[0][1] != threading.current_thread().name
    assert "Event.done" not in {what for what, _, _ in fake_cupy.calls}


async def _append(into: list[Any], awaitable: Any) -> None:
    into.append(await awaitable)


async def test_cupy_copies_with_pageable_memory_run_off_the_event_loop(
    models: MemoryModels, fake_cupy: FakeCupy
) -> None:
    """Host memory CuPy could not pin is copied synchronously in the waiter thread, never with
    memcpyAsync on the loop (from pageable memory it returns only when the copy is done)."""
    fake_cupy.register_ok = False
    models.add("a", 3000, seed=1)
    models.add("b", 3000, seed=2)
    backend = CupyBackend(0, staging_chunk_size=1000, staging_chunks=2)
    async with ModelCache(
        models.template, device_budget=4000, host_budget=16384, backend=backend
    ) as cache:
        async with cache.use("a"):
            pass
        async with cache.use("b"):
            pass
        async with cache.use("a") as a:  # demoted to, then promoted from, pageable memory
            assert a["w"].get().tobytes() == _file_bytes("a", 3000, 1)
    copies = [(what, thread) for what, _, thread in fake_cupy.calls if what.startswith("memcpy")]
    assert copies and {what for what, _ in copies} == {"memcpy"}
    assert threading.current_thread().name not in {thread for _, thread in copies}


async def test_cupy_out_of_memory_frees_the_pool_retries_once_then_is_typed(
    models: MemoryModels, fake_cupy: FakeCupy
) -> None:
    """A CuPy OOM frees the pool's cached blocks and retries; a second OOM is a
    DeviceOutOfMemoryError naming the model, which is not to be remembered as its failure."""
    models.add("a", 3000, seed=1)
    backend = CupyBackend(0)
    store = Store(models.template)
    info = await read_model_info(store, "a")
    fake_cupy.oom_above, fake_cupy.oom_until_freed = 1000, 1  # transient: gone after one free
    weights = await backend.load(store, info)
    assert weights["w"].get().tobytes() == _file_bytes("a", 3000, 1)
    assert fake_cupy.freed_blocks == 1
    fake_cupy.oom_until_freed = 1 << 30  # for good
    with pytest.raises(DeviceOutOfMemoryError, match="'a'") as caught:
        await backend.load(store, info)
    assert caught.value.model_id == "a" and not caught.value.remember
    assert isinstance(caught.value, MemoryError)
    assert isinstance(caught.value.__cause__, FakeOutOfMemoryError)
    assert fake_cupy.freed_blocks == 2


async def test_cupy_dlpack_is_a_dlpack_object_and_a_dropped_model_frees_at_once(
    models: MemoryModels, fake_cupy: FakeCupy
) -> None:
    """dlpack() gives the array (a __dlpack__ object), not CuPy's deprecated capsule; dropping
    the weights frees the device buffer by reference count alone (no cycle keeps it)."""
    models.add("a", 3000, seed=1)
    backend = CupyBackend(0, staging_chunk_size=1000, staging_chunks=2)
    store = Store(models.template)
    info = await read_model_info(store, "a")
    await backend.load(store, info)  # the staging pool and engines
    gc.collect()
    gc.disable()
    try:
        weights = await backend.load(store, info)
        assert weights.dlpack("w") is weights["w"]
        buffer = weakref.ref(weights.buffer._array)
        del weights
        assert buffer() is None
    finally:
        gc.enable()


def test_allocate_with_retry_frees_then_retries_once() -> None:
    """An OOM is retried once after gc and freeing cached blocks; other errors pass through."""
    attempts: list[int] = []
    freed: list[int] = []

    def allocate(fail: int) -> str:
        attempts.append(1)
        if len(attempts) <= fail:
            raise FakeOutOfMemoryError("out of memory")
        return "buffer"

    call = partial(
        allocate_with_retry,
        is_oom=lambda e: isinstance(e, FakeOutOfMemoryError),
        free_cached=lambda: freed.append(1),
        nbytes=10,
        device="cuda:0",
        model_id="m",
    )
    assert call(partial(allocate, 0)) == "buffer" and not freed
    attempts.clear()
    assert call(partial(allocate, 1)) == "buffer" and len(freed) == 1 and len(attempts) == 2
    attempts.clear()
    with pytest.raises(DeviceOutOfMemoryError, match=r"'m'.*cuda:0.*10 bytes"):
        call(partial(allocate, 2))
    assert len(attempts) == 2 and len(freed) == 2

    def broken() -> str:
        raise ValueError("not memory")

    with pytest.raises(ValueError, match="not memory"):
        call(broken)
    assert len(freed) == 2


# -- the CuPy backend on a GPU ----------------------------------------------------------------


@pytest.mark.cuda
async def test_cupy_weights_are_bit_exact_and_go_through_dlpack(models: MemoryModels) -> None:
    """CupyWeights equal the file's bytes; a DLPack capsule shares the same device memory."""
    cupy = gpu_cupy()
    tensors = _tensors()
    models.put("m/model.safetensors", model_file(tensors, misalign=True))
    backend = CupyBackend(0, staging_chunk_size=64, staging_chunks=3)
    async with (
        ModelCache(models.template, device_budget=1 << 20, backend=backend) as cache,
        cache.use("m") as weights,
    ):
        assert isinstance(weights, CupyWeights)
        for name, tensor in tensors.items():
            array = weights[name]
            assert isinstance(array, cupy.ndarray)
            assert cupy.asnumpy(array).tobytes() == tensor_bytes(tensor), name
        with warnings.catch_warnings():  # CuPy may call capsules a legacy input
            warnings.simplefilter("ignore", DeprecationWarning)
            back = cupy.from_dlpack(weights.dlpack("f32"))
        assert back.data.ptr == weights["f32"].data.ptr
        assert cupy.array_equal(back, weights["f32"])
        assert backend.staging_pool is not None and backend.staging_pool.stats().pinned


@pytest.mark.cuda
async def test_cupy_device_memory_returns_after_eviction(models: MemoryModels) -> None:
    """Evicted models (to pinned host memory and back) leave no device bytes behind."""
    cupy = gpu_cupy()
    pool = cupy.get_default_memory_pool()
    pool.free_all_blocks()
    start = pool.used_bytes()
    models.add("a", 1 << 20, seed=1)
    models.add("b", 1 << 20, seed=2)
    backend = CupyBackend(0)
    async with ModelCache(
        models.template, device_budget=(1 << 20) + 4096, host_budget=4 << 20, backend=backend
    ) as cache:
        async with cache.use("a") as a:
            first = cupy.asnumpy(a["w"])
        async with cache.use("b"):
            pass
        assert cache.resident("host") == ["a"]
        async with cache.use("a") as a:  # promoted from the pinned host block
            assert (cupy.asnumpy(a["w"]) == first).all()
        check_invariants(cache)
    del a  # the cache dropped every model when it closed: this was the last reference
    pool.free_all_blocks()
    assert pool.used_bytes() == start


@pytest.mark.parametrize("on_host", [False, True])
async def test_leaving_a_lease_records_the_callers_stream_on_device_weights(
    models: MemoryModels, monkeypatch: pytest.MonkeyPatch, on_host: bool
) -> None:
    """Each lease exit asks device weights to record the caller's current stream (work queued
    there must finish before an eviction lets their memory be reused); host weights are not."""
    models.add("a", 100)
    recorded: list[str] = []
    monkeypatch.setattr(
        Weights, "record_current_stream", lambda self: recorded.append(self.info.model_id)
    )
    backend = RecordingBackend(on_host=on_host)
    async with ModelCache(models.template, device_budget=1000, backend=backend) as cache:
        for _ in range(3):
            async with cache.use("a"):
                pass
    assert recorded == ([] if on_host else ["a"] * 3)
