"""ModelCache: leases on models loaded once, under an exact byte budget per tier.

The device tier (built models, leased) lives here; host memory and the disk tier under it are
`LowerTiers`. Invariants (the tests check them after every step):

* The device `ByteBudget`'s ``reserved`` = bytes of resident entries + bytes granted to loads in
  flight + bytes still being copied down, and it never exceeds the budget. Bytes are reserved
  from the model's headers before any weight byte is read.
* An entry is *evictable* only when it is ready, unleased and no task is waiting to lease it.
  Eviction happens inside one synchronous planning step (`ByteBudget.try_reserve`), never across
  an await; an evicted model is handed to the lower tiers (`_demote`).
* A load that finished for waiting callers is leased by each of them before they stop counting
  as its waiters, so nothing can evict it between its load and their leases (that gap once let
  two models larger than half the budget evict each other forever, unleased).
* Fairness: when the load at the head of the line does not fit, victims are chosen for it among
  leased entries too (`ByteBudget`'s drains); a *draining* entry hands out no new lease (the hit
  path checks ``draining``): its users wait until it is evicted and then load it again, queued
  behind the load it made room for. So a waiting load gets its bytes once the leases held when
  its victims were chosen end, whatever the traffic on them.
* A load reads from the highest tier that has the model: host memory, the disk tier, the store.
* One load per key, run in the cache's task group - never in a caller's task - so cancelling a
  caller never cancels a load others share. Loads of different keys run concurrently, bounded by
  a capacity limiter that is held for I/O only, never while waiting for bytes.
* Reservations that must wait are granted strictly first-come first-served, whenever bytes free
  up (a lease ends, a load fails, a waiter leaves). A load whose callers have all gone (a device
  prefetch is a caller) stops at its next stage boundary - the wait for the load limiter (left
  at once, by cancelling ``entry.abandon``), the header read, the reservation of bytes, the
  weight read - so it never takes a limiter slot, reads, or evicts for nobody, and a backlog of
  abandoned loads costs nothing once their callers are gone.
* A failed load reaches every waiter, leaves no bytes reserved and no entry behind, and is
  remembered for ``failure_ttl`` seconds so a storm of requests for a broken model fails fast.
* The hit path (`_Lease.__aenter__` finding a ready entry) does no I/O and never awaits, so it
  is not a scheduler checkpoint: a dict lookup and three counter updates.
* All state is touched only between awaits on the event loop's thread: no locks.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from contextvars import ContextVar
from dataclasses import replace
from enum import Enum
from functools import partial
from types import MappingProxyType, TracebackType
from typing import Any, Generic, TypeVar

import anyio
import anyio.abc
import torch

from . import _observe
from ._backend import DeviceBackend, LoadedWeights, record_current_stream
from ._builders import WEIGHTS, ModelBuilder, builder_for
from ._concurrency import gather
from ._cost import LoadCosts
from ._disk import DiskEntry, DiskTier
from ._exceptions import (
    CacheClosedError,
    ModelChangedError,
    ModelFormatError,
    ModelNotFoundError,
    StoreError,
    as_model_error,
)
from ._failures import FailureMemory, for_caller, release_frames
from ._format import ModelInfo
from ._loader import read_model_info
from ._lower import LowerTiers
from ._observe import CacheObserver, Observers
from ._policy import CostAwarePolicy, EvictionPolicy, LRUPolicy, PolicyEntry
from ._pool import pool_of
from ._refresh import DEFAULT_REVALIDATE_AFTER, Revalidator
from ._refresh import _clock as _revalidation_clock
from ._sidefiles import covers
from ._stats import CacheStats
from ._store import Store
from ._tiers import Abandoned, ByteBudget, HostEntry, TierStats, check_fits
from ._torch import TorchBackend
from ._units import format_bytes, parse_bytes
from ._versions import ModelVersion

__all__ = ["ModelCache"]

logger = logging.getLogger("modelcache")
logger.addHandler(logging.NullHandler())

#: Models whose sizes `estimate_load_seconds` remembers after they leave every tier.
_MAX_REMEMBERED_SIZES = 100_000

#: Clock of the failure memory (a module attribute so tests can move time).
_clock = time.monotonic

T = TypeVar("T")
_Key = tuple[ModelBuilder, str]
#: Keys of the failure memory: a load's (builder, id), or (None, id) for `describe`'s checks.
_FailureKey = tuple[ModelBuilder | None, str]
#: Errors of a failed load that say nothing of the builder: `describe` raises them too.
_HEADER_ERRORS = (ModelNotFoundError, ModelFormatError, StoreError)


#: The leases entered in this task (and inherited by the tasks it starts): a use by a task that
#: holds a lease is served by a draining model rather than wait for it, since the drain may be
#: waiting for that very task. Entries whose lease has ended are dropped at the next enter.
_held: ContextVar[tuple[_Lease[Any], ...]] = ContextVar("modelcache_held_leases", default=())


class _State(Enum):
    NEW = "new"
    OPEN = "open"
    CLOSING = "closing"
    CLOSED = "closed"


class _Entry:
    """One model id (for one builder) on the device: loading, then ready until evicted."""

    __slots__ = (
        "abandon",
        "admitted",
        "builder",
        "check_at",
        "done",
        "draining",
        "error",
        "info",
        "key",
        "leases",
        "model_id",
        "nbytes",
        "ready",
        "replaces",
        "reserved",
        "retired",
        "source",
        "value",
        "waiters",
        "weights",
    )

    def __init__(self, key: _Key) -> None:
        self.key = key
        self.builder, self.model_id = key
        self.ready = False
        self.value: Any = None
        self.weights: LoadedWeights | None = None
        self.nbytes = 0
        self.info: ModelInfo | None = None  # the headers, once the load has read them
        self.reserved = False  # True once nbytes are counted in the device budget
        self.source: str | None = None  # the tier a load in flight reads from, once known
        self.leases = 0
        self.waiters = 0
        self.done = anyio.Event()
        self.error: BaseException | None = None
        self.admitted = 0.0  # when it became ready (`_observe.clock`), for the age at eviction
        #: Set while it is a victim chosen for a waiting load: new leases wait on it (it is set,
        #: and cleared, when the entry is evicted or no longer needed as a victim).
        self.draining: anyio.Event | None = None
        #: The load's wait for the limiter, cancelled when its last waiter leaves.
        self.abandon: anyio.CancelScope | None = None
        # -- versions (issue 12)
        #: When a hit starts a background check of its version (`Revalidator`).
        self.check_at = math.inf
        #: The entry this load of a new version takes the place of when it is ready.
        self.replaces: _Entry | None = None
        #: Replaced by a new version: out of the index, its bytes freed by its last lease.
        self.retired = False


class _Check:
    """One read of a model's headers for `describe`, shared by its concurrent callers."""

    __slots__ = ("done", "error", "info", "scope", "waiters")

    def __init__(self) -> None:
        self.done = anyio.Event()
        self.info: ModelInfo | None = None
        self.error: BaseException | None = None
        self.scope = anyio.CancelScope()  # cancelled when its last caller leaves
        self.waiters = 0


class _Lease(Generic[T]):
    """``async with cache.use(model_id) as model``: the model stays resident inside the block."""

    __slots__ = ("_cache", "_entry", "_key")

    def __init__(self, cache: ModelCache, key: _Key) -> None:
        self._cache = cache
        self._key = key
        self._entry: _Entry | None = None

    async def __aenter__(self) -> T:
        if self._entry is not None:
            raise RuntimeError("a lease is entered once; call cache.use() again")
        cache = self._cache
        entry = cache._entries.get(self._key)
        if (
            entry is not None
            and entry.ready
            and entry.draining is None
            and cache._state is _State.OPEN
        ):
            # The hit path: no await, no I/O.
            entry.leases += 1
            cache._leased += 1
            cache._hits += 1
            cache._policy.accessed(entry)
            if entry.check_at <= _revalidation_clock():  # stale-while-revalidate
                entry.check_at = cache._revalidator.due(entry.model_id)
        else:
            entry = await cache._acquire(self._key)
        self._entry = entry
        held = _held.get()
        if held:  # nested (or an earlier lease was left out of order): drop the ended ones
            _held.set((*[lease for lease in held if lease._entry is not None], self))
        else:
            _held.set((self,))
        return entry.value  # type: ignore[no-any-return]

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        entry, self._entry = self._entry, None
        if entry is not None:
            cache = self._cache
            if entry.weights is not None and not cache._backend.on_host:
                # Kernels the caller queued on a stream of its own may still read the weights:
                # their memory is not reused (after an eviction) before that work has run.
                record_current_stream(entry.weights)
            cache._unlease(entry)
            held = _held.get()
            if held and held[-1] is self:  # the usual, last-in first-out exit
                _held.set(held[:-1])


class _BoundUse:
    """``Cls.use(model_id)`` on a class decorated with ``@cache.model``."""

    __slots__ = ("_builder", "_cache")

    def __init__(self, cache: ModelCache, builder: ModelBuilder) -> None:
        self._cache = cache
        self._builder = builder

    def __call__(self, model_id: str) -> _Lease[Any]:
        return self._cache._lease(model_id, self._builder)


class ModelCache:
    """Serve any model id in a store, keeping the most useful ones resident within byte budgets.

    ::

        cache = ModelCache("s3://bucket/models/{model_id}/", device="cuda:0",
                           device_budget="40GiB", host_budget="200GiB")

        async with cache:
            async with cache.use("tenant-42") as model:
                ...

    ``store`` is a URL template with ``{model_id}``, a resolver ``id -> URL``, or a `Store`.
    Without a bound model class, ``use()`` yields the model's `Weights` (name -> tensor views).
    With a ``host_budget``, models evicted from the device move to host memory (pinned on CUDA)
    and come back from there with one copy instead of a download.

    ``zero_copy=True`` maps local files instead of copying them: only for stores whose files
    never change in place (see `TorchBackend`).

    ``backend`` replaces the default ``TorchBackend(device, zero_copy=zero_copy)`` with any
    `DeviceBackend` (such as ``CupyBackend(0)``); ``device`` and ``zero_copy`` then stay unset.

    ``policy`` picks device victims (default: a `CostAwarePolicy` priced by this cache's learned
    load costs; `LRUPolicy` for byte-LRU); ``host_policy`` the host tier's (default: the same
    kind, sharing the device policy's access history). ``load_costs`` seeds the per-tier
    bandwidth estimates (`LoadCosts`) that the cache then learns from its own loads.
    """

    def __init__(
        self,
        store: str | Callable[[str], str] | Store,
        *,
        device: str | torch.device = "cpu",
        device_budget: int | str,
        host_budget: int | str = 0,
        disk_dir: str | os.PathLike[str] | None = None,
        disk_budget: int | str | None = None,
        disk_write_buffer: int | str = "1GiB",
        max_concurrent_loads: int = 4,
        failure_ttl: float = 5.0,
        storage_options: dict[str, Any] | None = None,
        allow_slash_in_ids: bool = False,
        zero_copy: bool | None = None,
        policy: EvictionPolicy | None = None,
        backend: DeviceBackend | None = None,
        host_policy: EvictionPolicy | None = None,
        load_costs: LoadCosts | None = None,
        revalidate_after: float | None = DEFAULT_REVALIDATE_AFTER,
    ) -> None:
        if isinstance(store, Store):
            if storage_options is not None or allow_slash_in_ids:
                raise TypeError("pass storage_options and allow_slash_in_ids to the Store itself")
            self._store = store
        else:
            self._store = Store(
                store, storage_options=storage_options, allow_slash_in_ids=allow_slash_in_ids
            )
        if max_concurrent_loads < 1:
            raise ValueError(f"max_concurrent_loads must be at least 1, got {max_concurrent_loads}")
        if not failure_ttl >= 0:  # also refuses NaN, which would reach the sweeper's sleep
            raise ValueError(f"failure_ttl must be a number >= 0, got {failure_ttl}")
        if backend is None:
            backend = TorchBackend(device, zero_copy=bool(zero_copy))  # default: copy
        elif str(device) != "cpu" or zero_copy is not None:
            raise TypeError("pass device and zero_copy to the backend itself")
        self._backend: DeviceBackend = backend
        self._device = ByteBudget(
            "device",
            parse_bytes(device_budget, name="device_budget"),
            evictable=self._evictable,
            evict=self._demote,
            policy=policy if policy is not None else CostAwarePolicy(),
            drainable=self._drainable,
            drain=self._start_draining,
            undrain=self._stop_draining,
        )
        self._policy = self._device.policy  # read on the hit path
        disk: DiskTier | None = None
        if disk_dir is not None and disk_budget is not None:
            disk = DiskTier(disk_dir, disk_budget)
        elif disk_dir is not None or disk_budget is not None:
            raise ValueError("disk_dir and disk_budget go together")
        self._observers = Observers()
        self._lower = LowerTiers(
            self._store,
            self._backend,
            parse_bytes(host_budget, name="host_budget"),
            disk,
            self._observers,
            policy=self._host_policy_for(host_policy),
            costs=load_costs,
            write_behind=parse_bytes(disk_write_buffer, name="disk_write_buffer"),
        )
        #: Load timings per source tier, learned from this cache's own loads.
        self._costs = self._lower.costs
        #: Sizes of models this cache has read headers of (for `estimate_load_seconds`).
        self._sizes: OrderedDict[str, int] = OrderedDict()
        if isinstance(self._policy, CostAwarePolicy):
            self._policy.bind_cost(self._device_miss_cost)
        if isinstance(self._lower.host.policy, CostAwarePolicy):
            self._lower.host.policy.bind_cost(self._host_miss_cost)
        self._max_concurrent_loads = max_concurrent_loads
        self._builders: list[ModelBuilder] = []

        self._state = _State.NEW
        self._task_group: anyio.abc.TaskGroup | None = None
        self._limiter: anyio.CapacityLimiter | None = None
        self._entries: dict[_Key, _Entry] = {}
        #: Errors of recent failed loads and header checks, for ``failure_ttl`` seconds.
        self._failures: FailureMemory[_FailureKey] = FailureMemory(failure_ttl, lambda: _clock())
        #: `describe`'s header reads in flight, by model id.
        self._checks: dict[str, _Check] = {}
        # -- versions (issue 12)
        self._revalidator = Revalidator(self._store, revalidate_after)
        self._lower.validate_disk = self._revalidator.validate_disk
        #: Loads of new versions in flight (out of the index until they replace the old one).
        self._swapping: dict[_Key, _Entry] = {}
        #: Replaced entries still leased: their bytes are freed when their last lease ends.
        self._retired: set[_Entry] = set()
        self._swaps = 0
        self._hits = self._misses = self._loads = self._fails = self._load_failures = 0
        self._loading = self._waiters = self._leased = 0
        self._load_seconds = 0.0

    # -- binding model classes ---------------------------------------------------------------

    def model(self, target: type[T]) -> type[T]:
        """Class decorator: models served by this cache are built by ``target``.

        ``target`` has a ``from_weights(weights, info)`` classmethod (sync or async), or is a
        ``torch.nn.Module`` subclass, built as ``target(**config)`` on the meta device with the
        weights assigned as its parameters. The class gains ``target.use(model_id)``.
        """
        if "use" in vars(target):
            raise TypeError(f"{target.__qualname__} already defines 'use'; it cannot be bound")
        builder = builder_for(target)
        self._builders.append(builder)
        target.use = _BoundUse(self, builder)  # type: ignore[attr-defined]
        return target

    # -- public API ---------------------------------------------------------------------------

    @property
    def store(self) -> Store:
        return self._store

    @property
    def device(self) -> torch.device:
        return self._backend.device

    def use(self, model_id: str, *, model: type | None = None) -> _Lease[Any]:
        """Lease the model ``model_id``: ``async with cache.use(id) as model: ...``.

        Loads it on first use; a resident model is handed out in microseconds. ``model`` picks
        the bound class when several are bound (``Cls.use(id)`` does the same).
        """
        return self._lease(model_id, self._builder(model))

    async def prefetch(
        self, model_ids: Iterable[str], *, tier: str = "device", model: type | None = None
    ) -> None:
        """Warm a tier with ``model_ids`` without leasing them.

        ``tier="device"`` loads and builds each model as ``use()`` would (sharing its load with
        concurrent uses) and leaves it unleased; ``tier="host"`` reads the weights into host
        memory only (a model already on the device is left there). The loads run in the cache's
        task group; all are awaited, then the first failure, if any, is raised.
        """
        self._check_open()
        if tier == "device":
            builder = self._builder(model)
            calls = [partial(self._prefetch_device, (builder, i)) for i in model_ids]
        elif tier == "host":
            if self._lower.host.budget == 0:
                raise ValueError("prefetch(tier='host') needs a host_budget")
            calls = [partial(self._prefetch_host, i) for i in model_ids]
        else:
            raise ValueError(f"tier must be 'device' or 'host', not {tier!r}")
        errors: list[Exception] = []

        async def run(call: Callable[[], Awaitable[None]]) -> None:
            try:
                await call()
            except Exception as exc:
                errors.append(exc)

        await gather([partial(run, call) for call in calls])
        if errors:
            raise errors[0]

    def evict(self, model_id: str, *, model: type | None = None) -> bool:
        """Move ``model_id`` off the device (to host memory when it fits there) if it is resident
        and unleased; True if it left the device."""
        entry = self._entries.get((self._builder(model), model_id))
        if entry is None or not self._evictable(entry):
            return False
        self._demote(entry)
        self._device.pump()
        return True

    def resident(self, tier: str = "device") -> list[str]:
        """Ids of the models resident in ``tier`` ("device", "host" or "disk"), for routers."""
        if tier == "host":
            return list(self._lower.entries)
        if tier == "disk":
            # The disk tier's index (no I/O): a copy this cache may load instead of the store's.
            return self._lower.disk.ids() if self._lower.disk is not None else []
        return [entry.model_id for entry in self._entries.values() if entry.ready]

    def estimate_load_seconds(
        self, model_id: str, *, nbytes: int | None = None, model: type | None = None
    ) -> float | None:
        """Estimated seconds before ``use(model_id)`` could hand the model out, from the tier
        it sits in now: 0.0 on the device; else a fixed latency plus its size over the
        bandwidth this cache has measured for that tier ("host", "disk", "store"). For a model
        in no tier, its size must be known: from an earlier load by this cache, or ``nbytes``;
        None when it is not. No I/O; for routers choosing the replica where a request is
        cheapest. Builds (``from_weights``) are not included."""
        tier = self.tier_of(model_id, model=model)
        if tier == "device":
            return 0.0
        if tier == "host":
            return self._costs.seconds("host", self._lower.entries[model_id].nbytes)
        size = self._sizes.get(model_id, nbytes)
        if size is None:
            return None
        return self._costs.seconds("disk" if tier == "disk" else "store", size)

    @property
    def load_costs(self) -> LoadCosts:
        """The per-tier load bandwidths this cache has learned (`LoadCosts`)."""
        return self._costs

    def tier_of(self, model_id: str, *, model: type | None = None) -> str | None:
        """The highest tier holding ``model_id`` ready to serve: "device", "host", "disk", or
        None (a request would read it from the store). A model being promoted from host memory
        counts as "host" until it is on the device; one chosen as a victim for a waiting load
        (new uses wait for it to leave, then load it again) is not "device" any more. No I/O;
        for routers and logs."""
        entry = self._entries.get((self._builder(model), model_id))
        if entry is not None:
            if entry.ready and entry.draining is None:
                return "device"
            if entry.source == "host":
                return "host"
        if model_id in self._lower.entries:
            return "host"
        disk = self._lower.disk
        if disk is not None and model_id in disk:
            return "disk"
        return None

    def is_bound(self, model: type) -> bool:
        """Whether ``model`` was bound to this cache with `model` (``@cache.model``)."""
        bound = vars(model).get("use")
        return isinstance(bound, _BoundUse) and bound._cache is self

    async def describe(self, model_id: str) -> ModelInfo:
        """The model's `ModelInfo` (tensors, size, shards) without loading its weights: from
        the device or host tier when it is there, or a load in flight that has read them, else
        its safetensors headers (a few KiB of reads). Raises as a load would:
        InvalidModelIdError, ModelNotFoundError, StoreError, ModelFormatError, CacheClosedError.
        Servers use it to tell an unknown id (404) before a load starts.

        Concurrent calls for one id share one read, run in the cache's task group: a caller
        cancelled (``anyio.fail_after``) leaves it to the others, and the read is dropped when
        its last caller leaves. Its errors are remembered for ``failure_ttl`` seconds, as are
        the header errors of failed loads (not found, invalid, store errors)."""
        self._store.model_url(model_id)  # validates the id
        while True:
            self._check_open()
            info = self._known_info(model_id)
            if info is not None:
                return info
            error = self._recent_header_error(model_id)
            if error is not None:
                raise for_caller(error)  # remembered: a copy, so it keeps no caller's frames
            check = self._checks.get(model_id)
            if check is None:
                check = self._start_check(model_id)
            check.waiters += 1
            try:
                await check.done.wait()
            finally:
                check.waiters -= 1
                if check.waiters == 0 and not check.done.is_set():
                    # Nobody wants the answer any more: drop the read rather than leave it
                    # behind on a stalled store, and let the next caller start afresh.
                    check.scope.cancel()
                    if self._checks.get(model_id) is check:
                        del self._checks[model_id]
            if check.error is not None:
                raise for_caller(check.error)  # shared: each caller raises its own copy
            if check.info is not None:
                return check.info
            # The read was dropped (the cache is closing): look again.

    def _known_info(self, model_id: str) -> ModelInfo | None:
        """``model_id``'s headers if a tier holds the model or a load has read them: no I/O."""
        for builder in (*self._builders, WEIGHTS):
            entry = self._entries.get((builder, model_id))
            if entry is not None:
                if entry.weights is not None:
                    return entry.weights.info
                if entry.info is not None:
                    return entry.info
        host = self._lower.entries.get(model_id)
        if host is not None:
            info: ModelInfo = host.info
            return info
        return None

    def _recent_header_error(self, model_id: str) -> BaseException | None:
        """A remembered error that any load of ``model_id`` would meet again: a failed header
        check, or a failed load's missing, invalid or unreadable files (not a build error)."""
        error = self._failures.recent((None, model_id))
        if error is not None:
            return error
        for builder in (*self._builders, WEIGHTS):
            error = self._failures.recent((builder, model_id))
            if isinstance(error, _HEADER_ERRORS):
                return error
        return None

    def _start_check(self, model_id: str) -> _Check:
        assert self._task_group is not None
        check = self._checks[model_id] = _Check()
        self._task_group.start_soon(
            self._check, model_id, check, name=f"modelcache describe {model_id!r}"
        )
        return check

    async def _check(self, model_id: str, check: _Check) -> None:
        """Read ``model_id``'s headers for `describe`'s callers (in the cache's task group)."""
        try:
            with check.scope:
                check.info = await read_model_info(self._store, model_id)
        except Exception as exc:
            error = as_model_error(exc, model_id)
            release_frames(error)
            check.error = error
            if self._state is _State.OPEN:
                self._failures.remember((None, model_id), error)
        finally:
            if self._checks.get(model_id) is check:
                del self._checks[model_id]
            check.done.set()

    def add_observer(self, observer: CacheObserver) -> None:
        """Report loads, failures, waits and evictions to ``observer`` as they happen
        (`CacheObserver`; never called on the hit path). ValueError if it already observes."""
        self._observers.add(observer)

    def remove_observer(self, observer: CacheObserver) -> None:
        """Stop reporting to ``observer``; ValueError if it does not observe this cache."""
        self._observers.remove(observer)

    def stats(self) -> CacheStats:
        device = self._device
        models = sum(1 for e in self._entries.values() if e.ready)
        return CacheStats(
            hits=self._hits,
            misses=self._misses,
            loads=self._loads,
            failures=self._fails,
            load_failures=self._load_failures,
            evictions=device.evictions,
            bytes_resident=device.resident,
            bytes_reserved=device.reserved,
            bytes_budget=device.budget,
            models=models,
            loading=self._loading,
            waiters=self._waiters,
            leased=self._leased,
            load_seconds=self._load_seconds,
            tiers=MappingProxyType(self._tier_stats(models)),
            disk_write_bytes=self._lower.writing,
            disk_writes_skipped=self._lower.writes_skipped,
            pool_idle_bytes=pool.stats().idle_bytes if (pool := pool_of(self._backend)) else 0,
            revalidations=self._revalidator.revalidations,
            versions_changed=self._revalidator.changes,
            swaps=self._swaps,
            stale_serves=self._revalidator.stale_serves,
        )

    def _tier_stats(self, models: int) -> dict[str, TierStats]:
        device = replace(self._device.stats(models), hits=self._hits, misses=self._misses)
        return {"device": device, **self._lower.stats()}

    def __repr__(self) -> str:
        return f"<ModelCache {self._state.value} {self._store!r} on {self.device}: {self.stats()}>"

    # -- lifecycle ----------------------------------------------------------------------------

    async def __aenter__(self) -> ModelCache:
        if self._state is not _State.NEW:
            raise CacheClosedError(f"a ModelCache is entered once; this one is {self._state.value}")
        self._limiter = anyio.CapacityLimiter(self._max_concurrent_loads)
        task_group = anyio.create_task_group()
        await task_group.__aenter__()
        self._task_group = task_group
        self._failures.open(task_group)
        self._revalidator.open(task_group, self._resident_version, self._swap_versions)
        try:
            await self._lower.open(task_group, self._limiter)
        except BaseException:
            # No task has started: the group exits quietly and the typed error (a StoreError
            # naming the disk directory...) propagates as it was raised, not in a group.
            task_group.cancel_scope.cancel()
            await task_group.__aexit__(None, None, None)
            raise
        if (pool := pool_of(self._backend)) is not None:  # CPU buffers: what the budgets allow
            pool.limit = self._device.budget + self._lower.host.budget
        self._state = _State.OPEN
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        assert self._task_group is not None
        self._state = _State.CLOSING
        self._task_group.cancel_scope.cancel()
        try:
            return await self._task_group.__aexit__(exc_type, exc, tb)
        except BaseExceptionGroup as group:
            # Load tasks never raise, so the group only wraps the body's own exception:
            # let that propagate as it was raised, not wrapped.
            if exc is not None and all(e is exc for e in group.exceptions):
                return None
            raise
        finally:
            for entry in list(self._entries.values()):
                self._drop(entry)
            self._revalidator.close()
            for entry in self._retired:
                entry.value = entry.weights = None
            self._lower.close()
            if (pool := pool_of(self._backend)) is not None:
                pool.close()  # idle buffers back to the system; live ones when they die
            self._failures.clear()
            self._state = _State.CLOSED
            with anyio.CancelScope(shield=True):
                await self._store.aclose()

    # -- the slow path --------------------------------------------------------------------------

    def _builder(self, model: type | None) -> ModelBuilder:
        if model is not None:
            if not self.is_bound(model):
                raise TypeError(f"{model.__qualname__} is not bound to this cache")
            use: _BoundUse = vars(model)["use"]
            return use._builder
        if len(self._builders) == 1:
            return self._builders[0]
        if not self._builders:
            return WEIGHTS
        names = ", ".join(b.name for b in self._builders)
        raise TypeError(f"several model classes are bound ({names}): use Cls.use(model_id)")

    def _lease(self, model_id: str, builder: ModelBuilder) -> _Lease[Any]:
        return _Lease(self, (builder, model_id))

    def _check_open(self) -> None:
        if self._state is not _State.OPEN:
            hint = " (use `async with cache:`)" if self._state is _State.NEW else ""
            raise CacheClosedError(f"the cache is {self._state.value}{hint}")

    async def _acquire(self, key: _Key) -> _Entry:
        """Lease ``key``'s entry, loading it first if needed."""
        while True:
            self._check_open()
            entry = self._entries.get(key)
            if entry is not None and entry.ready:
                if entry.draining is None or self._holds_lease():
                    # A task holding a lease must not wait for a drain: it may be one of the
                    # leases the drain waits for (a nested use), or be needed by the load the
                    # victims are for. Its nested lease ends no later than it would have.
                    self._take_lease(entry)
                    self._hits += 1
                    if entry.check_at <= _revalidation_clock():
                        entry.check_at = self._revalidator.due(entry.model_id)
                    return entry
                await self._wait_drained(entry.draining)
                continue  # evicted: load it again, behind the load it made room for
            if entry is None:
                self._raise_recent_failure(key)
                self._store.model_url(key[1])  # validates the id before anything else happens
                entry = self._start_load(key)
            self._misses += 1
            entry.waiters += 1
            self._waiters += 1
            waiting_since = _observe.clock()
            leased = False
            try:
                await entry.done.wait()
                if entry.ready and self._entries.get(key) is entry:
                    # Leased while still counted as a waiter: between its load and this lease,
                    # the entry is never evictable (nor chosen as a victim).
                    self._take_lease(entry)
                    leased = True
            finally:
                entry.waiters -= 1
                self._waiters -= 1
                if self._observers:
                    self._observers.waited(key[1], _observe.clock() - waiting_since)
                if entry.waiters == 0:
                    self._left(entry)
            if leased:
                return entry
            if entry.error is not None:
                raise for_caller(entry.error)  # shared: each waiter raises its own copy

    def _left(self, entry: _Entry) -> None:
        """``entry``'s last waiter stopped waiting (leased it, or left)."""
        if not entry.ready and entry.abandon is not None:
            entry.abandon.cancel()  # nobody wants the load: leave the limiter's queue now
        if self._device.waiting:
            # Its place in line may be unwanted now, or the entry may be a candidate victim.
            self._device.pump()

    def _holds_lease(self) -> bool:
        """Whether the current task (or the task that started it) holds a lease here now."""
        return any(lease._entry is not None and lease._cache is self for lease in _held.get())

    async def _wait_drained(self, drained: anyio.Event) -> None:
        """Wait while an entry is a victim chosen for a waiting load (counted as a waiter)."""
        self._waiters += 1
        try:
            await drained.wait()
        finally:
            self._waiters -= 1

    async def _prefetch_device(self, key: _Key) -> None:
        self._unlease(await self._acquire(key))

    def _take_lease(self, entry: _Entry) -> None:
        entry.leases += 1
        self._leased += 1
        self._policy.accessed(entry)

    def _drainable(self, entry: PolicyEntry) -> bool:
        """May be chosen as a victim for a waiting load even while leased: no task is waiting
        for it to finish loading (those lease it first)."""
        e: _Entry = entry  # type: ignore[assignment]
        return e.ready and e.waiters == 0

    def _start_draining(self, entry: PolicyEntry) -> None:
        e: _Entry = entry  # type: ignore[assignment]
        e.draining = anyio.Event()

    def _stop_draining(self, entry: PolicyEntry) -> None:
        e: _Entry = entry  # type: ignore[assignment]
        drained, e.draining = e.draining, None
        if drained is not None:
            drained.set()

    def _unlease(self, entry: _Entry) -> None:
        entry.leases -= 1
        self._leased -= 1
        if entry.retired and entry.leases == 0:
            self._free_retired(entry)
            return
        if entry.leases == 0 and self._device.waiting:
            self._device.pump()

    def _raise_recent_failure(self, key: _Key) -> None:
        error = self._failures.recent(key)
        if error is not None:
            self._fails += 1
            raise for_caller(error)  # remembered: a copy, so it keeps no caller's frames

    def _start_load(self, key: _Key) -> _Entry:
        assert self._task_group is not None
        entry = _Entry(key)
        self._entries[key] = entry
        self._loading += 1
        self._task_group.start_soon(self._load, entry, name=f"modelcache load {key[1]!r}")
        return entry

    @staticmethod
    def _check_wanted(entry: _Entry) -> None:
        """At a stage boundary of a load: stop if nobody waits for it any more."""
        if entry.waiters == 0:
            raise Abandoned

    @asynccontextmanager
    async def _limited(self, entry: _Entry, *, abandonable: bool = False) -> AsyncIterator[None]:
        """Hold the load limiter for one stage of ``entry``'s load, if anyone still wants it:
        a load whose waiters all leave while it waits for the limiter leaves its queue at once
        (`_left` cancels ``entry.abandon``), so abandoned loads never hold up wanted ones.

        An ``abandonable`` stage (the header and config reads: they move no weight byte) is
        cancelled too when the last waiter leaves, raising `Abandoned`: a read stalled on the
        store does not keep a load slot for a load nobody waits for."""
        limiter = self._limiter
        assert limiter is not None
        self._check_wanted(entry)
        try:
            # A free token and nobody queued: taken without a scope or a trip through the
            # scheduler (two per stage otherwise, a third of a small model's load).
            limiter.acquire_nowait()
        except anyio.WouldBlock:
            while True:
                self._check_wanted(entry)
                with anyio.CancelScope() as scope:
                    entry.abandon = scope
                    try:
                        await limiter.acquire()
                    finally:
                        entry.abandon = None
                if not scope.cancelled_caught:
                    break
                # Its waiters left; a new caller may have joined since: look again.
        try:
            self._check_wanted(entry)
            if not abandonable:
                yield
                return
            with anyio.CancelScope() as scope:
                entry.abandon = scope
                try:
                    yield
                finally:
                    entry.abandon = None
            if scope.cancelled_caught:
                raise Abandoned
        finally:
            limiter.release()

    async def _load(self, entry: _Entry) -> None:
        """Bring ``entry``'s model onto the device from the highest tier that has it.

        Before each stage (the limiter, the header read, the reservation, the weight read) it
        stops with `Abandoned` if nobody waits for it any more."""
        assert self._limiter is not None
        started = time.perf_counter()
        claimed: HostEntry | None = None
        on_disk: DiskEntry | None = None
        try:
            while (moving := self._lower.moving.get(entry.model_id)) is not None:
                await moving.wait()  # a demotion or host load of this id: then look again
            self._check_wanted(entry)
            # A new version (issue 12) is read from the store: the lower tiers hold the old one.
            claimed = None if entry.replaces else self._lower.claim(entry.model_id)
            if claimed is not None:
                info, source, source_tier = claimed.info, self._store, "host"
                entry.source = source_tier
            else:
                async with self._limited(entry, abandonable=True):
                    info, source, on_disk = await self._lower.locate(
                        entry.model_id, use_disk=entry.replaces is None
                    )
                source_tier = "store" if on_disk is None else "disk"
            # Config and side files (issue 14, `_sidefiles`): from the disk entry, else the store.
            if entry.builder.needs_config and not covers(info, entry.builder.side_files):
                async with self._limited(entry, abandonable=True):
                    disk_copy, on_disk = on_disk, None  # released by read_extras if it fails
                    try:
                        info, source, on_disk = await self._lower.read_extras(
                            info, entry.builder.side_files, source, disk_copy
                        )
                    except ModelChangedError:
                        if claimed is None:
                            raise
                        # A host copy (read without side files) of a version the store no
                        # longer has: it goes and the store is read, not a failure every use.
                        self._lower.discard(claimed)
                        claimed = None
                        fresh = await read_model_info(self._store, entry.model_id)
                        info, source, on_disk = await self._lower.read_extras(
                            fresh, entry.builder.side_files, self._store, None
                        )
                        source_tier = entry.source = "store"
                if disk_copy is not None and on_disk is None:
                    source_tier = "store"  # the disk copy was damaged
            check_fits(self._device, info)
            entry.nbytes = info.nbytes
            entry.info = info  # for describe()
            self._check_wanted(entry)  # a load nobody waits for must not evict anything
            await self._device.reserve(entry.nbytes, lambda: entry.waiters > 0)
            entry.reserved = True
            async with self._limited(entry):
                moving_since = time.perf_counter()
                if claimed is not None:
                    weights = await self._lower.promote(claimed, info)
                    claimed = None
                else:
                    disk_copy, on_disk = on_disk, None  # released by read_weights
                    # A disk copy that fails to read falls back to the store, not a failure.
                    weights, info = await self._lower.read_weights(source, info, disk_copy)
                    if self._backend.on_host:
                        self._lower.write_through(info, loaded=weights)
                self._costs.observe(source_tier, info.nbytes, time.perf_counter() - moving_since)
                self._remember_size(entry.model_id, info.nbytes)
                value = await entry.builder.build(weights, info)
        except BaseException as exc:
            self._lower.release_disk(on_disk)
            if claimed is not None:
                self._lower.unclaim(claimed)
            self._loading -= 1
            self._fail(entry, exc)
            entry.done.set()
            if not isinstance(exc, Exception):
                raise
            return
        seconds = time.perf_counter() - started
        entry.value, entry.weights = value, weights
        # -- versions (issue 12)
        if source_tier == "store":
            entry.check_at = self._revalidator.confirmed(entry.model_id)
        else:
            entry.check_at = self._revalidator.due_at(entry.model_id)
        if entry.replaces is not None and not self._install(entry):
            self._loading -= 1  # the key is loading afresh (from the store): this one goes
            self._drop(entry)
            self._device.pump()
            entry.done.set()
            return
        entry.ready = True
        entry.admitted = _observe.clock()
        self._loading -= 1
        self._loads += 1
        self._device.resident += entry.nbytes
        self._load_seconds += seconds
        self._policy.admitted(entry)
        entry.done.set()
        if self._observers:
            self._observers.load_finished(entry.model_id, source_tier, entry.nbytes, seconds)
        if entry.waiters == 0:  # every caller left: it is evictable now, which may serve the line
            self._device.pump()
        if logger.isEnabledFor(logging.INFO):  # its arguments cost more than a small load's read
            logger.info(
                "loaded %r: %s in %.3f s (%.2f GB/s)",
                entry.model_id,
                format_bytes(entry.nbytes),
                seconds,
                entry.nbytes / seconds / 1e9 if seconds else 0.0,
                extra={"model_id": entry.model_id, "nbytes": entry.nbytes, "seconds": seconds},
            )

    # -- versions (issue 12): a new version loaded beside the old one, swapped in when ready ----

    def _resident_version(self, model_id: str) -> ModelVersion | None:
        info = self._known_info(model_id)
        return None if info is None else info.version

    async def _swap_versions(self, model_id: str) -> None:
        """The store holds a new version of ``model_id`` (found by a check, in the cache's task
        group): copies in the lower tiers are dropped, and each resident entry gets a load of
        the new version that takes its place when ready (`_install`). Uses are served by the old
        one meanwhile; its leases end on it."""
        await self._lower.drop_stale(model_id, None)
        for builder in (*self._builders, WEIGHTS):
            key = (builder, model_id)
            old = self._entries.get(key)
            if old is None or not old.ready or key in self._swapping:
                continue
            new = _Entry(key)
            new.replaces = old
            new.waiters = 1  # this task wants it: the load is never abandoned
            self._swapping[key] = new
            self._loading += 1
            try:
                await self._load(new)
            finally:
                new.waiters -= 1
                del self._swapping[key]
                self._left(new)
            if new.error is not None:
                logger.warning("new version of %r not loaded: %s", model_id, new.error)
            elif new.weights is not None:  # the old one may have gone meanwhile: nothing left
                await self._lower.drop_stale(model_id, new.weights.info.version)

    def _swapping_id(self, model_id: str) -> bool:
        """Whether a new version of ``model_id`` is being loaded (for any bound class)."""
        return any(key[1] == model_id for key in self._swapping)

    def _install(self, new: _Entry) -> bool:
        """A new version's load finished: it takes the index from whatever holds its key;
        False when a load of the key is in flight (it began after the old one left)."""
        assert new.replaces is not None
        current = self._entries.get(new.key)
        new.replaces = None
        if current is not None:
            if not current.ready:
                return False
            self._retire(current)
        self._entries[new.key] = new
        self._swaps += 1
        logger.info("swapped in a new version of %r", new.model_id)
        return True

    def _retire(self, old: _Entry) -> None:
        """Take ``old`` out of the index and the policy; its bytes stay reserved until its
        last lease ends (never evicted or demoted: no tier gets the old version back)."""
        if old.draining is not None:
            self._device.forget(old)
        self._policy.removed(old)
        del self._entries[old.key]
        self._device.resident -= old.nbytes
        old.ready = False
        old.retired = True
        if old.leases:
            self._retired.add(old)
        else:
            self._free_retired(old)

    def _free_retired(self, old: _Entry) -> None:
        self._retired.discard(old)
        old.retired = False
        old.value = old.weights = None
        if old.reserved:
            old.reserved = False
            self._device.release(old.nbytes)

    async def refresh(self, model_id: str) -> bool:
        """Check ``model_id`` against the store now; if the store holds another version, load
        it and swap it in (uses meanwhile get the old one) before returning. True if it changed.
        A model in no tier has nothing to compare: False. Raises StoreError when the store
        cannot be asked."""
        self._check_open()
        self._store.model_url(model_id)  # validates the id
        return await self._revalidator.check(model_id)

    def version_of(self, model_id: str) -> str | None:
        """The version (a short token) of ``model_id`` that new uses get now, or None when no
        tier holds it (or its store names no version). No I/O."""
        version = self._resident_version(model_id)
        return None if version is None else version.token

    def _remember_size(self, model_id: str, nbytes: int) -> None:
        sizes = self._sizes
        sizes[model_id] = nbytes
        sizes.move_to_end(model_id)
        if len(sizes) > _MAX_REMEMBERED_SIZES:
            sizes.popitem(last=False)

    def _fail(self, entry: _Entry, exc: BaseException) -> None:
        """Undo everything a load did, and tell its waiters why."""
        self._drop(entry)
        if isinstance(exc, Abandoned):
            self._device.pump()  # bytes it held, if any, go to the line; nothing to remember
            return
        if isinstance(exc, Exception) and self._state is _State.OPEN:
            exc = as_model_error(exc, entry.model_id)
            # Its frames hold the load's buffer: waiters may keep the error, and it is kept.
            release_frames(exc)
            entry.error = exc
            self._fails += 1
            self._load_failures += 1
            self._failures.remember(entry.key, exc)
            if self._observers:
                self._observers.load_failed(entry.model_id, exc)
            level = logging.INFO if isinstance(exc, ModelNotFoundError) else logging.WARNING
            logger.log(level, "failed to load %r: %s", entry.model_id, exc)
        else:  # cancelled: the cache is closing
            entry.error = CacheClosedError(
                f"the cache closed while model {entry.model_id!r} was loading",
                model_id=entry.model_id,
            )
        self._device.pump()

    # -- the device tier ----------------------------------------------------------------------

    def _host_policy_for(self, host_policy: EvictionPolicy | None) -> EvictionPolicy:
        """The host tier's policy: the one given, else the device policy's kind (a
        `CostAwarePolicy` sharing the device policy's access history, or LRU). A
        `CostAwarePolicy` given for both tiers counts in the device policy's history: the host
        tier sees no hits of its own (a hit there is a promotion), so its own would stay empty
        and every model would look equally unpopular."""
        if host_policy is not None:
            if isinstance(host_policy, CostAwarePolicy) and isinstance(
                self._policy, CostAwarePolicy
            ):
                host_policy.share_history(self._policy.history)
            return host_policy
        if isinstance(self._policy, CostAwarePolicy):
            return CostAwarePolicy(history=self._policy.history)
        return LRUPolicy()

    def _device_miss_cost(self, victim: PolicyEntry) -> float:
        """Seconds to bring a device victim back: from host memory when it fits there."""
        nbytes = victim.nbytes
        if nbytes <= self._lower.host.budget:
            return self._costs.seconds("host", nbytes)
        e: _Entry = victim  # type: ignore[assignment]
        return self._costs.seconds(self._lower.fall_source(e.model_id), nbytes)

    def _host_miss_cost(self, victim: PolicyEntry) -> float:
        """Seconds to bring a host victim back: from the disk tier or the store."""
        model_id: str = victim.key  # type: ignore[assignment]
        return self._costs.seconds(self._lower.fall_source(model_id), victim.nbytes)

    def _evictable(self, entry: PolicyEntry) -> bool:
        e: _Entry = entry  # type: ignore[assignment]
        return e.ready and e.leases == 0 and e.waiters == 0

    def _demote(self, victim: PolicyEntry) -> None:
        """Device eviction (synchronous): the lower tiers take the model, or it is dropped."""
        entry: _Entry = victim  # type: ignore[assignment]
        weights, nbytes = entry.weights, entry.nbytes
        self._drop(entry, release=False)
        if self._observers:
            age = _observe.clock() - entry.admitted
            self._observers.evicted(entry.model_id, "device", nbytes, age)
        logger.info(
            "evicted %r from the device (%s)",
            entry.model_id,
            format_bytes(nbytes),
            extra={"model_id": entry.model_id, "nbytes": nbytes},
        )
        if weights is None or self._swapping_id(entry.model_id):
            # A version being replaced is not handed down: a load of its id meanwhile would
            # find it in host memory and serve it after the swap (issue 12).
            self._device.drop_now(nbytes)
        else:
            self._lower.demote(weights, self._device)

    def _drop(self, entry: _Entry, *, release: bool = True) -> None:
        """Remove a resident or loading entry; free its device bytes unless ``release`` is False
        (an eviction, whose caller decides how the bytes come free)."""
        if self._entries.get(entry.key) is entry:
            del self._entries[entry.key]
        if entry.draining is not None:
            self._device.forget(entry)  # wakes the uses waiting for it to leave
        if entry.ready:
            self._policy.removed(entry)
            self._device.resident -= entry.nbytes
        if entry.reserved:
            entry.reserved = False
            if release:
                self._device.reserved -= entry.nbytes
        entry.ready = False
        entry.value = entry.weights = None

    async def _prefetch_host(self, model_id: str) -> None:
        """Bring ``model_id``'s weights into host memory, unless the device has (or is loading)
        them: then that load is shared rather than the store read twice."""
        self._check_open()
        self._store.model_url(model_id)  # validate before anything else
        error = self._recent_header_error(model_id)
        if error is not None:  # missing or unreadable a moment ago: answered as use() would be
            self._fails += 1
            raise for_caller(error)
        while (entry := self._device_entry(model_id)) is not None:
            if entry.ready:
                return
            await entry.done.wait()
            if entry.error is not None:  # the load failed: so does this prefetch, as use() would
                raise for_caller(entry.error)
            # Loaded (then it is ready, or was evicted to host memory) or dropped: look again.
        await self._lower.load(model_id)

    def _device_entry(self, model_id: str) -> _Entry | None:
        """An entry for ``model_id`` on the device, loading or ready, for any bound class."""
        for builder in (*self._builders, WEIGHTS):
            entry = self._entries.get((builder, model_id))
            if entry is not None:
                return entry
        return None
