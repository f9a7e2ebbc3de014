"""The failure memory: failed loads hold no buffer, are forgotten on time, and reach prefetch."""

from __future__ import annotations

import asyncio
import gc
import traceback
import weakref
from pathlib import Path
from typing import Any

import anyio
import pytest
import torch

import modelcache._torch
from modelcache import (
    DeviceOutOfMemoryError,
    ModelBuildError,
    ModelCache,
    ModelNotFoundError,
    Weights,
)
from modelcache._failures import release_frames
from modelcache._format import ModelInfo
from modelcache._pool import BufferPool

from .conftest import GatedStore, MemoryModels, check_invariants, settle
from .test_loader import run_python

#: Large enough for a mapped (weak-referenceable) host buffer, not a heap bytearray.
BIG = 2 << 20


def track_buffers(monkeypatch: pytest.MonkeyPatch) -> list[weakref.ref[Any]]:
    """Weak references to every host buffer the torch backend allocates from now on: the
    tensor and the memory under it."""
    refs: list[weakref.ref[Any]] = []
    allocate = modelcache._torch.allocate_host
    pooled = modelcache._torch.pooled_buffer

    def tracking(nbytes: int, *placing: Any) -> tuple[torch.Tensor, memoryview]:
        tensor, view = allocate(nbytes, *placing)
        refs.extend([weakref.ref(tensor), weakref.ref(view.obj)])
        return tensor, view

    def tracking_pooled(
        pool: BufferPool, info: ModelInfo, *placing: Any
    ) -> tuple[torch.Tensor, memoryview, int]:
        tensor, view, faulted = pooled(pool, info, *placing)
        refs.extend([weakref.ref(tensor), weakref.ref(view.obj)])
        return tensor, view, faulted

    monkeypatch.setattr(modelcache._torch, "allocate_host", tracking)
    monkeypatch.setattr(modelcache._torch, "pooled_buffer", tracking_pooled)
    return refs


async def test_a_failed_build_leaves_no_buffer_reachable(models: MemoryModels) -> None:
    """After a builder raises, nothing keeps the weights it was given alive, while the
    failure is still remembered with its type, message and cause."""
    models.add("a", BIG)
    refs: list[weakref.ref[torch.Tensor]] = []

    def broken(weights: Weights, info: ModelInfo) -> Any:
        refs.append(weakref.ref(weights.buffer))
        raise ValueError("the weights do not fit this class")

    cache = ModelCache(models.template, device_budget=4 * BIG, failure_ttl=60)

    @cache.model
    class Broken:
        from_weights = broken

    async with cache:
        with pytest.raises(ModelBuildError) as first:
            async with cache.use("a"):
                pass
        del first
        await cache.wait_idle()
        gc.collect()
        assert len(refs) == 1 and refs[0]() is None
        assert cache.stats().bytes_reserved == 0
        with pytest.raises(ModelBuildError) as again:  # remembered: raised without a load
            async with cache.use("a"):
                pass
        assert len(refs) == 1
        error = again.value
        assert "'a'" in str(error) and "do not fit this class" in str(error)
        assert isinstance(error.__cause__, ValueError)
        assert str(error.__cause__) == "the weights do not fit this class"
        # The cause's traceback survives as text, naming the user's function.
        assert "in broken" in "".join(getattr(error.__cause__, "__notes__", []))
        check_invariants(cache)


@pytest.mark.usefixtures("count_threads")
async def test_a_store_failure_mid_load_leaves_no_buffer_reachable(
    models: MemoryModels, gated: GatedStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A load whose weight read fails after its buffer was allocated leaves that buffer
    unreachable, though the failure is remembered."""
    models.add("a", BIG)
    refs = track_buffers(monkeypatch)
    gated.gate("a", "read_into")
    async with ModelCache(gated, device_budget=4 * BIG, failure_ttl=60) as cache:
        async with anyio.create_task_group() as tg:

            async def user() -> None:
                with pytest.raises(ModelNotFoundError):
                    async with cache.use("a"):
                        pass

            tg.start_soon(user)
            # At the gate: not while a worker thread makes the store's filesystem (its first
            # use), before the header read, which would then find no file and allocate nothing.
            await settle()
            models.fs.rm(f"{models.root}/a/model.safetensors")  # gone under the load
            gated.open("a", "read_into")
        await cache.wait_idle()
        gc.collect()
        assert refs and all(ref() is None for ref in refs)
        with pytest.raises(ModelNotFoundError):  # still remembered
            async with cache.use("a"):
                pass
        assert gated.calls[("read_into", "a")] == 1
        check_invariants(cache)


async def test_expired_failures_are_forgotten_without_another_failure(
    models: MemoryModels,
) -> None:
    """A remembered failure is dropped once failure_ttl has passed, with no further use of
    the cache (not only when the next failure is recorded)."""
    async with ModelCache(models.template, device_budget=4096, failure_ttl=0.05) as cache:
        with pytest.raises(ModelNotFoundError):
            async with cache.use("missing"):
                pass
        assert len(cache._failures.memory) == 1
        sweeper = [t for t in asyncio.all_tasks() if t.get_name() == "modelcache failure memory"]
        assert len(sweeper) == 1
        await asyncio.wait(sweeper, timeout=5)  # it ends once the memory is empty
        assert sweeper[0].done() and len(cache._failures.memory) == 0


async def test_host_prefetch_raises_the_error_of_the_device_load_it_joined(
    models: MemoryModels, gated: GatedStore
) -> None:
    """prefetch(tier="host") that shares a failing device load raises that load's error."""
    models.add("a", 1000)
    gated.gate("a", "read_into")
    errors: list[BaseException] = []

    async def record(call: Any) -> None:
        try:
            await call()
        except Exception as exc:
            errors.append(exc)

    async with ModelCache(gated, device_budget=4096, host_budget=4096) as cache:

        async def user() -> None:
            async with cache.use("a"):
                pass

        async with anyio.create_task_group() as tg:
            tg.start_soon(record, user)
            await anyio.wait_all_tasks_blocked()
            tg.start_soon(record, lambda: cache.prefetch(["a"], tier="host"))
            await anyio.wait_all_tasks_blocked()
            models.fs.rm(f"{models.root}/a/model.safetensors")
            gated.open("a", "read_into")
        assert len(errors) == 2
        assert all(isinstance(e, ModelNotFoundError) for e in errors)
        assert cache.resident("host") == []
        check_invariants(cache)


async def test_host_prefetches_sharing_a_failed_host_load_each_raise_their_own_copy(
    models: MemoryModels, gated: GatedStore
) -> None:
    """Two prefetch(tier="host") calls that share one failed host load raise two error objects
    (one's traceback and frames never reach the other), without the load's frames."""
    models.add("a", 1000)
    gated.gate("a", "read_into")
    errors: list[BaseException] = []

    async def prefetch() -> None:
        try:
            await cache.prefetch(["a"], tier="host")
        except ModelNotFoundError as exc:
            errors.append(exc)

    async with ModelCache(gated, device_budget=4096, host_budget=4096) as cache:
        async with anyio.create_task_group() as tg:
            tg.start_soon(prefetch)
            tg.start_soon(prefetch)
            await anyio.wait_all_tasks_blocked()
            models.fs.rm(f"{models.root}/a/model.safetensors")
            gated.open("a", "read_into")
        assert len(errors) == 2
        assert errors[0] is not errors[1]
        assert str(errors[0]) == str(errors[1])
        check_invariants(cache)


@pytest.mark.cuda
async def test_cuda_failed_loads_give_their_device_memory_back(
    models: MemoryModels, gated: GatedStore
) -> None:
    """On CUDA, a builder exception and a store failure mid-load leave memory_allocated at its
    baseline while the cache is open and both failures are remembered."""
    models.add("build", BIG, seed=1)
    models.add("store", BIG, seed=2)

    def broken(weights: Weights, info: ModelInfo) -> Any:
        raise ValueError(f"cannot build {info.model_id}")

    cache = ModelCache(gated, device="cuda", device_budget=4 * BIG, failure_ttl=60)

    @cache.model
    class Broken:
        from_weights = broken

    torch.cuda.synchronize()
    start = torch.cuda.memory_allocated()
    async with cache:
        with pytest.raises(ModelBuildError):
            async with cache.use("build"):
                pass
        gated.gate("store", "read_into")
        async with anyio.create_task_group() as tg:

            async def user() -> None:
                with pytest.raises(ModelNotFoundError):
                    async with cache.use("store"):
                        pass

            tg.start_soon(user)
            await anyio.wait_all_tasks_blocked()
            models.fs.rm(f"{models.root}/store/model.safetensors")
            gated.open("store", "read_into")
        await cache.wait_idle()
        assert len(cache._failures.memory) == 2
        gc.collect()
        torch.cuda.synchronize()
        assert torch.cuda.memory_allocated() == start
        assert cache.stats().bytes_reserved == 0


async def test_a_device_out_of_memory_is_not_remembered(models: MemoryModels) -> None:
    """DeviceOutOfMemoryError (memory the budget does not count) reaches the caller typed and is
    not remembered as the model's failure: the next use() loads the model."""
    models.add("a", 100)
    builds: list[int] = []

    def flaky(weights: Weights, info: ModelInfo) -> Any:
        builds.append(1)
        if len(builds) == 1:
            raise DeviceOutOfMemoryError("out of device memory", model_id=info.model_id)
        return weights

    cache = ModelCache(models.template, device_budget=1000, failure_ttl=60)

    @cache.model
    class Flaky:
        from_weights = flaky

    async with cache:
        with pytest.raises(DeviceOutOfMemoryError):
            async with cache.use("a"):
                pass
        async with cache.use("a") as weights:
            assert weights["w"].numel() == 100
        assert len(builds) == 2
        check_invariants(cache)


@pytest.mark.parametrize(
    ("zero_copy", "spare", "cpp_traces"),
    [(False, 0, False), (True, 0, False), (True, 1, False), (True, 1, True)],
    ids=["copy", "zero-copy", "zero-copy-torch-open", "zero-copy-torch-open-cpp-traces"],
)
def test_a_load_that_found_no_free_descriptor_is_not_remembered(
    tmp_path: Path, zero_copy: bool, spare: int, cpp_traces: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A use() that failed because the process had no free file descriptor (EMFILE, a
    condition of the moment) raises it typed and is not remembered as the model's failure:
    once descriptors are free again, the next use() loads the model. With one descriptor
    spare, the zero-copy load's own open takes it and torch's open of the mapping fails: torch
    says so in a RuntimeError, which was remembered. With ``TORCH_SHOW_CPP_STACKTRACES`` set
    (torch's debugging switch) torch's message goes on past its first line with a C++
    traceback, and was remembered still."""
    if cpp_traces:
        monkeypatch.setenv("TORCH_SHOW_CPP_STACKTRACES", "1")
        monkeypatch.setenv("TORCH_DISABLE_ADDR2LINE", "1")  # no symbols: a quick traceback
    result = run_python(
        f"""
        import asyncio, os, resource
        import torch
        from safetensors.torch import save_file
        from modelcache import ModelCache, ModelCacheError

        root = {str(tmp_path)!r}
        os.makedirs(root + "/m")
        save_file({{"w": torch.ones(1 << 20)}}, root + "/m/model.safetensors")

        async def main():
            async with ModelCache(
                f"file://{{root}}/{{{{model_id}}}}", device_budget=1 << 30, failure_ttl=600,
                zero_copy={zero_copy!r},
            ) as cache:
                await cache.describe("m")
                soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
                top = max(int(fd) for fd in os.listdir("/proc/self/fd"))
                resource.setrlimit(resource.RLIMIT_NOFILE, (top + 8, hard))
                filler = []
                try:
                    while True:  # every descriptor taken
                        filler.append(os.open("/dev/null", os.O_RDONLY))
                except OSError:
                    pass
                for _ in range({spare}):
                    os.close(filler.pop())
                try:
                    async with cache.use("m"):
                        print("loaded without a descriptor")
                except ModelCacheError as exc:
                    causes = []
                    cause = exc.__cause__
                    while cause is not None:
                        causes.append(type(cause).__name__)
                        cause = cause.__cause__
                    print("failed", type(exc).__name__, exc, "caused by", causes)
                for fd in filler:
                    os.close(fd)
                resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
                async with cache.use("m") as weights:
                    print("loaded again", float(weights["w"].sum()))

        asyncio.run(main())
        """
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "failed" in result.stdout and "Too many open files" in result.stdout
    if spare:  # torch's open failed, not ours
        assert "caused by ['OSError', 'RuntimeError']" in result.stdout, result.stdout
    assert "loaded again 1048576.0" in result.stdout


class _Local:
    """An object a caller holds in a local variable (weak-referenceable)."""


async def test_a_remembered_error_keeps_no_frame_of_the_callers_it_was_raised_to(
    models: MemoryModels,
) -> None:
    """Raising a remembered error to a caller (use() or describe()) does not attach that
    caller's frames or its handled exception to the remembered error: once the caller returns,
    its locals are unreachable, though the error is still remembered."""
    cache = ModelCache(models.template, device_budget=4096, failure_ttl=60)

    async def caller(call: Any) -> weakref.ref[_Local]:
        local = _Local()
        try:
            raise KeyError("the caller's own error, being handled")
        except KeyError:
            with pytest.raises(ModelNotFoundError):
                await call()
        return weakref.ref(local)

    async def use() -> None:
        async with cache.use("missing"):
            pass

    async with cache:
        await caller(use)  # the load fails: remembered
        refs = [await caller(use), await caller(lambda: cache.describe("missing"))]
        gc.collect()
        assert [ref() for ref in refs] == [None, None]
        assert len(cache._failures.memory) == 1


async def test_each_waiter_of_a_failed_load_gets_its_own_traceback(
    models: MemoryModels, gated: GatedStore
) -> None:
    """Waiters of one failed load each raise an error of their own: a waiter that looks at its
    traceback after another waiter raised still sees its own frames, not the other's."""
    models.add("a", 1000)
    gated.gate("a", "read_into")
    looked = anyio.Event()
    names: list[list[str]] = []

    async def first_waiter() -> None:
        with pytest.raises(ModelNotFoundError) as caught:
            async with cache.use("a"):
                pass
        await looked.wait()  # the other waiter has raised by now
        names.append([frame.name for frame in traceback.extract_tb(caught.value.__traceback__)])

    async def second_waiter() -> None:
        with pytest.raises(ModelNotFoundError):
            async with cache.use("a"):
                pass
        looked.set()

    async with ModelCache(gated, device_budget=4096) as cache, anyio.create_task_group() as tg:
        tg.start_soon(first_waiter)
        tg.start_soon(second_waiter)
        await anyio.wait_all_tasks_blocked()
        models.fs.rm(f"{models.root}/a/model.safetensors")
        gated.open("a", "read_into")
    assert names and "first_waiter" in names[0] and "second_waiter" not in names[0]


@pytest.mark.parametrize("ttl", [float("nan"), -1.0])
async def test_failure_ttl_must_be_a_non_negative_number(models: MemoryModels, ttl: float) -> None:
    """A NaN or negative failure_ttl is refused when the cache is made (a NaN would reach the
    sweeper's sleep and crash the cache's task group at the first failure)."""
    with pytest.raises(ValueError, match="failure_ttl"):
        ModelCache(models.template, device_budget=4096, failure_ttl=ttl)


def test_release_frames_notes_a_bounded_part_of_a_long_chain() -> None:
    """An error chaining thousands of exceptions loses every traceback, but only the first
    few exceptions get a note: the work done on the event loop per failure is bounded."""
    error: BaseException | None = None
    for i in range(2000):
        try:
            raise ValueError(i) from error
        except ValueError as raised:
            error = raised
    assert error is not None
    release_frames(error)
    chain: list[BaseException] = []
    noted = 0
    link: BaseException | None = error
    while link is not None:
        chain.append(link)
        noted += bool(getattr(link, "__notes__", None))
        link = link.__cause__
    assert len(chain) == 2000 and all(e.__traceback__ is None for e in chain)
    assert 0 < noted <= 64
    assert "in test_release_frames_notes_a_bounded_part_of_a_long_chain" in error.__notes__[0]


async def test_a_host_prefetch_of_a_remembered_missing_model_reads_nothing(
    models: MemoryModels, gated: GatedStore
) -> None:
    """A host prefetch answers from the failure memory, as use() and describe() do: an id found
    missing a moment ago raises ModelNotFoundError again without a store read."""
    models.add("a", 100)
    cache = ModelCache(gated, device_budget=1000, host_budget=1000, failure_ttl=60)
    async with cache:
        with pytest.raises(ModelNotFoundError):
            async with cache.use("missing"):
                pass
        reads = sum(gated.calls.values())
        for _ in range(3):
            with pytest.raises(ModelNotFoundError):
                await cache.prefetch(["missing"], tier="host")
        assert sum(gated.calls.values()) == reads
        await cache.prefetch(["a"], tier="host")
        assert cache.resident("host") == ["a"]
        check_invariants(cache)
