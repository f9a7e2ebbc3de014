"""Eviction policies: which unleased entries to drop to free bytes in a tier.

The contract is small on purpose (cachetools' ``popitem`` is the model): the cache tells the
policy what is resident and what was used, and asks it for victims; the cache alone decides which
entries may be evicted (``evictable``) and does the evicting. A policy never sees a leased entry
as a candidate and never mutates the cache. One policy object serves one tier (a `ByteBudget`).

Two policies ship:

* `LRUPolicy` - least recently used first, by bytes (what ModelMesh does).
* `CostAwarePolicy` - GreedyDual-Size-Frequency (Cherkasova 1998) with the cost of a miss taken
  from the cache's own load timings: the victim is the entry with the lowest

      H = L + F * C / S

  where C is the estimated seconds to bring the entry back from the tier it would fall to
  (`LoadCosts`: a fixed latency plus its size over that tier's learned bandwidth), S its size,
  F its aged access count (`FrequencyHistory`, kept across evictions) and L the tier's
  *inflation*: the H of the last victim. L only grows, so an entry that stops being used is
  overtaken by entries touched later: that is GDSF's ageing, and it needs no timers.

Invariants of `CostAwarePolicy` (the hit path must stay O(1)-ish): C / S is computed when an
entry enters the tier (so bandwidth learned later applies from its next admission), `accessed`
only bumps F and pushes one heap item, never scanning and never calling ``cost``; stale heap items (an entry touched again, or removed) are skipped when
popped and the heap is rebuilt when it holds more than twice the live entries; ties break on a
sequence number, so a policy is deterministic for a given sequence of calls.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import NamedTuple, Protocol

__all__ = [
    "CostAwarePolicy",
    "EvictionPolicy",
    "FrequencyHistory",
    "LRUPolicy",
    "PolicyEntry",
    "admits",
]


class PolicyEntry(Protocol):
    """What a policy may read of a cache entry."""

    @property
    def key(self) -> Hashable: ...

    @property
    def nbytes(self) -> int: ...


class EvictionPolicy(Protocol):
    def admitted(self, entry: PolicyEntry) -> None:
        """``entry`` became resident."""

    def accessed(self, entry: PolicyEntry) -> None:
        """``entry`` was used (a hit). Called on the hit path: must be O(1) and cheap."""

    def removed(self, entry: PolicyEntry) -> None:
        """``entry`` left the tier (evicted, failed, closed)."""

    def victims(
        self, need: int, evictable: Callable[[PolicyEntry], bool]
    ) -> list[PolicyEntry] | None:
        """Entries whose eviction frees at least ``need`` bytes, or None if that is impossible.

        Only entries for which ``evictable(entry)`` is true may be returned.
        """


class LRUPolicy:
    """Least recently used first, by bytes: evict the oldest unleased entries until enough is free."""

    __slots__ = ("_order",)

    def __init__(self) -> None:
        self._order: OrderedDict[Hashable, PolicyEntry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._order)

    def admitted(self, entry: PolicyEntry) -> None:
        self._order[entry.key] = entry

    def accessed(self, entry: PolicyEntry) -> None:
        self._order.move_to_end(entry.key)

    def removed(self, entry: PolicyEntry) -> None:
        self._order.pop(entry.key, None)

    def victims(
        self, need: int, evictable: Callable[[PolicyEntry], bool]
    ) -> list[PolicyEntry] | None:
        chosen: list[PolicyEntry] = []
        freed = 0
        for entry in self._order.values():
            if freed >= need:
                break
            if evictable(entry):
                chosen.append(entry)
                freed += entry.nbytes
        return chosen if freed >= need else None


class FrequencyHistory:
    """Aged access counts per key, remembered after the key leaves a tier.

    `touch` adds one; every ``period`` touches all counts are halved (keys reaching zero are
    forgotten), with ``period`` = max(``min_period``, ``period_factor`` x keys remembered), so
    the halving costs O(1) amortised per touch and a count measures recent popularity. One
    history is shared by a cache's device and host policies: the host tier never sees hits
    itself (a hit there is a promotion, which removes the entry).
    """

    __slots__ = ("_counts", "_min_period", "_period", "_period_factor", "_ticks")

    def __init__(self, *, min_period: int = 1024, period_factor: int = 32) -> None:
        if min_period < 1 or period_factor < 1:
            raise ValueError("min_period and period_factor must be at least 1")
        self._counts: dict[Hashable, int] = {}
        self._min_period = min_period
        self._period_factor = period_factor
        self._period = min_period
        self._ticks = 0

    def __len__(self) -> int:
        return len(self._counts)

    def get(self, key: Hashable) -> int:
        """The aged count of ``key`` (0 if unknown)."""
        return self._counts.get(key, 0)

    def touch(self, key: Hashable) -> int:
        """Count one access of ``key``; returns its aged count."""
        counts = self._counts
        count = counts.get(key, 0) + 1
        counts[key] = count
        self._ticks += 1
        if self._ticks >= self._period:
            self._age()
        return count

    def _age(self) -> None:
        self._counts = {k: c >> 1 for k, c in self._counts.items() if c > 1}
        self._period = max(self._min_period, self._period_factor * len(self._counts))
        self._ticks = 0


class _Slot:
    """A resident entry's place in a `CostAwarePolicy` (updated in place on a hit)."""

    __slots__ = ("entry", "priority", "seq", "unit", "value")

    def __init__(self, entry: PolicyEntry, unit: float) -> None:
        self.entry = entry
        #: C / S, computed when the entry was admitted (the hit path never calls ``cost``).
        self.unit = unit
        #: The heap item's sequence number that is current (older items for the key are stale).
        self.seq = 0
        #: F * C / S when the entry was last pushed (H = inflation then + value).
        self.value = 0.0
        self.priority = 0.0


class CostAwarePolicy:
    """GreedyDual-Size-Frequency with learned miss costs: evict the lowest L + F * C / S.

    ``cost(entry)`` is the estimated seconds to bring ``entry`` back after evicting it from this
    tier. A `ModelCache` binds its own estimate (learned bandwidth of the tier below, see
    `LoadCosts`) to a policy made without one; without any, C = S (GDSF degrades to an aged LFU).
    ``history`` is the `FrequencyHistory` giving F (a fresh one when None; a cache shares its
    device policy's history with its host policy).

    ``admission`` (for lower tiers): `admits` refuses a newcomer that would displace an entry
    worth more per byte (F * C / S) than itself, so a one-off model (a scan) does not flush a
    tier of models that come back. The cache asks only when the tier has no free room.
    """

    __slots__ = ("_cost", "_heap", "_inflation", "_live", "_seq", "admission", "history")

    def __init__(
        self,
        *,
        cost: Callable[[PolicyEntry], float] | None = None,
        history: FrequencyHistory | None = None,
        admission: bool = False,
    ) -> None:
        self._cost = cost
        self.history = history if history is not None else FrequencyHistory()
        self.admission = admission
        self._live: dict[Hashable, _Slot] = {}
        self._heap: list[tuple[float, int, Hashable]] = []
        self._inflation = 0.0
        self._seq = 0

    def __len__(self) -> int:
        return len(self._live)

    @property
    def inflation(self) -> float:
        """L: the priority of the last victim (only grows)."""
        return self._inflation

    @property
    def has_cost(self) -> bool:
        return self._cost is not None

    def bind_cost(self, cost: Callable[[PolicyEntry], float]) -> None:
        """Use ``cost`` unless the policy was made with its own (the cache calls this)."""
        if self._cost is None:
            self._cost = cost

    def unit_cost(self, entry: PolicyEntry) -> float:
        """C / S of ``entry``: seconds to bring it back per byte it holds."""
        nbytes = entry.nbytes
        cost = self._cost(entry) if self._cost is not None else float(nbytes)
        return cost / (nbytes if nbytes > 0 else 1)

    def value(self, entry: PolicyEntry) -> float:
        """F * C / S of ``entry``: the seconds of loading it saves per byte it holds."""
        return max(self.history.get(entry.key), 1) * self.unit_cost(entry)

    def priority(self, key: Hashable) -> float | None:
        """H of the resident ``key`` (None if it is not resident)."""
        slot = self._live.get(key)
        return None if slot is None else slot.priority

    def _push(self, slot: _Slot, key: Hashable, frequency: int) -> None:
        seq = self._seq = self._seq + 1
        value = (frequency if frequency > 1 else 1) * slot.unit
        priority = self._inflation + value
        slot.seq, slot.value, slot.priority = seq, value, priority
        heap = self._heap
        heapq.heappush(heap, (priority, seq, key))
        if len(heap) > 2 * len(self._live) + 64:
            self._compact()

    def _compact(self) -> None:
        self._heap = [(s.priority, s.seq, k) for k, s in self._live.items()]
        heapq.heapify(self._heap)

    def admitted(self, entry: PolicyEntry) -> None:
        key = entry.key
        slot = self._live[key] = _Slot(entry, self.unit_cost(entry))
        self._push(slot, key, self.history.get(key))

    def accessed(self, entry: PolicyEntry) -> None:
        # The hit path: `_push` inlined.
        key = entry.key
        live = self._live
        slot = live.get(key)
        if slot is None:  # not admitted (a policy shared oddly): treat as admitted now
            slot = live[key] = _Slot(entry, self.unit_cost(entry))
        seq = self._seq = self._seq + 1
        value = self.history.touch(key) * slot.unit  # touch() >= 1
        priority = self._inflation + value
        slot.seq, slot.value, slot.priority = seq, value, priority
        heap = self._heap
        heapq.heappush(heap, (priority, seq, key))
        if len(heap) > 2 * len(live) + 64:
            self._compact()

    def removed(self, entry: PolicyEntry) -> None:
        slot = self._live.get(entry.key)
        if slot is not None and slot.entry is entry:
            del self._live[entry.key]

    def _pop_live(self) -> tuple[tuple[float, int, Hashable], _Slot] | None:
        """Pop heap items until a live one (returned, already popped), dropping stale ones."""
        heap, live = self._heap, self._live
        while heap:
            item = heapq.heappop(heap)
            slot = live.get(item[2])
            if slot is not None and slot.seq == item[1]:
                return item, slot
        return None

    def victims(
        self, need: int, evictable: Callable[[PolicyEntry], bool]
    ) -> list[PolicyEntry] | None:
        chosen: list[PolicyEntry] = []
        popped: list[tuple[float, int, Hashable]] = []
        freed = 0
        last = self._inflation
        while freed < need:
            found = self._pop_live()
            if found is None:
                break
            item, slot = found
            popped.append(item)
            if evictable(slot.entry):
                chosen.append(slot.entry)
                freed += slot.entry.nbytes
                last = item[0]
        heap = self._heap
        for item in popped:  # chosen ones go stale once the cache removes them
            heapq.heappush(heap, item)
        if freed < need:
            return None
        self._inflation = max(self._inflation, last)
        return chosen

    def admits(self, entry: PolicyEntry) -> bool:
        """Whether ``entry`` is worth displacing this tier's next victim (always, without
        ``admission``). Called only when the tier has no free room for ``entry``."""
        if not self.admission:
            return True
        found = self._pop_live()
        if found is None:
            return True
        item, slot = found
        heapq.heappush(self._heap, item)
        # Both valued now (same frequencies, same bandwidth estimates): a tie keeps the victim.
        return self.value(entry) > self.value(slot.entry)


class _Candidate(NamedTuple):
    key: Hashable
    nbytes: int


def admits(policy: EvictionPolicy, key: Hashable, nbytes: int) -> bool:
    """Whether a tier using ``policy`` should take ``key`` when that means evicting: the
    policy's ``admits`` if it has one (`CostAwarePolicy`), else yes."""
    check: Callable[[PolicyEntry], bool] | None = getattr(policy, "admits", None)
    return True if check is None else check(_Candidate(key, nbytes))
