"""GPU load: time to a ready model on a CUDA device, from each source, against baselines.

Needs a CUDA GPU: where ``torch.cuda.is_available()`` is false it says so, prints
``{"cuda": false}`` and exits 0 without measuring anything.

The model is load_throughput's (64 tensors of mixed dtypes, seeded random bytes, one
``model.safetensors``), of 1 GiB and 4 GiB (``--quick``: 1 GiB only), page cache warm. Ours, with
``ModelCache(device="cuda")`` - each cache made once per size and reused, as a server would (its
pinned staging pool and copy stream are made on its first load, in the warm-up):

1. **host tier**: a cache with a ``host_budget``; ``cache.evict(id)`` copies the model to the
   pinned host tier in the background (waited for, untimed), then the reload is timed: one
   pinned -> device copy on the cache's side stream;
2. **page cache (file://)**: a cache with no host tier; ``evict`` drops the model, the reload
   reads the file again. Zero-copy is CPU-only, so this path stages the reads through a few
   pinned chunks, each copied to the device while the next is read;
3. **store (S3)**: the same from a local SeaweedFS (``weed mini``); skipped without it.

4. **CuPy (file://)**: the same page-cache reload through ``CupyBackend`` (skipped without CuPy).

Also measured: ``file_cpu``, ours from file:// into CPU memory (copy path), for the staging
overlap estimate ``(file_cpu + ceiling - file) / min(file_cpu, ceiling)`` (1.0: reads and
copies fully overlapped, 0.0: one after the other); and ``memory_match``: whether the bytes the
cache reports resident equal what ``torch.cuda.memory_allocated`` grew by (within the
allocator's 512-byte rounding).

Baselines, in the same run:

a. ``safetensors.torch.load_file(path, device="cuda")``;
b. ``safetensors.torch.load_file(path)`` then ``.to("cuda")`` on each tensor;
c. the ceiling: ONE pinned host tensor of the payload's size ``.to("cuda", non_blocking=True)``.

Timed: from the call until the model is ready - for ours, ``async with cache.use(id)`` entered -
and ``torch.cuda.synchronize()`` is called before every timer stops (and before it starts).
Every timed reload of ours checks that the tier it names served it, and compares three of its
tensors, byte for byte, with safetensors' (after the timer stopped). Rows run round-robin, each
``--repeats`` times after one untimed warm-up; best and median are reported, GB/s of the payload
from each. Ratios are throughput ratios (baseline seconds / ours seconds): above 1.0 we are
faster. Goals: from the host tier >= 0.8x the ceiling, and >= 3x safetensors' own CUDA path (a).

Run: ``python benches/gpu_load.py [--quick] [--data-dir DIR] [--repeats N]``.
"""

from __future__ import annotations

import gc
import os
import time
from collections.abc import Mapping
from contextlib import AsyncExitStack
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import torch
from _common import (
    GIB,
    MIB,
    Method,
    Repeated,
    base_parser,
    data_dir,
    drop,
    emit_json,
    free_memory,
    gbps,
    host_reload,
    machine_line,
    print_table,
    print_times,
    ready,
    rounded,
    run_all,
    s3_upload,
    seaweedfs,
    size_label,
)
from load_throughput import N_TENSORS, dtypes
from remote_load import MODEL_ID, write_model
from safetensors import safe_open
from safetensors.torch import load_file

from modelcache import ModelCache

GOAL_HOST_VS_CEILING = 0.8
GOAL_HOST_VS_SAFETENSORS_CUDA = 3.0
MOVE_TIMEOUT = 120.0
DEVICE = torch.device("cuda")

#: (figure key, ours, baseline, goal)
RATIOS: tuple[tuple[str, str, str, float | None], ...] = (
    ("host_vs_ceiling_ratio", "host_tier", "ceiling", GOAL_HOST_VS_CEILING),
    (
        "host_vs_safetensors_cuda_ratio",
        "host_tier",
        "safetensors_cuda",
        GOAL_HOST_VS_SAFETENSORS_CUDA,
    ),
    ("host_vs_safetensors_to_cuda_ratio", "host_tier", "safetensors_to_cuda", None),
    ("file_vs_ceiling_ratio", "file", "ceiling", None),
    ("file_vs_safetensors_cuda_ratio", "file", "safetensors_cuda", None),
    ("file_vs_safetensors_to_cuda_ratio", "file", "safetensors_to_cuda", None),
    ("s3_vs_safetensors_cuda_ratio", "s3", "safetensors_cuda", None),
)


def synchronize() -> None:
    torch.cuda.synchronize(DEVICE)


def as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes as a flat uint8 tensor on the CPU (NaN-safe comparisons)."""
    return tensor.detach().reshape(-1).view(torch.uint8).cpu()


@dataclass
class Model:
    path: Path
    payload: int
    #: A few tensors as safetensors reads them (CPU bytes), to check ours against.
    reference: dict[str, torch.Tensor]


def read_reference(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        names = sorted(f.keys())
        picked = [names[0], names[len(names) // 2], names[-1]]
        return {name: as_bytes(f.get_tensor(name)) for name in picked}


def check(weights: Mapping[str, torch.Tensor], model: Model) -> None:
    if len(weights) != N_TENSORS:
        raise RuntimeError(f"the model has {len(weights)} tensors, not {N_TENSORS}")
    for name, expected in model.reference.items():
        got = weights[name]
        if got.device.type != "cuda":
            raise RuntimeError(f"{name} is on {got.device}, not on the GPU")
        if not torch.equal(as_bytes(got), expected):
            raise RuntimeError(f"{name} differs from safetensors' bytes")


# -- ours ----------------------------------------------------------------------------------------


def budget(payload: int) -> int:
    return payload + 64 * MIB


async def gpu_ready(cache: ModelCache, model: Model) -> float:
    """Seconds until ``async with cache.use(MODEL_ID)`` is entered and the GPU is idle."""
    return await ready(cache, MODEL_ID, partial(check, model=model), synchronize=synchronize)


async def wait_idle(cache: ModelCache, what: str) -> None:
    try:
        with anyio.fail_after(MOVE_TIMEOUT):
            await cache.wait_idle()
    except TimeoutError:
        raise RuntimeError(f"{what} did not end within {MOVE_TIMEOUT:.0f} s") from None


async def gpu_host_reload(cache: ModelCache, model: Model) -> float:
    async def moved() -> None:
        await wait_idle(cache, "the copy to the host tier")
        synchronize()

    return await host_reload(cache, MODEL_ID, partial(gpu_ready, cache, model), moved=moved)


async def store_reload(cache: ModelCache, model: Model) -> float:
    """Drop the model (the cache has no host tier) and load it from the cache's store again."""
    await drop(cache, MODEL_ID, partial(gpu_ready, cache, model))
    loads = cache.stats().loads
    seconds = await gpu_ready(cache, model)
    stats = cache.stats()
    if stats.loads != loads + 1 or stats.tiers["host"].hits:
        raise RuntimeError(f"the reload did not come from the store: {stats}")
    return seconds


async def cpu_reload(cache: ModelCache) -> float:
    """Drop the model from a CPU-device cache (copy path) and time reading it again."""
    if MODEL_ID not in cache.resident("device"):
        async with cache.use(MODEL_ID):
            pass
    if not cache.evict(MODEL_ID):
        raise RuntimeError(f"evict() refused: {cache.stats()}")
    start = time.perf_counter()
    async with cache.use(MODEL_ID) as weights:
        seconds = time.perf_counter() - start
        if len(weights) != N_TENSORS:
            raise RuntimeError("the CPU load returned the wrong tensors")
    del weights
    return seconds


def cupy_check(weights: Any, model: Model) -> None:
    from torch.utils.dlpack import from_dlpack

    for name, expected in model.reference.items():
        got = from_dlpack(weights.dlpack(name)).reshape(-1).view(torch.uint8).cpu()
        if not torch.equal(got, expected):
            raise RuntimeError(f"CuPy: {name} differs from safetensors' bytes")


async def cupy_reload(cache: ModelCache, model: Model) -> float:
    if MODEL_ID in cache.resident("device") and not cache.evict(MODEL_ID):
        raise RuntimeError(f"evict() refused: {cache.stats()}")
    synchronize()
    start = time.perf_counter()
    async with cache.use(MODEL_ID) as weights:
        synchronize()
        seconds = time.perf_counter() - start
        cupy_check(weights, model)
    del weights
    return seconds


def cupy_backend() -> Any:
    """A CupyBackend on device 0, or None without CuPy."""
    try:
        from modelcache import CupyBackend

        return CupyBackend(0)
    except (ImportError, ValueError):
        return None


async def memory_match(file_template: str, payload: int) -> dict[str, Any]:
    """Load the model into a fresh cache: does memory_allocated grow by what the cache reports?"""
    gc.collect()
    synchronize()
    before = torch.cuda.memory_allocated(DEVICE)
    async with ModelCache(file_template, device=DEVICE, device_budget=budget(payload)) as cache:
        async with cache.use(MODEL_ID):
            pass
        synchronize()
        grown = torch.cuda.memory_allocated(DEVICE) - before
        reported = cache.stats().bytes_reserved
    gc.collect()
    synchronize()
    after = torch.cuda.memory_allocated(DEVICE) - before
    return {
        "memory_match": 0 <= grown - reported <= 512 and after == 0,
        "memory_allocated_growth": grown,
        "memory_reported": reported,
        "memory_left_after_close": after,
    }


# -- baselines -----------------------------------------------------------------------------------


async def ceiling(pinned: torch.Tensor) -> float:
    synchronize()
    start = time.perf_counter()
    on_gpu = pinned.to(DEVICE, non_blocking=True)
    synchronize()
    seconds = time.perf_counter() - start
    del on_gpu
    return seconds


async def safetensors_cuda(model: Model) -> float:
    synchronize()
    start = time.perf_counter()
    tensors = load_file(str(model.path), device=str(DEVICE))
    synchronize()
    seconds = time.perf_counter() - start
    if len(tensors) != N_TENSORS:
        raise RuntimeError("safetensors returned the wrong tensors")
    del tensors
    return seconds


async def safetensors_to_cuda(model: Model) -> float:
    synchronize()
    start = time.perf_counter()
    tensors = {name: t.to(DEVICE) for name, t in load_file(str(model.path)).items()}
    synchronize()
    seconds = time.perf_counter() - start
    if len(tensors) != N_TENSORS:
        raise RuntimeError("safetensors returned the wrong tensors")
    del tensors
    return seconds


# -- one model size ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Result:
    key: str
    label: str
    times: Repeated
    warmup: float


async def measure_size(
    model: Model, file_template: str, s3: tuple[str, dict[str, Any]] | None, repeats: int
) -> list[Result]:
    n = model.payload
    pinned = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    pinned.fill_(1)  # touched once, untimed
    async with AsyncExitStack() as stack:

        async def cache(template: str, options: dict[str, Any] | None, host: int) -> ModelCache:
            made = ModelCache(
                template,
                storage_options=options,
                device=DEVICE,
                device_budget=budget(n),
                host_budget=host,
            )
            return await stack.enter_async_context(made)

        host_cache = await cache(file_template, None, budget(n))
        file_cache = await cache(file_template, None, 0)
        cpu_cache = await stack.enter_async_context(
            ModelCache(file_template, device="cpu", device_budget=budget(n), zero_copy=False)
        )
        methods = [
            Method(
                "ceiling",
                "ceiling: 1 pinned tensor .to(cuda, non_blocking)",
                lambda: ceiling(pinned),
            ),
            Method(
                "host_tier",
                "ours: host tier (pinned) -> GPU",
                lambda: gpu_host_reload(host_cache, model),
            ),
            Method(
                "file", "ours: file:// (page cache) -> GPU", lambda: store_reload(file_cache, model)
            ),
        ]
        methods.append(
            Method("file_cpu", "ours: file:// (page cache) -> CPU", lambda: cpu_reload(cpu_cache))
        )
        backend = cupy_backend()
        if backend is not None:
            cupy_cache = await stack.enter_async_context(
                ModelCache(file_template, device_budget=budget(n), backend=backend)
            )
            methods.append(
                Method(
                    "cupy_file",
                    "ours, CuPy: file:// (page cache) -> GPU",
                    lambda: cupy_reload(cupy_cache, model),
                )
            )
        if s3 is not None:
            s3_cache = await cache(s3[0], s3[1], 0)
            methods.append(
                Method("s3", "ours: S3 (SeaweedFS) -> GPU", lambda: store_reload(s3_cache, model))
            )
        methods += [
            Method(
                "safetensors_cuda",
                'safetensors load_file(device="cuda")',
                lambda: safetensors_cuda(model),
            ),
            Method(
                "safetensors_to_cuda",
                'safetensors load_file + .to("cuda") each',
                lambda: safetensors_to_cuda(model),
            ),
        ]
        await run_all(methods, repeats)
    # Plain figures only: the methods' closures hold the pinned tensor and the caches.
    return [Result(m.key, m.label, m.times, m.warmup) for m in methods]


def report(
    label: str, n: int, methods: list[Result], figures: dict[str, Any]
) -> list[list[object]]:
    """Print the size's table and add its figures; returns its rows of the ratios table."""
    by = {m.key: m for m in methods}
    print_times(f"Time to a ready model on the GPU, {n / GIB:.3f} GiB payload", methods, n)
    for m in methods:
        figures[f"{m.key}_ms_{label}"] = rounded(m.times.best * 1e3)
        figures[f"{m.key}_median_ms_{label}"] = rounded(m.times.median * 1e3)
        figures[f"{m.key}_gbps_{label}"] = rounded(gbps(n, m.times.best))
    rows: list[list[object]] = []
    for key, ours, baseline, goal in RATIOS:
        if ours not in by or baseline not in by:
            continue
        value = by[baseline].times.best / by[ours].times.best
        figures[f"{key}_{label}"] = rounded(value)
        verdict = "" if goal is None else ("meets" if value >= goal else "misses")
        rows.append([f"{key}_{label}", value, "" if goal is None else f">= {goal:.1f}x", verdict])
    if {"file_cpu", "ceiling", "file"} <= by.keys():
        read, copy = by["file_cpu"].times.best, by["ceiling"].times.best
        overlap = (read + copy - by["file"].times.best) / min(read, copy)
        figures[f"staging_overlap_{label}"] = rounded(max(0.0, min(1.0, overlap)))
    return rows


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0] if __doc__ else "gpu load")
    parser.add_argument("--repeats", type=int, default=None, help="timed repetitions per method")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print(f"gpu_load: needs a CUDA GPU; nothing measured ({machine_line()})")
        emit_json({"cuda": False})
        return
    quick: bool = args.quick
    totals = [GIB] if quick else [GIB, 4 * GIB]
    repeats: int = args.repeats or (3 if quick else 5)
    name = torch.cuda.get_device_name(DEVICE)
    print(f"gpu_load{' (quick)' if quick else ''}: {name}; {machine_line()}")

    figures: dict[str, Any] = {"cuda": True, "device_name": name}
    ratio_rows: list[list[object]] = []
    with data_dir(args.data_dir, "modelcache-gpu-") as directory:
        root = Path(directory)
        with seaweedfs(root / "seaweedfs") as weed:
            for total in totals:
                label = size_label(total)
                files = root / f"files-{label}"
                path, _, payload = write_model(files, total)
                model = Model(path, payload, read_reference(path))
                s3: tuple[str, dict[str, Any]] | None = None
                where = "no S3 row (SeaweedFS's weed is not installed)"
                if weed is not None:
                    upload = s3_upload(weed, path, f"bench-{label}/{MODEL_ID}/model.safetensors")
                    s3 = (f"s3://{weed.bucket}/bench-{label}/{{model_id}}/", weed.s3_options)
                    where = f"S3: SeaweedFS at {weed.endpoint} (upload {upload:.1f} s)"
                kinds = ", ".join(str(d).removeprefix("torch.") for d in dtypes())
                print(
                    f"model {label}: {N_TENSORS} tensors ({kinds}), {payload / GIB:.3f} GiB "
                    f"payload, page cache warm; {where}; {repeats} timed repetitions after "
                    "1 warm-up, round-robin"
                )
                methods = anyio.run(
                    measure_size, model, f"file://{files}/{{model_id}}/", s3, repeats
                )
                ratio_rows += report(label, payload, methods, figures)
                figures[f"payload_bytes_{label}"] = payload
                if total == totals[0]:
                    figures.update(
                        anyio.run(memory_match, f"file://{files}/{{model_id}}/", payload)
                    )
                path.unlink()
                del model
                free_memory()
                torch.cuda.empty_cache()
    print_table(
        "Throughput ratios, best of each (baseline s / ours s; above 1.0 = ours faster)",
        ["ratio", "value", "goal", ""],
        ratio_rows,
    )
    figures["cpus"] = os.cpu_count()
    figures["repeats"] = repeats
    figures["quick"] = quick
    print()
    emit_json(figures)


if __name__ == "__main__":
    main()
