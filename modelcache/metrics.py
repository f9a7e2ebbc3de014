"""Prometheus metrics for a `ModelCache` (``pip install 'modelcache[metrics]'``).

::

    from modelcache.metrics import CacheMetrics

    metrics = CacheMetrics(cache)  # on prometheus_client's default registry: KServe's /metrics

Design notes:

* Counters and gauges the cache already keeps (hits, misses, loads, evictions, bytes, models,
  loads in flight) are read from ``cache.stats()`` at scrape time: no second count to drift, and
  the hit path costs nothing more. They count from the cache's start.
* Histograms (load seconds, seconds waited for a load, age at eviction) and the per-model
  counters need each event: `CacheMetrics` is a `CacheObserver` and counts from the moment it is
  made - make it before ``async with cache``.
* A registry holds one collector per metric namespace, shared by every cache attached to it and
  told apart by the ``cache`` label: two collectors would write each metric family twice.
* Scrapes may run in another thread (prometheus_client's HTTP server) while the event loop
  records events: the event state is guarded by a lock, and a stats snapshot that races a
  change of the cache's dicts is taken again.
* Per-model series (``per_model=True``) are off by default: their number grows with every model
  id ever loaded or evicted. Histograms never carry a model label (one series per bucket).

prometheus_client is imported only here: ``import modelcache`` never imports it (an optional
dependency, the ``metrics`` extra).
"""

from __future__ import annotations

import re
import threading
from bisect import bisect_left
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from types import TracebackType
from typing import ClassVar, cast

from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.utils import floatToGoString

from ._cache import ModelCache
from ._exceptions import InvalidModelIdError, ModelNotFoundError, StoreError
from ._observe import CacheObserver
from ._stats import CacheStats

__all__ = ["AGE_BUCKETS", "LOAD_BUCKETS", "CacheMetrics"]

#: Buckets (seconds) of load times and of waits for a load: 1 ms to 5 min.
LOAD_BUCKETS: tuple[float, ...] = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
)
#: Buckets (seconds) of a model's age when it is evicted from a tier: 1 s to 1 week.
AGE_BUCKETS: tuple[float, ...] = (
    1.0,
    10.0,
    60.0,
    300.0,
    900.0,
    1800.0,
    3600.0,
    10800.0,
    21600.0,
    43200.0,
    86400.0,
    604800.0,
)
#: Where a load read the model from (the ``source`` label of ``load_seconds``).
SOURCES = ("host", "disk", "store")
#: Tiers whose evictions are timed (the disk tier evicts in other threads and processes).
AGE_TIERS = ("device", "host")

_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*\Z")
#: A bucket bound as Prometheus writes it ("0.005", "+Inf"), as prometheus_client's own do.
_le = cast("Callable[[float], str]", floatToGoString)


class _Histogram:
    """Bucket counts of observations; not thread-safe alone (the owner's lock guards it)."""

    __slots__ = ("_bounds", "_counts", "_sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self._bounds = tuple(bounds)
        self._counts = [0] * (len(self._bounds) + 1)  # the last one is +Inf
        self._sum = 0.0

    def observe(self, value: float) -> None:
        self._counts[bisect_left(self._bounds, value)] += 1  # le is inclusive
        self._sum += value

    def snapshot(self) -> tuple[list[tuple[str, float]], float]:
        """Cumulative ``(le, count)`` pairs ending with +Inf, and the sum."""
        buckets, total = [], 0
        for bound, count in zip((*self._bounds, float("inf")), self._counts, strict=True):
            total += count
            buckets.append((_le(bound), float(total)))
        return buckets, self._sum


class _Snapshot:
    """One cache's figures for one scrape, taken under its metrics' lock."""

    __slots__ = (
        "age",
        "evictions",
        "failures",
        "load",
        "load_seconds",
        "loads",
        "name",
        "per_model",
        "resident",
        "stats",
        "wait",
    )

    def __init__(self, metrics: CacheMetrics) -> None:
        self.name = metrics.name
        self.per_model = metrics.per_model
        self.stats = _stats(metrics.cache)
        with metrics._lock:
            self.load = {s: h.snapshot() for s, h in metrics._load.items()}
            self.wait = metrics._wait.snapshot()
            self.age = {t: h.snapshot() for t, h in metrics._age.items()}
            self.loads = dict(metrics._model_loads)
            self.failures = dict(metrics._model_failures)
            self.load_seconds = dict(metrics._model_seconds)
            self.evictions = dict(metrics._model_evictions)
        self.resident = _resident_bytes(metrics.cache) if self.per_model else {}


class CacheMetrics(CacheObserver):
    """Export ``cache``'s figures to Prometheus; registered on ``registry`` as it is made.

    ``name`` is the value of the ``cache`` label (unique per registry and namespace); metric
    names start with ``namespace`` (``modelcache_loads_total``...). ``per_model=True`` adds the
    ``{namespace}_model_*`` series labelled by model id. `unregister` detaches it (the cache and
    registry otherwise keep each other alive). The README's "Metrics" section lists the names.
    """

    def __init__(
        self,
        cache: ModelCache,
        *,
        name: str = "default",
        per_model: bool = False,
        registry: CollectorRegistry = REGISTRY,
        namespace: str = "modelcache",
    ) -> None:
        if not _NAME.match(namespace):
            raise ValueError(f"namespace {namespace!r} is not a Prometheus metric name")
        self.cache = cache
        self.name = name
        self.per_model = per_model
        self.registry = registry
        self.namespace = namespace
        self._lock = threading.Lock()
        self._load = {source: _Histogram(LOAD_BUCKETS) for source in SOURCES}
        self._wait = _Histogram(LOAD_BUCKETS)
        self._age = {tier: _Histogram(AGE_BUCKETS) for tier in AGE_TIERS}
        self._model_loads: Counter[str] = Counter()
        self._model_failures: Counter[str] = Counter()
        self._model_seconds: defaultdict[str, float] = defaultdict(float)
        self._model_evictions: Counter[tuple[str, str]] = Counter()
        self._collector = _Collector.attach(registry, namespace, self)
        try:
            cache.add_observer(self)
        except BaseException:
            self._collector.detach(self)
            raise
        self._registered = True

    def unregister(self) -> None:
        """Stop observing the cache and leave the registry (idempotent)."""
        if self._registered:
            self._registered = False
            self.cache.remove_observer(self)
            self._collector.detach(self)

    def __enter__(self) -> CacheMetrics:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.unregister()

    def __repr__(self) -> str:
        state = "registered" if self._registered else "unregistered"
        return f"<CacheMetrics {self.name!r} {self.namespace}_* {state}>"

    # -- CacheObserver: called on the event loop's thread -----------------------------------

    def load_finished(self, model_id: str, source: str, nbytes: int, seconds: float) -> None:
        with self._lock:
            self._load[source].observe(seconds)
            if self.per_model:
                self._model_loads[model_id] += 1
                self._model_seconds[model_id] += seconds

    def load_failed(self, model_id: str, error: BaseException) -> None:
        # Per model, only ids known to exist: anyone can ask for a million ids that do not. A
        # store error says nothing of existence (S3 without ListBucket answers 403, not 404, for
        # a missing key), so it is labelled only for an id that has loaded before; format and
        # build errors come after the store served the file.
        if not self.per_model or isinstance(error, ModelNotFoundError | InvalidModelIdError):
            return
        with self._lock:
            if not isinstance(error, StoreError) or model_id in self._model_loads:
                self._model_failures[model_id] += 1

    def waited(self, model_id: str, seconds: float) -> None:
        with self._lock:
            self._wait.observe(seconds)

    def evicted(self, model_id: str, tier: str, nbytes: int, age_seconds: float) -> None:
        with self._lock:
            self._age[tier].observe(age_seconds)
            if self.per_model:
                self._model_evictions[(model_id, tier)] += 1


def _stats(cache: ModelCache) -> CacheStats:
    """``cache.stats()``, from any thread: retried if the loop changed a dict it was reading."""
    for _ in range(99):
        try:
            return cache.stats()
        except RuntimeError:  # "dictionary changed size during iteration"
            continue
    return cache.stats()


def _resident_bytes(cache: ModelCache) -> dict[tuple[str, str], int]:
    """Bytes per (model id, tier) resident on the device and in host memory."""
    resident: defaultdict[tuple[str, str], int] = defaultdict(int)
    for entry in list(cache._entries.values()):  # list(): one step, safe against the loop thread
        if entry.ready:
            resident[(entry.model_id, "device")] += entry.nbytes
    for host in list(cache._host_disk.entries.values()):
        resident[(host.model_id, "host")] += host.nbytes
    return dict(resident)


class _Collector:
    """The one collector of a (registry, namespace): every attached cache's series."""

    _instances: ClassVar[dict[tuple[CollectorRegistry, str], _Collector]] = {}
    _instances_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, registry: CollectorRegistry, namespace: str) -> None:
        self.registry = registry
        self.namespace = namespace
        self.members: tuple[CacheMetrics, ...] = ()

    @classmethod
    def attach(
        cls, registry: CollectorRegistry, namespace: str, metrics: CacheMetrics
    ) -> _Collector:
        with cls._instances_lock:
            collector = cls._instances.get((registry, namespace))
            if collector is None:
                collector = cls(registry, namespace)
                registry.register(collector)  # DuplicateTimeseries if the names are taken
                cls._instances[(registry, namespace)] = collector
            elif any(m.name == metrics.name for m in collector.members):
                raise ValueError(
                    f"a cache named {metrics.name!r} already reports {namespace}_* metrics to "
                    "this registry: give each cache its own name="
                )
            collector.members = (*collector.members, metrics)
            return collector

    def detach(self, metrics: CacheMetrics) -> None:
        with self._instances_lock:
            self.members = tuple(m for m in self.members if m is not metrics)
            if not self.members:
                del self._instances[(self.registry, self.namespace)]
                self.registry.unregister(self)

    def describe(self) -> list[Metric]:
        """Every family this collector may write (empty), so the registry can refuse clashes."""
        return list(self._families([]))

    def collect(self) -> Iterator[Metric]:
        return self._families([_Snapshot(m) for m in self.members])

    def _families(self, snaps: list[_Snapshot]) -> Iterator[Metric]:
        ns = self.namespace

        def counter(name: str, doc: str, labels: Sequence[str]) -> CounterMetricFamily:
            return CounterMetricFamily(f"{ns}_{name}", doc, labels=["cache", *labels])

        def gauge(name: str, doc: str, labels: Sequence[str]) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"{ns}_{name}", doc, labels=["cache", *labels])

        def family(
            kind: str, name: str, doc: str, labels: Sequence[str]
        ) -> CounterMetricFamily | GaugeMetricFamily:
            return (counter if kind == "counter" else gauge)(name, doc, labels)

        def histogram(name: str, doc: str, labels: Sequence[str]) -> HistogramMetricFamily:
            return HistogramMetricFamily(f"{ns}_{name}", doc, labels=["cache", *labels])

        # -- from cache.stats(), per tier ----------------------------------------------------
        per_tier = (
            ("counter", "hits", "Lookups that found the model in the tier (device: use() calls "
             "served by a resident model; host, disk: loads served from the tier).", "hits"),
            ("counter", "misses", "Lookups that did not find the model in the tier (device: use() "
             "calls that started or joined a load; host, disk: loads that looked there first).",
             "misses"),
            ("counter", "evictions", "Models that left the tier to make room or by evict() "
             "(moved down or dropped).", "evictions"),
            ("counter", "demotions", "Models that moved into the tier from the tier above.",
             "demotions"),
            ("counter", "promotions", "Models that moved up out of the tier.", "promotions"),
            ("gauge", "resident_bytes", "Bytes of the models resident in the tier.", "bytes"),
            ("gauge", "reserved_bytes", "Bytes counted against the tier's budget: resident, "
             "granted to loads in flight, and being copied out.", "bytes_reserved"),
            ("gauge", "budget_bytes", "The tier's byte budget.", "budget"),
            ("gauge", "models", "Models resident in the tier.", "entries"),
        )  # fmt: skip
        for kind, name, doc, field in per_tier:
            tiers = family(kind, name, doc, ["tier"])
            for snap in snaps:
                for tier, tier_stats in snap.stats.tiers.items():
                    tiers.add_metric([snap.name, tier], getattr(tier_stats, field))
            yield tiers

        # -- from cache.stats(), whole cache -------------------------------------------------
        whole: tuple[tuple[str, str, str, Callable[[CacheStats], float]], ...] = (
            ("counter", "loads", "Loads that made a model resident on the device.",
             lambda s: s.loads),
            ("counter", "load_failures", "Loads that failed (each reached all its waiters).",
             lambda s: s.load_failures),
            ("counter", "fast_failures", "use() calls refused at once with the remembered error "
             "of a recent failed load (failure_ttl).", lambda s: s.failures - s.load_failures),
            ("gauge", "loads_in_flight", "Loads in flight (headers, waiting for bytes, reading, "
             "building).", lambda s: s.loading),
            ("gauge", "load_waiters", "Tasks waiting in use() for a load to end.",
             lambda s: s.waiters),
            ("gauge", "leases", "Leases held (async with cache.use(...) blocks open).",
             lambda s: s.leased),
            ("counter", "revalidations", "Checks of a model's version against the store "
             "(background after revalidate_after, refresh(), disk copies).",
             lambda s: s.revalidations),
            ("counter", "version_changes", "Checks that found a new version in the store.",
             lambda s: s.versions_changed),
            ("counter", "version_swaps", "New versions swapped in for resident models.",
             lambda s: s.swaps),
            ("counter", "stale_serves", "Disk copies served unchecked because the store could "
             "not be asked (stale-if-error).", lambda s: s.stale_serves),
        )  # fmt: skip
        for kind, name, doc, read in whole:
            cache = family(kind, name, doc, [])
            for snap in snaps:
                cache.add_metric([snap.name], read(snap.stats))
            yield cache

        # -- from events ---------------------------------------------------------------------
        load = histogram(
            "load_seconds",
            "Seconds from the start of a load to its model being ready on the device, by the "
            "tier it was read from (host, disk, store).",
            ["source"],
        )
        wait = histogram(
            "load_wait_seconds", "Seconds a use() (or device prefetch) waited for a load.", []
        )
        age = histogram(
            "eviction_age_seconds",
            "Seconds a model had been in the tier (device, host) when it was evicted.",
            ["tier"],
        )
        for snap in snaps:
            for source, (buckets, total) in snap.load.items():
                load.add_metric([snap.name, source], buckets, total)
            wait.add_metric([snap.name], *snap.wait)
            for tier, (buckets, total) in snap.age.items():
                age.add_metric([snap.name, tier], buckets, total)
        yield from (load, wait, age)

        # -- per model (per_model=True) ------------------------------------------------------
        if snaps and not any(snap.per_model for snap in snaps):
            return
        model_loads = counter("model_loads", "Loads of the model onto the device.", ["model"])
        model_failures = counter("model_load_failures", "Failed loads of the model.", ["model"])
        model_seconds = counter(
            "model_load_seconds", "Seconds spent in the model's loads that succeeded.", ["model"]
        )
        model_evictions = counter(
            "model_evictions", "Evictions of the model from the tier.", ["model", "tier"]
        )
        model_resident = gauge(
            "model_resident_bytes", "Bytes of the model resident in the tier.", ["model", "tier"]
        )
        for snap in snaps:
            for model_id, n in snap.loads.items():
                model_loads.add_metric([snap.name, model_id], n)
            for model_id, n in snap.failures.items():
                model_failures.add_metric([snap.name, model_id], n)
            for model_id, seconds in snap.load_seconds.items():
                model_seconds.add_metric([snap.name, model_id], seconds)
            for (model_id, tier), n in snap.evictions.items():
                model_evictions.add_metric([snap.name, model_id, tier], n)
            for (model_id, tier), nbytes in snap.resident.items():
                model_resident.add_metric([snap.name, model_id, tier], nbytes)
        yield from (model_loads, model_failures, model_seconds, model_evictions, model_resident)
