"""Shared fixtures: models in an in-memory store, and a store whose reads wait on gates."""

from __future__ import annotations

import json
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import anyio
import anyio.to_thread
import fsspec
import pytest
import torch
from safetensors.torch import save

from modelcache import ModelCache, Store
from modelcache._cache import ModelCache as _ModelCache


def model_bytes(nbytes: int, seed: int = 0) -> bytes:
    """A safetensors file with one U8 tensor of ``nbytes`` bytes: its buffer is exactly nbytes."""
    g = torch.Generator().manual_seed(seed)
    return save({"w": torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=g)})


class MemoryModels:
    """Writes models under a fresh ``memory://`` root and removes them afterwards."""

    def __init__(self) -> None:
        self.root = f"/mc-{uuid.uuid4().hex}"
        self.fs = fsspec.filesystem("memory")
        self.template = f"memory://{self.root}/{{model_id}}"

    def add(self, model_id: str, nbytes: int, *, seed: int = 0, config: Any = None) -> None:
        self.fs.pipe(f"{self.root}/{model_id}/model.safetensors", model_bytes(nbytes, seed))
        if config is not None:
            self.fs.pipe(f"{self.root}/{model_id}/config.json", json.dumps(config).encode())

    def put(self, name: str, data: bytes) -> None:
        self.fs.pipe(f"{self.root}/{name}", data)

    def cleanup(self) -> None:
        if self.fs.exists(self.root):
            self.fs.rm(self.root, recursive=True)


@pytest.fixture
def models() -> Iterator[MemoryModels]:
    m = MemoryModels()
    yield m
    m.cleanup()


class GatedStore(Store):
    """A Store whose operations wait, per model id and operation, until a gate is opened.

    ``store.gate("m", "read_into")`` closes a gate; ``store.open("m", "read_into")`` opens it.
    ``store.calls`` counts operations by (operation, model id).
    """

    #: ``etag`` is asked by a disk-tier write before it writes; ``file_tag`` by a revalidation.
    OPERATIONS = ("size", "read_range", "read_into", "etag", "file_tag")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gates: dict[tuple[str, str], anyio.Event] = {}
        self.calls: Counter[tuple[str, str]] = Counter()

    def gate(self, model_id: str, operation: str) -> None:
        assert operation in self.OPERATIONS
        self.gates[(operation, model_id)] = anyio.Event()

    def open(self, model_id: str, operation: str) -> None:
        self.gates.pop((operation, model_id)).set()

    async def _pass(self, operation: str, model_id: str) -> None:
        self.calls[(operation, model_id)] += 1
        gate = self.gates.get((operation, model_id))
        if gate is not None:
            await gate.wait()

    async def size(self, url: str, *, model_id: str) -> int:
        await self._pass("size", model_id)
        return await super().size(url, model_id=model_id)

    async def read_range(self, url: str, start: int, end: int, *, model_id: str) -> bytes:
        await self._pass("read_range", model_id)
        return await super().read_range(url, start, end, model_id=model_id)

    async def read_into(self, url: str, offset: int, dest: memoryview, *, model_id: str) -> None:
        await self._pass("read_into", model_id)
        await super().read_into(url, offset, dest, model_id=model_id)

    async def etag(self, url: str, *, model_id: str) -> str | None:
        await self._pass("etag", model_id)
        return await super().etag(url, model_id=model_id)

    async def file_tag(self, url: str, *, model_id: str) -> str | None:
        await self._pass("file_tag", model_id)
        return await super().file_tag(url, model_id=model_id)


@pytest.fixture
def gated(models: MemoryModels) -> GatedStore:
    return GatedStore(models.template)


class LocalDescriptors:
    """Descriptors a Store's local reads hold open: ``now`` and the ``peak`` seen."""

    def __init__(self) -> None:
        self.now = 0
        self.peak = 0
        self.ours: set[int] = set()


@pytest.fixture
def local_descriptors(monkeypatch: pytest.MonkeyPatch) -> LocalDescriptors:
    """Count the files a Store's local reads open (``_open_regular``) until each is closed."""
    import os

    import modelcache._store as store_module

    counts = LocalDescriptors()
    real_open, real_close = store_module._open_regular, os.close

    def counting_open(path: str, opened: list[int], opener: Any) -> int:
        size: int = real_open(path, opened, opener)
        counts.ours.add(opened[-1])
        counts.now += 1
        counts.peak = max(counts.peak, counts.now)
        return size

    def counting_close(fd: int) -> None:
        if fd in counts.ours:
            counts.ours.discard(fd)
            counts.now -= 1
        real_close(fd)

    monkeypatch.setattr(store_module, "_open_regular", counting_open)
    monkeypatch.setattr(os, "close", counting_close)
    return counts


class _Threads:
    """Worker threads (``anyio.to_thread.run_sync``) running now, for `settle`."""

    busy = 0
    idle: anyio.Event | None = None


@pytest.fixture
def count_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Count every worker thread the code under test runs, for `settle` (a module that calls
    it sets ``pytestmark = pytest.mark.usefixtures("count_threads")``). Not for every test: the
    wrapper changes when worker threads hand their results back, and the buffer pool's reuse
    tests once saw a freed buffer come back a step late under it."""
    real = anyio.to_thread.run_sync

    async def counted(func: Any, *args: Any, **kwargs: Any) -> Any:
        _Threads.busy += 1
        try:
            return await real(func, *args, **kwargs)
        finally:
            _Threads.busy -= 1
            if not _Threads.busy and _Threads.idle is not None:
                _Threads.idle.set()
                _Threads.idle = None

    monkeypatch.setattr(anyio.to_thread, "run_sync", counted)


async def settle() -> None:
    """Wait until no task can run and no worker thread (reads, builders) is busy: every task is
    parked at a gate, an event or a lease (needs the `count_threads` fixture). To wait for a cache's own work to end instead (loads,
    copies, writes), use ``cache.wait_idle()``."""
    while True:
        await anyio.wait_all_tasks_blocked()
        if not _Threads.busy:
            return
        if _Threads.idle is None:
            _Threads.idle = anyio.Event()
        await _Threads.idle.wait()


async def hold_every_read_slot(store: Store) -> Callable[[], None]:
    """Take every read slot of ``store`` (as other reads would): none of its worker-thread
    calls can start until the function returned is called, which gives them back."""
    limiter = store._get_limiter()
    holders = [object() for _ in range(int(limiter.total_tokens))]
    for holder in holders:
        await limiter.acquire_on_behalf_of(holder)

    def give_back() -> None:
        for holder in holders:
            limiter.release_on_behalf_of(holder)

    return give_back


def check_invariants(cache: ModelCache) -> None:
    """Every tier's byte accounting agrees with its entries, and budgets hold."""
    c: _ModelCache = cache
    c._check_invariants()  # `DeviceTier.check`, `HostDiskTiers.check`: each tier's own
    stats = c.stats()
    assert stats.bytes_reserved <= stats.bytes_budget
    assert stats.tiers["host"].bytes_reserved <= stats.tiers["host"].budget


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip `cuda`-marked tests cleanly where torch sees no CUDA device."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        # The marker, not the keywords: those hold every parent's name too, so a checkout in a
        # directory named "cuda" would skip every test.
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


@pytest.fixture
def thread_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Names of the functions run in worker threads (``anyio.to_thread.run_sync``) from now on."""
    calls: list[str] = []
    real = anyio.to_thread.run_sync

    async def counting(func: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(getattr(func, "__name__", repr(func)))
        return await real(func, *args, **kwargs)

    monkeypatch.setattr(anyio.to_thread, "run_sync", counting)
    return calls


def gpu_cupy() -> Any:
    """The cupy module, for tests that need it on a CUDA device: skips where CuPy is not
    installed or sees no device."""
    cupy = pytest.importorskip("cupy")
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            pytest.skip("CuPy sees no CUDA device")
    except Exception:
        pytest.skip("CuPy sees no CUDA device")
    return cupy
