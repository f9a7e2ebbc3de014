"""ModelCache: leases on models loaded once, under an exact byte budget per tier.

The cache is the facade, the lifecycle, and the orchestration of a load; the state lives with
its owners: the device tier (entries, leases, the device budget, eviction) in `DeviceTier`,
host memory and the disk tier under it in `HostDiskTiers`, failures in `LoadFailures`,
``describe``'s header reads in `HeaderChecks`. Invariants of a load (the tests check them after
every step; the tiers' own are in their modules):

* A load reads from the highest tier that has the model: host memory, the disk tier, the store.
* One load per key, run in a task of the cache's (`Background.start_load`: on asyncio a task of
  its own, cancelled and waited for when the cache closes; else one of its task group) - never
  in a caller's task - so cancelling a caller never cancels a load others share. Loads of
  different keys run concurrently, bounded by a capacity limiter that is held for I/O only,
  never while waiting for bytes (`_stages`); a local file's header read takes none (small reads
  batched into shared thread calls, `_batch`).
* A load whose callers have all gone (a device prefetch is a caller) stops at its next stage
  boundary - the wait for the load limiter (left at once, by cancelling ``entry.abandon``), the
  header read, the reservation of bytes, the weight read - so it never takes a limiter slot,
  reads, or evicts for nobody, and a backlog of abandoned loads costs nothing once their callers
  are gone.
* A failed load reaches every waiter, leaves no bytes reserved and no entry behind, and is
  remembered for ``failure_ttl`` seconds so a storm of requests for a broken model fails fast.
* The hit path (`Lease.__aenter__`, in `_lease.py`, finding a ready entry) does no I/O and never awaits, so it
  is not a scheduler checkpoint: a dict lookup and `DeviceTier.take_lease`.
* Every task the cache starts (loads, header reads, copies down, disk writes) is counted by one
  `Background`, which ``wait_idle`` waits on.
* All state is touched only between awaits on the event loop's thread: no locks.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from collections.abc import Callable, Iterable
from functools import partial
from types import MappingProxyType, TracebackType
from typing import Any, TypeVar

import anyio
import anyio.abc
import anyio.lowlevel
import torch

from . import _observe
from ._backend import DeviceBackend
from ._builders import WEIGHTS, ModelBuilder, builder_for
from ._concurrency import Background, gather
from ._cost import LoadCosts, SizeMemory
from ._describe import HeaderChecks
from ._device import DeviceEntry, DeviceTier, Key
from ._disk import DiskEntry, DiskTier
from ._exceptions import CacheClosedError, ModelChangedError, ModelNotFoundError, as_model_error
from ._failures import LoadFailures, for_caller, release_frames
from ._format import ModelInfo
from ._lease import BoundUse, Lease, State, holds_lease
from ._loader import read_model_info
from ._lower import HostDiskTiers
from ._observe import CacheObserver, Observers
from ._policy import CostAwarePolicy, EvictionPolicy, policy_below
from ._pool import pool_of
from ._prefill import load_in_turn, read_infos_apart
from ._refresh import DEFAULT_REVALIDATE_AFTER, Revalidator
from ._refresh import _clock as _revalidation_clock
from ._sidefiles import covers
from ._stages import Abandonable, Limited, check_wanted
from ._stats import CacheStats
from ._store import Store
from ._tiers import Abandoned, HostEntry
from ._torch import TorchBackend
from ._units import format_bytes, parse_bytes
from ._versions import ModelVersion

__all__ = ["ModelCache"]

logger = logging.getLogger("modelcache")
logger.addHandler(logging.NullHandler())

#: Times the stages of a load (``load_seconds``, the learned costs): high resolution. Event
#: times (waits, ages) are the observers' `_observe.clock`; failures expire by `_failures.clock`.
_load_timer = time.perf_counter

T = TypeVar("T")

#: Loads one ``prefetch`` call keeps in flight when it starts them itself (`_prefetch_loads`).
PREFETCH_WINDOW = 64


def _keep_first(errors: list[Exception], error: Exception) -> None:
    """A prefetch raises its first failure: the others are not kept (a prefetch of 100,000
    invalid ids, or one the cache's close stops, kept 100,000 errors and their tracebacks)."""
    if not errors:
        errors.append(error)


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
        if policy is None:
            policy = CostAwarePolicy()
        disk: DiskTier | None = None
        if disk_dir is not None and disk_budget is not None:
            disk = DiskTier(disk_dir, disk_budget)
        elif disk_dir is not None or disk_budget is not None:
            raise ValueError("disk_dir and disk_budget go together")
        self._observers = Observers()
        #: Every task the cache starts, counted for `wait_idle`.
        self._background = Background()
        self._host_disk = HostDiskTiers(
            self._store,
            self._backend,
            parse_bytes(host_budget, name="host_budget"),
            disk,
            self._observers,
            background=self._background,
            policy=policy_below(policy, host_policy),
            costs=load_costs,
            write_behind=parse_bytes(disk_write_buffer, name="disk_write_buffer"),
        )
        self._device = DeviceTier(
            parse_bytes(device_budget, name="device_budget"),
            policy,
            self._host_disk,
            self._observers,
        )
        self._entries = self._device.entries  # read on the hit path; changed by the tier only
        #: Load timings per source tier, learned from this cache's own loads.
        self._costs = self._host_disk.costs
        #: Sizes of models this cache has read headers of (for `estimate_load_seconds`).
        self._sizes = SizeMemory()
        self._max_concurrent_loads = max_concurrent_loads
        self._builders: list[ModelBuilder] = []

        self._state = State.NEW
        self._task_group: anyio.abc.TaskGroup | None = None
        self._limiter: anyio.CapacityLimiter | None = None
        #: Errors of recent failed loads and header checks, for ``failure_ttl`` seconds.
        self._failures = LoadFailures(failure_ttl)
        self._checks = HeaderChecks(
            self._store, self._failures, self._background, lambda: self._state is State.OPEN
        )
        # -- versions (issue 12): the check schedule; the swaps' device state is `DeviceTier`'s
        self._revalidator = Revalidator(self._store, revalidate_after, self._background)
        self._host_disk.validate_disk = self._revalidator.validate_disk

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
        target.use = BoundUse(self, builder)  # type: ignore[attr-defined]
        return target

    # -- public API ---------------------------------------------------------------------------

    @property
    def store(self) -> Store:
        return self._store

    @property
    def device(self) -> torch.device:
        return self._backend.device

    def use(self, model_id: str, *, model: type | None = None) -> Lease[Any]:
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
        tasks (on the device, those of ids not loading yet start from the caller's task,
        ``PREFETCH_WINDOW`` at a time: a fill of many small models; the other ids, and a host
        prefetch's, are waited for by ``PREFETCH_WINDOW`` tasks in turn); all are awaited, then
        the first failure, if any, is raised (the others are not kept). Cancelled, it leaves the loads it waits for (each
        stops if nobody else waits for it), as use()'s callers do.
        """
        self._check_open()
        if tier == "device":
            builder = self._builder(model)
            # Ids no load has started for start theirs from this task (`_prefetch_loads`);
            # the others (resident, loading, draining, failed a moment ago) take use()'s path.
            errors, others = await self._prefetch_loads(builder, model_ids)
            calls = [partial(self._prefetch_device, key) for key in others]
        elif tier == "host":
            errors = []
            if self._host_disk.host.budget == 0:
                raise ValueError("prefetch(tier='host') needs a host_budget")
            calls = [partial(self._prefetch_host, i) for i in model_ids]
        else:
            raise ValueError(f"tier must be 'device' or 'host', not {tier!r}")

        pending = iter(calls)

        async def run() -> None:
            # `PREFETCH_WINDOW` of these take the calls in turn, not a task per call: a warm
            # prefetch (ids resident, loading, or repeated in the list) made a task for each.
            for call in pending:
                try:
                    await call()
                except Exception as exc:
                    _keep_first(errors, exc)

        await gather([run] * min(PREFETCH_WINDOW, len(calls)))
        if errors:
            raise errors[0]

    def evict(self, model_id: str, *, model: type | None = None) -> bool:
        """Move ``model_id`` off the device (to host memory when it fits there) if it is resident
        and unleased; True if it left the device."""
        return self._device.evict((self._builder(model), model_id))

    def resident(self, tier: str = "device") -> list[str]:
        """Ids of the models resident in ``tier`` ("device", "host" or "disk"), for routers."""
        if tier == "host":
            return list(self._host_disk.entries)
        if tier == "disk":
            # The disk tier's index (no I/O): a copy this cache may load instead of the store's.
            return self._host_disk.disk.ids() if self._host_disk.disk is not None else []
        return [entry.model_id for entry in self._entries.values() if entry.ready]

    def estimate_load_seconds(
        self, model_id: str, *, nbytes: int | None = None, model: type | None = None
    ) -> float | None:
        """Estimated seconds before ``use(model_id)`` could hand the model out, from the tier
        it sits in now: 0.0 on the device; else a fixed latency plus its size over the
        bandwidth this cache has measured for that tier ("host", "disk", "store"). For a model
        in no tier, its size must be known: from an earlier load by this cache, or ``nbytes``;
        None when it is not. No I/O; for routers choosing the replica where a request is
        cheapest. The learned costs time whole loads, builds (``from_weights``) included."""
        tier = self.tier_of(model_id, model=model)
        if tier == "device":
            return 0.0
        if tier == "host":
            return self._costs.seconds("host", self._host_disk.entries[model_id].nbytes)
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
        if model_id in self._host_disk.entries:
            return "host"
        disk = self._host_disk.disk
        if disk is not None and model_id in disk:
            return "disk"
        return None

    def is_bound(self, model: type) -> bool:
        """Whether ``model`` was bound to this cache with `model` (``@cache.model``)."""
        bound = vars(model).get("use")
        return isinstance(bound, BoundUse) and bound._cache is self

    async def describe(self, model_id: str) -> ModelInfo:
        """The model's `ModelInfo` (tensors, size, shards) without loading its weights: from
        the device or host tier when it is there, or a load in flight that has read them, else
        its safetensors headers (a few KiB of reads). Raises as a load would:
        InvalidModelIdError, ModelNotFoundError, StoreError, ModelFormatError, CacheClosedError.
        Servers use it to tell an unknown id (404) before a load starts.

        Concurrent calls for one id share one read, run in a task of the cache's: a caller
        cancelled (``anyio.fail_after``) leaves it to the others, and the read is dropped when
        its last caller leaves. Its errors are remembered for ``failure_ttl`` seconds, as are
        the header errors of failed loads (not found, invalid, store errors)."""
        self._store.model_url(model_id)  # validates the id
        while True:
            self._check_open()
            info = self._known_info(model_id)
            if info is not None:
                return info
            error = self._failures.header_error(model_id, (*self._builders, WEIGHTS))
            if error is not None:
                raise for_caller(error)  # remembered: a copy, so it keeps no caller's frames
            info = await self._checks.read(model_id)
            if info is not None:
                return info
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
        host = self._host_disk.entries.get(model_id)
        if host is not None:
            info: ModelInfo = host.info
            return info
        return None

    def add_observer(self, observer: CacheObserver) -> None:
        """Report loads, failures, waits and evictions to ``observer`` as they happen
        (`CacheObserver`; never called on the hit path). ValueError if it already observes."""
        self._observers.add(observer)

    def remove_observer(self, observer: CacheObserver) -> None:
        """Stop reporting to ``observer``; ValueError if it does not observe this cache."""
        self._observers.remove(observer)

    def stats(self) -> CacheStats:
        device, failures = self._device, self._failures
        tier = device.stats()
        return CacheStats(
            hits=tier.hits,
            misses=tier.misses,
            loads=device.loads,
            failures=failures.failed_calls,
            load_failures=failures.failed_loads,
            evictions=tier.evictions,
            bytes_resident=tier.bytes,
            bytes_reserved=tier.bytes_reserved,
            bytes_budget=tier.budget,
            models=tier.entries,
            loading=device.loading,
            waiters=device.waiters,
            leased=device.leased,
            load_seconds=device.load_seconds,
            tiers=MappingProxyType({"device": tier, **self._host_disk.stats()}),
            disk_write_bytes=self._host_disk.writing,
            disk_writes_skipped=self._host_disk.writes_skipped,
            pool_idle_bytes=pool.stats().idle_bytes if (pool := pool_of(self._backend)) else 0,
            background=self._background.running,
            revalidations=self._revalidator.revalidations,
            versions_changed=self._revalidator.changes,
            swaps=self._device.swaps,
            stale_serves=self._revalidator.stale_serves,
        )

    async def wait_idle(self) -> None:
        """Return once no load, demotion (a copy down to host memory), disk-tier write or
        header read of this cache is in flight, nor a worker thread of one: at once when
        ``stats().background`` is 0. For graceful shutdowns and tests. Work started while it
        waits is waited for too; a load waiting for bytes held by the caller's own lease never
        ends, so do not call it inside a ``use()`` block whose model a load may need."""
        await self._background.wait_idle()

    def _check_invariants(self) -> None:
        """Every tier's accounting agrees with its entries (the tests call it after every step)."""
        self._device.check(open=self._state is State.OPEN)
        self._host_disk.check()

    def __repr__(self) -> str:
        return f"<ModelCache {self._state.value} {self._store!r} on {self.device}: {self.stats()}>"

    # -- lifecycle ----------------------------------------------------------------------------

    async def __aenter__(self) -> ModelCache:
        if self._state is not State.NEW:
            raise CacheClosedError(f"a ModelCache is entered once; this one is {self._state.value}")
        self._limiter = anyio.CapacityLimiter(self._max_concurrent_loads)
        task_group = anyio.create_task_group()
        await task_group.__aenter__()
        self._task_group = task_group
        self._failures.open(task_group)
        self._checks.open(task_group)
        self._revalidator.open(task_group, self._resident_version, self._swap_versions)
        try:
            await self._host_disk.open(task_group, self._limiter)
        except BaseException:
            # No task has started: the group exits quietly and the typed error (a StoreError
            # naming the disk directory...) propagates as it was raised, not in a group.
            task_group.cancel_scope.cancel()
            await task_group.__aexit__(None, None, None)
            raise
        if (pool := pool_of(self._backend)) is not None:  # CPU buffers: what the budgets allow
            pool.limit = self._device.budget + self._host_disk.host.budget
        self._state = State.OPEN
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        assert self._task_group is not None
        self._state = State.CLOSING
        self._task_group.cancel_scope.cancel()
        self._background.cancel_tasks()  # its tasks outside the group (`Background`)
        try:
            # Waited for before the group exits, as its own tasks are: an error escaping one
            # (a bug) goes to the group while it is still active, and is raised here. Once it
            # had exited, the task failed to hand it on and nobody retrieved it.
            cancelled = await self._background.wait_tasks()
            if cancelled is not None and exc is None:
                # A native cancellation met in the wait: raised by the group's exit, as one
                # during the group's own wait would be.
                exc_type, exc, tb = type(cancelled), cancelled, cancelled.__traceback__
            return await self._task_group.__aexit__(exc_type, exc, tb)
        except BaseExceptionGroup as group:
            # Load tasks never raise, so the group only wraps the body's own exception:
            # let that propagate as it was raised, not wrapped.
            if exc is not None and all(e is exc for e in group.exceptions):
                return None
            raise
        finally:
            # Any started while the group exited; a native cancellation met meanwhile is raised
            # once the cache closed.
            late = await self._background.wait_tasks()
            self._device.close()
            self._revalidator.close()
            self._host_disk.close()
            if (pool := pool_of(self._backend)) is not None:
                pool.close()  # idle buffers back to the system; live ones when they die
            self._failures.clear()
            self._state = State.CLOSED
            with anyio.CancelScope(shield=True):
                await self._store.aclose()
            if late is not None:
                raise late

    # -- the slow path --------------------------------------------------------------------------

    def _builder(self, model: type | None) -> ModelBuilder:
        if model is not None:
            if not self.is_bound(model):
                raise TypeError(f"{model.__qualname__} is not bound to this cache")
            use: BoundUse = vars(model)["use"]
            return use._builder
        if len(self._builders) == 1:
            return self._builders[0]
        if not self._builders:
            return WEIGHTS
        names = ", ".join(b.name for b in self._builders)
        raise TypeError(f"several model classes are bound ({names}): use Cls.use(model_id)")

    def _lease(self, model_id: str, builder: ModelBuilder) -> Lease[Any]:
        return Lease(self, (builder, model_id))

    def _check_open(self) -> None:
        if self._state is not State.OPEN:
            hint = " (use `async with cache:`)" if self._state is State.NEW else ""
            raise CacheClosedError(f"the cache is {self._state.value}{hint}")

    async def _acquire(self, key: Key) -> DeviceEntry:
        """Lease ``key``'s entry, loading it first if needed."""
        builder, model_id = key
        while True:
            self._check_open()
            entry = self._entries.get(key)
            if entry is not None and entry.ready:
                if entry.draining is None or holds_lease(self):
                    # A task holding a lease must not wait for a drain: it may be one of the
                    # leases the drain waits for (a nested use), or be needed by the load the
                    # victims are for. Its nested lease ends no later than it would have.
                    self._device.take_lease(entry)
                    if entry.check_at <= _revalidation_clock():  # stale-while-revalidate
                        entry.check_at = self._revalidator.due(model_id)
                    return entry
                await self._device.wait_drained(entry.draining)
                continue  # evicted: load it again, behind the load it made room for
            if entry is None:
                self._failures.raise_recent(builder, model_id)
                # Validates the id before anything else happens, once: the load has the URL.
                entry = self._start_load(key, self._store.model_url(model_id))
            else:
                self._device.join(entry)
            waiting_since = _observe.clock()
            leased = False
            try:
                await entry.done.wait()
                if entry.ready and self._entries.get(key) is entry:
                    # Leased while still counted as a waiter: between its load and this lease,
                    # the entry is never evictable (nor chosen as a victim).
                    self._device.lease_loaded(entry)
                    leased = True
            finally:
                self._device.leave(entry)
                if self._observers:
                    self._observers.waited(model_id, _observe.clock() - waiting_since)
            if leased:
                return entry
            if entry.error is not None:
                raise for_caller(entry.error)  # shared: each waiter raises its own copy

    async def _prefetch_device(self, key: Key) -> None:
        self._device.release_lease(await self._acquire(key))

    async def _prefetch_loads(
        self, builder: ModelBuilder, model_ids: Iterable[str]
    ) -> tuple[list[Exception], list[Key]]:
        """Start the load of every id in ``model_ids`` that has no entry, at most
        `PREFETCH_WINDOW` at a time, and wait for each as a caller of ``use()`` would (joined,
        then leased and let go); return the errors and the keys left to `_acquire`.

        One task waits for all of them, in the order they started: a task (and a lease, and
        `_acquire`'s frames) per id was most of a small model's prefetch besides its load. The
        loads run in the cache's tasks, as use()'s do (those whose headers it read in lanes,
        `_prefill.load_in_turn`); a caller cancelled leaves every load it joined (abandoned if
        nobody else waits), as use()'s callers do."""
        errors: list[Exception] = []
        others: list[Key] = []
        joined: deque[DeviceEntry] = deque()
        fresh: list[tuple[Key, str]] = []
        try:
            for model_id in model_ids:
                key = (builder, model_id)
                if not self._prefetch_may_start(key, errors, others):
                    continue
                try:
                    url = self._store.model_url(model_id)
                except Exception as exc:
                    _keep_first(errors, exc)
                    continue
                fresh.append((key, url))
                if len(fresh) >= max(1, PREFETCH_WINDOW // 2):
                    group, fresh = fresh, []
                    await self._prefetch_start(group, joined, errors, others)
            await self._prefetch_start(fresh, joined, errors, others)
            while joined:
                await self._prefetch_wait(joined.popleft(), errors, others)
        finally:
            for entry in joined:  # cancelled (or the cache closed): these are not waited for
                self._device.leave(entry)
        return errors, others

    def _prefetch_may_start(self, key: Key, errors: list[Exception], others: list[Key]) -> bool:
        """Whether a prefetch may start ``key``'s load now: not when it has an entry (a load or
        a model: left to `_acquire`, in ``others``), nor when the cache is closed (no load
        starts, the rest is waited for) or the id failed recently (the error kept in
        ``errors``)."""
        if key in self._entries:
            others.append(key)
            return False
        try:
            self._check_open()
            self._failures.raise_recent(*key)
        except Exception as exc:
            _keep_first(errors, exc)
            return False
        return True

    async def _prefetch_start(
        self,
        fresh: list[tuple[Key, str]],
        joined: deque[DeviceEntry],
        errors: list[Exception],
        others: list[Key],
    ) -> None:
        """Start the loads of ``fresh`` (ids with no entry a moment ago) for `_prefetch_loads`,
        keeping at most `PREFETCH_WINDOW` in ``joined``. Issue 16: the headers of the local
        ones are read first, in one worker-thread call, while the loads started before run
        (`_prefill`); each load then skips its header stage. An id on the host tier (or moving
        there) is loaded from there: its headers are not read. The loads whose headers were
        read run in lanes, a task per load slot rather than one per load
        (`_prefill.load_in_turn`); the others in a task each."""
        if not fresh:
            return
        # Room for the whole group first (break7): headers read while earlier loads finish
        # went stale meanwhile (a model replaced by one of another size failed its load with
        # ModelChangedError where use()'s load, reading them as it starts, got the new one).
        while joined and len(joined) > PREFETCH_WINDOW - len(fresh):
            await self._prefetch_wait(joined.popleft(), errors, others)
        assert len(fresh) <= PREFETCH_WINDOW - len(joined)  # groups are half a window at most
        moving, host = self._host_disk.moving, self._host_disk.entries
        assert self._task_group is not None
        infos = await read_infos_apart(
            self._background,
            self._task_group,
            self._store,
            [
                None
                if key[1] in host or key[1] in moving or not self._store.batches_headers(url)
                else (key[1], url)
                for key, url in fresh
            ],
        )
        read: list[tuple[DeviceEntry, ModelInfo]] = []  # loads for lanes (`_prefill`)
        # No await from here to the lanes' start (the room was made above): a cancellation
        # in between would leave the entries in ``read`` loading with no task to run them.
        for (key, url), info in zip(fresh, infos, strict=True):
            if not self._prefetch_may_start(key, errors, others):  # checked again: time passed
                continue
            if info is None:
                entry = self._start_load(key, url)
            else:
                entry = self._device.add(key, url)
                self._device.join(entry)
                read.append((entry, info))
            joined.append(entry)
        if read:  # the lanes start after every entry is joined: no load starts unwanted
            loads = iter(read)
            for _ in range(min(self._max_concurrent_loads, len(read))):
                self._background.start_load(
                    self._task_group,
                    load_in_turn,
                    loads,
                    self._load,
                    self._unstarted,
                    name="modelcache prefetch loads",
                )

    async def _prefetch_wait(
        self, entry: DeviceEntry, errors: list[Exception], others: list[Key]
    ) -> None:
        """Wait for a load `_prefetch_loads` joined, then lease it and let it go (`_acquire`'s
        waiter); its error goes to ``errors``, a model gone before its lease to ``others``."""
        waiting_since = _observe.clock()
        leased = False
        try:
            await entry.done.wait()
            if entry.ready and self._entries.get(entry.key) is entry:
                self._device.lease_loaded(entry)
                leased = True
        finally:
            self._device.leave(entry)
            if self._observers:
                self._observers.waited(entry.model_id, _observe.clock() - waiting_since)
        if leased:
            self._device.release_lease(entry)
        elif entry.error is not None:
            error = for_caller(entry.error)
            if not isinstance(error, Exception):
                raise error
            _keep_first(errors, error)
        else:
            others.append(entry.key)  # evicted, or dropped, before its lease: as use() would

    def _start_load(self, key: Key, url: str) -> DeviceEntry:
        """Add ``key``'s entry, joined by the caller, and start its load. Joined first: under an
        eager task factory (Python 3.12) the load's first step runs as its task is made, and a
        load that finds nobody waiting stops (`Abandoned`): its caller then started it again,
        for good, without yielding."""
        entry = self._device.add(key, url)
        self._device.join(entry)
        self._run_load(entry)
        return entry

    def _run_load(self, entry: DeviceEntry, read: ModelInfo | None = None) -> None:
        """Run ``entry``'s load (``read``: its headers, read already) in a task of its own."""
        assert self._task_group is not None
        entry.scope = self._background.start_load(
            self._task_group, self._load, entry, read, name=f"modelcache load {entry.model_id!r}"
        )

    def _unstarted(self, entry: DeviceEntry, info: ModelInfo, exc: BaseException) -> None:
        """A load a lane ended by ``exc`` will not run (`_prefill.load_in_turn`): failed as
        `_load` fails one when the cache closes; else (the lane's task cancelled by other code,
        an interrupt) run in a task of its own, as if it had never been in a lane."""
        if self._state is State.OPEN:
            self._run_load(entry, info)
            return
        self._fail(entry, exc)
        entry.done.set()

    async def _load(self, entry: DeviceEntry, read: ModelInfo | None = None) -> None:
        """Bring ``entry``'s model onto the device from the highest tier that has it.

        Before each stage (the limiter, the header read, the reservation, the weight read) it
        stops with `Abandoned` if nobody waits for it any more. ``read``: its headers, read
        from the store by the prefetch that started it (`_prefill`): no header stage."""
        assert self._limiter is not None
        started = _load_timer()
        claimed: HostEntry | None = None
        on_disk: DiskEntry | None = None
        try:
            while (moving := self._host_disk.moving.get(entry.model_id)) is not None:
                await moving.wait()  # a demotion or host load of this id: then look again
            check_wanted(entry)
            # A new version (issue 12) is read from the store: the lower tiers hold the old one.
            claimed = None if entry.replaces else self._host_disk.claim(entry.model_id)
            if claimed is not None:
                info, read_store, source = claimed.info, self._store, "host"
                entry.source = source
            else:
                url = entry.url
                if url is None:  # a new version's load: the id was validated by its first load
                    url = entry.url = self._store.model_url(entry.model_id)
                # In a load slot unless the store batches the headers: a local file's are small
                # reads batched into shared thread calls (`_batch`), never stalled on a remote
                # store; without a slot the headers of many loads share a call (four slots made
                # a small-model fill wait on thread hops).
                if read is not None and entry.replaces is None:  # a local store's: no disk tier
                    info, read_store, on_disk = read, self._store, None
                else:
                    header_stage = (
                        Abandonable(entry)
                        if self._store.batches_headers(url)
                        else Limited(self._limiter, entry, abandonable=True)
                    )
                    async with header_stage:
                        info, read_store, on_disk = await self._host_disk.locate(
                            entry.model_id, url, use_disk=entry.replaces is None
                        )
                source = "store" if on_disk is None else "disk"
            # Config and side files (issue 14, `_sidefiles`): from the disk entry, else the store.
            if entry.builder.needs_config and not covers(info, entry.builder.side_files):
                async with Limited(self._limiter, entry, abandonable=True):
                    disk_copy, on_disk = on_disk, None  # released by read_extras if it fails
                    try:
                        info, read_store, on_disk = await self._host_disk.read_extras(
                            info, entry.builder.side_files, read_store, disk_copy
                        )
                    except ModelChangedError:
                        if claimed is None:
                            raise
                        # A host copy (read without side files) of a version the store no
                        # longer has: it goes and the store is read, not a failure every use.
                        self._host_disk.discard(claimed)
                        claimed = None
                        fresh = await read_model_info(self._store, entry.model_id)
                        info, read_store, on_disk = await self._host_disk.read_extras(
                            fresh, entry.builder.side_files, self._store, None
                        )
                        source = entry.source = "store"
                if disk_copy is not None and on_disk is None:
                    source = "store"  # the disk copy was damaged
            self._device.check_fits(info)
            check_wanted(entry)  # a load nobody waits for must not evict anything
            if not self._device.reserve_now(entry, info):
                await self._device.reserve(entry)
            async with Limited(self._limiter, entry):
                if claimed is not None:
                    weights = await self._host_disk.promote(claimed, info)
                    claimed = None
                else:
                    disk_copy, on_disk = on_disk, None  # released by read_weights
                    # A disk copy that fails to read falls back to the store, not a failure.
                    weights, info = await self._host_disk.read_weights(read_store, info, disk_copy)
                    if self._backend.on_host:
                        self._host_disk.write_through(info, loaded=weights)
                self._sizes.remember(entry.model_id, info.nbytes)
                value = await entry.builder.build(weights, info)
                self._costs.observe(source, info.nbytes, _load_timer() - started)
                # A close that cancelled the load during a worker-thread call (anyio waits for
                # the thread) is delivered here, not by admitting the model to a closed cache.
                await anyio.lowlevel.checkpoint_if_cancelled()
        except BaseException as exc:
            self._host_disk.release_disk(on_disk)
            if claimed is not None:
                self._host_disk.unclaim(claimed)
            self._fail(entry, exc)
            entry.done.set()
            if not isinstance(exc, Exception):
                raise
            return
        seconds = _load_timer() - started
        # -- versions (issue 12): when a hit checks it next (`Revalidator`)
        if source == "store":
            entry.check_at = self._revalidator.confirmed(entry.model_id)
        else:
            entry.check_at = self._revalidator.due_at(entry.model_id)
        if not self._device.admit(entry, value, weights, seconds):
            return  # a new version whose key is loading afresh (from the store): it went
        if self._observers:
            self._observers.load_finished(entry.model_id, source, entry.nbytes, seconds)
        if entry.waiters == 0:  # every caller left: it is evictable now, which may serve the line
            self._device.serve_line()
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

    async def _swap_versions(self, model_id: str, stale: ModelVersion) -> None:
        """The store holds a new version of ``model_id`` instead of ``stale`` (found by a check,
        in a task of the cache's): copies in the lower tiers are dropped, and each resident
        entry gets a load of the new version that takes its place when ready
        (`DeviceTier.add_swap`). Uses are served by the old one meanwhile; its leases end on it.
        A load in flight of ``stale`` (it read the headers, maybe all the weights, before the
        check) is waited for and swapped too: else it would serve the old version after
        ``refresh`` said it changed."""
        await self._host_disk.drop_stale(model_id, None)
        for builder in (*self._builders, WEIGHTS):
            key = (builder, model_id)
            old = self._entries.get(key)
            if old is not None and not old.ready and old.info is not None:
                if old.info.version != stale:
                    continue  # a load that read the store after the change
                await old.done.wait()
                old = self._entries.get(key)
                if old is None or old.weights is None or old.weights.info.version != stale:
                    continue  # failed, or restarted on the new version (`load_one_version`)
            if old is None or not old.ready or key in self._device.swapping:
                continue
            new = self._device.add_swap(key, old)
            try:
                await self._load(new)
            finally:
                self._device.end_swap(new)
            if new.error is not None:
                logger.warning("new version of %r not loaded: %s", model_id, new.error)
            elif new.weights is not None:  # the old one may have gone meanwhile: nothing left
                await self._host_disk.drop_stale(model_id, new.weights.info.version)

    async def refresh(self, model_id: str) -> bool:
        """Check ``model_id`` against the store now; if the store holds another version, load
        it and swap it in (uses meanwhile get the old one) before returning. True if it changed.
        A model in no tier has nothing to compare: False. Raises StoreError when the store
        cannot be asked. A load of the old version in flight is waited for and swapped too; the
        new version needs its bytes beside the old one's, so a call inside a ``use()`` block
        whose lease those bytes need waits for that block (as `wait_idle` would)."""
        self._check_open()
        self._store.model_url(model_id)  # validates the id
        return await self._revalidator.check(model_id)

    def version_of(self, model_id: str) -> str | None:
        """The version (a short token) of ``model_id`` that new uses get now, or None when no
        tier holds it (or its store names no version). No I/O."""
        version = self._resident_version(model_id)
        return None if version is None else version.token

    def _fail(self, entry: DeviceEntry, exc: BaseException) -> None:
        """Undo everything a load did, and tell its waiters why."""
        self._device.failed(entry)
        if isinstance(exc, Abandoned):
            self._device.serve_line()  # bytes it held, if any, go to the line; nothing to remember
            return
        if isinstance(exc, Exception) and self._state is State.OPEN:
            exc = as_model_error(exc, entry.model_id)
            # Its frames hold the load's buffer: waiters may keep the error, and it is kept.
            release_frames(exc)
            entry.error = exc
            self._failures.load_failed(entry.builder, entry.model_id, exc)
            if self._observers:
                self._observers.load_failed(entry.model_id, exc)
            level = logging.INFO if isinstance(exc, ModelNotFoundError) else logging.WARNING
            logger.log(level, "failed to load %r: %s", entry.model_id, exc)
        else:  # cancelled: the cache is closing
            entry.error = CacheClosedError(
                f"the cache closed while model {entry.model_id!r} was loading",
                model_id=entry.model_id,
            )
        self._device.serve_line()

    async def _prefetch_host(self, model_id: str) -> None:
        """Bring ``model_id``'s weights into host memory, unless the device has (or is loading)
        them: then that load is shared rather than the store read twice."""
        self._check_open()
        self._store.model_url(model_id)  # validate before anything else
        # Missing or unreadable a moment ago: answered as use() would be.
        self._failures.raise_header_error(model_id, (*self._builders, WEIGHTS))
        while (entry := self._device_entry(model_id)) is not None:
            if entry.ready:
                return
            await entry.done.wait()
            if entry.error is not None:  # the load failed: so does this prefetch, as use() would
                raise for_caller(entry.error)
            # Loaded (then it is ready, or was evicted to host memory) or dropped: look again.
        await self._host_disk.load(model_id)

    def _device_entry(self, model_id: str) -> DeviceEntry | None:
        """An entry for ``model_id`` on the device, loading or ready, for any bound class."""
        for builder in (*self._builders, WEIGHTS):
            entry = self._entries.get((builder, model_id))
            if entry is not None:
                return entry
        return None
