"""The host tier: demotion on eviction, promotion on use, prefetch, budgets per tier."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import anyio
import pytest
import torch

from modelcache import ModelCache, ModelNotFoundError, ModelTooLargeError

from .conftest import GatedStore, MemoryModels, cache_stores, check_invariants, settle


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
    """The host tier keeps at most its budget, dropping its least recently demoted model."""
    for name in "abcd":
        models.add(name, 1000)
    async with ModelCache(models.template, device_budget=1000, host_budget=2500) as cache:
        for name in "abcd":
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


async def _settle_writes(cache: ModelCache) -> None:
    """Wait until the background copies to the disk tier are done."""
    await settle(*cache_stores(cache))
    assert not cache._lower.disk_writes


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
        await _settle_writes(cache)
        async with cache.use("b"):  # evicts a (no host tier: dropped from RAM)
            pass
        async with cache.use("a") as w:
            assert w["w"].equal(original)
        assert gated.calls[("read_into", "a")] == 1
        await _settle_writes(cache)
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
        await _settle_writes(cache)
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
        await _settle_writes(cache)
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
        await _settle_writes(cache)
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
        await _settle_writes(cache)
        async with cache.use("b"):  # a: device -> host
            pass
        assert cache.tier_of("a") == "host"
        await _settle_writes(cache)
        async with cache.use("c"):  # b: device -> host, a: host -> disk
            pass
        await settle(*cache_stores(cache))
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
