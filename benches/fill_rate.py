"""Fill rate: cold loads per second of many small models, and what each load costs.

The set-up of `hit_latency.py`'s fill: every id resolves to one tiny safetensors file (one
zero-element tensor, so no weight bytes), ``zero_copy=False``, ``device="cpu"``,
``max_concurrent_loads=4``, ``FILL_TASKS`` tasks each looping ``async with cache.use(id)`` over
its share of the ids. Reported: loads/s and µs per load (wall), CPU µs per load (every thread
of the process), and, in a second fill of as many fresh ids, worker-thread calls
(``anyio.to_thread.run_sync``) and asyncio tasks created per load (counting adds a little to
each). Then the same fill through one ``cache.prefetch(ids)`` call (``prefetch_*``: its loads
start from the caller's task, ``PREFETCH_WINDOW`` at a time, a group's headers read in one
worker call and its loads run in lanes; its worker calls and tasks per load counted in a
fourth fill). ``--profile`` prints a cProfile
of the timed use() fill, by own time and by cumulative time; ``--profile-prefetch`` the same of
the prefetch fill.

Run: ``python benches/fill_rate.py [--quick] [--ids N] [--profile | --profile-prefetch]``.
"""

from __future__ import annotations

import asyncio
import cProfile
import gc
import io
import os
import pstats
import time
from collections.abc import Coroutine, Generator
from typing import Any

import anyio
import anyio.to_thread
import torch
from _common import base_parser, data_dir, emit_json, machine_line, rounded
from hit_latency import fill_cache
from safetensors.torch import save_file

FILL_TASKS = 64


async def fill(
    path: str, prefix: str, n: int, profile: cProfile.Profile | None, *, prefetch: bool = False
) -> float:
    """Load ``n`` fresh ids into a new cache; return the seconds the fill took. ``prefetch``:
    one ``cache.prefetch(ids)`` call instead of the tasks looping over ``use()``."""
    cache = fill_cache(path)
    ids = [f"{prefix}{i}" for i in range(n)]

    async def worker(part: list[str]) -> None:
        for model_id in part:
            async with cache.use(model_id):
                pass

    async with cache:
        start = time.perf_counter()
        if profile is not None:
            profile.enable()
        if prefetch:
            await cache.prefetch(ids)
        else:
            async with anyio.create_task_group() as tg:
                for k in range(FILL_TASKS):
                    tg.start_soon(worker, ids[k::FILL_TASKS])
        if profile is not None:
            profile.disable()
        seconds = time.perf_counter() - start
        assert cache.stats().models == n, cache.stats()
    return seconds


class _GcTimer:
    """Time spent in the garbage collector's passes, and its full (generation 2) passes."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.full = 0
        self._start = 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.seconds += time.perf_counter() - self._start
            self.full += info["generation"] == 2


async def timed_fill(
    path: str, prefix: str, n: int, profile: cProfile.Profile | None, *, prefetch: bool = False
) -> dict[str, float]:
    """One fill's loads/s, wall and CPU µs per load, and its garbage collector's share."""
    collector = _GcTimer()
    gc.callbacks.append(collector)
    cpu = time.process_time()
    try:
        seconds = await fill(path, prefix, n, profile, prefetch=prefetch)
    finally:
        cpu = time.process_time() - cpu
        gc.callbacks.remove(collector)
    return {
        "loads_per_s": n / seconds,
        "us_per_load": seconds / n * 1e6,
        "cpu_us_per_load": cpu / n * 1e6,
        "gc_us_per_load": collector.seconds / n * 1e6,
        "gc_full_passes": collector.full,
    }


async def measure(
    path: str, n: int, profile: cProfile.Profile | None, profiled: str = "use"
) -> dict[str, float]:
    timed = await timed_fill(path, "m", n, profile if profiled == "use" else None)
    # The same fill through one ``cache.prefetch(ids)`` call (its loads start from the caller's
    # task, a window at a time), in a new cache, after the use() fill.
    batched = await timed_fill(
        path, "p", n, profile if profiled == "prefetch" else None, prefetch=True
    )
    # Counted in a second fill, so that the counting does not slow the timed one.
    counts = {"threads": 0, "tasks": 0}
    real = anyio.to_thread.run_sync

    async def counting(*args: Any, **kwargs: Any) -> Any:
        counts["threads"] += 1
        return await real(*args, **kwargs)

    def factory(
        loop: asyncio.AbstractEventLoop,
        coro: Generator[Any, None, Any] | Coroutine[Any, Any, Any],
        **kwargs: Any,
    ) -> asyncio.Task[Any]:
        counts["tasks"] += 1
        return asyncio.Task(coro, loop=loop, **kwargs)

    loop = asyncio.get_running_loop()
    loop.set_task_factory(factory)
    anyio.to_thread.run_sync = counting  # type: ignore[assignment]
    try:
        await fill(path, "c", n, None)
        used = dict(counts)
        await fill(path, "d", n, None, prefetch=True)  # the same counts of a prefetch fill
    finally:
        anyio.to_thread.run_sync = real
        loop.set_task_factory(None)
    return {
        "fill_loads_per_s": timed["loads_per_s"],
        "fill_us_per_load": timed["us_per_load"],
        "fill_cpu_us_per_load": timed["cpu_us_per_load"],
        "gc_us_per_load": timed["gc_us_per_load"],
        "gc_full_passes": timed["gc_full_passes"],
        "thread_calls_per_load": used["threads"] / n,
        "tasks_per_load": used["tasks"] / n,
        **{f"prefetch_{key}": value for key, value in batched.items()},
        "prefetch_thread_calls_per_load": (counts["threads"] - used["threads"]) / n,
        "prefetch_tasks_per_load": (counts["tasks"] - used["tasks"]) / n,
    }


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0] if __doc__ else "fill rate")
    parser.add_argument("--ids", type=int, default=None, help="ids to load (default 10,000)")
    parser.add_argument("--profile", action="store_true", help="print a cProfile of the fill")
    parser.add_argument(
        "--profile-prefetch", action="store_true", help="print a cProfile of the prefetch fill"
    )
    args = parser.parse_args()
    n = args.ids or (2000 if args.quick else 10_000)
    print(f"fill_rate{' (quick)' if args.quick else ''}: {machine_line()}")
    print(f"{n} ids, {FILL_TASKS} tasks, max_concurrent_loads=4, file://, zero_copy=False")
    profile = cProfile.Profile() if args.profile or args.profile_prefetch else None
    profiled = "prefetch" if args.profile_prefetch else "use"
    with data_dir(args.data_dir, "modelcache-fill-") as directory:
        path = os.path.join(directory, "tiny.safetensors")
        save_file({"w": torch.zeros(0, dtype=torch.uint8)}, path)
        figures = anyio.run(measure, path, n, profile, profiled, backend="asyncio")
    if profile is not None:
        out = io.StringIO()
        stats = pstats.Stats(profile, stream=out)
        stats.sort_stats("tottime").print_stats(30)
        stats.sort_stats("cumtime").print_stats(40)
        print(out.getvalue())
    for key, value in figures.items():
        print(f"{key}: {value:.2f}")
    # The machine's load (1-minute average) as the run ended: a shared machine's other work
    # inflates CPU µs per load too (caches, hyper-threads), so runs are compared at like loads.
    load1 = round(os.getloadavg()[0], 2)
    emit_json({key: rounded(value) for key, value in figures.items()} | {"ids": n, "load1": load1})


if __name__ == "__main__":
    main()
