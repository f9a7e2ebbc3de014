"""The host tier: demotion on eviction, promotion on use, prefetch, budgets per tier."""

from __future__ import annotations

import gc
import logging
import shutil
import weakref
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import pytest
import torch

from modelcache import LRUPolicy, ModelCache, ModelNotFoundError, ModelTooLargeError, StoreError
from modelcache._diskformat import MANIFEST_NAME, entry_name

from .conftest import GatedStore, MemoryModels, check_invariants


async def test_eviction_demotes_to_host_and_use_promotes_without_a_read(
    models: MemoryModels, gated: GatedStore
) -> None:
    """A model evicted from the device comes back from host memory: no second store read."""
    models.add("a", 1000, seed=1)
    models.add("b", 1000, seed=2)
    async with ModelCache(gated, device_budget=1500, host_budget=4000) as cache:
        async with cache.use("a") as a:
            first_ptr = a["w"].data_ptr()
            first = a["w"].clone()
        async with cache.use("b"):
            pass
        assert cache.resident() == ["b"]
        assert cache.resident("host") == ["a"]
        check_invariants(cache)
        async with cache.use("a") as a:
            assert a["w"].data_ptr() == first_ptr  # the buffer moved, it was not copied
            assert a["w"].equal(first)
        assert gated.calls[("read_into", "a")] == 1
        host = cache.stats().tiers["host"]
        assert (host.demotions, host.promotions, host.hits) == (2, 1, 1)  # a, then b
        assert cache.resident("host") == ["b"]
        check_invariants(cache)


async def test_host_tier_evicts_least_recently_used_within_its_budget(
    models: MemoryModels,
) -> None:
    """The host tier keeps at most its budget, dropping its least recently demoted model (with
    `LRUPolicy`: a, used twice, would be kept by the default cost-aware policy)."""
    for name in "abcd":
        models.add(name, 1000)
    async with ModelCache(
        models.template, device_budget=1000, host_budget=2500, policy=LRUPolicy()
    ) as cache:
        for name in "aabcd":
            async with cache.use(name):
                check_invariants(cache)
        assert cache.resident() == ["d"]
        assert cache.resident("host") == ["b", "c"]
        stats = cache.stats().tiers["host"]
        assert stats.bytes == 2000
        assert stats.evictions == 1
        assert stats.bytes_reserved <= stats.budget


async def test_without_host_budget_eviction_drops(models: MemoryModels) -> None:
    """With no host budget, an evicted model is simply dropped."""
    models.add("a", 1000)
    models.add("b", 1000)
    async with ModelCache(models.template, device_budget=1000) as cache:
        for name in "ab":
            async with cache.use(name):
                pass
        assert cache.resident("host") == []
        assert cache.stats().tiers["host"].demotions == 0
        with pytest.raises(ValueError, match="host_budget"):
            await cache.prefetch(["a"], tier="host")


async def test_model_larger_than_host_budget_is_dropped_not_demoted(models: MemoryModels) -> None:
    """A model that cannot fit the host tier leaves the device without being demoted."""
    models.add("big", 3000)
    models.add("b", 100)
    async with ModelCache(models.template, device_budget=4000, host_budget=1000) as cache:
        async with cache.use("big"):
            pass
        assert cache.evict("big")
        assert cache.resident("host") == []
        async with cache.use("b"):
            pass
        check_invariants(cache)


async def test_prefetch_host_then_use_promotes(models: MemoryModels, gated: GatedStore) -> None:
    """prefetch(tier='host') reads weights into RAM only; the next use promotes them."""
    models.add("a", 1000)
    async with ModelCache(gated, device_budget=4000, host_budget=4000) as cache:
        await cache.prefetch(["a"], tier="host")
        assert cache.resident() == []
        assert cache.resident("host") == ["a"]
        check_invariants(cache)
        async with cache.use("a") as w:
            assert w["w"].numel() == 1000
        assert gated.calls[("read_into", "a")] == 1
        assert cache.resident("host") == []


async def test_prefetch_device_leaves_models_resident_and_unleased(models: MemoryModels) -> None:
    """prefetch() loads every id onto the device and holds no lease."""
    for name in "abc":
        models.add(name, 100)
    async with ModelCache(models.template, device_budget=4000) as cache:
        await cache.prefetch(["a", "b", "c"])
        assert sorted(cache.resident()) == ["a", "b", "c"]
        assert cache.stats().leased == 0
        assert cache.evict("a")


async def test_prefetch_raises_the_first_failure_after_loading_the_rest(
    models: MemoryModels,
) -> None:
    """A missing id fails the prefetch, but the other ids still load."""
    models.add("a", 100)
    models.add("big", 9000)
    async with ModelCache(models.template, device_budget=4000, host_budget=4000) as cache:
        with pytest.raises(ModelNotFoundError):
            await cache.prefetch(["a", "nope"])
        assert cache.resident() == ["a"]
        with pytest.raises(ModelTooLargeError, match="host budget"):
            await cache.prefetch(["big"], tier="host")
        check_invariants(cache)


async def test_prefetch_shares_the_load_of_a_concurrent_use(
    models: MemoryModels, gated: GatedStore
) -> None:
    """A host prefetch of a model being loaded by use() waits for that load, reading once."""
    models.add("a", 1000)
    gated.gate("a", "read_into")
    async with ModelCache(gated, device_budget=4000, host_budget=4000) as cache:
        async with anyio.create_task_group() as tg:

            async def user() -> None:
                async with cache.use("a"):
                    pass

            tg.start_soon(user)
            await anyio.wait_all_tasks_blocked()
            tg.start_soon(lambda: cache.prefetch(["a"], tier="host"))
            await anyio.wait_all_tasks_blocked()
            gated.open("a", "read_into")
        assert gated.calls[("read_into", "a")] == 1
        assert cache.resident() == ["a"]


async def test_use_during_a_host_prefetch_waits_for_it(
    models: MemoryModels, gated: GatedStore
) -> None:
    """use() of a model being prefetched to host waits and promotes it: one read."""
    models.add("a", 1000)
    gated.gate("a", "read_into")
    async with ModelCache(gated, device_budget=4000, host_budget=4000) as cache:
        got = []
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: cache.prefetch(["a"], tier="host"))
            await anyio.wait_all_tasks_blocked()

            async def user() -> None:
                async with cache.use("a") as w:
                    got.append(w)

            tg.start_soon(user)
            await anyio.wait_all_tasks_blocked()
            gated.open("a", "read_into")
        assert len(got) == 1
        assert gated.calls[("read_into", "a")] == 1
        assert cache.stats().tiers["host"].promotions == 1


async def test_closing_frees_the_host_tier(models: MemoryModels) -> None:
    """After close, both tiers hold no bytes."""
    models.add("a", 1000)
    models.add("b", 1000)
    async with ModelCache(models.template, device_budget=1000, host_budget=4000) as cache:
        for name in "ab":
            async with cache.use(name):
                pass
    stats = cache.stats()
    assert stats.tiers["host"].bytes_reserved == 0
    assert stats.tiers["device"].bytes_reserved == 0


# -- the disk tier ----------------------------------------------------------------------------


def _damage_disk_copies(root: Path) -> None:
    for path in root.rglob("model.safetensors"):
        data = path.read_bytes()
        path.write_bytes(data[:8] + b"{not json" + data[17:])


async def test_remote_loads_are_copied_to_disk_and_come_back_from_there(
    models: MemoryModels, gated: GatedStore, tmp_path: Path
) -> None:
    """A model loaded from a remote store is kept on disk; after eviction it loads from there."""
    models.add("a", 1000, seed=5)
    models.add("b", 1000, seed=6)
    async with ModelCache(
        gated, device_budget=1000, disk_dir=tmp_path, disk_budget="1MiB"
    ) as cache:
        async with cache.use("a") as w:
            original = w["w"].clone()
        await cache.wait_idle()  # the copies to the disk tier
        async with cache.use("b"):  # evicts a (no host tier: dropped from RAM)
            pass
        async with cache.use("a") as w:
            assert w["w"].equal(original)
        assert gated.calls[("read_into", "a")] == 1
        await cache.wait_idle()  # the copies to the disk tier
        disk = cache.stats().tiers["disk"]
        assert (disk.entries, disk.hits) == (2, 1)
        check_invariants(cache)


async def test_disk_tier_survives_a_restart(models: MemoryModels, tmp_path: Path) -> None:
    """A new cache on the same disk directory serves earlier downloads without the store."""
    models.add("a", 1000, seed=7)
    async with ModelCache(
        models.template, device_budget=4000, disk_dir=tmp_path, disk_budget="1MiB"
    ) as cache:
        async with cache.use("a") as w:
            original = w["w"].clone()
        await cache.wait_idle()  # the copies to the disk tier
    store = GatedStore(models.template)
    async with (
        ModelCache(store, device_budget=4000, disk_dir=tmp_path, disk_budget="1MiB") as cache,
        cache.use("a") as w,
    ):
        assert w["w"].equal(original)
    assert store.calls[("read_into", "a")] == 0


async def test_a_damaged_disk_copy_falls_back_to_the_store(
    models: MemoryModels, gated: GatedStore, tmp_path: Path
) -> None:
    """If a disk copy no longer reads, the model comes from the store and is right."""
    models.add("a", 1000, seed=8)
    async with ModelCache(
        gated, device_budget=4000, disk_dir=tmp_path, disk_budget="1MiB"
    ) as cache:
        async with cache.use("a") as w:
            original = w["w"].clone()
        await cache.wait_idle()  # the copies to the disk tier
        assert cache.evict("a")
        _damage_disk_copies(tmp_path)
        async with cache.use("a") as w:
            assert w["w"].equal(original)
        assert gated.calls[("read_into", "a")] == 2


async def test_local_stores_get_no_disk_copies(tmp_path: Path) -> None:
    """Models from a local store are not copied to the disk tier (it would only duplicate)."""
    from safetensors.torch import save_file

    (tmp_path / "store" / "a").mkdir(parents=True)
    save_file({"w": torch.zeros(10)}, str(tmp_path / "store" / "a" / "model.safetensors"))
    async with ModelCache(
        f"file://{tmp_path}/store/{{model_id}}",
        device_budget=4000,
        disk_dir=tmp_path / "disk",
        disk_budget="1MiB",
    ) as cache:
        async with cache.use("a"):
            pass
        await cache.wait_idle()  # the copies to the disk tier
        assert cache.stats().tiers["disk"].entries == 0


async def test_tier_of_names_the_highest_tier_holding_a_model(
    models: MemoryModels, gated: GatedStore, tmp_path: Path
) -> None:
    """tier_of follows a model down the tiers as it is evicted, and says None for the store."""
    models.add("a", 1000, seed=7)
    models.add("b", 1000, seed=8)
    models.add("c", 1000, seed=9)
    async with ModelCache(
        gated, device_budget=1000, host_budget=1000, disk_dir=tmp_path, disk_budget="1MiB"
    ) as cache:
        assert cache.tier_of("a") is None
        async with cache.use("a"):
            assert cache.tier_of("a") == "device"
        await cache.wait_idle()  # the copies to the disk tier
        async with cache.use("b"):  # a: device -> host
            pass
        assert cache.tier_of("a") == "host"
        await cache.wait_idle()  # the copies to the disk tier
        async with cache.use("c"):  # b: device -> host, a: host -> disk
            pass
        await cache.wait_idle()
        assert (cache.tier_of("a"), cache.tier_of("b"), cache.tier_of("c")) == (
            "disk",
            "host",
            "device",
        )
        assert cache.tier_of("never-seen") is None


async def test_tier_of_says_host_while_a_promotion_is_in_flight(models: MemoryModels) -> None:
    """A model taken out of host memory for a promotion still reads as "host" until it lands."""
    models.add("a", 1000)
    models.add("b", 1000)
    async with ModelCache(models.template, device_budget=1000, host_budget=1000) as cache:
        async with cache.use("a"):
            pass
        async with anyio.create_task_group() as tg, cache.use("b"):  # a: device -> host
            assert cache.tier_of("a") == "host"
            tg.start_soon(partial(_use_once, cache, "a"))  # claims a, then waits for bytes
            await anyio.wait_all_tasks_blocked()
            assert cache.stats().loading == 1
            assert cache.resident("host") == []  # claimed out of the host index
            assert cache.tier_of("a") == "host"
        assert cache.tier_of("a") == "device"


async def _use_once(cache: ModelCache, model_id: str) -> None:
    async with cache.use(model_id):
        pass


def _gate_disk_writes(store: GatedStore) -> anyio.Event:
    """Hold every disk-tier write at its first step (the etag lookup) until the event is set."""
    gate = anyio.Event()
    etag = store.etag

    async def gated_etag(url: str, *, model_id: str) -> str | None:
        await gate.wait()
        return await etag(url, model_id=model_id)

    store.etag = gated_etag  # type: ignore[method-assign]
    return gate


async def test_disk_writes_hold_at_most_the_write_buffer(
    models: MemoryModels, gated: GatedStore, tmp_path: Path
) -> None:
    """Buffers kept alive by disk writes in flight stay within disk_write_buffer: a write that
    does not fit is skipped (not queued), and a later load from the store writes the model."""
    for i, name in enumerate("abcd"):
        models.add(name, 1000, seed=i)
    gate = _gate_disk_writes(gated)
    buffers: list[weakref.ref[torch.Tensor]] = []
    async with ModelCache(
        gated,
        device_budget=1000,
        disk_dir=tmp_path,
        disk_budget="1MiB",
        disk_write_buffer=2000,
    ) as cache:
        for name in "abcd":
            async with cache.use(name) as w:
                buffers.append(weakref.ref(w.buffer))
            await anyio.wait_all_tasks_blocked()
        gc.collect()
        assert sorted(cache._host_disk.disk_writes) == ["a", "b"]
        assert sum(ref() is not None for ref in buffers) <= 1 + 2  # d on the device, a and b
        assert cache.stats().disk_write_bytes == 2000
        gate.set()
        await cache.wait_idle()
        assert cache.stats().disk_write_bytes == 0
        assert cache.tier_of("c") is None
        async with cache.use("c"):
            pass
        await cache.wait_idle()
        disk = cache._host_disk.disk
        assert disk is not None and [m for m in "abcd" if m in disk] == ["a", "b", "c"]
        assert cache.stats().disk_writes_skipped == 2


async def test_host_budget_counts_a_promoted_block_a_disk_write_still_reads(
    models: MemoryModels, gated: GatedStore, tmp_path: Path
) -> None:
    """A host block promoted while its disk write runs stays counted in the host budget until
    the write ends: the next host load waits for it instead of failing on a full arena."""
    from .test_backend import RecordingBackend

    mib = 1 << 20
    models.add("a", 6 * mib, seed=1)
    models.add("b", 6 * mib, seed=2)
    gate = _gate_disk_writes(gated)
    async with ModelCache(
        gated,
        backend=RecordingBackend(on_host=False),
        device_budget=16 * mib,
        host_budget=8 * mib,
        disk_dir=tmp_path,
        disk_budget="64MiB",
    ) as cache:
        await cache.prefetch(["a"], tier="host")
        async with cache.use("a"):  # promoted while the write of a still reads its block
            pass
        assert cache._host_disk.arena is not None
        assert cache.stats().tiers["host"].bytes_reserved == cache._host_disk.arena.used == 6 * mib
        check_invariants(cache)
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: cache.prefetch(["b"], tier="host"))
            await anyio.wait_all_tasks_blocked()
            assert cache.resident("host") == []  # b waits for the bytes a's block holds
            check_invariants(cache)
            gate.set()
        assert cache.resident("host") == ["b"]
        assert cache.stats().tiers["host"].bytes_reserved == cache._host_disk.arena.used == 6 * mib
        await cache.wait_idle()
        check_invariants(cache)


async def test_a_disk_copy_removed_under_a_load_falls_back_to_the_store(
    models: MemoryModels, gated: GatedStore, tmp_path: Path
) -> None:
    """A disk entry deleted between its lookup and its weights' read loads from the store, and
    nothing is remembered as the model's failure."""
    models.add("a", 1000, seed=3)
    async with ModelCache(
        gated, device_budget=4000, host_budget=4000, disk_dir=tmp_path, disk_budget="1MiB"
    ) as cache:
        async with cache.use("a") as w:
            original = w["w"].clone()
        await cache.wait_idle()  # the copies to the disk tier
        assert cache.evict("a")
        cache._host_disk._evict_host(cache._host_disk.entries["a"])  # out of host memory too
        disk = cache._host_disk.disk
        assert disk is not None and cache.tier_of("a") == "disk"
        read_into = disk.store.read_into

        async def removed_first(*args: Any, **kwargs: Any) -> None:
            shutil.rmtree(tmp_path / entry_name("a"))
            await read_into(*args, **kwargs)

        disk.store.read_into = removed_first  # type: ignore[method-assign]
        async with cache.use("a") as w:
            assert w["w"].equal(original)
        assert gated.calls[("read_into", "a")] == 2
        assert cache.stats().load_failures == 0
        cache.evict("a")
        cache._host_disk._evict_host(cache._host_disk.entries["a"])
        await cache.prefetch(["a"], tier="host")  # the host path falls back the same way
        async with cache.use("a") as w:
            assert w["w"].equal(original)
        check_invariants(cache)


async def test_a_damaged_disk_entry_falls_back_and_does_not_stop_the_cache(
    models: MemoryModels, gated: GatedStore, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An entry whose manifest is a directory is dropped with a log line and the model loads
    from the store, at once and after a restart."""
    models.add("a", 1000, seed=4)
    models.add("b", 1000, seed=5)
    async with ModelCache(
        gated, device_budget=4000, disk_dir=tmp_path, disk_budget="1MiB"
    ) as cache:
        for name in "ab":
            async with cache.use(name):
                pass
        await cache.wait_idle()  # the copies to the disk tier
        assert cache.evict("a")
        for name in "ab":
            manifest = tmp_path / entry_name(name) / MANIFEST_NAME
            manifest.unlink()
            manifest.mkdir()
        with caplog.at_level(logging.WARNING, logger="modelcache"):
            async with cache.use("a") as w:
                assert w["w"].numel() == 1000
        assert "damaged" in caplog.text
        assert gated.calls[("read_into", "a")] == 2
    async with ModelCache(
        gated, device_budget=4000, disk_dir=tmp_path, disk_budget="1MiB"
    ) as cache:
        async with cache.use("b") as w:
            assert w["w"].numel() == 1000
        assert gated.calls[("read_into", "b")] == 2


async def test_startup_errors_are_typed_not_grouped(models: MemoryModels, tmp_path: Path) -> None:
    """A disk_dir that cannot be used fails `async with cache` with a StoreError naming it,
    never an ExceptionGroup; odd names in a usable disk_dir do not stop it."""
    (tmp_path / "file").write_bytes(b"x")
    cache = ModelCache(
        models.template, device_budget=4000, disk_dir=tmp_path / "file", disk_budget="1MiB"
    )
    with pytest.raises(StoreError, match="file") as info:
        async with cache:
            pass
    assert not isinstance(info.value, BaseExceptionGroup)
    (tmp_path / "ok" / ".tmp-99999999999999999999-ab-1").mkdir(parents=True)
    async with ModelCache(
        models.template, device_budget=4000, disk_dir=tmp_path / "ok", disk_budget="1MiB"
    ):
        pass
