"""What only a real GPU can show: the checks of issues 16 and 17 for the first GPU run.

Every test here carries the ``cuda`` marker and is skipped where torch sees no CUDA device; each
asserts one invariant with a message that says what went wrong. Sizes are small (the whole file
runs in well under two minutes on one GPU) except where the invariant needs the memory full.
"""

from __future__ import annotations

import gc
import time
import weakref
from typing import Any

import anyio
import anyio.lowlevel
import pytest
import torch
import torch.utils.dlpack
from safetensors.torch import load, save

from modelcache import CupyBackend, DeviceOutOfMemoryError, ModelBuildError, ModelCache, StoreError
from modelcache._arena import HostArena
from modelcache._loader import read_model_info
from modelcache._store import Store
from modelcache._torch import TorchBackend

from .conftest import MemoryModels, check_invariants, gpu_cupy
from .safetensors_files import model_file, tensor_bytes

pytestmark = pytest.mark.cuda

MIB = 1 << 20


def _mixed(seed: int, scale: int = 1) -> dict[str, torch.Tensor]:
    """Tensors of every common dtype, odd lengths (misaligned layouts), ``scale`` x larger."""
    g = torch.Generator().manual_seed(seed)
    return {
        "f32": torch.randn(257 * scale, 3, generator=g),
        "f16": torch.randn(1001 * scale, generator=g).half(),
        "bf16": torch.randn(77 * scale, 5, generator=g).bfloat16(),
        "f8": torch.randn(999 * scale, generator=g).to(torch.float8_e4m3fn),
        "i64": torch.arange(13 * scale, dtype=torch.int64),
        "u8": torch.randint(0, 256, (4099 * scale,), dtype=torch.uint8, generator=g),
        "bool": torch.rand(31, generator=g) > 0.5,
        "empty": torch.empty(0, 4),
    }


def _assert_exact(weights: Any, expected: dict[str, torch.Tensor], what: str) -> None:
    for name, tensor in expected.items():
        got = weights[name]
        assert got.device.type == "cuda", f"{what}: {name} on {got.device}"
        assert got.dtype == tensor.dtype and got.shape == tensor.shape, f"{what}: {name}"
        assert tensor_bytes(got) == tensor_bytes(tensor), f"{what}: {name} differs"


def _settled() -> int:
    """Device bytes allocated once garbage is collected and queued work has finished."""
    gc.collect()
    torch.cuda.synchronize()
    return torch.cuda.memory_allocated()


async def _until(condition: Any, what: str, seconds: float = 30.0) -> None:
    # Background demotions offer no event to wait on: poll, as a user would.
    with anyio.fail_after(seconds):
        while not condition():  # noqa: ASYNC110
            await anyio.sleep(0.002)


class FailingStore(Store):
    """Fails the ``fail_at``-th read of weights (a store dying mid-load), once."""

    def __init__(self, template: str, fail_at: int) -> None:
        super().__init__(template)
        self.fail_at = fail_at
        self.reads = 0

    async def read_into(self, url: str, offset: int, dest: memoryview, *, model_id: str) -> None:
        if len(dest) > 64 << 10:  # weights, not a header
            self.reads += 1
            if self.reads == self.fail_at:
                raise StoreError(f"injected failure reading {url}", model_id=model_id, path=url)
        await super().read_into(url, offset, dest, model_id=model_id)


async def test_loads_promotions_and_concurrent_loads_are_bit_exact(models: MemoryModels) -> None:
    """Store -> GPU, 4 concurrent loads sharing 3 odd-sized pinned chunks, demote -> promote:
    every tensor of every dtype equals safetensors' CPU bytes; the pool ends with nothing in use."""
    expected = {f"m{i}": _mixed(i, scale=40 + i) for i in range(4)}
    for model_id, tensors in expected.items():
        models.put(f"{model_id}/model.safetensors", model_file(tensors, misalign=True))
    backend = TorchBackend("cuda", staging_chunk_size=65537, staging_chunks=3)
    async with ModelCache(
        models.template, device_budget=64 * MIB, host_budget=64 * MIB, backend=backend
    ) as cache:

        async def use(model_id: str) -> None:
            async with cache.use(model_id) as weights:
                _assert_exact(weights, expected[model_id], f"store load of {model_id}")
                assert weights.buffer.data_ptr() % 256 == 0, "device buffer not 256 B aligned"

        async with anyio.create_task_group() as tg:
            for model_id in expected:
                tg.start_soon(use, model_id)
        pool = backend.staging_pool
        assert pool is not None and pool.stats().in_use == 0
        assert pool.stats().max_in_use == 3, pool.stats()
        for model_id in expected:
            assert cache.evict(model_id), model_id
        await _until(lambda: len(cache.resident("host")) == len(expected), "demotions")
        for model_id in expected:  # promoted from the pinned host tier
            async with cache.use(model_id) as weights:
                _assert_exact(weights, expected[model_id], f"promotion of {model_id}")
        assert cache.stats().tiers["host"].hits >= len(expected)
        check_invariants(cache)


async def test_device_memory_returns_after_evictions_failures_and_close(
    models: MemoryModels,
) -> None:
    """memory_allocated is back at its baseline after evict-all, a builder exception and a
    store failure mid-load (cache still open), and close; while resident it matches the bytes
    the cache reports within allocator rounding; reserved memory stays within the budget."""
    for i in range(3):
        models.add(f"m{i}", 3 * MIB + 1001 * i, seed=i)

    class Broken:
        @classmethod
        def from_weights(cls, weights: Any, info: Any) -> Any:
            raise ValueError("builder bug")

    class Plain:  # two classes are bound: each use names its own
        @classmethod
        def from_weights(cls, weights: Any, info: Any) -> Any:
            return weights

    backend = TorchBackend("cuda", staging_chunk_size=MIB + 3, staging_chunks=2)
    budget = 16 * MIB
    store = FailingStore(models.template, fail_at=2)
    baseline = _settled()
    reserved_before = torch.cuda.memory_reserved()
    async with ModelCache(store, device_budget=budget, backend=backend, failure_ttl=0) as cache:
        cache.model(Broken)
        cache.model(Plain)
        with pytest.raises(StoreError, match="injected"):
            async with cache.use("m0", model=Plain):
                pass
        assert _settled() == baseline, "a load failed by the store kept device memory"
        with pytest.raises(ModelBuildError, match="builder bug"):
            async with cache.use("m1", model=Broken):
                pass
        assert _settled() == baseline, "a load failed by its builder kept device memory"
        for i in range(3):
            async with cache.use(f"m{i}", model=Plain):
                pass
        held = _settled() - baseline
        reported = cache.stats().bytes_reserved
        assert 0 <= held - reported <= 512 * 3, (held, reported)  # the allocator rounds to 512
        for i in range(3):
            assert cache.evict(f"m{i}", model=Plain)
        await _until(lambda: not cache.resident(), "evictions")
        assert _settled() == baseline, "evicted models kept device memory"
        # Slack of one 20 MiB segment: the allocator packs allocations under 10 MiB into those.
        reserved = torch.cuda.memory_reserved() - reserved_before
        assert reserved <= budget + 20 * MIB, f"{reserved} bytes reserved for a {budget} budget"
        async with cache.use("m2", model=Plain):
            pass
    assert _settled() == baseline, "close kept device memory"


async def test_dropped_weights_free_device_memory_without_the_garbage_collector(
    models: MemoryModels,
) -> None:
    """A dropped model's device bytes return by reference count alone: no cycle holds them
    until a collection (the budget releases them at once, so memory must follow at once)."""
    models.add("m", 2 * MIB + 5, seed=1)
    store = Store(models.template)
    info = await read_model_info(store, "m")
    backend = TorchBackend("cuda", staging_chunk_size=MIB, staging_chunks=2)
    await backend.load(store, info)  # the pool and the streams
    start = _settled()
    gc.disable()
    try:
        weights = await backend.load(store, info)
        buffer = weakref.ref(weights.buffer)
        await anyio.lowlevel.checkpoint()  # the handle that resumed us last goes
        del weights
        torch.cuda.synchronize()
        held = buffer()
        holders = [] if held is None else [type(r).__name__ for r in gc.get_referrers(held)]
        del held
        assert torch.cuda.memory_allocated() == start, f"still held by {holders}"
    finally:
        gc.enable()


async def test_user_kernels_on_a_side_stream_survive_lease_exit_eviction_and_reload(
    models: MemoryModels,
) -> None:
    """A matmul queued on the user's own stream reads the weights after the lease ended (inside
    that stream's context), the model was evicted and another loaded into freed memory: its
    output still equals the reference (the buffer was not reused before the kernel ran)."""
    g = torch.Generator().manual_seed(5)
    a = torch.randn(1024, 1024, generator=g)
    models.put("a/model.safetensors", save({"w": a}))
    models.put("b/model.safetensors", save({"w": torch.randn(1024, 1024, generator=g)}))
    x = torch.randn(1024, 64, generator=g).cuda()
    reference = a.cuda() @ x
    torch.cuda.synchronize()
    side = torch.cuda.Stream()  # type: ignore[no-untyped-call]
    async with ModelCache(models.template, device="cuda", device_budget=4 * MIB + 4096) as cache:
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            async with cache.use("a") as weights:
                # ~1 s of GPU time on the side stream before the matmul reads the weights.
                torch.cuda._sleep(2_000_000_000)  # type: ignore[no-untyped-call]
                y = weights["w"] @ x
            del weights  # the cache's reference is the last one: eviction frees the buffer
        async with cache.use("b"):  # evicts a; b's bytes may land where a's were
            pass
        side.synchronize()
    assert torch.allclose(y, reference, rtol=1e-4, atol=1e-4), (
        "the side stream read weights overwritten by a reload"
    )


async def test_a_model_larger_than_free_memory_is_a_typed_error_and_holds_nothing(
    models: MemoryModels,
) -> None:
    """With the GPU nearly full, a load is a DeviceOutOfMemoryError (not to be remembered) that
    holds no device memory; through the cache, loading again once memory is free succeeds."""
    models.add("big", 96 * MIB, seed=2)
    store = Store(models.template)
    info = await read_model_info(store, "big")
    backend = TorchBackend("cuda", staging_chunk_size=8 * MIB, staging_chunks=2)
    await backend.load(store, info)  # the pool and streams, while there is room (then dropped)
    await anyio.lowlevel.checkpoint()
    torch.cuda.empty_cache()
    hog = torch.empty(torch.cuda.mem_get_info()[0] - 32 * MIB, dtype=torch.uint8, device="cuda")
    start = _settled()
    with pytest.raises(DeviceOutOfMemoryError, match="'big'") as caught:
        await backend.load(store, info)
    assert not caught.value.remember
    del caught
    assert _settled() == start, "a failed allocation left device memory held"
    async with ModelCache(store, device="cuda", device_budget=256 * MIB) as cache:
        with pytest.raises(DeviceOutOfMemoryError):
            async with cache.use("big"):
                pass
        del hog
        torch.cuda.empty_cache()
        async with cache.use("big") as weights:  # not the remembered failure: it loads now
            assert weights["w"].numel() == 96 * MIB


async def test_pinned_memory_is_really_pinned_and_released() -> None:
    """The host tier's slab and the staging chunks are page-locked (is_pinned); pinning 256 MiB
    takes a reported time; the slab's memory is unpinned and gone once dropped."""
    arena = HostArena(256 * MIB, pin=True, device="cuda")
    started = time.perf_counter()
    await arena.allocate()
    seconds = time.perf_counter() - started
    block = arena.alloc(3 * MIB + 5)
    assert block is not None and block.tensor.is_pinned(), "host tier block is not pinned"
    print(f"pinning 256 MiB took {seconds:.3f} s")
    data = torch.randint(0, 256, (block.nbytes,), dtype=torch.uint8)
    block.tensor.copy_(data)
    assert torch.equal(block.tensor.cuda(non_blocking=True).cpu(), data)
    assert block.tensor.data_ptr() % 4096 == 0
    backend = TorchBackend("cuda", staging_chunk_size=MIB, staging_chunks=2)
    pool, _, _ = await backend._cuda.parts()
    await pool.allocate()
    assert pool._chunks is not None and all(c.tensor.is_pinned() for c in pool._chunks)


def test_cuda_1_makes_no_context_on_gpu_0() -> None:
    """A cache on cuda:1 (load, pin, promote, build) leaves device 0 without a context."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    import subprocess
    import sys

    code = """
import anyio, ctypes, fsspec, torch
from safetensors.torch import save
from modelcache import ModelCache
fs = fsspec.filesystem("memory")
for i in range(2):
    fs.pipe(f"/c1/m{i}/model.safetensors", save({"w": torch.ones(1 << 20) * i}))
class M:
    @classmethod
    def from_weights(cls, w, info):
        return torch.zeros(4, device="cuda") + w["w"][:4]
async def main():
    async with ModelCache("memory:///c1/{model_id}", device="cuda:1", device_budget=5 << 20,
                          host_budget=16 << 20) as cache:
        cache.model(M)
        for model_id in ("m0", "m1", "m0"):
            async with cache.use(model_id, model=M) as m:
                assert m.device == torch.device("cuda", 1), m.device
anyio.run(main)
cuda = ctypes.CDLL("libcuda.so.1")
flags, active = ctypes.c_uint(), ctypes.c_int()
assert cuda.cuDevicePrimaryCtxGetState(0, ctypes.byref(flags), ctypes.byref(active)) == 0
print("ACTIVE", active.value)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "ACTIVE 0" in done.stdout, "cuda:1 made a context on GPU 0"


# -- CuPy ------------------------------------------------------------------------------------


async def test_cupy_is_bit_exact_and_a_dlpack_import_survives_eviction(
    models: MemoryModels,
) -> None:
    """CuPy arrays equal torch's bytes for the same model (bf16/f8 as raw bits); an array
    imported through DLPack keeps its memory and bytes after the model is evicted and another
    loaded; the pool's bytes return after close once the import is dropped."""
    cupy = gpu_cupy()
    expected = _mixed(3, scale=20)
    models.put("a/model.safetensors", model_file(expected, misalign=True))
    models.put("b/model.safetensors", model_file(_mixed(4, scale=20), misalign=True))
    pool = cupy.get_default_memory_pool()
    pool.free_all_blocks()
    start = pool.used_bytes()
    size = len(model_file(expected, misalign=True))
    backend = CupyBackend(0, staging_chunk_size=4097, staging_chunks=3)
    async with ModelCache(models.template, device_budget=size + 8192, backend=backend) as cache:
        async with cache.use("a") as weights:
            for name, tensor in expected.items():
                assert cupy.asnumpy(weights[name]).tobytes() == tensor_bytes(tensor), name
            imported = torch.utils.dlpack.from_dlpack(weights.dlpack("f32"))
            kept = imported.clone()
        async with cache.use("b"):  # evicts a
            pass
        assert cache.resident() == ["b"]
        assert torch.equal(imported, kept), "a DLPack import lost its bytes at eviction"
        assert torch.equal(kept.cpu(), expected["f32"])
    del imported, weights
    gc.collect()
    pool.free_all_blocks()
    assert pool.used_bytes() == start


async def test_cupy_and_torch_load_the_same_bytes(models: MemoryModels) -> None:
    """The same file through both backends: every tensor's bytes agree (raw bf16/f8 too)."""
    cupy = gpu_cupy()
    tensors = _mixed(9, scale=10)
    data = model_file(tensors, misalign=True)
    models.put("m/model.safetensors", data)
    reference = load(data)
    store = Store(models.template)
    info = await read_model_info(store, "m")
    on_torch = await TorchBackend("cuda").load(store, info)
    on_cupy = await CupyBackend(0).load(store, info)
    for name in reference:
        assert tensor_bytes(on_torch[name]) == cupy.asnumpy(on_cupy[name]).tobytes(), name
