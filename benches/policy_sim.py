"""Trace-driven eviction-policy simulation: modelcache's policies against byte-LRU, count-LRU
and an offline bound, on a simulated clock.

The simulator drives the library's own objects - `ByteBudget` (the tier accounting that asks the
policy for victims), `LRUPolicy`, `CostAwarePolicy`, `FrequencyHistory` and `LoadCosts` (which
learns bandwidth from the simulated load timings) - exactly as `ModelCache` drives them: a
device tier whose victims are demoted to a host tier when they fit (exclusive tiers: a model
promoted from host leaves it), a host tier whose victims are dropped, and an object store under
both. Only the I/O is simulated: a load from a source takes ``latency + nbytes / bandwidth``
simulated seconds (times a per-request log-normal jitter, sigma 0.1), during which the loading
model holds its bytes and cannot be evicted (a lease); a request for a model that is loading
waits for the rest of that load (single-flight). Loads do not contend for bandwidth.

Policies (the host tier is the same size in every row):

* ``byte-lru``   `LRUPolicy` on both tiers (ModelMesh-like: least recently used, by bytes).
* ``count-lru``  the device keeps at most K models, least recently used first, whatever their
  bytes (Ray Serve ``@serve.multiplexed``-like); K is calibrated so that the device's resident
  bytes, averaged over requests, fill the same budget (fitted on the first quarter of the
  trace). Its peak may exceed the budget (reported). Host tier: byte-LRU.
* ``cost``       `CostAwarePolicy` (cost-aware LFU with decaying counts, learned costs) on
  both tiers, no admission.
* ``cost+adm``   the same, with admission control on the host tier.
* ``bound``      a lower bound on load seconds no policy can beat (and upper bounds on the hit
  ratios): PFOO-L of Berger et al. (SIGMETRICS 2018), extended to the two exclusive tiers. See
  `offline_bound`.

Figures per (workload, budget): device hit ratio, byte hit ratio, total simulated seconds spent
loading, p99 request wait (0 for a hit). Budgets are fractions of the catalogue's bytes (the
device; the host tier is ``--host-ratio`` times that).

Goals (the ``goal_*`` keys of the JSON line): ``cost`` spends at most 0.85x byte-LRU's load
seconds on every cell of the skewed workloads (Zipf 0.8/1.0/1.2, scan, tenants), and never more
than byte-LRU on any cell. ``ModelCache`` keeps `LRUPolicy` as its default unless both hold.

Run: ``python benches/policy_sim.py [--quick] [--out DIR] [--trace FILE.csv] [--jobs N]``.
A trace file has rows ``time_seconds,model_id,size_bytes`` (a header row is skipped).
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from _common import emit_json, print_table, rounded

from modelcache._cost import LoadCosts
from modelcache._policy import (
    CostAwarePolicy,
    EvictionPolicy,
    FrequencyHistory,
    LRUPolicy,
    PolicyEntry,
)
from modelcache._tiers import ByteBudget

MiB = 1 << 20
GiB = 1 << 30
HOUR = 3600.0

#: The simulated hardware: (bytes per second, latency seconds) per source. The cache's
#: `LoadCosts` starts from its own defaults and learns these.
TRUTH: dict[str, tuple[float, float]] = {
    "host": (12e9, 0.002),  # pinned host -> GPU over PCIe
    "store": (0.8e9, 0.040),  # object store
}

POLICIES = ("byte-lru", "count-lru", "cost", "cost+adm")
SKEWED = ("zipf0.8", "zipf1.0", "zipf1.2", "scan", "tenants")
GOAL_RATIO = 0.85
Array = np.ndarray[Any, Any]


# -- traces ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Trace:
    name: str
    times: Array  # float64 seconds, non-decreasing
    keys: Array  # int64 model index
    sizes: Array  # int64 bytes of each model, indexed by key
    catalogue_bytes: int


@dataclass(frozen=True)
class Scale:
    models: int
    requests: int
    hours: float


def model_sizes(rng: np.random.Generator, n: int) -> Array:
    """Log-normal sizes, median 256 MiB, clipped to 1 MiB - 8 GiB."""
    raw = rng.lognormal(mean=math.log(256 * MiB), sigma=1.5, size=n)
    return np.clip(raw, MiB, 8 * GiB).astype(np.int64)


def zipf_probs(n: int, alpha: float) -> Array:
    p: Array = 1.0 / np.arange(1, n + 1, dtype=np.float64) ** alpha
    out: Array = p / p.sum()
    return out


def arrival_times(rng: np.random.Generator, scale: Scale) -> Array:
    gaps = rng.exponential(scale.hours * HOUR / scale.requests, size=scale.requests)
    return np.cumsum(gaps)


def make_trace(name: str, scale: Scale, seed: int = 1) -> Trace:
    """One of the synthetic workloads, deterministic for (name, scale, seed)."""
    rng = np.random.default_rng([seed, sum(map(ord, name))])
    n, m = scale.models, scale.requests
    sizes = model_sizes(rng, n)
    perm = rng.permutation(n)  # rank -> model: popularity independent of size
    times = arrival_times(rng, scale)
    if name.startswith("zipf"):
        ranks = rng.choice(n, size=m, p=zipf_probs(n, float(name[4:])))
        keys = perm[ranks]
    elif name == "shifting":  # every tenth of the trace, n/50 new models take the top ranks
        ranks = rng.choice(n, size=m, p=zipf_probs(n, 1.0))
        phase = np.arange(m) * 10 // m
        keys = perm[(ranks - phase * (n // 50)) % n]
    elif name == "scan":  # Zipf 1.0, with bursts scanning the catalogue in order (20%)
        keys = perm[rng.choice(n, size=m, p=zipf_probs(n, 1.0))]
        burst, every = max(1, m // 100), max(2, m // 20)
        cursor = 0
        for start in range(every // 2, m, every):
            stop = min(m, start + burst)
            keys[start:stop] = (cursor + np.arange(stop - start)) % n
            cursor += stop - start
    elif name == "tenants":  # 20 tenants in time zones, Zipf 1.0 inside each, diurnal load
        tenants = 20
        per = n // tenants
        offsets = rng.uniform(0, 2 * math.pi, size=tenants)
        base = zipf_probs(tenants, 0.8)
        hours = times / HOUR
        weight = base[None, :] * (
            1.0 + 0.9 * np.sin(2 * math.pi * hours[:, None] / 24.0 + offsets[None, :])
        )
        cum = np.cumsum(weight, axis=1)
        pick = rng.random(m) * cum[:, -1]
        tenant = np.minimum((cum < pick[:, None]).sum(axis=1), tenants - 1)
        inner = rng.choice(per, size=m, p=zipf_probs(per, 1.0))
        keys = perm[tenant * per + inner]
    else:
        raise ValueError(f"unknown workload {name!r}")
    return Trace(name, times, keys.astype(np.int64), sizes, int(sizes.sum()))


def read_trace(path: str) -> Trace:
    """A CSV of ``time_seconds,model_id,size_bytes`` rows (sorted by time here)."""
    ids: dict[str, int] = {}
    sizes: list[int] = []
    times: list[float] = []
    keys: list[int] = []
    with open(path, newline="") as f:
        for row in csv.reader(f):
            if not row or row[0].startswith("#"):
                continue
            try:
                t, model_id, size = float(row[0]), row[1].strip(), int(float(row[2]))
            except ValueError:
                if not times:
                    continue  # a header
                raise
            key = ids.setdefault(model_id, len(ids))
            if key == len(sizes):
                sizes.append(size)
            times.append(t)
            keys.append(key)
    order = np.argsort(np.asarray(times), kind="stable")
    arr_sizes = np.asarray(sizes, dtype=np.int64)
    name = "replay:" + os.path.basename(path)
    return Trace(
        name,
        np.asarray(times)[order],
        np.asarray(keys, dtype=np.int64)[order],
        arr_sizes,
        int(arr_sizes.sum()),
    )


# -- the simulator -----------------------------------------------------------------------------


class SimEntry:
    """A model in a simulated tier (a `PolicyEntry`)."""

    __slots__ = ("key", "nbytes", "ready_at")

    def __init__(self, key: int, nbytes: int, ready_at: float) -> None:
        self.key = key
        self.nbytes = nbytes
        self.ready_at = ready_at


@dataclass
class Result:
    policy: str
    requests: int = 0
    hits: int = 0
    bytes_requested: int = 0
    bytes_hit: int = 0
    load_seconds: float = 0.0
    loads: dict[str, int] = field(default_factory=lambda: {"host": 0, "store": 0})
    waits: list[float] = field(default_factory=list)
    mean_device_bytes: float = 0.0
    peak_device_bytes: int = 0
    count_limit: int | None = None

    @property
    def hit_ratio(self) -> float:
        return self.hits / self.requests if self.requests else math.nan

    @property
    def byte_hit_ratio(self) -> float:
        return self.bytes_hit / self.bytes_requested if self.bytes_requested else math.nan

    @property
    def p99_wait(self) -> float:
        return float(np.percentile(self.waits, 99)) if self.waits else math.nan


class Simulator:
    """Two tiers of `ByteBudget` over a store, driven one request at a time."""

    def __init__(
        self,
        device_policy: EvictionPolicy,
        host_policy: EvictionPolicy,
        device_budget: int,
        host_budget: int,
        *,
        costs: LoadCosts,
        truth: dict[str, tuple[float, float]] = TRUTH,
        count_limit: int | None = None,
        name: str = "",
    ) -> None:
        self.now = 0.0
        self.costs = costs
        self.truth = truth
        self.count_limit = count_limit
        self.device_policy, self.host_policy = device_policy, host_policy
        # count-LRU ignores bytes: its device budget is unbounded and K models is the limit.
        self.device: ByteBudget[Any] = ByteBudget(
            "device",
            device_budget if count_limit is None else 1 << 62,
            evictable=self._ready,
            evict=self._demote,
            policy=device_policy,
        )
        self.host: ByteBudget[Any] = ByteBudget(
            "host", host_budget, evictable=lambda e: True, evict=self._drop, policy=host_policy
        )
        self.on_device: dict[int, SimEntry] = {}
        self.on_host: dict[int, SimEntry] = {}
        self.result = Result(name, count_limit=count_limit)
        self._device_byte_steps = 0

    # The cost functions a ModelCache binds to a CostAwarePolicy (see ModelCache._miss_cost).
    def device_miss_cost(self, entry: PolicyEntry) -> float:
        source = "host" if entry.nbytes <= self.host.budget else "store"
        return self.costs.seconds(source, entry.nbytes)

    def host_miss_cost(self, entry: PolicyEntry) -> float:
        return self.costs.seconds("store", entry.nbytes)

    def _ready(self, entry: PolicyEntry) -> bool:
        e: SimEntry = entry  # type: ignore[assignment]
        return e.ready_at <= self.now

    def _demote(self, victim: PolicyEntry) -> None:
        e: SimEntry = victim  # type: ignore[assignment]
        del self.on_device[e.key]
        self.device.remove(e)
        self.device.drop_now(e.nbytes)
        host = self.host
        if (
            e.nbytes <= host.budget
            and (host.free >= e.nbytes or _admits(self.host_policy, e))
            and host.try_reserve(e.nbytes)
        ):
            moved = SimEntry(e.key, e.nbytes, 0.0)
            self.on_host[e.key] = moved
            host.admit(moved)

    def _drop(self, victim: PolicyEntry) -> None:
        e: SimEntry = victim  # type: ignore[assignment]
        del self.on_host[e.key]
        self.host.remove(e)
        self.host.drop_now(e.nbytes)

    def request(self, t: float, key: int, nbytes: int, jitter: float = 1.0) -> None:
        r = self.result
        self.now = t
        r.requests += 1
        r.bytes_requested += nbytes
        self._device_byte_steps += self.device.resident
        entry = self.on_device.get(key)
        if entry is not None:
            self.device_policy.accessed(entry)
            if entry.ready_at <= t:
                r.hits += 1
                r.bytes_hit += nbytes
                r.waits.append(0.0)
            else:
                r.waits.append(entry.ready_at - t)  # joins the load in flight
            return
        held = self.on_host.pop(key, None)
        if held is not None:  # promotion: the host copy leaves the host tier
            self.host.remove(held)
            self.host.release(nbytes)
        if self.count_limit is not None:
            while len(self.on_device) >= self.count_limit:
                if not self._evict_one() and not self._advance():
                    break  # every model is loading: K is exceeded until one is ready
        while not self.device.try_reserve(nbytes):
            if not self._advance():
                raise RuntimeError(f"model {key} cannot fit the device")
        source = "host" if held is not None else "store"
        bandwidth, latency = self.truth[source]
        seconds = (latency + nbytes / bandwidth) * jitter
        self.costs.observe(source, nbytes, seconds)
        r.loads[source] += 1
        r.load_seconds += seconds
        ready_at = self.now + seconds
        r.waits.append(ready_at - t)
        entry = SimEntry(key, nbytes, ready_at)
        self.on_device[key] = entry
        self.device.admit(entry)
        r.peak_device_bytes = max(r.peak_device_bytes, self.device.resident)
        self.device_policy.accessed(entry)

    def _evict_one(self) -> bool:
        chosen = self.device_policy.victims(1, self._ready)
        if chosen is None:
            return False
        self._demote(chosen[0])
        return True

    def _advance(self) -> bool:
        """Move the clock to the end of the next load in flight (its model becomes evictable);
        False when nothing is loading."""
        pending = [e.ready_at for e in self.on_device.values() if e.ready_at > self.now]
        if not pending:
            return False
        self.now = min(pending)
        return True

    def finish(self) -> Result:
        r = self.result
        r.mean_device_bytes = self._device_byte_steps / max(r.requests, 1)
        return r


def _admits(policy: EvictionPolicy, entry: PolicyEntry) -> bool:
    admits = getattr(policy, "admits", None)
    return True if admits is None else bool(admits(entry))


def make_policies(kind: str) -> tuple[EvictionPolicy, EvictionPolicy]:
    if kind in ("byte-lru", "count-lru"):
        return LRUPolicy(), LRUPolicy()
    history = FrequencyHistory()
    device = CostAwarePolicy(history=history)
    host = CostAwarePolicy(history=history, admission=kind == "cost+adm")
    return device, host


def simulate(
    trace: Trace,
    kind: str,
    device_budget: int,
    host_budget: int,
    *,
    count_limit: int | None = None,
    jitter: Array | None = None,
    limit: int | None = None,
) -> Result:
    """Run one policy over (the first ``limit`` requests of) ``trace``."""
    device_policy, host_policy = make_policies(kind)
    sim = Simulator(
        device_policy,
        host_policy,
        device_budget,
        host_budget,
        costs=LoadCosts(),
        count_limit=count_limit,
        name=kind,
    )
    for policy, cost in (
        (device_policy, sim.device_miss_cost),
        (host_policy, sim.host_miss_cost),
    ):
        if isinstance(policy, CostAwarePolicy):
            policy.bind_cost(cost)
    n = len(trace.keys) if limit is None else min(limit, len(trace.keys))
    times = trace.times[:n].tolist()
    keys = trace.keys[:n].tolist()
    sizes = trace.sizes[trace.keys[:n]].tolist()
    factors = [1.0] * n if jitter is None else jitter[:n].tolist()
    request = sim.request
    for i in range(n):
        request(times[i], keys[i], sizes[i], factors[i])
    return sim.finish()


def calibrate_count(trace: Trace, device_budget: int, host_budget: int, jitter: Array) -> int:
    """K such that count-LRU's request-averaged device bytes are close to the budget (three
    passes over the first quarter of the trace)."""
    requested = trace.sizes[trace.keys]
    k = max(1, round(device_budget / float(requested.mean())))
    best = k
    best_err = math.inf
    for _ in range(3):
        r = simulate(
            trace,
            "count-lru",
            device_budget,
            host_budget,
            count_limit=k,
            jitter=jitter,
            limit=max(len(trace.keys) // 4, 1000),
        )
        err = abs(r.mean_device_bytes - device_budget)
        if err < best_err:
            best, best_err = k, err
        if r.mean_device_bytes <= 0:
            break
        k = max(1, round(k * device_budget / r.mean_device_bytes))
    return best


# -- the offline bound ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Bound:
    load_seconds: float
    hit_ratio: float
    byte_hit_ratio: float


def _pfoo_savings(
    keys: Array, sizes_per_req: Array, weights: Array, capacity_steps: float
) -> float:
    """PFOO-L: the most weight a cache of ``capacity_steps`` byte-steps could save.

    Every interval between two requests of the same model can be *covered* (the second request
    is a hit) by keeping the model for the interval: it uses size x (steps between) of space-time
    and saves the second request's weight. Requiring the budget on average over the trace
    instead of at every step is a relaxation, so the fractional knapsack of intervals by
    weight per byte-step - solved greedily - bounds every policy, online or offline.
    """
    order = np.argsort(keys, kind="stable")
    same = keys[order[1:]] == keys[order[:-1]]
    first, second = order[:-1][same], order[1:][same]
    space = sizes_per_req[second].astype(np.float64) * (second - first)
    gain = weights[second]
    density = gain / space
    rank = np.argsort(-density, kind="stable")
    used = np.cumsum(space[rank])
    full = int(np.searchsorted(used, capacity_steps, side="right"))
    saved = float(gain[rank][:full].sum())
    if full < len(rank):
        left = capacity_steps - (float(used[full - 1]) if full else 0.0)
        saved += float(gain[rank][full]) * left / float(space[rank][full])
    return saved


def offline_bound(trace: Trace, device_budget: int, host_budget: int, jitter: Array) -> Bound:
    """Lower bound on total load seconds (upper bounds on hit ratios) over two exclusive tiers.

    A request's load costs c_h (from host) or c_s (from the store) - or nothing on a device
    hit. Total = sum over device misses of c_h + sum over store misses of (c_s - c_h). The
    device misses of any policy are bounded below by PFOO-L with the device budget and weight
    c_h; its store misses (requests in neither tier) by PFOO-L with the two budgets together
    (the tiers are exclusive, so a model kept in either uses one of them) and weight c_s - c_h.
    The two relaxations are independent, so their sum is a valid bound: looser than the true
    optimum, never above it.
    """
    keys = trace.keys
    steps = float(len(keys))
    size = trace.sizes[keys]
    hb, hl = TRUTH["host"]
    sb, sl = TRUTH["store"]
    c_host = (hl + size / hb) * jitter[: len(keys)]
    c_store = (sl + size / sb) * jitter[: len(keys)]
    c_host = np.minimum(c_host, c_store)
    upper = c_store if host_budget == 0 else c_host
    device_saved = _pfoo_savings(keys, size, upper, device_budget * steps)
    extra = c_store - c_host
    both_saved = (
        _pfoo_savings(keys, size, extra, (device_budget + host_budget) * steps)
        if host_budget
        else 0.0
    )
    total = float(upper.sum()) - device_saved + float(extra.sum() if host_budget else 0.0)
    total -= both_saved
    hits = _pfoo_savings(keys, size, np.ones(len(keys)), device_budget * steps)
    byte_hits = _pfoo_savings(keys, size, size.astype(np.float64), device_budget * steps)
    return Bound(total, hits / len(keys), byte_hits / float(size.sum()))


# -- running a grid --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cell:
    workload: str
    fraction: float
    device_budget: int
    host_budget: int
    results: dict[str, Result]
    bound: Bound
    seconds: float


def run_cell(
    workload: str, fraction: float, scale: Scale, host_ratio: float, trace_path: str | None
) -> Cell:
    start = time.perf_counter()
    trace = read_trace(trace_path) if trace_path else make_trace(workload, scale)
    rng = np.random.default_rng(7)
    jitter = rng.lognormal(0.0, 0.1, size=len(trace.keys))
    device_budget = max(int(trace.catalogue_bytes * fraction), int(trace.sizes.max()))
    host_budget = int(device_budget * host_ratio)
    results: dict[str, Result] = {}
    for kind in POLICIES:
        k = None
        if kind == "count-lru":
            k = calibrate_count(trace, device_budget, host_budget, jitter)
        results[kind] = simulate(
            trace, kind, device_budget, host_budget, count_limit=k, jitter=jitter
        )
    bound = offline_bound(trace, device_budget, host_budget, jitter)
    return Cell(
        trace.name,
        fraction,
        device_budget,
        host_budget,
        results,
        bound,
        time.perf_counter() - start,
    )


def pct(fraction: float) -> str:
    return f"{fraction * 100:g}pct"


def plot(cells: Sequence[Cell], out: str) -> list[str]:
    """One PNG per workload: the four figures against the budget, bounds dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out, exist_ok=True)
    paths = []
    for workload in dict.fromkeys(c.workload for c in cells):
        mine = [c for c in cells if c.workload == workload]
        fig, axes = plt.subplots(1, 4, figsize=(17, 3.8))
        x = np.arange(len(mine))
        width = 0.8 / len(POLICIES)
        panels: list[tuple[str, Callable[[Result], float], Callable[[Bound], float] | None]] = [
            ("hit ratio", lambda r: r.hit_ratio, lambda b: b.hit_ratio),
            ("byte hit ratio", lambda r: r.byte_hit_ratio, lambda b: b.byte_hit_ratio),
            ("load seconds", lambda r: r.load_seconds, lambda b: b.load_seconds),
            ("p99 request wait (s)", lambda r: r.p99_wait, None),
        ]
        for ax, (title, get, bound_of) in zip(axes, panels, strict=True):
            for i, kind in enumerate(POLICIES):
                ax.bar(x + i * width, [get(c.results[kind]) for c in mine], width, label=kind)
            if bound_of is not None:
                ax.hlines(
                    [bound_of(c.bound) for c in mine],
                    x - width / 2,
                    x + width * (len(POLICIES) - 0.5),
                    colors="black",
                    linestyles="dashed",
                    label="offline bound",
                )
            ax.set_xticks(x + width * (len(POLICIES) - 1) / 2, [pct(c.fraction) for c in mine])
            ax.set_title(title)
        axes[0].legend(fontsize=7)
        fig.suptitle(f"{workload}: device budget as % of catalogue bytes")
        fig.tight_layout()
        safe = "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in workload)
        path = os.path.join(out, f"policy_sim_{safe}.png")
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths.append(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="a small grid (seconds)")
    parser.add_argument("--out", default="bench-results", help="directory for the PNGs")
    parser.add_argument("--trace", default=None, help="also replay this CSV trace")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--host-ratio", type=float, default=2.0, help="host budget / device")
    parser.add_argument("--requests", type=int, default=None)
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--workloads", nargs="*", default=None, help="a subset of workloads")
    parser.add_argument("--budgets", nargs="*", type=float, default=None, help="e.g. 0.01 0.05")
    args = parser.parse_args()

    if args.quick:
        scale = Scale(models=2000, requests=20_000, hours=100)
        fractions: tuple[float, ...] = (0.01, 0.05)
        workloads = ["zipf1.0", "scan"]
    else:
        scale = Scale(models=10_000, requests=200_000, hours=2000)
        fractions = (0.01, 0.05, 0.20)
        workloads = ["zipf0.8", "zipf1.0", "zipf1.2", "shifting", "scan", "tenants"]
    if args.workloads is not None:
        workloads = args.workloads
    if args.budgets:
        fractions = tuple(args.budgets)
    if args.requests:
        scale = Scale(scale.models, args.requests, scale.hours)
    jobs: list[tuple[str, float, str | None]] = [(w, f, None) for w in workloads for f in fractions]
    if args.trace:
        jobs += [("replay", f, args.trace) for f in fractions]

    started = time.perf_counter()
    print(
        f"policy_sim: {scale.models:,} models, {scale.requests:,} requests over "
        f"{scale.hours:,.0f} simulated hours per workload; host budget = "
        f"{args.host_ratio:g} x device; truth: "
        + ", ".join(f"{k} {bw / 1e9:g} GB/s + {lat * 1e3:g} ms" for k, (bw, lat) in TRUTH.items())
    )
    with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        futures = [pool.submit(run_cell, w, f, scale, args.host_ratio, path) for w, f, path in jobs]
        cells = [f.result() for f in futures]
    wall = time.perf_counter() - started

    rows = []
    figures: dict[str, Any] = {}
    goal_skewed: list[bool] = []
    goal_never_worse: list[bool] = []
    for c in cells:
        lru = c.results["byte-lru"].load_seconds
        for kind in (*POLICIES, "bound"):
            if kind == "bound":
                b = c.bound
                rows.append(
                    [c.workload, pct(c.fraction), kind, b.hit_ratio, b.byte_hit_ratio,
                     b.load_seconds, "-", b.load_seconds / lru, "-"]
                )  # fmt: skip
                continue
            r = c.results[kind]
            note = (
                f"K={r.count_limit}, peak {r.peak_device_bytes / c.device_budget:.2f}x"
                if (r.count_limit)
                else ""
            )
            rows.append(
                [c.workload, pct(c.fraction), kind, r.hit_ratio, r.byte_hit_ratio,
                 r.load_seconds, r.p99_wait, r.load_seconds / lru, note]
            )  # fmt: skip
        best = c.results["cost"]
        ratio = best.load_seconds / lru
        tag = f"{c.workload.replace('replay:', 'replay_')}_{pct(c.fraction)}"
        figures[f"load_seconds_vs_byte_lru_ratio_{tag}"] = rounded(ratio)
        figures[f"load_seconds_adm_vs_byte_lru_ratio_{tag}"] = rounded(
            c.results["cost+adm"].load_seconds / lru
        )
        figures[f"load_seconds_count_lru_vs_byte_lru_ratio_{tag}"] = rounded(
            c.results["count-lru"].load_seconds / lru
        )
        figures[f"load_seconds_vs_offline_bound_ratio_{tag}"] = rounded(
            best.load_seconds / c.bound.load_seconds
        )
        figures[f"hit_ratio_cost_{tag}"] = rounded(best.hit_ratio)
        figures[f"hit_ratio_byte_lru_{tag}"] = rounded(c.results["byte-lru"].hit_ratio)
        figures[f"p99_wait_seconds_cost_{tag}"] = rounded(best.p99_wait)
        figures[f"p99_wait_seconds_byte_lru_{tag}"] = rounded(c.results["byte-lru"].p99_wait)
        goal_never_worse.append(ratio <= 1.0)
        if c.workload in SKEWED:
            goal_skewed.append(ratio <= GOAL_RATIO)
    print_table(
        "policies per workload and device budget (bound: PFOO-L, two tiers)",
        ["workload", "budget", "policy", "hit ratio", "byte hit", "load s", "p99 wait s",
         "load vs byte-lru", "note"],
        rows,
    )  # fmt: skip
    if not args.no_plots:
        for path in plot(cells, args.out):
            print(f"wrote {path}")
    figures["goal_skewed_load_seconds_le_0.85x_byte_lru"] = all(goal_skewed)
    figures["goal_never_worse_than_byte_lru"] = all(goal_never_worse)
    figures["sim_wall_seconds"] = rounded(wall)
    print(f"\n{len(cells)} cells in {wall:.1f} s")
    emit_json(figures)


if __name__ == "__main__":
    main()
