"""The device tier: built models, leased, under the device's byte budget.

`DeviceTier` owns the device entries (by key: a model class's builder and a model id), the
device `ByteBudget`, the tier's counters, the choice and eviction of victims, the leases, and
the admission of a loaded entry; `ModelCache` orchestrates loads and calls these verbs, and no
other module changes this state. Invariants (`check`; the tests call it after every step):

* The budget's reserved bytes = bytes of resident entries + bytes granted to loads in flight +
  bytes still being copied down, and never exceed the budget. Bytes are reserved from the
  model's headers before any weight byte is read.
* An entry is *evictable* only when it is ready, unleased and no task is waiting to lease it.
  Eviction happens inside one synchronous planning step (`ByteBudget.try_reserve`), never across
  an await; an evicted model is handed to the tiers below (`_evict`).
* A loaded entry's waiters lease it (`lease_loaded`) before they stop counting as its waiters,
  so nothing can evict it between its load and their leases.
* Fairness: when the load at the head of the line does not fit, victims are chosen for it among
  leased entries too; a *draining* entry hands out no new lease (the hit path checks
  ``draining``): its users wait until it is evicted (`wait_drained`) and then load it again.
* ``leased`` = the entries' leases; ``loading`` = entries not ready; ``waiters`` >= the
  entries' waiters (a waiter of a load that just failed counts until it wakes).
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

import anyio

from . import _observe
from ._backend import LoadedWeights
from ._builders import ModelBuilder
from ._format import ModelInfo
from ._lower import HostDiskTiers
from ._observe import Observers
from ._policy import EvictionPolicy
from ._tiers import ByteBudget, TierStats, check_fits
from ._units import format_bytes

__all__ = ["DeviceEntry", "DeviceTier", "Key"]

logger = logging.getLogger("modelcache")

#: A device entry's key: the builder of its model class, and the model id.
Key = tuple[ModelBuilder, str]


class DeviceEntry:
    """One model id (for one builder) on the device: loading, then ready until evicted."""

    __slots__ = (
        "abandon",
        "admitted",
        "builder",
        "done",
        "draining",
        "error",
        "info",
        "key",
        "leases",
        "model_id",
        "nbytes",
        "ready",
        "reserved",
        "source",
        "value",
        "waiters",
        "weights",
    )

    def __init__(self, key: Key) -> None:
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


class DeviceTier:
    """The device entries, their budget, leases and counters (see the module docstring)."""

    def __init__(
        self, budget: int, policy: EvictionPolicy, host_disk: HostDiskTiers, observers: Observers
    ) -> None:
        self._host_disk = host_disk
        self._observers = observers
        self._budget: ByteBudget[DeviceEntry] = ByteBudget(
            "device",
            budget,
            evictable=self._evictable,
            evict=self._evict,
            policy=policy,
            drainable=self._drainable,
            drain=self._start_draining,
            undrain=self._stop_draining,
            cost=host_disk.miss_costs.device,
        )
        self._policy = policy  # read on the hit path
        #: Entries by key, loading or ready. Read by the cache; changed only here.
        self.entries: dict[Key, DeviceEntry] = {}
        self.hits = self.misses = self.loads = 0
        self.loading = self.waiters = self.leased = 0
        self.load_seconds = 0.0

    @property
    def budget(self) -> int:
        return self._budget.budget

    @property
    def policy(self) -> EvictionPolicy:
        return self._policy

    def check_fits(self, info: ModelInfo) -> None:
        """ModelTooLargeError unless ``info``'s model can ever fit the device budget."""
        check_fits(self._budget, info)

    # -- leases ---------------------------------------------------------------------------------

    def take_lease(self, entry: DeviceEntry) -> None:
        """A hit: lease the ready ``entry`` without a load (no await, no I/O)."""
        entry.leases += 1
        self.leased += 1
        self.hits += 1
        self._policy.accessed(entry)

    def lease_loaded(self, entry: DeviceEntry) -> None:
        """Lease ``entry`` for a caller that waited for its load (a miss, counted already)."""
        entry.leases += 1
        self.leased += 1
        self._policy.accessed(entry)

    def release_lease(self, entry: DeviceEntry) -> None:
        entry.leases -= 1
        self.leased -= 1
        if entry.leases == 0 and self._budget.waiting:
            self._budget.serve_line()

    def join(self, entry: DeviceEntry) -> None:
        """A caller waits for ``entry``'s load (a miss)."""
        self.misses += 1
        entry.waiters += 1
        self.waiters += 1

    def leave(self, entry: DeviceEntry) -> None:
        """A caller stopped waiting for ``entry``'s load (leased it, or left)."""
        entry.waiters -= 1
        self.waiters -= 1
        if entry.waiters:
            return
        if not entry.ready and entry.abandon is not None:
            entry.abandon.cancel()  # nobody wants the load: leave the limiter's queue now
        if self._budget.waiting:
            # Its place in line may be unwanted now, or the entry may be a candidate victim.
            self._budget.serve_line()

    async def wait_drained(self, drained: anyio.Event) -> None:
        """Wait while an entry is a victim chosen for a waiting load (counted as a waiter)."""
        self.waiters += 1
        try:
            await drained.wait()
        finally:
            self.waiters -= 1

    # -- loads ----------------------------------------------------------------------------------

    def add(self, key: Key) -> DeviceEntry:
        """A new entry for a load about to start."""
        entry = self.entries[key] = DeviceEntry(key)
        self.loading += 1
        return entry

    async def reserve(self, entry: DeviceEntry, info: ModelInfo) -> None:
        """Reserve ``info``'s bytes for ``entry``'s load, waiting in line while they are in use
        (`Abandoned` when nobody waits for the load any more)."""
        entry.nbytes = info.nbytes
        entry.info = info  # for describe()
        await self._budget.reserve(entry.nbytes, lambda: entry.waiters > 0)
        entry.reserved = True

    def admit(self, entry: DeviceEntry, value: Any, weights: LoadedWeights, seconds: float) -> None:
        """``entry``'s load succeeded: it is resident, and evictable once its waiters leased it
        (when none are left, that may serve the line now)."""
        entry.value, entry.weights = value, weights
        entry.ready = True
        entry.admitted = _observe.clock()
        self.loading -= 1
        self.loads += 1
        self.load_seconds += seconds
        self._budget.admit(entry)
        entry.done.set()

    def failed(self, entry: DeviceEntry) -> None:
        """``entry``'s load ended without a model: it leaves, its bytes go back (the caller
        serves the line (`serve_line`) once it has told the waiters)."""
        self.loading -= 1
        self.drop(entry)

    def serve_line(self) -> None:
        """Serve the line: bytes may have come free, or a waiting load may be unwanted."""
        self._budget.serve_line()

    # -- eviction -------------------------------------------------------------------------------

    def _evictable(self, entry: DeviceEntry) -> bool:
        return entry.ready and entry.leases == 0 and entry.waiters == 0

    def _drainable(self, entry: DeviceEntry) -> bool:
        """May be chosen as a victim for a waiting load even while leased: no task is waiting
        for it to finish loading (those lease it first)."""
        return entry.ready and entry.waiters == 0

    @staticmethod
    def _start_draining(entry: DeviceEntry) -> None:
        entry.draining = anyio.Event()

    @staticmethod
    def _stop_draining(entry: DeviceEntry) -> None:
        drained, entry.draining = entry.draining, None
        if drained is not None:
            drained.set()

    def evict(self, key: Key) -> bool:
        """Evict ``key``'s entry now if it is resident and evictable; True if it left."""
        entry = self.entries.get(key)
        if entry is None or not self._evictable(entry):
            return False
        self._evict(entry)
        self._budget.serve_line()
        return True

    def _evict(self, entry: DeviceEntry) -> None:
        """Device eviction (synchronous): the tiers below take the model, or it is dropped."""
        weights, nbytes = entry.weights, entry.nbytes
        self.drop(entry, release=False)
        if self._observers:
            age = _observe.clock() - entry.admitted
            self._observers.evicted(entry.model_id, "device", nbytes, age)
        logger.info(
            "evicted %r from the device (%s)",
            entry.model_id,
            format_bytes(nbytes),
            extra={"model_id": entry.model_id, "nbytes": nbytes},
        )
        if weights is not None and self._host_disk.take_from_device(weights, self._copied_down):
            self._budget.start_freeing(nbytes)
        else:
            self._budget.drop_now(nbytes)

    def _copied_down(self, nbytes: int) -> None:
        self._budget.finish_freeing(nbytes)

    def drop(self, entry: DeviceEntry, *, release: bool = True) -> None:
        """Remove a resident or loading entry; give back its device bytes unless ``release`` is
        False (an eviction, whose caller decides how the bytes come free)."""
        if self.entries.get(entry.key) is entry:
            del self.entries[entry.key]
        if entry.ready:
            self._budget.remove(entry)  # also wakes the uses waiting for it to drain
        elif entry.draining is not None:
            self._budget.forget(entry)
        if entry.reserved:
            entry.reserved = False
            if release:
                self._budget.unreserve(entry.nbytes)
        entry.ready = False
        entry.value = entry.weights = None

    def close(self) -> None:
        """Drop every entry (the cache's task group has ended)."""
        for entry in list(self.entries.values()):
            self.drop(entry)

    # -- reading --------------------------------------------------------------------------------

    def stats(self) -> TierStats:
        """The tier's figures; its hits are leases taken without a load, its misses calls that
        started or joined a load."""
        models = sum(1 for e in self.entries.values() if e.ready)
        return replace(self._budget.stats(models), hits=self.hits, misses=self.misses)

    def check_fairness(self) -> None:
        """Victims are chosen for a waiting load (`ByteBudget.check_line`), once quiet."""
        self._budget.check_line([e for e in self.entries.values() if e.ready])

    def check(self, *, open: bool = True) -> None:
        """The tier's invariants (see the module docstring); the tests call it after every step."""
        entries = list(self.entries.values())
        ready = [e for e in entries if e.ready]
        in_flight = sum(e.nbytes for e in entries if e.reserved and not e.ready)
        self._budget.check(
            ready, in_flight=in_flight, draining=[e for e in entries if e.draining is not None]
        )
        assert all(e.reserved for e in ready)
        # Leases held when the cache closed outlive their entries (dropped by `close`).
        assert self.leased == sum(e.leases for e in entries) or not open
        assert self.loading == sum(1 for e in entries if not e.ready)
        assert self.waiters >= sum(e.waiters for e in entries)
        assert all(e.leases >= 0 and e.waiters >= 0 for e in entries)
