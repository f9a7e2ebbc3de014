"""modelcache.metrics: the Prometheus collector, scraped after real loads, hits and evictions."""

from __future__ import annotations

import logging
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest
from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from modelcache import (
    CacheObserver,
    ModelCache,
    ModelFormatError,
    ModelNotFoundError,
    StoreError,
    _observe,
)
from modelcache.metrics import LOAD_BUCKETS, CacheMetrics

from .conftest import GatedStore, MemoryModels, check_invariants

ROOT = Path(__file__).resolve().parent.parent


class FakeClock:
    """Stands in for `_observe.clock`: time moves only when a test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(_observe, "clock", fake)
    return fake


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, {"cache": "default", **labels})


def scrape(registry: CollectorRegistry) -> str:
    text = generate_latest(registry).decode()
    list(text_string_to_metric_families(text))  # the exposition parses
    return text


class Recorder(CacheObserver):
    """Keeps every event it is told about."""

    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []

    def load_finished(self, model_id: str, source: str, nbytes: int, seconds: float) -> None:
        self.events.append(("load_finished", model_id, source, nbytes))

    def load_failed(self, model_id: str, error: BaseException) -> None:
        self.events.append(("load_failed", model_id, type(error)))

    def waited(self, model_id: str, seconds: float) -> None:
        self.events.append(("waited", model_id))

    def evicted(self, model_id: str, tier: str, nbytes: int, age_seconds: float) -> None:
        self.events.append(("evicted", model_id, tier, nbytes))


class Broken(CacheObserver):
    """Raises from every event."""

    def load_finished(self, model_id: str, source: str, nbytes: int, seconds: float) -> None:
        raise RuntimeError("load_finished")

    def load_failed(self, model_id: str, error: BaseException) -> None:
        raise RuntimeError("load_failed")

    def waited(self, model_id: str, seconds: float) -> None:
        raise RuntimeError("waited")

    def evicted(self, model_id: str, tier: str, nbytes: int, age_seconds: float) -> None:
        raise RuntimeError("evicted")


async def use(cache: ModelCache, *ids: str) -> None:
    for model_id in ids:
        async with cache.use(model_id):
            pass


async def test_counters_and_gauges_follow_a_known_sequence(
    models: MemoryModels, registry: CollectorRegistry
) -> None:
    """Hits, misses, loads, evictions, demotions and occupancy per tier equal what happened."""
    for i in range(3):
        models.add(f"m{i}", 1000)
    cache = ModelCache(models.template, device_budget=2000, host_budget=1000)
    CacheMetrics(cache, registry=registry)
    async with cache:
        # m0, m1 load; m0 hits; m2 evicts m1 (LRU) to host; m0 hits; m1 comes back from host and
        # evicts m2, which is dropped (the host bytes are still m1's until its promotion ends).
        await use(cache, "m0", "m1", "m0", "m2", "m0", "m1")
        check_invariants(cache)
        scrape(registry)
        expected = {
            ("modelcache_hits_total", "device"): 2,
            ("modelcache_misses_total", "device"): 4,
            ("modelcache_hits_total", "host"): 1,
            ("modelcache_misses_total", "host"): 3,
            ("modelcache_evictions_total", "device"): 2,
            ("modelcache_evictions_total", "host"): 0,
            ("modelcache_demotions_total", "host"): 1,
            ("modelcache_promotions_total", "host"): 1,
            ("modelcache_resident_bytes", "device"): 2000,
            ("modelcache_reserved_bytes", "device"): 2000,
            ("modelcache_budget_bytes", "device"): 2000,
            ("modelcache_models", "device"): 2,
            ("modelcache_resident_bytes", "host"): 0,
            ("modelcache_budget_bytes", "host"): 1000,
            ("modelcache_models", "host"): 0,
        }
        got = {key: sample(registry, key[0], tier=key[1]) for key in expected}
        assert got == expected
        assert sample(registry, "modelcache_loads_total") == 4
        assert sample(registry, "modelcache_load_failures_total") == 0
        assert sample(registry, "modelcache_loads_in_flight") == 0
        assert sample(registry, "modelcache_leases") == 0
        assert sample(registry, "modelcache_load_wait_seconds_count") == 4
        counts = {
            s: sample(registry, "modelcache_load_seconds_count", source=s)
            for s in ("host", "disk", "store")
        }
        assert counts == {"host": 1, "disk": 0, "store": 3}
        total = sum(
            sample(registry, "modelcache_load_seconds_sum", source=s) or 0.0
            for s in ("host", "disk", "store")
        )
        assert total == pytest.approx(cache.stats().load_seconds, rel=1e-9)
        assert sample(registry, "modelcache_eviction_age_seconds_count", tier="device") == 2


async def test_eviction_age_is_the_time_spent_in_the_tier(
    models: MemoryModels, registry: CollectorRegistry, clock: FakeClock
) -> None:
    """The age at eviction is the clock's advance since the model entered that tier."""
    for name in "abc":
        models.add(name, 1000)
    cache = ModelCache(models.template, device_budget=1000, host_budget=1000)
    CacheMetrics(cache, registry=registry, per_model=True)
    async with cache:
        await use(cache, "a")  # on the device at 1000
        clock.now = 1030.0
        await use(cache, "b")  # a leaves the device at age 30, enters host memory
        clock.now = 1530.0
        await use(cache, "c")  # b leaves the device at age 500; a leaves host memory at 500
        check_invariants(cache)
    buckets = {
        le: sample(registry, "modelcache_eviction_age_seconds_bucket", tier="device", le=le)
        for le in ("10.0", "60.0", "300.0", "900.0", "+Inf")
    }
    assert buckets == {"10.0": 0, "60.0": 1, "300.0": 1, "900.0": 2, "+Inf": 2}
    assert sample(registry, "modelcache_eviction_age_seconds_sum", tier="device") == 530.0
    assert sample(registry, "modelcache_eviction_age_seconds_sum", tier="host") == 500.0
    assert sample(registry, "modelcache_eviction_age_seconds_count", tier="host") == 1
    evictions = {
        (m, t): sample(registry, "modelcache_model_evictions_total", model=m, tier=t)
        for m, t in (("a", "device"), ("b", "device"), ("a", "host"), ("c", "device"))
    }
    assert evictions == {
        ("a", "device"): 1,
        ("b", "device"): 1,
        ("a", "host"): 1,
        ("c", "device"): None,
    }


async def test_waits_for_a_load_are_timed_and_loads_in_flight_counted(
    models: MemoryModels, gated: GatedStore, registry: CollectorRegistry, clock: FakeClock
) -> None:
    """Each caller's wait for a shared load is observed; in-flight, waiter, lease gauges agree."""
    models.add("a", 1000)
    gated.gate("a", "read_into")
    release = anyio.Event()

    async def user() -> None:
        async with cache.use("a"):
            await release.wait()

    cache = ModelCache(gated, device_budget=4096)
    CacheMetrics(cache, registry=registry)
    async with cache, anyio.create_task_group() as tg:
        tg.start_soon(user)
        tg.start_soon(user)
        await anyio.wait_all_tasks_blocked()
        assert sample(registry, "modelcache_loads_in_flight") == 1
        assert sample(registry, "modelcache_load_waiters") == 2
        assert sample(registry, "modelcache_misses_total", tier="device") == 2
        assert sample(registry, "modelcache_load_wait_seconds_count") == 0
        clock.now += 2.5
        gated.open("a", "read_into")
        await cache.wait_idle()
        assert sample(registry, "modelcache_loads_in_flight") == 0
        assert sample(registry, "modelcache_load_waiters") == 0
        assert sample(registry, "modelcache_leases") == 2
        release.set()
    assert sample(registry, "modelcache_load_wait_seconds_count") == 2
    assert sample(registry, "modelcache_load_wait_seconds_sum") == 5.0
    assert sample(registry, "modelcache_load_wait_seconds_bucket", le="2.5") == 2  # le: <=
    assert sample(registry, "modelcache_load_wait_seconds_bucket", le="1.0") == 0
    assert sample(registry, "modelcache_leases") == 0


async def test_failed_loads_and_remembered_failures_are_counted_apart(
    models: MemoryModels, registry: CollectorRegistry
) -> None:
    """A failed load counts once as a load failure; answers from the failure memory count apart.
    Per model, only ids that exist are labelled (an unknown id is anyone's to invent)."""
    models.add("a", 100)
    models.put("broken/model.safetensors", b"not a safetensors file")
    cache = ModelCache(models.template, device_budget=1000, failure_ttl=60)
    CacheMetrics(cache, registry=registry, per_model=True)
    async with cache:
        for _ in range(3):
            with pytest.raises(ModelNotFoundError):
                await use(cache, "missing")
        with pytest.raises(ModelFormatError):
            await use(cache, "broken")
        await use(cache, "a")
        assert sample(registry, "modelcache_load_failures_total") == 2
        assert sample(registry, "modelcache_fast_failures_total") == 2
        assert sample(registry, "modelcache_loads_total") == 1
        assert sample(registry, "modelcache_model_load_failures_total", model="missing") is None
        assert sample(registry, "modelcache_model_load_failures_total", model="broken") == 1
        assert sample(registry, "modelcache_model_loads_total", model="a") == 1
        assert sample(registry, "modelcache_model_loads_total", model="missing") is None


class ForbiddingStore(GatedStore):
    """Answers a store error (as S3 without ListBucket does, 403, for a missing key) for ids in
    ``forbidden``."""

    forbidden: set[str]

    async def size(self, url: str, *, model_id: str) -> int:
        if model_id in self.forbidden:
            raise StoreError(f"403 Forbidden: {url}", model_id=model_id, path=url)
        return await super().size(url, model_id=model_id)

    async def read_range(self, url: str, start: int, end: int, *, model_id: str) -> bytes:
        if model_id in self.forbidden:
            raise StoreError(f"403 Forbidden: {url}", model_id=model_id, path=url)
        return await super().read_range(url, start, end, model_id=model_id)


async def test_store_errors_are_labelled_per_model_only_for_ids_that_have_loaded(
    models: MemoryModels, registry: CollectorRegistry
) -> None:
    """A store error for an id never loaded makes no per-model series (it may not exist: S3
    answers 403 for a missing key without ListBucket); for a model that loaded before it counts."""
    models.add("a", 100)
    store = ForbiddingStore(models.template)
    store.forbidden = {f"ghost-{i}" for i in range(5)}
    cache = ModelCache(store, device_budget=1000, failure_ttl=60)
    CacheMetrics(cache, registry=registry, per_model=True)
    async with cache:
        for i in range(5):
            with pytest.raises(StoreError):
                await use(cache, f"ghost-{i}")
        await use(cache, "a")
        assert cache.evict("a")
        store.forbidden.add("a")
        with pytest.raises(StoreError):
            await use(cache, "a")
        assert sample(registry, "modelcache_load_failures_total") == 6
        for i in range(5):
            assert (
                sample(registry, "modelcache_model_load_failures_total", model=f"ghost-{i}") is None
            )
        assert sample(registry, "modelcache_model_load_failures_total", model="a") == 1


async def test_per_model_series_are_off_by_default_and_exact_when_on(
    models: MemoryModels, registry: CollectorRegistry
) -> None:
    """Without per_model no series carries a model label; with it, each model's figures are exact."""
    models.add("a", 1000)
    models.add("b", 500)
    cache = ModelCache(models.template, device_budget=1500, host_budget=1000)
    plain = CacheMetrics(cache, registry=registry)
    async with cache:
        await use(cache, "a", "b", "a", "b")
        text = scrape(registry)
        assert "modelcache_model_" not in text
        assert 'model="' not in text
        plain.unregister()
        detailed = CacheMetrics(cache, registry=registry, per_model=True)
        cache.evict("a")  # to host memory
        await use(cache, "a")  # back from there
        text = scrape(registry)
        assert sample(registry, "modelcache_model_loads_total", model="a") == 1
        assert sample(registry, "modelcache_model_loads_total", model="b") is None  # before
        assert sample(registry, "modelcache_model_evictions_total", model="a", tier="device") == 1
        seconds = sample(registry, "modelcache_model_load_seconds_total", model="a")
        assert seconds == sample(registry, "modelcache_load_seconds_sum", source="host")
        resident = {
            (m, t): sample(registry, "modelcache_model_resident_bytes", model=m, tier=t)
            for m in "ab"
            for t in ("device", "host")
        }
        assert resident == {
            ("a", "device"): 1000,
            ("b", "device"): 500,
            ("a", "host"): None,
            ("b", "host"): None,
        }
        detailed.unregister()


async def test_a_raising_observer_never_breaks_the_cache(
    models: MemoryModels, registry: CollectorRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    """Observers that raise are logged and skipped: loads, evictions, failures and later
    observers go on."""
    models.add("a", 1000)
    models.add("b", 1000)
    cache = ModelCache(models.template, device_budget=1000, host_budget=1000)
    cache.add_observer(Broken())
    CacheMetrics(cache, registry=registry)
    with caplog.at_level(logging.ERROR, logger="modelcache"):
        async with cache:
            await use(cache, "a", "b", "a")
            with pytest.raises(ModelNotFoundError):
                await use(cache, "missing")
            check_invariants(cache)
            stats = cache.stats()
            assert (stats.loads, stats.load_failures, stats.evictions) == (3, 1, 2)
    raised = {r.args[1] for r in caplog.records if "raised" in r.msg}  # type: ignore[index]
    assert raised == {"load_finished", "load_failed", "waited", "evicted"}
    assert sample(registry, "modelcache_load_seconds_count", source="store") == 2
    assert sample(registry, "modelcache_load_seconds_count", source="host") == 1
    assert sample(registry, "modelcache_eviction_age_seconds_count", tier="device") == 2


async def test_hits_reach_no_observer(models: MemoryModels) -> None:
    """The hit path calls no observer: only the load, its wait and evictions are events."""
    models.add("a", 1000)
    recorder = Recorder()
    cache = ModelCache(models.template, device_budget=1000)
    cache.add_observer(recorder)
    async with cache:
        await use(cache, "a")
        events = list(recorder.events)
        await use(cache, *["a"] * 100)
        # The load reports when it ends; its waiter, when it wakes up after that.
        assert recorder.events == events == [("load_finished", "a", "store", 1000), ("waited", "a")]
        assert cache.evict("a")
        assert recorder.events[-1] == ("evicted", "a", "device", 1000)
        cache.remove_observer(recorder)
        await use(cache, "a")
        assert len(recorder.events) == 3


def test_an_observer_is_added_once_and_removed_once(models: MemoryModels) -> None:
    """Adding an observer twice, or removing one that is not there, is a ValueError."""
    cache = ModelCache(models.template, device_budget=1000)
    recorder = Recorder()
    cache.add_observer(recorder)
    with pytest.raises(ValueError):
        cache.add_observer(recorder)
    cache.remove_observer(recorder)
    with pytest.raises(ValueError):
        cache.remove_observer(recorder)


async def test_disk_tier_loads_and_lookups_are_reported(
    models: MemoryModels, registry: CollectorRegistry, tmp_path: Path
) -> None:
    """A load from the disk tier is timed under source="disk"; disk hits, misses and writes show."""
    models.add("a", 1000)
    models.add("b", 1000)
    cache = ModelCache(models.template, device_budget=1000, disk_dir=tmp_path, disk_budget="1MiB")
    CacheMetrics(cache, registry=registry)
    async with cache:
        await use(cache, "a")
        await cache.wait_idle()
        await use(cache, "b")  # evicts a: no host tier, dropped from RAM
        await cache.wait_idle()
        await use(cache, "a")  # from the disk tier
        counts = {
            s: sample(registry, "modelcache_load_seconds_count", source=s)
            for s in ("host", "disk", "store")
        }
        assert counts == {"host": 0, "disk": 1, "store": 2}
        disk = {
            name: sample(registry, name, tier="disk")
            for name in (
                "modelcache_hits_total",
                "modelcache_misses_total",
                "modelcache_demotions_total",
                "modelcache_models",
                "modelcache_resident_bytes",
            )
        }
        assert disk == {
            "modelcache_hits_total": 1,
            "modelcache_misses_total": 2,
            "modelcache_demotions_total": 2,
            "modelcache_models": 2,
            "modelcache_resident_bytes": cache.stats().tiers["disk"].bytes,
        }


async def test_caches_share_a_registry_told_apart_by_name(
    models: MemoryModels, registry: CollectorRegistry
) -> None:
    """Two caches report under one registry with their own cache label; names are unique; leaving
    removes only one's series."""
    models.add("a", 100)
    first = ModelCache(models.template, device_budget=1000)
    second = ModelCache(models.template, device_budget=1000)
    one = CacheMetrics(first, name="one", registry=registry)
    with pytest.raises(ValueError, match="'one'"):
        CacheMetrics(second, name="one", registry=registry)
    two = CacheMetrics(second, name="two", registry=registry)
    async with first:
        await use(first, "a")
    loads = registry.get_sample_value
    assert loads("modelcache_loads_total", {"cache": "one"}) == 1
    assert loads("modelcache_loads_total", {"cache": "two"}) == 0
    assert scrape(registry).count("# TYPE modelcache_loads_total counter") == 1
    one.unregister()
    one.unregister()  # idempotent
    assert loads("modelcache_loads_total", {"cache": "one"}) is None
    assert loads("modelcache_loads_total", {"cache": "two"}) == 0
    with two:
        pass
    assert scrape(registry) == ""
    with CacheMetrics(first, name="one", registry=registry):  # attaches again after leaving
        assert loads("modelcache_loads_total", {"cache": "one"}) == 1


def test_names_taken_by_another_collector_are_refused(
    models: MemoryModels, registry: CollectorRegistry
) -> None:
    """A registry that already has a modelcache_* name refuses the collector, and nothing leaks."""
    Counter("modelcache_loads", "someone else's", registry=registry)
    cache = ModelCache(models.template, device_budget=1000)
    with pytest.raises(ValueError):
        CacheMetrics(cache, registry=registry)
    with CacheMetrics(cache, registry=registry, namespace="other"):
        assert registry.get_sample_value("other_loads_total", {"cache": "default"}) == 0
    with pytest.raises(ValueError):
        CacheMetrics(cache, registry=registry, namespace="bad-name")
    assert not cache._observers  # no CacheMetrics was left observing


def test_every_metric_name_is_documented_in_the_readme(models: MemoryModels) -> None:
    """Each exposed metric family, with its type, is in the README's Metrics section."""
    registry = CollectorRegistry()
    cache = ModelCache(models.template, device_budget=1000)
    with CacheMetrics(cache, registry=registry, per_model=True) as metrics:
        described = metrics._collector.describe()
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Metrics\n", 1)[1].split("\n## ", 1)[0]
    rows = dict(re.findall(r"^\| `(modelcache_\w+)` \| (\w+) \|", section, re.MULTILINE))
    exposed = {(m.name + "_total" if m.type == "counter" else m.name): m.type for m in described}
    assert rows == exposed


async def test_a_scrape_from_another_thread_reads_the_same_figures(
    models: MemoryModels, registry: CollectorRegistry
) -> None:
    """A scrape in a worker thread (prometheus_client's HTTP server) sees what the loop sees."""
    models.add("a", 1000)
    cache = ModelCache(models.template, device_budget=1000)
    CacheMetrics(cache, registry=registry, per_model=True)
    async with cache:
        await use(cache, "a", "a")
        here = scrape(registry)
        there = await anyio.to_thread.run_sync(scrape, registry)
        assert there == here
        assert (
            'modelcache_model_resident_bytes{cache="default",model="a",tier="device"} 1000.0'
            in here
        )


def test_load_buckets_span_1_ms_to_5_min() -> None:
    """Load and wait histograms have buckets from 1 ms to 5 minutes."""
    assert (LOAD_BUCKETS[0], LOAD_BUCKETS[-1]) == (0.001, 300.0)
    assert list(LOAD_BUCKETS) == sorted(set(LOAD_BUCKETS))


def test_importing_modelcache_never_imports_prometheus_client() -> None:
    """import modelcache (observer protocol included) leaves prometheus_client unimported."""
    code = (
        "import sys, modelcache; modelcache.CacheObserver; "
        "assert 'prometheus_client' not in sys.modules, 'prometheus_client imported'"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
