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
* Version swaps (issue 12): a load of a new version (`add_swap`) is out of the index until it
  is ready, then takes its key's place (`_install`); its own task is its one waiter (never
  abandoned). The version it replaces is *retired*: out of the index and the policy, never
  evicted or handed down, its bytes reserved until its last lease ends. While a new version
  of an id loads, an eviction of that id is not handed to the tiers below.
"""

from __future__ import annotations

import logging
import math
from dataclasses import replace
from typing import Any

import anyio

from . import _observe
from ._backend import LoadedWeights
from ._builders import ModelBuilder
from ._concurrency import Event, new_event
from ._format import ModelInfo
from ._lower import HostDiskTiers
from ._observe import Observers
from ._policy import EvictionPolicy
from ._tiers import ByteBudget, TierStats, check_fits
from ._units import format_bytes
from ._versions import ModelVersion

__all__ = ["DeviceEntry", "DeviceTier", "Key"]

logger = logging.getLogger("modelcache")

#: A device entry's key: the builder of its model class, and the model id.
Key = tuple[ModelBuilder, str]


class DeviceEntry:
    """One model id (for one builder) on the device: loading, then ready until evicted."""

    __slots__ = (
        "abandon",
        "abandoned",
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
        "scope",
        "source",
        "stale",
        "url",
        "value",
        "waiters",
        "weights",
    )

    def __init__(self, key: Key, url: str | None = None) -> None:
        self.key = key
        self.builder, self.model_id = key
        #: The store URL of its model, from the id validated where the load began (None: not
        #: resolved yet, for a new version's load): the load neither validates nor resolves again.
        self.url = url
        self.ready = False
        self.value: Any = None
        self.weights: LoadedWeights | None = None
        self.nbytes = 0
        self.info: ModelInfo | None = None  # the headers, once the load has read them
        self.reserved = False  # True once nbytes are counted in the device budget
        self.source: str | None = None  # the tier a load in flight reads from, once known
        self.leases = 0
        self.waiters = 0
        #: Set when the load ends; a loaded entry's is then its tier's one set event
        #: (`DeviceTier.admit`), not an event (and its waiters' deque) kept per resident model.
        self.done: Event = new_event()
        self.error: BaseException | None = None
        self.admitted = 0.0  # when it became ready (`_observe.clock`), for the age at eviction
        #: Set while it is a victim chosen for a waiting load: new leases wait on it (it is set,
        #: and cleared, when the entry is evicted or no longer needed as a victim).
        self.draining: anyio.Event | None = None
        #: The scope of the load's stage in progress that its last waiter leaving cancels
        #: (`_stages`): the wait for the limiter, or an abandonable stage.
        self.abandon: anyio.CancelScope | None = None
        #: Its last waiter left during that stage (the stage's `Abandoned`).
        self.abandoned = False
        #: The cancel scope the load's task runs in (`Background.start_load`; None in a task
        #: group's task): an abandonable stage cancels it rather than enter a scope of its own.
        self.scope: anyio.CancelScope | None = None
        # -- versions (issue 12)
        #: When a hit starts a background check of its version (`Revalidator`).
        self.check_at = math.inf
        #: The entry this load of a new version takes the place of when it is ready.
        self.replaces: DeviceEntry | None = None
        #: Replaced by a new version: out of the index, its bytes freed by its last lease.
        self.retired = False
        #: The version the entry it replaces holds (a load of a new version only).
        self.stale: ModelVersion | None = None


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
        #: Loads of new versions in flight (out of the index until they replace the old one).
        self.swapping: dict[Key, DeviceEntry] = {}
        #: Replaced entries still leased: their bytes are freed when their last lease ends.
        self.retired: set[DeviceEntry] = set()
        #: The set ``done`` event every loaded entry shares (the first one loaded's own).
        self._loaded: Event | None = None
        self.swaps = 0
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
        if entry.retired and entry.leases == 0:
            self._free_retired(entry)  # serves the line
            return
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
        if not entry.waiters:
            self._left(entry)

    def _left(self, entry: DeviceEntry) -> None:
        """``entry``'s last waiter stopped waiting (leased it, or left)."""
        if not entry.ready and entry.abandon is not None:
            entry.abandoned = True
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

    def add(self, key: Key, url: str) -> DeviceEntry:
        """A new entry for a load about to start of the model at ``url`` (its validated id's)."""
        entry = self.entries[key] = DeviceEntry(key, url)
        self.loading += 1
        return entry

    def reserve_now(self, entry: DeviceEntry, info: ModelInfo) -> bool:
        """Reserve ``info``'s bytes for ``entry``'s load if that needs no wait (nobody in line,
        the bytes free or freed by evictions now); False: the load awaits `reserve`. A small
        model's load made a coroutine and a closure (two objects for the collector while it ran)
        for a reservation that never waited."""
        entry.nbytes = info.nbytes
        entry.info = info  # for describe()
        budget = self._budget
        if budget.waiting or not budget.try_reserve(info.nbytes):
            return False
        entry.reserved = True
        return True

    async def reserve(self, entry: DeviceEntry) -> None:
        """Wait in line for ``entry``'s bytes, which `reserve_now` found in use (`Abandoned`
        when nobody waits for the load any more)."""
        await self._budget.reserve(entry.nbytes, lambda: entry.waiters > 0)
        entry.reserved = True

    def admit(self, entry: DeviceEntry, value: Any, weights: LoadedWeights, seconds: float) -> bool:
        """``entry``'s load succeeded: it is resident, and evictable once its waiters leased it
        (when none are left, that may serve the line now). False for a new version that found
        another entry of its key (loaded, or in flight, since the old one left): it goes, that
        one stays."""
        entry.scope = None  # a resident model keeps no scope (nor its sets) for the collector
        if entry.replaces is not None and not self._install(entry):
            self.failed(entry)
            self._budget.serve_line()
            entry.done.set()
            return False
        entry.value, entry.weights = value, weights
        entry.ready = True
        entry.admitted = _observe.clock()
        self.loading -= 1
        self.loads += 1
        self.load_seconds += seconds
        self._budget.admit(entry)
        entry.done.set()
        # Its waiters are woken: later ones find the entry ready, or wait on a set event. Every
        # resident model keeping its own made three objects more per model for the garbage
        # collector, whose full passes scan every object the process keeps.
        if self._loaded is None:
            self._loaded = entry.done
        else:
            entry.done = self._loaded
        return True

    def failed(self, entry: DeviceEntry) -> None:
        """``entry``'s load ended without a model: it leaves, its bytes go back (the caller
        serves the line (`serve_line`) once it has told the waiters)."""
        entry.scope = None
        self.loading -= 1
        self.drop(entry)

    def serve_line(self) -> None:
        """Serve the line: bytes may have come free, or a waiting load may be unwanted."""
        self._budget.serve_line()

    # -- versions (issue 12): a new version loaded beside the old one, swapped in when ready ----

    def add_swap(self, key: Key, old: DeviceEntry) -> DeviceEntry:
        """A new entry for a load of a new version of ``old``'s model, out of the index until
        it is ready (`_install`). Its task is its one waiter: the load is never abandoned."""
        new = DeviceEntry(key)
        new.replaces = old
        new.stale = old.weights.info.version if old.weights is not None else None
        new.waiters = 1
        self.swapping[key] = new
        self.loading += 1
        return new

    def end_swap(self, new: DeviceEntry) -> None:
        """The swap's load ended (installed, failed, or given up): its task stops waiting."""
        new.waiters -= 1
        del self.swapping[new.key]
        self._left(new)

    def swapping_id(self, model_id: str) -> bool:
        """Whether a new version of ``model_id`` is being loaded (for any bound class)."""
        return any(key[1] == model_id for key in self.swapping)

    def _install(self, new: DeviceEntry) -> bool:
        """A new version's load finished: it takes the index from the entry it replaces, or
        another one of the old version; False when a load of its key is in flight, or one done
        holds another version (begun after the old one left, it read the store after the check
        did: it may hold a version newer than this one, which must not replace it)."""
        assert new.replaces is not None
        current = self.entries.get(new.key)
        replaces, new.replaces = new.replaces, None
        if current is not None:
            if current is not replaces and (
                current.weights is None or current.weights.info.version != new.stale
            ):
                return False
            self._retire(current)
        self.entries[new.key] = new
        self.swaps += 1
        logger.info("swapped in a new version of %r", new.model_id)
        return True

    def _retire(self, old: DeviceEntry) -> None:
        """Take ``old`` out of the index and the policy; its bytes stay reserved until its
        last lease ends (never evicted or demoted: no tier gets the old version back)."""
        self._budget.remove(old)  # also ends its drain, if it was a victim
        del self.entries[old.key]
        old.ready = False
        old.retired = True
        if old.leases:
            self.retired.add(old)
        else:
            self._free_retired(old)

    def _free_retired(self, old: DeviceEntry) -> None:
        self.retired.discard(old)
        old.retired = False
        old.value = old.weights = None
        if old.reserved:
            old.reserved = False
            self._budget.release(old.nbytes)  # serves the line

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
        if (
            weights is not None
            # A version being replaced is not handed down: a load of its id meanwhile would
            # find it in host memory and serve it after the swap (issue 12).
            and not self.swapping_id(entry.model_id)
            and self._host_disk.take_from_device(weights, self._copied_down)
        ):
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
        for entry in self.retired:  # still leased: their bytes are not used again
            entry.value = entry.weights = None

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
        # Loads of new versions and replaced versions still leased hold bytes outside the index.
        entries = list(
            dict.fromkeys([*self.entries.values(), *self.swapping.values(), *self.retired])
        )
        ready = [e for e in entries if e.ready]
        in_flight = sum(e.nbytes for e in entries if e.reserved and not e.ready)
        self._budget.check(
            ready, in_flight=in_flight, draining=[e for e in entries if e.draining is not None]
        )
        assert all(e.reserved for e in ready)
        # Leases held when the cache closed outlive their entries (dropped by `close`).
        assert self.leased == sum(e.leases for e in entries) or not open
        assert self.loading == sum(1 for e in entries if not e.ready and not e.retired)
        # A swap's load counts its own task as its one waiter (never abandoned); no caller
        # waits on it, and it is not in ``waiters``.
        assert all(e.waiters == 1 for e in self.swapping.values())
        assert self.waiters >= sum(e.waiters for e in entries) - len(self.swapping)
        assert all(e.retired and not e.ready and e.leases for e in self.retired)
        assert all(e.key not in self.entries or self.entries[e.key] is not e for e in self.retired)
        assert all(e.leases >= 0 and e.waiters >= 0 for e in entries)
