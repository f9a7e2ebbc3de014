"""Hit latency: microseconds per ``use()`` (enter + exit of ``async with cache.use(id)``) on a
resident model, with 1 task and with 1,000 concurrent tasks, for 10 and for 100,000 resident
entries.

Every id resolves (a resolver callable) to the same tiny safetensors file, so each id is its own
cache entry while the disk holds one file; filling the cache costs one small load per entry, and
the fill rate is reported too.

The tiny model has a single zero-element tensor (0 weight bytes) and the cache runs with
``zero_copy=False``: every resident model that owns bytes holds one memory mapping (an anonymous
one on the copy path, a mapping of the file plus a duplicated file descriptor on the zero-copy
path), and Linux caps a process at ``vm.max_map_count`` (65,530 by default) mappings and
``RLIMIT_NOFILE`` descriptors, so 100,000 resident 4-byte models cannot be held. A model with no
weight bytes allocates no mapping. The hit path (`Lease.__aenter__`) does not depend on the model's
size. ``--tensor-bytes 4`` uses a 4-byte tensor instead (keep ``--entries`` under ~60,000).

Per call, ``time.perf_counter_ns`` is read just before ``async with`` and just after the block is
left; the samples of a scenario go into one array (p50, p99, mean). Each scenario is repeated and
the median over repetitions of each figure is reported. With 1,000 tasks every task yields to the
event loop (``anyio.lowlevel.checkpoint()``) between its calls, outside the timed region, so
the tasks interleave; a single task loops without yielding.

Release under pressure: microseconds per budget pump when a lease ends while a load waits for
bytes that cannot yet be granted, at 10,000 and 100,000 resident models, for `LRUPolicy` and
`CostAwarePolicy`. The device tier's own objects (`ByteBudget` and the policy) are driven as
`ModelCache` drives them, with stand-in entries (``ModelCache`` cannot hold 100,000 models that
own bytes, see above): every resident model holds 1 MiB and the budget is full; a load waits for
the whole budget, so no release can grant it; ``PRESSURE_LEASES`` leases are held at any time.
Each step leases a random model (``policy.accessed``, as a hit does) and ends the oldest lease;
an ending lease with a waiter in line pumps the budget (`ByteBudget.serve_line`, called by
`DeviceTier.release_lease`), and only that pump is timed. A pump asks the policy for victims, which it cannot find: the figure is the cost
of a failed victims query, paid on the event loop by every request that ends under pressure.
Steps stop after ``PRESSURE_MAX_PUMPS`` pumps or ``PRESSURE_SECONDS`` of timed pumps.

Revalidation: the scenarios above run with ``revalidate_after=None`` (never). At the smallest
entry count they run again with ``revalidate_after=REVALIDATE_ON_S`` (checks of every id fire
in the background while the hits are timed: a stat per check, in a worker thread) and the
ratio on/off of each p50 and p99 is reported: a check is never on the hit path, which only
compares a float with the clock.

Run: ``python benches/hit_latency.py [--quick] [--data-dir DIR] [--entries 10 100000]
[--pressure-entries 10000 100000]``.
"""

from __future__ import annotations

import gc
import os
import statistics
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.lowlevel
import numpy as np
import torch
from _common import (
    Percentiles,
    base_parser,
    data_dir,
    emit_json,
    machine_line,
    percentiles_us,
    print_table,
    rounded,
)
from safetensors.torch import save_file

from modelcache import CostAwarePolicy, EvictionPolicy, LRUPolicy, ModelCache
from modelcache._tiers import ByteBudget

GOAL_P50_US = 10.0
GOAL_P99_US = 50.0
N_TASKS = 1000
FILL_TASKS = 64
MiB = 1 << 20
PRESSURE_LEASES = 16
PRESSURE_MAX_PUMPS = 2000
PRESSURE_SECONDS = 1.0
#: ``revalidate_after`` of the revalidation-on run: short, so checks run during the timing.
REVALIDATE_ON_S = 0.05
PRESSURE_POLICIES: dict[str, Callable[[], EvictionPolicy]] = {
    "lru": LRUPolicy,
    "cost": CostAwarePolicy,
}


@dataclass(frozen=True)
class Config:
    entries: tuple[int, ...]
    calls_1task: int
    calls_per_task: int
    repeats: int
    tensor_bytes: int


@dataclass(frozen=True)
class Scenario:
    entries: int
    tasks: int
    ids: str  # "same" or "diff"
    figures: Percentiles
    calls: int
    all_hits: bool


def label(tasks: int, mode: str) -> str:
    ids = "the same id" if mode == "same" else "random ids"
    return f"{tasks} task{'s' if tasks > 1 else ''}, {ids}"


def write_tiny_model(directory: str, tensor_bytes: int) -> str:
    path = os.path.join(directory, "tiny.safetensors")
    save_file({"w": torch.zeros(tensor_bytes, dtype=torch.uint8)}, path)
    return path


async def fill(cache: ModelCache, ids: list[str]) -> float:
    """Load every id (FILL_TASKS concurrent tasks); return the seconds it took."""

    async def worker(part: list[str]) -> None:
        for model_id in part:
            async with cache.use(model_id):
                pass

    start = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for k in range(FILL_TASKS):
            tg.start_soon(worker, ids[k::FILL_TASKS])
    return time.perf_counter() - start


async def timed_loop(
    cache: ModelCache, seq: list[str], out: list[int], yield_between: bool
) -> None:
    """``async with cache.use(id)`` for each id in ``seq``; append each call's ns to ``out``."""
    clock = time.perf_counter_ns
    append = out.append
    if yield_between:
        checkpoint = anyio.lowlevel.checkpoint
        for model_id in seq:
            t0 = clock()
            async with cache.use(model_id):
                pass
            append(clock() - t0)
            await checkpoint()
    else:
        for model_id in seq:
            t0 = clock()
            async with cache.use(model_id):
                pass
            append(clock() - t0)


async def run_scenario(cache: ModelCache, seqs: list[list[str]]) -> tuple[list[int], bool]:
    """Run one timed loop per sequence, all concurrently; return every sample and all-hits."""
    before = cache.stats()
    samples: list[list[int]] = [[] for _ in seqs]
    gc.collect()
    if len(seqs) == 1:
        await timed_loop(cache, seqs[0], samples[0], yield_between=False)
    else:
        gate = anyio.Event()

        async def task(i: int) -> None:
            await gate.wait()
            await timed_loop(cache, seqs[i], samples[i], yield_between=True)

        async with anyio.create_task_group() as tg:
            for i in range(len(seqs)):
                tg.start_soon(task, i)
            await anyio.lowlevel.checkpoint()
            gate.set()
    after = cache.stats()
    total = sum(len(s) for s in seqs)
    all_hits = after.misses == before.misses and after.hits - before.hits == total
    return [ns for s in samples for ns in s], all_hits


def sequences(
    ids: list[str], tasks: int, calls: int, mode: str, rng: np.random.Generator
) -> list[list[str]]:
    if mode == "same":
        return [[ids[0]] * calls for _ in range(tasks)]
    return [[ids[i] for i in rng.integers(0, len(ids), size=calls)] for _ in range(tasks)]


#: Checks each `measure_entries` run made (the revalidation-on run must make some).
REVALIDATIONS: list[int] = []


def fill_cache(path: str, revalidate_after: float | None = None) -> ModelCache:
    """A cache in which every id is the tiny model at ``path``: the fill's set-up (here and in
    `fill_rate.py`)."""
    url = "file://" + path
    return ModelCache(
        lambda model_id: url,
        device="cpu",
        device_budget="2GiB",
        max_concurrent_loads=4,
        zero_copy=False,
        revalidate_after=revalidate_after,
    )


async def measure_entries(
    path: str, n: int, cfg: Config, revalidate_after: float | None = None
) -> tuple[float, list[Scenario]]:
    cache = fill_cache(path, revalidate_after)
    ids = [f"m{i}" for i in range(n)]
    rng = np.random.default_rng(12345)
    scenarios: list[Scenario] = []
    async with cache:
        fill_s = await fill(cache, ids)
        resident = cache.stats().models
        if resident != n:
            print(f"warning: {resident} of {n} models resident after the fill", file=sys.stderr)
        # Warm-up: the code paths and the interpreter's caches.
        await run_scenario(cache, sequences(ids, 1, 2000, "diff", rng))
        for tasks, calls in ((1, cfg.calls_1task), (N_TASKS, cfg.calls_per_task)):
            for mode in ("same", "diff"):
                reps: list[Percentiles] = []
                hits = True
                for _ in range(cfg.repeats):
                    samples, ok = await run_scenario(cache, sequences(ids, tasks, calls, mode, rng))
                    reps.append(percentiles_us(samples))
                    hits = hits and ok
                    del samples
                scenarios.append(
                    Scenario(
                        entries=n,
                        tasks=tasks,
                        ids=mode,
                        figures=Percentiles(
                            n=reps[0].n,
                            p50_us=statistics.median(r.p50_us for r in reps),
                            p99_us=statistics.median(r.p99_us for r in reps),
                            mean_us=statistics.median(r.mean_us for r in reps),
                            max_us=max(r.max_us for r in reps),
                        ),
                        calls=tasks * calls,
                        all_hits=hits,
                    )
                )
    REVALIDATIONS.append(cache.stats().revalidations)
    del cache
    gc.collect()
    return fill_s, scenarios


class Resident:
    """A resident model as the device budget and its policy see one (what a ``DeviceEntry`` offers)."""

    __slots__ = ("key", "leases", "model_id", "nbytes")

    def __init__(self, model_id: str) -> None:
        self.key = self.model_id = model_id
        self.nbytes = MiB
        self.leases = 0


def no_eviction(victim: object) -> None:
    raise AssertionError(f"nothing can be evicted under pressure, yet {victim!r} was")


async def release_under_pressure(
    n: int, make: Callable[[], EvictionPolicy], rng: np.random.Generator
) -> Percentiles:
    """Per-pump figures of ending leases while a load waits for bytes (see the docstring)."""
    policy = make()
    budget: ByteBudget[Resident] = ByteBudget(
        "device", n * MiB, evictable=lambda e: e.leases == 0, evict=no_eviction, policy=policy
    )
    models = [Resident(f"m{i}") for i in range(n)]
    for model in models:
        assert budget.try_reserve(model.nbytes)  # room left: nothing is asked of the policy
        budget.admit(model)
    leased: deque[Resident] = deque()

    def lease(model: Resident) -> None:
        model.leases += 1
        policy.accessed(model)
        leased.append(model)

    for i in rng.choice(n, size=PRESSURE_LEASES, replace=False):
        lease(models[i])
    samples: list[int] = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(budget.reserve, n * MiB)  # needs every byte: waits while any is leased
        await anyio.wait_all_tasks_blocked()
        assert budget.waiting == 1
        gc.collect()
        clock = time.perf_counter_ns
        spent, cap = 0, int(PRESSURE_SECONDS * 1e9)
        picks = rng.integers(0, n, size=PRESSURE_MAX_PUMPS * 2)
        for i in picks:
            lease(models[i])
            model = leased.popleft()
            model.leases -= 1
            if model.leases == 0 and budget.waiting:  # DeviceTier.release_lease
                t0 = clock()
                budget.serve_line()
                took = clock() - t0
                samples.append(took)
                spent += took
                if len(samples) >= PRESSURE_MAX_PUMPS or spent >= cap:
                    break
        assert budget.waiting == 1, "the waiting load was granted: no pressure was measured"
        tg.cancel_scope.cancel()
    return percentiles_us(samples)


def short_count(n: int) -> str:
    return f"{n // 1000}k" if n >= 1000 and n % 1000 == 0 else str(n)


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0] if __doc__ else "hit latency")
    parser.add_argument(
        "--entries", type=int, nargs="+", default=None, help="resident entry counts to measure"
    )
    parser.add_argument(
        "--tensor-bytes", type=int, default=0, help="bytes of the tiny model's one tensor"
    )
    parser.add_argument(
        "--pressure-entries",
        type=int,
        nargs="*",
        default=[10_000, 100_000],
        help="resident models for the release-under-pressure case (none: skip it)",
    )
    args = parser.parse_args()
    quick: bool = args.quick
    entries = tuple(args.entries) if args.entries else ((10, 2000) if quick else (10, 100_000))
    cfg = Config(
        entries=entries,
        calls_1task=20_000 if quick else 200_000,
        calls_per_task=20 if quick else 200,
        repeats=2 if quick else 3,
        tensor_bytes=args.tensor_bytes,
    )
    print(f"hit_latency{' (quick)' if quick else ''}: {machine_line()}")
    print(
        f"tiny model: one {cfg.tensor_bytes}-byte tensor, zero_copy=False; every id resolves to "
        f"the same file; fill with {FILL_TASKS} tasks, max_concurrent_loads=4"
    )
    figures: dict[str, Any] = {}
    fills: list[tuple[int, float]] = []
    results: list[Scenario] = []
    with data_dir(args.data_dir, "modelcache-hit-") as directory:
        path = write_tiny_model(directory, cfg.tensor_bytes)
        for n in cfg.entries:
            fill_s, scenarios = anyio.run(measure_entries, path, n, cfg)
            fills.append((n, fill_s))
            results.extend(scenarios)
        _, revalidating = anyio.run(measure_entries, path, min(cfg.entries), cfg, REVALIDATE_ON_S)

    print_table(
        "Filling the cache (cold loads of the tiny model, one per id)",
        ["entries", "fill s", "loads/s", "us/load"],
        [[n, s, n / s, s / n * 1e6] for n, s in fills],
    )
    rows: list[list[object]] = []
    for r in results:
        f = r.figures
        ok = f.p50_us <= GOAL_P50_US and f.p99_us <= GOAL_P99_US
        rows.append(
            [
                label(r.tasks, r.ids),
                r.entries,
                r.calls,
                f.p50_us,
                f.p99_us,
                f.mean_us,
                f.max_us,
                "yes" if r.all_hits else "NO",
                "meets" if ok else "misses",
            ]
        )
    print_table(
        f"Hit latency per use() in us (median over repetitions); goal p50 <= {GOAL_P50_US:g} us, "
        f"p99 <= {GOAL_P99_US:g} us, flat in the number of entries",
        ["scenario", "entries", "calls", "p50", "p99", "mean", "max", "all hits", "goal"],
        rows,
    )

    for n, s in fills:
        figures[f"fill_seconds_{n}entries"] = rounded(s)
        figures[f"fill_loads_per_s_{n}entries"] = rounded(n / s)
    for r in results:
        tag = f"{r.tasks}task{'s' if r.tasks > 1 else ''}_{r.ids}id_{r.entries}entries"
        figures[f"hit_p50_us_{tag}"] = rounded(r.figures.p50_us)
        figures[f"hit_p99_us_{tag}"] = rounded(r.figures.p99_us)
        figures[f"hit_mean_us_{tag}"] = rounded(r.figures.mean_us)
    lo, hi = min(cfg.entries), max(cfg.entries)
    if lo != hi:
        ratio_rows: list[list[object]] = []
        by_key = {(r.entries, r.tasks, r.ids): r for r in results}
        for tasks in (1, N_TASKS):
            for mode in ("same", "diff"):
                a, b = by_key[(lo, tasks, mode)], by_key[(hi, tasks, mode)]
                p50 = b.figures.p50_us / a.figures.p50_us
                p99 = b.figures.p99_us / a.figures.p99_us
                tag = f"{tasks}task{'s' if tasks > 1 else ''}_{mode}id"
                figures[f"hit_p50_ratio_{hi}_vs_{lo}_entries_{tag}"] = rounded(p50)
                figures[f"hit_p99_ratio_{hi}_vs_{lo}_entries_{tag}"] = rounded(p99)
                ratio_rows.append([label(tasks, mode), p50, p99])
        print_table(
            f"Flatness: figure at {hi:,} entries / figure at {lo:,} entries (1.00 = flat)",
            ["scenario", "p50 ratio", "p99 ratio"],
            ratio_rows,
        )
    pressure: list[list[object]] = []
    rng = np.random.default_rng(7)
    for n in args.pressure_entries:
        for name, make in PRESSURE_POLICIES.items():
            f = anyio.run(release_under_pressure, n, make, rng)
            tag = f"{short_count(n)}_{name}"
            figures[f"release_under_pressure_us_{tag}"] = rounded(f.mean_us)
            figures[f"release_under_pressure_p99_us_{tag}"] = rounded(f.p99_us)
            pressure.append([name, n, f.n, f.p50_us, f.p99_us, f.mean_us, f.max_us])
    if pressure:
        print_table(
            "Release under pressure: us per pump when a lease ends while a load waits for bytes "
            f"that cannot be granted ({PRESSURE_LEASES} leases held)",
            ["policy", "entries", "pumps", "p50", "p99", "mean", "max"],
            pressure,
        )
    off = {(r.tasks, r.ids): r for r in results if r.entries == min(cfg.entries)}
    reval_rows: list[list[object]] = []
    for r in revalidating:
        base = off[(r.tasks, r.ids)]
        p50 = r.figures.p50_us / base.figures.p50_us
        p99 = r.figures.p99_us / base.figures.p99_us
        tag = f"{r.tasks}task{'s' if r.tasks > 1 else ''}_{r.ids}id_{r.entries}entries"
        figures[f"revalidating_hit_p50_us_{tag}"] = rounded(r.figures.p50_us)
        figures[f"revalidating_hit_p99_us_{tag}"] = rounded(r.figures.p99_us)
        figures[f"revalidating_hit_p50_ratio_{tag}"] = rounded(p50)
        figures[f"revalidating_hit_p99_ratio_{tag}"] = rounded(p99)
        reval_rows.append(
            [label(r.tasks, r.ids), r.entries, r.figures.p50_us, r.figures.p99_us, p50, p99]
        )
    print_table(
        f"Revalidation on (revalidate_after={REVALIDATE_ON_S:g} s) vs off, {min(cfg.entries)} "
        "entries; goal: ratios within 1.10",
        ["scenario", "entries", "p50", "p99", "p50 on/off", "p99 on/off"],
        reval_rows,
    )
    figures["revalidations_during_on_run"] = REVALIDATIONS[-1]
    print(f"checks made during the revalidation-on run: {REVALIDATIONS[-1]}")
    figures["all_hits"] = all(r.all_hits for r in results)
    figures["quick"] = quick
    print()
    emit_json(figures)


if __name__ == "__main__":
    main()
