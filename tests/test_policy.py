"""Eviction policies: one contract suite for every policy, GDSF specifics, learned load costs,
the cache's use of them, and the policy simulator's accounting."""

from __future__ import annotations

import importlib
import math
import random
import sys
from collections import OrderedDict
from collections.abc import Callable, Hashable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import modelcache._cache as cache_module
from modelcache import (
    CostAwarePolicy,
    EvictionPolicy,
    FrequencyHistory,
    LoadCosts,
    LRUPolicy,
    ModelCache,
    ModelInfo,
)
from modelcache._policy import PolicyEntry, admits

from .conftest import MemoryModels, check_invariants

BENCHES = Path(__file__).resolve().parent.parent / "benches"


class Item:
    __slots__ = ("key", "nbytes")

    def __init__(self, key: Hashable, nbytes: int) -> None:
        self.key = key
        self.nbytes = nbytes


def _cost_by_key(entry: PolicyEntry) -> float:
    return 0.01 + entry.nbytes / 1e9 * (1 + hash(entry.key) % 3)


POLICIES: dict[str, Callable[[], EvictionPolicy]] = {
    "lru": LRUPolicy,
    "cost-aware": CostAwarePolicy,
    "cost-aware-with-cost": lambda: CostAwarePolicy(cost=_cost_by_key),
    "cost-aware-admission": lambda: CostAwarePolicy(cost=_cost_by_key, admission=True),
}


def _run_ops(policy: EvictionPolicy, seed: int) -> list[list[Hashable] | None]:
    """A random sequence of admits, hits, removals and victim requests; returns every answer,
    checking the contract on each."""
    rng = random.Random(seed)
    resident: dict[Hashable, Item] = {}
    leased: set[Hashable] = set()
    answers: list[list[Hashable] | None] = []
    check: Callable[[], None] = getattr(policy, "check", lambda: None)
    for step in range(2000):
        check()
        op = rng.random()
        if op < 0.3 or not resident:
            item = Item(f"m{step}", rng.choice((1, 10, 100, 1000)))
            resident[item.key] = item
            policy.admitted(item)
        elif op < 0.7:
            policy.accessed(resident[rng.choice(sorted(resident, key=str))])
        elif op < 0.8:
            key = rng.choice(sorted(resident, key=str))
            leased.symmetric_difference_update({key})
        elif op < 0.85:
            key = rng.choice(sorted(resident, key=str))
            policy.removed(resident.pop(key))
            leased.discard(key)
        else:
            need = rng.randint(1, 3000)
            evictable = sum(i.nbytes for k, i in resident.items() if k not in leased)
            got = policy.victims(need, lambda e: e.key not in leased)
            if got is None:
                assert evictable < need
                answers.append(None)
                continue
            keys = [e.key for e in got]
            assert len(set(keys)) == len(keys)
            assert all(k in resident and k not in leased for k in keys)
            assert sum(e.nbytes for e in got) >= need
            answers.append(keys)
            for e in got:
                policy.removed(e)
                del resident[e.key]
    return answers


@pytest.mark.parametrize("make", POLICIES.values(), ids=POLICIES.keys())
def test_contract_under_random_operations(make: Callable[[], EvictionPolicy]) -> None:
    """Victims are resident, unleased, distinct and free enough; None only when impossible."""
    for seed in range(3):
        _run_ops(make(), seed)


@pytest.mark.parametrize("make", POLICIES.values(), ids=POLICIES.keys())
def test_deterministic_for_a_sequence(make: Callable[[], EvictionPolicy]) -> None:
    """The same calls give the same victims, in the same order."""
    assert _run_ops(make(), 42) == _run_ops(make(), 42)


@pytest.mark.parametrize("make", POLICIES.values(), ids=POLICIES.keys())
def test_never_picks_a_leased_entry(make: Callable[[], EvictionPolicy]) -> None:
    """With the only cheap victims leased, the others are chosen, or None if too few."""
    policy = make()
    items = [Item(i, 100) for i in range(4)]
    for item in items:
        policy.admitted(item)
    leased = {0, 1}
    got = policy.victims(200, lambda e: e.key not in leased)
    assert got is not None and {e.key for e in got} == {2, 3}
    assert policy.victims(201, lambda e: e.key not in leased) is None
    assert policy.victims(1, lambda e: False) is None


@pytest.mark.parametrize("make", POLICIES.values(), ids=POLICIES.keys())
def test_removed_entries_are_never_victims(make: Callable[[], EvictionPolicy]) -> None:
    """An entry removed from the tier is never offered again."""
    policy = make()
    a, b = Item("a", 10), Item("b", 10)
    policy.admitted(a)
    policy.admitted(b)
    policy.accessed(a)
    policy.removed(a)
    assert policy.victims(10, lambda e: True) == [b]
    assert policy.victims(11, lambda e: True) is None


class CountingEvictable:
    """The cache's ``evictable`` test (unleased), counting the entries it is asked about."""

    def __init__(self) -> None:
        self.leased: set[Hashable] = set()
        self.calls = 0

    def __call__(self, entry: PolicyEntry) -> bool:
        self.calls += 1
        return entry.key not in self.leased


@pytest.mark.parametrize("make", POLICIES.values(), ids=POLICIES.keys())
@pytest.mark.parametrize("n", [1_000, 10_000])
def test_a_query_that_cannot_succeed_examines_only_leased_and_used_entries(
    make: Callable[[], EvictionPolicy], n: int
) -> None:
    """Under pressure (a load needs more than every unleased byte) each lease that ends asks
    again: a query that cannot succeed examines the entries leased or used since the last query,
    whatever the number resident; one that can examines its victims and the leased ones."""
    policy = make()
    items = [Item(i, 10) for i in range(n)]
    for item in items:
        policy.admitted(item)
    evictable = CountingEvictable()
    rng = random.Random(n)
    held: list[Item] = []
    for item in rng.sample(items, 8):  # leases held, as the cache takes them
        evictable.leased.add(item.key)
        policy.accessed(item)
        held.append(item)
    need = 10 * n  # every byte: impossible while anything is leased
    assert policy.victims(need, evictable) is None  # the first query checks the admissions
    for _ in range(50):  # a lease starts, the oldest ends, the waiting load asks again
        item = rng.choice(items)
        if item.key not in evictable.leased:
            evictable.leased.add(item.key)
            policy.accessed(item)
            held.append(item)
        evictable.leased.discard(held.pop(0).key)
        evictable.calls = 0
        assert policy.victims(need, evictable) is None
        assert evictable.calls <= len(held) + 1
    # The few suspects left do not sit in a table sized for all n (a dict keeps its size when
    # keys leave, and iterating it costs a pass over that size).
    assert sys.getsizeof(policy._unpinned.suspects) < 4096  # type: ignore[attr-defined]
    evictable.calls = 0
    got = policy.victims(30, evictable)
    assert got is not None and sum(e.nbytes for e in got) == 30
    assert evictable.leased.isdisjoint(e.key for e in got)
    assert evictable.calls <= 3 + len(held)


def test_cost_aware_keeps_what_is_expensive_to_reload() -> None:
    """Of two models of one size used alike, the one slower to bring back stays."""
    costs = {"slow": 8.0, "fast": 0.1}
    policy = CostAwarePolicy(cost=lambda e: costs[str(e.key)])
    slow, fast = Item("slow", 100), Item("fast", 100)
    for item in (slow, fast):
        policy.admitted(item)
        policy.accessed(item)
    assert policy.victims(1, lambda e: True) == [fast]


def test_cost_aware_keeps_what_is_used_more() -> None:
    """Of two equal models, the one used more often stays, even if used less recently."""
    policy = CostAwarePolicy()
    hot, cold = Item("hot", 100), Item("cold", 100)
    policy.admitted(hot)
    for _ in range(5):
        policy.accessed(hot)
    policy.admitted(cold)
    policy.accessed(cold)
    assert policy.victims(1, lambda e: True) == [cold]


def test_cost_aware_prefers_evicting_large_models_per_second_saved() -> None:
    """With reload cost latency + size / bandwidth, a big model frees more bytes per second
    of reloading lost than a small one: it goes first."""
    policy = CostAwarePolicy(cost=lambda e: 0.05 + e.nbytes / 1e9)
    small, big = Item("small", 1 << 20), Item("big", 4 << 30)
    for item in (small, big):
        policy.admitted(item)
        policy.accessed(item)
    assert policy.victims(1, lambda e: True) == [big]


def test_decay_ages_out_a_model_that_stopped_being_used() -> None:
    """A once-hot model is evicted after enough newer models come and go (its count decays)."""
    policy = CostAwarePolicy(history=FrequencyHistory(min_half_life=16))
    old = Item("old", 100)
    policy.admitted(old)
    for _ in range(3):
        policy.accessed(old)
    evicted_old_at = None
    for i in range(200):
        new = Item(i, 100)
        policy.admitted(new)
        policy.accessed(new)
        policy.accessed(new)
        got = policy.victims(100, lambda e: True)
        assert got is not None
        policy.removed(got[0])
        if got[0] is old:
            evicted_old_at = i
            break
    assert evicted_old_at is not None and evicted_old_at > 0


def test_heap_order_matches_the_decayed_values_now() -> None:
    """Entries touched at different times are evicted in the order of their F * C / S now."""
    history = FrequencyHistory(min_half_life=8)
    policy = CostAwarePolicy(history=history)
    items = [Item(f"m{i}", 10 * (1 + i % 3)) for i in range(12)]
    for item in items:
        policy.admitted(item)
    rng = random.Random(3)
    for _ in range(60):
        policy.accessed(rng.choice(items))
    expected = sorted(items, key=lambda e: (policy.value(e), policy.priority(e.key)))
    got: list[PolicyEntry] = []
    while len(got) < len(items):
        victims = policy.victims(1, lambda e: True)
        assert victims is not None
        got += victims
        policy.removed(victims[0])
    assert [e.key for e in got] == [e.key for e in expected]


def test_the_heap_stays_proportional_to_the_entries() -> None:
    """Lazy invalidation: a million-hit pattern on 3 entries keeps the heap small."""
    policy = CostAwarePolicy()
    items = [Item(i, 10) for i in range(3)]
    for item in items:
        policy.admitted(item)
    for n in range(20_000):
        policy.accessed(items[n % 3])
    assert len(policy._heap) <= 2 * len(policy) + 65


def test_admission_refuses_a_one_off_over_a_model_that_comes_back() -> None:
    """With admission, a model seen once does not displace one seen often; without, it does."""
    history = FrequencyHistory()
    for _ in range(4):
        history.touch("regular")
    history.touch("one-off")
    strict = CostAwarePolicy(history=history, admission=True)
    lenient = CostAwarePolicy(history=history)
    for policy in (strict, lenient):
        policy.admitted(Item("regular", 100))
    assert not admits(strict, "one-off", 100)
    assert admits(lenient, "one-off", 100)
    for _ in range(10):
        history.touch("one-off")
    assert admits(strict, "one-off", 100)
    assert admits(LRUPolicy(), "anything", 1)


def test_frequency_history_decays_by_half_each_half_life() -> None:
    """Every count halves each half-life of touches; counts below 1/64 are forgotten."""
    history = FrequencyHistory(min_half_life=4)
    assert history.half_life == 4
    for _ in range(2):
        history.touch("a")
    # each touch advances the clock a quarter half-life: the first decayed once by then
    assert history.get("a") == pytest.approx((2 ** (-0.25) + 1) * 2 ** (-0.25))
    before = history.get("a")
    for _ in range(4):
        history.touch("b")
    assert history.get("a") == pytest.approx(before / 2)
    for _ in range(64):
        history.touch("c")
    history.maintain()  # off the hit path: when a policy chooses victims
    assert history.get("a") == 0.0 and history.get("b") == 0.0
    assert len(history) == 1
    with pytest.raises(ValueError):
        FrequencyHistory(min_half_life=0)


def test_half_life_follows_the_entries_resident() -> None:
    """The half-life is refitted to half_life_factor x the attached tiers' resident entries."""
    history = FrequencyHistory(half_life_factor=2, min_half_life=4)
    policy = CostAwarePolicy(history=history)
    items = [Item(i, 1) for i in range(50)]
    for item in items:
        policy.admitted(item)
    for item in items:
        policy.accessed(item)
    assert history.half_life == 4  # hits never refit it (nor prune): that is not O(1)
    assert policy.victims(1, lambda e: True) is not None  # choosing victims does
    assert history.half_life == 100
    for item in items[:45]:
        policy.removed(item)
    for _ in range(60):
        policy.accessed(items[-1])
    history.maintain()
    assert history.half_life == 10


def test_load_costs_learn_bandwidth_and_keep_latency() -> None:
    """Loads all of one size move the bandwidth to what they show; the latency knob holds (a
    fixed part cannot be told from a per-byte one)."""
    costs = LoadCosts({"store": (1e9, 0.01)}, alpha=0.5)
    assert costs.seconds("store", 10**9) == pytest.approx(1.01)
    for _ in range(30):
        costs.observe("store", 200 << 20, 0.01 + (200 << 20) / 4e9)
    assert costs.bandwidth("store") == pytest.approx(4e9, rel=1e-3)
    assert costs.seconds("store", 4 * 10**9) == pytest.approx(1.01, rel=1e-3)
    snap = costs.snapshot()["store"]
    assert (snap.samples, snap.latency) == (30, 0.01)
    assert snap.seconds(0) == 0.01
    costs.observe("store", 0, 1.0)  # ignored: says nothing about bandwidth
    costs.observe("store", 10, math.nan)
    assert costs.snapshot()["store"].samples == 30
    with pytest.raises(ValueError):
        LoadCosts(alpha=0)
    with pytest.raises(ValueError):
        LoadCosts({"disk": (0.0, 0.0)})


def test_load_costs_learn_latency_from_loads_of_mixed_sizes() -> None:
    """Loads of mixed sizes with a large fixed part (a wait behind other loads) move the latency
    and the bandwidth to that line, so a small model is not priced as mostly free."""
    costs = LoadCosts({"store": (0.5e9, 0.05)})
    latency, bandwidth = 0.2, 150 * 2**20  # ray_routing's affinity replicas (issue 15)
    for i in range(40):
        nbytes = (1 + 31 * (i % 2)) << 20  # 1 MiB, 32 MiB, ...
        costs.observe("store", nbytes, latency + nbytes / bandwidth)
    snap = costs.snapshot()["store"]
    assert snap.latency == pytest.approx(latency, rel=1e-3)
    assert snap.bandwidth == pytest.approx(bandwidth, rel=1e-3)
    assert costs.seconds("store", 1 << 20) == pytest.approx(latency + (1 << 20) / bandwidth, 1e-3)
    # A line that would not slope up from a positive intercept falls back on the knob.
    for i in range(40):
        costs.observe("store", (1 + 31 * (i % 2)) << 20, 0.3 if i % 2 else 0.4)
    assert costs.snapshot()["store"].latency == 0.05
    assert costs.seconds("store", 1 << 20) > 0.05


async def test_cache_learns_bandwidth_and_estimates_load_seconds(models: MemoryModels) -> None:
    """Loads teach the cache each source's bandwidth; estimates follow the model's tier."""
    for name in "ab":
        models.add(name, 1000)
    costs = LoadCosts()
    async with ModelCache(
        models.template, device_budget=1000, host_budget=1000, load_costs=costs
    ) as cache:
        assert cache.load_costs is costs
        assert cache.estimate_load_seconds("a") is None  # never seen, size unknown
        unseen = cache.estimate_load_seconds("a", nbytes=10**9)
        assert unseen == pytest.approx(costs.seconds("store", 10**9))
        async with cache.use("a"):
            assert cache.estimate_load_seconds("a") == 0.0
        async with cache.use("b"):  # a moves to host
            pass
        assert cache.resident("host") == ["a"]
        assert cache.estimate_load_seconds("a") == pytest.approx(costs.seconds("host", 1000))
        async with cache.use("a"):  # a promotion: the host source is observed
            pass
        snap = costs.snapshot()
        assert (snap["store"].samples, snap["host"].samples) == (2, 1)
        assert cache.evict("a") and cache.resident("host") == ["a"]
        # b left host memory for a: in no tier now, its size is remembered from its load.
        assert cache.resident() == [] and cache.tier_of("b") is None
        assert cache.estimate_load_seconds("b") == pytest.approx(costs.seconds("store", 1000))
        check_invariants(cache)


async def test_load_costs_learn_the_whole_load_a_caller_waits_for(
    models: MemoryModels, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A load's observed seconds run from its start to the model built (header reads, waits,
    transfer, build): what a miss costs its caller, not the weight transfer alone."""
    models.add("a", 1000)
    now = [0.0]
    monkeypatch.setattr(cache_module, "_load_timer", lambda: now[0])
    seen: list[float] = []

    class Recording(LoadCosts):
        def observe(self, source: str, nbytes: int, seconds: float) -> None:
            seen.append(seconds)
            super().observe(source, nbytes, seconds)

    costs = Recording()
    cache = ModelCache(models.template, device_budget=4096, load_costs=costs)

    @cache.model
    class Slow:
        @staticmethod
        def from_weights(weights: Any, info: ModelInfo) -> int:
            now[0] += 10.0  # a build that takes 10 s on the load's clock
            return info.nbytes

    async with cache, cache.use("a", model=Slow):
        pass
    assert seen == [10.0]


async def test_cache_binds_costs_and_shares_history_with_the_host_tier(
    models: MemoryModels,
) -> None:
    """A CostAwarePolicy given to the cache gets its cost model; the host tier gets a
    CostAwarePolicy on the same history; the hot model survives a cold one."""
    for name in "hcx":
        models.add(name, 1000)
    policy = CostAwarePolicy()
    async with ModelCache(
        models.template, device_budget=2000, host_budget=1000, policy=policy
    ) as cache:
        assert policy.has_cost
        host_policy: Any = cache._host_disk.host.policy
        assert isinstance(host_policy, CostAwarePolicy) and host_policy.history is policy.history
        assert host_policy.has_cost
        for _ in range(3):
            async with cache.use("h"):
                pass
        async with cache.use("c"):
            pass
        async with cache.use("x"):  # c (used once) goes, h (used thrice) stays
            pass
        assert sorted(cache.resident()) == ["h", "x"]
        assert cache.resident("host") == ["c"]
        check_invariants(cache)


async def test_host_admission_keeps_a_one_off_out_of_a_full_host_tier(
    models: MemoryModels,
) -> None:
    """With admission on the host tier, a model used once is dropped rather than displace a
    model used often."""
    for name in "rst":
        models.add(name, 1000)
    async with ModelCache(
        models.template,
        device_budget=1000,
        host_budget=1000,
        policy=CostAwarePolicy(),
        host_policy=CostAwarePolicy(admission=True),
    ) as cache:
        host_policy: Any = cache._host_disk.host.policy
        device_policy: Any = cache._device.policy
        assert host_policy.history is device_policy.history
        for _ in range(3):
            async with cache.use("r"):
                pass
        async with cache.use("s"):  # r moves to host (room is free: no admission check)
            pass
        async with cache.use("t"):  # s (used once) would displace r (used 3 times): refused
            pass
        assert cache.resident("host") == ["r"]
        check_invariants(cache)


async def test_default_host_tier_keeps_the_model_used_most(models: MemoryModels) -> None:
    """The default policy counts a model's device hits for its host copy too: a host tier that
    must drop one keeps the model used often over one used once, though it is older there."""
    for name in ("hot", "c1", "c2", "c3"):
        models.add(name, 1000)
    async with ModelCache(models.template, device_budget=1000, host_budget=2000) as cache:
        for _ in range(20):
            async with cache.use("hot"):
                pass
        for name in ("c1", "c2", "c3"):  # each demotes the one before: hot, c1, then c2
            async with cache.use(name):
                pass
        assert sorted(cache.resident("host")) == ["c2", "hot"]
        check_invariants(cache)


def _policy_sim() -> ModuleType:
    if str(BENCHES) not in sys.path:
        sys.path.insert(0, str(BENCHES))
    return importlib.import_module("policy_sim")


def test_policy_sim_accounting_on_a_tiny_trace() -> None:
    """The simulator counts hits, bytes and load seconds exactly, and the offline bound is
    below every policy's load seconds and above every hit ratio."""
    import numpy as np

    sim = _policy_sim()
    sizes = np.array([100, 100, 100, 250], dtype=np.int64)
    keys = np.array([0, 1, 0, 2, 0, 1, 3, 0, 1, 2], dtype=np.int64)
    times = np.arange(len(keys), dtype=np.float64) * 1000.0  # loads end before the next request
    trace = sim.Trace("tiny", times, keys, sizes, int(sizes.sum()))
    jitter = np.ones(len(keys))
    bw_h, lat_h = sim.TRUTH["host"]
    bw_s, lat_s = sim.TRUTH["store"]

    # Every model's first request is a store load: a floor under any policy's load seconds.
    expected = sum(
        lat_s + sizes[k] / bw_s for k, first in zip(keys, _firsts(keys), strict=True) if first
    )
    lru = sim.simulate(trace, "byte-lru", 250, 250, jitter=jitter)
    assert lru.requests == 10
    assert lru.hits + sum(lru.loads.values()) == 10
    assert lru.bytes_requested == int(sizes[keys].sum())
    assert lru.loads["store"] >= 4 and lru.load_seconds >= expected
    assert lru.waits.count(0.0) == lru.hits
    assert lru.hit_ratio == lru.hits / 10
    # Seconds are exactly the sum of each load's latency + size / bandwidth.
    small_keys = np.array([0, 1, 0, 1, 2], dtype=np.int64)  # 100 bytes each
    small = sim.Trace("small", times[:5], small_keys, sizes[:3], 300)
    loaded = sim.simulate(small, "byte-lru", 100, 0, jitter=jitter)  # one model at a time
    assert loaded.hits == 0 and loaded.loads == {"host": 0, "store": 5}
    assert loaded.load_seconds == pytest.approx(5 * (lat_s + 100 / bw_s))
    assert (bw_h, lat_h) == sim.TRUTH["host"]

    bound = sim.offline_bound(trace, 250, 250, jitter)
    for kind in sim.POLICIES:
        k = 2 if kind == "count-lru" else None
        r = sim.simulate(trace, kind, 250, 250, count_limit=k, jitter=jitter)
        assert r.requests == 10 and r.hits + sum(r.loads.values()) == 10
        if kind != "count-lru":  # count-LRU ignores the byte budget: the bound is not its
            assert bound.load_seconds <= r.load_seconds + 1e-9
            assert bound.hit_ratio >= r.hit_ratio - 1e-9
            assert bound.byte_hit_ratio >= r.byte_hit_ratio - 1e-9
            assert r.peak_device_bytes <= 250
    # A cache holding everything: only the first request of each model misses.
    everything = sim.simulate(trace, "cost", 1000, 0, jitter=jitter)
    assert everything.hits == 10 - 4 and everything.load_seconds == pytest.approx(expected)
    assert sim.offline_bound(trace, 1000, 0, jitter).load_seconds == pytest.approx(expected)


def _firsts(keys: Any) -> list[bool]:
    seen: set[int] = set()
    out = []
    for k in keys.tolist():
        out.append(k not in seen)
        seen.add(k)
    return out


def test_policy_sim_replays_a_csv_trace(tmp_path: Path) -> None:
    """A CSV trace (header, unsorted rows) is read, sorted by time, and simulated."""
    sim = _policy_sim()
    path = tmp_path / "trace.csv"
    path.write_text("time,model,size\n2.0,b,300\n1.0,a,100\n3.0,a,100\n")
    trace = sim.read_trace(str(path))
    # Keys number the ids in file order (b=0, a=1); requests come out in time order.
    assert trace.keys.tolist() == [1, 0, 1] and trace.sizes.tolist() == [300, 100]
    r = sim.simulate(trace, "cost", 400, 0)
    assert (r.hits, r.loads["store"]) == (1, 2)


def test_cost_aware_hits_touch_no_heap_and_victims_still_follow_the_counts() -> None:
    """A hit updates its entry in place (no heap push, no pass over entries); victims re-file
    stale heap items, so the least used entry still goes first."""
    policy = CostAwarePolicy()
    items = [Item(i, 1) for i in range(5)]
    for item in items:
        policy.admitted(item)
    heap_size = len(policy._heap)
    for _ in range(1000):
        for item in items[1:]:
            policy.accessed(item)
    assert len(policy._heap) == heap_size
    victims = policy.victims(1, lambda e: True)
    assert victims is not None and victims[0] is items[0]
    policy.removed(items[0])
    for _ in range(3):
        policy.accessed(items[2])
    victims = policy.victims(1, lambda e: True)
    assert victims is not None and victims[0] is items[1]


class _OracleItem:
    __slots__ = ("key", "model_id", "nbytes")

    def __init__(self, key: str, nbytes: int) -> None:
        self.key = self.model_id = key
        self.nbytes = nbytes


class PolicyOracleMachine(RuleBasedStateMachine):
    """A policy against a brute-force oracle, with pins that change without the policy being
    told (a lease that ends, a disk copy's ``users`` of a host entry): every victims query
    returns exactly the entries a full pass in victim order would (None iff the unpinned bytes
    fall short), and the policy's running bound always matches its entries."""

    def __init__(self) -> None:
        super().__init__()
        self.policy: Any = None
        self.resident: dict[str, _OracleItem] = {}
        self.pinned: set[str] = set()
        self.lru_order: OrderedDict[str, _OracleItem] = OrderedDict()  # LRUPolicy's, mirrored

    def _started(self) -> bool:
        return self.policy is not None

    @precondition(lambda self: self.policy is None)
    @rule(kind=st.sampled_from(sorted(POLICIES)))
    def start(self, kind: str) -> None:
        self.policy = POLICIES[kind]()

    @precondition(_started)
    @rule(key=st.sampled_from("abcd"), nbytes=st.sampled_from((0, 1, 2, 3, 5, 8, 100)))
    def admit(self, key: str, nbytes: int) -> None:
        """Admitted (again, under a key already resident, replacing its entry)."""
        item = self.resident[key] = self.lru_order[key] = _OracleItem(key, nbytes)
        self.policy.admitted(item)

    @precondition(_started)
    @rule(key=st.sampled_from("abcd"), lease=st.booleans())
    def access(self, key: str, lease: bool) -> None:
        if key in self.resident:
            self.policy.accessed(self.resident[key])
            self.lru_order.move_to_end(key)
            if lease:
                self.pinned.add(key)

    @precondition(_started)
    @rule(key=st.sampled_from("abcd"))
    def pin_changes_silently(self, key: str) -> None:
        self.pinned.symmetric_difference_update({key})

    @precondition(_started)
    @rule(key=st.sampled_from("abcd"))
    def remove(self, key: str) -> None:
        if key in self.resident:
            self.policy.removed(self.resident.pop(key))
            del self.lru_order[key]

    def _victim_order(self) -> list[_OracleItem]:
        if isinstance(self.policy, LRUPolicy):
            return list(self.lru_order.values())
        policy = self.policy
        keys = sorted(policy._live, key=lambda k: (policy._priorities[k], policy._seqs[k]))
        return [policy._live[k] for k in keys]

    @precondition(_started)
    @rule(
        need=st.integers(-1, 130),
        at_edge=st.integers(-2, 2) | st.none(),
        evict=st.booleans(),
    )
    def victims(self, need: int, at_edge: int | None, evict: bool) -> None:
        resident, pinned = self.resident, self.pinned
        unpinned = [i for k, i in resident.items() if k not in pinned]
        if at_edge is not None:  # right at the unpinned bytes: where a stale bound errs
            need = sum(i.nbytes for i in unpinned) + at_edge
        expected: list[_OracleItem] | None = []
        freed = 0
        for item in self._victim_order():
            if freed >= need:
                break
            if item.key not in pinned:
                expected.append(item)  # type: ignore[union-attr]
                freed += item.nbytes
        if freed < need:
            expected = None

        def evictable(entry: PolicyEntry) -> bool:
            assert resident.get(entry.key) is entry, "asked about an entry not resident"  # type: ignore[call-overload]
            return entry.key not in pinned

        got = self.policy.victims(need, evictable)
        if expected is None:
            assert got is None
        else:
            assert got is not None and [id(e) for e in got] == [id(e) for e in expected]
            if evict:
                for entry in got:
                    self.remove(entry.key)

    @invariant()
    def bound_matches_entries(self) -> None:
        if self.policy is not None:
            self.policy.check()
            assert len(self.policy) == len(self.resident)


PolicyOracleMachine.TestCase.settings = settings(
    max_examples=600, stateful_step_count=30, deadline=None
)
test_policies_answer_as_a_full_pass_would = PolicyOracleMachine.TestCase
