"""Model versions: captured per load, one per load, revalidated in the background, swapped in
without downtime, and checked by the disk tier (file://, memory://, the http server, SeaweedFS)."""

from __future__ import annotations

import gc
import json
import os
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import anyio.lowlevel
import pytest
import torch

from modelcache import (
    CacheClosedError,
    ModelCache,
    ModelChangedError,
    ModelNotFoundError,
    Store,
    Weights,
)
from modelcache._cache import ModelCache as _ModelCache
from modelcache._loader import read_model_info, with_config
from modelcache._versions import reading

from .conftest import MemoryModels, check_invariants, model_bytes, settle
from .safetensors_files import write_sharded

pytestmark = pytest.mark.usefixtures("count_threads")

if TYPE_CHECKING:  # imported by pytest as a plugin: importing it here first would skip rewriting
    from tests.servers import HttpServer, S3Prefix, SeaweedFS

pytest_plugins = ("tests.servers",)

NBYTES = 4096


def replace_file(path: Path, data: bytes) -> None:
    """Write ``data`` over ``path`` as a model publisher should: a new file renamed over it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(path.name + ".new")
    temp.write_bytes(data)
    os.replace(temp, path)


def first_byte_sum(weights: Any) -> int:
    """A fingerprint of a model's weights (the sum of every byte of tensor ``w``)."""
    return int(weights["w"].to(torch.int64).sum())


def fingerprint(seed: int, nbytes: int = NBYTES) -> int:
    g = torch.Generator().manual_seed(seed)
    return int(
        torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=g).to(torch.int64).sum()
    )


# -- capture and one version per load --------------------------------------------------------------


async def test_a_loaded_model_has_the_stores_version(tmp_path: Path) -> None:
    """version_of names the loaded version; it changes when the file is replaced and refreshed."""
    replace_file(tmp_path / "m" / "model.safetensors", model_bytes(NBYTES, seed=1))
    async with ModelCache(f"file://{tmp_path}/{{model_id}}", device_budget=10 * NBYTES) as cache:
        assert cache.version_of("m") is None
        async with cache.use("m"):
            pass
        v1 = cache.version_of("m")
        assert v1 is not None and len(v1) == 16
        assert await cache.refresh("m") is False
        assert cache.version_of("m") == v1
        replace_file(tmp_path / "m" / "model.safetensors", model_bytes(NBYTES, seed=2))
        assert await cache.refresh("m") is True
        assert cache.version_of("m") not in (None, v1)
        async with cache.use("m") as weights:
            assert first_byte_sum(weights) == fingerprint(2)
        stats = cache.stats()
        assert (stats.versions_changed, stats.swaps, stats.misses) == (1, 1, 1)
        check_invariants(cache)


class _ReplacingStore(Store):
    """Replaces every shard of model ``m`` with new contents once the first shard's data is read
    and before the second one's is: a publisher writing while a load is in flight."""

    def __init__(self, location: str, root: Path, new: list[dict[str, torch.Tensor]]) -> None:
        super().__init__(location)
        self.root, self.new = root, new
        self.first_read = anyio.Event()
        self.replaced = False

    async def read_into(self, url: str, offset: int, dest: memoryview, *, model_id: str) -> None:
        if url.endswith("00002-of-00002.safetensors") and not self.replaced:
            await self.first_read.wait()
            self.replaced = True
            staging = self.root / "staging"
            write_sharded(staging, self.new)
            for name in sorted(os.listdir(staging)):
                os.replace(staging / name, self.root / "m" / name)
        await super().read_into(url, offset, dest, model_id=model_id)
        if url.endswith("00001-of-00002.safetensors"):
            self.first_read.set()


def _shards(value: int) -> list[dict[str, torch.Tensor]]:
    return [{f"s{i}": torch.full((256,), value + i, dtype=torch.uint8)} for i in range(2)]


@pytest.mark.parametrize("kind", ["file", "http"])
async def test_an_object_replaced_between_two_shards_never_makes_a_mixed_model(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """A model rewritten between two shard reads of one load is loaded as the new version whole,
    never as old shard 1 + new shard 2 (file://: fstat; http: If-Match answered 412)."""
    root, url = tmp_path, f"file://{tmp_path}"
    if kind == "http":
        server: HttpServer = request.getfixturevalue("http_server")
        root, url = server.fresh_dir()
    write_sharded(root / "m", _shards(10))
    store = _ReplacingStore(f"{url}/{{model_id}}", root, _shards(100))
    async with ModelCache(store, device_budget=1 << 20) as cache, cache.use("m") as weights:
        got = {name: int(t[0]) for name, t in weights.items()}
    assert store.replaced
    assert got == {"s0": 100, "s1": 101}


def _pinned_read_fails_after_replace(store: Store, url: str, rewrite: Any) -> Any:
    async def run() -> None:
        with reading():
            size, _ = await store.read_head(url, 64, model_id="m")
            rewrite()
            with pytest.raises(ModelChangedError, match="changed in the store"):
                await store.read_into(url, 0, memoryview(bytearray(size)), model_id="m")

    return run


async def test_a_read_of_a_replaced_local_file_is_refused_within_one_load(tmp_path: Path) -> None:
    """A local file replaced after its header was read is not read as part of the same load."""
    path = tmp_path / "m" / "model.safetensors"
    replace_file(path, model_bytes(NBYTES, seed=1))
    store = Store(f"file://{tmp_path}/{{model_id}}")
    run = _pinned_read_fails_after_replace(
        store, f"file://{path}", lambda: replace_file(path, model_bytes(NBYTES, seed=2))
    )
    await run()


async def test_an_http_ranged_read_is_pinned_to_the_version_its_header_came_from(
    http_server: HttpServer,
) -> None:
    """Over http the data reads carry If-Match: another version of the file is refused."""
    root, url = http_server.fresh_dir()
    path = root / "m" / "model.safetensors"
    replace_file(path, model_bytes(NBYTES, seed=1))
    store = Store(f"{url}/{{model_id}}")
    try:
        await _pinned_read_fails_after_replace(
            store,
            f"{url}/m/model.safetensors",
            lambda: replace_file(path, model_bytes(NBYTES + 8, seed=2)),
        )()
    finally:
        await store.aclose()


async def test_an_s3_ranged_read_is_pinned_to_the_version_its_header_came_from(
    seaweedfs: SeaweedFS, s3_prefix: S3Prefix
) -> None:
    """On S3 (SeaweedFS) the data reads carry IfMatch: another version of the object is refused."""
    s3_prefix.put("m/model.safetensors", model_bytes(NBYTES, seed=1))
    store = Store(f"{s3_prefix.url}/{{model_id}}", storage_options=seaweedfs.s3_options)
    try:
        await _pinned_read_fails_after_replace(
            store,
            f"{s3_prefix.url}/m/model.safetensors",
            lambda: s3_prefix.put("m/model.safetensors", model_bytes(NBYTES, seed=2)),
        )()
    finally:
        await store.aclose()


async def test_the_config_is_read_as_part_of_the_weights_version(tmp_path: Path) -> None:
    """A model built with its config.json names the config's version in its own."""
    replace_file(tmp_path / "m" / "model.safetensors", model_bytes(NBYTES, seed=1))
    replace_file(tmp_path / "m" / "config.json", json.dumps({"a": 1}).encode())
    store = Store(f"file://{tmp_path}/{{model_id}}")
    info = await with_config(store, await read_model_info(store, "m"))
    assert info.config == {"a": 1}
    assert info.version is not None
    names = [url.rsplit("/", 1)[1] for url, _ in info.version.files]
    assert names == ["config.json", "model.safetensors"]


# -- revalidation and the swap --------------------------------------------------------------------


async def test_a_hit_past_revalidate_after_starts_one_background_check(
    models: MemoryModels,
) -> None:
    """A due hit is served at once and starts one check; hits meanwhile start no other one."""
    models.add("m", NBYTES, seed=1)
    async with ModelCache(models.template, device_budget=10 * NBYTES, revalidate_after=0) as cache:
        async with cache.use("m"):
            pass
        c: _ModelCache = cache
        for _ in range(3):
            async with cache.use("m"):  # served without awaiting the check
                assert c._revalidator.in_flight == 1
        await settle()
        assert cache.stats().revalidations == 1
        assert cache.stats().swaps == 0


async def test_wait_idle_waits_for_a_background_check_and_its_swap(
    models: MemoryModels,
) -> None:
    """A check a hit started, and the swap it starts, count as the cache's background work."""
    models.add("m", NBYTES, seed=1)
    async with ModelCache(models.template, device_budget=10 * NBYTES, revalidate_after=0) as cache:
        async with cache.use("m"):
            pass
        models.add("m", NBYTES, seed=2)  # published again: the next check finds it
        async with cache.use("m"):  # due: starts a check in the background
            assert cache.stats().background >= 1
        await cache.wait_idle()
        assert (cache.stats().swaps, cache.stats().background) == (1, 0)
        async with cache.use("m") as weights:
            assert first_byte_sum(weights) == fingerprint(2)
        check_invariants(cache)


async def test_revalidate_after_none_never_checks(models: MemoryModels) -> None:
    """With revalidate_after=None no hit ever asks the store again."""
    models.add("m", NBYTES, seed=1)
    async with ModelCache(
        models.template, device_budget=10 * NBYTES, revalidate_after=None
    ) as cache:
        for _ in range(3):
            async with cache.use("m"):
                pass
        await settle()
        assert cache.stats().revalidations == 0


async def test_old_leases_finish_on_the_old_version_whose_buffer_is_freed_after_the_last(
    models: MemoryModels,
) -> None:
    """After a swap new uses get the new version; a lease held across it keeps the old weights,
    and the old buffer is freed (and its bytes released) when that lease ends."""
    models.add("m", NBYTES, seed=1)
    async with ModelCache(
        models.template, device_budget=10 * NBYTES, revalidate_after=None
    ) as cache:
        c: _ModelCache = cache
        async with cache.use("m") as old:
            entry = next(iter(c._entries.values()))
            assert isinstance(entry.weights, Weights)
            old_buffer = weakref.ref(entry.weights.buffer)
            models.add("m", NBYTES, seed=2)
            assert await cache.refresh("m") is True
            async with cache.use("m") as new:
                assert first_byte_sum(new) == fingerprint(2)
            assert first_byte_sum(old) == fingerprint(1)
            assert cache.stats().bytes_reserved == 2 * NBYTES
            check_invariants(cache)
            del old, new, entry
        gc.collect()
        assert old_buffer() is None
        assert cache.stats().bytes_reserved == NBYTES
        check_invariants(cache)


def store_root(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> tuple[Callable[[str, bytes], None], str, dict[str, Any] | None]:
    """How to publish a file (relative name, bytes) in a fresh store of ``kind``, the URL a
    cache reads it at, and its storage options."""
    if kind == "s3":
        weed: SeaweedFS = request.getfixturevalue("seaweedfs")
        prefix: S3Prefix = request.getfixturevalue("s3_prefix")
        return prefix.put, prefix.url, weed.s3_options
    root, url = tmp_path, f"file://{tmp_path}"
    if kind == "http":
        server: HttpServer = request.getfixturevalue("http_server")
        root, url = server.fresh_dir()
    return (lambda rel, data: replace_file(root / rel, data)), url, None


@pytest.mark.parametrize("kind", ["file", "http", "s3"])
async def test_a_stream_of_uses_across_an_overwrite_sees_old_or_new_and_never_waits(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Uses running while the model is overwritten get the old or the new weights, never else;
    none waits for a load (no miss after the first); after the swap all get the new."""
    publish, url, options = store_root(kind, tmp_path, request)
    publish("m/model.safetensors", model_bytes(NBYTES, seed=1))
    old, new = fingerprint(1), fingerprint(2)
    seen: list[int] = []
    async with ModelCache(
        f"{url}/{{model_id}}",
        device_budget=10 * NBYTES,
        revalidate_after=0,
        storage_options=options,
    ) as cache:
        async with cache.use("m"):
            pass
        replaced = anyio.Event()

        async def client() -> None:
            while True:
                async with cache.use("m") as weights:
                    answer = first_byte_sum(weights)
                seen.append(answer)
                if answer == new:
                    return
                if len(seen) == 20:
                    publish("m/model.safetensors", model_bytes(NBYTES, seed=2))
                    replaced.set()
                await anyio.lowlevel.checkpoint()  # a checkpoint: let the check and the swap run

        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                for _ in range(4):
                    tg.start_soon(client)
        assert replaced.is_set()
        assert set(seen) == {old, new}
        assert cache.stats().misses == 1
        async with cache.use("m") as weights:
            assert first_byte_sum(weights) == new
        assert cache.stats().swaps == 1
        check_invariants(cache)


# -- the disk tier ------------------------------------------------------------------------------


async def _load_once(url: str, disk: Path, **kwargs: Any) -> tuple[int, Any]:
    async with ModelCache(
        f"{url}/{{model_id}}",
        device_budget=10 * NBYTES,
        disk_dir=disk,
        disk_budget="1MiB",
        **kwargs,
    ) as cache:
        async with cache.use("m") as weights:
            answer = first_byte_sum(weights)
        c: _ModelCache = cache
        with anyio.fail_after(30):
            # Its copy to the disk tier asks the server for an etag: no event marks its end.
            while c._host_disk.disk_writes:  # noqa: ASYNC110
                await anyio.sleep(0.01)
        return answer, cache.stats()


async def test_a_restart_after_the_store_changed_serves_the_new_version_not_the_disk_copy(
    http_server: HttpServer, tmp_path: Path
) -> None:
    """A disk copy whose version the store no longer has is not served after a restart."""
    root, url = http_server.fresh_dir()
    replace_file(root / "m" / "model.safetensors", model_bytes(NBYTES, seed=1))
    first, _ = await _load_once(url, tmp_path / "disk")
    assert first == fingerprint(1)
    replace_file(root / "m" / "model.safetensors", model_bytes(NBYTES, seed=2))
    second, stats = await _load_once(url, tmp_path / "disk")
    assert second == fingerprint(2)
    assert stats.versions_changed == 1
    third, stats = await _load_once(url, tmp_path / "disk")  # the new version reached the disk
    assert third == fingerprint(2)
    assert stats.tiers["disk"].hits == 1


async def test_the_disk_copy_is_served_and_counted_stale_when_the_store_is_down(
    http_server: HttpServer, tmp_path: Path
) -> None:
    """With the store unreachable, the disk copy is served (stale-if-error) and counted."""
    root, url = http_server.fresh_dir()
    replace_file(root / "m" / "model.safetensors", model_bytes(NBYTES, seed=1))
    await _load_once(url, tmp_path / "disk")
    http_server.fail(f"{url}/m/model.safetensors", None, status=503)
    store = Store(f"{url}/{{model_id}}", max_retries=0)
    async with ModelCache(
        store, device_budget=10 * NBYTES, disk_dir=tmp_path / "disk", disk_budget="1MiB"
    ) as cache:
        async with cache.use("m") as weights:
            assert first_byte_sum(weights) == fingerprint(1)
        assert cache.stats().stale_serves == 1
        assert cache.tier_of("m") == "device"


async def test_version_counters_reach_prometheus(models: MemoryModels) -> None:
    """A refresh that finds and swaps a new version is counted in stats() and in Prometheus."""
    from prometheus_client import CollectorRegistry

    from modelcache.metrics import CacheMetrics

    models.add("m", NBYTES, seed=1)
    registry = CollectorRegistry()
    cache = ModelCache(models.template, device_budget=10 * NBYTES, revalidate_after=None)
    with CacheMetrics(cache, registry=registry):
        async with cache:
            async with cache.use("m"):
                pass
            models.add("m", NBYTES, seed=2)
            assert await cache.refresh("m") is True
            assert await cache.refresh("m") is False

            def sample(name: str) -> float | None:
                return registry.get_sample_value(f"modelcache_{name}", {"cache": "default"})

            assert sample("revalidations_total") == 2
            assert sample("version_changes_total") == 1
            assert sample("version_swaps_total") == 1
            assert sample("stale_serves_total") == 0


async def test_a_new_version_evicts_other_models_never_the_leased_old_one(
    models: MemoryModels,
) -> None:
    """With room for one more model only by eviction, the new version's load evicts an unleased
    model, never the leased old version, whose lease keeps its weights."""
    models.add("a", NBYTES, seed=1)
    models.add("b", NBYTES, seed=3)
    async with ModelCache(
        models.template, device_budget=2 * NBYTES, revalidate_after=None
    ) as cache:
        async with cache.use("b"):
            pass
        async with cache.use("a") as old:
            models.add("a", NBYTES, seed=2)
            assert await cache.refresh("a") is True
            assert cache.resident() == ["a"]  # b made room; the old a is still leased
            assert first_byte_sum(old) == fingerprint(1)
            async with cache.use("a") as new:
                assert first_byte_sum(new) == fingerprint(2)
            assert cache.stats().bytes_reserved == 2 * NBYTES
            check_invariants(cache)
        assert cache.stats().bytes_reserved == NBYTES
        assert cache.stats().misses == 2  # a and b once each: no use waited for the new a
        check_invariants(cache)


# -- attacks (issue 12 hardening) ------------------------------------------------------------------


async def test_a_disk_copy_of_a_model_deleted_from_the_store_fails_as_not_found(
    http_server: HttpServer, tmp_path: Path
) -> None:
    """A disk copy whose object was deleted from the store is dropped and the use fails with
    ModelNotFoundError, as a miss would: the disk entry is released once, not twice."""
    root, url = http_server.fresh_dir()
    replace_file(root / "m" / "model.safetensors", model_bytes(NBYTES, seed=1))
    await _load_once(url, tmp_path / "disk")
    os.remove(root / "m" / "model.safetensors")
    with pytest.raises(ModelNotFoundError):
        await _load_once(url, tmp_path / "disk")
    assert not list((tmp_path / "disk").glob("*/.modelcache-entry.json"))


class _SlowAnswerStore(Store):
    """file_tag reads the store's answer at once, then delivers it only when ``gate`` opens (a
    HEAD answered before a publish, received after it)."""

    def __init__(self, location: str) -> None:
        super().__init__(location)
        self.gate: anyio.Event | None = None
        self.asked = anyio.Event()

    async def file_tag(self, url: str, *, model_id: str) -> str | None:
        tag = await super().file_tag(url, model_id=model_id)
        self.asked.set()
        if self.gate is not None:
            await self.gate.wait()
        return tag


async def test_refresh_after_a_publish_sees_it_even_while_an_older_check_is_in_flight(
    models: MemoryModels,
) -> None:
    """A refresh() called after a new version was published returns True and swaps it in, even
    when a background check that asked the store before the publish is still in flight."""
    models.add("m", NBYTES, seed=1)
    store = _SlowAnswerStore(models.template)
    async with ModelCache(store, device_budget=10 * NBYTES, revalidate_after=0) as cache:
        async with cache.use("m"):
            pass
        store.gate = anyio.Event()
        async with cache.use("m"):  # due: a background check starts; its answer is delayed
            pass
        await store.asked.wait()
        models.add("m", NBYTES, seed=2)  # published after the check was answered
        changed: list[bool] = []

        async def refresh() -> None:
            changed.append(await cache.refresh("m"))

        async with anyio.create_task_group() as tg:
            tg.start_soon(refresh)
            await anyio.wait_all_tasks_blocked()
            store.gate.set()
        assert changed == [True]
        async with cache.use("m") as weights:
            assert first_byte_sum(weights) == fingerprint(2)


class _GatedReads(Store):
    """read_into waits on ``gate`` once it is set (the weights of a load in flight)."""

    def __init__(self, location: str) -> None:
        super().__init__(location)
        self.gate: anyio.Event | None = None
        self.reading = anyio.Event()

    async def read_into(self, url: str, offset: int, dest: memoryview, *, model_id: str) -> None:
        if self.gate is not None:
            self.reading.set()
            await self.gate.wait()
        await super().read_into(url, offset, dest, model_id=model_id)


async def test_a_refresh_whose_swap_the_closing_cache_cancels_raises_cache_closed(
    models: MemoryModels,
) -> None:
    """A refresh() waiting on a swap when the cache closes raises CacheClosedError: it never
    reports a change that was not swapped in."""
    models.add("m", NBYTES, seed=1)
    store = _GatedReads(models.template)
    cache = ModelCache(store, device_budget=10 * NBYTES, revalidate_after=None)
    outcome: list[object] = []

    async def refresh() -> None:
        try:
            outcome.append(await cache.refresh("m"))
        except CacheClosedError as exc:
            outcome.append(exc)

    async with anyio.create_task_group() as tg, cache:
        async with cache.use("m"):
            pass
        models.add("m", NBYTES, seed=2)
        store.gate = anyio.Event()
        tg.start_soon(refresh)
        await store.reading.wait()  # the new version's weights are being read: close now
    assert len(outcome) == 1 and isinstance(outcome[0], CacheClosedError)


async def test_a_model_evicted_while_its_new_version_loads_is_not_served_old_after_the_swap(
    models: MemoryModels,
) -> None:
    """The old version evicted during its swap's load does not go to host memory: a use
    meanwhile loads afresh, and after refresh() returns True every use gets the new version."""
    models.add("m", NBYTES, seed=1)
    store = _GatedReads(models.template)
    async with ModelCache(
        store, device_budget=4 * NBYTES, host_budget=4 * NBYTES, revalidate_after=None
    ) as cache:
        async with cache.use("m"):
            pass
        models.add("m", NBYTES, seed=2)
        store.gate = anyio.Event()
        changed: list[bool] = []

        async def refresh() -> None:
            changed.append(await cache.refresh("m"))

        async with anyio.create_task_group() as tg:
            tg.start_soon(refresh)
            await store.reading.wait()  # the new version's weights are being read
            store.gate.set()
            store.gate = None
            assert cache.evict("m")
            assert cache.tier_of("m") is None  # not handed down to host memory
            async with cache.use("m") as weights:  # a load of its own, during the swap
                assert first_byte_sum(weights) == fingerprint(2)
        assert changed == [True]
        async with cache.use("m") as weights:
            assert first_byte_sum(weights) == fingerprint(2)
        check_invariants(cache)


def _edit_manifest(disk: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    [manifest] = disk.glob("*/.modelcache-entry.json")
    doc = json.loads(manifest.read_text())
    edit(doc)
    manifest.write_text(json.dumps(doc))


@pytest.mark.parametrize("edit", ["written_before_versions", "unreadable", "of_another_store"])
async def test_a_disk_copy_whose_version_cannot_be_checked_is_not_served_after_a_change(
    edit: str, http_server: HttpServer, tmp_path: Path
) -> None:
    """A disk entry without a usable version (an older release's manifest, a garbled field, or
    files of another store) is not served once the store is reachable: the store's is."""
    root, url = http_server.fresh_dir()
    replace_file(root / "m" / "model.safetensors", model_bytes(NBYTES, seed=1))
    await _load_once(url, tmp_path / "disk")
    other, other_url = http_server.fresh_dir()
    replace_file(other / "m" / "model.safetensors", model_bytes(NBYTES, seed=1))
    other_store = Store(f"{other_url}/{{model_id}}")
    try:
        other_tag = await other_store.etag(f"{other_url}/m/model.safetensors", model_id="m")
    finally:
        await other_store.aclose()

    def change(doc: dict[str, Any]) -> None:
        if edit == "written_before_versions":
            del doc["version"]
        elif edit == "unreadable":
            doc["version"] = {"not": "a version"}
        else:  # the disk directory was filled by a cache of another store
            doc["version"] = [[f"{other_url}/m/model.safetensors", other_tag]]

    _edit_manifest(tmp_path / "disk", change)
    replace_file(root / "m" / "model.safetensors", model_bytes(NBYTES, seed=2))
    answer, _ = await _load_once(url, tmp_path / "disk")
    assert answer == fingerprint(2)


async def test_a_disk_copy_without_a_version_is_served_stale_when_the_store_is_down(
    http_server: HttpServer, tmp_path: Path
) -> None:
    """A disk entry of an older release is still served, counted stale, when the store is down."""
    root, url = http_server.fresh_dir()
    replace_file(root / "m" / "model.safetensors", model_bytes(NBYTES, seed=1))
    await _load_once(url, tmp_path / "disk")
    _edit_manifest(tmp_path / "disk", lambda doc: doc.pop("version"))
    http_server.fail(f"{url}/m", None, status=503)
    http_server.fail(f"{url}/m/model.safetensors", None, status=503)
    store = Store(f"{url}/{{model_id}}", max_retries=0)
    async with ModelCache(
        store, device_budget=10 * NBYTES, disk_dir=tmp_path / "disk", disk_budget="1MiB"
    ) as cache:
        async with cache.use("m") as weights:
            assert first_byte_sum(weights) == fingerprint(1)
        assert cache.stats().stale_serves == 1


async def test_the_check_schedule_remembers_a_bounded_number_of_ids(
    models: MemoryModels, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ids that passed through the cache are not remembered forever by the revalidation
    schedule: beyond its bound the oldest are forgotten (and checked at their next hit)."""
    monkeypatch.setattr("modelcache._refresh._MAX_REMEMBERED", 3, raising=False)
    for i in range(6):
        models.add(f"m{i}", 64, seed=i)
    async with ModelCache(models.template, device_budget=128, revalidate_after=60) as cache:
        for i in range(6):
            async with cache.use(f"m{i}"):
                pass
        c: _ModelCache = cache
        assert list(c._revalidator._confirmed) == ["m3", "m4", "m5"]


class _FlappingStore(Store):
    """Names the same content with a new tag at every ask (per-replica ETags)."""

    asks = 0

    async def file_tag(self, url: str, *, model_id: str) -> str | None:
        self.asks += 1
        return f'"{self.asks}"'


async def test_a_store_whose_tags_change_at_every_ask_does_not_swap_at_every_check(
    models: MemoryModels,
) -> None:
    """A store naming unchanged content with a new tag each time is not taken for a new version
    at each check (a full reload per check): refresh() says unchanged and nothing is swapped."""
    models.add("m", NBYTES, seed=1)
    async with ModelCache(
        _FlappingStore(models.template), device_budget=10 * NBYTES, revalidate_after=None
    ) as cache:
        async with cache.use("m"):
            pass
        for _ in range(3):
            assert await cache.refresh("m") is False
        assert (cache.stats().swaps, cache.stats().loads) == (0, 1)


async def test_refresh_makes_the_next_disk_load_check_the_store_again(
    http_server: HttpServer, tmp_path: Path
) -> None:
    """After refresh(), a model held only by the disk tier is checked against the store at its
    next load, even within revalidate_after of its last check: a publish then refresh() (the
    KServe adapter's /load) never gets the old disk copy."""
    root, url = http_server.fresh_dir()
    replace_file(root / "m" / "model.safetensors", model_bytes(NBYTES, seed=1))
    await _load_once(url, tmp_path / "disk")
    async with ModelCache(
        f"{url}/{{model_id}}",
        device_budget=10 * NBYTES,
        disk_dir=tmp_path / "disk",
        disk_budget="1MiB",
        revalidate_after=3600,
    ) as cache:
        async with cache.use("m") as weights:  # from the disk copy, checked now
            assert first_byte_sum(weights) == fingerprint(1)
        assert cache.evict("m")
        assert cache.tier_of("m") == "disk"
        replace_file(root / "m" / "model.safetensors", model_bytes(NBYTES, seed=2))
        await cache.refresh("m")
        async with cache.use("m") as weights:
            assert first_byte_sum(weights) == fingerprint(2)


async def test_a_load_of_the_old_version_still_building_at_a_refresh_is_swapped_too(
    models: MemoryModels,
) -> None:
    """A load that read the old version before a publish and ends during refresh() (its build
    was slow) is swapped before refresh() returns True: the next use gets the new version."""
    models.add("m", NBYTES, seed=1)
    cache = ModelCache(models.template, device_budget=10 * NBYTES, revalidate_after=None)
    building, gate = anyio.Event(), anyio.Event()

    @cache.model
    class Slow:
        def __init__(self, weights: Weights) -> None:
            self.weights = weights

        @classmethod
        async def from_weights(cls, weights: Weights, info: object) -> Slow:
            building.set()
            await gate.wait()
            return cls(weights)

    changed: list[bool] = []

    async def first_use() -> None:
        async with Slow.use("m") as model:  # type: ignore[attr-defined]
            assert first_byte_sum(model.weights) == fingerprint(1)

    async def refresh() -> None:
        changed.append(await cache.refresh("m"))

    async with cache:
        async with anyio.create_task_group() as tg:
            tg.start_soon(first_use)
            await building.wait()  # every weight byte of version 1 is read
            models.add("m", NBYTES, seed=2)
            tg.start_soon(refresh)
            await anyio.wait_all_tasks_blocked()
            gate.set()  # the old version's load ends while refresh() is in flight
        assert changed == [True]
        async with Slow.use("m") as model:  # type: ignore[attr-defined]
            assert first_byte_sum(model.weights) == fingerprint(2)
        assert cache.stats().swaps == 1
        check_invariants(cache)


class _GatedEtag(Store):
    """etag (asked by a disk-tier write before it writes) waits on ``gate`` while it is set."""

    def __init__(self, location: str) -> None:
        super().__init__(location)
        self.gate: anyio.Event | None = None

    async def etag(self, url: str, *, model_id: str) -> str | None:
        if self.gate is not None:
            await self.gate.wait()
        return await super().etag(url, model_id=model_id)


async def test_a_disk_write_of_the_old_version_ending_after_a_swap_leaves_no_copy(
    models: MemoryModels, tmp_path: Path
) -> None:
    """A write of the old version to the disk tier, in flight while refresh() swaps a new one
    in, does not leave the old version on disk to be served after the swap."""
    models.add("m", NBYTES, seed=1)
    store = _GatedEtag(models.template)
    store.gate = anyio.Event()
    async with ModelCache(
        store,
        device_budget=10 * NBYTES,
        disk_dir=tmp_path / "disk",
        disk_budget=100 * NBYTES,
        revalidate_after=None,
    ) as cache:
        async with cache.use("m"):
            pass
        assert cache._host_disk.disk_writes == {"m"}  # version 1's write waits for its etag
        models.add("m", NBYTES, seed=2)
        assert await cache.refresh("m") is True
        store.gate.set()
        store.gate = None
        await cache.wait_idle()
        assert cache.evict("m")
        async with cache.use("m") as weights:
            assert first_byte_sum(weights) == fingerprint(2)
        check_invariants(cache)


async def test_a_swap_never_replaces_a_newer_version_loaded_while_it_ran(
    models: MemoryModels,
) -> None:
    """The old version evicted during a swap whose build is slow, and a newer version published
    and loaded meanwhile: the swap's (older) version does not replace it when it ends."""
    models.add("m", NBYTES, seed=1)
    cache = ModelCache(models.template, device_budget=10 * NBYTES, revalidate_after=None)
    held, building, gate = [False], anyio.Event(), anyio.Event()

    @cache.model
    class Slow:
        def __init__(self, weights: Weights) -> None:
            self.weights = weights

        @classmethod
        async def from_weights(cls, weights: Weights, info: object) -> Slow:
            if held[0]:  # the swap's build only
                held[0] = False
                building.set()
                await gate.wait()
            return cls(weights)

    async with cache:
        async with Slow.use("m"):  # type: ignore[attr-defined]
            pass
        models.add("m", NBYTES, seed=2)
        held[0] = True
        async with anyio.create_task_group() as tg:
            tg.start_soon(cache.refresh, "m")
            await building.wait()  # the swap has read version 2; its build waits
            assert cache.evict("m")
            models.add("m", NBYTES, seed=3)
            async with Slow.use("m") as model:  # type: ignore[attr-defined]
                assert first_byte_sum(model.weights) == fingerprint(3)
            gate.set()
        async with Slow.use("m") as model:  # type: ignore[attr-defined]
            assert first_byte_sum(model.weights) == fingerprint(3)
        check_invariants(cache)


def test_a_reading_scope_ends_with_its_block_even_on_an_error() -> None:
    """A `reading` scope records tags only inside its block, nested scopes pin separately, and
    an exception leaves no scope behind."""
    from modelcache._versions import expected, see

    see("u", "t0", "m")  # outside any scope: nothing is recorded
    assert expected("u") is None
    with reading() as outer:
        see("u", "t1", "m")
        with pytest.raises(KeyError), reading() as inner:
            see("u", "t2", "m")  # its own scope: no conflict with the outer one's tag
            assert expected("u") == "t2"
            raise KeyError("boom")
        assert inner == {"u": "t2"}
        assert expected("u") == "t1"
    assert outer == {"u": "t1"}
    assert expected("u") is None
