"""Eviction policies: which unleased entries to drop to free bytes in a tier.

The contract is small on purpose (cachetools' ``popitem`` is the model): the cache tells the
policy what is resident and what was used, and asks it for victims; the cache alone decides which
entries may be evicted (``evictable``) and does the evicting. A policy never sees a leased entry
as a candidate and never mutates the cache. One policy object serves one tier (a `ByteBudget`).

Two policies ship:

* `LRUPolicy` - least recently used first, by bytes (what ModelMesh does).
* `CostAwarePolicy` - GDSF-like (Cherkasova 1998) with the cost of a miss taken from the
  cache's own load timings, aged by decaying counts instead of GDSF's additive inflation: the
  victim is the entry with the lowest value now

      F * C / S

  where C is the estimated seconds to bring the entry back from the tier it would fall to
  (`LoadCosts`: a fixed latency plus its size over that tier's learned bandwidth), S its size
  and F its access count decayed exponentially (`FrequencyHistory`, kept across evictions).
  GDSF's inflation (adding the last victim's priority to every newcomer) ages a tier by
  recency, which lets a model seen once displace one used steadily for a long time; decayed
  counts age by popularity alone, at a pace fitted to the cache's size.

Invariants of `CostAwarePolicy` (the hit path is O(1) and never scans): every count decays at
the same rate, so an untouched entry's rank never changes, and ``log2(F * C / S) + clock`` as of
the entry's last access orders entries as their values now do. That number only rises on a hit,
so `accessed` bumps F and updates the entry's priority in place; its heap item keeps the older,
lower value until `victims` pops it, sees the entry's priority is higher and pushes it again
(stale items of removed entries are dropped then too; the heap is rebuilt when it holds more
than twice the live entries). C / S is computed when an entry enters the tier (so bandwidth
learned later applies from its next admission); `accessed` never calls ``cost``. Counts are kept
by model id, shared by a cache's device and host policies, and pruned only when victims are
chosen. Ties break on a sequence number, so a policy is deterministic for a given sequence of
calls.

Both policies answer a victims query that cannot succeed without a pass over the tier (under
memory pressure every lease that ends with a load waiting asks again, on the event loop): see
`_Unpinned`. The cache alone knows which entries are evictable and says nothing when a lease
ends, so a policy keeps the bytes of its entries *not suspected* of being pinned, an upper
bound on what a query can free once the suspects (entries admitted or used since the last
query - a use is a lease taken - and those a query found pinned) have been checked again. A
failed query costs that check: the leases held plus the uses since the last query, however many
entries the tier holds. A successful one examines entries in victim order until enough is
freed, as it always did; the victims chosen do not depend on this bookkeeping.
"""

from __future__ import annotations

import heapq
import math
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable, Sized
from typing import NamedTuple, Protocol

__all__ = [
    "CostAwarePolicy",
    "EvictionPolicy",
    "FrequencyHistory",
    "LRUPolicy",
    "PolicyEntry",
    "admits",
    "bind_cost",
    "policy_below",
]


class PolicyEntry(Protocol):
    """What a policy may read of a cache entry.

    ``nbytes`` must not change while the entry is resident (the cache's entries never do): a
    policy keeps running sums of it (`_Unpinned`), which would drift and could answer a
    victims query None while enough bytes are unleased. To resize an entry, remove it first.
    """

    @property
    def key(self) -> Hashable: ...

    @property
    def nbytes(self) -> int: ...


class EvictionPolicy(Protocol):
    """Picks a tier's victims. Beside these four methods a policy may have optional hooks,
    which a cache uses the same way whatever the policy's class (`bind_cost`, `policy_below`,
    `admits`); a policy without them gets the defaults:

    * ``bind_cost(cost)``: ``cost(entry)`` is the seconds to bring an entry of this tier back
      once evicted (the cache's learned load costs), offered when the tier is made.
    * ``history``: a `FrequencyHistory` of accesses, shared with the policy of the tier below
      (which sees no hits of its own: a hit there is a promotion, which removes the entry).
    * ``share_history(history)``: count accesses in the tier above's ``history``.
    * ``for_tier_below()``: a fresh policy of this kind for the tier below (sharing what it
      should); without it, the tier below runs `LRUPolicy`.
    * ``admits(entry)``: whether a newcomer is worth displacing the tier's next victim.
    """

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

        Only entries for which ``evictable(entry)`` is true may be returned. ``evictable`` is
        the cache's own test, consistent for the span of one call; it may change between calls
        without the policy being told (a lease that ends), so a policy must not trust an answer
        it got in an earlier call.
        """


def bind_cost(policy: EvictionPolicy, cost: Callable[[PolicyEntry], float]) -> None:
    """Offer ``cost`` to ``policy`` if it takes one (its ``bind_cost`` hook)."""
    hook: Callable[[Callable[[PolicyEntry], float]], None] | None = getattr(
        policy, "bind_cost", None
    )
    if hook is not None:
        hook(cost)


def policy_below(upper: EvictionPolicy, given: EvictionPolicy | None) -> EvictionPolicy:
    """The policy of the tier under one run by ``upper``: ``given`` (counting accesses in
    ``upper``'s history when both keep one), else ``upper``'s ``for_tier_below()``, else LRU."""
    history = getattr(upper, "history", None)
    if given is not None:
        share: Callable[[FrequencyHistory], None] | None = getattr(given, "share_history", None)
        if share is not None and isinstance(history, FrequencyHistory):
            share(history)
        return given
    below: Callable[[], EvictionPolicy] | None = getattr(upper, "for_tier_below", None)
    return below() if below is not None else LRUPolicy()


class _Unpinned:
    """The bytes a tier's policy could free at most, kept so that a query that cannot succeed
    does not pass over the tier.

    ``suspects`` are the entries that may be pinned now: admitted or used (a lease taken) since
    they were last checked, or found not evictable when they were. ``bytes`` is the sum over the
    other resident entries: an upper bound on the bytes evictable outside ``suspects``. `settle`
    checks the suspects again, as a query must (a lease that ends tells the policy nothing), and
    moves the released ones out; then ``bytes`` bounds every evictable byte, and a query for
    more answers None after a pass over the suspects only.
    """

    __slots__ = ("bytes", "suspects")

    def __init__(self) -> None:
        self.bytes = 0
        self.suspects: dict[Hashable, PolicyEntry] = {}

    def admitted(self, entry: PolicyEntry) -> None:
        self.suspects[entry.key] = entry  # likely leased by the callers that waited for it

    def suspect(self, entry: PolicyEntry) -> None:
        """``entry`` may be pinned now (used, or found not evictable)."""
        suspects = self.suspects
        if entry.key not in suspects:
            suspects[entry.key] = entry
            self.bytes -= entry.nbytes

    def cleared(self, entry: PolicyEntry) -> None:
        """``entry`` was found evictable."""
        if self.suspects.pop(entry.key, None) is not None:
            self.bytes += entry.nbytes

    def removed(self, entry: PolicyEntry) -> None:
        if self.suspects.pop(entry.key, None) is None:
            self.bytes -= entry.nbytes

    def settle(self, evictable: Callable[[PolicyEntry], bool]) -> None:
        """Move the suspects that are evictable now out of ``suspects``."""
        # A new dict, not deletions from the old one: a dict keeps its size when keys leave, and
        # iterating one that once held every entry of the tier would cost a pass over the tier.
        kept: dict[Hashable, PolicyEntry] = {}
        for key, entry in self.suspects.items():
            if evictable(entry):
                self.bytes += entry.nbytes
            else:
                kept[key] = entry
        self.suspects = kept

    def check(self, resident: Iterable[PolicyEntry]) -> None:
        """Raise AssertionError unless the counts describe the ``resident`` entries."""
        entries = {entry.key: entry for entry in resident}
        assert all(entries.get(k) is e for k, e in self.suspects.items()), "a stale suspect"
        free = sum(e.nbytes for k, e in entries.items() if k not in self.suspects)
        assert self.bytes == free, f"unpinned bytes {self.bytes}, resident says {free}"

    def cannot_free(self, need: int, evictable: Callable[[PolicyEntry], bool]) -> bool:
        """Whether no choice of victims can free ``need`` bytes (the suspects are checked only
        when the other entries alone fall short)."""
        if self.bytes >= need:
            return False
        self.settle(evictable)
        return self.bytes < need


class LRUPolicy:
    """Least recently used first, by bytes: evict the oldest unleased entries until enough is free."""

    __slots__ = ("_order", "_unpinned")

    def __init__(self) -> None:
        self._order: OrderedDict[Hashable, PolicyEntry] = OrderedDict()
        self._unpinned = _Unpinned()

    def __len__(self) -> int:
        return len(self._order)

    def admitted(self, entry: PolicyEntry) -> None:
        old = self._order.get(entry.key)
        if old is not None:  # admitted again without leaving: count it once
            self._unpinned.removed(old)
        self._order[entry.key] = entry
        self._unpinned.admitted(entry)

    def accessed(self, entry: PolicyEntry) -> None:
        # The hit path: `_Unpinned.suspect` inlined (a use is a lease taken).
        key = entry.key
        self._order.move_to_end(key)
        unpinned = self._unpinned
        if key not in unpinned.suspects:
            resident = unpinned.suspects[key] = self._order[key]
            unpinned.bytes -= resident.nbytes

    def for_tier_below(self) -> LRUPolicy:
        """The tier below runs LRU too."""
        return LRUPolicy()

    def removed(self, entry: PolicyEntry) -> None:
        left = self._order.pop(entry.key, None)
        if left is not None:
            self._unpinned.removed(left)

    def check(self) -> None:
        """Raise AssertionError unless the policy's own counts are consistent (tests)."""
        self._unpinned.check(self._order.values())

    def victims(
        self, need: int, evictable: Callable[[PolicyEntry], bool]
    ) -> list[PolicyEntry] | None:
        unpinned = self._unpinned
        if unpinned.cannot_free(need, evictable):
            return None
        chosen: list[PolicyEntry] = []
        freed = 0
        for entry in self._order.values():
            if freed >= need:
                break
            if evictable(entry):
                unpinned.cleared(entry)
                chosen.append(entry)
                freed += entry.nbytes
            else:
                unpinned.suspect(entry)
                if unpinned.cannot_free(need, evictable):
                    return None
        return chosen if freed >= need else None


class FrequencyHistory:
    """Access counts per key that decay exponentially, remembered after the key leaves a tier.

    Every `touch` adds one to the key's count and advances a clock by 1 / half-life, so every
    count halves each half-life of touches: a count measures *recent* popularity, and the
    popularity of a model that stops being used fades at the same pace as every other's. The
    half-life is ``half_life_factor`` x the entries resident in the tiers whose policies share
    this history (at least ``min_half_life``): a small cache forgets fast and follows shifts, a
    large one keeps long counts for its long tail. Counts are stored with the clock reading of
    their last touch and decayed when read, so a touch is O(1); after max(``min_half_life``,
    keys remembered) touches, `maintain` (called by the policies when they choose victims, off
    the hit path) forgets keys whose count fell below 1/64 and re-fits the half-life. Keys are
    model ids (`history_key`), so the tiers of one cache count the same model once. One history is shared by a cache's device and host policies:
    the host tier never sees hits itself (a hit there is a promotion, which removes the entry).
    """

    __slots__ = ("_counts", "_factor", "_min_half_life", "_rate", "_ticks", "_tiers", "clock")

    #: Counts below this are forgotten when the history is pruned.
    FORGET_BELOW = 1 / 64

    def __init__(self, *, half_life_factor: float = 32.0, min_half_life: int = 1024) -> None:
        if min_half_life < 1 or not half_life_factor > 0:
            raise ValueError("min_half_life must be at least 1 and half_life_factor positive")
        #: key -> (count at its last touch, clock then)
        self._counts: dict[Hashable, tuple[float, float]] = {}
        self._factor = half_life_factor
        self._min_half_life = min_half_life
        self._rate = 1.0 / min_half_life
        self._ticks = 0
        self._tiers: list[Sized] = []
        #: Half-lives elapsed so far (advances by 1 / half-life per touch).
        self.clock = 0.0

    def __len__(self) -> int:
        return len(self._counts)

    @property
    def half_life(self) -> float:
        """Touches after which every count has halved (re-fitted when the history is pruned)."""
        return 1.0 / self._rate

    def attach(self, tier: Sized) -> None:
        """Count ``tier``'s resident entries when fitting the half-life (policies call this)."""
        self._tiers.append(tier)

    def get(self, key: Hashable) -> float:
        """The decayed count of ``key`` now (0 if unknown or forgotten)."""
        found = self._counts.get(key)
        return 0.0 if found is None else found[0] * 2.0 ** (found[1] - self.clock)

    def touch(self, key: Hashable) -> float:
        """Count one access of ``key``; returns its decayed count (at least 1)."""
        counts, clock = self._counts, self.clock
        found = counts.get(key)
        count = 1.0 if found is None else found[0] * 2.0 ** (found[1] - clock) + 1.0
        counts[key] = (count, clock)
        self.clock = clock + self._rate
        self._ticks += 1
        return count

    def maintain(self) -> None:
        """Forget faded counts and re-fit the half-life when enough touches have passed.

        A pass over every count: policies call it when choosing victims or admitting (a load is
        under way then), never on the hit path, so a hit never pays for it.
        """
        if self._ticks >= self._min_half_life and self._ticks >= len(self._counts):
            self._prune()

    def _prune(self) -> None:
        clock, floor = self.clock, self.FORGET_BELOW
        self._counts = {
            k: v for k, v in self._counts.items() if v[0] * 2.0 ** (v[1] - clock) >= floor
        }
        self._ticks = 0
        resident = sum(len(tier) for tier in self._tiers)
        self._rate = 1.0 / max(self._min_half_life, self._factor * resident)


#: The count given to an entry the history does not know (admitted, never used).
_MIN_COUNT = 1e-6


def history_key(entry: PolicyEntry) -> Hashable:
    """The key an entry's accesses are counted under: its model id where it has one (a device
    entry's own key also names the model class), else its key."""
    return getattr(entry, "model_id", entry.key)


def _log2(value: float) -> float:
    """log2 of a value F * C / S (a zero cost ranks below every positive one)."""
    return math.log2(value) if value > 0 else -math.inf


class CostAwarePolicy:
    """Size- and cost-aware LFU with decaying counts: evict the lowest F * C / S, F decayed.

    ``cost(entry)`` is the estimated seconds to bring ``entry`` back after evicting it from this
    tier. A `ModelCache` binds its own estimate (learned bandwidth of the tier below, see
    `LoadCosts`) to a policy made without one; without any, C = S (an LFU with decay).
    ``history`` is the `FrequencyHistory` giving F (a fresh one when None; a cache shares its
    device policy's history with its host policy); the policy attaches itself to it, so its
    resident entries count towards the half-life.

    ``admission`` (for lower tiers): `admits` refuses a newcomer that would displace an entry
    worth more per byte (F * C / S) than itself, so a one-off model (a scan) does not flush a
    tier of models that come back. The cache asks only when the tier has no free room.
    """

    __slots__ = (
        "_cost",
        "_heap",
        "_keys",
        "_live",
        "_priorities",
        "_seq",
        "_seqs",
        "_units",
        "_unpinned",
        "admission",
        "history",
    )

    def __init__(
        self,
        *,
        cost: Callable[[PolicyEntry], float] | None = None,
        history: FrequencyHistory | None = None,
        admission: bool = False,
    ) -> None:
        self._cost = cost
        self.history = history if history is not None else FrequencyHistory()
        self.history.attach(self)
        self.admission = admission
        #: A resident entry's place, by its key: the entry, and three numbers in dicts of their
        #: own rather than an object per entry (a slot object was one more object per resident
        #: model for each full pass of the garbage collector to scan; floats and ints in a dict
        #: are none). ``_units``: C / S, computed when the entry was admitted (the hit path never
        #: calls ``cost``); ``_seqs``: the sequence number of its heap item that is current (older
        #: items for the key are stale); ``_priorities``: log2(F * C / S) + the history's clock at
        #: its last access: a hit raises it in place, the heap item keeps the value it was pushed
        #: with until `victims` re-files it.
        self._live: dict[Hashable, PolicyEntry] = {}
        self._units: dict[Hashable, float] = {}
        self._seqs: dict[Hashable, int] = {}
        self._priorities: dict[Hashable, float] = {}
        #: (priority, seq) items; the key of each is ``_keys[seq]``. A heap item of atomic values
        #: is no object for the garbage collector to scan (a key is a tuple holding the model
        #: class's builder: an item holding it was one more such object per resident entry).
        self._heap: list[tuple[float, int]] = []
        self._keys: dict[int, Hashable] = {}
        self._seq = 0
        self._unpinned = _Unpinned()

    def __len__(self) -> int:
        return len(self._live)

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
        """F * C / S of ``entry`` now: the seconds of loading it saves per byte it holds."""
        return max(self.history.get(history_key(entry)), _MIN_COUNT) * self.unit_cost(entry)

    def for_tier_below(self) -> CostAwarePolicy:
        """A policy for the tier below counting accesses in this one's history (that tier sees
        no hits of its own: a hit there is a promotion, which removes the entry)."""
        return CostAwarePolicy(history=self.history)

    def share_history(self, history: FrequencyHistory) -> None:
        """Count accesses in ``history`` (another tier's policy's) instead of this one's own."""
        if history is not self.history:
            self.history = history
            history.attach(self)

    def priority(self, key: Hashable) -> float | None:
        """log2 of the resident ``key``'s value when last pushed, plus the clock then (None if
        it is not resident): it orders entries as their values now do."""
        return self._priorities.get(key)

    def _push(self, key: Hashable, priority: float) -> None:
        seq = self._seq = self._seq + 1
        self._seqs[key], self._priorities[key] = seq, priority
        heap = self._heap
        heapq.heappush(heap, (priority, seq))
        self._keys[seq] = key
        if len(heap) > 2 * len(self._live) + 64:
            self._compact()

    def _compact(self) -> None:
        priorities = self._priorities
        self._heap = [(priorities[k], seq) for k, seq in self._seqs.items()]
        self._keys = {seq: k for k, seq in self._seqs.items()}
        heapq.heapify(self._heap)

    def admitted(self, entry: PolicyEntry) -> None:
        key = entry.key
        history = self.history
        history.maintain()
        old = self._live.get(key)
        if old is not None:  # admitted again without leaving: count it once
            self._unpinned.removed(old)
        self._live[key] = entry
        unit = self._units[key] = self.unit_cost(entry)
        self._unpinned.admitted(entry)
        count = max(history.get(history_key(entry)), _MIN_COUNT)
        self._push(key, _log2(count * unit) + history.clock)

    def accessed(self, entry: PolicyEntry) -> None:
        # The hit path, O(1): a count update and a log. Priorities only rise on a hit (decay is
        # in the clock term, the same for every entry), so the heap item is left as it is and
        # `victims` re-files it when it surfaces with a stale, lower value.
        key = entry.key
        unit = self._units.get(key)
        if unit is None:  # not admitted (a policy shared oddly): treat as admitted now
            self.admitted(entry)
            unit = self._units[key]
        history = self.history
        clock = history.clock
        value = history.touch(getattr(entry, "model_id", key)) * unit  # history_key
        self._priorities[key] = (math.log2(value) if value > 0 else -math.inf) + clock  # _log2
        unpinned = self._unpinned  # `_Unpinned.suspect` inlined (a use is a lease taken)
        if key not in unpinned.suspects:
            resident = self._live[key]
            unpinned.suspects[key] = resident
            unpinned.bytes -= resident.nbytes

    def removed(self, entry: PolicyEntry) -> None:
        key = entry.key
        if self._live.get(key) is entry:
            del self._live[key], self._units[key], self._seqs[key], self._priorities[key]
            self._unpinned.removed(entry)

    def _pop_live(self) -> tuple[tuple[float, int], PolicyEntry] | None:
        """Pop the live entry of lowest priority now (returned, already popped; its key stays
        in ``_keys`` for the item to be pushed back): items of removed entries are dropped, and
        items whose entry was hit since are pushed again with the entry's current priority."""
        heap, seqs, keys = self._heap, self._seqs, self._keys
        while heap:
            item = heapq.heappop(heap)
            seq = item[1]
            key = keys[seq]
            if seqs.get(key) != seq:
                del keys[seq]  # each seq is in the heap at most once: this was its item
                continue
            priority = self._priorities[key]
            if priority > item[0]:
                heapq.heappush(heap, (priority, seq))
                continue
            return item, self._live[key]
        return None

    def victims(
        self, need: int, evictable: Callable[[PolicyEntry], bool]
    ) -> list[PolicyEntry] | None:
        self.history.maintain()
        unpinned = self._unpinned
        if unpinned.cannot_free(need, evictable):
            return None  # no heap work: the heap stays as it was
        chosen: list[PolicyEntry] = []
        popped: list[tuple[float, int]] = []
        freed = 0
        while freed < need:
            found = self._pop_live()
            if found is None:
                break
            item, entry = found
            popped.append(item)
            if evictable(entry):
                unpinned.cleared(entry)
                chosen.append(entry)
                freed += entry.nbytes
            else:
                unpinned.suspect(entry)
                if unpinned.cannot_free(need, evictable):
                    break
        heap = self._heap
        for item in popped:  # chosen ones go stale once the cache removes them
            heapq.heappush(heap, item)
        return chosen if freed >= need else None

    def check(self) -> None:
        """Raise AssertionError unless the policy's own counts are consistent (tests)."""
        self._unpinned.check(self._live.values())
        assert all(e.key == k for k, e in self._live.items()), "an entry under another key"
        assert self._live.keys() == self._units.keys() == self._seqs.keys(), "a key half filed"
        assert self._live.keys() == self._priorities.keys(), "a key half filed"
        seqs = [seq for _, seq in self._heap]
        assert len(seqs) == len(self._keys), "a heap item for two keys, or a key for none"
        assert set(seqs) == set(self._keys), "a heap item's key"
        assert all(self._keys.get(s) == k for k, s in self._seqs.items()), "an entry unfiled"

    def admits(self, entry: PolicyEntry) -> bool:
        """Whether ``entry`` is worth displacing this tier's next victim (always, without
        ``admission``). Called only when the tier has no free room for ``entry``."""
        if not self.admission:
            return True
        found = self._pop_live()
        if found is None:
            return True
        item, victim = found
        heapq.heappush(self._heap, item)
        # Both valued now (same frequencies, same bandwidth estimates); a tie goes to the
        # newcomer, the more recently used of the two.
        return self.value(entry) >= self.value(victim)


class _Candidate(NamedTuple):
    """A model offered to a tier that keys its entries by model id (the host tier): it reads
    as that tier's entries do, for the policy and for the cost bound to it."""

    key: Hashable
    nbytes: int
    model_id: str


def admits(policy: EvictionPolicy, model_id: str, nbytes: int) -> bool:
    """Whether a tier using ``policy`` (entries keyed by model id) should take ``model_id``
    when that means evicting: the policy's ``admits`` if it has one, else yes."""
    check: Callable[[PolicyEntry], bool] | None = getattr(policy, "admits", None)
    return True if check is None else check(_Candidate(model_id, nbytes, model_id))
