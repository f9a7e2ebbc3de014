"""Tier reload: time to a ready model from each tier - device hit, host, disk, store.

The model is load_throughput's (64 tensors of mixed dtypes, seeded random bytes, one
``model.safetensors``), of 64 MiB and of 1 GiB (``--quick``: 64 MiB only). The store is a local
SeaweedFS S3 server (``weed mini``, as in remote_load.py; its files are in the page cache), a
remote store, so the disk tier is in play; a memory:// store is measured too (also remote to the
cache: fsspec's MemoryFileSystem). Without SeaweedFS, memory:// stands in for S3 throughout.
Device: CPU. Timed: ``async with cache.use(id)`` from the call until the block is entered.

- **device hit**: the model is resident and unleased; the median of 1,000 hits per repetition.
- **host tier**: a cache with a ``host_budget``; ``cache.evict(id)`` moves the model to the host
  tier, then it is reloaded. On a CPU device the host tier keeps the weights buffer itself, so
  a promotion moves it back without a copy (on CUDA it is one copy: see gpu_load.py).
- **disk tier**: a cache with ``host_budget=0`` and a ``disk_dir``. The first load from the store
  writes the model to disk in the background (waited for: ``stats().tiers["disk"].entries``);
  ``cache.evict(id)`` then drops it from the device and it is reloaded from disk (copied:
  the disk tier is never mapped). The disk tier drops its file's pages from the page cache after
  writing (``POSIX_FADV_DONTNEED``), so the headline disk row does the same before every
  reload (cold: the disk's own speed); the "warm" row reads the files once, untimed, first.
  Both run twice: with the content check (the default: what the load read is hashed, XXH3-64,
  and compared with the checksums written with the entry) and without it (sizes only), so
  ``disk_verify_cost_pct_*`` is the check's cost on a reload (best vs best). ``xxh3_gbps`` is
  the hash alone over the model's buffer, one core.
- **disk validation**: what the disk tier adds to a reload at most once per ``revalidate_after``
  (default 60 s) per model: a check of the copy's version against the store, one HEAD (a stat
  for memory://) for this single-file model, timed as ``await cache.refresh(id)`` of the
  unchanged, resident model (the same check). Reported against the disk reload.
- **store**: a fresh cache without host or disk tiers every repetition (fresh client,
  connections and buffer): a cold load over S3, or from memory://.

Rows run round-robin, each ``--repeats`` times after one untimed warm-up; best and median are
reported, GB/s of the payload from each. Each timed reload checks that the tier it names served
it (``stats().tiers[...].hits``). Speedups are store seconds / tier seconds, best of each. Goal:
a host-tier reload >= 10x faster than a load from the store (S3).

Run: ``python benches/tier_reload.py [--quick] [--data-dir DIR] [--repeats N]``.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import fsspec
import numpy as np
import xxhash
from _common import (
    GIB,
    MIB,
    Method,
    base_parser,
    data_dir,
    drop,
    emit_json,
    gbps,
    host_reload,
    human_seconds,
    machine_line,
    on_device,
    print_table,
    ready,
    rounded,
    run_all,
    s3_upload,
    seaweedfs,
    size_label,
)
from load_throughput import N_TENSORS, dtypes
from remote_load import MODEL_ID, write_model

from modelcache import ModelCache

GOAL_HOST_VS_STORE = 10.0
HITS_PER_REPEAT = 1000
DISK_WRITE_TIMEOUT = 300.0


@dataclass
class Stores:
    """Where one model size is served from."""

    remote: str  # the store of the host and disk caches: S3, or memory:// without SeaweedFS
    remote_options: dict[str, Any] | None
    s3: str | None
    s3_options: dict[str, Any] | None
    memory: str


def budgets(payload: int) -> int:
    """A budget that holds one model of ``payload`` bytes with room to spare."""
    return payload + payload // 4 + 64 * MIB


def fresh_cache(template: str, options: dict[str, Any] | None, payload: int) -> ModelCache:
    return ModelCache(
        template,
        storage_options=options,
        device="cpu",
        device_budget=budgets(payload),
        max_concurrent_loads=4,
    )


def check(weights: Mapping[str, Any]) -> None:
    if len(weights) != N_TENSORS:
        raise RuntimeError(f"the model has {len(weights)} tensors, not {N_TENSORS}")


async def cpu_ready(cache: ModelCache) -> float:
    """Seconds until ``async with cache.use(MODEL_ID)`` is entered."""
    return await ready(cache, MODEL_ID, check)


def tier_hits(cache: ModelCache, tier: str) -> int:
    return cache.stats().tiers[tier].hits


@asynccontextmanager
async def opened(cache: ModelCache) -> AsyncIterator[ModelCache]:
    async with cache:
        yield cache


def drop_page_cache(directory: str) -> None:
    """Drop the page-cache pages of every file under ``directory`` (clean pages: no root needed)."""
    for parent, _, names in os.walk(directory):
        for name in names:
            fd = os.open(os.path.join(parent, name), os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def read_all(directory: str) -> None:
    """Read every file under ``directory`` once (into the page cache)."""
    for parent, _, names in os.walk(directory):
        for name in names:
            with open(os.path.join(parent, name), "rb", buffering=0) as f:
                while f.read(64 * MIB):
                    pass


# -- the measurements: each returns seconds ------------------------------------------------------


async def store_load(template: str, options: dict[str, Any] | None, payload: int) -> float:
    async with fresh_cache(template, options, payload) as cache:
        seconds = await cpu_ready(cache)
        stats = cache.stats()
        if stats.loads != 1 or stats.hits != 0:
            raise RuntimeError(f"a fresh cache did not load from the store: {stats}")
    return seconds


async def disk_reload(
    cache: ModelCache, disk_dir: str, *, cold: bool, verify: bool = True
) -> float:
    await drop(cache, MODEL_ID, partial(cpu_ready, cache))
    await anyio.to_thread.run_sync(drop_page_cache if cold else read_all, disk_dir)
    disk = cache._host_disk.disk  # the check has no public switch: it is always on
    assert disk is not None
    hits, damaged = tier_hits(cache, "disk"), disk.stats().damaged
    disk.verify = verify
    try:
        seconds = await cpu_ready(cache)
    finally:
        disk.verify = True
    if tier_hits(cache, "disk") != hits + 1 or disk.stats().damaged != damaged:
        raise RuntimeError("the reload was not served by the disk tier")
    return seconds


async def disk_validation(cache: ModelCache) -> float:
    """Seconds of one check of the model's version against the store (see the docstring)."""
    if not on_device(cache, MODEL_ID):
        await cpu_ready(cache)
    before = cache.stats().revalidations
    start = time.perf_counter()
    changed = await cache.refresh(MODEL_ID)
    seconds = time.perf_counter() - start
    if changed or cache.stats().revalidations != before + 1:
        raise RuntimeError("refresh() did not make exactly one check of an unchanged model")
    return seconds


def xxh3_seconds(payload: int) -> float:
    """Seconds to hash ``payload`` bytes of memory with XXH3-64 (the disk tier's check), best
    of 5."""
    view = memoryview(np.random.default_rng(0).bytes(payload))
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        xxhash.xxh3_64(view).intdigest()
        best = min(best, time.perf_counter() - start)
    return best


async def device_hit(cache: ModelCache) -> float:
    """The median seconds of HITS_PER_REPEAT hits on a resident, unleased model."""
    if not on_device(cache, MODEL_ID):
        await cpu_ready(cache)
    hits = cache.stats().hits
    samples = np.empty(HITS_PER_REPEAT, dtype=np.int64)
    for i in range(HITS_PER_REPEAT):
        start = time.perf_counter_ns()
        async with cache.use(MODEL_ID):
            samples[i] = time.perf_counter_ns() - start
    if cache.stats().hits != hits + HITS_PER_REPEAT:
        raise RuntimeError("not every use() was a hit")
    return float(np.median(samples)) / 1e9


async def wait_for_disk(cache: ModelCache) -> None:
    with anyio.fail_after(DISK_WRITE_TIMEOUT):
        await cache.wait_idle()
    if cache.stats().tiers["disk"].entries < 1:
        raise RuntimeError("the model was not written to the disk tier")


# -- one model size -------------------------------------------------------------------------------


@dataclass
class SizeResult:
    total: int
    payload: int
    methods: list[Method]
    disk_write_s: float

    @property
    def label(self) -> str:
        return size_label(self.total)

    def by(self, key: str) -> Method | None:
        return next((m for m in self.methods if m.key == key), None)


async def measure_size(
    total: int, payload: int, stores: Stores, disk_dir: str, repeats: int
) -> SizeResult:
    async with AsyncExitStack() as stack:
        host_cache = await stack.enter_async_context(
            opened(
                ModelCache(
                    stores.remote,
                    storage_options=stores.remote_options,
                    device="cpu",
                    device_budget=budgets(payload),
                    host_budget=budgets(payload),
                )
            )
        )
        disk_cache = await stack.enter_async_context(
            opened(
                ModelCache(
                    stores.remote,
                    storage_options=stores.remote_options,
                    device="cpu",
                    device_budget=budgets(payload),
                    host_budget=0,
                    disk_dir=disk_dir,
                    disk_budget=2 * budgets(payload),
                )
            )
        )
        await cpu_ready(host_cache)
        started = time.perf_counter()
        await cpu_ready(disk_cache)  # from the store; written to disk in the background
        await wait_for_disk(disk_cache)
        disk_write_s = time.perf_counter() - started

        methods: list[Method] = []
        s3, s3_options = stores.s3, stores.s3_options
        if s3 is not None:
            methods.append(
                Method(
                    "store_s3", "store: S3 (SeaweedFS)", lambda: store_load(s3, s3_options, payload)
                )
            )
        methods += [
            Method(
                "store_memory", "store: memory://", lambda: store_load(stores.memory, None, payload)
            ),
            Method(
                "disk_reload",
                "disk tier (page cache dropped)",
                lambda: disk_reload(disk_cache, disk_dir, cold=True),
            ),
            Method(
                "disk_reload_unverified",
                "disk tier (page cache dropped), no content check",
                lambda: disk_reload(disk_cache, disk_dir, cold=True, verify=False),
            ),
            Method(
                "disk_warm_reload",
                "disk tier (page cache warm)",
                lambda: disk_reload(disk_cache, disk_dir, cold=False),
            ),
            Method(
                "disk_warm_reload_unverified",
                "disk tier (page cache warm), no content check",
                lambda: disk_reload(disk_cache, disk_dir, cold=False, verify=False),
            ),
            Method(
                "disk_validation",
                "disk validation (one HEAD)",
                lambda: disk_validation(disk_cache),
            ),
            Method(
                "host_reload",
                "host tier",
                lambda: host_reload(host_cache, MODEL_ID, partial(cpu_ready, host_cache)),
            ),
            Method(
                "device_hit",
                f"device hit (median of {HITS_PER_REPEAT:,})",
                lambda: device_hit(host_cache),
            ),
        ]
        await run_all(methods, repeats)
    return SizeResult(total, payload, methods, disk_write_s)


# -- set-up and report ----------------------------------------------------------------------------


def report(result: SizeResult, store_key: str, figures: dict[str, Any]) -> list[list[object]]:
    """Print the size's table, add its figures; returns its rows of the goals table."""
    n, label = result.payload, result.label
    store = result.by(store_key)
    assert store is not None
    rows: list[list[object]] = []
    for m in result.methods:
        t = m.times
        hit = m.key == "device_hit"
        moves = not hit and m.key != "disk_validation"  # a check moves no weight byte
        rows.append(
            [
                m.label,
                human_seconds(t.best),
                human_seconds(t.median),
                gbps(n, t.best) if moves else float("nan"),
                gbps(n, t.median) if moves else float("nan"),
                store.times.best / t.best,
                human_seconds(m.warmup),
            ]
        )
        if hit:
            figures[f"device_hit_us_{label}"] = rounded(t.best * 1e6)
            figures[f"device_hit_median_us_{label}"] = rounded(t.median * 1e6)
            continue
        figures[f"{m.key}_ms_{label}"] = rounded(t.best * 1e3)
        figures[f"{m.key}_median_ms_{label}"] = rounded(t.median * 1e3)
        if moves:
            figures[f"{m.key}_gbps_{label}"] = rounded(gbps(n, t.best))
    print_table(
        f"Time to a ready model, {n / MIB:,.0f} MiB payload "
        f"(speedup = {store.label} best / row best)",
        ["from", "best", "median", "best GB/s", "median GB/s", "speedup", "warm-up"],
        rows,
    )
    goals: list[list[object]] = []
    for key, mine, baseline, goal in (
        (f"host_reload_speedup_vs_store_{label}", "host_reload", store_key, GOAL_HOST_VS_STORE),
        (f"disk_reload_speedup_vs_store_{label}", "disk_reload", store_key, None),
        (f"disk_warm_reload_speedup_vs_store_{label}", "disk_warm_reload", store_key, None),
        (f"host_reload_speedup_vs_memory_store_{label}", "host_reload", "store_memory", None),
        (f"disk_reload_speedup_vs_memory_store_{label}", "disk_reload", "store_memory", None),
    ):
        a, b = result.by(mine), result.by(baseline)
        if a is None or b is None or (baseline == "store_memory" and store_key == baseline):
            continue  # without S3, "vs store" already is vs memory://
        value = b.times.best / a.times.best
        figures[key] = rounded(value)
        verdict = "" if goal is None else ("meets" if value >= goal else "misses")
        goals.append([key, value, "" if goal is None else f">= {goal:.0f}x", verdict])
    for checked, unchecked, key in (
        ("disk_reload", "disk_reload_unverified", f"disk_verify_cost_pct_{label}"),
        ("disk_warm_reload", "disk_warm_reload_unverified", f"disk_warm_verify_cost_pct_{label}"),
    ):
        a, b = result.by(checked), result.by(unchecked)
        if a is not None and b is not None:
            figures[key] = rounded((a.times.best / b.times.best - 1) * 100)
            goals.append([key, figures[key], "", "% slower with the content check"])
    hash_s = xxh3_seconds(n)
    figures[f"xxh3_gbps_{label}"] = rounded(gbps(n, hash_s))
    figures[f"disk_write_behind_s_{label}"] = rounded(result.disk_write_s)
    check, reload = result.by("disk_validation"), result.by("disk_reload")
    if check is not None and reload is not None:
        figures[f"disk_validation_vs_disk_reload_{label}"] = rounded(
            check.times.median / reload.times.median
        )
    return goals


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0] if __doc__ else "tier reload")
    parser.add_argument("--repeats", type=int, default=None, help="timed repetitions per row")
    args = parser.parse_args()
    quick: bool = args.quick
    totals = [64 * MIB] if quick else [64 * MIB, GIB]
    repeats: int = args.repeats or (3 if quick else 5)
    print(f"tier_reload{' (quick)' if quick else ''}: {machine_line()}")

    memory_fs = fsspec.filesystem("memory")
    memory_root = f"/modelcache-bench-{uuid.uuid4().hex}"
    results: list[SizeResult] = []
    with data_dir(args.data_dir, "modelcache-tiers-") as directory:
        root = Path(directory)
        with seaweedfs(root / "seaweedfs") as weed:
            try:
                for total in totals:
                    label = size_label(total)
                    path, _, payload = write_model(root / f"files-{label}", total)
                    memory_fs.pipe_file(
                        f"{memory_root}/{label}/{MODEL_ID}/model.safetensors", path.read_bytes()
                    )
                    memory = f"memory://{memory_root}/{label}/{{model_id}}/"
                    if weed is not None:
                        upload = s3_upload(
                            weed, path, f"bench-{label}/{MODEL_ID}/model.safetensors"
                        )
                        s3 = f"s3://{weed.bucket}/bench-{label}/{{model_id}}/"
                        stores = Stores(s3, weed.s3_options, s3, weed.s3_options, memory)
                        where = f"S3 (SeaweedFS {weed.endpoint}, upload {upload:.1f} s)"
                    else:
                        stores = Stores(memory, None, None, None, memory)
                        where = "memory:// (SeaweedFS's weed is not installed: no S3 rows)"
                    kinds = ", ".join(str(d).removeprefix("torch.") for d in dtypes())
                    print(
                        f"model {label}: {N_TENSORS} tensors ({kinds}), {payload / MIB:,.0f} MiB "
                        f"payload; store of the host and disk caches: {where}; {repeats} timed "
                        "repetitions after 1 warm-up, round-robin"
                    )
                    disk_dir = str(root / f"disk-{label}")
                    results.append(
                        anyio.run(measure_size, total, payload, stores, disk_dir, repeats)
                    )
                    path.unlink()
            finally:
                if memory_fs.exists(memory_root):
                    memory_fs.rm(memory_root, recursive=True)

    store_key = "store_s3" if results and results[0].by("store_s3") else "store_memory"
    figures: dict[str, Any] = {}
    goals: list[list[object]] = []
    for result in results:
        goals += report(result, store_key, figures)
    print_table(
        "Speedups, best of each (store seconds / tier seconds)",
        ["speedup", "value", "goal", ""],
        goals,
    )
    print(
        "\ndisk write-behind (load from the store until the disk tier lists the model): "
        + ", ".join(f"{r.label} {r.disk_write_s:.2f} s" for r in results)
    )
    largest = results[-1]
    hit = largest.by("device_hit")
    assert hit is not None
    figures["device_hit_us"] = rounded(hit.times.best * 1e6)
    figures["store"] = "s3" if store_key == "store_s3" else "memory"
    figures["cpus"] = os.cpu_count()
    figures["repeats"] = repeats
    figures["quick"] = quick
    print()
    emit_json(figures)


if __name__ == "__main__":
    main()
